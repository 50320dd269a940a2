// Source databases for connector tests, on the test server beside the file's own
// database. Test files run in parallel on one server: callers pass names made
// unique per run (a random suffix), as they are cluster-wide.
import pg from "pg";
import { withUrlParts } from "../src/db/urls.ts";
import { db } from "./helpers.ts";

export interface SourceDatabase {
  url: string;
  /** Connected as the database's owner; errors of a backend a fault test terminates are ignored. */
  client: pg.Client;
  /** Closes the client and drops the database (and its role). */
  drop(): Promise<void>;
}

async function asRoot(statements: string[]): Promise<void> {
  const root = new pg.Client({ connectionString: db.rootUrl });
  await root.connect();
  try {
    for (const sql of statements) await root.query(sql);
  } finally {
    await root.end();
  }
}

/**
 * A fresh database named `database`; with `user`, owned by a new login role of that
 * name and `password` (a source reached with its own credentials), else by root.
 */
export async function createSourceDatabase(opts: { database: string; user?: string; password?: string }): Promise<SourceDatabase> {
  const { database, user, password = "source-password" } = opts;
  const dropAll = [`drop database if exists ${database} with (force)`, ...(user ? [`drop role if exists ${user}`] : [])];
  await asRoot([
    ...dropAll,
    ...(user ? [`create role ${user} login password '${password}'`, `create database ${database} owner ${user}`] : [`create database ${database}`]),
  ]);
  const url = withUrlParts(db.rootUrl, user ? { user, password, database } : { database });
  const client = new pg.Client({ connectionString: url });
  client.on("error", () => {});
  await client.connect();
  return {
    url,
    client,
    async drop() {
      await client.end().catch(() => {});
      await asRoot(dropAll);
    },
  };
}
