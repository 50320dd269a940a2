// Runs before every test file (vitest setupFiles), in the file's own process:
// logs go to memory, and the file gets its own database, a copy of the template
// global-setup.ts migrated. `inject("db")` (and helpers.ts's `db`) then point at
// that copy; the roles are the run's, shared by every file.
import pg from "pg";
import { beforeEach, expect, inject } from "vitest";
import { withUrlParts } from "../src/db/urls.ts";
import { copyName, createCopy } from "./databases.ts";
import { keepLogsInMemory, logged } from "./log-sink.ts";

keepLogsInMemory();

// A failing test shows what was logged while it ran.
beforeEach(({ onTestFailed }) => {
  const from = logged.length;
  onTestFailed(() => {
    const lines = logged.slice(from);
    if (lines.length) console.error(`logged during this test${lines.length > 200 ? " (the last 200 lines)" : ""}:\n${lines.slice(-200).join("\n")}`);
  });
});

const db = inject("db");
const testPath = expect.getState().testPath;
if (!testPath) throw new Error("test/setup-file.ts: vitest did not say which test file runs");
const database = copyName(db.template, testPath);
const root = new pg.Client({ connectionString: db.rootUrl });
await root.connect();
try {
  await createCopy(root, db.template, database, db.roles.owner);
} finally {
  await root.end();
}
Object.assign(db, {
  database,
  ownerUrl: withUrlParts(db.ownerUrl, { database }),
  authenticatorUrl: withUrlParts(db.authenticatorUrl, { database }),
});
