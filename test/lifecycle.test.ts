// Start-up and shutdown in both database modes, migrations, and the committed SDL.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer as createNetServer, type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import pg from "pg";
import { describe, expect, it } from "vitest";
import { bootstrapCluster } from "../src/db/bootstrap.ts";
import { projectRoot, runMigrations } from "../src/db/migrate.ts";
import { exportSchema } from "../src/server/schema-export.ts";
import { databaseName, withUrlParts } from "../src/db/urls.ts";
import { db, owner, TEST_CREDENTIALS_KEY } from "./helpers.ts";

/** A TCP port nothing listens on now, so parallel runs do not collide. */
async function freePort(): Promise<number> {
  const server = createNetServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

interface Started {
  child: ChildProcess;
  url: string;
  output: () => string;
  stop: () => Promise<number | null>;
}

/** Runs `npm start`'s command as a real process and waits until it says it is ready. */
async function startCli(env: Record<string, string>): Promise<Started> {
  const child = spawn(process.execPath, ["src/cli.ts", "start"], {
    cwd: projectRoot,
    env: { PATH: process.env.PATH ?? "", HOME: process.env.HOME ?? "/tmp", PORT: "0", LOG_LEVEL: "warn", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  child.stdout!.on("data", (d) => (out += d));
  child.stderr!.on("data", (d) => (out += d));
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no start-up within 90 s:\n${out}`)), 90_000);
    child.stdout!.on("data", () => {
      const m = /GraphQL\s+(http:\/\/\S+)\/graphql/.exec(out);
      if (m && out.includes("Press Ctrl-C")) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`exited with ${code} before start-up:\n${out}`));
    });
  });
  return {
    child,
    url,
    output: () => out,
    stop: () =>
      new Promise((resolve) => {
        child.once("exit", (code) => {
          if (code !== 0) process.stderr.write(`exit ${code} after:\n${out}\n`);
          resolve(code);
        });
        child.kill("SIGINT");
      }),
  };
}

describe("npm start with DATABASE_URL", () => {
  it("serves /healthz, /readyz and GraphQL, then shuts down cleanly on Ctrl-C", async () => {
    const app = await startCli({
      DATABASE_URL: db.ownerUrl,
      DATABASE_AUTHENTICATOR_URL: db.authenticatorUrl,
      SNAPBASE_ROLE_PREFIX: db.roles.anonymous.replace(/_anonymous$/, ""),
      JWT_SECRET: db.jwtSecret,
      SNAPBASE_CREDENTIALS_KEY: TEST_CREDENTIALS_KEY, // the key the test database's credentials key pair is sealed with
      JWT_TTL: "1 hour", // as global-setup set it: this start writes its settings to the shared test database
      SNAPBASE_DEMO: "false",
    });
    expect(await (await fetch(app.url + "/healthz")).json()).toEqual({ status: "ok" });
    expect(await (await fetch(app.url + "/readyz")).json()).toEqual({ status: "ready" });
    const gql = await fetch(app.url + "/graphql", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ query: "{ currentAppRole }" }),
    });
    expect(await gql.json()).toEqual({ data: { currentAppRole: "anonymous" } });
    expect(app.output()).not.toContain("embedded");
    expect(await app.stop()).toBe(0);
  });

  it("refuses to start with invalid configuration, listing every problem", async () => {
    const child = spawn(process.execPath, ["src/cli.ts", "start"], {
      cwd: projectRoot,
      env: { PATH: process.env.PATH ?? "", NODE_ENV: "production", PORT: "http", DATABASE_URL: "mysql://nope" },
    });
    let err = "";
    child.stderr.on("data", (d) => (err += d));
    const code = await new Promise((resolve) => child.once("exit", resolve));
    expect(code).toBe(1);
    expect(err).toContain("PORT must be a whole number");
    expect(err).toContain("DATABASE_URL is not a postgres:// URL");
    expect(err).toContain("JWT_SECRET is required in production");
    expect(err).not.toMatch(/\n\s+at /);
  });

  it("refuses a superuser owner in production, saying how to create one", async () => {
    const child = spawn(process.execPath, ["src/cli.ts", "start"], {
      cwd: projectRoot,
      env: {
        PATH: process.env.PATH ?? "", NODE_ENV: "production", PORT: "0",
        DATABASE_URL: withUrlParts(db.rootUrl, { database: databaseName(db.ownerUrl) }),
        JWT_SECRET: db.jwtSecret, SNAPBASE_CREDENTIALS_KEY: TEST_CREDENTIALS_KEY,
      },
    });
    let err = "";
    child.stderr.on("data", (d) => (err += d));
    const code = await new Promise((resolve) => child.once("exit", resolve));
    expect(code).toBe(1);
    expect(err).toMatch(/a superuser\. Snapbase's owner must not be one/);
    expect(err).toContain("ROOT_DATABASE_URL");
    expect(err).toContain("CREATE ROLE snapbase_owner");
    expect(err).not.toMatch(/\n\s+at /);
  });
});

describe("npm start with no DATABASE_URL", () => {
  it("launches an embedded PostgreSQL, keeps its data for the next start, and stops it on Ctrl-C", async () => {
    const dataDir = mkdtempSync(path.join(tmpdir(), "snapbase-embedded-"));
    const port = await freePort();
    const env = { SNAPBASE_DATA_DIR: dataDir, EMBEDDED_PG_PORT: String(port), DEMO_PASSWORD: "demo-password-1" };
    try {
      const first = await startCli(env);
      expect(first.output()).toContain("Demo users created");
      const login = await fetch(first.url + "/api/v1/auth/login", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ email: "admin@example.com", password: "demo-password-1" }),
      });
      expect(login.status).toBe(200);
      expect(await first.stop()).toBe(0);
      // The embedded server is gone once the process has exited.
      await expect(new pg.Client({ connectionString: `postgres://x@127.0.0.1:${port}/postgres` }).connect()).rejects.toThrow();

      const second = await startCli(env);
      expect(second.output()).not.toContain("Demo users created");
      expect(await (await fetch(second.url + "/readyz")).json()).toEqual({ status: "ready" });
      expect(await second.stop()).toBe(0);
    } finally {
      rmSync(dataDir, { recursive: true, force: true });
    }
  });
});

describe("migrations", () => {
  it("re-running them applies nothing new", async () => {
    const before = await owner().query("select count(*)::int as n from graphile_migrate.migrations");
    await runMigrations({ ownerUrl: db.ownerUrl, roles: db.roles }, { includeCurrent: false });
    const after = await owner().query("select count(*)::int as n from graphile_migrate.migrations");
    expect(after.rows[0].n).toBe(before.rows[0].n);
  });

  it("apply to an empty database as the (non-superuser) owner", async () => {
    const name = `${databaseName(db.ownerUrl)}_empty`;
    const root = new pg.Client({ connectionString: db.rootUrl });
    await root.connect();
    try {
      await root.query(`drop database if exists ${name} with (force)`);
      await bootstrapCluster({ rootUrl: db.rootUrl, database: name, roles: db.roles });
      const ownerUrl = withUrlParts(db.ownerUrl, { database: name });
      await runMigrations({ ownerUrl, roles: db.roles }, { includeCurrent: true });
      const c = new pg.Client({ connectionString: ownerUrl });
      await c.connect();
      const { rows } = await c.query("select rolsuper from pg_roles where rolname = current_user");
      const fns = await c.query("select count(*)::int as n from pg_proc where proname in ('authenticate', 'create_user') and pronamespace = 'snapbase'::regnamespace");
      await c.end();
      expect(rows[0].rolsuper).toBe(false);
      expect(fns.rows[0].n).toBe(2);
    } finally {
      await root.query(`drop database if exists ${name} with (force)`);
      await root.end();
    }
  });
});

describe("GraphQL schema", () => {
  it("matches the committed schema.graphql (run `npm run schema:export` after API changes)", async () => {
    const live = await exportSchema({ authenticatorUrl: db.authenticatorUrl, jwtSecret: db.jwtSecret, roles: db.roles });
    expect(live).toBe(readFileSync(path.join(projectRoot, "schema.graphql"), "utf8"));
  });
});
