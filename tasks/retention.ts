// Prunes snapshots beyond each managed table's retention policy (the newest is never
// pruned) and the chunks no snapshot uses any more. Idempotent; runs hourly by cron.
import type { Task } from "graphile-worker";

const retention: Task = async (_payload, helpers) => {
  const { rows } = await helpers.withPgClient((client) =>
    client.query<{ pruned: number }>("select snapbase_private.prune_snapshots() as pruned"),
  );
  helpers.logger.info(`retention pruned ${rows[0]!.pruned} snapshot(s)`);
};

export default retention;
