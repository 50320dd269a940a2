// The readable schema (schema/*.sql, one file per capability) matches the
// migrations: dumped from this file's database, a fresh copy of the migrated
// template, it equals the committed files. SQL only (no pg_dump), so it runs on
// the embedded server too.
import { describe, expect, it } from "vitest";
import { dumpSchema, readDump, SchemaMappingError } from "../src/db/schema-dump.ts";
import { db, owner } from "./helpers.ts";

describe("schema/, the readable schema", () => {
  it("matches the migrations (after changing them, run `npm run schema:dump`)", async () => {
    const client = await owner().connect();
    let dumped: Map<string, string>;
    try {
      dumped = await dumpSchema(client, db.roles);
    } catch (error) {
      // An object no capability lists, or a listed one that is gone: the message says what to add or remove.
      if (error instanceof SchemaMappingError) expect.fail(error.message);
      throw error;
    } finally {
      client.release();
    }
    const committed = readDump();
    expect([...committed.keys()], "the files of schema/ (run `npm run schema:dump`)").toEqual([...dumped.keys()].sort());
    for (const [name, text] of dumped) {
      // The diff reads as what regenerating would change: - the committed file, + what the migrations build.
      expect(text, `schema/${name} differs from the migrations: run \`npm run schema:dump\` and commit schema/`).toBe(committed.get(name));
    }
  });
});
