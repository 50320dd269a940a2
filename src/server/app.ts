// The HTTP server: health checks, the REST layer, and PostGraphile (GraphQL over HTTP
// and WebSocket) on one Express 5 app.
import cors from "cors";
import express, { type NextFunction, type Request, type Response } from "express";
import helmet from "helmet";
import { randomBytes } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { isIP, type AddressInfo, type Socket } from "node:net";
import { postgraphile } from "postgraphile";
import { grafserv } from "postgraphile/grafserv/express/v4";
import { ThrottledError } from "../auth/sign-in.ts";
import { settingsForAuthorization, type AuthDeps, type PgSettings } from "../auth/verify.ts";
import { developmentHttpOptions, type HttpOptions, type RoleNames } from "../config.ts";
import { migrationsAreCurrent } from "../db/migrate.ts";
import { createPool, type SnapbasePool } from "../db/pools.ts";
import { RequestAbortedError } from "../db/request-client.ts";
import { log } from "../log.ts";
import { authRoutes } from "../rest/auth.ts";
import { changeRoutes } from "../rest/changes.ts";
import { csvFileRoutes } from "../rest/csv-files.ts";
import { eventRoutes } from "../rest/events.ts";
import { exportRoutes } from "../rest/exports.ts";
import { importRoutes } from "../rest/imports.ts";
import { exactJsonBody, restJsonTypes } from "../rest/json.ts";
import { EventHub } from "../realtime/hub.ts";
import { jsonBody } from "./body.ts";
import { HttpError, toClientError } from "./errors.ts";
import { parseQueryStrict } from "./query.ts";
import { cspNonces, httpPgSettings, makePreset, throttledRequests } from "./graphql.ts";

export interface ServerOptions {
  ownerUrl: string;
  authenticatorUrl: string;
  jwtSecret: string;
  roles: RoleNames;
  host: string;
  port: number;
  statementTimeoutMs?: number;
  credentialsKey?: string;
  /** GraphiQL, introspection, suggestions, GraphQL limits, CORS, proxies; unset: development defaults. */
  http?: Partial<HttpOptions>;
  /** Connections of the authenticator pool (requests, PostGraphile, SSE catch-ups); default 20. */
  authenticatorPoolSize?: number;
  /** Connections of the REST pool (REST's JSON answers); default 10. */
  restPoolSize?: number;
  /** How long shutdown waits for requests in flight before it stops them. */
  shutdownDrainMs?: number;
}

export interface RunningServer {
  url: string;
  httpServer: Server;
  /** The pools requests run on (for operations and tests). */
  pools: { authenticator: SnapbasePool; rest: SnapbasePool; owner: SnapbasePool };
  /**
   * Stops accepting requests, ends event streams, waits up to the drain time
   * (default: the server's shutdownDrainMs) for requests in flight, then stops
   * what is left (their queries are cancelled) and closes every connection.
   */
  close(opts?: { drainMs?: number }): Promise<void>;
}

declare module "express-serve-static-core" {
  interface Request {
    pgSettings?: PgSettings;
    /** Aborts when the client goes away before the response is complete. */
    abortSignal: AbortSignal;
  }
}

export const DEFAULT_SHUTDOWN_DRAIN_MS = 10_000;

// A client that goes away, or the end of shutdown's drain (`stopped`), aborts the
// request's database work (REST, GraphQL, sign-in, token checks): see withAbortableClient.
function abortOnHangUp(stopped: AbortSignal) {
  return (req: Request, res: Response, next: NextFunction): void => {
    const controller = new AbortController();
    req.abortSignal = controller.signal;
    const stop = () => controller.abort();
    if (stopped.aborted) stop();
    else stopped.addEventListener("abort", stop, { once: true });
    res.once("close", () => {
      stopped.removeEventListener("abort", stop);
      if (!res.writableFinished) controller.abort();
    });
    next();
  };
}

function requestLog(req: Request, res: Response, next: NextFunction): void {
  const started = process.hrtime.bigint();
  res.on("finish", () => {
    log.info("request", {
      method: req.method,
      path: req.originalUrl.split("?")[0],
      status: res.statusCode,
      ms: Number(process.hrtime.bigint() - started) / 1e6,
    });
  });
  next();
}

// EventSource cannot send headers: event streams also take ?access_token=
// (a five-minute token from createStreamToken, or an API token).
const isEventStream = (req: Request): boolean => req.method === "GET" && /\/events$/.test(req.path);

function authorizationOf(req: Request): string | undefined {
  if (req.headers.authorization) return req.headers.authorization;
  const token = req.query.access_token;
  if (isEventStream(req) && typeof token === "string") return `Bearer ${token}`;
  return undefined;
}

function authenticate(auth: AuthDeps) {
  return async (req: Request, _res: Response, next: NextFunction) => {
    // Stream tokens only open event streams (under /api/v1; GraphQL never takes them).
    const settings = await settingsForAuthorization(authorizationOf(req), auth, {
      allowStreamToken: req.baseUrl === "/api/v1" && isEventStream(req),
      signal: req.abortSignal,
    });
    req.pgSettings = settings;
    httpPgSettings.set(req, settings);
    next();
  };
}

/** REST needs a signed-in caller, except to sign in and to follow a share link. */
function requireSignIn(roles: RoleNames) {
  return (req: Request, _res: Response, next: NextFunction) => {
    const open = (req.method === "POST" && req.path === "/auth/login") || (req.method === "GET" && (req.path.startsWith("/share/") || req.path === "/"));
    if (!open && req.pgSettings?.role === roles.anonymous) {
      next(new HttpError(401, "authentication_required", "sign in first: send 'Authorization: Bearer <token>' (from POST /api/v1/auth/login, or an API token)"));
      return;
    }
    next();
  };
}

/** The client address behind the proxies `trust proxy` believes, as Express's req.ip
 *  computes it; also for WebSocket upgrade requests, which Express never sees. */
function clientAddressFn(app: express.Express) {
  return (req: IncomingMessage): string | undefined => {
    const ip = (req as Request).ip;
    // A forwarded value that is not an address (only a trusted proxy's can reach
    // here) counts as the proxy itself, so throttling never loses the address.
    if (ip !== undefined) return isIP(ip) ? ip : req.socket.remoteAddress;
    const trust = app.get("trust proxy fn") as (address: string, hop: number) => boolean;
    const forwarded = String(req.headers["x-forwarded-for"] ?? "").split(",").map((a) => a.trim()).filter((a) => a !== "").reverse();
    const chain = [req.socket.remoteAddress ?? "", ...forwarded];
    let hop = 0;
    while (hop < chain.length - 1 && trust(chain[hop]!, hop)) hop++;
    return isIP(chain[hop]!) ? chain[hop] : req.socket.remoteAddress;
  };
}

/** A throttled GraphQL sign-in answers 429 with Retry-After, like REST (grafserv
 *  would answer 200 with the error in the body). */
function throttledGraphqlStatus(req: Request, res: Response, next: NextFunction): void {
  const writeHead = res.writeHead;
  res.writeHead = function (this: ServerResponse, status: number, ...rest: unknown[]) {
    const wait = throttledRequests.get(req);
    if (wait !== undefined && status < 300) {
      this.setHeader("Retry-After", String(wait));
      return (writeHead as (...args: unknown[]) => ServerResponse).call(this, 429, ...rest);
    }
    return (writeHead as (...args: unknown[]) => ServerResponse).call(this, status, ...rest);
  } as typeof res.writeHead;
  next();
}

/** Security headers (helmet). The CSP allows this origin only; inline scripts need
 *  the page's nonce, which the GraphiQL page (Ruru) puts on its own; Ruru and its
 *  Monaco editor style elements inline and start workers from this origin. */
function securityHeaders() {
  const nonce = (_req: IncomingMessage, res: ServerResponse) => `'nonce-${(res as Response).locals.cspNonce}'`;
  return [
    (req: Request, res: Response, next: NextFunction) => {
      res.locals.cspNonce = randomBytes(16).toString("base64");
      cspNonces.set(req, res.locals.cspNonce as string);
      next();
    },
    helmet({
      contentSecurityPolicy: {
        useDefaults: true,
        directives: {
          "default-src": ["'self'"],
          "script-src": ["'self'", nonce],
          "style-src": ["'self'", "'unsafe-inline'"],
          "img-src": ["'self'", "data:"],
          "font-src": ["'self'", "data:"],
          "worker-src": ["'self'", "blob:"],
          "connect-src": ["'self'"],
          "frame-ancestors": ["'none'"],
          "form-action": ["'self'"],
          // Development serves plain http on 127.0.0.1; TLS ends at the proxy in production.
          "upgrade-insecure-requests": null,
        },
      },
      frameguard: { action: "deny" },
      referrerPolicy: { policy: "no-referrer" },
    }),
  ];
}

/** What GET / lists: every entry point of this server. */
function serverIndex(base: string, graphiql: boolean): Record<string, string> {
  return {
    name: "Snapbase",
    graphql: `${base}/graphql`,
    ...(graphiql ? { graphiql: `${base}/graphiql` } : {}),
    rest: `${base}/api/v1`,
    health: `${base}/healthz`,
    readiness: `${base}/readyz`,
    sign_in: `POST ${base}/api/v1/auth/login {"email", "password"}`,
  };
}

const escapeHtml = (text: string) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function serverIndexPage(index: Record<string, string>, graphiql: boolean): string {
  const links = [
    ["/graphql", "GraphQL", "POST queries here (WebSocket subscriptions on the same path)"],
    ...(graphiql ? [["/graphiql", "GraphiQL", "explore the API in the browser"]] : []),
    ["/api/v1", "REST", "the REST endpoints (sign in with POST /api/v1/auth/login)"],
    ["/healthz", "health", "the process is up"],
    ["/readyz", "readiness", "the database answers and migrations are current"],
  ];
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>${escapeHtml(index.name!)}</title></head><body>
<h1>Snapbase</h1><ul>
${links.map(([href, name, what]) => `<li><a href="${href}">${escapeHtml(name!)}</a>: ${escapeHtml(what!)}</li>`).join("\n")}
</ul></body></html>`;
}

const REST_ENDPOINTS = [
  "POST /api/v1/auth/login",
  "GET /api/v1/changes?status=pending",
  "POST /api/v1/changes",
  "POST /api/v1/changes/{id}/approve",
  "POST /api/v1/changes/{id}/reject",
  "GET /api/v1/changes/events",
  "GET /api/v1/tables/{table_name}/snapshots",
  "GET /api/v1/snapshots/{id}",
  "GET /api/v1/snapshots/{a}/diff/{b}",
  "POST /api/v1/snapshots/{id}/restore",
  "GET /api/v1/snapshots/{id}/export.csv",
  "GET /api/v1/workbooks/{id}/events",
  "GET /api/v1/workbook-tables/{id}/export.csv",
  "POST /api/v1/workbook-tables/{id}/imports",
  "GET /api/v1/share/{token}",
  "POST /api/v1/csv-files?name={file name}",
  "GET /api/v1/csv-files/{id}/versions",
  "GET /api/v1/csv-files/{id}/content?version={n}",
];

function errorHandler(error: unknown, req: Request, res: Response, _next: NextFunction): void {
  if (error instanceof RequestAbortedError || (req.abortSignal?.aborted && res.destroyed)) {
    // The client is gone (or shutdown stopped the request): nobody to answer.
    log.info("request aborted", { method: req.method, path: req.originalUrl.split("?")[0] });
    res.destroy();
    return;
  }
  const client = toClientError(error);
  if (!client) log.error("unhandled error", { error: error instanceof Error ? error.stack : String(error) });
  else if (client.status === 503) log.warn("database unavailable", { path: req.originalUrl.split("?")[0], error: (error as Error).message });
  const { status, code, message } = client ?? { status: 500, code: "internal_error", message: "internal error" };
  if (res.headersSent) {
    res.destroy();
    return;
  }
  if (error instanceof ThrottledError) res.set("Retry-After", String(error.retryAfter));
  if (status === 401) res.set("WWW-Authenticate", `Bearer realm="snapbase"`);
  // GraphQL clients expect the GraphQL error shape, even for auth failures.
  if (req.originalUrl.startsWith("/graphql")) res.status(status).json({ errors: [{ message, extensions: { code } }] });
  else res.status(status).json({ error: { code, message } });
}

export async function startServer(opts: ServerOptions): Promise<RunningServer> {
  // Requests run on the authenticator pool, which resets each connection before
  // reuse. jit_optimize_above_cost is what @dataplan/pg sets on its connections;
  // as a start-up setting it survives the reset's RESET ALL.
  const requestPool = (name: string, max: number, options: Partial<Parameters<typeof createPool>[0]>) =>
    createPool({ name, connectionString: opts.authenticatorUrl, max, resetOnRelease: true, connectionTimeoutMillis: 15_000, ...options });
  const authPool = requestPool("authenticator", opts.authenticatorPoolSize ?? 20, { sessionSettings: { jit_optimize_above_cost: "-1" } });
  // REST's JSON: numbers as numbers where a double holds them, times in UTC (rest/json.ts).
  const restPool = requestPool("rest", opts.restPoolSize ?? 10, { types: restJsonTypes, sessionSettings: { TimeZone: "UTC" } });
  const ownerPool = createPool({ name: "owner", connectionString: opts.ownerUrl, max: 2, connectionTimeoutMillis: 15_000 });
  const shutdown = new AbortController();
  // Aborted at the end of shutdown's drain: what still runs is stopped like a client that hung up.
  const stopped = new AbortController();
  const drainMs = opts.shutdownDrainMs ?? DEFAULT_SHUTDOWN_DRAIN_MS;
  const auth: AuthDeps = { jwtSecret: opts.jwtSecret, roles: opts.roles, pool: authPool, statementTimeoutMs: opts.statementTimeoutMs };
  const http: HttpOptions = { ...developmentHttpOptions, ...opts.http };

  const hub = new EventHub(opts.authenticatorUrl);

  const app = express();
  app.disable("x-powered-by");
  // Requests in flight, so shutdown can wait for them (and only them).
  let inFlight = 0;
  let idle: (() => void) | undefined;
  app.use((_req, res, next) => {
    inFlight++;
    res.once("close", () => {
      if (--inFlight === 0) idle?.();
    });
    next();
  });
  app.set("trust proxy", http.trustProxy);
  // Query strings decoded strictly (bad escapes and bytes that are not UTF-8 are 400), and
  // read at once, so every route (GraphQL's too) refuses them before doing anything.
  app.set("query parser", parseQueryStrict);
  const clientAddress = clientAddressFn(app);
  app.use(requestLog);
  app.use(abortOnHangUp(stopped.signal));
  app.use((req, _res, next) => {
    try {
      void req.query;
    } catch (error) {
      return next(error);
    }
    next();
  });
  app.use(securityHeaders());
  if (http.corsOrigins.length > 0) {
    app.use(cors({
      origin: http.corsOrigins.includes("*") ? "*" : http.corsOrigins,
      methods: ["GET", "POST", "OPTIONS"],
      allowedHeaders: ["authorization", "content-type", "last-event-id"],
      exposedHeaders: ["retry-after"],
      maxAge: 600,
    }));
  }

  // A newcomer opening the server (or the REST base printed at start) finds where everything is.
  app.get("/", (req, res) => {
    const base = `${req.protocol}://${req.get("host")}`;
    const index = serverIndex(base, http.graphiql);
    if (req.accepts(["json", "html"]) === "html") res.type("html").send(serverIndexPage(index, http.graphiql));
    else res.json(index);
  });

  app.get("/healthz", (_req, res) => {
    res.json({ status: "ok" });
  });
  app.get("/readyz", async (_req, res) => {
    if (shutdown.signal.aborted) {
      res.status(503).json({ status: "not_ready", reason: "shutting down" });
      return;
    }
    try {
      await authPool.query("select 1");
      const client = await ownerPool.connect();
      try {
        if (!(await migrationsAreCurrent(client))) {
          res.status(503).json({ status: "not_ready", reason: "migrations are not current" });
          return;
        }
      } finally {
        client.release();
      }
      res.json({ status: "ready" });
    } catch (error) {
      res.status(503).json({ status: "not_ready", reason: "database unreachable" });
      log.warn("readiness check failed", { error: (error as Error).message });
    }
  });

  const api = express.Router();
  // JSON everywhere, except the routes that take a CSV file as their body; numbers
  // wider than a double are kept exact.
  api.use(jsonBody({ limit: "10mb", only: true, otherTypes: /^\/(csv-files|workbook-tables\/[^/]+\/imports)\/?$/, ...exactJsonBody }));
  api.use(authenticate(auth));
  api.use(requireSignIn(opts.roles));
  api.use(authRoutes({ pool: authPool, jwtSecret: opts.jwtSecret, clientAddress }));
  api.use(eventRoutes({
    pool: restPool,
    hub,
    shutdown: shutdown.signal,
    reauthorize: (req) => settingsForAuthorization(authorizationOf(req), auth, { allowStreamToken: true }),
  }));
  api.use(exportRoutes({ pool: authPool }));
  api.use(importRoutes({ pool: restPool }));
  api.use(changeRoutes({ pool: restPool }));
  api.use(csvFileRoutes({ pool: restPool }));
  api.get("/", (_req, res) => {
    res.json({ endpoints: REST_ENDPOINTS, errors: 'every error is {"error": {"code", "message"}}', authorization: "Bearer <token from POST /api/v1/auth/login, or an API token>" });
  });
  api.use((_req, _res, next) => next(new HttpError(404, "not_found", "no such endpoint")));
  app.use("/api/v1", api);

  // Parsed here (strict UTF-8, numbers wider than a double kept exact), so grafserv gets the JSON as it is.
  app.post("/graphql", jsonBody({ limit: "2mb", ...exactJsonBody }));
  app.use("/graphql", authenticate(auth), throttledGraphqlStatus);

  const httpServer = createServer(app);
  const preset = makePreset({ pool: authPool, auth, http, clientAddress, stopped: stopped.signal });
  const pgl = postgraphile(preset);
  // Built (the catalog read) before the server listens: PostGraphile keeps the first
  // build's result, so a build cut off by a lost connection would fail GraphQL until
  // a restart. If it fails here, start-up fails instead.
  await pgl.getSchema();
  const serv = pgl.createServ(grafserv);
  await serv.addTo(app, httpServer);
  app.use((_req, _res, next) => next(new HttpError(404, "not_found", "no such endpoint")));
  app.use(errorHandler);
  // WebSockets leave the HTTP server's bookkeeping once upgraded: shutdown closes them itself.
  const upgraded = new Set<Socket>();
  httpServer.on("upgrade", (_req, socket: Socket) => {
    upgraded.add(socket);
    socket.once("close", () => upgraded.delete(socket));
  });

  await new Promise<void>((resolve, reject) => {
    httpServer.once("error", reject);
    httpServer.listen(opts.port, opts.host, () => resolve());
  });
  const { port } = httpServer.address() as AddressInfo;
  const url = `http://${opts.host.includes(":") ? `[${opts.host}]` : opts.host}:${port}`;

  let closing: Promise<void> | undefined;
  const close = async (closeOpts: { drainMs?: number } = {}): Promise<void> => {
    const wait = closeOpts.drainMs ?? drainMs;
    // New connections are refused; event streams end (their clients reconnect elsewhere).
    shutdown.abort();
    const closed = new Promise<void>((resolve) => httpServer.close(() => resolve()));
    httpServer.closeIdleConnections();
    // Requests in flight may finish within the drain time; then they are cut off, which
    // aborts their database work (queries cancelled, connections destroyed).
    if (inFlight > 0) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        new Promise<void>((resolve) => (idle = resolve)),
        new Promise<void>((resolve) => (timer = setTimeout(resolve, wait))),
      ]);
      clearTimeout(timer);
      if (inFlight > 0) log.warn("shutdown: stopping requests still in flight", { count: inFlight });
    }
    stopped.abort();
    httpServer.closeAllConnections();
    for (const socket of upgraded) socket.destroy();
    await serv.release(); // also releases the PostGraphile instance
    // The LISTEN client of GraphQL subscriptions goes back to the pool, which can then end.
    for (const service of preset.pgServices ?? []) service.pgSubscriber?.release?.();
    await hub.close();
    await closed;
    await Promise.all([authPool.endWithin(5_000), restPool.endWithin(5_000), ownerPool.endWithin(5_000)]);
  };
  return {
    url,
    httpServer,
    pools: { authenticator: authPool, rest: restPool, owner: ownerPool },
    close: (closeOpts) => (closing ??= close(closeOpts)),
  };
}
