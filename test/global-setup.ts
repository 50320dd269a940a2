// Migrates one template database once per run: TEST_DATABASE_URL's server if given
// (it must allow creating roles and databases), else an embedded one. Each test
// file then runs in its own copy of it (test/setup-file.ts), so files run in
// parallel without seeing each other's data.
import path from "node:path";
import pg from "pg";
import type { TestProject } from "vitest/node";
import { loadConfig, roleNames, type RoleNames } from "../src/config.ts";
import { bootstrapCluster } from "../src/db/bootstrap.ts";
import { applyDatabaseSettings } from "../src/db/database.ts";
import { startEmbeddedPostgres, type EmbeddedServer } from "../src/db/embedded.ts";
import { loadLocalSecrets } from "../src/db/local-secrets.ts";
import { projectRoot, runMigrations } from "../src/db/migrate.ts";
import { urlParts, withUrlParts } from "../src/db/urls.ts";
import { TEST_CREDENTIALS_KEY } from "./credentials.ts";
import { dropCopies } from "./databases.ts";

export interface TestDatabase {
  /** A superuser on the test server, connected to its `postgres` database. */
  rootUrl: string;
  /** The owner (not a superuser), connected to this test file's own database. */
  ownerUrl: string;
  /** The authenticator, connected to this test file's own database. */
  authenticatorUrl: string;
  /** Roles are cluster-wide: one set per run, shared by every file. */
  roles: RoleNames;
  jwtSecret: string;
  /** The migrated database every file's database is copied from; nothing may connect to it. */
  template: string;
  /** This test file's own database (set by test/setup-file.ts). */
  database: string;
}

declare module "vitest" {
  export interface ProvidedContext {
    db: TestDatabase;
  }
}

/** Roles are cluster-wide: they take the test database's name, so runs against
 *  different databases of one server (several checkouts, CI) never share roles. */
export const testRolePrefix = (database: string): string =>
  `t_${database.toLowerCase().replace(/[^a-z0-9_]+/g, "_")}`.slice(0, 40);
const OWNER_PASSWORD = "test-owner-password";
const AUTHENTICATOR_PASSWORD = "test-authenticator-password";
const EMBEDDED_TEST_PORT = 54339;

let embedded: EmbeddedServer | undefined;

export default async function setup(project: TestProject) {
  let serverUrl: string;
  let template = "snapbase_test";
  if (process.env.TEST_DATABASE_URL) {
    serverUrl = process.env.TEST_DATABASE_URL;
    template = urlParts(serverUrl).database || template;
  } else {
    const dataDir = path.join(projectRoot, ".snapbase", "test");
    const secrets = loadLocalSecrets(dataDir);
    embedded = await startEmbeddedPostgres({ dataDir, port: EMBEDDED_TEST_PORT, superuserPassword: secrets.superuserPassword });
    serverUrl = embedded.rootUrl();
  }
  const rootUrl = withUrlParts(serverUrl, { user: urlParts(serverUrl).user || "postgres", database: "postgres" });
  const root = new pg.Client({ connectionString: rootUrl });
  await root.connect();
  const templateId = root.escapeIdentifier(template);
  try {
    // What an earlier run left: its copies, and the template itself (rebuilt from the migrations below).
    await dropCopies(root, template);
    const { rowCount } = await root.query("select 1 from pg_database where datname = $1", [template]);
    if (rowCount) {
      await root.query(`alter database ${templateId} with is_template false allow_connections true`);
      await root.query(`drop database ${templateId} with (force)`);
    }

    const roles = roleNames(testRolePrefix(template));
    await bootstrapCluster({ rootUrl, database: template, roles, ownerPassword: OWNER_PASSWORD, authenticatorPassword: AUTHENTICATOR_PASSWORD });
    const ownerUrl = withUrlParts(serverUrl, { user: roles.owner, password: OWNER_PASSWORD, database: template });
    const authenticatorUrl = withUrlParts(serverUrl, { user: roles.authenticator, password: AUTHENTICATOR_PASSWORD, database: template });
    await runMigrations({ ownerUrl, roles, rootUrl }, { includeCurrent: true });
    const jwtSecret = "test-secret-that-is-at-least-32-characters-long";
    // The login policy is the default one, as `npm start` in lifecycle.test.ts writes it.
    await applyDatabaseSettings(ownerUrl, {
      jwtTtl: "1 hour",
      allowSelfApproval: false,
      login: loadConfig({}).login,
      environment: "test",
      connectorHosts: [],
      credentialsKey: TEST_CREDENTIALS_KEY,
    });
    // CREATE DATABASE … TEMPLATE fails while anyone is connected to the template:
    // from now on nobody may.
    await root.query(`alter database ${templateId} with is_template true allow_connections false`);
    await root.query("select pg_terminate_backend(pid) from pg_stat_activity where datname = $1 and pid <> pg_backend_pid()", [template]);

    project.provide("db", { rootUrl, ownerUrl, authenticatorUrl, roles, jwtSecret, template, database: template });
  } finally {
    await root.end();
  }

  return async () => {
    const root = new pg.Client({ connectionString: rootUrl });
    await root.connect();
    try {
      // TEST_KEEP_DATABASES=1 keeps each file's database to look into (the next run drops them).
      if (!process.env.TEST_KEEP_DATABASES) await dropCopies(root, template);
    } finally {
      await root.end();
      await embedded?.stop();
    }
  };
}
