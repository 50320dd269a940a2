// CSV downloads: a workbook table (all records, or its active filter), a snapshot,
// and the public share links. The export functions (text[] rows, header first) run
// as the caller; their rows go into a temporary table and PostgreSQL's COPY writes
// the CSV, streamed to the response. Exporting only reads.
import { Router, type Request, type Response } from "express";
import { finished } from "node:stream/promises";
import type pg from "pg";
import { to as copyTo } from "pg-copy-streams";
import { RequestAbortedError, withUserTransaction } from "../db/request-client.ts";
import { HttpError } from "../server/errors.ts";
import { idParam } from "./params.ts";

/**
 * Writes the rows of an export function call (text[] rows, header first) as a CSV
 * attachment; the caller ends the response. COPY needs the number of columns up
 * front, so the rows are kept once in a temporary table (a PL/pgSQL set-returning
 * function holds its whole result anyway). As COPY ... CSV writes: NULL is an empty
 * field, an empty string is "" (so the two stay apart when the file is read back).
 * Measured on 1M rows: fetching text[] rows through a cursor and csv-stringify took
 * about 11 s, of which parsing the arrays in JavaScript was 5.5 s.
 */
async function writeCsv(c: pg.PoolClient, res: Response, filename: string, call: string, params: unknown[]): Promise<void> {
  await c.query("create temporary table snapbase_export (cells text[] not null, ord bigint not null) on commit drop");
  await c.query(`insert into snapbase_export select e.cells, e.ord from ${call} with ordinality as e(cells, ord)`, params);
  const width = Number((await c.query("select cardinality(cells) as n from snapbase_export where ord = 1")).rows[0]?.n ?? 0);
  const columns = Array.from({ length: width }, (_, i) => `cells[${i + 1}]`).join(", ");
  // Headers go out only now: an error before this point is still a clean HTTP error.
  res.status(200).set({ "content-type": "text/csv; charset=utf-8", "content-disposition": `attachment; filename="${filename}"` });
  const copy = c.query(copyTo(`copy (select ${columns} from snapbase_export order by ord) to stdout with (format csv)`));
  // A client that goes away, at any point: the request's abort signal cancels the
  // COPY and destroys the connection (withUserTransaction), which ends this stream.
  // Unless the COPY had already finished in PostgreSQL with rows still buffered here:
  // the response's close unpipes them, and a stream whose rows nobody reads never
  // ends. So a closed response also ends the stream itself.
  const hungUp = () => {
    if (!copy.readableEnded) copy.destroy(new RequestAbortedError());
  };
  // pg may still report the cut connection to the stream after that (handled: the abort did it).
  copy.on("error", () => {});
  res.once("close", hungUp);
  try {
    copy.pipe(res, { end: false });
    await finished(copy);
  } finally {
    res.off("close", hungUp);
  }
  if (res.destroyed) throw new RequestAbortedError();
}

export function exportRoutes(deps: { pool: pg.Pool }): Router {
  const router = Router();
  // The response ends only after the transaction commits, so a client holding the
  // whole file knows its side effects (a share link's audit entry) are stored. A
  // failure after the first rows went out cuts the connection: a truncated file
  // must not look complete.
  async function sendCsv(req: Request, res: Response, filename: string, call: string, params: unknown[]): Promise<void> {
    try {
      await withUserTransaction(deps.pool, req.pgSettings!, (c) => writeCsv(c, res, filename, call, params), req.abortSignal);
    } catch (error) {
      if (!res.headersSent || error instanceof RequestAbortedError) throw error;
      res.destroy(error as Error);
      return;
    }
    res.end();
  }

  // The table's column order without its hidden columns; ?columns=all: every column, in table order.
  router.get("/workbook-tables/:id/export.csv", async (req, res) => {
    const id = idParam(req, "id");
    const filtered = req.query.filter === "active";
    const columns = req.query.columns ?? "table";
    if (columns !== "table" && columns !== "all") {
      throw new HttpError(400, "invalid_columns", `columns must be table (the table's column order, hidden columns left out) or all (got ${JSON.stringify(columns)})`);
    }
    await sendCsv(req, res, `table-${id}.csv`, "snapbase.export_table_rows($1, $2, $3)", [id, filtered, columns === "all"]);
  });

  router.get("/snapshots/:id/export.csv", async (req, res) => {
    const id = idParam(req, "id");
    await sendCsv(req, res, `snapshot-${id}.csv`, "snapbase.export_snapshot_rows($1)", [id]);
  });

  // Public: the token is the only credential; the request runs as the anonymous role.
  router.get("/share/:token", async (req, res) => {
    const token = String(req.params.token);
    if (!/^sbs_[A-Za-z0-9_-]{20,100}$/.test(token)) throw new HttpError(404, "not_found", "no such share link");
    await sendCsv(req, res, "shared.csv", "snapbase.shared_table_rows($1)", [token]);
  });

  return router;
}
