// Entry point for the npm scripts: start | worker | migrate | migrate-commit | export-schema | dump-schema.
import "./env.ts";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { ConfigError, loadConfig, type Config } from "./config.ts";
import { prepareDatabase, type Database } from "./db/database.ts";
import { dumpDrift, dumpFromMigrations, SchemaMappingError, schemaFolder, writeDump } from "./db/schema-dump.ts";
import { commitMigration, projectRoot } from "./db/migrate.ts";
import { demoUsersBanner, loadDemo } from "./demo/index.ts";
import { log } from "./log.ts";
import { startServer, type RunningServer } from "./server/app.ts";
import { exportSchema } from "./server/schema-export.ts";
import { startWorker, type Worker } from "./worker.ts";

type Stoppable = { name: string; stop: () => Promise<void> };

/** A command that ran and found a problem to report (exit status 1, its message, no stack). */
class CommandFailed extends Error {}

function onShutdown(parts: Stoppable[], drainMs: () => number): void {
  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info("shutting down", { signal });
    // Every part bounds its own stop (drain, then stop what is left); this is the
    // last resort should one of them hang anyway.
    const deadline = setTimeout(() => {
      log.error("shutdown did not finish in time; exiting");
      process.exit(1);
    }, 2 * drainMs() + 20_000);
    deadline.unref();
    // Stop in reverse order of start: HTTP, then worker (drains running jobs), then the database.
    for (const part of [...parts].reverse()) {
      try {
        await part.stop();
      } catch (error) {
        log.error(`failed to stop ${part.name}`, { error: (error as Error).message });
      }
    }
    log.info("stopped");
    process.exit(0);
  };
  process.once("SIGINT", () => void shutdown("SIGINT"));
  process.once("SIGTERM", () => void shutdown("SIGTERM"));
}

async function start(config: Config, opts: { server: boolean; worker: boolean }): Promise<void> {
  const parts: Stoppable[] = [];
  onShutdown(parts, () => config.shutdownDrainMs);
  const db: Database = await prepareDatabase(config);
  parts.push({ name: "database", stop: () => db.stop() });
  const roles = db.migrationTarget.roles;

  if (opts.server && config.demo) {
    const demo = await loadDemo(db.ownerUrl, roles, config.demoPassword);
    if (demo.created) console.log(demoUsersBanner(demo.created, config.demoPassword !== undefined));
  }
  let worker: Worker | undefined;
  if (opts.worker) {
    worker = await startWorker({
      ownerUrl: db.ownerUrl,
      concurrency: config.worker.concurrency,
      credentialsKey: db.credentialsKey,
      drainMs: config.shutdownDrainMs,
    });
    parts.push({ name: "worker", stop: () => worker!.stop() });
  }
  let server: RunningServer | undefined;
  if (opts.server) {
    server = await startServer({
      ownerUrl: db.ownerUrl,
      authenticatorUrl: db.authenticatorUrl,
      jwtSecret: db.jwtSecret,
      roles,
      host: config.host,
      port: config.port,
      statementTimeoutMs: config.statementTimeoutMs,
      credentialsKey: db.credentialsKey,
      http: config.http,
      shutdownDrainMs: config.shutdownDrainMs,
    });
    parts.push({ name: "http server", stop: () => server!.close() });
  }
  const where = db.embedded ? "embedded PostgreSQL in " + path.relative(projectRoot, config.dataDir) : "DATABASE_URL";
  const lines = [`Snapbase is running (database: ${where}${worker ? "; worker in this process" : ""})`];
  if (server) {
    lines.push(
      `  GraphQL     ${server.url}/graphql  (WebSocket subscriptions on the same path)`,
      ...(config.http.graphiql ? [`  GraphiQL    ${server.url}/graphiql`] : []),
      `  REST        ${server.url}/api/v1`,
      `  health      ${server.url}/healthz   readiness ${server.url}/readyz`,
    );
  }
  console.log(lines.join("\n") + "\nPress Ctrl-C to stop.");
}

async function main(): Promise<void> {
  const [command = "start", ...args] = process.argv.slice(2);
  const config = loadConfig();
  switch (command) {
    case "start":
      return start(config, { server: true, worker: config.worker.enabled && !args.includes("--no-worker") });
    case "worker":
      return start(config, { server: false, worker: true });
    case "migrate":
      return withDatabase(config, async () => log.info("database is migrated"));
    case "migrate-commit":
      return withDatabase(config, (db) => commitMigration(db.migrationTarget, args.join(" ") || undefined), { migrate: false });
    case "export-schema":
      return withDatabase(config, async (db) => {
        const sdl = await exportSchema({ authenticatorUrl: db.authenticatorUrl, jwtSecret: db.jwtSecret, roles: db.migrationTarget.roles });
        writeFileSync(path.join(projectRoot, "schema.graphql"), sdl);
        log.info("wrote schema.graphql");
      });
    case "dump-schema":
      // schema/*.sql: the current definition of every object, from a fresh database built
      // from the migrations. --check: compare with schema/ instead of writing it (CI).
      return withDatabase(config, async (db) => {
        const files = await dumpFromMigrations(db.migrationTarget, { includeCurrent: config.env !== "production" });
        const folder = path.relative(projectRoot, schemaFolder);
        if (args.includes("--check")) {
          const drift = dumpDrift(files);
          if (drift.length) throw new CommandFailed(`${folder}/ does not match the migrations (${drift.join(", ")}): run \`npm run schema:dump\` and commit ${folder}/`);
          log.info("the schema dump matches the migrations", { folder });
        } else {
          writeDump(files);
          log.info("wrote the schema dump", { folder, files: [...files.keys()] });
        }
      });
    default:
      throw new Error(`unknown command ${JSON.stringify(command)} (start, worker, migrate, migrate-commit, export-schema, dump-schema)`);
  }
}

/** Runs a one-off command against the prepared (by default migrated) database, then stops it. */
async function withDatabase(config: Config, work: (db: Database) => Promise<void>, opts?: Parameters<typeof prepareDatabase>[1]): Promise<void> {
  const db = await prepareDatabase(config, opts);
  try {
    await work(db);
  } finally {
    await db.stop();
  }
}

main().catch((error: unknown) => {
  if (error instanceof ConfigError || error instanceof SchemaMappingError || error instanceof CommandFailed) console.error(error.message);
  else log.error("fatal", { error: error instanceof Error ? (error.stack ?? error.message) : String(error) });
  process.exit(1);
});
