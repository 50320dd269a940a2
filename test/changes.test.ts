// Change requests, approval with snapshots, diff, restore and retention (seed 000).
import { createHash } from "node:crypto";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import {
  actorOf, asActor, createUser, db, graphql, http, owner, sqlState, startTestServer, TEST_PASSWORD, type TestUser, connectAs } from "./helpers.ts";

let server: RunningServer;
let admin: TestUser, admin2: TestUser, editor: TestUser, viewer: TestUser;


async function q(sql: string, params: unknown[] = []) {
  return (await owner().query(sql, params)).rows;
}

async function submitAs(user: TestUser, table: string, sql: string): Promise<string> {
  const c = await connectAs(user);
  try {
    return String((await c.query("select id from snapbase.submit_change($1, $2, 'test')", [table, sql])).rows[0].id);
  } finally {
    await c.end();
  }
}

async function approveAs(user: TestUser, id: string) {
  const c = await connectAs(user);
  try {
    return (await c.query("select * from snapbase.approve_change($1)", [id])).rows[0];
  } finally {
    await c.end();
  }
}

/** The live table's rows as jsonb, in primary-key order. */
async function tableRows(table: string, key = "id") {
  return (await q(`select to_jsonb(t) as r from ${table} t order by ${key}`)).map((r) => r.r);
}
async function snapshotRows(id: string | number) {
  return (await q("select \"row\" from snapbase.snapshot_rows($1) order by ordinal", [id])).map((r) => r.row);
}

beforeAll(async () => {
  server = await startTestServer();
  [admin, admin2, editor, viewer] = await Promise.all([createUser("admin"), createUser("admin", "admin2"), createUser("editor"), createUser("viewer")]);
  await owner().query(`
    drop schema if exists t3 cascade;
    create schema t3;
    grant usage on schema t3 to ${db.roles.viewer};
    create table t3.accounts (id int primary key, name text not null, balance numeric(12,2) not null check (balance >= 0));
    insert into t3.accounts select n, 'acct ' || n, n * 10 from generate_series(1, 20) n;
    create table t3.other (id int primary key, note text);
    create table t3.unmanaged (id int primary key);
    grant select on all tables in schema t3 to ${db.roles.viewer};
    grant insert, update, delete on all tables in schema t3 to ${db.roles.admin};
    select snapbase.register_table('t3.accounts');
    select snapbase.register_table('t3.other');
  `);
});
afterAll(async () => {
  await server?.close();
});

describe("the seed's test script, over HTTP", () => {
  it("logs in as admin, finds pending changes, approves one, and reads back a snapshot equal to the table", async () => {
    const id = await submitAs(editor, "t3.accounts", "update t3.accounts set balance = balance + 1 where id <= 5");
    const login = await http(server.url, "POST", "/api/v1/auth/login", { body: { email: admin.email, password: TEST_PASSWORD } });
    expect(login.status).toBe(200);
    const token = login.body.token;
    const pending = await http(server.url, "GET", "/api/v1/changes?status=pending", { token });
    expect(pending.status).toBe(200);
    expect(pending.body.changes.map((c: { id: string }) => String(c.id))).toContain(id);

    const approved = await http(server.url, "POST", `/api/v1/changes/${id}/approve`, { token });
    expect(approved.status).toBe(200);
    expect(approved.body.change_request).toMatchObject({ status: "approved", rows_affected: 5 });
    const snapshotId = approved.body.change_request.snapshot_id;

    const list = await http(server.url, "GET", "/api/v1/tables/accounts/snapshots", { token });
    expect(list.body.table).toBe("t3.accounts");
    expect(list.body.snapshots[0]).toMatchObject({ id: snapshotId, change_request_id: Number(id), table_name: "t3.accounts", record_count: 20 });
    expect(Object.keys(list.body.snapshots[0]).sort()).toEqual(["change_request_id", "created_at", "id", "record_count", "table_name"]);

    const snap = await http(server.url, "GET", `/api/v1/snapshots/${snapshotId}`, { token });
    expect(snap.status).toBe(200);
    expect(snap.body.snapshot_data).toEqual(await tableRows("t3.accounts"));
    expect(snap.body.snapshot_data[0]).toEqual({ id: 1, name: "acct 1", balance: 11 });

    const audit = await q("select action, actor from snapbase.audit_log where subject_type = 'change_request' and subject_id = $1 order by id", [id]);
    expect(audit).toEqual([{ action: "submit", actor: editor.email }, { action: "approve", actor: admin.email }]);
  });

  it("answers unknown ids with 404, wrong roles with 403 and bad bodies with 400", async () => {
    const token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: editor.email, password: TEST_PASSWORD } })).body.token;
    expect((await http(server.url, "GET", "/api/v1/snapshots/999999", { token })).status).toBe(404);
    expect((await http(server.url, "GET", "/api/v1/snapshots/abc", { token })).status).toBe(400);
    expect((await http(server.url, "GET", "/api/v1/tables/nope/snapshots", { token })).status).toBe(404);
    const id = await submitAs(editor, "t3.accounts", "update t3.accounts set name = name where id = 1");
    const forbidden = await http(server.url, "POST", `/api/v1/changes/${id}/approve`, { token });
    expect(forbidden.status).toBe(403);
    expect(forbidden.body.error.message).toBe("this action requires the admin role (you are editor)");
    const bad = await http(server.url, "POST", "/api/v1/changes", { token, body: { table_name: "accounts" } });
    expect(bad.status).toBe(400);
    const submitted = await http(server.url, "POST", "/api/v1/changes", { token, body: { table_name: "accounts", sql: "delete from t3.accounts where id = 20", reason: "r" } });
    expect(submitted.status).toBe(201);
    expect(submitted.body.change_request).toMatchObject({ status: "pending", kind: "sql", table_name: "t3.accounts" });
    const noAuth = await http(server.url, "POST", `/api/v1/changes/${id}/reject`);
    expect(noAuth.status).toBe(401); // anonymous: sign in first
  });
});

describe("GraphQL", () => {
  it("approves a change and pages through the snapshot's rows as a connection", async () => {
    const id = await submitAs(editor, "t3.accounts", "update t3.accounts set name = name || '!' where id = 8");
    const token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: admin.email, password: TEST_PASSWORD } })).body.token;
    const approved = await graphql(server.url, `mutation($id: BigInt!) { approveChange(input: { changeId: $id }) { result { status rowsAffected snapshotId errorMessage } } }`, { id }, token);
    expect(approved.body.data.approveChange.result).toMatchObject({ status: "approved", rowsAffected: "1", errorMessage: null });
    const snapshotId = approved.body.data.approveChange.result.snapshotId;
    const page = await graphql(server.url, `query($id: BigInt!) { snapshotRows(snapshotId: $id, first: 5) { nodes { ordinal row } pageInfo { hasNextPage } } }`, { id: snapshotId }, token);
    expect(page.body.data.snapshotRows.nodes).toHaveLength(5);
    expect(page.body.data.snapshotRows.pageInfo.hasNextPage).toBe(true);
    expect(page.body.data.snapshotRows.nodes[0].ordinal).toBe("0");
    const editorToken = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: editor.email, password: TEST_PASSWORD } })).body.token;
    const denied = await graphql(server.url, `mutation($id: BigInt!) { rejectChange(input: { changeId: $id }) { result { status } } }`, { id }, editorToken);
    expect(denied.body.errors?.[0]?.extensions?.code).toBe("42501");
  });
});

describe("submitting changes", () => {
  const refused: [string, string, RegExp][] = [
    ["several statements", "update t3.accounts set balance = 0; drop table t3.other", /exactly one INSERT, UPDATE, DELETE or MERGE statement/],
    ["two updates", "update t3.accounts set balance = 0; update t3.accounts set balance = 1", /exactly one INSERT, UPDATE, DELETE or MERGE statement/],
    ["DDL", "drop table t3.accounts", /one INSERT, UPDATE, DELETE or MERGE/],
    ["COPY", "copy t3.accounts to stdout", /one INSERT, UPDATE, DELETE or MERGE/],
    ["a SELECT", "select * from t3.accounts", /exactly one INSERT, UPDATE, DELETE or MERGE statement/],
    ["CREATE TABLE AS", "create table t3.copy as select * from t3.accounts", /exactly one INSERT, UPDATE, DELETE or MERGE statement/],
    ["another table", "update t3.other set note = 'x'", /may modify only t3\.accounts, but it modifies t3\.other/],
    ["a data-modifying CTE on another table", "with d as (delete from t3.other returning id) update t3.accounts set balance = 0 where id in (select id from d)", /modifies t3\.accounts, t3\.other|modifies t3\.other, t3\.accounts/],
    ["a syntax error", "update t3.accounts set", /syntax error/],
  ];
  for (const [what, sql, message] of refused) {
    it(`refuses ${what}, leaving nothing behind`, async () => {
      const before = (await q("select count(*)::int as n from snapbase.change_requests"))[0].n;
      const err = await asActor(actorOf(editor), (c) => sqlState(() => c.query("select snapbase.submit_change('t3.accounts', $1, 'x')", [sql])));
      expect(err.message).toMatch(message);
      expect((await q("select count(*)::int as n from snapbase.change_requests"))[0].n).toBe(before);
      expect((await q("select to_regclass('t3.other') is not null as ok"))[0].ok).toBe(true);
    });
  }

  it("refuses a table that is not under change control, and viewers", async () => {
    const unmanaged = await asActor(actorOf(editor), (c) => sqlState(() => c.query("select snapbase.submit_change('t3.unmanaged', 'delete from t3.unmanaged', null)")));
    // Alike for a table that is not managed and for one you may not read.
    expect(unmanaged.message).toMatch(/no managed table t3\.unmanaged that you may read/);
    const asViewer = await asActor(actorOf(viewer), (c) => sqlState(() => c.query("select snapbase.submit_change('t3.accounts', 'delete from t3.accounts', null)")));
    expect(asViewer.code).toBe("42501");
  });

  it("re-checks the SQL at approval, with PostgreSQL", async () => {
    const id = await submitAs(editor, "t3.accounts", "update t3.accounts set name = name where id = 2");
    // Someone with owner rights tampers with the stored text after submission.
    await q("update snapbase.change_requests set sql = 'update t3.other set note = $$x$$' where id = $1", [id]);
    const result = await approveAs(admin, id);
    expect(result).toMatchObject({ status: "failed", error_code: "42501" });
    expect(result.error_message).toMatch(/may modify only t3\.accounts/);
  });

  it("stores structured edits with the MERGE that will run, and applies them on approval", async () => {
    const edits = { insert: [{ id: 100, name: "new", balance: 1 }], update: [{ key: { id: 3 }, set: { name: "renamed" } }], delete: [{ id: 4 }] };
    const c = await connectAs(editor);
    const { rows: [cr] } = await c.query("select * from snapbase.submit_edits('t3.accounts', $1, 'edits')", [JSON.stringify(edits)]);
    await c.end();
    expect(cr.kind).toBe("edits");
    expect(cr.sql).toMatch(/^MERGE INTO t3\.accounts AS t/);
    const approved = await approveAs(admin, String(cr.id));
    expect(approved).toMatchObject({ status: "approved", rows_affected: "3" });
    expect(await q("select id, name, balance::float from t3.accounts where id in (3, 4, 100) order by id")).toEqual([
      { id: 3, name: "renamed", balance: 31 },
      { id: 100, name: "new", balance: 1 },
    ]);
  });
});

describe("approval", () => {
  it("a failing change leaves table and snapshots untouched, marks the request failed and audits it", async () => {
    const before = await tableRows("t3.accounts");
    const snapshotsBefore = (await q("select count(*)::int as n from snapbase.snapshots"))[0].n;
    const id = await submitAs(editor, "t3.accounts", "update t3.accounts set balance = balance - 1000");
    const result = await approveAs(admin, id);
    expect(result).toMatchObject({ status: "failed", error_code: "23514", snapshot_id: null });
    expect(result.error_message).toMatch(/violates check constraint/);
    expect(await tableRows("t3.accounts")).toEqual(before);
    expect((await q("select count(*)::int as n from snapbase.snapshots"))[0].n).toBe(snapshotsBefore);
    expect(await q("select action from snapbase.audit_log where subject_id = $1 and action = 'fail'", [id])).toHaveLength(1);
    const again = await asActor(actorOf(admin), (c) => sqlState(() => c.query("select snapbase.approve_change($1)", [id])));
    expect(again.message).toBe(`change request ${id} is failed, not pending`);
  });

  it("an admin may not approve their own request", async () => {
    const id = await submitAs(admin, "t3.accounts", "update t3.accounts set name = name where id = 5");
    const err = await asActor(actorOf(admin), (c) => sqlState(() => c.query("select snapbase.approve_change($1)", [id])));
    expect(err.message).toBe(`you submitted change request ${id}; another admin must approve it`);
    expect((await approveAs(admin2, id)).status).toBe("approved");
  });

  it("two admins approving at once: exactly one wins", async () => {
    const id = await submitAs(editor, "t3.accounts", "update t3.accounts set balance = balance + 1 where id = 6");
    const results = await Promise.allSettled([approveAs(admin, id), approveAs(admin2, id)]);
    const won = results.filter((r) => r.status === "fulfilled");
    const lost = results.filter((r) => r.status === "rejected") as PromiseRejectedResult[];
    expect(won).toHaveLength(1);
    expect(lost).toHaveLength(1);
    expect(lost[0]!.reason.message).toBe(`change request ${id} is approved, not pending`);
    expect(await q("select count(*)::int as n from snapbase.snapshots where change_request_id = $1", [id])).toEqual([{ n: 1 }]);
  });

  it("a writer hammering the table cannot make the snapshot differ from the state right after the change", async () => {
    await q("create table t3.busy (id int primary key, v int not null); grant select on t3.busy to " + db.roles.viewer + "; select snapbase.register_table('t3.busy')");
    const id = await submitAs(editor, "t3.busy", "insert into t3.busy select n, 0 from generate_series(1000000, 1000099) n");
    const writer = new pg.Client({ connectionString: db.ownerUrl });
    await writer.connect();
    let running = true;
    let n = 0;
    const hammer = (async () => {
      while (running && n < 2000) await writer.query("insert into t3.busy values ($1, 1)", [++n]);
    })();
    await new Promise((r) => setTimeout(r, 50));
    const approved = await approveAs(admin, id);
    running = false;
    await hammer;
    await writer.end();
    const rows = await snapshotRows(approved.snapshot_id);
    const hammered = rows.filter((r) => r.v === 1).map((r) => r.id);
    // The snapshot holds the change in full and a gap-free prefix of the hammer's commits.
    expect(rows.filter((r) => r.v === 0)).toHaveLength(100);
    expect(hammered).toEqual(Array.from({ length: hammered.length }, (_, i) => i + 1));
    expect(hammered.length).toBeGreaterThan(0);
    expect(hammered.length).toBeLessThan(n);
  });
});

describe("snapshots", () => {
  it("wide rows make smaller chunks, so no chunk nears PostgreSQL's 1 GB limit for one value", async () => {
    // 64 rows of 200 kB that do not compress: 256 of them would make a 50 MB chunk.
    await q(`create table t3.docs (id int primary key, doc bytea);
             insert into t3.docs select g, (select decode(string_agg(md5(g || '-' || i), ''), 'hex') from generate_series(1, 12500) i)
               from generate_series(1, 64) g;
             select snapbase.register_table('t3.docs')`);
    const [snap] = await q("select * from snapbase.take_snapshot('t3.docs', 'documents')");
    expect(snap.chunk_count).toBeGreaterThan(1);
    const [{ biggest }] = await q(`select max(c.row_count) as biggest from snapbase_private.snapshot_chunks sc
                                    join snapbase_private.chunks_${snap.layout_id} c on c.id = sc.chunk_id where sc.snapshot_id = $1`, [snap.id]);
    expect(biggest).toBeLessThan(64);
    const same = await q(`select bool_and(s."row" ->> 'doc' = '\\x' || encode(t.doc, 'hex')) as ok, count(*)::int as n
                            from snapbase.snapshot_rows($1) s join t3.docs t on t.id = (s."row" ->> 'id')::int`, [snap.id]);
    expect(same).toEqual([{ ok: true, n: 64 }]);
    // Narrow tables keep 256 rows a chunk on average (unchanged boundaries, unchanged deduplication).
    expect((await q("select snapbase_private.chunk_mask('t3.docs') as wide, snapbase_private.chunk_mask('t3.accounts') as narrow"))[0])
      .toEqual({ wide: 15, narrow: 255 });
  });

  it("a 50,000-row table (past the seed's 10,000 cap) snapshots completely", async () => {
    await q("create table t3.big (id int primary key, label text, amount numeric); insert into t3.big select n, md5(n::text), n / 7.0 from generate_series(1, 50000) n; select snapbase.register_table('t3.big')");
    const [snap] = await q("select * from snapbase.take_snapshot('t3.big', 'big')");
    expect(snap.record_count).toBe("50000");
    expect(snap.chunk_count).toBeGreaterThan(50);
    const mismatches = await q(`
      select count(*)::int as n from (select "row" from snapbase.snapshot_rows($1)) s
      full join (select to_jsonb(t) as r from t3.big t) t on s."row" = t.r where s."row" is null or t.r is null`, [snap.id]);
    expect(mismatches[0].n).toBe(0);
    // A one-row change adds one chunk, not a second copy.
    await q("update t3.big set label = 'changed' where id = 25000");
    const [again] = await q("select * from snapbase.take_snapshot('t3.big', 'after one change')");
    expect(Number(again.new_stored_bytes)).toBeLessThan(Number(again.stored_bytes) * 0.05);
    const page = await q("select ordinal, \"row\" from snapbase.snapshot_rows($1, 24999, 2)", [again.id]);
    expect(page.map((p) => [p.ordinal, p.row.id, p.row.label])).toEqual([["24999", 25000, "changed"], ["25000", 25001, md5(25001)]]);
  });

  it("chunks composite, text and missing primary keys completely, in key order, sharing unchanged chunks", async () => {
    await q(`
      create table t3.pair (a int, b text, v int, primary key (a, b));
      insert into t3.pair select n % 37, 'k' || n, n from generate_series(1, 5000) n;
      create table t3.named (code text primary key, v int);
      insert into t3.named select md5(n::text), n from generate_series(1, 5000) n;
      create table t3.loose (v int, w text);
      insert into t3.loose select n % 1000, 'w' || n from generate_series(1, 5000) n;
      select snapbase.register_table('t3.pair'), snapbase.register_table('t3.named'), snapbase.register_table('t3.loose');`);
    for (const [table, key] of [["t3.pair", "a, b"], ["t3.named", "code"], ["t3.loose", "t::text"]] as const) {
      const [snap] = await q(`select * from snapbase.take_snapshot('${table}', 'keys')`);
      expect(snap.chunk_count, table).toBeGreaterThan(5);
      const rows = await snapshotRows(snap.id);
      const live = (await q(`select to_jsonb(t) as r from ${table} t order by ${key}`)).map((r) => r.r);
      if (key === "t::text") expect(rows.map((r) => JSON.stringify(r)).sort(), table).toEqual(live.map((r) => JSON.stringify(r)).sort());
      else expect(rows, table).toEqual(live);
      const [again] = await q(`select * from snapbase.take_snapshot('${table}', 'unchanged')`);
      expect(again.new_stored_bytes, table).toBe("0");
    }
  });

  // Built-in types only: chunks are stored binary. A user-defined enum: text form.
  it.each([
    ["binary chunks (built-in types only)", "types_binary", false],
    ["text chunks (with a user-defined enum)", "types_text", true],
  ])("every column type round-trips exactly, through snapshot and restore: %s", async (_label, name, withEnum) => {
    const table = `t3.${name}`;
    await q(`
      create type t3.${name}_mood as enum ('happy', 'sad');
      create table ${table} (
        id int primary key, n numeric(40, 20), ts timestamptz, d date, iv interval, f float8, ints int[], txt text[],
        j jsonb, b bytea, m ${withEnum ? `t3.${name}_mood` : "text"}, u text, flag boolean, nothing text,
        scaled numeric[], local timestamp, uid uuid
      );
      insert into ${table} values
        (1, 12345678901234567890.12345678901234567890, '2024-02-29 23:59:59.999999+05:30', '0001-01-01', '1 year 2 mons -3 days 04:05:06.789',
         0.1 + 0.2, '{1,NULL,3}', '{"a,b","c\\"d",NULL,""}', '{"k": [1, 2.50, null], "u": "é"}', '\\x00ff10', 'sad',
         'Ünïcødé 🐘 ''quotes'' "dq" \\ back
newline', true, null, '{1.0,1.00,-0.000}', '2024-02-29 23:59:59.5', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'),
        (2, null, null, null, null, 'NaN', '{}', '{}', 'null', '\\x', null, '', false, null, null, 'infinity', null);
      grant select, insert, update, delete on ${table} to ${db.roles.admin};
      select snapbase.register_table('${table}');`);
    const before = (await q(`select t::text as r from ${table} t order by id`)).map((r) => r.r);
    const [snap] = await q(`select * from snapbase.take_snapshot('${table}', 'types')`);
    const [{ binary }] = await q("select bool_and(chunk_id is not null) as binary from snapbase_private.snapshot_chunks where snapshot_id = $1", [snap.id]);
    expect(binary).toBe(!withEnum);
    expect(await snapshotRows(snap.id)).toEqual(await tableRows(table));
    await q(`delete from ${table} where id = 1; update ${table} set u = 'changed'`);
    const c = await connectAs(admin);
    const { rows: [restored] } = await c.query("select * from snapbase.restore_snapshot($1)", [snap.id]);
    await c.end();
    expect(restored).toMatchObject({ kind: "restore", status: "approved", rows_affected: "2" });
    expect((await q(`select t::text as r from ${table} t order by id`)).map((r) => r.r)).toEqual(before);
  });

  it("shares a binary chunk only when it is byte-identical: 1.0 and 1.00 are equal numbers but different values", async () => {
    await q(`create table t3.scale (id int primary key, n numeric); insert into t3.scale values (1, 1.0);
             grant select on t3.scale to ${db.roles.admin}; select snapbase.register_table('t3.scale')`);
    const [first] = await q("select * from snapbase.take_snapshot('t3.scale', 'one point zero')");
    await q("update t3.scale set n = 1.00");
    const [second] = await q("select * from snapbase.take_snapshot('t3.scale', 'one point zero zero')");
    const [third] = await q("select * from snapbase.take_snapshot('t3.scale', 'unchanged')");
    expect(Number(second.new_stored_bytes)).toBeGreaterThan(0);
    expect(Number(third.new_stored_bytes)).toBe(0);
    expect((await q("select \"row\" ->> 'n' as n from snapbase.snapshot_rows($1)", [first.id]))[0].n).toBe("1.0");
    expect((await q("select \"row\" ->> 'n' as n from snapbase.snapshot_rows($1)", [second.id]))[0].n).toBe("1.00");
  });

  it("restore round-trips: the table equals the snapshot afterwards, with the fewest row operations", async () => {
    const [snap] = await q("select * from snapbase.take_snapshot('t3.accounts', 'before mess')");
    await q("delete from t3.accounts where id in (1, 2); update t3.accounts set name = 'x' where id = 7; insert into t3.accounts values (500, 'extra', 0)");
    const c = await connectAs(admin);
    const { rows: [cr] } = await c.query("select * from snapbase.restore_snapshot($1, 'undo')", [snap.id]);
    await c.end();
    expect(cr).toMatchObject({ status: "approved", kind: "restore", rows_affected: "4", restore_snapshot_id: snap.id });
    expect(await tableRows("t3.accounts")).toEqual(await snapshotRows(snap.id));
    expect(await snapshotRows(cr.snapshot_id)).toEqual(await snapshotRows(snap.id));
    expect(await q("select action from snapbase.audit_log where subject_type = 'change_request' and subject_id = $1 order by id", [String(cr.id)])).toEqual([{ action: "submit" }, { action: "restore" }]);
  });

  it("restore refuses, clearly, a snapshot whose columns no longer fit the table", async () => {
    await q("create table t3.shape (id int primary key, a text); grant select, insert, update, delete on t3.shape to " + db.roles.admin + "; select snapbase.register_table('t3.shape')");
    const [snap] = await q("select * from snapbase.take_snapshot('t3.shape', 'shape')");
    // A new column that is NOT NULL without a default has no value to take on rows put back.
    await q("alter table t3.shape add column b int not null, alter column a type varchar(10)");
    const err = await asActor(actorOf(admin), (c) => sqlState(() => c.query("select snapbase.restore_snapshot($1)", [snap.id])));
    expect(err.message).toBe(`snapshot ${snap.id} no longer fits t3.shape: column a: text in the snapshot, character varying(10) now; column b is NOT NULL without a default, and the snapshot has no values for it`);
    // ... but the snapshot still reads back exactly as it was.
    expect(await snapshotRows(snap.id)).toEqual([]);
  });

  it("diff reports inserts, deletes and updates by primary key with the changed fields", async () => {
    await q(`create table t3.d (id int primary key, a text, b int); insert into t3.d select n, 'a' || n, n from generate_series(1, 1000) n; grant select on t3.d to ${db.roles.viewer}; select snapbase.register_table('t3.d')`);
    const [s1] = await q("select id from snapbase.take_snapshot('t3.d', 'one')");
    await q("delete from t3.d where id = 10; update t3.d set b = -1 where id = 500; insert into t3.d values (2000, 'new', 0)");
    const [s2] = await q("select id from snapbase.take_snapshot('t3.d', 'two')");
    expect(await q("select * from snapbase.snapshot_diff($1, $2)", [s1.id, s2.id])).toEqual([
      { change: "removed", key: { id: 10 }, changed_fields: null, before: { id: 10, a: "a10", b: 10 }, after: null },
      { change: "changed", key: { id: 500 }, changed_fields: ["b"], before: { id: 500, a: "a500", b: 500 }, after: { id: 500, a: "a500", b: -1 } },
      { change: "added", key: { id: 2000 }, changed_fields: null, before: null, after: { id: 2000, a: "new", b: 0 } },
    ]);
    const token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: viewer.email, password: TEST_PASSWORD } })).body.token;
    const res = await http(server.url, "GET", `/api/v1/snapshots/${s1.id}/diff/${s2.id}`, { token });
    expect(res.body).toMatchObject({ added: [{ id: 2000 }], removed: [{ id: 10 }], changed: [{ key: { id: 500 }, changed_fields: ["b"] }] });
  });

  it("nobody, admin included, may update or delete a snapshot", async () => {
    const [snap] = await q("select id from snapbase.snapshots limit 1");
    const upd = await asActor(actorOf(admin), (c) => sqlState(() => c.query("update snapbase.snapshots set reason = 'x' where id = $1", [snap.id])));
    expect(upd.code).toBe("42501");
    const del = await asActor(actorOf(admin), (c) => sqlState(() => c.query("delete from snapbase.snapshots where id = $1", [snap.id])));
    expect(del.code).toBe("42501");
    const asOwnerErr = await sqlState(() => owner().query("delete from snapbase.snapshots where id = $1", [snap.id]));
    expect(asOwnerErr.message).toMatch(/snapshots are immutable/);
    // The stored rows themselves: no application role may even read them directly.
    const [{ chunks }] = await q(`select l.chunk_table as chunks from snapbase.snapshots s join snapbase_private.row_layouts l on l.id = s.layout_id
                                   where l.chunk_table is not null limit 1`);
    for (const sql of [`update ${chunks} set row_count = 0`, `delete from ${chunks}`, "delete from snapbase_private.chunk_store"]) {
      const refused = await asActor(actorOf(admin), (c) => sqlState(() => c.query(sql)));
      expect(refused.code, refused.message).toBe("42501");
    }
  });

  it("follows the live table's access rules", async () => {
    await q(`create table t3.secret (id int primary key, s text); insert into t3.secret values (1, 'classified'); select snapbase.register_table('t3.secret')`);
    const [snap] = await q("select id from snapbase.take_snapshot('t3.secret', 'secret')");
    const err = await asActor(actorOf(viewer), (c) => sqlState(() => c.query("select * from snapbase.snapshot_rows($1)", [snap.id])));
    expect(err).toEqual({ code: "P0002", message: `no snapshot ${snap.id}` });
    const listed = await asActor(actorOf(viewer), (c) => c.query("select count(*)::int as n from snapbase.snapshots where id = $1", [snap.id]));
    expect(listed.rows[0].n).toBe(0);
    await q(`grant select (id) on t3.secret to ${db.roles.viewer}`);
    const partial = await asActor(actorOf(viewer), (c) => c.query("select \"row\" from snapbase.snapshot_rows($1)", [snap.id]));
    expect(partial.rows).toEqual([{ row: { id: 1 } }]);
  });

  it("retention prunes beyond the policy, never the newest, and drops unused chunks", async () => {
    await q("create table t3.ret (id int primary key, v int); select snapbase.register_table('t3.ret', keep_last => 2)");
    const ids: string[] = [];
    for (let i = 0; i < 4; i++) {
      await q("insert into t3.ret values ($1, $1)", [i]);
      ids.push((await q("select id from snapbase.take_snapshot('t3.ret', 'r')"))[0].id);
    }
    await q("select snapbase_private.prune_snapshots()");
    expect((await q("select id from snapbase.snapshots where table_name = 't3.ret' order by id")).map((r) => r.id)).toEqual(ids.slice(2));
    // Each pruned snapshot had a chunk of its own: both are gone, and nothing unused is left.
    expect(await q("select action, details -> 'chunks_removed' as removed from snapbase.audit_log where action = 'retention_prune' order by id desc limit 1"))
      .toEqual([{ action: "retention_prune", removed: 2 }]);
    expect((await q("select snapbase_private.remove_unused_chunks() as n"))[0].n).toBe("0");
  });
});

function md5(n: number): string {
  return createHash("md5").update(String(n)).digest("hex");
}
