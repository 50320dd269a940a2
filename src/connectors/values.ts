// Helpers shared by the database connectors: per-record writes with savepoints,
// and JSON parsing that keeps wide numbers exact.
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

/** A number JSON.parse would round (more digits than a double holds), kept as its source text. */
class WideNumber {
  readonly text: string;
  constructor(text: string) {
    this.text = text;
  }
}

/** A double holds any 15 significant digits, so only a run of 16 digits (or dots) can be at risk. */
const MAYBE_WIDE_NUMBER = /[0-9.]{16}/;

/**
 * Parses a row rendered as a JSON object (PostgreSQL's to_jsonb). Column values
 * that are numbers too wide for a double (big bigints, long numerics) come back as
 * their exact text, which the workbook's typed column casts without loss. Numbers
 * inside JSON documents (`jsonColumns`) stay numbers, as any JSON reader gives them.
 */
export function parseRowJson(text: string, jsonColumns: ReadonlySet<string>): Record<string, unknown> {
  if (!MAYBE_WIDE_NUMBER.test(text)) return JSON.parse(text);
  const row: Record<string, unknown> = JSON.parse(text, markWideNumbers);
  for (const [column, value] of Object.entries(row)) row[column] = settleWideNumbers(value, !jsonColumns.has(column));
  return row;
}

// JSON.parse passes the number's source text as context.source (Node 22+).
function markWideNumbers(_key: string, value: unknown, context?: { source?: string }): unknown {
  if (typeof value !== "number" || context?.source === undefined) return value;
  return sameDecimal(context.source, String(value)) ? value : new WideNumber(context.source);
}

function settleWideNumbers(value: unknown, asText: boolean): unknown {
  if (value instanceof WideNumber) return asText ? value.text : Number(value.text);
  if (Array.isArray(value)) return value.map((v) => settleWideNumbers(v, asText));
  if (value !== null && typeof value === "object") {
    const object = value as Record<string, unknown>;
    for (const [key, v] of Object.entries(object)) object[key] = settleWideNumbers(v, asText);
  }
  return value;
}

/** Whether two decimal texts are the same number ("12.50" and "12.5" are; "9007199254740993" and "9007199254740992" are not). */
function sameDecimal(a: string, b: string): boolean {
  return canonicalDecimal(a) === canonicalDecimal(b);
}

/** "0012.3400" → "1234e-2", "1.2e+21" → "12e20": significant digits and a power of ten. */
function canonicalDecimal(text: string): string {
  const match = /^(-?)(\d*)(?:\.(\d*))?(?:e([+-]?\d+))?$/i.exec(text);
  if (!match) return text;
  const [, sign, whole, fraction = "", exponent = "0"] = match;
  const digits = (whole + fraction).replace(/^0+/, "");
  const significant = digits.replace(/0+$/, "");
  if (significant === "") return "0";
  const power = Number(exponent) - fraction.length + (digits.length - significant.length);
  return `${sign}${significant}e${power}`;
}
