// npm run bench: snapshot speed and storage, workbook paging and accepting
// suggestions, downloading a source table into a workbook, exporting a table as CSV
// through the HTTP API, and the latency of realtime events, each figure beside a
// baseline measured in the same run on the same data. Uses DATABASE_URL (or the
// embedded server).
import "../src/env.ts";
import { execFile, spawn } from "node:child_process";
import { createReadStream } from "node:fs";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { Readable } from "node:stream";
import { promisify } from "node:util";
import { createClient } from "graphql-ws";
import pg from "pg";
import WebSocket from "ws";
import { signClaims } from "../src/auth/tokens.ts";
import { loadConfig } from "../src/config.ts";
import { prepareDatabase, type Database } from "../src/db/database.ts";
import { databaseName, withUrlParts } from "../src/db/urls.ts";
import { setLogLevel } from "../src/log.ts";
import { startServer, type RunningServer } from "../src/server/app.ts";
import { startWorker } from "../src/worker.ts";

// 0 skips the snapshot section.
const sizes = (process.env.BENCH_SIZES ?? "100000,1000000").split(",").map(Number).filter((n) => n > 0);
// Approval lock time per table size (0 skips; add 10000000 for the 10M row: about 10 minutes here).
const lockSizes = (process.env.BENCH_LOCK_SIZES ?? "1000000").split(",").map(Number).filter((n) => n > 0);
// A bulk UPDATE on a managed table beside the same statement on an untracked copy (0 skips).
const bulkRows = Number(process.env.BENCH_BULK_ROWS ?? 1_000_000);
// 0 skips the workbook section.
const workbookRows = Number(process.env.BENCH_WORKBOOK_ROWS ?? 1_000_000);
// 0 skips the download section.
const downloadRows = Number(process.env.BENCH_DOWNLOAD_ROWS ?? 1_000_000);
// 0 skips the CSV export section.
const exportRows = Number(process.env.BENCH_EXPORT_ROWS ?? 1_000_000);
// 0 skips the CSV import section.
const importRows = Number(process.env.BENCH_IMPORT_ROWS ?? 1_000_000);
// 0 (either) skips the event latency section; BENCH_EVENTS changes, each awaited by every subscriber.
const subscriberCount = Number(process.env.BENCH_SUBSCRIBERS ?? 100);
const eventCount = Number(process.env.BENCH_EVENTS ?? 50);

async function timed<T>(fn: () => Promise<T>): Promise<[number, T]> {
  const started = process.hrtime.bigint();
  const result = await fn();
  return [Number(process.hrtime.bigint() - started) / 1e6, result];
}

const fmtMs = (ms: number) => `${ms.toFixed(ms < 10 ? 2 : 0)} ms`;
const fmtBytes = (b: number) => (b >= 1 << 20 ? `${(b / (1 << 20)).toFixed(1)} MiB` : `${(b / 1024).toFixed(1)} KiB`);

async function benchSize(c: pg.Client, n: number): Promise<string[]> {
  const table = `bench.rows_${n}`;
  await c.query(`drop table if exists ${table} cascade; drop table if exists bench.floor; drop table if exists bench.seed_snapshot`);
  await c.query(`create table ${table} (id int primary key, email text not null, full_name text, amount numeric(12,2), created_at timestamptz, tags text[])`);
  await c.query(`insert into ${table} select g, 'user' || g || '@example.com', 'Name ' || md5(g::text), (g % 100000) / 100.0,
                   timestamptz '2024-01-01' + g * interval '1 minute', array['t' || (g % 7), 't' || (g % 11)] from generate_series(1, $1) g`, [n]);
  await c.query(`vacuum analyze ${table}`);
  await c.query(`select snapbase.register_table('${table}', keep_last => 1000)`);

  // The floor is the median of three copies: one copy alone swings by ±20% here.
  const floorRuns: number[] = [];
  let floorBytes = 0;
  for (let i = 0; i < 3; i++) {
    const [ms] = await timed(() => c.query(`create table bench.floor as select * from ${table}`));
    floorRuns.push(ms);
    floorBytes = Number((await c.query("select pg_total_relation_size('bench.floor') as b")).rows[0].b);
    await c.query("drop table bench.floor");
  }
  const floorMs = floorRuns.sort((a, b) => a - b)[1]!;

  let seed = "does not fit (jsonb ceiling)";
  let seedMs = NaN;
  try {
    [seedMs] = await timed(() => c.query(`create table bench.seed_snapshot as select jsonb_agg(to_jsonb(t)) as snapshot_data from ${table} t`));
    seed = `${fmtMs(seedMs)} (${(seedMs / floorMs).toFixed(2)}x)`;
  } catch (error) {
    seed = `fails: ${(error as Error).message.slice(0, 60)}`;
  }
  await c.query("drop table if exists bench.seed_snapshot");

  const [snapMs, first] = await timed(async () => (await c.query(`select * from snapbase.take_snapshot('${table}', 'bench')`)).rows[0]);
  // A value no earlier run stored, so the changed chunk is really new.
  await c.query(`update ${table} set full_name = 'changed ' || gen_random_uuid() where id = $1`, [Math.floor(n / 2)]);
  const [againMs, second] = await timed(async () => (await c.query(`select * from snapbase.take_snapshot('${table}', 'bench after one-row change')`)).rows[0]);
  const added = Number(second.new_stored_bytes);
  await forgetTable(c, table);
  return [
    `${n.toLocaleString("en")} rows`,
    fmtMs(floorMs),
    seed,
    `${fmtMs(snapMs)} (${(snapMs / floorMs).toFixed(2)}x)`,
    `${fmtMs(againMs)} (${(againMs / floorMs).toFixed(2)}x)`,
    `${fmtBytes(floorBytes)} / ${fmtBytes(Number(first.stored_bytes))}`,
    `${fmtBytes(added)} (${((100 * added) / Number(first.stored_bytes)).toFixed(2)}% of a full snapshot, ${((100 * added) / floorBytes).toFixed(2)}% of a plain copy)`,
  ];
}

// The same rows as the snapshot section's table, and its vacuum and analyze.
async function benchTable(c: pg.Client, table: string, n: number): Promise<void> {
  await c.query(`drop table if exists ${table} cascade`);
  await c.query(`create table ${table} (id int primary key, email text not null, full_name text, amount numeric(12,2), created_at timestamptz, tags text[])`);
  await c.query(`insert into ${table} select g, 'user' || g || '@example.com', 'Name ' || md5(g::text), (g % 100000) / 100.0,
                   timestamptz '2024-01-01' + g * interval '1 minute', array['t' || (g % 7), 't' || (g % 11)] from generate_series(1, $1) g`, [n]);
  await c.query(`vacuum analyze ${table}`);
}

async function createTableAsFloor(c: pg.Client, table: string): Promise<number> {
  const runs: number[] = [];
  for (let i = 0; i < 3; i++) {
    runs.push((await timed(() => c.query(`create table bench.floor as select * from ${table}`)))[0]);
    await c.query("drop table bench.floor");
  }
  return median(runs);
}

// How long approval keeps writers out, per kind of change, on a managed table of n rows:
// the approve_change call and its commit, measured by the client (an upper bound: the
// lock is taken a few statements into the call and held to the commit). The snapshot's
// share is its build_ms over that time. Median of 3 approvals of each kind (different
// rows each time), submitted and approved as the owner (a DBA counts as an admin).
async function benchLock(c: pg.Client, n: number): Promise<{ rows: string[][]; oneRowMs: number }> {
  const table = `bench.lock_${n}`;
  await benchTable(c, table, n);
  await c.query(`select snapbase.register_table('${table}', keep_last => 1000)`);
  const floorMs = await createTableAsFloor(c, table);
  const [firstMs, first] = await timed(async () => (await c.query(`select * from snapbase.take_snapshot('${table}', 'bench')`)).rows[0]);
  let next = n + 1;
  const approve = async (sql: string) => {
    const cr = (await c.query("select id from snapbase.submit_change($1, $2, 'bench')", [table, sql])).rows[0].id;
    const [ms, done] = await timed(async () => (await c.query("select * from snapbase.approve_change($1)", [cr])).rows[0]);
    if (done.status !== "approved") throw new Error(`approval failed: ${done.error_message}`);
    const snap = (await c.query("select build, build_reason, build_ms, chunks_built, chunk_count from snapbase.snapshots where id = $1", [done.snapshot_id])).rows[0];
    return { ms, snap };
  };
  const kinds: [string, (i: number) => string, boolean?][] = [
    ["one-row UPDATE", (i) => `update ${table} set full_name = 'changed ${Date.now()}-${i}' where id = ${Math.floor(n / 3) + i * 7919}`],
    ["one-row UPDATE, full capture (every approval before this change)", (i) => `update ${table} set full_name = 'full ${Date.now()}-${i}' where id = ${Math.floor(n / 5) + i * 7919}`, true],
    ["1,000-row INSERT (new keys after the last)", () => { const from = next; next += 1000; return `insert into ${table} select g, 'user' || g || '@example.com', 'Name ' || md5(g::text), 1, now(), '{}' from generate_series(${from}, ${from + 999}) g`; }],
    ["1% UPDATE, contiguous keys", (i) => `update ${table} set amount = amount + 1 where id between ${1 + i * (n / 10)} and ${i * (n / 10) + n / 100}`],
    ["1% UPDATE, scattered keys (every 100th row)", (i) => `update ${table} set amount = amount + 1 where id % 100 = ${i + 1}`],
  ];
  const rows: string[][] = [[`${n.toLocaleString("en")} rows`, "first snapshot (take_snapshot, full)", fmtMs(firstMs), `${(firstMs / floorMs).toFixed(2)}x`, "", `${first.chunks_built} of ${first.chunk_count}`]];
  let oneRowMs = NaN;
  for (const [label, sqlFor, full] of kinds) {
    const runs: { ms: number; snap: { build: string; build_reason: string | null; build_ms: number; chunks_built: number; chunk_count: number } }[] = [];
    if (full) await c.query("set snapbase.capture = 'full'");
    try {
      for (let i = 0; i < 3; i++) runs.push(await approve(sqlFor(i)));
    } finally {
      if (full) await c.query("reset snapbase.capture");
    }
    runs.sort((a, b) => a.ms - b.ms);
    const mid = runs[1]!;
    if (label === "one-row UPDATE") oneRowMs = mid.ms;
    rows.push(["", label, fmtMs(mid.ms), `${(mid.ms / floorMs).toFixed(mid.ms / floorMs < 0.1 ? 3 : 2)}x`,
      `${Math.round((100 * mid.snap.build_ms) / mid.ms)}% (${fmtMs(mid.snap.build_ms)})`,
      `${mid.snap.chunks_built} of ${mid.snap.chunk_count} (${mid.snap.build}${mid.snap.build_reason ? `: ${mid.snap.build_reason}` : ""})`]);
  }
  rows.push(["", "CREATE TABLE AS of the table (the floor, median of 3)", fmtMs(floorMs), "1.00x", "", ""]);
  await forgetTable(c, table);
  await c.query(`drop table ${table}`);
  return { rows, oneRowMs };
}

// A bulk UPDATE of every row of a managed table (its tracking triggers fire) beside
// the same statement on an identical untracked table: median of 5, in turns, each
// table vacuumed (and, with a superuser, a checkpoint taken) before each run, so that
// neither pays for the other's dirty pages.
async function benchBulk(c: pg.Client, db: Database, n: number): Promise<string[][]> {
  const tracked = "bench.bulk_tracked";
  const plain = "bench.bulk_plain";
  await benchTable(c, tracked, n);
  await benchTable(c, plain, n);
  await c.query(`select snapbase.register_table('${tracked}', keep_last => 1000)`);
  await c.query(`select snapbase.take_snapshot('${tracked}', 'bench')`);
  const runs: Record<string, number[]> = { [tracked]: [], [plain]: [] };
  for (let i = 0; i < 5; i++) {
    for (const t of i % 2 === 0 ? [plain, tracked] : [tracked, plain]) {
      await c.query(`vacuum ${t}`);
      if (db.rootUrl) await superuserQuery(db, "checkpoint");
      runs[t]!.push((await timed(() => c.query(`update ${t} set amount = amount + 1`)))[0]);
    }
  }
  const [trackedMs, plainMs] = [median(runs[tracked]!), median(runs[plain]!)];
  // Each round runs both back to back: the median of the rounds' ratios cancels the
  // load of a shared machine better than the ratio of the medians.
  const pairedRatio = median(runs[tracked]!.map((ms, i) => ms / runs[plain]![i]!));
  const list = (xs: number[]) => xs.map((x) => Math.round(x)).join(", ");
  // What the triggers recorded for the last statement: its keys, their range, or "everything".
  const marker = (await c.query(`select coalesce(c.everything, case when c.range_lo is not null then 'the range ' || c.range_lo || ' to ' || c.range_hi end,
                                                 cardinality(c.keys) || ' keys') as what
                                   from snapbase_private.table_changes c join snapbase.managed_tables m on m.id = c.managed_table_id
                                  where m.qualified_name = $1 limit 1`, [tracked])).rows[0];
  await forgetTable(c, tracked);
  await c.query(`drop table ${tracked}, ${plain}`);
  return [
    [`UPDATE of all ${n.toLocaleString("en")} rows, untracked table (the baseline)`, fmtMs(plainMs), `runs: ${list(runs[plain]!)} ms`, "1.00x"],
    [`the same on a managed table (tracking recorded: ${marker?.what ?? "nothing"})`, fmtMs(trackedMs), `runs: ${list(runs[tracked]!)} ms`,
      `${(trackedMs / plainMs).toFixed(2)}x (median of the rounds' ratios: ${pairedRatio.toFixed(2)}x)`],
  ];
}

// Leaves no bench snapshots or chunks behind (only the owner may prune).
async function forgetTable(c: pg.Client, table: string): Promise<void> {
  await c.query("begin");
  await c.query("set local snapbase.pruning = on");
  await c.query("delete from snapbase.snapshots where table_name = $1", [table]);
  await c.query("delete from snapbase.change_requests where table_name = $1", [table]);
  await c.query("delete from snapbase.managed_tables where qualified_name = $1", [table]);
  await c.query("select snapbase_private.remove_unused_chunks()");
  await c.query("commit");
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

// Median of `reps` timings of a and of b, taken in turns so that drift hits both alike;
// one untimed call of each first (plans, caches). Single calls take about a millisecond.
async function medians(reps: number, a: () => Promise<unknown>, b: () => Promise<unknown>): Promise<[number, number]> {
  const ta: number[] = [];
  const tb: number[] = [];
  await a();
  await b();
  for (let i = 0; i < reps; i++) {
    ta.push((await timed(a))[0]);
    tb.push((await timed(b))[0]);
  }
  return [median(ta), median(tb)];
}

// Workbooks through the SQL API next to the plain SQL doing the same work, on one
// table of n rows: listing a filtered, sorted page, and accepting 10,000 suggestions.
async function benchWorkbooks(c: pg.Client, n: number): Promise<string[][]> {
  if (n < 60_000) throw new Error("BENCH_WORKBOOK_ROWS must be 0 (skip) or at least 60000 (three rounds of 2 x 10,000 rows)");
  await signInBenchUser(c);
  const wb = (await c.query("select id, schema_name from snapbase.create_workbook('bench')")).rows[0];
  try {
    const columns = [{ name: "id", type: "integer", read_only: true }, { name: "label", type: "text" }, { name: "amount", type: "numeric(12,2)" }];
    const t = (await c.query("select id, table_name from snapbase.add_workbook_table($1, 'items', $2, 'id', 'label')", [wb.id, JSON.stringify(columns)])).rows[0];
    const rel = `${wb.schema_name}.${t.table_name}`;
    // Loaded directly, as a sync from the source would leave it: __last_seen holds the source values.
    await c.query(`insert into ${rel} (id, label, amount, __remote_id, __last_seen)
                   select g, md5(g::text), (g % 100000) / 100.0, g::text, jsonb_build_object('id', g, 'label', md5(g::text), 'amount', (g % 100000) / 100.0)
                     from generate_series(1, $1) g`, [n]);
    await c.query(`vacuum analyze ${rel}`);
    await c.query("select snapbase.update_table_settings($1, sort_column => 'amount')", [t.id]); // builds the (amount, __id) index
    await c.query("select snapbase.set_table_filter($1, 'amount > 500')", [t.id]);

    const apiPage = `select snapbase.workbook_records($1, page_size => 50, "after" => $2) as page`;
    // A deep page starts after the row about halfway through the filtered rows. Its cursor is
    // built as workbook_records builds one (base64 of {id, c, d, v}); a changed format fails loudly.
    const mid = (await c.query(`select amount::text, __id from ${rel} where amount > 500 order by amount, __id offset $1 limit 1`, [Math.floor(n / 4)])).rows[0];
    const cursor = Buffer.from(JSON.stringify({ id: Number(mid.__id), c: "amount", d: false, v: mid.amount })).toString("base64");
    const pages: [string, unknown[], string, unknown[]][] = [
      ["first page", [t.id, null], `select * from ${rel} where amount > 500 order by amount, __id limit 50`, []],
      [`page after ${Math.floor(n / 4).toLocaleString("en")} rows (keyset cursor)`, [t.id, cursor],
        `select * from ${rel} where amount > 500 and (amount, __id) > ($1, $2) order by amount, __id limit 50`, [mid.amount, mid.__id]],
    ];
    const rows: string[][] = [];
    for (const [label, apiArgs, plainPage, plainArgs] of pages) {
      // Both must list the same records, or the comparison means nothing.
      const api = (await c.query(apiPage, apiArgs)).rows[0].page.records.map((r: { id: number }) => String(r.id));
      const plain = (await c.query(plainPage, plainArgs)).rows.map((r) => String(r.__id));
      if (api.length !== 50 || api.join() !== plain.join()) throw new Error(`${label}: workbook_records and plain SQL list different records`);
      const [apiMs, plainMs] = await medians(20, () => c.query(apiPage, apiArgs), () => c.query(plainPage, plainArgs));
      rows.push([label, fmtMs(apiMs), fmtMs(plainMs), `${(apiMs / plainMs).toFixed(2)}x`]);
    }

    // Three rounds on fresh rows each: suggestions on 10,000 rows (put in place with plain
    // SQL, untimed) accepted in one call, and the plain UPDATE of the next 10,000 rows.
    const acceptMs: number[] = [];
    const updateMs: number[] = [];
    for (let from = 0; from < 60_000; from += 20_000) {
      await c.query(`update ${rel} set __suggested = jsonb_build_object('label', jsonb_build_object('value', 'suggested ' || id, 'by', 'bench', 'at', now()))
                      where __id > $1 and __id <= $2`, [from, from + 10_000]);
      const [ms, accepted] = await timed(() => c.query("select snapbase.accept_suggestions($1) as r", [t.id]));
      if (accepted.rows[0].r.records !== 10_000) throw new Error(`accept_suggestions accepted ${JSON.stringify(accepted.rows[0].r)}, not 10,000 records`);
      acceptMs.push(ms);
      updateMs.push((await timed(() => c.query(`update ${rel} set label = 'suggested ' || id where __id > $1 and __id <= $2`, [from + 10_000, from + 20_000])))[0]);
    }
    rows.push(["accept 10,000 suggestions in one call (baseline: UPDATE of 10,000 rows)", fmtMs(median(acceptMs)), fmtMs(median(updateMs)), `${(median(acceptMs) / median(updateMs)).toFixed(2)}x`]);
    return rows;
  } finally {
    await c.query("select snapbase.delete_workbook($1)", [wb.id]);
  }
}

// Workbooks and connector accounts need a signed-in user; the claims last for this
// session only. Also removes what an interrupted run left (the bench user owns nothing else).
const BENCH_EMAIL = "bench@example.com";
async function signInBenchUser(c: pg.Client): Promise<void> {
  const email = BENCH_EMAIL;
  const userId =
    (await c.query("select id from snapbase.users where email = $1", [email])).rows[0]?.id ??
    (await c.query("select id from snapbase.create_user($1, 'bench password', 'editor')", [email])).rows[0].id;
  await c.query("select set_config('jwt.claims.user_id', $1::text, false), set_config('jwt.claims.email', $2, false)", [userId, email]);
  await c.query("select snapbase.delete_workbook(id) from snapbase.workbooks where owner_id = $1", [userId]);
  await c.query("select snapbase.delete_connector_account(id) from snapbase.connector_accounts where owner_id = $1", [userId]);
}

const SOURCE_DB = "snapbase_bench_source";
const execFileAsync = promisify(execFile);

async function superuserQuery(db: Database, sql: string): Promise<void> {
  const root = new pg.Client({ connectionString: db.rootUrl });
  await root.connect();
  try {
    await root.query(sql);
  } finally {
    await root.end();
  }
}

// Peaks of this process's memory until stop(): the worker runs in it. Sampled every
// 50 ms, which can miss a short spike; the kernel's high-water mark (getrusage) cannot,
// but it covers the whole process life, so it only tells something when the job raised it.
function sampleMemory(): () => { rss: number; heapUsed: number } {
  const peak = { rss: 0, heapUsed: 0 };
  const sample = () => {
    const m = process.memoryUsage();
    peak.rss = Math.max(peak.rss, m.rss);
    peak.heapUsed = Math.max(peak.heapUsed, m.heapUsed);
  };
  sample();
  const timer = setInterval(sample, 50);
  return () => {
    clearInterval(timer);
    sample();
    return peak;
  };
}

// A table of n rows in a source database of its own, downloaded into a workbook by a
// worker in this process (create_workbook_from_remote, as a user would), beside COPY
// of the same table. The baseline is psql's \copy to /dev/null: client-side, so the
// rows cross the wire as in a download (psql's start-up and connecting, a few tens of
// ms, count too). The server-side COPY to /dev/null shows the server's part alone. No memory is sampled during the COPYs: psql streams in its own
// process while this one idles, so the figure would only repeat the one before the job.
async function benchDownloads(db: Database, n: number): Promise<[string[][], string]> {
  if (!db.rootUrl) throw new Error("the download section needs a superuser (a superuser DATABASE_URL, or ROOT_DATABASE_URL) for its source database; BENCH_DOWNLOAD_ROWS=0 skips it");
  const sourceUrl = withUrlParts(db.rootUrl, { database: SOURCE_DB });
  await superuserQuery(db, `drop database if exists ${SOURCE_DB} with (force)`);
  await superuserQuery(db, `create database ${SOURCE_DB}`);
  const source = new pg.Client({ connectionString: sourceUrl });
  const owner = new pg.Client({ connectionString: db.ownerUrl });
  const user = new pg.Client({ connectionString: db.ownerUrl });
  try {
    await Promise.all([source.connect(), owner.connect(), user.connect()]);
    await source.query(`create table public.items (id int primary key, label text, amount numeric(12,2), created_at timestamptz, tags text[])`);
    await source.query(`insert into public.items select g, 'Name ' || md5(g::text), (g % 100000) / 100.0,
                          timestamptz '2024-01-01' + g * interval '1 minute', array['t' || (g % 7), 't' || (g % 11)] from generate_series(1, $1) g`, [n]);
    await source.query("vacuum analyze public.items");

    // Median of three each, as for the snapshot floor: one COPY alone swings. Both must read all n rows.
    const psqlRuns: number[] = [];
    const serverRuns: number[] = [];
    for (let i = 0; i < 3; i++) {
      const [psqlMs, out] = await timed(() => execFileAsync("psql", ["-X", "-v", "ON_ERROR_STOP=1", "-d", sourceUrl, "-c", "\\copy public.items to '/dev/null'"]));
      if (out.stdout.trim() !== `COPY ${n}`) throw new Error(`psql \\copy printed ${JSON.stringify(out.stdout)}, not COPY ${n}`);
      psqlRuns.push(psqlMs);
      const [serverMs, copied] = await timed(() => source.query("copy public.items to '/dev/null'"));
      if (copied.rowCount !== n) throw new Error(`COPY to /dev/null wrote ${copied.rowCount} rows, not ${n}`);
      serverRuns.push(serverMs);
    }
    const copyMs = median(psqlRuns);

    const worker = await startWorker({ ownerUrl: db.ownerUrl, concurrency: 1, credentialsKey: db.credentialsKey });
    try {
      await signInBenchUser(user);
      // create_connector_account encrypts the credentials with the key the API would pass.
      await user.query("select set_config('snapbase.credentials_key', $1, false)", [db.credentialsKey]);
      const account = (await user.query("select id from snapbase.create_connector_account('postgres', 'bench source', jsonb_build_object('connection_string', $1::text))",
        [sourceUrl])).rows[0].id;
      const before = process.memoryUsage();
      const stop = sampleMemory();
      let workbookId: string | undefined;
      try {
        // From the call a user makes to the job's end, polled every 50 ms; a minute plus a millisecond per row at most.
        const limitMs = 60_000 + n;
        const [downloadMs, job] = await timed(async () => {
          workbookId = (await user.query("select id from snapbase.create_workbook_from_remote('bench download', $1, array['public.items'])", [account])).rows[0].id;
          for (const until = Date.now() + limitMs; ; await new Promise((r) => setTimeout(r, 50))) {
            const j = (await owner.query("select * from snapbase.jobs where workbook_id = $1 and kind = 'download'", [workbookId])).rows[0];
            if (j && !["queued", "running"].includes(j.state)) return j;
            if (Date.now() > until) throw new Error(`the download is still ${j?.state} after ${limitMs} ms: ${JSON.stringify(j)}`);
          }
        });
        const peak = stop();
        if (job.state !== "succeeded" || Number(job.done) !== n) throw new Error(`the download ended ${job.state} with ${job.done} of ${n} records: ${job.error ?? job.message}`);
        const rel = (await owner.query("select snapbase_private.table_rel(t) as rel from snapbase.workbook_tables t where id = $1", [job.table_id])).rows[0].rel;
        const held = Number((await owner.query(`select count(*) as n from ${rel}`)).rows[0].n);
        if (held !== n) throw new Error(`the workbook table holds ${held} records, not ${n}`);

        const maxRss = process.resourceUsage().maxRSS * 1024;
        const memory = `Memory of the process running the worker during the download (sampled every 50 ms): RSS peak ${fmtBytes(peak.rss)}, ` +
          `+${fmtBytes(peak.rss - before.rss)} over ${fmtBytes(before.rss)} just before; heap used peak ${fmtBytes(peak.heapUsed)}, ` +
          `+${fmtBytes(peak.heapUsed - before.heapUsed)} over ${fmtBytes(before.heapUsed)}; kernel high-water mark of the process ${fmtBytes(maxRss)}.`;
        const ratio = (ms: number) => `${(ms / copyMs).toFixed(2)}x`;
        return [[
          ["COPY to /dev/null through psql \\copy (client-side; the baseline)", fmtMs(copyMs), ratio(copyMs)],
          ["COPY to '/dev/null' on the server (superuser; the server's part alone)", fmtMs(median(serverRuns)), ratio(median(serverRuns))],
          ["download into a workbook (create_workbook_from_remote until the job succeeded)", fmtMs(downloadMs), ratio(downloadMs)],
        ], memory];
      } finally {
        stop();
        if (workbookId) await user.query("select snapbase.delete_workbook($1)", [workbookId]);
        await user.query("select snapbase.delete_connector_account($1)", [account]);
      }
    } finally {
      await worker.stop();
    }
  } finally {
    await Promise.all([source.end(), owner.end(), user.end()]);
    await superuserQuery(db, `drop database if exists ${SOURCE_DB} with (force)`);
  }
}

// The export and event sections share one HTTP server, started in this process as
// `npm start` starts it, and a token of the bench user signed in as a client would.
interface Api {
  server: RunningServer;
  token: string;
  owner: pg.Client;
  /** Signed in as the bench user (signInBenchUser): workbooks are created through the SQL API. */
  user: pg.Client;
}

// A workbook of the bench user with one table; its rows are loaded by the owner, directly
// into the physical table, as a download would leave them.
async function benchWorkbook(user: pg.Client, name: string, columns: { name: string; type: string }[]) {
  const wb = (await user.query("select id, schema_name from snapbase.create_workbook($1)", [name])).rows[0];
  const t = (await user.query("select id, table_name from snapbase.add_workbook_table($1, 'items', $2)", [wb.id, JSON.stringify(columns)])).rows[0];
  return { workbookId: String(wb.id), tableId: String(t.id), rel: `${wb.schema_name}.${t.table_name}` };
}

// Bytes and lines ("\n") of a stream, chunk by chunk: the CSV is never held whole.
function lineCounter() {
  const counted = { bytes: 0, lines: 0 };
  return {
    counted,
    add(chunk: Uint8Array) {
      counted.bytes += chunk.length;
      for (let i = chunk.indexOf(10); i !== -1; i = chunk.indexOf(10, i + 1)) counted.lines++;
    },
  };
}

// psql's \copy of a query to its stdout, read and counted here.
function psqlCopy(url: string, select: string): Promise<{ bytes: number; lines: number }> {
  return new Promise((resolve, reject) => {
    const psql = spawn("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", `\\copy (${select}) to stdout with (format csv, header)`],
      { stdio: ["ignore", "pipe", "pipe"] });
    const counter = lineCounter();
    let stderr = "";
    psql.stdout.on("data", counter.add);
    psql.stderr.on("data", (d) => (stderr += d));
    psql.on("error", reject);
    psql.on("close", (code) => (code === 0 ? resolve(counter.counted) : reject(new Error(`psql \\copy exited with ${code}: ${stderr}`))));
  });
}

async function fetchCsv(url: string, token: string): Promise<{ bytes: number; lines: number }> {
  const res = await fetch(url, { headers: { authorization: `Bearer ${token}` } });
  if (res.status !== 200 || !res.body) throw new Error(`the export answered ${res.status}: ${(await res.text()).slice(0, 300)}`);
  const counter = lineCounter();
  for await (const chunk of res.body) counter.add(chunk);
  return counter.counted;
}

// A workbook table of n rows exported by GET /api/v1/workbook-tables/{id}/export.csv and
// read to its end by fetch, beside COPY of the same columns, rows and order: psql's \copy
// to stdout (client-side, so the rows cross the wire as in the export; psql's start-up
// counts too) and, with a superuser, COPY to '/dev/null' on the server (the server's part
// alone). Median of 3 each, in turns. Memory is this process's: the server's, and the
// fetch reading the export, which only counts and drops each chunk.
async function benchExport(api: Api, db: Database, n: number): Promise<[string[][], string]> {
  const columns = [{ name: "id", type: "integer" }, { name: "label", type: "text" }, { name: "amount", type: "numeric(12,2)" }, { name: "created_at", type: "timestamptz" }];
  const { workbookId, tableId, rel } = await benchWorkbook(api.user, "bench export", columns);
  const root = db.rootUrl ? new pg.Client({ connectionString: withUrlParts(db.rootUrl, { database: databaseName(db.ownerUrl) }) }) : undefined;
  try {
    // Commas and quotes in every label so that quoting has work to do, NULLs, and no
    // newlines in values, so that lines count rows.
    await api.owner.query(`insert into ${rel} (id, label, amount, created_at)
                           select g, 'Name, "' || md5(g::text) || '"', case when g % 10 <> 0 then (g % 100000) / 100.0 end,
                                  timestamptz '2024-01-01' + g * interval '1 minute' from generate_series(1, $1) g`, [n]);
    await api.owner.query(`vacuum analyze ${rel}`);
    // What the export reads (snapbase_private.table_export_query), as COPY writes it.
    const select = `select ${columns.map((c) => c.name).join(", ")} from ${rel} r where not r.__deleted and not r.__suggested_new order by r.__id`;
    await root?.connect();
    const url = `${api.server.url}/api/v1/workbook-tables/${tableId}/export.csv`;
    const psqlRuns: number[] = [];
    const serverRuns: number[] = [];
    const exportRuns: number[] = [];
    let csvBytes = 0;
    let worst = { before: process.memoryUsage(), peak: { rss: 0, heapUsed: 0 } };
    for (let i = 0; i < 3; i++) {
      const [psqlMs, copied] = await timed(() => psqlCopy(db.ownerUrl, select));
      if (copied.lines !== n + 1) throw new Error(`psql \\copy wrote ${copied.lines} lines, not ${n + 1}`);
      psqlRuns.push(psqlMs);
      if (root) {
        const [serverMs, written] = await timed(() => root.query(`copy (${select}) to '/dev/null' with (format csv, header)`));
        if (written.rowCount !== n) throw new Error(`COPY to /dev/null wrote ${written.rowCount} rows, not ${n}`);
        serverRuns.push(serverMs);
      }
      const before = process.memoryUsage();
      const stop = sampleMemory();
      let exported;
      try {
        const [exportMs, result] = await timed(() => fetchCsv(url, api.token));
        exportRuns.push(exportMs);
        exported = result;
      } finally {
        const peak = stop();
        if (peak.rss - before.rss > worst.peak.rss - worst.before.rss) worst = { before, peak };
      }
      // The same bytes as COPY: the same rows, values and quoting, or the comparison means nothing.
      if (exported.lines !== n + 1 || exported.bytes !== copied.bytes) {
        throw new Error(`the export has ${exported.lines} lines and ${exported.bytes} bytes; COPY wrote ${copied.lines} lines and ${copied.bytes} bytes`);
      }
      csvBytes = exported.bytes;
    }
    const copyMs = median(psqlRuns);
    const ratio = (ms: number) => `${(ms / copyMs).toFixed(2)}x`;
    const rows = [["COPY to stdout through psql \\copy, read by a pipe (client-side; the baseline)", fmtMs(copyMs), ratio(copyMs)]];
    if (root) rows.push(["COPY to '/dev/null' on the server (superuser; the server's part alone)", fmtMs(median(serverRuns)), ratio(median(serverRuns))]);
    rows.push([`GET .../export.csv read to the end by fetch (${fmtBytes(csvBytes)})`, fmtMs(median(exportRuns)), ratio(median(exportRuns))]);
    const memory = `Memory of the process running the server during the exports (sampled every 50 ms; the export that raised it most): ` +
      `RSS peak ${fmtBytes(worst.peak.rss)}, +${fmtBytes(worst.peak.rss - worst.before.rss)} over ${fmtBytes(worst.before.rss)} just before; ` +
      `heap used peak ${fmtBytes(worst.peak.heapUsed)}, +${fmtBytes(worst.peak.heapUsed - worst.before.heapUsed)} over ${fmtBytes(worst.before.heapUsed)}; ` +
      `kernel high-water mark of the process so far ${fmtBytes(process.resourceUsage().maxRSS * 1024)}.`;
    return [rows, memory];
  } finally {
    await root?.end();
    await api.user.query("select snapbase.delete_workbook($1)", [workbookId]);
  }
}

// Import of an n-row CSV file into an empty workbook table (upload and staging, then
// import_csv as new records) beside psql's \copy of the same file into a plain table
// with the same columns. The file streams from disk; memory is sampled during both steps.
async function benchImport(api: Api, db: Database, n: number): Promise<[string[][], string]> {
  const columns = [{ name: "id", type: "integer" }, { name: "label", type: "text" }, { name: "amount", type: "numeric(12,2)" }, { name: "created_at", type: "timestamptz" }];
  const dir = await mkdtemp(path.join(tmpdir(), "snapbase-bench-import-"));
  const file = path.join(dir, "items.csv");
  const { workbookId, tableId, rel } = await benchWorkbook(api.user, "bench import", columns);
  try {
    const make = `select g as id, 'Name, "' || md5(g::text) || '"' as label, case when g % 10 <> 0 then (g % 100000) / 100.0 end as amount,
                         timestamptz '2024-01-01' + g * interval '1 minute' as created_at from generate_series(1, ${n}) g`;
    await execFileAsync("psql", ["-X", "-v", "ON_ERROR_STOP=1", "-d", db.ownerUrl, "-c", `\\copy (${make}) to '${file}' with (format csv, header)`]);
    await api.owner.query(`drop table if exists public.bench_import_floor;
                           create table public.bench_import_floor (${columns.map((c) => `${c.name} ${c.type}`).join(", ")})`);
    const [copyMs, copied] = await timed(() => execFileAsync("psql", ["-X", "-v", "ON_ERROR_STOP=1", "-d", db.ownerUrl, "-c",
      `\\copy public.bench_import_floor from '${file}' with (format csv, header)`]));
    if (copied.stdout.trim() !== `COPY ${n}`) throw new Error(`psql \\copy printed ${JSON.stringify(copied.stdout)}, not COPY ${n}`);

    const before = process.memoryUsage();
    const stop = sampleMemory();
    let peak;
    let uploadMs;
    let importMs;
    try {
      let staged;
      [uploadMs, staged] = await timed(async () => {
        const res = await fetch(`${api.server.url}/api/v1/workbook-tables/${tableId}/imports`, {
          method: "POST", duplex: "half", headers: { authorization: `Bearer ${api.token}`, "content-type": "text/csv" },
          body: Readable.toWeb(createReadStream(file)) as ReadableStream,
        } as RequestInit);
        return { status: res.status, body: await res.json() };
      });
      if (staged.status !== 201 || Number(staged.body.import.row_count) !== n) throw new Error(`the upload answered ${staged.status}: ${JSON.stringify(staged.body).slice(0, 300)}`);
      let imported;
      [importMs, imported] = await timed(async () => (await api.user.query("select snapbase.import_csv($1) as r", [staged.body.import.id])).rows[0].r);
      if (imported.created !== n) throw new Error(`import_csv created ${imported.created} records, not ${n}: ${JSON.stringify(imported).slice(0, 300)}`);
    } finally {
      peak = stop();
    }
    const count = (await api.owner.query(`select count(*)::int as n from ${rel}`)).rows[0].n;
    if (count !== n) throw new Error(`the workbook table holds ${count} rows, not ${n}`);
    const ratio = (ms: number) => `${(ms / copyMs).toFixed(2)}x`;
    const rows = [
      [`psql \\copy of the file into a plain table (${fmtBytes((await stat(file)).size)}; the baseline)`, fmtMs(copyMs), ratio(copyMs)],
      ["POST .../imports: streamed, parsed and staged", fmtMs(uploadMs), ratio(uploadMs)],
      ["import_csv: checked, typed and inserted as new records", fmtMs(importMs), ratio(importMs)],
      ["the two together", fmtMs(uploadMs + importMs), ratio(uploadMs + importMs)],
    ];
    const memory = `Memory of the process running the server during the import: RSS peak ${fmtBytes(peak.rss)}, +${fmtBytes(peak.rss - before.rss)} over ${fmtBytes(before.rss)} just before; ` +
      `heap used peak ${fmtBytes(peak.heapUsed)}, +${fmtBytes(peak.heapUsed - before.heapUsed)} over ${fmtBytes(before.heapUsed)}.`;
    return [rows, memory];
  } finally {
    await api.user.query("select snapbase.delete_workbook($1)", [workbookId]);
    await api.owner.query("drop table if exists public.bench_import_floor");
    await rm(dir, { recursive: true, force: true });
  }
}

/** When each event id arrived at one subscriber (performance.now()). */
interface Subscriber {
  received: Map<number, number>;
  close(): unknown;
}

// An SSE subscriber reading a fetch body: the arrival time of a chunk is that of each
// event completed in it.
async function sseSubscriber(url: string): Promise<Subscriber> {
  const received = new Map<number, number>();
  const abort = new AbortController();
  const res = await fetch(url, { signal: abort.signal });
  if (res.status !== 200 || !res.body) throw new Error(`the event stream answered ${res.status}: ${(await res.text()).slice(0, 300)}`);
  const body = res.body;
  void (async () => {
    const decoder = new TextDecoder();
    let buffered = "";
    try {
      for await (const chunk of body) {
        const at = performance.now();
        buffered += decoder.decode(chunk, { stream: true });
        for (let end = buffered.indexOf("\n\n"); end !== -1; end = buffered.indexOf("\n\n")) {
          const block = buffered.slice(0, end);
          buffered = buffered.slice(end + 2);
          const id = /^id: (\d+)$/m.exec(block)?.[1];
          const data = /^data: (.*)$/m.exec(block)?.[1];
          if (id === undefined || data === undefined) continue; // retry: and heartbeats
          if (JSON.parse(data).id !== Number(id)) throw new Error(`an SSE event with id ${id} carries ${data}`);
          received.set(Number(id), at);
        }
      }
    } catch (error) {
      if (!abort.signal.aborted) console.error("an SSE subscriber failed:", error); // its events then time out below
    }
  })();
  return { received, close: () => abort.abort() };
}

// A GraphQL subscriber on a WebSocket of its own, as separate clients would be.
function graphqlSubscriber(url: string, token: string, topic: string): Subscriber {
  const received = new Map<number, number>();
  const client = createClient({ url, webSocketImpl: WebSocket, connectionParams: { authorization: `Bearer ${token}` } });
  client.subscribe<{ events: { id: number } | null }>({ query: "subscription($t: String!) { events(topic: $t) }", variables: { t: topic } }, {
    next: (msg) => {
      const at = performance.now();
      if (!msg.data?.events) return console.error("a GraphQL subscriber received", JSON.stringify(msg)); // its events then time out below
      received.set(msg.data.events.id, at);
    },
    error: (error) => console.error("a GraphQL subscriber failed:", error),
    complete: () => {},
  });
  return { received, close: () => client.dispose() };
}

async function waitFor(done: () => boolean, timeoutMs: number, what: () => string): Promise<void> {
  for (const until = Date.now() + timeoutMs; !done(); await new Promise((r) => setTimeout(r, 5))) {
    if (Date.now() > until) throw new Error(`after ${timeoutMs} ms, ${what()}`);
  }
}

const percentile = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.ceil(p * xs.length) - 1)]!;

// Latency from a committed change to subscribed clients. Each of `count` single-row
// updates is committed by the owner on its own connection, one after another once every
// subscriber has the previous one's event; t0 is when the UPDATE's promise resolves here.
// Server, subscribers and baseline all run in this process, on one event loop: each
// subscriber notes when its event arrives, and waiting for the slowest adds nothing.
// The NOTIFY and the UPDATE's reply reach this process at about the same moment and
// either may be handled first, so a bare LISTEN measures about 0 ± 0.1 ms.
async function measureEvents(api: Api, rel: string, topic: string, subscribers: Subscriber[], count: number): Promise<{ all: number[]; last: number[] }> {
  let lastId = Number((await api.owner.query("select coalesce(max(id), 0) as id from snapbase_private.events where topic = $1", [topic])).rows[0].id);
  const change = async (): Promise<[number, number]> => {
    // A value never stored before: an update that changes nothing announces nothing.
    await api.owner.query(`update ${rel} set label = 'bench ' || gen_random_uuid() where __id = 1`);
    const t0 = performance.now();
    const events = (await api.owner.query("select id, kind from snapbase_private.events where topic = $1 and id > $2 order by id", [topic, lastId])).rows;
    if (events.length !== 1 || events[0].kind !== "records") throw new Error(`one update made the events ${JSON.stringify(events)}, not one records event`);
    lastId = Number(events[0].id);
    return [lastId, t0];
  };
  const receivedBy = (id: number) => subscribers.filter((s) => s.received.has(id)).length;
  // Untimed changes until every subscriber has one: then each follows its topic (an SSE
  // stream sends the backlog before it listens; a GraphQL subscription has no backlog to
  // tell when it is in place). They also open the server's pooled connections.
  for (let attempt = 1; ; attempt++) {
    const [id] = await change();
    try {
      await waitFor(() => receivedBy(id) === subscribers.length, 2000, () => `${receivedBy(id)} of ${subscribers.length} subscribers have the warm-up event ${id}`);
      break;
    } catch (error) {
      if (attempt === 10) throw error;
    }
  }
  const all: number[] = [];
  const last: number[] = [];
  for (let i = 0; i < count; i++) {
    const [id, t0] = await change();
    await waitFor(() => receivedBy(id) === subscribers.length, 10_000, () => `${receivedBy(id)} of ${subscribers.length} subscribers have event ${id}`);
    const latencies = subscribers.map((s) => s.received.get(id)! - t0);
    all.push(...latencies);
    last.push(Math.max(...latencies));
  }
  return { all, last };
}

// n subscribers of one workbook's events through SSE and through GraphQL, beside a bare
// LISTEN on the topic's channel (one pg client: what the database alone takes). One
// kind at a time, each alone on the server.
async function benchEvents(api: Api, db: Database, n: number, count: number): Promise<string[][]> {
  const { workbookId, rel } = await benchWorkbook(api.user, "bench events", [{ name: "label", type: "text" }]);
  const topic = `workbook:${workbookId}`;
  const listener = new pg.Client({ connectionString: db.ownerUrl });
  const subscribers: Subscriber[] = [];
  try {
    await api.owner.query(`insert into ${rel} (label) values ('bench')`);
    const backlog = Number((await api.owner.query("select max(id) as id from snapbase_private.events where topic = $1", [topic])).rows[0].id);

    await listener.connect();
    const bare: Subscriber = { received: new Map(), close: () => {} };
    listener.on("notification", (msg) => bare.received.set(JSON.parse(msg.payload!).id, performance.now()));
    await listener.query(`listen ${pg.escapeIdentifier(`snapbase_events:${topic}`)}`);
    const baseline = await measureEvents(api, rel, topic, [bare], count);
    await listener.end();

    const sseUrl = `${api.server.url}/api/v1/workbooks/${workbookId}/events?access_token=${encodeURIComponent(api.token)}`;
    subscribers.push(...(await Promise.all(Array.from({ length: n }, () => sseSubscriber(sseUrl)))));
    // Each stream starts with the backlog (table_added first).
    await waitFor(() => subscribers.every((s) => s.received.has(backlog)), 30_000,
      () => `${subscribers.filter((s) => s.received.has(backlog)).length} of ${n} SSE subscribers have the backlog`);
    const sse = await measureEvents(api, rel, topic, subscribers, count);
    for (const s of subscribers.splice(0)) s.close();

    const wsUrl = `${api.server.url.replace(/^http/, "ws")}/graphql`;
    subscribers.push(...Array.from({ length: n }, () => graphqlSubscriber(wsUrl, api.token, topic)));
    const graphql = await measureEvents(api, rel, topic, subscribers, count);

    // A difference, not a ratio: the baseline is about zero, and can be below it (see measureEvents).
    const baseMs = median(baseline.all);
    const row = (label: string, r: { all: number[]; last: number[] }) =>
      [label, fmtMs(median(r.all)), fmtMs(percentile(r.all, 0.99)), `+${fmtMs(median(r.all) - baseMs)}`, fmtMs(median(r.last))];
    return [
      row("bare LISTEN on the channel, one pg client (the baseline)", baseline),
      row(`SSE, ${n} subscribers of one user, which share one query per event (GET /api/v1/workbooks/{id}/events)`, sse),
      row(`GraphQL subscriptions, ${n} subscribers of one user (one WebSocket each; one shared refetch per event)`, graphql),
    ];
  } finally {
    await Promise.all(subscribers.map((s) => s.close()));
    await listener.end().catch(() => {});
    await api.user.query("select snapbase.delete_workbook($1)", [workbookId]);
  }
}

// Starts the server and signs the bench user in for the export and event sections.
async function benchApi(db: Database, statementTimeoutMs: number): Promise<void> {
  setLogLevel("warn"); // a line per request would break up the tables
  const server = await startServer({
    ownerUrl: db.ownerUrl,
    authenticatorUrl: db.authenticatorUrl,
    jwtSecret: db.jwtSecret,
    roles: db.migrationTarget.roles,
    host: "127.0.0.1",
    port: 0,
    statementTimeoutMs,
    credentialsKey: db.credentialsKey,
  });
  const owner = new pg.Client({ connectionString: db.ownerUrl });
  // Its own session, so the bench user's claims (session settings) reach nothing else.
  const user = new pg.Client({ connectionString: db.ownerUrl });
  try {
    await Promise.all([owner.connect(), user.connect()]);
    await signInBenchUser(user);
    // A session for the bench user, opened as the owner (no password needed), signed
    // as the server signs sign-ins.
    const claims = (await owner.query(
      `with s as (insert into snapbase_private.sessions (user_id, expires_at) select u.id, now() + interval '8 hours' from snapbase.users u where u.email = $1 returning *)
       select s.id as session_id, u.id as user_id, u.email, u.role::text as role, 'session' as kind, s.created_at as issued_at, s.expires_at
         from s join snapbase.users u on u.id = s.user_id`, [BENCH_EMAIL])).rows[0];
    const token = signClaims(claims, db.jwtSecret);
    const api: Api = { server, token, owner, user };
    if (exportRows > 0) {
      const [rows, memory] = await benchExport(api, db, exportRows);
      printTable(`CSV export (${exportRows.toLocaleString("en")} rows of a workbook table through the HTTP API of a server in this process; ` +
        "baseline: COPY of the same columns and rows through psql \\copy; median of 3, in turns)", ["operation", "time", "ratio to COPY"], rows);
      console.log(`\n${memory}`);
    }
    if (importRows > 0) {
      const [rows, memory] = await benchImport(api, db, importRows);
      printTable(`CSV import (${importRows.toLocaleString("en")} rows into an empty workbook table through the HTTP API and import_csv; baseline: psql \\copy of the same file)`,
        ["operation", "time", "ratio to COPY"], rows);
      console.log(`\n${memory}`);
    }
    if (subscriberCount > 0 && eventCount > 0) {
      printTable(`Event latency (from the commit of a one-row UPDATE, as its client sees it, to each subscriber receiving the records event; ` +
        `${eventCount} changes one after another, over all subscribers; client, server and baseline in one process)`,
        ["path", "median", "99th percentile", "median over LISTEN's", "until the last subscriber has it (median)"],
        await benchEvents(api, db, subscriberCount, eventCount));
    }
  } finally {
    await server.close();
    await Promise.all([owner.end(), user.end()]);
  }
}

function printTable(title: string, header: string[], rows: string[][]): void {
  console.log(`\n${title}\n`);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  for (const r of [header, widths.map((w) => "-".repeat(w)), ...rows]) console.log(r.map((v, i) => v.padEnd(widths[i]!)).join(" | "));
}

async function main(): Promise<void> {
  const config = loadConfig();
  const db = await prepareDatabase(config);
  const c = new pg.Client({ connectionString: db.ownerUrl });
  const wc = new pg.Client({ connectionString: db.ownerUrl });
  await c.connect();
  try {
    await c.query("create schema if not exists bench");
    const header = ["size", "CREATE TABLE AS (floor)", "seed: one jsonb_agg value", "first snapshot", "next snapshot, one row changed", "plain copy / snapshot size", "added by a snapshot after a one-row change"];
    const rows: string[][] = [];
    for (const n of sizes) rows.push(await benchSize(c, n));
    if (rows.length > 0) printTable("Snapshots (targets: snapshot within 2x of the floor; one-row change adds < 5% of a full copy)", header, rows);
    if (lockSizes.length > 0) {
      const lockRows: string[][] = [];
      const oneRow: number[] = [];
      for (const n of lockSizes) {
        const result = await benchLock(c, n);
        lockRows.push(...result.rows);
        oneRow.push(result.oneRowMs);
      }
      printTable("Approval lock time (the approve_change call and its commit, median of 3; targets: a one-row change holds the lock <= 50 ms, " +
        "and the largest table within 2x of the smallest)", ["size", "change", "lock held", "vs CREATE TABLE AS", "snapshot's share", "chunks built"], lockRows);
      if (oneRow.length > 1) {
        console.log(`\nOne-row UPDATE: ${lockSizes.map((n, i) => `${fmtMs(oneRow[i]!)} at ${n.toLocaleString("en")} rows`).join(", ")} ` +
          `(largest / smallest: ${(oneRow[oneRow.length - 1]! / oneRow[0]!).toFixed(2)}x)`);
      }
    }
    if (bulkRows > 0) {
      printTable(`Change tracking on a bulk UPDATE (${bulkRows.toLocaleString("en")} rows; target: at most 1.2x the untracked table; median of 5, in turns)`,
        ["statement", "median", "each run", "ratio"], await benchBulk(c, db, bulkRows));
    }
    await c.query("drop schema bench cascade");
    if (workbookRows > 0) {
      // Its own session, so the bench user's claims (session settings) reach nothing else.
      await wc.connect();
      printTable(`Workbooks (${workbookRows.toLocaleString("en")} rows; pages of 50 with the filter amount > 500, sorted by amount: median of 20 calls, ` +
        "in turns with the baseline; accepting: median of 3 rounds)",
        ["operation", "snapbase", "plain SQL baseline", "ratio"], await benchWorkbooks(wc, workbookRows));
    }
    if (downloadRows > 0) {
      const [rows, memory] = await benchDownloads(db, downloadRows);
      printTable(`Downloads (${downloadRows.toLocaleString("en")} rows from a PostgreSQL table on the same server into a workbook; ` +
        "baseline: COPY to /dev/null through psql \\copy, median of 3)", ["operation", "time", "ratio to COPY"], rows);
      console.log(`\n${memory}`);
    }
    if (exportRows > 0 || importRows > 0 || (subscriberCount > 0 && eventCount > 0)) await benchApi(db, config.statementTimeoutMs);
  } finally {
    await wc.end();
    await c.end();
    await db.stop();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
