export function urlFor(base: string, user: string, password: string | undefined, database: string): string {
  const u = new URL(base);
  u.username = encodeURIComponent(user);
  u.password = password ? encodeURIComponent(password) : "";
  u.pathname = `/${database}`;
  return u.toString();
}
