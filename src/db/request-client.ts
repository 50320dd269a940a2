// Runs work as the requesting user: one transaction on the authenticator pool with
// the request's role and claims set locally — exactly what PostGraphile does.
//
// A request that carries an AbortSignal (the client hung up, or the server is
// shutting down) stops its database work at once: the running query is cancelled
// and the connection is destroyed, so it is neither kept busy nor reused.
import type pg from "pg";
import type { PgSettings } from "../auth/verify.ts";
import { abortClient } from "./pools.ts";

/** The settings in a fixed key order: requests with equal identities have equal
 *  access, so they may share what the database answers them. */
export function settingsIdentity(settings: PgSettings): string {
  return JSON.stringify(Object.keys(settings).sort().map((k) => [k, settings[k]]));
}

/** The request ended before its work did (the client went away, or shutdown). */
export class RequestAbortedError extends Error {
  constructor() {
    super("the request was aborted");
    this.name = "RequestAbortedError";
  }
}

/**
 * Runs fn on a connection of the pool that the signal can stop: an abort while
 * waiting for a connection stops the wait; an abort while fn runs cancels its
 * query and destroys the connection (abortClient), and fn's promise fails with
 * RequestAbortedError. fn may call `broken(error)` to have the connection
 * destroyed rather than pooled (e.g. it could not even roll back).
 */
export async function withAbortableClient<T>(
  pool: pg.Pool,
  signal: AbortSignal | undefined,
  fn: (client: pg.PoolClient, broken: (error: Error) => void) => Promise<T>,
): Promise<T> {
  const client = await connectUnlessAborted(pool, signal);
  let broken: Error | undefined;
  let aborted = false;
  const onAbort = () => {
    aborted = true;
    broken = new RequestAbortedError();
    abortClient(client);
  };
  signal?.addEventListener("abort", onAbort, { once: true });
  try {
    return await fn(client, (error) => void (broken ??= error));
  } catch (error) {
    if (aborted) throw broken!;
    throw error;
  } finally {
    signal?.removeEventListener("abort", onAbort);
    // A connection that was aborted, or is otherwise unusable, is destroyed rather than pooled.
    client.release(broken);
  }
}

/** pool.connect(), but a request aborted while it waits for a connection stops waiting
 *  (the connection, when it comes, goes straight back). */
function connectUnlessAborted(pool: pg.Pool, signal: AbortSignal | undefined): Promise<pg.PoolClient> {
  if (signal?.aborted) return Promise.reject(new RequestAbortedError());
  if (!signal) return pool.connect();
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(new RequestAbortedError());
    signal.addEventListener("abort", onAbort, { once: true });
    pool.connect().then(
      (client) => {
        signal.removeEventListener("abort", onAbort);
        if (signal.aborted) {
          client.release();
          reject(new RequestAbortedError());
        } else resolve(client);
      },
      (error: unknown) => {
        signal.removeEventListener("abort", onAbort);
        reject(error);
      },
    );
  });
}

/** One statement on the pool (outside a user transaction: sign-in, token checks) that the signal cancels. */
export async function queryUnlessAborted<R extends pg.QueryResultRow>(
  pool: pg.Pool,
  text: string,
  values: unknown[],
  signal: AbortSignal | undefined,
): Promise<pg.QueryResult<R>> {
  if (!signal) return pool.query<R>(text, values);
  return withAbortableClient(pool, signal, (client) => client.query<R>(text, values));
}

export async function withUserTransaction<T>(
  pool: pg.Pool,
  settings: PgSettings,
  fn: (client: pg.PoolClient) => Promise<T>,
  signal?: AbortSignal,
): Promise<T> {
  return withAbortableClient(pool, signal, async (client, broken) => {
    try {
      await client.query("begin");
      const keys = Object.keys(settings);
      await client.query("select set_config(k, v, true) from unnest($1::text[], $2::text[]) as s(k, v)", [
        keys,
        keys.map((k) => settings[k]),
      ]);
      const result = await fn(client);
      await client.query("commit");
      return result;
    } catch (error) {
      if (!signal?.aborted) await client.query("rollback").catch((e: unknown) => broken(e instanceof Error ? e : new Error(String(e))));
      throw error;
    }
  });
}

/** Rows of a query in batches, through a cursor in the client's open transaction:
 *  a result of any size is never held in memory. */
export async function* cursorBatches<R extends pg.QueryResultRow>(
  client: pg.PoolClient,
  sql: string,
  params: unknown[],
  batchSize: number,
): AsyncGenerator<R[]> {
  await client.query(`declare batched_rows no scroll cursor for ${sql}`, params);
  for (;;) {
    const { rows } = await client.query<R>(`fetch ${batchSize} from batched_rows`);
    if (rows.length === 0) break;
    yield rows;
  }
  await client.query("close batched_rows");
}
