// The PostGraphile V5 preset: the `snapbase` schema, exposed as GraphQL, with each
// operation running as the caller's role (HTTP header or WebSocket connectionParams).
import type { IncomingMessage } from "node:http";
import type pg from "pg";
import type { WithPgClient } from "postgraphile/@dataplan/pg";
import type WebSocket from "ws";
import { makePgService, makeWithPgClientViaPgClientAlreadyInTransaction, type NodePostgresPgClient } from "postgraphile/adaptors/pg";
import { GraphQLError } from "postgraphile/graphql";
import { PostGraphileAmberPreset } from "postgraphile/presets/amber";
import { signIn, ThrottledError } from "../auth/sign-in.ts";
import { settingsForAuthorization, type AuthDeps, type PgSettings } from "../auth/verify.ts";
import { developmentHttpOptions, type HttpOptions } from "../config.ts";
import { RequestAbortedError, withAbortableClient } from "../db/request-client.ts";
import { log } from "../log.ts";
import { makeAuthPlugin } from "./auth-plugin.ts";
import { DATABASE_UNAVAILABLE, toClientError } from "./errors.ts";
import { installExactJsonCodecs } from "./exact-json.ts";
import { makeHardeningPlugin, stripSuggestions } from "./graphql-hardening.ts";
import { PreviewCapPlugin } from "./cap.ts";
import { RealtimePlugin } from "./realtime-plugin.ts";

/** Settings resolved by the HTTP auth middleware before grafserv sees the request. */
export const httpPgSettings = new WeakMap<IncomingMessage, PgSettings>();
/** Requests whose sign-in was refused as throttled: answered with 429 and Retry-After. */
export const throttledRequests = new WeakMap<IncomingMessage, number>();
/** The Content-Security-Policy nonce of each HTTP request (set by the security headers). */
export const cspNonces = new WeakMap<IncomingMessage, string>();

/** Ruru's inline scripts carry the page's CSP nonce, so its policy needs no 'unsafe-inline'. */
const RuruNoncePlugin: GraphileConfig.Plugin = {
  name: "SnapbaseRuruNoncePlugin",
  version: "1.0.0",
  grafserv: {
    middleware: {
      async ruruHTML(next, event) {
        const html = await next();
        const req = event.request.requestContext?.node?.req;
        const nonce = req ? cspNonces.get(req) : undefined;
        return nonce ? html.replace(/<script\b/g, `<script nonce="${nonce}"`) : html;
      },
    },
  },
};

/**
 * PostGraphile's withPgClient for one request, stopped by its signal as REST is
 * (withAbortableClient): a client that hangs up, or the end of shutdown's drain,
 * cancels the running query, rolls the transaction back and destroys the
 * connection instead of leaving it waiting, or letting a mutation commit for
 * nobody. Each call takes its own connection, as @dataplan/pg's own adaptor does.
 */
function abortableWithPgClient(pool: pg.Pool, signal: AbortSignal): WithPgClient<NodePostgresPgClient> {
  return (pgSettings, callback) =>
    withAbortableClient(pool, signal, (client) => makeWithPgClientViaPgClientAlreadyInTransaction(client)(pgSettings, callback));
}

/** One signal per WebSocket: aborted when it closes or when shutdown stops what is left. */
const socketSignals = new WeakMap<object, AbortSignal>();
function socketSignal(socket: WebSocket | undefined, stopped: AbortSignal): AbortSignal {
  if (!socket) return stopped;
  let signal = socketSignals.get(socket);
  if (!signal) {
    const controller = new AbortController();
    const stop = () => controller.abort();
    if (socket.readyState === socket.CLOSED || stopped.aborted) stop();
    else {
      stopped.addEventListener("abort", stop, { once: true });
      socket.once("close", () => {
        stopped.removeEventListener("abort", stop);
        stop();
      });
    }
    signal = controller.signal;
    socketSignals.set(socket, signal);
  }
  return signal;
}

/** How @dataplan/pg's PgSubscriber ends subscriptions when its LISTEN connection is lost. */
const isPubsubInterrupted = (error: unknown): boolean =>
  error instanceof Error && error.message.startsWith("Underlying pubsub channel interrupted");

function makeMaskError(http: HttpOptions) {
  const trim = (error: GraphQLError): GraphQLError =>
    http.suggestions || !/Did you mean/.test(error.message)
      ? error
      : new GraphQLError(stripSuggestions(error.message), { nodes: error.nodes, source: error.source, positions: error.positions, path: error.path, extensions: error.extensions });
  return function maskError(error: GraphQLError): GraphQLError {
    const original = error.originalError;
    if (!original || original instanceof GraphQLError) return trim(error);
    if (isPubsubInterrupted(original)) {
      // The LISTEN connection was lost (restart, failover, terminated backend): @dataplan/pg ends
      // every subscription rather than risk a missed event. Clients subscribe again and catch up.
      log.warn("GraphQL subscription ended: its LISTEN connection was lost", { path: error.path });
      return new GraphQLError(DATABASE_UNAVAILABLE.message, { nodes: error.nodes, path: error.path, extensions: { code: DATABASE_UNAVAILABLE.code } });
    }
    if (original instanceof RequestAbortedError) {
      // Nobody is left to read it (the client hung up, or shutdown stopped the request).
      log.info("request aborted", { path: error.path });
      return new GraphQLError(original.message, { nodes: error.nodes, path: error.path, extensions: { code: "request_aborted" } });
    }
    const client = toClientError(original);
    if (client) {
      return new GraphQLError(client.message, {
        nodes: error.nodes,
        source: error.source,
        positions: error.positions,
        path: error.path,
        extensions: { code: client.code, ...(original instanceof ThrottledError ? { retryAfter: original.retryAfter } : {}) },
      });
    }
    log.error("unexpected GraphQL error", { message: String(original.message ?? original), path: error.path });
    return new GraphQLError("internal error", {
      nodes: error.nodes,
      path: error.path,
      extensions: { code: "internal_error" },
    });
  };
}

export function makePreset(opts: {
  pool: pg.Pool;
  auth: AuthDeps;
  http?: HttpOptions;
  /** The client's address (after `trust proxy`) of an HTTP request or WebSocket upgrade, for sign-in throttling. */
  clientAddress?: (req: IncomingMessage) => string | undefined;
  /** Aborted at the end of shutdown's drain: GraphQL work still running is stopped. */
  stopped?: AbortSignal;
}): GraphileConfig.Preset {
  const http = opts.http ?? developmentHttpOptions;
  const stopped = opts.stopped ?? new AbortController().signal;
  const signInDeps = { pool: opts.pool, jwtSecret: opts.auth.jwtSecret };
  const signInFrom = (req: IncomingMessage | undefined, address: string | undefined, signal: AbortSignal) => async (email: unknown, password: unknown) => {
    try {
      return await signIn(signInDeps, email, password, address, signal);
    } catch (error) {
      if (error instanceof ThrottledError && req) throttledRequests.set(req, Math.max(error.retryAfter, throttledRequests.get(req) ?? 0));
      throw error;
    }
  };
  installExactJsonCodecs();
  return {
    extends: [PostGraphileAmberPreset],
    plugins: [RealtimePlugin, PreviewCapPlugin, RuruNoncePlugin, makeAuthPlugin({ jwtSecret: opts.auth.jwtSecret }), makeHardeningPlugin({ http, anonymousRole: opts.auth.roles.anonymous })],
    pgServices: [makePgService({ pool: opts.pool, schemas: ["snapbase"], pubsub: true })],
    grafserv: {
      graphqlPath: "/graphql",
      graphiqlPath: "/graphiql",
      graphiql: http.graphiql,
      graphiqlOnGraphQLGET: http.graphiql,
      websockets: true,
      maskError: makeMaskError(http),
    },
    grafast: {
      explain: false,
      async context(requestContext) {
        const req = requestContext.node?.req;
        const fromHttp = req ? httpPgSettings.get(req) : undefined;
        if (req && fromHttp) {
          // Set by the app (abortOnHangUp): the client hung up, or shutdown stopped the request.
          const signal = (req as IncomingMessage & { abortSignal?: AbortSignal }).abortSignal ?? stopped;
          return { pgSettings: fromHttp, withPgClient: abortableWithPgClient(opts.pool, signal), signIn: signInFrom(req, opts.clientAddress?.(req), signal) };
        }
        const ws = requestContext.ws;
        if (ws) {
          const header = ws.normalizedConnectionParams?.authorization;
          const upgrade = ws.request as IncomingMessage | undefined;
          const authorization = typeof header === "string" ? header : undefined;
          const signal = socketSignal(ws.socket, stopped);
          return {
            pgSettings: await settingsForAuthorization(authorization, opts.auth, { signal }),
            // Subscriptions resolve the token again before each event (realtime-plugin.ts),
            // one check per token and event shared by every socket holding it: so it is
            // stopped by shutdown, not by one of those sockets closing.
            reauthorize: () => settingsForAuthorization(authorization, opts.auth, { signal: stopped }),
            reauthorizeKey: authorization ?? "",
            withPgClient: abortableWithPgClient(opts.pool, signal),
            signIn: signInFrom(undefined, upgrade ? opts.clientAddress?.(upgrade) : undefined, signal),
          };
        }
        return { pgSettings: { role: opts.auth.roles.anonymous } };
      },
    },
  };
}
