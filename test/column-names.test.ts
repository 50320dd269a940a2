// Issue 13: every column name PostgreSQL or MySQL allows works in a workbook, end
// to end (download, read, sort, filter, edit, suggest, accept, export, publish,
// refresh): reserved words, mixed case, spaces, quotes, Unicode, names equal to the
// aliases of Snapbase's own SQL, and names of its metadata columns. Names a workbook
// cannot hold as they are (starting with "__", which Snapbase's metadata uses, or
// longer than PostgreSQL's 63 bytes) get a documented local name, never a silent
// truncation. A failed download leaves no table behind.
import { randomBytes } from "node:crypto";
import mysql from "mysql2/promise";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { localColumnName } from "../src/connectors/names.ts";
import type { RunningServer } from "../src/server/app.ts";
import { startWorker, type Worker } from "../src/worker.ts";
import { createUser, db, graphqlData, http, owner, settled, startTestServer, TEST_CREDENTIALS_KEY, TEST_PASSWORD, type TestUser } from "./helpers.ts";
import { createSourceDatabase, type SourceDatabase } from "./source-databases.ts";

const RUN = randomBytes(4).toString("hex");
const SOURCE_DB = `snapbase_names_source_${RUN}`;
const MYSQL_URL = process.env.TEST_MYSQL_URL ?? "mysql://root@127.0.0.1:3306/test";

let server: RunningServer;
let worker: Worker;
let editor: TestUser;
let token: string;
let source: pg.Client;
let sourceUrl: string;
let sourceDb: SourceDatabase;
let mysqlConn: mysql.Connection;

/** Names of Snapbase's own SQL (aliases, the keys of its JSON) and metadata columns, and the usual hard cases. */
const HARD_NAMES = [
  "select", "from", "order", "user", "table", "Mixed Case", "UPPER", "two  words", " leading", "it's", 'say "hi"', "back\\slash",
  "semi;colon", "a.b", "50%", "$1", "naïve", "名前", "n", "e", "r", "i", "s", "t", "k", "v", "c", "o", "x", "j", "l", "typed", "seen",
  "remote_id", "values", "id", "rec", "op", "set", "shape", "row", "key", "data_changed", "patch", "value", "__id", "__remote_id", "__dirty",
  "__last_seen", "__edited", "__x", "~tilde",
];
const PG_ONLY = ["trailing ", "🐘 emoji", "a".repeat(63), `__${"b".repeat(61)}`, "日本語のとても長い列の名前です".repeat(1)];
const PG_NAMES = [...HARD_NAMES, ...PG_ONLY];
// MySQL: up to 64 characters (of the Basic Multilingual Plane), no trailing space.
const MYSQL_NAMES = [...HARD_NAMES, "back`tick", "x".repeat(64), "é".repeat(64), `__${"y".repeat(62)}`];

const text = (row: number, name: string) => `${row}:${name}`;

const gql = async (query: string, variables: Record<string, unknown> = {}, as = token) => {
  return graphqlData(server.url, query, variables, as);
};

async function createAccount(kind: string, credentials: unknown): Promise<string> {
  return (await gql(`mutation($k: String!, $c: JSON!) { createConnectorAccount(input: { kind: $k, name: "Names", credentials: $c }) { result { rowId } } }`,
    { k: kind, c: credentials })).createConnectorAccount.result.rowId;
}

async function startDownload(account: string, remoteTable: string) {
  const wb = String((await gql(`mutation($a: BigInt!, $t: [String]!) { createWorkbookFromRemote(input: { name: "Names", accountId: $a, remoteTables: $t }) { result { rowId } } }`,
    { a: account, t: [remoteTable] })).createWorkbookFromRemote.result.rowId);
  const { rows: [job] } = await owner().query("select id from snapbase.jobs where workbook_id = $1", [wb]);
  return { wb, job: await settled(job.id) };
}

const mysqlCredentials = () => {
  const u = new URL(MYSQL_URL);
  return { host: u.hostname, port: Number(u.port || 3306), user: decodeURIComponent(u.username), password: decodeURIComponent(u.password), database: u.pathname.slice(1) };
};

interface Downloaded {
  wb: string;
  tableId: string;
  names: string[];
  key: string;
  readSource: () => Promise<Record<string, string>[]>;
}

/**
 * Everything up to publishing, on one table holding every name; `key` is the
 * primary key column, `readSource` returns the source's rows by that key as {name: text}.
 */
async function roundTrip(account: string, remoteTable: string, names: string[], key: string, readSource: () => Promise<Record<string, string>[]>): Promise<Downloaded> {
  const { wb, job } = await startDownload(account, remoteTable);
  expect(job, JSON.stringify(job)).toMatchObject({ state: "succeeded" });
  const tableId = String(job.table_id);

  // Columns: every source name, as itself or as its documented local name.
  const { columns } = (await owner().query("select columns from snapbase.workbook_tables where id = $1", [tableId])).rows[0];
  expect(columns.map((c: { name: string }) => c.name)).toEqual([key, ...names].map(localColumnName));
  for (const c of columns as { name: string; source_name?: string }[]) {
    const sourceName = [key, ...names].find((n) => localColumnName(n) === c.name)!;
    if (c.name !== sourceName) expect(c.source_name).toBe(sourceName);
    expect(Buffer.byteLength(c.name)).toBeLessThanOrEqual(63);
  }
  expect(localColumnName("__id")).toBe("~__id");
  expect(localColumnName("~tilde")).toBe("~~tilde");

  // Read: every value under its column.
  const page = (await gql(`query($t: BigInt!) { workbookRecords(tableId: $t, sortColumn: ${JSON.stringify(localColumnName("Mixed Case"))}, descending: true) }`, { t: tableId })).workbookRecords;
  expect(page.records.map((r: { values: Record<string, unknown> }) => r.values[localColumnName("Mixed Case")])).toEqual([text(3, "Mixed Case"), text(2, "Mixed Case"), text(1, "Mixed Case")]);
  const byRow = new Map<number, { id: string; values: Record<string, unknown> }>(page.records.map((r: { id: string; values: Record<string, unknown> }) => [Number(r.values[localColumnName(key)]), r]));
  for (const row of [1, 2, 3]) for (const name of names) expect(byRow.get(row)!.values[localColumnName(name)], name).toBe(text(row, name));

  // A filter naming awkward columns.
  await gql(`mutation($t: BigInt!, $f: String!) { setTableFilter(input: { tableId: $t, filter: $f }) { clientMutationId } }`,
    { t: tableId, f: `"select" = '1:select' or "n" = '2:n' or ${pg.escapeIdentifier(localColumnName("__id"))} = '3:__id'` });
  expect((await gql(`query($t: BigInt!) { workbookRecordCounts(tableId: $t) { total filtered } }`, { t: tableId })).workbookRecordCounts).toEqual({ total: "3", filtered: "3" });
  await gql(`mutation($t: BigInt!) { setTableFilter(input: { tableId: $t, filter: null }) { clientMutationId } }`, { t: tableId });

  // Edit every column of row 1; suggest every column of row 2 and accept.
  const edited = Object.fromEntries(names.map((n) => [localColumnName(n), `edited ${n}`]));
  await gql(`mutation($t: BigInt!, $r: BigInt!, $v: JSON!) { updateRecord(input: { tableId: $t, recordId: $r, values: $v }) { clientMutationId } }`,
    { t: tableId, r: byRow.get(1)!.id, v: edited });
  const suggested = Object.fromEntries(names.map((n) => [localColumnName(n), `suggested ${n}`]));
  await gql(`mutation($t: BigInt!, $r: BigInt!, $v: JSON!) { suggestValues(input: { tableId: $t, recordId: $r, values: $v }) { clientMutationId } }`,
    { t: tableId, r: byRow.get(2)!.id, v: suggested });
  const accepted = (await gql(`mutation($t: BigInt!) { acceptSuggestions(input: { tableId: $t }) { result } }`, { t: tableId })).acceptSuggestions.result;
  expect(accepted).toMatchObject({ records: 1, cells: names.length });
  const row2 = (await gql(`query($t: BigInt!, $r: BigInt!) { workbookRecord(tableId: $t, recordId: $r) }`, { t: tableId, r: byRow.get(2)!.id })).workbookRecord;
  expect(row2.values).toMatchObject(suggested);
  expect(Object.keys(row2.edited).sort()).toEqual(Object.keys(suggested).sort());

  // Export: the header is the columns, each once.
  const csv = await fetch(`${server.url}/api/v1/workbook-tables/${tableId}/export.csv`, { headers: { authorization: `Bearer ${token}` } });
  expect(csv.status).toBe(200);
  expect((await csv.text()).split("\n")[0]).toContain(`"${localColumnName("say \"hi\"").replaceAll('"', '""')}"`);
  return { wb, tableId, names, key, readSource };
}

/** Publish: the source holds every edited and accepted value, under its own names; a refresh then changes nothing. */
async function publishAndRefresh({ wb, tableId, names, key, readSource }: Downloaded) {
  const published = await settled((await gql(`mutation($w: BigInt!) { publishWorkbook(input: { workbookId: $w }) { result { rowId } } }`, { w: wb })).publishWorkbook.result[0].rowId);
  expect(published, JSON.stringify(published)).toMatchObject({ state: "succeeded", result: { published: 2, failed: 0 } });
  const rows = await readSource();
  expect(rows).toEqual([
    { [key]: "1", ...Object.fromEntries(names.map((n) => [n, `edited ${n}`])) },
    { [key]: "2", ...Object.fromEntries(names.map((n) => [n, `suggested ${n}`])) },
    { [key]: "3", ...Object.fromEntries(names.map((n) => [n, text(3, n)])) },
  ]);
  const refreshed = await settled((await gql(`mutation($t: BigInt!) { refreshWorkbookTable(input: { tableId: $t }) { result { rowId } } }`, { t: tableId })).refreshWorkbookTable.result.rowId);
  expect(refreshed, JSON.stringify(refreshed)).toMatchObject({ state: "succeeded" });
  expect((await gql(`query($t: BigInt!) { workbookRecordCounts(tableId: $t) { total dirty } }`, { t: tableId })).workbookRecordCounts).toEqual({ total: "3", dirty: "0" });
}

beforeAll(async () => {
  sourceDb = await createSourceDatabase({ database: SOURCE_DB });
  ({ client: source, url: sourceUrl } = sourceDb);
  mysqlConn = await mysql.createConnection(MYSQL_URL);
  server = await startTestServer();
  worker = await startWorker({ ownerUrl: db.ownerUrl, concurrency: 2, credentialsKey: TEST_CREDENTIALS_KEY });
  editor = await createUser("editor", "names");
  token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: editor.email, password: TEST_PASSWORD } })).body.token;
});

afterAll(async () => {
  await mysqlConn?.query(`drop table if exists sb_names_${RUN}`).catch(() => {});
  await worker?.stop();
  await server?.close();
  await mysqlConn?.end();
  await sourceDb?.drop();
});

describe("every column name", () => {
  let pgTable: Downloaded;
  let mysqlTable: Downloaded;
  const mysqlName = `sb_names_${RUN}`;
  const quoteMysql = (n: string) => mysql.escapeId(n, true);

  it("PostgreSQL: one table with every kind of name, through download, read, sort, filter, edit, suggest, accept and export", async () => {
    const key = "the key";
    const cols = [`${pg.escapeIdentifier(key)} integer primary key`, ...PG_NAMES.map((n) => `${pg.escapeIdentifier(n)} text`)].join(", ");
    await source.query(`create table public."every name" (${cols})`);
    for (const row of [1, 2, 3]) {
      await source.query(`insert into public."every name" values ($1, ${PG_NAMES.map((_, i) => `$${i + 2}`).join(", ")})`, [row, ...PG_NAMES.map((n) => text(row, n))]);
    }
    const account = await createAccount("postgres", { connection_string: sourceUrl });
    pgTable = await roundTrip(account, "public.every name", PG_NAMES, key, async () =>
      (await source.query(`select ${[key, ...PG_NAMES].map((n) => `${pg.escapeIdentifier(n)}::text`).join(", ")} from public."every name" order by 1`)).rows);
  });

  it("MySQL: the same with 64-character names (longer than PostgreSQL's 63 bytes) and backticks", async () => {
    const key = "the key";
    await mysqlConn.query(`drop table if exists ${mysqlName}`);
    await mysqlConn.query(`create table ${mysqlName} (${[`${quoteMysql(key)} int primary key`, ...MYSQL_NAMES.map((n) => `${quoteMysql(n)} text`)].join(", ")}) default charset = utf8mb4`);
    for (const row of [1, 2, 3]) {
      await mysqlConn.query(`insert into ${mysqlName} values (?)`, [[row, ...MYSQL_NAMES.map((n) => text(row, n))]]);
    }
    const account = await createAccount("mysql", mysqlCredentials());
    mysqlTable = await roundTrip(account, mysqlName, MYSQL_NAMES, key, async () => {
      const [rows] = await mysqlConn.query(`select ${[key, ...MYSQL_NAMES].map(quoteMysql).join(", ")} from ${mysqlName} order by 1`);
      return (rows as Record<string, unknown>[]).map((r) => Object.fromEntries(Object.entries(r).map(([k, v]) => [k, String(v)])));
    });
  });

  it("PostgreSQL: publish writes every edited and accepted value under the source's names; refresh changes nothing", async () => {
    await publishAndRefresh(pgTable);
  });

  it("MySQL: publish and refresh the same way", async () => {
    await publishAndRefresh(mysqlTable);
  });

  it("a download that fails leaves no table behind, and says why", async () => {
    const table = `sb_bad_${RUN}`;
    await mysqlConn.query(`create table ${table} (id int primary key, n int, e date)`);
    try {
      await mysqlConn.query(`insert into ${table} select seq, seq, '2024-01-01' from seq_1_to_2500`).catch(async () => {
        for (let i = 1; i <= 2500; i += 500) {
          await mysqlConn.query(`insert into ${table} values ${Array.from({ length: 500 }, (_, j) => `(${i + j}, ${i + j}, '2024-01-01')`).join(", ")}`);
        }
      });
      // A date PostgreSQL cannot hold (a zero month and day; the all-zero date has a mapping), in the second batch.
      await mysqlConn.query("set session sql_mode = ''");
      await mysqlConn.query(`insert into ${table} values (2501, 2501, '2024-00-00')`);
      const account = await createAccount("mysql", mysqlCredentials());
      const { wb, job } = await startDownload(account, table);
      expect(job).toMatchObject({ state: "failed", table_id: null, error: expect.stringMatching(/2024-00-00|out of range|date/i) });
      expect((await owner().query("select count(*)::int as n from snapbase.workbook_tables where workbook_id = $1", [wb])).rows[0].n).toBe(0);
      const [{ schema_name }] = (await owner().query("select schema_name from snapbase.workbooks where id = $1", [wb])).rows;
      expect((await owner().query("select count(*)::int as n from pg_tables where schemaname = $1", [schema_name])).rows[0].n).toBe(0);
    } finally {
      await mysqlConn.query(`drop table ${table}`);
    }
  });
});
