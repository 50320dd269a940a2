// GraphQL subscriptions over the same events as SSE: `events(topic)` listens to
// the topic's NOTIFY channel through PostGraphile's pgSubscriber. Access is checked
// once, when the subscription starts: a subscriber who may not see the topic gets
// one error ("no workbook N", as for a missing one) and the subscription ends, so
// nothing about the topic's activity reaches them afterwards. Each event is then
// refetched as the subscriber (snapbase.visible_event) and sent only when they may
// see it (an agent sees nothing of a hidden table): never a null in its place.
// Subscribers with the same role and claims share that refetch. Before each event
// the subscription's token is resolved again (as SSE streams do before each catch-up):
// once its session is signed out or revoked, its API token revoked, its user disabled
// or deleted, or its identity changed (a new role), the subscription ends with an
// error (`session_ended`, `identity_changed`) and nothing more is sent.
import type { WithPgClient } from "postgraphile/@dataplan/pg";
import { context, type GrafastSubscriber, lambda, list, listen } from "postgraphile/grafast";
import { extendSchema, gql } from "postgraphile/utils";
import type { PgSettings } from "../auth/verify.ts";
import { settingsIdentity } from "../db/request-client.ts";
import { HttpError } from "./errors.ts";

// How long an answer is kept for the other subscribers of the same identity: every
// subscriber gets an event within moments of its NOTIFY.
const SHARED_ANSWER_MS = 10_000;

type Query = (settings: PgSettings, text: string, values: unknown[]) => Promise<unknown>;
type Reauthorize = () => Promise<PgSettings>;

declare global {
  namespace Grafast {
    interface Context {
      /** Resolves the WebSocket connection's token again (its session may have ended since). */
      reauthorize?: Reauthorize;
      /** What reauthorize checks (the token itself): subscribers holding the same token share one check per event. */
      reauthorizeKey?: string;
    }
  }
}

/** Raises unless the token the subscription was opened with still resolves to the same identity. */
async function stillAuthorized(reauthorize: Reauthorize | undefined, settings: PgSettings): Promise<void> {
  // A subscription without a way to check (no WebSocket context) is never trusted past its start.
  if (!reauthorize) throw new HttpError(401, "session_ended", "this subscription cannot be re-checked; subscribe again");
  let now: PgSettings;
  try {
    now = await reauthorize();
  } catch {
    throw new HttpError(401, "session_ended",
      "the subscription's session or token has ended (signed out, revoked or expired, or the user was disabled or deleted); sign in and subscribe again");
  }
  if (settingsIdentity(now) !== settingsIdentity(settings)) {
    throw new HttpError(401, "identity_changed", "the subscription's user, role or token changed since it started; subscribe again");
  }
}

/** Yields the events of `source` (NOTIFY payloads) that `visible` returns, skipping the rest. */
function visibleOnly(source: AsyncIterator<unknown>, visible: (id: number) => Promise<unknown>, authorized: (id: number) => Promise<void>): AsyncIterableIterator<unknown> {
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
        try {
          await authorized(id);
        } catch (error) {
          await source.return?.();
          throw error;
        }
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
  const checks = new Map<string, Promise<PgSettings>>();

  /** The token checked again for event `id`: once per token and event, however many subscribers hold it. */
  function sharedReauthorize(reauthorize: Reauthorize | undefined, key: string | undefined, id: number): Reauthorize | undefined {
    if (!reauthorize || key === undefined) return reauthorize;
    return () => {
      const shareKey = `${id}\n${key}`;
      let check = checks.get(shareKey);
      if (!check) {
        check = reauthorize();
        checks.set(shareKey, check);
        setTimeout(() => checks.delete(shareKey), SHARED_ANSWER_MS).unref();
        check.catch(() => {});
      }
      return check;
    };
  }

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
  function subscriberFor(
    pgSubscriber: GrafastSubscriber, withPgClient: WithPgClient, settings: PgSettings, reauthorize: Reauthorize | undefined, reauthorizeKey: string | undefined,
  ): GrafastSubscriber {
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
        return visibleOnly(source, (id) => visibleEvent(query, settings, id),
          (id) => stillAuthorized(sharedReauthorize(reauthorize, reauthorizeKey, id), settings));
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
                list([$context.get("pgSubscriber"), $context.get("withPgClient"), $context.get("pgSettings"), $context.get("reauthorize"), $context.get("reauthorizeKey")]),
                ([pgSubscriber, withPgClient, settings, reauthorize, reauthorizeKey]) =>
                  pgSubscriber
                    ? subscriberFor(pgSubscriber as GrafastSubscriber, withPgClient as WithPgClient, (settings ?? {}) as PgSettings,
                        reauthorize as Reauthorize | undefined, reauthorizeKey as string | undefined)
                    : null,
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
