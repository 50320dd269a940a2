// graphile-migrate, driven from code so that role names and connections come from
// our validated config. `.gmrc` holds the shared settings (folder, placeholders).
import { commit, migrate, watch, type Settings } from "graphile-migrate";
import { Logger as WorkerLogger, runMigrations as installWorkerSchema } from "graphile-worker";
import { readFileSync, readdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import type pg from "pg";
import { Logger } from "@graphile/logger";
import { createPool } from "./pools.ts";
import { graphileLogFactory } from "../log.ts";
import type { RoleNames } from "../config.ts";

export const projectRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const migrationsFolder = path.join(projectRoot, "migrations");

export interface MigrationTarget {
  ownerUrl: string;
  roles: RoleNames;
  /** Needed only to commit (it resets a shadow database). */
  rootUrl?: string;
  shadowUrl?: string;
}

/** The `:ROLE_*` placeholders of migrations (and demo SQL), filled with real role names. */
export function rolePlaceholders(roles: RoleNames): Record<string, string> {
  return {
    ":DATABASE_AUTHENTICATOR": roles.authenticator,
    ":ROLE_ANONYMOUS": roles.anonymous,
    ":ROLE_VIEWER": roles.viewer,
    ":ROLE_EDITOR": roles.editor,
    ":ROLE_ADMIN": roles.admin,
    ":ROLE_AGENT": roles.agent,
    ":ROLE_CHANGE_RUNNER": roles.changeRunner,
    ":ROLE_FILTER_READER": roles.filterReader,
  };
}

export function fillPlaceholders(sql: string, roles: RoleNames): string {
  const map: Record<string, string> = { ...rolePlaceholders(roles), ":DATABASE_OWNER": roles.owner };
  return sql.replace(/:[A-Z][A-Z_]+\b/g, (m) => map[m] ?? m);
}

function settingsFor(target: MigrationTarget): Settings {
  const gmrc = JSON.parse(readFileSync(path.join(projectRoot, ".gmrc"), "utf8")) as Settings;
  const { roles } = target;
  return {
    ...gmrc,
    migrationsFolder,
    connectionString: target.ownerUrl,
    rootConnectionString: target.rootUrl ?? "template1",
    shadowConnectionString: target.shadowUrl,
    databaseOwner: roles.owner,
    placeholders: rolePlaceholders(roles),
    logger: quietLogger,
  };
}

// graphile-migrate and graphile-worker log through @graphile/logger (each its own
// copy); route them into our JSON logs, keeping only warnings and errors (while
// migrating they narrate every step at info level).
const quietLogger = new Logger(graphileLogFactory("graphile-migrate", "warn"));
export const quietWorkerLogger = new WorkerLogger(graphileLogFactory("graphile-worker", "warn"));

// The work in progress is the folder `migrations/current/` (graphile-migrate's
// folder mode: its files are applied in number order, so separate topics can be
// worked on side by side). Empty when nothing but comments is in it.
function currentMigrationIsEmpty(): boolean {
  const folder = path.join(migrationsFolder, "current");
  let files: string[];
  try {
    files = readdirSync(folder).filter((f) => f.endsWith(".sql"));
  } catch {
    return true;
  }
  return files.every((f) => readFileSync(path.join(folder, f), "utf8").replace(/--.*$/gm, "").trim() === "");
}

/**
 * Applies committed migrations, then (outside production) the work-in-progress
 * `migrations/current/`. Idempotent: re-running applies nothing new.
 */
export async function runMigrations(target: MigrationTarget, opts: { includeCurrent: boolean }): Promise<void> {
  const settings = settingsFor(target);
  await migrate(settings, false, false);
  // SQL functions queue jobs with graphile_worker.add_job, so its schema must exist
  // even before a worker first starts.
  const pool = createPool({ name: "worker schema", connectionString: target.ownerUrl, max: 1 });
  try {
    await installWorkerSchema({ pgPool: pool, logger: quietWorkerLogger });
  } finally {
    await pool.end();
  }
  if (opts.includeCurrent && !currentMigrationIsEmpty()) await watch(settings, true, false);
  // graphile-migrate keeps its pool open 200 ms after use and exits the process if
  // a pooled connection then dies (as when the embedded server stops right after
  // `npm run migrate`); wait until it has closed.
  await new Promise((resolve) => setTimeout(resolve, 250));
}

export async function commitMigration(target: MigrationTarget, message?: string): Promise<void> {
  await commit(settingsFor(target), message);
}

export function committedMigrationNames(): string[] {
  return readdirSync(path.join(migrationsFolder, "committed"))
    .filter((f) => f.endsWith(".sql"))
    .sort();
}

/** True when the database has every committed migration applied. */
export async function migrationsAreCurrent(client: pg.ClientBase): Promise<boolean> {
  const names = committedMigrationNames();
  if (names.length === 0) return true;
  // graphile-migrate records "000007.sql" for "000007-some-message.sql".
  const latest = parseInt(names[names.length - 1]!, 10);
  const { rows } = await client.query<{ n: number | null }>(
    "select max(split_part(filename, '.', 1)::int) as n from graphile_migrate.migrations",
  );
  return rows[0]?.n === latest;
}
