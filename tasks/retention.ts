// Prunes snapshots beyond each managed table's retention policy (the newest is never
// pruned) and the chunks no snapshot uses any more, and events older than a day
// (the replay window of event streams). Idempotent; runs hourly by cron.
import type { Task } from "graphile-worker";

const retention: Task = async (_payload, helpers) => {
  const { rows } = await helpers.withPgClient((client) =>
    client.query<{ pruned: number; events: string }>(
      "select snapbase_private.prune_snapshots() as pruned, snapbase_private.prune_events() as events",
    ),
  );
  helpers.logger.info(`retention pruned ${rows[0]!.pruned} snapshot(s) and ${rows[0]!.events} event(s)`);
};

export default retention;
