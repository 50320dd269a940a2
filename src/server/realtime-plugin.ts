// GraphQL subscriptions over the same events as SSE: `events(topic)` listens to
// the topic's NOTIFY channel through PostGraphile's pgSubscriber, and each event is
// refetched as the subscriber (snapbase.visible_event), so access rules apply: an
// event the subscriber may not see arrives as null.
import { jsonParse } from "postgraphile/@dataplan/json";
import { withPgClient } from "postgraphile/@dataplan/pg";
import { context, lambda, listen } from "postgraphile/grafast";
import { extendSchema, gql } from "postgraphile/utils";

export const RealtimePlugin = extendSchema((build) => {
  const executor = build.input.pgRegistry.pgExecutors.main;
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
              return withPgClient(executor, $event, async (client, event) => {
                const id = (event as { id: number }).id;
                const { rows } = await client.query<{ e: unknown }>({ text: "select snapbase.visible_event($1) as e", values: [id] });
                return rows[0]?.e ?? null;
              });
            },
          },
        },
      },
    },
  };
});
