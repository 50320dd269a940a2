// The csv connector end to end: files uploaded over REST, csv connector accounts
// and workbooks made through GraphQL, a real worker downloading and publishing,
// and every new version read back over HTTP and parsed with csv-parse.
import { parse } from "csv-parse/sync";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { startWorker, type Worker } from "../src/worker.ts";
import { createUser, db, graphqlData, http, owner, settled, startTestServer, TEST_CREDENTIALS_KEY, TEST_PASSWORD, type TestUser } from "./helpers.ts";

let server: RunningServer;
let worker: Worker;
let alice: TestUser, bob: TestUser;
let token: string, bobToken: string;

const gql = async (query: string, variables: Record<string, unknown> = {}, as = token) => {
  return graphqlData(server.url, query, variables, as);
};

async function upload(name: string, content: string, opts: { as?: string | null; contentType?: string } = {}) {
  const headers: Record<string, string> = { "content-type": opts.contentType ?? "text/csv" };
  const as = opts.as === undefined ? token : opts.as;
  if (as) headers.authorization = `Bearer ${as}`;
  const res = await fetch(`${server.url}/api/v1/csv-files?name=${encodeURIComponent(name)}`, { method: "POST", headers, body: content });
  return { status: res.status, body: await res.json() };
}

/** Uploads a file that must be accepted; returns its id. */
async function uploaded(name: string, content: string): Promise<string> {
  const res = await upload(name, content);
  expect(res, JSON.stringify(res.body)).toMatchObject({ status: 201, body: { file: { name } } });
  return String(res.body.file.id);
}

async function download(fileId: string, version?: number, as = token) {
  const res = await fetch(`${server.url}/api/v1/csv-files/${fileId}/content${version ? `?version=${version}` : ""}`,
    { headers: { authorization: `Bearer ${as}` } });
  return { status: res.status, headers: res.headers, text: await res.text() };
}

const versions = async (fileId: string, as = token) => http(server.url, "GET", `/api/v1/csv-files/${fileId}/versions`, { token: as });

async function csvAccount(fileId: string, as = token): Promise<{ rowId: string; summary: string }> {
  const data = await gql(`mutation($c: JSON!) { createConnectorAccount(input: { kind: "csv", name: "A CSV file", credentials: $c }) { result { rowId summary } } }`,
    { c: { file_id: Number(fileId) } }, as);
  return data.createConnectorAccount.result;
}

/** Creates a workbook from the file's table and waits for the download job. */
async function startDownload(account: string, table: string) {
  const wb = (await gql(`mutation($a: BigInt!, $t: [String]!) { createWorkbookFromRemote(input: { name: "From CSV", accountId: $a, remoteTables: $t }) { result { rowId } } }`,
    { a: account, t: [table] })).createWorkbookFromRemote.result.rowId;
  const { rows: [job] } = await owner().query("select id from snapbase.jobs where workbook_id = $1", [wb]);
  return { wb: String(wb), job: await settled(job.id) };
}

async function downloaded(account: string, table: string) {
  const { wb, job } = await startDownload(account, table);
  expect(job, JSON.stringify(job)).toMatchObject({ state: "succeeded" });
  const tableId = String(job.table_id);
  const { rows: [t] } = await owner().query("select snapbase_private.table_rel(t) as rel, columns from snapbase.workbook_tables t where id = $1", [tableId]);
  return { wb, tableId, rel: t.rel as string, columns: t.columns as { name: string; type: string; read_only: boolean }[], job };
}

const record = async (tableId: string, id: number | string) =>
  (await gql(`query($t: BigInt!, $r: BigInt!) { workbookRecord(tableId: $t, recordId: $r) }`, { t: tableId, r: String(id) })).workbookRecord;
const recordByRemote = async (rel: string, remoteId: string) =>
  (await owner().query(`select __id from ${rel} where __remote_id = $1`, [remoteId])).rows[0]?.__id;
const update = (tableId: string, id: number | string, values: unknown) =>
  gql(`mutation($t: BigInt!, $r: BigInt!, $v: JSON!) { updateRecord(input: { tableId: $t, recordId: $r, values: $v }) { result } }`, { t: tableId, r: String(id), v: values });
const createRecord = async (tableId: string, values: unknown) =>
  (await gql(`mutation($t: BigInt!, $v: JSON!) { createRecord(input: { tableId: $t, values: $v }) { result } }`, { t: tableId, v: values })).createRecord.result;
const deleteRecord = (tableId: string, id: number | string) =>
  gql(`mutation($t: BigInt!, $r: BigInt!) { deleteRecord(input: { tableId: $t, recordId: $r }) { result } }`, { t: tableId, r: String(id) });
async function publish(wb: string) {
  const data = await gql(`mutation($w: BigInt!) { publishWorkbook(input: { workbookId: $w }) { result { rowId } } }`, { w: wb });
  return settled(data.publishWorkbook.result[0].rowId);
}
async function refresh(tableId: string) {
  const data = await gql(`mutation($t: BigInt!) { refreshWorkbookTable(input: { tableId: $t }) { result { rowId } } }`, { t: tableId });
  return settled(data.refreshWorkbookTable.result.rowId);
}

/** The file's records as csv-parse reads them: header first. */
const rowsOf = (text: string): string[][] => parse(text, { bom: true });

beforeAll(async () => {
  server = await startTestServer();
  worker = await startWorker({ ownerUrl: db.ownerUrl, concurrency: 2, credentialsKey: TEST_CREDENTIALS_KEY });
  [alice, bob] = await Promise.all([createUser("editor", "csv-alice"), createUser("editor", "csv-bob")]);
  const login = async (u: TestUser) => (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: u.email, password: TEST_PASSWORD } })).body.token;
  [token, bobToken] = await Promise.all([login(alice), login(bob)]);
});

afterAll(async () => {
  await worker?.stop();
  await server?.close();
});

// Quoted commas, doubled quotes, a line break inside a field, Unicode, an empty
// cell, Windows line endings nowhere (this file uses \n).
const PEOPLE = [
  "id,name,city,amount,active,joined,notes",
  "1,Ada,Paris,12.50,true,2024-01-31,plain",
  '2,"Smith, John",Lyon,3,false,2024-02-29,"said ""hi""\nthen left"',
  "3,Zoë 😀,Kyiv,7.25,TRUE,,",
  '4,Bob,Oslo,-1,false,2023-12-01,"a,b"',
  "",
].join("\n");

describe("csv: upload, download, edit, suggest, publish", () => {
  it("round-trips a file with an id column into a new version, leaving version 1 as uploaded", async () => {
    const fileId = await uploaded("people.csv", PEOPLE);
    expect((await versions(fileId)).body.versions).toEqual([
      { id: Number(fileId), version: 1, row_count: 4, created_at: expect.any(String), created_by_job: null }]);

    const account = await csvAccount(fileId);
    expect(account.summary).toBe("CSV file people.csv");
    const { wb, tableId, rel, columns, job } = await downloaded(account.rowId, "people.csv");
    expect(job).toMatchObject({ done: "4", total: "4" });
    // Types inferred from the values; the id column identifies records and is read-only.
    expect(columns.map((c) => [c.name, c.type, c.read_only])).toEqual([
      ["id", "integer", true], ["name", "text", false], ["city", "text", false], ["amount", "numeric", false],
      ["active", "boolean", false], ["joined", "date", false], ["notes", "text", false]]);
    expect((await record(tableId, await recordByRemote(rel, "2"))).values).toEqual({
      id: 2, name: "Smith, John", city: "Lyon", amount: 3, active: false, joined: "2024-02-29", notes: 'said "hi"\nthen left' });
    expect((await record(tableId, await recordByRemote(rel, "3"))).values).toEqual({
      id: 3, name: "Zoë 😀", city: "Kyiv", amount: 7.25, active: true, joined: null, notes: null });

    // An edit, an accepted suggestion, a new record and a deletion.
    await update(tableId, await recordByRemote(rel, "1"), { name: "Ada, Countess of Lovelace" });
    await gql(`mutation($t: BigInt!, $r: BigInt!) { suggestValues(input: { tableId: $t, recordId: $r, values: { city: "Nice \\"centre\\"" } }) { clientMutationId } }`,
      { t: tableId, r: String(await recordByRemote(rel, "2")) });
    await gql(`mutation($t: BigInt!) { acceptSuggestions(input: { tableId: $t }) { result } }`, { t: tableId });
    const created = await createRecord(tableId, { id: 10, name: "Neu\nZeile", amount: 1.5, active: true });
    await deleteRecord(tableId, await recordByRemote(rel, "4"));

    const published = await publish(wb);
    expect(published).toMatchObject({ state: "succeeded", result: { published: 4, failed: 0, conflicts: 0 } });
    expect(await record(tableId, created.id)).toMatchObject({ remote_id: "10", state: { dirty: false, created: false, publish: { state: "published" } } });

    // One version per write call: creates, updates, deletes.
    const listed = (await versions(fileId)).body.versions;
    expect(listed.map((v: { version: number; row_count: number }) => [v.version, v.row_count])).toEqual([[1, 4], [2, 5], [3, 5], [4, 4]]);

    const latest = await download(fileId);
    expect(latest.status).toBe(200);
    expect(latest.headers.get("content-type")).toBe("text/csv; charset=utf-8");
    expect(latest.headers.get("content-disposition")).toBe("attachment; filename=people-v4.csv");
    expect(rowsOf(latest.text)).toEqual([
      ["id", "name", "city", "amount", "active", "joined", "notes"],
      // Cells nobody edited keep their text ("12.50", "TRUE").
      ["1", "Ada, Countess of Lovelace", "Paris", "12.50", "true", "2024-01-31", "plain"],
      ["2", "Smith, John", 'Nice "centre"', "3", "false", "2024-02-29", 'said "hi"\nthen left'],
      ["3", "Zoë 😀", "Kyiv", "7.25", "TRUE", "", ""],
      ["10", "Neu\nZeile", "", "1.5", "true", "", ""],
    ]);
    expect(latest.text).toContain('"Nice ""centre"""');

    const first = await download(fileId, 1);
    expect(first).toMatchObject({ status: 200, text: PEOPLE });
    expect(first.headers.get("content-disposition")).toBe("attachment; filename=people-v1.csv");

    // Downloading the new version again changes nothing in the workbook.
    expect(await refresh(tableId)).toMatchObject({ state: "succeeded", result: { records: 4, removed_deleted_at_source: 0, flagged_deleted_at_source: 0 } });
    expect((await owner().query(`select count(*)::int as n from ${rel} where __dirty`)).rows[0].n).toBe(0);
  });

  it("a file without an id column is identified by row number, stable across deletions and additions", async () => {
    const fileId = await uploaded("fruit.csv", "name,qty\r\napple,1\r\npear,2\r\nplum,3\r\n");
    const { wb, tableId, rel, columns } = await downloaded((await csvAccount(fileId)).rowId, "fruit.csv");
    expect(columns.map((c) => [c.name, c.type, c.read_only])).toEqual([["row_number", "bigint", true], ["name", "text", false], ["qty", "integer", false]]);
    const pear = await recordByRemote(rel, "2");
    expect((await record(tableId, pear)).values).toEqual({ row_number: 2, name: "pear", qty: 2 });

    await deleteRecord(tableId, pear);
    const quince = await createRecord(tableId, { name: "quince", qty: 4 });
    expect(await publish(wb)).toMatchObject({ state: "succeeded", result: { published: 2, failed: 0 } });
    expect((await record(tableId, quince.id)).remote_id).toBe("4");
    const second = await download(fileId);
    // The file's \r\n line endings are kept.
    expect(second.text).toBe("name,qty\r\napple,1\r\nplum,3\r\nquince,4\r\n");

    // Plum is still row 3 (not 2) after pear's deletion, so edits keep reaching the right row.
    await update(tableId, await recordByRemote(rel, "3"), { qty: 30 });
    await deleteRecord(tableId, quince.id);
    expect(await publish(wb)).toMatchObject({ state: "succeeded", result: { published: 2, failed: 0 } });
    expect((await download(fileId)).text).toBe("name,qty\r\napple,1\r\nplum,30\r\n");

    // A deleted row's number is never given again.
    const fig = await createRecord(tableId, { name: "fig", qty: 5 });
    expect(await publish(wb)).toMatchObject({ state: "succeeded" });
    expect((await record(tableId, fig.id)).remote_id).toBe("5");
    expect(await refresh(tableId)).toMatchObject({ state: "succeeded", result: { records: 3, removed_deleted_at_source: 0 } });
    const remote = (await owner().query(`select __remote_id as id, name, qty from ${rel} order by __remote_id`)).rows;
    expect(remote).toEqual([{ id: "1", name: "apple", qty: 1 }, { id: "3", name: "plum", qty: 30 }, { id: "5", name: "fig", qty: 5 }]);
  });

  it("two workbooks on one file: a value changed by the other's publish is a conflict, not overwritten", async () => {
    const fileId = await uploaded("shared.csv", "id,label\n1,one\n2,two\n");
    const account = (await csvAccount(fileId)).rowId;
    const a = await downloaded(account, "shared.csv");
    const b = await downloaded(account, "shared.csv");
    await update(a.tableId, await recordByRemote(a.rel, "1"), { label: "from A" });
    await update(b.tableId, await recordByRemote(b.rel, "1"), { label: "from B" });
    await update(b.tableId, await recordByRemote(b.rel, "2"), { label: "deux" });
    expect(await publish(a.wb)).toMatchObject({ state: "succeeded", result: { published: 1 } });
    expect(await publish(b.wb)).toMatchObject({ state: "partial", result: { published: 1, conflicts: 1, failed: 0 } });
    expect((await record(b.tableId, await recordByRemote(b.rel, "1"))).state.publish).toMatchObject({
      state: "conflict", source_values: { label: "from A" } });
    expect(rowsOf((await download(fileId)).text)).toEqual([["id", "label"], ["1", "from A"], ["2", "deux"]]);
  });

  it("column type overrides change the workbook's column types", async () => {
    const fileId = await uploaded("prices.csv", "sku,price,zip\nA1,5,007\nB2,6,75001\n");
    const set = (types: unknown) => gql(`mutation($f: BigInt!, $c: JSON!) { setCsvColumnTypes(input: { fileId: $f, columnTypes: $c }) { result { columnTypes } } }`,
      { f: fileId, c: types });
    await expect(set({ price: "no_such_type" })).rejects.toThrow(/column price: unknown type no_such_type/);
    expect((await set({ price: "Numeric(10,2)", zip: "text", sku: null })).setCsvColumnTypes.result.columnTypes).toEqual({ price: "numeric(10,2)", zip: "text" });

    const { tableId, rel, columns } = await downloaded((await csvAccount(fileId)).rowId, "prices.csv");
    expect(columns.map((c) => [c.name, c.type])).toEqual([["row_number", "bigint"], ["sku", "text"], ["price", "numeric(10,2)"], ["zip", "text"]]);
    expect((await record(tableId, await recordByRemote(rel, "1"))).values).toMatchObject({ price: 5, zip: "007" });
    expect((await owner().query(`select price::text from ${rel} where __remote_id = '1'`)).rows[0].price).toBe("5.00");

    // An override naming a column the file lacks fails the download, saying which.
    await set({ cost: "numeric" });
    const { job } = await startDownload((await csvAccount(fileId)).rowId, "prices.csv");
    expect(job).toMatchObject({ state: "failed", error: expect.stringMatching(/name columns it does not have: cost/) });
  });
});

describe("csv: malformed files", () => {
  it("a malformed upload is refused, naming the line", async () => {
    const ragged = await upload("ragged.csv", "a,b,c\n1,2,3\n4,5\n6,7,8\n");
    expect(ragged).toMatchObject({ status: 400, body: { error: { code: "invalid_csv", message: "ragged.csv is not valid CSV: line 3 has 2 fields, the header has 3" } } });
    const unclosed = await upload("unclosed.csv", 'a,b\n1,2\n\n3,"never closed\n4,5\n');
    expect(unclosed).toMatchObject({ status: 400, body: { error: { message: expect.stringMatching(/^unclosed\.csv is not valid CSV: line 4: a quoted field is never closed/) } } });
    const header = await upload("header.csv", "a,,c\n1,2,3\n");
    expect(header).toMatchObject({ status: 400, body: { error: { message: "header.csv has an unusable header: column 2 of the header has no name" } } });
    expect(await upload("empty.csv", "")).toMatchObject({ status: 400, body: { error: { message: expect.stringMatching(/empty/) } } });
    // Nothing was stored.
    expect((await owner().query("select count(*)::int as n from snapbase.csv_files where name in ('ragged.csv', 'unclosed.csv', 'header.csv', 'empty.csv')")).rows[0].n).toBe(0);
  });

  it("a malformed file stored without the REST check fails its download, naming the line", async () => {
    // GraphQL stores the text as given (SQL does not parse CSV): the connector refuses it.
    const file = (await gql(`mutation($c: String!) { uploadCsvFile(input: { name: "stray.csv", content: $c }) { result { rowId } } }`,
      { c: 'a,b\n1,2\n3,4"5\n' })).uploadCsvFile.result.rowId;
    const { job } = await startDownload((await csvAccount(String(file))).rowId, "stray.csv");
    expect(job).toMatchObject({ state: "failed", attempts: 1,
      error: expect.stringMatching(/^CSV file stray\.csv \(version 1\) is not valid CSV: line 3: a quote inside an unquoted field/) });
    expect(job.table_id).toBeNull(); // refused before any workbook table was made
  });

  it("refuses bad requests", async () => {
    expect(await upload("x.csv", "a\n1\n", { contentType: "application/octet-stream" })).toMatchObject({ status: 415 });
    expect((await upload("", "a\n1\n")).status).toBe(400);
    expect((await upload("x.csv", "a\n1\n", { as: null })).status).toBe(401); // anonymous: sign in first
    expect((await versions("0")).status).toBe(400);
    expect((await versions("999999999")).status).toBe(404);
    const fileId = await uploaded("small.csv", "a\n1\n");
    expect((await download(fileId, 2)).status).toBe(404);
    expect((await http(server.url, "GET", `/api/v1/csv-files/${fileId}/content?version=first`, { token })).status).toBe(400);
  });
});

describe("csv: files are private", () => {
  it("another user can neither read my file nor make an account of it", async () => {
    const fileId = await uploaded("private.csv", "id,secret\n1,hunter2\n");
    expect(await versions(fileId, bobToken)).toMatchObject({ status: 404, body: { error: { message: `no CSV file ${fileId}` } } });
    expect(await download(fileId, undefined, bobToken)).toMatchObject({ status: 404 });
    expect(await download(fileId, 1, bobToken)).toMatchObject({ status: 404 });
    await expect(csvAccount(fileId, bobToken)).rejects.toThrow(`no CSV file ${fileId}`);
    await expect(gql(`query($f: BigInt!) { csvFileContent(fileId: $f) }`, { f: fileId }, bobToken)).rejects.toThrow(`no CSV file ${fileId}`);
    const seen = (await gql(`{ allCsvFiles { nodes { rowId } } }`, {}, bobToken)).allCsvFiles.nodes;
    expect(seen).not.toContainEqual({ rowId: fileId });
    expect((await gql(`{ allCsvFiles { nodes { rowId } } }`)).allCsvFiles.nodes).toContainEqual({ rowId: fileId });
  });
});
