// The one interface every connector implements. Jobs (tasks/download.ts,
// tasks/publish.ts) talk to external systems only through it.
//
// Values cross this boundary as JSON (numbers, strings, booleans, null, arrays,
// objects). The database types them with the workbook table's column types, so a
// connector may return a decimal as "12.50" or 12.5: both land as numeric 12.50.

/** A column as a workbook stores it: `type` is a PostgreSQL type name. */
export interface ColumnSpec {
  name: string;
  type: string;
  /** Never written back (generated, identity, computed at the source). */
  readOnly: boolean;
  /** The source's own name, when the workbook must name the column otherwise (connectors/names.ts). */
  sourceName?: string;
}

export interface TableSpec {
  /** The table's name at the source, as listTables returns it. */
  name: string;
  columns: ColumnSpec[];
  /** The column whose value identifies a record at the source (its primary key). */
  remoteIdColumn: string;
}

export interface RemoteRecord {
  /** The remote id column's value, as text. */
  remoteId: string;
  values: Record<string, unknown>;
}

/** What happened to one record written to the source, in input order. */
export type RecordOutcome =
  | { ok: true; remoteId: string }
  | { ok: false; error: string };

export interface DownloadOptions {
  /** Records per batch (the job writes each batch in one transaction). */
  batchSize: number;
  signal?: AbortSignal;
}

/**
 * How to recognise one write call's transaction at the source later, e.g.
 * {"txid": "812"} (PostgreSQL) or {"connection_id": 41} (MySQL). JSON.
 */
export type WriteReceipt = Record<string, unknown>;

export interface WriteOptions {
  /**
   * Called once every record is applied, just before the source commits, with
   * what identifies the transaction and each record's outcome so far. The source
   * commits only after it resolves; if it throws, the source rolls back. Publish
   * records its intent here, so a crash after the source commits loses nothing.
   */
  beforeCommit?: (receipt: WriteReceipt, outcomes: RecordOutcome[]) => Promise<void>;
}

/**
 * What became of a write call whose outcome was never recorded (the worker died
 * after beforeCommit): committed or rolled back at the source, or unknown (the
 * caller then compares records with the source). Waits while the transaction is
 * still open at the source, and throws a transient ConnectorError if it stays open.
 */
export type WriteStatus = "committed" | "rolled_back" | "unknown";

export interface Connector {
  /** Throws ConnectorError when the credentials or the host are wrong. */
  test(): Promise<void>;
  listTables(): Promise<string[]>;
  /** Throws ConnectorError (not transient) when the table is missing or has no single-column primary key. */
  tableSpec(table: string): Promise<TableSpec>;
  /** Number of records, for progress. */
  count(table: string): Promise<number>;
  /** Every record, in batches, without holding the table in memory. */
  download(table: string, opts: DownloadOptions): AsyncIterable<RemoteRecord[]>;
  /** The source's current values of these records; missing ids are absent from the map. */
  fetch(table: string, remoteIds: string[]): Promise<Map<string, Record<string, unknown>>>;
  create(table: string, records: Record<string, unknown>[], opts?: WriteOptions): Promise<RecordOutcome[]>;
  /** Each update carries only the fields to change. */
  update(table: string, records: { remoteId: string; values: Record<string, unknown> }[], opts?: WriteOptions): Promise<RecordOutcome[]>;
  delete(table: string, remoteIds: string[], opts?: WriteOptions): Promise<RecordOutcome[]>;
  /** See WriteStatus. `onWait` is told when the transaction is still open at the source. */
  writeStatus(receipt: WriteReceipt, opts?: { onWait?: (message: string) => void; signal?: AbortSignal }): Promise<WriteStatus>;
  close(): Promise<void>;
}

/** A failure talking to the source. Transient ones (network, timeouts) are retried with backoff. */
export class ConnectorError extends Error {
  readonly transient: boolean;
  constructor(message: string, opts: { transient: boolean; cause?: unknown }) {
    super(message, { cause: opts.cause });
    this.name = "ConnectorError";
    this.transient = opts.transient;
  }
}
