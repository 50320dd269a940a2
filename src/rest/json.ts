// How the REST layer reads PostgreSQL values into JSON, in one place (the REST
// pool's type parsers), so every endpoint answers alike:
// - bigint and numeric are JSON numbers when a double holds them exactly (integers
//   up to 2^53 - 1); wider ones are strings of their exact digits; real and double
//   are numbers; NaN and infinities are strings;
// - json and jsonb keep the same rule for the numbers inside them;
// - timestamptz is ISO 8601 in UTC ("2024-01-15T14:30:00Z", with as many fraction
//   digits as PostgreSQL holds, none when whole); timestamp (no zone) is ISO 8601
//   without a zone; date is "YYYY-MM-DD"; infinity stays "infinity".
// Request bodies keep wide numbers exact (ExactNumber) so what a client sends is
// what reaches PostgreSQL.
import pg from "pg";
import { keepExactNumbers, numberForClients, parseJsonForClients } from "../exact-json.ts";

const { builtins } = pg.types;

/** "2024-01-15 14:30:00.123+05:30" (any zone PostgreSQL prints) → "2024-01-15T09:00:00.123Z". */
export function timestamptzToIso(text: string): string {
  const m = /^(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?([+-])(\d\d)(?::?(\d\d))?(?::?(\d\d))?$/.exec(text);
  if (!m) return text; // infinity, BC dates, years past 9999: PostgreSQL's own text
  const [, y, mo, d, h, mi, s, fraction = "", sign, oh, om = "0", os = "0"] = m;
  const offsetSeconds = (sign === "-" ? -1 : 1) * (Number(oh) * 3600 + Number(om) * 60 + Number(os));
  // (setUTCFullYear, not Date.UTC, which reads years 0 to 99 as 1900 to 1999.)
  const local = new Date(0);
  local.setUTCFullYear(Number(y), Number(mo) - 1, Number(d));
  local.setUTCHours(Number(h), Number(mi), Number(s), 0);
  const utc = new Date(local.getTime() - offsetSeconds * 1000);
  if (Number.isNaN(utc.getTime()) || utc.getUTCFullYear() < 1 || utc.getUTCFullYear() > 9999) return text;
  const digits = fraction.replace(/0+$/, "");
  return `${utc.toISOString().slice(0, 19)}${digits ? `.${digits}` : ""}Z`;
}

/** "2024-01-15 14:30:00.5" → "2024-01-15T14:30:00.5" (no zone: none is known). */
const timestampToIso = (text: string): string => text.replace(/^(\d{4,}-\d\d-\d\d) /, "$1T");

/** A real or double is a double: a number, unless NaN or an infinity (JSON has none). */
const floatForClients = (text: string): number | string => (Number.isFinite(Number(text)) ? Number(text) : text);

const parsers = new Map<number, (text: string) => unknown>([
  [builtins.INT8, numberForClients],
  [builtins.NUMERIC, numberForClients],
  [builtins.FLOAT4, floatForClients],
  [builtins.FLOAT8, floatForClients],
  [builtins.JSON, parseJsonForClients],
  [builtins.JSONB, parseJsonForClients],
  [builtins.TIMESTAMPTZ, timestamptzToIso],
  [builtins.TIMESTAMP, timestampToIso],
  [builtins.DATE, (text) => text],
]);

/** Array types of those, parsed element by element. */
const arrays = new Map<number, number>([
  [1016, builtins.INT8], [1231, builtins.NUMERIC], [1021, builtins.FLOAT4], [1022, builtins.FLOAT8],
  [199, builtins.JSON], [3807, builtins.JSONB], [1185, builtins.TIMESTAMPTZ], [1115, builtins.TIMESTAMP], [1182, builtins.DATE],
]);

const parseTextArray = pg.types.getTypeParser(1009 as Parameters<typeof pg.types.getTypeParser>[0]) as (text: string) => unknown[];

function mapNested(value: unknown, parse: (text: string) => unknown): unknown {
  if (Array.isArray(value)) return value.map((v) => mapNested(v, parse));
  return value === null ? null : parse(value as string);
}

/** The REST pool's type parsers (pg's `types` option). */
export const restJsonTypes = {
  getTypeParser(oid: number, format?: "text" | "binary") {
    if (format === "binary") return pg.types.getTypeParser(oid, "binary");
    const own = parsers.get(oid);
    if (own) return own;
    const element = arrays.get(oid);
    if (element !== undefined) {
      const parse = parsers.get(element)!;
      return (text: string) => mapNested(parseTextArray(text), parse);
    }
    return pg.types.getTypeParser(oid, "text");
  },
} as pg.CustomTypesConfig;

/** express.json options for request bodies: numbers wider than a double keep their digits. */
export const exactJsonBody = { reviver: keepExactNumbers as (key: string, value: unknown) => unknown };
