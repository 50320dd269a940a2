// CSV import: streamed upload, preview with mapping, import as records or as
// suggestions, bad rows with line numbers, and malformed files that stage nothing.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { createUser, graphql, graphqlData, http, owner, startTestServer, TEST_PASSWORD, type TestUser } from "./helpers.ts";

let server: RunningServer;
let alice: TestUser;
let token: string;

const gql = async (query: string, variables: Record<string, unknown> = {}) => {
  return graphqlData(server.url, query, variables, token);
};

async function upload(tableId: string, body: string | Buffer) {
  const res = await fetch(`${server.url}/api/v1/workbook-tables/${tableId}/imports`, {
    method: "POST", headers: { authorization: `Bearer ${token}`, "content-type": "text/csv" }, body: typeof body === "string" ? body : new Uint8Array(body),
  });
  return { status: res.status, body: await res.json() };
}

async function table() {
  const wb = (await gql(`mutation { createWorkbook(input: { name: "Imports" }) { result { rowId } } }`)).createWorkbook.result.rowId;
  const t = (await gql(`mutation($w: BigInt!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: "Stock", columns: $c }) { result { rowId } } }`,
    { w: wb, c: [{ name: "sku", type: "text" }, { name: "qty", type: "integer" }, { name: "price", type: "numeric(10,2)" }] })).addWorkbookTable.result.rowId;
  return String(t);
}
const records = async (t: string) => (await gql(`query($t: BigInt!) { workbookRecords(tableId: $t, pageSize: 100) }`, { t })).workbookRecords.records;
const importCsv = async (importId: string, args: Record<string, unknown>) =>
  (await gql(`mutation($i: BigInt!, $m: JSON, $mode: String, $k: String, $s: Boolean) { importCsv(input: { importId: $i, mapping: $m, mode: $mode, keyColumn: $k, skipBadRows: $s }) { result } }`,
    { i: importId, m: args.mapping ?? null, mode: args.mode ?? "records", k: args.key ?? null, s: args.skip ?? false })).importCsv.result;
/** import_csv with the options given (others left to their defaults). */
const importWith = async (importId: string, options: Record<string, unknown>) =>
  (await gql(`mutation($input: ImportCsvInput!) { importCsv(input: $input) { result } }`, { input: { importId, ...options } })).importCsv.result;
const previewWith = async (importId: string, options: Record<string, unknown>) =>
  (await gql(`query($i: BigInt!, $mode: String, $k: String, $u: Boolean, $e: String) {
     csvImportPreview(importId: $i, mode: $mode, keyColumn: $k, skipUnchanged: $u, emptyCells: $e) }`,
    { i: importId, mode: options.mode ?? null, k: options.keyColumn ?? null, u: options.skipUnchanged ?? null, e: options.emptyCells ?? null })).csvImportPreview;

beforeAll(async () => {
  server = await startTestServer();
  alice = await createUser("editor", "alice");
  token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: alice.email, password: TEST_PASSWORD } })).body.token;
});
afterAll(async () => {
  await server?.close();
});

describe("CSV import", () => {
  it("previews with inferred types and failing rows, then imports with a mapping as new records", async () => {
    const t = await table();
    const csv = 'SKU,Quantity,price,Note\nA-1,5,1.50,"first, with comma"\nB-2,seven,2.00,second\nC-3,,3.25,"multi\nline"\n';
    const up = await upload(t, csv);
    expect(up.status).toBe(201);
    expect(up.body.import).toMatchObject({ header: ["SKU", "Quantity", "price", "Note"], row_count: 3, state: "staged" });
    // By default headers map to same-named columns (case-insensitive): SKU → sku, price → price.
    expect(up.body.preview.mapping).toEqual({ SKU: "sku", price: "price" });
    expect(up.body.preview.inferred_types).toMatchObject({ SKU: "text", price: "numeric", Note: "text" });
    expect(up.body.preview.sample[0]).toEqual({ line: 2, cells: ["A-1", "5", "1.50", "first, with comma"] });

    const mapping = { SKU: "sku", Quantity: "qty", price: "price", Note: { new_scratch: "note", type: "text" } };
    const preview = (await gql(`query($i: BigInt!, $m: JSON) { csvImportPreview(importId: $i, mapping: $m) }`, { i: up.body.import.id, m: mapping })).csvImportPreview;
    expect(preview.problems).toEqual([{ line: 3, column: "qty", value: "seven", error: 'invalid input syntax for type integer: "seven"' }]);

    // A bad row and no permission to skip: nothing is imported, not even the scratch column.
    const refused = await importCsv(up.body.import.id, { mapping });
    expect(refused).toMatchObject({ ok: false, created: 0, errors: [{ line: 3, error: expect.stringMatching(/column qty/) }] });
    expect(await records(t)).toEqual([]);
    expect((await owner().query("select columns from snapbase.workbook_tables where id = $1", [t])).rows[0].columns).toHaveLength(3);

    const done = await importCsv(up.body.import.id, { mapping, skip: true });
    expect(done).toMatchObject({ ok: true, processed: 3, created: 2, skipped: 1, errors: [{ line: 3 }] });
    const rows = (await records(t)).map((r: any) => r.values);
    expect(rows).toEqual([
      { sku: "A-1", qty: 5, price: 1.5, note: "first, with comma" },
      { sku: "C-3", qty: null, price: 3.25, note: "multi\nline" },
    ]);
    expect((await records(t))[0].state).toMatchObject({ created: true, dirty: true });
    const again = await graphql(server.url, `mutation($i: BigInt!) { importCsv(input: { importId: $i }) { result } }`, { i: up.body.import.id }, token);
    expect(again.body.errors?.[0]?.message).toMatch(/imported already/);
  });

  it("imports as suggestions on records matched by a key column, reporting unmatched lines", async () => {
    const t = await table();
    await gql(`mutation($t: BigInt!, $ops: JSON!) { bulkEditRecords(input: { tableId: $t, operations: $ops }) { result } }`,
      { t, ops: ["A", "B", "C"].map((sku, i) => ({ op: "create", values: { sku, qty: i, price: 1 } })) });
    // Line 5 does not fit (qty), line 4 matches nothing: both are reported, the rest imported.
    const up = await upload(t, "sku,qty,price\nA,10,9.99\nC,30,\nZ,1,1\nB,lots,2\n");
    // Empty cells suggest NULL only when asked to (empty_cells => 'null').
    const result = await importWith(up.body.import.id, { mode: "suggestions", keyColumn: "sku", skipBadRows: true, emptyCells: "null" });
    expect(result).toMatchObject({
      ok: true, processed: 4, suggested: 2, skipped: 2,
      errors: [{ line: 4, error: "no record with sku = Z" }, { line: 5, error: expect.stringMatching(/column qty: invalid input syntax for type integer/) }],
    });
    const [a, b, c] = await records(t);
    expect(a.values.qty).toBe(0); // a suggestion, not a value
    expect(a.suggested).toMatchObject({ qty: { value: 10, by: alice.email }, price: { value: 9.99 } });
    expect(b.suggested).toEqual({});
    expect(c.suggested).toMatchObject({ qty: { value: 30 }, price: { value: null } });
  });

  it("suggests neither values equal to the current ones nor empty cells, unless told to; the preview says so first", async () => {
    const t = await table();
    await gql(`mutation($t: BigInt!, $ops: JSON!) { bulkEditRecords(input: { tableId: $t, operations: $ops }) { result } }`,
      { t, ops: [{ op: "create", values: { sku: "A", qty: 1, price: 1 } }, { op: "create", values: { sku: "B", qty: 2, price: 2 } },
                 { op: "create", values: { sku: "C", qty: null, price: 3 } }] });
    // A: qty as it is (1.0 is 1), price new. B: qty empty, price as it is. C: qty empty (and null already), price as it is.
    const csv = "sku,qty,price\nA,1,1.25\nB,,2.00\nC,,3\n";
    const first = (await upload(t, csv)).body.import.id;

    const defaults = await previewWith(first, { mode: "suggestions", keyColumn: "sku" });
    expect(defaults.options).toEqual({ mode: "suggestions", key_column: "sku", skip_unchanged: true, empty_cells: "skip" });
    const expected = { suggested: 1, suggested_cells: 1, unchanged_cells: 3, empty_cells_skipped: 2, unmatched: 0, bad_rows: 0 };
    expect(defaults.outcome).toEqual(expected);
    expect(await importWith(first, { mode: "suggestions", keyColumn: "sku" })).toMatchObject({ ok: true, processed: 3, ...expected, suggested: 1 });
    const [a, b, c] = await records(t);
    expect(a.suggested).toEqual({ price: { value: 1.25, by: alice.email, at: expect.any(String) } });
    expect(b.suggested).toEqual({});
    expect(c.suggested).toEqual({});

    // Everything as the file has it: equal values are suggested, empty cells suggest NULL.
    const second = (await upload(t, csv)).body.import.id;
    const all = { mode: "suggestions", keyColumn: "sku", skipUnchanged: false, emptyCells: "null" };
    const everything = { suggested: 3, suggested_cells: 6, unchanged_cells: 0, empty_cells_skipped: 0, unmatched: 0, bad_rows: 0 };
    expect((await previewWith(second, all)).outcome).toEqual(everything);
    expect(await importWith(second, all)).toMatchObject({ ok: true, ...everything });
    const [a2, b2, c2] = await records(t);
    expect(a2.suggested).toMatchObject({ qty: { value: 1 }, price: { value: 1.25 } });
    expect(b2.suggested).toMatchObject({ qty: { value: null }, price: { value: 2 } });
    expect(c2.suggested).toMatchObject({ qty: { value: null }, price: { value: 3 } });

    // NULL over a NULL is no change either: with skip_unchanged, C's empty qty suggests nothing.
    const third = (await upload(t, "sku,qty\nB,\nC,\n")).body.import.id;
    expect((await previewWith(third, { mode: "suggestions", keyColumn: "sku", emptyCells: "null" })).outcome)
      .toEqual({ suggested: 1, suggested_cells: 1, unchanged_cells: 1, empty_cells_skipped: 0, unmatched: 0, bad_rows: 0 });

    // Records mode: the preview counts what would be created; bad options are refused by name.
    expect((await previewWith(third, {})).outcome).toEqual({ created: 2, bad_rows: 0 });
    await expect(importWith(third, { mode: "suggestions", keyColumn: "sku", emptyCells: "zero" })).rejects.toThrow(/empty_cells must be skip or null/);
    await expect(previewWith(third, { mode: "suggestions", keyColumn: "sku", emptyCells: "zero" })).rejects.toThrow(/empty_cells must be skip or null/);
  });

  it("refuses hostile or wrong options by name, in the preview and the import, and imports nothing", async () => {
    const t = await table();
    await gql(`mutation($t: BigInt!, $ops: JSON!) { bulkEditRecords(input: { tableId: $t, operations: $ops }) { result } }`,
      { t, ops: [{ op: "create", values: { sku: "A", qty: 1, price: 1 } }] });
    const importId = (await upload(t, "sku,qty\nA,5\n")).body.import.id;
    const attempts: [Record<string, unknown>, RegExp][] = [
      [{ mode: "suggestions", keyColumn: 'sku"; drop table snapbase.users; --' }, /key_column must be a table column the mapping fills/],
      [{ mode: "suggestions", keyColumn: "sku) or (true" }, /key_column must be a table column the mapping fills/],
      [{ mode: "suggestions", keyColumn: "__id" }, /key_column must be a table column the mapping fills/],
      [{ mode: "suggestions", keyColumn: "xmin" }, /key_column must be a table column the mapping fills/],
      [{ mode: "suggestions", keyColumn: "price" }, /key_column must be a table column the mapping fills \(got price\)/], // not in the file
      [{ mode: "suggestions", keyColumn: "SKU" }, /key_column must be a table column the mapping fills/], // names are exact
      [{ mode: "suggestions" }, /key_column must be a table column the mapping fills \(got null\)/],
      [{ mode: "suggestions", keyColumn: "sku", emptyCells: "null'); select pg_sleep(1); --" }, /empty_cells must be skip or null/],
      [{ mode: "suggestions", keyColumn: "sku", emptyCells: "NULL" }, /empty_cells must be skip or null \(got NULL\)/],
      [{ mode: "suggestions", keyColumn: "sku", emptyCells: "" }, /empty_cells must be skip or null/],
      [{ mode: "records; drop table snapbase.users" }, /mode must be records or suggestions/],
    ];
    for (const [options, expected] of attempts) {
      for (const [label, run] of [["preview", () => previewWith(importId, options)], ["import", () => importWith(importId, options)]] as const) {
        const error = await run().then(() => null, (e: Error) => e.message);
        expect(error, `${label} ${JSON.stringify(options)}`).toMatch(expected);
      }
      const res = await graphql(server.url, `mutation($input: ImportCsvInput!) { importCsv(input: $input) { result } }`, { input: { importId, ...options } }, token);
      expect(res.body.errors?.[0]?.extensions?.code).toBe("22023");
    }
    // Nothing happened: the import is still staged, the record has no suggestion.
    expect((await owner().query("select state from snapbase.csv_imports where id = $1", [importId])).rows[0].state).toBe("staged");
    expect((await records(t))[0]).toMatchObject({ values: { sku: "A", qty: 1 }, suggested: {} });
    // Rows staged through GraphQL are checked for their shape.
    for (const rows of [{}, [{ line: "2; drop", cells: ["a"] }], [{ line: 2, cells: [1] }], [{ line: 2, cells: "a,b" }], [["a", "b"]]]) {
      const res = await graphql(server.url, `mutation($i: BigInt!, $r: JSON!) { stageCsvRows(input: { importId: $i, rows: $r }) { clientMutationId } }`, { i: importId, r: rows }, token);
      expect(res.body.errors?.[0], JSON.stringify(rows)).toMatchObject({ message: expect.stringMatching(/rows must be/), extensions: { code: "22023" } });
    }
    expect((await owner().query("select row_count::int as n from snapbase.csv_imports where id = $1", [importId])).rows[0].n).toBe(1);
  });

  it("says nothing about the outcome when it cannot tell cheaply: nothing mapped, or more than 50 failing cells", async () => {
    const t = await table();
    const unmapped = (await upload(t, "a,b\n1,2\n")).body;
    expect(unmapped.preview).toMatchObject({ mapping: {}, problems: [], outcome: null });
    const bad = (await upload(t, `sku,qty\n${Array.from({ length: 60 }, (_, i) => `s${i},x${i}\n`).join("")}`)).body;
    expect(bad.preview.problems).toHaveLength(50);
    expect(bad.preview.outcome).toBeNull();
    const few = (await upload(t, `sku,qty\n${Array.from({ length: 60 }, (_, i) => `s${i},${i % 20 ? i : "x"}\n`).join("")}`)).body;
    expect(few.preview.problems.map((p: { line: number }) => p.line)).toEqual([2, 22, 42]);
    expect(few.preview.outcome).toEqual({ created: 57, bad_rows: 3 });
    expect(await importWith(few.import.id, { skipBadRows: true })).toMatchObject({ ok: true, created: 57, bad_rows: 3, skipped: 3 });
  });

  it("stages rows through GraphQL alone, for clients that hold rows rather than a file", async () => {
    const t = await table();
    const started = await gql(`mutation($t: BigInt!) { startCsvImport(input: { tableId: $t, header: ["sku", "qty"] }) { result { rowId } } }`, { t });
    const importId = started.startCsvImport.result.rowId;
    for (const rows of [[{ line: 2, cells: ["A", "1"] }, { line: 3, cells: ["B", "2"] }], [{ line: 4, cells: ["C", "three"] }]]) {
      await gql(`mutation($i: BigInt!, $r: JSON!) { stageCsvRows(input: { importId: $i, rows: $r }) { clientMutationId } }`, { i: importId, r: rows });
    }
    const preview = (await gql(`query($i: BigInt!) { csvImportPreview(importId: $i) }`, { i: importId })).csvImportPreview;
    expect(preview).toMatchObject({ row_count: 3, problems: [{ line: 4, column: "qty", value: "three" }] });
    expect(await importCsv(importId, { skip: true })).toMatchObject({ ok: true, created: 2, skipped: 1 });
    expect((await records(t)).map((r: any) => r.values.sku)).toEqual(["A", "B"]);
  });

  it("reports malformed files with their line and stages nothing", async () => {
    const t = await table();
    const before = (await owner().query("select count(*)::int as n from snapbase.csv_imports")).rows[0].n;
    const ragged = await upload(t, "sku,qty\nA,1\nB,2,extra\n");
    expect(ragged.status).toBe(400);
    expect(ragged.body.error).toEqual({ code: "malformed_csv", message: "the file is not valid CSV: line 3 has 3 fields, the header has 2" });
    // Found after thousands of rows have gone into COPY: still a 400, still nothing staged.
    const late = await upload(t, `sku,qty\n${Array.from({ length: 3000 }, (_, i) => `r${i},${i}\n`).join("")}B,2,extra\n`);
    expect(late.status).toBe(400);
    expect(late.body.error.message).toMatch(/line 3002/);
    const unterminated = await upload(t, 'sku,qty\nA,"1\nB,2\n');
    expect(unterminated.status).toBe(400);
    expect(unterminated.body.error.message).toMatch(/^the file is not valid CSV: line 2: a quoted field is never closed/);
    const strayQuote = await upload(t, 'sku,qty\nA,5" screen\n');
    expect(strayQuote.status).toBe(400);
    expect(strayQuote.body.error.message).toMatch(/^the file is not valid CSV: line 2: a quote inside an unquoted field/);
    const latin1 = await upload(t, Buffer.concat([Buffer.from("sku,qty\ncaf"), Buffer.from([0xe9]), Buffer.from(",1\n")]));
    expect(latin1.status).toBe(400);
    expect(latin1.body.error.message).toMatch(/not valid UTF-8/);
    expect((await upload(t, "")).status).toBe(400);
    expect((await owner().query("select count(*)::int as n from snapbase.csv_imports")).rows[0].n).toBe(before);
  });

  it("stages every field exactly as the file has it, however it needs escaping, over many batches", async () => {
    const t = await table();
    const awkward = ["NULL", "", "{a,b}", "back\\slash \\N", "tab\there", 'say "hi"', "line\nbreak", "é 🐘", " padded ", "\\.", "carriage\rreturn"];
    const quote = (v: string) => `"${v.replace(/"/g, '""')}"`;
    const lines = ["sku,qty", ...awkward.map((v, i) => `${quote(v)},${i}`)];
    for (let i = 0; i < 2500; i++) lines.push(`row ${i},${i}`);
    const up = await upload(t, lines.join("\n") + "\n");
    expect(up.status).toBe(201);
    expect(up.body.import.row_count).toBe(awkward.length + 2500);
    expect(up.body.preview.problems).toEqual([]); // every qty is an integer
    const staged = (await owner().query("select line, cells from snapbase_private.csv_import_rows where import_id = $1 order by line", [up.body.import.id])).rows;
    expect(staged.slice(0, awkward.length).map((r) => r.cells[0])).toEqual(awkward);
    // A record's line is the physical line where it ends: the field with a line break spans two.
    expect(staged.slice(0, 8).map((r) => r.line)).toEqual([2, 3, 4, 5, 6, 7, 9, 10]);
    // The header, then two fields that hold a line break (csv-parse counts a lone CR as one too).
    expect(staged[staged.length - 1]).toEqual({ line: 1 + awkward.length + 2 + 2500, cells: ["row 2499", "2499"] });
    // Removing the table removes its staged imports, rows included.
    await gql(`mutation($t: BigInt!) { removeWorkbookTable(input: { tableId: $t }) { clientMutationId } }`, { t });
    const left = await owner().query("select count(*)::int as n from snapbase_private.csv_import_rows where import_id = $1", [up.body.import.id]);
    expect(left.rows[0].n).toBe(0);
  });
});
