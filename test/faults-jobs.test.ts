// Faults a worker meets (issue 12, items 3 to 5), each injected for real: a worker
// process killed with SIGKILL mid-download and mid-publish, and a publish cut off
// while the source's COMMIT is held open by a deferred constraint trigger. The
// source is a second PostgreSQL database, read back with its own client.
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import path from "node:path";
import mysql from "mysql2/promise";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { mysqlConnector } from "../src/connectors/mysql.ts";
import { postgresConnector } from "../src/connectors/postgres.ts";
import { ConnectorError } from "../src/connectors/types.ts";
import { projectRoot } from "../src/db/migrate.ts";
import type { RunningServer } from "../src/server/app.ts";
import { startWorker, type Worker } from "../src/worker.ts";
import { createUser, db, graphqlData, http, owner, startTestServer, TEST_CREDENTIALS_KEY, TEST_PASSWORD, type TestUser } from "./helpers.ts";
import { createSourceDatabase, type SourceDatabase } from "./source-databases.ts";

// Killed workers and lost connections are the point here: their (expected) errors are not logged.

const RUN = randomBytes(4).toString("hex");
const SOURCE_DB = `snapbase_faults_source_${RUN}`;
const SOURCE_USER = `snapbase_faults_src_${RUN}`;
/** The advisory lock the source's deferred trigger waits for: while the test holds it, COMMIT cannot finish. */
const HOLD_KEY = 4242;

let server: RunningServer;
let alice: TestUser;
let token: string;
let source: pg.Client;
let sourceUrl: string;
let sourceDb: SourceDatabase;
let account: string;
const children = new Set<ChildProcess>();
const workers: Worker[] = [];

const gql = async (query: string, variables: Record<string, unknown> = {}) => {
  return graphqlData(server.url, query, variables, token);
};

/** Polls until `check` returns something truthy; fails after `timeoutMs` (generous: two busy cores). */
async function waitFor<T>(what: string, check: () => Promise<T | undefined | null | false>, timeoutMs = 90_000): Promise<T> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const jobRow = async (id: string) => (await owner().query("select * from snapbase.jobs where id = $1", [id])).rows[0];
const settledJob = (id: string) => waitFor(`job ${id} to settle`, async () => {
  const j = await jobRow(id);
  return !["queued", "running"].includes(j.state) && j;
});

/** A worker in its own process (test/fixtures/worker-process.ts), once it is registered with its pool. */
async function spawnWorker(): Promise<{ child: ChildProcess; pid: number }> {
  const child = spawn(process.execPath, [path.join(projectRoot, "test/fixtures/worker-process.ts")], {
    cwd: projectRoot,
    env: { PATH: process.env.PATH ?? "", HOME: process.env.HOME ?? "/tmp", OWNER_URL: db.ownerUrl, CREDENTIALS_KEY: TEST_CREDENTIALS_KEY, LOG_LEVEL: "error" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.add(child);
  child.once("exit", () => children.delete(child));
  let out = "";
  child.stdout!.on("data", (d) => (out += d));
  child.stderr!.on("data", (d) => (out += d));
  await waitFor("the worker process to start", async () => {
    if (child.exitCode !== null) throw new Error(`worker exited early:\n${out}`);
    return out.includes("worker ready");
  });
  const pid = child.pid!;
  // Its graphile-worker pool is known as its own before it takes a job.
  await waitFor("the worker to register its pool", async () =>
    (await owner().query("select 1 from snapbase_private.workers where process like $1 and cardinality(pool_ids) > 0", [`% pid ${pid}`])).rowCount);
  return { child, pid };
}

async function kill9(child: ChildProcess): Promise<void> {
  const pid = child.pid!;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  child.kill("SIGKILL");
  await exited;
  // Its connections are gone once PostgreSQL notices; then it can be seen as dead
  // (or a live worker already swept it away).
  await waitFor("the killed worker's lock to go", async () =>
    !(await owner().query("select 1 from snapbase_private.workers w where process like $1 and snapbase_private.worker_lock_held(w.id)", [`% pid ${pid}`])).rowCount);
}

async function startInProcessWorker(): Promise<Worker> {
  // Sweeps often, and takes a process whose connection is gone for dead soon (the killed ones beat every 500 ms).
  const w = await startWorker({ ownerUrl: db.ownerUrl, concurrency: 2, credentialsKey: TEST_CREDENTIALS_KEY,
    sweepIntervalMs: 500, heartbeatMs: 500, lockGraceMs: 2000 });
  workers.push(w);
  return w;
}

async function stopWorkers(): Promise<void> {
  await Promise.all(workers.splice(0).map((w) => w.stop({ drainMs: 1000 })));
}

/**
 * A source backend waiting for a lock: a table lock (relation) or the hold key (advisory).
 * pg_locks is the whole server's: other test files run beside this one, so only the
 * source database's locks count.
 */
async function sourceWaiting(kind: "relation" | "advisory"): Promise<boolean> {
  const { rowCount } = await source.query(
    `select 1 from pg_locks l
      where not l.granted and l.locktype = $1 and (l.locktype <> 'advisory' or l.objid = $2)
        and l.database = (select oid from pg_database where datname = current_database())`, [kind, HOLD_KEY]);
  return (rowCount ?? 0) > 0;
}

async function downloaded(remoteTable: string): Promise<{ wb: string; tableId: string; rel: string }> {
  const wb = (await gql(`mutation($a: BigInt!, $t: [String]!) { createWorkbookFromRemote(input: { name: "Faults", accountId: $a, remoteTables: $t }) { result { rowId } } }`,
    { a: account, t: [remoteTable] })).createWorkbookFromRemote.result.rowId;
  const { rows: [job] } = await owner().query("select id from snapbase.jobs where workbook_id = $1", [wb]);
  await startInProcessWorker();
  const done = await settledJob(job.id);
  await stopWorkers();
  expect(done, JSON.stringify(done)).toMatchObject({ state: "succeeded" });
  const tableId = String(done.table_id);
  const rel = (await owner().query("select snapbase_private.table_rel(t) as rel from snapbase.workbook_tables t where id = $1", [tableId])).rows[0].rel;
  return { wb: String(wb), tableId, rel };
}

const publish = async (wb: string): Promise<string> =>
  (await gql(`mutation($w: BigInt!) { publishWorkbook(input: { workbookId: $w }) { result { rowId } } }`, { w: wb })).publishWorkbook.result[0].rowId;

beforeAll(async () => {
  sourceDb = await createSourceDatabase({ database: SOURCE_DB, user: SOURCE_USER });
  ({ client: source, url: sourceUrl } = sourceDb);
  await source.query(`
    create table public.big (id int primary key, label text not null);
    insert into public.big select n, 'row ' || n from generate_series(1, 3000) n;
    create table public.items (id serial primary key, name text not null, amount numeric not null check (amount >= 0));
    insert into public.items (name, amount) select 'item ' || n, n from generate_series(1, 40) n;
    -- Every write to items, to count how often each row was written.
    create table public.writes (id int, op text);
    create function public.count_write() returns trigger language plpgsql as $$
      begin insert into public.writes values (coalesce(new.id, old.id), tg_op); return null; end $$;
    create trigger count_write after insert or update or delete on public.items for each row execute function public.count_write();
    -- Holds COMMIT open while the test holds advisory lock ${HOLD_KEY}.
    create function public.hold_commit() returns trigger language plpgsql as $$
      begin perform pg_advisory_lock_shared(${HOLD_KEY}); perform pg_advisory_unlock_shared(${HOLD_KEY}); return null; end $$;
    create constraint trigger hold_commit after insert or update or delete on public.items
      deferrable initially deferred for each row execute function public.hold_commit();`);

  server = await startTestServer();
  alice = await createUser("editor", "alice");
  token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: alice.email, password: TEST_PASSWORD } })).body.token;
  account = (await gql(`mutation($c: JSON!) { createConnectorAccount(input: { kind: "postgres", name: "Faults source", credentials: $c }) { result { rowId } } }`,
    { c: { connection_string: sourceUrl } })).createConnectorAccount.result.rowId;
});

afterAll(async () => {
  for (const child of children) child.kill("SIGKILL");
  await stopWorkers();
  await server?.close();
  await sourceDb?.drop();
});

describe("a worker killed mid-job (kill -9)", () => {
  it("a download whose worker died is cancelled at once on request, and the table can be refreshed right away", async () => {
    const { tableId } = await downloaded("public.big");
    const { child } = await spawnWorker();
    // The refresh reads the source table, which the test keeps locked: the job is running, mid-download.
    await source.query("begin; lock table public.big in access exclusive mode");
    try {
      const job = (await gql(`mutation($t: BigInt!) { refreshWorkbookTable(input: { tableId: $t }) { result { rowId } } }`, { t: tableId })).refreshWorkbookTable.result.rowId;
      await waitFor("the download to block at the source", () => sourceWaiting("relation"));
      expect(await jobRow(job)).toMatchObject({ state: "running" });
      await kill9(child);

      // No live worker runs it: the cancel takes effect now, not at a next batch that never comes.
      const cancelled = await gql(`mutation($j: BigInt!) { cancelJob(input: { jobId: $j }) { result { state cancelRequested } } }`, { j: job });
      expect(cancelled.cancelJob.result).toEqual({ state: "cancelled", cancelRequested: true });
      expect((await owner().query("select count(*)::int as n from graphile_worker.jobs where key = $1", [`snapbase_job_${job}`])).rows[0].n).toBe(0);
      // And the table is free for another job at once.
      const again = (await gql(`mutation($t: BigInt!) { refreshWorkbookTable(input: { tableId: $t }) { result { rowId state } } }`, { t: tableId })).refreshWorkbookTable.result;
      expect(again.state).toBe("queued");
    } finally {
      await source.query("rollback");
    }
    await startInProcessWorker();
    const last = (await owner().query("select id from snapbase.jobs where table_id = $1 order by id desc limit 1", [tableId])).rows[0].id;
    expect(await settledJob(last)).toMatchObject({ state: "succeeded", done: "3000", total: "3000" });
    await stopWorkers();
  });

  it("a download whose worker died is taken over by a live worker and completes", async () => {
    const { tableId, rel } = await downloaded("public.big");
    const { child } = await spawnWorker();
    await source.query("begin; lock table public.big in access exclusive mode");
    let job: string;
    try {
      job = (await gql(`mutation($t: BigInt!) { refreshWorkbookTable(input: { tableId: $t }) { result { rowId } } }`, { t: tableId })).refreshWorkbookTable.result.rowId;
      await waitFor("the download to block at the source", () => sourceWaiting("relation"));
      await kill9(child);
      // A live worker finds the dead one and takes its job: back in the queue, then running again.
      await startInProcessWorker();
      await waitFor("the job to be recovered", async () => {
        const j = await jobRow(job);
        return j.attempts >= 2 && j;
      });
    } finally {
      await source.query("rollback");
    }
    const done = await settledJob(job);
    expect(done).toMatchObject({ state: "succeeded", done: "3000", total: "3000" });
    expect((await owner().query(`select count(*)::int as n from ${rel}`)).rows[0].n).toBe(3000);
    await stopWorkers();
  });
});

/**
 * Publishes the workbook with a worker process that is killed (-9) while the
 * source holds its COMMIT open, so the batch lands at the source after the worker
 * died; a live worker then resumes the job. Returns the settled job.
 */
async function publishKilledDuringCommit(wb: string) {
  const { child } = await spawnWorker();
  await source.query("select pg_advisory_lock($1)", [HOLD_KEY]);
  let job: string;
  try {
    job = await publish(wb);
    // The batch is written and its intent recorded; COMMIT waits in the deferred trigger.
    await waitFor("the source's COMMIT to be held", () => sourceWaiting("advisory"));
    expect((await owner().query("select count(*)::int as n from snapbase_private.publish_batches where job_id = $1 and settled_at is null", [job])).rows[0].n).toBe(1);
    await kill9(child);
    await startInProcessWorker();
    // The live worker resumes the job and waits for the source to say how the interrupted transaction ended.
    await waitFor("the resumed job to wait for the open transaction", async () => /waiting for transaction/.test((await jobRow(job)).message ?? ""));
  } finally {
    await source.query("select pg_advisory_unlock($1)", [HOLD_KEY]);
  }
  return settledJob(job);
}

describe("a publish cut off after the source committed", () => {
  it("creates: the held COMMIT lands after the worker dies, and the retry records it instead of creating rows again", async () => {
    const { wb, tableId, rel } = await downloaded("public.items");
    // 30 new records, 2 of which the source refuses (negative amount): a partial outcome.
    const ops = Array.from({ length: 30 }, (_, i) => ({ op: "create", values: { name: `new ${RUN} ${i}`, amount: i === 7 || i === 19 ? -1 : i } }));
    const created = await gql(`mutation($t: BigInt!, $ops: JSON!) { bulkEditRecords(input: { tableId: $t, operations: $ops }) { result } }`, { t: tableId, ops });
    expect(created.bulkEditRecords.result.ok).toBe(true);
    await source.query("truncate public.writes");

    const done = await publishKilledDuringCommit(wb);
    expect(done).toMatchObject({ state: "partial", result: { published: 28, failed: 2, conflicts: 0 }, done: "30", total: "30",
      error: expect.stringMatching(/2 of 30 records were not published \(2 failed/) });

    // One row per created record at the source, each inserted once.
    const rows = (await source.query("select id, name from public.items where name like $1 order by id", [`new ${RUN} %`])).rows;
    expect(rows).toHaveLength(28);
    expect((await source.query("select count(*)::int as n from public.writes where op = 'INSERT'")).rows[0].n).toBe(28);
    // The workbook knows each one's remote id; the refused two keep their edits and say why.
    const local = (await owner().query(`select id, __remote_id, __created, __publish ->> 'state' as state, __publish ->> 'error' as error,
                                                to_jsonb(r.*) - snapbase_private.record_meta_columns() = r.__last_seen as in_sync
                                           from ${rel} r where name like $1`, [`new ${RUN} %`])).rows;
    expect(local.filter((r) => r.state === "published" && !r.__created).map((r) => Number(r.__remote_id)).sort((a, b) => a - b)).toEqual(rows.map((r) => r.id));
    // What the source stored came back with the settled outcomes (kept in the intent): each new record's id.
    expect(local.filter((r) => r.state === "published").every((r) => r.id === Number(r.__remote_id) && r.in_sync)).toBe(true);
    expect(local.filter((r) => r.state === "failed")).toEqual([
      expect.objectContaining({ __created: true, error: expect.stringMatching(/check constraint/) }),
      expect.objectContaining({ __created: true, error: expect.stringMatching(/check constraint/) }),
    ]);
    await stopWorkers();
  });

  it("updates that reached the source are reported published, not as conflicts", async () => {
    const { wb, tableId, rel } = await downloaded("public.items");
    const ids = (await owner().query(`select __id from ${rel} where __remote_id::int between 1 and 25 order by __id`)).rows.map((r) => String(r.__id));
    const ops = ids.map((id) => ({ op: "update", id, values: { name: `updated ${RUN} ${id}` } }));
    expect((await gql(`mutation($t: BigInt!, $ops: JSON!) { bulkEditRecords(input: { tableId: $t, operations: $ops }) { result } }`, { t: tableId, ops }))
      .bulkEditRecords.result.ok).toBe(true);
    await source.query("truncate public.writes");

    const done = await publishKilledDuringCommit(wb);
    expect(done).toMatchObject({ state: "succeeded", result: { published: 25, failed: 0, conflicts: 0 }, done: "25", total: "25" });
    // Each row updated once, with the workbook's value; no record left in conflict or dirty.
    expect((await source.query("select count(*)::int as n, count(distinct id)::int as rows from public.writes where op = 'UPDATE'")).rows[0]).toEqual({ n: 25, rows: 25 });
    expect((await source.query("select count(*)::int as n from public.items where name like $1", [`updated ${RUN} %`])).rows[0].n).toBe(25);
    expect((await owner().query(`select count(*)::int as n from ${rel} where __dirty or __publish ->> 'state' = 'conflict'`)).rows[0].n).toBe(0);
    await stopWorkers();
  });

  it("an interrupted batch whose fate the source cannot tell is settled record by record", async () => {
    // As after a crash on a source without txid_status: the intent of a batch that did
    // commit two creates and one update, and of one that did not commit its update.
    const { tableId, rel } = await downloaded("public.items");
    await gql(`mutation($t: BigInt!, $ops: JSON!) { bulkEditRecords(input: { tableId: $t, operations: $ops }) { result } }`,
      { t: tableId, ops: [{ op: "create", values: { name: `landed ${RUN}`, amount: 1 } }, { op: "create", values: { name: `lost ${RUN}`, amount: 2 } }] });
    const [landed, lost] = (await owner().query(`select __id from ${rel} where name in ($1, $2) order by name`, [`landed ${RUN}`, `lost ${RUN}`])).rows.map((r) => r.__id);
    const { rows: [{ id: sourceId }] } = await source.query("insert into public.items (name, amount) values ($1, 1) returning id", [`landed ${RUN}`]);
    const client = await owner().connect();
    try {
      await client.query("begin");
      const { rows: [job] } = await client.query(
        `insert into snapbase.jobs (kind, state, connector_account_id, workbook_id, table_id, options)
         select 'publish', 'running', $1, workbook_id, id, jsonb_build_object('remote_table', 'public.items') from snapbase.workbook_tables where id = $2 returning id`,
        [account, tableId]);
      const { rows: [{ batch }] } = await client.query("select snapbase_private.record_publish_intent($1, 'create', '{}', $2) as batch",
        [job.id, JSON.stringify([{ id: landed, ok: true, remote_id: String(sourceId) }, { id: lost, ok: true, remote_id: "999999" }])]);
      const current = { [String(sourceId)]: { id: sourceId, name: `landed ${RUN}`, amount: 1 } };
      const { rows: [{ settled }] } = await client.query("select snapbase_private.settle_publish_batch($1, $2, 'unknown', $3) as settled", [job.id, batch, JSON.stringify(current)]);
      expect(settled).toEqual({ published: 1, resent: 1 });
      const after = (await client.query(`select __id, __remote_id, __publish ->> 'state' as state, id, __last_seen ->> 'id' as seen_id from ${rel} where __id in ($1, $2) order by __id`, [landed, lost])).rows;
      // The landed record takes what the source holds now (its new id too).
      expect(after).toEqual([
        { __id: landed, __remote_id: String(sourceId), state: "published", id: sourceId, seen_id: String(sourceId) },
        { __id: lost, __remote_id: null, state: "pushing", id: null, seen_id: null },
      ]);
    } finally {
      await client.query("rollback");
      client.release();
    }
  });
});

describe("what the source says of an interrupted write", () => {
  it("PostgreSQL: committed, rolled back, or still open (then the job waits, and retries later)", async () => {
    const connector = postgresConnector({ connectionString: sourceUrl });
    const other = new pg.Client({ connectionString: sourceUrl });
    await other.connect();
    try {
      const txid = async () => (await other.query("select txid_current()::text as t")).rows[0].t as string;
      await other.query("begin");
      const committed = await txid();
      await other.query("commit");
      await other.query("begin");
      const rolledBack = await txid();
      await other.query("rollback");
      expect(await connector.writeStatus({ txid: committed })).toBe("committed");
      expect(await connector.writeStatus({ txid: rolledBack })).toBe("rolled_back");
      expect(await connector.writeStatus({})).toBe("unknown");
      await other.query("begin");
      const open = await txid();
      let told = "";
      const stop = new AbortController();
      const waiting = connector.writeStatus({ txid: open }, { signal: stop.signal, onWait: (m) => void (told = m, stop.abort()) });
      const error = await waiting.then(() => null, (e: unknown) => e);
      expect(told).toMatch(/waiting for transaction/);
      expect(error).toBeInstanceOf(ConnectorError);
      expect(error).toMatchObject({ transient: true, message: expect.stringMatching(/still open at the source/) });
      await other.query("rollback");
    } finally {
      await other.end();
      await connector.close();
    }
  });

  it("MySQL: unknown once the connection that wrote is gone (records are then compared); waits while it is there", async () => {
    const url = new URL(process.env.TEST_MYSQL_URL ?? "mysql://root@127.0.0.1:3306/test");
    const connector = mysqlConnector({ host: url.hostname, port: Number(url.port || 3306), user: decodeURIComponent(url.username),
      password: decodeURIComponent(url.password) || undefined, database: url.pathname.slice(1) });
    const writer = await mysql.createConnection(url.toString());
    try {
      const [[{ id }]] = await writer.query("select connection_id() as id") as unknown as [[{ id: number }]];
      const stop = new AbortController();
      const error = await connector.writeStatus({ connection_id: id }, { signal: stop.signal, onWait: () => stop.abort() }).then(() => null, (e: unknown) => e);
      expect(error).toMatchObject({ transient: true, message: expect.stringMatching(/still open at the source/) });
      await writer.end();
      await waitFor("the connection to be gone", async () => (await connector.writeStatus({ connection_id: id })) === "unknown");
    } finally {
      await writer.end().catch(() => {});
      await connector.close();
    }
  });
});

describe("a worker declared dead cannot write", () => {
  it("job functions refuse a runner that no longer holds the job (SQLSTATE SBJ01)", async () => {
    const job = (await gql(`mutation($a: BigInt!) { testConnectorAccount(input: { accountId: $a }) { result { rowId } } }`, { a: account })).testConnectorAccount.result.rowId;
    const client = await owner().connect();
    try {
      await client.query("begin");
      // As a task of a pool that does not hold the job's graphile-worker lock (it was taken away).
      await client.query("select set_config('snapbase.job_runner', 'pool-declared-dead', true)");
      const refused = await client.query("select snapbase_private.finish_job($1, 'succeeded')", [job]).then(() => null, (e: { code?: string; message: string }) => e);
      expect(refused).toMatchObject({ code: "SBJ01", message: expect.stringMatching(/no longer run by this worker/) });
    } finally {
      await client.query("rollback");
      client.release();
    }
    expect((await jobRow(job)).state).toBe("queued");
    await gql(`mutation($j: BigInt!) { cancelJob(input: { jobId: $j }) { clientMutationId } }`, { j: job });
  });
});
