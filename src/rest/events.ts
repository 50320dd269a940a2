// Server-sent events: GET /api/v1/workbooks/{id}/events and /api/v1/changes/events.
//
// Each stream follows one topic through the EventHub. On every NOTIFY the database
// is asked, as the user, for the events after the last one sent
// (snapbase.visible_events): access rules apply to every event, nothing is sent
// twice, and a reconnecting client (Last-Event-ID) is replayed what it missed.
// Streams of a topic opened with the same role and claims see the same events, so
// they share one query per NOTIFY (a feed) instead of asking once each.
// A comment line every HEARTBEAT_MS keeps proxies from closing an idle stream.
import { Router, type Request, type Response } from "express";
import type pg from "pg";
import type { PgSettings } from "../auth/verify.ts";
import { settingsIdentity, withUserTransaction } from "../db/request-client.ts";
import type { EventHub } from "../realtime/hub.ts";
import { HttpError } from "../server/errors.ts";
import { idParam } from "./params.ts";

const HEARTBEAT_MS = 15_000;

type Event = { id: number };

function lastEventId(req: Request): number {
  const raw = req.header("last-event-id") ?? (typeof req.query.last_event_id === "string" ? req.query.last_event_id : undefined);
  if (raw === undefined || raw === "") return 0;
  if (!/^\d{1,18}$/.test(raw)) throw new HttpError(400, "invalid_last_event_id", "Last-Event-ID must be an event id");
  return Number(raw);
}

/** One open SSE response and the last event id it was sent. */
class Stream {
  sent: number;
  private readonly res: Response;
  constructor(res: Response, sent: number) {
    this.res = res;
    this.sent = sent;
  }
  send(events: Event[]): void {
    for (const event of events) {
      if (event.id <= this.sent) continue;
      this.res.write(`id: ${event.id}\nevent: snapbase\ndata: ${JSON.stringify(event)}\n\n`);
      this.sent = event.id;
    }
  }
  end(): void {
    this.res.end(); // the client reconnects with Last-Event-ID
  }
}

/** The streams of one topic and one identity, served by one catch-up at a time;
 *  a NOTIFY during a catch-up asks for another. */
class Feed {
  readonly streams = new Set<Stream>();
  following: Promise<() => Promise<void>> | undefined;
  private readonly fetchAfter: (after: number) => Promise<Event[]>;
  private running = false;
  private again = false;
  constructor(fetchAfter: (after: number) => Promise<Event[]>) {
    this.fetchAfter = fetchAfter;
  }
  async catchUp(): Promise<void> {
    if (this.running) return void (this.again = true);
    this.running = true;
    try {
      do {
        this.again = false;
        if (this.streams.size === 0) return;
        const events = await this.fetchAfter(Math.min(...[...this.streams].map((s) => s.sent)));
        for (const stream of this.streams) stream.send(events);
      } while (this.again);
    } catch {
      // Lost access, or the database went away: every stream of the feed alike.
      for (const stream of this.streams) stream.end();
    } finally {
      this.running = false;
    }
  }
}

export function eventRoutes(deps: {
  pool: pg.Pool;
  hub: EventHub;
  heartbeatMs?: number;
  /** Resolves the request's token again (the session may have ended or the role changed since the stream opened). */
  reauthorize?: (req: Request) => Promise<PgSettings>;
  /** Aborted at shutdown: open streams end. */
  shutdown?: AbortSignal;
}): Router {
  const router = Router();

  const feeds = new Map<string, Feed>();
  // At shutdown every stream ends; clients reconnect (to another instance) with Last-Event-ID.
  deps.shutdown?.addEventListener("abort", () => {
    for (const feed of feeds.values()) for (const s of feed.streams) s.end();
  }, { once: true });

  async function stream(req: Request, res: Response, topic: string): Promise<void> {
    const settings = req.pgSettings!;
    const fetchAfter = (after: number) =>
      withUserTransaction(deps.pool, settings, async (c) =>
        (await c.query<{ e: Event }>("select e from snapbase.visible_events($1, $2) e", [topic, after])).rows.map((r) => r.e));
    // Before each catch-up of an open stream: the same identity, or the streams end
    // (a signed-out, revoked, demoted or disabled user reconnects as who they are now).
    const fetchFollowing = async (after: number) => {
      if (deps.reauthorize && settingsIdentity(await deps.reauthorize(req)) !== settingsIdentity(settings)) {
        throw new Error("the stream's identity changed");
      }
      return fetchAfter(after);
    };
    const stream = new Stream(res, lastEventId(req));
    if (deps.shutdown?.aborted) throw new HttpError(503, "shutting_down", "the server is shutting down; reconnect");
    // Access is checked before the stream opens, so refusals are ordinary HTTP errors.
    const backlog = await withUserTransaction(deps.pool, settings, async (c) =>
      (await c.query<{ e: Event }>("select e from snapbase.visible_events($1, $2) e", [topic, stream.sent])).rows.map((r) => r.e), req.abortSignal);
    if (req.abortSignal.aborted) return;

    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache", connection: "keep-alive", "x-accel-buffering": "no" });
    res.write("retry: 3000\n\n");
    stream.send(backlog);

    const key = `${topic}\n${settingsIdentity(settings)}`;
    let feed = feeds.get(key);
    if (!feed) {
      const created = new Feed(fetchFollowing);
      created.following = deps.hub.follow(topic, () => void created.catchUp());
      // Without a LISTEN (the database is unreachable) the feed's streams end; clients reconnect.
      created.following.catch(() => {
        if (feeds.get(key) === created) feeds.delete(key);
        for (const s of created.streams) s.end();
      });
      feeds.set(key, (feed = created));
    }
    feed.streams.add(stream);
    const heartbeat = setInterval(() => res.write(": heartbeat\n\n"), deps.heartbeatMs ?? HEARTBEAT_MS);
    res.once("close", () => {
      clearInterval(heartbeat);
      feed.streams.delete(stream);
      if (feed.streams.size === 0 && feeds.get(key) === feed) {
        feeds.delete(key);
        void feed.following?.then((unfollow) => unfollow(), () => {});
      }
    });
    if (deps.shutdown?.aborted) return stream.end();
    try {
      await feed.following;
    } catch {
      return; // ended above
    }
    await feed.catchUp(); // whatever happened between the backlog and the LISTEN
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
