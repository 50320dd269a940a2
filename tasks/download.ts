// Fills or refreshes a workbook table from its source, batch by batch (each batch
// one transaction), so a table of any size streams through without sitting in
// memory. A retry re-applies batches harmlessly: records are matched by remote id.
import type { Task } from "graphile-worker";
import { readAhead } from "../src/jobs/read-ahead.ts";
import { runJob, WorkerStoppingError } from "../src/jobs/run.ts";

const BATCH_SIZE = 2000;

const download: Task = async (payload, helpers) => {
  await runJob(payload, helpers, async ({ job, connector, sql, finish, signal }) => {
    const remoteTable = job.options.remote_table!;
    // A first download creates its table; if it fails or is cancelled, the table goes
    // again (a retry starts afresh): no empty or half-filled table is left behind.
    const first = job.table_id === null;
    const discard = () => (first ? sql("select snapbase_private.discard_download($1)", [job.id]) : Promise.resolve([]));
    try {
      const spec = await connector.tableSpec(remoteTable);
      await sql("select snapbase_private.prepare_download($1, $2)", [job.id, JSON.stringify(spec)]);
      await sql("select snapbase_private.job_progress($1, 0, $2, 'downloading')", [job.id, await connector.count(remoteTable)]);
      const abort = new AbortController();
      let done = 0;
      for await (const batch of readAhead(connector.download(remoteTable, { batchSize: BATCH_SIZE, signal: abort.signal }))) {
        // A worker shutting down stops between batches; the job resumes elsewhere (batches re-apply harmlessly).
        if (signal.aborted) throw new WorkerStoppingError();
        done += batch.length;
        const records = JSON.stringify(batch.map((r) => ({ remote_id: r.remoteId, values: r.values })));
        const [{ go_on }] = await sql("select snapbase_private.apply_download_batch($1, $2, $3) as go_on", [job.id, records, done]);
        if (!go_on) {
          abort.abort();
          await discard();
          await finish("cancelled", { records: done });
          return;
        }
      }
      await sql("select snapbase_private.finish_download($1)", [job.id]);
    } catch (error) {
      await discard();
      throw error;
    }
  });
};

export default download;
