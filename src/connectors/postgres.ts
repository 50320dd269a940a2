// Connector for any PostgreSQL reachable by a connection string. Tables are named
// "schema.table"; a record is a row as to_jsonb renders it, identified by its
// single-column primary key as text.
import pg from "pg";
import { parse } from "pg-connection-string";
import { createPool } from "../db/pools.ts";
import {
  ConnectorError,
  type ColumnSpec,
  type Connector,
  type DownloadOptions,
  type RecordOutcome,
  type RemoteRecord,
  type TableSpec,
  type WriteOptions,
} from "./types.ts";
import {
  NETWORK_ERROR_CODES,
  applyEachInTransaction,
  connectorFailures,
  isPlainError,
  messageOf,
  missingRecord,
  parseRowJson,
  postgresWriteStatus,
} from "./values.ts";
import { redactText, secretsOfConnectionString } from "../redact.ts";

export interface PostgresCredentials {
  connectionString: string;
  /** The address the connection goes to (checked by connectors/targets.ts); unset: the string's host. */
  address?: string;
  /**
   * For this database's managed tables: the role every query runs as (the job
   * creator's), so reads carry that user's table and column privileges, and only
   * managed tables are listed.
   */
  managedAs?: string;
}

const LIST_MANAGED_TABLES = `select qualified_name as name from snapbase.managed_tables order by qualified_name`;

/** A table resolved through the catalog, with the quoted names its SQL needs. */
interface ResolvedTable {
  spec: TableSpec;
  /** "schema"."table", quoted. */
  sql: string;
  /** The primary key column, quoted. */
  pk: string;
  writableColumns: ReadonlySet<string>;
  jsonColumns: ReadonlySet<string>;
}

const quote = pg.escapeIdentifier;

/**
 * The settings that decide how a source prints and reads values, pinned for every
 * source session. They travel in the startup packet (libpq's `-c` options), which
 * outranks what the source's postgresql.conf, `alter database … set` and `alter role
 * … set` say: otherwise extra_float_digits = 0 would round float8 1.0000000000000002
 * to 1, IntervalStyle = sql_standard would print '-1 days -02:03:04' in a form read
 * back as '-1 days +02:03:04', bytea_output = escape would change bytes' text, and
 * DateStyle / TimeZone would change how dates and times are printed and read.
 * (search_path is left alone: the source's triggers and defaults may rely on it.)
 */
export const SOURCE_SESSION_SETTINGS: Readonly<Record<string, string>> = {
  extra_float_digits: "3",
  IntervalStyle: "postgres",
  DateStyle: "ISO, MDY",
  TimeZone: "UTC",
  bytea_output: "hex",
  standard_conforming_strings: "on",
  client_encoding: "UTF8",
  xmloption: "content",
};

export function postgresConnector(credentials: PostgresCredentials): Connector {
  // Every secret of the connection string (user info, query string), hidden from every message.
  const secrets = secretsOfConnectionString(credentials.connectionString);
  // A connection the source drops (idle or in use) must not crash the process; the next query reports it.
  // Every session has the output settings values are read and written in (SOURCE_SESSION_SETTINGS),
  // whatever the source's server, database or role sets. Managed tables are read as the job's
  // creator (the role is set for the whole session).
  const pool = createPool({
    name: "postgres source",
    clientConfig: postgresClientConfig(credentials.connectionString, credentials.address),
    max: 2,
    connectionTimeoutMillis: 10_000,
    quiet: true,
    sessionSettings: { ...SOURCE_SESSION_SETTINGS, ...(credentials.managedAs ? { role: credentials.managedAs } : {}) },
  });

  const { guard, guardDownload } = connectorFailures((error) => describeError(error, secrets));

  async function withClient<T>(work: (client: pg.PoolClient) => Promise<T>): Promise<T> {
    const client = await pool.connect();
    try {
      const result = await work(client);
      client.release();
      return result;
    } catch (error) {
      client.release(leavesClientUsable(error) ? undefined : asError(error));
      throw error;
    }
  }

  const resolve = (table: string) => withClient((client) => resolveTable(client, table));

  return {
    test: () => guard(async () => void (await pool.query("select 1"))),

    listTables: () => guard(async () => (await pool.query(credentials.managedAs ? LIST_MANAGED_TABLES : LIST_TABLES)).rows.map((r) => r.name as string)),

    tableSpec: (table) => guard(async () => (await resolve(table)).spec),

    count: (table) => guard(async () => {
      const t = await resolve(table);
      const { rows } = await pool.query(`select count(*) as n from ${t.sql}`);
      return Number(rows[0].n);
    }),

    download: (table, opts) => downloadTable(table, opts),

    fetch: (table, remoteIds) => guard(async () => {
      const t = await resolve(table);
      const found = new Map<string, Record<string, unknown>>();
      if (remoteIds.length === 0) return found;
      // Comparing with the typed key (not pk::text) lets PostgreSQL use the primary key index.
      const { rows } = await pool.query(
        `select s.${t.pk}::text as remote_id, to_jsonb(s.*)::text as values from ${t.sql} s where s.${t.pk} = any($1)`,
        [remoteIds],
      );
      for (const row of rows) found.set(row.remote_id, parseRowJson(row.values, t.jsonColumns));
      return found;
    }),

    create: (table, records, opts) => write(table, records, createRecord, opts),
    update: (table, records, opts) => write(table, records, updateRecord, opts),
    delete: (table, remoteIds, opts) => write(table, remoteIds, deleteRecord, opts),

    writeStatus: (receipt, opts) => guard(() => postgresWriteStatus((sql, params) => pool.query(sql, params), receipt, opts)),

    close: () => pool.end(),
  };

  function downloadTable(table: string, { batchSize, signal }: DownloadOptions): AsyncGenerator<RemoteRecord[]> {
    return guardDownload(cursorBatches(table, batchSize, signal), signal);
  }

  // A server-side cursor in a read-only transaction: one consistent snapshot, read
  // batch by batch, so the table is never held in memory.
  async function* cursorBatches(table: string, batchSize: number, signal?: AbortSignal): AsyncGenerator<RemoteRecord[]> {
    signal?.throwIfAborted();
    const client = await pool.connect();
    try {
      await client.query("begin isolation level repeatable read, read only");
      const t = await resolveTable(client, table);
      await client.query(`declare sb_download no scroll cursor for
        select s.${t.pk}::text as remote_id, to_jsonb(s.*)::text as values from ${t.sql} s order by s.${t.pk}`);
      for (;;) {
        signal?.throwIfAborted();
        const { rows } = await client.query(`fetch forward ${Math.max(1, Math.floor(batchSize))} from sb_download`);
        if (rows.length === 0) break;
        yield rows.map((row) => ({ remoteId: row.remote_id, values: parseRowJson(row.values, t.jsonColumns) }));
      }
    } finally {
      // Also runs when the caller stops iterating early (break, abort). A client
      // that cannot even roll back is broken: discard it rather than pool it.
      const rollbackError = await client.query("rollback").then(() => undefined, asError);
      client.release(rollbackError);
    }
  }

  type Apply<T> = (client: pg.PoolClient, t: ResolvedTable, item: T) => Promise<RecordOutcome>;

  function write<T>(table: string, items: T[], apply: Apply<T>, opts?: WriteOptions): Promise<RecordOutcome[]> {
    if (items.length === 0) return Promise.resolve([]);
    return guard(() => withClient(async (client) => {
      const t = await resolveTable(client, table);
      // The txid tells later whether this transaction committed (txid_status).
      const beforeCommit = opts?.beforeCommit && (async (outcomes: RecordOutcome[]) => {
        const { rows } = await client.query("select txid_current()::text as txid");
        await opts.beforeCommit!({ txid: rows[0].txid }, outcomes);
      });
      return applyEachInTransaction((sql) => client.query(sql), items, (item) => apply(client, t, item), isRecordError, beforeCommit);
    }));
  }
}

// --- Catalog --------------------------------------------------------------------

// Ordinary and partitioned tables (not their partitions) in user schemas that we may read.
const LIST_TABLES = `
  select n.nspname || '.' || c.relname as name
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
   where c.relkind in ('r', 'p') and not c.relispartition
     and n.nspname not in ('pg_catalog', 'information_schema') and n.nspname !~ '^pg_(toast|temp_)'
     and has_table_privilege(c.oid, 'select')
   order by n.nspname, c.relname`;

// Matching the whole "schema.table" text also finds names that themselves contain dots.
const FIND_TABLE = `
  select c.oid, n.nspname as schema, c.relname as name
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
   where c.relkind in ('r', 'p') and n.nspname || '.' || c.relname = $1`;

// Domains are replaced by the type they are based on, level by level, then each
// column reports what workbookType needs to pick a type the workbook can hold.
const TABLE_COLUMNS = `
  with recursive columns as (
    select a.attnum, a.attname, a.atttypid, a.atttypmod,
           a.attgenerated <> '' or a.attidentity = 'a' as read_only
      from pg_attribute a
     where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped
  ), base as (
    select attnum, atttypid as typid, atttypmod as typmod from columns
    union all
    select b.attnum, t.typbasetype, t.typtypmod from base b join pg_type t on t.oid = b.typid where t.typtype = 'd'
  )
  select c.attname as name, c.read_only,
         format_type(b.typid, b.typmod) as formatted,
         t.typnamespace = 'pg_catalog'::regnamespace and t.typtype in ('b', 'r', 'm') and t.typname !~ '^_?reg' as built_in,
         coalesce(e.typtype, t.typtype) = 'c' as composite,
         e.oid is not null as is_array
    from columns c
    join base b on b.attnum = c.attnum
    join pg_type t on t.oid = b.typid and t.typtype <> 'd'
    left join pg_type e on e.oid = t.typelem and t.typcategory = 'A'
   order by c.attnum`;

const PRIMARY_KEY = `
  select array_agg(a.attname::text order by k.ord) as columns
    from pg_index i
    cross join unnest(i.indkey[0:i.indnkeyatts - 1]) with ordinality k(attnum, ord)
    join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
   where i.indrelid = $1 and i.indisprimary`;

interface ColumnFacts {
  name: string;
  read_only: boolean;
  formatted: string;
  built_in: boolean;
  composite: boolean;
  is_array: boolean;
}

async function resolveTable(client: pg.ClientBase, table: string): Promise<ResolvedTable> {
  const found = await client.query(FIND_TABLE, [table]);
  if (found.rows.length === 0) {
    throw new ConnectorError(`table ${table} does not exist at the source (tables are named schema.table)`, { transient: false });
  }
  const { oid, schema, name } = found.rows[0];
  const facts = (await client.query<ColumnFacts>(TABLE_COLUMNS, [oid])).rows;
  const pkColumns: string[] = (await client.query(PRIMARY_KEY, [oid])).rows[0]?.columns ?? [];
  if (pkColumns.length !== 1) {
    const why = pkColumns.length === 0 ? "has no primary key" : `has a primary key of ${pkColumns.length} columns (${pkColumns.join(", ")})`;
    throw new ConnectorError(`table ${table} ${why}; Snapbase needs a single-column primary key to identify its records`,
      { transient: false });
  }
  const columns: ColumnSpec[] = facts.map((c) => ({ name: c.name, type: workbookType(c), readOnly: c.read_only }));
  return {
    spec: { name: table, columns, remoteIdColumn: pkColumns[0] },
    sql: `${quote(schema)}.${quote(name)}`,
    pk: quote(pkColumns[0]),
    writableColumns: new Set(columns.filter((c) => !c.readOnly).map((c) => c.name)),
    jsonColumns: new Set(columns.filter((c) => /^jsonb?(\[\])*$/.test(c.type)).map((c) => c.name)),
  };
}

/**
 * The column's type as format_type prints it, when a workbook (another database)
 * can hold it: built-in scalar, range and array types. Types only the source has
 * (enums, extension types) become text, composites jsonb, as to_jsonb renders them.
 */
function workbookType(c: Pick<ColumnFacts, "formatted" | "built_in" | "composite" | "is_array">): string {
  if (c.composite) return "jsonb";
  if (!c.built_in) return c.is_array ? "text[]" : "text";
  // format_type puts a precision mid-name ("timestamp(3) with time zone"); the short names keep it at the end.
  const type = c.formatted
    .replace(/^timestamp(\(\d+\)) with time zone/, "timestamptz$1")
    .replace(/^timestamp(\(\d+\)) without time zone/, "timestamp$1")
    .replace(/^time(\(\d+\)) with time zone/, "timetz$1")
    .replace(/^time(\(\d+\)) without time zone/, "time$1");
  // Anything else that is not a plain type name (e.g. "char") is read as its text.
  return /^[a-z][a-z0-9_ ]*(\(\d+(,\d+)?\))?(\[\])*$/.test(type) ? type : c.is_array ? "text[]" : "text";
}

// --- Writes ---------------------------------------------------------------------

/** The given fields the source lets us write, quoted; read-only ones are computed by the source. */
function writableFields(t: ResolvedTable, values: Record<string, unknown>): { columns: string[]; json: string } {
  const names = Object.keys(values).filter((name) => t.writableColumns.has(name) || !t.spec.columns.some((c) => c.name === name));
  // Unknown names are kept so PostgreSQL reports them ("column ... does not exist").
  return { columns: names.map(quote), json: JSON.stringify(Object.fromEntries(names.map((n) => [n, values[n]]))) };
}

/** The row a write returned: its remote id and every value, as the source stored it. */
function stored(t: ResolvedTable, row: { remote_id: string; values: string }): RecordOutcome {
  return { ok: true, remoteId: row.remote_id, values: parseRowJson(row.values, t.jsonColumns) };
}

// jsonb_populate_record casts each JSON value to the column's type, as PostgreSQL would on input.
// RETURNING hands back the row as stored: identity ids, defaults, generated columns, what triggers set.
async function createRecord(client: pg.PoolClient, t: ResolvedTable, values: Record<string, unknown>): Promise<RecordOutcome> {
  const { columns, json } = writableFields(t, values);
  const returning = `returning s.${t.pk}::text as remote_id, to_jsonb(s.*)::text as values`;
  const sql = columns.length === 0
    ? `insert into ${t.sql} as s default values ${returning}`
    : `insert into ${t.sql} as s (${columns.join(", ")})
       select ${columns.join(", ")} from jsonb_populate_record(null::${t.sql}, $1::jsonb)
       ${returning}`;
  const { rows } = await client.query(sql, columns.length === 0 ? [] : [json]);
  return stored(t, rows[0]);
}

async function updateRecord(client: pg.PoolClient, t: ResolvedTable,
  record: { remoteId: string; values: Record<string, unknown> }): Promise<RecordOutcome> {
  const { columns, json } = writableFields(t, record.values);
  // Nothing to change: only report whether the record is still there (and what it holds).
  const { rows } = columns.length === 0
    ? await client.query(`select s.${t.pk}::text as remote_id, to_jsonb(s.*)::text as values from ${t.sql} s where s.${t.pk} = $1`, [record.remoteId])
    : await client.query(
      `update ${t.sql} s set ${columns.map((c) => `${c} = v.${c}`).join(", ")}
         from jsonb_populate_record(null::${t.sql}, $2::jsonb) v
        where s.${t.pk} = $1
        returning s.${t.pk}::text as remote_id, to_jsonb(s.*)::text as values`,
      [record.remoteId, json]);
  return rows.length === 0 ? missingRecord(record.remoteId) : stored(t, rows[0]);
}

async function deleteRecord(client: pg.PoolClient, t: ResolvedTable, remoteId: string): Promise<RecordOutcome> {
  const { rowCount } = await client.query(`delete from ${t.sql} s where s.${t.pk} = $1`, [remoteId]);
  return rowCount ? { ok: true, remoteId } : missingRecord(remoteId);
}

// --- Errors ---------------------------------------------------------------------

/** SQLSTATEs of a connection or server in trouble (08 connection, 40 serialization/deadlock, 53 resources, 57 shutdown/cancel). */
const TRANSIENT_SQLSTATE = /^(08|40|53|57P0[123]|57014)/;
const SQLSTATE = /^[0-9A-Z]{5}$/;

function codeOf(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === "string" ? code : undefined;
}

function isTransient(error: unknown): boolean {
  const code = codeOf(error);
  // pg's own connection failures ("Connection terminated", pool connect timeouts) are
  // plain Errors without a code; a TypeError and the like is a bug, not worth retrying.
  if (code === undefined) return isPlainError(error);
  if (NETWORK_ERROR_CODES.has(code)) return true;
  return SQLSTATE.test(code) && TRANSIENT_SQLSTATE.test(code);
}

/** An error PostgreSQL raised about one statement (bad value, constraint), not about the connection. */
function isRecordError(error: unknown): boolean {
  const code = codeOf(error);
  return code !== undefined && SQLSTATE.test(code) && !isTransient(error);
}

/** After our own errors and statement errors the connection is fine; after anything else it may be broken. */
function leavesClientUsable(error: unknown): boolean {
  return error instanceof ConnectorError || isRecordError(error);
}

const asError = (error: unknown): Error => (error instanceof Error ? error : new Error(String(error)));

/** Failures to connect (network, authentication, unknown database) say so first. */
function isConnectFailure(error: unknown): boolean {
  const code = codeOf(error);
  if (code === undefined) return isPlainError(error);
  return NETWORK_ERROR_CODES.has(code) || /^(08|28)/.test(code) || code === "3D000";
}

/** pg's client settings for a PostgreSQL connector: the string as pg reads it, at the checked address. */
export function postgresClientConfig(connectionString: string, address?: string): pg.ClientConfig {
  const parsed = parse(connectionString);
  const config = { ...parsed } as Record<string, unknown>;
  delete config.host;
  const host = parsed.host ?? "";
  // TLS still names (and verifies) the host the user wrote, not the address.
  const ssl = parsed.ssl === true ? { servername: host } : typeof parsed.ssl === "object" && parsed.ssl ? { ...parsed.ssl, servername: host } : parsed.ssl;
  return {
    ...(config as pg.ClientConfig),
    host: address ?? host,
    port: parsed.port ? Number(parsed.port) : undefined,
    database: parsed.database ?? undefined,
    ssl: ssl as pg.ClientConfig["ssl"],
  };
}

/** A failure talking to a PostgreSQL source, as a ConnectorError without its connection string's secrets. */
export function describePostgresError(error: unknown, connectionString: string): ConnectorError {
  return describeError(error, secretsOfConnectionString(connectionString));
}

function describeError(error: unknown, secrets: readonly string[]): ConnectorError {
  const message = `${isConnectFailure(error) ? "cannot connect to PostgreSQL" : "PostgreSQL"}: ${messageOf(error)}`;
  return new ConnectorError(redactText(message, secrets), { transient: isTransient(error), cause: error });
}
