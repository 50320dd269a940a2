// Connector accounts and the download / publish jobs, end to end: a real worker,
// a second PostgreSQL database and the local MariaDB as sources, read back with
// their own clients.
import { randomBytes } from "node:crypto";
import mysql from "mysql2/promise";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { startWorker, type Worker } from "../src/worker.ts";
import { createUser, db, graphqlData, http, logged, owner, settled, startTestServer, TEST_CREDENTIALS_KEY, TEST_PASSWORD, type TestUser } from "./helpers.ts";
import { createSourceDatabase, type SourceDatabase } from "./source-databases.ts";
import { withUrlParts } from "../src/db/urls.ts";

// Cluster-wide names are unique per run, so suites of several checkouts can share a server.
const RUN = randomBytes(4).toString("hex");
const SOURCE_DB = `snapbase_jobs_source_${RUN}`;
const SOURCE_USER = `snapbase_jobs_reader_${RUN}`;
const SOURCE_PASSWORD = "Sup3r-Secret-Source-Pw";
const MYSQL_URL = process.env.TEST_MYSQL_URL ?? "mysql://root@127.0.0.1:3306/test";

let server: RunningServer;
let worker: Worker;
let alice: TestUser, admin: TestUser;
let token: string;
let source: pg.Client;
let sourceUrl: string;
let sourceDb: SourceDatabase;
let mysqlConn: mysql.Connection;

const gql = async (query: string, variables: Record<string, unknown> = {}, as = token) => {
  return graphqlData(server.url, query, variables, as);
};

async function createAccount(kind: string, name: string, credentials: unknown): Promise<string> {
  const data = await gql(`mutation($kind: String!, $name: String!, $c: JSON!) { createConnectorAccount(input: { kind: $kind, name: $name, credentials: $c }) { result { rowId summary } } }`,
    { kind, name, c: credentials });
  return data.createConnectorAccount.result.rowId;
}

/** Creates a workbook from one remote table and waits for its download. */
async function downloaded(account: string, remoteTable: string) {
  const wb = (await gql(`mutation($a: BigInt!, $t: [String]!) { createWorkbookFromRemote(input: { name: "From source", accountId: $a, remoteTables: $t }) { result { rowId } } }`,
    { a: account, t: [remoteTable] })).createWorkbookFromRemote.result.rowId;
  const { rows: [job] } = await owner().query("select id from snapbase.jobs where workbook_id = $1", [wb]);
  const done = await settled(job.id);
  expect(done, JSON.stringify(done)).toMatchObject({ state: "succeeded" });
  const tableId = String(done.table_id);
  const rel = (await owner().query("select snapbase_private.table_rel(t) as rel from snapbase.workbook_tables t where id = $1", [tableId])).rows[0].rel;
  return { wb: String(wb), tableId, rel, job: done };
}

const record = async (tableId: string, id: number | string) => (await gql(`query($t: BigInt!, $r: BigInt!) { workbookRecord(tableId: $t, recordId: $r) }`, { t: tableId, r: String(id) })).workbookRecord;
const recordByRemote = async (rel: string, remoteId: string) => (await owner().query(`select __id from ${rel} where __remote_id = $1`, [remoteId])).rows[0].__id;
const update = (tableId: string, id: number | string, values: unknown) =>
  gql(`mutation($t: BigInt!, $r: BigInt!, $v: JSON!) { updateRecord(input: { tableId: $t, recordId: $r, values: $v }) { result } }`, { t: tableId, r: String(id), v: values });
async function publish(wb: string, force = false) {
  const data = await gql(`mutation($w: BigInt!, $f: Boolean) { publishWorkbook(input: { workbookId: $w, force: $f }) { result { rowId } } }`, { w: wb, f: force });
  return settled(data.publishWorkbook.result[0].rowId);
}

beforeAll(async () => {
  sourceDb = await createSourceDatabase({ database: SOURCE_DB, user: SOURCE_USER, password: SOURCE_PASSWORD });
  ({ client: source, url: sourceUrl } = sourceDb);
  mysqlConn = await mysql.createConnection(MYSQL_URL);

  server = await startTestServer();
  worker = await startWorker({ ownerUrl: db.ownerUrl, concurrency: 2, credentialsKey: TEST_CREDENTIALS_KEY });
  [alice, admin] = await Promise.all([createUser("editor", "alice"), createUser("admin", "admin")]);
  token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: alice.email, password: TEST_PASSWORD } })).body.token;
});

afterAll(async () => {
  await worker?.stop();
  await server?.close();
  await mysqlConn?.end();
  await sourceDb?.drop();
});

describe("connector accounts", () => {
  it("stores credentials encrypted, never returns or logs them, and tests and lists through jobs", async () => {
    await source.query("create table public.probe (id int primary key, note text)");
    const account = await createAccount("postgres", "Source DB", { connection_string: sourceUrl });
    const listed = await gql(`{ allConnectorAccounts { nodes { rowId name kind summary } } }`);
    expect(listed.allConnectorAccounts.nodes).toContainEqual({ rowId: account, name: "Source DB", kind: "postgres", summary: expect.stringContaining(`${SOURCE_USER}@`) });

    const tested = await settled((await gql(`mutation($a: BigInt!) { testConnectorAccount(input: { accountId: $a }) { result { rowId } } }`, { a: account })).testConnectorAccount.result.rowId);
    expect(tested).toMatchObject({ state: "succeeded", error: null });
    const tables = await settled((await gql(`mutation($a: BigInt!) { listRemoteTables(input: { accountId: $a }) { result { rowId } } }`, { a: account })).listRemoteTables.result.rowId);
    expect(tables.result.tables).toContain("public.probe");

    // (The local server trusts every password, so the wrong credential here is the user.)
    const wrong = await createAccount("postgres", "Wrong credentials", { connection_string: withUrlParts(db.rootUrl, { user: "no_such_user", password: SOURCE_PASSWORD, database: SOURCE_DB }) });
    const failed = await settled((await gql(`mutation($a: BigInt!) { testConnectorAccount(input: { accountId: $a }) { result { rowId } } }`, { a: wrong })).testConnectorAccount.result.rowId);
    expect(failed.state).toBe("failed");
    expect(failed.error).toMatch(/authentication|password|no_such_user/i);
    expect(failed.attempts).toBe(1); // not retried: retrying cannot fix credentials

    // Rotating fixes it.
    await gql(`mutation($a: BigInt!, $c: JSON!) { rotateConnectorCredentials(input: { accountId: $a, credentials: $c }) { clientMutationId } }`, { a: wrong, c: { connection_string: sourceUrl } });
    const retested = await settled((await gql(`mutation($a: BigInt!) { testConnectorAccount(input: { accountId: $a }) { result { rowId } } }`, { a: wrong })).testConnectorAccount.result.rowId);
    expect(retested.state).toBe("succeeded");

    // Nowhere in the database outside the encrypted column, nor in any output.
    const everywhere = await owner().query(`select (select jsonb_agg(a) from snapbase.connector_accounts a)::text || (select jsonb_agg(j) from snapbase.jobs j)::text
                                              || (select jsonb_agg(l) from snapbase.audit_log l)::text as dump`);
    expect(everywhere.rows[0].dump).not.toContain(SOURCE_PASSWORD);
    const secret = await owner().query("select encode(secret, 'escape') as s from snapbase_private.connector_credentials where account_id = $1", [account]);
    expect(secret.rows[0].s).not.toContain(SOURCE_PASSWORD);
    expect(JSON.stringify(listed)).not.toContain(SOURCE_PASSWORD);
    // Nor in anything the server, the worker and graphile-worker logged (helpers' `logged`).
    expect(logged.join("\n")).toContain('"component":"graphile-worker"');
    expect(logged.join("\n")).not.toContain(SOURCE_PASSWORD);
    await gql(`mutation($a: BigInt!) { deleteConnectorAccount(input: { accountId: $a }) { clientMutationId } }`, { a: wrong });
  });

  it("a transient failure is retried with backoff, and the job can be cancelled", async () => {
    const unreachable = await createAccount("postgres", "Nowhere", { connection_string: "postgres://someone:pw@127.0.0.1:1/nothing" });
    const job = (await gql(`mutation($a: BigInt!) { testConnectorAccount(input: { accountId: $a }) { result { rowId } } }`, { a: unreachable })).testConnectorAccount.result.rowId;
    const until = Date.now() + 15_000;
    let row;
    do {
      row = (await owner().query("select * from snapbase.jobs where id = $1", [job])).rows[0];
      await new Promise((r) => setTimeout(r, 100));
    } while (!row.message?.startsWith("retrying after") && Date.now() < until);
    expect(row).toMatchObject({ state: "running", message: expect.stringMatching(/^retrying after: .*(ECONNREFUSED|connect)/i) });
    const cancelled = await gql(`mutation($j: BigInt!) { cancelJob(input: { jobId: $j }) { result { cancelRequested } } }`, { j: job });
    expect(cancelled.cancelJob.result.cancelRequested).toBe(true);
  });
});

describe("postgres: download, edit, suggest, publish", () => {
  let account: string;
  beforeAll(async () => {
    await source.query(`
      create table public.customers (id serial primary key, name text not null, amount numeric(10,2) not null check (amount >= 0), city text);
      insert into public.customers (name, amount, city) select 'customer ' || n, n * 1.5, case when n % 2 = 0 then 'Paris' else 'Lyon' end from generate_series(1, 40) n;
      create table public.pushes (id int, op text);
      create function public.count_push() returns trigger language plpgsql as $$
        begin insert into public.pushes values (coalesce(new.id, old.id), tg_op); return coalesce(new, old); end $$;
      create trigger count_push after insert or update or delete on public.customers for each row execute function public.count_push();`);
    account = await createAccount("postgres", "Customers DB", { connection_string: sourceUrl });
  });

  it("round-trips: download → edit → suggest → accept → publish → read back with pg", async () => {
    const { wb, tableId, rel, job } = await downloaded(account, "public.customers");
    expect(job).toMatchObject({ done: "40", total: "40" });
    const r1 = await recordByRemote(rel, "1");
    expect(await record(tableId, r1)).toMatchObject({ remote_id: "1", values: { id: 1, name: "customer 1", amount: 1.5, city: "Lyon" }, state: { dirty: false } });

    await update(tableId, r1, { name: "Ada" });
    const r2 = await recordByRemote(rel, "2");
    await gql(`mutation($t: BigInt!, $r: BigInt!) { suggestValues(input: { tableId: $t, recordId: $r, values: { city: "Nice" } }) { clientMutationId } }`, { t: tableId, r: String(r2) });
    await gql(`mutation($t: BigInt!) { acceptSuggestions(input: { tableId: $t }) { result } }`, { t: tableId });
    const created = (await gql(`mutation($t: BigInt!) { createRecord(input: { tableId: $t, values: { name: "Brand new", amount: 9.99, city: "Rome" } }) { result } }`, { t: tableId })).createRecord.result;
    await gql(`mutation($t: BigInt!, $r: BigInt!) { deleteRecord(input: { tableId: $t, recordId: $r }) { result } }`, { t: tableId, r: String(await recordByRemote(rel, "3")) });
    const preview = (await gql(`query($w: BigInt!) { publishPreview(workbookId: $w) }`, { w: wb })).publishPreview.tables[0];
    expect(preview).toMatchObject({ create_count: 1, update_count: 2, delete_count: 1 });

    await source.query("truncate public.pushes");
    const published = await publish(wb);
    expect(published).toMatchObject({ state: "succeeded", result: { published: 4, failed: 0, conflicts: 0 } });

    const rows = (await source.query("select id, name, amount::text, city from public.customers where id in (1, 2, 3) or name = 'Brand new' order by id")).rows;
    expect(rows).toEqual([
      { id: 1, name: "Ada", amount: "1.50", city: "Lyon" },
      { id: 2, name: "customer 2", amount: "3.00", city: "Nice" },
      { id: 41, name: "Brand new", amount: "9.99", city: "Rome" },
    ]);
    // Only edited fields went out, each record once.
    expect((await source.query("select id, op from public.pushes order by id")).rows).toEqual([
      { id: 1, op: "UPDATE" }, { id: 2, op: "UPDATE" }, { id: 3, op: "DELETE" }, { id: 41, op: "INSERT" }]);
    expect(await record(tableId, created.id)).toMatchObject({ remote_id: "41", state: { dirty: false, created: false, publish: { state: "published" } } });
    expect((await record(tableId, r1)).state.dirty).toBe(false);
    expect((await owner().query(`select count(*)::int as n from ${rel}`)).rows[0].n).toBe(40);
  });

  it("detects a conflict instead of overwriting a value changed at the source, unless forced", async () => {
    const { wb, tableId, rel } = await downloaded(account, "public.customers");
    const r5 = await recordByRemote(rel, "5");
    await update(tableId, r5, { name: "Local name" });
    await source.query("update public.customers set name = 'Changed at the source' where id = 5");
    const held = await publish(wb);
    expect(held).toMatchObject({ state: "partial", result: { published: 0, conflicts: 1, failed: 0 }, done: "1", total: "1",
      error: expect.stringMatching(/1 of 1 records were not published .*1 in conflict/) });
    expect((await record(tableId, r5)).state.publish).toMatchObject({
      state: "conflict", error: "changed at the source since download: name", source_values: { name: "Changed at the source" } });
    expect((await source.query("select name from public.customers where id = 5")).rows[0].name).toBe("Changed at the source");

    const forced = await publish(wb, true);
    expect(forced.result).toMatchObject({ published: 1 });
    expect((await source.query("select name from public.customers where id = 5")).rows[0].name).toBe("Local name");
  });

  it("a publish failing on record k of n stores every outcome, and a retry pushes only what is left", async () => {
    const { wb, tableId, rel } = await downloaded(account, "public.customers");
    const ids = await Promise.all(["10", "11", "12", "13", "14"].map((r) => recordByRemote(rel, r)));
    for (const [i, id] of ids.entries()) await update(tableId, id, { amount: i === 2 ? -5 : 100 + i });
    await source.query("truncate public.pushes");
    const first = await publish(wb);
    expect(first).toMatchObject({ state: "partial", result: { published: 4, failed: 1, conflicts: 0 }, done: "5", total: "5" });
    const bad = await record(tableId, ids[2]);
    expect(bad.state).toMatchObject({ dirty: true, publish: { state: "failed", error: expect.stringMatching(/check constraint/) } });
    expect(bad.values.amount).toBe(-5);

    await update(tableId, ids[2], { amount: 7 });
    const second = await publish(wb);
    expect(second).toMatchObject({ state: "succeeded", result: { published: 1, failed: 0 }, done: "1", total: "1" });
    expect((await source.query("select id, count(*)::int as n from public.pushes group by id order by id")).rows)
      .toEqual([10, 11, 12, 13, 14].map((id) => ({ id, n: 1 })));
    expect((await source.query("select amount::text from public.customers where id = 12")).rows[0].amount).toBe("7.00");
  });

  it("a refresh keeps local edits, takes new source values, and handles records deleted at the source", async () => {
    const { wb, tableId, rel } = await downloaded(account, "public.customers");
    const [r20, r21, r22] = await Promise.all(["20", "21", "22"].map((r) => recordByRemote(rel, r)));
    await update(tableId, r21, { name: "kept locally" });
    await update(tableId, r22, { city: "edited here" });
    await source.query(`
      update public.customers set city = 'Oslo' where id = 20;
      update public.customers set city = 'Bern', name = 'source name' where id = 21;
      delete from public.customers where id in (20, 22);
      insert into public.customers (id, name, amount, city) values (500, 'new at source', 1, 'Kyiv');`);
    const refresh = await settled((await gql(`mutation($t: BigInt!) { refreshWorkbookTable(input: { tableId: $t }) { result { rowId } } }`, { t: tableId })).refreshWorkbookTable.result.rowId);
    expect(refresh).toMatchObject({ state: "succeeded", result: { removed_deleted_at_source: 1, flagged_deleted_at_source: 1 } });

    expect((await owner().query(`select count(*)::int as n from ${rel} where __id = $1`, [r20])).rows[0].n).toBe(0);
    const kept = await record(tableId, r21);
    expect(kept.values).toMatchObject({ name: "kept locally", city: "Bern" });
    expect(Object.keys(kept.edited)).toEqual(["name"]);
    const orphan = await record(tableId, r22);
    expect(orphan.state).toMatchObject({ source_deleted: true, dirty: true });
    expect(await recordByRemote(rel, "500")).toBeTruthy();

    await gql(`mutation($t: BigInt!, $r: BigInt!) { resolveSourceDeleted(input: { tableId: $t, recordId: $r, action: "recreate" }) { result } }`, { t: tableId, r: String(r22) });
    const again = await publish(wb);
    expect(again.result).toMatchObject({ failed: 0 });
    expect((await source.query("select city from public.customers where id = 22")).rows).toEqual([{ city: "edited here" }]);
  });

  it("a record deleted at the source before publish fails clearly, keeps its edits and is flagged", async () => {
    const { wb, tableId, rel } = await downloaded(account, "public.customers");
    const r30 = await recordByRemote(rel, "30");
    await update(tableId, r30, { city: "Tallinn" });
    await source.query("delete from public.customers where id = 30");
    const job = await publish(wb);
    expect(job).toMatchObject({ state: "partial", result: { published: 0, failed: 1, conflicts: 0 } });
    const rec = await record(tableId, r30);
    expect(rec).toMatchObject({ values: { city: "Tallinn" }, state: { source_deleted: true, dirty: true,
      publish: { state: "failed", error: "record 30 no longer exists at the source" } } });
  });

  it("a source table altered since download fails the refresh clearly and loses nothing", async () => {
    await source.query("create table public.shaky (id int primary key, a text, b int); insert into public.shaky values (1, 'x', 1)");
    const { tableId } = await downloaded(account, "public.shaky");
    await update(tableId, 1, { a: "local" });
    await source.query("alter table public.shaky drop column a");
    const refresh = await settled((await gql(`mutation($t: BigInt!) { refreshWorkbookTable(input: { tableId: $t }) { result { rowId } } }`, { t: tableId })).refreshWorkbookTable.result.rowId);
    expect(refresh).toMatchObject({ state: "failed", error: expect.stringMatching(/no longer matches.*\ba\b/) });
    expect((await record(tableId, 1)).values.a).toBe("local");
    await source.query("drop table public.shaky");
    const gone = await settled((await gql(`mutation($t: BigInt!) { refreshWorkbookTable(input: { tableId: $t }) { result { rowId } } }`, { t: tableId })).refreshWorkbookTable.result.rowId);
    expect(gone).toMatchObject({ state: "failed", error: expect.stringMatching(/shaky/) });
  });
});

describe("mysql: download, edit, suggest, publish", () => {
  it("round-trips through the local MariaDB, read back with mysql2", async () => {
    const table = `sb_jobs_${RUN}`;
    await mysqlConn.query(`create table ${table} (id int auto_increment primary key, name varchar(100) not null, price decimal(10,2) not null, active tinyint(1) not null default 1)`);
    await mysqlConn.query(`insert into ${table} (name, price, active) values ('apple', 1.20, 1), ('pear', 2.50, 0), ('plum', 3.00, 1)`);
    try {
      const u = new URL(MYSQL_URL);
      const account = await createAccount("mysql", "Shop", { host: u.hostname, port: Number(u.port || 3306), user: decodeURIComponent(u.username), password: decodeURIComponent(u.password), database: u.pathname.slice(1) });
      const { wb, tableId, rel } = await downloaded(account, table);
      const pear = await recordByRemote(rel, "2");
      expect(await record(tableId, pear)).toMatchObject({ values: { name: "pear", price: 2.5, active: 0 } });
      await gql(`mutation($t: BigInt!, $r: BigInt!) { suggestValues(input: { tableId: $t, recordId: $r, values: { price: "2.75" } }) { clientMutationId } }`, { t: tableId, r: String(pear) });
      await gql(`mutation($t: BigInt!) { acceptSuggestions(input: { tableId: $t }) { result } }`, { t: tableId });
      await update(tableId, await recordByRemote(rel, "1"), { active: 0 });
      await gql(`mutation($t: BigInt!) { createRecord(input: { tableId: $t, values: { name: "quince", price: 4.1, active: 1 } }) { result } }`, { t: tableId });
      const published = await publish(wb);
      expect(published).toMatchObject({ state: "succeeded", result: { published: 3, failed: 0 } });
      const [rows] = await mysqlConn.query(`select id, name, price, active from ${table} order by id`);
      expect(rows).toEqual([
        { id: 1, name: "apple", price: "1.20", active: 0 },
        { id: 2, name: "pear", price: "2.75", active: 0 },
        { id: 3, name: "plum", price: "3.00", active: 1 },
        { id: 4, name: "quince", price: "4.10", active: 1 },
      ]);
    } finally {
      await mysqlConn.query(`drop table ${table}`);
    }
  });
});

describe("managed tables: publishing goes through change requests", () => {
  it("creates a change request; once approved, the table, a snapshot and the workbook all follow", async () => {
    await owner().query(`
      drop schema if exists t5 cascade;
      create schema t5;
      create table t5.items (id int primary key, label text not null);
      insert into t5.items select n, 'item ' || n from generate_series(1, 10) n;
      grant usage on schema t5 to ${db.roles.viewer};
      grant select on t5.items to ${db.roles.viewer};
      grant insert, update, delete on t5.items to ${db.roles.admin};
      select snapbase.register_table('t5.items');`);
    const account = await createAccount("managed", "This database", {});
    const { wb, tableId, rel } = await downloaded(account, "t5.items");
    await update(tableId, await recordByRemote(rel, "3"), { label: "relabelled" });
    await gql(`mutation($t: BigInt!) { createRecord(input: { tableId: $t, values: { id: 11, label: "eleven" } }) { result } }`, { t: tableId });
    const waiting = await publish(wb);
    expect(waiting).toMatchObject({ state: "awaiting_approval", change_request_id: expect.any(String) });
    const cr = (await owner().query("select * from snapbase.change_requests where id = $1", [waiting.change_request_id])).rows[0];
    expect(cr).toMatchObject({ status: "pending", kind: "edits", submitted_by_name: alice.email });
    expect((await owner().query("select label from t5.items where id = 3")).rows[0].label).toBe("item 3");

    const adminToken = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: admin.email, password: TEST_PASSWORD } })).body.token;
    const approved = await http(server.url, "POST", `/api/v1/changes/${cr.id}/approve`, { token: adminToken });
    expect(approved.status).toBe(200);
    const job = (await owner().query("select * from snapbase.jobs where id = $1", [waiting.id])).rows[0];
    expect(job).toMatchObject({ state: "succeeded", message: null }); // no longer "awaiting approval of change request …"
    expect((await owner().query("select id, label from t5.items where id in (3, 11) order by id")).rows).toEqual([{ id: 3, label: "relabelled" }, { id: 11, label: "eleven" }]);
    expect((await owner().query("select count(*)::int as n from snapbase.snapshots where change_request_id = $1", [cr.id])).rows[0].n).toBe(1);
    const eleven = await recordByRemote(rel, "11");
    expect((await record(tableId, eleven)).state).toMatchObject({ dirty: false, publish: { state: "published" } });
  });
});
