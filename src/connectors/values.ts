// Helpers shared by the database connectors: per-record writes with savepoints,
// error text without secrets, and JSON parsing that keeps wide numbers exact.
import { ExactNumber, parseJsonExact } from "../exact-json.ts";
import { ConnectorError, type RecordOutcome } from "./types.ts";

/** Node's network error codes: the host is down, unreachable or dropped us; worth retrying. */
export const NETWORK_ERROR_CODES: ReadonlySet<string> = new Set([
  "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH", "EPIPE",
]);

export const missingRecord = (remoteId: string): RecordOutcome =>
  ({ ok: false, error: `record ${remoteId} no longer exists at the source` });

/** The error's own message; Node's connection errors (AggregateError for localhost) may have an empty one. */
export function messageOf(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  if (error.message) return error.message;
  const inner = error instanceof AggregateError ? error.errors.find((e) => e instanceof Error && e.message) : undefined;
  return inner?.message ?? (error as { code?: string }).code ?? error.name;
}

/**
 * Drivers report lost or refused connections as plain Errors (or AggregateErrors);
 * a TypeError and the like is a bug in our code, not a reason to retry.
 */
export const isPlainError = (error: unknown): boolean =>
  error instanceof AggregateError || (error instanceof Error && error.constructor === Error);

/** Replaces the password wherever it appears, so it never reaches logs or the UI. */
export function hideSecret(text: string, secret: string | undefined): string {
  return secret ? text.split(secret).join("***") : text;
}

/** Wraps any failure in a ConnectorError, keeping ConnectorErrors as they are. */
export function asConnectorError(error: unknown, describe: (error: unknown) => ConnectorError): ConnectorError {
  return error instanceof ConnectorError ? error : describe(error);
}

/**
 * Applies each item in its own savepoint inside one transaction, so a record the
 * source rejects gets `ok: false` and the others still apply. Errors that are not
 * about one record (connection lost, deadlock) abort the whole call and are thrown.
 */
export async function applyEachInTransaction<T>(
  exec: (sql: string) => Promise<unknown>,
  items: T[],
  apply: (item: T) => Promise<RecordOutcome>,
  isRecordError: (error: unknown) => boolean,
): Promise<RecordOutcome[]> {
  const outcomes: RecordOutcome[] = [];
  await exec("begin");
  try {
    for (const item of items) {
      await exec("savepoint sb_record");
      try {
        outcomes.push(await apply(item));
        await exec("release savepoint sb_record");
      } catch (error) {
        if (!isRecordError(error)) throw error;
        await exec("rollback to savepoint sb_record");
        outcomes.push({ ok: false, error: messageOf(error) });
      }
    }
  } catch (error) {
    await exec("rollback").catch(() => {});
    throw error;
  }
  try {
    await exec("commit");
  } catch (error) {
    // A deferred constraint can fail the commit: then nothing of this call applied.
    if (!isRecordError(error)) throw error;
    return outcomes.map(() => ({ ok: false, error: messageOf(error) }));
  }
  return outcomes;
}

// --- JSON with exact wide numbers ----------------------------------------------

/**
 * Parses a row rendered as a JSON object (PostgreSQL's to_jsonb). Column values
 * that are numbers too wide for a double (big bigints, long numerics) come back as
 * their exact text, which the workbook's typed column casts without loss. Numbers
 * inside JSON documents (`jsonColumns`) stay numbers, with their exact digits
 * (ExactNumber, which JSON.stringify writes as it was read).
 */
export function parseRowJson(text: string, jsonColumns: ReadonlySet<string>): Record<string, unknown> {
  const row = parseJsonExact(text) as Record<string, unknown>;
  for (const [column, value] of Object.entries(row)) if (!jsonColumns.has(column) && value instanceof ExactNumber) row[column] = value.text;
  return row;
}
