// CSV type inference for rows streaming through the server: an import's upload and
// the files the csv connector downloads. The rules are not here: they are the rows
// of snapbase_private.csv_type_rules() (see migrations/current/600-csv.sql), which
// SQL applies to rows already in the database. This only interprets them, exactly as
// SQL does (test/csv-types.test.ts compares the two), so a file gets the same types
// whichever way it arrives.
//
// A rule: a cell fits the type when it matches `pattern` (a regular expression both
// PostgreSQL and JavaScript read alike), then, where given, its number lies within
// [min, max] and its first ten characters are a day that exists. Empty cells decide
// nothing. Types of one chain (integer < bigint < numeric, date < timestamp) are
// ordered narrowest first, and a cell that fits one fits every wider one of its
// chain; no cell fits types of two chains. A column's kinds (a mask: bit `rank` per
// type) are the types all its non-empty cells fit; its type is the narrowest.
import type pg from "pg";

export interface CsvTypeRule {
  rank: number;
  type: string;
  pattern: string;
  min: string | null;
  max: string | null;
  dayFirst: boolean;
}

interface Compiled extends CsvTypeRule {
  regex: RegExp;
  minValue: bigint | null;
  maxValue: bigint | null;
  /** Integers this long or shorter lie within [min, max] whatever their digits (a fast path). */
  safeLength: number;
}

const LONG_MONTHS = new Set(["01", "03", "05", "07", "08", "10", "12"]);
const SHORT_MONTHS = new Set(["04", "06", "09", "11"]);
const LEAP_YY = new Set(Array.from({ length: 25 }, (_, i) => String(i * 4).padStart(2, "0")));

/** snapbase_private.csv_day_exists, comparison for comparison. */
export function dayExists(v: string): boolean {
  if (v.slice(0, 4) === "0000") return false;
  const month = v.slice(5, 7);
  const day = v.slice(8, 10);
  if (LONG_MONTHS.has(month)) return day >= "01" && day <= "31";
  if (SHORT_MONTHS.has(month)) return day >= "01" && day <= "30";
  if (month !== "02") return false;
  const yy = v.slice(2, 4);
  const leap = (yy !== "00" && LEAP_YY.has(yy)) || (yy === "00" && LEAP_YY.has(v.slice(0, 2)));
  return day >= "01" && day <= (leap ? "29" : "28");
}

export class CsvTypeRules {
  private readonly rules: Compiled[];

  constructor(rules: CsvTypeRule[]) {
    this.rules = [...rules].sort((a, b) => a.rank - b.rank).map((r) => ({
      ...r,
      regex: new RegExp(r.pattern),
      minValue: r.min === null ? null : BigInt(r.min),
      maxValue: r.max === null ? null : BigInt(r.max),
      // e.g. 9 for integer: every integer of 9 digits (or 8 and a minus) is within range.
      safeLength: r.min === null || r.max === null ? 0 : Math.min(r.max.replace(/^-/, "").length, r.min.replace(/^-/, "").length) - 1,
    }));
    for (const [i, r] of this.rules.entries()) {
      if (r.rank !== i || i > 30) throw new Error(`CSV type rules: ranks must be 0, 1, 2, … (got ${r.rank} for ${r.type})`);
    }
  }

  /** The rules as snapbase_private.csv_type_rules() gives them. */
  static async load(db: pg.ClientBase | pg.Pool): Promise<CsvTypeRules> {
    const { rows } = await db.query<{ rank: number; type: string; pattern: string; min_value: string | null; max_value: string | null; day_first: boolean }>(
      "select rank, type, pattern, min_value::text, max_value::text, day_first from snapbase_private.csv_type_rules() order by rank");
    return new CsvTypeRules(rows.map((r) => ({ rank: r.rank, type: r.type, pattern: r.pattern, min: r.min_value, max: r.max_value, dayFirst: r.day_first })));
  }

  /** Whether a non-empty cell fits the rule of rank `rank`. */
  fits(v: string, rank: number): boolean {
    const r = this.rules[rank]!;
    if (!r.regex.test(v)) return false;
    if (r.minValue !== null && r.maxValue !== null && v.length > r.safeLength) {
      // The pattern matched, so the cell is an integer.
      const n = BigInt(v);
      if (n < r.minValue || n > r.maxValue) return false;
    }
    return !r.dayFirst || dayExists(v);
  }

  /** The types a cell fits, as a mask (snapbase_private.csv_value_kinds); null for an empty cell. */
  kinds(v: string): number | null {
    if (v === "") return null;
    let mask = 0;
    for (const r of this.rules) if (this.fits(v, r.rank)) mask |= 1 << r.rank;
    return mask;
  }

  /** The narrowest type of a kinds mask, or text (snapbase_private.csv_kinds_type). */
  type(kinds: number | null): string {
    if (kinds === null) return "text";
    for (const r of this.rules) if (kinds & (1 << r.rank)) return r.type;
    return "text";
  }

  /** A tally of the kinds of `width` columns, fed row by row. */
  columns(width: number): CsvColumnKinds {
    return new CsvColumnKinds(this, width);
  }
}

/**
 * The kinds of each column over every row added: per column, the types all its
 * non-empty cells fit (null while it has had none). A column's mask lies within one
 * chain, so a cell is tested against the narrowest type left and, when it fits, keeps
 * that one and the wider ones: one test per cell once a column is settled.
 */
export class CsvColumnKinds {
  private readonly rules: CsvTypeRules;
  private readonly masks: (number | null)[];

  constructor(rules: CsvTypeRules, width: number) {
    this.rules = rules;
    this.masks = Array.from({ length: width }, () => null);
  }

  add(cells: readonly string[]): void {
    const masks = this.masks;
    for (let i = 0; i < masks.length; i++) {
      const v = cells[i];
      if (v === undefined || v === "") continue;
      const mask = masks[i]!;
      if (mask === 0) continue; // text: nothing left to learn
      if (mask === null) {
        masks[i] = this.rules.kinds(v);
        continue;
      }
      let next = 0;
      for (let rank = 31 - Math.clz32(mask & -mask), left = mask; left !== 0; left &= ~(1 << rank), rank = 31 - Math.clz32(left & -left)) {
        if (this.rules.fits(v, rank)) {
          next = mask & ~((1 << rank) - 1);
          break;
        }
      }
      masks[i] = next;
    }
  }

  /** Each column's kinds mask (null: no value), as snapbase_private.csv_column_kinds gives it. */
  kinds(): (number | null)[] {
    return [...this.masks];
  }

  /** Each column's inferred type. */
  types(): string[] {
    return this.masks.map((m) => this.rules.type(m));
  }
}
