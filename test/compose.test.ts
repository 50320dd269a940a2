// docker-compose.yml cannot rot unseen: its server and worker services start, with
// the environment the file gives them, against the local PostgreSQL (standing in
// for its `db` service; there is no Docker engine here), and the worker runs jobs.
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import path from "node:path";
import yaml from "js-yaml";
import pg from "pg";
import { afterAll, describe, expect, it } from "vitest";
import { roleNames } from "../src/config.ts";
import { projectRoot, runMigrations } from "../src/db/migrate.ts";
import { db, graphql, http } from "./helpers.ts";

interface Service {
  environment?: Record<string, string | number | boolean>;
  command?: string[];
  depends_on?: Record<string, unknown>;
}
const compose = yaml.load(readFileSync(path.join(projectRoot, "docker-compose.yml"), "utf8")) as { services: Record<string, Service> };

const RUN = randomBytes(4).toString("hex");
const PREFIX = `sbc_${RUN}`;
const DATABASE = `sbc_${RUN}`;
const local = new URL(db.rootUrl);
const children: ChildProcess[] = [];

/**
 * The service's environment on this machine: the `db` host is the local server, and
 * cluster-wide names (roles, database) are unique to this run, so concurrent runs
 * never share them. Everything else is the file's.
 */
function environmentOf(service: Service): Record<string, string> {
  const env = Object.fromEntries(Object.entries(service.environment ?? {}).map(([k, v]) => [k, String(v)]));
  for (const key of ["ROOT_DATABASE_URL", "DATABASE_URL", "DATABASE_AUTHENTICATOR_URL"]) {
    if (env[key] === undefined) continue;
    const u = new URL(env[key]);
    expect(u.hostname, `${key} points at the db service`).toBe("db");
    u.hostname = local.hostname;
    u.port = local.port || "5432";
    if (key === "DATABASE_URL") {
      u.username = `${PREFIX}_owner`;
      u.pathname = `/${DATABASE}`;
    }
    if (key === "ROOT_DATABASE_URL") u.username = local.username || "postgres";
    env[key] = u.toString();
  }
  return { ...env, SNAPBASE_ROLE_PREFIX: PREFIX, HOST: "127.0.0.1", PORT: "0", LOG_LEVEL: "warn" };
}

/** Runs `npm start` / `npm run worker`'s command with that environment (and nothing else of ours). */
function run(command: "start" | "worker", env: Record<string, string>): { child: ChildProcess; output: () => string; ready: Promise<string> } {
  const child = spawn(process.execPath, ["src/cli.ts", command], {
    cwd: projectRoot,
    env: { PATH: process.env.PATH ?? "", HOME: process.env.HOME ?? "/tmp", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.push(child);
  let out = "";
  const ready = new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${command}: not ready within 90 s:\n${out}`)), 90_000);
    const check = () => {
      if (!out.includes("Press Ctrl-C")) return;
      clearTimeout(timer);
      resolve(/GraphQL\s+(http:\/\/\S+)\/graphql/.exec(out)?.[1] ?? "");
    };
    child.stdout!.on("data", (d) => { out += d; check(); });
    child.stderr!.on("data", (d) => (out += d));
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`${command} exited with ${code} before start-up:\n${out}`));
    });
  });
  return { child, output: () => out, ready };
}

const stop = (child: ChildProcess) =>
  new Promise<number | null>((resolve) => {
    if (child.exitCode !== null) return resolve(child.exitCode);
    child.once("exit", (code) => resolve(code));
    child.kill("SIGINT");
  });

afterAll(async () => {
  await Promise.all(children.map(stop));
  const root = new pg.Client({ connectionString: db.rootUrl });
  await root.connect();
  try {
    await root.query(`drop database if exists ${DATABASE} with (force)`);
    for (const role of Object.values(roleNames(PREFIX))) {
      await root.query(`drop role if exists ${role}`);
    }
  } finally {
    await root.end();
  }
});

describe("docker-compose.yml", () => {
  it("gives the server and the worker everything production requires; both start and the worker runs jobs", async () => {
    const { server, worker } = compose.services;
    expect(server && worker && compose.services.db).toBeTruthy();
    expect(worker!.command).toEqual(["npm", "run", "worker"]);
    const serverEnv = environmentOf(server!);
    const workerEnv = environmentOf(worker!);
    expect(serverEnv.NODE_ENV).toBe("production");
    for (const required of ["DATABASE_URL", "JWT_SECRET", "SNAPBASE_CREDENTIALS_KEY"]) {
      expect(serverEnv[required], `${required} (production requires it)`).toBeTruthy();
      expect(workerEnv[required], `${required} (production requires it)`).toBe(serverEnv[required]);
    }

    // The first service up creates the roles and database through ROOT_DATABASE_URL and
    // applies the committed migrations (the worker here: it builds no GraphQL schema).
    const jobs = run("worker", workerEnv);
    await jobs.ready;
    // While migrations/current/ holds work the next release commits, apply it as that
    // release would (the server's GraphQL schema needs it); once committed, a no-op.
    await runMigrations({ ownerUrl: serverEnv.DATABASE_URL!, roles: roleNames(PREFIX, `${PREFIX}_owner`), rootUrl: serverEnv.ROOT_DATABASE_URL }, { includeCurrent: true });

    const app = run("start", serverEnv);
    const url = await app.ready;
    expect(app.output()).not.toMatch(/worker in this process/); // SNAPBASE_WORKER=false: the worker service runs jobs
    expect(app.output()).toContain("Demo users created"); // SNAPBASE_DEMO=true
    expect(app.output()).not.toContain("set DEMO_PASSWORD"); // the file sets it
    expect(await (await fetch(url + "/readyz")).json()).toEqual({ status: "ready" });
    // The file's comment sends people to /graphiql.
    expect((await fetch(url + "/graphiql", { headers: { accept: "text/html" } })).status).toBe(200);

    // The demo admin (DEMO_PASSWORD) asks for a job; only the worker service can run it.
    const login = await http(url, "POST", "/api/v1/auth/login", { body: { email: "admin@example.com", password: serverEnv.DEMO_PASSWORD } });
    expect(login.status, JSON.stringify(login.body)).toBe(200);
    const token = login.body.token;
    const account = (await graphql(url, `mutation { createConnectorAccount(input: { kind: "managed", name: "This database", credentials: {} }) { result { rowId } } }`, {}, token)).body;
    expect(account.errors, app.output()).toBeUndefined();
    const job = (await graphql(url, `mutation($a: BigInt!) { testConnectorAccount(input: { accountId: $a }) { result { rowId } } }`,
      { a: account.data.createConnectorAccount.result.rowId }, token)).body.data.testConnectorAccount.result.rowId;
    const ownerDb = new pg.Client({ connectionString: serverEnv.DATABASE_URL });
    await ownerDb.connect();
    try {
      const until = Date.now() + 30_000;
      let state = "queued";
      while (["queued", "running"].includes(state) && Date.now() < until) {
        state = (await ownerDb.query("select state from snapbase.jobs where id = $1", [job])).rows[0].state;
        if (["queued", "running"].includes(state)) await new Promise((r) => setTimeout(r, 100));
      }
      expect(state).toBe("succeeded");
    } finally {
      await ownerDb.end();
    }

    expect(await stop(jobs.child)).toBe(0);
    expect(await stop(app.child)).toBe(0);
  });
});
