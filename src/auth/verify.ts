// Turns an Authorization header into the Postgres settings for one transaction:
// the role to SET and the jwt.claims.* values the SQL layer reads.
import jwt from "jsonwebtoken";
import type pg from "pg";
import type { RoleNames } from "../config.ts";
import { HttpError } from "../server/errors.ts";

export type PgSettings = Record<string, string>;

export interface AuthDeps {
  jwtSecret: string;
  roles: RoleNames;
  /** Authenticator pool, used to look up API tokens. */
  pool: pg.Pool;
  /** Bounds every statement of an API request (user filters included); 0 or unset: none. */
  statementTimeoutMs?: number;
}

const userRoles = new Set(["viewer", "editor", "admin"]);

export const API_TOKEN_PREFIX = "sbt_";

export async function settingsForAuthorization(header: string | undefined, deps: AuthDeps): Promise<PgSettings> {
  const timeout: PgSettings = deps.statementTimeoutMs ? { statement_timeout: String(deps.statementTimeoutMs) } : {};
  if (header === undefined || header === "") return { role: deps.roles.anonymous, ...timeout };
  const match = /^Bearer\s+(\S+)$/i.exec(header.trim());
  if (!match) throw new HttpError(401, "invalid_authorization", "the Authorization header must be 'Bearer <token>'");
  const token = match[1]!;
  const settings = token.startsWith(API_TOKEN_PREFIX) ? await settingsForApiToken(token, deps) : settingsForJwt(token, deps);
  return { ...settings, ...timeout };
}

function settingsForJwt(token: string, deps: AuthDeps): PgSettings {
  let claims: jwt.JwtPayload;
  try {
    const decoded = jwt.verify(token, deps.jwtSecret, { algorithms: ["HS256"], audience: "snapbase" });
    if (typeof decoded === "string") throw new Error("payload is not an object");
    claims = decoded;
  } catch (error) {
    if (error instanceof jwt.TokenExpiredError) {
      throw new HttpError(401, "token_expired", `the token expired at ${error.expiredAt.toISOString()}; sign in again`);
    }
    throw new HttpError(401, "invalid_token", "the token is not valid (bad signature, audience or format)");
  }
  const role = String(claims.role ?? "");
  if (!userRoles.has(role) || claims.user_id === undefined) {
    throw new HttpError(401, "invalid_token", "the token does not carry a Snapbase user and role");
  }
  return {
    role: deps.roles[role as "viewer" | "editor" | "admin"],
    "jwt.claims.user_id": String(claims.user_id),
    "jwt.claims.email": String(claims.email ?? ""),
    "jwt.claims.role": role,
  };
}

async function settingsForApiToken(token: string, deps: AuthDeps): Promise<PgSettings> {
  const { rows } = await deps.pool.query<{
    token_id: string;
    user_id: string;
    email: string;
    role: "viewer" | "editor" | "admin" | "agent";
    scopes: string[];
    workbook_id: string | null;
  }>("select * from snapbase_private.resolve_api_token($1)", [token]);
  const t = rows[0];
  if (!t) throw new HttpError(401, "invalid_token", "the API token is unknown, expired or revoked");
  const settings: PgSettings = {
    role: deps.roles[t.role],
    "jwt.claims.user_id": String(t.user_id),
    "jwt.claims.email": t.email,
    "jwt.claims.role": t.role,
    "jwt.claims.token_id": String(t.token_id),
    "jwt.claims.scopes": t.scopes.join(","),
  };
  if (t.workbook_id !== null) settings["jwt.claims.workbook_id"] = String(t.workbook_id);
  return settings;
}
