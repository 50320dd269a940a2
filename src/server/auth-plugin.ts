// GraphQL sign-in and stream tokens, implemented by the server because it alone
// holds the JWT secret. `authenticate` goes through snapbase_private.attempt_login
// (throttled, failures committed even though the field then errors: each aliased
// `authenticate` of a request counts); `createStreamToken` signs the claims that
// snapbase.create_stream_token returns for the caller's session. The SQL functions
// themselves are hidden from PostGraphile (@behavior -*).
import type { WithPgClient } from "postgraphile/@dataplan/pg";
import { access, context, lambda, list, object, rootValue, sideEffect } from "postgraphile/grafast";
import { extendSchema, gql } from "postgraphile/utils";
import type { PgSettings } from "../auth/verify.ts";
import { signClaims, type SessionClaims } from "../auth/tokens.ts";

declare global {
  namespace Grafast {
    interface Context {
      /** Signs in (throttled per account and client address) and returns a JWT. */
      signIn?: (email: unknown, password: unknown) => Promise<string>;
    }
  }
}

export function makeAuthPlugin(opts: { jwtSecret: string }): GraphileConfig.Plugin {
  return extendSchema(() => ({
    typeDefs: gql`
      """All input for the \`authenticate\` mutation."""
      input AuthenticateInput {
        """
        An arbitrary string value with no semantic meaning. Will be included in the
        payload verbatim. May be used to track mutations by the client.
        """
        clientMutationId: String
        email: String
        password: String
      }

      """The output of our \`authenticate\` mutation."""
      type AuthenticatePayload {
        """
        The exact same \`clientMutationId\` that was provided in the mutation input,
        unchanged and unused. May be used by a client to track mutations.
        """
        clientMutationId: String

        """
        Our root query field type. Allows us to run any query from our mutation payload.
        """
        query: Query

        """A JWT (HS256) naming a new session; send it as \`Authorization: Bearer …\`."""
        result: String
      }

      extend type Mutation {
        """
        Exchange an email and password for a JWT naming a new session. Failed attempts
        are counted per account and per client address; past the limit the answer is
        an error with code \`too_many_attempts\` until the lockout ends.
        """
        authenticate(
          """
          The exclusive input argument for this mutation. An object type, make sure to see documentation for this object’s fields.
          """
          input: AuthenticateInput!
        ): AuthenticatePayload
      }

      extend type Query {
        """
        A token valid for five minutes, for ?access_token= on event streams (GET …/events);
        refused everywhere else. It ends with the session it was made from.
        """
        createStreamToken: String
      }
    `,
    objects: {
      Mutation: {
        plans: {
          authenticate(_$root, fieldArgs) {
            const $input = fieldArgs.getRaw("input");
            const $token = sideEffect(list([$input, context().get("signIn")]), ([input, signIn]) => {
              const { email, password } = (input ?? {}) as { email?: unknown; password?: unknown };
              if (!signIn) throw new Error("sign-in is not available in this context");
              return signIn(email, password);
            });
            return object({ result: $token, clientMutationId: access($input, "clientMutationId") });
          },
        },
      },
      AuthenticatePayload: {
        plans: {
          query() {
            return rootValue();
          },
        },
      },
      Query: {
        plans: {
          createStreamToken() {
            const $context = context();
            return lambda(list([$context.get("withPgClient"), $context.get("pgSettings")]), async ([withPgClient, settings]) => {
              const claims = await (withPgClient as WithPgClient)((settings ?? {}) as PgSettings, async (client) =>
                (await client.query<{ claims: SessionClaims }>({ text: "select to_jsonb(c) as claims from snapbase.create_stream_token() c" })).rows[0]!.claims);
              return signClaims(claims, opts.jwtSecret);
            });
          },
        },
      },
    },
  }));
}
