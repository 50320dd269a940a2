// Request bodies: JSON only where JSON is expected, decoded as strict UTF-8, and
// text that is not valid Unicode refused (never stored with U+FFFD in its place).
import express, { type NextFunction, type Request, type Response } from "express";
import { HttpError } from "./errors.ts";

const JSON_TYPES = ["application/json", "application/*+json"];

/** Whether the request carries a body (an empty POST does not). */
export function hasBody(req: Request): boolean {
  if (req.headers["transfer-encoding"] !== undefined) return true;
  const length = Number(req.headers["content-length"]);
  return Number.isFinite(length) && length > 0;
}

/** Refuses bytes that are not UTF-8 instead of decoding them to U+FFFD. */
export function assertUtf8(bytes: Uint8Array, what: string): string {
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw Object.assign(new HttpError(400, "invalid_utf8", `${what} is not valid UTF-8`), { type: "encoding.invalid" });
  }
}

/** The charset a Content-Type declares, if any. */
const declaredCharset = (req: Request): string | undefined => /;\s*charset\s*=\s*"?([^";\s]+)/i.exec(req.headers["content-type"] ?? "")?.[1];

/**
 * The one check of a CSV upload's headers (csv-files and imports): the file must be
 * UTF-8 (a declared charset other than UTF-8 is 415: its bytes would mean other
 * text) and sent as is (a Content-Encoding other than identity is 415).
 */
export function assertPlainUtf8Csv(req: Request): void {
  const encoding = (req.headers["content-encoding"] ?? "identity").trim().toLowerCase();
  if (encoding !== "identity" && encoding !== "") {
    throw new HttpError(415, "unsupported_content_encoding", `send the CSV file uncompressed (content-encoding: identity, not ${JSON.stringify(encoding)})`);
  }
  const charset = declaredCharset(req);
  if (charset !== undefined && !/^utf-?8$/i.test(charset)) {
    throw new HttpError(415, "unsupported_charset", `send the CSV file as UTF-8 (got charset ${JSON.stringify(charset)})`);
  }
}

/** How deeply JSON bodies and GraphQL documents may nest (arrays, objects; GraphQL's
 *  braces, brackets and parentheses). Deeper text is refused before it is parsed, so
 *  no recursive walk (parser, reviver, checks) can run out of stack. */
export const MAX_NESTING = 512;

/**
 * What JSON.parse cannot be asked to refuse, in one pass over the bytes: nesting
 * deeper than MAX_NESTING (400 json_too_deep), and a key twice in one object (400
 * duplicate_key; JSON.parse would keep the last value silently). Text that is not
 * JSON at all is left to the parser to report.
 */
export function assertJsonShape(bytes: Uint8Array, what: string): void {
  // One frame per open array (null) or object (its keys so far).
  const text = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
  const frames: (Set<string> | null)[] = [];
  let expectKey = false;
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i];
    if (b === 0x22) {
      const start = i;
      let escaped = false;
      for (i++; i < bytes.length && bytes[i] !== 0x22; i++) {
        if (bytes[i] === 0x5c) {
          escaped = true;
          i++; // a backslash escapes the next byte
        }
      }
      const keys = frames.at(-1);
      if (expectKey && keys) {
        expectKey = false;
        let key: string;
        try {
          // (Most keys have no escapes: their bytes are the key.)
          key = escaped ? (JSON.parse(text.toString("utf8", start, i + 1)) as string) : text.toString("utf8", start + 1, i);
        } catch {
          continue; // not JSON: the parser says so
        }
        if (keys.has(key)) {
          throw Object.assign(new HttpError(400, "duplicate_key", `${what} has the key ${JSON.stringify(key.slice(0, 50))} twice in one object`), { type: "entity.verify.failed" });
        }
        keys.add(key);
      }
    } else if (b === 0x5b || b === 0x7b) {
      frames.push(b === 0x7b ? new Set() : null);
      expectKey = b === 0x7b;
      if (frames.length > MAX_NESTING) {
        throw Object.assign(new HttpError(400, "json_too_deep", `${what} nests arrays and objects more than ${MAX_NESTING} levels deep`), { type: "entity.verify.failed" });
      }
    } else if (b === 0x5d || b === 0x7d) {
      frames.pop();
      expectKey = false;
    } else if (b === 0x2c) {
      expectKey = frames.at(-1) != null;
    }
  }
}

const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;
const wellFormed = (text: string): boolean => !LONE_SURROGATE.test(text);

/** Text holding a lone surrogate (a JSON escape such as "\ud800") cannot be stored as UTF-8. */
function assertWellFormed(value: unknown, path: string): void {
  if (typeof value === "string") {
    if (!wellFormed(value)) throw new HttpError(400, "invalid_utf8", `the JSON body has text that is not valid Unicode at ${path} (a lone surrogate such as \\ud800)`);
  } else if (Array.isArray(value)) {
    value.forEach((v, i) => assertWellFormed(v, `${path}[${i}]`));
  } else if (value !== null && typeof value === "object") {
    for (const [k, v] of Object.entries(value)) {
      if (!wellFormed(k)) throw new HttpError(400, "invalid_utf8", `the JSON body has a key that is not valid Unicode at ${path}`);
      assertWellFormed(v, `${path}.${k}`);
    }
  }
}

/**
 * Parses JSON bodies (strict UTF-8, no lone surrogates; a charset other than UTF-8
 * is 415, as RFC 8259 has JSON travel as UTF-8). With `only: true`, a body of any other type is refused with 415,
 * except on the paths in `otherTypes` (their routes parse their own type).
 */
export function jsonBody(opts: { limit: string; only?: boolean; otherTypes?: RegExp; reviver?: (key: string, value: unknown) => unknown }) {
  const parse = express.json({
    limit: opts.limit,
    reviver: opts.reviver,
    type: JSON_TYPES,
    verify: (_req, _res, buf) => {
      assertUtf8(buf, "the JSON body");
      assertJsonShape(buf, "the JSON body");
    },
  });
  return (req: Request, res: Response, next: NextFunction): void => {
    if (opts.only && hasBody(req) && !req.is(JSON_TYPES) && !opts.otherTypes?.test(req.path)) {
      next(new HttpError(415, "unsupported_media_type", `send the body as JSON (content-type: application/json), not ${req.headers["content-type"] ?? "without a content-type"}`));
      return;
    }
    const charset = declaredCharset(req);
    if (charset !== undefined && req.is(JSON_TYPES) && !/^utf-?8$/i.test(charset)) {
      next(new HttpError(415, "unsupported_charset", `JSON must be sent as UTF-8 (got charset ${JSON.stringify(charset)})`));
      return;
    }
    parse(req, res, (error?: unknown) => {
      if (error) return next(error);
      try {
        if (req.body !== undefined) assertWellFormed(req.body, "$");
      } catch (e) {
        return next(e);
      }
      next();
    });
  };
}
