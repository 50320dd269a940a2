// Tests keep log lines in memory instead of printing them (test/setup-file.ts
// installs this sink): a passing run prints nothing but vitest's summary. Tests
// that check what was logged read `logged`; a failing test prints its own lines.
import { setLogSink } from "../src/log.ts";

/** Every line this test file's code logged (server, REST, worker, graphile-*), as JSON text. */
export const logged: string[] = [];

export function keepLogsInMemory(): void {
  setLogSink((line) => {
    logged.push(line);
  });
}
