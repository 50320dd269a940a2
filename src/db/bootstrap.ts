// Cluster-level setup that needs a superuser (or CREATEROLE + CREATEDB): the roles
// and the database. Everything inside the database is done by migrations as the owner.
import pg from "pg";
import { withClient } from "./pools.ts";
import type { RoleNames } from "../config.ts";

const ident = (name: string) => pg.Client.prototype.escapeIdentifier(name);
const literal = (value: string) => pg.Client.prototype.escapeLiteral(value);

export interface BootstrapOptions {
  rootUrl: string;
  database: string;
  roles: RoleNames;
  ownerPassword?: string;
  authenticatorPassword?: string;
}

async function ensureRole(client: pg.Client, name: string, attributes: string, password?: string) {
  const { rowCount } = await client.query("select 1 from pg_roles where rolname = $1", [name]);
  const pw = password ? ` password ${literal(password)}` : "";
  if (!rowCount) await client.query(`create role ${ident(name)} ${attributes}${pw}`);
  else if (password) await client.query(`alter role ${ident(name)} ${attributes}${pw}`);
}

async function grantRole(client: pg.Client, role: string, member: string) {
  const { rowCount } = await client.query(
    `select 1 from pg_auth_members m join pg_roles r on r.oid = m.roleid join pg_roles u on u.oid = m.member
      where r.rolname = $1 and u.rolname = $2`,
    [role, member],
  );
  if (!rowCount) await client.query(`grant ${ident(role)} to ${ident(member)}`);
}

/** Creates the roles (if missing) and the database (if missing). Safe to re-run. */
export async function bootstrapCluster(opts: BootstrapOptions): Promise<void> {
  const { roles } = opts;
  await withClient("bootstrap", opts.rootUrl, async (client) => {
    // Serialise concurrent bootstraps (two servers starting at once) on one cluster.
    await client.query("select pg_advisory_lock(hashtext('snapbase bootstrap'))");
    const { rows } = await client.query("select rolsuper from pg_roles where rolname = $1", [roles.owner]);
    if (!rows[0]?.rolsuper) await ensureRole(client, roles.owner, "login", opts.ownerPassword);
    await ensureRole(client, roles.authenticator, "login noinherit", opts.authenticatorPassword);
    for (const r of [roles.anonymous, roles.viewer, roles.editor, roles.admin, roles.agent]) {
      await ensureRole(client, r, "nologin");
    }
    await grantRole(client, roles.viewer, roles.editor);
    await grantRole(client, roles.editor, roles.admin);
    for (const r of [roles.anonymous, roles.viewer, roles.editor, roles.admin, roles.agent]) {
      await grantRole(client, r, roles.authenticator);
    }
    // A DBA connected as the owner acts as an admin in Snapbase's own checks.
    if (!rows[0]?.rolsuper) await grantRole(client, roles.admin, roles.owner);
    // The sandbox roles user text runs as. They log in never, are granted nothing
    // here, and are members of nothing; the owner is their member so that it can
    // own their SECURITY DEFINER entry points (migrations) and grant them per use.
    for (const r of [roles.changeRunner, roles.filterReader]) {
      await ensureRole(client, r, "nologin noinherit");
      if (!rows[0]?.rolsuper) await grantRole(client, r, roles.owner);
    }
    const exists = await client.query("select 1 from pg_database where datname = $1", [opts.database]);
    if (!exists.rowCount) {
      await client.query(`create database ${ident(opts.database)} owner ${ident(roles.owner)}`);
    }
    await client.query("select pg_advisory_unlock(hashtext('snapbase bootstrap'))");
  });
}

/** Can this connection create roles? (Then start-up bootstraps by itself.) */
export async function canCreateRoles(url: string): Promise<boolean> {
  return withClient("bootstrap check", url, async (client) => {
    const { rows } = await client.query(
      "select rolsuper or rolcreaterole as ok from pg_roles where rolname = current_user",
    );
    return Boolean(rows[0]?.ok);
  });
}
