// Request parameters every REST route reads the same way.
import type { Request } from "express";
import { HttpError } from "../server/errors.ts";

/** The largest id PostgreSQL's bigint holds. */
const MAX_BIGINT = 9223372036854775807n;

/** Whether text is a bigint written one way only: digits, an optional "-", no leading
 *  zeros, spaces or "+" (which PostgreSQL's int8 input would accept), within bigint's range. */
export function isCanonicalBigint(raw: string): boolean {
  return /^(0|-?[1-9][0-9]{0,18})$/.test(raw) && BigInt(raw) <= MAX_BIGINT && BigInt(raw) >= -MAX_BIGINT - 1n;
}

/** Whether text is a database id: a positive bigint, 1 to 9223372036854775807, without leading zeros. */
export function isBigintId(raw: string): boolean {
  return isCanonicalBigint(raw) && !raw.startsWith("-") && raw !== "0";
}

/** A path parameter that must be a database id (a positive bigint); 400 otherwise. */
export function idParam(req: Request, name = "id"): string {
  const raw = req.params[name];
  if (typeof raw !== "string" || !isBigintId(raw)) {
    throw new HttpError(400, "invalid_id", `${name} must be a positive integer up to 9223372036854775807 (got ${JSON.stringify(raw)})`);
  }
  return raw;
}
