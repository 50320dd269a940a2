// Runs work as the requesting user: one transaction on the authenticator pool with
// the request's role and claims set locally — exactly what PostGraphile does.
import type pg from "pg";
import type { PgSettings } from "../auth/verify.ts";

/** The settings in a fixed key order: requests with equal identities have equal
 *  access, so they may share what the database answers them. */
export function settingsIdentity(settings: PgSettings): string {
  return JSON.stringify(Object.keys(settings).sort().map((k) => [k, settings[k]]));
}

export async function withUserTransaction<T>(
  pool: pg.Pool,
  settings: PgSettings,
  fn: (client: pg.PoolClient) => Promise<T>,
): Promise<T> {
  const client = await pool.connect();
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
    await client.query("rollback").catch(() => {});
    throw error;
  } finally {
    client.release();
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
