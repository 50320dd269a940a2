// Configuration comes only from the environment; loadConfig() validates all of it
// at once so a misconfigured deployment fails at start with every problem listed.
import path from "node:path";

export type Environment = "development" | "production" | "test";

export interface RoleNames {
  owner: string;
  authenticator: string;
  anonymous: string;
  viewer: string;
  editor: string;
  admin: string;
  agent: string;
}

export interface Config {
  env: Environment;
  host: string;
  port: number;
  /** Owner connection. Undefined: launch the embedded PostgreSQL. */
  databaseUrl?: string;
  /** Superuser connection used only to create roles and the database. */
  rootDatabaseUrl?: string;
  /** Connection PostGraphile logs in with; derived from databaseUrl when unset. */
  authenticatorUrl?: string;
  authenticatorPassword?: string;
  rolePrefix: string;
  roles: RoleNames;
  jwtSecret?: string;
  jwtTtl: string;
  /** Encrypts connector credentials; never stored in the database. */
  credentialsKey?: string;
  dataDir: string;
  embeddedPort: number;
  worker: { enabled: boolean; concurrency: number };
  demo: boolean;
  demoPassword?: string;
  allowSelfApproval: boolean;
  /** statement_timeout for every API request, in ms (0: none). */
  statementTimeoutMs: number;
  /** Shutdown: how long requests and jobs in flight may take to finish before they are stopped, in ms. */
  shutdownDrainMs: number;
}

export class ConfigError extends Error {
  readonly problems: string[];
  constructor(problems: string[]) {
    super(`invalid configuration:\n  - ${problems.join("\n  - ")}`);
    this.name = "ConfigError";
    this.problems = problems;
  }
}

export function roleNames(prefix: string, owner?: string): RoleNames {
  return {
    owner: owner ?? `${prefix}_owner`,
    authenticator: `${prefix}_authenticator`,
    anonymous: `${prefix}_anonymous`,
    viewer: `${prefix}_viewer`,
    editor: `${prefix}_editor`,
    admin: `${prefix}_admin`,
    agent: `${prefix}_agent`,
  };
}

/** The user name in a postgres:// URL (the default is the OS user, as libpq does). */
export function urlUser(url: string): string {
  return decodeURIComponent(new URL(url).username) || process.env.PGUSER || process.env.USER || "postgres";
}

function parseBool(name: string, raw: string | undefined, fallback: boolean, problems: string[]): boolean {
  if (raw === undefined || raw === "") return fallback;
  if (/^(1|true|yes|on)$/i.test(raw)) return true;
  if (/^(0|false|no|off)$/i.test(raw)) return false;
  problems.push(`${name} must be true or false (got ${JSON.stringify(raw)})`);
  return fallback;
}

function parseInt10(name: string, raw: string | undefined, fallback: number, min: number, max: number, problems: string[]): number {
  if (raw === undefined || raw === "") return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min || n > max) {
    problems.push(`${name} must be a whole number from ${min} to ${max} (got ${JSON.stringify(raw)})`);
    return fallback;
  }
  return n;
}

function parseDbUrl(name: string, raw: string | undefined, problems: string[]): string | undefined {
  if (raw === undefined || raw === "") return undefined;
  try {
    const u = new URL(raw);
    if (u.protocol !== "postgres:" && u.protocol !== "postgresql:") throw new Error("protocol");
    if (!u.pathname || u.pathname === "/") {
      problems.push(`${name} must name a database (postgres://user@host:5432/dbname)`);
    }
    return raw;
  } catch {
    problems.push(`${name} is not a postgres:// URL (got ${JSON.stringify(raw.replace(/:[^:@/]*@/, ":***@"))})`);
    return undefined;
  }
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const problems: string[] = [];
  const nodeEnv = env.NODE_ENV || "development";
  if (!["development", "production", "test"].includes(nodeEnv)) {
    problems.push(`NODE_ENV must be development, production or test (got ${JSON.stringify(nodeEnv)})`);
  }
  const rolePrefix = env.SNAPBASE_ROLE_PREFIX || "snapbase";
  if (!/^[a-z][a-z0-9_]{0,40}$/.test(rolePrefix)) {
    problems.push(`SNAPBASE_ROLE_PREFIX must be lower-case letters, digits and _ (got ${JSON.stringify(rolePrefix)})`);
  }
  const databaseUrl = parseDbUrl("DATABASE_URL", env.DATABASE_URL, problems);
  const rootDatabaseUrl = parseDbUrl("ROOT_DATABASE_URL", env.ROOT_DATABASE_URL, problems);
  const authenticatorUrl = parseDbUrl("DATABASE_AUTHENTICATOR_URL", env.DATABASE_AUTHENTICATOR_URL, problems);
  const jwtSecret = env.JWT_SECRET || undefined;
  if (nodeEnv === "production") {
    if (!jwtSecret) problems.push("JWT_SECRET is required in production (at least 32 characters)");
    if (!databaseUrl) problems.push("DATABASE_URL is required in production (the embedded PostgreSQL is for development)");
  }
  const credentialsKey = env.SNAPBASE_CREDENTIALS_KEY || undefined;
  if (nodeEnv === "production" && !credentialsKey) problems.push("SNAPBASE_CREDENTIALS_KEY is required in production (at least 32 characters)");
  if (credentialsKey !== undefined && credentialsKey.length < 32) problems.push("SNAPBASE_CREDENTIALS_KEY must be at least 32 characters");
  if (jwtSecret !== undefined && jwtSecret.length < 32) {
    problems.push("JWT_SECRET must be at least 32 characters");
  }
  const jwtTtl = env.JWT_TTL || "8 hours";
  if (!/^\d+\s*(seconds?|minutes?|hours?|days?)$/.test(jwtTtl)) {
    problems.push(`JWT_TTL must look like "30 minutes" or "8 hours" (got ${JSON.stringify(jwtTtl)})`);
  }
  const config: Config = {
    env: nodeEnv as Environment,
    host: env.HOST || "127.0.0.1",
    port: parseInt10("PORT", env.PORT, 3000, 0, 65535, problems),
    databaseUrl,
    rootDatabaseUrl,
    authenticatorUrl,
    authenticatorPassword: env.DATABASE_AUTHENTICATOR_PASSWORD || undefined,
    rolePrefix,
    roles: roleNames(rolePrefix, databaseUrl ? urlUser(databaseUrl) : undefined),
    jwtSecret,
    jwtTtl,
    credentialsKey,
    dataDir: path.resolve(env.SNAPBASE_DATA_DIR || ".snapbase"),
    embeddedPort: parseInt10("EMBEDDED_PG_PORT", env.EMBEDDED_PG_PORT, 54329, 1024, 65535, problems),
    worker: {
      enabled: parseBool("SNAPBASE_WORKER", env.SNAPBASE_WORKER, true, problems),
      concurrency: parseInt10("WORKER_CONCURRENCY", env.WORKER_CONCURRENCY, 2, 1, 64, problems),
    },
    demo: parseBool("SNAPBASE_DEMO", env.SNAPBASE_DEMO, nodeEnv !== "production", problems),
    demoPassword: env.DEMO_PASSWORD || undefined,
    allowSelfApproval: parseBool("ALLOW_SELF_APPROVAL", env.ALLOW_SELF_APPROVAL, false, problems),
    statementTimeoutMs: parseInt10("STATEMENT_TIMEOUT_MS", env.STATEMENT_TIMEOUT_MS, 60000, 0, 3600000, problems),
    shutdownDrainMs: parseInt10("SHUTDOWN_DRAIN_MS", env.SHUTDOWN_DRAIN_MS, 10000, 0, 600000, problems),
  };
  if (config.demoPassword !== undefined && config.demoPassword.length < 8) {
    problems.push("DEMO_PASSWORD must be at least 8 characters");
  }
  if (problems.length) throw new ConfigError(problems);
  return config;
}
