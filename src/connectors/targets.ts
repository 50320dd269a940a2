// Where a connector may connect, checked right before it does.
//
// The rules live in SQL (snapbase_private.connector_address_problem), so the check
// when an account is created and this one agree. Here the host is resolved, every
// address it resolves to is checked, and the connector is then pointed at the
// checked address, so a DNS answer that changes between the check and the
// connection (rebinding) cannot redirect it. A PostgreSQL target holding this
// installation's marker (its own database, however it is reached) is refused.
import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import pg from "pg";
import type { ConnectorKind } from "./index.ts";
import { ConnectorError } from "./types.ts";

type Sql = <T extends pg.QueryResultRow = any>(text: string, values?: unknown[]) => Promise<T[]>;

async function checkedAddress(host: string, sql: Sql): Promise<string | undefined> {
  const refuse = (problem: string) => new ConnectorError(problem, { transient: false });
  if (host.startsWith("/")) {
    const [row] = await sql<{ problem: string | null }>("select snapbase_private.connector_address_problem($1) as problem", [host]);
    if (row?.problem) throw refuse(row.problem);
    return undefined;
  }
  const bare = host.replace(/^\[|\]$/g, "");
  let addresses: string[];
  try {
    addresses = isIP(bare) ? [bare] : (await lookup(bare, { all: true, verbatim: true })).map((a) => a.address);
  } catch (error) {
    throw new ConnectorError(`cannot resolve ${host}: ${(error as Error).message}`, { transient: true });
  }
  for (const address of addresses) {
    const [row] = await sql<{ problem: string | null }>("select snapbase_private.connector_address_problem($1, $2::inet) as problem", [bare, address]);
    if (row?.problem) throw refuse(row.problem);
  }
  return addresses[0];
}

async function refuseOwnDatabase(connectionString: string, sql: Sql): Promise<void> {
  const [own] = await sql<{ id: string }>("select snapbase_private.setting('installation_id') as id");
  const client = new pg.Client({ connectionString, connectionTimeoutMillis: 10_000 });
  client.on("error", () => {});
  try {
    await client.connect();
    const { rows } = await client.query<{ marker: string | null }>(
      `select d.description as marker from pg_description d join pg_namespace n on n.oid = d.objoid
        where d.classoid = 'pg_namespace'::regclass and n.nspname = 'snapbase_private'`,
    );
    if (own?.id && rows.some((r) => r.marker?.includes(own.id))) {
      throw new ConnectorError("this connector points at Snapbase's own database, which connectors may never reach", { transient: false });
    }
  } catch (error) {
    if (error instanceof ConnectorError) throw error;
    // Connection problems are the connector's to report, with its own wording.
  } finally {
    await client.end().catch(() => {});
  }
}

/**
 * The credentials to connect with: the host replaced by the address that was checked.
 * Throws a ConnectorError (not retried) when the target is not allowed.
 */
export async function pinConnectorTarget(kind: ConnectorKind, credentials: Record<string, unknown>, sql: Sql): Promise<Record<string, unknown>> {
  if (kind === "mysql") {
    const address = await checkedAddress(String(credentials.host ?? ""), sql);
    return address ? { ...credentials, host: address } : credentials;
  }
  if (kind !== "postgres") return credentials;
  const url = new URL(String(credentials.connection_string));
  const hostParam = url.searchParams.get("host");
  const host = hostParam ?? decodeURIComponent(url.hostname);
  const address = await checkedAddress(host, sql);
  if (address) {
    if (hostParam !== null) url.searchParams.set("host", address);
    else url.hostname = isIP(address) === 6 ? `[${address}]` : address;
  }
  const pinned = url.toString();
  await refuseOwnDatabase(pinned, sql);
  return { ...credentials, connection_string: pinned };
}
