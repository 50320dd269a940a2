// Prepares a fresh database from the migrations for every run: TEST_DATABASE_URL's
// server if given (it must allow creating roles and databases), else an embedded one.
import path from "node:path";
import pg from "pg";
import type { TestProject } from "vitest/node";
import { loadConfig, roleNames, type RoleNames } from "../src/config.ts";
import { bootstrapCluster } from "../src/db/bootstrap.ts";
import { applyDatabaseSettings } from "../src/db/database.ts";
import { startEmbeddedPostgres, type EmbeddedServer } from "../src/db/embedded.ts";
import { loadLocalSecrets } from "../src/db/local-secrets.ts";
import { projectRoot, runMigrations } from "../src/db/migrate.ts";
import { withUrlParts } from "../src/db/urls.ts";
import { TEST_CREDENTIALS_KEY } from "./credentials.ts";

export interface TestDatabase {
  rootUrl: string;
  ownerUrl: string;
  authenticatorUrl: string;
  roles: RoleNames;
  jwtSecret: string;
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


let embedded: EmbeddedServer | undefined;

export default async function setup(project: TestProject) {
  let serverUrl: string;
  let database = "snapbase_test";
  if (process.env.TEST_DATABASE_URL) {
    serverUrl = process.env.TEST_DATABASE_URL;
    database = decodeURIComponent(new URL(serverUrl).pathname.slice(1)) || database;
  } else {
    const dataDir = path.join(projectRoot, ".snapbase", "test");
    const secrets = loadLocalSecrets(dataDir);
    embedded = await startEmbeddedPostgres({ dataDir, port: 54339, superuserPassword: secrets.superuserPassword });
    serverUrl = embedded.rootUrl();
  }
  const rootUrl = withUrlParts(serverUrl, { user: decodeURIComponent(new URL(serverUrl).username) || "postgres", database: "postgres" });
  const root = new pg.Client({ connectionString: rootUrl });
  await root.connect();
  await root.query(`drop database if exists ${root.escapeIdentifier(database)} with (force)`);
  await root.end();

  const roles = roleNames(testRolePrefix(database));
  await bootstrapCluster({ rootUrl, database, roles, ownerPassword: OWNER_PASSWORD, authenticatorPassword: AUTHENTICATOR_PASSWORD });
  const ownerUrl = withUrlParts(serverUrl, { user: roles.owner, password: OWNER_PASSWORD, database });
  const authenticatorUrl = withUrlParts(serverUrl, { user: roles.authenticator, password: AUTHENTICATOR_PASSWORD, database });
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

  project.provide("db", { rootUrl, ownerUrl, authenticatorUrl, roles, jwtSecret });
  return async () => {
    await embedded?.stop();
  };
}
