// The GraphQL SDL as committed in schema.graphql (sorted, so diffs are stable).
import pg from "pg";
import { makeSchema } from "postgraphile";
import { lexicographicSortSchema, printSchema } from "postgraphile/graphql";
import type { RoleNames } from "../config.ts";
import { makePreset } from "./graphql.ts";

export async function exportSchema(opts: { authenticatorUrl: string; jwtSecret: string; roles: RoleNames }): Promise<string> {
  const pool = new pg.Pool({ connectionString: opts.authenticatorUrl, max: 2 });
  try {
    const { schema } = await makeSchema(makePreset({ pool, auth: { jwtSecret: opts.jwtSecret, roles: opts.roles, pool } }));
    return printSchema(lexicographicSortSchema(schema)) + "\n";
  } finally {
    await pool.end();
  }
}
