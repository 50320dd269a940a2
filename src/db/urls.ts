// The one place that reads and rewrites postgres:// URLs. Parts come back decoded
// (user, password and database are percent-encoded in a URL) and are encoded here,
// so no caller parses a URL inline.

export interface UrlParts {
  /** "postgres" or "postgresql" (without the colon). */
  protocol: string;
  /** Empty when the URL names none. */
  user: string;
  /** Empty when the URL has none. */
  password: string;
  host: string;
  port?: number;
  /** Empty when the URL names none. */
  database: string;
}

/** The parts of a URL, decoded. Throws (TypeError) when it is not a URL at all. */
export function urlParts(url: string): UrlParts {
  const u = new URL(url);
  return {
    protocol: u.protocol.replace(/:$/, ""),
    user: decodeURIComponent(u.username),
    password: decodeURIComponent(u.password),
    host: u.hostname,
    port: u.port ? Number(u.port) : undefined,
    database: decodeURIComponent(u.pathname.slice(1)),
  };
}

/** The same server with another user, password or database (null: no password). */
export function withUrlParts(url: string, parts: { user?: string; password?: string | null; database?: string }): string {
  const u = new URL(url);
  if (parts.user !== undefined) u.username = encodeURIComponent(parts.user);
  if (parts.password !== undefined) u.password = parts.password ? encodeURIComponent(parts.password) : "";
  if (parts.database !== undefined) u.pathname = `/${encodeURIComponent(parts.database)}`;
  return u.toString();
}

/** A URL from its parts (the embedded server's). */
export function postgresUrl(parts: { user: string; password?: string; host: string; port: number; database: string }): string {
  const host = parts.host.includes(":") ? `[${parts.host}]` : parts.host;
  return withUrlParts(`postgres://${host}:${parts.port}/`, { user: parts.user, password: parts.password ?? null, database: parts.database });
}

export const databaseName = (url: string): string => urlParts(url).database;

/** The user a URL connects as; with none, libpq's default (PGUSER, else the OS user). */
export function urlUser(url: string): string {
  return urlParts(url).user || process.env.PGUSER || process.env.USER || "postgres";
}

/** The password in a URL, if any. */
export function urlPassword(url: string): string | undefined {
  return urlParts(url).password || undefined;
}
