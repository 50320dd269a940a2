// The query string, read strictly: what Express's default parser (node:querystring)
// would silently change is refused instead. A percent-escape that is not two hex
// digits (`%zb`, kept as text by querystring) or bytes that are not UTF-8 (`%ff`,
// decoded to U+FFFD) are 400 `invalid_query`, never stored changed.
import { HttpError } from "./errors.ts";

const HEX_ESCAPE = /%(?![0-9a-fA-F]{2})/;

function decodeComponent(raw: string): string {
  const text = raw.replace(/\+/g, " ");
  if (!text.includes("%")) return text;
  if (HEX_ESCAPE.test(text)) throw invalid();
  // Escapes to bytes, other characters as their UTF-8; then one strict decode.
  const bytes: number[] = [];
  for (let i = 0; i < text.length; ) {
    if (text.charCodeAt(i) === 0x25) {
      bytes.push(parseInt(text.slice(i + 1, i + 3), 16));
      i += 3;
    } else {
      const cp = text.codePointAt(i)!;
      const ch = String.fromCodePoint(cp);
      bytes.push(...Buffer.from(ch, "utf8"));
      i += ch.length;
    }
  }
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(Uint8Array.from(bytes));
  } catch {
    throw invalid();
  }
}

const invalid = () => new HttpError(400, "invalid_query", "the query string is not valid percent-encoded UTF-8");

/**
 * Express's `query parser`: `a=1&b=2&a=3` → `{ a: ["1", "3"], b: "2" }` (as the
 * default "simple" parser does), with strict decoding; throws 400 `invalid_query`.
 */
export function parseQueryStrict(query: string | null | undefined): Record<string, string | string[]> {
  const result: Record<string, string | string[]> = Object.create(null);
  if (!query) return result; // (Express passes null for a URL without "?")
  for (const part of query.split("&")) {
    if (part === "") continue;
    const eq = part.indexOf("=");
    const key = decodeComponent(eq === -1 ? part : part.slice(0, eq));
    const value = eq === -1 ? "" : decodeComponent(part.slice(eq + 1));
    const prev = result[key];
    result[key] = prev === undefined ? value : Array.isArray(prev) ? [...prev, value] : [prev, value];
  }
  return result;
}
