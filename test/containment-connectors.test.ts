// Containment of connector targets (hosts a connector may reach), and where secrets live.
// Each attack must be refused with a clear error and leave no trace (see containment.ts).
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startWorker, type Worker } from "../src/worker.ts";
import { containmentSuite, tokens, gql, refused } from "./containment.ts";
import { db, owner, settled, TEST_CREDENTIALS_KEY } from "./helpers.ts";

containmentSuite();

describe("connector targets", () => {
  const production = async (on: boolean) => owner().query(
    "insert into snapbase_private.settings (key, value) values ('environment', $1) on conflict (key) do update set value = excluded.value",
    [on ? "production" : "test"]);
  const pg = (host: string, extra = "") => ({ connection_string: `postgres://reader:secret-pw@${host}:5432/shop${extra}` });
  const attacks: [string, string, Record<string, unknown>, RegExp][] = [
    ["localhost", "postgres", pg("localhost"), /may not reach localhost/],
    ["127.0.0.1", "postgres", pg("127.0.0.1"), /may not reach 127\.0\.0\.1/],
    ["127.1.2.3", "postgres", pg("127.1.2.3"), /may not reach/],
    ["[::1]", "postgres", pg("[::1]"), /may not reach/],
    ["[::ffff:127.0.0.1]", "postgres", pg("[::ffff:127.0.0.1]"), /may not reach/],
    ["0.0.0.0", "postgres", pg("0.0.0.0"), /may not reach/],
    ["10.0.0.5", "postgres", pg("10.0.0.5"), /may not reach/],
    ["172.16.3.4", "postgres", pg("172.16.3.4"), /may not reach/],
    ["192.168.1.1", "postgres", pg("192.168.1.1"), /may not reach/],
    ["the metadata service", "postgres", pg("169.254.169.254"), /may not reach/],
    ["[fe80::1]", "postgres", pg("[fe80::1]"), /may not reach/],
    ["[fd00::1]", "postgres", pg("[fd00::1]"), /may not reach/],
    ["100.64.0.1", "postgres", pg("100.64.0.1"), /may not reach/],
    ["a one-label name", "postgres", pg("db"), /may not reach db/],
    ["x.localhost", "postgres", pg("x.localhost"), /may not reach/],
    ["a .internal name", "postgres", pg("db.internal"), /may not reach/],
    ["a decimal address", "postgres", pg("2130706433"), /may not reach/],
    ["a host parameter", "postgres", pg("db.example.com", "?host=127.0.0.1"), /may carry only sslmode, connect_timeout and application_name/],
    ["a Unix socket", "postgres", pg("db.example.com", "?host=/var/run/postgresql"), /may carry only sslmode/],
    ["an escaped host parameter", "postgres", pg("db.example.com", "?%68ost=127.0.0.1"), /may carry only sslmode/],
    ["a host parameter in the fragment", "postgres", pg("127.0.0.1", "?sslmode=prefer#&host=db.example.com"), /no fragment/],
    ["session options", "postgres", pg("db.example.com", "?options=-c%20statement_timeout%3D1"), /may carry only sslmode/],
    ["a client key file", "postgres", pg("db.example.com", "?sslkey=/etc/ssl/private/key.pem"), /may carry only sslmode/],
    ["a password parameter", "postgres", pg("db.example.com", "?password=x"), /may carry only sslmode/],
    ["no host", "postgres", { connection_string: "postgres:///shop" }, /must name its host/],
    ["NAT64", "postgres", pg("[64:ff9b::7f00:1]"), /may not reach/],
    ["6to4", "postgres", pg("[2002:7f00:1::1]"), /may not reach/],
    ["a benchmarking network", "postgres", pg("198.18.0.1"), /may not reach/],
    ["0.0.0.0/8", "postgres", pg("0.1.2.3"), /may not reach/],
    ["two hosts", "postgres", { connection_string: "postgres://u:p@db1.example.com,127.0.0.1/shop" }, /one host only/],
    ["a password holding @", "postgres", { connection_string: "postgres://u:p@ss@127.0.0.1/shop" }, /may not reach 127\.0\.0\.1/],
    ["this database", "postgres", { connection_string: db.ownerUrl }, /may not reach/],
    ["mysql on localhost", "mysql", { host: "localhost", user: "root", database: "test" }, /may not reach localhost/],
    ["mysql on 127.0.0.1", "mysql", { host: "127.0.0.1", user: "root", database: "test" }, /may not reach/],
    ["mysql on ::1", "mysql", { host: "::1", user: "root", database: "test" }, /may not reach/],
    ["mysql on a private network", "mysql", { host: "10.1.1.1", user: "root", database: "test" }, /may not reach/],
    ["mysql on the metadata service", "mysql", { host: "169.254.169.254", user: "root", database: "test" }, /may not reach/],
    ["mysql with no host", "mysql", { user: "root", database: "test" }, /need host/],
    ["an unknown kind", "file", { path: "/etc/passwd" }, /kind must be/],
  ];
  for (const [what, kind, credentials, expected] of attacks) {
    it(`refuses ${what} in production`, async () => {
      await production(true);
      try {
        await refused(() => gql(tokens.viewer!, `mutation($k: String!, $c: JSON!) { createConnectorAccount(input: { kind: $k, name: "x", credentials: $c }) { result { rowId summary } } }`,
          { k: kind, c: credentials }) as any, expected);
      } finally {
        await production(false);
      }
    });
  }

  it("never shows a password in an account's summary", async () => {
    const created = await gql(tokens.viewer!, `mutation($c: JSON!) { createConnectorAccount(input: { kind: "postgres", name: "x", credentials: $c }) { result { summary } } }`,
      { c: { connection_string: "postgres://reader:p@ss:w0rd-canary@db.example.com:5433/shop?sslmode=require" } });
    expect((created as any).data.createConnectorAccount.result.summary).toBe("postgres://reader@db.example.com:5433/shop");
  });

  describe("at connect time", () => {
    let worker: Worker;
    beforeAll(async () => {
      worker = await startWorker({ ownerUrl: db.ownerUrl, concurrency: 1, credentialsKey: TEST_CREDENTIALS_KEY });
    });
    afterAll(async () => {
      await worker?.stop();
    });
    const testAccount = async (credentials: Record<string, unknown>) => {
      const created = await gql(tokens.viewer!, `mutation($c: JSON!) { createConnectorAccount(input: { kind: "postgres", name: "x", credentials: $c }) { result { rowId } } }`, { c: credentials });
      const id = (created as any).data.createConnectorAccount.result.rowId;
      const job = await gql(tokens.viewer!, `mutation($a: BigInt!) { testConnectorAccount(input: { accountId: $a }) { result { rowId } } }`, { a: id });
      return settled((job as any).data.testConnectorAccount.result.rowId);
    };

    it("refuses this installation's own database, however it is named", async () => {
      const u = new URL(db.ownerUrl);
      for (const host of ["127.0.0.1", "localhost"]) {
        u.hostname = host;
        const job = await testAccount({ connection_string: u.toString() });
        expect(job.state).toBe("failed");
        expect(job.error).toMatch(/Snapbase's own database/);
      }
    });

    it("checks the address a name resolves to, not only the name", async () => {
      // 0x7f.1 is not an address PostgreSQL's inet reads, so it passes as a name; it resolves to 127.0.0.1.
      const created = await gql(tokens.viewer!, `mutation($c: JSON!) { createConnectorAccount(input: { kind: "postgres", name: "x", credentials: $c }) { result { rowId } } }`,
        { c: { connection_string: "postgres://reader:secret@0x7f.1:5432/shop" } });
      const id = (created as any).data.createConnectorAccount.result.rowId;
      await production(true);
      try {
        const job = await gql(tokens.viewer!, `mutation($a: BigInt!) { testConnectorAccount(input: { accountId: $a }) { result { rowId } } }`, { a: id });
        const done = await settled((job as any).data.testConnectorAccount.result.rowId);
        expect(done.state).toBe("failed");
        expect(done.error).toMatch(/may not reach 0x7f\.1 \(127\.0\.0\.1\)/);
      } finally {
        await production(false);
      }
    });
  });
});

describe("secrets", () => {
  it("no request role can read the credentials key pair's secret half or any connector secret", async () => {
    for (const role of ["anonymous", "viewer", "editor", "admin", "agent"] as const) {
      const { rows } = await owner().query(
        `select has_table_privilege($1, 'snapbase_private.settings', 'SELECT') as settings,
                has_table_privilege($1, 'snapbase_private.connector_credentials', 'SELECT') as credentials,
                has_function_privilege($1, 'snapbase_private.account_credentials(bigint, bytea)', 'EXECUTE') as opener`,
        [db.roles[role]]);
      expect(rows[0]).toEqual({ settings: false, credentials: false, opener: false });
    }
  });
});
