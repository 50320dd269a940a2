// The PostgreSQL and MySQL connectors against real servers: a source database of
// our own on the test PostgreSQL server, and our own tables in the test MySQL
// database. What the connectors read and write is checked with each source's own client.
import { randomBytes } from "node:crypto";
import mysql from "mysql2/promise";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, inject, test } from "vitest";
import { mysqlConnector, type MysqlCredentials } from "../src/connectors/mysql.ts";
import { postgresConnector } from "../src/connectors/postgres.ts";
import { ConnectorError, type Connector, type RemoteRecord } from "../src/connectors/types.ts";
import { ExactNumber } from "../src/exact-json.ts";

/**
 * A row of shop.items as the postgres connector gives it: to_jsonb's values, but a
 * numeric whose text a double would change (6.50, 3.00) as that text.
 */
const withExactNumerics = (r: { values: Record<string, unknown>; price: string | null; price_with_tax: string | null }) => {
  const exactly = (text: string | null) => (text === null || String(Number(text)) === text ? (text === null ? null : Number(text)) : text);
  return { ...r.values, price: exactly(r.price), price_with_tax: exactly(r.price_with_tax) };
};

/** The ConnectorError `work` rejects with (fails the test if it resolves or throws something else). */
async function connectorError(work: Promise<unknown>): Promise<ConnectorError> {
  const error = await work.then(() => undefined, (e: unknown) => e);
  expect(error).toBeInstanceOf(ConnectorError);
  return error as ConnectorError;
}

/** A connector pointed at a closed port: a transient error that names the refusal and not the password. */
async function expectUnreachable(connector: Connector, password: string): Promise<void> {
  try {
    const error = await connectorError(connector.test());
    expect(error.transient).toBe(true);
    expect(error.message).toMatch(/ECONNREFUSED/);
    expect(error.message).not.toContain(password);
  } finally {
    await connector.close();
  }
}

async function allBatches(connector: Connector, table: string, batchSize: number): Promise<RemoteRecord[][]> {
  const batches: RemoteRecord[][] = [];
  for await (const batch of connector.download(table, { batchSize })) batches.push(batch);
  return batches;
}

/** Stopping a download early (abort, break) must free its connection: the pool holds only 2. */
async function expectDownloadStops(connector: Connector, table: string): Promise<void> {
  for (let i = 0; i < 3; i++) {
    const controller = new AbortController();
    const reason = new Error("the job was cancelled");
    const seen: number[] = [];
    const run = (async () => {
      for await (const batch of connector.download(table, { batchSize: 100, signal: controller.signal })) {
        seen.push(batch.length);
        controller.abort(reason);
      }
    })();
    // The caller's abort reason comes back as it is, not as a ConnectorError.
    await expect(run).rejects.toBe(reason);
    expect(seen).toEqual([100]);
    for await (const batch of connector.download(table, { batchSize: 10 })) {
      expect(batch).toHaveLength(10);
      break;
    }
  }
  expect(await connector.count(table)).toBeGreaterThan(0);
}

const unique = randomBytes(4).toString("hex");

describe("postgres connector", () => {
  const rootUrl = inject("db").rootUrl;
  const loginRole = `snapbase_conn_${unique}`;
  // Cluster-wide names are unique per run, so suites of several checkouts can share a server.
  const sourceDb = `snapbase_source_${unique}`;
  const sourceUrl = Object.assign(new URL(rootUrl), { pathname: `/${sourceDb}` }).toString();
  let admin: pg.Client;
  let source: Connector;

  beforeAll(async () => {
    const root = new pg.Client({ connectionString: rootUrl });
    await root.connect();
    await root.query(`drop database if exists ${sourceDb} with (force)`);
    await root.query(`create database ${sourceDb}`);
    await root.query(`create role ${loginRole} login password 'the-right-password'`);
    await root.end();

    admin = new pg.Client({ connectionString: sourceUrl });
    await admin.connect();
    await admin.query(`
      create schema shop;
      create table shop.items (
        id bigint generated always as identity primary key,
        name text not null,
        price numeric(12,2) check (price >= 0),
        qty integer,
        tags text[],
        meta jsonb,
        active boolean not null default true,
        created_at timestamptz,
        price_with_tax numeric(12,2) generated always as (price * 1.2) stored
      );
      insert into shop.items (name, price, qty, tags, meta, active, created_at)
        select 'item ' || i, i * 1.25, i % 7, array['t' || i % 3, 'x'],
               jsonb_build_object('n', i, 'nested', jsonb_build_object('even', i % 2 = 0)),
               i % 2 = 0, timestamptz '2024-01-01 00:00:00+00' + i * interval '1 hour'
          from generate_series(1, 2500) i;
      create table shop.notes (body text);
      create table shop.pairs (a int, b int, primary key (a, b));
      create type shop.mood as enum ('happy', 'sad');
      create table public.wide (id text primary key, big bigint, exact numeric, mood shop.mood,
                                at timestamp(3) with time zone, doc jsonb);
      insert into public.wide values ('w1', 9007199254740993, 12345678901234567890.123456789, 'sad',
                                      '2024-03-01 12:00:00.123+00', '{"wide": 12345678901234567890, "small": 1.50}');
    `);
    source = postgresConnector({ connectionString: sourceUrl });
  });

  afterAll(async () => {
    await source?.close();
    await admin?.end();
    const root = new pg.Client({ connectionString: rootUrl });
    await root.connect();
    await root.query(`drop database if exists ${sourceDb} with (force)`);
    await root.query(`drop role if exists ${loginRole}`);
    await root.end();
  });

  const urlWith = (changes: { username?: string; password?: string; port?: string; pathname?: string }) =>
    Object.assign(new URL(sourceUrl), changes).toString();

  test("test() succeeds with good credentials", async () => {
    await expect(source.test()).resolves.toBeUndefined();
  });

  test("a wrong password is a permanent error that does not show the password", async (ctx) => {
    const connector = postgresConnector({ connectionString: urlWith({ username: loginRole, password: "wrong-pw-3f9a" }) });
    try {
      const outcome = await connector.test().then(() => "connected", (e: unknown) => e);
      // A server that trusts this host never checks passwords (the local test server does).
      if (outcome === "connected") ctx.skip(`the server trusts ${new URL(sourceUrl).host}: passwords are not checked`);
      expect(outcome).toBeInstanceOf(ConnectorError);
      const error = outcome as ConnectorError;
      expect(error.transient).toBe(false);
      expect(error.message).toMatch(/password authentication failed for user "snapbase_conn_/);
      expect(error.message).not.toContain("wrong-pw-3f9a");
    } finally {
      await connector.close();
    }
  });

  test("an unknown user is a permanent error that does not show the password", async () => {
    const connector = postgresConnector({ connectionString: urlWith({ username: "snapbase_no_such_user", password: "secret-pw-77" }) });
    try {
      const error = await connectorError(connector.test());
      expect(error.transient).toBe(false);
      // Trusted hosts report the missing role; others fail the password first.
      expect(error.message).toMatch(/role "snapbase_no_such_user" does not exist|password authentication failed/);
      expect(error.message).not.toContain("secret-pw-77");
    } finally {
      await connector.close();
    }
  });

  test("an unknown database is a permanent error", async () => {
    const connector = postgresConnector({ connectionString: urlWith({ pathname: "/snapbase_no_such_db" }) });
    try {
      const error = await connectorError(connector.test());
      expect(error.transient).toBe(false);
      expect(error.message).toMatch(/database "snapbase_no_such_db" does not exist/);
    } finally {
      await connector.close();
    }
  });

  test("an unreachable server is a transient error", async () => {
    await expectUnreachable(postgresConnector({ connectionString: urlWith({ port: "1", password: "secret-pw-77" }) }), "secret-pw-77");
  });

  test("listTables lists the user tables as schema.table, sorted", async () => {
    const tables = await source.listTables();
    expect(tables).toEqual(["public.wide", "shop.items", "shop.notes", "shop.pairs"]);
  });

  test("tableSpec gives the columns with their types, read-only ones, and the primary key", async () => {
    expect(await source.tableSpec("shop.items")).toEqual({
      name: "shop.items",
      remoteIdColumn: "id",
      columns: [
        { name: "id", type: "bigint", readOnly: true },
        { name: "name", type: "text", readOnly: false },
        { name: "price", type: "numeric(12,2)", readOnly: false },
        { name: "qty", type: "integer", readOnly: false },
        { name: "tags", type: "text[]", readOnly: false },
        { name: "meta", type: "jsonb", readOnly: false },
        { name: "active", type: "boolean", readOnly: false },
        { name: "created_at", type: "timestamp with time zone", readOnly: false },
        { name: "price_with_tax", type: "numeric(12,2)", readOnly: true },
      ],
    });
    // Types only the source has become text; a precision moves to the short name.
    expect((await source.tableSpec("public.wide")).columns.map((c) => c.type))
      .toEqual(["text", "bigint", "numeric", "text", "timestamptz(3)", "jsonb"]);
  });

  test("tableSpec refuses tables without a single-column primary key, and missing tables", async () => {
    const noPk = await connectorError(source.tableSpec("shop.notes"));
    expect(noPk.transient).toBe(false);
    expect(noPk.message).toMatch(/shop\.notes has no primary key/);
    const composite = await connectorError(source.tableSpec("shop.pairs"));
    expect(composite.message).toMatch(/shop\.pairs has a primary key of 2 columns \(a, b\)/);
    const missing = await connectorError(source.tableSpec("shop.nothing"));
    expect(missing.transient).toBe(false);
    expect(missing.message).toMatch(/shop\.nothing does not exist/);
    await expect(source.count("shop.nothing")).rejects.toThrow(/shop\.nothing does not exist/);
  });

  test("count", async () => {
    expect(await source.count("shop.items")).toBe(2500);
  });

  test("download streams every row in primary key order, as to_jsonb renders it", async () => {
    const batches = await allBatches(source, "shop.items", 1000);
    expect(batches.map((b) => b.length)).toEqual([1000, 1000, 500]);
    const { rows } = await admin.query(`select t.id::text as remote_id, to_jsonb(t) as values, price::text, price_with_tax::text
                                          from shop.items t order by t.id`);
    expect(batches.flat()).toEqual(rows.map((r) => ({ remoteId: r.remote_id, values: withExactNumerics(r) })));
    expect(batches[0][4]).toEqual({
      remoteId: "5",
      values: {
        id: 5, name: "item 5", price: 6.25, qty: 5, tags: ["t2", "x"], meta: { n: 5, nested: { even: false } },
        active: false, created_at: "2024-01-01T05:00:00+00:00", price_with_tax: "7.50",
      },
    });
  });

  test("download stops between batches when aborted, and frees its connection", async () => {
    await expectDownloadStops(source, "shop.items");
  });

  test("numbers too wide for a double keep every digit, inside JSON documents too", async () => {
    const [[record]] = await allBatches(source, "public.wide", 10);
    expect(record.values).toEqual({
      id: "w1", big: "9007199254740993", exact: "12345678901234567890.123456789", mood: "sad",
      at: "2024-03-01T12:00:00.123+00:00", doc: { wide: new ExactNumber("12345678901234567890"), small: new ExactNumber("1.50") },
    });
    // A document is written on exactly as it was read.
    expect(JSON.stringify(record.values.doc)).toBe('{"wide":12345678901234567890,"small":1.50}');
    expect((await source.fetch("public.wide", ["w1"])).get("w1")).toEqual(record.values);
  });

  test("fetch returns the current rows of the ids that still exist", async () => {
    const found = await source.fetch("shop.items", ["1", "2500", "999999"]);
    expect([...found.keys()].sort()).toEqual(["1", "2500"]);
    const { rows } = await admin.query("select to_jsonb(t) as values, price::text, price_with_tax::text from shop.items t where id = 2500");
    expect(found.get("2500")).toEqual(withExactNumerics(rows[0]));
    expect(await source.fetch("shop.items", [])).toEqual(new Map());
  });

  test("create, update and delete apply per record; a rejected record does not stop the others", async () => {
    const created = await source.create("shop.items", [
      { name: "new A", price: "10.50", qty: 3, tags: ["a", "b"], meta: { k: [1, 2] }, active: false,
        created_at: "2024-05-01T10:00:00+02:00", price_with_tax: 999 },
      { name: "rejected", price: -1 },
      { name: "new B", price: 2 },
    ]);
    expect(created[0]).toEqual({ ok: true, remoteId: expect.stringMatching(/^\d+$/), values: expect.objectContaining({ name: "new A", price_with_tax: "12.60" }) });
    expect(created[1]).toEqual({ ok: false, error: expect.stringMatching(/violates check constraint "items_price_check"/) });
    expect(created[2]).toEqual({ ok: true, remoteId: expect.stringMatching(/^\d+$/), values: expect.objectContaining({ name: "new B" }) });
    const [a, b] = [created[0], created[2]].map((o) => (o.ok ? o.remoteId : ""));
    const read = async (id: string) =>
      (await admin.query("select to_jsonb(t) as v from shop.items t where id = $1", [id])).rows[0]?.v;
    // Each outcome carries the record as the source stored it (identity, defaults, computed columns).
    const stored = await source.fetch("shop.items", [a, b]);
    expect([created[0], created[2]].map((o) => (o.ok ? o.values : null))).toEqual([stored.get(a), stored.get(b)]);
    expect(await read(a)).toEqual({
      id: Number(a), name: "new A", price: 10.5, qty: 3, tags: ["a", "b"], meta: { k: [1, 2] }, active: false,
      created_at: "2024-05-01T08:00:00+00:00", price_with_tax: 12.6, // read-only: computed by the source, not 999
    });
    expect((await admin.query("select count(*)::int as n from shop.items where name = 'rejected'")).rows[0].n).toBe(0);

    const updated = await source.update("shop.items", [
      { remoteId: a, values: { qty: 4 } },
      { remoteId: b, values: { price: "abc" } },
      { remoteId: "99999999", values: { qty: 1 } },
      { remoteId: b, values: {} },
    ]);
    expect(updated).toEqual([
      { ok: true, remoteId: a, values: { ...stored.get(a), qty: 4 } },
      { ok: false, error: expect.stringMatching(/invalid input syntax for type numeric: "abc"/) },
      { ok: false, error: "record 99999999 no longer exists at the source" },
      { ok: true, remoteId: b, values: stored.get(b) },
    ]);
    expect(await read(a)).toMatchObject({ name: "new A", qty: 4, price: 10.5 });
    expect(await read(b)).toMatchObject({ name: "new B", price: 2 });

    expect(await source.delete("shop.items", [a, "99999999"])).toEqual([
      { ok: true, remoteId: a },
      { ok: false, error: "record 99999999 no longer exists at the source" },
    ]);
    expect(await read(a)).toBeUndefined();
    expect(await read(b)).toMatchObject({ name: "new B" });
    expect(await source.count("shop.items")).toBe(2501);
  });

  test("writes cast JSON values to the source's own types", async () => {
    const created = await source.create("public.wide", [
      { id: "w2", big: "9007199254740995", exact: "0.000000000000000000001", mood: "happy", doc: "just a string" },
      { id: "w3", mood: "angry" },
    ]);
    expect(created).toEqual([
      { ok: true, remoteId: "w2", values: expect.objectContaining({ id: "w2", big: "9007199254740995", mood: "happy", doc: "just a string" }) },
      { ok: false, error: expect.stringMatching(/invalid input value for enum shop.mood: "angry"/) },
    ]);
    const { rows } = await admin.query("select big::text, exact::text, mood::text, doc from public.wide where id = 'w2'");
    expect(rows).toEqual([{ big: "9007199254740995", exact: "0.000000000000000000001", mood: "happy", doc: "just a string" }]);
  });
});

function mysqlCredentials(url: string): MysqlCredentials {
  const u = new URL(url);
  return {
    host: u.hostname,
    port: u.port ? Number(u.port) : 3306,
    user: decodeURIComponent(u.username),
    password: u.password ? decodeURIComponent(u.password) : undefined,
    database: decodeURIComponent(u.pathname.slice(1)),
  };
}

describe("mysql connector", () => {
  const credentials = mysqlCredentials(process.env.TEST_MYSQL_URL ?? "mysql://root@127.0.0.1:3306/test");
  const items = `sb_conn_${unique}_items`;
  const noPk = `sb_conn_${unique}_nopk`;
  const codes = `sb_conn_${unique}_codes`;
  let admin: mysql.Connection;
  let source: Connector;

  /** The seed row for id i, as inserted. */
  const seed = (i: number) => ({
    name: `item ${i}`,
    price: ((i * 125) / 100).toFixed(2),
    qty: i % 7,
    active: i % 2 === 0,
    doc: { n: i, tags: ["x", `t${i % 3}`] },
    created_at: `2024-01-${String(1 + (i % 28)).padStart(2, "0")} ${String(i % 24).padStart(2, "0")}:30:00`,
    day: `2023-12-${String(1 + (i % 31)).padStart(2, "0")}`,
    payload: Buffer.from([i % 256, 1]),
    kind: i % 2 ? "a" : "b",
    big: String(9007199254740993n + BigInt(i)),
  });

  beforeAll(async () => {
    admin = await mysql.createConnection({ ...credentials, dateStrings: true, supportBigNumbers: true, bigNumberStrings: true, jsonStrings: true });
    await admin.query(`create table ${items} (
      id int auto_increment primary key,
      name varchar(100) not null,
      price decimal(12,2),
      qty int,
      active tinyint(1) not null default 1,
      doc json,
      created_at datetime,
      day date,
      payload varbinary(16),
      kind enum('a', 'b'),
      price_with_tax decimal(12,2) as (price * 1.2) stored,
      big bigint
    )`);
    await admin.query(`create table ${noPk} (body text)`);
    await admin.query(`create table ${codes} (code varchar(20) primary key, label text)`);
    const rows = Array.from({ length: 2500 }, (_, k) => {
      const s = seed(k + 1);
      return [s.name, s.price, s.qty, s.active, JSON.stringify(s.doc), s.created_at, s.day, s.payload, s.kind, s.big];
    });
    await admin.query(`insert into ${items} (name, price, qty, active, doc, created_at, day, payload, kind, big) values ?`, [rows]);
    source = mysqlConnector(credentials);
  });

  afterAll(async () => {
    await source?.close();
    await admin?.query(`drop table if exists ${items}, ${noPk}, ${codes}`);
    await admin?.end();
  });

  /** A row as the source's own client reads it, with the connector's documented conversions. */
  const asRecordValues = (row: Record<string, any>) => ({
    ...row,
    doc: JSON.parse(row.doc),
    payload: `\\x${row.payload.toString("hex")}`,
  });

  test("test() succeeds with good credentials", async () => {
    await expect(source.test()).resolves.toBeUndefined();
  });

  test("a wrong password is a permanent error that does not show the password", async () => {
    const connector = mysqlConnector({ ...credentials, password: "wrong-secret-pw" });
    try {
      const error = await connectorError(connector.test());
      expect(error.transient).toBe(false);
      expect(error.message).toMatch(/Access denied for user/);
      expect(error.message).not.toContain("wrong-secret-pw");
    } finally {
      await connector.close();
    }
  });

  test("an unknown database is a permanent error", async () => {
    const connector = mysqlConnector({ ...credentials, database: "sb_no_such_db" });
    try {
      const error = await connectorError(connector.test());
      expect(error.transient).toBe(false);
      expect(error.message).toMatch(/Unknown database 'sb_no_such_db'/);
    } finally {
      await connector.close();
    }
  });

  test("an unreachable server is a transient error", async () => {
    await expectUnreachable(mysqlConnector({ ...credentials, host: "127.0.0.1", port: 1, password: "secret-pw-77" }), "secret-pw-77");
  });

  test("listTables lists the database's tables, sorted", async () => {
    const tables = await source.listTables();
    expect(tables).toEqual(expect.arrayContaining([items, noPk, codes]));
    expect(tables).toEqual([...tables].sort());
  });

  test("tableSpec maps the column types to PostgreSQL types", async () => {
    expect(await source.tableSpec(items)).toEqual({
      name: items,
      remoteIdColumn: "id",
      columns: [
        { name: "id", type: "integer", readOnly: false },
        { name: "name", type: "text", readOnly: false },
        { name: "price", type: "numeric(12,2)", readOnly: false },
        { name: "qty", type: "integer", readOnly: false },
        { name: "active", type: "smallint", readOnly: false },
        { name: "doc", type: "jsonb", readOnly: false },
        { name: "created_at", type: "timestamp", readOnly: false },
        { name: "day", type: "date", readOnly: false },
        { name: "payload", type: "bytea", readOnly: false },
        { name: "kind", type: "text", readOnly: false },
        { name: "price_with_tax", type: "numeric(12,2)", readOnly: true },
        { name: "big", type: "bigint", readOnly: false },
      ],
    });
  });

  test("tableSpec refuses a table without a primary key, and a missing table", async () => {
    const error = await connectorError(source.tableSpec(noPk));
    expect(error.transient).toBe(false);
    expect(error.message).toMatch(new RegExp(`${noPk} has no primary key`));
    const missing = await connectorError(source.tableSpec(`sb_conn_${unique}_nothing`));
    expect(missing.transient).toBe(false);
    expect(missing.message).toMatch(/_nothing does not exist/);
  });

  test("count", async () => {
    expect(await source.count(items)).toBe(2500);
  });

  test("download streams every row in primary key order, with JSON-friendly values", async () => {
    const batches = await allBatches(source, items, 1000);
    expect(batches.map((b) => b.length)).toEqual([1000, 1000, 500]);
    const [rows] = await admin.query<mysql.RowDataPacket[]>(`select * from ${items} order by id`);
    expect(batches.flat()).toEqual(rows.map((r) => ({ remoteId: String(r.id), values: asRecordValues(r) })));
    const { payload, ...third } = seed(3);
    expect(batches[0][2]).toEqual({ remoteId: "3", values: { id: 3, ...third, active: Number(third.active), payload: "\\x0301", price_with_tax: "4.50" } });
  });

  test("download stops between batches when aborted, and frees its connection", async () => {
    await expectDownloadStops(source, items);
  });

  test("fetch returns the current rows of the ids that still exist", async () => {
    const found = await source.fetch(items, ["1", "2500", "999999"]);
    expect([...found.keys()].sort()).toEqual(["1", "2500"]);
    const [rows] = await admin.query<mysql.RowDataPacket[]>(`select * from ${items} where id = 2500`);
    expect(found.get("2500")).toEqual(asRecordValues(rows[0]));
  });

  test("create, update and delete apply per record; a rejected record does not stop the others", async () => {
    const created = await source.create(items, [
      { name: "new A", price: "10.50", qty: 3, active: false, doc: { k: [1, 2] }, created_at: "2024-05-01T10:00:00",
        day: "2024-05-02", payload: "\\xff00", kind: "b", big: "9007199254740999", price_with_tax: 999 },
      { name: "rejected", qty: "abc" },
      { name: "new B", price: 2 },
    ]);
    expect(created[0]).toEqual({ ok: true, remoteId: expect.stringMatching(/^\d+$/), values: expect.objectContaining({ name: "new A", price_with_tax: "12.60" }) });
    expect(created[1]).toEqual({ ok: false, error: expect.stringMatching(/Incorrect integer value: 'abc' for column .*qty/) });
    expect(created[2]).toEqual({ ok: true, remoteId: expect.stringMatching(/^\d+$/), values: expect.objectContaining({ name: "new B" }) });
    const [a, b] = [created[0], created[2]].map((o) => (o.ok ? o.remoteId : ""));
    // Each outcome carries the record as the source stored it (auto_increment id, defaults, generated columns).
    const stored = await source.fetch(items, [a, b]);
    expect([created[0], created[2]].map((o) => (o.ok ? o.values : null))).toEqual([stored.get(a), stored.get(b)]);
    const read = async (id: string) =>
      (await admin.query<mysql.RowDataPacket[]>(`select * from ${items} where id = ?`, [id]))[0][0];
    expect(await read(a)).toEqual({
      id: Number(a), name: "new A", price: "10.50", qty: 3, active: 0, doc: '{"k":[1,2]}', created_at: "2024-05-01 10:00:00",
      day: "2024-05-02", payload: Buffer.from([0xff, 0]), kind: "b", big: "9007199254740999",
      price_with_tax: "12.60", // read-only: computed by the source, not 999
    });
    const [rejected] = await admin.query<mysql.RowDataPacket[]>(`select id from ${items} where name = 'rejected'`);
    expect(rejected).toEqual([]);

    const updated = await source.update(items, [
      { remoteId: a, values: { qty: 4, doc: "just a string" } },
      { remoteId: b, values: { qty: "abc" } },
      { remoteId: "99999999", values: { qty: 1 } },
      { remoteId: b, values: {} },
    ]);
    expect(updated).toEqual([
      { ok: true, remoteId: a, values: { ...stored.get(a), qty: 4, doc: "just a string" } },
      { ok: false, error: expect.stringMatching(/Incorrect integer value: 'abc'/) },
      { ok: false, error: "record 99999999 no longer exists at the source" },
      { ok: true, remoteId: b, values: stored.get(b) },
    ]);
    expect(await read(a)).toMatchObject({ name: "new A", qty: 4, price: "10.50", doc: '"just a string"' });
    expect(await read(b)).toMatchObject({ name: "new B", qty: null, price: "2.00" });

    expect(await source.delete(items, [a, "99999999"])).toEqual([
      { ok: true, remoteId: a },
      { ok: false, error: "record 99999999 no longer exists at the source" },
    ]);
    expect(await read(a)).toBeUndefined();
    expect(await read(b)).toMatchObject({ name: "new B" });
    expect(await source.count(items)).toBe(2501);
  });

  test("create on a table whose key is not auto_increment needs the key, and returns it", async () => {
    expect(await source.create(codes, [{ code: "X-1", label: "first" }, { label: "no code" }])).toEqual([
      { ok: true, remoteId: "X-1", values: { code: "X-1", label: "first" } },
      { ok: false, error: "a new record needs a value for code: it is not auto_increment" },
    ]);
    const [rows] = await admin.query<mysql.RowDataPacket[]>(`select * from ${codes}`);
    expect(rows).toEqual([{ code: "X-1", label: "first" }]);
  });
});
