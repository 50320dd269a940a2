// Connector for a MySQL or MariaDB database. Tables are the database's base
// tables; column types are mapped to the PostgreSQL types a workbook stores, and
// values are made JSON-friendly (decimals and bigints as strings, dates as their
// text without any timezone shift, bytes as "\x..." hex like PostgreSQL's bytea).
// Every legal MySQL value must arrive and go back unchanged, so: TIME (a duration,
// -838:59:59 to 838:59:59) is an interval; tinyint(1) (what BOOLEAN is) is a
// smallint, since it holds -128..127, not only 0 and 1; the zero date '0000-00-00'
// (and '0000-00-00 00:00:00') is PostgreSQL's '-infinity', which MySQL cannot hold,
// and '-infinity' is written back as the zero date.
import mysql from "mysql2/promise";
import {
  ConnectorError,
  type ColumnSpec,
  type Connector,
  type DownloadOptions,
  type RecordOutcome,
  type RemoteRecord,
  type TableSpec,
  type WriteOptions,
  type WriteStatus,
} from "./types.ts";
import {
  NETWORK_ERROR_CODES,
  applyEachInTransaction,
  connectorFailures,
  isPlainError,
  messageOf,
  missingRecord,
  OPEN_TRANSACTION_WAIT_MS,
  pause,
} from "./values.ts";
import { log } from "../log.ts";
import { redactText } from "../redact.ts";
import { parseJsonExact } from "../exact-json.ts";

export interface MysqlCredentials {
  host: string;
  port?: number;
  user: string;
  password?: string;
  database: string;
}

interface ResolvedTable {
  spec: TableSpec;
  /** `table`, quoted. */
  sql: string;
  /** `pk`, quoted. */
  pk: string;
  /** Workbook type of each column, by name. */
  types: ReadonlyMap<string, string>;
  pkAutoIncrement: boolean;
}

type Row = Record<string, unknown>;

const quote = (name: string): string => mysql.escapeId(name, true);

export function mysqlConnector(credentials: MysqlCredentials): Connector {
  const pool = mysql.createPool({
    host: credentials.host,
    port: credentials.port ?? 3306,
    user: credentials.user,
    password: credentials.password,
    database: credentials.database,
    connectionLimit: 2,
    connectTimeout: 10_000,
    // Values exactly as the server prints them: no Date objects shifted by the
    // local timezone, no rounded bigints or decimals, JSON parsed by us per column.
    dateStrings: true,
    supportBigNumbers: true,
    bigNumberStrings: true,
    jsonStrings: true,
  });
  // A value the table cannot hold must be refused, not silently truncated or zeroed
  // (what a server without strict mode does), so that publish reports it.
  // Every connection keeps an error listener: a connection the server drops while
  // idle or between queries must not be an unhandled 'error' event.
  pool.pool.on("connection", (connection) => {
    connection.on("error", (error: Error) => log.debug("MySQL source connection lost", { error: error.message }));
    connection.query("set session sql_mode = concat_ws(',', @@session.sql_mode, 'STRICT_ALL_TABLES')", (error: Error | null) => {
      if (error) log.debug("could not set sql_mode on a MySQL source connection", { error: error.message });
    });
  });
  const { guard, guardDownload } = connectorFailures((error) => describeError(error, credentials));
  let mariaDb: Promise<boolean> | undefined;

  async function withConnection<T>(work: (c: mysql.PoolConnection) => Promise<T>): Promise<T> {
    const connection = await pool.getConnection();
    try {
      const result = await work(connection);
      connection.release();
      return result;
    } catch (error) {
      // After a connection-level failure the connection may be broken: close it rather than pool it.
      if (error instanceof ConnectorError || isRecordError(error)) connection.release();
      else connection.destroy();
      throw error;
    }
  }

  async function query<T = Row[]>(sql: string, params: unknown[] = [], on: mysql.Pool | mysql.PoolConnection = pool): Promise<T> {
    const [result] = await on.query(sql, params);
    return result as T;
  }

  // Asked once per connector, on the caller's connection (the pool may have no other free).
  async function isMariaDb(on: mysql.Pool | mysql.PoolConnection): Promise<boolean> {
    mariaDb ??= query("select version() as v", [], on).then((rows) => /mariadb/i.test(String(rows[0].v)));
    return mariaDb.catch((error: unknown) => {
      mariaDb = undefined;
      throw error;
    });
  }

  async function resolve(table: string, on: mysql.Pool | mysql.PoolConnection = pool): Promise<ResolvedTable> {
    return resolveTable((sql, params) => query(sql, params, on), table, await isMariaDb(on));
  }

  return {
    test: () => guard(() => withConnection(async (c) => void (await c.ping()))),

    listTables: () => guard(async () => {
      const rows = await query(
        `select table_name as name from information_schema.tables
          where table_schema = database() and table_type = 'BASE TABLE' order by table_name`);
      return rows.map((r) => String(r.name));
    }),

    tableSpec: (table) => guard(async () => (await resolve(table)).spec),

    count: (table) => guard(async () => {
      const t = await resolve(table);
      const rows = await query(`select count(*) as n from ${t.sql}`);
      return Number(rows[0].n);
    }),

    download: (table, opts) => downloadTable(table, opts),

    fetch: (table, remoteIds) => guard(async () => {
      const t = await resolve(table);
      const found = new Map<string, Record<string, unknown>>();
      if (remoteIds.length === 0) return found;
      const ids = remoteIds.map((id) => toMysqlValue(id, t.types.get(t.spec.remoteIdColumn)));
      for (const row of await query(`select * from ${t.sql} where ${t.pk} in (?)`, [ids])) {
        const record = toRecord(t, row);
        found.set(record.remoteId, record.values);
      }
      return found;
    }),

    create: (table, records, opts) => write(table, records, createRecord, opts),
    update: (table, records, opts) => write(table, records, updateRecord, opts),
    delete: (table, remoteIds, opts) => write(table, remoteIds, deleteRecord, opts),

    // MySQL cannot say whether a transaction committed; it can say whether the
    // connection that ran it is still there. Once it is gone, the transaction is
    // settled one way or the other and the records themselves tell which.
    writeStatus: (receipt, opts) => guard(async (): Promise<WriteStatus> => {
      const id = Number(receipt.connection_id);
      if (!Number.isInteger(id) || id <= 0) return "unknown";
      const until = Date.now() + OPEN_TRANSACTION_WAIT_MS;
      for (let told = false; ; ) {
        const rows = await query("select count(*) as n from information_schema.processlist where id = ?", [id]);
        if (Number(rows[0].n) === 0) return "unknown";
        if (!told) {
          told = true;
          opts?.onWait?.(`waiting for connection ${id} of an interrupted publish to finish at the source`);
        }
        if (Date.now() > until || opts?.signal?.aborted) {
          throw new ConnectorError(`connection ${id} of an interrupted publish is still open at the source; trying again later`, { transient: true });
        }
        await pause(250, opts?.signal);
      }
    }),

    close: () => pool.end(),
  };

  function downloadTable(table: string, opts: DownloadOptions): AsyncGenerator<RemoteRecord[]> {
    return guardDownload(keysetPages(table, opts), opts.signal);
  }

  // Pages by primary key (where pk > last order by pk limit n) inside one consistent
  // snapshot: each page is an index range scan, and only one page is in memory.
  async function* keysetPages(table: string, { batchSize, signal }: DownloadOptions): AsyncGenerator<RemoteRecord[]> {
    signal?.throwIfAborted();
    const connection = await pool.getConnection();
    try {
      await connection.query("set transaction isolation level repeatable read");
      await connection.query("start transaction with consistent snapshot, read only");
      const t = await resolve(table, connection);
      const limit = Math.max(1, Math.floor(batchSize));
      let last: unknown = undefined;
      for (;;) {
        signal?.throwIfAborted();
        const rows = last === undefined
          ? await query(`select * from ${t.sql} order by ${t.pk} limit ?`, [limit], connection)
          : await query(`select * from ${t.sql} where ${t.pk} > ? order by ${t.pk} limit ?`, [last, limit], connection);
        if (rows.length === 0) break;
        last = rows[rows.length - 1][t.spec.remoteIdColumn];
        yield rows.map((row) => toRecord(t, row));
        if (rows.length < limit) break;
      }
    } finally {
      // Also runs when the caller stops iterating early (break, abort). A connection
      // that cannot even roll back is broken: close it rather than pool it.
      const rolledBack = await connection.query("rollback").then(() => true, () => false);
      if (rolledBack) connection.release();
      else connection.destroy();
    }
  }

  type Apply<T> = (c: mysql.PoolConnection, t: ResolvedTable, item: T) => Promise<RecordOutcome>;

  function write<T>(table: string, items: T[], apply: Apply<T>, opts?: WriteOptions): Promise<RecordOutcome[]> {
    if (items.length === 0) return Promise.resolve([]);
    return guard(() => withConnection(async (connection) => {
      const t = await resolve(table, connection);
      // The connection id tells later whether this transaction can still be open (writeStatus).
      const beforeCommit = opts?.beforeCommit && (async (outcomes: RecordOutcome[]) => {
        const rows = await query("select connection_id() as id", [], connection);
        await opts.beforeCommit!({ connection_id: Number(rows[0].id) }, outcomes);
      });
      return applyEachInTransaction((sql) => connection.query(sql), items, (item) => apply(connection, t, item), isRecordError, beforeCommit);
    }));
  }
}

// --- Catalog --------------------------------------------------------------------

type Query = (sql: string, params: unknown[]) => Promise<Row[]>;

interface ColumnFacts {
  name: string;
  dataType: string;
  columnType: string;
  extra: string;
}

async function resolveTable(query: Query, table: string, mariaDb: boolean): Promise<ResolvedTable> {
  const facts = (await query(
    `select column_name as name, data_type as dataType, column_type as columnType, extra as extra
       from information_schema.columns
      where table_schema = database() and table_name = ? order by ordinal_position`, [table])) as unknown as ColumnFacts[];
  if (facts.length === 0) throw new ConnectorError(`table ${table} does not exist at the source`, { transient: false });
  const pkColumns = (await query(
    `select column_name as name from information_schema.statistics
      where table_schema = database() and table_name = ? and index_name = 'PRIMARY' order by seq_in_index`, [table]))
    .map((r) => String(r.name));
  if (pkColumns.length !== 1) {
    const why = pkColumns.length === 0 ? "has no primary key" : `has a primary key of ${pkColumns.length} columns (${pkColumns.join(", ")})`;
    throw new ConnectorError(`table ${table} ${why}; Snapbase needs a single-column primary key to identify its records`,
      { transient: false });
  }
  const jsonColumns = mariaDb ? await mariaDbJsonColumns(query, table) : new Set<string>();
  const columns: ColumnSpec[] = facts.map((c) => ({
    name: c.name,
    type: jsonColumns.has(c.name) ? "jsonb" : postgresType(c.dataType, c.columnType),
    readOnly: /\b(VIRTUAL|STORED|PERSISTENT) GENERATED\b/i.test(c.extra),
  }));
  const pk = facts.find((c) => c.name === pkColumns[0])!;
  return {
    spec: { name: table, columns, remoteIdColumn: pk.name },
    sql: quote(table),
    pk: quote(pk.name),
    types: new Map(columns.map((c) => [c.name, c.type])),
    pkAutoIncrement: /\bauto_increment\b/i.test(pk.extra),
  };
}

/** MariaDB's JSON is longtext with a json_valid check; the check is how we know it holds JSON. */
async function mariaDbJsonColumns(query: Query, table: string): Promise<Set<string>> {
  const checks = await query(
    `select check_clause as clause from information_schema.check_constraints
      where constraint_schema = database() and table_name = ?`, [table]);
  const names = checks.map((r) => /^json_valid\(`((?:[^`]|``)+)`\)$/i.exec(String(r.clause))?.[1]);
  return new Set(names.filter((n) => n !== undefined).map((n) => n.replaceAll("``", "`")));
}

/** The PostgreSQL type that holds a MySQL column's values. */
function postgresType(dataType: string, columnType: string): string {
  const unsigned = /\bunsigned\b/i.test(columnType);
  switch (dataType.toLowerCase()) {
    case "tinyint":
      // tinyint(1) too (MySQL's BOOLEAN): it may hold 5 or -1, which a boolean would turn into true.
      return "smallint";
    case "smallint":
      return unsigned ? "integer" : "smallint";
    case "mediumint":
      return "integer";
    case "int":
    case "integer":
      return unsigned ? "bigint" : "integer";
    case "bigint":
      return unsigned ? "numeric(20,0)" : "bigint";
    case "decimal":
    case "numeric": {
      const [, precision, scale] = /\((\d+)(?:,(\d+))?\)/.exec(columnType) ?? [];
      return precision ? `numeric(${precision},${scale ?? 0})` : "numeric";
    }
    case "float":
    case "double":
    case "real":
      return "double precision";
    case "year":
      return "integer";
    case "date":
      return "date";
    case "datetime":
    case "timestamp":
      return "timestamp";
    case "time":
      // A duration from -838:59:59 to 838:59:59, not a time of day.
      return "interval";
    case "json":
      return "jsonb";
    case "binary":
    case "varbinary":
    case "tinyblob":
    case "blob":
    case "mediumblob":
    case "longblob":
    case "bit":
      return "bytea";
    default:
      // char, varchar, the text types, enum, set, and anything else readable as text.
      return "text";
  }
}

// --- Values ---------------------------------------------------------------------

function toRecord(t: ResolvedTable, row: Row): RemoteRecord {
  const values: Record<string, unknown> = {};
  for (const [name, value] of Object.entries(row)) values[name] = toJsonValue(value, t.types.get(name));
  return { remoteId: String(values[t.spec.remoteIdColumn]), values };
}

/** MySQL's zero date and zero datetime (any fractional digits), as dateStrings prints them. */
const ZERO_DATE = /^0000-00-00(?: 00:00:00(?:\.0+)?)?$/;

function toJsonValue(value: unknown, type: string | undefined): unknown {
  if (value === null || value === undefined) return null;
  if (Buffer.isBuffer(value)) return `\\x${value.toString("hex")}`;
  // The zero date has no PostgreSQL counterpart; -infinity, which MySQL has no counterpart of, stands for it.
  if (typeof value === "string" && value.startsWith("0000-00-00") && ZERO_DATE.test(value) && (type === "date" || type?.startsWith("timestamp"))) return "-infinity";
  // Numbers wider than a double keep their digits (ExactNumber writes them back as read).
  if (type === "jsonb" && typeof value === "string") return parseJsonExact(value);
  return value;
}

/** A JSON value as the parameter MySQL expects for a column of this workbook type. */
function toMysqlValue(value: unknown, type: string | undefined): unknown {
  if (value === null || value === undefined) return null;
  // A JSON column takes the document's text; "hello" must arrive as "\"hello\"".
  if (type === "jsonb") return JSON.stringify(value);
  if (type === "bytea" && typeof value === "string" && /^\\x([0-9a-f]{2})*$/i.test(value)) return Buffer.from(value.slice(2), "hex");
  if (value === "-infinity" && type === "date") return "0000-00-00";
  if (value === "-infinity" && type?.startsWith("timestamp")) return "0000-00-00 00:00:00";
  if (type === "interval" && typeof value === "string") return mysqlTime(value);
  if (typeof value === "boolean") return value ? 1 : 0;
  // mysql2 would expand arrays and objects into SQL lists; as text the server rejects or casts them itself.
  if (typeof value === "object") return JSON.stringify(value);
  return value;
}

/**
 * An interval as PostgreSQL prints it ("838:59:59", "-1 days +02:03:04", "1 day
 * 00:00:00.5") as MySQL TIME text: [-]hours:mm:ss[.ffffff]. Anything else (months,
 * years, another IntervalStyle) goes as it is, for MySQL to refuse.
 */
export function mysqlTime(interval: string): string {
  const m = /^(?:(-?\d+) days?)? ?(?:([+-])?(\d+):(\d\d):(\d\d)(?:\.(\d{1,6}))?)?$/.exec(interval);
  if (!m || (m[1] === undefined && m[3] === undefined)) return interval;
  const [, days = "0", sign = "+", h = "0", min = "0", sec = "0", fraction = ""] = m;
  const clock = ((Number(h) * 60 + Number(min)) * 60 + Number(sec)) * 1e6 + Number(fraction.padEnd(6, "0"));
  const micros = Number(days) * 86_400e6 + (sign === "-" ? -clock : clock);
  const abs = Math.abs(micros);
  const seconds = Math.floor(abs / 1e6);
  const micro = abs % 1e6;
  const pad = (n: number) => String(n).padStart(2, "0");
  const text = `${Math.floor(seconds / 3600)}:${pad(Math.floor(seconds / 60) % 60)}:${pad(seconds % 60)}${micro ? `.${String(micro).padStart(6, "0").replace(/0+$/, "")}` : ""}`;
  return micros < 0 ? `-${text}` : text;
}

/** The given fields the source lets us write; generated columns are computed by MySQL. */
function writableFields(t: ResolvedTable, values: Record<string, unknown>): [string, unknown][] {
  const readOnly = new Set(t.spec.columns.filter((c) => c.readOnly).map((c) => c.name));
  // Unknown names are kept so MySQL reports them ("Unknown column ...").
  return Object.entries(values).filter(([name]) => !readOnly.has(name)).map(([name, value]) => [name, toMysqlValue(value, t.types.get(name))]);
}

// --- Writes ---------------------------------------------------------------------

/**
 * The record as the source stored it, read back in the write's own transaction:
 * what MySQL decided (auto_increment ids, defaults, generated columns, triggers).
 */
async function storedRecord(c: mysql.PoolConnection, t: ResolvedTable, id: unknown): Promise<RecordOutcome | null> {
  const [rows] = await c.query<mysql.RowDataPacket[]>(`select * from ${t.sql} where ${t.pk} = ?`, [id]);
  if (rows.length === 0) return null;
  const record = toRecord(t, rows[0] as Row);
  return { ok: true, remoteId: record.remoteId, values: record.values };
}

async function createRecord(c: mysql.PoolConnection, t: ResolvedTable, values: Record<string, unknown>): Promise<RecordOutcome> {
  const fields = writableFields(t, values);
  const givenId = values[t.spec.remoteIdColumn];
  if ((givenId === undefined || givenId === null) && !t.pkAutoIncrement) {
    // Without an id we could not tell the workbook which record this became.
    return { ok: false, error: `a new record needs a value for ${t.spec.remoteIdColumn}: it is not auto_increment` };
  }
  const [result] = await c.query<mysql.ResultSetHeader>(
    `insert into ${t.sql} (${fields.map(([name]) => quote(name)).join(", ")}) values (?)`, [fields.map(([, v]) => v)]);
  const id = givenId === undefined || givenId === null ? result.insertId : toMysqlValue(givenId, t.types.get(t.spec.remoteIdColumn));
  return (await storedRecord(c, t, id)) ?? { ok: true, remoteId: String(givenId ?? result.insertId) };
}

async function updateRecord(c: mysql.PoolConnection, t: ResolvedTable,
  record: { remoteId: string; values: Record<string, unknown> }): Promise<RecordOutcome> {
  const id = toMysqlValue(record.remoteId, t.types.get(t.spec.remoteIdColumn));
  const fields = writableFields(t, record.values);
  if (fields.length > 0) {
    // affectedRows counts matched rows (mysql2 sets FOUND_ROWS), so an unchanged record still counts.
    const [result] = await c.query<mysql.ResultSetHeader>(
      `update ${t.sql} set ${fields.map(([name]) => `${quote(name)} = ?`).join(", ")} where ${t.pk} = ?`,
      [...fields.map(([, v]) => v), id]);
    if (result.affectedRows === 0) return missingRecord(record.remoteId);
  }
  // The record as it is now (with nothing to change, this says whether it is still there).
  const newId = record.values[t.spec.remoteIdColumn];
  const now = newId === undefined || newId === null ? id : toMysqlValue(newId, t.types.get(t.spec.remoteIdColumn));
  return (await storedRecord(c, t, now)) ?? missingRecord(record.remoteId);
}

async function deleteRecord(c: mysql.PoolConnection, t: ResolvedTable, remoteId: string): Promise<RecordOutcome> {
  const id = toMysqlValue(remoteId, t.types.get(t.spec.remoteIdColumn));
  const [result] = await c.query<mysql.ResultSetHeader>(`delete from ${t.sql} where ${t.pk} = ?`, [id]);
  return result.affectedRows === 0 ? missingRecord(remoteId) : { ok: true, remoteId };
}

// --- Errors ---------------------------------------------------------------------

/** Server and driver conditions that pass: lost connections, overload, deadlocks, shutdown. */
const TRANSIENT_CODES: ReadonlySet<string> = new Set([
  ...NETWORK_ERROR_CODES,
  "PROTOCOL_CONNECTION_LOST", "PROTOCOL_SEQUENCE_TIMEOUT", "ER_CON_COUNT_ERROR", "ER_TOO_MANY_USER_CONNECTIONS",
  "ER_LOCK_DEADLOCK", "ER_LOCK_WAIT_TIMEOUT", "ER_SERVER_SHUTDOWN", "ER_QUERY_INTERRUPTED", "ER_CONNECTION_KILLED",
]);

interface MysqlError {
  code?: string;
  errno?: number;
  fatal?: boolean;
}

/** Wrong credentials or database: retrying cannot help (the handshake marks them fatal, so they are listed first). */
const PERMANENT_CONNECT_CODES: ReadonlySet<string> = new Set([
  "ER_ACCESS_DENIED_ERROR", "ER_BAD_DB_ERROR", "ER_DBACCESS_DENIED_ERROR", "ER_NOT_SUPPORTED_AUTH_MODE",
]);

function isTransient(error: unknown): boolean {
  const { code, errno, fatal } = (error ?? {}) as MysqlError;
  if (code !== undefined && PERMANENT_CONNECT_CODES.has(code)) return false;
  if (code !== undefined && TRANSIENT_CODES.has(code)) return true;
  // The server's statement errors (bad value, constraint, unknown column) carry an errno
  // and do not pass by waiting; errors without one come from the connection.
  return errno === undefined ? isPlainError(error) : fatal === true;
}

/** An error MySQL raised about one statement (bad value, constraint), not about the connection. */
function isRecordError(error: unknown): boolean {
  return (error as MysqlError | null)?.errno !== undefined && !isTransient(error);
}

function describeError(error: unknown, credentials: MysqlCredentials): ConnectorError {
  const { code } = (error ?? {}) as MysqlError;
  const where = `${credentials.host}:${credentials.port ?? 3306}`;
  const connecting = code === undefined ? isPlainError(error) : TRANSIENT_CODES.has(code) || PERMANENT_CONNECT_CODES.has(code);
  const message = `${connecting ? `cannot connect to MySQL at ${where}` : "MySQL"}: ${messageOf(error)}`;
  return new ConnectorError(redactText(message, credentials.password ? [credentials.password] : []), { transient: isTransient(error), cause: error });
}
