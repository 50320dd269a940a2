// Tenants: another organization's ids answer exactly like ids that do not exist,
// for every function that takes one (the list comes from the catalog, so a new
// function is covered without touching this file), and no table lists another
// tenant's rows. Organization members join by invitation only.
import type pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import {
  type Actor, actorOf, asActor, authenticator, createUser, graphql, owner, settingsFor, startTestServer, tokenFor, type TestUser,
} from "./helpers.ts";

/** The kinds of tenant-owned ids, by the name functions give their parameter. */
const ID_KINDS: Record<string, Kind> = {
  workbook_id: "workbook", table_id: "table", record_id: "record", job_id: "job", account_id: "account",
  import_id: "import", file_id: "file", link_id: "link", organization_id: "organization", invitation_id: "invitation",
};
const ARRAY_ID_KINDS: Record<string, Kind> = { table_ids: "table" };
type Kind = "workbook" | "table" | "record" | "job" | "account" | "import" | "file" | "link" | "organization" | "invitation";

/** An id that exists nowhere. */
const MISSING = "9123456789012345";

/** Plausible values for the other parameters, by name, so that the id check is what answers. */
const OTHER_ARGS: Record<string, unknown> = {
  name: "x", email: "nobody-in-particular@example.com", values: {}, operations: [], filter: "true", hidden: true,
  credentials: { connection_string: "postgres://u:pw@127.0.0.1:1/db" }, remote_table: "public.x", remote_tables: ["public.x"],
  action: "delete", mode: "records", mapping: null, key_column: null, header: ["name"], rows: [], column_types: {},
  version: null, use_filter: false, expires_at: null, access: "viewer", column_name: "name", type: "text", reason: "x",
  within_filter: false, columns: [{ name: "a", type: "text" }], managed_table: "public.x", force: false, kind: "postgres",
  hidden_columns: null, column_order: null, sort_column: null, sort_descending: null, title_column: null, page_size: null,
  remote_id_column: null, after: null, descending: null, include_deleted: null, max_records: null, sample_rows: null,
  skip_bad_rows: false, after_id: null, max_events: null, user_id: "1", skip_unchanged: true, empty_cells: "skip", all_columns: false,
  keep: "theirs", publish_state: null,
};

interface World {
  user: TestUser;
  ids: Record<Kind, string>;
  /** Further ids of the same kinds (a finished job, an account-level job). */
  more: Partial<Record<Kind, string[]>>;
  token?: string;
}

/** Runs fn as the actor in a transaction that commits. */
async function committed<T>(actor: Actor, fn: (c: pg.PoolClient) => Promise<T>): Promise<T> {
  const client = await authenticator().connect();
  try {
    await client.query("begin");
    const s = settingsFor(actor);
    await client.query("select set_config(k, v, true) from unnest($1::text[], $2::text[]) s(k, v)", [Object.keys(s), Object.values(s)]);
    const result = await fn(client);
    await client.query("commit");
    return result;
  } catch (error) {
    await client.query("rollback").catch(() => {});
    throw error;
  } finally {
    client.release();
  }
}

const one = async (c: pg.ClientBase | pg.Pool, sql: string, params: unknown[] = []) => String(Object.values((await c.query(sql, params)).rows[0])[0]);

/** A user with one of everything: organization, workbook, table, record, jobs, account, file, import, share link, invitation. */
async function world(role: TestUser["role"], label: string): Promise<World> {
  const user = await createUser(role, label);
  const ids = await committed(actorOf(user), async (c) => {
    const wb = (await c.query("select id, organization_id from snapbase.create_workbook($1)", [`${label}'s workbook`])).rows[0];
    const table = await one(c, "select id from snapbase.add_workbook_table($1, 'Items', $2)", [wb.id, JSON.stringify([{ name: "name", type: "text" }, { name: "qty", type: "integer" }])]);
    const account = await one(c, "select id from snapbase.create_connector_account('postgres', 'Source', $1)", [{ connection_string: "postgres://someone:pw@127.0.0.1:1/db" }]);
    const file = await one(c, "select id from snapbase.upload_csv_file('people.csv', $1)", ["name,qty\nada,1\n"]);
    const imp = await one(c, "select id from snapbase.start_csv_import($1, '{name,qty}')", [table]);
    await c.query("select snapbase.create_share_link($1)", [table]);
    const link = await one(c, "select id from snapbase.share_links where table_id = $1", [table]);
    const invitation = await one(c, "select id from snapbase.invite_organization_member($1, $2)", [wb.organization_id, `invitee-of-${label}@example.com`]);
    return { workbook: String(wb.id), organization: String(wb.organization_id), table, account, file, import: imp, link, invitation };
  });
  // A record with an id no other table has; jobs written as the worker would leave them.
  const rel = await one(owner(), "select snapbase_private.table_rel(t) from snapbase.workbook_tables t where id = $1", [ids.table]);
  const record = await one(owner(), `insert into ${rel} (__id, name, qty) overriding system value
                                      values ((select coalesce(max(__id), 0) from ${rel}) + 7000000 + floor(random() * 1000000)::int, 'secret', 1) returning __id`);
  const job = await one(owner(), "insert into snapbase.jobs (kind, workbook_id, table_id, created_by) values ('download', $1, $2, $3) returning id", [ids.workbook, ids.table, user.id]);
  const done = await one(owner(), "insert into snapbase.jobs (kind, workbook_id, created_by, state) values ('publish', $1, $2, 'succeeded') returning id", [ids.workbook, user.id]);
  const accountJob = await one(owner(), "insert into snapbase.jobs (kind, connector_account_id, created_by) values ('test_connection', $1, $2) returning id", [ids.account, user.id]);
  return { user, ids: { ...ids, record, job }, more: { job: [done, accountJob] } };
}

/** The error a statement raises (or what it returns), in a savepoint so the transaction goes on. */
async function outcome(c: pg.ClientBase, sql: string, params: unknown[]): Promise<{ code: string; message: string }> {
  await c.query("savepoint probe");
  try {
    return { code: "ok", message: JSON.stringify((await c.query(sql, params)).rows) };
  } catch (error) {
    const e = error as { code?: string; message: string };
    return { code: e.code ?? "", message: e.message };
  } finally {
    await c.query("rollback to savepoint probe");
  }
}

interface Fn {
  sig: string;
  name: string;
  args: { name: string; type: string; hasDefault: boolean }[];
}

/** Every function of the API taking a tenant's id, from the catalog. */
async function functionsTakingIds(): Promise<Fn[]> {
  const { rows } = await owner().query(`
    select p.oid::regprocedure::text as sig, p.proname as name,
           (select jsonb_agg(jsonb_build_object('name', a.name, 'type', format_type(a.type, null), 'hasDefault', a.ord > p.pronargs - p.pronargdefaults) order by a.ord)
              from unnest(p.proargtypes::oid[], (select array_agg(n order by o) from unnest(p.proargnames, coalesce(p.proargmodes, array_fill('i'::"char", array[cardinality(p.proargnames)]))) with ordinality x(n, m, o) where m in ('i', 'b', 'v')))
                   with ordinality a(type, name, ord)) as args
      from pg_proc p
     where p.pronamespace = 'snapbase'::regnamespace and p.prokind = 'f' and p.proargnames && $1::text[]
     order by 1`, [[...Object.keys(ID_KINDS), ...Object.keys(ARRAY_ID_KINDS)]]);
  return rows.map((r): Fn => ({ sig: r.sig, name: r.name, args: r.args ?? [] })).filter((f) => f.args.some((a) => a.name in ID_KINDS || a.name in ARRAY_ID_KINDS));
}

/** A call of fn: the id parameter at `position` gets `id`, every other id parameter the caller's own. */
function callOf(fn: Fn, position: number, id: string, own: World): { sql: string; params: unknown[] } {
  const params: unknown[] = [];
  const parts: string[] = [];
  fn.args.forEach((a, i) => {
    let value: unknown;
    if (a.name in ID_KINDS) value = i === position ? id : own.ids[ID_KINDS[a.name]!];
    else if (a.name in ARRAY_ID_KINDS) value = [i === position ? id : own.ids[ARRAY_ID_KINDS[a.name]!]];
    else if (a.name in OTHER_ARGS) {
      if (a.hasDefault) return;
      value = OTHER_ARGS[a.name];
    } else throw new Error(`${fn.sig}: add a plausible value for its parameter ${a.name} to OTHER_ARGS`);
    params.push(value !== null && /^jsonb?$/.test(a.type) ? JSON.stringify(value) : value);
    parts.push(`"${a.name}" => $${params.length}::${a.type}`);
  });
  return { sql: `select * from snapbase.${fn.name}(${parts.join(", ")})`, params };
}

/** A message with the ids compared replaced by N (in both answers alike, in case one of them also appears there for another reason). */
const normalized = (message: string, ...ids: string[]) => ids.reduce((m, id) => m.split(id).join("N"), message);

let server: RunningServer;
let victim: World;
let outsiders: { label: string; world: World; actor: Actor }[];

beforeAll(async () => {
  server = await startTestServer();
  victim = await world("editor", "victim");
  const [editor, viewer, admin] = await Promise.all([world("editor", "outsider"), world("viewer", "outsider-viewer"), world("admin", "outsider-admin")]);
  outsiders = [
    { label: "an editor of another organization", world: editor, actor: actorOf(editor.user) },
    { label: "a viewer of another organization", world: viewer, actor: actorOf(viewer.user) },
    { label: "an admin of another organization", world: admin, actor: actorOf(admin.user) },
    { label: "an agent of another organization's workbook", world: editor,
      actor: { role: "agent", userId: editor.user.id, email: editor.user.email, extra: { "jwt.claims.workbook_id": editor.ids.workbook } } },
  ];
});
afterAll(async () => {
  await server?.close();
});

describe("cancel_job", () => {
  it("refuses another organization's job exactly like a missing one, without saying its state", async () => {
    const outsider = outsiders[0]!;
    const token = await tokenFor(outsider.world.user);
    const cancel = (id: string) => graphql(server.url, `mutation($j: BigInt!) { cancelJob(input: { jobId: $j }) { result { state } } }`, { j: id }, token);
    for (const id of [victim.ids.job, ...victim.more.job!]) {
      const res = await cancel(id);
      expect(res.body.errors?.[0], `job ${id}`).toMatchObject({ message: `no job ${id}`, extensions: { code: "P0002" } });
    }
    expect((await cancel(MISSING)).body.errors?.[0]).toMatchObject({ message: `no job ${MISSING}`, extensions: { code: "P0002" } });
    const { rows } = await owner().query("select state, cancel_requested from snapbase.jobs where id = $1", [victim.ids.job]);
    expect(rows[0]).toEqual({ state: "queued", cancel_requested: false });
    // Its owner still may, and learns the state of a finished one.
    const mine = await graphql(server.url, `mutation($j: BigInt!) { cancelJob(input: { jobId: $j }) { result { state } } }`, { j: victim.more.job![0] }, await tokenFor(victim.user));
    expect(mine.body.errors?.[0]?.message).toBe(`job ${victim.more.job![0]} is succeeded, not queued or running`);
  });
});

describe("every function taking a tenant's id", () => {
  it("answers another organization's id exactly as a missing one", async () => {
    const fns = await functionsTakingIds();
    expect(fns.length).toBeGreaterThan(40);
    const problems: string[] = [];
    let compared = 0;
    for (const { label, world: own, actor } of outsiders) {
      await asActor(actor, async (c) => {
        const callable = new Set((await c.query("select p.oid::regprocedure::text as sig from pg_proc p where p.pronamespace = 'snapbase'::regnamespace and has_function_privilege(p.oid, 'execute')")).rows.map((r) => r.sig));
        for (const fn of fns) {
          if (!callable.has(fn.sig)) continue;
          for (const [position, a] of fn.args.entries()) {
            const kind = ID_KINDS[a.name] ?? ARRAY_ID_KINDS[a.name];
            if (!kind) continue;
            for (const theirs of [victim.ids[kind], ...(victim.more[kind] ?? [])]) {
              const other = callOf(fn, position, theirs, own);
              const missing = callOf(fn, position, MISSING, own);
              const [got, expected] = [await outcome(c, other.sql, other.params), await outcome(c, missing.sql, missing.params)];
              compared++;
              const where = `${label}: ${fn.sig} with ${a.name} = another organization's ${kind}`;
              // Equal answers (a record id inside one's own table may even succeed alike);
              // an id that names something of another tenant's must be refused as missing.
              if (got.code !== expected.code || normalized(got.message, MISSING, theirs) !== normalized(expected.message, MISSING, theirs)) {
                problems.push(`${where}: ${got.code} "${got.message}", but for a missing id ${expected.code} "${expected.message}"`);
              } else if (kind !== "record" && !(a.name in ARRAY_ID_KINDS) && !["P0002", "42501"].includes(got.code)) {
                problems.push(`${where}: ${got.code} "${got.message}" is not a "no such" answer (P0002)`);
              }
            }
          }
        }
        // Event topics name ids too.
        for (const [kind, prefix] of [["workbook", "workbook"], ["account", "account"]] as const) {
          const got = await outcome(c, "select * from snapbase.visible_events($1)", [`${prefix}:${victim.ids[kind]}`]);
          const expected = await outcome(c, "select * from snapbase.visible_events($1)", [`${prefix}:${MISSING}`]);
          if (got.code === "ok" || got.code !== expected.code || normalized(got.message, MISSING, victim.ids[kind]) !== normalized(expected.message, MISSING, victim.ids[kind])) {
            problems.push(`${label}: visible_events('${prefix}:…'): ${JSON.stringify(got)} vs ${JSON.stringify(expected)}`);
          }
        }
      });
    }
    expect(problems).toEqual([]);
    expect(compared).toBeGreaterThan(150);
  });

  it("lists none of another organization's rows in any table", async () => {
    const TABLE_KINDS: Record<string, Kind> = {
      workbooks: "workbook", workbook_tables: "table", jobs: "job", connector_accounts: "account", csv_files: "file",
      csv_imports: "import", share_links: "link", organizations: "organization", organization_invitations: "invitation",
    };
    const COLUMN_KINDS: Record<string, Kind> = {
      workbook_id: "workbook", table_id: "table", connector_account_id: "account", organization_id: "organization",
      file_id: "file", import_id: "import", link_id: "link", job_id: "job",
    };
    const problems: string[] = [];
    let victimSees = 0;
    for (const { label, actor } of [...outsiders, { label: "the victim", actor: actorOf(victim.user) }]) {
      await asActor(actor, async (c) => {
        const { rows: columns } = await c.query(`
          select c.relname as table, a.attname as column
            from pg_class c join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
           where c.relnamespace = 'snapbase'::regnamespace and c.relkind in ('r', 'v', 'm', 'p')
             and has_column_privilege(c.oid, a.attnum, 'select')`);
        for (const { table, column } of columns) {
          const kind = column === "id" ? TABLE_KINDS[table] : COLUMN_KINDS[column];
          if (!kind) continue;
          const theirs = [victim.ids[kind], ...(victim.more[kind] ?? [])];
          const n = Number(await one(c, `select count(*) from snapbase.${table} where ${column}::text = any ($1)`, [theirs]));
          if (label === "the victim") victimSees += n;
          else if (n > 0) problems.push(`${label}: ${table}.${column} lists ${n} of the victim's rows`);
        }
      });
    }
    expect(problems).toEqual([]);
    expect(victimSees).toBeGreaterThan(10); // the queries do find rows
  });
});

describe("organization invitations", () => {
  const gqlAs = async (token: string, query: string, variables: Record<string, unknown> = {}) => (await graphql(server.url, query, variables, token)).body as any;
  const INVITE = `mutation($o: BigInt!, $e: String!) { inviteOrganizationMember(input: { organizationId: $o, email: $e }) { result { rowId organizationId email status expiresAt organizationName invitedByEmail } } }`;
  const membersOf = async (org: string) => (await owner().query("select user_id::text from snapbase.organization_members where organization_id = $1 order by user_id", [org])).rows.map((r) => r.user_id);

  it("answers the same whether or not the email has an account, and adds nobody without their consent", async () => {
    const host = await world("editor", "host");
    const known = await createUser("editor", "Known");
    const token = await tokenFor(host.user);
    const org = host.ids.organization;
    const toKnown = await gqlAs(token, INVITE, { o: org, e: known.email.toUpperCase() });
    const toNobody = await gqlAs(token, INVITE, { o: org, e: `nobody-${known.email}` });
    expect(toKnown.errors).toBeUndefined();
    expect(toNobody.errors).toBeUndefined();
    const shape = (r: any) => ({ ...r.data.inviteOrganizationMember.result, rowId: "id", email: "email", expiresAt: typeof r.data.inviteOrganizationMember.result.expiresAt });
    expect(shape(toKnown)).toEqual(shape(toNobody));
    expect(toKnown.data.inviteOrganizationMember.result).toMatchObject({ email: known.email.toLowerCase(), status: "pending", organizationName: `Personal: ${host.user.email}`, invitedByEmail: host.user.email });
    // Nothing else tells them apart either: the invitations table has no user column.
    const cols = (await owner().query("select attname from pg_attribute where attrelid = 'snapbase.organization_invitations'::regclass and attnum > 0 and not attisdropped")).rows.map((r) => r.attname);
    expect(cols.filter((c) => /user/.test(c) && c !== "invited_by")).toEqual([]);
    expect(await membersOf(org)).toEqual([host.user.id]);
    // Adding a member directly is gone.
    const direct = await gqlAs(token, `mutation($o: BigInt!, $e: String!) { addOrganizationMember(input: { organizationId: $o, email: $e }) { clientMutationId } }`, { o: org, e: known.email });
    expect(direct.errors?.[0]?.message).toMatch(/Cannot query field "addOrganizationMember"/);
    // Inviting again renews the same pending invitation.
    const again = await gqlAs(token, INVITE, { o: org, e: known.email });
    expect(again.data.inviteOrganizationMember.result.rowId).toBe(toKnown.data.inviteOrganizationMember.result.rowId);
    // A malformed address is refused, whoever it might belong to.
    expect((await gqlAs(token, INVITE, { o: org, e: "not an email" })).errors?.[0]?.extensions?.code).toBe("22023");
  });

  it("the invitee sees it when signed in with that email, and accepts or declines it; nobody else can", async () => {
    const host = await world("editor", "host2");
    const [invitee, stranger] = await Promise.all([createUser("viewer", "invitee"), createUser("editor", "stranger")]);
    const [hostToken, inviteeToken, strangerToken] = await Promise.all([tokenFor(host.user), tokenFor(invitee), tokenFor(stranger)]);
    const org = host.ids.organization;
    const invitation = (await gqlAs(hostToken, INVITE, { o: org, e: invitee.email })).data.inviteOrganizationMember.result;
    const LIST = `{ allOrganizationInvitations { nodes { rowId organizationId organizationName invitedByEmail email status } } }`;
    const seen = (await gqlAs(inviteeToken, LIST)).data.allOrganizationInvitations.nodes;
    expect(seen).toEqual([{ rowId: invitation.rowId, organizationId: org, organizationName: `Personal: ${host.user.email}`, invitedByEmail: host.user.email, email: invitee.email.toLowerCase(), status: "pending" }]);
    expect((await gqlAs(strangerToken, LIST)).data.allOrganizationInvitations.nodes.filter((n: any) => n.organizationId === org)).toEqual([]);
    // Someone else cannot accept it: it answers like a missing invitation.
    const ACCEPT = `mutation($i: BigInt!) { acceptOrganizationInvitation(input: { invitationId: $i }) { result { organizationId userId isOwner } } }`;
    expect((await gqlAs(strangerToken, ACCEPT, { i: invitation.rowId })).errors?.[0]).toMatchObject({ message: `no invitation ${invitation.rowId}`, extensions: { code: "P0002" } });
    expect(await membersOf(org)).toEqual([host.user.id]);
    const accepted = await gqlAs(inviteeToken, ACCEPT, { i: invitation.rowId });
    expect(accepted.errors).toBeUndefined();
    expect(accepted.data.acceptOrganizationInvitation.result).toEqual({ organizationId: org, userId: invitee.id, isOwner: false });
    expect(await membersOf(org)).toEqual([host.user.id, invitee.id].sort((a, b) => Number(a) - Number(b)));
    expect((await gqlAs(inviteeToken, `{ allOrganizations { nodes { rowId } } }`)).data.allOrganizations.nodes.map((n: any) => n.rowId)).toContain(org);
    expect((await gqlAs(hostToken, LIST)).data.allOrganizationInvitations.nodes.find((n: any) => n.rowId === invitation.rowId).status).toBe("accepted");
    expect((await gqlAs(inviteeToken, ACCEPT, { i: invitation.rowId })).errors?.[0]?.message).toBe(`invitation ${invitation.rowId} is accepted, not pending`);

    // Declined: no membership, and the host sees that it was declined.
    const other = await world("editor", "host3");
    const second = (await gqlAs(await tokenFor(other.user), INVITE, { o: other.ids.organization, e: invitee.email })).data.inviteOrganizationMember.result;
    const declined = await gqlAs(inviteeToken, `mutation($i: BigInt!) { declineOrganizationInvitation(input: { invitationId: $i }) { result { status } } }`, { i: second.rowId });
    expect(declined.data.declineOrganizationInvitation.result.status).toBe("declined");
    expect(await membersOf(other.ids.organization)).toEqual([other.user.id]);
    expect((await gqlAs(inviteeToken, ACCEPT, { i: second.rowId })).errors?.[0]?.message).toBe(`invitation ${second.rowId} is declined, not pending`);
  });

  it("expires, can be revoked by an owner, is only an owner's to make, and every step is audited", async () => {
    const host = await world("editor", "host4");
    const invitee = await createUser("editor", "late");
    const [hostToken, inviteeToken] = await Promise.all([tokenFor(host.user), tokenFor(invitee)]);
    const org = host.ids.organization;
    const ACCEPT = `mutation($i: BigInt!) { acceptOrganizationInvitation(input: { invitationId: $i }) { clientMutationId } }`;
    const first = (await gqlAs(hostToken, INVITE, { o: org, e: invitee.email })).data.inviteOrganizationMember.result;
    expect(new Date(first.expiresAt).getTime()).toBeGreaterThan(Date.now() + 6 * 86_400_000);
    await owner().query("update snapbase.organization_invitations set expires_at = now() - interval '1 second' where id = $1", [first.rowId]);
    expect((await gqlAs(inviteeToken, ACCEPT, { i: first.rowId })).errors?.[0]).toMatchObject({ message: `invitation ${first.rowId} has expired`, extensions: { code: "55000" } });
    expect((await gqlAs(hostToken, `{ allOrganizationInvitations(condition: { organizationId: "${org}", email: "${invitee.email.toLowerCase()}" }) { nodes { status } } }`)).data.allOrganizationInvitations.nodes.map((n: any) => n.status)).toEqual(["expired"]);
    // Invited again: a new invitation, which the owner revokes before it is accepted.
    const renewed = (await gqlAs(hostToken, INVITE, { o: org, e: invitee.email })).data.inviteOrganizationMember.result;
    expect(renewed.rowId).not.toBe(first.rowId);
    const revoked = await gqlAs(hostToken, `mutation($i: BigInt!) { revokeOrganizationInvitation(input: { invitationId: $i }) { result { status } } }`, { i: renewed.rowId });
    expect(revoked.data.revokeOrganizationInvitation.result.status).toBe("revoked");
    expect((await gqlAs(inviteeToken, ACCEPT, { i: renewed.rowId })).errors?.[0]?.message).toBe(`invitation ${renewed.rowId} is revoked, not pending`);
    // Members who are not owners may not invite; outsiders learn nothing of the organization.
    const third = (await gqlAs(hostToken, INVITE, { o: org, e: invitee.email })).data.inviteOrganizationMember.result;
    await gqlAs(inviteeToken, ACCEPT, { i: third.rowId });
    const byMember = await gqlAs(inviteeToken, INVITE, { o: org, e: "someone@example.com" });
    expect(byMember.errors?.[0]).toMatchObject({ message: `only an owner of organization ${org} may invite members`, extensions: { code: "42501" } });
    const outsider = await tokenFor(outsiders[0]!.world.user);
    expect((await gqlAs(outsider, INVITE, { o: org, e: "someone@example.com" })).errors?.[0]).toMatchObject({ message: `no organization ${org}`, extensions: { code: "P0002" } });
    const { rows } = await owner().query(`select action, actor from snapbase.audit_log where subject_type = 'organization_invitation' and subject_id = any ($1) order by id`,
      [[first.rowId, renewed.rowId, third.rowId].map(String)]);
    expect(rows.map((r) => r.action)).toEqual([
      "invite_organization_member", "invite_organization_member", "revoke_organization_invitation", "invite_organization_member", "accept_organization_invitation",
    ]);
  });
});

describe("leaving an organization", () => {
  it("a member may leave, an owner may remove a member, and their workbook shares end with their membership", async () => {
    const host = await world("editor", "host5");
    const [member, other] = await Promise.all([createUser("editor", "member"), createUser("editor", "other-member")]);
    const [hostToken, memberToken, otherToken] = await Promise.all([tokenFor(host.user), tokenFor(member), tokenFor(other)]);
    const gqlAs = async (token: string, query: string, variables: Record<string, unknown> = {}) => (await graphql(server.url, query, variables, token)).body as any;
    const org = host.ids.organization;
    for (const [u, token] of [[member, memberToken], [other, otherToken]] as const) {
      const inv = (await gqlAs(hostToken, `mutation($o: BigInt!, $e: String!) { inviteOrganizationMember(input: { organizationId: $o, email: $e }) { result { rowId } } }`, { o: org, e: u.email }))
        .data.inviteOrganizationMember.result.rowId;
      await gqlAs(token, `mutation($i: BigInt!) { acceptOrganizationInvitation(input: { invitationId: $i }) { clientMutationId } }`, { i: inv });
      await gqlAs(hostToken, `mutation($w: BigInt!, $e: String!) { shareWorkbook(input: { workbookId: $w, email: $e, access: editor }) { clientMutationId } }`, { w: host.ids.workbook, e: u.email });
    }
    const REMOVE = `mutation($o: BigInt!, $u: BigInt!) { removeOrganizationMember(input: { organizationId: $o, userId: $u }) { result } }`;
    const READ = `query($t: BigInt!) { workbookRecordCounts(tableId: $t) { total } }`;
    expect((await gqlAs(memberToken, READ, { t: host.ids.table })).errors).toBeUndefined();
    // Members who are not owners may not remove others; the last owner may not leave.
    expect((await gqlAs(memberToken, REMOVE, { o: org, u: other.id })).errors?.[0]?.extensions?.code).toBe("42501");
    expect((await gqlAs(hostToken, REMOVE, { o: org, u: host.user.id })).errors?.[0]).toMatchObject({ message: `organization ${org} would have no owner left`, extensions: { code: "55000" } });
    // Leaving, and being removed: the shares go too.
    expect((await gqlAs(memberToken, REMOVE, { o: org, u: member.id })).data.removeOrganizationMember.result).toBe(true);
    expect((await gqlAs(hostToken, REMOVE, { o: org, u: other.id })).data.removeOrganizationMember.result).toBe(true);
    for (const token of [memberToken, otherToken]) {
      expect((await gqlAs(token, READ, { t: host.ids.table })).errors?.[0]?.message).toBe(`no workbook table ${host.ids.table}`);
    }
    expect((await owner().query("select count(*)::int as n from snapbase.workbook_members where workbook_id = $1", [host.ids.workbook])).rows[0].n).toBe(0);
    expect((await owner().query("select user_id::text from snapbase.organization_members where organization_id = $1", [org])).rows).toEqual([{ user_id: host.user.id }]);
  });
});

describe("a member removed from an organization", () => {
  it("loses the workbooks they created there: they go to the remover, the member's agent tokens for them end, audited", async () => {
    const host = await world("editor", "host6");
    const member = await createUser("editor", "creator");
    const [hostToken, memberToken] = await Promise.all([tokenFor(host.user), tokenFor(member)]);
    const gqlAs = async (token: string, query: string, variables: Record<string, unknown> = {}) => (await graphql(server.url, query, variables, token)).body as any;
    const org = host.ids.organization;
    const inv = (await gqlAs(hostToken, `mutation($o: BigInt!, $e: String!) { inviteOrganizationMember(input: { organizationId: $o, email: $e }) { result { rowId } } }`, { o: org, e: member.email }))
      .data.inviteOrganizationMember.result.rowId;
    await gqlAs(memberToken, `mutation($i: BigInt!) { acceptOrganizationInvitation(input: { invitationId: $i }) { clientMutationId } }`, { i: inv });
    const wb = (await gqlAs(memberToken, `mutation($o: BigInt!) { createWorkbook(input: { name: "Mine", organizationId: $o }) { result { rowId } } }`, { o: org }))
      .data.createWorkbook.result.rowId;
    const agent = (await gqlAs(memberToken, `mutation($w: BigInt!) { createAgentToken(input: { workbookId: $w, name: "bot" }) { result } }`, { w: wb })).data.createAgentToken.result;
    const READ = `query($w: BigInt!) { workbookByRowId(rowId: $w) { rowId name } }`;
    expect((await gqlAs(agent, READ, { w: wb })).data.workbookByRowId.rowId).toBe(wb);

    const removed = await gqlAs(hostToken, `mutation($o: BigInt!, $u: BigInt!) { removeOrganizationMember(input: { organizationId: $o, userId: $u }) { result } }`, { o: org, u: member.id });
    expect(removed.errors).toBeUndefined();
    // The former member: the workbook is one that does not exist.
    expect((await gqlAs(memberToken, READ, { w: wb })).data.workbookByRowId).toBeNull();
    const share = await gqlAs(memberToken, `mutation($w: BigInt!) { shareWorkbook(input: { workbookId: $w, email: "x@example.com", access: viewer }) { clientMutationId } }`, { w: wb });
    expect(share.errors?.[0]).toMatchObject({ message: `no workbook ${wb}`, extensions: { code: "P0002" } });
    const another = await gqlAs(memberToken, `mutation($w: BigInt!) { createAgentToken(input: { workbookId: $w, name: "bot2" }) { result } }`, { w: wb });
    expect(another.errors?.[0]).toMatchObject({ message: `no workbook ${wb}`, extensions: { code: "P0002" } });
    const agentAfter = await graphql(server.url, READ, { w: wb }, agent);
    expect(agentAfter.status).toBe(401);
    // Even if ownership were left behind, access needs membership.
    await owner().query("update snapbase.workbooks set owner_id = $2 where id = $1", [wb, member.id]);
    expect((await gqlAs(memberToken, READ, { w: wb })).data.workbookByRowId).toBeNull();
    await owner().query("update snapbase.workbooks set owner_id = $2 where id = $1", [wb, host.user.id]);
    // The remover owns it now.
    expect((await gqlAs(hostToken, READ, { w: wb })).data.workbookByRowId).toEqual({ rowId: wb, name: "Mine" });
    const { rows } = await owner().query("select details from snapbase.audit_log where action = 'remove_organization_member' and subject_id = $1 order by id desc limit 1", [org]);
    expect(rows[0].details).toMatchObject({ user_id: Number(member.id), workbooks: [Number(wb)], new_owner_id: Number(host.user.id) });
    expect(rows[0].details.revoked_agent_tokens).toHaveLength(1);
  });
});

describe("the audit log", () => {
  it("shows an app admin the entries of workbooks they may see only: no other organization's cell values", async () => {
    const admin = outsiders.find((o) => o.label.startsWith("an admin"))!;
    const entries = (actor: Actor, workbook: string) => asActor(actor, async (c) =>
      (await c.query("select action, details from snapbase.audit_log where details ->> 'workbook_id' = $1", [workbook])).rows);
    // The victim's record values are in the entries (an update as the victim).
    await committed(actorOf(victim.user), (c) => c.query("select snapbase.update_record($1, $2, $3)", [victim.ids.table, victim.ids.record, JSON.stringify({ name: "cell-secret-7" })]));
    const all = (await owner().query("select details from snapbase.audit_log where details ->> 'workbook_id' = $1", [victim.ids.workbook])).rows;
    expect(JSON.stringify(all)).toMatch(/cell-secret-7/);
    expect(await entries(admin.actor, victim.ids.workbook)).toEqual([]);
    // Their own organization's workbook: as before.
    expect((await entries(admin.actor, admin.world.ids.workbook)).length).toBeGreaterThan(0);
  });
});

describe("structured edits to a managed table the editor may not read", () => {
  it("are refused alike on both paths, naming none of its columns", async () => {
    const schema = `tn_${Date.now().toString(36)}`;
    await owner().query(`create schema ${schema}; create table ${schema}.payroll (id int primary key, salary_secret_col numeric);
                         select snapbase.register_table('${schema}.payroll')`);
    const token = await tokenFor(outsiders[0]!.world.user);
    const edits = { update: [{ key: { id: 1 }, set: { salary_secret_col: 1, no_such_col: 2 } }] };
    const viaGraphql = await graphql(server.url, `mutation($t: RegClass!, $e: JSON!) { submitEdits(input: { target: $t, edits: $e }) { result { rowId } } }`,
      { t: `${schema}.payroll`, e: edits }, token);
    const rest = await fetch(`${server.url}/api/v1/changes`, { method: "POST", headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: JSON.stringify({ table_name: `${schema}.payroll`, edits }) });
    const viaRest = await rest.json();
    expect([403, 404]).toContain(rest.status);
    expect(viaGraphql.body.errors?.[0]?.extensions?.code).toBe("42501");
    expect(JSON.stringify(viaGraphql.body)).not.toMatch(/salary_secret_col|no_such_col/);
    expect(JSON.stringify(viaRest)).not.toMatch(/salary_secret_col|no_such_col/);
    expect((await owner().query(`select count(*)::int as n from snapbase.change_requests where table_name = '${schema}.payroll'`)).rows[0].n).toBe(0);
    await owner().query(`drop schema ${schema} cascade`);
  });
});

describe("a read-scoped API token", () => {
  /** Every volatile function of the API, with its arguments, from the catalog. */
  async function volatileFunctions(): Promise<Fn[]> {
    const { rows } = await owner().query(`
      select p.oid::regprocedure::text as sig, p.proname as name,
             (select jsonb_agg(jsonb_build_object('name', a.name, 'type', format_type(a.type, null), 'hasDefault', a.ord > p.pronargs - p.pronargdefaults) order by a.ord)
                from unnest(p.proargtypes::oid[], (select array_agg(n order by o) from unnest(p.proargnames, coalesce(p.proargmodes, array_fill('i'::"char", array[coalesce(cardinality(p.proargnames), 0)]))) with ordinality x(n, m, o) where m in ('i', 'b', 'v')))
                     with ordinality a(type, name, ord)) as args
        from pg_proc p
       where p.pronamespace = 'snapbase'::regnamespace and p.prokind = 'f' and p.provolatile = 'v'
       order by 1`);
    return rows.map((r): Fn => ({ sig: r.sig, name: r.name, args: r.args ?? [] }));
  }
  /** A call with the caller's own ids and plausible values; parameters nobody has a value for get NULL. */
  function ownCall(fn: Fn, own: World): { sql: string; params: unknown[] } {
    const params: unknown[] = [];
    const parts: string[] = [];
    for (const a of fn.args) {
      let value: unknown = null;
      if (a.name in ID_KINDS) value = own.ids[ID_KINDS[a.name]!];
      else if (a.name in ARRAY_ID_KINDS) value = [own.ids[ARRAY_ID_KINDS[a.name]!]];
      else if (a.name === "user_id") value = own.user.id;
      else if (a.name === "scopes") value = ["write"];
      else if (a.name in OTHER_ARGS) value = OTHER_ARGS[a.name];
      else if (a.hasDefault) continue;
      params.push(value !== null && /^jsonb?$/.test(a.type) ? JSON.stringify(value) : value);
      parts.push(`"${a.name}" => $${params.length}::${a.type}`);
    }
    return { sql: `select * from snapbase.${fn.name}(${parts.join(", ")})`, params };
  }

  it("changes nothing: every function a write token of the same user may call is refused", async () => {
    const reader = await world("editor", "reader");
    const tokenId = await one(owner(), "insert into snapbase.api_tokens (user_id, name, scopes) values ($1, 'ro', '{read}') returning id", [reader.user.id]);
    const writeId = await one(owner(), "insert into snapbase.api_tokens (user_id, name, scopes) values ($1, 'rw', '{write}') returning id", [reader.user.id]);
    const viaToken = (role: "viewer" | "editor", id: string, scopes: string): Actor =>
      ({ role, userId: reader.user.id, email: reader.user.email, extra: { "jwt.claims.token_id": id, "jwt.claims.scopes": scopes } });
    const problems: string[] = [];
    let writable = 0;
    const fns = await volatileFunctions();
    // One transaction after the other (each call in a savepoint that is rolled back): a
    // transaction waiting on the other's locks would never end.
    const runAll = (actor: Actor) => asActor(actor, async (c) => {
      const callable = new Set((await c.query("select p.oid::regprocedure::text as sig from pg_proc p where p.pronamespace = 'snapbase'::regnamespace and has_function_privilege(p.oid, 'execute')")).rows.map((r) => r.sig));
      const answers = new Map<string, { code: string; message: string }>();
      for (const fn of fns) {
        if (!callable.has(fn.sig)) continue;
        const call = ownCall(fn, reader);
        answers.set(fn.sig, await outcome(c, call.sql, call.params));
      }
      return answers;
    });
    const writes = await runAll(viaToken("editor", writeId, "write"));
    const reads = await runAll(viaToken("viewer", tokenId, "read"));
    for (const [sig, read] of reads) {
      // Ends the caller's own session, and an API token has none: it changes nothing.
      if (sig === "snapbase.sign_out()") continue;
      const write = writes.get(sig);
      if (write?.code === "ok") writable++;
      // Refused: 42501, or P0002 for what only those who may write see (an import, a share link).
      if (read.code === "ok" || (write?.code === "ok" && !["42501", "P0002"].includes(read.code))) {
        problems.push(`${sig}: read token ${read.code} "${read.message.slice(0, 120)}" (write token: ${write?.code})`);
      }
    }
    expect(problems).toEqual([]);
    expect(writable).toBeGreaterThan(25);
  }, 180_000);

  it("is refused over GraphQL and REST, while it still reads", async () => {
    const reader = await world("editor", "reader2");
    const created = await graphql(server.url, `mutation { createApiToken(input: { name: "ro", scopes: ["read"] }) { result } }`, {}, await tokenFor(reader.user));
    const token = created.body.data.createApiToken.result as string;
    expect((await graphql(server.url, "{ currentAppRole }", {}, token)).body.data.currentAppRole).toBe("viewer");
    const attempts: [string, Record<string, unknown>][] = [
      [`mutation($t: BigInt!, $r: BigInt!) { updateRecord(input: { tableId: $t, recordId: $r, values: { name: "x" } }) { clientMutationId } }`, { t: reader.ids.table, r: reader.ids.record }],
      [`mutation($t: BigInt!) { createShareLink(input: { tableId: $t }) { clientMutationId } }`, { t: reader.ids.table }],
      [`mutation($w: BigInt!) { renameWorkbook(input: { workbookId: $w, name: "y" }) { clientMutationId } }`, { w: reader.ids.workbook }],
      [`mutation($t: BigInt!) { setTableFilter(input: { tableId: $t, filter: "true" }) { clientMutationId } }`, { t: reader.ids.table }],
      [`mutation($t: BigInt!) { acceptSuggestions(input: { tableId: $t }) { clientMutationId } }`, { t: reader.ids.table }],
      [`mutation($o: BigInt!) { inviteOrganizationMember(input: { organizationId: $o, email: "z@example.com" }) { clientMutationId } }`, { o: reader.ids.organization }],
      [`mutation { createConnectorAccount(input: { kind: "postgres", name: "n", credentials: { connection_string: "postgres://u:pw@127.0.0.1:1/db" } }) { clientMutationId } }`, {}],
      [`mutation { createWorkbook(input: { name: "w" }) { clientMutationId } }`, {}],
    ];
    for (const [query, variables] of attempts) {
      const res = await graphql(server.url, query, variables, token);
      expect(res.body.errors?.[0]?.extensions?.code, query).toBe("42501");
    }
    const upload = await fetch(`${server.url}/api/v1/csv-files?name=ro.csv`, { method: "POST", headers: { "content-type": "text/csv", authorization: `Bearer ${token}` }, body: "a\n1\n" });
    expect(upload.status).toBe(403);
    const { rows } = await owner().query("select count(*)::int as n from snapbase.audit_log where actor_token_id = (select token_id from snapbase_private.api_token_hashes where token_hash = digest($1, 'sha256'))", [token]);
    expect(rows[0].n).toBe(0);
    // Reading goes on.
    const read = await graphql(server.url, `query($t: BigInt!) { workbookRecordCounts(tableId: $t) { total } }`, { t: reader.ids.table }, token);
    expect(read.body.errors).toBeUndefined();
    expect(read.body.data.workbookRecordCounts.total).toBe("1");
  });
});
