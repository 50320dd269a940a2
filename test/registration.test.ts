// Issue 13: registering a table says what it still needs (the GRANTs to run),
// instead of the first submission failing with "permission denied for schema".
import { randomBytes } from "node:crypto";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { databaseName, withUrlParts } from "../src/db/urls.ts";
import type { RunningServer } from "../src/server/app.ts";
import { createUser, db, graphql, http, owner, startTestServer, TEST_PASSWORD, type TestUser, connectAs } from "./helpers.ts";

let server: RunningServer;
let root: pg.Client;
let admin: TestUser, editor: TestUser;
const RUN = randomBytes(3).toString("hex");
const OTHER = `snapbase_reg_other_${RUN}`; // a role owning tables, as an application's own role would

/** As the cluster's superuser: a DBA who owns the application's tables. */
const asRoot = async (sql: string, params: unknown[] = []) => (await root.query(sql, params)).rows;

async function missingGrants(table: string): Promise<string[]> {
  return (await asRoot("select snapbase.managed_tables_missing_grants(m) as g from snapbase.managed_tables m where m.qualified_name = $1", [table]))[0].g;
}


beforeAll(async () => {
  server = await startTestServer();
  [admin, editor] = await Promise.all([createUser("admin"), createUser("editor")]);
  root = new pg.Client({ connectionString: withUrlParts(db.rootUrl, { database: databaseName(db.ownerUrl) }) });
  await root.connect();
  await asRoot(`
    drop schema if exists regs cascade;
    drop role if exists ${OTHER};
    create role ${OTHER};
    create schema regs authorization ${OTHER};
    set role ${OTHER};
    create table regs.people (id integer generated always as identity primary key, name text not null);
    insert into regs.people (name) values ('Ada'), ('Grace');
    create table regs.secured (id integer primary key, v text);
    alter table regs.secured enable row level security;
    create policy mine on regs.secured to ${db.roles.viewer} using (true);
    reset role;
  `);
});

afterAll(async () => {
  await server?.close();
  await asRoot(`drop schema if exists regs cascade; drop owned by ${OTHER}; drop role if exists ${OTHER}`).catch(() => {});
  await root?.end();
});

describe("register_table", () => {
  it("lists the GRANTs a table still needs, and once they are run, changes to it go through", async () => {
    await asRoot("select snapbase.register_table('regs.people')");
    const r = db.roles;
    expect(await missingGrants("regs.people")).toEqual([
      `GRANT USAGE ON SCHEMA regs TO ${r.owner} WITH GRANT OPTION;`,
      `GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE regs.people TO ${r.owner} WITH GRANT OPTION;`,
      `GRANT USAGE, SELECT, UPDATE ON SEQUENCE regs.people_id_seq TO ${r.owner} WITH GRANT OPTION;`,
      `GRANT USAGE ON SCHEMA regs TO ${r.viewer};`,
      `GRANT SELECT ON TABLE regs.people TO ${r.viewer};`,
    ]);
    // As the issue found it: the first submission fails.
    const editorClient = await connectAs(editor);
    const refused = await editorClient.query("select snapbase.submit_change('regs.people', $1, 'x')", ["insert into regs.people (name) values ('Edsger')"]).then(() => null, (e: Error) => e.message);
    expect(refused).toMatch(/permission denied for schema regs/);

    // A WARNING says the same at registration (register_table calls this).
    const notices: string[] = [];
    root.on("notice", (n) => notices.push(`${n.severity}: ${n.message}`));
    await asRoot("select snapbase_private.warn_registration_problems('regs.people')");
    root.removeAllListeners("notice");
    expect(notices).toHaveLength(1);
    expect(notices[0]).toMatch(/^WARNING: regs\.people is under change control, but changes to it will fail until these are run \(as its owner or a superuser\): GRANT USAGE ON SCHEMA regs TO/);

    for (const statement of await missingGrants("regs.people")) await asRoot(statement);
    expect(await missingGrants("regs.people")).toEqual([]);

    // Submit (identity from the sequence), approve, restore: all work now.
    const id = (await editorClient.query("select id from snapbase.submit_change('regs.people', $1, 'x')", ["insert into regs.people (name) values ('Edsger')"])).rows[0].id;
    await editorClient.end();
    const adminClient = await connectAs(admin);
    try {
      const approved = (await adminClient.query("select * from snapbase.approve_change($1)", [id])).rows[0];
      expect(approved, approved.error_message).toMatchObject({ status: "approved", rows_affected: "1" });
      await asRoot("delete from regs.people where name = 'Ada'");
      const restored = (await adminClient.query("select * from snapbase.restore_snapshot($1)", [approved.snapshot_id])).rows[0];
      expect(restored, restored.error_message).toMatchObject({ status: "approved", rows_affected: "1" });
    } finally {
      await adminClient.end();
    }
    expect(await asRoot("select id, name from regs.people order by id")).toEqual([{ id: 1, name: "Ada" }, { id: 2, name: "Grace" }, { id: 3, name: "Edsger" }]);
  });

  it("asks for a policy where row-level security would hide rows from the change runner and the snapshots", async () => {
    await asRoot("select snapbase.register_table('regs.secured')");
    const r = db.roles;
    expect(await missingGrants("regs.secured")).toEqual([
      `GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE regs.secured TO ${r.owner} WITH GRANT OPTION;`,
      `GRANT SELECT ON TABLE regs.secured TO ${r.viewer};`,
      `CREATE POLICY snapbase_change_control ON regs.secured TO ${r.owner}, ${r.changeRunner} USING (true) WITH CHECK (true);`,
    ]);
    // One statement runs them all, as the DBA (psql).
    expect(await asRoot("select snapbase.grant_change_control('regs.secured') as ran")).toEqual([{ ran: expect.arrayContaining([expect.stringMatching(/^CREATE POLICY/)]) }]);
    expect(await missingGrants("regs.secured")).toEqual([]);
  });

  it("GraphQL shows it on the managed table (missingGrants); an owned table needs nothing", async () => {
    await owner().query(`create table if not exists public.reg_owned (id int primary key); grant select on public.reg_owned to ${db.roles.viewer}`);
    const token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: admin.email, password: TEST_PASSWORD } })).body.token;
    const res = await graphql(server.url, `mutation { registerTable(input: { target: "public.reg_owned" }) { result { qualifiedName missingGrants } } }`, {}, token);
    expect(res.body).toEqual({ data: { registerTable: { result: { qualifiedName: "public.reg_owned", missingGrants: [] } } } });
  });
});
