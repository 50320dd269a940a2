// Agents never see hidden columns or hidden tables, anywhere: every function an
// agent may call and every table (and column) it may read is enumerated from the
// catalog, so a new grant fails here until it has a probe. A hidden column answers
// like one that does not exist, a hidden table like a missing id.
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { asActor, createUser, db, graphql, owner, startTestServer, tokenFor, type Actor, type TestUser } from "./helpers.ts";

const RUN = randomBytes(4).toString("hex");
const HIDDEN_COL = `zz_secret_${RUN}`;
const HIDDEN_VALUE = `HIDDENVALUE${RUN}`;
const REMOTE = `RID${RUN}`;
const HIDDEN_TABLE = `Hidden table ${RUN}`;
const HIDDEN_TABLE_COL = `ht_${RUN}`;
const HIDDEN_TABLE_VALUE = `HTVALUE${RUN}`;
const ACCOUNT_JOB = `ACCOUNTJOB${RUN}`;
const CANARIES = [HIDDEN_COL, HIDDEN_VALUE, REMOTE, HIDDEN_TABLE, HIDDEN_TABLE_COL, HIDDEN_TABLE_VALUE, ACCOUNT_JOB];
const MISSING = "9123456789012345";

let server: RunningServer;
let alice: TestUser;
let session: string;
let agent: string;
let agentActor: Actor;
let wb: string, shown: string, hidden: string, rel: string, accountId: string;
const records: Record<string, string> = {};

const as = async (token: string, query: string, variables: Record<string, unknown> = {}) => (await graphql(server.url, query, variables, token)).body;
const ok = async (token: string, query: string, variables: Record<string, unknown> = {}) => {
  const body = await as(token, query, variables);
  if (body.errors) throw new Error(`${query}: ${JSON.stringify(body.errors)}`);
  return body.data as any;
};

beforeAll(async () => {
  server = await startTestServer();
  alice = await createUser("editor", "agent-owner");
  session = await tokenFor(alice);
  wb = (await ok(session, `mutation { createWorkbook(input: { name: "Agents" }) { result { rowId } } }`)).createWorkbook.result.rowId;
  const columns = [
    { name: "code", type: "text", read_only: true }, { name: "name", type: "text" },
    { name: HIDDEN_COL, type: "text" }, { name: "city", type: "text" }, { name: "notes", type: "text", scratch: true },
  ];
  shown = (await ok(session, `mutation($w: BigInt!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: "Customers", columns: $c, remoteIdColumn: "code", titleColumn: "${HIDDEN_COL}" }) { result { rowId } } }`,
    { w: wb, c: columns })).addWorkbookTable.result.rowId;
  rel = (await owner().query("select snapbase_private.table_rel(t) as rel from snapbase.workbook_tables t where id = $1", [shown])).rows[0].rel;
  // As a download leaves them, then edited, suggested, deleted and in conflict.
  const seen = (n: number, secret: string) => ({ code: `${REMOTE}-${n}`, name: `customer ${n}`, [HIDDEN_COL]: secret, city: "Paris" });
  const add = async (label: string, sql: string, params: unknown[]) => {
    records[label] = String((await owner().query(sql, params)).rows[0].__id);
  };
  const downloaded = `insert into ${rel} (code, name, "${HIDDEN_COL}", city, __remote_id, __last_seen, __edited, __suggested, __deleted, __publish)
                      values ($1, $2, $3, 'Paris', $1, $4, $5, $6, $7, $8) returning __id`;
  const at = new Date().toISOString();
  await add("edited", downloaded, [`${REMOTE}-1`, "customer 1", `${HIDDEN_VALUE}-now`, seen(1, `${HIDDEN_VALUE}-then`), { [HIDDEN_COL]: at, name: at },
    { [HIDDEN_COL]: { value: `${HIDDEN_VALUE}-suggested`, by: "x", at }, name: { value: "Ada", by: "x", at } }, false, null]);
  await add("hiddenEditOnly", downloaded, [`${REMOTE}-2`, "customer 2", `${HIDDEN_VALUE}-2`, seen(2, `${HIDDEN_VALUE}-was`), { [HIDDEN_COL]: at },
    { [HIDDEN_COL]: { value: `${HIDDEN_VALUE}-only`, by: "x", at } }, false, null]);
  await add("deleted", downloaded, [`${REMOTE}-3`, "customer 3", `${HIDDEN_VALUE}-3`, seen(3, `${HIDDEN_VALUE}-3`), {}, {}, true, null]);
  await add("conflict", downloaded, [`${REMOTE}-4`, "customer 4", `${HIDDEN_VALUE}-4`, seen(4, `${HIDDEN_VALUE}-4`), { [HIDDEN_COL]: at, name: at }, {}, false,
    { state: "conflict", job_id: 1, at, error: `changed at the source since download: ${HIDDEN_COL}, name`, source_values: { [HIDDEN_COL]: `${HIDDEN_VALUE}-source`, name: "source" } }]);
  await add("created", `insert into ${rel} (name, "${HIDDEN_COL}", __created, __edited) values ('new one', $1, true, $2) returning __id`,
    [`${HIDDEN_VALUE}-created`, { name: at, [HIDDEN_COL]: at }]);
  await add("suggestedNew", `insert into ${rel} (__suggested_new, __suggested) values (true, $1) returning __id`,
    [{ name: { value: "proposed", by: "x", at }, [HIDDEN_COL]: { value: `${HIDDEN_VALUE}-proposed`, by: "x", at } }]);
  await ok(session, `mutation($t: BigInt!, $h: [String]) { updateTableSettings(input: { tableId: $t, hiddenColumns: $h, sortColumn: "${HIDDEN_COL}", columnOrder: ["${HIDDEN_COL}", "name"] }) { clientMutationId } }`,
    { t: shown, h: [HIDDEN_COL, "code"] });
  await ok(session, `mutation($t: BigInt!, $f: String!) { setTableFilter(input: { tableId: $t, filter: $f }) { clientMutationId } }`,
    { t: shown, f: `${HIDDEN_COL} like '${HIDDEN_VALUE}%'` });

  hidden = (await ok(session, `mutation($w: BigInt!, $n: String!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: $n, columns: $c }) { result { rowId } } }`,
    { w: wb, n: HIDDEN_TABLE, c: [{ name: HIDDEN_TABLE_COL, type: "text" }] })).addWorkbookTable.result.rowId;
  await ok(session, `mutation($t: BigInt!, $v: JSON!) { createRecord(input: { tableId: $t, values: $v }) { result } }`, { t: hidden, v: { [HIDDEN_TABLE_COL]: HIDDEN_TABLE_VALUE } });
  await ok(session, `mutation($t: BigInt!) { setWorkbookTableHidden(input: { tableId: $t, hidden: true }) { clientMutationId } }`, { t: hidden });

  // Jobs: one on each table (a failure message and a result that quote values), and one of the account.
  const account = accountId = (await owner().query(`insert into snapbase.connector_accounts (owner_id, name, kind, summary) values ($1, $2, 'postgres', 'x') returning id`,
    [alice.id, ACCOUNT_JOB])).rows[0].id;
  await owner().query(`insert into snapbase.jobs (kind, workbook_id, table_id, created_by, state, error, result, options, current_table, message)
                       values ('publish', $1, $2, $3, 'failed', $4, $5, $6, 'public.customers', $4),
                              ('download', $1, $7, $3, 'succeeded', null, $8, '{}', $9, null)`,
    [wb, shown, alice.id, `value ${HIDDEN_VALUE}-job refused`, { failed: [{ [HIDDEN_COL]: HIDDEN_VALUE }] }, { force: false, values: HIDDEN_VALUE }, hidden, { table: HIDDEN_TABLE }, HIDDEN_TABLE]);
  await owner().query(`insert into snapbase.jobs (kind, connector_account_id, created_by, state, message, current_table) values ('list_tables', $1, $2, 'succeeded', $3, $3)`,
    [account, alice.id, ACCOUNT_JOB]);

  agent = (await ok(session, `mutation($w: BigInt!) { createAgentToken(input: { workbookId: $w, name: "helper" }) { result } }`, { w: wb })).createAgentToken.result;
  agentActor = { role: "agent", userId: alice.id, email: alice.email, extra: { "jwt.claims.workbook_id": wb } };
});
afterAll(async () => {
  await server?.close();
});

/** What an agent gets from each function it may call, by the function's SQL name. */
const PROBES: Record<string, () => Promise<unknown[]>> = {
  current_app_role: async () => [await as(agent, `{ currentAppRole }`)],
  current_user_id: async () => [await as(agent, `{ currentUserId }`)],
  current_user: async () => [await as(agent, `{ currentUser { rowId email } }`)],
  create_user: async () => {
    const res = await as(agent, `mutation { createUser(input: { email: "x-${RUN}@example.com", password: "long enough" }) { result { rowId } } }`);
    expect(res.errors?.[0]?.extensions?.code).toBe("42501");
    return [res];
  },
  workbook_records: async () => {
    const out: unknown[] = [];
    for (const args of [{}, { useFilter: false }, { useFilter: true, includeDeleted: true }, { sortColumn: "name", descending: true }]) {
      let after: string | null = null;
      do {
        const res: any = await as(agent, `query($t: BigInt!, $a: String, $f: Boolean, $d: Boolean, $s: String, $desc: Boolean) {
          workbookRecords(tableId: $t, pageSize: 2, after: $a, useFilter: $f, includeDeleted: $d, sortColumn: $s, descending: $desc) }`,
          { t: shown, a: after, f: (args as any).useFilter ?? null, d: (args as any).includeDeleted ?? null, s: (args as any).sortColumn ?? null, desc: (args as any).descending ?? null });
        expect(res.errors, JSON.stringify(res.errors)).toBeUndefined();
        out.push(res, Buffer.from(res.data.workbookRecords.next_cursor ?? "", "base64").toString());
        after = res.data.workbookRecords.next_cursor;
      } while (after);
    }
    // The saved filter names a hidden column: it does not apply to the agent, which sees every record.
    const all: any = await as(agent, `query($t: BigInt!) { workbookRecords(tableId: $t, pageSize: 100) }`, { t: shown });
    expect(all.data.workbookRecords.filter).toBeNull();
    expect(all.data.workbookRecords.records.map((r: any) => String(r.id)).sort()).toEqual(
      [records.edited, records.hiddenEditOnly, records.deleted, records.conflict, records.created].sort());
    expect(all.data.workbookRecords.columns.map((c: any) => c.name)).toEqual(["name", "city", "notes"]);
    const only: any = all.data.workbookRecords.records.find((r: any) => String(r.id) === records.hiddenEditOnly);
    expect(only).toMatchObject({ remote_id: null, edited: {}, suggested: {}, state: { dirty: false } });
    return out;
  },
  workbook_record: async () => Promise.all(Object.values(records).map((id) =>
    as(agent, `query($t: BigInt!, $r: BigInt!) { workbookRecord(tableId: $t, recordId: $r) }`, { t: shown, r: id }))),
  workbook_record_counts: async () => {
    const res: any = await as(agent, `query($t: BigInt!) { workbookRecordCounts(tableId: $t) { total filtered dirty withSuggestions deleted } }`, { t: shown });
    // Edits and suggestions on hidden columns alone do not count; the filter does not apply.
    expect(res.data.workbookRecordCounts).toEqual({ total: "5", filtered: "5", dirty: "4", withSuggestions: "2", deleted: "1" });
    return [res];
  },
  workbook_suggestions: async () => {
    const res: any = await as(agent, `query($t: BigInt!) { workbookSuggestions(tableId: $t) }`, { t: shown });
    expect(res.data.workbookSuggestions.map((r: any) => String(r.id)).sort()).toEqual([records.edited, records.suggestedNew].sort());
    return [res];
  },
  publish_preview: async () => {
    const res: any = await as(agent, `query($w: BigInt!) { publishPreview(workbookId: $w) }`, { w: wb });
    const tables = res.data.publishPreview.tables;
    expect(tables.map((t: any) => String(t.table_id))).toEqual([String(shown)]);
    const [t] = tables;
    expect(t).toMatchObject({ create_count: 1, update_count: 2, delete_count: 1 });
    expect(t.updates.map((u: any) => [String(u.id), u.fields.map((f: any) => f.column)])).toEqual([[records.edited, ["name"]], [records.conflict, ["name"]]]);
    expect(Object.keys(t.deletes[0].before).sort()).toEqual(["city", "name"]);
    expect(t.deletes[0].remote_id).toBeNull();
    expect(Object.keys(t.creates[0].values).sort()).toEqual(["city", "name"]);
    return [res];
  },
  visible_events: async () => {
    const res: any = await as(agent, `query($t: String!) { visibleEvents(topic: $t) { nodes } }`, { t: `workbook:${wb}` });
    const events = res.data.visibleEvents.nodes;
    expect(events.length).toBeGreaterThan(0);
    expect(events.filter((e: any) => String(e.table_id) === String(hidden))).toEqual([]);
    const account = await as(agent, `query($t: String!) { visibleEvents(topic: $t) { nodes } }`, { t: `account:${accountId}` });
    expect(account.errors?.[0]?.extensions?.code).toBe("P0002");
    return [res, account];
  },
  visible_event: async () => {
    const ids = (await owner().query("select id from snapbase_private.events where topic = $1", [`workbook:${wb}`])).rows.map((r) => r.id);
    const out = await Promise.all(ids.map((id) => as(agent, `query($e: BigInt!) { visibleEvent(eventId: $e) }`, { e: id })));
    const ofHidden = (await owner().query("select id from snapbase_private.events where topic = $1 and payload ->> 'table_id' = $2", [`workbook:${wb}`, String(hidden)])).rows;
    expect(ofHidden.length).toBeGreaterThan(0);
    for (const { id } of ofHidden) expect((await as(agent, `query($e: BigInt!) { visibleEvent(eventId: $e) }`, { e: id })).data).toEqual({ visibleEvent: null });
    return out;
  },
  // Writes last: the reads above count what the setup left.
  suggest_values: async () => [await as(agent, `mutation($t: BigInt!, $r: BigInt!) { suggestValues(input: { tableId: $t, recordId: $r, values: { city: "Lyon" } }) { result } }`,
    { t: shown, r: records.edited })],
  suggest_new_record: async () => [await as(agent, `mutation($t: BigInt!) { suggestNewRecord(input: { tableId: $t, values: { name: "from the agent" } }) { result } }`, { t: shown })],
  suggest_delete: async () => [await as(agent, `mutation($t: BigInt!, $r: BigInt!) { suggestDelete(input: { tableId: $t, recordId: $r }) { result } }`,
    { t: shown, r: records.conflict })],
};

describe("agents", () => {
  it("every function an agent may call has a probe, and none shows a hidden column, value or table", async () => {
    const { rows } = await owner().query(`select distinct p.proname as name from pg_proc p
      where p.pronamespace = 'snapbase'::regnamespace and has_function_privilege($1, p.oid, 'execute') order by 1`, [db.roles.agent]);
    const callable = rows.map((r) => r.name as string);
    expect(callable.filter((name) => !(name in PROBES)), "functions an agent may call without a probe here").toEqual([]);
    for (const name of Object.keys(PROBES).filter((n) => callable.includes(n))) {
      const answers = JSON.stringify(await PROBES[name]!());
      for (const canary of CANARIES) expect(answers.includes(canary), `${name} showed ${canary}: ${answers.slice(0, 2000)}`).toBe(false);
    }
  });

  it("every table and column an agent may read leaves out hidden tables, their jobs and the user's account-level jobs", async () => {
    const problems: string[] = [];
    await asActor(agentActor, async (c) => {
      const { rows: tables } = await c.query(`
        select c.relname as table, array_agg(quote_ident(a.attname) order by a.attnum) as columns
          from pg_class c join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
         where c.relnamespace = 'snapbase'::regnamespace and c.relkind in ('r', 'v', 'm', 'p') and has_column_privilege(c.oid, a.attnum, 'select')
         group by c.relname`);
      expect(tables.map((t) => t.table).sort()).toEqual(["jobs", "users", "workbook_tables", "workbooks"]);
      for (const { table, columns } of tables) {
        const { rows } = await c.query(`select to_jsonb(x) as row from (select ${columns.join(", ")} from snapbase.${table}) x`);
        const text = JSON.stringify(rows);
        for (const canary of CANARIES) if (text.includes(canary)) problems.push(`${table} shows ${canary}: ${text.slice(0, 500)}`);
        for (const { row } of rows) {
          if (table === "workbook_tables" && String(row.id) === String(hidden)) problems.push("workbook_tables lists the hidden table");
          if (table === "jobs" && (row.workbook_id === null || String(row.table_id) === String(hidden))) problems.push(`jobs lists ${JSON.stringify(row)}`);
        }
      }
      expect((await c.query("select count(*)::int as n from snapbase.workbook_tables")).rows[0].n).toBe(1);
      expect((await c.query("select count(*)::int as n from snapbase.jobs")).rows[0].n).toBe(1);
    });
    expect(problems).toEqual([]);
    // The same over GraphQL.
    const listed = await ok(agent, `{ allWorkbookTables { nodes { rowId name } } allJobs { nodes { rowId workbookId tableId state } } }`);
    expect(listed.allWorkbookTables.nodes).toEqual([{ rowId: String(shown), name: "Customers" }]);
    expect(listed.allJobs.nodes.map((j: any) => j.tableId)).toEqual([String(shown)]);
    expect((await as(agent, `{ allWorkbookTables { nodes { columns hiddenColumns filter } } }`)).errors?.[0]?.message).toMatch(/permission denied/);
  });

  it("answers a hidden table like a missing one, and a hidden column like one that does not exist", async () => {
    const pairs: [string, Record<string, unknown>, Record<string, unknown>][] = [
      [`query($t: BigInt!) { workbookRecords(tableId: $t) }`, { t: hidden }, { t: MISSING }],
      [`query($t: BigInt!) { workbookRecord(tableId: $t, recordId: "1") }`, { t: hidden }, { t: MISSING }],
      [`query($t: BigInt!) { workbookRecordCounts(tableId: $t) { total } }`, { t: hidden }, { t: MISSING }],
      [`query($t: BigInt!) { workbookSuggestions(tableId: $t) }`, { t: hidden }, { t: MISSING }],
      [`mutation($t: BigInt!) { suggestValues(input: { tableId: $t, recordId: "1", values: {} }) { result } }`, { t: hidden }, { t: MISSING }],
      [`mutation($t: BigInt!) { suggestNewRecord(input: { tableId: $t, values: {} }) { result } }`, { t: hidden }, { t: MISSING }],
      [`mutation($t: BigInt!) { suggestDelete(input: { tableId: $t, recordId: "1" }) { result } }`, { t: hidden }, { t: MISSING }],
    ];
    for (const [query, theirs, missing] of pairs) {
      const [a, b] = [await as(agent, query, theirs), await as(agent, query, missing)];
      const normalized = (m?: string) => m?.split(MISSING).join("N").split(String(hidden)).join("N");
      expect(normalized(a.errors?.[0]?.message), query).toBe(normalized(b.errors?.[0]?.message));
      expect(a.errors?.[0]?.extensions?.code).toBe("P0002");
    }
    for (const column of [HIDDEN_COL, "code"]) {
      const ghost = `ghost_${RUN}`;
      const columnPairs: [string, Record<string, unknown>, Record<string, unknown>][] = [
        [`query($t: BigInt!, $s: String) { workbookRecords(tableId: $t, sortColumn: $s) }`, { t: shown, s: column }, { t: shown, s: ghost }],
        [`mutation($t: BigInt!, $r: BigInt!, $v: JSON!) { suggestValues(input: { tableId: $t, recordId: $r, values: $v }) { result } }`,
          { t: shown, r: records.edited, v: { [column]: "x" } }, { t: shown, r: records.edited, v: { [ghost]: "x" } }],
        [`mutation($t: BigInt!, $v: JSON!) { suggestNewRecord(input: { tableId: $t, values: $v }) { result } }`, { t: shown, v: { [column]: "x" } }, { t: shown, v: { [ghost]: "x" } }],
      ];
      for (const [query, theirs, missing] of columnPairs) {
        const [a, b] = [await as(agent, query, theirs), await as(agent, query, missing)];
        expect(a.errors?.[0]?.message?.split(column).join("C"), query).toBe(b.errors?.[0]?.message?.split(ghost).join("C"));
      }
    }
  });

  it("is not told by events that a column hidden from it was edited", async () => {
    const recordEvents = async () => ((await ok(agent, `query($t: String!) { visibleEvents(topic: $t) { nodes } }`, { t: `workbook:${wb}` }))
      .visibleEvents.nodes as any[]).filter((e) => e.kind === "records" && String(e.table_id) === String(shown));
    const edit = (values: Record<string, unknown>) => ok(session,
      `mutation($t: BigInt!, $r: BigInt!, $v: JSON!) { updateRecord(input: { tableId: $t, recordId: $r, values: $v }) { clientMutationId } }`,
      { t: shown, r: records.created, v: values });
    const before = await recordEvents();
    await edit({ [HIDDEN_COL]: `${HIDDEN_VALUE}-edited-again` }); // before: the agent got {action: "edited", count: 1}
    expect(await recordEvents()).toEqual(before);
    await edit({ name: "renamed" });
    const after = await recordEvents();
    expect(after).toHaveLength(before.length + 1);
    expect(after.at(-1)).toMatchObject({ action: "edited", count: 1 });
    expect(after.at(-1)).not.toHaveProperty("hidden_only");
  });

  it("loses its access when its user can no longer edit the workbook", async () => {
    const bob = await createUser("editor", "agent-sharer");
    const token = await tokenFor(bob);
    const theirs = (await ok(token, `mutation { createWorkbook(input: { name: "Bob's" }) { result { rowId organizationId } } }`)).createWorkbook.result;
    const t = (await ok(token, `mutation($w: BigInt!) { addWorkbookTable(input: { workbookId: $w, name: "T", columns: [{name: "a", type: "text"}] }) { result { rowId } } }`, { w: theirs.rowId })).addWorkbookTable.result.rowId;
    const invitation = (await ok(token, `mutation($o: BigInt!, $e: String!) { inviteOrganizationMember(input: { organizationId: $o, email: $e }) { result { rowId } } }`,
      { o: theirs.organizationId, e: alice.email })).inviteOrganizationMember.result.rowId;
    await ok(session, `mutation($i: BigInt!) { acceptOrganizationInvitation(input: { invitationId: $i }) { clientMutationId } }`, { i: invitation });
    await ok(token, `mutation($w: BigInt!, $e: String!) { shareWorkbook(input: { workbookId: $w, email: $e, access: editor }) { clientMutationId } }`, { w: theirs.rowId, e: alice.email });
    const helper = (await ok(session, `mutation($w: BigInt!) { createAgentToken(input: { workbookId: $w, name: "helper" }) { result } }`, { w: theirs.rowId })).createAgentToken.result;
    expect((await as(helper, `query($t: BigInt!) { workbookRecords(tableId: $t) }`, { t })).errors).toBeUndefined();
    // Demoted to viewer: a viewer may not suggest, so neither may the agent it made.
    await ok(token, `mutation($w: BigInt!, $e: String!) { shareWorkbook(input: { workbookId: $w, email: $e, access: viewer }) { clientMutationId } }`, { w: theirs.rowId, e: alice.email });
    expect((await as(helper, `query($t: BigInt!) { workbookRecords(tableId: $t) }`, { t })).errors?.[0]?.message).toBe(`no workbook table ${t}`);
  });
});
