// Turns an Authorization header into the Postgres settings for one transaction:
// the role to SET and the jwt.claims.* values the SQL layer reads. Every token is
// resolved against the database (one query): a JWT's session must still be open
// and its user present and enabled, and the role is the user's current one.
import jwt from "jsonwebtoken";
import type pg from "pg";
import type { RoleNames } from "../config.ts";
import { queryUnlessAborted } from "../db/request-client.ts";
import { HttpError } from "../server/errors.ts";
import { JWT_AUDIENCE } from "./tokens.ts";

export type PgSettings = Record<string, string>;

export interface AuthDeps {
  jwtSecret: string;
  roles: RoleNames;
  /** Authenticator pool, used to resolve sessions and API tokens. */
  pool: pg.Pool;
  /** Bounds every statement of an API request (user filters included); 0 or unset: none. */
  statementTimeoutMs?: number;
}

export interface AuthContext {
  /** Stream tokens are accepted only by the event streams (GET …/events). */
  allowStreamToken?: boolean;
  /** The request's abort (client gone, shutdown): cancels the lookup. */
  signal?: AbortSignal;
}

const userRoles = new Set(["viewer", "editor", "admin"]);

export const API_TOKEN_PREFIX = "sbt_";

export async function settingsForAuthorization(header: string | undefined, deps: AuthDeps, ctx: AuthContext = {}): Promise<PgSettings> {
  const timeout: PgSettings = deps.statementTimeoutMs ? { statement_timeout: String(deps.statementTimeoutMs) } : {};
  if (header === undefined || header === "") return { role: deps.roles.anonymous, ...timeout };
  const match = /^Bearer\s+(\S+)$/i.exec(header.trim());
  if (!match) throw new HttpError(401, "invalid_authorization", "the Authorization header must be 'Bearer <token>'");
  const token = match[1]!;
  const settings = token.startsWith(API_TOKEN_PREFIX) ? await settingsForApiToken(token, deps, ctx.signal) : await settingsForJwt(token, deps, ctx);
  return { ...settings, ...timeout };
}

async function settingsForJwt(token: string, deps: AuthDeps, ctx: AuthContext): Promise<PgSettings> {
  let claims: jwt.JwtPayload;
  try {
    const decoded = jwt.verify(token, deps.jwtSecret, { algorithms: ["HS256"], audience: JWT_AUDIENCE });
    if (typeof decoded === "string") throw new Error("payload is not an object");
    claims = decoded;
  } catch (error) {
    if (error instanceof jwt.TokenExpiredError) {
      throw new HttpError(401, "token_expired", `the token expired at ${error.expiredAt.toISOString()}; sign in again`);
    }
    throw new HttpError(401, "invalid_token", "the token is not valid (bad signature, audience or format)");
  }
  const sessionId = typeof claims.sid === "string" && /^\d{1,18}$/.test(claims.sid) ? claims.sid : undefined;
  const userId = Number.isSafeInteger(claims.user_id) ? String(claims.user_id) : undefined;
  const kind = claims.typ;
  if (!sessionId || !userId || (kind !== "session" && kind !== "stream")) {
    throw new HttpError(401, "invalid_token", "the token does not name a Snapbase session; sign in again");
  }
  if (kind === "stream" && !ctx.allowStreamToken) {
    throw new HttpError(401, "stream_token_not_allowed",
      "a stream token is accepted only by the event streams (GET …/events); use the token from sign-in or an API token");
  }
  const { rows } = await queryUnlessAborted<{ email: string; role: string }>(deps.pool,
    "select email, role from snapbase_private.resolve_session($1, $2)", [sessionId, userId], ctx.signal);
  const current = rows[0];
  if (!current || !userRoles.has(current.role)) {
    throw new HttpError(401, "session_ended",
      "the session has ended (signed out, revoked or expired, or the user was disabled or deleted); sign in again");
  }
  return {
    role: deps.roles[current.role as "viewer" | "editor" | "admin"],
    "jwt.claims.user_id": userId,
    "jwt.claims.email": current.email,
    "jwt.claims.role": current.role,
    "jwt.claims.session_id": sessionId,
  };
}

async function settingsForApiToken(token: string, deps: AuthDeps, signal: AbortSignal | undefined): Promise<PgSettings> {
  const { rows } = await queryUnlessAborted<{
    token_id: string;
    user_id: string;
    email: string;
    role: "viewer" | "editor" | "admin" | "agent";
    scopes: string[];
    workbook_id: string | null;
  }>(deps.pool, "select * from snapbase_private.resolve_api_token($1)", [token], signal);
  const t = rows[0];
  if (!t) throw new HttpError(401, "invalid_token", "the API token is unknown, expired or revoked, or its user is disabled");
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
