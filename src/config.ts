// Configuration comes only from the environment; loadConfig() validates all of it
// at once so a misconfigured deployment fails at start with every problem listed.
import { isIP } from "node:net";
import path from "node:path";
import { urlParts, urlUser } from "./db/urls.ts";
import { maskConnectionString } from "./redact.ts";

export type Environment = "development" | "production" | "test";

export interface RoleNames {
  owner: string;
  authenticator: string;
  anonymous: string;
  viewer: string;
  editor: string;
  admin: string;
  agent: string;
  /** Runs approved change SQL: no rights of its own; approval grants it the target table for that transaction only. */
  changeRunner: string;
  /** Runs workbook queries that carry a user's filter: SELECT on workbook tables, nothing else. */
  filterReader: string;
}

/** The HTTP surface: GraphiQL, introspection, suggestions, GraphQL limits, CORS, proxies. */
export interface HttpOptions {
  /** Serve the Ruru GraphiQL IDE on /graphiql. */
  graphiql: boolean;
  /** Anonymous requests may introspect the schema (signed-in users always may). */
  publicIntrospection: boolean;
  /** GraphQL errors may say "Did you mean …?". */
  suggestions: boolean;
  /** Origins allowed by CORS; ["*"] for any; [] for none (same origin only). */
  corsOrigins: string[];
  /** Express's `trust proxy`: which proxies' X-Forwarded-For to believe for the client address. */
  trustProxy: boolean | number | string;
  graphqlLimits: { maxAliases: number; maxDepth: number; maxCost: number; maxPageSize: number; defaultPageSize: number };
}

export interface LoginPolicy {
  /** Failed sign-ins per account within the lockout window before it is locked. */
  maxFailures: number;
  /** The same per client address, across accounts. */
  maxFailuresPerAddress: number;
  /** How long a lockout lasts; also the window failures are counted in. */
  lockout: string;
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
  /** SNAPBASE_CONNECTOR_HOSTS: hosts connectors may reach (empty: public addresses in production, any elsewhere). */
  connectorHosts: string[];
  login: LoginPolicy;
  http: HttpOptions;
  /** Shutdown: how long requests and jobs in flight may take to finish before they are stopped, in ms. */
  shutdownDrainMs: number;
}

/** What a server gets when its options do not say (development). */
export const developmentHttpOptions: HttpOptions = {
  graphiql: true,
  publicIntrospection: true,
  suggestions: true,
  corsOrigins: [],
  trustProxy: false,
  graphqlLimits: { maxAliases: 20, maxDepth: 12, maxCost: 50000, maxPageSize: 1000, defaultPageSize: 100 },
};

const intervalPattern = /^\d+\s*(seconds?|minutes?|hours?|days?)$/;

function parseCorsOrigins(raw: string | undefined, problems: string[]): string[] {
  if (raw === undefined || raw.trim() === "") return [];
  const origins = raw.split(",").map((o) => o.trim()).filter((o) => o !== "");
  if (origins.length === 1 && origins[0] === "*") return ["*"];
  const bad = origins.filter((o) => {
    try {
      const u = new URL(o);
      return !["http:", "https:"].includes(u.protocol) || u.origin !== o;
    } catch {
      return true;
    }
  });
  if (bad.length) {
    problems.push(`CORS_ORIGINS must be * or a comma-separated list of origins like https://app.example.com (no path); not ${bad.map((b) => JSON.stringify(b)).join(", ")}`);
  }
  return origins.filter((o) => !bad.includes(o));
}

function parseTrustProxy(raw: string | undefined, problems: string[]): boolean | number | string {
  if (raw === undefined || raw === "" || /^(0|false|no|off)$/i.test(raw)) return false;
  if (/^(true|yes|on)$/i.test(raw)) return true;
  if (/^\d+$/.test(raw)) return Number(raw);
  const items = raw.split(",").map((i) => i.trim());
  const valid = items.every((i) => ["loopback", "linklocal", "uniquelocal"].includes(i) || isIP(i.split("/")[0]!) !== 0);
  if (!valid) {
    problems.push(`TRUST_PROXY must be true, false, a number of proxies, or addresses/subnets (or loopback, linklocal, uniquelocal), comma-separated (got ${JSON.stringify(raw)})`);
    return false;
  }
  return raw;
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
    changeRunner: `${prefix}_change_runner`,
    filterReader: `${prefix}_filter_reader`,
  };
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
    const u = urlParts(raw);
    if (u.protocol !== "postgres" && u.protocol !== "postgresql") throw new Error("protocol");
    if (!u.database) {
      problems.push(`${name} must name a database (postgres://user@host:5432/dbname)`);
    }
    return raw;
  } catch {
    problems.push(`${name} is not a postgres:// URL (got ${JSON.stringify(maskConnectionString(raw))})`);
    return undefined;
  }
}

/** A comma-separated list of host names (`db.example.com`, `*.example.com`), addresses,
 *  networks (`10.0.0.0/8`), `public` or `*`. */
function parseHostList(name: string, raw: string | undefined, problems: string[]): string[] {
  const entries = (raw ?? "").split(",").map((e) => e.trim().toLowerCase()).filter(Boolean);
  const bad = entries.filter(
    (e) => !/^(\*|public|(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*|[0-9a-f.:]+(\/\d{1,3})?)$/.test(e),
  );
  if (bad.length) problems.push(`${name} entries must be host names, *.domain, addresses, networks, public or * (got ${bad.map((b) => JSON.stringify(b)).join(", ")})`);
  return entries;
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
  if (!intervalPattern.test(jwtTtl)) {
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
    connectorHosts: parseHostList("SNAPBASE_CONNECTOR_HOSTS", env.SNAPBASE_CONNECTOR_HOSTS, problems),
    http: {
      graphiql: parseBool("GRAPHIQL", env.GRAPHIQL, nodeEnv !== "production", problems),
      publicIntrospection: parseBool("GRAPHQL_PUBLIC_INTROSPECTION", env.GRAPHQL_PUBLIC_INTROSPECTION, nodeEnv !== "production", problems),
      suggestions: parseBool("GRAPHQL_SUGGESTIONS", env.GRAPHQL_SUGGESTIONS, nodeEnv !== "production", problems),
      corsOrigins: parseCorsOrigins(env.CORS_ORIGINS, problems),
      trustProxy: parseTrustProxy(env.TRUST_PROXY, problems),
      graphqlLimits: {
        maxAliases: parseInt10("GRAPHQL_MAX_ALIASES", env.GRAPHQL_MAX_ALIASES, developmentHttpOptions.graphqlLimits.maxAliases, 1, 10000, problems),
        maxDepth: parseInt10("GRAPHQL_MAX_DEPTH", env.GRAPHQL_MAX_DEPTH, developmentHttpOptions.graphqlLimits.maxDepth, 1, 100, problems),
        maxCost: parseInt10("GRAPHQL_MAX_COST", env.GRAPHQL_MAX_COST, developmentHttpOptions.graphqlLimits.maxCost, 1, 1e9, problems),
        maxPageSize: parseInt10("GRAPHQL_MAX_PAGE_SIZE", env.GRAPHQL_MAX_PAGE_SIZE, developmentHttpOptions.graphqlLimits.maxPageSize, 1, 1e6, problems),
        defaultPageSize: parseInt10("GRAPHQL_DEFAULT_PAGE_SIZE", env.GRAPHQL_DEFAULT_PAGE_SIZE, developmentHttpOptions.graphqlLimits.defaultPageSize, 1, 1e6, problems),
      },
    },
    login: {
      maxFailures: parseInt10("LOGIN_MAX_FAILURES", env.LOGIN_MAX_FAILURES, 5, 1, 1000, problems),
      maxFailuresPerAddress: parseInt10("LOGIN_MAX_FAILURES_PER_ADDRESS", env.LOGIN_MAX_FAILURES_PER_ADDRESS, 20, 1, 100000, problems),
      lockout: env.LOGIN_LOCKOUT || "15 minutes",
    },
    shutdownDrainMs: parseInt10("SHUTDOWN_DRAIN_MS", env.SHUTDOWN_DRAIN_MS, 10000, 0, 600000, problems),
  };
  if (!intervalPattern.test(config.login.lockout)) {
    problems.push(`LOGIN_LOCKOUT must look like "15 minutes" or "1 hour" (got ${JSON.stringify(config.login.lockout)})`);
  }
  if (config.demoPassword !== undefined && config.demoPassword.length < 8) {
    problems.push("DEMO_PASSWORD must be at least 8 characters");
  }
  if (problems.length) throw new ConfigError(problems);
  return config;
}
