// CSV upload for imports: POST /api/v1/workbook-tables/{id}/imports with a text/csv
// body. The body is decoded (strict UTF-8) and parsed as it arrives, and staged in
// batches in one transaction, so a large file never sits in memory and a malformed
// one stages nothing. Preview and import are SQL functions (csv_import_preview,
// import_csv), exposed through GraphQL.
import { parse, type Info } from "csv-parse";
import { Router, type Request } from "express";
import { once } from "node:events";
import type pg from "pg";
import { withUserTransaction } from "../db/request-client.ts";
import { HttpError } from "../server/errors.ts";
import { idParam } from "./params.ts";

const ROWS_PER_BATCH = 1000;

type Staged = { line: number; cells: string[] };

/** Feeds the request body to the parser as strict UTF-8; a bad byte stops the parse. */
async function feed(req: Request, parser: ReturnType<typeof parse>): Promise<void> {
  const decoder = new TextDecoder("utf-8", { fatal: true });
  let bytes = 0;
  try {
    for await (const chunk of req as AsyncIterable<Buffer>) {
      const text = decoder.decode(chunk, { stream: true });
      bytes += chunk.length;
      if (!parser.write(text)) await once(parser, "drain");
    }
    decoder.decode();
    parser.end();
  } catch (error) {
    const reason = error instanceof TypeError ? `the file is not valid UTF-8 (within bytes ${bytes + 1} to ${bytes + 65536})` : (error as Error).message;
    parser.destroy(new HttpError(400, "malformed_csv", reason));
  }
}

export function importRoutes(deps: { pool: pg.Pool }): Router {
  const router = Router();

  router.post("/workbook-tables/:id/imports", async (req, res) => {
    const id = idParam(req);
    if (!req.is("text/csv")) throw new HttpError(415, "unsupported_media_type", "send the file as text/csv");
    const result = await withUserTransaction(deps.pool, req.pgSettings!, async (c) => {
      // Strict: every row must have as many fields as the header, and quotes must close.
      const parser = parse({ bom: true, info: true, skip_empty_lines: true });
      const feeding = feed(req, parser);
      let importId: string | undefined;
      let batch: Staged[] = [];
      const flush = async () => {
        if (batch.length === 0) return;
        await c.query("select snapbase.stage_csv_rows($1, $2)", [importId, JSON.stringify(batch)]);
        batch = [];
      };
      try {
        for await (const { record, info } of parser as AsyncIterable<{ record: string[]; info: Info }>) {
          if (importId === undefined) {
            importId = (await c.query("select id from snapbase.start_csv_import($1, $2)", [id, record])).rows[0].id;
            continue;
          }
          batch.push({ line: info.lines, cells: record });
          if (batch.length >= ROWS_PER_BATCH) await flush();
        }
      } catch (error) {
        if (error instanceof HttpError) throw error;
        const code = (error as { code?: string }).code ?? "";
        if (code.startsWith("CSV_")) throw new HttpError(400, "malformed_csv", `the file is not valid CSV: ${(error as Error).message}`);
        throw error;
      } finally {
        await feeding;
      }
      if (importId === undefined) throw new HttpError(400, "malformed_csv", "the file is empty: it needs a header row");
      await flush();
      const { rows } = await c.query("select to_jsonb(i) as import, snapbase.csv_import_preview(i.id) as preview from snapbase.csv_imports i where i.id = $1", [importId]);
      return rows[0];
    });
    res.status(201).json(result);
  });

  return router;
}
