// The frame every source-facing task runs in: claim the snapbase.jobs row, open
// the account's connector, do the work, and settle the job.
//
// Failures: a transient connector error (network, timeout) is rethrown so that
// graphile-worker retries with its exponential backoff, until the last attempt,
// which fails the job. Anything else (wrong credentials, a table that changed, a
// database error) fails the job at once with its message: retrying would not help.
import type { JobHelpers } from "graphile-worker";
import type pg from "pg";
import { openConnector, type ConnectorKind } from "../connectors/index.ts";
import { pinConnectorTarget } from "../connectors/targets.ts";
import { ConnectorError, type Connector } from "../connectors/types.ts";
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
  /** The job's state was set in SQL (e.g. awaiting approval): the frame leaves it be. */
  handedOff(): void;
}

/** The payload every source-facing task takes. */
function jobIdOf(payload: unknown): string {
  const id = (payload as { job_id?: unknown } | null)?.job_id;
  if (typeof id !== "number" && typeof id !== "string") throw new Error(`payload must be {"job_id": n}, got ${JSON.stringify(payload)}`);
  return String(id);
}

export async function runJob(payload: unknown, helpers: JobHelpers, work: (scope: JobScope) => Promise<void>): Promise<void> {
  const jobId = jobIdOf(payload);
  const sql: JobScope["sql"] = async (text, values) =>
    helpers.withPgClient(async (client) => (await client.query(text, values)).rows);

  const [started] = await sql<{ job: JobRow | null }>("select to_jsonb(j) as job from snapbase_private.start_job($1) j where j.id is not null", [jobId]);
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
  let credentials: Record<string, unknown>;
  try {
    // Checked again now (the account was checked when stored): DNS and the rules may have changed.
    credentials = await pinConnectorTarget(account.kind, account.credentials, sql);
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    if (error instanceof ConnectorError && error.transient && helpers.job.attempts < helpers.job.max_attempts) throw error;
    await finish("failed", undefined, message);
    return;
  }
  const connector = openConnector(account.kind, credentials, { ownerUrl, jobId: job.id, creatorRole: account.creator_role ?? undefined });
  try {
    await work({ job, accountKind: account.kind, connector, sql, finish, handedOff: () => void (settled = true) });
    if (!settled) await finish("succeeded");
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    const lastAttempt = helpers.job.attempts >= helpers.job.max_attempts;
    if (error instanceof ConnectorError && error.transient && !lastAttempt) {
      await sql("select snapbase_private.job_progress($1, null, null, $2)", [jobId, `retrying after: ${redactText(message, secrets)}`]);
      throw error;
    }
    if (!settled) await finish("failed", undefined, message);
  } finally {
    await connector.close();
  }
}
