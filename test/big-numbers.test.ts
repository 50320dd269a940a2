// Issue 13: numbers wider than a double survive every round trip. A client reads
// records through GraphQL (as an editor, and as an agent token), or a snapshot
// through REST, writes back what it read, and the source still holds exactly what
// it held: 9007199254740993 stays 9007199254740993, 12345678901234567890.0123456789
// keeps every digit.
import { randomBytes } from "node:crypto";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { startWorker, type Worker } from "../src/worker.ts";
import { createUser, db, graphqlData, http, owner, settled, startTestServer, TEST_CREDENTIALS_KEY, TEST_PASSWORD, type TestUser } from "./helpers.ts";
import { createSourceDatabase, type SourceDatabase } from "./source-databases.ts";

const RUN = randomBytes(4).toString("hex");
const SOURCE_DB = `snapbase_wide_source_${RUN}`;
const WIDE_INT = "9007199254740993";
const WIDE_DECIMAL = "12345678901234567890.0123456789";

let server: RunningServer;
let worker: Worker;
let editor: TestUser, admin: TestUser;
let token: string;
let source: pg.Client;
let sourceUrl: string;
let sourceDb: SourceDatabase;

const gql = async (query: string, variables: Record<string, unknown> = {}, as = token) => {
  return graphqlData(server.url, query, variables, as);
};

/** The source's rows as PostgreSQL prints them (text: exact). */
const atSource = async () => (await source.query("select id, big::text, exact::text, scaled::text, note, doc::text from public.wide order by id")).rows;

async function downloadedWorkbook() {
  const account = (await gql(`mutation($c: JSON!) { createConnectorAccount(input: { kind: "postgres", name: "Wide", credentials: $c }) { result { rowId } } }`,
    { c: { connection_string: sourceUrl } })).createConnectorAccount.result.rowId;
  const wb = (await gql(`mutation($a: BigInt!) { createWorkbookFromRemote(input: { name: "Wide numbers", accountId: $a, remoteTables: ["public.wide"] }) { result { rowId } } }`,
    { a: account })).createWorkbookFromRemote.result.rowId;
  const { rows: [job] } = await owner().query("select id from snapbase.jobs where workbook_id = $1", [wb]);
  const done = await settled(job.id);
  expect(done, JSON.stringify(done)).toMatchObject({ state: "succeeded" });
  return { wb: String(wb), tableId: String(done.table_id) };
}

async function publish(wb: string) {
  const data = await gql(`mutation($w: BigInt!) { publishWorkbook(input: { workbookId: $w }) { result { rowId } } }`, { w: wb });
  return settled(data.publishWorkbook.result[0].rowId);
}

beforeAll(async () => {
  sourceDb = await createSourceDatabase({ database: SOURCE_DB });
  ({ client: source, url: sourceUrl } = sourceDb);
  await source.query(`
    create table public.wide (id bigint primary key, big bigint, exact numeric, scaled numeric(38,10), note text, doc jsonb);
    insert into public.wide values
      (${WIDE_INT}, ${WIDE_INT}, ${WIDE_DECIMAL}, ${WIDE_DECIMAL}, 'wide', '{"inside": 123456789012345678901234567890, "small": 1.25}'),
      (2, 2, 0.1, 1.5, 'narrow', '{"inside": 1}')`);
  server = await startTestServer();
  worker = await startWorker({ ownerUrl: db.ownerUrl, concurrency: 2, credentialsKey: TEST_CREDENTIALS_KEY });
  [editor, admin] = await Promise.all([createUser("editor", "wide-editor"), createUser("admin", "wide-admin")]);
  token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: editor.email, password: TEST_PASSWORD } })).body.token;
});

afterAll(async () => {
  await worker?.stop();
  await server?.close();
  await sourceDb?.drop();
});

describe("numbers wider than a double", () => {
  it("download keeps every digit, JSON documents included", async () => {
    const { tableId } = await downloadedWorkbook();
    const rel = (await owner().query("select snapbase_private.table_rel(t) as rel from snapbase.workbook_tables t where id = $1", [tableId])).rows[0].rel;
    const { rows } = await owner().query(`select big::text, exact::text, scaled::text, doc::text, __last_seen -> 'doc' ->> 'inside' as seen from ${rel} order by __remote_id desc`);
    expect(rows[0]).toEqual({ big: WIDE_INT, exact: WIDE_DECIMAL, scaled: WIDE_DECIMAL, doc: '{"small": 1.25, "inside": 123456789012345678901234567890}', seen: "123456789012345678901234567890" });
  });

  it("GraphQL: read, write back, publish; the source is unchanged but for the field edited; new wide values arrive exactly", async () => {
    const before = await atSource();
    const { wb, tableId } = await downloadedWorkbook();
    const page = (await gql(`query($t: BigInt!) { workbookRecords(tableId: $t, sortColumn: "note", descending: true) }`, { t: tableId })).workbookRecords;
    const wide = page.records.find((r: { values: { note: string } }) => r.values.note === "wide");
    // What the client reads: exact digits (as text where a double cannot hold them).
    expect(wide.values).toMatchObject({ id: WIDE_INT, big: WIDE_INT, exact: WIDE_DECIMAL, scaled: WIDE_DECIMAL });
    // A client writing back the whole record, with one field changed.
    const { doc: _doc, id: _id, ...values } = wide.values;
    await gql(`mutation($t: BigInt!, $r: BigInt!, $v: JSON!) { updateRecord(input: { tableId: $t, recordId: $r, values: $v }) { clientMutationId } }`,
      { t: tableId, r: String(wide.id), v: { ...values, note: "edited" } });
    const after = (await gql(`query($t: BigInt!, $r: BigInt!) { workbookRecord(tableId: $t, recordId: $r) }`, { t: tableId, r: String(wide.id) })).workbookRecord;
    expect(Object.keys(after.edited)).toEqual(["note"]);
    expect((await publish(wb)).state).toBe("succeeded");
    expect(await atSource()).toEqual(before.map((r) => (r.note === "wide" ? { ...r, note: "edited" } : r)));

    // New wide values: as strings (any client), and as JSON numbers in the request (clients that can write them).
    const narrow = page.records.find((r: { values: { note: string } }) => r.values.note === "narrow");
    await gql(`mutation($t: BigInt!, $r: BigInt!, $v: JSON!) { updateRecord(input: { tableId: $t, recordId: $r, values: $v }) { clientMutationId } }`,
      { t: tableId, r: String(narrow.id), v: { big: "9007199254740995", exact: "0.30000000000000000000000000001" } });
    const raw = `{"query":"mutation($t: BigInt!, $r: BigInt!, $v: JSON!) { updateRecord(input: { tableId: $t, recordId: $r, values: $v }) { clientMutationId } }",
                  "variables":{"t":"${tableId}","r":"${wide.id}","v":{"big":9007199254740997,"scaled":98765432109876543210.9876543210}}}`;
    const sent = await http(server.url, "POST", "/graphql", { token, rawBody: raw });
    expect(sent.body.errors).toBeUndefined();
    // And inline in the query text (as a string: Grafast reads numbers there as doubles).
    await gql(`mutation($t: BigInt!, $r: BigInt!) { updateRecord(input: { tableId: $t, recordId: $r, values: { exact: "11111111111111111111.11111111111" } }) { clientMutationId } }`,
      { t: tableId, r: String(wide.id) });
    expect((await publish(wb)).state).toBe("succeeded");
    expect(await atSource()).toEqual([
      expect.objectContaining({ id: "2", big: "9007199254740995", exact: "0.30000000000000000000000000001", note: "narrow" }),
      expect.objectContaining({ id: WIDE_INT, big: "9007199254740997", exact: "11111111111111111111.11111111111", scaled: "98765432109876543210.9876543210", note: "edited" }),
    ]);
  });

  it("an agent token: read, suggest what it read (one field changed), accepted and published: the source keeps every digit", async () => {
    await source.query(`update public.wide set big = ${WIDE_INT}, exact = ${WIDE_DECIMAL}, note = 'wide' where id = ${WIDE_INT}`);
    const before = await atSource();
    const { wb, tableId } = await downloadedWorkbook();
    const agent = (await gql(`mutation($w: BigInt!) { createAgentToken(input: { workbookId: $w, name: "wide bot" }) { result } }`, { w: wb })).createAgentToken.result;
    const page = (await gql(`query($t: BigInt!) { workbookRecords(tableId: $t) }`, { t: tableId }, agent)).workbookRecords;
    const wide = page.records.find((r: { values: { note: string } }) => r.values.note === "wide");
    expect(wide.values).toMatchObject({ big: WIDE_INT, exact: WIDE_DECIMAL });
    const { doc: _doc, id: _id, ...values } = wide.values;
    await gql(`mutation($t: BigInt!, $r: BigInt!, $v: JSON!) { suggestValues(input: { tableId: $t, recordId: $r, values: $v }) { clientMutationId } }`,
      { t: tableId, r: String(wide.id), v: { ...values, note: "by the agent" } }, agent);
    const suggestions = (await gql(`query($t: BigInt!) { workbookSuggestions(tableId: $t) }`, { t: tableId })).workbookSuggestions;
    expect(suggestions[0].suggested.big.value).toBe(WIDE_INT);
    await gql(`mutation($t: BigInt!) { acceptSuggestions(input: { tableId: $t }) { result } }`, { t: tableId });
    expect((await publish(wb)).state).toBe("succeeded");
    expect(await atSource()).toEqual(before.map((r) => (r.note === "wide" ? { ...r, note: "by the agent" } : r)));
  });

  it("REST: read a snapshot, submit its values back as edits (as text and as JSON numbers), approve: the table keeps every digit", async () => {
    await owner().query(`
      drop schema if exists widerest cascade;
      create schema widerest;
      grant usage on schema widerest to ${db.roles.viewer};
      create table widerest.t (id bigint primary key, big bigint, exact numeric, note text);
      insert into widerest.t values (${WIDE_INT}, ${WIDE_INT}, ${WIDE_DECIMAL}, 'wide');
      grant select on widerest.t to ${db.roles.viewer};
      select snapbase.register_table('widerest.t');`);
    const snap = (await owner().query("select id from snapbase.take_snapshot('widerest.t', 'read me')")).rows[0].id;
    const adminToken = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: admin.email, password: TEST_PASSWORD } })).body.token;
    const read = await http(server.url, "GET", `/api/v1/snapshots/${snap}`, { token });
    const [row] = read.body.snapshot_data;
    expect(row).toEqual({ id: WIDE_INT, big: WIDE_INT, exact: WIDE_DECIMAL, note: "wide" });
    const { id, ...set } = row;
    const submitted = await http(server.url, "POST", "/api/v1/changes", { token, body: { table_name: "widerest.t", edits: { update: [{ key: { id }, set: { ...set, note: "edited" } }] } } });
    expect(submitted.status, JSON.stringify(submitted.body)).toBe(201);
    expect((await http(server.url, "POST", `/api/v1/changes/${submitted.body.change_request.id}/approve`, { token: adminToken })).status).toBe(200);
    // A body with the numbers written as JSON numbers.
    const raw = `{"table_name":"widerest.t","edits":{"insert":[{"id":9007199254740995,"big":9007199254740997,"exact":0.1000000000000000000001,"note":"raw"}]}}`;
    const rawSubmitted = await http(server.url, "POST", "/api/v1/changes", { token, rawBody: raw });
    expect(rawSubmitted.status, JSON.stringify(rawSubmitted.body)).toBe(201);
    expect((await http(server.url, "POST", `/api/v1/changes/${rawSubmitted.body.change_request.id}/approve`, { token: adminToken })).status).toBe(200);
    expect((await owner().query("select id::text, big::text, exact::text, note from widerest.t order by id")).rows).toEqual([
      { id: WIDE_INT, big: WIDE_INT, exact: WIDE_DECIMAL, note: "edited" },
      { id: "9007199254740995", big: "9007199254740997", exact: "0.1000000000000000000001", note: "raw" },
    ]);
  });
});
