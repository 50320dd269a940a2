// Tests a connector account's connection, or lists its tables (job kinds
// test_connection and list_tables). The outcome is the job's state, error and result.
import type { Task } from "graphile-worker";
import { runJob } from "../src/jobs/run.ts";

const inspectAccount: Task = async (payload, helpers) => {
  await runJob(payload, helpers, async ({ job, connector, finish }) => {
    if (job.kind === "test_connection") {
      await connector.test();
      await finish("succeeded", { ok: true });
    } else {
      await finish("succeeded", { tables: await connector.listTables() });
    }
  });
};

export default inspectAccount;
