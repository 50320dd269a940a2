// Red-team findings on filters, kept as regression tests: each failed while the weakness it names existed.
import { randomBytes } from "node:crypto";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { createUser, db, graphql, http, owner, startTestServer, TEST_PASSWORD, type TestUser } from "./helpers.ts";

let server: RunningServer;
let alice: TestUser, mallory: TestUser, admin: TestUser;
const tokens: Record<string, string> = {};
const RUN = randomBytes(4).toString("hex");
const SECRET = `tenant-secret-${RUN}`;
let aliceTable: string, aliceRel: string, malloryTable: string;

async function gql(token: string, query: string, variables: Record<string, unknown> = {}) {
  return (await graphql(server.url, query, variables, token)).body as any;
}

async function relOf(tableId: string): Promise<string> {
  return (await owner().query("select snapbase_private.table_rel(t) as r from snapbase.workbook_tables t where id = $1", [tableId])).rows[0].r;
}

beforeAll(async () => {
  server = await startTestServer();
  // Alice and Mallory are editors in different organizations (each gets a personal one).
  [alice, mallory, admin] = await Promise.all([createUser("editor", "rt-alice"), createUser("editor", "rt-mallory"), createUser("admin", "rt-fadmin")]);
  for (const [name, u] of Object.entries({ alice, mallory, admin })) {
    tokens[name] = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: u.email, password: TEST_PASSWORD } })).body.token;
  }
  const table = async (token: string, name: string) => {
    const wb = (await gql(token, `mutation($n: String!) { createWorkbook(input: { name: $n }) { result { rowId } } }`, { n: name })).data.createWorkbook.result.rowId;
    const t = (await gql(token, `mutation($w: BigInt!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: "T", columns: $c }) { result { rowId } } }`,
      { w: wb, c: [{ name: "id", type: "integer" }, { name: "name", type: "text" }, { name: "salary", type: "text" }] })).data.addWorkbookTable.result.rowId;
    return { wb, t };
  };
  aliceTable = (await table(tokens.alice!, "Alice's")).t;
  aliceRel = await relOf(aliceTable);
  malloryTable = (await table(tokens.mallory!, "Mallory's")).t;
  await owner().query(`insert into ${aliceRel} (id, name, salary) values (1, '${SECRET}', '${SECRET}-salary')`);
  await owner().query(`insert into ${await relOf(malloryTable)} (id, name, salary) values (1, 'mallory', '1')`);
});

afterAll(async () => {
  await server?.close();
});

describe("a stored filter means what was checked, in every session", () => {
  // Checked with standard_conforming_strings on: `'p\''` is one string literal, so the whole
  // text is `name = <literal>`. Spliced by filter_clause() and re-lexed with it off (a psql
  // session, a database or role default, or a pooled connection left that way), `\'` is an
  // escaped quote: the literal ends early, and the subquery and comment become SQL run by the
  // filter reader, which may read every workbook table of every organization.
  const filter = () => `name = 'p\\'' or (select string_agg(name, chr(44)) from ${aliceRel})::int > 0 -- '`;

  it("set_table_filter accepts it, as a comparison with a literal", async () => {
    const set = await gql(tokens.mallory!, `mutation($t: BigInt!, $f: String!) { setTableFilter(input: { tableId: $t, filter: $f }) { result { filter } } }`,
      { t: malloryTable, f: filter() });
    // If this is refused the rest of the attack is moot; the refusal is the fix.
    expect(set.errors?.[0]?.message ?? "accepted").toBe("accepted");
  });

  it("reading Mallory's table in a session with standard_conforming_strings off does not read Alice's workbook", async () => {
    const c = new pg.Client({ connectionString: db.authenticatorUrl });
    await c.connect();
    try {
      await c.query("set standard_conforming_strings = off");
      await c.query("begin");
      await c.query("select set_config('role', $1, true), set_config('jwt.claims.user_id', $2, true)", [db.roles.editor, mallory.id]);
      const outcome = await c.query("select snapbase.workbook_records($1) as r", [malloryTable]).then((r) => JSON.stringify(r.rows[0].r), (e) => `error: ${e.message}`);
      expect(outcome).not.toContain(SECRET);
    } finally {
      await c.end();
    }
  });
});

describe("agents never see hidden columns or tables anywhere", () => {
  it("an agent token cannot read a hidden table's rows, nor hidden column names through allWorkbookTables", async () => {
    const wb = (await gql(tokens.alice!, `mutation { createWorkbook(input: { name: "Agent's" }) { result { rowId } } }`)).data.createWorkbook.result.rowId;
    const add = async (name: string) => (await gql(tokens.alice!, `mutation($w: BigInt!, $n: String!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: $n, columns: $c }) { result { rowId } } }`,
      { w: wb, n: name, c: [{ name: "id", type: "integer" }, { name: "name", type: "text" }, { name: "salary_band", type: "text" }] })).data.addWorkbookTable.result.rowId;
    const visible = await add("Visible");
    const hiddenTable = await add("Hidden payroll");
    await owner().query(`insert into ${await relOf(hiddenTable)} (id, name, salary_band) values (1, '${SECRET}-hidden-table', 'x')`);
    await gql(tokens.alice!, `mutation($t: BigInt!) { updateTableSettings(input: { tableId: $t, hiddenColumns: ["salary_band"] }) { clientMutationId } }`, { t: visible });
    await gql(tokens.alice!, `mutation($t: BigInt!) { setTableFilter(input: { tableId: $t, filter: "salary_band = 'exec'" }) { clientMutationId } }`, { t: visible });
    await gql(tokens.alice!, `mutation($t: BigInt!) { setWorkbookTableHidden(input: { tableId: $t, hidden: true }) { clientMutationId } }`, { t: hiddenTable });
    const agent = (await gql(tokens.alice!, `mutation($w: BigInt!) { createAgentToken(input: { workbookId: $w, name: "bot" }) { result } }`, { w: wb })).data.createAgentToken.result;

    const rows = await gql(agent, `query($t: BigInt!) { workbookRecords(tableId: $t) }`, { t: hiddenTable });
    const tables = await gql(agent, `{ allWorkbookTables { nodes { rowId name hidden columns hiddenColumns filter filterColumns } } }`);
    expect.soft(JSON.stringify(rows), "the agent read a hidden table's records").not.toContain(`${SECRET}-hidden-table`);
    expect.soft(JSON.stringify(tables), "the agent saw a hidden column's name (columns, hiddenColumns, filter, filterColumns)").not.toContain("salary_band");
    expect.soft(JSON.stringify(tables), "the agent saw the hidden table").not.toContain("Hidden payroll");
  });
});

describe("the whole chain, over HTTP only", () => {
  it("an approved change cannot turn standard_conforming_strings off on a pooled connection (and so read another organization's workbook)", async () => {
    // Mallory submits change SQL whose set_config call is hidden from the tree reader by
    // quoted aliases (see redteam-change-sql.test.ts); an admin approves it; the setting stays
    // on the admin's pooled connection; Mallory's next reads on that connection run her filter
    // with the subquery against Alice's workbook, and its error message carries Alice's data.
    const S = `rtf_${RUN}`;
    await owner().query(`create schema ${S}; grant usage on schema ${S} to ${db.roles.viewer};
      create table ${S}.t (id int primary key, name text); insert into ${S}.t values (1, 'x');
      grant select on ${S}.t to ${db.roles.viewer}; select snapbase.register_table('${S}.t')`);
    const sql = `update ${S}.t t set name = x.v from (select 1 as "a""b", set_config('standard_conforming_strings', 'off', false) as v, 2 as "c""d") x where t.id = 1`;
    const submitted = await gql(tokens.mallory!, `mutation($t: RegClass!, $s: String!) { submitChange(input: { target: $t, sql: $s }) { result { rowId } } }`, { t: `${S}.t`, s: sql });
    if (!submitted.errors) {
      await gql(tokens.admin!, `mutation($id: BigInt!) { approveChange(input: { changeId: $id }) { result { status } } }`, { id: submitted.data.submitChange.result.rowId });
    }
    const answers: string[] = [];
    for (let round = 0; round < 5; round++) {
      const batch = await Promise.all(Array.from({ length: 20 }, () =>
        gql(tokens.mallory!, `query($t: BigInt!) { workbookRecords(tableId: $t) }`, { t: malloryTable }).then((b) => JSON.stringify(b))));
      answers.push(...batch);
    }
    expect(answers.filter((a) => a.includes(SECRET)), "Mallory read Alice's workbook").toEqual([]);
  });
});
