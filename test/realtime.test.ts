// Realtime: events over GraphQL subscriptions (a real graphql-ws client) and SSE (a
// real EventSource client), replay with Last-Event-ID, access rules, and two server
// instances on one database.
import { EventSource } from "eventsource";
import { createClient, type Client } from "graphql-ws";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";
import type { RunningServer } from "../src/server/app.ts";
import { createUser, db, graphql, http, owner, startTestServer, TEST_PASSWORD, type TestUser } from "./helpers.ts";

let server: RunningServer;
let other: RunningServer;
let alice: TestUser, bob: TestUser, admin: TestUser;
const tokens: Record<string, string> = {};
const closers: (() => unknown)[] = [];

type Event = Record<string, any> & { id: number; kind: string };

const gql = async (query: string, variables: Record<string, unknown> = {}, token = tokens.alice, at = server) => {
  const res = await graphql(at.url, query, variables, token);
  if (res.body.errors) throw new Error(res.body.errors.map((e) => e.message).join("; "));
  return res.body.data;
};

/** Collects what a source delivers and waits for what a test expects. */
class Inbox<T> {
  readonly items: T[] = [];
  /** The source ended (a GraphQL subscription completed): nothing more can arrive. */
  ended = false;
  private waiters: (() => void)[] = [];
  push(item: T): void {
    this.items.push(item);
    for (const w of this.waiters.splice(0)) w();
  }
  async until(predicate: (items: T[]) => boolean, timeoutMs = 30_000): Promise<T[]> {
    const deadline = Date.now() + timeoutMs;
    while (!predicate(this.items)) {
      if (Date.now() > deadline) throw new Error(`timed out; received ${JSON.stringify(this.items)}`);
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 200);
      });
    }
    return this.items;
  }
}

function subscribe(token: string, topic: string, at = server): Inbox<Event | null> {
  const client: Client = createClient({
    url: at.url.replace(/^http/, "ws") + "/graphql",
    webSocketImpl: WebSocket,
    connectionParams: { authorization: `Bearer ${token}` },
  });
  const inbox = new Inbox<Event | null>();
  const stop = client.subscribe<{ events: Event | null }>({ query: "subscription($t: String!) { events(topic: $t) }", variables: { t: topic } }, {
    next: (msg) => {
      if (msg.errors?.length) inbox.push({ id: -1, kind: "error", error: msg.errors[0]!.message, code: msg.errors[0]!.extensions?.code });
      else inbox.push(msg.data?.events ?? null);
    },
    // An error message (graphql-ws: an array of errors) ends the operation too.
    error: (e) => {
      inbox.ended = true;
      const first = Array.isArray(e) ? (e[0] as { message: string; extensions?: { code?: string } }) : undefined;
      inbox.push(first ? { id: -1, kind: "error", error: first.message, code: first.extensions?.code }
        : { id: -1, kind: "error", error: String((e as Error)?.message ?? JSON.stringify(e)) });
    },
    complete: () => {
      inbox.ended = true;
      inbox.push(null);
    },
  });
  closers.push(() => stop(), () => client.dispose());
  return inbox;
}

/**
 * Resolves once a subscription is live. NOTIFY is not buffered, so a fixed pause
 * is a guess; instead, emit probe events on the topic (as a DBA would) until one
 * comes back. A probe is an ordinary event of the topic, which every subscriber who
 * may see the topic receives (tests skip probes); `payload` makes a "changes" probe
 * name a managed table the subscriber may read.
 */
async function live(inbox: Inbox<Event | null>, topic: string, payload: Record<string, unknown> = {}): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!inbox.items.some((e) => e?.kind === "probe")) {
    if (Date.now() > deadline) throw new Error(`subscription to ${topic} never came up: ${JSON.stringify(inbox.items)}`);
    await owner().query("select snapbase_private.emit($1, 'probe', $2)", [topic, payload]);
    await inbox.until((items) => items.some((e) => e?.kind === "probe"), 200).catch(() => {});
  }
}

/** What a subscriber received, probes left out. */
const received = (items: (Event | null)[]) => items.filter((e): e is Event => e !== null && e.kind !== "probe");

function listenSse(url: string, lastEventId?: number): Inbox<Event> {
  const inbox = new Inbox<Event>();
  const source = new EventSource(url, {
    fetch: (input, init) => fetch(input, { ...init, headers: { ...init?.headers, ...(lastEventId ? { "last-event-id": String(lastEventId) } : {}) } }),
  });
  source.addEventListener("snapbase", (e) => inbox.push(JSON.parse(e.data)));
  closers.push(() => source.close());
  (inbox as Inbox<Event> & { source: EventSource }).source = source;
  return inbox;
}

async function workbookWithRecords(n: number) {
  const wb = (await gql(`mutation { createWorkbook(input: { name: "Live" }) { result { rowId } } }`)).createWorkbook.result.rowId;
  const t = (await gql(`mutation($w: BigInt!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: "Items", columns: $c }) { result { rowId } } }`,
    { w: wb, c: [{ name: "name", type: "text" }, { name: "qty", type: "integer" }] })).addWorkbookTable.result.rowId;
  if (n > 0) {
    await gql(`mutation($t: BigInt!, $ops: JSON!) { bulkEditRecords(input: { tableId: $t, operations: $ops }) { result } }`,
      { t, ops: Array.from({ length: n }, (_, i) => ({ op: "create", values: { name: `item ${i}`, qty: i } })) });
  }
  return { wb: String(wb), t: String(t) };
}

beforeAll(async () => {
  [server, other] = await Promise.all([startTestServer(), startTestServer()]);
  [alice, bob, admin] = await Promise.all([createUser("editor", "alice"), createUser("editor", "bob"), createUser("admin", "admin")]);
  for (const [name, u] of Object.entries({ alice, bob, admin })) {
    tokens[name] = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: u.email, password: TEST_PASSWORD } })).body.token;
  }
  await owner().query(`
    drop schema if exists t6 cascade;
    create schema t6;
    create table t6.notes (id int primary key, body text);
    insert into t6.notes values (1, 'one');
    grant usage on schema t6 to ${db.roles.viewer};
    grant select on t6.notes to ${db.roles.viewer};
    grant insert, update, delete on t6.notes to ${db.roles.admin};
    select snapbase.register_table('t6.notes');`);
});

afterAll(async () => {
  // Not awaited: a graphql-ws client settles its disposal only once the server has
  // closed the socket, which closing the servers does.
  for (const close of closers.splice(0)) void close();
  await Promise.all([server?.close(), other?.close()]);
}, 20_000);

describe("GraphQL subscriptions (graphql-ws)", () => {
  it("deliver each kind of workbook event, one per statement, with who caused it", async () => {
    const { wb, t } = await workbookWithRecords(0);
    const inbox = subscribe(tokens.alice, `workbook:${wb}`);
    await live(inbox, `workbook:${wb}`);

    await gql(`mutation($t: BigInt!, $ops: JSON!) { bulkEditRecords(input: { tableId: $t, operations: $ops }) { result } }`,
      { t, ops: Array.from({ length: 1000 }, (_, i) => ({ op: "create", values: { name: `n${i}`, qty: i } })) });
    await gql(`mutation($t: BigInt!) { updateRecord(input: { tableId: $t, recordId: "1", values: { qty: 42 } }) { clientMutationId } }`, { t });
    // 299 suggestions in one statement (as a DBA would), then one through the API.
    const rel = (await owner().query("select snapbase_private.table_rel(t) as rel from snapbase.workbook_tables t where id = $1", [t])).rows[0].rel;
    await owner().query(`update ${rel} set __suggested = '{"qty": {"value": 7, "by": "dba"}}' where __id between 2 and 300`);
    await gql(`mutation($t: BigInt!) { suggestValues(input: { tableId: $t, recordId: "301", values: { qty: 7 } }) { clientMutationId } }`, { t });
    await gql(`mutation($t: BigInt!) { acceptSuggestions(input: { tableId: $t }) { result } }`, { t });
    await gql(`mutation($t: BigInt!) { suggestValues(input: { tableId: $t, recordId: "5", values: { qty: 1 } }) { clientMutationId } }`, { t });
    await gql(`mutation($t: BigInt!) { rejectSuggestions(input: { tableId: $t }) { result } }`, { t });
    await gql(`mutation($t: BigInt!) { updateTableSettings(input: { tableId: $t, sortColumn: "qty" }) { clientMutationId } }`, { t });

    const events = await inbox.until((items) => items.some((e) => e?.kind === "table_settings_changed"));
    const records = events.filter((e) => e?.kind === "records").map((e) => e!).map((e) => [e.action, e.count]);
    expect(records).toEqual([["bulk_edited", 1000], ["edited", 1], ["suggested", 299], ["suggested", 1], ["accepted", 300], ["suggested", 1], ["rejected", 1]]);
    expect(events.find((e) => e?.kind === "records")).toMatchObject({ topic: `workbook:${wb}`, table_id: Number(t), by: alice.email });
    // Small payloads: ids and counts, never rows.
    expect(Math.max(...events.map((e) => JSON.stringify(e).length))).toBeLessThan(400);
  });

  it("deliver change request and snapshot events to those who may read the table", async () => {
    const inbox = subscribe(tokens.admin, "changes");
    const notes = (await owner().query("select id from snapbase.managed_tables where qualified_name = 't6.notes'")).rows[0].id;
    await live(inbox, "changes", { managed_table_id: notes });
    const submitted = await http(server.url, "POST", "/api/v1/changes", { token: tokens.alice, body: { table_name: "t6.notes", sql: "update t6.notes set body = 'uno' where id = 1", reason: "live" } });
    const id = submitted.body.change_request.id;
    await http(server.url, "POST", `/api/v1/changes/${id}/approve`, { token: tokens.admin });
    const events = received(await inbox.until((items) => items.some((e) => e?.kind === "change_approved")));
    // The snapshot is taken inside the approval, before the request is marked approved.
    expect(events.map((e) => e?.kind), JSON.stringify(events)).toEqual(["change_submitted", "snapshot_created", "change_approved"]);
    expect(events[2]).toMatchObject({ change_request_id: Number(id), table_name: "t6.notes", rows_affected: 1, by: admin.email });
  });

  it("deliver job events of a connector account to its owner", async () => {
    const account = (await gql(`mutation { createConnectorAccount(input: { kind: "postgres", name: "Live", credentials: { connection_string: "postgres://x@127.0.0.1:1/y" } }) { result { rowId } } }`))
      .createConnectorAccount.result.rowId;
    const inbox = subscribe(tokens.alice, `account:${account}`);
    await live(inbox, `account:${account}`);
    // No worker runs here: the job is queued, then cancelled.
    const job = (await gql(`mutation($a: BigInt!) { testConnectorAccount(input: { accountId: $a }) { result { rowId } } }`, { a: account })).testConnectorAccount.result.rowId;
    await gql(`mutation($j: BigInt!) { cancelJob(input: { jobId: $j }) { clientMutationId } }`, { j: job });
    const events = received(await inbox.until((items) => items.some((e) => e?.state === "cancelled")));
    expect(events.map((e) => [e.kind, e.job_kind, e.state])).toEqual([["job", "test_connection", "queued"], ["job", "test_connection", "cancelled"]]);
  });

  it("a subscriber without access to the workbook is refused once, as for a missing workbook, and receives nothing after", async () => {
    const { wb, t } = await workbookWithRecords(1);
    const peek = subscribe(tokens.bob, `workbook:${wb}`);
    const missing = subscribe(tokens.bob, "workbook:9123456789012345");
    const own = subscribe(tokens.alice, `workbook:${wb}`);
    await live(own, `workbook:${wb}`);
    await gql(`mutation($t: BigInt!) { updateRecord(input: { tableId: $t, recordId: "1", values: { qty: 9 } }) { clientMutationId } }`, { t });
    await own.until((items) => items.some((e) => e?.action === "edited"));
    // The subscription ended with its one answer: no later event can reach it.
    await peek.until(() => peek.ended);
    await missing.until(() => missing.ended);
    expect(peek.items).toEqual([{ id: -1, kind: "error", error: `no workbook ${wb}`, code: "P0002" }, null]);
    expect(missing.items).toEqual([{ id: -1, kind: "error", error: "no workbook 9123456789012345", code: "P0002" }, null]);
  });

  it("end with an error at the next event once the session is signed out, the user disabled, or the API token revoked", async () => {
    const carol = await createUser("editor", "carol");
    const login = async () => (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: carol.email, password: TEST_PASSWORD } })).body.token as string;
    const [signedOut, disabled] = [await login(), await login()];
    const apiToken = (await gql(`mutation { createApiToken(input: { name: "live", scopes: ["read"] }) { result } }`, {}, signedOut)).createApiToken.result as string;
    const tokenId = (await owner().query("select token_id::text from snapbase_private.api_token_hashes where token_hash = digest($1, 'sha256')", [apiToken])).rows[0].token_id;
    const wb = (await gql(`mutation { createWorkbook(input: { name: "Watched" }) { result { rowId } } }`, {}, signedOut)).createWorkbook.result.rowId;
    const topic = `workbook:${wb}`;
    const cases: [string, string, () => Promise<unknown>][] = [
      ["revoked API token", apiToken, () => gql(`mutation($id: BigInt!) { revokeApiToken(input: { tokenId: $id }) { clientMutationId } }`, { id: tokenId }, disabled)],
      ["signed out", signedOut, () => gql(`mutation { signOut(input: {}) { result } }`, {}, signedOut)],
      ["disabled user", disabled, () => owner().query("select snapbase.set_user_disabled($1, true)", [carol.id])],
    ];
    for (const [label, token, end] of cases) {
      const inbox = subscribe(token, topic);
      await live(inbox, topic);
      await end();
      await owner().query("select snapbase_private.emit($1, 'after_end', '{}')", [topic]);
      await inbox.until(() => inbox.ended, 15_000).catch(() => {});
      expect(received(inbox.items).filter((e) => e.kind === "after_end"), label).toEqual([]);
      expect(inbox.ended, `${label}: ${JSON.stringify(inbox.items.slice(-3))}`).toBe(true);
      expect(received(inbox.items).at(-1), label).toMatchObject({ kind: "error", code: "session_ended" });
    }
  });

  it("send a subscriber only the events it may see, never a null in place of one", async () => {
    const { wb, t } = await workbookWithRecords(1);
    const hidden = (await gql(`mutation($w: BigInt!) { addWorkbookTable(input: { workbookId: $w, name: "Private", columns: [{ name: "x", type: "text" }] }) { result { rowId } } }`, { w: wb }))
      .addWorkbookTable.result.rowId;
    await gql(`mutation($t: BigInt!) { setWorkbookTableHidden(input: { tableId: $t, hidden: true }) { clientMutationId } }`, { t: hidden });
    const agent = (await gql(`mutation($w: BigInt!) { createAgentToken(input: { workbookId: $w, name: "watcher" }) { result } }`, { w: wb })).createAgentToken.result;
    const inbox = subscribe(agent, `workbook:${wb}`);
    await live(inbox, `workbook:${wb}`);
    await gql(`mutation($t: BigInt!) { createRecord(input: { tableId: $t, values: { x: "private" } }) { clientMutationId } }`, { t: hidden });
    await gql(`mutation($t: BigInt!) { updateRecord(input: { tableId: $t, recordId: "1", values: { qty: 3 } }) { clientMutationId } }`, { t });
    // Removing tables: the agent hears of the one it could see, not of the hidden one.
    await gql(`mutation($t: BigInt!) { removeWorkbookTable(input: { tableId: $t }) { clientMutationId } }`, { t: hidden });
    await gql(`mutation($t: BigInt!) { removeWorkbookTable(input: { tableId: $t }) { clientMutationId } }`, { t });
    await inbox.until((items) => items.some((e) => e?.kind === "table_removed"));
    // Events arrive in order, so the hidden table's events (before the others) were left out, not delayed.
    expect(inbox.items.every((e) => e !== null)).toBe(true);
    expect(received(inbox.items).map((e) => [e.kind, e.action ?? null, e.table_id, e.hidden])).toEqual([
      ["records", "edited", Number(t), undefined], ["table_removed", null, Number(t), undefined]]);
  });
});

describe("visible_event", () => {
  it("answers an event of a topic the caller may not see exactly as a missing id: null", async () => {
    const { wb } = await workbookWithRecords(0);
    const account = (await gql(`mutation { createConnectorAccount(input: { kind: "postgres", name: "Hidden", credentials: { connection_string: "postgres://x@127.0.0.1:1/y" } }) { result { rowId } } }`))
      .createConnectorAccount.result.rowId;
    const ids: string[] = [];
    for (const topic of [`workbook:${wb}`, `account:${account}`, "changes"]) {
      await owner().query(`select snapbase_private.emit($1, 'secret', '{"managed_table_id": 0}')`, [topic]);
      ids.push((await owner().query("select max(id)::text as id from snapbase_private.events where topic = $1", [topic])).rows[0].id);
    }
    const agentToken = (await gql(`mutation($w: BigInt!) { createAgentToken(input: { workbookId: $w, name: "a" }) { result } }`,
      { w: (await workbookWithRecords(0)).wb })).createAgentToken.result;
    const ask = (id: string, token: string) => graphql(server.url, `query($id: BigInt!) { visibleEvent(eventId: $id) }`, { id }, token);
    for (const token of [tokens.bob, agentToken]) {
      const missing = (await ask("9123456789012345", token)).body;
      expect(missing).toEqual({ data: { visibleEvent: null } });
      for (const id of ids) expect((await ask(id, token)).body, `event ${id}`).toEqual(missing);
    }
    // Its owner sees the workbook's event.
    expect((await ask(ids[0]!, tokens.alice)).body.data.visibleEvent).toMatchObject({ kind: "secret", topic: `workbook:${wb}` });
  });
});

describe("server-sent events", () => {
  it("stream workbook events to an EventSource, which catches up with Last-Event-ID after a reconnect", async () => {
    const { wb, t } = await workbookWithRecords(3);
    const stream = (await gql(`query { createStreamToken }`)).createStreamToken;
    const url = `${server.url}/api/v1/workbooks/${wb}/events?access_token=${stream}`;
    const first = listenSse(url);
    await first.until((items) => items.some((e) => e.kind === "records")); // the backlog: the table's creation and the records
    const edit = (qty: number) => gql(`mutation($t: BigInt!, $q: JSON!) { updateRecord(input: { tableId: $t, recordId: "2", values: $q }) { clientMutationId } }`, { t, q: { qty } });
    await edit(10);
    const seen = await first.until((items) => items.some((e) => e.kind === "records" && e.action === "edited"));
    const lastId = seen[seen.length - 1]!.id;
    (first as any).source.close();

    await edit(11);
    await edit(12);
    const resumed = listenSse(url, lastId);
    const replayed = await resumed.until((items) => items.filter((e) => e.action === "edited").length >= 2);
    expect(replayed.every((e) => e.id > lastId)).toBe(true);
    expect(replayed.filter((e) => e.action === "edited")).toHaveLength(2);
    await edit(13);
    await resumed.until((items) => items.filter((e) => e.action === "edited").length >= 3);
    // Ids only go up: nothing twice, nothing missed.
    const ids = resumed.items.map((e) => e.id);
    expect([...ids].sort((a, b) => a - b)).toEqual(ids);
    expect(new Set(ids).size).toBe(ids.length);
  });

  it("refuse streams the caller may not see, and callers without a token", async () => {
    const { wb } = await workbookWithRecords(0);
    const bobs = await fetch(`${server.url}/api/v1/workbooks/${wb}/events`, { headers: { authorization: `Bearer ${tokens.bob}` } });
    expect(bobs.status).toBe(404);
    const nobody = await fetch(`${server.url}/api/v1/changes/events`);
    expect(nobody.status).toBe(401);
    const bad = await fetch(`${server.url}/api/v1/changes/events?access_token=nonsense`);
    expect(bad.status).toBe(401);
  });

  it("streams of one user on one topic share their queries, yet each gets every event once, from its own position", async () => {
    const { wb, t } = await workbookWithRecords(1);
    const url = `${server.url}/api/v1/workbooks/${wb}/events?access_token=${tokens.alice}`;
    const edit = (qty: number) => gql(`mutation($t: BigInt!, $q: JSON!) { updateRecord(input: { tableId: $t, recordId: "1", values: $q }) { clientMutationId } }`, { t, q: { qty } });
    const early = listenSse(url);
    await early.until((items) => items.some((e) => e.kind === "records"));
    await edit(1);
    const first = (await early.until((items) => items.some((e) => e.action === "edited"))).find((e) => e.action === "edited")!;
    // Joins the same feed, resuming from before the first edit.
    const late = listenSse(url, first.id - 1);
    await late.until((items) => items.some((e) => e.id === first.id));
    (early as any).source.close();
    await edit(2);
    await edit(3);
    const edited = (items: Event[]) => items.filter((e) => e.action === "edited");
    await late.until((items) => edited(items).length === 3);
    const ids = late.items.map((e) => e.id);
    expect(ids[0]).toBe(first.id);
    expect(new Set(ids).size).toBe(ids.length);
    expect(edited(early.items)).toHaveLength(1);
  });

  it("two server instances on one database both deliver an event caused through either one", async () => {
    const { wb, t } = await workbookWithRecords(1);
    const onA = listenSse(`${server.url}/api/v1/workbooks/${wb}/events?access_token=${tokens.alice}`);
    const onB = listenSse(`${other.url}/api/v1/workbooks/${wb}/events?access_token=${tokens.alice}`);
    const gqlB = subscribe(tokens.alice, `workbook:${wb}`, other);
    await onA.until((items) => items.length > 0);
    await onB.until((items) => items.length > 0);
    await live(gqlB, `workbook:${wb}`);
    // Caused through instance A...
    await gql(`mutation($t: BigInt!) { updateRecord(input: { tableId: $t, recordId: "1", values: { qty: 100 } }) { clientMutationId } }`, { t });
    // ...and through instance B.
    await gql(`mutation($t: BigInt!) { updateRecord(input: { tableId: $t, recordId: "1", values: { qty: 200 } }) { clientMutationId } }`, { t }, tokens.alice, other);
    for (const inbox of [onA, onB]) await inbox.until((items) => items.filter((e) => e.action === "edited").length === 2);
    await gqlB.until((items) => items.filter((e) => e?.action === "edited").length === 2);
    expect(gqlB.items.every((e) => e !== null)).toBe(true);
  });
});
