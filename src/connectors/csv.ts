// Connector for a CSV file uploaded to this database (snapbase.csv_files). The file
// is one table, named like the file. Its spec comes from the header and the values
// (every row, by the type rules imports use: snapbase_private.csv_type_rules);
// a record is identified by a column named `id` when its values are unique and
// non-empty, else by its row number. Writes never change a version: each write
// call stores the rewritten file as the next version (one version per call, so a
// publish of creates, updates and deletes adds up to three).
//
// Values cross the interface as the cell text (the workbook's column types cast
// it); empty cells are nulls. The file is read whole from the database (it is at
// most the upload limit), but parsed as a stream, so a download holds one batch of
// parsed records at a time.
import { Readable } from "node:stream";
import { CsvError, parse } from "csv-parse";
import { stringify } from "csv-stringify/sync";
import pg from "pg";
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
import { CsvTypeRules, type CsvColumnKinds } from "./csv-inference.ts";
import { NETWORK_ERROR_CODES, connectorFailures, isPlainError, messageOf, missingRecord, postgresWriteStatus } from "./values.ts";

export interface CsvCredentials {
  fileId: string;
}

// --- Parsing --------------------------------------------------------------------

/** Characters handed to the parser at a time: parsing keeps pace with the consumer. */
const SLICE = 64 * 1024;

/** The text in slices, never splitting a surrogate pair (the parser encodes each slice). */
function* slices(text: string): Generator<string> {
  for (let start = 0; start < text.length;) {
    let end = Math.min(start + SLICE, text.length);
    const last = text.charCodeAt(end - 1);
    if (end < text.length && last >= 0xd800 && last <= 0xdbff) end++;
    yield text.slice(start, end);
    start = end;
  }
}

/** Resolves once the stream has records to read, has ended, or closed; rejects on its error. */
function readable(stream: Readable): Promise<void> {
  return new Promise((resolve, reject) => {
    if (stream.errored) return reject(stream.errored);
    if (stream.readableEnded || stream.destroyed) return resolve();
    const settle = (error?: unknown) => {
      stream.off("readable", settle).off("end", settle).off("close", settle).off("error", settle);
      if (error) reject(error);
      else resolve();
    };
    stream.on("readable", settle).on("end", settle).on("close", settle).on("error", settle);
  });
}

/**
 * Every record of the text, header first, as RFC 4180 reads it: quoted fields may
 * hold commas, quotes ("") and line breaks; blank lines are skipped; every record
 * must have as many fields as the header. Malformed text throws a ConnectorError
 * (not transient: retrying cannot fix the file) naming the line.
 *
 * Records come in batches of what the parser has ready: one await per batch, not
 * per record, keeps parsing a large file about as fast as the parser itself.
 */
async function* csvBatches(text: string, label: string): AsyncGenerator<string[][]> {
  // The parser runs ahead of the consumer, so on_record (called as each record is
  // parsed) tells where the last complete record ended when an error comes.
  let lastLine = 0;
  let headerLength: number | undefined;
  const parser = Readable.from(slices(text)).pipe(parse({
    bom: true,
    skip_empty_lines: true,
    on_record: (record: string[], context) => {
      headerLength ??= record.length;
      lastLine = context.lines;
      return record;
    },
  }));
  try {
    for (;;) {
      const batch: string[][] = [];
      for (let record; (record = parser.read()) !== null;) batch.push(record as string[]);
      if (batch.length > 0) yield batch;
      else if (parser.errored) throw parser.errored;
      else if (parser.readableEnded || parser.destroyed) break;
      else await readable(parser);
    }
  } catch (error) {
    throw malformed(error, label, () => recordStartLine(text, lastLine), headerLength);
  } finally {
    parser.destroy();
  }
}

/** The line the record after line `afterLine` starts on: the next line that is not blank. */
function recordStartLine(text: string, afterLine: number): number {
  const lineBreak = /\r\n|\n|\r/g;
  let line = 1;
  let start = 0;
  while (line <= afterLine && lineBreak.exec(text)) {
    line++;
    start = lineBreak.lastIndex;
  }
  for (let m; (m = lineBreak.exec(text)) && m.index === start;) {
    line++;
    start = lineBreak.lastIndex;
  }
  return line;
}

function malformed(error: unknown, label: string, nextRecordLine: () => number, headerLength: number | undefined): unknown {
  if (!(error instanceof CsvError)) return error;
  return new ConnectorError(`${label} is not valid CSV: ${csvProblem(error, nextRecordLine, headerLength)}`, { transient: false, cause: error });
}

/**
 * What is wrong with a file csv-parse refused, in words, naming the line: "line 3 has
 * 2 fields, the header has 3". `nextRecordLine`: where the record after the last
 * complete one starts (an unclosed quote is only noticed at the end of the file).
 * Used for connector files and for uploads to imports (src/rest/imports.ts).
 */
export function csvProblem(error: CsvError, nextRecordLine: () => number, headerLength: number | undefined): string {
  const e = error as CsvError & { lines?: number; record?: unknown[] };
  const at = typeof e.lines === "number" ? e.lines : nextRecordLine();
  let why: string;
  switch (e.code) {
    case "CSV_RECORD_INCONSISTENT_FIELDS_LENGTH": {
      const fields = Array.isArray(e.record) ? e.record.length : undefined;
      why = fields === undefined ? `line ${at} does not have the header's ${headerLength} fields`
        : `line ${at} has ${fields} field${fields === 1 ? "" : "s"}, the header has ${headerLength}`;
      break;
    }
    case "CSV_QUOTE_NOT_CLOSED":
      // The parser only notices at the end of the file; the record began after the last good one.
      why = `line ${nextRecordLine()}: a quoted field is never closed (a quote inside a quoted field is written "")`;
      break;
    case "CSV_INVALID_CLOSING_QUOTE":
      why = `line ${at}: a quoted field must end with a quote followed by a comma or a line break (a quote inside it is written "")`;
      break;
    case "INVALID_OPENING_QUOTE":
      why = `line ${at}: a quote inside an unquoted field (quote the whole field and double the quote: "5"" screen")`;
      break;
    default:
      why = `line ${at}: ${e.message}`;
  }
  return why;
}

// --- Inspection: header, types, identity ----------------------------------------
// Types come from the rules in the database (snapbase_private.csv_type_rules), applied
// to every row by ./csv-inference.ts exactly as SQL applies them to imports.

export interface CsvInspection {
  header: string[];
  rowCount: number;
  /** The inferred type of each header column, in header order (null: no rules were given). */
  types: string[] | null;
  /** The index of the column named id (any case), or -1. */
  idIndex: number;
  /** Whether that column's values are unique and non-empty, so it can identify records. */
  idUsable: boolean;
}

/** Why a header cannot be a table's columns (workbook columns are PostgreSQL identifiers), or null. */
function headerProblem(header: string[]): string | null {
  const seen = new Set<string>();
  for (const [i, name] of header.entries()) {
    if (name.trim() === "") return `column ${i + 1} of the header has no name`;
    if (name.startsWith("__")) return `column name ${JSON.stringify(name)} starts with __, which is reserved`;
    if (Buffer.byteLength(name) > 63) return `column name ${JSON.stringify(name)} is longer than 63 bytes`;
    if (seen.has(name)) return `column name ${JSON.stringify(name)} appears twice in the header`;
    seen.add(name);
  }
  return null;
}

/**
 * Reads the whole text once: checks that it is well-formed CSV with a usable
 * header, infers each column's type (with `rules`) and whether an id column
 * identifies records. Throws a ConnectorError naming the line when it is not.
 * `label` names the file in messages.
 */
export async function inspectCsv(text: string, label = "the CSV file", rules?: CsvTypeRules): Promise<CsvInspection> {
  let header: string[] | undefined;
  let kinds: CsvColumnKinds | undefined;
  let idIndex = -1;
  let ids: Set<string> | undefined = new Set();
  let rowCount = 0;
  for await (const batch of csvBatches(text, label)) {
    for (const fields of batch) {
      if (header === undefined) {
        header = fields;
        const problem = headerProblem(header);
        if (problem) throw new ConnectorError(`${label} has an unusable header: ${problem}`, { transient: false });
        kinds = rules?.columns(header.length);
        idIndex = header.findIndex((name) => name.toLowerCase() === "id");
        continue;
      }
      rowCount++;
      kinds?.add(fields);
      if (idIndex >= 0 && ids) {
        const id = fields[idIndex]!;
        // Once an id repeats or is missing the column cannot identify records: stop collecting.
        if (id === "" || ids.has(id)) ids = undefined;
        else ids.add(id);
      }
    }
  }
  if (header === undefined) throw new ConnectorError(`${label} is empty: it needs a header line`, { transient: false });
  return { header, rowCount, types: kinds?.types() ?? null, idIndex, idUsable: idIndex >= 0 && ids !== undefined };
}

/** The header only (versions the connector wrote are known to be well-formed). */
async function readHeader(text: string, label: string): Promise<string[]> {
  for await (const batch of csvBatches(text, label)) return batch[0]!;
  throw new ConnectorError(`${label} is empty: it needs a header line`, { transient: false });
}

// --- The connector --------------------------------------------------------------

/** A data record (not the header) and its remote id. */
interface DataRecord {
  remoteId: string;
  fields: string[];
}

/** How records are identified: by a column of the file, or by row number (a synthetic column). */
type Identity = { kind: "id"; index: number } | { kind: "row_number"; column: string };

/** The latest version of the file, read and understood. */
interface Loaded {
  name: string;
  version: number;
  /** File plus type overrides: when either changes, the spec must be worked out again. */
  key: string;
  content: string;
  header: string[];
  spec: TableSpec;
  identity: Identity;
  /** The inferred types in force (pinned into every version the connector writes). */
  inferredTypes: Record<string, string>;
  rowCount: number;
  /** Row numbers of the records in file order (row_number identity); null means 1..rowCount. */
  rowNumbers: number[] | null;
  nextRowNumber: number;
  /** "\r\n" when the file uses it: rewrites keep the file's line endings. */
  lineBreak: "unix" | "windows";
}

interface VersionRow {
  name: string;
  column_types: Record<string, string>;
  version: number;
  content: string;
  row_count: string;
  row_numbers: string[] | null;
  next_row_number: string | null;
  inferred_types: Record<string, string> | null;
}

const LATEST_VERSION = `
  select f.name, f.column_types, v.version, v.content, v.row_count, v.row_numbers, v.next_row_number, v.inferred_types
    from snapbase.csv_files f
    join snapbase_private.csv_file_versions v on v.file_id = f.id
   where f.id = $1
   order by v.version desc limit 1`;

const LATEST_KEY = `
  select f.name, f.column_types, (select max(v.version) from snapbase_private.csv_file_versions v where v.file_id = f.id) as version
    from snapbase.csv_files f where f.id = $1`;

/** A free name for the synthetic row number column. */
function rowNumberColumn(header: string[]): string {
  let name = "row_number";
  for (let n = 2; header.includes(name); n++) name = `row_number_${n}`;
  return name;
}

/** A workbook value as cell text: null is an empty cell. */
function cellText(value: unknown): string {
  if (value === null || value === undefined) return "";
  if (typeof value === "string") return value;
  if (typeof value === "number" || typeof value === "boolean" || typeof value === "bigint") return String(value);
  return JSON.stringify(value);
}

/** A record's values as the workbook reads them: cell texts by column (an empty cell is null), and its row number when that identifies it. */
function valuesOf(loaded: Loaded, fields: string[], remoteId: string): Record<string, unknown> {
  const values: Record<string, unknown> = {};
  if (loaded.identity.kind === "row_number") values[loaded.identity.column] = remoteId;
  for (let i = 0; i < loaded.header.length; i++) values[loaded.header[i]!] = fields[i] === "" ? null : fields[i];
  return values;
}

export function csvConnector(credentials: CsvCredentials, opts: { ownerUrl: string; jobId?: string }): Connector {
  const fileId = credentials.fileId;
  // A connection the server drops (idle or in use) must not crash the process; the next query reports it.
  const pool = createPool({ name: "csv source", connectionString: opts.ownerUrl, max: 2, connectionTimeoutMillis: 10_000, quiet: true });
  // A job reads the file several times (spec, count, download): keep the latest
  // version understood, and read it again only when a new version or override appears.
  let cached: Loaded | undefined;

  const { guard, guardDownload } = connectorFailures(describeCsvError);

  async function load(db: pg.ClientBase | pg.Pool = pool): Promise<Loaded> {
    const { rows: [head] } = await db.query(LATEST_KEY, [fileId]);
    if (!head) throw new ConnectorError(`CSV file ${fileId} no longer exists`, { transient: false });
    const key = JSON.stringify([head.name, head.version, head.column_types]);
    if (cached?.key === key) return cached;
    const { rows: [row] } = await db.query<VersionRow>(LATEST_VERSION, [fileId]);
    if (!row) throw new ConnectorError(`CSV file ${fileId} no longer exists`, { transient: false });
    cached = await understand(db, row, key);
    return cached;
  }

  async function understand(db: pg.ClientBase | pg.Pool, row: VersionRow, key: string): Promise<Loaded> {
    const label = `CSV file ${row.name} (version ${row.version})`;
    let header: string[];
    let inferred: Record<string, string>;
    let identity: Identity;
    let rowCount: number;
    if (row.inferred_types) {
      // Written by this connector: types and identity were settled when it was.
      header = await readHeader(row.content, label);
      inferred = row.inferred_types;
      rowCount = Number(row.row_count);
      const idIndex = header.findIndex((name) => name.toLowerCase() === "id");
      identity = row.row_numbers === null && idIndex >= 0 ? { kind: "id", index: idIndex } : { kind: "row_number", column: rowNumberColumn(header) };
    } else {
      const found = await inspectCsv(row.content, label, await CsvTypeRules.load(db));
      header = found.header;
      inferred = Object.fromEntries(header.map((name, i) => [name, found.types![i]!]));
      rowCount = found.rowCount;
      identity = found.idUsable ? { kind: "id", index: found.idIndex } : { kind: "row_number", column: rowNumberColumn(header) };
    }
    const unknown = Object.keys(row.column_types).filter((name) => !header.includes(name));
    if (unknown.length > 0) {
      throw new ConnectorError(`the column types set for CSV file ${row.name} name columns it does not have: ${unknown.join(", ")}`,
        { transient: false });
    }
    const columns: ColumnSpec[] = header.map((name) => ({ name, type: row.column_types[name] ?? inferred[name] ?? "text", readOnly: false }));
    if (identity.kind === "row_number") columns.unshift({ name: identity.column, type: "bigint", readOnly: true });
    const rowNumbers = row.row_numbers?.map(Number) ?? null;
    return {
      name: row.name,
      version: row.version,
      key,
      content: row.content,
      header,
      spec: { name: row.name, columns, remoteIdColumn: identity.kind === "id" ? header[identity.index]! : identity.column },
      identity,
      inferredTypes: inferred,
      rowCount,
      rowNumbers,
      nextRowNumber: Number(row.next_row_number ?? rowCount + 1),
      lineBreak: /^[^\n]*\r\n/.test(row.content) ? "windows" : "unix",
    };
  }

  async function loadTable(table: string, db?: pg.ClientBase): Promise<Loaded> {
    const loaded = await load(db);
    if (table !== loaded.name) {
      throw new ConnectorError(`CSV file ${fileId} holds one table, ${JSON.stringify(loaded.name)}, not ${JSON.stringify(table)}`,
        { transient: false });
    }
    return loaded;
  }

  /** The i-th data record's remote id (0-based, in file order). */
  const remoteIdOf = (loaded: Loaded, fields: string[], i: number): string =>
    loaded.identity.kind === "id" ? fields[loaded.identity.index]! : String(loaded.rowNumbers ? loaded.rowNumbers[i] : i + 1);

  /** Data records with their remote ids, in file order, in batches as the parser has them. */
  async function* dataRecords(loaded: Loaded): AsyncGenerator<DataRecord[]> {
    let i = -1; // the header
    for await (const batch of csvBatches(loaded.content, `CSV file ${loaded.name} (version ${loaded.version})`)) {
      const records: DataRecord[] = [];
      for (const fields of batch) {
        if (i >= 0) records.push({ remoteId: remoteIdOf(loaded, fields, i), fields });
        i++;
      }
      yield records;
    }
  }

  async function* recordBatches(table: string, { batchSize, signal }: DownloadOptions): AsyncGenerator<RemoteRecord[]> {
    signal?.throwIfAborted();
    const loaded = await loadTable(table);
    const size = Math.max(1, Math.floor(batchSize));
    let batch: RemoteRecord[] = [];
    for await (const records of dataRecords(loaded)) {
      for (const { remoteId, fields } of records) {
        batch.push({ remoteId, values: valuesOf(loaded, fields, remoteId) });
        if (batch.length >= size) {
          signal?.throwIfAborted();
          yield batch;
          batch = [];
        }
      }
    }
    signal?.throwIfAborted();
    if (batch.length > 0) yield batch;
  }

  function downloadTable(table: string, opts: DownloadOptions): AsyncGenerator<RemoteRecord[]> {
    return guardDownload(recordBatches(table, opts), opts.signal);
  }

  /**
   * Applies a write call to the latest version and stores the result as the next
   * one. The file's row stays locked from reading to writing, so two publishes to
   * one file apply one after the other. Nothing is stored when every record failed.
   */
  function rewrite<T>(table: string, items: T[], apply: (draft: Draft, item: T) => RecordOutcome, writeOpts?: WriteOptions): Promise<RecordOutcome[]> {
    if (items.length === 0) return Promise.resolve([]);
    return guard(async () => {
      const client = await pool.connect();
      let broken: Error | undefined;
      try {
        await client.query("begin");
        const { rowCount } = await client.query("select 1 from snapbase.csv_files where id = $1 for update", [fileId]);
        if (!rowCount) throw new ConnectorError(`CSV file ${fileId} no longer exists`, { transient: false });
        const loaded = await loadTable(table, client);
        const draft = await Draft.of(loaded, dataRecords(loaded));
        const outcomes = items.map((item) => apply(draft, item));
        if (outcomes.some((o) => o.ok)) {
          const { content, rowCount: records, rowNumbers } = draft.result();
          await client.query("select snapbase_private.add_csv_version($1, $2, $3, $4, $5, $6)", [
            fileId, content, records, opts.jobId ?? null, rowNumbers, JSON.stringify(draft.loaded.inferredTypes)]);
        }
        if (writeOpts?.beforeCommit) {
          const { rows } = await client.query("select txid_current()::text as txid");
          await writeOpts.beforeCommit({ txid: rows[0].txid }, outcomes);
        }
        await client.query("commit");
        return outcomes;
      } catch (error) {
        await client.query("rollback").catch((e: unknown) => void (broken = e instanceof Error ? e : new Error(String(e))));
        throw error;
      } finally {
        client.release(broken);
      }
    });
  }

  return {
    test: () => guard(async () => void (await load())),

    listTables: () => guard(async () => [(await load()).name]),

    tableSpec: (table) => guard(async () => (await loadTable(table)).spec),

    count: (table) => guard(async () => (await loadTable(table)).rowCount),

    download: (table, opts) => downloadTable(table, opts),

    fetch: (table, remoteIds) => guard(async () => {
      const loaded = await loadTable(table);
      const wanted = new Set(remoteIds);
      const found = new Map<string, Record<string, unknown>>();
      if (wanted.size === 0) return found;
      for await (const records of dataRecords(loaded)) {
        for (const { remoteId, fields } of records) if (wanted.has(remoteId)) found.set(remoteId, valuesOf(loaded, fields, remoteId));
      }
      return found;
    }),

    create: (table, records, o) => rewrite(table, records, (draft, values) => draft.create(values), o),
    update: (table, records, o) => rewrite(table, records, (draft, r) => draft.update(r.remoteId, r.values), o),
    delete: (table, remoteIds, o) => rewrite(table, remoteIds, (draft, remoteId) => draft.delete(remoteId), o),

    writeStatus: (receipt, o) => guard(() => postgresWriteStatus((sql, params) => pool.query(sql, params), receipt, o)),

    close: () => pool.end(),
  };
}

/** The latest version's records in memory, changed record by record, then written out whole. */
class Draft {
  readonly loaded: Loaded;
  /** In file order; null once deleted. */
  private readonly rows: (DataRecord | null)[] = [];
  private readonly positions = new Map<string, number>();
  private nextRowNumber: number;

  private constructor(loaded: Loaded) {
    this.loaded = loaded;
    this.nextRowNumber = loaded.nextRowNumber;
  }

  static async of(loaded: Loaded, batches: AsyncIterable<DataRecord[]>): Promise<Draft> {
    const draft = new Draft(loaded);
    for await (const records of batches) {
      for (const record of records) {
        draft.positions.set(record.remoteId, draft.rows.length);
        draft.rows.push(record);
      }
    }
    return draft;
  }

  private get idColumn(): string | null {
    return this.loaded.identity.kind === "id" ? this.loaded.header[this.loaded.identity.index]! : null;
  }

  /** The names the file does not have (the synthetic row number column is known: it is read-only, never written). */
  private unknownColumns(values: Record<string, unknown>): RecordOutcome | null {
    const synthetic = this.loaded.identity.kind === "row_number" ? this.loaded.identity.column : null;
    const unknown = Object.keys(values).filter((name) => name !== synthetic && !this.loaded.header.includes(name));
    return unknown.length === 0 ? null
      : { ok: false, error: `CSV file ${this.loaded.name} has no column${unknown.length > 1 ? "s" : ""} ${unknown.join(", ")}` };
  }

  create(values: Record<string, unknown>): RecordOutcome {
    const problem = this.unknownColumns(values);
    if (problem) return problem;
    const fields = this.loaded.header.map((name) => cellText(values[name]));
    let remoteId: string;
    const idColumn = this.idColumn;
    if (idColumn !== null) {
      remoteId = cellText(values[idColumn]);
      if (remoteId === "") return { ok: false, error: `the ${idColumn} column is required to create a record in CSV file ${this.loaded.name}` };
      if (this.positions.has(remoteId)) return { ok: false, error: `CSV file ${this.loaded.name} already has a record with ${idColumn} ${remoteId}` };
    } else {
      remoteId = String(this.nextRowNumber++);
    }
    this.positions.set(remoteId, this.rows.length);
    this.rows.push({ remoteId, fields });
    return { ok: true, remoteId, values: valuesOf(this.loaded, fields, remoteId) };
  }

  update(remoteId: string, values: Record<string, unknown>): RecordOutcome {
    const at = this.positions.get(remoteId);
    if (at === undefined) return missingRecord(remoteId);
    const problem = this.unknownColumns(values);
    if (problem) return problem;
    const idColumn = this.idColumn;
    if (idColumn !== null && idColumn in values && cellText(values[idColumn]) !== remoteId) {
      return { ok: false, error: `the ${idColumn} column identifies the record and cannot be changed` };
    }
    const row = this.rows[at]!;
    const fields = [...row.fields];
    for (const [i, name] of this.loaded.header.entries()) if (name in values) fields[i] = cellText(values[name]);
    this.rows[at] = { remoteId, fields };
    return { ok: true, remoteId, values: valuesOf(this.loaded, fields, remoteId) };
  }

  delete(remoteId: string): RecordOutcome {
    const at = this.positions.get(remoteId);
    if (at === undefined) return missingRecord(remoteId);
    this.rows[at] = null;
    this.positions.delete(remoteId);
    return { ok: true, remoteId };
  }

  /** The new version: header order kept, fields quoted where CSV needs it (commas, quotes, line breaks). */
  result(): { content: string; rowCount: number; rowNumbers: number[] | null } {
    const kept = this.rows.filter((r) => r !== null);
    const content = stringify([this.loaded.header, ...kept.map((r) => r.fields)], { record_delimiter: this.loaded.lineBreak });
    // Row numbers are stored from the first rewrite on, so they survive deletions.
    const rowNumbers = this.loaded.identity.kind === "row_number" ? kept.map((r) => Number(r.remoteId)) : null;
    return { content, rowCount: kept.length, rowNumbers };
  }
}

// --- Errors ---------------------------------------------------------------------

/** SQLSTATEs of a connection or server in trouble (08 connection, 40 serialization/deadlock, 53 resources, 57 shutdown/cancel). */
const TRANSIENT_SQLSTATE = /^(08|40|53|57P0[123]|57014)/;

function describeCsvError(error: unknown): ConnectorError {
  const code = (error as { code?: unknown } | null)?.code;
  const transient = typeof code === "string"
    ? NETWORK_ERROR_CODES.has(code) || TRANSIENT_SQLSTATE.test(code)
    // pg reports lost connections as plain Errors; a TypeError and the like is a bug.
    : isPlainError(error);
  return new ConnectorError(`CSV file: ${messageOf(error)}`, { transient, cause: error });
}
