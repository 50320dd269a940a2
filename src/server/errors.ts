// One mapping from database errors to what clients see (REST status + GraphQL code).
// Messages raised by our SQL functions are written for users, so they pass through;
// anything unexpected is logged and replaced by a generic message.
import { isDatabaseUnavailable } from "../db/pools.ts";

export interface ClientError {
  status: number;
  code: string;
  message: string;
}

/** An error the HTTP layer raises itself, with a status and a stable code. */
export class HttpError extends Error {
  readonly status: number;
  readonly code: string;
  constructor(status: number, code: string, message: string) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

interface PgLikeError {
  code?: unknown;
  severity?: unknown;
  message?: unknown;
  detail?: unknown;
}

const isPgError = (e: unknown): e is PgLikeError & { code: string; message: string } =>
  typeof e === "object" && e !== null && typeof (e as PgLikeError).code === "string" &&
  /^[0-9A-Z]{5}$/.test((e as PgLikeError).code as string) && typeof (e as PgLikeError).severity === "string";

function statusForSqlState(code: string): number {
  if (code === "28P01" || code === "28000") return 401;
  if (code === "42501") return 403;
  if (code === "P0002" || code === "02000") return 404;
  if (code === "40001" || code === "40P01" || code === "55P03" || code === "55000") return 409;
  if (code === "57014") return 408;
  if (code === "54000") return 413; // a limit of ours: text too large
  // data exceptions, integrity violations, syntax/undefined objects in user SQL, raised by us
  if (/^(22|23|42|P0)/.test(code)) return 400;
  return 500;
}

/** What a client sees while the database is unreachable (restart, failover, lost connection): retry later. */
export const DATABASE_UNAVAILABLE: ClientError = {
  status: 503,
  code: "database_unavailable",
  message: "the database is unavailable (restarting or unreachable); try again shortly",
};

/** Codes for the 4xx errors of Express and its body parsers (http-errors `type`). */
const HTTP_ERROR_CODES: Record<string, [number, string, string?]> = {
  "charset.unsupported": [415, "unsupported_charset"],
  "encoding.unsupported": [415, "unsupported_content_encoding"],
  "entity.parse.failed": [400, "invalid_json", "the request body is not valid JSON"],
  "entity.too.large": [413, "body_too_large", "the request body is too large"],
  "entity.verify.failed": [400, "invalid_body"],
  "request.aborted": [400, "request_aborted"],
  "request.size.invalid": [400, "invalid_body"],
  "stream.encoding.set": [500, "internal_error"],
};

/** 4xx errors raised by Express itself (e.g. a path parameter that is not valid percent-encoding) and body-parser. */
function httpLibraryError(error: unknown): ClientError | null {
  const e = error as { status?: unknown; statusCode?: unknown; type?: unknown; expose?: unknown; message?: unknown } | null;
  if (!e || typeof e !== "object") return null;
  const status = typeof e.status === "number" ? e.status : typeof e.statusCode === "number" ? e.statusCode : undefined;
  if (status === undefined || status < 400 || status > 499 || e.expose === false) return null;
  const known = typeof e.type === "string" ? HTTP_ERROR_CODES[e.type] : undefined;
  if (known) return { status: known[0], code: known[1], message: known[2] ?? String(e.message) };
  if (error instanceof URIError || /decode param/i.test(String(e.message))) {
    return { status: 400, code: "invalid_path", message: "the URL path is not valid percent-encoded UTF-8" };
  }
  return { status, code: "bad_request", message: String(e.message) };
}

export function toClientError(error: unknown): ClientError | null {
  if (error instanceof HttpError) return { status: error.status, code: error.code, message: error.message };
  if (isDatabaseUnavailable(error)) return DATABASE_UNAVAILABLE;
  const library = httpLibraryError(error);
  if (library) return library;
  if (isPgError(error)) {
    const status = statusForSqlState(error.code);
    if (status === 500) return null;
    return { status, code: error.code, message: error.message };
  }
  return null;
}
