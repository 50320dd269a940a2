// Red-team review of the surfaces added in migration 000020: partial restore by keys
// (restore_rows), row_history, snapshot_as_of, preview_change and the change-tracking
// triggers behind incremental snapshots. Each test is a confirmed finding and fails
// until the product code is fixed; the expectation is what the README promises.
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { actorOf, asActor, createUser, db, http, owner, sqlState, startTestServer, TEST_PASSWORD, type TestUser } from "./helpers.ts";

const S = `rt2_${randomBytes(4).toString("hex")}`;
const q = async <T = any>(sql: string, params: unknown[] = []): Promise<T[]> => (await owner().query(sql, params)).rows;
let viewer: TestUser, editor: TestUser;
let server: RunningServer;
const tokens: Record<string, string> = {};

/** A table owned by Snapbase's owner (so it is tracked), readable by viewers except `hidden`. */
async function managed(name: string, ddl: string, hidden: string[] = []): Promise<string> {
  const t = `${S}.${name}`;
  await q(`create table ${t} ${ddl}`);
  if (hidden.length === 0) await q(`grant select on ${t} to ${db.roles.viewer}`);
  else {
    const cols = await q<{ attname: string }>(`select attname from pg_attribute where attrelid = '${t}'::regclass and attnum > 0 and not attisdropped`);
    const shown = cols.map((c) => c.attname).filter((c) => !hidden.includes(c));
    await q(`grant select (${shown.map((c) => `"${c}"`).join(", ")}) on ${t} to ${db.roles.viewer}`);
  }
  await q(`select snapbase.register_table('${t}')`);
  return t;
}
const snap = async (t: string, reason = "test") => (await q(`select (s).id, (s).build, (s).build_reason from (select snapbase.take_snapshot($1, $2) s) x`, [t, reason]))[0];
/** The snapshot's rows and the table's (keyed by `id`), as JSON in key order: they must be equal. */
async function snapshotVsTable(t: string, id: string) {
  const inSnapshot = (await q(`select "row" from snapbase.snapshot_rows($1) order by ordinal`, [id])).map((r) => r.row);
  // By the key, not by the jsonb (which orders objects by their shortest keys first: "v" before "id").
  const inTable = (await q(`select to_jsonb(t) as r from ${t} t order by t.id`)).map((r) => r.r);
  return { inSnapshot, inTable };
}

beforeAll(async () => {
  [viewer, editor] = await Promise.all([createUser("viewer", "rt2-viewer"), createUser("editor", "rt2-editor")]);
  await q(`create schema ${S}; grant usage on schema ${S} to ${db.roles.viewer}`);
  server = await startTestServer();
  for (const [name, u] of Object.entries({ viewer, editor })) {
    tokens[name] = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: u.email, password: TEST_PASSWORD } })).body.token;
  }
});
afterAll(async () => {
  await server?.close();
});

describe("preview_change: only admins or the submitter", () => {
  // The check is `not (current_app_role() = 'admin' or cr.submitted_by = current_user_id())`:
  // for a change submitted in psql (submitted_by NULL) the condition is NULL and the
  // IF does not raise, so any viewer who can read the table previews it (runs it in
  // the sandbox with the DBA's reading rights, holds a SHARE ROW EXCLUSIVE lock, and
  // reads its "fails" message).
  it("refuses a viewer and a non-submitting editor a preview of a change a DBA submitted in psql (submitted_by NULL)", async () => {
    const t = await managed("pv", "(id int primary key, v text, secret text)", ["secret"]);
    await q(`insert into ${t} select g, 'v' || g, 'hush' || g from generate_series(1, 10) g`);
    const [{ id: ok }] = await q(`select id from snapbase.submit_change('${t}', 'update ${t} set v = ''changed'' where id <= 2', 'dba')`);
    // A change that reads the hidden column and fails: its message quotes the hidden value.
    const [{ id: failing }] = await q(`select id from snapbase.submit_change('${t}', 'update ${t} set v = (secret::int)::text where id = 1', 'dba')`);
    for (const u of [viewer, editor]) {
      for (const id of [ok, failing]) {
        const r = await asActor(actorOf(u), async (c) =>
          sqlState(async () => JSON.stringify((await c.query("select snapbase.preview_change($1) as p", [id])).rows[0].p)).catch((e: Error) => ({ code: "none", message: e.message })),
        );
        expect(r.message, `${u.role} previewing change ${id}`).not.toMatch(/hush1/);
        expect(r.code, `${u.role} previewing change ${id}: ${r.message}`).toBe("P0002");
      }
    }
    const rest = await http(server.url, "GET", `/api/v1/changes/${failing}/preview`, { token: tokens.viewer });
    expect(JSON.stringify(rest.body)).not.toMatch(/hush1/);
    expect(rest.status).toBe(404);
  });
});

describe("row_history", () => {
  it("does not tell a viewer that a column it may not read changed (snapshot_diff shows no change)", async () => {
    const t = await managed("rh_hidden", "(id int primary key, v text, secret text)", ["secret"]);
    await q(`insert into ${t} values (1, 'a', 'old secret')`);
    const s1 = await snap(t);
    await q(`update ${t} set secret = 'new secret' where id = 1`);
    const s2 = await snap(t);
    const [history, diff] = await asActor(actorOf(viewer), async (c) => [
      (await c.query(`select snapshot_id, change, changed_fields, "row" from snapbase.row_history('${t}', '{"id": 1}')`)).rows,
      (await c.query("select * from snapbase.snapshot_diff($1, $2)", [s1.id, s2.id])).rows,
    ]);
    expect(diff).toEqual([]);
    // Today: change "changed" with changed_fields [] — an oracle for the hidden column.
    expect(history[0]).toMatchObject({ change: "unchanged", changed_fields: null, row: { id: 1, v: "a" } });
  });

  it("shows a row put back after a snapshot in which the table was empty", async () => {
    const t = await managed("rh_empty", "(id int primary key, v text)");
    await q(`insert into ${t} values (1, 'a')`);
    const s1 = await snap(t);
    await q(`delete from ${t}`);
    const s2 = await snap(t); // no pages: the chunk lookup finds nothing and keeps the last chunk identity
    await q(`insert into ${t} values (1, 'a')`);
    const s3 = await snap(t); // the same chunk as s1: taken as "the same row as before" (none)
    const history = await q(`select snapshot_id, change, "row" from snapbase.row_history('${t}', '{"id": 1}')`);
    expect(history.map((h) => [String(h.snapshot_id), h.change, h.row])).toEqual([
      [String(s3.id), "added", { id: 1, v: "a" }],
      [String(s2.id), "removed", null],
      [String(s1.id), "initial", { id: 1, v: "a" }],
    ]);
  });

  it("shows a row again after a snapshot taken under another primary key (no chunk looked up in between)", async () => {
    const t = await managed("rh_pk", "(id int primary key, v text)");
    await q(`insert into ${t} values (1, 'a'), (2, 'b')`);
    const s1 = await snap(t);
    await q(`alter table ${t} drop constraint rh_pk_pkey; alter table ${t} add primary key (id, v)`);
    const s2 = await snap(t);
    await q(`alter table ${t} drop constraint rh_pk_pkey; alter table ${t} add primary key (id)`);
    const s3 = await snap(t); // the same rows, so the same stored chunk as s1
    const history = await q(`select snapshot_id, change, "row" from snapbase.row_history('${t}', '{"id": 1}')`);
    expect(history.map((h) => [String(h.snapshot_id), h.change, h.row])).toEqual([
      [String(s3.id), "added", { id: 1, v: "a" }],
      [String(s2.id), "removed", null],
      [String(s1.id), "initial", { id: 1, v: "a" }],
    ]);
  });

  // hidden_columns() called has_column_privilege(role, table, 'gone', ...), which raised
  // "column gone of relation ... does not exist" (snapshot_rows and snapshot_diff too).
  // A dropped column is shown to whoever may read the whole table, hidden from the rest.
  it("still answers after a column was dropped from the table (and does not name the dropped column)", async () => {
    const whole = await managed("rh_dropped", "(id int primary key, v text, gone text)");
    const someColumns = await managed("rh_dropped_cols", "(id int primary key, v text, gone text, secret text)", ["secret"]);
    const answers: Record<string, unknown> = {};
    for (const t of [whole, someColumns]) {
      await q(`insert into ${t} (id, v, gone) values (1, 'a', 'x')`);
      const s1 = await snap(t);
      await q(`alter table ${t} drop column gone`);
      const s2 = await snap(t);
      answers[t] = await asActor(actorOf(viewer), async (c) => {
        try {
          return {
            history: (await c.query(`select change, changed_fields from snapbase.row_history('${t}', '{"id": 1}')`)).rows,
            first: (await c.query(`select "row" from snapbase.snapshot_rows($1)`, [s1.id])).rows.map((r) => r.row),
            diff: (await c.query("select * from snapbase.snapshot_diff($1, $2)", [s1.id, s2.id])).rows.length,
          };
        } catch (e) {
          return (e as Error).message;
        }
      });
    }
    expect(answers[whole]).toEqual({
      history: [{ change: "changed", changed_fields: ["gone"] }, { change: "initial", changed_fields: null }],
      first: [{ id: 1, v: "a", gone: "x" }],
      diff: 1,
    });
    expect(answers[someColumns]).toEqual({
      history: [{ change: "unchanged", changed_fields: null }, { change: "initial", changed_fields: null }],
      first: [{ id: 1, v: "a" }],
      diff: 0,
    });
  });
});

describe("incremental snapshots equal the table", () => {
  it("after DROP COLUMN and ADD COLUMN of the same name and type (no rewrite, same layout)", async () => {
    const t = await managed("inc_readd", "(id int primary key, v text, w int)");
    await q(`insert into ${t} select g, 'v' || g, g from generate_series(1, 20) g`);
    await snap(t);
    await q(`alter table ${t} drop column w; alter table ${t} add column w int default 7`);
    const s = await snap(t);
    const { inSnapshot, inTable } = await snapshotVsTable(t, s.id);
    expect(inSnapshot, `build ${s.build} (${s.build_reason})`).toEqual(inTable);
  });

  it("after other column changes that rewrite nothing (siblings of DROP and ADD COLUMN)", async () => {
    const t = await managed("inc_cols", "(id int primary key, v varchar(10), w int default 1, n numeric(10, 2), s text)");
    await q(`insert into ${t} select g, 'v' || g, g, g / 3.0, 's' || g from generate_series(1, 40) g`);
    await snap(t);
    const relfilenode = async () => (await q(`select relfilenode::text as f from pg_class where oid = '${t}'::regclass`))[0].f;
    const before = await relfilenode();
    const steps: [string, "incremental" | "full"][] = [
      // No row changes: nothing to rebuild.
      [`alter table ${t} alter column w set default 2`, "incremental"],
      // The same name and type again, with another default (or none).
      [`alter table ${t} drop column w; alter table ${t} add column w int default 3`, "full"],
      [`alter table ${t} drop column w; alter table ${t} add column w int`, "full"],
      // Renamed away, re-added under the old name, the old one dropped: the same layout.
      [`alter table ${t} rename column s to s_old; alter table ${t} add column s text default 'new'; alter table ${t} drop column s_old`, "full"],
      // Types changed without a rewrite (the values and their text stay as they are).
      [`alter table ${t} alter column v type varchar(20)`, "full"],
      [`alter table ${t} alter column v type text`, "full"],
      [`alter table ${t} alter column n type numeric(12, 2)`, "full"],
      // A column added and dropped again: the layout is back, the attributes are not.
      [`alter table ${t} add column tmp int default 9; alter table ${t} drop column tmp`, "full"],
      [`update ${t} set w = 5 where id = 7`, "incremental"],
    ];
    for (const [ddl, build] of steps) {
      await q(ddl);
      const s = await snap(t);
      const { inSnapshot, inTable } = await snapshotVsTable(t, s.id);
      expect(inSnapshot, `${ddl}: build ${s.build} (${s.build_reason})`).toEqual(inTable);
      expect(s.build, ddl).toBe(build);
    }
    expect(await relfilenode()).toBe(before);
  });

  it("after the table inherits a parent, is written through it, and stops inheriting before the next snapshot", async () => {
    const t = await managed("inc_inherit", "(id int primary key, v text)");
    await q(`insert into ${t} select g, 'v' || g from generate_series(1, 20) g`);
    await snap(t);
    // Statements on a parent write the child without firing the child's statement triggers,
    // so a tracked table may not become one: its ROW trigger with a transition table (which
    // never fires) makes PostgreSQL refuse, disabled (as armed) or enabled.
    await q(`create table ${S}.inc_parent (id int, v text);
             create table ${S}.inc_root (id int primary key, v text) partition by range (id)`);
    for (const enabled of [false, true]) {
      if (enabled) await q(`alter table ${t} enable always trigger _900_snapbase_track_no_inheritance`);
      expect(await sqlState(() => q(`alter table ${t} inherit ${S}.inc_parent`))).toEqual({
        code: "0A000", message: `trigger "_900_snapbase_track_no_inheritance" prevents table "inc_inherit" from becoming an inheritance child` });
      expect(await sqlState(() => q(`alter table ${S}.inc_root attach partition ${t} for values from (0) to (100)`))).toEqual({
        code: "0A000", message: `trigger "_900_snapbase_track_no_inheritance" prevents table "inc_inherit" from becoming a partition` });
    }
    // Enabled it still never fires (WHEN (false)), but it is not as armed: the next snapshot is full.
    await q(`delete from ${t} where id = 20`);
    const whileEnabled = await snap(t);
    expect(whileEnabled).toMatchObject({ build: "full", build_reason: expect.stringMatching(/^changes are not tracked: the tracking triggers are missing the disabled _900_snapbase_track_no_inheritance/) });
    expect((await snapshotVsTable(t, whileEnabled.id)).inSnapshot).toHaveLength(19);
    await q(`select snapbase.register_table('${t}')`); // re-arms: disabled again
    expect((await q(`select tgenabled from pg_trigger where tgrelid = '${t}'::regclass and tgname = '_900_snapbase_track_no_inheritance'`))[0].tgenabled).toBe("D");
    await q(`update ${t} set v = 'tracked' where id = 3`);
    expect((await snap(t)).build).toBe("full"); // the first after re-arming
    await q(`update ${t} set v = 'tracked again' where id = 4`);
    expect((await snap(t)).build).toBe("incremental");

    // With the trigger dropped, the table can be made a child and written through the parent:
    // the next snapshot is full (the trigger is missing), and so is the one after re-arming.
    await q(`drop trigger _900_snapbase_track_no_inheritance on ${t};
             alter table ${t} inherit ${S}.inc_parent;
             update ${S}.inc_parent set v = 'through the parent' where id = 5;
             alter table ${t} no inherit ${S}.inc_parent`);
    const s = await snap(t);
    expect(s).toMatchObject({ build: "full", build_reason: expect.stringMatching(/^changes are not tracked: the tracking triggers are missing the disabled _900_snapbase_track_no_inheritance/) });
    const { inSnapshot, inTable } = await snapshotVsTable(t, s.id);
    expect(inSnapshot, `build ${s.build} (${s.build_reason})`).toEqual(inTable);
    expect(inSnapshot[4]).toEqual({ id: 5, v: "through the parent" });
  });

  it("after the table was an inheritance parent whose child was detached before the next snapshot", async () => {
    const t = await managed("inc_parent_of", "(id int primary key, v text)");
    await q(`insert into ${t} select g, 'v' || g from generate_series(1, 20) g`);
    await snap(t);
    // A child's rows show in the parent, and writes to the child fire none of the parent's triggers.
    await q(`create table ${S}.inc_child (id int primary key, v text);
             alter table ${S}.inc_child inherit ${t};
             insert into ${S}.inc_child values (100, 'in the child')`);
    const withChild = await snap(t);
    expect(withChild).toMatchObject({ build: "full", build_reason: expect.stringMatching(/inheritance children/) });
    expect((await snapshotVsTable(t, withChild.id)).inSnapshot).toHaveLength(21);
    await q(`update ${S}.inc_child set v = 'changed in the child' where id = 100;
             alter table ${S}.inc_child no inherit ${t}`);
    const detached = await snap(t);
    expect(detached.build).toBe("full"); // the snapshot before was not tracked
    const { inSnapshot, inTable } = await snapshotVsTable(t, detached.id);
    expect(inSnapshot).toEqual(inTable);
    expect(inSnapshot).toHaveLength(20);
    // Attached and detached again between two snapshots: the child's rows were never in one.
    await q(`alter table ${S}.inc_child inherit ${t}; update ${t} set v = 'through the parent' where id in (1, 100); alter table ${S}.inc_child no inherit ${t}`);
    const after = await snap(t);
    expect(after.build).toBe("incremental");
    expect(await snapshotVsTable(t, after.id).then((x) => x.inSnapshot)).toEqual(await snapshotVsTable(t, after.id).then((x) => x.inTable));
  });
});

describe("restore_rows", () => {
  it("puts back, not deletes, a row whose key equals the given one under the key's (nondeterministic) collation", async () => {
    await q(`create collation ${S}.nocase (provider = icu, locale = 'und-u-ks-level2', deterministic = false)`);
    const t = await managed("rr_nocase", `(name text collate ${S}.nocase primary key, v int)`);
    await q(`insert into ${t} values ('alice', 1), ('bob', 2)`);
    const s = await snap(t);
    await q(`update ${t} set v = 100 where name = 'alice'`);
    // The snapshot's rows are filtered by the key with the default collation ('alice' <> 'ALICE'),
    // the table's with the column's ('alice' = 'ALICE'): the row is deleted and not put back.
    const [cr] = await q(`select status from snapbase.restore_rows($1, '[{"name": "ALICE"}]')`, [s.id]);
    expect(cr.status).toBe("approved");
    expect(await q(`select name, v from ${t} order by name`)).toEqual([{ name: "alice", v: 1 }, { name: "bob", v: 2 }]);
  });
});
