// Values arrive and go back exactly as the source holds them, whatever the source's
// session settings, whatever JavaScript would make of a number's text, and for every
// value MySQL allows:
//
// - a PostgreSQL source whose database and role set extra_float_digits = 0,
//   IntervalStyle = sql_standard, bytea_output = escape, another DateStyle and
//   TimeZone still gives (and takes) exact floats, intervals and bytes;
// - numbers keep their text through the worker and request bodies: numeric 1.500 and
//   0.000, jsonb {"b": 1.10}, a REST edit of 1.100;
// - MySQL TIME outside a day, zero dates and tinyint(1) values other than 0 and 1
//   download, and publish back unchanged.
import { randomBytes } from "node:crypto";
import mysql from "mysql2/promise";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import * as mysqlConnector from "../src/connectors/mysql.ts";
import { ExactNumber, parseJsonExact } from "../src/exact-json.ts";
import type { RunningServer } from "../src/server/app.ts";
import { startWorker, type Worker } from "../src/worker.ts";
import { createUser, db, graphqlData, http, owner, settled, startTestServer, TEST_CREDENTIALS_KEY, TEST_PASSWORD, type TestUser } from "./helpers.ts";
import { createSourceDatabase, type SourceDatabase } from "./source-databases.ts";

const RUN = randomBytes(4).toString("hex");
const SOURCE_DB = `snapbase_values_source_${RUN}`;
const SOURCE_USER = `snapbase_values_user_${RUN}`;
const MYSQL_URL = process.env.TEST_MYSQL_URL ?? "mysql://root@127.0.0.1:3306/test";
const MYSQL_TABLE = `sb_values_${RUN}`;

let server: RunningServer;
let worker: Worker;
let editor: TestUser, admin: TestUser;
let token: string;
let sourceDb: SourceDatabase;
let mysqlConn: mysql.Connection;

const gql = async (query: string, variables: Record<string, unknown> = {}, as = token) => {
  return graphqlData(server.url, query, variables, as);
};

async function createAccount(kind: string, credentials: unknown): Promise<string> {
  return (await gql(`mutation($k: String!, $c: JSON!) { createConnectorAccount(input: { kind: $k, name: "Values", credentials: $c }) { result { rowId } } }`,
    { k: kind, c: credentials })).createConnectorAccount.result.rowId;
}

/** A workbook with the remote table downloaded into it: its id, the table's id and its relation. */
async function download(account: string, remoteTable: string) {
  const wb = String((await gql(`mutation($a: BigInt!, $t: [String]!) { createWorkbookFromRemote(input: { name: "Values", accountId: $a, remoteTables: $t }) { result { rowId } } }`,
    { a: account, t: [remoteTable] })).createWorkbookFromRemote.result.rowId);
  const { rows: [job] } = await owner().query("select id from snapbase.jobs where workbook_id = $1", [wb]);
  const done = await settled(job.id);
  expect(done, JSON.stringify(done)).toMatchObject({ state: "succeeded" });
  const rel = (await owner().query("select snapbase_private.table_rel(t) as rel from snapbase.workbook_tables t where id = $1", [done.table_id])).rows[0].rel as string;
  return { wb, tableId: String(done.table_id), rel };
}

async function update(tableId: string, rel: string, remoteId: string, values: Record<string, unknown>) {
  const { rows: [r] } = await owner().query(`select __id from ${rel} where __remote_id = $1`, [remoteId]);
  await gql(`mutation($t: BigInt!, $r: BigInt!, $v: JSON!) { updateRecord(input: { tableId: $t, recordId: $r, values: $v }) { clientMutationId } }`,
    { t: tableId, r: String(r.__id), v: values });
}

async function publish(wb: string) {
  const data = await gql(`mutation($w: BigInt!) { publishWorkbook(input: { workbookId: $w }) { result { rowId } } }`, { w: wb });
  const job = await settled(data.publishWorkbook.result[0].rowId);
  expect(job, JSON.stringify(job)).toMatchObject({ state: "succeeded" });
  return job;
}

const mysqlCredentials = () => {
  const u = new URL(MYSQL_URL);
  return { host: u.hostname, port: Number(u.port || 3306), user: decodeURIComponent(u.username), password: decodeURIComponent(u.password), database: u.pathname.slice(1) };
};

beforeAll(async () => {
  sourceDb = await createSourceDatabase({ database: SOURCE_DB, user: SOURCE_USER });
  mysqlConn = await mysql.createConnection({ uri: MYSQL_URL, dateStrings: true });
  server = await startTestServer();
  worker = await startWorker({ ownerUrl: db.ownerUrl, concurrency: 2, credentialsKey: TEST_CREDENTIALS_KEY });
  [editor, admin] = await Promise.all([createUser("editor", "values-editor"), createUser("admin", "values-admin")]);
  token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: editor.email, password: TEST_PASSWORD } })).body.token;
});

afterAll(async () => {
  await mysqlConn?.query(`drop table if exists ${MYSQL_TABLE}`).catch(() => {});
  await mysqlConn?.end();
  await worker?.stop();
  await server?.close();
  await sourceDb?.drop();
});

describe("a PostgreSQL source's session settings do not change values", () => {
  it("download and publish keep floats, reals, intervals and bytes exact under the source's own settings", async () => {
    const source = sourceDb.client;
    await source.query(`
      create table public.settings_t (id int primary key, f float8, r real, i interval, b bytea, ts timestamptz, d date);
      insert into public.settings_t values
        (1, 1.0000000000000002, 1.2345678, '-1 days -02:03:04', '\\x00ff5c', '2024-03-04 05:06:07.123456+00', '2024-03-04'),
        (2, -2.5e-300, 3.4028235e38, '1 year 2 mons -3 days +04:05:06.5', '\\x', '1999-12-31 23:59:59+00', '1999-12-31')`);
    // What the source says for new sessions, at database and at role level.
    await source.query(`alter database ${SOURCE_DB} set extra_float_digits = 0`);
    await source.query(`alter database ${SOURCE_DB} set intervalstyle = 'sql_standard'`);
    await source.query(`alter role ${SOURCE_USER} set bytea_output = 'escape'`);
    await source.query(`alter role ${SOURCE_USER} set datestyle = 'SQL, DMY'`);
    await source.query(`alter role ${SOURCE_USER} set timezone = 'Asia/Kolkata'`);

    const account = await createAccount("postgres", { connection_string: sourceDb.url });
    const { wb, tableId, rel } = await download(account, "public.settings_t");
    const local = async () => (await owner().query(
      `select __remote_id as id, f::text, r::text, i::text, b::text, ts = '2024-03-04 05:06:07.123456+00' or ts = '1999-12-31 23:59:59+00' as ts, d::text from ${rel} order by __remote_id`)).rows;
    expect(await local()).toEqual([
      { id: "1", f: "1.0000000000000002", r: "1.2345678", i: "-1 days -02:03:04", b: "\\x00ff5c", ts: true, d: "2024-03-04" },
      { id: "2", f: "-2.5e-300", r: "3.4028235e+38", i: "1 year 2 mons -3 days +04:05:06.5", b: "\\x", ts: true, d: "1999-12-31" },
    ]);

    await update(tableId, rel, "1", { f: "2.0000000000000004", r: "7.654321", i: "-3 days -04:05:06", b: "\\x5c00" });
    await publish(wb);
    // Read in fixed settings: the source's own would round and reshape the text.
    await source.query("begin");
    await source.query("set local extra_float_digits = 3; set local intervalstyle = 'postgres'; set local bytea_output = 'hex'");
    const atSource = (await source.query("select id, f::text, r::text, i::text, b::text from public.settings_t order by id")).rows;
    await source.query("commit");
    expect(atSource).toEqual([
      { id: 1, f: "2.0000000000000004", r: "7.654321", i: "-3 days -04:05:06", b: "\\x5c00" },
      { id: 2, f: "-2.5e-300", r: "3.4028235e+38", i: "1 year 2 mons -3 days +04:05:06.5", b: "\\x" },
    ]);
    // The workbook took the row as the source stored it: still exact.
    expect((await local())[0]).toMatchObject({ f: "2.0000000000000004", r: "7.654321", i: "-3 days -04:05:06", b: "\\x5c00" });
  });
});

describe("numbers keep their text inside Snapbase", () => {
  it("parseJsonExact gives back every number's text as it was written", () => {
    for (const text of ["1.500", "0.000", "-0", "1e3", "1.10", "-0.0", "12345678901234567890", "0.1", "5", "-7", "1.5e-07", "[1.0,2]"]) {
      const json = `{"a":[${text}],"b":"x"}`;
      expect(JSON.stringify(parseJsonExact(json))).toBe(json);
    }
    for (const json of ["1.50", "-0", " 2e5", '{"a": 1.10, "b": [ -0 ]}', '{"id": "3e4f", "n": 1.0}']) {
      expect(JSON.stringify(parseJsonExact(json))).toBe(json.trim().replace(/(?<=[:,[]) | (?=])/g, ""));
    }
    // Canonical numbers stay plain numbers.
    expect(parseJsonExact('{"a": 1.5, "b": 12, "c": -3}')).toEqual({ a: 1.5, b: 12, c: -3 });
    expect(parseJsonExact('[1.50]')).toEqual([new ExactNumber("1.50")]);
  });

  it("download and publish keep numeric scale and jsonb's number text", async () => {
    const source = sourceDb.client;
    await source.query(`
      create table public.scale_t (id int primary key, n numeric, s numeric(10,3), j jsonb);
      insert into public.scale_t values (1, 0.000, 1.500, '{"b": 1.10, "c": [2.50, -0.0]}'), (2, 12.5, 0.100, null)`);
    const account = await createAccount("postgres", { connection_string: sourceDb.url });
    const { wb, tableId, rel } = await download(account, "public.scale_t");
    const local = async () => (await owner().query(`select __remote_id as id, n::text, s::text, j::text from ${rel} order by __remote_id`)).rows;
    expect(await local()).toEqual([
      { id: "1", n: "0.000", s: "1.500", j: '{"b": 1.10, "c": [2.50, 0.0]}' },
      { id: "2", n: "12.5", s: "0.100", j: null },
    ]);
    await update(tableId, rel, "2", { n: "1.500", j: { b: 1.5 } });
    // jsonb with trailing zeros, written by the workbook itself (GraphQL variables would read them as doubles).
    await owner().query(`update ${rel} set j = '{"b": 3.250}', __edited = __edited || '{"j": "2024-01-01T00:00:00Z"}' where __remote_id = '2'`);
    await publish(wb);
    expect((await source.query("select id, n::text, s::text, j::text from public.scale_t order by id")).rows).toEqual([
      { id: 1, n: "0.000", s: "1.500", j: '{"b": 1.10, "c": [2.50, 0.0]}' },
      { id: 2, n: "1.500", s: "0.100", j: '{"b": 3.250}' },
    ]);
  });

  it("REST: an edit's body {\"total\": 1.100} is applied as 1.100", async () => {
    await owner().query(`
      drop schema if exists valuesrest cascade;
      create schema valuesrest;
      grant usage on schema valuesrest to ${db.roles.viewer};
      create table valuesrest.t (id int primary key, total numeric, note text);
      insert into valuesrest.t values (1, 1, 'one');
      grant select on valuesrest.t to ${db.roles.viewer};
      select snapbase.register_table('valuesrest.t');`);
    const adminToken = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: admin.email, password: TEST_PASSWORD } })).body.token;
    const raw = `{"table_name":"valuesrest.t","edits":{"update":[{"key":{"id":1},"set":{"total":1.100}}],"insert":[{"id":2,"total":0.000,"note":"two"}]}}`;
    const submitted = await http(server.url, "POST", "/api/v1/changes", { token, rawBody: raw });
    expect(submitted.status, JSON.stringify(submitted.body)).toBe(201);
    expect((await http(server.url, "POST", `/api/v1/changes/${submitted.body.change_request.id}/approve`, { token: adminToken })).status).toBe(200);
    expect((await owner().query("select id, total::text from valuesrest.t order by id")).rows).toEqual([{ id: 1, total: "1.100" }, { id: 2, total: "0.000" }]);
  });
});

describe("MySQL values PostgreSQL's matching types would refuse or change", () => {
  it("mysqlTime writes an interval as MySQL TIME text", () => {
    const { mysqlTime } = mysqlConnector as unknown as { mysqlTime: (interval: string) => string };
    expect(mysqlTime("838:59:59")).toBe("838:59:59");
    expect(mysqlTime("-12:30:00")).toBe("-12:30:00");
    expect(mysqlTime("-1 days +02:03:04")).toBe("-21:56:56");
    expect(mysqlTime("1 day 00:00:00.5")).toBe("24:00:00.5");
    expect(mysqlTime("-34 days -22:59:59.000001")).toBe("-838:59:59.000001");
    expect(mysqlTime("2 days")).toBe("48:00:00");
    expect(mysqlTime("00:00:00")).toBe("0:00:00");
    expect(mysqlTime("1 mon")).toBe("1 mon");
  });

  it("TIME beyond a day, zero dates and tinyint(1) values 2 and 5 download, and publish back unchanged", async () => {
    await mysqlConn.query(`drop table if exists ${MYSQL_TABLE}`);
    await mysqlConn.query(`create table ${MYSQL_TABLE} (id int primary key, t time, tf time(3), d date, dt datetime, flag tinyint(1), b boolean, note varchar(20))`);
    await mysqlConn.query("set session sql_mode = ''");
    await mysqlConn.query(`insert into ${MYSQL_TABLE} values
      (1, '-12:30:00', '838:59:59.000', '0000-00-00', '0000-00-00 00:00:00', 5, 1, 'zero'),
      (2, '838:59:59', '-838:59:59.500', '2024-02-29', '2024-02-29 10:11:12', 2, 0, 'leap'),
      (3, '10:00:00', null, null, null, -1, null, 'plain')`);
    const account = await createAccount("mysql", mysqlCredentials());
    const { wb, tableId, rel } = await download(account, MYSQL_TABLE);
    const types = (await owner().query("select columns from snapbase.workbook_tables where id = $1", [tableId])).rows[0].columns
      .map((c: { name: string; type: string }) => [c.name, c.type]);
    expect(Object.fromEntries(types)).toMatchObject({ t: "interval", tf: "interval", d: "date", dt: "timestamp without time zone", flag: "smallint", b: "smallint" });
    expect((await owner().query(`select __remote_id as id, t::text, tf::text, d::text, dt::text, flag, b from ${rel} order by __remote_id`)).rows).toEqual([
      { id: "1", t: "-12:30:00", tf: "838:59:59", d: "-infinity", dt: "-infinity", flag: 5, b: 1 },
      { id: "2", t: "838:59:59", tf: "-838:59:59.5", d: "2024-02-29", dt: "2024-02-29 10:11:12", flag: 2, b: 0 },
      { id: "3", t: "10:00:00", tf: null, d: null, dt: null, flag: -1, b: null },
    ]);

    const [before] = await mysqlConn.query(`select * from ${MYSQL_TABLE} order by id`);
    // Record 1: only its note; its zero dates stay. Record 2: a zero date, a negative TIME, flag 7. Record 3: days in TIME.
    await update(tableId, rel, "1", { note: "zero!" });
    await update(tableId, rel, "2", { d: "-infinity", dt: "-infinity", t: "-1 days +02:03:04", flag: 7 });
    await update(tableId, rel, "3", { t: "1 day 10:00:00", tf: "-00:00:01.25", b: 1 });
    await publish(wb);
    const [after] = await mysqlConn.query(`select * from ${MYSQL_TABLE} order by id`);
    const [one, two, three] = before as Record<string, unknown>[];
    expect(after).toEqual([
      { ...one, note: "zero!" },
      { ...two, d: "0000-00-00", dt: "0000-00-00 00:00:00", t: "-21:56:56", flag: 7 },
      { ...three, t: "34:00:00", tf: "-00:00:01.250", b: 1 },
    ]);
    // The workbook holds what MySQL stored, nothing left to publish.
    expect((await owner().query(`select __remote_id as id, t::text, d::text, flag from ${rel} where __dirty order by __remote_id`)).rows).toEqual([]);
    expect((await owner().query(`select t::text, d::text, dt::text from ${rel} where __remote_id = '2'`)).rows[0]).toEqual({ t: "-21:56:56", d: "-infinity", dt: "-infinity" });
  });
});
