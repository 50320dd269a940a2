// The frame every source-facing task runs in: claim the snapbase.jobs row, open
// the account's connector, do the work, and settle the job.
//
// Failures: a transient error (the source's network or timeouts, or our own
// database going away) is rethrown so that graphile-worker retries with its
// exponential backoff, until the last attempt, which fails the job. Anything else
// (wrong credentials, a table that changed, a database error) fails the job at
// once with its message: retrying would not help.
//
// Fencing: every statement runs with `snapbase.job_runner` set to this worker's
// graphile-worker pool id. Once the job was taken over (this worker was declared
// dead and the job recovered), the job functions refuse it (SQLSTATE SBJ01) and
// the task stops without touching the job again (it throws, so that graphile-worker
// does not complete, i.e. delete, the job another worker now holds).
import type { JobHelpers } from "graphile-worker";
import type pg from "pg";
import { openConnector, type ConnectorKind } from "../connectors/index.ts";
import { pinConnectorTarget } from "../connectors/targets.ts";
import { ConnectorError, type Connector } from "../connectors/types.ts";
import { isDatabaseUnavailable } from "../db/pools.ts";
import { redactText, secretsOfCredentials } from "../redact.ts";
import { jobContext } from "./context.ts";

export interface JobRow {
  id: string;
  kind: "test_connection" | "list_tables" | "download" | "publish";
  connector_account_id: string;
  workbook_id: string | null;
  table_id: string | null;
  options: { remote_table?: string; force?: boolean };
}

export interface JobScope {
  job: JobRow;
  accountKind: ConnectorKind;
  connector: Connector;
  /** Runs one statement on the worker's pool (each call is its own transaction). */
  sql<T extends pg.QueryResultRow = any>(text: string, values?: unknown[]): Promise<T[]>;
  /** Settles the job; the frame then does nothing more with it. */
  finish(state: "succeeded" | "failed" | "cancelled", result?: unknown, error?: string): Promise<void>;
  /** The job's state was set in SQL (e.g. awaiting approval, partial): the frame leaves it be. */
  handedOff(): void;
  /** Aborts when the worker shuts down: stop at the next batch (throw). */
  signal: AbortSignal;
}

/** The job was taken over by another worker: stop without touching it. */
export class JobTakenOverError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "JobTakenOverError";
  }
}

/** The worker is shutting down: the job runs again (on another worker). */
export class WorkerStoppingError extends Error {
  constructor() {
    super("the worker is shutting down; the job will resume on another worker");
    this.name = "WorkerStoppingError";
  }
}

/** The payload every source-facing task takes. */
function jobIdOf(payload: unknown): string {
  const id = (payload as { job_id?: unknown } | null)?.job_id;
  if (typeof id !== "number" && typeof id !== "string") throw new Error(`payload must be {"job_id": n}, got ${JSON.stringify(payload)}`);
  return String(id);
}

/** The error, or one of its causes, is the fence refusing this runner. */
function takenOver(error: unknown): boolean {
  for (let e = error, depth = 0; e && depth < 5; e = (e as { cause?: unknown }).cause, depth++) {
    if ((e as { code?: unknown }).code === "SBJ01") return true;
  }
  return false;
}

/** Our own database went away (restart, failover): worth retrying, like a source's network error. */
function ownDatabaseLost(error: unknown): boolean {
  return !(error instanceof ConnectorError) && isDatabaseUnavailable(error);
}

export async function runJob(payload: unknown, helpers: JobHelpers, work: (scope: JobScope) => Promise<void>): Promise<void> {
  const jobId = jobIdOf(payload);
  const runner = helpers.job.locked_by ?? "";
  const sql: JobScope["sql"] = async (text, values) =>
    helpers.withPgClient(async (client) => {
      // One round trip opens the transaction and names the runner.
      await client.query(`begin; select set_config('snapbase.job_runner', ${client.escapeLiteral(runner)}, true)`);
      try {
        const { rows } = await client.query(text, values);
        await client.query("commit");
        return rows;
      } catch (error) {
        await client.query("rollback").catch(() => {});
        if (takenOver(error)) throw new JobTakenOverError((error as Error).message);
        throw error;
      }
    });

  let started;
  try {
    [started] = await sql<{ job: JobRow | null }>("select to_jsonb(j) as job from snapbase_private.start_job($1) j where j.id is not null", [jobId]);
  } catch (error) {
    // Thrown, not returned: graphile-worker then fails the attempt, which is a no-op for
    // a job this worker no longer holds (completing it would delete the new runner's job).
    if (error instanceof JobTakenOverError) helpers.logger.warn(`job ${jobId}: ${error.message}`);
    throw error;
  }
  const job = started?.job;
  if (!job) {
    helpers.logger.info(`job ${jobId} is finished or cancelled; nothing to do`);
    return;
  }
  let settled = false;
  // A job's message is shown to its users: no secret of the account's credentials in it, whatever raised it.
  let secrets: string[] = [];
  const finish: JobScope["finish"] = async (state, result, error) => {
    await sql("select snapbase_private.finish_job($1, $2, $3, $4)",
      [jobId, state, result === undefined ? null : JSON.stringify(result), error === undefined ? null : redactText(error, secrets)]);
    settled = true;
  };

  const { credentialsSecretKey, ownerUrl } = jobContext();
  const [account] = await sql<{ kind: ConnectorKind; credentials: Record<string, unknown> | null; creator_role: string | null }>(
    `select a.kind, case when a.kind = 'managed' then '{}'::jsonb else snapbase_private.account_credentials(a.id, $2) end as credentials,
            (select snapbase_private.db_role(u.role::text) from snapbase.users u join snapbase.jobs j on j.created_by = u.id where j.id = $3) as creator_role
       from snapbase.connector_accounts a where a.id = $1`,
    [job.connector_account_id, credentialsSecretKey, job.id],
  );
  if (!account?.credentials) {
    await finish("failed", undefined, "the connector account was deleted");
    return;
  }
  secrets = secretsOfCredentials(account.credentials);
  let connector: Connector | undefined;
  try {
    // The target is checked again now (it was when the account was stored): DNS and the rules may have changed.
    const credentials = await pinConnectorTarget(account.kind, account.credentials, sql);
    connector = openConnector(account.kind, credentials, { ownerUrl, jobId: job.id, creatorRole: account.creator_role ?? undefined });
    await work({ job, accountKind: account.kind, connector, sql, finish, handedOff: () => void (settled = true), signal: helpers.abortSignal });
    if (!settled) await finish("succeeded");
  } catch (error) {
    if (error instanceof JobTakenOverError || takenOver(error)) {
      helpers.logger.warn(`job ${jobId}: ${(error as Error).message}`);
      throw error; // see above: never "complete" a job that was taken away
    }
    const message = error instanceof Error ? error.message : String(error);
    const lastAttempt = helpers.job.attempts >= helpers.job.max_attempts;
    const transient = (error instanceof ConnectorError && error.transient) || ownDatabaseLost(error) || error instanceof WorkerStoppingError;
    if (transient && !lastAttempt) {
      await sql("select snapbase_private.job_progress($1, null, null, $2)", [jobId, `retrying after: ${redactText(message, secrets)}`]).catch(() => {});
      throw error;
    }
    if (!settled) await finish("failed", undefined, message);
  } finally {
    await connector?.close().catch(() => {});
  }
}
