// Shared test helpers: act as a role inside a transaction that is rolled back,
// create committed users for HTTP tests, and run the real server on a free port.
// `db` is this test file's own database (a copy of the migrated template, made by
// setup-file.ts), so a file may commit whatever it likes; what it logs is in `logged`.
import { randomBytes } from "node:crypto";
import pg from "pg";
import { afterAll, inject } from "vitest";
import { signClaims } from "../src/auth/tokens.ts";
import { createPool } from "../src/db/pools.ts";
import { startServer, type RunningServer, type ServerOptions } from "../src/server/app.ts";

export const db = inject("db");
export { logged } from "./log-sink.ts";

const pools: pg.Pool[] = [];
afterAll(async () => {
  await Promise.all(pools.splice(0).map((p) => p.end()));
});

// Test files run in parallel on a server other runs share: each keeps few connections
// (these pools, a test server's pools, a worker's). Through the same factory as the
// server's pools: a backend a fault test terminates is logged, never an unhandled
// 'error' event in the test process.
function pool(url: string): pg.Pool {
  const p = createPool({ name: "test", connectionString: url, max: 4, quiet: true });
  pools.push(p);
  return p;
}
let ownerPool: pg.Pool | undefined;
let authPool: pg.Pool | undefined;
export const owner = (): pg.Pool => (ownerPool ??= pool(db.ownerUrl));
export const authenticator = (): pg.Pool => (authPool ??= pool(db.authenticatorUrl));

export type AppRole = "anonymous" | "viewer" | "editor" | "admin" | "agent";

export interface Actor {
  role: AppRole;
  userId?: number | string;
  email?: string;
  extra?: Record<string, string>;
}

export function settingsFor(actor: Actor): Record<string, string> {
  const s: Record<string, string> = { role: db.roles[actor.role] };
  if (actor.userId !== undefined) s["jwt.claims.user_id"] = String(actor.userId);
  if (actor.email !== undefined) s["jwt.claims.email"] = actor.email;
  if (actor.role !== "anonymous") s["jwt.claims.role"] = actor.role;
  return { ...s, ...actor.extra };
}

/** Runs fn as the actor in a transaction that is always rolled back. */
export async function asActor<T>(actor: Actor, fn: (c: pg.PoolClient) => Promise<T>): Promise<T> {
  const client = await authenticator().connect();
  try {
    await client.query("begin");
    const s = settingsFor(actor);
    await client.query("select set_config(k, v, true) from unnest($1::text[], $2::text[]) s(k, v)", [Object.keys(s), Object.values(s)]);
    return await fn(client);
  } finally {
    await client.query("rollback").catch(() => {});
    client.release();
  }
}

/** Runs fn as the database owner (a DBA in psql) in a transaction that is rolled back. */
export async function asOwner<T>(fn: (c: pg.PoolClient) => Promise<T>): Promise<T> {
  const client = await owner().connect();
  try {
    await client.query("begin");
    return await fn(client);
  } finally {
    await client.query("rollback").catch(() => {});
    client.release();
  }
}

export const uniqueEmail = (label: string): string => `${label}-${randomBytes(5).toString("hex")}@example.com`;
export const TEST_PASSWORD = "correct horse battery";
export { TEST_CREDENTIALS_KEY } from "./credentials.ts";
import { TEST_CREDENTIALS_KEY } from "./credentials.ts";

export interface TestUser {
  id: string;
  email: string;
  role: "viewer" | "editor" | "admin";
}

/** Creates (and commits) a user, as a DBA would. */
export async function createUser(role: TestUser["role"], label: string = role): Promise<TestUser> {
  const email = uniqueEmail(label);
  const { rows } = await owner().query("select id from snapbase.create_user($1, $2, $3)", [email, TEST_PASSWORD, role]);
  return { id: String(rows[0].id), email, role };
}

/** What a session receives from RAISE NOTICE / WARNING. */
export interface Notice {
  severity?: string;
  message?: string;
}

/** A committed session as a Snapbase user (for concurrency tests), collecting every notice and warning it receives. */
export async function connectAs(user: TestUser): Promise<pg.Client & { notices: Notice[] }> {
  const c = Object.assign(new pg.Client({ connectionString: db.authenticatorUrl }), { notices: [] as Notice[] });
  c.on("notice", (n) => c.notices.push(n));
  await c.connect();
  // The client's own default: every NOTICE is sent (psql shows them).
  await c.query("set client_min_messages = notice");
  await c.query("select set_config('role', $1, false), set_config('jwt.claims.user_id', $2, false), set_config('jwt.claims.email', $3, false), set_config('jwt.claims.role', $4, false)",
    [db.roles[user.role], user.id, user.email, user.role]);
  return c;
}

export const actorOf = (u: TestUser): Actor => ({ role: u.role, userId: u.id, email: u.email });

/** Signs in through SQL (snapbase.authenticate opens a session and returns its
 *  claims) and signs the JWT as the server would. */
export async function tokenFor(u: TestUser): Promise<string> {
  const { rows } = await owner().query("select to_jsonb(c) as claims from snapbase.authenticate($1, $2) c", [u.email, TEST_PASSWORD]);
  return signClaims(rows[0].claims, db.jwtSecret);
}

/** The request pools of a test server (a real server's are 20 and 10). */
export const TEST_SERVER_POOL_SIZE = 6;
export const TEST_SERVER_REST_POOL_SIZE = 3;

export async function startTestServer(
  opts: { statementTimeoutMs?: number; authenticatorPoolSize?: number } & Partial<Pick<ServerOptions, "http">> = {},
): Promise<RunningServer> {
  return startServer({
    ownerUrl: db.ownerUrl,
    authenticatorUrl: db.authenticatorUrl,
    jwtSecret: db.jwtSecret,
    roles: db.roles,
    host: "127.0.0.1",
    port: 0,
    statementTimeoutMs: opts.statementTimeoutMs ?? 60000,
    credentialsKey: TEST_CREDENTIALS_KEY,
    // Requests queue for these; more concurrent requests than connections still spread over all of them.
    authenticatorPoolSize: opts.authenticatorPoolSize ?? TEST_SERVER_POOL_SIZE,
    restPoolSize: TEST_SERVER_REST_POOL_SIZE,
    http: opts.http,
  });
}

export interface HttpResult<T = any> {
  status: number;
  body: T;
  headers: Headers;
}

export async function http<T = any>(
  base: string,
  method: string,
  path: string,
  opts: { token?: string; body?: unknown; rawBody?: string; headers?: Record<string, string> } = {},
): Promise<HttpResult<T>> {
  const headers: Record<string, string> = { ...opts.headers };
  if (opts.token) headers.authorization = `Bearer ${opts.token}`;
  if (opts.body !== undefined || opts.rawBody !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(base + path, {
    method,
    headers,
    body: opts.rawBody ?? (opts.body === undefined ? undefined : JSON.stringify(opts.body)),
  });
  const text = await res.text();
  let body: any = text;
  try {
    body = JSON.parse(text);
  } catch {
    /* not JSON: keep the text */
  }
  return { status: res.status, body, headers: res.headers };
}

export async function graphql<T = any>(
  base: string,
  query: string,
  variables: Record<string, unknown> = {},
  token?: string,
  headers?: Record<string, string>,
): Promise<HttpResult<{ data?: T; errors?: { message: string; extensions?: { code?: string } }[] }>> {
  return http(base, "POST", "/graphql", { token, body: { query, variables }, headers });
}

/** A GraphQL request's data; its errors, if any, thrown as one Error naming every message. */
export async function graphqlData<T = any>(base: string, query: string, variables: Record<string, unknown> = {}, token?: string): Promise<T> {
  const res = await graphql<T>(base, query, variables, token);
  if (res.body.errors) throw new Error(res.body.errors.map((e) => e.message).join("; "));
  return res.body.data as T;
}

/** The SQLSTATE of the error fn throws (fails the test if it does not throw). */
export async function sqlState(fn: () => Promise<unknown>): Promise<{ code: string; message: string }> {
  try {
    await fn();
  } catch (error) {
    const e = error as { code?: string; message: string };
    return { code: e.code ?? "", message: e.message };
  }
  throw new Error("expected a database error, but the call succeeded");
}

/** Waits until a snapbase.jobs row leaves queued/running (awaiting_approval counts as settled). */
export async function settled(jobId: string | number, timeoutMs = 30_000) {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const { rows } = await owner().query("select * from snapbase.jobs where id = $1", [jobId]);
    if (rows[0] && !["queued", "running"].includes(rows[0].state)) return rows[0];
    if (Date.now() > until) throw new Error(`job ${jobId} still ${rows[0]?.state} after ${timeoutMs} ms: ${JSON.stringify(rows[0])}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
