// The PostGraphile V5 preset: the `snapbase` schema, exposed as GraphQL, with each
// operation running as the caller's role (HTTP header or WebSocket connectionParams).
import type { IncomingMessage } from "node:http";
import type pg from "pg";
import { makePgService } from "postgraphile/adaptors/pg";
import { GraphQLError } from "postgraphile/graphql";
import { PostGraphileAmberPreset } from "postgraphile/presets/amber";
import { settingsForAuthorization, type AuthDeps, type PgSettings } from "../auth/verify.ts";
import { log } from "../log.ts";
import { toClientError } from "./errors.ts";
import { PreviewCapPlugin } from "./cap.ts";
import { RealtimePlugin } from "./realtime-plugin.ts";

/** Settings resolved by the HTTP auth middleware before grafserv sees the request. */
export const httpPgSettings = new WeakMap<IncomingMessage, PgSettings>();

function maskError(error: GraphQLError): GraphQLError {
  const original = error.originalError;
  if (!original || original instanceof GraphQLError) return error;
  const client = toClientError(original);
  if (client) {
    return new GraphQLError(client.message, {
      nodes: error.nodes,
      source: error.source,
      positions: error.positions,
      path: error.path,
      extensions: { code: client.code },
    });
  }
  log.error("unexpected GraphQL error", { message: String(original.message ?? original), path: error.path });
  return new GraphQLError("internal error", {
    nodes: error.nodes,
    path: error.path,
    extensions: { code: "internal_error" },
  });
}

export function makePreset(opts: { pool: pg.Pool; auth: AuthDeps }): GraphileConfig.Preset {
  return {
    extends: [PostGraphileAmberPreset],
    plugins: [RealtimePlugin, PreviewCapPlugin],
    pgServices: [makePgService({ pool: opts.pool, schemas: ["snapbase"], pubsub: true })],
    grafserv: {
      graphqlPath: "/graphql",
      graphiqlPath: "/graphiql",
      graphiql: true,
      websockets: true,
      maskError,
    },
    grafast: {
      explain: false,
      async context(requestContext) {
        const req = requestContext.node?.req;
        const fromHttp = req ? httpPgSettings.get(req) : undefined;
        if (fromHttp) return { pgSettings: fromHttp };
        const ws = requestContext.ws;
        if (ws) {
          const header = ws.normalizedConnectionParams?.authorization;
          return { pgSettings: await settingsForAuthorization(typeof header === "string" ? header : undefined, opts.auth) };
        }
        return { pgSettings: { role: opts.auth.roles.anonymous } };
      },
    },
  };
}
