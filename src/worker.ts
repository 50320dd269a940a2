// graphile-worker: every file in tasks/ is a task whose id is its file name.
//
// Each worker process also keeps itself known as alive (src/jobs/liveness.ts) and
// sweeps for dead ones: a job whose worker was killed is back in the queue within
// seconds (see snapbase_private.recover_dead_workers), not after graphile-worker's
// 4-hour lock expiry.
import { EventEmitter } from "node:events";
import { Logger, parseCrontab, run, type Runner, type TaskList, type Task, type WorkerEvents } from "graphile-worker";
import { readdirSync } from "node:fs";
import path from "node:path";
import { ensureCredentialKeys } from "./connectors/credential-keys.ts";
import pg from "pg";
import { parseJsonExact } from "./exact-json.ts";
import { projectRoot } from "./db/migrate.ts";
import { createPool, withClient } from "./db/pools.ts";
import { setJobContext } from "./jobs/context.ts";
import { Liveness } from "./jobs/liveness.ts";
import { graphileLogFactory, log } from "./log.ts";

const tasksFolder = path.join(projectRoot, "tasks");

export async function loadTaskList(): Promise<TaskList> {
  const taskList: TaskList = {};
  for (const file of readdirSync(tasksFolder).filter((f) => f.endsWith(".ts")).sort()) {
    const mod = (await import(path.join(tasksFolder, file))) as { default?: Task };
    if (typeof mod.default !== "function") throw new Error(`tasks/${file} must default-export a task function`);
    taskList[path.basename(file, ".ts")] = mod.default;
  }
  return taskList;
}

const exactJsonTypes = {
  getTypeParser(oid: number, format?: "text" | "binary") {
    if (format !== "binary" && (oid === pg.types.builtins.JSON || oid === pg.types.builtins.JSONB)) return parseJsonExact;
    return pg.types.getTypeParser(oid, format);
  },
} as pg.CustomTypesConfig;

// JSON lines through src/log.ts with graphile-worker's scope (worker, task, job), like everything else.
const workerLogger = new Logger(graphileLogFactory("graphile-worker"));

/** Recurring jobs (graphile-worker crontab syntax). */
export const crontab = ["0 * * * * retention ?max=3"].join("\n");

export interface Worker {
  runner: Runner;
  /**
   * Lets running jobs finish for up to the drain time (default: the worker's),
   * then hands the jobs still running back to the queue (other workers resume
   * them) and closes the worker's connections.
   */
  stop(opts?: { drainMs?: number }): Promise<void>;
}

export interface WorkerOptions {
  ownerUrl: string;
  concurrency: number;
  credentialsKey: string;
  /** How often this process looks for dead workers (default 10 s, jittered). */
  sweepIntervalMs?: number;
  /** How often this process says it is alive (default 5 s). */
  heartbeatMs?: number;
  /** A process silent this long is dead even if its connection looks alive (default 45 s). */
  deadAfterMs?: number;
  /** A process whose connection (and lock) is gone is dead once it has not beaten for this long (default 12 s). */
  lockGraceMs?: number;
  /** Shutdown: how long running jobs may take to finish (default 10 s). */
  drainMs?: number;
}

export async function startWorker(opts: WorkerOptions): Promise<Worker> {
  // Only the worker holds the key that opens connector credentials.
  const credentialsSecretKey = await withClient("credentials key", opts.ownerUrl, (owner) => ensureCredentialKeys(owner, opts.credentialsKey));
  setJobContext({ credentialsSecretKey, ownerUrl: opts.ownerUrl });
  const taskList = await loadTaskList();
  const drainMs = opts.drainMs ?? 10_000;
  const deadAfterMs = opts.deadAfterMs ?? 45_000;
  const lockGraceMs = opts.lockGraceMs ?? 12_000;
  // Our own pool, so shutdown can close every connection before PostgreSQL stops
  // and a connection dropped by the server is logged instead of crashing the process.
  // json and jsonb read with every digit of their numbers (exact-json.ts): values
  // published to a source are written exactly as the workbook holds them.
  // A wait for a free connection is bounded: graphile-worker treats the error like any
  // failed poll and tries again, where an endless wait would stop the worker for good.
  const pgPool = createPool({ name: "worker", connectionString: opts.ownerUrl, max: opts.concurrency + 3, types: exactJsonTypes, connectionTimeoutMillis: 30_000 });

  const liveness = new Liveness({ connectionString: opts.ownerUrl, heartbeatMs: opts.heartbeatMs ?? 5_000 });
  await liveness.start();
  // graphile-worker locks jobs with its pool's id: the sweepers must know it is ours.
  const events: WorkerEvents = new EventEmitter() as WorkerEvents;
  events.on("pool:create", ({ workerPool }) => liveness.addPool(workerPool.id));

  let runner: Runner;
  try {
    runner = await run({
      pgPool,
      concurrency: opts.concurrency,
      taskList,
      events,
      parsedCronItems: parseCrontab(Object.keys(taskList).includes("retention") ? crontab : ""),
      noHandleSignals: true,
      logger: workerLogger,
      pollInterval: 2000,
      // Tasks see helpers.abortSignal abort this long after shutdown starts.
      gracefulShutdownAbortTimeout: drainMs,
    });
  } catch (error) {
    await liveness.stop();
    await pgPool.end().catch(() => {});
    throw error;
  }

  // Looking for dead workers: every live worker does, at a jittered interval; one at a time in SQL.
  const sweepMs = opts.sweepIntervalMs ?? 10_000;
  let sweepTimer: NodeJS.Timeout | undefined;
  let stopped = false;
  const sweep = async () => {
    try {
      const { rows } = await pgPool.query<{ n: number }>(
        "select snapbase_private.recover_dead_workers(make_interval(secs => $1), make_interval(secs => $2)) as n", [deadAfterMs / 1000, lockGraceMs / 1000]);
      if (rows[0]!.n > 0) log.warn("recovered the jobs of dead workers", { jobs: rows[0]!.n });
    } catch (error) {
      log.warn("could not look for dead workers", { error: (error as Error).message });
    } finally {
      if (!stopped) sweepTimer = setTimeout(() => void sweep(), sweepMs * (0.8 + Math.random() * 0.4));
    }
  };
  void sweep();

  log.info("worker started", { tasks: Object.keys(taskList), concurrency: opts.concurrency });
  let stopping: Promise<void> | undefined;
  const stop = async (stopOpts: { drainMs?: number } = {}) => {
    stopped = true;
    clearTimeout(sweepTimer);
    const wait = stopOpts.drainMs ?? drainMs;
    let timer: NodeJS.Timeout | undefined;
    const drained = await Promise.race([
      runner.stop().then(() => true, (error: unknown) => {
        log.warn("worker stopped with an error", { error: (error as Error).message });
        return true;
      }),
      // graphile-worker aborts its tasks after the drain time; give them a moment to stop.
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), wait + 5_000))),
    ]);
    clearTimeout(timer);
    if (!drained) log.warn("shutdown: jobs still running after the drain time are handed back to the queue");
    // Jobs still running here go back to the queue now, for another worker to resume.
    await liveness.stop({ release: true });
    await pgPool.endWithin(5_000);
  };
  return { runner, stop: (stopOpts) => (stopping ??= stop(stopOpts)) };
}
