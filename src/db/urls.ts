// One way to rewrite a postgres:// URL: the same server with another user,
// password or database. User and password are percent-encoded here.
export function withUrlParts(url: string, parts: { user?: string; password?: string | null; database?: string }): string {
  const u = new URL(url);
  if (parts.user !== undefined) u.username = encodeURIComponent(parts.user);
  if (parts.password !== undefined) u.password = parts.password ? encodeURIComponent(parts.password) : "";
  if (parts.database !== undefined) u.pathname = `/${parts.database}`;
  return u.toString();
}

export const databaseName = (url: string): string => decodeURIComponent(new URL(url).pathname.slice(1));
