// GraphQL subscriptions over the same events as SSE: `events(topic)` listens to
// the topic's NOTIFY channel through PostGraphile's pgSubscriber, and each event is
// refetched as the subscriber (snapbase.visible_event), so access rules apply: an
// event the subscriber may not see arrives as null. Subscribers with the same role
// and claims get the same answer, so one refetch per event serves all of them.
import type { WithPgClient } from "postgraphile/@dataplan/pg";
import { jsonParse } from "postgraphile/@dataplan/json";
import { context, lambda, list, listen } from "postgraphile/grafast";
import { extendSchema, gql } from "postgraphile/utils";
import type { PgSettings } from "../auth/verify.ts";
import { settingsIdentity } from "../db/request-client.ts";

// How long an answer is kept for the other subscribers of the same identity: every
// subscriber gets an event within moments of its NOTIFY.
const SHARED_ANSWER_MS = 10_000;

export const RealtimePlugin = extendSchema(() => {
  const answers = new Map<string, Promise<unknown>>();

  function visibleEvent(withPgClient: WithPgClient, settings: PgSettings, id: number): Promise<unknown> {
    const key = `${id}\n${settingsIdentity(settings)}`;
    let answer = answers.get(key);
    if (!answer) {
      answer = withPgClient(settings, async (client) =>
        (await client.query<{ e: unknown }>({ text: "select snapbase.visible_event($1) as e", values: [id] })).rows[0]?.e ?? null);
      answers.set(key, answer);
      setTimeout(() => answers.delete(key), SHARED_ANSWER_MS).unref();
      answer.catch(() => answers.delete(key));
    }
    return answer;
  }

  return {
    typeDefs: gql`
      extend type Subscription {
        """
        Events of a topic: "changes" (change requests and snapshots), "workbook:<id>"
        (records, table settings, jobs) or "account:<id>" (jobs of a connector account).
        Each is {id, topic, kind, ...}; after a reconnect, catch up with visibleEvents.
        """
        events(topic: String!): JSON
      }
    `,
    objects: {
      Subscription: {
        plans: {
          events: {
            subscribePlan(_$root, fieldArgs) {
              const $channel = lambda(fieldArgs.getRaw("topic"), (topic) => `snapbase_events:${String(topic)}`);
              return listen(context().get("pgSubscriber"), $channel, jsonParse);
            },
            plan($event) {
              const $context = context();
              return lambda(list([$event, $context.get("withPgClient"), $context.get("pgSettings")]), ([event, withPgClient, settings]) =>
                visibleEvent(withPgClient as WithPgClient, (settings ?? {}) as PgSettings, (event as { id: number }).id));
            },
          },
        },
      },
    },
  };
});
