// Turns the config into ready connections: starts the embedded server when no
// DATABASE_URL is given, creates roles and database when it can, migrates, and
// writes the settings the SQL layer reads (never a secret: the server alone signs
// and verifies JWTs).
import { ConfigError, type Config, type LoginPolicy, roleNames } from "../config.ts";
import { log } from "../log.ts";
import { ensureCredentialKeys } from "../connectors/credential-keys.ts";
import { bootstrapCluster, canCreateRoles } from "./bootstrap.ts";
import { startEmbeddedPostgres, type EmbeddedServer } from "./embedded.ts";
import { loadLocalSecrets } from "./local-secrets.ts";
import { runMigrations, type MigrationTarget } from "./migrate.ts";
import { withClient } from "./pools.ts";
import { databaseName, urlParts, urlPassword, withUrlParts } from "./urls.ts";

export interface Database {
  ownerUrl: string;
  authenticatorUrl: string;
  rootUrl?: string;
  jwtSecret: string;
  /** SNAPBASE_CREDENTIALS_KEY, or the development one kept beside the data. */
  credentialsKey: string;
  migrationTarget: MigrationTarget;
  embedded?: EmbeddedServer;
  /** Stops the embedded server, if any. */
  stop(): Promise<void>;
}


export async function prepareDatabase(config: Config, opts: { migrate: boolean } = { migrate: true }): Promise<Database> {
  const needLocalSecrets = !config.databaseUrl || !config.jwtSecret || !config.credentialsKey;
  const secrets = needLocalSecrets ? loadLocalSecrets(config.dataDir) : undefined;
  let embedded: EmbeddedServer | undefined;
  let ownerUrl: string;
  let rootUrl: string | undefined = config.rootDatabaseUrl;
  let authenticatorPassword = config.authenticatorPassword;
  let roles = config.roles;

  if (config.databaseUrl) {
    ownerUrl = config.databaseUrl;
    await refuseSuperuserOwner(ownerUrl, config);
    // The owner may be allowed to create roles (a superuser in development or CI);
    // then it bootstraps through the maintenance database, as ROOT_DATABASE_URL would.
    const maintenanceUrl = withUrlParts(ownerUrl, { database: "postgres" });
    if (!rootUrl && (await canCreateRoles(maintenanceUrl).catch(() => false))) rootUrl = maintenanceUrl;
    if (rootUrl) {
      await bootstrapCluster({
        rootUrl,
        database: databaseName(ownerUrl),
        roles,
        ownerPassword: urlPassword(ownerUrl),
        authenticatorPassword,
      });
    }
  } else {
    embedded = await startEmbeddedPostgres({
      dataDir: config.dataDir,
      port: config.embeddedPort,
      superuserPassword: secrets!.superuserPassword,
    });
    rootUrl = embedded.rootUrl();
    roles = roleNames(config.rolePrefix);
    authenticatorPassword = secrets!.authenticatorPassword;
    try {
      await bootstrapCluster({
        rootUrl,
        database: "snapbase",
        roles,
        ownerPassword: secrets!.ownerPassword,
        authenticatorPassword,
      });
    } catch (error) {
      await embedded.stop();
      throw error;
    }
    ownerUrl = withUrlParts(rootUrl, { user: roles.owner, password: secrets!.ownerPassword, database: "snapbase" });
  }

  const authenticatorUrl = config.authenticatorUrl ?? withUrlParts(ownerUrl, { user: roles.authenticator, password: authenticatorPassword ?? null });
  const jwtSecret = config.jwtSecret ?? secrets!.jwtSecret;
  const credentialsKey = config.credentialsKey ?? secrets!.credentialsKey;
  const migrationTarget: MigrationTarget = {
    ownerUrl,
    roles,
    rootUrl,
    // Only `migrate-commit` uses it: graphile-migrate rebuilds it to check the commit.
    shadowUrl: rootUrl ? withUrlParts(ownerUrl, { database: `${databaseName(ownerUrl)}_shadow` }) : undefined,
  };

  try {
    if (opts.migrate) {
      await runMigrations(migrationTarget, { includeCurrent: config.env !== "production" });
      log.info("migrations applied", { database: databaseName(ownerUrl) });
    }
    await applyDatabaseSettings(ownerUrl, {
      jwtTtl: config.jwtTtl,
      allowSelfApproval: config.allowSelfApproval,
      login: config.login,
      environment: config.env,
      connectorHosts: config.connectorHosts,
      credentialsKey,
    });
  } catch (error) {
    await embedded?.stop();
    throw error;
  }

  return {
    ownerUrl,
    authenticatorUrl,
    rootUrl,
    jwtSecret,
    credentialsKey,
    migrationTarget,
    embedded,
    stop: async () => {
      await embedded?.stop();
    },
  };
}

/**
 * The owner runs migrations and workers and owns every object, but user text never
 * runs as it; still, a superuser owner would turn any slip into the whole cluster.
 * Production refuses one; development warns.
 */
async function refuseSuperuserOwner(ownerUrl: string, config: Config): Promise<void> {
  let superuser: boolean;
  try {
    superuser = await withClient("owner check", ownerUrl, async (client) =>
      Boolean((await client.query("select rolsuper from pg_roles where rolname = current_user")).rows[0]?.rolsuper));
  } catch {
    return; // bootstrap and migrations report an unreachable database with their own message
  }
  if (!superuser) return;
  const user = urlParts(ownerUrl).user || "(default user)";
  const howTo =
    `DATABASE_URL connects as ${user}, a superuser. Snapbase's owner must not be one: ` +
    "set ROOT_DATABASE_URL to the superuser URL and DATABASE_URL to a new owner (e.g. postgres://snapbase_owner:<password>@host/snapbase); " +
    "npm start then creates that role and the database. Or create them yourself: " +
    "CREATE ROLE snapbase_owner LOGIN PASSWORD '<password>'; CREATE DATABASE snapbase OWNER snapbase_owner;";
  if (config.env === "production") throw new ConfigError([howTo]);
  log.warn("the database owner is a superuser (allowed outside production only)", { hint: howTo });
}

/** Settings the SQL layer reads: session lifetime, sign-in throttling, policy
 *  switches and connector rules. No secret: the JWT secret stays in the server's
 *  memory. Also makes sure the credentials key pair exists (connectors/credential-keys.ts). */
export async function applyDatabaseSettings(
  ownerUrl: string,
  s: {
    jwtTtl: string;
    allowSelfApproval: boolean;
    login: LoginPolicy;
    environment: string;
    /** SNAPBASE_CONNECTOR_HOSTS; empty: the default for the environment. */
    connectorHosts: string[];
    credentialsKey: string;
  },
): Promise<void> {
  await withClient("settings", ownerUrl, async (client) => {
    await client.query(
      `insert into snapbase_private.settings (key, value)
       select * from unnest($1::text[], $2::text[])
       on conflict (key) do update set value = excluded.value`,
      [
        ["jwt_ttl", "allow_self_approval", "login_max_failures", "login_max_failures_per_address", "login_lockout", "environment", "connector_hosts"],
        [s.jwtTtl, String(s.allowSelfApproval), String(s.login.maxFailures), String(s.login.maxFailuresPerAddress), s.login.lockout,
         s.environment, JSON.stringify(s.connectorHosts)],
      ],
    );
    await ensureCredentialKeys(client, s.credentialsKey);
  });
}
