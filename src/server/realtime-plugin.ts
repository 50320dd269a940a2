// GraphQL subscriptions over the same events as SSE: `events(topic)` listens to
// the topic's NOTIFY channel through PostGraphile's pgSubscriber. Access is checked
// once, when the subscription starts: a subscriber who may not see the topic gets
// one error ("no workbook N", as for a missing one) and the subscription ends, so
// nothing about the topic's activity reaches them afterwards. Each event is then
// refetched as the subscriber (snapbase.visible_event) and sent only when they may
// see it (an agent sees nothing of a hidden table): never a null in its place.
// Subscribers with the same role and claims share that refetch.
import type { WithPgClient } from "postgraphile/@dataplan/pg";
import { context, type GrafastSubscriber, lambda, list, listen } from "postgraphile/grafast";
import { extendSchema, gql } from "postgraphile/utils";
import type { PgSettings } from "../auth/verify.ts";
import { settingsIdentity } from "../db/request-client.ts";

// How long an answer is kept for the other subscribers of the same identity: every
// subscriber gets an event within moments of its NOTIFY.
const SHARED_ANSWER_MS = 10_000;

type Query = (settings: PgSettings, text: string, values: unknown[]) => Promise<unknown>;

/** Yields the events of `source` (NOTIFY payloads) that `visible` returns, skipping the rest. */
function visibleOnly(source: AsyncIterator<unknown>, visible: (id: number) => Promise<unknown>): AsyncIterableIterator<unknown> {
  const done = { done: true as const, value: undefined };
  const iterator: AsyncIterableIterator<unknown> = {
    async next() {
      for (;;) {
        const item = await source.next();
        if (item.done) return done;
        let id: unknown;
        try {
          id = (JSON.parse(String(item.value)) as { id?: unknown }).id;
        } catch {
          continue; // not an event of ours
        }
        if (typeof id !== "number" || !Number.isSafeInteger(id) || id <= 0) continue;
        const event = await visible(id);
        if (event !== null && event !== undefined) return { done: false, value: event };
      }
    },
    async return() {
      await source.return?.();
      return done;
    },
    async throw(error) {
      await source.return?.();
      throw error;
    },
    [Symbol.asyncIterator]() {
      return iterator;
    },
  };
  return iterator;
}

export const RealtimePlugin = extendSchema(() => {
  const answers = new Map<string, Promise<unknown>>();

  function visibleEvent(query: Query, settings: PgSettings, id: number): Promise<unknown> {
    const key = `${id}\n${settingsIdentity(settings)}`;
    let answer = answers.get(key);
    if (!answer) {
      answer = query(settings, "select snapbase.visible_event($1) as e", [id]);
      answers.set(key, answer);
      setTimeout(() => answers.delete(key), SHARED_ANSWER_MS).unref();
      answer.catch(() => answers.delete(key));
    }
    return answer;
  }

  /** The subscriber's view of pgSubscriber: the topic checked first, then only the events it may see. */
  function subscriberFor(pgSubscriber: GrafastSubscriber, withPgClient: WithPgClient, settings: PgSettings): GrafastSubscriber {
    const query: Query = (s, text, values) =>
      withPgClient(s, async (client) => (await client.query<{ e: unknown }>({ text, values })).rows[0]?.e ?? null);
    return {
      async subscribe(topic) {
        // Listen first, so nothing that happens during the check is lost.
        const source = await pgSubscriber.subscribe(`snapbase_events:${String(topic)}`);
        try {
          // The same check (and the same "no workbook N") as the first page of a catch-up.
          await query(settings, "select count(*) as e from snapbase.visible_events($1, 9223372036854775807, 0)", [String(topic)]);
        } catch (error) {
          await source.return?.();
          throw error;
        }
        return visibleOnly(source, (id) => visibleEvent(query, settings, id));
      },
    };
  }

  return {
    typeDefs: gql`
      extend type Subscription {
        """
        Events of a topic: "changes" (change requests and snapshots), "workbook:<id>"
        (records, table settings, jobs) or "account:<id>" (jobs of a connector account).
        Each is {id, topic, kind, ...}, and only those you may see are sent. A topic you
        may not see is refused at once (one error, then the subscription ends). After a
        reconnect, catch up with visibleEvents.
        """
        events(topic: String!): JSON
      }
    `,
    objects: {
      Subscription: {
        plans: {
          events: {
            subscribePlan(_$root, fieldArgs) {
              const $context = context();
              const $subscriber = lambda(
                list([$context.get("pgSubscriber"), $context.get("withPgClient"), $context.get("pgSettings")]),
                ([pgSubscriber, withPgClient, settings]) =>
                  pgSubscriber ? subscriberFor(pgSubscriber as GrafastSubscriber, withPgClient as WithPgClient, (settings ?? {}) as PgSettings) : null,
              );
              return listen($subscriber, lambda(fieldArgs.getRaw("topic"), (topic) => String(topic)));
            },
            plan($event) {
              return $event;
            },
          },
        },
      },
    },
  };
});
