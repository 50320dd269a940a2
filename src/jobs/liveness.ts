// How a worker process stays known as alive: a row in snapbase_private.workers, an
// advisory lock held on its own connection for as long as the process lives (so a
// killed process is seen as dead at once), and a heartbeat every few seconds (so a
// hung one is seen as dead after a while). A lost connection is re-opened and the
// lock taken again; if the process was declared dead meanwhile, it registers anew.
import { hostname } from "node:os";
import type pg from "pg";
import { connectClient } from "../db/pools.ts";
import { log } from "../log.ts";

export class Liveness {
  private readonly connectionString: string;
  private readonly heartbeatMs: number;
  private client: pg.Client | undefined;
  private workerId: number | undefined;
  private readonly poolIds = new Set<string>();
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private beating: Promise<void> | undefined;
  private again = false;

  constructor(opts: { connectionString: string; heartbeatMs: number }) {
    this.connectionString = opts.connectionString;
    this.heartbeatMs = opts.heartbeatMs;
  }

  /** Registers the process; resolves once it holds its lock. */
  async start(): Promise<void> {
    await this.beat();
    if (this.workerId === undefined) throw new Error("could not register the worker process");
    this.schedule();
  }

  /** A graphile-worker pool of this process (its id is what locks jobs). */
  addPool(id: string): void {
    this.poolIds.add(id);
    void this.beat();
  }

  /** Stops beating; with `release`, hands the jobs still running back to the queue first. */
  async stop(opts: { release?: boolean } = {}): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    await this.beating?.catch(() => {});
    const client = this.client;
    this.client = undefined;
    if (!client) return;
    try {
      if (opts.release && this.workerId !== undefined) {
        const { rows } = await client.query<{ n: number }>("select snapbase_private.release_worker($1) as n", [this.workerId]);
        if (rows[0]!.n > 0) log.info("handed running jobs back to the queue", { jobs: rows[0]!.n });
      }
    } catch (error) {
      log.warn("could not hand running jobs back; other workers will recover them", { error: (error as Error).message });
    } finally {
      await client.end().catch(() => {});
    }
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      void this.beat().finally(() => this.schedule());
    }, this.heartbeatMs);
  }

  /** One heartbeat at a time; asked for during one, another follows (it carries new pool ids). */
  private beat(): Promise<void> {
    if (this.beating) {
      this.again = true;
      return this.beating;
    }
    this.beating = (async () => {
      do {
        this.again = false;
        await this.heartbeat();
      } while (this.again && !this.stopped);
    })().finally(() => (this.beating = undefined));
    return this.beating;
  }

  private async heartbeat(): Promise<void> {
    if (this.stopped) return;
    try {
      if (!this.client) {
        this.client = await connectClient({
          name: "worker liveness",
          connectionString: this.connectionString,
          onLost: () => {
            // Reconnect at the next beat; the lock went with the connection.
            this.client?.end().catch(() => {});
            this.client = undefined;
          },
        });
      }
      const pools = [...this.poolIds];
      if (this.workerId !== undefined) {
        const { rows } = await this.client.query<{ ok: boolean }>("select snapbase_private.worker_heartbeat($1, $2) as ok", [this.workerId, pools]);
        if (rows[0]!.ok) return;
        log.warn("this worker was declared dead (no heartbeat for too long); registering again", { worker: this.workerId });
      }
      const process = `${hostname()} pid ${globalThis.process.pid}`;
      const { rows } = await this.client.query<{ id: number }>("select snapbase_private.register_worker($1) as id", [process]);
      this.workerId = rows[0]!.id;
      if (pools.length > 0) await this.client.query("select snapbase_private.worker_heartbeat($1, $2)", [this.workerId, pools]);
    } catch (error) {
      log.warn("worker heartbeat failed", { error: (error as Error).message });
      if (this.client) {
        await this.client.end().catch(() => {});
        this.client = undefined;
      }
    }
  }
}
