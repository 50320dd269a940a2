// The HTTP server: health checks, the REST layer, and PostGraphile (GraphQL over HTTP
// and WebSocket) on one Express 5 app.
import cors from "cors";
import express, { type NextFunction, type Request, type Response } from "express";
import helmet from "helmet";
import { randomBytes } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { isIP, type AddressInfo } from "node:net";
import pg from "pg";
import { postgraphile } from "postgraphile";
import { grafserv } from "postgraphile/grafserv/express/v4";
import { ThrottledError } from "../auth/sign-in.ts";
import { settingsForAuthorization, type AuthDeps, type PgSettings } from "../auth/verify.ts";
import { developmentHttpOptions, type HttpOptions, type RoleNames } from "../config.ts";
import { migrationsAreCurrent } from "../db/migrate.ts";
import { log } from "../log.ts";
import { authRoutes } from "../rest/auth.ts";
import { changeRoutes } from "../rest/changes.ts";
import { csvFileRoutes } from "../rest/csv-files.ts";
import { eventRoutes } from "../rest/events.ts";
import { exportRoutes } from "../rest/exports.ts";
import { importRoutes } from "../rest/imports.ts";
import { EventHub } from "../realtime/hub.ts";
import { HttpError, toClientError } from "./errors.ts";
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
  /** Connections the request pool (as the authenticator) may open; default 20. */
  poolSize?: number;
  /** GraphiQL, introspection, suggestions, GraphQL limits, CORS, proxies; unset: development defaults. */
  http?: Partial<HttpOptions>;
}

export interface RunningServer {
  url: string;
  httpServer: Server;
  close(): Promise<void>;
}

declare module "express-serve-static-core" {
  interface Request {
    pgSettings?: PgSettings;
  }
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
    const settings = await settingsForAuthorization(authorizationOf(req), auth, { allowStreamToken: req.baseUrl === "/api/v1" && isEventStream(req) });
    req.pgSettings = settings;
    httpPgSettings.set(req, settings);
    next();
  };
}

/** REST needs a signed-in caller, except to sign in and to follow a share link. */
function requireSignIn(roles: RoleNames) {
  return (req: Request, _res: Response, next: NextFunction) => {
    const open = (req.method === "POST" && req.path === "/auth/login") || (req.method === "GET" && req.path.startsWith("/share/"));
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

function errorHandler(error: unknown, req: Request, res: Response, _next: NextFunction): void {
  const parseError = error as { type?: string; status?: number };
  const client =
    toClientError(error) ??
    (parseError.type === "entity.parse.failed" ? { status: 400, code: "invalid_json", message: "the request body is not valid JSON" } : null) ??
    (parseError.type === "entity.too.large" ? { status: 413, code: "body_too_large", message: "the request body is too large" } : null);
  if (!client) log.error("unhandled error", { error: error instanceof Error ? error.stack : String(error) });
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
  const authPool = new pg.Pool({ connectionString: opts.authenticatorUrl, max: opts.poolSize ?? 20 });
  const ownerPool = new pg.Pool({ connectionString: opts.ownerUrl, max: 2 });
  authPool.on("error", (e) => log.warn("idle authenticator connection failed", { error: e.message }));
  ownerPool.on("error", (e) => log.warn("idle owner connection failed", { error: e.message }));
  const auth: AuthDeps = { jwtSecret: opts.jwtSecret, roles: opts.roles, pool: authPool, statementTimeoutMs: opts.statementTimeoutMs };
  const http: HttpOptions = { ...developmentHttpOptions, ...opts.http };

  const hub = new EventHub(opts.authenticatorUrl);

  const app = express();
  app.disable("x-powered-by");
  app.set("trust proxy", http.trustProxy);
  const clientAddress = clientAddressFn(app);
  app.use(requestLog);
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

  app.get("/healthz", (_req, res) => {
    res.json({ status: "ok" });
  });
  app.get("/readyz", async (_req, res) => {
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
  api.use(express.json({ limit: "10mb" }));
  api.use(authenticate(auth));
  api.use(requireSignIn(opts.roles));
  api.use(authRoutes({ pool: authPool, jwtSecret: opts.jwtSecret, clientAddress }));
  api.use(eventRoutes({ pool: authPool, hub, reauthorize: (req) => settingsForAuthorization(authorizationOf(req), auth, { allowStreamToken: true }) }));
  api.use(exportRoutes({ pool: authPool }));
  api.use(importRoutes({ pool: authPool }));
  api.use(changeRoutes({ pool: authPool }));
  api.use(csvFileRoutes({ pool: authPool }));
  api.use((_req, _res, next) => next(new HttpError(404, "not_found", "no such endpoint")));
  app.use("/api/v1", api);

  app.use("/graphql", authenticate(auth), throttledGraphqlStatus);

  const httpServer = createServer(app);
  const preset = makePreset({ pool: authPool, auth, http, clientAddress });
  const pgl = postgraphile(preset);
  const serv = pgl.createServ(grafserv);
  await serv.addTo(app, httpServer);
  app.use((_req, _res, next) => next(new HttpError(404, "not_found", "no such endpoint")));
  app.use(errorHandler);

  await new Promise<void>((resolve, reject) => {
    httpServer.once("error", reject);
    httpServer.listen(opts.port, opts.host, () => resolve());
  });
  const { port } = httpServer.address() as AddressInfo;
  const url = `http://${opts.host.includes(":") ? `[${opts.host}]` : opts.host}:${port}`;

  return {
    url,
    httpServer,
    close: async () => {
      httpServer.closeAllConnections();
      await new Promise<void>((resolve) => httpServer.close(() => resolve()));
      await serv.release(); // also releases the PostGraphile instance
      // The LISTEN client of GraphQL subscriptions goes back to the pool, which can then end.
      for (const service of preset.pgServices ?? []) service.pgSubscriber?.release?.();
      await hub.close();
      await Promise.all([authPool.end(), ownerPool.end()]);
    },
  };
}
