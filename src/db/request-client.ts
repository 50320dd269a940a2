// Runs work as the requesting user: one transaction on the authenticator pool with
// the request's role and claims set locally — exactly what PostGraphile does.
import type pg from "pg";
import type { PgSettings } from "../auth/verify.ts";

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
