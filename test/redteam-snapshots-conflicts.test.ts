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
/** The snapshot's rows and the table's, as JSON in key order: they must be equal. */
async function snapshotVsTable(t: string, id: string) {
  const inSnapshot = (await q(`select "row" from snapbase.snapshot_rows($1) order by ordinal`, [id])).map((r) => r.row);
  const inTable = (await q(`select to_jsonb(t) as r from ${t} t order by 1`)).map((r) => r.r);
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

  it("after the table inherits a parent, is written through it, and stops inheriting before the next snapshot", async () => {
    const t = await managed("inc_inherit", "(id int primary key, v text)");
    await q(`insert into ${t} select g, 'v' || g from generate_series(1, 20) g`);
    await snap(t);
    // Statements on the parent write the child without firing the child's statement triggers.
    await q(`create table ${S}.inc_parent (id int, v text);
             alter table ${t} inherit ${S}.inc_parent;
             update ${S}.inc_parent set v = 'through the parent' where id = 5;
             alter table ${t} no inherit ${S}.inc_parent`);
    const s = await snap(t);
    const { inSnapshot, inTable } = await snapshotVsTable(t, s.id);
    expect(inSnapshot, `build ${s.build} (${s.build_reason})`).toEqual(inTable);
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
