// The GraphQL SDL as committed in schema.graphql (sorted, so diffs are stable).
import { makeSchema } from "postgraphile";
import { createPool } from "../db/pools.ts";
import { lexicographicSortSchema, printSchema } from "postgraphile/graphql";
import type { RoleNames } from "../config.ts";
import { makePreset } from "./graphql.ts";

export async function exportSchema(opts: { authenticatorUrl: string; jwtSecret: string; roles: RoleNames }): Promise<string> {
  const pool = createPool({ name: "schema export", connectionString: opts.authenticatorUrl, max: 2 });
  try {
    const { schema } = await makeSchema(makePreset({ pool, auth: { jwtSecret: opts.jwtSecret, roles: opts.roles, pool } }));
    return printSchema(lexicographicSortSchema(schema)) + "\n";
  } finally {
    await pool.end();
  }
}
