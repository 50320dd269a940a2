// Issue 13, publishing: what the source decided comes back to the workbook after a
// publish (ids, defaults, generated columns, triggers), and conflicts can be worked
// through: listed, resolved per cell or per record (keep mine, take theirs), and
// re-evaluated by every refresh. A real worker; a second PostgreSQL database, the
// local MariaDB and an uploaded CSV file as sources, read back with their own clients.
import { randomBytes } from "node:crypto";
import mysql from "mysql2/promise";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { startWorker, type Worker } from "../src/worker.ts";
import { createUser, db, graphql, http, owner, settled, startTestServer, TEST_CREDENTIALS_KEY, TEST_PASSWORD, tokenFor, type TestUser } from "./helpers.ts";
import { createSourceDatabase, type SourceDatabase } from "./source-databases.ts";

const RUN = randomBytes(4).toString("hex");
const SOURCE_DB = `snapbase_conflicts_source_${RUN}`;
const SOURCE_USER = `snapbase_conflicts_src_${RUN}`;
const MYSQL_URL = process.env.TEST_MYSQL_URL ?? "mysql://root@127.0.0.1:3306/test";

let server: RunningServer;
let worker: Worker;
let alice: TestUser, victor: TestUser;
let token: string;
let source: pg.Client;
let sourceUrl: string;
let sourceDb: SourceDatabase;
let account: string;

const gqlAs = async (as: string, query: string, variables: Record<string, unknown> = {}) => {
  const res = await graphql(server.url, query, variables, as);
  if (res.body.errors) throw Object.assign(new Error(res.body.errors.map((e) => e.message).join("; ")), { code: res.body.errors[0]?.extensions?.code });
  return res.body.data;
};
const gql = (query: string, variables: Record<string, unknown> = {}) => gqlAs(token, query, variables);

async function createAccount(kind: string, name: string, credentials: unknown): Promise<string> {
  return (await gql(`mutation($k: String!, $n: String!, $c: JSON!) { createConnectorAccount(input: { kind: $k, name: $n, credentials: $c }) { result { rowId } } }`,
    { k: kind, n: name, c: credentials })).createConnectorAccount.result.rowId;
}

/** A workbook holding one downloaded remote table. */
async function downloaded(accountId: string, remoteTable: string) {
  const wb = (await gql(`mutation($a: BigInt!, $t: [String]!) { createWorkbookFromRemote(input: { name: "Conflicts", accountId: $a, remoteTables: $t }) { result { rowId } } }`,
    { a: accountId, t: [remoteTable] })).createWorkbookFromRemote.result.rowId;
  const { rows: [job] } = await owner().query("select id from snapbase.jobs where workbook_id = $1", [wb]);
  const done = await settled(job.id);
  expect(done, JSON.stringify(done)).toMatchObject({ state: "succeeded" });
  const tableId = String(done.table_id);
  const rel = (await owner().query("select snapbase_private.table_rel(t) as rel from snapbase.workbook_tables t where id = $1", [tableId])).rows[0].rel as string;
  return { wb: String(wb), tableId, rel, job: done };
}

const record = async (tableId: string, id: number | string) =>
  (await gql(`query($t: BigInt!, $r: BigInt!) { workbookRecord(tableId: $t, recordId: $r) }`, { t: tableId, r: String(id) })).workbookRecord;
const byRemote = async (rel: string, remoteId: string): Promise<string> =>
  String((await owner().query(`select __id from ${rel} where __remote_id = $1`, [remoteId])).rows[0].__id);
const update = (tableId: string, id: number | string, values: unknown) =>
  gql(`mutation($t: BigInt!, $r: BigInt!, $v: JSON!) { updateRecord(input: { tableId: $t, recordId: $r, values: $v }) { result } }`, { t: tableId, r: String(id), v: values });
const create = async (tableId: string, values: unknown) =>
  (await gql(`mutation($t: BigInt!, $v: JSON!) { createRecord(input: { tableId: $t, values: $v }) { result } }`, { t: tableId, v: values })).createRecord.result;
async function publish(wb: string, force = false) {
  const data = await gql(`mutation($w: BigInt!, $f: Boolean) { publishWorkbook(input: { workbookId: $w, force: $f }) { result { rowId } } }`, { w: wb, f: force });
  return settled(data.publishWorkbook.result[0].rowId);
}
async function refresh(tableId: string) {
  return settled((await gql(`mutation($t: BigInt!) { refreshWorkbookTable(input: { tableId: $t }) { result { rowId } } }`, { t: tableId })).refreshWorkbookTable.result.rowId);
}
const worklist = async (tableId: string, publishState?: string) =>
  (await gql(`query($t: BigInt!, $s: String) { publishWorklist(tableId: $t, publishState: $s) }`, { t: tableId, s: publishState ?? null })).publishWorklist;
const resolve = async (tableId: string, id: string, keep: string, columnName?: string) =>
  (await gql(`mutation($t: BigInt!, $r: BigInt!, $k: String!, $c: String) { resolveConflict(input: { tableId: $t, recordId: $r, keep: $k, columnName: $c }) { result } }`,
    { t: tableId, r: id, k: keep, c: columnName ?? null })).resolveConflict.result;

/** The record's data columns equal what it last saw at the source (nothing left to publish, nothing stale). */
async function inSyncWithLastSeen(rel: string, id: string): Promise<boolean> {
  const { rows } = await owner().query(`select to_jsonb(r.*) - snapbase_private.record_meta_columns() = r.__last_seen as same from ${rel} r where r.__id = $1`, [id]);
  return rows[0].same;
}

beforeAll(async () => {
  sourceDb = await createSourceDatabase({ database: SOURCE_DB, user: SOURCE_USER });
  ({ client: source, url: sourceUrl } = sourceDb);
  await source.query(`
    create table public.people (
      id bigint generated always as identity (start with 5001) primary key,
      name text not null,
      code text not null default 'fresh',
      name_upper text generated always as (upper(name)) stored,
      big numeric not null default 12345678901234567890.123456789,
      touched integer not null default 0);
    create function public.touch() returns trigger language plpgsql as $$ begin new.touched := old.touched + 1; return new; end $$;
    create trigger touch before update on public.people for each row execute function public.touch();
    insert into public.people (name) values ('Grace'), ('Linus');
    create table public.accounts (id int primary key, name text not null, city text, plan text, amount numeric check (amount >= 0));
    insert into public.accounts select n, 'account ' || n, 'Paris', 'free', n from generate_series(1, 40) n;`);

  server = await startTestServer();
  worker = await startWorker({ ownerUrl: db.ownerUrl, concurrency: 2, credentialsKey: TEST_CREDENTIALS_KEY });
  [alice, victor] = await Promise.all([createUser("editor", "conflict-alice"), createUser("editor", "conflict-victor")]);
  token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: alice.email, password: TEST_PASSWORD } })).body.token;
  account = await createAccount("postgres", "Conflicts source", { connection_string: sourceUrl });
});

afterAll(async () => {
  await worker?.stop();
  await server?.close();
  await sourceDb?.drop();
});

describe("after a publish the workbook holds what the source stored", () => {
  it("postgres: a created record gets its identity id, defaults, generated values; an update gets what triggers set", async () => {
    const { wb, tableId, rel } = await downloaded(account, "public.people");
    const ada = await create(tableId, { name: "Ada" });
    const job = await publish(wb);
    expect(job).toMatchObject({ state: "succeeded", result: { published: 1, conflicts: 0, failed: 0 }, message: null });
    const created = await record(tableId, ada.id);
    expect(created).toMatchObject({ remote_id: "5003", state: { dirty: false, created: false, publish: { state: "published" } } });
    // Wide numbers stay exact (sent as a string of their digits over GraphQL).
    expect(created.values).toEqual({ id: 5003, name: "Ada", code: "fresh", name_upper: "ADA", big: "12345678901234567890.123456789", touched: 0 });
    expect(await inSyncWithLastSeen(rel, ada.id)).toBe(true);

    await update(tableId, ada.id, { name: "Ada L." });
    await publish(wb);
    expect((await record(tableId, ada.id)).values).toMatchObject({ name: "Ada L.", name_upper: "ADA L.", touched: 1 });
    expect(await inSyncWithLastSeen(rel, ada.id)).toBe(true);
    expect((await source.query("select name, touched from public.people where id = 5003")).rows).toEqual([{ name: "Ada L.", touched: 1 }]);
  });

  it("mysql: a created record gets its auto_increment id, defaults and generated values", async () => {
    const table = `sb_conflicts_${RUN}`;
    const conn = await mysql.createConnection(MYSQL_URL);
    try {
      await conn.query(`create table ${table} (id int auto_increment primary key, name varchar(50) not null, tag varchar(20) not null default 'fresh',
                        name_len int as (char_length(name)) stored, price decimal(30,10) not null default 12345678901234567890.0123456789)`);
      await conn.query(`insert into ${table} (name) values ('apple')`);
      const u = new URL(MYSQL_URL);
      const shop = await createAccount("mysql", "Shop", { host: u.hostname, port: Number(u.port || 3306), user: decodeURIComponent(u.username),
        password: decodeURIComponent(u.password), database: u.pathname.slice(1) });
      const { wb, tableId, rel } = await downloaded(shop, table);
      const quince = await create(tableId, { name: "quince" });
      expect(await publish(wb)).toMatchObject({ state: "succeeded", result: { published: 1, conflicts: 0, failed: 0 } });
      expect(await record(tableId, quince.id)).toMatchObject({ remote_id: "2", state: { dirty: false },
        values: { id: 2, name: "quince", tag: "fresh", name_len: 6, price: "12345678901234567890.0123456789" } });
      expect(await inSyncWithLastSeen(rel, quince.id)).toBe(true);
    } finally {
      await conn.query(`drop table if exists ${table}`);
      await conn.end();
    }
  });

  it("csv: a created record gets its row number", async () => {
    const res = await fetch(`${server.url}/api/v1/csv-files?name=${encodeURIComponent(`fruit-${RUN}.csv`)}`,
      { method: "POST", headers: { "content-type": "text/csv", authorization: `Bearer ${token}` }, body: "name,qty\napple,1\npear,2\n" });
    const file = (await res.json()).file.id;
    const csv = await createAccount("csv", "Fruit", { file_id: file });
    const { wb, tableId, rel } = await downloaded(csv, `fruit-${RUN}.csv`);
    const plum = await create(tableId, { name: "plum", qty: 3 });
    expect(await publish(wb)).toMatchObject({ state: "succeeded", result: { published: 1 } });
    expect(await record(tableId, plum.id)).toMatchObject({ remote_id: "3", values: { row_number: 3, name: "plum", qty: 3 }, state: { dirty: false } });
    expect(await inSyncWithLastSeen(rel, plum.id)).toBe(true);
  });
});

describe("an edit made while a publish runs", () => {
  it("keeps its value and stays edited when the publish writes back what the source stored", async () => {
    // The publish's steps, as the task takes them, each its own transaction; the edit comes between them.
    const { tableId, rel } = await downloaded(account, "public.accounts");
    const r30 = await byRemote(rel, "30");
    await update(tableId, r30, { name: "sent" });
    const job = (await owner().query(`insert into snapbase.jobs (kind, state, connector_account_id, workbook_id, table_id, options)
      select 'publish', 'running', $1, workbook_id, id, jsonb_build_object('remote_table', 'public.accounts') from snapbase.workbook_tables where id = $2 returning id`,
      [account, tableId])).rows[0].id;
    try {
      const { rows: [{ batch }] } = await owner().query("select snapbase_private.next_to_publish($1, 'update', 10) as batch", [job]);
      expect(batch).toEqual([expect.objectContaining({ id: Number(r30), values: { name: "sent" } })]);
      await update(tableId, r30, { city: "edited meanwhile" });
      const stored = { id: 30, name: "sent", city: "Paris", plan: "free", amount: 30 };
      await owner().query("select snapbase_private.record_publish_outcomes($1, $2)",
        [job, JSON.stringify([{ id: Number(r30), ok: true, remote_id: "30", source_values: stored }])]);
      const after = await record(tableId, r30);
      expect(after).toMatchObject({ values: { ...stored, city: "edited meanwhile" }, state: { dirty: true, publish: { state: "published" } } });
      expect(Object.keys(after.edited)).toEqual(["city"]);
      expect((await owner().query(`select __last_seen from ${rel} where __id = $1`, [r30])).rows[0].__last_seen).toEqual(stored);
    } finally {
      await owner().query("update snapbase.jobs set state = 'failed', finished_at = now() where id = $1", [job]);
    }
  });
});

describe("conflicts can be worked through", () => {
  it("a publish conflict is listed with mine and theirs, and resolved per cell: take theirs, keep mine", async () => {
    const { wb, tableId, rel } = await downloaded(account, "public.accounts");
    const r1 = await byRemote(rel, "1");
    await update(tableId, r1, { name: "mine", city: "Lyon" });
    await source.query("update public.accounts set name = 'theirs', city = 'Nice' where id = 1");
    const job = await publish(wb);
    // One word: conflicts (no held_back).
    expect(job).toMatchObject({ state: "partial", result: { published: 0, conflicts: 1, failed: 0 } });
    expect(Object.keys(job.result).sort()).toEqual(["conflicts", "failed", "published"]);

    const list = await worklist(tableId);
    expect(list.counts).toEqual({ conflict: 1, failed: 0 });
    expect(list.next_after_id).toBeNull();
    expect(list.records.map((r: any) => String(r.id))).toEqual([r1]);
    expect(list.records[0].conflicts).toEqual([
      { column: "name", mine: "mine", theirs: "theirs", last_seen: "account 1" },
      { column: "city", mine: "Lyon", theirs: "Nice", last_seen: "Paris" },
    ]);
    expect(list.records[0].state.publish).toMatchObject({ state: "conflict", source_values: { name: "theirs", city: "Nice" } });

    // Take theirs for one cell: the source's value, and the edit is gone.
    const afterCity = await resolve(tableId, r1, "theirs", "city");
    expect(afterCity.values).toMatchObject({ name: "mine", city: "Nice" });
    expect(Object.keys(afterCity.edited)).toEqual(["name"]);
    expect(afterCity.state.publish).toMatchObject({ state: "conflict", error: "changed at the source since download: name", source_values: { name: "theirs" } });
    // Keep mine for the other: the next publish may overwrite it.
    const afterName = await resolve(tableId, r1, "mine", "name");
    expect(afterName).toMatchObject({ values: { name: "mine", city: "Nice" }, state: { dirty: true, publish: null } });
    expect((await worklist(tableId)).records).toEqual([]);

    const audit = (await owner().query(`select details from snapbase.audit_log where action = 'resolve_conflict' and subject_id = $1 order by id`, [r1])).rows;
    expect(audit.map((a) => [a.details.keep, a.details.columns])).toEqual([["theirs", ["city"]], ["mine", ["name"]]]);

    expect(await publish(wb)).toMatchObject({ state: "succeeded", result: { published: 1, conflicts: 0 } });
    expect((await source.query("select name, city from public.accounts where id = 1")).rows).toEqual([{ name: "mine", city: "Nice" }]);
  });

  it("a whole record: take theirs drops every conflicting edit; keep mine lets the next publish overwrite", async () => {
    const { wb, tableId, rel } = await downloaded(account, "public.accounts");
    const [r2, r3] = [await byRemote(rel, "2"), await byRemote(rel, "3")];
    await update(tableId, r2, { name: "mine 2", plan: "pro" });
    await update(tableId, r3, { name: "mine 3", plan: "pro" });
    await source.query("update public.accounts set name = 'theirs ' || id, plan = 'team' where id in (2, 3)");
    expect(await publish(wb)).toMatchObject({ state: "partial", result: { conflicts: 2 } });

    const theirs = await resolve(tableId, r2, "theirs");
    expect(theirs).toMatchObject({ values: { name: "theirs 2", plan: "team" }, edited: {}, state: { dirty: false, publish: null } });
    expect(await inSyncWithLastSeen(rel, r2)).toBe(true);
    const mine = await resolve(tableId, r3, "mine");
    expect(mine).toMatchObject({ values: { name: "mine 3", plan: "pro" }, state: { dirty: true, publish: null } });

    expect(await publish(wb)).toMatchObject({ state: "succeeded", result: { published: 1, conflicts: 0 } });
    expect((await source.query("select id, name, plan from public.accounts where id in (2, 3) order by id")).rows).toEqual([
      { id: 2, name: "theirs 2", plan: "team" }, { id: 3, name: "mine 3", plan: "pro" }]);
  });

  it("a refresh after a conflict keeps it a conflict: the next publish does not overwrite the source", async () => {
    const { wb, tableId, rel } = await downloaded(account, "public.accounts");
    const r5 = await byRemote(rel, "5");
    await update(tableId, r5, { plan: "mine" });
    await source.query("update public.accounts set plan = 'theirs' where id = 5");
    expect(await publish(wb)).toMatchObject({ state: "partial", result: { conflicts: 1 } });

    const refreshed = await refresh(tableId);
    expect(refreshed).toMatchObject({ state: "succeeded", message: null, result: { conflicts: 1 } });
    expect((await record(tableId, r5)).state.publish).toMatchObject({ state: "conflict", source_values: { plan: "theirs" } });
    expect(await publish(wb)).toMatchObject({ state: "partial", result: { published: 0, conflicts: 1 } });
    expect((await source.query("select plan from public.accounts where id = 5")).rows[0].plan).toBe("theirs");
    // Until someone decides.
    await resolve(tableId, r5, "mine");
    expect(await publish(wb)).toMatchObject({ state: "succeeded", result: { published: 1 } });
    expect((await source.query("select plan from public.accounts where id = 5")).rows[0].plan).toBe("mine");
  });

  it("a refresh finds conflicts as a publish does, and clears those that went away", async () => {
    const { wb, tableId, rel } = await downloaded(account, "public.accounts");
    const [r6, r7, r8] = [await byRemote(rel, "6"), await byRemote(rel, "7"), await byRemote(rel, "8")];
    await update(tableId, r6, { city: "mine" });
    await update(tableId, r7, { city: "same" });
    await update(tableId, r8, { name: "mine 8" });
    await source.query(`update public.accounts set city = 'theirs' where id = 6;
                        update public.accounts set city = 'same' where id = 7;
                        update public.accounts set city = 'Oslo' where id = 8`);
    const job = await refresh(tableId);
    expect(job).toMatchObject({ state: "succeeded", result: { conflicts: 1 } });
    const six = await record(tableId, r6);
    // Found at refresh, it looks like one found at publish.
    expect(six.state.publish).toEqual({ state: "conflict", job_id: Number(job.id), at: expect.any(String),
      error: "changed at the source since download: city", source_values: { city: "theirs" } });
    expect(six.values.city).toBe("mine");
    // The source made the same change: nothing left to publish. A field not edited here takes the source's value.
    expect(await record(tableId, r7)).toMatchObject({ values: { city: "same" }, edited: {}, state: { publish: null } });
    expect(await record(tableId, r8)).toMatchObject({ values: { name: "mine 8", city: "Oslo" }, state: { publish: null } });
    expect((await worklist(tableId, "conflict")).records.map((r: any) => [String(r.id), r.conflicts])).toEqual([
      [r6, [{ column: "city", mine: "mine", theirs: "theirs", last_seen: "Paris" }]]]);

    // The source goes back to what was last seen: no conflict any more, the edit stays.
    // A record in conflict that the source deleted is no conflict either: it failed (resolve_source_deleted decides).
    const r9 = await byRemote(rel, "9");
    await update(tableId, r9, { plan: "mine" });
    await source.query("update public.accounts set plan = 'theirs' where id = 9");
    expect(await refresh(tableId)).toMatchObject({ result: { conflicts: 2 } });
    await source.query("update public.accounts set city = 'Paris' where id = 6; delete from public.accounts where id = 9");
    expect(await refresh(tableId)).toMatchObject({ result: { conflicts: 0, flagged_deleted_at_source: 1 } });
    expect(await record(tableId, r6)).toMatchObject({ values: { city: "mine" }, state: { dirty: true, publish: null } });
    expect((await record(tableId, r9)).state).toMatchObject({ source_deleted: true, publish: { state: "failed", error: "record 9 no longer exists at the source" } });
    expect((await worklist(tableId)).counts).toEqual({ conflict: 0, failed: 1 });
    await gql(`mutation($t: BigInt!, $r: BigInt!) { resolveSourceDeleted(input: { tableId: $t, recordId: $r, action: "recreate" }) { result } }`, { t: tableId, r: r9 });
    const event = (await owner().query(`select payload from snapbase_private.events where topic = $1 and kind = 'records' order by id desc limit 1`, [`workbook:${wb}`])).rows[0].payload;
    expect(event).toMatchObject({ action: "resolved", count: 1 });
  });

  it("lists failed records too, pages through the list, and refuses what cannot be resolved", async () => {
    const { wb, tableId, rel } = await downloaded(account, "public.accounts");
    const ids = await Promise.all(["10", "11", "12", "13"].map((r) => byRemote(rel, r)));
    for (const id of ids.slice(0, 3)) await update(tableId, id, { amount: -1 });
    await update(tableId, ids[3]!, { name: "mine 13" });
    await source.query("update public.accounts set name = 'theirs 13' where id = 13");
    expect(await publish(wb)).toMatchObject({ state: "partial", result: { published: 0, conflicts: 1, failed: 3 } });

    const failed = await worklist(tableId, "failed");
    expect(failed.counts).toEqual({ conflict: 1, failed: 3 });
    expect(failed.records.map((r: any) => [String(r.id), r.state.publish.state, r.conflicts])).toEqual(ids.slice(0, 3).map((id) => [id, "failed", []]));
    const page = await gql(`query($t: BigInt!) { publishWorklist(tableId: $t, pageSize: 2) }`, { t: tableId });
    expect(page.publishWorklist.records.map((r: any) => String(r.id))).toEqual(ids.slice(0, 2));
    const rest = await gql(`query($t: BigInt!, $a: BigInt!) { publishWorklist(tableId: $t, pageSize: 2, afterId: $a) }`, { t: tableId, a: page.publishWorklist.next_after_id });
    expect(rest.publishWorklist.records.map((r: any) => String(r.id))).toEqual(ids.slice(2));
    expect(rest.publishWorklist.next_after_id).toBeNull();

    const refused = async (promise: Promise<unknown>) => promise.then(() => null, (e: { code?: string; message: string }) => ({ code: e.code, message: e.message }));
    expect(await refused(resolve(tableId, ids[0]!, "theirs"))).toEqual({ code: "55000", message: `record ${ids[0]} of workbook table ${tableId} is not in conflict` });
    expect(await refused(resolve(tableId, ids[3]!, "theirs", "city"))).toEqual({ code: "22023", message: `record ${ids[3]} has no conflict in column city` });
    expect(await refused(resolve(tableId, ids[3]!, "both"))).toEqual({ code: "22023", message: "keep must be mine or theirs (got both)" });
    expect(await refused(resolve(tableId, "9123456789", "mine"))).toEqual({ code: "P0002", message: `no record 9123456789 in workbook table ${tableId}` });
    expect(await refused(worklist(tableId, "pending"))).toEqual({ code: "22023", message: "publish_state must be conflict or failed (got pending)" });
    // Hostile text is only ever compared with the conflict's own column names and words.
    const count = async () => (await owner().query(`select count(*)::int as n from ${rel}`)).rows[0].n;
    const records = await count();
    for (const column of [`name"; drop table ${rel}; --`, "name = 'x' or true", "__publish", "__sb_r.__edited"]) {
      expect(await refused(resolve(tableId, ids[3]!, "theirs", column))).toEqual({ code: "22023", message: `record ${ids[3]} has no conflict in column ${column}` });
    }
    expect(await refused(resolve(tableId, ids[3]!, "mine' or '1'='1"))).toMatchObject({ code: "22023" });
    expect(await refused(worklist(tableId, "conflict' or true --"))).toMatchObject({ code: "22023" });
    expect(await count()).toBe(records);

    // A viewer may list but not resolve; an agent may do neither (agents only suggest).
    const org = (await owner().query("select organization_id from snapbase.workbooks where id = $1", [wb])).rows[0].organization_id;
    const invitation = (await gql(`mutation($o: BigInt!, $e: String!) { inviteOrganizationMember(input: { organizationId: $o, email: $e }) { result { rowId } } }`,
      { o: org, e: victor.email })).inviteOrganizationMember.result.rowId;
    await gqlAs(await tokenFor(victor), `mutation($i: BigInt!) { acceptOrganizationInvitation(input: { invitationId: $i }) { clientMutationId } }`, { i: invitation });
    await gql(`mutation($w: BigInt!, $e: String!) { shareWorkbook(input: { workbookId: $w, email: $e, access: viewer }) { clientMutationId } }`, { w: wb, e: victor.email });
    const viewer = await tokenFor(victor);
    expect((await gqlAs(viewer, `query($t: BigInt!) { publishWorklist(tableId: $t) }`, { t: tableId })).publishWorklist.counts).toEqual({ conflict: 1, failed: 3 });
    expect(await refused(gqlAs(viewer, `mutation($t: BigInt!, $r: BigInt!) { resolveConflict(input: { tableId: $t, recordId: $r, keep: "mine" }) { result } }`, { t: tableId, r: ids[3] })))
      .toMatchObject({ code: "42501" });
    const agent = (await gql(`mutation($w: BigInt!) { createAgentToken(input: { workbookId: $w, name: "helper" }) { result } }`, { w: wb })).createAgentToken.result;
    const asAgent = await graphql(server.url, `mutation($t: BigInt!, $r: BigInt!) { resolveConflict(input: { tableId: $t, recordId: $r, keep: "mine" }) { result } }`, { t: tableId, r: ids[3] }, agent);
    expect(asAgent.body.errors?.[0]?.message).toMatch(/permission denied|resolveConflict/);
    expect((await record(tableId, ids[3]!)).state.publish.state).toBe("conflict");
  });

  it("events say conflict and resolved, and a settled job's event carries its counts", async () => {
    const { wb, tableId, rel } = await downloaded(account, "public.accounts");
    const r20 = await byRemote(rel, "20");
    await update(tableId, r20, { name: "mine 20" });
    await source.query("update public.accounts set name = 'theirs 20' where id = 20");
    const job = await publish(wb);
    // Job events carry the same words (counts only).
    const jobEvent = (await owner().query(`select payload from snapbase_private.events where topic = $1 and kind = 'job' and payload ->> 'job_id' = $2 order by id desc limit 1`,
      [`workbook:${wb}`, String(job.id)])).rows[0].payload;
    expect(jobEvent).toMatchObject({ state: "partial", result: { published: 0, conflicts: 1, failed: 0 } });
    const last = async () => (await owner().query(`select payload from snapbase_private.events where topic = $1 and kind = 'records' order by id desc limit 1`, [`workbook:${wb}`])).rows[0].payload;
    expect(await last()).toMatchObject({ action: "conflict", table_id: Number(tableId) });
    await resolve(tableId, r20, "theirs");
    expect(await last()).toMatchObject({ action: "resolved", count: 1, table_id: Number(tableId) });
  });
});

describe("small fixes", () => {
  it("addRemoteTable answers with the table it downloads into", async () => {
    await source.query("create table public.extra (id int primary key, label text); insert into public.extra values (1, 'one')");
    const wb = (await gql(`mutation { createWorkbook(input: { name: "Extra" }) { result { rowId } } }`)).createWorkbook.result.rowId;
    const job = (await gql(`mutation($w: BigInt!, $a: BigInt!) { addRemoteTable(input: { workbookId: $w, accountId: $a, remoteTable: "public.extra" }) { result { rowId tableId } } }`,
      { w: wb, a: account })).addRemoteTable.result;
    expect(job.tableId).not.toBeNull();
    const done = await settled(job.rowId);
    expect(done).toMatchObject({ state: "succeeded", message: null, table_id: job.tableId });
    expect((await gql(`query($t: BigInt!) { workbookRecords(tableId: $t) }`, { t: job.tableId })).workbookRecords.records.map((r: any) => r.values))
      .toEqual([{ id: 1, label: "one" }]);
    expect((await owner().query("select name, remote_table, remote_id_column from snapbase.workbook_tables where id = $1", [job.tableId])).rows[0])
      .toEqual({ name: "public.extra", remote_table: "public.extra", remote_id_column: "id" });

    // A first download that fails leaves no table behind.
    const missing = (await gql(`mutation($w: BigInt!, $a: BigInt!) { addRemoteTable(input: { workbookId: $w, accountId: $a, remoteTable: "public.nothing_here" }) { result { rowId tableId } } }`,
      { w: wb, a: account })).addRemoteTable.result;
    expect(missing.tableId).not.toBeNull();
    expect(await settled(missing.rowId)).toMatchObject({ state: "failed", table_id: null, error: expect.stringMatching(/nothing_here/) });
    expect((await owner().query("select count(*)::int as n from snapbase.workbook_tables where id = $1", [missing.tableId])).rows[0].n).toBe(0);
  });
});
