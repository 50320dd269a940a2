// Containment: every surface that takes user text, attacked as a viewer, an editor
// or an agent would, over the real HTTP API. Each attack must be refused with a
// clear error and leave no trace: no new row, user, token, credentials or large
// object, the table's filter unchanged, nothing left on pooled connections (100
// anonymous requests afterwards see no identity), and no secret in any response.
// The secrets are canaries: the JWT secret, the credentials key, the sealed
// credentials key, and a table only the superuser can read.
//
// The attacks are split by surface over containment-*.test.ts, so they run in
// parallel; each file sets up this fixture (its own server, users, managed tables
// and workbook in its own database) with containmentSuite().
import { randomBytes } from "node:crypto";
import pg from "pg";
import { afterAll, beforeAll, expect } from "vitest";
import { withUrlParts } from "../src/db/urls.ts";
import type { RunningServer } from "../src/server/app.ts";
import { createUser, db, graphql, http, owner, startTestServer, TEST_CREDENTIALS_KEY, TEST_PASSWORD, type TestUser } from "./helpers.ts";

export let server: RunningServer;
let viewer: TestUser, editor: TestUser, admin: TestUser;
export const tokens: Record<string, string> = {};
export const CANARY = `canary-${randomBytes(12).toString("hex")}`;
const RUN = randomBytes(4).toString("hex");
export const SCHEMA = `c_${RUN}`;
export let canaries: string[] = [];
export let workbookId: string, tableId: string, otherTableId: string;
export const responses: string[] = [];

export async function gql(token: string, query: string, variables: Record<string, unknown> = {}) {
  const res = await graphql(server.url, query, variables, token);
  responses.push(JSON.stringify(res.body));
  return res.body;
}

/** Counts of everything an attack might have created. */
export async function traces() {
  const { rows } = await owner().query(`select
      (select count(*) from snapbase.users)::int as users,
      (select count(*) from snapbase.api_tokens)::int as tokens,
      (select count(*) from snapbase.change_requests)::int as changes,
      (select count(*) from snapbase.change_requests where status <> 'pending')::int as decided,
      (select count(*) from snapbase.connector_accounts)::int as accounts,
      (select count(*) from snapbase_private.connector_credentials)::int as credentials,
      (select count(*) from pg_largeobject_metadata)::int as large_objects,
      (select count(*) from snapbase.workbook_tables)::int as tables,
      (select md5(string_agg(key || '=' || value, ',' order by key)) from snapbase_private.settings) as settings,
      (select md5(string_agg(id || ':' || coalesce(filter, '') || ':' || columns::text, ',' order by id)) from snapbase.workbook_tables) as table_specs,
      (select md5(string_agg(attrelid::regclass || '.' || attname || ':' || format_type(atttypid, atttypmod), ',' order by attrelid, attnum))
         from pg_attribute where attrelid in (select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace
                                               where n.nspname like 'workbook\\_%' or n.nspname = $1) and attnum > 0 and not attisdropped) as columns,
      (select md5(string_agg(t::text, ',' order by t.id)) from ${SCHEMA}.items t) as items`, [SCHEMA]);
  return rows[0];
}

/** After an attack: 100 anonymous requests, spread over the pool, see no identity. */
export async function anonymousSeeNobody() {
  for (let round = 0; round < 5; round++) {
    const answers = await Promise.all(Array.from({ length: 20 }, () =>
      graphql(server.url, "{ currentUserId currentAppRole }").then((r) => r.body)));
    for (const a of answers) expect(a).toEqual({ data: { currentUserId: null, currentAppRole: "anonymous" } });
  }
}

/** Runs one attack: it must fail with an error matching `expected`, and change nothing. */
export async function refused(run: () => Promise<{ errors?: { message: string }[]; data?: unknown }>, expected: RegExp) {
  const before = await traces();
  const body = await run();
  expect(body.errors?.[0]?.message ?? `no error: ${JSON.stringify(body.data)}`).toMatch(expected);
  expect(await traces()).toEqual(before);
  await anonymousSeeNobody();
}

/** Registers the fixture's set-up and its final check: no response of the file ever carried a secret. */
export function containmentSuite(): void {
  beforeAll(async () => {
    server = await startTestServer();
    [viewer, editor, admin] = await Promise.all([createUser("viewer", "c-viewer"), createUser("editor", "c-editor"), createUser("admin", "c-admin")]);
    for (const [name, u] of Object.entries({ viewer, editor, admin })) {
      tokens[name] = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: u.email, password: TEST_PASSWORD } })).body.token;
    }
    // A canary only the superuser may read, and managed tables the editor may read.
    const root = new pg.Client({ connectionString: withUrlParts(db.rootUrl, { database: db.database }) });
    await root.connect();
    await root.query("create schema if not exists canary; create table if not exists canary.secret_table (s text); revoke all on schema canary from public");
    await root.query("insert into canary.secret_table values ($1)", [CANARY]);
    await root.end();
    await owner().query(`
      create schema ${SCHEMA};
      create table ${SCHEMA}.items (id int primary key, name text, qty int);
      create table ${SCHEMA}.other (id int primary key, name text);
      insert into ${SCHEMA}.items values (1, 'one', 1), (2, 'two', 2);
      grant usage on schema ${SCHEMA} to ${db.roles.viewer};
      grant select on ${SCHEMA}.items, ${SCHEMA}.other to ${db.roles.viewer};
      select snapbase.register_table('${SCHEMA}.items'), snapbase.register_table('${SCHEMA}.other');`);
    const settings = await owner().query("select value from snapbase_private.settings where key in ('jwt_secret', 'credentials_secret_key_sealed')");
    canaries = [CANARY, db.jwtSecret, TEST_CREDENTIALS_KEY, ...settings.rows.map((r) => r.value as string)];
    const wb = await gql(tokens.editor!, `mutation { createWorkbook(input: { name: "Containment" }) { result { rowId } } }`);
    workbookId = (wb as any).data.createWorkbook.result.rowId;
    const add = async (name: string) => ((await gql(tokens.editor!, `mutation($w: BigInt!, $n: String!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: $n, columns: $c }) { result { rowId } } }`,
      { w: workbookId, n: name, c: [{ name: "id", type: "integer" }, { name: "name", type: "text" }, { name: "amount", type: "numeric(12,2)" }] })) as any).data.addWorkbookTable.result.rowId;
    tableId = await add("Records");
    otherTableId = await add("Other records");
    await gql(tokens.editor!, `mutation($t: BigInt!) { setTableFilter(input: { tableId: $t, filter: "amount > 0" }) { clientMutationId } }`, { t: tableId });
  });

  afterAll(async () => {
    // No response, of any test here, ever carried a secret.
    const all = responses.join("\n");
    for (const c of canaries) expect(all.includes(c), "a response carried a secret").toBe(false);
    expect(all).not.toMatch(/\$2[aby]\$\d\d\$/); // no bcrypt hash
    await server?.close();
    const root = new pg.Client({ connectionString: withUrlParts(db.rootUrl, { database: db.database }) });
    await root.connect();
    await root.query("drop schema if exists canary cascade");
    await root.end();
  });
}

/** A staged CSV import on the records table, for mapping attacks. */
export async function stagedImport(): Promise<string> {
  const started = await gql(tokens.editor!, `mutation($t: BigInt!) { startCsvImport(input: { tableId: $t, header: ["id", "extra"] }) { result { rowId } } }`, { t: tableId });
  const importId = (started as any).data.startCsvImport.result.rowId;
  await gql(tokens.editor!, `mutation($i: BigInt!, $r: JSON!) { stageCsvRows(input: { importId: $i, rows: $r }) { clientMutationId } }`,
    { i: importId, r: [{ line: 2, cells: ["1", "x"] }] });
  return importId;
}

/** Type names that must never reach SQL as written. */
export const HOSTILE_TYPES: [string, RegExp][] = [
  ["text); drop table snapbase.users; --", /not a type name/],
  ["int; select pg_sleep(1)", /not a type name/],
  ["text collate \"C\"", /not a type name/],
  ["snapbase.users", /not a type name/],
  ["pg_catalog.text", /not a type name/],
  ["regclass", /not supported/],
  ["regproc", /not supported/],
  ["oid", /not supported/],
  ["pg_node_tree", /not supported/],
  ["internal", /not supported/],
  ["cstring", /not supported/],
  ["anyelement", /not supported/],
  ["record", /not supported/],
  ["trigger", /not supported/],
  ["void", /not supported/],
  ["xid", /not supported/],
  ["tid", /not supported/],
  ["aclitem", /not supported/],
  ["no_such_type", /unknown type/],
  ["numeric(1000000)", /numeric|precision|typmod|modifier/i],
  ["varchar(0)", /length for type varchar must be at least 1|varchar/],
  ["numeric(10,2,3)", /not a type name/],
  ["text(5)", /takes no modifiers|typmod/],
  ["\"char\"", /not a type name/],
  ["int4 /* comment */", /not a type name/],
  ["int\n; drop", /not a type name/],
  ["'text'", /not a type name/],
  ["text[] ; drop", /not a type name/],
  ["(select 1)", /not a type name/],
  ["", /type name|not a type name/],
  ["x".repeat(200), /at most 100 characters/],
];
