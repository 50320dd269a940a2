// Loads the demo once: the `dev` tables, two users (admin and editor), pending change
// requests and a workbook. The users' password is DEMO_PASSWORD, or generated and printed once at first start.
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { withClient } from "../db/pools.ts";
import type { RoleNames } from "../config.ts";
import { fillPlaceholders } from "../db/migrate.ts";

export const DEMO_ADMIN_EMAIL = "admin@example.com";
export const DEMO_EDITOR_EMAIL = "editor@example.com";

export interface DemoResult {
  /** Set only when the demo was created by this call: the credentials to print. */
  created?: { adminEmail: string; editorEmail: string; password: string };
}

const demoSqlPath = path.join(path.dirname(fileURLToPath(import.meta.url)), "demo.sql");
const demoAsEditorSqlPath = path.join(path.dirname(fileURLToPath(import.meta.url)), "demo-as-editor.sql");

/** What start-up prints once the demo users exist: their password when it was
 *  generated, or where it came from when DEMO_PASSWORD chose it. */
export function demoUsersBanner(created: NonNullable<DemoResult["created"]>, passwordFromEnv: boolean): string {
  const password = passwordFromEnv ? "password: the one in DEMO_PASSWORD" : `password: ${created.password}`;
  return (
    `\nDemo users created${passwordFromEnv ? "" : " (shown once; set DEMO_PASSWORD to choose it)"}:\n` +
    `  admin   ${created.adminEmail}  ${password}\n` +
    `  editor  ${created.editorEmail}  ${password}\n`
  );
}

export async function loadDemo(ownerUrl: string, roles: RoleNames, password?: string): Promise<DemoResult> {
  return withClient("demo", ownerUrl, async (client) => {
    try {
      await client.query("begin");
      await client.query("select pg_advisory_xact_lock(hashtext('snapbase demo'))");
      const { rows } = await client.query("select to_regclass('dev.users') is not null as present");
      if (rows[0].present) {
        await client.query("commit");
        return {};
      }
      const demoPassword = password ?? randomBytes(9).toString("base64url");
      await client.query(fillPlaceholders(readFileSync(demoSqlPath, "utf8"), roles));
      await client.query("select snapbase.create_user($1, $2, 'admin')", [DEMO_ADMIN_EMAIL, demoPassword]);
      const editor = await client.query("select id from snapbase.create_user($1, $2, 'editor')", [DEMO_EDITOR_EMAIL, demoPassword]);
      // Done as the demo editor: the same claims a signed-in request carries.
      await client.query(
        "select set_config('jwt.claims.user_id', $1, true), set_config('jwt.claims.email', $2, true), set_config('jwt.claims.role', 'editor', true)",
        [String(editor.rows[0].id), DEMO_EDITOR_EMAIL],
      );
      await client.query(readFileSync(demoAsEditorSqlPath, "utf8"));
      await client.query("commit");
      return { created: { adminEmail: DEMO_ADMIN_EMAIL, editorEmail: DEMO_EDITOR_EMAIL, password: demoPassword } };
    } catch (error) {
      await client.query("rollback").catch(() => {});
      throw error;
    }
  });
}
