// Turns the config into ready connections: starts the embedded server when no
// DATABASE_URL is given, creates roles and database when it can, migrates, and
// hands the JWT secret to the database (it signs tokens in snapbase.authenticate).
import { type Config, roleNames } from "../config.ts";
import { log } from "../log.ts";
import { bootstrapCluster, canCreateRoles } from "./bootstrap.ts";
import { startEmbeddedPostgres, type EmbeddedServer } from "./embedded.ts";
import { loadLocalSecrets } from "./local-secrets.ts";
import { runMigrations, type MigrationTarget } from "./migrate.ts";
import { withClient } from "./pools.ts";
import { databaseName, withUrlParts } from "./urls.ts";

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
    // The owner may be allowed to create roles (a superuser in development or CI);
    // then it bootstraps through the maintenance database, as ROOT_DATABASE_URL would.
    const maintenanceUrl = withUrlParts(ownerUrl, { database: "postgres" });
    if (!rootUrl && (await canCreateRoles(maintenanceUrl).catch(() => false))) rootUrl = maintenanceUrl;
    if (rootUrl) {
      const ownerPassword = new URL(ownerUrl).password;
      await bootstrapCluster({
        rootUrl,
        database: databaseName(ownerUrl),
        roles,
        ownerPassword: ownerPassword ? decodeURIComponent(ownerPassword) : undefined,
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
    await applyDatabaseSettings(ownerUrl, { jwtSecret, jwtTtl: config.jwtTtl, allowSelfApproval: config.allowSelfApproval });
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

/** Settings the SQL layer reads: the JWT secret and TTL, and policy switches. */
export async function applyDatabaseSettings(
  ownerUrl: string,
  s: { jwtSecret: string; jwtTtl: string; allowSelfApproval: boolean },
): Promise<void> {
  await withClient("settings", ownerUrl, async (client) => {
    await client.query(
      `insert into snapbase_private.settings (key, value)
       select * from unnest($1::text[], $2::text[])
       on conflict (key) do update set value = excluded.value`,
      [
        ["jwt_secret", "jwt_ttl", "allow_self_approval"],
        [s.jwtSecret, s.jwtTtl, String(s.allowSelfApproval)],
      ],
    );
  });
}
