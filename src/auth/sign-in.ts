// Sign-in for REST and GraphQL: snapbase_private.attempt_login checks the lockouts
// and the password and counts failures in its own transaction (it never raises for
// wrong credentials, so the count is committed), then the server signs the JWT.
import { isIP } from "node:net";
import type pg from "pg";
import { queryUnlessAborted } from "../db/request-client.ts";
import { HttpError } from "../server/errors.ts";
import { signClaims, type SessionClaims } from "./tokens.ts";

export interface SignInDeps {
  /** Authenticator pool. */
  pool: pg.Pool;
  jwtSecret: string;
}

/** 429 for a locked account or address; carries the seconds to wait. */
export class ThrottledError extends HttpError {
  readonly retryAfter: number;
  constructor(retryAfter: number) {
    const wait = retryAfter >= 120 ? `${Math.ceil(retryAfter / 60)} minutes` : `${retryAfter} seconds`;
    super(429, "too_many_attempts", `too many failed sign-ins for this account or from this address; try again in ${wait}`);
    this.retryAfter = retryAfter;
  }
}

/** A signed JWT for a new session, or 400 / 401 / 429. The signal (the client hung up,
 *  shutdown) cancels the attempt: it rolls back, so no session is opened and no failure counted. */
export async function signIn(deps: SignInDeps, email: unknown, password: unknown, clientAddress: string | undefined, signal?: AbortSignal): Promise<string> {
  if (typeof email !== "string" || typeof password !== "string" || email === "" || password === "") {
    throw new HttpError(400, "invalid_body", 'send an email and a password ({"email": "...", "password": "..."})');
  }
  const { rows } = await queryUnlessAborted<{ outcome: string; retry_after: number | null; claims: SessionClaims | null }>(
    deps.pool,
    `select r.outcome, r.retry_after, to_jsonb(r.claims) as claims
       from snapbase_private.attempt_login($1, $2, $3::inet) r`,
    [email, password, clientAddress && isIP(clientAddress) ? clientAddress : null],
    signal,
  );
  const r = rows[0]!;
  switch (r.outcome) {
    case "ok":
      return signClaims(r.claims!, deps.jwtSecret);
    case "locked":
      throw new ThrottledError(r.retry_after ?? 1);
    case "disabled":
      throw new HttpError(401, "28000", "this account is disabled");
    default:
      throw new HttpError(401, "28P01", "invalid email or password");
  }
}
