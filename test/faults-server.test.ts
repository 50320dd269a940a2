// Faults the server meets (issue 12, items 1, 2 and 6), each injected for real:
// backends terminated mid-request and a database that refuses connections for a
// while; clients that hang up before the first byte and mid-stream; shutdown with
// requests in flight; and bad input. Also: nothing a request does survives it on
// a pooled connection.
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { createClient } from "graphql-ws";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it, onTestFinished, vi } from "vitest";
import WebSocket from "ws";
import { projectRoot } from "../src/db/migrate.ts";
import { databaseName } from "../src/db/urls.ts";
import type { RunningServer } from "../src/server/app.ts";
import { PREVIEW_CELL_CHARS } from "../src/server/cap.ts";
import { startWorker } from "../src/worker.ts";
import { createUser, db, graphql, http, logged, owner, startTestServer, TEST_CREDENTIALS_KEY, TEST_PASSWORD, type TestUser } from "./helpers.ts";

// Lost connections are the point here: their (expected) errors are not logged.

const RUN = randomBytes(4).toString("hex");
const SCHEMA = `faults_${RUN}`;
const DATABASE = databaseName(db.ownerUrl);

let server: RunningServer;
let editor: TestUser, admin: TestUser;
let editorToken: string, adminToken: string;
let snapshotId: string;
let bigSnapshotId: string;

/** Polls until `check` returns something truthy; fails after `timeoutMs` (generous: two busy cores). */
async function waitFor<T>(what: string, check: () => Promise<T | undefined | null | false>, timeoutMs = 60_000): Promise<T> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const value = await check().catch(() => undefined);
    if (value) return value;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** A superuser connection to the maintenance database: it outlives whatever the tests do to the test database. */
async function root<T>(fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: db.rootUrl });
  c.on("error", () => {});
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

/** A connection of the test's own that holds locks; not one of the server's. */
async function locker(): Promise<pg.Client> {
  const c = new pg.Client({ connectionString: db.ownerUrl });
  c.on("error", () => {});
  await c.connect();
  return c;
}

/** Backends of the authenticator (requests) in a state, e.g. waiting for a lock. */
async function authenticatorBackends(where: string): Promise<number> {
  return root(async (c) => (await c.query(
    `select count(*)::int as n from pg_stat_activity where datname = $1 and usename = $2 and (${where})`, [DATABASE, db.roles.authenticator])).rows[0].n);
}

const login = async (base: string, u: TestUser) => http(base, "POST", "/api/v1/auth/login", { body: { email: u.email, password: TEST_PASSWORD } });

/** Login, REST and GraphQL all answer: no connection is held by a request that is gone. */
async function expectServing(base: string): Promise<void> {
  expect((await login(base, editor)).status).toBe(200);
  expect((await http(base, "GET", "/api/v1/changes?status=pending", { token: editorToken })).status).toBe(200);
  expect((await graphql(base, "{ currentAppRole }", {}, editorToken)).body).toEqual({ data: { currentAppRole: "editor" } });
}

beforeAll(async () => {
  await owner().query(`
    create schema ${SCHEMA};
    create table ${SCHEMA}.items (id int primary key, label text not null, pad text);
    insert into ${SCHEMA}.items select n, 'item ' || n, null from generate_series(1, 10) n;
    create table ${SCHEMA}.big (id int primary key, pad text not null);
    insert into ${SCHEMA}.big select n, repeat(md5(n::text), 12) from generate_series(1, 30000) n;
    grant usage on schema ${SCHEMA} to ${db.roles.viewer};
    grant select on all tables in schema ${SCHEMA} to ${db.roles.viewer};
    grant insert, update, delete on all tables in schema ${SCHEMA} to ${db.roles.admin};
    select snapbase.register_table('${SCHEMA}.items');
    select snapbase.register_table('${SCHEMA}.big');`);
  snapshotId = (await owner().query(`select id from snapbase.take_snapshot('${SCHEMA}.items', 'faults')`)).rows[0].id;
  bigSnapshotId = (await owner().query(`select id from snapbase.take_snapshot('${SCHEMA}.big', 'faults')`)).rows[0].id;
  [editor, admin] = await Promise.all([createUser("editor", "editor"), createUser("admin", "admin")]);
  server = await startTestServer();
  editorToken = (await login(server.url, editor)).body.token;
  adminToken = (await login(server.url, admin)).body.token;
});

afterAll(async () => {
  await root((c) => c.query(`alter database ${pg.escapeIdentifier(DATABASE)} with allow_connections true`));
  await server?.close();
});

async function submitChange(sql: string): Promise<string> {
  const res = await http(server.url, "POST", "/api/v1/changes", { token: editorToken, body: { table_name: `${SCHEMA}.items`, sql, reason: "faults" } });
  expect(res.status, JSON.stringify(res.body)).toBe(201);
  return String(res.body.change_request.id);
}

describe("a database backend dying mid-request", () => {
  it("an approval whose backend is terminated answers 503 with the error shape; nothing of it remains; the server goes on", async () => {
    const change = await submitChange(`update ${SCHEMA}.items set label = 'changed' where id = 1`);
    // The approval waits for the table lock the test holds, so it is in flight when its backend is terminated.
    const holder = await locker();
    await holder.query(`begin; lock table ${SCHEMA}.items in access exclusive mode`);
    try {
      const approving = http(server.url, "POST", `/api/v1/changes/${change}/approve`, { token: adminToken });
      const pid = await waitFor("the approval to wait for the lock", () => root(async (c) =>
        (await c.query(`select pid from pg_stat_activity where datname = $1 and wait_event_type = 'Lock' and query like '%approve_change%'`, [DATABASE])).rows[0]?.pid));
      await root((c) => c.query("select pg_terminate_backend($1)", [pid]));
      const answer = await approving;
      expect(answer.status).toBe(503);
      expect(answer.body).toEqual({ error: { code: "database_unavailable", message: expect.stringMatching(/database is unavailable/) } });
    } finally {
      await holder.query("rollback");
      await holder.end();
    }
    // The database is consistent: the change is still pending, the table unchanged, no snapshot taken.
    expect((await owner().query("select status from snapbase.change_requests where id = $1", [change])).rows[0].status).toBe("pending");
    expect((await owner().query(`select label from ${SCHEMA}.items where id = 1`)).rows[0].label).toBe("item 1");
    const approved = await http(server.url, "POST", `/api/v1/changes/${change}/approve`, { token: adminToken });
    expect(approved.status).toBe(200);
    expect(approved.body.change_request.status).toBe("approved");
  });

  it("a GraphQL subscription whose LISTEN connection is lost ends with database_unavailable, not an internal error", async () => {
    const client = createClient({ url: server.url.replace(/^http/, "ws") + "/graphql", webSocketImpl: WebSocket, connectionParams: { authorization: `Bearer ${editorToken}` } });
    const received: { code?: unknown; message: string }[] = [];
    const logFrom = logged.length;
    // @dataplan/pg reports the lost LISTEN connection on the console itself; kept off the test output.
    const consoleError = vi.spyOn(console, "error").mockImplementation(() => {});
    try {
      client.subscribe({ query: 'subscription { events(topic: "changes") }' }, {
        next: (msg) => void (msg.errors ?? []).forEach((e) => received.push({ code: e.extensions?.code, message: e.message })),
        error: (e) => void (Array.isArray(e) ? e : [e]).forEach((x: any) => received.push({ code: x?.extensions?.code, message: String(x?.message ?? x) })),
        complete: () => {},
      });
      const listener = await waitFor("the subscription's LISTEN", () => root(async (c) => (await c.query(
        `select pid from pg_stat_activity where datname = $1 and usename = $2 and query ilike 'listen%snapbase_events:changes%'`, [DATABASE, db.roles.authenticator])).rows[0]?.pid));
      await root((c) => c.query("select pg_terminate_backend($1)", [listener]));
      await waitFor("the subscription to end with an error", async () => received.length > 0);
      expect(received[0]).toEqual({ code: "database_unavailable", message: expect.stringMatching(/database is unavailable/) });
      expect(logged.slice(logFrom).filter((line) => line.includes('"level":"error"'))).toEqual([]);
    } finally {
      consoleError.mockRestore();
      await client.dispose();
    }
    await expectServing(server.url);
  });

  it("every backend of the database terminated while it refuses connections (a restart): 503s, /readyz red then green, everything back without a restart", async () => {
    // PostGraphile's LISTEN connection (kept since the subscription test) reports its loss on the console itself.
    const consoleError = vi.spyOn(console, "error").mockImplementation(() => {});
    onTestFinished(() => consoleError.mockRestore());
    const worker = await startWorker({ ownerUrl: db.ownerUrl, concurrency: 1, credentialsKey: TEST_CREDENTIALS_KEY, sweepIntervalMs: 500 });
    // A GraphQL subscription and an event stream hold connections of their own.
    const events = new AbortController();
    const stream = await fetch(`${server.url}/api/v1/changes/events`, { headers: { authorization: `Bearer ${adminToken}` }, signal: events.signal });
    expect(stream.status).toBe(200);
    const streamText = (async () => {
      let text = "";
      try {
        for await (const chunk of stream.body!) text += Buffer.from(chunk).toString();
      } catch {
        /* ended or aborted */
      }
      return text;
    })();
    expect((await http(server.url, "GET", "/readyz")).status).toBe(200);
    try {
      await root(async (c) => {
        await c.query(`alter database ${pg.escapeIdentifier(DATABASE)} with allow_connections false`);
        await c.query("select pg_terminate_backend(pid) from pg_stat_activity where datname = $1 and pid <> pg_backend_pid()", [DATABASE]);
      });
      // Red while the database is away; requests get the documented 503.
      await waitFor("/readyz to turn red", async () => (await http(server.url, "GET", "/readyz")).status === 503);
      const rest = await http(server.url, "GET", "/api/v1/changes", { token: editorToken });
      expect(rest).toMatchObject({ status: 503, body: { error: { code: "database_unavailable", message: expect.any(String) } } });
      const gql = await graphql(server.url, "{ currentUserId }", {}, editorToken);
      expect(gql.body.errors?.[0]?.extensions?.code).toBe("database_unavailable");
    } finally {
      await root((c) => c.query(`alter database ${pg.escapeIdentifier(DATABASE)} with allow_connections true`));
    }
    // Green again, and every part works: requests, the event hub, the worker.
    await waitFor("/readyz to turn green", async () => (await http(server.url, "GET", "/readyz")).status === 200);
    await expectServing(server.url);
    const fresh = new AbortController();
    const again = await fetch(`${server.url}/api/v1/changes/events`, { headers: { authorization: `Bearer ${adminToken}` }, signal: fresh.signal });
    let received = "";
    const reading = (async () => {
      try {
        for await (const chunk of again.body!) {
          received += Buffer.from(chunk).toString();
          if (received.includes("change_submitted")) break;
        }
      } catch {
        /* aborted */
      }
    })();
    // The hub listens again (it reconnects on its own); an event caused now reaches the new stream.
    await waitFor("an event to arrive after the restart", async () => {
      if (!received.includes("change_submitted")) await submitChange(`update ${SCHEMA}.items set label = 'again ${Date.now()}' where id = 2`);
      await new Promise((r) => setTimeout(r, 300));
      return received.includes("change_submitted");
    });
    fresh.abort();
    await reading;
    events.abort();
    await streamText;
    // The worker's pools and its liveness connection recovered: it still runs jobs.
    const account = (await graphql(server.url, `mutation { createConnectorAccount(input: { kind: "managed", name: "This database ${RUN}", credentials: {} }) { result { rowId } } }`, {}, editorToken))
      .body.data.createConnectorAccount.result.rowId;
    const job = (await graphql(server.url, `mutation($a: BigInt!) { testConnectorAccount(input: { accountId: $a }) { result { rowId } } }`, { a: account }, editorToken))
      .body.data.testConnectorAccount.result.rowId;
    await waitFor("the job to succeed", async () => (await owner().query("select state from snapbase.jobs where id = $1", [job])).rows[0].state === "succeeded")
      .catch(async (error: Error) => {
        // Say where it stands: our row, graphile-worker's, and the worker registry.
        const { rows } = await owner().query(
          `select to_jsonb(j) as job, (select to_jsonb(g) - 'payload' from graphile_worker.jobs g where g.key = 'snapbase_job_' || j.id) as queued,
                  (select jsonb_agg(to_jsonb(w)) from snapbase_private.workers w) as workers,
                  (select jsonb_agg(jsonb_build_object('app', a.application_name, 'state', a.state, 'wait', a.wait_event_type || ':' || a.wait_event, 'query', left(a.query, 120)))
                     from pg_stat_activity a where a.datname = current_database() and a.pid <> pg_backend_pid()) as sessions
             from snapbase.jobs j where j.id = $1`, [job]);
        throw new Error(`${error.message}: ${JSON.stringify(rows[0])}`);
      });
    await worker.stop({ drainMs: 1000 });
  }, 240_000);
});

describe("clients that hang up", () => {
  let small: RunningServer;
  const POOL = 3;
  beforeAll(async () => {
    small = await startTestServer({ authenticatorPoolSize: POOL });
    // PostGraphile reads the catalog once, on first use; done before any test holds a lock.
    await expectServing(small.url);
  });
  afterAll(async () => {
    await small?.close();
  });

  const downloads = (id: string) => [`/api/v1/snapshots/${id}`, `/api/v1/snapshots/${id}/export.csv`];

  it(`before the first byte: more aborted downloads than the pool has connections leave nothing behind`, async () => {
    // Every download waits for a lock the test holds; the clients give up before any byte arrives.
    const holder = await locker();
    await holder.query("begin; lock table snapbase.snapshots in access exclusive mode");
    const aborts: AbortController[] = [];
    try {
      const requests = Array.from({ length: POOL + 3 }, (_, i) => {
        const controller = new AbortController();
        aborts.push(controller);
        return fetch(small.url + downloads(snapshotId)[i % 2], { headers: { authorization: `Bearer ${adminToken}` }, signal: controller.signal })
          .then(() => "answered", () => "aborted");
      });
      await waitFor("every pooled connection to wait for the lock", async () => (await authenticatorBackends("wait_event_type = 'Lock'")) >= POOL);
      for (const a of aborts) a.abort();
      expect(await Promise.all(requests)).toEqual(Array(POOL + 3).fill("aborted"));
      // The queries are cancelled and the connections released, while the lock is still held.
      await waitFor("the waiting queries to be cancelled", async () => (await authenticatorBackends("wait_event_type = 'Lock'")) === 0);
      await waitFor("every connection to be released", async () => small.pools.authenticator.activeCount === 0);
    } finally {
      await holder.query("rollback");
      await holder.end();
    }
    await expectServing(small.url);
  });

  it("mid-stream: aborted snapshot downloads (JSON and CSV) release their connections and end their queries", async () => {
    for (let i = 0; i < POOL + 3; i++) {
      const controller = new AbortController();
      const res = await fetch(small.url + downloads(bigSnapshotId)[i % 2], { headers: { authorization: `Bearer ${adminToken}` }, signal: controller.signal });
      expect(res.status).toBe(200);
      const reader = res.body!.getReader();
      const first = await reader.read();
      expect(first.done).toBe(false);
      controller.abort();
      await reader.cancel().catch(() => {});
    }
    await waitFor("every connection to be released", async () => small.pools.authenticator.activeCount === 0);
    await waitFor("no backend to be left writing to a client", async () =>
      (await authenticatorBackends("wait_event = 'ClientWrite' or state = 'active'")) === 0);
    await expectServing(small.url);
  });

  /** Starts requests that wait for a lock the test holds, lets `waiting` of them reach the lock, then has every client hang up:
   *  each query is cancelled and each connection released while the lock is still held. */
  async function hangUpWhileLocked(tables: string[], sends: ((signal: AbortSignal) => Promise<Response>)[], waiting: number, before?: () => Promise<void>): Promise<void> {
    const holder = await locker();
    await holder.query(`begin; ${tables.map((t) => `lock table ${t} in access exclusive mode`).join("; ")}`);
    const aborts: AbortController[] = [];
    try {
      await before?.();
      const requests = sends.map((send) => {
        const controller = new AbortController();
        aborts.push(controller);
        return send(controller.signal).then(() => "answered", () => "aborted");
      });
      await waitFor(`${waiting} requests to wait for the lock`, async () => (await authenticatorBackends("wait_event_type = 'Lock'")) >= waiting);
      for (const a of aborts) a.abort();
      expect(await Promise.all(requests)).toEqual(Array(sends.length).fill("aborted"));
      await waitFor("the waiting queries to be cancelled", async () => (await authenticatorBackends("wait_event_type = 'Lock'")) === 0);
      await waitFor("every connection to be released", async () => small.pools.authenticator.activeCount === 0);
    } finally {
      for (const a of aborts) a.abort();
      await holder.query("rollback");
      await holder.end();
    }
  }

  const gql = (query: string, token: string) => (signal: AbortSignal) =>
    fetch(`${small.url}/graphql`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${token}` }, body: JSON.stringify({ query }), signal });

  it("GraphQL: queries and a mutation whose clients hang up are cancelled, never left waiting or applied later", async () => {
    const change = await submitChange(`update ${SCHEMA}.items set label = 'never' where id = 4`);
    const reject = gql(`mutation { rejectChange(input: { changeId: "${change}", reason: "gone" }) { result { status } } }`, adminToken);
    const list = gql("{ allChangeRequests(first: 1) { nodes { rowId } } }", editorToken);
    // The mutation first (so it surely reaches the lock), then more queries than the pool has connections.
    await hangUpWhileLocked(["snapbase.change_requests"], [reject, ...Array.from({ length: POOL + 2 }, () => list)], POOL);
    // Cancelled while the lock was held: the rejection was rolled back, not applied once the lock went.
    expect((await owner().query("select status from snapbase.change_requests where id = $1", [change])).rows[0].status).toBe("pending");
    await expectServing(small.url);
  });

  it("sign-in and the token check of a client that hangs up are cancelled (REST and GraphQL)", async () => {
    const signIn = (signal: AbortSignal) => fetch(`${small.url}/api/v1/auth/login`, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ email: editor.email, password: TEST_PASSWORD }), signal });
    const rest = (signal: AbortSignal) => fetch(`${small.url}/api/v1/changes?status=pending`, { headers: { authorization: `Bearer ${editorToken}` }, signal });
    await hangUpWhileLocked(["snapbase_private.sessions"], [signIn, rest, gql("{ currentAppRole }", editorToken)], 3);
    await expectServing(small.url);
  });

  it("shutdown with a request in flight and an open event stream ends within its drain time and stops what is left", async () => {
    const doomed = await startTestServer({ authenticatorPoolSize: POOL });
    await expectServing(doomed.url);
    const holder = await locker();
    await holder.query("begin; lock table snapbase.snapshots, snapbase.change_requests in access exclusive mode");
    const logFrom = logged.length;
    try {
      const stuck = fetch(doomed.url + `/api/v1/snapshots/${snapshotId}`, { headers: { authorization: `Bearer ${adminToken}` } }).then((r) => r.status, () => "cut off");
      const stuckGraphql = fetch(`${doomed.url}/graphql`, {
        method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${editorToken}` },
        body: JSON.stringify({ query: "{ allChangeRequests(first: 1) { nodes { rowId } } }" }),
      }).then((r) => r.status, () => "cut off");
      const stream = await fetch(`${doomed.url}/api/v1/changes/events`, { headers: { authorization: `Bearer ${adminToken}` } });
      const streamEnded = (async () => {
        try {
          for await (const _ of stream.body!) { /* read until it ends */ }
        } catch {
          /* cut */
        }
        return true;
      })();
      await waitFor("the requests to wait for the lock", async () => (await authenticatorBackends("wait_event_type = 'Lock'")) >= 2);
      await doomed.close({ drainMs: 500 });
      expect(await stuck).toBe("cut off");
      expect(await stuckGraphql).toBe("cut off");
      expect(await streamEnded).toBe(true);
      // Stopped at the end of the drain like a client that hung up, not only by the pool's last resort.
      expect(logged.slice(logFrom).filter((line) => line.includes("closing database connections still in use"))).toEqual([]);
      // Its query was cancelled while the lock was still held: nothing waits any more.
      await waitFor("the stopped request's query to end", async () => (await authenticatorBackends("wait_event_type = 'Lock'")) === 0);
    } finally {
      await holder.query("rollback");
      await holder.end();
    }
  });
});

describe("a real server process", () => {
  let child: ChildProcess | undefined;
  afterAll(() => {
    child?.kill("SIGKILL");
  });

  it("survives every backend of its database being terminated, and SIGTERM ends it within its drain time with a request in flight", async () => {
    child = spawn(process.execPath, ["src/cli.ts", "start"], {
      cwd: projectRoot,
      env: {
        PATH: process.env.PATH ?? "", HOME: process.env.HOME ?? "/tmp", PORT: "0", LOG_LEVEL: "error",
        DATABASE_URL: db.ownerUrl, DATABASE_AUTHENTICATOR_URL: db.authenticatorUrl,
        SNAPBASE_ROLE_PREFIX: db.roles.anonymous.replace(/_anonymous$/, ""), JWT_SECRET: db.jwtSecret, JWT_TTL: "1 hour",
        SNAPBASE_CREDENTIALS_KEY: TEST_CREDENTIALS_KEY, SNAPBASE_DEMO: "false", SHUTDOWN_DRAIN_MS: "1000",
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    child.stdout!.on("data", (d) => (out += d));
    child.stderr!.on("data", (d) => (out += d));
    const exited = new Promise<number | null>((resolve) => child!.once("exit", resolve));
    const url = await waitFor("the server to start", async () => {
      if (child!.exitCode !== null) throw new Error(`exited early:\n${out}`);
      return out.includes("Press Ctrl-C") && /GraphQL\s+(http:\/\/\S+)\/graphql/.exec(out)?.[1];
    }, 120_000);
    expect((await http(url, "GET", "/readyz")).status).toBe(200);

    await root((c) => c.query("select pg_terminate_backend(pid) from pg_stat_activity where datname = $1 and pid <> pg_backend_pid()", [DATABASE]));
    await waitFor("the server to answer again", async () => (await http(url, "GET", "/readyz")).status === 200);
    await expectServing(url);
    expect(child.exitCode).toBe(null);

    const holder = await locker();
    await holder.query("begin; lock table snapbase.snapshots in access exclusive mode");
    try {
      const stuck = fetch(`${url}/api/v1/snapshots/${snapshotId}/export.csv`, { headers: { authorization: `Bearer ${adminToken}` } }).then((r) => r.status, () => "cut off");
      await waitFor("the export to wait for the lock", async () => (await authenticatorBackends("wait_event_type = 'Lock'")) >= 1);
      child.kill("SIGTERM");
      expect(await exited).toBe(0);
      expect(await stuck).toBe("cut off");
      await waitFor("the stopped export's query to end", async () => (await authenticatorBackends("wait_event_type = 'Lock'")) === 0);
    } finally {
      await holder.query("rollback");
      await holder.end();
    }
    expect(out).not.toMatch(/Unhandled|uncaught/i);
  });
});

describe("bad input never gives a 500 and is never silently changed", () => {
  const post = (path: string, body: BodyInit, type: string, token = editorToken) =>
    fetch(server.url + path, { method: "POST", headers: { "content-type": type, authorization: `Bearer ${token}` }, body })
      .then(async (r) => ({ status: r.status, body: await r.json().catch(() => null) }));

  it("a JSON body declared with charset=latin1 is 415", async () => {
    const res = await post("/api/v1/auth/login", JSON.stringify({ email: editor.email, password: TEST_PASSWORD }), "application/json; charset=latin1");
    expect(res).toEqual({ status: 415, body: { error: { code: "unsupported_charset", message: expect.stringMatching(/UTF-8/) } } });
  });

  it("a broken percent-escape in the path is 400", async () => {
    const res = await http(server.url, "GET", "/api/v1/tables/%E0%A4%A/snapshots", { token: editorToken });
    expect(res).toMatchObject({ status: 400, body: { error: { code: "invalid_path", message: expect.any(String) } } });
  });

  it("invalid UTF-8 in a CSV upload or in a JSON string is refused, not stored with U+FFFD", async () => {
    const count = async () => Number((await owner().query("select count(*) from snapbase.csv_files")).rows[0].count);
    const before = await count();
    const csv = Buffer.concat([Buffer.from("id,name\n1,caf"), Buffer.from([0xe9]), Buffer.from("\n")]);
    const upload = await post("/api/v1/csv-files?name=latin.csv", csv, "text/csv");
    expect(upload).toEqual({ status: 400, body: { error: { code: "invalid_utf8", message: "the CSV file is not valid UTF-8" } } });
    expect(await count()).toBe(before);

    const json = Buffer.concat([Buffer.from(`{"table_name": "${SCHEMA}.items", "sql": "update ${SCHEMA}.items set label = 'x' where id = 3", "reason": "caf`), Buffer.from([0xe9]), Buffer.from('"}')]);
    expect(await post("/api/v1/changes", json, "application/json")).toEqual({ status: 400, body: { error: { code: "invalid_utf8", message: "the JSON body is not valid UTF-8" } } });
    const graph = Buffer.concat([Buffer.from('{"query": "{ resolveManagedTable(name: \\"caf'), Buffer.from([0xe9]), Buffer.from('\\") { id } }"}')]);
    expect((await post("/graphql", graph, "application/json")).status).toBe(400);
    // A lone surrogate escape cannot be stored as UTF-8 either.
    const lone = await post("/api/v1/changes", `{"table_name": "${SCHEMA}.items", "sql": "update ${SCHEMA}.items set label = 'x' where id = 3", "reason": "\\ud800"}`, "application/json");
    expect(lone).toEqual({ status: 400, body: { error: { code: "invalid_utf8", message: expect.stringMatching(/\$\.reason/) } } });
    expect((await owner().query("select count(*)::int as n from snapbase.change_requests where reason like '%' || chr(65533) || '%'")).rows[0].n).toBe(0);
  });

  it("JSON or GraphQL text nested thousands of levels deep is 400 with the error shape, not a stack overflow", async () => {
    const deep = (n: number) => "[".repeat(n) + "]".repeat(n);
    const rest = await post("/api/v1/changes", `{"table_name": "${SCHEMA}.items", "sql": "select 1", "reason": ${deep(2000)}}`, "application/json");
    expect(rest).toEqual({ status: 400, body: { error: { code: "json_too_deep", message: expect.stringMatching(/512/) } } });
    // A JSON value in a deep object, with brackets inside strings that do not count.
    const objects = `{"a":`.repeat(2000) + `"[[[{{{"` + "}".repeat(2000);
    expect((await post("/api/v1/changes", objects, "application/json")).body.error.code).toBe("json_too_deep");
    // Within the limit it is only an ordinary bad request.
    expect((await post("/api/v1/changes", `{"table_name": 1, "x": ${deep(500)}}`, "application/json")).body.error.code).not.toBe("json_too_deep");

    const variables = await post("/graphql", `{"query": "{ currentAppRole }", "variables": {"a": ${deep(2000)}}}`, "application/json");
    expect(variables).toEqual({ status: 400, body: { errors: [{ message: expect.stringMatching(/512/), extensions: { code: "json_too_deep" } }] } });
    const literal = await post("/graphql", JSON.stringify({ query: `{ resolveManagedTable(name: ${deep(3000)}) { id } }` }), "application/json");
    expect(literal).toEqual({ status: 400, body: { errors: [{ message: expect.stringMatching(/512/), extensions: { code: "query_too_deep" } }] } });
    // Brackets inside strings and comments are text, not nesting.
    const quoted = await post("/graphql", JSON.stringify({ query: `# ${"[".repeat(3000)}\n{ resolveManagedTable(name: "${"[".repeat(3000)}") { id } }` }), "application/json");
    expect(quoted.body.errors?.[0]?.extensions?.code).not.toBe("query_too_deep");
  });

  it("a query string that is not valid percent-encoded UTF-8 is 400, never stored with U+FFFD or its escapes as text", async () => {
    const count = async () => Number((await owner().query("select count(*) from snapbase.csv_files")).rows[0].count);
    const before = await count();
    for (const name of ["a%ffb", "a%zb", "a%e", "caf%C3"]) {
      const res = await post(`/api/v1/csv-files?name=${name}`, "id\n1\n", "text/csv");
      expect(res, name).toEqual({ status: 400, body: { error: { code: "invalid_query", message: expect.stringMatching(/percent-encoded UTF-8/) } } });
    }
    expect(await count()).toBe(before);
    // GraphQL and every other route alike.
    const gql = await fetch(`${server.url}/graphql?x=%ff`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${editorToken}` }, body: JSON.stringify({ query: "{ currentAppRole }" }) });
    expect(gql.status).toBe(400);
    expect((await gql.json()).errors[0].extensions.code).toBe("invalid_query");
    // Valid escapes and '+' still read as they always did.
    const ok = await post(`/api/v1/csv-files?name=caf%C3%A9+${RUN}.csv`, "id\n1\n", "text/csv");
    expect(ok.status, JSON.stringify(ok.body)).toBe(201);
    expect(ok.body.file.name).toBe(`café ${RUN}.csv`);
  });

  it("a CSV body in another charset or with a Content-Encoding is 415 on both CSV endpoints, never read as something else", async () => {
    const wb = (await graphql(server.url, `mutation { createWorkbook(input: { name: "Charsets" }) { result { rowId } } }`, {}, editorToken)).body.data.createWorkbook.result.rowId;
    const table = (await graphql(server.url, `mutation($w: BigInt!) { addWorkbookTable(input: { workbookId: $w, name: "T", columns: [{name: "id", type: "integer"}, {name: "note", type: "text"}] }) { result { rowId } } }`,
      { w: wb }, editorToken)).body.data.addWorkbookTable.result.rowId;
    const imports = async () => Number((await owner().query("select count(*) from snapbase.csv_imports")).rows[0].count);
    const files = async () => Number((await owner().query("select count(*) from snapbase.csv_files")).rows[0].count);
    const before = [await imports(), await files()];
    // "é" in UTF-8, declared as Latin-1 (where the same bytes are "Ã©").
    const csv = Buffer.concat([Buffer.from("id,note\n1,caf"), Buffer.from([0xc3, 0xa9]), Buffer.from("\n")]);
    const send = (path: string, headers: Record<string, string>) => fetch(server.url + path, {
      method: "POST", headers: { authorization: `Bearer ${editorToken}`, ...headers }, body: csv,
    }).then(async (r) => ({ status: r.status, body: await r.json().catch(() => null) }));
    for (const path of [`/api/v1/workbook-tables/${table}/imports`, `/api/v1/csv-files?name=enc-${RUN}.csv`]) {
      expect(await send(path, { "content-type": "text/csv; charset=iso-8859-1" }), path)
        .toEqual({ status: 415, body: { error: { code: "unsupported_charset", message: expect.stringMatching(/UTF-8/) } } });
      for (const encoding of ["gzip", "br", "x-unknown"]) {
        expect(await send(path, { "content-type": "text/csv", "content-encoding": encoding }), `${path} ${encoding}`)
          .toEqual({ status: 415, body: { error: { code: "unsupported_content_encoding", message: expect.stringMatching(/identity/) } } });
      }
    }
    expect([await imports(), await files()]).toEqual(before);
    // As UTF-8 (declared or not, or with Content-Encoding: identity) it is what it says.
    const ok = await send(`/api/v1/workbook-tables/${table}/imports`, { "content-type": "text/csv; charset=utf-8", "content-encoding": "identity" });
    expect(ok.status, JSON.stringify(ok.body)).toBe(201);
    expect(ok.body.preview.sample[0].cells[1]).toBe("café");
  });

  it("a JSON body with a key twice in one object is 400, not read as its last value", async () => {
    const count = async () => Number((await owner().query("select count(*) from snapbase.change_requests")).rows[0].count);
    const before = await count();
    const change = (extra: string) => `{"table_name": "${SCHEMA}.items", "sql": "update ${SCHEMA}.items set label = 'x' where id = 5", "reason": "dup"${extra}}`;
    for (const body of [
      change(`, "sql": "update ${SCHEMA}.items set label = 'y' where id = 6"`),
      change(`, "\\u0073ql": "select 1"`), // the same key, escaped
      change(`, "edits": {"k": 1, "k": 2}`),
    ]) {
      const res = await post("/api/v1/changes", body, "application/json");
      expect(res, body).toEqual({ status: 400, body: { error: { code: "duplicate_key", message: expect.stringMatching(/twice/) } } });
    }
    expect(await count()).toBe(before);
    const gql = await post("/graphql", `{"query": "{ currentAppRole }", "query": "{ currentUserId }"}`, "application/json");
    expect(gql).toEqual({ status: 400, body: { errors: [{ message: expect.stringMatching(/"query"/), extensions: { code: "duplicate_key" } }] } });
    // The same key in different objects, and keys that only look alike, are fine.
    const fine = await post("/graphql", `{"query": "{ currentAppRole }", "variables": {"a": [{"k": 1}, {"k": 2}], "b": {"k": {"k": 1}}, "K": 1, "k\\"": 2, "k": 3}}`, "application/json");
    expect(fine).toEqual({ status: 200, body: { data: { currentAppRole: "editor" } } });
  });

  it("a body of the wrong type is 415, not a misleading 400", async () => {
    const text = await post("/api/v1/changes", `table_name=${SCHEMA}.items`, "text/plain");
    expect(text).toEqual({ status: 415, body: { error: { code: "unsupported_media_type", message: expect.stringMatching(/JSON/) } } });
    const form = await post("/api/v1/auth/login", `email=a&password=b`, "application/x-www-form-urlencoded");
    expect(form.status).toBe(415);
    // An empty POST is not a body of the wrong type.
    const empty = await fetch(server.url + "/api/v1/changes/999999/reject", { method: "POST", headers: { authorization: `Bearer ${adminToken}` } });
    expect(empty.status).toBe(404);
  });

  it("the import preview shows at most a capped part of each cell, in REST and GraphQL", async () => {
    const wb = (await graphql(server.url, `mutation { createWorkbook(input: { name: "Preview" }) { result { rowId } } }`, {}, editorToken)).body.data.createWorkbook.result.rowId;
    const table = (await graphql(server.url, `mutation($w: BigInt!) { addWorkbookTable(input: { workbookId: $w, name: "T", columns: [{name: "id", type: "integer"}, {name: "note", type: "text"}] }) { result { rowId } } }`,
      { w: wb }, editorToken)).body.data.addWorkbookTable.result.rowId;
    const huge = "x".repeat(3_000_000);
    const res = await fetch(`${server.url}/api/v1/workbook-tables/${table}/imports`, {
      method: "POST", headers: { "content-type": "text/csv", authorization: `Bearer ${editorToken}` }, body: `id,note\n1,${huge}\n2,short\n`,
    });
    const text = await res.text();
    expect(res.status, text.slice(0, 300)).toBe(201);
    expect(text.length).toBeLessThan(20_000);
    const body = JSON.parse(text);
    const cell = body.preview.sample[0].cells[1];
    expect(cell).toBe(`${"x".repeat(PREVIEW_CELL_CHARS)}…[3000000 characters]`);
    expect(body.preview.sample[1].cells[1]).toBe("short");
    expect(body.preview.truncated_cells).toBe(1);

    const gql = await graphql(server.url, `query($i: BigInt!) { csvImportPreview(importId: $i) }`, { i: String(body.import.id) }, editorToken);
    expect(gql.body.errors).toBeUndefined();
    expect(gql.body.data.csvImportPreview.sample[0].cells[1]).toBe(cell);
  });

  it("GraphQL BigInt arguments are read as strictly as REST ids: no spaces, signs or leading zeros, within bigint", async () => {
    const query = "query($id: BigInt!) { snapshotRows(snapshotId: $id, first: 1) { nodes { ordinal } } }";
    for (const bad of [" 1", "+1", "1 ", "01", "1e3", "0x1", "9223372036854775808", "", 1.5]) {
      const variable = await graphql(server.url, query, { id: bad }, adminToken);
      expect(variable.body.errors?.[0]?.extensions?.code, JSON.stringify(bad)).toBe("invalid_bigint");
      expect(variable.body.data ?? null).toBe(null);
    }
    for (const bad of [" 1", "+1"]) {
      const literal = await graphql(server.url, `{ snapshotRows(snapshotId: ${JSON.stringify(bad)}, first: 1) { nodes { ordinal } } }`, {}, adminToken);
      expect(literal.status, JSON.stringify(literal.body)).toBe(400);
      expect(literal.body.errors?.[0]?.extensions?.code).toBe("invalid_bigint");
    }
    // Canonical integers, as strings or JSON numbers, are read as always.
    for (const good of [snapshotId, Number(snapshotId)]) {
      const ok = await graphql(server.url, query, { id: good }, adminToken);
      expect(ok.body.errors, JSON.stringify(good)).toBeUndefined();
      expect(ok.body.data.snapshotRows.nodes).toHaveLength(1);
    }
  });

  it("the largest bigint is an id like any other; one past it is refused", async () => {
    const max = await http(server.url, "GET", "/api/v1/snapshots/9223372036854775807", { token: adminToken });
    expect(max.status).toBe(404);
    expect(max.body.error.code).toBe("P0002");
    const past = await http(server.url, "GET", "/api/v1/snapshots/9223372036854775808", { token: adminToken });
    expect(past).toMatchObject({ status: 400, body: { error: { code: "invalid_id", message: expect.stringMatching(/9223372036854775807/) } } });
  });
});

describe("nothing a request does survives it on a pooled connection", () => {
  let one: RunningServer;
  beforeAll(async () => {
    // Functions a request might run that leave session state behind (exposed as mutations, as the server introspects at start).
    await owner().query(`
      create function snapbase.faults_leave_state() returns int language plpgsql volatile as $$
        begin
          perform set_config('jwt.claims.user_id', '1', false);
          perform pg_advisory_lock(7357);
          return pg_backend_pid();
        end $$;
      create function snapbase.faults_session_state() returns jsonb language sql volatile as $$
        select jsonb_build_object('pid', pg_backend_pid(), 'user_id', nullif(current_setting('jwt.claims.user_id', true), ''),
          'advisory_locks', (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid())) $$;
      grant execute on function snapbase.faults_leave_state(), snapbase.faults_session_state() to ${db.roles.anonymous}, ${db.roles.viewer};`);
    // One connection: the next request surely reuses it.
    one = await startTestServer({ authenticatorPoolSize: 1 });
  });
  afterAll(async () => {
    await one?.close();
    await owner().query("drop function if exists snapbase.faults_leave_state(), snapbase.faults_session_state()");
  });

  it("a session-level setting and advisory lock taken during a request are gone for the next request on that connection", async () => {
    const left = await graphql(one.url, "mutation { faultsLeaveState(input: {}) { result } }");
    expect(left.body.errors).toBeUndefined();
    const pid = left.body.data.faultsLeaveState.result;
    const next = await graphql(one.url, "mutation { faultsSessionState(input: {}) { result } }");
    expect(next.body.data.faultsSessionState.result).toEqual({ pid, user_id: null, advisory_locks: 0 });
    // As a REST request sees it too: the anonymous caller is nobody.
    expect((await graphql(one.url, "{ currentUserId }")).body).toEqual({ data: { currentUserId: null } });
  });
});
