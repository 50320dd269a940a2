// REST for CSV files, the source of csv connector accounts: upload a file (the
// request body is the file itself), list its versions, download one. Thin wrappers
// over the snapbase.* functions, run as the requesting user: another user's file
// is "not found". The format is checked here with the connector's own parser, so a
// malformed upload is refused at once, naming the line at fault.
import express, { Router, type NextFunction, type Request, type Response } from "express";
import type pg from "pg";
import { inspectCsv } from "../connectors/csv.ts";
import { ConnectorError } from "../connectors/types.ts";
import { withUserTransaction } from "../db/request-client.ts";
import { assertPlainUtf8Csv, assertUtf8 } from "../server/body.ts";
import { HttpError } from "../server/errors.ts";
import { idParam } from "./params.ts";

/** The largest CSV file accepted (the connector reads a version whole). */
export const CSV_UPLOAD_LIMIT = "50mb";

const parseCsvBody = express.raw({ type: "text/csv", limit: CSV_UPLOAD_LIMIT });

/** The body as strict UTF-8 text (a byte that is not UTF-8 is refused, never replaced by U+FFFD),
 *  with the parser's failures (too large) reported as client errors. */
function csvBody(req: Request, res: Response, next: NextFunction): void {
  try {
    assertPlainUtf8Csv(req);
  } catch (e) {
    return next(e);
  }
  parseCsvBody(req, res, (error?: unknown) => {
    if (!error) {
      try {
        if (Buffer.isBuffer(req.body)) req.body = assertUtf8(req.body, "the CSV file");
      } catch (e) {
        return next(e);
      }
      return next();
    }
    const e = error as { type?: string; status?: number; message?: string };
    if (e.type === "entity.too.large") return next(new HttpError(413, "body_too_large", `the CSV file is larger than the ${CSV_UPLOAD_LIMIT} limit`));
    if (typeof e.status === "number" && e.status >= 400 && e.status < 500) return next(new HttpError(e.status, "invalid_body", String(e.message)));
    next(error);
  });
}

/** ?version=n, or undefined for the latest. */
function versionParam(req: Request): number | undefined {
  const raw = req.query.version;
  if (raw === undefined) return undefined;
  if (typeof raw !== "string" || !/^[1-9][0-9]{0,8}$/.test(raw)) {
    throw new HttpError(400, "invalid_version", `version must be a positive integer (got ${JSON.stringify(raw)})`);
  }
  return Number(raw);
}

/** "customers.csv", version 3 → "customers-v3.csv". */
const downloadName = (name: string, version: number) => `${name.replace(/\.csv$/i, "") || "file"}-v${version}.csv`;

export function csvFileRoutes(deps: { pool: pg.Pool }): Router {
  const router = Router();
  const asUser = <T>(req: Request, fn: (c: pg.PoolClient) => Promise<T>) =>
    withUserTransaction(deps.pool, req.pgSettings!, fn, req.abortSignal);

  router.post("/csv-files", csvBody, async (req, res) => {
    const name = req.query.name;
    if (typeof name !== "string" || name.trim() === "") {
      throw new HttpError(400, "invalid_name", "give the file's name: POST /api/v1/csv-files?name=customers.csv");
    }
    // (req.is() cannot tell for an empty body, which must reach upload_csv_file's "empty" refusal.)
    if (!/^\s*text\/csv\s*(;|$)/i.test(req.headers["content-type"] ?? "")) {
      throw new HttpError(415, "unsupported_media_type", "send the CSV file as the request body with content-type: text/csv");
    }
    // No body at all reads as an empty file, which upload_csv_file refuses.
    const content = typeof req.body === "string" ? req.body : "";
    const file = await asUser(req, async (c) => {
      // Stored first, so a caller who may not upload is refused before the file is parsed;
      // a malformed file then rolls the upload back.
      const { rows: [created] } = await c.query("select * from snapbase.upload_csv_file($1, $2)", [name, content]);
      try {
        await inspectCsv(content, name.trim());
      } catch (error) {
        if (error instanceof ConnectorError) throw new HttpError(400, "invalid_csv", error.message);
        throw error;
      }
      return created;
    });
    res.status(201).json({ file });
  });

  router.get("/csv-files/:id/versions", async (req, res) => {
    const id = idParam(req);
    const versions = await asUser(req, async (c) => (await c.query("select * from snapbase.csv_file_versions($1)", [id])).rows);
    res.json({ versions });
  });

  router.get("/csv-files/:id/content", async (req, res) => {
    const id = idParam(req);
    const wanted = versionParam(req);
    const { name, version, content } = await asUser(req, async (c) => {
      // Lists the versions (and refuses others' files with "no CSV file": 404) in the same
      // transaction as the read, so "latest" is the version actually sent.
      const { rows: versions } = await c.query<{ version: number }>("select version from snapbase.csv_file_versions($1)", [id]);
      const version = wanted ?? versions.at(-1)!.version;
      if (!versions.some((v) => v.version === version)) throw new HttpError(404, "not_found", `CSV file ${id} has no version ${version}`);
      const { rows: [file] } = await c.query("select name, snapbase.csv_file_content(id, $2) as content from snapbase.csv_files where id = $1", [id, version]);
      return { name: file.name as string, version, content: file.content as string };
    });
    res.attachment(downloadName(name, version));
    res.type("text/csv; charset=utf-8");
    res.send(content);
  });

  return router;
}
