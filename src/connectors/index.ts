// Opens the connector for an account's kind. Credentials come decrypted from the
// database (snapbase_private.account_credentials) and never leave this process.
import { csvConnector } from "./csv.ts";
import { mysqlConnector } from "./mysql.ts";
import { withLocalColumnNames } from "./names.ts";
import { postgresConnector } from "./postgres.ts";
import { ConnectorError, type Connector } from "./types.ts";

export type ConnectorKind = "postgres" | "mysql" | "managed" | "csv";

export interface ConnectorOptions {
  /** The owner's connection string: the `managed` and `csv` connectors read this database with it. */
  ownerUrl: string;
  /** The job the connector works for: the `csv` connector records it on the versions it writes. */
  jobId?: string;
  /** The database role of the job's creator: the `managed` connector reads with its rights only. */
  creatorRole?: string;
}

/** The connector for an account, its columns under their workbook names (names.ts). */
export function openConnector(kind: ConnectorKind, credentials: Record<string, unknown>, opts: ConnectorOptions): Connector {
  return withLocalColumnNames(openSourceConnector(kind, credentials, opts));
}

function openSourceConnector(kind: ConnectorKind, credentials: Record<string, unknown>, opts: ConnectorOptions): Connector {
  switch (kind) {
    case "postgres":
      return postgresConnector({
        connectionString: String(credentials.connection_string),
        address: typeof credentials.address === "string" ? credentials.address : undefined,
      });
    case "mysql":
      return mysqlConnector({
        host: String(credentials.host),
        port: credentials.port === undefined ? undefined : Number(credentials.port),
        user: String(credentials.user),
        password: credentials.password === undefined ? undefined : String(credentials.password),
        database: String(credentials.database),
      });
    case "managed":
      // Reads go straight to this database, as the job's creator (never as the owner);
      // writes never do (publish_managed submits a change request instead).
      if (!opts.creatorRole) throw new ConnectorError("reading managed tables needs the job creator's role", { transient: false });
      return postgresConnector({ connectionString: opts.ownerUrl, managedAs: opts.creatorRole });
    case "csv":
      // The file lives in this database; create_connector_account checked it is the account owner's.
      return csvConnector({ fileId: String(credentials.file_id) }, { ownerUrl: opts.ownerUrl, jobId: opts.jobId });
    default:
      throw new ConnectorError(`unknown connector kind ${JSON.stringify(kind)}`, { transient: false });
  }
}
