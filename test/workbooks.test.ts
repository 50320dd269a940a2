// Workbooks (seed 003): schemas, records, bulk edits, filters, settings, scratch
// columns, suggestions, agent tokens, publish preview and isolation between users.
import type pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import {
  actorOf, asActor, createUser, db, graphql, http, owner, sqlState, startTestServer, TEST_PASSWORD, type TestUser,
} from "./helpers.ts";

let server: RunningServer;
let alice: TestUser, bob: TestUser;

const COLUMNS = [
  { name: "code", type: "integer", read_only: true },
  { name: "name", type: "text" },
  { name: "amount", type: "numeric(12,2)" },
  { name: "city", type: "text" },
];

/** One value out of a single-row, single-column result. */
async function one<T = any>(c: pg.ClientBase, sql: string, params: unknown[] = []): Promise<T> {
  const { rows } = await c.query(sql, params);
  return Object.values(rows[0])[0] as T;
}

/** A workbook with one table, inside the caller's (rolled-back) transaction. */
async function workbookWithTable(c: pg.ClientBase) {
  const wb = (await c.query("select * from snapbase.create_workbook('Test workbook')")).rows[0];
  const table = (await c.query("select * from snapbase.add_workbook_table($1, 'Customers', $2, 'code', 'name')", [wb.id, JSON.stringify(COLUMNS)])).rows[0];
  return { wb, table, rel: `${wb.schema_name}.${table.table_name}` };
}

/** A workbook and table created through GraphQL (committed, unlike workbookWithTable's),
 *  with the table's relation for writing rows as the owner. */
async function committedWorkbookTable(name: string) {
  const token = await login(alice);
  const wb = (await graphql(server.url, `mutation($n: String!) { createWorkbook(input: { name: $n }) { result { rowId } } }`, { n: name }, token)).body.data.createWorkbook.result.rowId;
  const t = (await graphql(server.url, `mutation($wb: BigInt!, $cols: JSON!) { addWorkbookTable(input: { workbookId: $wb, name: "Records", columns: $cols }) { result { rowId } } }`,
    { wb, cols: COLUMNS }, token)).body.data.addWorkbookTable.result.rowId;
  const rel: string = (await owner().query("select snapbase_private.table_rel(t) as rel from snapbase.workbook_tables t where id = $1", [t])).rows[0].rel;
  return { token, wb, t, rel };
}

/** The error a statement raises, inside a savepoint so the transaction goes on. */
async function refusal(c: pg.ClientBase, sql: string, params: unknown[] = []) {
  await c.query("savepoint attempt");
  try {
    return await sqlState(() => c.query(sql, params));
  } finally {
    await c.query("rollback to savepoint attempt");
  }
}

async function login(u: TestUser): Promise<string> {
  return (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: u.email, password: TEST_PASSWORD } })).body.token;
}

beforeAll(async () => {
  server = await startTestServer();
  [alice, bob] = await Promise.all([createUser("editor", "alice"), createUser("editor", "bob")]);
  await owner().query(`
    drop schema if exists t4 cascade;
    create schema t4;
    create table t4.people (id int primary key, name text, city text, score numeric);
    insert into t4.people select n, 'person ' || n, case when n % 2 = 0 then 'Paris' else 'Lyon' end, n * 1.5 from generate_series(1, 20) n;
    grant usage on schema t4 to ${db.roles.viewer};
    grant select on t4.people to ${db.roles.viewer};
    select snapbase.register_table('t4.people');`);
});
afterAll(async () => {
  await server?.close();
});

describe("workbook lifecycle", () => {
  it("creates a schema per workbook, holds tables a DBA can query, and drops it all on delete", async () => {
    await asActor(actorOf(alice), async (c) => {
      const { wb, table, rel } = await workbookWithTable(c);
      expect(wb.schema_name).toBe(`workbook_${wb.id}`);
      expect(wb.owner_id).toBe(alice.id);
      expect(await one(c, "select count(*)::int from pg_namespace where nspname = $1", [wb.schema_name])).toBe(1);
      const cols = (await c.query(`select a.attname from pg_attribute a join pg_class k on k.oid = a.attrelid join pg_namespace n on n.oid = k.relnamespace
                                    where n.nspname = $1 and k.relname = $2 and a.attnum > 0 order by a.attnum`, [wb.schema_name, table.table_name])).rows.map((r) => r.attname);
      expect(cols.slice(0, 4)).toEqual(["code", "name", "amount", "city"]);
      expect(cols).toContain("__last_seen");
      expect(table).toMatchObject({ remote_id_column: "code", title_column: "name", page_size: 50, hidden: false });

      const renamed = (await c.query("select * from snapbase.rename_workbook($1, 'Renamed')", [wb.id])).rows[0];
      expect(renamed.name).toBe("Renamed");
      const hidden = (await c.query("select * from snapbase.set_workbook_table_hidden($1, true)", [table.id])).rows[0];
      expect(hidden.hidden).toBe(true);
      // App roles cannot reach the schema directly: only through the functions.
      expect((await refusal(c, `select * from ${rel}`)).code).toBe("42501");

      await c.query("select snapbase.delete_workbook($1)", [wb.id]);
      expect(await one(c, "select count(*)::int from pg_namespace where nspname = $1", [wb.schema_name])).toBe(0);
      expect(await one(c, "select count(*)::int from snapbase.workbook_tables where workbook_id = $1", [wb.id])).toBe(0);
    });
  });

  it("audits every change with who did it", async () => {
    const token = await login(alice);
    const created = await graphql(server.url, `mutation { createWorkbook(input: { name: "Audited" }) { result { rowId schemaName } } }`, {}, token);
    const id = created.body.data.createWorkbook.result.rowId;
    await graphql(server.url, `mutation($id: BigInt!) { renameWorkbook(input: { workbookId: $id, name: "Audited 2" }) { result { name } } }`, { id }, token);
    await graphql(server.url, `mutation($id: BigInt!) { deleteWorkbook(input: { workbookId: $id }) { result { rowId } } }`, { id }, token);
    const { rows } = await owner().query("select action, actor from snapbase.audit_log where details ->> 'workbook_id' = $1 order by id", [String(id)]);
    expect(rows).toEqual(["create_workbook", "rename_workbook", "delete_workbook"].map((action) => ({ action, actor: alice.email })));
    expect((await owner().query("select count(*)::int as n from pg_namespace where nspname = $1", [`workbook_${id}`])).rows[0].n).toBe(0);
  });
});

describe("a working copy of a managed table", () => {
  it("holds enum, domain, composite and array columns as the postgres connector maps them, with every value", async () => {
    await owner().query(`
      create type t4.color as enum ('red', 'green');
      create domain t4.pct as numeric(5, 2) check (value between 0 and 100);
      create type t4.pair as (a int, b text);
      create table t4.kinds (id int primary key, c t4.color, p t4.pct, pr t4.pair, cs t4.color[], ns int[]);
      insert into t4.kinds values (1, 'green', 12.50, (1, 'x'), '{red,green}', '{1,2}'), (2, null, null, null, null, null);
      grant select on t4.kinds to ${db.roles.viewer};
      select snapbase.register_table('t4.kinds');`);
    await asActor(actorOf(alice), async (c) => {
      const wb = (await c.query("select * from snapbase.create_workbook('Kinds')")).rows[0];
      // Before: "column c: type 't4.color' is not a type name …".
      const table = (await c.query("select * from snapbase.copy_managed_table_to_workbook($1, 't4.kinds')", [wb.id])).rows[0];
      expect(table.columns.map((col: any) => [col.name, col.type])).toEqual([
        ["id", "integer"], ["c", "text"], ["p", "numeric(5,2)"], ["pr", "jsonb"], ["cs", "text[]"], ["ns", "integer[]"]]);
      expect(await one(c, "select snapbase.workbook_record($1, 1)", [table.id])).toMatchObject({
        values: { id: 1, c: "green", p: 12.5, pr: { a: 1, b: "x" }, cs: ["red", "green"], ns: [1, 2] }, state: { dirty: false } });
      expect((await one(c, "select snapbase.workbook_record($1, 2)", [table.id])).values).toEqual({ id: 2, c: null, p: null, pr: null, cs: null, ns: null });
    });
  });
});

describe("records", () => {
  it("creates, reads, updates, deletes and undeletes, with edit flags against the source's values", async () => {
    await asActor(actorOf(alice), async (c) => {
      const wb = (await c.query("select * from snapbase.create_workbook('Copy')")).rows[0];
      const table = (await c.query("select * from snapbase.copy_managed_table_to_workbook($1, 't4.people')", [wb.id])).rows[0];
      expect(table.source).toMatchObject({ kind: "managed_table", table: "t4.people" });
      const first = await one(c, "select snapbase.workbook_record($1, 1)", [table.id]);
      expect(first).toMatchObject({ remote_id: "1", values: { id: 1, name: "person 1", city: "Lyon", score: 1.5 }, edited: {}, state: { dirty: false } });

      const updated = await one(c, "select snapbase.update_record($1, 1, $2)", [table.id, { city: "Nice", score: "2.25" }]);
      expect(updated.values).toMatchObject({ city: "Nice", score: 2.25 });
      expect(Object.keys(updated.edited).sort()).toEqual(["city", "score"]);
      expect(updated.state.dirty).toBe(true);
      // Back to the value last seen at the source: no longer an edit.
      const reverted = await one(c, "select snapbase.update_record($1, 1, $2)", [table.id, { city: "Lyon" }]);
      expect(Object.keys(reverted.edited)).toEqual(["score"]);

      const bad = await refusal(c, "select snapbase.update_record($1, 1, $2)", [table.id, { score: "lots" }]);
      expect(bad).toMatchObject({ code: "22023", message: expect.stringMatching(/column score: invalid input syntax for type numeric/) });
      expect((await refusal(c, "select snapbase.update_record($1, 1, $2)", [table.id, { nope: 1 }])).message).toMatch(/unknown column\(s\).*nope/);
      expect((await refusal(c, "select snapbase.update_record($1, 1, $2)", [table.id, { id: 99 }])).message).toMatch(/read-only column\(s\) cannot be changed: id/);
      expect((await refusal(c, "select snapbase.update_record($1, 999, $2)", [table.id, { city: "x" }])).code).toBe("P0002");

      const created = await one(c, "select snapbase.create_record($1, $2)", [table.id, { id: 100, name: "new one" }]);
      expect(created).toMatchObject({ remote_id: null, values: { id: 100, name: "new one", city: null }, state: { created: true, dirty: true } });
      expect(await one(c, "select snapbase.delete_record($1, $2)", [table.id, created.id])).toBe("removed");
      expect((await refusal(c, "select snapbase.workbook_record($1, $2)", [table.id, created.id])).code).toBe("P0002");

      expect(await one(c, "select snapbase.delete_record($1, 2)", [table.id])).toBe("marked_deleted");
      expect((await one(c, "select snapbase.workbook_record($1, 2)", [table.id])).state).toMatchObject({ deleted: true, dirty: true });
      const undeleted = await one(c, "select snapbase.undelete_record($1, 2)", [table.id]);
      expect(undeleted.state).toMatchObject({ deleted: false, dirty: false });
      expect(await one(c, "select (snapbase.workbook_record_counts($1)).total", [table.id])).toBe("20");
    });
  });

  it("applies bulk edits all or nothing, reporting each failing operation", async () => {
    await asActor(actorOf(alice), async (c) => {
      const { table } = await workbookWithTable(c);
      const ok = await one(c, "select snapbase.bulk_edit_records($1, $2)", [table.id, JSON.stringify(
        Array.from({ length: 50 }, (_, i) => ({ op: "create", values: { code: i, name: `n${i}`, amount: i } })))]);
      expect(ok).toMatchObject({ ok: true, applied: 50, errors: [] });
      const all = async () => (await one(c, "select snapbase.workbook_records($1, 1000)", [table.id])).records;
      const before = await all();
      const failed = await one(c, "select snapbase.bulk_edit_records($1, $2)", [table.id, JSON.stringify([
        { op: "update", id: ok.record_ids[0], values: { name: "changed" } },
        { op: "create", values: { name: "extra" } },
        { op: "update", id: ok.record_ids[1], values: { amount: "not a number" } },
        { op: "delete", id: ok.record_ids[2] },
        { op: "update", id: 999999, values: { name: "ghost" } },
        { op: "explode" },
      ])]);
      expect(failed.ok).toBe(false);
      expect(failed.applied).toBe(0);
      expect(failed.errors.map((e: any) => e.index)).toEqual([2, 4, 5]);
      expect(failed.errors[0].error).toMatch(/column amount/);
      expect(failed.errors[1].error).toMatch(/no record 999999/);
      expect(failed.errors[2].error).toMatch(/op must be create, update, delete or undelete/);
      // Nothing of the batch remains, not even the operations that succeeded.
      expect(await all()).toEqual(before);
    });
  });
});

describe("paging, sorting and filtering", () => {
  it("pages through thousands of rows in every order, with and without the filter, matching plain SQL", async () => {
    await asActor(actorOf(alice), async (c) => {
      const { table } = await workbookWithTable(c);
      const ops = Array.from({ length: 3000 }, (_, i) => ({
        op: "create",
        values: { code: i, name: `name ${(i * 7919) % 3000}`, amount: i % 17 === 0 ? null : (i * 31) % 500, city: ["Paris", "Lyon", "Nice", null][i % 4] },
      }));
      expect((await one(c, "select snapbase.bulk_edit_records($1, $2)", [table.id, JSON.stringify(ops)])).ok).toBe(true);
      await c.query("select snapbase.set_table_filter($1, $2)", [table.id, "amount >= 100 and city in ('Paris', 'Nice')"]);
      const counts = (await c.query("select * from snapbase.workbook_record_counts($1)", [table.id])).rows[0];
      const expectedFiltered = ops.filter((o) => o.values.amount !== null && o.values.amount >= 100 && ["Paris", "Nice"].includes(o.values.city!)).length;
      expect(counts).toMatchObject({ total: "3000", filtered: String(expectedFiltered) });

      for (const [sort, desc, useFilter] of [[null, false, true], ["amount", false, true], ["amount", true, true], ["city", false, false], ["name", true, false], [null, true, false]] as const) {
        const ids: number[] = [];
        let after: string | null = null;
        let pages = 0;
        do {
          const page: any = await one(c, "select snapbase.workbook_records($1, 97, $2, $3, $4, $5)", [table.id, after, sort, desc, useFilter]);
          ids.push(...page.records.map((r: any) => r.id));
          after = page.next_cursor;
          pages++;
        } while (after && pages < 100);
        // The expected order, computed by PostgreSQL from the same values (same collation).
        const dir = desc ? "desc" : "asc";
        const expected = (await c.query(`
          select id from (
            select ord as id, (o -> 'values' ->> 'amount')::numeric as amount, o -> 'values' ->> 'city' as city, o -> 'values' ->> 'name' as name
              from jsonb_array_elements($1::jsonb) with ordinality e(o, ord)) r
           where ${useFilter ? "amount >= 100 and city in ('Paris', 'Nice')" : "true"}
           order by ${sort ? `${sort} ${dir} nulls last, id ${dir}` : `id ${dir}`}`, [JSON.stringify(ops)])).rows.map((r) => Number(r.id));
        expect(expected.length).toBe(useFilter ? expectedFiltered : 3000);
        expect(ids, `${sort} ${dir} filter=${useFilter}`).toEqual(expected);
      }
      expect((await refusal(c, "select snapbase.workbook_records($1, 10, 'garbage')", [table.id])).message).toMatch(/not a cursor/);
      expect((await refusal(c, "select snapbase.workbook_records($1, 10, null, 'nope')", [table.id])).message).toMatch(/unknown sort column/);
    });
  });
});

describe("filters", () => {
  const hostile: [string, RegExp][] = [
    ["exists (select 1 from snapbase.users)", /subqueries/],
    ["name in (select email from snapbase.users)", /subqueries/],
    ["name = (select schema_name from snapbase.workbooks limit 1)", /subqueries/],
    ["pg_sleep(5) is null", /function pg_sleep/],
    ["dblink('host=x', 'select 1') is null", /dblink/],
    ["true; drop table snapbase.users", /syntax error|more than one statement/],
    ["true); drop table snapbase.users; select (1", /syntax error|more than one statement/],
    ["current_setting('jwt.claims.user_id') = '1'", /function current_setting/],
    ["set_config('role', 'postgres', false) is not null", /function set_config/],
    ["'snapbase.users'::regclass is not null", /type regclass/],
    ["name::regclass is not null", /regclass/],
    ["'pg_sleep'::regproc is not null", /type regproc/],
    ["__id > 0", /column "__id" does not exist/],
    ["__suggested::text like '%'", /column "__suggested" does not exist/],
    ["xmin::text <> ''", /column "xmin" does not exist/],
    ["customers is not null", /whole-row reference|customers/],
    ["current_user = 'postgres'", /current_user/],
    ["workbook_1.customers.name = 'x'", /FROM-clause|does not exist/],
    ["lo_import('/etc/passwd') > 0", /function lo_import/],
    ["pg_read_file('/etc/passwd') <> ''", /function pg_read_file/],
    ["query_to_xml('select 1', true, true, '') is not null", /function query_to_xml/],
    ["txid_current() > 0", /function txid_current/],
    ["random() < 0.5", /function random/],
    ["nextval('snapbase.users_id_seq') > 0", /function nextval|regclass/],
    ["$1 = 1", /positional parameters/],
  ];
  it.each(hostile)("refuses %s, naming the problem and leaving the filter unchanged", async (filter, why) => {
    await asActor(actorOf(alice), async (c) => {
      const { table } = await workbookWithTable(c);
      await c.query("select snapbase.set_table_filter($1, 'amount > 1')", [table.id]);
      const error = await refusal(c, "select snapbase.set_table_filter($1, $2)", [table.id, filter]);
      expect(error.code).toBe("22023");
      expect(error.message).toMatch(/^filter refused: /);
      expect(error.message).toMatch(why);
      expect(await one(c, "select filter from snapbase.workbook_tables where id = $1", [table.id])).toBe("amount > 1");
    });
  });

  it("accepts expressions over the table's columns with operators and allowed functions", async () => {
    await asActor(actorOf(alice), async (c) => {
      const { table } = await workbookWithTable(c);
      for (const filter of [
        "amount > 10 and lower(city) = 'paris'",
        "name ilike '%ann%' or city ~ '^P' or city is null",
        "coalesce(amount, 0) between 1 and 100 and code in (1, 2, 3)",
        "date_trunc('day', now()) <= now() and length(trim(name)) > 2",
        "amount::integer % 2 = 0 and round(amount, 1) <> 3.5",
      ]) {
        const saved = (await c.query("select * from snapbase.set_table_filter($1, $2)", [table.id, filter])).rows[0];
        expect(saved.filter).toBe(filter);
      }
      expect((await c.query("select * from snapbase.set_table_filter($1, '  ')", [table.id])).rows[0].filter).toBeNull();
    });
  });

  // Issue 13: a filter used to be checked inside parentheses, so an unfinished one
  // was "syntax error at or near ")"", a parenthesis the user never typed.
  it.each([
    ["amount >", "syntax error at end of input"],
    ["lower(city = 'paris'", "syntax error at end of input"],
    ["name = 'x' and", "syntax error at end of input"],
    ["amount > > 1", 'syntax error at or near ">"'],
    ["(amount > 1", "syntax error at end of input"],
  ])("a syntax error in %s names what the user typed", async (filter, message) => {
    await asActor(actorOf(alice), async (c) => {
      const { table } = await workbookWithTable(c);
      const error = await refusal(c, "select snapbase.set_table_filter($1, $2)", [table.id, filter]);
      expect(error).toMatchObject({ code: "22023", message: `filter refused: ${message}` });
    });
  });

  it("keeps remote ids unique, while any number of local records have none", async () => {
    const { token, wb, rel } = await committedWorkbookTable("Remote ids");
    await owner().query(`insert into ${rel} (code, name) select g, 'local' from generate_series(1, 3) g`);
    await owner().query(`insert into ${rel} (code, name, __remote_id) values (10, 'remote', 'r1')`);
    const twice = await sqlState(() => owner().query(`insert into ${rel} (code, name, __remote_id) values (11, 'again', 'r1')`));
    expect(twice.code).toBe("23505");
    await graphql(server.url, `mutation($id: BigInt!) { deleteWorkbook(input: { workbookId: $id }) { clientMutationId } }`, { id: wb }, token);
  });

  it("runs under the request's statement timeout", async () => {
    // Only the slow read goes through the strict server: setup runs under the normal
    // timeout so a busy machine cannot make it the statement that times out.
    const { token, wb, t, rel } = await committedWorkbookTable("Slow");
    await owner().query(`insert into ${rel} (code, name) select g, repeat('ab', 500) || g from generate_series(1, 40000) g`);
    const saved = await graphql(server.url, `mutation($t: BigInt!) { setTableFilter(input: { tableId: $t, filter: "name ~ '(a|b|ab)*c'" }) { clientMutationId } }`, { t }, token);
    expect(saved.body.errors).toBeUndefined();
    const strict = await startTestServer({ statementTimeoutMs: 100 });
    try {
      const slow = await graphql(strict.url, `query($t: BigInt!) { workbookRecordCounts(tableId: $t) { filtered } }`, { t }, token);
      expect(slow.body.errors?.[0]?.message).toMatch(/statement timeout/);
    } finally {
      await strict.close();
    }
    await graphql(server.url, `mutation($id: BigInt!) { deleteWorkbook(input: { workbookId: $id }) { clientMutationId } }`, { id: wb }, token);
  });
});

describe("settings and scratch columns", () => {
  it("stores settings with the table and refuses unknown columns", async () => {
    await asActor(actorOf(alice), async (c) => {
      const { table } = await workbookWithTable(c);
      const t = (await c.query("select * from snapbase.update_table_settings($1, hidden_columns => '{city}', column_order => '{name,code}', sort_column => 'amount', sort_descending => true, page_size => 25)", [table.id])).rows[0];
      expect(t).toMatchObject({ hidden_columns: ["city"], column_order: ["name", "code"], sort_column: "amount", sort_descending: true, page_size: 25, title_column: "name" });
      const kept = (await c.query("select * from snapbase.update_table_settings($1, title_column => 'city')", [table.id])).rows[0];
      expect(kept).toMatchObject({ sort_column: "amount", hidden_columns: ["city"], title_column: "city" });
      expect((await refusal(c, "select snapbase.update_table_settings($1, hidden_columns => '{ghost}')", [table.id])).message).toMatch(/unknown column\(s\): ghost/);
      expect((await refusal(c, "select snapbase.update_table_settings($1, page_size => 5000)", [table.id])).code).toBe("22023");
    });
  });

  it("scratch columns are local: never in the publish preview; removing one rejects its suggestions", async () => {
    await asActor(actorOf(alice), async (c) => {
      const wb = (await c.query("select * from snapbase.create_workbook('Scratch')")).rows[0];
      const table = (await c.query("select * from snapbase.copy_managed_table_to_workbook($1, 't4.people')", [wb.id])).rows[0];
      await c.query("select snapbase.add_scratch_column($1, 'notes')", [table.id]);
      await c.query("select snapbase.update_record($1, 1, $2)", [table.id, { notes: "only here" }]);
      await c.query("select snapbase.update_record($1, 2, $2)", [table.id, { notes: "and here", city: "Nice" }]);
      await c.query("select snapbase.create_record($1, $2)", [table.id, { id: 500, name: "fresh", notes: "local note" }]);
      await c.query("select snapbase.suggest_values($1, 3, $2)", [table.id, { notes: "suggested note" }]);

      const preview = await one(c, "select snapbase.publish_preview($1)", [wb.id]);
      const entry = preview.tables[0];
      expect(JSON.stringify(preview)).not.toMatch(/notes|only here|local note/);
      expect(entry).toMatchObject({ create_count: 1, update_count: 1, delete_count: 0 });
      expect(entry.updates).toEqual([{ id: 2, remote_id: "2", fields: [{ column: "city", before: "Paris", after: "Nice", edited_at: expect.any(String) }] }]);
      expect(entry.creates[0].values).toEqual({ id: 500, name: "fresh", city: null, score: null });

      const removed = (await c.query("select * from snapbase.remove_scratch_column($1, 'notes')", [table.id])).rows[0];
      expect(removed.columns.map((col: any) => col.name)).toEqual(["id", "name", "city", "score"]);
      expect((await one(c, "select snapbase.workbook_record($1, 3)", [table.id])).suggested).toEqual({});
      expect(await one(c, "select snapbase.accept_suggestions($1)", [table.id])).toMatchObject({ records: 0 });
      expect((await refusal(c, "select snapbase.remove_scratch_column($1, 'city')", [table.id])).message).toMatch(/no scratch column city/);
    });
  });
});

describe("suggestions", () => {
  async function seeded(c: pg.ClientBase) {
    const wb = (await c.query("select * from snapbase.create_workbook('Suggestions')")).rows[0];
    const table = (await c.query("select * from snapbase.copy_managed_table_to_workbook($1, 't4.people')", [wb.id])).rows[0];
    for (const id of [1, 2, 3, 4]) await c.query("select snapbase.suggest_values($1, $2, $3)", [table.id, id, { name: `better ${id}`, city: "Nice" }]);
    return table;
  }
  const record = (c: pg.ClientBase, t: any, id: number) => one(c, "select snapbase.workbook_record($1, $2)", [t.id, id]);

  it("accepts per cell, per record, all and within the filter, copying values and flagging edits", async () => {
    await asActor(actorOf(alice), async (c) => {
      const t = await seeded(c);
      expect(await one(c, "select snapbase.accept_suggestions($1, 1, 'city')", [t.id])).toMatchObject({ records: 1, cells: 1 });
      let r1 = await record(c, t, 1);
      expect(r1.values.city).toBe("Nice");
      expect(Object.keys(r1.edited)).toEqual(["city"]);
      expect(Object.keys(r1.suggested)).toEqual(["name"]);

      expect(await one(c, "select snapbase.accept_suggestions($1, 2)", [t.id])).toMatchObject({ records: 1, cells: 2 });
      expect((await record(c, t, 2)).values).toMatchObject({ name: "better 2", city: "Nice" });
      expect((await record(c, t, 3)).values.name).toBe("person 3");

      // Records 3 (odd: Lyon) and 4 (even: Paris): the filter keeps only Paris.
      await c.query("select snapbase.set_table_filter($1, $2)", [t.id, "city = 'Paris'"]);
      expect(await one(c, "select snapbase.accept_suggestions($1, within_filter => true)", [t.id])).toMatchObject({ records: 1 });
      expect((await record(c, t, 4)).values.name).toBe("better 4");
      expect((await record(c, t, 3)).values.name).toBe("person 3");

      expect(await one(c, "select snapbase.accept_suggestions($1)", [t.id])).toMatchObject({ records: 2, cells: 3 });
      // Accepting the value the source already has is not an edit.
      await c.query("select snapbase.suggest_values($1, 6, $2)", [t.id, { city: "Paris", name: "person 6 (new)" }]);
      await c.query("select snapbase.accept_suggestions($1, 6)", [t.id]);
      expect(Object.keys((await record(c, t, 6)).edited)).toEqual(["name"]);
      r1 = await record(c, t, 1);
      expect(r1.values.name).toBe("better 1");
      expect(r1.suggested).toEqual({});
      expect(await one(c, "select jsonb_array_length(snapbase.workbook_suggestions($1))", [t.id])).toBe(0);
    });
  });

  it("rejects per cell, per record and all; new-record and deletion suggestions follow the decision", async () => {
    await asActor(actorOf(alice), async (c) => {
      const t = await seeded(c);
      await c.query("select snapbase.reject_suggestions($1, 1, 'name')", [t.id]);
      expect(Object.keys((await record(c, t, 1)).suggested)).toEqual(["city"]);
      await c.query("select snapbase.reject_suggestions($1, 2)", [t.id]);
      expect((await record(c, t, 2)).suggested).toEqual({});
      expect(Object.keys((await record(c, t, 3)).suggested).sort()).toEqual(["city", "name"]);

      const proposed = await one(c, "select snapbase.suggest_new_record($1, $2)", [t.id, { id: 77, name: "proposed" }]);
      const doomed = await one(c, "select snapbase.suggest_new_record($1, $2)", [t.id, { id: 78, name: "doomed" }]);
      await c.query("select snapbase.suggest_delete($1, 5)", [t.id]);
      expect(await one(c, "select (snapbase.workbook_record_counts($1)).total", [t.id])).toBe("20");
      await c.query("select snapbase.reject_suggestions($1, $2)", [t.id, doomed.id]);
      expect((await refusal(c, "select snapbase.workbook_record($1, $2)", [t.id, doomed.id])).code).toBe("P0002");

      const result = await one(c, "select snapbase.accept_suggestions($1)", [t.id]);
      expect(result).toMatchObject({ created: 1, deleted: 1 });
      expect((await record(c, t, proposed.id))).toMatchObject({ values: { id: 77, name: "proposed" }, state: { created: true, suggested_new: false } });
      expect((await record(c, t, 5)).state).toMatchObject({ deleted: true, suggest_delete: null });

      await c.query("select snapbase.reject_suggestions($1)", [t.id]);
      expect(await one(c, "select jsonb_array_length(snapbase.workbook_suggestions($1))", [t.id])).toBe(0);
    });
  });

  it("refuses suggestions on read-only or unknown columns, or of the wrong type", async () => {
    await asActor(actorOf(alice), async (c) => {
      const t = await seeded(c);
      expect((await refusal(c, "select snapbase.suggest_values($1, 1, $2)", [t.id, { id: 5 }])).message).toMatch(/read-only column\(s\) cannot be changed: id/);
      expect((await refusal(c, "select snapbase.suggest_values($1, 1, $2)", [t.id, { ghost: 5 }])).message).toMatch(/unknown column\(s\).*ghost/);
      expect((await refusal(c, "select snapbase.suggest_values($1, 1, $2)", [t.id, { score: "high" }])).message).toMatch(/column score: invalid input/);
    });
  });
});

describe("agents and isolation, over GraphQL", () => {
  it("an agent token reads pages without hidden columns and writes suggestions, nothing else, only on its workbook", async () => {
    const token = await login(alice);
    const gql = (q: string, v: Record<string, unknown> = {}, t = token) => graphql(server.url, q, v, t);
    const wb = (await gql(`mutation { createWorkbook(input: { name: "Agent's" }) { result { rowId } } }`)).body.data.createWorkbook.result.rowId;
    const other = (await gql(`mutation { createWorkbook(input: { name: "Not the agent's" }) { result { rowId } } }`)).body.data.createWorkbook.result.rowId;
    const copy = async (w: string) => (await gql(`mutation($w: BigInt!) { copyManagedTableToWorkbook(input: { workbookId: $w, managedTable: "t4.people" }) { result { rowId } } }`, { w })).body.data.copyManagedTableToWorkbook.result.rowId;
    const t = await copy(wb);
    const otherT = await copy(other);
    await gql(`mutation($t: BigInt!) { updateTableSettings(input: { tableId: $t, hiddenColumns: ["score"] }) { clientMutationId } }`, { t });
    const agent = (await gql(`mutation($w: BigInt!) { createAgentToken(input: { workbookId: $w, name: "helper bot" }) { result } }`, { w: wb })).body.data.createAgentToken.result;
    expect(agent).toMatch(/^sbt_/);

    const page = await gql(`query($t: BigInt!) { workbookRecords(tableId: $t, pageSize: 5) }`, { t }, agent);
    expect(page.body.errors).toBeUndefined();
    expect(page.body.data.workbookRecords.records).toHaveLength(5);
    expect(Object.keys(page.body.data.workbookRecords.records[0].values).sort()).toEqual(["city", "id", "name"]);
    const next = await gql(`query($t: BigInt!, $after: String) { workbookRecords(tableId: $t, pageSize: 5, after: $after) }`, { t, after: page.body.data.workbookRecords.next_cursor }, agent);
    expect(next.body.data.workbookRecords.records[0].id).toBe(6);

    const suggested = await gql(`mutation($t: BigInt!) { suggestValues(input: { tableId: $t, recordId: "1", values: { name: "from the agent" } }) { result } }`, { t }, agent);
    expect(suggested.body.data.suggestValues.result.suggested.name).toMatchObject({ value: "from the agent", by: `${alice.email} (agent)` });

    const refused = [
      [`mutation($t: BigInt!) { updateRecord(input: { tableId: $t, recordId: "1", values: { name: "x" } }) { result } }`, { t }],
      [`mutation($t: BigInt!) { acceptSuggestions(input: { tableId: $t }) { result } }`, { t }],
      [`mutation($t: BigInt!) { updateTableSettings(input: { tableId: $t, hiddenColumns: [] }) { clientMutationId } }`, { t }],
      [`mutation($t: BigInt!) { setTableFilter(input: { tableId: $t, filter: "true" }) { clientMutationId } }`, { t }],
      [`mutation($t: BigInt!) { suggestValues(input: { tableId: $t, recordId: "1", values: { score: 1 } }) { result } }`, { t }],
      [`query($t: BigInt!) { workbookRecords(tableId: $t) }`, { t: otherT }],
      [`mutation($t: BigInt!) { suggestValues(input: { tableId: $t, recordId: "1", values: { name: "x" } }) { result } }`, { t: otherT }],
      [`mutation { createWorkbook(input: { name: "agent's own" }) { clientMutationId } }`, {}],
      [`mutation($w: BigInt!) { createAgentToken(input: { workbookId: $w, name: "more" }) { result } }`, { w: wb }],
    ] as const;
    for (const [q, v] of refused) {
      const res = await gql(q, v, agent);
      expect(res.body.errors?.length, q).toBeGreaterThan(0);
      expect(["42501", "P0002", "22023"], q).toContain(res.body.errors![0]!.extensions?.code);
    }
    const visible = await gql(`{ allWorkbooks { nodes { rowId } } }`, {}, agent);
    expect(visible.body.data.allWorkbooks.nodes.map((n: any) => n.rowId)).toEqual([wb]);
    // The refused calls left the data as it was.
    const r1 = await gql(`query($t: BigInt!) { workbookRecord(tableId: $t, recordId: "1") }`, { t });
    expect(r1.body.data.workbookRecord.values.name).toBe("person 1");
    await gql(`mutation($w: BigInt!) { deleteWorkbook(input: { workbookId: $w }) { clientMutationId } }`, { w: wb });
    await gql(`mutation($w: BigInt!) { deleteWorkbook(input: { workbookId: $w }) { clientMutationId } }`, { w: other });
    // Deleting the workbook deletes its agent tokens.
    expect((await gql(`{ currentUser { email } }`, {}, agent)).status).toBe(401);
  });

  it("user B cannot see or touch user A's workbook, by listing or by guessing ids, until it is shared", async () => {
    const [a, b] = [await login(alice), await login(bob)];
    const wbA = (await graphql(server.url, `mutation { createWorkbook(input: { name: "Alice's secrets" }) { result { rowId organizationId } } }`, {}, a)).body.data.createWorkbook.result;
    const tA = (await graphql(server.url, `mutation($w: BigInt!) { copyManagedTableToWorkbook(input: { workbookId: $w, managedTable: "t4.people" }) { result { rowId } } }`, { w: wbA.rowId }, a)).body.data.copyManagedTableToWorkbook.result.rowId;

    const listed = await graphql(server.url, `{ allWorkbooks { nodes { rowId } } allWorkbookTables { nodes { rowId } } }`, {}, b);
    expect(listed.body.data.allWorkbooks.nodes.map((n: any) => n.rowId)).not.toContain(wbA.rowId);
    expect(listed.body.data.allWorkbookTables.nodes.map((n: any) => n.rowId)).not.toContain(tA);
    const attempts = [
      [`query($t: BigInt!) { workbookRecords(tableId: $t) }`, { t: tA }],
      [`query($t: BigInt!) { workbookRecord(tableId: $t, recordId: "1") }`, { t: tA }],
      [`query($t: BigInt!) { workbookRecordCounts(tableId: $t) { total } }`, { t: tA }],
      [`query($w: BigInt!) { publishPreview(workbookId: $w) }`, { w: wbA.rowId }],
      [`mutation($t: BigInt!) { updateRecord(input: { tableId: $t, recordId: "1", values: { name: "pwned" } }) { result } }`, { t: tA }],
      [`mutation($t: BigInt!) { suggestValues(input: { tableId: $t, recordId: "1", values: { name: "pwned" } }) { result } }`, { t: tA }],
      [`mutation($w: BigInt!) { renameWorkbook(input: { workbookId: $w, name: "pwned" }) { clientMutationId } }`, { w: wbA.rowId }],
      [`mutation($w: BigInt!) { deleteWorkbook(input: { workbookId: $w }) { clientMutationId } }`, { w: wbA.rowId }],
      [`mutation($w: BigInt!) { createAgentToken(input: { workbookId: $w, name: "x" }) { result } }`, { w: wbA.rowId }],
    ] as const;
    for (const [q, v] of attempts) {
      const res = await graphql(server.url, q, v, b);
      // "No such workbook" for ids that exist and ids that do not: nothing to probe.
      expect(res.body.errors?.[0]?.extensions?.code, q).toBe("P0002");
    }
    const missing = await graphql(server.url, `query { workbookRecords(tableId: "99999999") }`, {}, b);
    expect(missing.body.errors?.[0]?.message).toBe(`no workbook table 99999999`);

    // Shared as viewer (B accepts an invitation to A's organization first): read yes, write no.
    const invited = await graphql(server.url, `mutation($o: BigInt!, $e: String!) { inviteOrganizationMember(input: { organizationId: $o, email: $e }) { result { rowId } } }`, { o: wbA.organizationId, e: bob.email }, a);
    await graphql(server.url, `mutation($i: BigInt!) { acceptOrganizationInvitation(input: { invitationId: $i }) { clientMutationId } }`, { i: invited.body.data.inviteOrganizationMember.result.rowId }, b);
    const shared = await graphql(server.url, `mutation($w: BigInt!, $e: String!) { shareWorkbook(input: { workbookId: $w, email: $e, access: viewer }) { result { access } } }`, { w: wbA.rowId, e: bob.email }, a);
    expect(shared.body.errors).toBeUndefined();
    expect(shared.body.data.shareWorkbook.result.access).toBe("viewer");
    const read = await graphql(server.url, `query($t: BigInt!) { workbookRecords(tableId: $t, pageSize: 2) }`, { t: tA }, b);
    expect(read.body.data.workbookRecords.records).toHaveLength(2);
    const write = await graphql(server.url, `mutation($t: BigInt!) { updateRecord(input: { tableId: $t, recordId: "1", values: { name: "pwned" } }) { result } }`, { t: tA }, b);
    expect(write.body.errors?.[0]).toMatchObject({ message: expect.stringMatching(/needs edit access/), extensions: { code: "42501" } });
    await graphql(server.url, `mutation($w: BigInt!) { deleteWorkbook(input: { workbookId: $w }) { clientMutationId } }`, { w: wbA.rowId }, a);
  });
});
