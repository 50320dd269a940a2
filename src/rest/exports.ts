// CSV downloads: a workbook table (all records, or its active filter), a snapshot,
// and the public share links. Rows stream from a cursor through csv-stringify, so a
// table of any size never sits in memory; exporting only reads.
import { stringify } from "csv-stringify/sync";
import { Router, type Request, type Response } from "express";
import type pg from "pg";
import { cursorBatches, withUserTransaction } from "../db/request-client.ts";
import { HttpError } from "../server/errors.ts";
import { idParam } from "./params.ts";

const ROWS_PER_FETCH = 2000;

// As COPY ... CSV writes: NULL is an empty field, an empty string is "" (so the two
// stay apart when the file is read back).
const csvOptions = { cast: { string: (v: string) => (v === "" ? { value: "", quoted_empty: true } : v) } };

/** Writes text[] rows (the first is the header) as a CSV attachment; the caller ends the response. */
async function writeCsv(c: pg.PoolClient, res: Response, filename: string, sql: string, params: unknown[]): Promise<void> {
  let started = false;
  for await (const rows of cursorBatches<{ cells: (string | null)[] }>(c, sql, params, ROWS_PER_FETCH)) {
    if (!started) {
      // Headers go out with the first rows: an error before them is still a clean HTTP error.
      res.status(200).set({ "content-type": "text/csv; charset=utf-8", "content-disposition": `attachment; filename="${filename}"` });
      started = true;
    }
    const ok = res.write(stringify(rows.map((r) => r.cells), csvOptions));
    if (!ok) await new Promise((resolve) => res.once("drain", resolve));
  }
}

export function exportRoutes(deps: { pool: pg.Pool }): Router {
  const router = Router();
  // The response ends only after the transaction commits, so a client holding the
  // whole file knows its side effects (a share link's audit entry) are stored. A
  // failure after the first rows went out cuts the connection: a truncated file
  // must not look complete.
  async function sendCsv(req: Request, res: Response, filename: string, sql: string, params: unknown[]): Promise<void> {
    try {
      await withUserTransaction(deps.pool, req.pgSettings!, (c) => writeCsv(c, res, filename, sql, params));
    } catch (error) {
      if (!res.headersSent) throw error;
      res.destroy(error as Error);
      return;
    }
    res.end();
  }

  router.get("/workbook-tables/:id/export.csv", async (req, res) => {
    const id = idParam(req, "id");
    const filtered = req.query.filter === "active";
    await sendCsv(req, res, `table-${id}.csv`, "select cells from snapbase.export_table_rows($1, $2) cells", [id, filtered]);
  });

  router.get("/snapshots/:id/export.csv", async (req, res) => {
    const id = idParam(req, "id");
    await sendCsv(req, res, `snapshot-${id}.csv`, "select cells from snapbase.export_snapshot_rows($1) cells", [id]);
  });

  // Public: the token is the only credential; the request runs as the anonymous role.
  router.get("/share/:token", async (req, res) => {
    const token = String(req.params.token);
    if (!/^sbs_[A-Za-z0-9_-]{20,100}$/.test(token)) throw new HttpError(404, "not_found", "no such share link");
    await sendCsv(req, res, "shared.csv", "select cells from snapbase.shared_table_rows($1) cells", [token]);
  });

  return router;
}
