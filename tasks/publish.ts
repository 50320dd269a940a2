// Publishes a workbook table's local changes to its source: creates, then updates,
// then deletes, in batches. Exactly once, whatever is cut off where:
//
// - Before a batch's source transaction commits, its intent (what is about to be
//   committed, and how to recognise the transaction at the source) is recorded.
// - After the source answers, every record's outcome is stored.
// - A publish first settles the batches a crash left between the two: it asks the
//   source whether their transaction committed (or compares the records with the
//   source), records what landed and sends the rest again.
//
// A record is handed out again only when its previous send is known not to have
// landed. Managed tables of this database publish through a change request instead.
import type { Task } from "graphile-worker";
import type { RecordOutcome, WriteReceipt } from "../src/connectors/types.ts";
import { runJob, WorkerStoppingError, type JobScope } from "../src/jobs/run.ts";

const BATCH_SIZE = 500;

type Kind = "create" | "update" | "delete";

interface PendingRecord {
  id: number;
  remote_id: string | null;
  values: Record<string, unknown>;
  last_seen: Record<string, unknown> | null;
}

interface StoredOutcome {
  id: number;
  ok: boolean;
  remote_id?: string;
  error?: string;
}

interface UnsettledBatch {
  id: number;
  kind: Kind;
  receipt: WriteReceipt;
  planned: (StoredOutcome & { values?: Record<string, unknown> })[];
}

const toStored = (records: PendingRecord[], outcomes: RecordOutcome[]): StoredOutcome[] =>
  records.map((r, i) => {
    const o = outcomes[i] ?? { ok: false, error: "the connector returned no outcome for this record" };
    return o.ok ? { id: r.id, ok: true, remote_id: o.remoteId } : { id: r.id, ok: false, error: o.error };
  });

/**
 * Writes records of one kind to the source; just before the source commits, the
 * intent is recorded. Returns the outcomes and the batch that holds the intent.
 */
async function send(scope: JobScope, what: Kind, records: PendingRecord[]): Promise<{ outcomes: StoredOutcome[]; batchId: string | null }> {
  if (records.length === 0) return { outcomes: [], batchId: null };
  const table = scope.job.options.remote_table!;
  const { connector, sql } = scope;
  let batchId: string | null = null;
  const beforeCommit = async (receipt: WriteReceipt, planned: RecordOutcome[]) => {
    const intent = toStored(records, planned).map((o, i) => ({
      ...o,
      // Updates and deletes name the record the source knows; creates, the id it is about to get.
      remote_id: what === "create" ? o.remote_id : records[i]!.remote_id,
      values: what === "update" ? records[i]!.values : undefined,
    }));
    [{ batch_id: batchId }] = await sql<{ batch_id: string }>("select snapbase_private.record_publish_intent($1, $2, $3, $4) as batch_id",
      [scope.job.id, what, JSON.stringify(receipt), JSON.stringify(intent)]);
  };
  const outcomes =
    what === "create" ? await connector.create(table, records.map((r) => r.values), { beforeCommit })
    : what === "update" ? await connector.update(table, records.map((r) => ({ remoteId: r.remote_id!, values: r.values })), { beforeCommit })
    : await connector.delete(table, records.map((r) => r.remote_id!), { beforeCommit });
  return { outcomes: toStored(records, outcomes), batchId };
}

/** Pushes one batch of a kind and stores its outcomes. Returns false when the job was cancelled. */
async function push(scope: JobScope, what: Kind, batch: PendingRecord[]): Promise<boolean> {
  const table = scope.job.options.remote_table!;
  const { connector, sql, job } = scope;
  let toSend = batch;
  let settled: StoredOutcome[] = [];
  if (what !== "create") {
    const current = await connector.fetch(table, batch.map((r) => r.remote_id!));
    if (what === "update") {
      // Records changed at the source since download are held back (the check stores their outcomes).
      const [{ sendable }] = await sql<{ sendable: string[] }>("select snapbase_private.check_publish_conflicts($1, $2, $3) as sendable",
        [job.id, JSON.stringify(batch), JSON.stringify(Object.fromEntries(current))]);
      toSend = batch.filter((r) => sendable.includes(String(r.id)));
    } else {
      // Already gone at the source: that deletion is done.
      settled = batch.filter((r) => !current.has(r.remote_id!)).map((r) => ({ id: r.id, ok: true }));
      toSend = batch.filter((r) => current.has(r.remote_id!));
    }
  }
  const { outcomes, batchId } = await send(scope, what, toSend);
  const [{ go_on }] = await sql("select snapbase_private.record_publish_outcomes($1, $2, $3) as go_on",
    [job.id, JSON.stringify([...settled, ...outcomes]), batchId]);
  return go_on;
}

/** Settles the batches a crash cut off between the source's commit and our record of it. */
async function settleInterrupted(scope: JobScope): Promise<void> {
  const { connector, sql, job } = scope;
  const [{ batches }] = await sql<{ batches: UnsettledBatch[] }>("select snapbase_private.unsettled_publish_batches($1) as batches", [job.id]);
  for (const batch of batches) {
    const status = await connector.writeStatus(batch.receipt, {
      signal: scope.signal,
      onWait: (message) => void sql("select snapbase_private.job_progress($1, null, null, $2)", [job.id, message]).catch(() => {}),
    });
    let current: Record<string, unknown> | null = null;
    if (status === "unknown") {
      const ids = batch.planned.filter((p) => p.ok && p.remote_id).map((p) => p.remote_id!);
      current = Object.fromEntries(await connector.fetch(job.options.remote_table!, ids));
    }
    await sql("select snapbase_private.settle_publish_batch($1, $2, $3, $4)", [job.id, batch.id, status, current === null ? null : JSON.stringify(current)]);
  }
}

const publish: Task = async (payload, helpers) => {
  await runJob(payload, helpers, async (scope) => {
    const { job, sql, finish } = scope;
    if (scope.accountKind === "managed") {
      // One change request; the job waits as awaiting_approval until an admin decides.
      await sql("select snapbase_private.publish_managed($1)", [job.id]);
      scope.handedOff();
      return;
    }
    await settleInterrupted(scope);
    // done counts the records this job settled (over all its attempts), total adds what is left.
    await sql("select snapbase_private.job_progress($1, null, j.done + snapbase_private.publish_pending($1), 'publishing') from snapbase.jobs j where j.id = $1", [job.id]);
    for (const what of ["create", "update", "delete"] as const) {
      for (;;) {
        if (scope.signal.aborted) throw new WorkerStoppingError();
        const [{ batch }] = await sql<{ batch: PendingRecord[] }>("select snapbase_private.next_to_publish($1, $2, $3) as batch", [job.id, what, BATCH_SIZE]);
        if (batch.length === 0) break;
        if (!(await push(scope, what, batch))) {
          await finish("cancelled");
          return;
        }
      }
    }
    // succeeded, or partial when some records failed or conflicted (counts in result).
    await sql("select snapbase_private.finish_publish($1)", [job.id]);
    scope.handedOff();
  });
};

export default publish;
