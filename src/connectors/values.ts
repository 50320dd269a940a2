// Helpers shared by the database connectors: per-record writes with savepoints,
// and JSON parsing that keeps wide numbers exact.
import { ExactNumber, parseJsonExact } from "../exact-json.ts";
import { ConnectorError, type RecordOutcome, type WriteReceipt, type WriteStatus } from "./types.ts";

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

/** Waits `ms`, or less if the signal aborts. */
export const pause = (ms: number, signal?: AbortSignal): Promise<void> =>
  new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });

/** How long writeStatus waits for a transaction still open at the source before it lets the job retry later. */
export const OPEN_TRANSACTION_WAIT_MS = 60_000;

/**
 * writeStatus for PostgreSQL sources (and the csv connector, whose files live in
 * PostgreSQL): the transaction's fate by its txid (txid_status), waiting while it
 * is still open, e.g. a commit held up by a slow deferred trigger.
 */
export async function postgresWriteStatus(
  query: (sql: string, params: unknown[]) => Promise<{ rows: { status: string | null }[] }>,
  receipt: WriteReceipt,
  opts: { onWait?: (message: string) => void; signal?: AbortSignal } = {},
): Promise<WriteStatus> {
  const txid = receipt.txid;
  if (typeof txid !== "string" || !/^\d{1,20}$/.test(txid)) return "unknown";
  const until = Date.now() + OPEN_TRANSACTION_WAIT_MS;
  let told = false;
  for (;;) {
    let status: string | null;
    try {
      status = (await query("select txid_status($1::bigint) as status", [txid])).rows[0]?.status ?? null;
    } catch (error) {
      // "transaction ID is in the future": not this server's history (restored, replaced).
      if ((error as { code?: string }).code === "22023") return "unknown";
      throw error;
    }
    if (status === "committed") return "committed";
    if (status === "aborted") return "rolled_back";
    if (status !== "in progress") return "unknown"; // too old to tell
    if (!told) {
      told = true;
      opts.onWait?.(`waiting for transaction ${txid} of an interrupted publish to finish at the source`);
    }
    if (Date.now() > until || opts.signal?.aborted) {
      throw new ConnectorError(`transaction ${txid} of an interrupted publish is still open at the source; trying again later`, { transient: true });
    }
    await pause(250, opts.signal);
  }
}

/**
 * How a connector's public calls fail: as a ConnectorError (ConnectorErrors as they
 * are, anything else through `describe`), except that a download passes its caller's
 * own abort reason on as it is.
 */
export function connectorFailures(describe: (error: unknown) => ConnectorError): {
  guard<T>(work: () => Promise<T>): Promise<T>;
  guardDownload<T>(batches: AsyncIterable<T>, signal: AbortSignal | undefined): AsyncGenerator<T>;
} {
  const asConnectorError = (error: unknown) => (error instanceof ConnectorError ? error : describe(error));
  return {
    async guard(work) {
      try {
        return await work();
      } catch (error) {
        throw asConnectorError(error);
      }
    },
    async *guardDownload(batches, signal) {
      try {
        yield* batches;
      } catch (error) {
        if (signal?.aborted && error === signal.reason) throw error;
        throw asConnectorError(error);
      }
    },
  };
}

/**
 * Applies each item in its own savepoint inside one transaction, so a record the
 * source rejects gets `ok: false` and the others still apply. Errors that are not
 * about one record (connection lost, deadlock) abort the whole call and are thrown.
 * `beforeCommit` runs after the last item and before COMMIT; if it throws, nothing
 * is committed.
 */
export async function applyEachInTransaction<T>(
  exec: (sql: string) => Promise<unknown>,
  items: T[],
  apply: (item: T) => Promise<RecordOutcome>,
  isRecordError: (error: unknown) => boolean,
  beforeCommit?: (outcomes: RecordOutcome[]) => Promise<void>,
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
    // The caller records what is about to be committed (publish's intent) first.
    await beforeCommit?.(outcomes);
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
