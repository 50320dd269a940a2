// CSV export of workbook tables and snapshots, checked by loading the files back
// with PostgreSQL's own COPY ... CSV HEADER; public share links.
import { execFile } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { createUser, db, graphql, graphqlData, http, owner, startTestServer, TEST_PASSWORD, type TestUser } from "./helpers.ts";

let server: RunningServer;
let alice: TestUser, bob: TestUser;
let token: string;
let dir: string;

const COLUMNS = [
  { name: "id", type: "integer" }, { name: "note", type: "text" }, { name: "price", type: "numeric(12,2)" },
  { name: "tags", type: "text[]" }, { name: "doc", type: "jsonb" }, { name: "at", type: "timestamptz" },
];
const VALUES = [
  { id: 1, note: "plain", price: "1.50", tags: ["a", "b"], doc: { k: 1 }, at: "2024-02-29T23:59:59.123456Z" },
  { id: 2, note: 'comma, "quotes" and\nnewline', price: "-0.01", tags: ["x,y", 'q"'], doc: { s: "é 🐘" }, at: null },
  { id: 3, note: "", price: null, tags: [], doc: null, at: "2024-01-01T00:00:00Z" },
  { id: 4, note: null, price: "12345678.90", tags: null, doc: [1, "two"], at: "1999-12-31T23:00:00+05:30" },
];

const gql = async (query: string, variables: Record<string, unknown> = {}, as = token) => {
  return graphqlData(server.url, query, variables, as);
};

/** GETs a file; `auth` null sends no token. */
async function download(pathAndQuery: string, auth: string | null = token): Promise<{ status: number; type: string | null; text: string }> {
  const res = await fetch(server.url + pathAndQuery, { headers: auth ? { authorization: `Bearer ${auth}` } : {} });
  return { status: res.status, type: res.headers.get("content-type"), text: await res.text() };
}

/** Loads a CSV file with COPY ... CSV HEADER (psql's \copy) into a new table; returns its rows as text. */
async function copyBack(csv: string, table: string): Promise<string[]> {
  const file = path.join(dir, `${table}.csv`);
  await writeFile(file, csv);
  await owner().query(`drop table if exists ${table}; create table ${table} (${COLUMNS.map((c) => `${c.name} ${c.type}`).join(", ")})`);
  await promisify(execFile)("psql", ["-X", "-v", "ON_ERROR_STOP=1", "-d", db.ownerUrl, "-c", `\\copy ${table} from '${file}' csv header`]);
  return (await owner().query(`select t::text as r from ${table} t order by id`)).rows.map((r) => r.r);
}

async function workbookTable() {
  const wb = (await gql(`mutation { createWorkbook(input: { name: "Export" }) { result { rowId } } }`)).createWorkbook.result.rowId;
  const t = (await gql(`mutation($w: BigInt!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: "Goods", columns: $c }) { result { rowId } } }`,
    { w: wb, c: COLUMNS })).addWorkbookTable.result.rowId;
  const done = await gql(`mutation($t: BigInt!, $ops: JSON!) { bulkEditRecords(input: { tableId: $t, operations: $ops }) { result } }`,
    { t, ops: VALUES.map((values) => ({ op: "create", values })) });
  expect(done.bulkEditRecords.result.ok).toBe(true);
  const rel = (await owner().query("select snapbase_private.table_rel(t) as rel from snapbase.workbook_tables t where id = $1", [t])).rows[0].rel;
  return { wb: String(wb), t: String(t), rel };
}

beforeAll(async () => {
  server = await startTestServer();
  [alice, bob] = await Promise.all([createUser("editor", "alice"), createUser("editor", "bob")]);
  token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: alice.email, password: TEST_PASSWORD } })).body.token;
  dir = await mkdtemp(path.join(tmpdir(), "snapbase-export-"));
});
afterAll(async () => {
  await server?.close();
  await rm(dir, { recursive: true, force: true });
});

describe("CSV export", () => {
  it("writes a workbook table that COPY ... CSV HEADER loads back equal, and changes nothing", async () => {
    const { t, rel } = await workbookTable();
    const before = (await owner().query(`select to_jsonb(r) as r from ${rel} r order by __id`)).rows;
    const file = await download(`/api/v1/workbook-tables/${t}/export.csv`);
    expect(file.status).toBe(200);
    expect(file.type).toMatch(/^text\/csv/);
    expect(file.text.split("\n")[0]).toBe("id,note,price,tags,doc,at");
    const original = (await owner().query(`select row(${COLUMNS.map((c) => c.name).join(", ")})::text as r from ${rel} order by id`)).rows.map((r) => r.r);
    expect(await copyBack(file.text, "public.export_check")).toEqual(original);
    // An empty string and a NULL stay apart.
    expect((await owner().query("select note is null as n, note = '' as e from public.export_check where id in (3, 4) order by id")).rows)
      .toEqual([{ n: false, e: true }, { n: true, e: null }]);
    expect((await owner().query(`select to_jsonb(r) as r from ${rel} r order by __id`)).rows).toEqual(before);
  });

  it("exports only the active filter's records when asked, and refuses other users", async () => {
    const { t } = await workbookTable();
    await gql(`mutation($t: BigInt!) { setTableFilter(input: { tableId: $t, filter: "price > 1" }) { clientMutationId } }`, { t });
    const filtered = await download(`/api/v1/workbook-tables/${t}/export.csv?filter=active`);
    expect(await copyBack(filtered.text, "public.export_filtered")).toHaveLength(2);
    const bobToken = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: bob.email, password: TEST_PASSWORD } })).body.token;
    const bobs = await download(`/api/v1/workbook-tables/${t}/export.csv`, bobToken);
    expect(bobs.status, bobs.text).toBe(404);
    expect((await download(`/api/v1/workbook-tables/${t}/export.csv`, null)).status).toBe(401); // signed-in users only
  });

  it("follows the table's column order and leaves hidden columns out, unless asked for every column", async () => {
    const { t } = await workbookTable();
    await gql(`mutation($t: BigInt!) { updateTableSettings(input: { tableId: $t, columnOrder: ["price", "id"], hiddenColumns: ["doc", "tags"] }) { clientMutationId } }`, { t });
    const file = await download(`/api/v1/workbook-tables/${t}/export.csv`);
    expect(file.status).toBe(200);
    const lines = file.text.split("\n");
    // The ordered columns first, then the others in table order; hidden ones nowhere.
    expect(lines[0]).toBe("price,id,note,at");
    expect(lines[1]).toBe("1.50,1,plain,2024-02-29 23:59:59.123456+00");
    expect(file.text).not.toContain("é 🐘");
    // The filter and the settings together.
    await gql(`mutation($t: BigInt!) { setTableFilter(input: { tableId: $t, filter: "price > 1" }) { clientMutationId } }`, { t });
    expect((await download(`/api/v1/workbook-tables/${t}/export.csv?filter=active`)).text.split("\n").slice(0, 2))
      .toEqual(["price,id,note,at", "1.50,1,plain,2024-02-29 23:59:59.123456+00"]);

    // Every column, in the table's own order: the file loads back with COPY as before.
    const all = await download(`/api/v1/workbook-tables/${t}/export.csv?columns=all`);
    expect(all.text.split("\n")[0]).toBe("id,note,price,tags,doc,at");
    expect(await copyBack(all.text, "public.export_all")).toHaveLength(4);
    expect((await download(`/api/v1/workbook-tables/${t}/export.csv?columns=some`)).status).toBe(400);

    // The same in SQL.
    const header = async (sql: string) => (await owner().query(`select e from ${sql} e limit 1`, [t])).rows[0].e;
    expect(await header("snapbase.export_table_rows($1)")).toEqual(["price", "id", "note", "at"]);
    expect(await header("snapbase.export_table_rows($1, all_columns => true)")).toEqual(["id", "note", "price", "tags", "doc", "at"]);
  });

  it("writes a snapshot that COPY loads back equal to the table it was taken of", async () => {
    await owner().query(`drop table if exists public.snap_src; create table public.snap_src (${COLUMNS.map((c) => `${c.name} ${c.type}`).join(", ")}, primary key (id))`);
    await owner().query(`insert into public.snap_src select * from jsonb_populate_recordset(null::public.snap_src, $1)`, [JSON.stringify(VALUES)]);
    await owner().query(`grant select on public.snap_src to ${db.roles.viewer}; select snapbase.register_table('public.snap_src')`);
    const snap = (await owner().query("select id from snapbase.take_snapshot('public.snap_src', 'export')")).rows[0].id;
    const file = await download(`/api/v1/snapshots/${snap}/export.csv`);
    expect(file.status).toBe(200);
    const original = (await owner().query("select t::text as r from public.snap_src t order by id")).rows.map((r) => r.r);
    expect(await copyBack(file.text, "public.snap_check")).toEqual(original);
  });
});

describe("an interrupted download", () => {
  it("leaves no transaction or broken connection behind", async () => {
    const { t, rel } = await workbookTable();
    await owner().query(`insert into ${rel} (id, note) select g, repeat('x', 200) from generate_series(10, 20000) g`);
    const abort = new AbortController();
    const res = await fetch(`${server.url}/api/v1/workbook-tables/${t}/export.csv`, { headers: { authorization: `Bearer ${token}` }, signal: abort.signal });
    expect(res.status).toBe(200);
    await res.body!.getReader().read();
    abort.abort();
    // The server ends the COPY and rolls back: no session stays busy with it.
    const busy = () => owner().query(`select count(*)::int as n from pg_stat_activity
                                       where datname = current_database() and query like '%snapbase_export%' and state <> 'idle' and pid <> pg_backend_pid()`);
    const until = Date.now() + 10_000;
    while ((await busy()).rows[0].n > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    expect((await busy()).rows[0].n).toBe(0);
    // More downloads than the pool has connections: a broken one would be handed out.
    const answers = await Promise.all(Array.from({ length: 22 }, () => download(`/api/v1/workbook-tables/${t}/export.csv?filter=active`)));
    expect(answers.map((a) => a.status)).toEqual(Array(22).fill(200));
    expect(answers[0]!.text.length).toBeGreaterThan(19_991 * 200);
    expect(answers.every((a) => a.text === answers[0]!.text)).toBe(true);
  });
});

describe("share links", () => {
  /** Creates a link; returns its id and token. */
  async function shareLink(t: string, extra = ""): Promise<{ linkId: string; token: string }> {
    return (await gql(`mutation($t: BigInt!) { createShareLink(input: { tableId: $t${extra} }) { result { linkId token } } }`, { t })).createShareLink.result;
  }

  it("serve one table's CSV to anyone with the token, audit every access, and stop when revoked or expired", async () => {
    const { t } = await workbookTable();
    const { linkId, token: link } = await shareLink(t);
    expect(link).toMatch(/^sbs_/);
    const shared = await download(`/api/v1/share/${link}`, null);
    expect(shared.status).toBe(200);
    expect(shared.text.split("\n")[0]).toBe("id,note,price,tags,doc,at");
    expect(shared.text).toContain('"comma, ""quotes"" and\nnewline"');
    const again = await download(`/api/v1/share/${link}`, null);
    expect(again.status, again.text).toBe(200);
    const { rows: [info] } = await owner().query("select id, use_count from snapbase.share_links where table_id = $1", [t]);
    expect(String(info.id)).toBe(String(linkId));
    expect(info.use_count).toBe("2");
    expect((await owner().query("select count(*)::int as n from snapbase.audit_log where action = 'share_link_access' and subject_id = $1", [String(info.id)])).rows[0].n).toBe(2);

    expect((await download(`/api/v1/share/sbs_${"x".repeat(43)}`, null)).status).toBe(404);
    expect((await download(`/api/v1/share/${t}`, null)).status).toBe(404); // not the table or workbook id

    await gql(`mutation($id: BigInt!) { revokeShareLink(input: { linkId: $id }) { clientMutationId } }`, { id: linkId });
    expect((await download(`/api/v1/share/${link}`, null)).status).toBe(404);

    const later = (await gql(`mutation($t: BigInt!, $at: Datetime!) { createShareLink(input: { tableId: $t, expiresAt: $at }) { result { token expiresAt } } }`,
      { t, at: new Date(Date.now() + 3_600_000).toISOString() })).createShareLink.result;
    expect(later.expiresAt).not.toBeNull();
    expect((await download(`/api/v1/share/${later.token}`, null)).status).toBe(200);
    await owner().query("update snapbase.share_links set expires_at = now() - interval '1 second' where table_id = $1 and revoked_at is null", [t]);
    const expired = await download(`/api/v1/share/${later.token}`, null);
    expect(expired.status).toBe(404);
    expect(expired.text).toMatch(/expired or been revoked/);
  });

  it("a filtered link serves only the filter's records; only the owner may create links", async () => {
    const { t } = await workbookTable();
    await gql(`mutation($t: BigInt!) { setTableFilter(input: { tableId: $t, filter: "id <= 2" }) { clientMutationId } }`, { t });
    const { token: link } = await shareLink(t, ", useFilter: true");
    expect(await copyBack((await download(`/api/v1/share/${link}`, null)).text, "public.share_filtered")).toHaveLength(2);
    const bobToken = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: bob.email, password: TEST_PASSWORD } })).body.token;
    const refused = await graphql(server.url, `mutation($t: BigInt!) { createShareLink(input: { tableId: $t }) { result { token } } }`, { t }, bobToken);
    expect(refused.body.errors?.[0]?.extensions?.code).toBe("P0002");
  });

  it("keep the filter they were made with: changing or clearing the table's filter later never widens them", async () => {
    const { t } = await workbookTable();
    await gql(`mutation($t: BigInt!) { setTableFilter(input: { tableId: $t, filter: "id <= 2" }) { clientMutationId } }`, { t });
    const made = (await gql(`mutation($t: BigInt!) { createShareLink(input: { tableId: $t, useFilter: true }) { result { linkId token filter } } }`, { t })).createShareLink.result;
    expect(made.filter).toBe("id <= 2");
    // The first field of each record (a note holds a newline, inside quotes: that line is not a record's start).
    const ids = async () => (await download(`/api/v1/share/${made.token}`, null)).text.split("\n").filter((line) => /^\d+,/.test(line)).map((line) => line.split(",")[0]);
    expect(await ids()).toEqual(["1", "2"]);
    await gql(`mutation($t: BigInt!) { setTableFilter(input: { tableId: $t, filter: null }) { clientMutationId } }`, { t });
    expect(await ids()).toEqual(["1", "2"]);
    await gql(`mutation($t: BigInt!) { setTableFilter(input: { tableId: $t, filter: "id >= 2" }) { clientMutationId } }`, { t });
    expect(await ids()).toEqual(["1", "2"]);
    const listed = (await gql(`{ allShareLinks(condition: { tableId: "${t}" }) { nodes { rowId useFilter filter columns } } }`)).allShareLinks.nodes;
    expect(listed).toEqual([{ rowId: String(made.linkId), useFilter: true, filter: "id <= 2", columns: ["id", "note", "price", "tags", "doc", "at"] }]);
    // A column the frozen filter reads that changes type: the link stops rather than guess.
    const rel = (await owner().query("select snapbase_private.table_rel(t) as rel from snapbase.workbook_tables t where id = $1", [t])).rows[0].rel;
    await owner().query(`alter table ${rel} alter column id type bigint`);
    expect((await download(`/api/v1/share/${made.token}`, null)).status).toBe(409);
    await owner().query(`alter table ${rel} alter column id type integer`);
    expect(await ids()).toEqual(["1", "2"]);
  });

  it("never include hidden or scratch columns, whether hidden before the link was made or after", async () => {
    const { t } = await workbookTable();
    await gql(`mutation($t: BigInt!) { addScratchColumn(input: { tableId: $t, name: "private_notes" }) { clientMutationId } }`, { t });
    await gql(`mutation($t: BigInt!) { updateTableSettings(input: { tableId: $t, hiddenColumns: ["price"] }) { clientMutationId } }`, { t });
    const made = (await gql(`mutation($t: BigInt!) { createShareLink(input: { tableId: $t }) { result { token columns } } }`, { t })).createShareLink.result;
    expect(made.columns).toEqual(["id", "note", "tags", "doc", "at"]);
    const header = async () => (await download(`/api/v1/share/${made.token}`, null)).text.split("\n")[0];
    expect(await header()).toBe("id,note,tags,doc,at");
    // Hidden later: gone from the link too; shown again later: the link does not widen.
    await gql(`mutation($t: BigInt!) { updateTableSettings(input: { tableId: $t, hiddenColumns: ["doc"] }) { clientMutationId } }`, { t });
    expect(await header()).toBe("id,note,tags,at");
    await gql(`mutation($t: BigInt!) { updateTableSettings(input: { tableId: $t, hiddenColumns: [] }) { clientMutationId } }`, { t });
    expect(await header()).toBe("id,note,tags,doc,at");
  });

  it("return each link's id with its token, so the owner revokes the right one", async () => {
    const { t } = await workbookTable();
    const [first, second] = [await shareLink(t), await shareLink(t)];
    expect(first.linkId).not.toBe(second.linkId);
    await gql(`mutation($id: BigInt!) { revokeShareLink(input: { linkId: $id }) { clientMutationId } }`, { id: second.linkId });
    expect((await download(`/api/v1/share/${first.token}`, null)).status).toBe(200);
    expect((await download(`/api/v1/share/${second.token}`, null)).status).toBe(404);
  });
});
