// Red-team findings on connector targets, kept as regression tests: each failed while
// the weakness it names existed. Each is refused twice over: when the account is
// created, and (for credentials stored some other way) by the worker before it connects.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { startWorker, type Worker } from "../src/worker.ts";
import { createUser, db, graphql, http, owner, settled, startTestServer, TEST_CREDENTIALS_KEY, TEST_PASSWORD } from "./helpers.ts";

let server: RunningServer;
let worker: Worker;
let token: string;
let viewerId: string;

/** An account stored directly (as an older release or a DBA might have), bypassing creation's checks. */
async function storedAccount(credentials: Record<string, unknown>): Promise<string> {
  const { rows } = await owner().query(
    `with a as (insert into snapbase.connector_accounts (owner_id, name, kind, summary) values ($1, 'stored', 'postgres', 'stored') returning id)
     insert into snapbase_private.connector_credentials (account_id, secret, scheme)
     select a.id, snapbase_private.seal_credentials($2), 'public_key' from a returning account_id`, [viewerId, credentials]);
  return String(rows[0].account_id);
}

async function testAccount(id: string) {
  const job = (await graphql(server.url, `mutation($a: BigInt!) { testConnectorAccount(input: { accountId: $a }) { result { rowId } } }`, { a: id }, token)).body as any;
  return settled(job.data.testConnectorAccount.result.rowId);
}

const production = (on: boolean) => owner().query(
  "insert into snapbase_private.settings (key, value) values ('environment', $1) on conflict (key) do update set value = excluded.value",
  [on ? "production" : "test"]);

beforeAll(async () => {
  server = await startTestServer();
  worker = await startWorker({ ownerUrl: db.ownerUrl, concurrency: 1, credentialsKey: TEST_CREDENTIALS_KEY });
  const viewer = await createUser("viewer", "rt-conn");
  viewerId = viewer.id;
  token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: viewer.email, password: TEST_PASSWORD } })).body.token;
});

afterAll(async () => {
  await production(false);
  await worker?.stop();
  await server?.close();
});

describe("connectors reach allowed hosts only", () => {
  it("an empty host parameter does not switch off the connect-time address check", async () => {
    // The SQL check reads the first literal `host=` in the text, which here sits in the
    // fragment (db.example.com: public, allowed). The worker reads URLSearchParams: the query's
    // `%68ost=` decodes to host = "", so it resolves "" (dns.lookup returns no address), checks
    // nothing and pins nothing; pg then ignores the empty host parameter and connects to the
    // URL's own host: a loopback address, in production, where only public addresses are allowed.
    // (`...@attacker-name.example/db?host` does the same with any name that resolves inward.)
    const local = new URL(db.rootUrl); // a PostgreSQL server on a loopback address (not Snapbase's own database)
    local.pathname = "/postgres";
    const connection_string = `${local.toString()}?%68ost=#&host=db.example.com`;
    await production(true);
    const created = (await graphql(server.url,
      `mutation($c: JSON!) { createConnectorAccount(input: { kind: "postgres", name: "x", credentials: $c }) { result { rowId summary } } }`,
      { c: { connection_string } }, token)).body as any;
    expect(created.errors?.[0]?.message).toMatch(/may carry only sslmode|no fragment/);
    // Stored anyway, the worker reads the string as pg does and refuses it before connecting.
    const done = await testAccount(await storedAccount({ connection_string }));
    expect({ state: done.state, error: done.error }).toMatchObject({ state: "failed", error: expect.stringMatching(/may not reach|network hosts only/) });
    await production(false);
  });

  it("the own-database check does not fail open when its query fails", async () => {
    // refuseOwnDatabase swallows every error that is not its own, so anything that makes the
    // marker query fail on a connection that otherwise works lets the connector in. A 1 ms
    // statement_timeout (a libpq `options` parameter the user controls) fails the catalog join
    // on a fresh connection most of the time, while the connector's `select 1` passes.
    // (Any host rule that admits this database's address will do: `*` here, the default outside production.)
    await production(false);
    const u = new URL(db.ownerUrl);
    u.searchParams.set("options", "-c statement_timeout=1");
    const created = (await graphql(server.url,
      `mutation($c: JSON!) { createConnectorAccount(input: { kind: "postgres", name: "x", credentials: $c }) { result { rowId } } }`,
      { c: { connection_string: u.toString() } }, token)).body as any;
    expect(created.errors?.[0]?.message).toMatch(/may carry only sslmode/);
    const outcomes: { state: string; error: string | null }[] = [];
    for (let attempt = 0; attempt < 3; attempt++) {
      const done = await testAccount(await storedAccount({ connection_string: u.toString() }));
      outcomes.push({ state: done.state, error: done.error });
    }
    expect(outcomes.filter((o) => o.state === "succeeded"), `connected to Snapbase's own database: ${JSON.stringify(outcomes)}`).toEqual([]);
  });
});
