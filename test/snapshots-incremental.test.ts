// O(Δ) snapshots (issue 15): change tracking on managed tables, snapshots built
// from the previous one, the fallbacks to a full capture, row history and the
// snapshot in force at a time.
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import pg from "pg";
import { from as copyFrom } from "pg-copy-streams";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { databaseName, withUrlParts } from "../src/db/urls.ts";
import { createUser, db, sqlState, type TestUser } from "./helpers.ts";

// Capture's fixed output settings: row texts compare exactly under them.
const OUTPUT_SETTINGS =
  "set datestyle = 'ISO, YMD'; set intervalstyle = 'postgres'; set timezone = 'UTC'; set extra_float_digits = 3; set bytea_output = 'hex'";
const SEED = Number(process.env.SNAPSHOT_SEED ?? 20251129);

let admin: TestUser, editor: TestUser;
const clients: pg.Client[] = [];

async function client(url: string, setup = ""): Promise<pg.Client> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  clients.push(c);
  if (setup) await c.query(setup);
  return c;
}
const ownerClient = (setup = "") => client(db.ownerUrl, setup);
/** A superuser on the test database (session_replication_role needs one). */
const rootClient = (setup = "") => client(withUrlParts(db.rootUrl, { database: databaseName(db.ownerUrl) }), setup);
async function userClient(user: TestUser, setup = ""): Promise<pg.Client> {
  const c = await client(db.authenticatorUrl);
  await c.query("select set_config('role', $1, false), set_config('jwt.claims.user_id', $2, false), set_config('jwt.claims.email', $3, false), set_config('jwt.claims.role', $4, false)",
    [db.roles[user.role], user.id, user.email, user.role]);
  if (setup) await c.query(setup);
  return c;
}

let sql: pg.Client;
const q = async (text: string, params: unknown[] = []) => (await sql.query(text, params)).rows;

beforeAll(async () => {
  [admin, editor] = await Promise.all([createUser("admin"), createUser("editor")]);
  sql = await ownerClient(OUTPUT_SETTINGS);
  await sql.query(`
    drop schema if exists t15 cascade;
    create schema t15;
    grant usage on schema t15 to ${db.roles.viewer};
    alter default privileges in schema t15 grant select on tables to ${db.roles.viewer};
    alter default privileges in schema t15 grant insert, update, delete on tables to ${db.roles.admin};`);
});
afterAll(async () => {
  await Promise.all(clients.splice(0).map((c) => c.end().catch(() => {})));
});

/** Every row of a snapshot as text, in snapshot order. */
async function snapshotTexts(c: pg.Client, id: string): Promise<string[]> {
  const [{ src }] = (await c.query("select snapbase_private.snapshot_chunk_source(s) as src from snapbase.snapshots s where s.id = $1", [id])).rows;
  return (await c.query(`select r.rec::text as r from ${src} c cross join lateral (select unnest(c.rows) as rec, generate_series(1, c.row_count) as i) r
                          where c.snapshot_id = $1 order by c.seq, r.i`, [id])).rows.map((r) => r.r);
}
async function tableTexts(c: pg.Client, table: string, order: string): Promise<string[]> {
  return (await c.query(`select t::text as r from ${table} t order by ${order}`)).rows.map((r) => r.r);
}

/** Pages (their chunk references and boundaries), counts and sizes: what a snapshot is made of. */
async function shape(c: pg.Client, id: string) {
  const [row] = (await c.query(`
    select s.record_count, s.chunk_count, s.stored_bytes, t.page_chunks, t.page_rows, t.page_bytes, t.page_bounds, t.chunk_mask,
           (select array_agg(coalesce(p.chunk_ids::text, p.chunk_hashes::text) || ' ' || coalesce(p.bounds::text, '-') order by u.ord)
              from unnest(t.page_ids) with ordinality as u(id, ord) join snapbase_private.snapshot_pages p on p.id = u.id) as pages,
           (select sum(sc.chunk_bytes) from snapbase_private.snapshot_chunks sc where sc.snapshot_id = s.id) as chunk_bytes,
           (select sum(sc.row_count) from snapbase_private.snapshot_chunks sc where sc.snapshot_id = s.id) as chunk_rows
      from snapbase.snapshots s join snapbase_private.snapshot_trees t on t.snapshot_id = s.id where s.id = $1`, [id])).rows;
  return row;
}

/** The snapshot equals what a full capture of the table would store now (taken and rolled back). */
async function expectSameAsFullCapture(c: pg.Client, table: string, id: string, context: string): Promise<void> {
  await c.query("begin");
  try {
    await c.query("set local snapbase.capture = 'full'");
    const [full] = (await c.query("select * from snapbase.take_snapshot($1, 'reference')", [table])).rows;
    expect(full.build, context).toBe("full");
    const mine = await shape(c, id);
    expect(mine, context).toEqual(await shape(c, full.id));
    expect([mine.chunk_bytes, mine.chunk_rows], context).toEqual([mine.stored_bytes, mine.record_count]);
  } finally {
    await c.query("rollback");
  }
}

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// A managed table the random walk drives: how its keys look and how to write rows.
interface Spec {
  table: string;
  order: string;
  create: string;
  /** A key not in use, as column values. */
  freshKey(r: () => number, used: Set<string>): Record<string, unknown>;
  /** Non-key values of a new row. */
  values(r: () => number): Record<string, unknown>;
  /** SET list of an UPDATE (aliased t in MERGE-free SQL). */
  set(r: () => number): string;
  /** The row key of "k" moved elsewhere (primary-key update), as a SET list. */
  moveKey(r: () => number, used: Set<string>): Record<string, unknown>;
  /** Range of the first key column for bulk statements. */
  range(r: () => number): [unknown, unknown];
}

const texts = ["plain", "Ünïcødé 🐘", "quote ' and \"dq\"", "comma, {brace}", "", "back\\slash", "tab\there", "new\nline", "(paren)", "NULL"];
const pick = <T,>(r: () => number, xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
const lit = (v: unknown): string => (v === null ? "null" : typeof v === "number" ? String(v) : `'${String(v).replace(/'/g, "''")}'`);

const specs: Spec[] = [
  {
    table: "t15.walk_int",
    order: "id",
    create: "create table t15.walk_int (id int primary key, v text, n numeric, ts timestamptz)",
    freshKey: (r, used) => { for (;;) { const id = 1 + Math.floor(r() * 6000); if (!used.has(JSON.stringify({ id }))) return { id }; } },
    values: (r) => ({ v: pick(r, texts) + Math.floor(r() * 1000), n: pick(r, ["1.0", "1.00", "-0.5", "12345678901234567890.123", null]), ts: pick(r, ["2024-02-29 23:59:59.5+05:30", "2000-01-01 00:00:00+00", null]) }),
    set: (r) => pick(r, ["v = v || '!'", "n = n * 2", "ts = ts + interval '1 day'", "v = null", "n = 1.000"]),
    moveKey: (r, used) => { for (;;) { const id = 6000 + Math.floor(r() * 3000); if (!used.has(JSON.stringify({ id }))) return { id }; } },
    range: (r) => { const lo = Math.floor(r() * 6000); return [lo, lo + Math.floor(r() * 400)]; },
  },
  {
    table: "t15.walk_pair",
    order: "a, b",
    create: "create table t15.walk_pair (a int, b text, v int, note text, primary key (a, b))",
    freshKey: (r, used) => { for (;;) { const k = { a: Math.floor(r() * 40), b: pick(r, ["k", "K", "é", "a b", "z\"q"]) + Math.floor(r() * 200) }; if (!used.has(JSON.stringify(k))) return k; } },
    values: (r) => ({ v: Math.floor(r() * 1e6), note: pick(r, texts) }),
    set: (r) => pick(r, ["v = v + 1", "note = note || ' more'", "note = null", "v = -v"]),
    moveKey: (r, used) => { for (;;) { const k = { a: 40 + Math.floor(r() * 10), b: "moved" + Math.floor(r() * 1000) }; if (!used.has(JSON.stringify(k))) return k; } },
    range: (r) => { const lo = Math.floor(r() * 40); return [lo, lo + Math.floor(r() * 3)]; },
  },
  {
    // A user-defined enum: chunks stay in text form.
    table: "t15.walk_enum",
    order: "id",
    create: "create type t15.walk_mood as enum ('happy', 'sad', 'meh'); create table t15.walk_enum (id bigint primary key, mood t15.walk_mood, v text)",
    freshKey: (r, used) => { for (;;) { const id = Math.floor(r() * 6000); if (!used.has(JSON.stringify({ id }))) return { id }; } },
    values: (r) => ({ mood: pick(r, ["happy", "sad", "meh", null]), v: pick(r, texts) }),
    set: (r) => pick(r, ["mood = 'sad'", "v = v || '?'", "mood = null"]),
    moveKey: (r, used) => { for (;;) { const id = -1 - Math.floor(r() * 3000); if (!used.has(JSON.stringify({ id }))) return { id }; } },
    range: (r) => { const lo = Math.floor(r() * 6000); return [lo, lo + Math.floor(r() * 400)]; },
  },
];

const copyEscape = (v: unknown): string =>
  v === null ? "\\N" : String(v).replace(/\\/g, "\\\\").replace(/\t/g, "\\t").replace(/\n/g, "\\n").replace(/\r/g, "\\r");

describe("a random walk of writes, each followed by a snapshot, with a fixed seed", () => {
  for (const spec of specs) {
    it(`every snapshot of ${spec.table} equals the table at its moment, as exact text, and what a full capture would store`, async () => {
      const seed = SEED + specs.indexOf(spec);
      try {
        await walk(spec, seed);
      } catch (error) {
        const e = error as Error;
        e.message = `[seed ${seed}; rerun with SNAPSHOT_SEED=${SEED}] ${e.message}`;
        throw e;
      }
    }, 240_000);
  }
});

async function walk(spec: Spec, seed: number): Promise<void> {
  const r = mulberry32(seed);
  // Four rows a chunk, about 1,024 a page: many chunks and pages from a few thousand rows.
  const small = `${OUTPUT_SETTINGS}; set snapbase.chunk_mask = 3`;
  const own = await ownerClient(small);
  const root = await rootClient(small);
  const approver = await userClient(admin, small);
  const submitter = await userClient(editor, small);
  const keyCols = spec.order.split(", ");
  await own.query(`${spec.create}; select snapbase.register_table('${spec.table}', keep_last => 1000)`);
  const used = new Set<string>();
  const insertRows = async (c: pg.Client, n: number) => {
    const rows = Array.from({ length: n }, () => { const k = spec.freshKey(r, used); used.add(JSON.stringify(k)); return { ...k, ...spec.values(r) }; });
    const cols = Object.keys(rows[0]!);
    await c.query(`insert into ${spec.table} (${cols.join(", ")}) values ${rows.map((row) => `(${cols.map((k) => lit((row as Record<string, unknown>)[k])).join(", ")})`).join(", ")}`);
  };
  await insertRows(own, 2500);
  const keys = async () => (await own.query(`select ${keyCols.map((k) => `to_jsonb(${k}) as ${k}`).join(", ")} from ${spec.table}`)).rows as Record<string, unknown>[];
  const syncUsed = async () => { used.clear(); for (const k of await keys()) used.add(JSON.stringify(k)); };
  const where = (ks: Record<string, unknown>[]) =>
    ks.length === 0 ? "false" : `(${keyCols.join(", ")}) in (${ks.map((k) => `(${keyCols.map((c) => lit(k[c])).join(", ")})`).join(", ")})`;
  const some = async (max: number) => { const all = await keys(); return Array.from({ length: 1 + Math.floor(r() * max) }, () => pick(r, all)).filter(Boolean); };

  // A statement as SQL: the same generators serve approvals and direct writes.
  const statement = async (): Promise<[string, string]> => {
    const kind = pick(r, ["update", "update", "insert", "delete", "move", "range", "upsert"] as const);
    switch (kind) {
      case "update": return [kind, `update ${spec.table} set ${spec.set(r)} where ${where(await some(5))}`];
      case "delete": return [kind, `delete from ${spec.table} where ${where(await some(5))}`];
      case "insert": {
        const rows = Array.from({ length: 1 + Math.floor(r() * 30) }, () => { const k = spec.freshKey(r, used); used.add(JSON.stringify(k)); return { ...k, ...spec.values(r) }; });
        const cols = Object.keys(rows[0]!);
        return [kind, `insert into ${spec.table} (${cols.join(", ")}) values ${rows.map((row) => `(${cols.map((k) => lit((row as Record<string, unknown>)[k])).join(", ")})`).join(", ")}`];
      }
      case "move": {
        const [k] = await some(1);
        const to = spec.moveKey(r, used);
        used.add(JSON.stringify(to));
        return [kind, `update ${spec.table} set ${Object.entries(to).map(([c, v]) => `${c} = ${lit(v)}`).join(", ")} where ${where([k!])}`];
      }
      case "range": {
        const [lo, hi] = spec.range(r);
        return [kind, `update ${spec.table} set ${spec.set(r)} where ${keyCols[0]} between ${lit(lo)} and ${lit(hi)}`];
      }
      case "upsert": {
        const k = pick(r, [spec.freshKey(r, used), ...(await some(1))]);
        used.add(JSON.stringify(k));
        const row = { ...k, ...spec.values(r) };
        const cols = Object.keys(row);
        return [kind, `insert into ${spec.table} (${cols.join(", ")}) values (${cols.map((c) => lit((row as Record<string, unknown>)[c])).join(", ")}) on conflict (${keyCols.join(", ")}) do update set ${cols.filter((c) => !keyCols.includes(c)).map((c) => `${c} = excluded.${c}`).join(", ")}`];
      }
    }
  };

  const expected = new Map<string, string[]>();
  let added = 0;
  const extraColumns: string[] = [];
  let disarmed = false;
  let layoutChanged = true; // the first snapshot is full
  let everything = false;

  for (let step = 0; step < 36; step++) {
    await syncUsed();
    const op = pick(r, ["approve", "approve", "approve", "edits", "restore", "dml", "dml", "dml", "copy", "replica", "truncate", "alter", "disable", "nothing"] as const);
    let snapshotId: string | undefined;
    let context = `${spec.table} step ${step}: ${op}`;
    let approval = false;
    switch (op) {
      case "approve": {
        const [kind, text] = await statement();
        context += ` (${kind}) ${text.slice(0, 200)}`;
        const { rows: [cr] } = await submitter.query("select id from snapbase.submit_change($1, $2, 'walk')", [spec.table, text]);
        const { rows: [done] } = await approver.query("select * from snapbase.approve_change($1)", [cr.id]);
        context += ` -> ${done.status} ${done.error_message ?? ""}`;
        snapshotId = done.snapshot_id ?? undefined;
        approval = done.status === "approved";
        break;
      }
      case "edits": {
        const existing = await some(3);
        const fresh = Array.from({ length: Math.floor(r() * 3) }, () => { const k = spec.freshKey(r, used); used.add(JSON.stringify(k)); return { ...k, ...spec.values(r) }; });
        const [first, ...rest] = existing;
        const edits = {
          insert: fresh,
          update: first ? [{ key: first, set: spec.values(r) }] : [],
          delete: [...new Map(rest.filter((k) => JSON.stringify(k) !== JSON.stringify(first)).map((k) => [JSON.stringify(k), k])).values()],
        };
        context += ` ${JSON.stringify(edits).slice(0, 300)}`;
        const { rows: [cr] } = await submitter.query("select id from snapbase.submit_edits($1, $2, 'walk')", [spec.table, JSON.stringify(edits)]);
        const { rows: [done] } = await approver.query("select * from snapbase.approve_change($1)", [cr.id]);
        context += ` -> ${done.status} ${done.error_message ?? ""}`;
        snapshotId = done.snapshot_id ?? undefined;
        approval = done.status === "approved";
        break;
      }
      case "restore": {
        const fitting = (await own.query("select id from snapbase.snapshots where table_name = $1 and columns = snapbase_private.table_columns($1::regclass) order by id",
          [spec.table])).rows.map((x) => x.id);
        if (fitting.length === 0) break;
        const target = pick(r, fitting);
        context += ` to snapshot ${target}`;
        const { rows: [done] } = await approver.query("select * from snapbase.restore_snapshot($1, 'walk')", [target]);
        snapshotId = done.snapshot_id;
        approval = true;
        break;
      }
      case "dml": {
        const n = 1 + Math.floor(r() * 3);
        await own.query("begin");
        for (let i = 0; i < n; i++) {
          const [kind, text] = await statement();
          context += ` | ${kind}: ${text.slice(0, 120)}`;
          await own.query("savepoint s");
          try {
            await own.query(text);
            await own.query("release savepoint s");
          } catch {
            await own.query("rollback to savepoint s"); // a key collision: the statement leaves nothing
          }
        }
        await own.query("commit");
        break;
      }
      case "copy": {
        const rows = Array.from({ length: 1 + Math.floor(r() * 200) }, () => { const k = spec.freshKey(r, used); used.add(JSON.stringify(k)); return { ...k, ...spec.values(r) }; });
        const cols = Object.keys(rows[0]!);
        context += ` ${rows.length} rows`;
        await pipeline(Readable.from(rows.map((row) => cols.map((c) => copyEscape((row as Record<string, unknown>)[c])).join("\t") + "\n")),
          own.query(copyFrom(`copy ${spec.table} (${cols.join(", ")}) from stdin`)));
        break;
      }
      case "replica": {
        // Triggers that are not ENABLE ALWAYS would miss these writes.
        const [, text] = await statement();
        context += ` ${text.slice(0, 200)}`;
        await root.query("set session_replication_role = replica");
        try {
          await root.query(text);
        } catch {
          /* a key collision */
        } finally {
          await root.query("set session_replication_role = origin");
        }
        break;
      }
      case "truncate": {
        await own.query("begin");
        await own.query(`truncate ${spec.table}`);
        used.clear();
        await insertRows(own, 1 + Math.floor(r() * 300));
        await own.query("commit");
        everything = true;
        break;
      }
      case "alter": {
        if (extraColumns.length > 0 && r() < 0.5) {
          const col = extraColumns.splice(Math.floor(r() * extraColumns.length), 1)[0]!;
          context += ` drop ${col}`;
          await own.query(`alter table ${spec.table} drop column ${col}`);
        } else {
          const col = `extra_${added++}`;
          extraColumns.push(col);
          const type = pick(r, ["text default 'x'", "int", "numeric(10, 3) default 1.5", "jsonb default '{\"a\": [1, 2.50]}'"]);
          context += ` add ${col} ${type}`;
          await own.query(`alter table ${spec.table} add column ${col} ${type}`);
        }
        layoutChanged = true;
        break;
      }
      case "disable": {
        // A DBA disables tracking, writes, and enables it again (not ALWAYS any more).
        const [, text] = await statement();
        context += ` ${text.slice(0, 200)}`;
        await own.query(`alter table ${spec.table} disable trigger all`);
        try {
          await own.query(text);
        } catch {
          /* a key collision */
        }
        await own.query(`alter table ${spec.table} enable trigger all`);
        disarmed = true;
        break;
      }
      case "nothing":
        break;
    }
    if (snapshotId === undefined) {
      snapshotId = (await own.query("select id from snapbase.take_snapshot($1, 'walk')", [spec.table])).rows[0].id as string;
    }
    const snap = (await own.query("select * from snapbase.snapshots where id = $1", [snapshotId])).rows[0];
    context += ` -> snapshot ${snapshotId} (${snap.build}${snap.build_reason ? `: ${snap.build_reason}` : ""}, ${snap.chunks_built} of ${snap.chunk_count} chunks built)`;

    if (process.env.SNAPSHOT_WALK_LOG) console.log(context);
    const live = await tableTexts(own, spec.table, spec.order);
    const stored = await snapshotTexts(own, snapshotId);
    expect(stored, context).toEqual(live);
    expected.set(snapshotId, stored);
    await expectSameAsFullCapture(own, spec.table, snapshotId, context);

    // Incremental whenever nothing outside tracking happened since the last snapshot
    // (an approval re-arms disabled triggers, but its own snapshot is still full).
    const expectFull = layoutChanged || everything || disarmed;
    if (approval) disarmed = false;
    if (expectFull) expect(snap.build, context).toBe("full");
    else if (snap.build === "full") expect(snap.build_reason, context).toMatch(/chunks changed|previous snapshot is empty/);
    layoutChanged = false;
    everything = false;
  }

  // Old snapshots never change, whatever was built on them since...
  for (const [id, rows] of expected) expect(await snapshotTexts(own, id), `${spec.table}: snapshot ${id} at the end`).toEqual(rows);
  // ... nor after retention removes others and the chunks and pages only they used.
  await own.query("update snapbase.managed_tables set keep_last = 5 where qualified_name = $1", [spec.table]);
  await own.query("select snapbase_private.prune_snapshots()");
  const kept = (await own.query("select id from snapbase.snapshots where table_name = $1 order by id", [spec.table])).rows.map((x) => x.id as string);
  expect(kept).toHaveLength(5);
  for (const id of kept) expect(await snapshotTexts(own, id), `${spec.table}: snapshot ${id} after pruning`).toEqual(expected.get(id));
  expect((await own.query("select snapbase_private.remove_unused_chunks() as n")).rows[0].n).toBe("0");
  const [{ orphans }] = (await own.query(`select count(*)::int as orphans from snapbase_private.snapshot_pages p
                                           where not exists (select 1 from snapbase_private.snapshot_trees t where p.id = any (t.page_ids))`)).rows;
  expect(orphans).toBe(0);
}

/** Approves one SQL change to a table as the admin (submitted by the editor); the snapshot it took. */
async function approveChange(table: string, text: string) {
  const submitter = await userClient(editor);
  const approver = await userClient(admin);
  try {
    const { rows: [cr] } = await submitter.query("select id from snapbase.submit_change($1, $2, 'test')", [table, text]);
    const { rows: [done] } = await approver.query("select * from snapbase.approve_change($1)", [cr.id]);
    expect(done.status, done.error_message).toBe("approved");
    return (await q("select * from snapbase.snapshots where id = $1", [done.snapshot_id]))[0];
  } finally {
    await Promise.all([submitter.end(), approver.end()]);
    clients.splice(clients.indexOf(submitter), 1);
    clients.splice(clients.indexOf(approver), 1);
  }
}
const takeSnapshot = async (table: string) => (await q("select * from snapbase.take_snapshot($1, 'test')", [table]))[0];
async function expectExact(table: string, order: string, snap: { id: string }) {
  expect(await snapshotTexts(sql, snap.id)).toEqual(await tableTexts(sql, table, order));
  await expectSameAsFullCapture(sql, table, snap.id, `${table}: snapshot ${snap.id}`);
}

describe("the work an approval does under its lock follows the change, not the table", () => {
  it("counts the chunks each snapshot built: one for a one-row UPDATE, the tail for appended rows, a range for a range", async () => {
    const table = "t15.counted";
    await q(`create table ${table} (id int primary key, label text, amount numeric(12,2));
             insert into ${table} select g, md5(g::text), g / 7.0 from generate_series(1, 250000) g;
             analyze ${table};
             select snapbase.register_table('${table}')`);
    const first = await takeSnapshot(table);
    expect(first).toMatchObject({ build: "full", build_reason: "the first snapshot of the table" });
    expect(first.chunks_built).toBe(first.chunk_count);
    expect(first.chunk_count).toBeGreaterThan(900);

    const one = await approveChange(table, `update ${table} set label = 'one' where id = 125000`);
    expect(one).toMatchObject({ build: "incremental", build_reason: null, chunks_built: 1, chunk_count: first.chunk_count });
    await expectExact(table, "id", one);

    // Deleting a row that starts a chunk merges it into the chunk before: still at most two.
    const [{ boundary }] = await q(`select (boundary::text)::int as boundary from (select (regexp_match(sc.boundary, '\\d+'))[1] as boundary
                                      from snapbase_private.snapshot_chunks sc where sc.snapshot_id = $1 and sc.seq = 100) x`, [one.id]);
    const merged = await approveChange(table, `delete from ${table} where id = ${boundary}`);
    expect(merged).toMatchObject({ build: "incremental", chunks_built: 1, chunk_count: one.chunk_count - 1 });
    await expectExact(table, "id", merged);

    // 1,000 new keys after the last one: only the last chunk and the new ones.
    const appended = await approveChange(table, `insert into ${table} select g, 'new', 1 from generate_series(250001, 251000) g`);
    expect(appended.build).toBe("incremental");
    expect(appended.chunk_count).toBe(merged.chunk_count - 1 + appended.chunks_built);
    expect(appended.chunks_built).toBeLessThan(15);
    await expectExact(table, "id", appended);

    // 12,000 contiguous rows: tracked as a range of the key, not key by key.
    await q(`update ${table} set amount = amount + 1 where id between 30001 and 42000`);
    expect(await q(`select c.keys, c.range_lo, c.range_hi, c.everything from snapbase_private.table_changes c
                     join snapbase.managed_tables m on m.id = c.managed_table_id where m.qualified_name = $1`, [table]))
      .toEqual([{ keys: null, range_lo: "30001", range_hi: "42000", everything: null }]);
    const submitted = await takeSnapshot(table);
    expect(submitted.build).toBe("incremental");
    expect(submitted.chunks_built).toBeGreaterThan(30);
    expect(submitted.chunks_built).toBeLessThan(70);
    await expectExact(table, "id", submitted);

    // No change at all: nothing is read.
    const again = await takeSnapshot(table);
    expect(again).toMatchObject({ build: "incremental", chunks_built: 0, new_stored_bytes: "0", stored_bytes: submitted.stored_bytes });
  });
});

describe("what tracking covers, and the fallbacks", () => {
  it("writes by any role, in replica mode, by COPY and by foreign-key cascades are tracked", async () => {
    await q(`create table t15.parent (id int primary key);
             create table t15.child (id int primary key, parent int references t15.parent on delete cascade, v text);
             insert into t15.parent select g from generate_series(1, 50) g;
             insert into t15.child select g, (g - 1) / 100 + 1, md5(g::text) from generate_series(1, 5000) g;
             select snapbase.register_table('t15.child')`);
    await takeSnapshot("t15.child");
    await q("delete from t15.parent where id = 7");
    const cascaded = await takeSnapshot("t15.child");
    expect(cascaded).toMatchObject({ build: "incremental", record_count: "4900" });
    await expectExact("t15.child", "id", cascaded);

    // An application role with nothing but table grants: the trigger still records (SECURITY DEFINER).
    const adminSession = await userClient(admin);
    await adminSession.query("update t15.child set v = 'by admin' where id between 10 and 20");
    const byAdmin = await takeSnapshot("t15.child");
    expect(byAdmin.build).toBe("incremental");
    await expectExact("t15.child", "id", byAdmin);

    await pipeline(Readable.from(["9001\t1\tcopied\n", "9002\t2\t\\N\n"]), sql.query(copyFrom("copy t15.child (id, parent, v) from stdin")));
    const copied = await takeSnapshot("t15.child");
    expect(copied).toMatchObject({ build: "incremental", record_count: "4902" });
    await expectExact("t15.child", "id", copied);

    // A role that may write this one table and nothing else (not even see snapbase_private),
    // as approval's restricted role will be.
    const root = await rootClient();
    const restricted = `t15_writer_${Math.random().toString(36).slice(2, 10)}`;
    await root.query(`create role ${restricted}; grant usage on schema t15 to ${restricted}; grant select, update on t15.child to ${restricted}`);
    try {
      await root.query(`begin; set local role ${restricted}; update t15.child set v = 'restricted' where id = 77; commit`);
    } finally {
      await root.query(`revoke all on t15.child from ${restricted}; revoke usage on schema t15 from ${restricted}; drop role ${restricted}`);
    }
    const byRestricted = await takeSnapshot("t15.child");
    expect(byRestricted).toMatchObject({ build: "incremental", chunks_built: 1 });
    await expectExact("t15.child", "id", byRestricted);

    await root.query("set session_replication_role = replica; update t15.child set v = 'replica' where id = 99; set session_replication_role = origin");
    const replica = await takeSnapshot("t15.child");
    expect(replica).toMatchObject({ build: "incremental", chunks_built: 1 });
    await expectExact("t15.child", "id", replica);
    expect((await q("select tgname, tgenabled from pg_trigger where tgrelid = 't15.child'::regclass and tgname like '_900%' order by 1")))
      .toEqual(["delete", "insert", "no_inheritance", "truncate", "update"].map((e) => ({ tgname: `_900_snapbase_track_${e}`, tgenabled: e === "no_inheritance" ? "D" : "A" })));
  });

  it("TRUNCATE, a statement over a twentieth of the table, and a rewrite of the table make the next snapshot full", async () => {
    await q(`create table t15.falls (id int primary key, v int);
             insert into t15.falls select g, g from generate_series(1, 60000) g;
             analyze t15.falls;
             select snapbase.register_table('t15.falls')`);
    await takeSnapshot("t15.falls");
    await q("update t15.falls set v = v + 1 where id <= 20000");
    const bulk = await takeSnapshot("t15.falls");
    expect(bulk).toMatchObject({ build: "full", build_reason: "a statement (UPDATE) changed over 10000 rows" });
    await expectExact("t15.falls", "id", bulk);

    await q("alter table t15.falls alter column v type int using v * 2");
    const rewritten = await takeSnapshot("t15.falls");
    expect(rewritten.build).toBe("full");
    expect(rewritten.build_reason).toMatch(/^the table was rewritten/);
    await expectExact("t15.falls", "id", rewritten);

    await q("begin; truncate t15.falls; insert into t15.falls values (1, 1); commit");
    const truncated = await takeSnapshot("t15.falls");
    expect(truncated).toMatchObject({ build: "full", build_reason: "TRUNCATE", record_count: "1" });
    expect((await takeSnapshot("t15.falls")).build).toBe("incremental");
  });

  it("disabled triggers are noticed; an approval re-arms them", async () => {
    await q(`create table t15.armed (id int primary key, v text);
             insert into t15.armed select g, 'v' from generate_series(1, 3000) g;
             grant select, insert, update, delete on t15.armed to ${db.roles.admin};
             select snapbase.register_table('t15.armed')`);
    await takeSnapshot("t15.armed");
    await q("alter table t15.armed disable trigger _900_snapbase_track_update; update t15.armed set v = 'unseen' where id = 5; alter table t15.armed enable trigger _900_snapbase_track_update");
    const noticed = await takeSnapshot("t15.armed");
    expect(noticed.build).toBe("full");
    expect(noticed.build_reason).toMatch(/tracking triggers are missing, disabled or not ENABLE ALWAYS/);
    await expectExact("t15.armed", "id", noticed);
    const rearmed = await approveChange("t15.armed", "update t15.armed set v = 'approved' where id = 6");
    expect(rearmed).toMatchObject({ build: "full", build_reason: `changes since snapshot ${noticed.id} were not tracked` });
    expect((await q("select tgenabled from pg_trigger where tgrelid = 't15.armed'::regclass and tgname = '_900_snapbase_track_update'"))[0].tgenabled).toBe("A");
    const after = await approveChange("t15.armed", "update t15.armed set v = 'again' where id = 7");
    expect(after).toMatchObject({ build: "incremental", chunks_built: 1 });
    await expectExact("t15.armed", "id", after);

    // Disabled and enabled again while still ENABLE ALWAYS is noticed too (the trigger's catalog row moved).
    await q("alter table t15.armed disable trigger all; update t15.armed set v = 'unseen too' where id = 8; alter table t15.armed enable always trigger _900_snapbase_track_update, enable always trigger _900_snapbase_track_insert, enable always trigger _900_snapbase_track_delete, enable always trigger _900_snapbase_track_truncate");
    const moved = await takeSnapshot("t15.armed");
    expect(moved.build_reason).toMatch(/^the table was rewritten, or its tracking triggers or column types were altered/);
    await expectExact("t15.armed", "id", moved);
  });

  it("a renamed enum label changes unchanged rows' text: text-form snapshots notice it", async () => {
    await q(`create type t15.colour as enum ('red', 'green');
             create table t15.paint (id int primary key, c t15.colour);
             insert into t15.paint select g, case when g % 2 = 0 then 'red' else 'green' end::t15.colour from generate_series(1, 2000) g;
             select snapbase.register_table('t15.paint')`);
    const before = await takeSnapshot("t15.paint");
    await q("update t15.paint set c = 'red' where id = 1");
    expect((await takeSnapshot("t15.paint")).build).toBe("incremental");
    await q("alter type t15.colour rename value 'green' to 'verde'");
    const renamed = await takeSnapshot("t15.paint");
    expect(renamed.build).toBe("full");
    await expectExact("t15.paint", "id", renamed);
    // The older snapshot still says green (as stored text: its layout type now knows only verde).
    expect((await q(`select (cs.rows)[1:2] as rows from snapbase_private.snapshot_chunks sc join snapbase_private.chunk_store cs on cs.hash = sc.chunk_hash
                      where sc.snapshot_id = $1 and sc.seq = 0`, [before.id]))[0].rows).toEqual(["(1,green)", "(2,red)"]);
  });

  it("tables whose rows change without statement triggers are snapshotted in full, and say why", async () => {
    const root = await rootClient();
    await root.query(`create table t15.foreign_owned (id int primary key); insert into t15.foreign_owned values (1);
                      grant select, update on t15.foreign_owned to ${db.roles.owner}`);
    await q(`create table t15.loose (v int); insert into t15.loose values (1), (1);
             create table t15.parted (id int primary key, v int) partition by range (id);
             create table t15.parted_1 partition of t15.parted for values from (0) to (1000);
             insert into t15.parted values (1, 1);
             create unlogged table t15.scratch (id int primary key); insert into t15.scratch values (1);
             create table t15.base (id int primary key); create table t15.derived (extra int) inherits (t15.base);`);
    const cases: [string, RegExp][] = [
      ["t15.foreign_owned", /owned by postgres, so its tracking triggers cannot be made ENABLE ALWAYS/],
      ["t15.loose", /without a primary key/],
      ["t15.parted", /partitioned table/],
      ["t15.scratch", /unlogged table/],
      ["t15.base", /inheritance children/],
    ];
    for (const [table, why] of cases) {
      await q(`select snapbase.register_table('${table}')`);
      const [audit] = await q("select details ->> 'untracked' as untracked from snapbase.audit_log where action = 'register_table' and table_name = $1 order by id desc limit 1", [table]);
      expect(audit.untracked, table).toMatch(why);
      await takeSnapshot(table);
      const second = await takeSnapshot(table);
      expect(second.build, table).toBe("full");
    }
  });
});

describe("retention beside captures", () => {
  it("does not delete chunks while a capture that may reference them is in progress", async () => {
    await q("create table t15.kept (id int primary key, v int); insert into t15.kept select g, g from generate_series(1, 1000) g; select snapbase.register_table('t15.kept')");
    const capturing = await ownerClient();
    const retention = await ownerClient();
    await capturing.query("begin");
    await capturing.query("select snapbase.take_snapshot('t15.kept', 'in progress')");
    await retention.query("begin; set local lock_timeout = '200ms'");
    const waited = await sqlState(() => retention.query("select snapbase_private.remove_unused_chunks()"));
    expect(waited.code).toBe("55P03");
    await retention.query("rollback");
    await capturing.query("commit");
    expect((await retention.query("select snapbase_private.remove_unused_chunks() >= 0 as ran")).rows[0].ran).toBe(true);
  });
});

describe("row history", () => {
  it("gives one row across the snapshots of a table with a composite key, newest first, reading one chunk of each", async () => {
    const table = "t15.hist";
    const small = "set snapbase.chunk_mask = 3";
    await q(`create table ${table} (region text, num int, v text, primary key (region, num));
             insert into ${table} select r, n, 'v' || n from unnest(array['eu', 'us', 'apac']) r, generate_series(1, 1500) n;
             grant select on ${table} to ${db.roles.viewer};
             select snapbase.register_table('${table}')`);
    await sql.query(small);
    try {
      const s1 = await takeSnapshot(table);
      const key = { region: "eu", num: 700 };
      const s2 = await approveChange(table, `update ${table} set v = 'changed' where region = 'eu' and num = 700`);
      const s3 = await approveChange(table, `update ${table} set v = 'elsewhere' where region = 'us' and num = 700`);
      const s4 = await approveChange(table, `delete from ${table} where region = 'eu' and num = 700`);
      const s5 = await approveChange(table, `insert into ${table} values ('eu', 700, 'back')`);
      await q(`alter table ${table} add column note text default 'n'`);
      const s6 = await takeSnapshot(table);
      for (const s of [s2, s3, s4, s5]) expect(s.build).toBe("incremental");
      const viewer = await createUser("viewer");
      const reader = await userClient(viewer);
      const history = (await reader.query("select * from snapbase.row_history($1, $2)", [table, JSON.stringify(key)])).rows;
      expect(history.map((h) => [h.snapshot_id, h.change_request_id !== null, h.change, h.changed_fields, h.row])).toEqual([
        [s6.id, false, "changed", ["note"], { region: "eu", num: 700, v: "back", note: "n" }],
        [s5.id, true, "added", null, { region: "eu", num: 700, v: "back" }],
        [s4.id, true, "removed", null, null],
        [s3.id, true, "unchanged", null, { region: "eu", num: 700, v: "changed" }],
        [s2.id, true, "changed", ["v"], { region: "eu", num: 700, v: "changed" }],
        [s1.id, false, "initial", null, { region: "eu", num: 700, v: "v700" }],
      ]);
      expect(history[1].change_request_id).toBe(s5.change_request_id);
      // Chunk rows fetched by that call: one per distinct chunk holding the key, of thousands.
      await reader.query("begin");
      const chunkReads = async () => Number((await reader.query(`select coalesce(sum(coalesce(idx_tup_fetch, 0) + coalesce(seq_tup_read, 0)), 0) as n
                                                                   from pg_stat_xact_all_tables where schemaname = 'snapbase_private' and relname like 'chunks\\_%'`)).rows[0].n);
      const before = await chunkReads();
      await reader.query("select * from snapbase.row_history($1, $2)", [table, JSON.stringify(key)]);
      expect(await chunkReads() - before).toBeLessThanOrEqual(6);
      expect(Number(s1.chunk_count)).toBeGreaterThan(1000);
      await reader.query("rollback");
      // Keys are checked, and a key never seen has no history.
      expect((await reader.query("select * from snapbase.row_history($1, $2)", [table, JSON.stringify({ region: "eu", num: 99999 })])).rows).toEqual([]);
      const missing = await sqlState(() => reader.query("select * from snapbase.row_history($1, $2)", [table, JSON.stringify({ region: "eu" })]));
      expect(missing).toEqual({ code: "22023", message: "the key must give every primary key column of t15.hist: num missing" });
      const extra = await sqlState(() => reader.query("select * from snapbase.row_history($1, $2)", [table, JSON.stringify({ region: "eu", num: 1, v: "x" })]));
      expect(extra.message).toBe("the key names columns that are not the primary key of t15.hist (region, num): v");
      // Key values and names are data: never SQL.
      for (const hostile of [{ region: "eu'); delete from t15.hist; --", num: 700 }, { region: "eu", num: 700, 'num") = 1 or (true': 1 }]) {
        const result = await reader.query("select * from snapbase.row_history($1, $2)", [table, JSON.stringify(hostile)]).then((r) => r.rows, (e: Error) => e.message);
        expect(result).toEqual(Object.keys(hostile).length === 2 ? [] : `the key names columns that are not the primary key of t15.hist (region, num): num") = 1 or (true`);
      }
      const notJson = await sqlState(() => reader.query("select * from snapbase.row_history($1, $2)", [table, JSON.stringify(["eu", 700])]));
      expect(notJson).toEqual({ code: "22023", message: "the key must be a JSON object of the primary key columns (region, num)" });
      const badValue = await sqlState(() => reader.query("select * from snapbase.row_history($1, $2)", [table, JSON.stringify({ region: "eu", num: "seven" })]));
      expect(badValue.code).toBe("22P02");
      expect((await q(`select count(*)::int as n from ${table}`))[0].n).toBe(4500);
      // Only readers of the live table.
      const outsider = await userClient(editor);
      await q(`revoke select on ${table} from ${db.roles.viewer}`);
      const denied = await sqlState(() => outsider.query("select * from snapbase.row_history($1, $2)", [table, JSON.stringify(key)]));
      expect(denied).toEqual({ code: "42501", message: `table ${table} is not under change control` });
    } finally {
      await sql.query("reset snapbase.chunk_mask");
    }
  });

  it("snapshot_as_of answers the snapshot in force at a time, and says when retention removed it", async () => {
    const table = "t15.asof";
    await q(`create table ${table} (id int primary key, v int); insert into ${table} values (1, 1);
             select snapbase.register_table('${table}', keep_last => 2)`);
    const taken: { id: string; at: string }[] = [];
    for (let i = 0; i < 3; i++) {
      await q(`update ${table} set v = v + 1`);
      const snap = await takeSnapshot(table);
      taken.push({ id: snap.id, at: (await q("select created_at::text as at from snapbase.snapshots where id = $1", [snap.id]))[0].at });
      await new Promise((r) => setTimeout(r, 20));
    }
    const asOf = async (at: string, offset = "0") =>
      (await q("select id from snapbase.snapshot_as_of($1, $2::timestamptz + $3::interval)", [table, at, offset]))[0].id;
    expect(await asOf(taken[1]!.at)).toBe(taken[1]!.id);
    expect(await asOf(taken[1]!.at, "10 ms")).toBe(taken[1]!.id);
    expect(await asOf(taken[1]!.at, "-1 microsecond")).toBe(taken[0]!.id);
    expect(await asOf("infinity")).toBe(taken[2]!.id);
    const early = await sqlState(() => asOf(taken[0]!.at, "-1 second"));
    expect(early.message).toMatch(/^no snapshot of t15\.asof was taken by /);
    await q("select snapbase_private.prune_snapshots()");
    const gone = await sqlState(() => asOf(taken[0]!.at, "10 ms"));
    expect(gone).toMatchObject({ code: "P0002" });
    expect(gone.message).toMatch(new RegExp(`\\(snapshot ${taken[0]!.id}\\) was removed by retention$`));
    expect(await asOf(taken[1]!.at)).toBe(taken[1]!.id);
  });
});
