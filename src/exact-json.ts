// Numbers in JSON, exactly. PostgreSQL's numbers (bigint, numeric, numbers inside
// jsonb) can hold more digits than a JavaScript number (a double): JSON.parse would
// turn 9007199254740993 into 9007199254740992 and 12345678901234567890.0123456789
// into 12345678901234567000. Two rules, one per direction:
//
// - To clients (REST, GraphQL JSON values): a number is sent as a JSON number when
//   a double holds it exactly (an integer up to 2^53 - 1, or a decimal whose value
//   the double keeps); otherwise as a string of its exact digits. Clients of any
//   language read it back without loss and may write the string back: PostgreSQL
//   casts it exactly to the column's type.
// - Inside Snapbase (request bodies, worker, connectors): a number whose text is not
//   what JavaScript would print for it (String(Number(text)) differs: wide numbers,
//   but also trailing zeros such as numeric 1.500 or 0.000, -0, exponents) is kept
//   as an ExactNumber, which JSON.stringify writes back with its original text, so
//   what reaches PostgreSQL or a source is what was sent, scale and sign included.
//
// JSON.parse hands a reviver each number's source text (Node 22+), and
// JSON.rawJSON writes text as a number; both are standard JavaScript.

const rawJSON = (JSON as unknown as { rawJSON(text: string): unknown }).rawJSON;

/** A JSON number too wide for a double, kept as its source text. */
export class ExactNumber {
  readonly text: string;
  constructor(text: string) {
    this.text = text;
  }
  /** JSON.stringify writes the original digits, as a number. */
  toJSON(): unknown {
    return rawJSON(this.text);
  }
  /** As text (e.g. for a BigInt argument): the original digits. */
  toString(): string {
    return this.text;
  }
}

/** "0012.3400" → "1234e-2", "1.2e+21" → "12e20": significant digits and a power of ten. */
function canonicalDecimal(text: string): string {
  const match = /^(-?)(\d*)(?:\.(\d*))?(?:e([+-]?\d+))?$/i.exec(text);
  if (!match) return text;
  const [, sign, whole, fraction = "", exponent = "0"] = match;
  const digits = (whole + fraction).replace(/^0+/, "");
  const significant = digits.replace(/0+$/, "");
  if (significant === "") return "0";
  const power = Number(exponent) - fraction.length + (digits.length - significant.length);
  return `${sign}${significant}e${power}`;
}

/**
 * Whether a JavaScript number carries this decimal text's value exactly: integers up
 * to 2^53 - 1 (beyond, neighbours share a double), other numbers when the double's
 * shortest form is the same decimal ("12.50" is 12.5; "0.1" is 0.1).
 */
export function fitsDouble(text: string): boolean {
  const n = Number(text);
  if (!Number.isFinite(n)) return false;
  if (/^-?\d+$/.test(text)) return Number.isSafeInteger(n);
  if (Number.isInteger(n) && !Number.isSafeInteger(n)) return false;
  return canonicalDecimal(text) === canonicalDecimal(String(n));
}

type Reviver = (key: string, value: unknown, context?: { source?: string }) => unknown;

/**
 * JSON.parse reviver for what Snapbase keeps: every number whose text a JavaScript
 * number would not print back as it is (wide numbers, 1.500, 0.000, -0, 1e3) becomes
 * an ExactNumber. One string comparison per number, no regular expression.
 */
export const keepExactNumbers: Reviver = (_key, value, context) =>
  typeof value === "number" && context?.source !== undefined && context.source !== String(value) ? new ExactNumber(context.source) : value;

/** JSON.parse reviver for what clients get: wide numbers become strings of their exact digits. */
export const exactNumbersAsText: Reviver = (_key, value, context) =>
  typeof value === "number" && context?.source !== undefined && !fitsDouble(context.source) ? context.source : value;

/** A double holds any 15 significant digits, so a shorter run of digits needs no reviver. */
const MAYBE_WIDE = /[0-9.]{16}/;

/**
 * Text where some number may not read back as written: a long run of digits, or a
 * number (at the start, or after ":", "," or "[") that is -0, has a fraction ending
 * in 0 (1.500, 0.000) or an exponent. Without any of these, every number in the
 * text is what String(Number(text)) prints, and plain JSON.parse keeps it. Anchoring
 * on what precedes a number keeps uuids and hex ("3e4f…") from needing the reviver;
 * a false alarm inside a string only costs the reviver.
 */
const MAYBE_INEXACT = /[0-9.]{16}|(?:^|[:,[])\s*(?:-0(?![.\d])|-?\d+(?:\.\d*0(?!\d)|(?:\.\d*)?[eE]))/;

/** Parses JSON keeping every number's text that a JavaScript number would change (ExactNumber). */
export function parseJsonExact(text: string): unknown {
  return MAYBE_INEXACT.test(text) ? JSON.parse(text, keepExactNumbers as never) : JSON.parse(text);
}

/** Parses JSON for clients: wide numbers become exact strings. */
export function parseJsonForClients(text: string): unknown {
  return MAYBE_WIDE.test(text) ? JSON.parse(text, exactNumbersAsText as never) : JSON.parse(text);
}

/** JSON text whose wide numbers are rewritten as exact strings (for JSON passed through as text). */
export function jsonTextForClients(text: string): string {
  return MAYBE_WIDE.test(text) ? JSON.stringify(JSON.parse(text, exactNumbersAsText as never)) : text;
}

/** A number PostgreSQL printed (bigint, numeric, float) as a client gets it. */
export function numberForClients(text: string): number | string {
  return fitsDouble(text) ? Number(text) : text;
}
