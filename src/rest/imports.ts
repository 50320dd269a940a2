// CSV upload for imports: POST /api/v1/workbook-tables/{id}/imports with a text/csv
// body. The body is decoded (strict UTF-8) and parsed as it arrives, and the rows
// stream through COPY into a temporary table of the request's transaction, from
// which one statement stages them: a large file never sits in memory and a
// malformed one stages nothing. The columns' types are inferred on the way, over
// every row (../connectors/csv-inference.ts, the rules of snapbase_private.csv_type_rules).
// Preview and import are SQL functions (csv_import_preview, import_csv), exposed
// through GraphQL.
import { CsvError, parse, type Info } from "csv-parse";
import { Router, type Request } from "express";
import { once } from "node:events";
import { pipeline } from "node:stream/promises";
import type pg from "pg";
import { from as copyFrom } from "pg-copy-streams";
import { csvProblem } from "../connectors/csv.ts";
import { CsvTypeRules, type CsvColumnKinds } from "../connectors/csv-inference.ts";
import { withUserTransaction } from "../db/request-client.ts";
import { assertPlainUtf8Csv } from "../server/body.ts";
import { capStrings } from "../server/cap.ts";
import { HttpError } from "../server/errors.ts";
import { idParam } from "./params.ts";

// Rows joined into one write to the COPY stream.
const ROWS_PER_WRITE = 1000;

type Parsed = { record: string[]; info: Info };

/** Feeds the request body to the parser as strict UTF-8; a bad byte stops the parse. */
async function feed(req: Request, parser: ReturnType<typeof parse>): Promise<void> {
  const decoder = new TextDecoder("utf-8", { fatal: true });
  let bytes = 0;
  try {
    for await (const chunk of req as AsyncIterable<Buffer>) {
      if (parser.destroyed) return; // the upload failed on the other side
      const text = decoder.decode(chunk, { stream: true });
      bytes += chunk.length;
      if (!parser.write(text)) await Promise.race([once(parser, "drain"), once(parser, "close")]);
    }
    if (parser.destroyed) return;
    decoder.decode();
    parser.end();
  } catch (error) {
    const reason = error instanceof TypeError ? `the file is not valid UTF-8 (within bytes ${bytes + 1} to ${bytes + 65536})` : (error as Error).message;
    parser.destroy(new HttpError(400, "malformed_csv", reason));
  }
}

const COPY_ESCAPES: Record<string, string> = { "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t" };
const ARRAY_SPECIAL = /[\\"]/;
const COPY_SPECIAL = /[\\\n\r\t]/;

/** One line of COPY's text format for (line, cells): cells as a text[] literal with
 *  every element quoted, then escaped for COPY. Most cells need no escaping: they are
 *  tested first, which saves about as much as inferring the types costs. */
function stagingLine(line: number, cells: string[]): string {
  let literal = "{";
  for (let i = 0; i < cells.length; i++) {
    const c = cells[i]!;
    literal += (i === 0 ? '"' : ',"') + (ARRAY_SPECIAL.test(c) ? c.replace(/[\\"]/g, "\\$&") : c) + '"';
  }
  literal += "}";
  return `${line}\t${COPY_SPECIAL.test(literal) ? literal.replace(/[\\\n\r\t]/g, (ch) => COPY_ESCAPES[ch]!) : literal}\n`;
}

/** The parser's records after the header, as COPY text in batches; each record also goes to `seen`. */
async function* stagingText(records: AsyncIterator<Parsed>, seen: CsvColumnKinds): AsyncGenerator<string> {
  let lines: string[] = [];
  for (let next = await records.next(); !next.done; next = await records.next()) {
    seen.add(next.value.record);
    lines.push(stagingLine(next.value.info.lines, next.value.record));
    if (lines.length >= ROWS_PER_WRITE) {
      yield lines.join("");
      lines = [];
    }
  }
  if (lines.length > 0) yield lines.join("");
}

/** Where the parse has got to, for messages about a malformed file. */
interface ParseProgress {
  /** The line the last complete record ended on. */
  lastLine: number;
  headerLength?: number;
}

/** Parser failures as 400s, worded as for connector files (csvProblem); anything else unchanged. */
function asUploadError(error: unknown, progress: ParseProgress): unknown {
  if (error instanceof HttpError) return error;
  if (error instanceof CsvError) {
    // The file streams by, so blank lines after the last record are not skipped: the next record starts on the next line.
    const why = csvProblem(error, () => progress.lastLine + 1, progress.headerLength);
    return new HttpError(400, "malformed_csv", `the file is not valid CSV: ${why}`);
  }
  return error;
}

export function importRoutes(deps: { pool: pg.Pool }): Router {
  const router = Router();

  router.post("/workbook-tables/:id/imports", async (req, res) => {
    const id = idParam(req);
    if (!req.is("text/csv")) throw new HttpError(415, "unsupported_media_type", "send the file as text/csv");
    assertPlainUtf8Csv(req);
    const result = await withUserTransaction(deps.pool, req.pgSettings!, async (c) => {
      // Strict: every row must have as many fields as the header, and quotes must close.
      const progress: ParseProgress = { lastLine: 0 };
      const parser = parse({
        bom: true,
        info: true,
        skip_empty_lines: true,
        // (With info: true each record arrives as { record, info }.)
        on_record: (parsed, context) => {
          progress.headerLength ??= (parsed as unknown as Parsed).record.length;
          progress.lastLine = context.lines;
          return parsed;
        },
      });
      const feeding = feed(req, parser);
      const records = (parser as AsyncIterable<Parsed>)[Symbol.asyncIterator]();
      try {
        const header = await records.next();
        if (header.done) throw new HttpError(400, "malformed_csv", "the file is empty: it needs a header row");
        const importId = (await c.query("select id from snapbase.start_csv_import($1, $2)", [id, header.value.record])).rows[0].id;
        // The function staging the rows runs as the owner, who must be able to read them.
        await c.query("create temporary table snapbase_csv_staging (line integer not null, cells text[] not null) on commit drop");
        await c.query("grant select on snapbase_csv_staging to public");
        // The columns' types are inferred as the rows stream by (the same rules SQL applies).
        const kinds = (await CsvTypeRules.load(c)).columns(header.value.record.length);
        await pipeline(stagingText(records, kinds), c.query(copyFrom("copy snapbase_csv_staging (line, cells) from stdin")));
        await c.query("select snapbase_private.stage_csv_copy($1, $2)", [importId, kinds.kinds()]);
        const { rows } = await c.query("select to_jsonb(i) as import, snapbase.csv_import_preview(i.id) as preview from snapbase.csv_imports i where i.id = $1", [importId]);
        return { import: capStrings(rows[0].import), preview: capStrings(rows[0].preview) };
      } catch (error) {
        throw asUploadError(error, progress);
      } finally {
        parser.destroy();
        await feeding;
      }
    }, req.abortSignal);
    res.status(201).json(result);
  });

  return router;
}
