// restore_rows: a restore limited to some primary keys, approved, snapshotted and
// audited like any restore, on a table with a composite primary key.
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { createUser, db, http, owner, startTestServer, TEST_PASSWORD, type TestUser } from "./helpers.ts";

let server: RunningServer;
let admin: TestUser, viewer: TestUser;
const tokens: Record<string, string> = {};
const S = `rr_${randomBytes(4).toString("hex")}`;
const q = async <T = any>(sql: string, params: unknown[] = []): Promise<T[]> => (await owner().query(sql, params)).rows;
const rows = () => q(`select region, n, label, qty from ${S}.stock order by region, n`);

beforeAll(async () => {
  server = await startTestServer();
  [admin, viewer] = await Promise.all([createUser("admin", "rr-admin"), createUser("viewer", "rr-viewer")]);
  for (const [name, u] of Object.entries({ admin, viewer })) {
    tokens[name] = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: u.email, password: TEST_PASSWORD } })).body.token;
  }
  await q(`create schema ${S};
    create table ${S}.stock (region text, n int, label text not null, qty int not null default 0, primary key (region, n));
    insert into ${S}.stock values ('eu', 1, 'a', 10), ('eu', 2, 'b', 20), ('us', 1, 'c', 30), ('us', 2, 'd', 40);
    grant usage on schema ${S} to ${db.roles.viewer}; grant select on ${S}.stock to ${db.roles.viewer};
    select snapbase.register_table('${S}.stock')`);
});

afterAll(async () => {
  await server?.close();
});

describe("restore_rows", () => {
  it("puts back only the rows with the given keys (updated, deleted or added since), leaving every other row as it is", async () => {
    const [{ id: snap }] = await q(`select (snapbase.take_snapshot('${S}.stock', 'before')).id`);
    // Since the snapshot: one row changed, one deleted, one added, and one other change we keep.
    await q(`update ${S}.stock set qty = 99 where (region, n) = ('eu', 1);
             delete from ${S}.stock where (region, n) = ('us', 2);
             insert into ${S}.stock values ('eu', 3, 'new', 5);
             update ${S}.stock set label = 'kept' where (region, n) = ('us', 1)`);
    const res = await http(server.url, "POST", `/api/v1/snapshots/${snap}/restore`, {
      token: tokens.admin,
      body: { keys: [{ region: "eu", n: 1 }, { region: "us", n: 2 }, { region: "eu", n: 3 }], reason: "undo three rows" },
    });
    expect(res.status, JSON.stringify(res.body)).toBe(200);
    expect(res.body.change_request).toMatchObject({ kind: "restore", status: "approved", rows_affected: 3 });
    expect(await rows()).toEqual([
      { region: "eu", n: 1, label: "a", qty: 10 },
      { region: "eu", n: 2, label: "b", qty: 20 },
      { region: "us", n: 1, label: "kept", qty: 30 },
      { region: "us", n: 2, label: "d", qty: 40 },
    ]);
    // Snapshotted and audited like any restore.
    const [cr] = await q("select snapshot_id, restore_keys from snapbase.change_requests where id = $1", [res.body.change_request.id]);
    expect(cr.restore_keys).toHaveLength(3);
    const snapRows = await q(`select "row" from snapbase.snapshot_rows($1)`, [cr.snapshot_id]);
    expect(snapRows.map((r) => r.row)).toEqual(await rows());
    const audit = await q("select action from snapbase.audit_log where subject_type = 'change_request' and subject_id = $1 order by id", [String(res.body.change_request.id)]);
    expect(audit.map((a) => a.action)).toEqual(["submit", "restore"]);
  });

  it("refuses malformed keys, viewers and tables without a primary key, clearly and without a trace", async () => {
    const [{ id: snap }] = await q(`select (snapbase.take_snapshot('${S}.stock', 'again')).id`);
    const before = (await q("select count(*)::int as n from snapbase.change_requests"))[0].n;
    for (const [keys, message] of [
      [[{ region: "eu" }], /exactly the primary key columns \(region, n\)/],
      [[{ region: "eu", n: 1, extra: 2 }], /exactly the primary key columns/],
      [[{ region: "eu", n: null }], /non-null values/],
      [[], /non-empty array/],
      [["eu"], /exactly the primary key columns/],
    ] as const) {
      const res = await http(server.url, "POST", `/api/v1/snapshots/${snap}/restore`, { token: tokens.admin, body: { keys } });
      expect(res.status).toBe(400);
      expect(res.body.error.message).toMatch(message);
    }
    const asViewer = await http(server.url, "POST", `/api/v1/snapshots/${snap}/restore`, { token: tokens.viewer, body: { keys: [{ region: "eu", n: 1 }] } });
    expect(asViewer.status).toBe(403);
    await q(`create table ${S}.loose (a int); insert into ${S}.loose values (1); grant select on ${S}.loose to ${db.roles.viewer};
             select snapbase.register_table('${S}.loose')`);
    const [{ id: loose }] = await q(`select (snapbase.take_snapshot('${S}.loose', 'no key')).id`);
    const noKey = await http(server.url, "POST", `/api/v1/snapshots/${loose}/restore`, { token: tokens.admin, body: { keys: [{ a: 1 }] } });
    expect(noKey.body.error.message).toMatch(/needs a primary key/);
    expect((await q("select count(*)::int as n from snapbase.change_requests"))[0].n).toBe(before);
  });
});
