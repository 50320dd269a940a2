// Publishes a workbook table's local changes to its source: creates, then updates,
// then deletes, in batches. Every record's outcome is stored as soon as the source
// answers, so a failure half-way loses nothing and a retry resumes with what is
// left. Managed tables of this database publish through a change request instead.
import type { Task } from "graphile-worker";
import type { RecordOutcome } from "../src/connectors/types.ts";
import { runJob, type JobScope } from "../src/jobs/run.ts";

const BATCH_SIZE = 500;

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

const toStored = (records: PendingRecord[], outcomes: RecordOutcome[]): StoredOutcome[] =>
  records.map((r, i) => {
    const o = outcomes[i] ?? { ok: false, error: "the connector returned no outcome for this record" };
    return o.ok ? { id: r.id, ok: true, remote_id: o.remoteId } : { id: r.id, ok: false, error: o.error };
  });

/** Pushes one batch of a kind. Returns the outcomes to store, and how many records
 *  the conflict check held back (it stores their outcomes itself). */
async function push(scope: JobScope, what: "create" | "update" | "delete", batch: PendingRecord[]): Promise<[StoredOutcome[], number]> {
  const table = scope.job.options.remote_table!;
  const { connector, sql } = scope;
  if (what === "create") return [toStored(batch, await connector.create(table, batch.map((r) => r.values))), 0];
  const current = await connector.fetch(table, batch.map((r) => r.remote_id!));
  if (what === "update") {
    const [{ sendable }] = await sql<{ sendable: string[] }>("select snapbase_private.check_publish_conflicts($1, $2, $3) as sendable",
      [scope.job.id, JSON.stringify(batch), JSON.stringify(Object.fromEntries(current))]);
    const toSend = batch.filter((r) => sendable.includes(String(r.id)));
    const outcomes = toStored(toSend, await connector.update(table, toSend.map((r) => ({ remoteId: r.remote_id!, values: r.values }))));
    return [outcomes, batch.length - toSend.length];
  }
  // Already gone at the source: that deletion is done.
  const gone: StoredOutcome[] = batch.filter((r) => !current.has(r.remote_id!)).map((r) => ({ id: r.id, ok: true }));
  const present = batch.filter((r) => current.has(r.remote_id!));
  return [[...gone, ...toStored(present, await connector.delete(table, present.map((r) => r.remote_id!)))], 0];
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
    await sql("select snapbase_private.job_progress($1, 0, snapbase_private.publish_pending($1), 'publishing')", [job.id]);
    const counts = { published: 0, failed: 0, held_back: 0 };
    for (const what of ["create", "update", "delete"] as const) {
      for (;;) {
        const [{ batch }] = await sql<{ batch: PendingRecord[] }>("select snapbase_private.next_to_publish($1, $2, $3) as batch", [job.id, what, BATCH_SIZE]);
        if (batch.length === 0) break;
        const [outcomes, heldBack] = await push(scope, what, batch);
        const [{ go_on }] = await sql("select snapbase_private.record_publish_outcomes($1, $2) as go_on", [job.id, JSON.stringify(outcomes)]);
        for (const o of outcomes) counts[o.ok ? "published" : "failed"]++;
        counts.held_back += heldBack;
        if (!go_on) {
          await finish("cancelled", counts);
          return;
        }
      }
    }
    await finish("succeeded", counts);
  });
};

export default publish;
