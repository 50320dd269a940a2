// graphile-worker: every file in tasks/ is a task whose id is its file name.
import { Logger, parseCrontab, run, type Runner, type TaskList, type Task } from "graphile-worker";
import { readdirSync } from "node:fs";
import path from "node:path";
import pg from "pg";
import { ensureCredentialKeys } from "./connectors/credential-keys.ts";
import { projectRoot } from "./db/migrate.ts";
import { setJobContext } from "./jobs/context.ts";
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

const workerLogger = new Logger(graphileLogFactory("graphile-worker"));

/** Recurring jobs (graphile-worker crontab syntax). */
export const crontab = ["0 * * * * retention ?max=3"].join("\n");

export interface Worker {
  runner: Runner;
  /** Drains running jobs, then closes the worker's connections. */
  stop(): Promise<void>;
}

export async function startWorker(opts: { ownerUrl: string; concurrency: number; credentialsKey: string }): Promise<Worker> {
  // Only the worker holds the key that opens connector credentials.
  const owner = new pg.Client({ connectionString: opts.ownerUrl });
  await owner.connect();
  try {
    setJobContext({ credentialsSecretKey: await ensureCredentialKeys(owner, opts.credentialsKey), ownerUrl: opts.ownerUrl });
  } finally {
    await owner.end();
  }
  const taskList = await loadTaskList();
  // Our own pool, so shutdown can close every connection before PostgreSQL stops
  // and a connection dropped by the server is logged instead of crashing the process.
  const pgPool = new pg.Pool({ connectionString: opts.ownerUrl, max: opts.concurrency + 2 });
  pgPool.on("error", (e) => log.warn("worker connection failed", { error: e.message }));
  pgPool.on("connect", (client) => client.on("error", (e) => log.warn("worker connection failed", { error: e.message })));
  const runner = await run({
    pgPool,
    concurrency: opts.concurrency,
    taskList,
    parsedCronItems: parseCrontab(Object.keys(taskList).includes("retention") ? crontab : ""),
    noHandleSignals: true,
    pollInterval: 2000,
    // JSON lines through src/log.ts, like everything else (graphile-worker prints plain text by default).
    logger: workerLogger,
  });
  log.info("worker started", { tasks: Object.keys(taskList), concurrency: opts.concurrency });
  return {
    runner,
    stop: async () => {
      await runner.stop();
      await pgPool.end();
    },
  };
}
