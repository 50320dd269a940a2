// CSV type inference: one set of rules (snapbase_private.csv_value_kinds), used by the
// csv connector (an uploaded file downloaded into a workbook by a real worker) and by
// the import preview, over every row of the file.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { startWorker, type Worker } from "../src/worker.ts";
import { CsvTypeRules } from "../src/connectors/csv-inference.ts";
import { asOwner, createUser, db, graphqlData, http, owner, settled, startTestServer, TEST_CREDENTIALS_KEY, TEST_PASSWORD } from "./helpers.ts";

let server: RunningServer;
let worker: Worker;
let token: string;

const gql = async (query: string, variables: Record<string, unknown> = {}) => {
  return graphqlData(server.url, query, variables, token);
};

beforeAll(async () => {
  server = await startTestServer();
  worker = await startWorker({ ownerUrl: db.ownerUrl, concurrency: 1, credentialsKey: TEST_CREDENTIALS_KEY });
  const user = await createUser("editor", "csv-types");
  token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: user.email, password: TEST_PASSWORD } })).body.token;
});

afterAll(async () => {
  await worker?.stop();
  await server?.close();
});

// Each column and the type both paths must infer for it. Rows past the first
// thousand decide too: `late` holds integers until row 1,501.
const COLUMNS: [name: string, values: (row: number) => string, type: string][] = [
  ["zip", (r) => ["007", "75001", "0"][r % 3]!, "text"],                                // a leading zero is an identifier, not 7
  ["phone", (r) => String(49_151_000_000 + r), "bigint"],                               // 11 digits: past integer, within bigint
  ["huge", (r) => `1234567890123456789${r % 10}`, "numeric"],                           // 20 digits: past bigint
  ["small", (r) => String(r % 7 - 3), "integer"],
  ["limit", (r) => (r % 2 ? "2147483647" : "-2147483648"), "integer"],                  // integer's own bounds
  ["over", (r) => (r % 2 ? "2147483648" : "1"), "bigint"],                              // one past them
  ["amount", (r) => (r % 2 ? "1.50" : "2"), "numeric"],
  ["day", (r) => (r % 2 ? "2024-02-29" : "2023-12-31"), "date"],                        // a leap day exists
  ["bad_day", (r) => (r === 2 ? "2024-02-30" : "2024-02-28"), "text"],                 // 30 February does not
  ["leap", (r) => (r === 3 ? "2023-02-29" : "2024-01-01"), "text"],                    // nor 29 February 2023
  ["flag", (r) => ["true", "FALSE", "True"][r % 3]!, "boolean"],
  ["at", (r) => (r % 2 ? "2024-01-01T10:00:00Z" : "2024-01-02 11:30:15.123+02:00"), "timestamptz"],
  ["local", (r) => (r % 2 ? "2024-01-01 10:00" : "2024-01-02"), "timestamp"],          // no zone: none is invented
  ["mixed", (r) => (r % 2 ? "2024-01-01 10:00" : "2024-01-01T10:00Z"), "text"],        // with and without a zone
  ["hour", (r) => (r === 5 ? "2024-01-01 24:00" : "2024-01-01 23:59"), "text"],
  ["padded", (r) => (r === 7 ? " 5" : "6"), "text"],                                    // spaces would be lost
  ["blank", () => "", "text"],                                                          // no value at all
  ["some", (r) => (r % 4 ? "" : "12"), "integer"],                                      // empty cells decide nothing
  ["spaces", (r) => (r % 4 ? "" : "   "), "text"],                                      // spaces are a value
  ["plus", (r) => (r === 9 ? "+5" : "5"), "text"],
  ["late", (r) => (r === 1501 ? "x" : String(r)), "text"],                             // row 1,501 decides
  ["many", (r) => String(r), "integer"],
];
const EXPECTED = Object.fromEntries(COLUMNS.map(([name, , type]) => [name, type]));
const ROWS = 1600;
const quote = (v: string) => (/[",\n\r]/.test(v) ? `"${v.replace(/"/g, '""')}"` : v);
const FILE = [COLUMNS.map(([name]) => name).join(","),
  ...Array.from({ length: ROWS }, (_, i) => COLUMNS.map(([, value]) => quote(value(i + 1))).join(","))].join("\n") + "\n";

/** Canonical spellings, as workbook columns store them. */
const CANONICAL: Record<string, string> = { timestamp: "timestamp without time zone", timestamptz: "timestamp with time zone" };

describe("CSV type inference", () => {
  it("the import preview infers every column from all of its rows", async () => {
    const wb = (await gql(`mutation { createWorkbook(input: { name: "Types" }) { result { rowId } } }`)).createWorkbook.result.rowId;
    const t = (await gql(`mutation($w: BigInt!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: "T", columns: $c }) { result { rowId } } }`,
      { w: wb, c: [{ name: "zip", type: "text" }] })).addWorkbookTable.result.rowId;
    const res = await fetch(`${server.url}/api/v1/workbook-tables/${t}/imports`, {
      method: "POST", headers: { authorization: `Bearer ${token}`, "content-type": "text/csv" }, body: FILE });
    const up = await res.json();
    expect(res.status, JSON.stringify(up)).toBe(201);
    expect(up.preview.inferred_types).toEqual(EXPECTED);
  });

  it("the csv connector infers the same types for the same file", async () => {
    const res = await fetch(`${server.url}/api/v1/csv-files?name=types.csv`, {
      method: "POST", headers: { authorization: `Bearer ${token}`, "content-type": "text/csv" }, body: FILE });
    const up = await res.json();
    expect(res.status, JSON.stringify(up)).toBe(201);
    const account = (await gql(`mutation($c: JSON!) { createConnectorAccount(input: { kind: "csv", name: "types", credentials: $c }) { result { rowId } } }`,
      { c: { file_id: Number(up.file.id) } })).createConnectorAccount.result.rowId;
    const wb = (await gql(`mutation($a: BigInt!) { createWorkbookFromRemote(input: { name: "Types", accountId: $a, remoteTables: ["types.csv"] }) { result { rowId } } }`,
      { a: account })).createWorkbookFromRemote.result.rowId;
    const { rows: [job] } = await owner().query("select id from snapbase.jobs where workbook_id = $1", [wb]);
    const done = await settled(job.id, 60_000);
    expect(done, JSON.stringify(done)).toMatchObject({ state: "succeeded", total: String(ROWS) });
    const { rows: [table] } = await owner().query("select columns from snapbase.workbook_tables where id = $1", [done.table_id]);
    const types = Object.fromEntries((table.columns as { name: string; type: string }[]).filter((c) => c.name !== "row_number").map((c) => [c.name, c.type]));
    expect(types).toEqual(Object.fromEntries(Object.entries(EXPECTED).map(([name, type]) => [name, CANONICAL[type] ?? type])));
  });

  it("a workbook downloaded under other types fails its refresh naming the column, until set_csv_column_types pins it", async () => {
    const res = await fetch(`${server.url}/api/v1/csv-files?name=times.csv`, {
      method: "POST", headers: { authorization: `Bearer ${token}`, "content-type": "text/csv" }, body: "id,at\n1,2024-01-01 10:00\n2,2024-01-02 11:00\n" });
    const fileId = (await res.json()).file.id;
    const account = (await gql(`mutation($c: JSON!) { createConnectorAccount(input: { kind: "csv", name: "times", credentials: $c }) { result { rowId } } }`,
      { c: { file_id: Number(fileId) } })).createConnectorAccount.result.rowId;
    const wb = (await gql(`mutation($a: BigInt!) { createWorkbookFromRemote(input: { name: "Times", accountId: $a, remoteTables: ["times.csv"] }) { result { rowId } } }`,
      { a: account })).createWorkbookFromRemote.result.rowId;
    const { rows: [job] } = await owner().query("select id from snapbase.jobs where workbook_id = $1", [wb]);
    const tableId = (await settled(job.id, 60_000)).table_id;
    // As the earlier rules downloaded it: times without a zone as timestamptz.
    const { rows: [t] } = await owner().query("select snapbase_private.table_rel(t) as rel from snapbase.workbook_tables t where id = $1", [tableId]);
    await owner().query(`alter table ${t.rel} alter column at type timestamptz;
      update snapbase.workbook_tables set columns = (select jsonb_agg(case when c ->> 'name' = 'at' then c || '{"type": "timestamp with time zone"}' else c end order by o)
        from jsonb_array_elements(columns) with ordinality e(c, o)) where id = ${Number(tableId)}`);
    const refresh = async () => settled((await gql(`mutation($t: BigInt!) { refreshWorkbookTable(input: { tableId: $t }) { result { rowId } } }`, { t: tableId }))
      .refreshWorkbookTable.result.rowId, 60_000);
    expect(await refresh()).toMatchObject({ state: "failed", error: expect.stringMatching(/retyped: at/) });
    await gql(`mutation($f: BigInt!) { setCsvColumnTypes(input: { fileId: $f, columnTypes: { at: "timestamptz" } }) { clientMutationId } }`, { f: fileId });
    expect(await refresh()).toMatchObject({ state: "succeeded" });
  });

  it("a value the rules give a type always converts to it", async () => {
    const values = ["0", "-0", "007", "5", "-5", "2147483647", "2147483648", "-2147483648", "-2147483649", "9223372036854775807",
      "9223372036854775808", "-9223372036854775808", "99999999999999999999999", "1.5", "-0.25", "1.", ".5", "1e5", "1,000", "NaN",
      "Infinity", "true", "FALSE", "t", "yes", "2024-02-29", "2023-02-29", "2024-04-31", "2024-13-01", "0000-01-01", "0001-01-01",
      "9999-12-31", "2024-1-1", "2024-01-01T00:00", "2024-01-01t00:00z", "2024-01-01 23:59:59.999999", "2024-01-01 23:59:59.9999999",
      "2024-01-01 23:60", "2024-01-01 24:00", "2024-01-01 12:00+15:59", "2024-01-01 12:00+16:00", "2024-01-01 12:00-0530",
      "2024-01-01 12:00+05", "2024-01-01 12:00 +05", "2024-01-01 12:00:60", "today", "epoch", " 1", "1 ", "", " ", "é"];
    const { rows } = await owner().query(
      `select v, snapbase_private.csv_value_kinds(v) as kinds, snapbase_private.csv_kinds_type(snapbase_private.csv_value_kinds(v)) as type
         from unnest($1::text[]) v`, [values]);
    const types = ["boolean", "integer", "bigint", "numeric", "date", "timestamp", "timestamptz"];
    for (const { v, kinds, type } of rows) {
      for (const [bit, name] of types.entries()) {
        if (!(kinds & (1 << bit))) continue;
        // Converts without an error, in any session time zone and date style.
        const cast = await owner().query(`select $1::${name}::text as x`, [v]).then(() => "ok", (e: Error) => e.message);
        expect(cast, `${JSON.stringify(v)} as ${name}`).toBe("ok");
      }
      if (v === "") expect(kinds).toBeNull();
      else expect(type, JSON.stringify(v)).toBe(types.find((_, bit) => kinds & (1 << bit)) ?? "text");
    }
    const typeOf = Object.fromEntries(rows.map((r) => [r.v, r.type]));
    expect(typeOf).toMatchObject({
      "0": "integer", "-0": "text", "007": "text", "2147483648": "bigint", "-9223372036854775808": "bigint", "9223372036854775808": "numeric",
      "1.": "text", ".5": "text", "1e5": "text", "NaN": "text", "t": "text", "2023-02-29": "text", "0000-01-01": "text", "0001-01-01": "date",
      "2024-01-01t00:00z": "timestamptz", "2024-01-01 23:59:59.9999999": "text", "2024-01-01 12:00+16:00": "text", "2024-01-01 12:00 +05": "text",
      " 1": "text", " ": "text", "": "text" });
  });

  it("the server reads the rules exactly as SQL does, cell by cell and column by column", async () => {
    const rules = await CsvTypeRules.load(owner());
    // Near misses of every form: each sample with one character changed, dropped or doubled.
    const samples = ["0", "7", "-12", "2147483647", "-2147483648", "9223372036854775807", "12345678901234567890", "1.50", "-0.25",
      "true", "False", "2024-02-29", "2023-02-28", "2000-02-29", "1900-02-28", "2024-04-30", "2024-12-31 23:59", "2024-01-01T00:00:00",
      "2024-01-01 12:30:45.123456", "2024-01-01T10:00Z", "2024-01-01 10:00:00+05:30", "2024-01-01 10:00-0800", "2024-06-30 10:00+15"];
    const alphabet = "0123456789-+:.TtZz eE ";
    let seed = 13;
    const random = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
    const values = new Set(samples);
    for (const sample of samples) {
      for (let k = 0; k < 60; k++) {
        const at = random(sample.length + 1);
        const ch = alphabet[random(alphabet.length)]!;
        const variant = [sample.slice(0, at) + ch + sample.slice(at + 1), sample.slice(0, at) + sample.slice(at + 1),
          sample.slice(0, at) + ch + sample.slice(at)][random(3)]!;
        values.add(variant);
      }
    }
    const list = [...values];
    const { rows } = await owner().query("select v, snapbase_private.csv_value_kinds(v) as kinds from unnest($1::text[]) v", [list]);
    const mismatches = rows.filter((r) => rules.kinds(r.v) !== r.kinds).map((r) => ({ value: r.v, sql: r.kinds, js: rules.kinds(r.v) }));
    expect(mismatches).toEqual([]);

    // The chains: a cell that fits a type fits every wider one of its chain, and no cell fits two chains.
    const chains = [[0], [1, 2, 3], [4, 5], [6]];
    for (const { v, kinds } of rows) {
      if (!kinds) continue;
      const holding = chains.filter((chain) => chain.some((bit) => kinds & (1 << bit)));
      expect(holding, JSON.stringify(v)).toHaveLength(1);
      const chain = holding[0]!;
      const first = chain.findIndex((bit) => kinds & (1 << bit));
      expect(chain.slice(first).every((bit) => kinds & (1 << bit)), JSON.stringify(v)).toBe(true);
    }

    // Columns: the same values in random columns, staged as an upload stages them.
    const columns = Array.from({ length: 40 }, (_, c) => {
      const base = list.filter((_, i) => i % 40 === c);
      const pure = list.filter((v) => rules.kinds(v) === rules.kinds(base[0]!));
      return c % 2 ? base : [...pure.slice(0, 30), ...(c % 4 ? [] : [base[1]!]), "", ""];
    });
    const height = Math.max(...columns.map((c) => c.length));
    const rowsOf = Array.from({ length: height }, (_, r) => columns.map((c) => c[r] ?? ""));
    const tally = rules.columns(columns.length);
    for (const cells of rowsOf) tally.add(cells);
    const sqlKinds = await asOwner(async (c) => {
      await c.query("create temporary table snapbase_csv_staging (line integer not null, cells text[] not null) on commit drop");
      await c.query("insert into snapbase_csv_staging select i, r from unnest($1::text[]) with ordinality as u(j, i) cross join lateral (select array(select jsonb_array_elements_text(j::jsonb))) x(r)",
        [rowsOf.map((cells) => JSON.stringify(cells))]);
      return (await c.query("select snapbase_private.csv_column_kinds($1) as k", [columns.length])).rows[0].k;
    });
    expect(tally.kinds()).toEqual(sqlKinds);
    expect(new Set(tally.types()).size).toBeGreaterThan(3);
  });
});
