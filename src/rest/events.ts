// Server-sent events: GET /api/v1/workbooks/{id}/events and /api/v1/changes/events.
//
// Each stream follows one topic through the EventHub. On every NOTIFY it asks the
// database, as the user, for the events after the last one it sent
// (snapbase.visible_events): access rules apply to every event, nothing is sent
// twice, and a reconnecting client (Last-Event-ID) is replayed what it missed.
// A comment line every HEARTBEAT_MS keeps proxies from closing an idle stream.
import { Router, type Request, type Response } from "express";
import type pg from "pg";
import { withUserTransaction } from "../db/request-client.ts";
import type { EventHub } from "../realtime/hub.ts";
import { HttpError } from "../server/errors.ts";
import { idParam } from "./params.ts";

const HEARTBEAT_MS = 15_000;

function lastEventId(req: Request): number {
  const raw = req.header("last-event-id") ?? (typeof req.query.last_event_id === "string" ? req.query.last_event_id : undefined);
  if (raw === undefined || raw === "") return 0;
  if (!/^\d{1,18}$/.test(raw)) throw new HttpError(400, "invalid_last_event_id", "Last-Event-ID must be an event id");
  return Number(raw);
}

export function eventRoutes(deps: { pool: pg.Pool; hub: EventHub; heartbeatMs?: number }): Router {
  const router = Router();

  async function stream(req: Request, res: Response, topic: string): Promise<void> {
    const settings = req.pgSettings!;
    const fetchAfter = (after: number) =>
      withUserTransaction(deps.pool, settings, async (c) =>
        (await c.query<{ e: { id: number } }>("select e from snapbase.visible_events($1, $2) e", [topic, after])).rows.map((r) => r.e));
    let sent = lastEventId(req);
    // Access is checked before the stream opens, so refusals are ordinary HTTP errors.
    const backlog = await fetchAfter(sent);

    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache", connection: "keep-alive", "x-accel-buffering": "no" });
    res.write("retry: 3000\n\n");
    const send = (events: { id: number }[]) => {
      for (const event of events) {
        res.write(`id: ${event.id}\nevent: snapbase\ndata: ${JSON.stringify(event)}\n\n`);
        sent = event.id;
      }
    };
    send(backlog);

    // One catch-up at a time; a NOTIFY during one asks for another.
    let running = false;
    let again = false;
    const catchUp = async () => {
      if (running) return void (again = true);
      running = true;
      try {
        do {
          again = false;
          send(await fetchAfter(sent));
        } while (again);
      } catch {
        res.end(); // lost access, or the database went away: the client reconnects
      } finally {
        running = false;
      }
    };
    const unfollow = await deps.hub.follow(topic, () => void catchUp());
    await catchUp(); // whatever happened between the backlog and the LISTEN
    const heartbeat = setInterval(() => res.write(": heartbeat\n\n"), deps.heartbeatMs ?? HEARTBEAT_MS);
    req.on("close", () => {
      clearInterval(heartbeat);
      void unfollow();
    });
  }

  router.get("/workbooks/:id/events", async (req, res) => {
    const id = idParam(req);
    await stream(req, res, `workbook:${id}`);
  });
  router.get("/changes/events", async (req, res) => {
    await stream(req, res, "changes");
  });
  return router;
}
