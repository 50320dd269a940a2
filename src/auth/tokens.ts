// JWTs are signed and verified here, by the server: the database never holds the
// secret. A JWT names a session (sid); snapbase.authenticate and
// snapbase.create_stream_token return the claims (snapbase.jwt_claims) to sign.
import jwt from "jsonwebtoken";

export const JWT_AUDIENCE = "snapbase";

/** A row of the SQL composite type snapbase.jwt_claims (bigints arrive as strings). */
export interface SessionClaims {
  session_id: string | number;
  user_id: string | number;
  email: string;
  role: string;
  kind: "session" | "stream";
  issued_at: Date | string;
  expires_at: Date | string;
}

const seconds = (t: Date | string): number => Math.floor(new Date(t).getTime() / 1000);

/** The JWT for a session or stream token. `role` and `email` are as at signing, for
 *  clients to show; every request uses the user's current ones. */
export function signClaims(claims: SessionClaims, secret: string): string {
  return jwt.sign(
    {
      aud: JWT_AUDIENCE,
      sub: String(claims.user_id),
      sid: String(claims.session_id),
      typ: claims.kind,
      user_id: Number(claims.user_id),
      email: claims.email,
      role: claims.role,
      iat: seconds(claims.issued_at),
      exp: seconds(claims.expires_at),
    },
    secret,
    { algorithm: "HS256" },
  );
}
