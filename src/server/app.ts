// The HTTP server: health checks, the REST layer, and PostGraphile (GraphQL over HTTP
// and WebSocket) on one Express 5 app.
import express, { type NextFunction, type Request, type Response } from "express";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import pg from "pg";
import { postgraphile } from "postgraphile";
import { grafserv } from "postgraphile/grafserv/express/v4";
import { settingsForAuthorization, type AuthDeps, type PgSettings } from "../auth/verify.ts";
import type { RoleNames } from "../config.ts";
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
import { httpPgSettings, makePreset } from "./graphql.ts";

export interface ServerOptions {
  ownerUrl: string;
  authenticatorUrl: string;
  jwtSecret: string;
  roles: RoleNames;
  host: string;
  port: number;
  statementTimeoutMs?: number;
  credentialsKey?: string;
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
// (a five-minute token from create_stream_token, or an API token).
function authorizationOf(req: Request): string | undefined {
  if (req.headers.authorization) return req.headers.authorization;
  const token = req.query.access_token;
  if (req.method === "GET" && req.path.endsWith("/events") && typeof token === "string") return `Bearer ${token}`;
  return undefined;
}

function authenticate(auth: AuthDeps) {
  return async (req: Request, _res: Response, next: NextFunction) => {
    const settings = await settingsForAuthorization(authorizationOf(req), auth);
    req.pgSettings = settings;
    httpPgSettings.set(req, settings);
    next();
  };
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
  // GraphQL clients expect the GraphQL error shape, even for auth failures.
  if (req.originalUrl.startsWith("/graphql")) res.status(status).json({ errors: [{ message, extensions: { code } }] });
  else res.status(status).json({ error: { code, message } });
}

export async function startServer(opts: ServerOptions): Promise<RunningServer> {
  const authPool = new pg.Pool({ connectionString: opts.authenticatorUrl, max: 20 });
  const ownerPool = new pg.Pool({ connectionString: opts.ownerUrl, max: 2 });
  authPool.on("error", (e) => log.warn("idle authenticator connection failed", { error: e.message }));
  ownerPool.on("error", (e) => log.warn("idle owner connection failed", { error: e.message }));
  const auth: AuthDeps = { jwtSecret: opts.jwtSecret, roles: opts.roles, pool: authPool, statementTimeoutMs: opts.statementTimeoutMs };

  const hub = new EventHub(opts.authenticatorUrl);

  const app = express();
  app.disable("x-powered-by");
  app.use(requestLog);

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
  api.use(authRoutes({ pool: authPool, roles: opts.roles }));
  api.use(eventRoutes({ pool: authPool, hub }));
  api.use(exportRoutes({ pool: authPool }));
  api.use(importRoutes({ pool: authPool }));
  api.use(changeRoutes({ pool: authPool }));
  api.use(csvFileRoutes({ pool: authPool }));
  api.use((_req, _res, next) => next(new HttpError(404, "not_found", "no such endpoint")));
  app.use("/api/v1", api);

  app.use("/graphql", authenticate(auth));

  const httpServer = createServer(app);
  const preset = makePreset({ pool: authPool, auth });
  const pgl = postgraphile(preset);
  const serv = pgl.createServ(grafserv);
  await serv.addTo(app, httpServer);
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
