// One mapping from database errors to what clients see (REST status + GraphQL code).
// Messages raised by our SQL functions are written for users, so they pass through;
// anything unexpected is logged and replaced by a generic message.

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

export function toClientError(error: unknown): ClientError | null {
  if (error instanceof HttpError) return { status: error.status, code: error.code, message: error.message };
  if (isPgError(error)) {
    const status = statusForSqlState(error.code);
    if (status === 500) return null;
    return { status, code: error.code, message: error.message };
  }
  return null;
}
