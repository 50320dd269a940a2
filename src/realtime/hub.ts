// One LISTEN connection per server process, shared by every event stream. Each
// topic's channel ("snapbase_events:<topic>") is listened to while someone follows it.
// NOTIFY reaches every process on the database, so an event caused through any
// instance reaches the clients of all of them.
import pg from "pg";
import { connectClient } from "../db/pools.ts";
import { log } from "../log.ts";

type Listener = (event: { id: number; topic: string; kind: string }) => void;

export class EventHub {
  private client: pg.Client | undefined;
  private connecting: Promise<pg.Client> | undefined;
  private readonly listeners = new Map<string, Set<Listener>>();
  private closed = false;
  private readonly connectionString: string;
  /** LISTEN and UNLISTEN one at a time: pg refuses overlapping queries on one client from pg@9 on. */
  private queries: Promise<unknown> = Promise.resolve();

  constructor(connectionString: string) {
    this.connectionString = connectionString;
  }

  /** Calls `listener` for each event of the topic until the returned function is called. */
  async follow(topic: string, listener: Listener): Promise<() => Promise<void>> {
    let set = this.listeners.get(topic);
    if (!set) {
      set = new Set();
      this.listeners.set(topic, set);
      try {
        await this.run(await this.connection(), `listen ${pg.escapeIdentifier(channel(topic))}`);
      } catch (error) {
        if (this.listeners.get(topic) === set && set.size === 0) this.listeners.delete(topic);
        throw error;
      }
    }
    set.add(listener);
    return async () => {
      set.delete(listener);
      if (set.size === 0 && this.listeners.get(topic) === set) {
        this.listeners.delete(topic);
        if (this.client) await this.run(this.client, `unlisten ${pg.escapeIdentifier(channel(topic))}`).catch(() => {});
      }
    };
  }

  async close(): Promise<void> {
    this.closed = true;
    this.listeners.clear();
    await this.client?.end().catch(() => {});
  }

  private connection(): Promise<pg.Client> {
    if (this.client) return Promise.resolve(this.client);
    this.connecting ??= this.connect().finally(() => (this.connecting = undefined));
    return this.connecting;
  }

  private async connect(): Promise<pg.Client> {
    let lost = false;
    const client = await connectClient({
      name: "realtime listener",
      connectionString: this.connectionString,
      onLost: () => {
        if (lost) return;
        lost = true;
        log.warn("event listener connection lost; reconnecting");
        if (this.client === client) this.client = undefined;
        client.end().catch(() => {});
        if (!this.closed) setTimeout(() => void this.relisten(), 1000).unref();
      },
    });
    client.on("notification", (msg) => this.dispatch(msg));
    if (this.closed) {
      await client.end().catch(() => {});
      throw new Error("the event hub is closed");
    }
    this.client = client;
    return client;
  }

  // After a reconnect, listen again to every followed topic. Followers catch up on
  // what they missed by asking for events after the last id they saw.
  private async relisten(): Promise<void> {
    if (this.closed) return;
    try {
      const client = await this.connection();
      for (const topic of this.listeners.keys()) await this.run(client, `listen ${pg.escapeIdentifier(channel(topic))}`);
      for (const [topic, set] of this.listeners) for (const listener of set) listener({ id: 0, topic, kind: "reconnected" });
    } catch (error) {
      if (this.closed) return;
      log.warn("event listener could not reconnect", { error: (error as Error).message });
      setTimeout(() => void this.relisten(), 2000).unref();
    }
  }

  private run(client: pg.Client, sql: string): Promise<unknown> {
    const next = this.queries.then(() => client.query(sql));
    this.queries = next.catch(() => {});
    return next;
  }

  private dispatch(msg: pg.Notification): void {
    const topic = msg.channel.replace(/^snapbase_events:/, "");
    const set = this.listeners.get(topic);
    if (!set || !msg.payload) return;
    let event;
    try {
      event = JSON.parse(msg.payload);
    } catch {
      return;
    }
    for (const listener of set) listener(event);
  }
}

const channel = (topic: string): string => `snapbase_events:${topic}`;
