// Where a connector may connect, checked right before it does.
//
// The rules live in SQL (snapbase_private.connector_address_problem), so the check
// when an account is created and this one agree. Here the connection settings are
// read exactly as the driver will read them (pg's own parser), the host it would
// use is resolved, every address is checked, and the connector then connects to
// that checked address (a DNS answer that changes in between cannot redirect it).
// A PostgreSQL target holding this installation's marker, that is its own
// database however it is reached, is refused; so is one the check cannot finish on.
import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import type pg from "pg";
import { parse } from "pg-connection-string";
import { createPool, isConnectFailure } from "../db/pools.ts";
import { describePostgresError, postgresClientConfig } from "./postgres.ts";
import type { ConnectorKind } from "./index.ts";
import { ConnectorError } from "./types.ts";

type Sql = <T extends pg.QueryResultRow = any>(text: string, values?: unknown[]) => Promise<T[]>;

const refuse = (problem: string) => new ConnectorError(problem, { transient: false });

/** Connection-string settings that read local files or change the session, which no connector may carry. */
const FORBIDDEN_SETTINGS = ["options", "sslcert", "sslkey", "sslrootcert", "hostaddr", "service", "passfile", "sslpassword"];

async function checkedAddress(host: string, sql: Sql): Promise<string> {
  const bare = host.replace(/^\[|\]$/g, "");
  if (bare === "" || bare.startsWith("/")) throw refuse(`connectors may reach network hosts only (got ${JSON.stringify(host)})`);
  let addresses: string[];
  try {
    addresses = isIP(bare) ? [bare] : (await lookup(bare, { all: true, verbatim: true })).map((a) => a.address);
  } catch (error) {
    throw new ConnectorError(`cannot resolve ${host}: ${(error as Error).message}`, { transient: true });
  }
  if (addresses.length === 0) throw new ConnectorError(`${host} resolves to no address`, { transient: true });
  for (const address of addresses) {
    const [row] = await sql<{ problem: string | null }>("select snapbase_private.connector_address_problem($1, $2::inet) as problem", [bare, address]);
    if (row?.problem) throw refuse(row.problem);
  }
  return addresses[0]!;
}

async function refuseOwnDatabase(connectionString: string, config: pg.ClientConfig, sql: Sql): Promise<void> {
  const [own] = await sql<{ id: string | null }>("select snapbase_private.setting('installation_id') as id");
  if (!own?.id) throw refuse("this installation has no marker to recognise its own database by; run the migrations");
  const pool = createPool({ name: "own database check", clientConfig: { ...config, connectionTimeoutMillis: 10_000 }, max: 1, quiet: true });
  try {
    const { rows } = await pool.query<{ marker: string | null }>(
      `select d.description as marker
         from pg_catalog.pg_description d join pg_catalog.pg_namespace n on n.oid = d.objoid
        where d.classoid = 'pg_catalog.pg_namespace'::pg_catalog.regclass and n.nspname = 'snapbase_private'`,
    );
    if (rows.some((r) => r.marker?.includes(own.id!))) {
      throw refuse("this connector points at Snapbase's own database, which connectors may never reach");
    }
  } catch (error) {
    if (error instanceof ConnectorError) throw error;
    // Fail closed: a target we cannot check is not connected to. A connection that
    // fails is reported as the connector would report it (wrong credentials are final).
    const described = describePostgresError(error, connectionString);
    throw new ConnectorError(isConnectFailure(error) ? described.message : `cannot check that the target is not Snapbase's own database: ${described.message}`,
      { transient: described.transient });
  } finally {
    await pool.end().catch(() => {});
  }
}

/**
 * The credentials to connect with, carrying the address that was checked
 * (`address`); throws a ConnectorError (not retried) when the target is not allowed.
 */
export async function pinConnectorTarget(kind: ConnectorKind, credentials: Record<string, unknown>, sql: Sql): Promise<Record<string, unknown>> {
  if (kind === "mysql") {
    return { ...credentials, host: await checkedAddress(String(credentials.host ?? ""), sql) };
  }
  if (kind !== "postgres") return credentials;
  const connectionString = String(credentials.connection_string);
  const parsed = parse(connectionString);
  const forbidden = FORBIDDEN_SETTINGS.filter((k) => parsed[k] !== undefined && parsed[k] !== null && parsed[k] !== "");
  if (forbidden.length) throw refuse(`connection strings may not set ${forbidden.join(", ")}`);
  const address = await checkedAddress(parsed.host ?? "", sql);
  await refuseOwnDatabase(connectionString, postgresClientConfig(connectionString, address), sql);
  return { ...credentials, address };
}
