// Every PostgreSQL pool and long-lived client of the process is made here, so each
// one handles a lost backend the same way: a connection the server drops (restart,
// failover, pg_terminate_backend) is logged and thrown away, never an unhandled
// 'error' event that ends the process.
//
// Pools that run requests (the authenticator's) also reset each connection before
// it is reused, so nothing a request did survives it: settings and role, advisory
// locks, temporary tables, cursors, LISTENs and sequence state, in one round trip.
// Not DISCARD ALL: PostGraphile (@dataplan/pg) keeps named prepared statements on
// its connections and would lose track of them. A connection whose reset fails is
// destroyed instead of reused.
import { connect as netConnect } from "node:net";
import pg from "pg";
import { log } from "../log.ts";

/** What the reset runs, one simple query (one round trip). RESET ALL leaves the role, hence RESET ROLE. */
export const SESSION_RESET_SQL =
  "close all; unlisten *; reset role; reset all; select pg_advisory_unlock_all(); discard temp; discard sequences";

export interface PoolOptions {
  /** Named in logs: "authenticator", "owner", "worker", "connector", … */
  name: string;
  connectionString?: string;
  /** Instead of connectionString: connection settings already parsed (a connector's, with its checked address). */
  clientConfig?: pg.ClientConfig;
  max?: number;
  /** Run requests: reset session state before a connection is reused. */
  resetOnRelease?: boolean;
  /** Server settings for the whole session, sent at connect (RESET ALL returns to them). */
  sessionSettings?: Record<string, string>;
  connectionTimeoutMillis?: number;
  idleTimeoutMillis?: number;
  /** Client errors are expected (a connector's source going away): log them at debug level. */
  quiet?: boolean;
  /** Type parsers for this pool's connections (the worker reads json exactly). */
  types?: pg.CustomTypesConfig;
}

type Release = (err?: Error | boolean) => void;
type ConnectCallback = (err: Error | undefined, client: pg.PoolClient | undefined, done: Release) => void;

const CONNECT_FAILED = Symbol("snapbase.connectFailed");

/** Marks an error as a failure to get a connection (the database is unreachable or refuses us); the error is otherwise unchanged. */
function connectFailed(error: unknown): Error {
  const e = error instanceof Error ? error : new Error(String(error));
  (e as Error & { [CONNECT_FAILED]?: boolean })[CONNECT_FAILED] = true;
  return e;
}

/** Whether the error came from getting a connection rather than from a statement. */
export function isConnectFailure(error: unknown): boolean {
  return typeof error === "object" && error !== null && (error as { [CONNECT_FAILED]?: boolean })[CONNECT_FAILED] === true;
}

function startupOptions(settings: Record<string, string> | undefined): string | undefined {
  if (!settings || Object.keys(settings).length === 0) return undefined;
  // libpq's "options": -c name=value, with spaces and backslashes escaped.
  return Object.entries(settings).map(([k, v]) => `-c ${k}=${v.replace(/[\\ ]/g, "\\$&")}`).join(" ");
}

/**
 * The pool every part of Snapbase uses. Besides pg.Pool's behaviour it: handles
 * errors of idle and checked-out connections; marks failures to connect
 * (isConnectFailure); resets session state on release when asked; and can end
 * within a bound (endWithin), destroying connections still checked out after it.
 */
export class SnapbasePool extends pg.Pool {
  readonly poolName: string;
  private readonly resetOnRelease: boolean;
  private readonly checkedOut = new Set<pg.PoolClient>();

  constructor(opts: PoolOptions) {
    super({
      ...(opts.clientConfig ?? { connectionString: opts.connectionString }),
      ...(opts.types ? { types: opts.types } : {}),
      max: opts.max ?? 10,
      connectionTimeoutMillis: opts.connectionTimeoutMillis,
      idleTimeoutMillis: opts.idleTimeoutMillis ?? 30_000,
      // After any options of the connection string's own: the later -c of a name wins.
      ...(opts.sessionSettings ? { options: [opts.clientConfig?.options, startupOptions(opts.sessionSettings)].filter(Boolean).join(" ") } : {}),
    } as pg.PoolConfig);
    this.poolName = opts.name;
    this.resetOnRelease = opts.resetOnRelease ?? false;
    const report = opts.quiet ? log.debug : log.warn;
    // An idle connection that fails (the server went away) is removed by pg-pool; this keeps it from being unhandled.
    this.on("error", (error) => report("idle database connection lost", { pool: this.poolName, error: error.message }));
    // A checked-out one: its current query fails with the error, and the holder releases it.
    this.on("connect", (client) => {
      client.on("error", (error) => {
        if (!aborted.has(client)) report("database connection lost", { pool: this.poolName, error: error.message });
      });
    });
  }

  /** Connections handed out and not yet released. */
  get activeCount(): number {
    return this.checkedOut.size;
  }

  override connect(): Promise<pg.PoolClient>;
  override connect(callback: ConnectCallback): void;
  override connect(callback?: ConnectCallback): Promise<pg.PoolClient> | void {
    const connect = super.connect.bind(this) as (cb: ConnectCallback) => void;
    if (callback) {
      connect((err, client, done) => {
        if (err || !client) return callback(err ? connectFailed(err) : err, client, done);
        this.track(client);
        callback(undefined, client, client.release as Release);
      });
      return;
    }
    return new Promise((resolve, reject) => {
      connect((err, client) => {
        if (err || !client) return reject(connectFailed(err));
        this.track(client);
        resolve(client);
      });
    });
  }

  private track(client: pg.PoolClient): void {
    this.checkedOut.add(client);
    const release = client.release as Release;
    let released = false;
    client.release = ((err?: Error | boolean) => {
      if (released) return release(err); // pg-pool reports the double release
      released = true;
      this.checkedOut.delete(client);
      const state = client as unknown as { _ending?: boolean; _queryable?: boolean };
      if (err || !this.resetOnRelease || state._ending || state._queryable === false) return release(err);
      const status = client.getTransactionStatus?.();
      const sql = status && status !== "I" ? `rollback; ${SESSION_RESET_SQL}` : SESSION_RESET_SQL;
      client.query(sql).then(
        () => release(),
        (error: Error) => {
          log.warn("could not reset a database connection; closing it", { pool: this.poolName, error: error.message });
          release(error);
        },
      );
    }) as typeof client.release;
  }

  /** pool.end(), but after `ms` the connections still checked out are destroyed (their queries fail). */
  async endWithin(ms: number): Promise<void> {
    const ended = this.end();
    let timer: NodeJS.Timeout | undefined;
    const late = await Promise.race([
      ended.then(() => false),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), ms))),
    ]);
    clearTimeout(timer);
    if (!late) return;
    log.warn("closing database connections still in use", { pool: this.poolName, count: this.checkedOut.size });
    for (const client of this.checkedOut) abortClient(client);
    await ended;
  }
}

export function createPool(opts: PoolOptions): SnapbasePool {
  return new SnapbasePool(opts);
}

/**
 * A single connection (LISTEN, settings at start-up) with an error handler: a lost
 * connection calls onLost instead of ending the process.
 */
export async function connectClient(opts: {
  name: string;
  connectionString: string;
  onLost?: (error: Error) => void;
  quiet?: boolean;
}): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: opts.connectionString });
  let connected = false;
  client.on("error", (error) => {
    (opts.quiet ? log.debug : log.warn)("database connection lost", { connection: opts.name, error: error.message });
    if (connected) opts.onLost?.(error);
  });
  try {
    await client.connect();
  } catch (error) {
    await client.end().catch(() => {});
    throw connectFailed(error);
  }
  connected = true;
  return client;
}

/** Runs fn on a short-lived client and closes it, whatever happens. */
export async function withClient<T>(name: string, connectionString: string, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const client = await connectClient({ name, connectionString });
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => {});
  }
}

/**
 * Stops whatever the connection is doing: a CancelRequest for its running query
 * (PostgreSQL's own protocol, on a separate connection), then the socket is
 * destroyed so the connection can never be reused. The holder's pending query
 * fails and it must release the client with an error.
 */
/** Connections closed on purpose (abortClient): their connection errors are expected, not logged. */
const aborted = new WeakSet<object>();

export function abortClient(client: pg.ClientBase): void {
  aborted.add(client);
  const c = client as unknown as {
    processID?: number;
    secretKey?: number | Buffer;
    host?: string;
    port?: number;
    connection?: { stream?: { destroy(): void } };
  };
  if (typeof c.processID === "number" && c.secretKey !== undefined && c.host && c.port) sendCancelRequest(c.host, c.port, c.processID, c.secretKey);
  c.connection?.stream?.destroy();
}

function sendCancelRequest(host: string, port: number, pid: number, secretKey: number | Buffer): void {
  const key = Buffer.isBuffer(secretKey) ? secretKey : Buffer.alloc(4);
  if (!Buffer.isBuffer(secretKey)) key.writeInt32BE(secretKey);
  const packet = Buffer.alloc(12 + key.length);
  packet.writeInt32BE(packet.length, 0);
  packet.writeInt32BE(80877102, 4); // the CancelRequest code
  packet.writeInt32BE(pid, 8);
  key.copy(packet, 12);
  const socket = host.startsWith("/") ? netConnect(`${host}/.s.PGSQL.${port}`) : netConnect(port, host);
  socket.on("error", () => {}); // best effort: the socket is destroyed anyway
  socket.setTimeout(5000, () => socket.destroy());
  socket.on("connect", () => socket.end(packet));
}

/** SQLSTATEs and driver conditions that mean "the database is not reachable now", not "your request is wrong". */
const UNAVAILABLE_SQLSTATE = /^(08...|57P0[1-3]|53300|53400)$/;
const NETWORK_CODES = new Set(["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EPIPE", "EHOSTUNREACH", "ENETUNREACH", "ENOTFOUND", "EAI_AGAIN"]);

/** True for errors caused by losing (or not reaching) the database rather than by the statement. */
export function isDatabaseUnavailable(error: unknown): boolean {
  if (isConnectFailure(error)) return true;
  const e = error as { code?: unknown; message?: unknown } | null;
  if (!e || typeof e !== "object") return false;
  const code = typeof e.code === "string" ? e.code : undefined;
  if (code && (UNAVAILABLE_SQLSTATE.test(code) || NETWORK_CODES.has(code))) return true;
  if (error instanceof AggregateError) return error.errors.some(isDatabaseUnavailable);
  // pg's own messages for a connection that went away (no code).
  return code === undefined && typeof e.message === "string" &&
    /^(Connection terminated|Client has encountered a connection error|Client was closed|timeout exceeded when trying to connect|Cannot use a pool after calling end)/.test(e.message);
}
