// Issue 13: the REST layer answers in the seed's JSON shapes: ids and counts are
// JSON numbers wherever they fit in 2^53 (larger ones stay exact strings), and
// timestamps are ISO 8601 in UTC. Seed 000's example response is checked field by field.
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import { createUser, db, http, owner, startTestServer, TEST_PASSWORD, type TestUser } from "./helpers.ts";

let server: RunningServer;
let admin: TestUser, editor: TestUser;
let adminToken: string, editorToken: string;

const ISO_UTC = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$/;

async function q(sql: string, params: unknown[] = []) {
  return (await owner().query(sql, params)).rows;
}

/** A timestamptz column as this API must print it: ISO 8601 in UTC, every digit PostgreSQL has, no trailing zeros. */
async function isoOf(sql: string, params: unknown[] = []): Promise<string> {
  const [{ iso }] = await q(`select regexp_replace(to_char((${sql}) at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'), '\\.?0+$', '') || 'Z' as iso`, params);
  return iso;
}

/** A decimal text as significant digits and a power of ten ("12.50" → "125e-1"). */
function canonical(text: string): string {
  const match = /^(-?)(\d+)(?:\.(\d+))?$/.exec(text);
  if (!match) return text;
  const [, sign, whole, fraction = ""] = match;
  const digits = (whole! + fraction).replace(/^0+/, "");
  const significant = digits.replace(/0+$/, "");
  return significant === "" ? "0" : `${sign}${significant}e${(digits.length - significant.length) - fraction.length}`;
}

/** Every value in a JSON body: no number a double holds exactly was sent as a string,
 *  and every timestamp is ISO 8601 in UTC. */
function expectJsonConventions(body: unknown, where: string): void {
  const walk = (value: unknown, path: string) => {
    if (typeof value === "string") {
      // (A SQLSTATE is text that may look like a number.)
      if (/^-?\d+$/.test(value) && !path.endsWith(".error_code")) expect(Number.isSafeInteger(Number(value)), `${where} ${path} = "${value}" should be a number`).toBe(false);
      else if (/^-?\d+\.\d+$/.test(value)) expect(canonical(value) === canonical(String(Number(value))), `${where} ${path} = "${value}" should be a number`).toBe(false);
      if (/^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}/.test(value)) expect(value, `${where} ${path}`).toMatch(/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)$/);
    } else if (Array.isArray(value)) value.forEach((v, i) => walk(v, `${path}[${i}]`));
    else if (value !== null && typeof value === "object") for (const [k, v] of Object.entries(value)) walk(v, `${path}.${k}`);
  };
  walk(body, "");
}

beforeAll(async () => {
  server = await startTestServer();
  [admin, editor] = await Promise.all([createUser("admin"), createUser("editor")]);
  [adminToken, editorToken] = await Promise.all([admin, editor].map(async (u) =>
    (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: u.email, password: TEST_PASSWORD } })).body.token as string));
  await q(`
    drop schema if exists restjson cascade;
    create schema restjson;
    grant usage on schema restjson to ${db.roles.viewer};
    create table restjson.rj_people (id bigint primary key, name text not null, big bigint, amount numeric(30,10), seen timestamptz);
    insert into restjson.rj_people select n, 'person ' || n, n, n / 4.0, timestamptz '2024-01-15 14:30:00+01' + n * interval '1 second' from generate_series(1, 244) n;
    insert into restjson.rj_people values (245, 'wide', 9007199254740993, 12345678901234567890.0123456789, '2024-01-15 14:30:00.123456+05:30'),
                                       (246, 'exact', 9007199254740991, 1.5, null);
    grant select on restjson.rj_people to ${db.roles.viewer};
    select snapbase.register_table('restjson.rj_people');
    select snapbase.take_snapshot('restjson.rj_people', 'before the change');
  `);
});

afterAll(async () => {
  await server?.close();
});

describe("REST JSON", () => {
  it("GET /api/v1/tables/{table}/snapshots answers seed 000's example shape, field by field", async () => {
    const submitted = await http(server.url, "POST", "/api/v1/changes", { token: editorToken, body: { table_name: "restjson.rj_people", sql: "insert into restjson.rj_people (id, name) values (247, 'new')", reason: "one more" } });
    expect(submitted.status).toBe(201);
    const approved = await http(server.url, "POST", `/api/v1/changes/${submitted.body.change_request.id}/approve`, { token: adminToken });
    expect(approved.status).toBe(200);

    const res = await http(server.url, "GET", "/api/v1/tables/rj_people/snapshots", { token: editorToken });
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toMatch(/^application\/json/);
    expect(Object.keys(res.body).sort()).toEqual(["snapshots", "table"]);
    expect(res.body.table).toBe("restjson.rj_people");
    expect(res.body.snapshots).toHaveLength(2);
    const [newest, older] = res.body.snapshots;
    for (const snap of [newest, older]) {
      expect(Object.keys(snap).sort()).toEqual(["change_request_id", "created_at", "id", "record_count", "table_name"]);
      expect(typeof snap.id).toBe("number");
      expect(Number.isInteger(snap.id)).toBe(true);
      expect(typeof snap.table_name).toBe("string");
      expect(snap.table_name).toBe("restjson.rj_people");
      expect(snap.created_at).toMatch(ISO_UTC);
      expect(snap.created_at).toBe(await isoOf("select created_at from snapbase.snapshots where id = $1", [snap.id]));
      expect(typeof snap.record_count).toBe("number");
    }
    // "id": 5, "change_request_id": 12, "record_count": 247 in the seed.
    expect(newest.id).toBe(Number(approved.body.change_request.snapshot_id));
    expect(newest.change_request_id).toBe(submitted.body.change_request.id);
    expect(typeof newest.change_request_id).toBe("number");
    expect(newest.record_count).toBe(247);
    expect(older.change_request_id).toBeNull(); // taken on demand
    expect(older.record_count).toBe(246);
    expect(newest.id).toBeGreaterThan(older.id);
  });

  it("GET /api/v1/snapshots/{id}: the summary's numbers and time, and rows whose wide numbers stay exact", async () => {
    const [{ id }] = await q("select max(id) as id from snapbase.snapshots where table_name = 'restjson.rj_people'");
    const res = await http(server.url, "GET", `/api/v1/snapshots/${id}`, { token: editorToken });
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ id: Number(id), table_name: "restjson.rj_people", record_count: 247, created_at: expect.stringMatching(ISO_UTC) });
    expect(typeof res.body.change_request_id).toBe("number");
    expect(res.body.snapshot_data).toHaveLength(247);
    const byName = Object.fromEntries(res.body.snapshot_data.map((r: { name: string }) => [r.name, r]));
    // Numbers a double holds exactly are numbers; wider ones their exact digits, as text.
    expect(byName["person 1"]).toEqual({ id: 1, name: "person 1", big: 1, amount: 0.25, seen: "2024-01-15T13:30:01+00:00" });
    expect(byName.wide).toEqual({ id: 245, name: "wide", big: "9007199254740993", amount: "12345678901234567890.0123456789", seen: "2024-01-15T09:00:00.123456+00:00" });
    expect(byName.exact).toEqual({ id: 246, name: "exact", big: 9007199254740991, amount: 1.5, seen: null });
    expectJsonConventions(res.body, "GET /snapshots/{id}");
  });

  it("every other endpoint: numbers as numbers, timestamps ISO 8601 UTC", async () => {
    const seen: [string, unknown][] = [];
    const call = async (method: string, path: string, opts: Parameters<typeof http>[3] = {}) => {
      const res = await http(server.url, method, path, opts);
      expect(res.status, `${method} ${path}: ${JSON.stringify(res.body)}`).toBeLessThan(300);
      seen.push([`${method} ${path}`, res.body]);
      return res.body;
    };
    const changes = await call("GET", "/api/v1/changes", { token: adminToken });
    // (Other suites' change requests share the database: look at this table's only.)
    changes.changes = changes.changes.filter((x: { table_name: string }) => x.table_name === "restjson.rj_people");
    const c = changes.changes.find((x: { status: string }) => x.status === "approved");
    expect(c).toMatchObject({ id: expect.any(Number), managed_table_id: expect.any(Number), rows_affected: 1, snapshot_id: expect.any(Number),
                              submitted_by: Number(editor.id), decided_by: Number(admin.id), submitted_at: expect.stringMatching(ISO_UTC), decided_at: expect.stringMatching(ISO_UTC) });
    expect(c.submitted_at).toBe(await isoOf("select submitted_at from snapbase.change_requests where id = $1", [c.id]));

    const created = await call("POST", "/api/v1/changes", { token: editorToken, body: { table_name: "rj_people", edits: { update: [{ key: { id: 1 }, set: { name: "renamed" } }] } } });
    expect(created.change_request).toMatchObject({ id: expect.any(Number), status: "pending", rows_affected: null });
    const rejected = await call("POST", `/api/v1/changes/${created.change_request.id}/reject`, { token: adminToken, body: { reason: "no" } });
    expect(rejected.change_request).toMatchObject({ id: created.change_request.id, status: "rejected", decided_by: Number(admin.id) });

    const [{ first, last }] = await q("select min(id) as first, max(id) as last from snapbase.snapshots where table_name = 'restjson.rj_people'");
    const diff = await call("GET", `/api/v1/snapshots/${first}/diff/${last}`, { token: editorToken });
    expect(diff).toMatchObject({ from_snapshot_id: Number(first), to_snapshot_id: Number(last), added: [{ id: 247, name: "new" }] });
    const restored = await call("POST", `/api/v1/snapshots/${first}/restore`, { token: adminToken });
    expect(restored.change_request).toMatchObject({ kind: "restore", status: "approved", rows_affected: 1, restore_snapshot_id: Number(first) });

    const upload = await fetch(`${server.url}/api/v1/csv-files?name=numbers.csv`, {
      method: "POST", headers: { authorization: `Bearer ${editorToken}`, "content-type": "text/csv" }, body: "id,label\n1,one\n2,two\n" });
    expect(upload.status).toBe(201);
    const file = await upload.json();
    seen.push(["POST /api/v1/csv-files", file]);
    expect(file.file).toMatchObject({ id: expect.any(Number), created_at: expect.stringMatching(ISO_UTC) });
    const versions = await call("GET", `/api/v1/csv-files/${file.file.id}/versions`, { token: editorToken });
    expect(versions.versions[0]).toMatchObject({ version: 1, row_count: 2, created_at: expect.stringMatching(ISO_UTC) });

    for (const [where, body] of seen) expectJsonConventions(body, where);
  });
});

describe("the JSON rule itself", () => {
  it("a bigint is a number up to 2^53 - 1 and exact text beyond; the same for numeric", async () => {
    const { restJsonTypes } = await import("../src/rest/json.ts");
    const c = new pg.Client({ connectionString: db.ownerUrl, types: restJsonTypes });
    await c.connect();
    try {
      const { rows: [r] } = await c.query(`select 9007199254740991::bigint as safe, 9007199254740992::bigint as unsafe, -9007199254740993::bigint as negative,
        '{1,9007199254740993}'::bigint[] as list, 0.1::numeric as tenth, 12.50::numeric(5,2) as scaled, 'NaN'::numeric as nan,
        '2024-02-29 23:59:59.999999+00'::timestamptz as ts, 'infinity'::timestamptz as forever, '2024-02-29'::date as day,
        '0001-01-01 00:00:00+00'::timestamptz as first, '2024-01-15 14:30:00+05:30'::timestamptz as zoned, 1e100::float8 as big_float, 'NaN'::float8 as float_nan,
        '{"a": 123456789012345678901234567890, "b": [1.25, 0.1]}'::jsonb as doc`);
      expect(r).toEqual({
        safe: 9007199254740991, unsafe: "9007199254740992", negative: "-9007199254740993", list: [1, "9007199254740993"],
        tenth: 0.1, scaled: 12.5, nan: "NaN", ts: "2024-02-29T23:59:59.999999Z", forever: "infinity", day: "2024-02-29",
        first: "0001-01-01T00:00:00Z", zoned: "2024-01-15T09:00:00Z", big_float: 1e100, float_nan: "NaN",
        doc: { a: "123456789012345678901234567890", b: [1.25, 0.1] },
      });
    } finally {
      await c.end();
    }
  });
});
