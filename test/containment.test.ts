// Containment: every surface that takes user text, attacked as a viewer, an editor
// or an agent would, over the real HTTP API. Each attack must be refused with a
// clear error and leave no trace: no new row, user, token, credentials or large
// object, the table's filter unchanged, nothing left on pooled connections (100
// anonymous requests afterwards see no identity), and no secret in any response.
// The secrets are canaries: the JWT secret, the credentials key, the sealed
// credentials key, and a table only the superuser can read.
import { randomBytes } from "node:crypto";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { startWorker, type Worker } from "../src/worker.ts";
import { createUser, db, graphql, http, owner, settled, startTestServer, TEST_CREDENTIALS_KEY, TEST_PASSWORD, type TestUser } from "./helpers.ts";

let server: RunningServer;
let viewer: TestUser, editor: TestUser, admin: TestUser;
const tokens: Record<string, string> = {};
const CANARY = `canary-${randomBytes(12).toString("hex")}`;
const RUN = randomBytes(4).toString("hex");
const SCHEMA = `c_${RUN}`;
let canaries: string[] = [];
let workbookId: string, tableId: string, otherTableId: string;
const responses: string[] = [];

async function gql(token: string, query: string, variables: Record<string, unknown> = {}) {
  const res = await graphql(server.url, query, variables, token);
  responses.push(JSON.stringify(res.body));
  return res.body;
}

/** Counts of everything an attack might have created. */
async function traces() {
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
async function anonymousSeeNobody() {
  for (let round = 0; round < 5; round++) {
    const answers = await Promise.all(Array.from({ length: 20 }, () =>
      graphql(server.url, "{ currentUserId currentAppRole }").then((r) => r.body)));
    for (const a of answers) expect(a).toEqual({ data: { currentUserId: null, currentAppRole: "anonymous" } });
  }
}

/** Runs one attack: it must fail with an error matching `expected`, and change nothing. */
async function refused(run: () => Promise<{ errors?: { message: string }[]; data?: unknown }>, expected: RegExp) {
  const before = await traces();
  const body = await run();
  expect(body.errors?.[0]?.message ?? `no error: ${JSON.stringify(body.data)}`).toMatch(expected);
  expect(await traces()).toEqual(before);
  await anonymousSeeNobody();
}

beforeAll(async () => {
  server = await startTestServer();
  [viewer, editor, admin] = await Promise.all([createUser("viewer", "c-viewer"), createUser("editor", "c-editor"), createUser("admin", "c-admin")]);
  for (const [name, u] of Object.entries({ viewer, editor, admin })) {
    tokens[name] = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: u.email, password: TEST_PASSWORD } })).body.token;
  }
  // A canary only the superuser may read, and managed tables the editor may read.
  const root = new pg.Client({ connectionString: db.rootUrl.replace(/\/[^/]*$/, `/${new URL(db.ownerUrl).pathname.slice(1)}`) });
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
  const root = new pg.Client({ connectionString: db.rootUrl.replace(/\/[^/]*$/, `/${new URL(db.ownerUrl).pathname.slice(1)}`) });
  await root.connect();
  await root.query("drop schema if exists canary cascade");
  await root.end();
});

describe("filters", () => {
  const attacks: [string, RegExp][] = [
    ["exists (select 1 from snapbase.users)", /subqueries/],
    ["name in (select email from snapbase.users)", /subqueries/],
    ["id = (select count(*) from snapbase_private.settings)::int", /subqueries/],
    ["id = (select length(s) from canary.secret_table)", /subqueries|permission denied for schema canary/],
    ["name = current_setting('snapbase.credentials_key')", /function current_setting/],
    ["name = current_setting('jwt.claims.user_id')", /function current_setting/],
    ["set_config('jwt.claims.user_id', '1', false) is not null", /function set_config/],
    ["pg_advisory_lock(1) is not null", /function pg_advisory_lock/],
    ["pg_try_advisory_lock(42)", /function pg_try_advisory_lock/],
    ["lo_import('/etc/passwd') > 0", /function lo_import/],
    ["lo_from_bytea(0, 'x') > 0", /function lo_from_bytea/],
    ["pg_read_file('/etc/passwd') <> ''", /function pg_read_file/],
    ["pg_ls_dir('.') is not null", /function pg_ls_dir/],
    ["query_to_xml('select * from snapbase_private.settings', true, true, '') is not null", /function query_to_xml/],
    ["table_to_xml('snapbase_private.settings', true, true, '') is not null", /function table_to_xml/],
    ["database_to_xml(true, true, '') is not null", /function database_to_xml/],
    ["id = 99999) or (id = 10", /syntax error/],
    ["true) or (true", /syntax error/],
    ["true; select pg_sleep(1)", /syntax error|more than one statement/],
    ["true; drop table snapbase.users", /syntax error|more than one statement/],
    ["'snapbase.users'::regclass is not null", /type regclass/],
    ["to_regclass('snapbase_private.settings') is not null", /function to_regclass/],
    ["pg_sleep(1) is null", /function pg_sleep/],
    ["txid_current() > 0", /function txid_current/],
    ["random() < 2", /function random/],
    ["nextval('snapbase.users_id_seq') > 0", /function nextval|regclass/],
    ["$1 = 1", /positional parameters/],
    ["__deleted", /column "__deleted" does not exist/],
    ["xmin::text <> ''", /column "xmin" does not exist/],
    ["current_user = 'x'", /current_user/],
    ["session_user = 'x'", /current_user|session/],
    ["has_table_privilege('snapbase_private.settings', 'select')", /function has_table_privilege/],
    ["version() <> ''", /function version/],
    ["pg_backend_pid() > 0", /function pg_backend_pid/],
    ["snapbase.current_user_id() = 1", /function snapbase\.current_user_id/],
    ["snapbase.create_user('evil@example.com', 'password1', 'admin') is not null", /function snapbase\.create_user/],
    ["generate_series(1, 10) > 0", /function generate_series|set-returning|not allowed/],
    ["id = 1 union select 1", /syntax error/],
    ["format('%s', current_setting('jwt.claims.email')) <> ''", /function current_setting/],
    ["amount", /true\/false expression/],
  ];
  for (const [filter, expected] of attacks) {
    it(`refuses ${filter}`, async () => {
      await refused(() => gql(tokens.editor!, `mutation($t: BigInt!, $f: String!) { setTableFilter(input: { tableId: $t, filter: $f }) { result { filter } } }`,
        { t: tableId, f: filter }) as any, expected);
      const [{ filter: kept }] = (await owner().query("select filter from snapbase.workbook_tables where id = $1", [tableId])).rows;
      expect(kept).toBe("amount > 0");
    });
  }

  it("still accepts and applies ordinary filters, comments included", async () => {
    await owner().query(`insert into ${(await owner().query("select snapbase_private.table_rel(t) as r from snapbase.workbook_tables t where id = $1", [otherTableId])).rows[0].r}
      (id, name, amount) values (1, 'Paris', 10), (2, 'paris', 20), (3, 'Lyon', 30)`);
    for (const [filter, ids] of [
      ["lower(name) = 'paris' -- the capital", [1, 2]],
      ["amount between 15 and 35 /* a range */", [2, 3]],
      ["name ~* '^p' and amount::text like '%0'", [1, 2]],
      ["coalesce(name, '') <> '' and now() > '2000-01-01'", [1, 2, 3]],
    ] as const) {
      const set = await gql(tokens.editor!, `mutation($t: BigInt!, $f: String!) { setTableFilter(input: { tableId: $t, filter: $f }) { result { filter } } }`, { t: otherTableId, f: filter });
      expect((set as any).errors).toBeUndefined();
      const page = await gql(tokens.editor!, `query($t: BigInt!) { workbookRecords(tableId: $t) }`, { t: otherTableId });
      expect((page as any).data.workbookRecords.records.map((r: any) => r.values.id)).toEqual(ids);
    }
  });
});

describe("change SQL", () => {
  const T = () => `${SCHEMA}.items`;
  const attacks: [string, () => string, RegExp][] = [
    ["creates a user", () => `update ${T()} set name = snapbase.create_user('evil@example.com', 'password1', 'admin')::text`, /function snapbase\.create_user/],
    ["mints an API token", () => `update ${T()} set name = snapbase.create_api_token('t', array['admin'])`, /function snapbase\.create_api_token/],
    ["approves another change", () => `update ${T()} set name = (snapbase.approve_change(1)).status::text`, /function snapbase\.approve_change/],
    ["reads the credentials key", () => `update ${T()} set name = current_setting('snapbase.credentials_key')`, /function current_setting/],
    ["reads the claims", () => `update ${T()} set name = current_setting('jwt.claims.user_id')`, /function current_setting/],
    ["reads settings", () => `update ${T()} set name = (select value from snapbase_private.settings limit 1)`, /snapbase_private\.settings/],
    ["runs SQL from data", () => `update ${T()} set name = query_to_xml((select name from ${T()} limit 1), true, true, '')::text`, /function query_to_xml/],
    ["dumps a table as XML", () => `update ${T()} set name = table_to_xml('snapbase_private.settings', true, true, '')::text`, /function table_to_xml/],
    ["takes an advisory lock", () => `update ${T()} set name = pg_advisory_lock(1)::text`, /function pg_advisory_lock/],
    ["sets a session setting", () => `update ${T()} set name = set_config('jwt.claims.user_id', '1', false)`, /function set_config/],
    ["imports a file", () => `update ${T()} set qty = lo_import('/etc/passwd')::int`, /function lo_import/],
    ["reads a file", () => `update ${T()} set name = pg_read_file('/etc/passwd')`, /function pg_read_file/],
    ["reads the canary", () => `update ${T()} set name = (select s from canary.secret_table limit 1)`, /canary\.secret_table|permission denied for schema canary/],
    ["reads password hashes", () => `update ${T()} set name = (select password_hash from snapbase_private.user_secrets limit 1)`, /snapbase_private\.user_secrets/],
    ["reads users", () => `update ${T()} set name = (select email from snapbase.users limit 1)`, /snapbase\.users/],
    ["reads the catalog", () => `update ${T()} set name = (select string_agg(rolname, ',') from pg_roles)`, /pg_roles|pg_catalog/],
    ["reads activity", () => `update ${T()} set name = (select query from pg_stat_activity limit 1)`, /pg_stat_activity|function pg_stat/],
    ["writes another table", () => `update ${SCHEMA}.other set name = 'x'`, /may modify only/],
    ["writes another table through a CTE", () => `with x as (delete from ${SCHEMA}.other returning *) update ${T()} set name = 'x'`, /may modify only/],
    ["holds two statements", () => `insert into ${T()} values (9, 'x', 9); delete from ${T()}`, /exactly one INSERT, UPDATE, DELETE or MERGE/],
    ["smuggles a second statement", () => `update ${T()} set name = 'x'; end; select pg_sleep(1); create function x() returns void begin atomic select 1`, /syntax error|more than one statement|exactly one/],
    ["returns a secret", () => `update ${T()} set name = 'x' returning (select value from snapbase_private.settings limit 1)`, /snapbase_private\.settings/],
    ["uses a foreign sequence", () => `update ${T()} set qty = nextval('snapbase.users_id_seq')`, /snapbase\.users_id_seq|values of type regclass/],
    ["reads a transaction id", () => `update ${T()} set qty = txid_current()::int`, /function txid_current/],
    ["copies to a file", () => `copy ${T()} to '/tmp/snapbase-evil'`, /exactly one INSERT, UPDATE, DELETE or MERGE|COPY/],
    ["creates a table", () => `create table ${SCHEMA}.evil (x int)`, /exactly one INSERT, UPDATE, DELETE or MERGE/],
    ["grants", () => `grant all on ${T()} to public`, /exactly one INSERT, UPDATE, DELETE or MERGE|GRANT/],
    ["sets the role", () => `set role postgres`, /exactly one INSERT, UPDATE, DELETE or MERGE|SET/],
    ["runs a DO block", () => `do $$ begin perform 1; end $$`, /exactly one INSERT, UPDATE, DELETE or MERGE|DO/],
    ["locks rows elsewhere", () => `update ${T()} set name = name where id in (select id from ${SCHEMA}.other for update)`, /FOR UPDATE/],
    ["joins a secret table", () => `update ${T()} set name = s.value from snapbase_private.settings s`, /snapbase_private\.settings/],
    ["merges from a secret table", () => `merge into ${T()} t using snapbase_private.settings s on false when not matched then insert values (100, s.value, 1)`, /snapbase_private\.settings/],
    ["terminates backends", () => `update ${T()} set name = pg_terminate_backend(1)::text`, /function pg_terminate_backend/],
    ["asks who it runs as", () => `update ${T()} set name = current_user`, /current_user/],
    ["looks a table up by name", () => `update ${T()} set name = to_regclass('snapbase_private.settings')::text`, /function to_regclass|regclass/],
    ["is a SELECT", () => `select * from snapbase_private.settings`, /exactly one INSERT, UPDATE, DELETE or MERGE/],
  ];
  for (const [what, sql, expected] of attacks) {
    it(`refuses a change that ${what}`, async () => {
      await refused(() => gql(tokens.editor!, `mutation($s: String!, $t: RegClass!) { submitChange(input: { target: $t, sql: $s }) { result { rowId } } }`,
        { s: sql(), t: T() }) as any, expected);
    });
  }

  it("refuses change SQL larger than 1 MB, with a clear error and no trace", async () => {
    const before = await traces();
    const res = await http(server.url, "POST", "/api/v1/changes", { token: tokens.editor,
      body: { table: T(), sql: `update ${T()} set name = '${"a".repeat(1_100_000)}'`, reason: "big" } });
    responses.push(JSON.stringify(res.body));
    expect(res.status).toBe(413);
    expect(res.body.error.message).toMatch(/at most 1 MB/);
    expect(await traces()).toEqual(before);
  });

  it("refuses a change to a table the editor may not read, on every path", async () => {
    await owner().query(`create table ${SCHEMA}.hidden (id int primary key, secret text); select snapbase.register_table('${SCHEMA}.hidden')`);
    await refused(() => gql(tokens.editor!, `mutation($t: RegClass!) { submitChange(input: { target: $t, sql: "delete from ${SCHEMA}.hidden" }) { result { rowId } } }`,
      { t: `${SCHEMA}.hidden` }) as any, /no managed table .* that you may read/);
    const rest = await http(server.url, "POST", "/api/v1/changes", { token: tokens.editor, body: { table: `${SCHEMA}.hidden`, sql: `delete from ${SCHEMA}.hidden`, reason: "x" } });
    expect(rest.status).toBeGreaterThanOrEqual(400);
    expect(rest.status).toBeLessThan(500);
  });

  it("runs an approved change as the change runner, with no rights left over afterwards", async () => {
    const submitted = await gql(tokens.editor!, `mutation($t: RegClass!) { submitChange(input: { target: $t, sql: "update ${SCHEMA}.items set name = name || '!', qty = qty + (select count(*) from ${SCHEMA}.other)::int" }) { result { rowId } } }`, { t: T() });
    const id = (submitted as any).data.submitChange.result.rowId;
    const approved = await gql(tokens.admin!, `mutation($id: BigInt!) { approveChange(input: { changeId: $id }) { result { status rowsAffected } } }`, { id });
    expect((approved as any).data.approveChange.result).toEqual({ status: "approved", rowsAffected: "2" });
    const { rows } = await owner().query(`select has_table_privilege($1, '${T()}', 'UPDATE') as w, has_table_privilege($1, '${SCHEMA}.other', 'SELECT') as r`, [db.roles.changeRunner]);
    expect(rows[0]).toEqual({ w: false, r: false });
  });

  it("checks again at approval: a submitter who lost read access gets a failed change, without data", async () => {
    await owner().query(`create table ${SCHEMA}.lookup (id int primary key, code text); insert into ${SCHEMA}.lookup values (1, '${CANARY}-lookup');
                          grant select on ${SCHEMA}.lookup to ${db.roles.viewer}`);
    const submitted = await gql(tokens.editor!, `mutation($t: RegClass!) { submitChange(input: { target: $t, sql: "update ${SCHEMA}.items set qty = (select code from ${SCHEMA}.lookup)::int" }) { result { rowId } } }`, { t: T() });
    const id = (submitted as any).data.submitChange.result.rowId;
    await owner().query(`revoke select on ${SCHEMA}.lookup from ${db.roles.viewer}`);
    const approved = await gql(tokens.admin!, `mutation($id: BigInt!) { approveChange(input: { changeId: $id }) { result { status errorMessage } } }`, { id });
    expect((approved as any).data.approveChange.result.status).toBe("failed");
    expect((approved as any).data.approveChange.result.errorMessage).toMatch(/lookup, which you may not read/);
    canaries.push(`${CANARY}-lookup`);
  });
});

/** A staged CSV import on the records table, for mapping attacks. */
async function stagedImport(): Promise<string> {
  const started = await gql(tokens.editor!, `mutation($t: BigInt!) { startCsvImport(input: { tableId: $t, header: ["id", "extra"] }) { result { rowId } } }`, { t: tableId });
  const importId = (started as any).data.startCsvImport.result.rowId;
  await gql(tokens.editor!, `mutation($i: BigInt!, $r: JSON!) { stageCsvRows(input: { importId: $i, rows: $r }) { clientMutationId } }`,
    { i: importId, r: [{ line: 2, cells: ["1", "x"] }] });
  return importId;
}

/** Type names that must never reach SQL as written. */
const HOSTILE_TYPES: [string, RegExp][] = [
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

describe("CSV import mappings", () => {
  for (const [type, expected] of HOSTILE_TYPES) {
    it(`refuses the type ${JSON.stringify(type.slice(0, 40))} in a preview and an import`, async () => {
      const importId = await stagedImport();
      const mapping = { extra: { new_scratch: "s1", type } };
      await refused(() => gql(tokens.editor!, `query($i: BigInt!, $m: JSON!) { csvImportPreview(importId: $i, mapping: $m) }`, { i: importId, m: mapping }) as any, expected);
      await refused(() => gql(tokens.editor!, `mutation($i: BigInt!, $m: JSON!) { importCsv(input: { importId: $i, mapping: $m }) { result } }`, { i: importId, m: mapping }) as any, expected);
    });
  }
  const badMappings: [unknown, RegExp][] = [
    [{ extra: "name\"; drop table snapbase.users; --" }, /columns the table does not have/],
    [{ extra: { new_scratch: "__id", type: "text" } }, /reserved for metadata/],
    [{ extra: { new_scratch: "xmin", type: "text" } }, /system column|xmin/],
    [{ extra: { new_scratch: "", type: "text" } }, /1 to 63 characters/],
    [{ extra: { new_scratch: "n".repeat(64), type: "text" } }, /1 to 63 characters/],
    [{ extra: { new_scratch: "s1", type: "text", extra: "x" } }, /\{"new_scratch": name, "type": type\}/],
    [{ extra: 5 }, /a column name, null/],
    [{ nope: "name" }, /headers the file does not have/],
    [["extra"], /mapping must be an object/],
  ];
  for (const [mapping, expected] of badMappings) {
    it(`refuses the mapping ${JSON.stringify(mapping).slice(0, 60)}`, async () => {
      const importId = await stagedImport();
      await refused(() => gql(tokens.editor!, `query($i: BigInt!, $m: JSON!) { csvImportPreview(importId: $i, mapping: $m) }`, { i: importId, m: mapping }) as any, expected);
    });
  }
});

describe("table and column specs", () => {
  for (const [type, expected] of HOSTILE_TYPES) {
    it(`refuses a column of type ${JSON.stringify(type.slice(0, 40))}`, async () => {
      await refused(() => gql(tokens.editor!, `mutation($w: BigInt!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: "Evil", columns: $c }) { result { rowId } } }`,
        { w: workbookId, c: [{ name: "a", type }] }) as any, expected);
    });
  }
  const badSpecs: [unknown, RegExp][] = [
    [[{ name: "__id", type: "text" }], /reserved for metadata/],
    [[{ name: "ctid", type: "text" }], /system column|ctid/],
    [[{ name: "", type: "text" }], /1 to 63 characters/],
    [[{ name: "é".repeat(40), type: "text" }], /1 to 63 characters/],
    [[{ name: "a", type: "text" }, { name: "a", type: "integer" }], /unique/],
    [[{ name: "a", type: 5 }], /type must be a type name/],
    [[{ name: "a", type: "text", read_only: "yes; drop" }], /true or false/],
    [{ name: "a" }, /non-empty array/],
    [[], /non-empty array/],
    [["a"], /needs a name/],
  ];
  for (const [columns, expected] of badSpecs) {
    it(`refuses the spec ${JSON.stringify(columns).slice(0, 60)}`, async () => {
      await refused(() => gql(tokens.editor!, `mutation($w: BigInt!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: "Evil", columns: $c }) { result { rowId } } }`,
        { w: workbookId, c: columns }) as any, expected);
    });
  }
  it("keeps hostile but valid names as data", async () => {
    const names = [`a"; drop table snapbase.users; --`, "Robert'); --", "日本語 列", "select", "n"];
    const created = await gql(tokens.editor!, `mutation($w: BigInt!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: "x'); drop table y; --", columns: $c }) { result { rowId columns } } }`,
      { w: workbookId, c: names.map((name) => ({ name, type: "text" })) });
    expect((created as any).data.addWorkbookTable.result.columns.map((c: any) => c.name)).toEqual(names);
    expect((await owner().query("select to_regclass('snapbase.users') is not null as ok")).rows[0].ok).toBe(true);
  });
});

describe("scratch columns", () => {
  for (const [type, expected] of HOSTILE_TYPES) {
    it(`refuses a scratch column of type ${JSON.stringify(type.slice(0, 40))}`, async () => {
      await refused(() => gql(tokens.editor!, `mutation($t: BigInt!, $ty: String!) { addScratchColumn(input: { tableId: $t, name: "s9", type: $ty }) { result { rowId } } }`,
        { t: tableId, ty: type }) as any, expected);
    });
  }
  for (const [name, expected] of [["__x", /reserved for metadata/], ["xmax", /system column/], ["", /1 to 63/], ["id", /exists already/]] as const) {
    it(`refuses a scratch column named ${JSON.stringify(name)}`, async () => {
      await refused(() => gql(tokens.editor!, `mutation($t: BigInt!, $n: String!) { addScratchColumn(input: { tableId: $t, name: $n, type: "text" }) { result { rowId } } }`,
        { t: tableId, n: name }) as any, expected);
    });
  }
  it("refuses to remove a column that is not a scratch column, whatever its name says", async () => {
    await refused(() => gql(tokens.editor!, `mutation($t: BigInt!) { removeScratchColumn(input: { tableId: $t, columnName: "id\\"; drop table snapbase.users; --" }) { result { rowId } } }`,
      { t: tableId }) as any, /no scratch column/);
  });
});

describe("connector targets", () => {
  const production = async (on: boolean) => owner().query(
    "insert into snapbase_private.settings (key, value) values ('environment', $1) on conflict (key) do update set value = excluded.value",
    [on ? "production" : "test"]);
  const pg = (host: string, extra = "") => ({ connection_string: `postgres://reader:secret-pw@${host}:5432/shop${extra}` });
  const attacks: [string, string, Record<string, unknown>, RegExp][] = [
    ["localhost", "postgres", pg("localhost"), /may not reach localhost/],
    ["127.0.0.1", "postgres", pg("127.0.0.1"), /may not reach 127\.0\.0\.1/],
    ["127.1.2.3", "postgres", pg("127.1.2.3"), /may not reach/],
    ["[::1]", "postgres", pg("[::1]"), /may not reach/],
    ["[::ffff:127.0.0.1]", "postgres", pg("[::ffff:127.0.0.1]"), /may not reach/],
    ["0.0.0.0", "postgres", pg("0.0.0.0"), /may not reach/],
    ["10.0.0.5", "postgres", pg("10.0.0.5"), /may not reach/],
    ["172.16.3.4", "postgres", pg("172.16.3.4"), /may not reach/],
    ["192.168.1.1", "postgres", pg("192.168.1.1"), /may not reach/],
    ["the metadata service", "postgres", pg("169.254.169.254"), /may not reach/],
    ["[fe80::1]", "postgres", pg("[fe80::1]"), /may not reach/],
    ["[fd00::1]", "postgres", pg("[fd00::1]"), /may not reach/],
    ["100.64.0.1", "postgres", pg("100.64.0.1"), /may not reach/],
    ["a one-label name", "postgres", pg("db"), /may not reach db/],
    ["x.localhost", "postgres", pg("x.localhost"), /may not reach/],
    ["a .internal name", "postgres", pg("db.internal"), /may not reach/],
    ["a decimal address", "postgres", pg("2130706433"), /may not reach/],
    ["a host parameter", "postgres", pg("db.example.com", "?host=127.0.0.1"), /may carry only sslmode, connect_timeout and application_name/],
    ["a Unix socket", "postgres", pg("db.example.com", "?host=/var/run/postgresql"), /may carry only sslmode/],
    ["an escaped host parameter", "postgres", pg("db.example.com", "?%68ost=127.0.0.1"), /may carry only sslmode/],
    ["a host parameter in the fragment", "postgres", pg("127.0.0.1", "?sslmode=prefer#&host=db.example.com"), /no fragment/],
    ["session options", "postgres", pg("db.example.com", "?options=-c%20statement_timeout%3D1"), /may carry only sslmode/],
    ["a client key file", "postgres", pg("db.example.com", "?sslkey=/etc/ssl/private/key.pem"), /may carry only sslmode/],
    ["a password parameter", "postgres", pg("db.example.com", "?password=x"), /may carry only sslmode/],
    ["no host", "postgres", { connection_string: "postgres:///shop" }, /must name its host/],
    ["NAT64", "postgres", pg("[64:ff9b::7f00:1]"), /may not reach/],
    ["6to4", "postgres", pg("[2002:7f00:1::1]"), /may not reach/],
    ["a benchmarking network", "postgres", pg("198.18.0.1"), /may not reach/],
    ["0.0.0.0/8", "postgres", pg("0.1.2.3"), /may not reach/],
    ["two hosts", "postgres", { connection_string: "postgres://u:p@db1.example.com,127.0.0.1/shop" }, /one host only/],
    ["a password holding @", "postgres", { connection_string: "postgres://u:p@ss@127.0.0.1/shop" }, /may not reach 127\.0\.0\.1/],
    ["this database", "postgres", { connection_string: db.ownerUrl }, /may not reach/],
    ["mysql on localhost", "mysql", { host: "localhost", user: "root", database: "test" }, /may not reach localhost/],
    ["mysql on 127.0.0.1", "mysql", { host: "127.0.0.1", user: "root", database: "test" }, /may not reach/],
    ["mysql on ::1", "mysql", { host: "::1", user: "root", database: "test" }, /may not reach/],
    ["mysql on a private network", "mysql", { host: "10.1.1.1", user: "root", database: "test" }, /may not reach/],
    ["mysql on the metadata service", "mysql", { host: "169.254.169.254", user: "root", database: "test" }, /may not reach/],
    ["mysql with no host", "mysql", { user: "root", database: "test" }, /need host/],
    ["an unknown kind", "file", { path: "/etc/passwd" }, /kind must be/],
  ];
  for (const [what, kind, credentials, expected] of attacks) {
    it(`refuses ${what} in production`, async () => {
      await production(true);
      try {
        await refused(() => gql(tokens.viewer!, `mutation($k: String!, $c: JSON!) { createConnectorAccount(input: { kind: $k, name: "x", credentials: $c }) { result { rowId summary } } }`,
          { k: kind, c: credentials }) as any, expected);
      } finally {
        await production(false);
      }
    });
  }

  it("never shows a password in an account's summary", async () => {
    const created = await gql(tokens.viewer!, `mutation($c: JSON!) { createConnectorAccount(input: { kind: "postgres", name: "x", credentials: $c }) { result { summary } } }`,
      { c: { connection_string: "postgres://reader:p@ss:w0rd-canary@db.example.com:5433/shop?sslmode=require" } });
    expect((created as any).data.createConnectorAccount.result.summary).toBe("postgres://reader@db.example.com:5433/shop");
  });

  describe("at connect time", () => {
    let worker: Worker;
    beforeAll(async () => {
      worker = await startWorker({ ownerUrl: db.ownerUrl, concurrency: 1, credentialsKey: TEST_CREDENTIALS_KEY });
    });
    afterAll(async () => {
      await worker?.stop();
    });
    const testAccount = async (credentials: Record<string, unknown>) => {
      const created = await gql(tokens.viewer!, `mutation($c: JSON!) { createConnectorAccount(input: { kind: "postgres", name: "x", credentials: $c }) { result { rowId } } }`, { c: credentials });
      const id = (created as any).data.createConnectorAccount.result.rowId;
      const job = await gql(tokens.viewer!, `mutation($a: BigInt!) { testConnectorAccount(input: { accountId: $a }) { result { rowId } } }`, { a: id });
      return settled((job as any).data.testConnectorAccount.result.rowId);
    };

    it("refuses this installation's own database, however it is named", async () => {
      const u = new URL(db.ownerUrl);
      for (const host of ["127.0.0.1", "localhost"]) {
        u.hostname = host;
        const job = await testAccount({ connection_string: u.toString() });
        expect(job.state).toBe("failed");
        expect(job.error).toMatch(/Snapbase's own database/);
      }
    });

    it("checks the address a name resolves to, not only the name", async () => {
      // 0x7f.1 is not an address PostgreSQL's inet reads, so it passes as a name; it resolves to 127.0.0.1.
      const created = await gql(tokens.viewer!, `mutation($c: JSON!) { createConnectorAccount(input: { kind: "postgres", name: "x", credentials: $c }) { result { rowId } } }`,
        { c: { connection_string: "postgres://reader:secret@0x7f.1:5432/shop" } });
      const id = (created as any).data.createConnectorAccount.result.rowId;
      await production(true);
      try {
        const job = await gql(tokens.viewer!, `mutation($a: BigInt!) { testConnectorAccount(input: { accountId: $a }) { result { rowId } } }`, { a: id });
        const done = await settled((job as any).data.testConnectorAccount.result.rowId);
        expect(done.state).toBe("failed");
        expect(done.error).toMatch(/may not reach 0x7f\.1 \(127\.0\.0\.1\)/);
      } finally {
        await production(false);
      }
    });
  });
});

describe("secrets", () => {
  it("no request role can read the credentials key pair's secret half or any connector secret", async () => {
    for (const role of ["anonymous", "viewer", "editor", "admin", "agent"] as const) {
      const { rows } = await owner().query(
        `select has_table_privilege($1, 'snapbase_private.settings', 'SELECT') as settings,
                has_table_privilege($1, 'snapbase_private.connector_credentials', 'SELECT') as credentials,
                has_function_privilege($1, 'snapbase_private.account_credentials(bigint, bytea)', 'EXECUTE') as opener`,
        [db.roles[role]]);
      expect(rows[0]).toEqual({ settings: false, credentials: false, opener: false });
    }
  });
});
