// The one place connection strings are masked, for everything shown or logged:
// configuration errors, connector and job errors, log lines. A password is hidden
// wherever the string put it: in the user info (even one holding "@" or other
// characters that should have been percent-encoded: everything up to the last "@"
// before the host counts), in the query string (password=, sslpassword=), or in
// key=value form (password='…'). When in doubt, more is hidden, never less.

const MASK = "***";

/** URLs with a scheme whose user info may hold a password. */
const URL_IN_TEXT = /\b(?:postgres(?:ql)?|mysql|mariadb):\/\/[^\s"'<>]*/gi;
const URL_PARTS = /^([a-z][a-z0-9+.-]*:\/\/)([\s\S]*)$/i;
/** A password given as a parameter: key=value (quoted or not) or a query-string pair. */
const SECRET_PARAM = /\b((?:ssl)?password|passwd|pwd)(\s*=\s*)('(?:\\.|[^'\\])*'?|[^\s&#'"]*)/gi;

function safeDecode(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

/** Masks the password parameters of key=value text or a query string. */
function maskParams(text: string): string {
  return text.replace(SECRET_PARAM, (_match, key: string, equals: string) => `${key}${equals}${MASK}`);
}

/** A connection string as it may be shown: `postgres://user:***@host:5432/db?sslmode=require&password=***`. */
export function maskConnectionString(connectionString: string): string {
  const parts = URL_PARTS.exec(connectionString);
  if (!parts) return maskParams(connectionString);
  const [, scheme, afterScheme] = parts as unknown as [string, string, string];
  const at = afterScheme.lastIndexOf("@");
  if (at < 0) return scheme + maskParams(afterScheme);
  const userInfo = afterScheme.slice(0, at);
  const colon = userInfo.indexOf(":");
  const user = colon < 0 ? userInfo : `${userInfo.slice(0, colon)}:${MASK}`;
  return `${scheme}${user}@${maskParams(afterScheme.slice(at + 1))}`;
}

/** Every secret a connection string holds, as written and percent-decoded, to hide them from messages that quote them. */
export function secretsOfConnectionString(connectionString: string): string[] {
  const secrets = new Set<string>();
  const add = (value: string) => {
    if (value && value !== MASK) {
      secrets.add(value);
      secrets.add(safeDecode(value));
    }
  };
  const parts = URL_PARTS.exec(connectionString);
  if (parts) {
    const afterScheme = parts[2]!;
    const userInfo = afterScheme.slice(0, Math.max(afterScheme.lastIndexOf("@"), 0));
    const colon = userInfo.indexOf(":");
    if (colon >= 0) add(userInfo.slice(colon + 1));
  }
  for (const m of connectionString.matchAll(SECRET_PARAM)) {
    const value = m[3]!;
    if (value.startsWith("'")) add(value.replace(/^'|'$/g, "").replace(/\\(.)/g, "$1"));
    else add(value);
  }
  return [...secrets].filter((s) => s !== "");
}

/** The secrets in a connector's credentials (a connection string's, a password). */
export function secretsOfCredentials(credentials: Record<string, unknown> | null | undefined): string[] {
  const secrets: string[] = [];
  if (typeof credentials?.connection_string === "string") secrets.push(...secretsOfConnectionString(credentials.connection_string));
  if (typeof credentials?.password === "string" && credentials.password !== "") secrets.push(credentials.password);
  return secrets;
}

/**
 * Text safe to show or log: every connection string in it masked, every password
 * parameter masked, and each of `secrets` (longest first) replaced wherever it appears.
 */
export function redactText(text: string, secrets: readonly string[] = []): string {
  let out = text;
  for (const secret of [...secrets].filter(Boolean).sort((a, b) => b.length - a.length)) out = out.split(secret).join(MASK);
  return maskParams(out.replace(URL_IN_TEXT, (url) => maskConnectionString(url)));
}

/** A value (a log line's fields) with every string in it passed through redactText. */
export function redactDeep(value: unknown, depth = 0): unknown {
  if (typeof value === "string") return redactText(value);
  if (depth > 8 || value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) return value.map((v) => redactDeep(v, depth + 1));
  if (value instanceof Error) return redactText(value.stack ?? value.message);
  return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, redactDeep(v, depth + 1)]));
}
