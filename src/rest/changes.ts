// The REST layer of seed 000: thin wrappers over the snapbase.* SQL functions, run
// as the requesting user. Snapshot rows are streamed from a cursor, never buffered.
import { Router, type Request, type Response } from "express";
import type pg from "pg";
import { cursorBatches, withUserTransaction } from "../db/request-client.ts";
import { writeOrWait } from "./stream.ts";
import { jsonTextForClients } from "../exact-json.ts";
import { HttpError } from "../server/errors.ts";
import { idParam } from "./params.ts";

const ROWS_PER_FETCH = 2000;

function bodyOf(req: Request): Record<string, unknown> {
  const body = req.body as unknown;
  if (body === undefined) return {};
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new HttpError(400, "invalid_body", "the request body must be a JSON object");
  }
  return body as Record<string, unknown>;
}

/** A whole-number query parameter, or its default. */
function intQuery(req: Request, name: string, fallback: number): number {
  const raw = req.query[name];
  if (raw === undefined) return fallback;
  if (typeof raw !== "string" || !/^\d{1,9}$/.test(raw)) throw new HttpError(400, "invalid_query", `${name} must be a whole number`);
  return Number(raw);
}

const snapshotSummary = `id, change_request_id, table_name, created_at, record_count`;

export function changeRoutes(deps: { pool: pg.Pool }): Router {
  const router = Router();
  const asUser = <T>(req: Request, fn: (c: pg.PoolClient) => Promise<T>) =>
    withUserTransaction(deps.pool, req.pgSettings!, fn, req.abortSignal);

  router.get("/tables/:table_name/snapshots", async (req, res) => {
    const result = await asUser(req, async (c) => {
      const { rows: [table] } = await c.query("select * from snapbase.resolve_managed_table($1)", [req.params.table_name]);
      const { rows } = await c.query(
        `select ${snapshotSummary} from snapbase.snapshots where managed_table_id = $1 order by id desc`,
        [table.id],
      );
      return { table: table.qualified_name, snapshots: rows };
    });
    res.json(result);
  });

  router.get("/snapshots/:snapshot_id", async (req, res) => {
    const id = idParam(req, "snapshot_id");
    await asUser(req, async (c) => {
      // Raises "no snapshot" (404) or a row-level-security refusal (403) first.
      await c.query("select snapbase_private.readable_snapshot($1)", [id]);
      const { rows } = await c.query(`select ${snapshotSummary}, reason, columns, primary_key from snapbase.snapshots where id = $1`, [id]);
      await streamSnapshot(c, res, rows[0], id);
    });
  });

  router.get("/snapshots/:from_id/diff/:to_id", async (req, res) => {
    const from = idParam(req, "from_id");
    const to = idParam(req, "to_id");
    const diff = await asUser(req, async (c) => (await c.query("select * from snapbase.snapshot_diff($1, $2)", [from, to])).rows);
    res.json({
      from_snapshot_id: Number(from),
      to_snapshot_id: Number(to),
      added: diff.filter((d) => d.change === "added").map((d) => d.after),
      removed: diff.filter((d) => d.change === "removed").map((d) => d.before),
      changed: diff.filter((d) => d.change === "changed").map((d) => ({ key: d.key, changed_fields: d.changed_fields, before: d.before, after: d.after })),
    });
  });

  router.post("/snapshots/:snapshot_id/restore", async (req, res) => {
    const id = idParam(req, "snapshot_id");
    const reason = bodyOf(req).reason;
    const change = await asUser(req, async (c) => (await c.query("select * from snapbase.restore_snapshot($1, $2)", [id, reason ?? null])).rows[0]);
    res.status(change.status === "approved" ? 200 : 422).json({ change_request: change });
  });

  router.get("/changes", async (req, res) => {
    const status = req.query.status;
    if (status !== undefined && !["pending", "approved", "rejected", "failed"].includes(String(status))) {
      throw new HttpError(400, "invalid_status", "status must be pending, approved, rejected or failed");
    }
    const rows = await asUser(req, async (c) =>
      (await c.query("select * from snapbase.change_requests where $1::snapbase.change_status is null or status = $1 order by id desc", [status ?? null])).rows,
    );
    res.json({ changes: rows });
  });

  router.post("/changes", async (req, res) => {
    const body = bodyOf(req);
    const table = body.table_name ?? body.table;
    if (typeof table !== "string" || table === "") throw new HttpError(400, "invalid_body", 'give "table_name" and either "sql" or "edits"');
    if ((typeof body.sql === "string") === (body.edits !== undefined)) {
      throw new HttpError(400, "invalid_body", 'give exactly one of "sql" (text) or "edits" ({"insert", "update", "delete"})');
    }
    const reason = typeof body.reason === "string" ? body.reason : null;
    const change = await asUser(req, async (c) => {
      const { rows: [mt] } = await c.query("select * from snapbase.resolve_managed_table($1)", [table]);
      const { rows } =
        typeof body.sql === "string"
          ? await c.query("select * from snapbase.submit_change(format('%I.%I', $1::text, $2::text)::regclass, $3, $4)", [mt.schema_name, mt.table_name, body.sql, reason])
          : await c.query("select * from snapbase.submit_edits(format('%I.%I', $1::text, $2::text)::regclass, $3, $4)", [mt.schema_name, mt.table_name, JSON.stringify(body.edits), reason]);
      return rows[0];
    });
    res.status(201).json({ change_request: change });
  });

  // What a pending change would do, without doing it (always rolled back).
  router.get("/changes/:change_id/preview", async (req, res) => {
    const id = idParam(req, "change_id");
    const maxRows = intQuery(req, "max_rows", 100);
    const offsetRows = intQuery(req, "offset_rows", 0);
    const preview = await asUser(req, async (c) => (await c.query("select snapbase.preview_change($1, $2, $3) as p", [id, maxRows, offsetRows])).rows[0].p);
    res.json({ preview });
  });

  router.post("/changes/:change_id/approve", async (req, res) => {
    const id = idParam(req, "change_id");
    const change = await asUser(req, async (c) => (await c.query("select * from snapbase.approve_change($1)", [id])).rows[0]);
    // A change that failed is recorded (status "failed"), but the client must not read it as success.
    res.status(change.status === "approved" ? 200 : 422).json({ change_request: change });
  });

  router.post("/changes/:change_id/reject", async (req, res) => {
    const id = idParam(req, "change_id");
    const reason = bodyOf(req).reason;
    if (reason !== undefined && typeof reason !== "string") throw new HttpError(400, "invalid_body", '"reason" must be text');
    const change = await asUser(req, async (c) => (await c.query("select * from snapbase.reject_change($1, $2)", [id, reason ?? null])).rows[0]);
    res.json({ change_request: change });
  });

  return router;
}

/** Writes {...summary, "snapshot_data": [rows...]} while fetching rows in batches. */
async function streamSnapshot(c: pg.PoolClient, res: Response, summary: Record<string, unknown>, id: string): Promise<void> {
  const head = JSON.stringify(summary);
  res.status(200).type("application/json");
  res.write(head.slice(0, -1) + ',"snapshot_data":[');
  let first = true;
  // Rows arrive as JSON text and are written as they are: parsing them only to
  // serialize them again would cost more than the query.
  for await (const rows of cursorBatches<{ row: string }>(c, 'select "row"::text as row from snapbase.snapshot_rows($1)', [id], ROWS_PER_FETCH)) {
    // Numbers too wide for a double become exact strings, as everywhere in REST
    // (only rows holding a long run of digits are parsed to check).
    const chunk = jsonTextForClients(`[${rows.map((r) => r.row).join(",")}]`).slice(1, -1);
    await writeOrWait(res, (first ? "" : ",") + chunk);
    first = false;
  }
  res.end("]}");
}
