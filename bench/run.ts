// npm run bench: snapshot speed and storage, each figure beside a baseline measured
// in the same run on the same data. Uses DATABASE_URL (or the embedded server).
import "../src/env.ts";
import pg from "pg";
import { loadConfig } from "../src/config.ts";
import { prepareDatabase } from "../src/db/database.ts";

const sizes = (process.env.BENCH_SIZES ?? "100000,1000000").split(",").map(Number);

async function timed<T>(fn: () => Promise<T>): Promise<[number, T]> {
  const started = process.hrtime.bigint();
  const result = await fn();
  return [Number(process.hrtime.bigint() - started) / 1e6, result];
}

const fmtMs = (ms: number) => `${ms.toFixed(0)} ms`;
const fmtBytes = (b: number) => (b >= 1 << 20 ? `${(b / (1 << 20)).toFixed(1)} MiB` : `${(b / 1024).toFixed(1)} KiB`);

async function benchSize(c: pg.Client, n: number): Promise<string[]> {
  const table = `bench.rows_${n}`;
  await c.query(`drop table if exists ${table} cascade; drop table if exists bench.floor; drop table if exists bench.seed_snapshot`);
  await c.query(`create table ${table} (id int primary key, email text not null, full_name text, amount numeric(12,2), created_at timestamptz, tags text[])`);
  await c.query(`insert into ${table} select g, 'user' || g || '@example.com', 'Name ' || md5(g::text), (g % 100000) / 100.0,
                   timestamptz '2024-01-01' + g * interval '1 minute', array['t' || (g % 7), 't' || (g % 11)] from generate_series(1, $1) g`, [n]);
  await c.query(`vacuum analyze ${table}`);
  await c.query(`select snapbase.register_table('${table}', keep_last => 1000)`);

  const [floorMs] = await timed(() => c.query(`create table bench.floor as select * from ${table}`));
  const floorBytes = Number((await c.query("select pg_total_relation_size('bench.floor') as b")).rows[0].b);
  await c.query("drop table bench.floor");

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
  await c.query(`update ${table} set full_name = 'changed' where id = $1`, [Math.floor(n / 2)]);
  const [, second] = await timed(async () => (await c.query(`select * from snapbase.take_snapshot('${table}', 'bench after one-row change')`)).rows[0]);
  const added = Number(second.new_stored_bytes);
  return [
    `${n.toLocaleString("en")} rows`,
    fmtMs(floorMs),
    seed,
    `${fmtMs(snapMs)} (${(snapMs / floorMs).toFixed(2)}x)`,
    `${fmtBytes(floorBytes)} / ${fmtBytes(Number(first.stored_bytes))}`,
    `${fmtBytes(added)} (${((100 * added) / Number(first.stored_bytes)).toFixed(2)}% of a full snapshot, ${((100 * added) / floorBytes).toFixed(2)}% of a plain copy)`,
  ];
}

async function main(): Promise<void> {
  const config = loadConfig();
  const db = await prepareDatabase(config);
  const c = new pg.Client({ connectionString: db.ownerUrl });
  await c.connect();
  try {
    await c.query("create schema if not exists bench");
    const header = ["size", "CREATE TABLE AS (floor)", "seed: one jsonb_agg value", "snapbase snapshot", "plain copy / snapshot size", "added by a snapshot after a one-row change"];
    const rows: string[][] = [];
    for (const n of sizes) rows.push(await benchSize(c, n));
    console.log("\nSnapshots (targets: snapshot within 2x of the floor; one-row change adds < 5% of a full copy)\n");
    const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
    for (const r of [header, widths.map((w) => "-".repeat(w)), ...rows]) console.log(r.map((v, i) => v.padEnd(widths[i]!)).join(" | "));
    await c.query("drop schema bench cascade");
  } finally {
    await c.end();
    await db.stop();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
