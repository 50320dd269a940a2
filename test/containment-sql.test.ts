// Containment of SQL text: workbook filters and change SQL.
// Each attack must be refused with a clear error and leave no trace (see containment.ts).
import { describe, expect, it } from "vitest";
import { containmentSuite, server, tokens, CANARY, SCHEMA, canaries, tableId, otherTableId, responses, gql, traces, refused } from "./containment.ts";
import { db, http, owner } from "./helpers.ts";

containmentSuite();

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
