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
