// Column names between a source and a workbook. A workbook table holds the source's
// columns under their own names, except where PostgreSQL or Snapbase cannot:
// - names starting with "__" are Snapbase's metadata columns (__id, __dirty, ...);
// - names longer than 63 bytes (MySQL allows 64 characters, up to 256 bytes; a CSV
//   header any length) do not fit a PostgreSQL identifier, which would truncate them.
// Such a name becomes "~" + the name; one still too long becomes "~" + its longest
// prefix of at most 49 bytes + "~" + the first 12 hex digits of its SHA-256. A
// source name starting with "~" gets one more "~", so a local name starting with
// "~" always stands for another source name, and two source names never share one
// (a clash, possible only by design of the names, stops the download). The
// workbook's column list keeps the source's name as `source_name`; the connector
// wrapper below renames values both ways, so downloads, conflict checks and
// publishing all use the source's own names.
import { createHash } from "node:crypto";
import { ConnectorError, type Connector, type RemoteRecord, type TableSpec } from "./types.ts";

const MAX_BYTES = 63;
const PREFIX_BYTES = 49;

/** The longest prefix of `text` of at most `bytes` UTF-8 bytes, never splitting a character. */
function prefixOfBytes(text: string, bytes: number): string {
  let out = "";
  for (const ch of text) {
    if (Buffer.byteLength(out + ch) > bytes) break;
    out += ch;
  }
  return out;
}

/** The name a workbook table gives a source column (itself when it can). */
export function localColumnName(sourceName: string): string {
  const escaped = sourceName.startsWith("__") || sourceName.startsWith("~");
  if (!escaped && sourceName !== "" && Buffer.byteLength(sourceName) <= MAX_BYTES) return sourceName;
  if (escaped && Buffer.byteLength(sourceName) + 1 <= MAX_BYTES) return `~${sourceName}`;
  const hash = createHash("sha256").update(sourceName).digest("hex").slice(0, 12);
  return `~${prefixOfBytes(sourceName, PREFIX_BYTES)}~${hash}`;
}

/** Source name → local name for a table's columns; null when every name is kept. Throws on a clash. */
function namesOf(spec: TableSpec): Map<string, string> | null {
  const local = new Map(spec.columns.map((c) => [c.name, localColumnName(c.name)]));
  if ([...local].every(([s, l]) => s === l)) return null;
  const seen = new Map<string, string>();
  for (const [s, l] of local) {
    const other = seen.get(l);
    if (other !== undefined) {
      throw new ConnectorError(`the source columns ${JSON.stringify(other)} and ${JSON.stringify(s)} would both be named ${JSON.stringify(l)} in a workbook; rename one at the source`, { transient: false });
    }
    seen.set(l, s);
  }
  return local;
}

const rename = (values: Record<string, unknown>, names: ReadonlyMap<string, string>): Record<string, unknown> =>
  Object.fromEntries(Object.entries(values).map(([k, v]) => [names.get(k) ?? k, v]));

/** The connector with its columns under their workbook names (see above). */
export function withLocalColumnNames(connector: Connector): Connector {
  const specs = new Map<string, Promise<{ toLocal: Map<string, string>; toSource: Map<string, string> } | null>>();
  const namesFor = (table: string) => {
    let names = specs.get(table);
    if (!names) {
      names = connector.tableSpec(table).then((spec) => {
        const toLocal = namesOf(spec);
        return toLocal && { toLocal, toSource: new Map([...toLocal].map(([s, l]) => [l, s])) };
      });
      names.catch(() => specs.delete(table));
      specs.set(table, names);
    }
    return names;
  };
  return {
    ...connector,
    async tableSpec(table) {
      const spec = await connector.tableSpec(table);
      const toLocal = namesOf(spec);
      if (!toLocal) return spec;
      return {
        ...spec,
        columns: spec.columns.map((c) => (toLocal.get(c.name) === c.name ? c : { ...c, name: toLocal.get(c.name)!, sourceName: c.name })),
        remoteIdColumn: toLocal.get(spec.remoteIdColumn) ?? spec.remoteIdColumn,
      };
    },
    async *download(table, opts) {
      const names = await namesFor(table);
      for await (const batch of connector.download(table, opts)) {
        yield names ? batch.map((r): RemoteRecord => ({ remoteId: r.remoteId, values: rename(r.values, names.toLocal) })) : batch;
      }
    },
    async fetch(table, remoteIds) {
      const names = await namesFor(table);
      const found = await connector.fetch(table, remoteIds);
      return names ? new Map([...found].map(([id, values]) => [id, rename(values, names.toLocal)])) : found;
    },
    async create(table, records, opts) {
      const names = await namesFor(table);
      return connector.create(table, names ? records.map((r) => rename(r, names.toSource)) : records, opts);
    },
    async update(table, records, opts) {
      const names = await namesFor(table);
      return connector.update(table, names ? records.map((r) => ({ remoteId: r.remoteId, values: rename(r.values, names.toSource) })) : records, opts);
    },
  };
}
