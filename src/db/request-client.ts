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

export async function withUserTransaction<T>(
  pool: pg.Pool,
  settings: PgSettings,
  fn: (client: pg.PoolClient) => Promise<T>,
  signal?: AbortSignal,
): Promise<T> {
  if (signal?.aborted) throw new RequestAbortedError();
  const client = await pool.connect();
  let broken: Error | undefined;
  const onAbort = () => {
    broken = new RequestAbortedError();
    abortClient(client);
  };
  if (signal?.aborted) onAbort();
  else signal?.addEventListener("abort", onAbort, { once: true });
  try {
    if (broken) throw broken;
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
    if (broken) throw broken;
    await client.query("rollback").catch((e: unknown) => void (broken = e instanceof Error ? e : new Error(String(e))));
    throw error;
  } finally {
    signal?.removeEventListener("abort", onAbort);
    // A connection that was aborted, or cannot even roll back, is destroyed rather than pooled.
    client.release(broken);
  }
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
