// Red-team findings on change SQL, kept as regression tests: each failed while the weakness it names existed.
// An editor submits over GraphQL, a different admin approves over GraphQL, as in
// production; the assertions state what the security model promises.
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { createUser, db, graphql, http, owner, startTestServer, TEST_PASSWORD, type TestUser } from "./helpers.ts";

let server: RunningServer;
let editor: TestUser, admin: TestUser;
const tokens: Record<string, string> = {};
const RUN = randomBytes(4).toString("hex");
const S = `rtc_${RUN}`;
const SECRET = `secret-${RUN}`;

async function gql(token: string, query: string, variables: Record<string, unknown> = {}) {
  return (await graphql(server.url, query, variables, token)).body as any;
}

/** Submits as the editor: the GraphQL body (errors or the new id). */
async function submit(table: string, sql: string) {
  return gql(tokens.editor!, `mutation($t: RegClass!, $s: String!) { submitChange(input: { target: $t, sql: $s }) { result { rowId } } }`, { t: table, s: sql });
}

/** Approves as the admin: { status, errorMessage }. */
async function approve(id: string) {
  const res = await gql(tokens.admin!, `mutation($id: BigInt!) { approveChange(input: { changeId: $id }) { result { status errorMessage } } }`, { id });
  return res.data?.approveChange?.result ?? { status: "error", errorMessage: res.errors?.[0]?.message };
}

/** Submits and, when the submission is accepted, approves. Returns what happened. */
async function submitAndApprove(table: string, sql: string) {
  const submitted = await submit(table, sql);
  if (submitted.errors) return { refusedAtSubmission: submitted.errors[0].message as string };
  return { approval: await approve(submitted.data.submitChange.result.rowId) };
}

beforeAll(async () => {
  server = await startTestServer();
  [editor, admin] = await Promise.all([createUser("editor", "rt-editor"), createUser("admin", "rt-admin")]);
  for (const [name, u] of Object.entries({ editor, admin })) {
    tokens[name] = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: u.email, password: TEST_PASSWORD } })).body.token;
  }
  await owner().query(`
    create schema ${S};
    grant usage on schema ${S} to ${db.roles.viewer};
    -- The managed table: editors may read id and name, not secret.
    create table ${S}.target (id int primary key, name text, secret text);
    insert into ${S}.target values (1, 'one', '${SECRET}-target-column'), (2, 'two', null);
    grant select (id, name) on ${S}.target to ${db.roles.viewer};
    -- Another table with a column editors may not read.
    create table ${S}.people (id int primary key, email text, salary text);
    insert into ${S}.people values (1, 'a@example.com', '${SECRET}-salary');
    grant select (id, email) on ${S}.people to ${db.roles.viewer};
    -- A table under row-level security: each user sees their own notes, viewers (editors) only EU ones.
    create table ${S}.notes (id int primary key, owner_id bigint, region text, body text);
    insert into ${S}.notes values (1, ${editor.id}, 'eu', 'the editor''s note'), (2, ${admin.id}, 'us', '${SECRET}-admin-note');
    alter table ${S}.notes enable row level security;
    create policy own on ${S}.notes for select using (owner_id = nullif(current_setting('jwt.claims.user_id', true), '')::bigint);
    create policy eu_only on ${S}.notes as restrictive for select to ${db.roles.viewer} using (region = 'eu');
    grant select on ${S}.notes to ${db.roles.viewer};
    -- A table that depends on the managed one, which editors may neither read nor write.
    create table ${S}.invoices (id int primary key, target_id int references ${S}.target (id) on delete cascade, amount int);
    insert into ${S}.invoices values (10, 2, 100);
    select snapbase.register_table('${S}.target');`);
});

afterAll(async () => {
  await server?.close();
});

async function targetName(id = 1): Promise<string | null> {
  return (await owner().query(`select name from ${S}.target where id = $1`, [id])).rows[0]?.name ?? null;
}

describe("change SQL reads only what its submitter may read", () => {
  it("a whole-row reference to another table does not read columns the submitter may not read", async () => {
    // The editor may read people.id and people.email; the change names people.id (readable)
    // and the whole row p (which carries salary). pg_depend records the whole row as objsubid 0,
    // which the column check ignores; the runner is then granted SELECT on the whole table.
    const outcome = await submitAndApprove(`${S}.target`,
      `update ${S}.target t set name = (select p::text from ${S}.people p where p.id = 1) where t.id = 1`);
    const name = await targetName();
    expect(name ?? "", `the salary column was copied into a column the editor reads: ${JSON.stringify(outcome)}`).not.toContain(`${SECRET}-salary`);
    expect(outcome.refusedAtSubmission ?? outcome.approval?.errorMessage).toMatch(/people|may not read/);
  });

  it("a whole-row reference to the target does not read its unreadable columns", async () => {
    const outcome = await submitAndApprove(`${S}.target`, `update ${S}.target t set name = row_to_json(t)::text where t.id = 1`);
    const name = await targetName();
    expect(name ?? "", `target.secret was copied into target.name: ${JSON.stringify(outcome)}`).not.toContain(`${SECRET}-target-column`);
  });

  it("a failing change does not put unreadable columns into its error message", async () => {
    const outcome = await submitAndApprove(`${S}.target`,
      `update ${S}.target t set name = name where t.id = (select p::text from ${S}.people p where p.id = 1)::int`);
    expect(JSON.stringify(outcome)).not.toContain(`${SECRET}-salary`);
  });

  it("row-level security applies as for the submitter, not as for the change runner under the approver's claims", async () => {
    // The editor reads only its own EU note. At approval the change runs as the change runner
    // (not a member of the viewer role, so the restrictive policy does not apply to it) inside the
    // approving admin's transaction (so jwt.claims.user_id is the admin's).
    const outcome = await submitAndApprove(`${S}.target`,
      `update ${S}.target t set name = (select string_agg(n.body, ',') from ${S}.notes n) where t.id = 1`);
    const name = await targetName();
    expect(name ?? "", `the change read a note the editor cannot see: ${JSON.stringify(outcome)}`).not.toContain(`${SECRET}-admin-note`);
  });
});

describe("change SQL writes only its declared table", () => {
  it("a delete does not cascade into another table through a foreign key", async () => {
    const outcome = await submitAndApprove(`${S}.target`, `delete from ${S}.target where id = 2`);
    const { rows } = await owner().query(`select count(*)::int as n from ${S}.invoices`);
    expect(rows[0].n, `an invoice (a table the editor may neither read nor write) was deleted: ${JSON.stringify(outcome)}`).toBe(1);
  });
});

describe("the function allow-list cannot be hidden from the parse-tree reader", () => {
  // node_fields() tokenises nodeToString output, but outToken() does not escape a `"`
  // inside a name (nor a leading `[`): an alias such as "a""b" opens a quoted token that
  // swallows the following fields up to the next `"`, so a FUNCEXPR between two such
  // aliases is never seen by tree_problems(). Built-in functions leave no pg_depend rows.
  const hidden = (call: string) =>
    `update ${S}.target t set name = x.v from (select 1 as "a""b", (${call})::text as v, 2 as "c""d") x where t.id = 1`;
  const hiddenByBracket = (call: string) =>
    `update ${S}.target t set name = x.v from (select 1 as "[x", (${call})::text as v, 'c' as c) x where t.id = 1`;

  for (const [what, sql, expected] of [
    ["set_config", hidden(`set_config('jwt.claims.user_id', '1', false)`), /set_config/],
    ["query_to_xml", hidden(`query_to_xml('select current_user', true, true, '')`), /query_to_xml/],
    ["pg_advisory_lock (hidden by a leading [)", hiddenByBracket(`pg_advisory_lock(4242)`), /pg_advisory_lock/],
    ["lo_from_bytea", hidden(`lo_from_bytea(0, 'x')`), /lo_from_bytea/],
    ["pg_sleep", hidden(`pg_sleep(0)`), /pg_sleep/],
  ] as const) {
    it(`refuses ${what} wherever it sits in the tree`, async () => {
      const submitted = await submit(`${S}.target`, sql);
      expect(submitted.errors?.[0]?.message ?? `accepted as change ${submitted.data?.submitChange?.result?.rowId}`).toMatch(expected);
    });
  }

  it("refuses a write to another table hidden the same way (the runner's grants still stop it at approval)", async () => {
    const submitted = await submit(`${S}.target`,
      `with "a""b" as (select 1), d as (delete from ${S}.people where id = 1 returning id), "c""d" as (select 1) update ${S}.target t set name = 'x' where t.id = (select id from d)`);
    expect(submitted.errors?.[0]?.message ?? `accepted as change ${submitted.data?.submitChange?.result?.rowId}`).toMatch(/may modify only/);
  });

  it("so an approved change cannot leave an identity on a pooled connection", async () => {
    // The change sets jwt.claims.user_id at session level on the approving admin's pooled
    // authenticator connection; nothing resets connections when they go back to the pool.
    const outcome = await submitAndApprove(`${S}.target`, hidden(`set_config('jwt.claims.user_id', '${admin.id}', false)`));
    let seen: unknown[] = [];
    for (let round = 0; round < 5; round++) {
      const answers = await Promise.all(Array.from({ length: 20 }, () => graphql(server.url, "{ currentUserId }").then((r) => r.body.data?.currentUserId)));
      seen = seen.concat(answers.filter((a) => a !== null));
    }
    expect(seen, `anonymous requests ran as user ${admin.id} after ${JSON.stringify(outcome)}`).toEqual([]);
  });
});
