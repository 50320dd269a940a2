// What a preview shows of each cell: enough to recognise it, never a whole 50 MB field.
// Applied where the REST and GraphQL answers are produced.
import { lambda, type ExecutableStep } from "postgraphile/grafast";
import { wrapPlans } from "postgraphile/utils";

/** Characters a preview shows of one text value. */
export const PREVIEW_CELL_CHARS = 1000;

/** The value with every string longer than `max` characters cut to `max` and marked
 *  "…[N characters]" (N: the full length); objects get "truncated_cells": count. */
export function capStrings<T>(value: T, max = PREVIEW_CELL_CHARS): T {
  let cut = 0;
  // Already cut (by the database, or an earlier pass): kept as it is.
  const alreadyCut = new RegExp(`^[\\s\\S]{0,${max}}…\\[\\d+ characters\\]$`);
  const walk = (v: unknown): unknown => {
    if (typeof v === "string") {
      if (v.length <= max) return v;
      if (v.length <= max + 40 && alreadyCut.test(v)) {
        cut++;
        return v;
      }
      cut++;
      // Never split a surrogate pair.
      const end = /[\ud800-\udbff]/.test(v[max - 1] ?? "") ? max - 1 : max;
      return `${v.slice(0, end)}…[${v.length} characters]`;
    }
    if (Array.isArray(v)) return v.map(walk);
    if (v !== null && typeof v === "object") return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, walk(x)]));
    return v;
  };
  const result = walk(value);
  if (cut > 0 && result !== null && typeof result === "object" && !Array.isArray(result)) {
    (result as Record<string, unknown>).truncated_cells = cut;
  }
  return result as T;
}

/** csvImportPreview in GraphQL: the same cap as the REST upload's preview. */
export const PreviewCapPlugin = wrapPlans({
  Query: {
    csvImportPreview: (plan) => lambda(plan() as ExecutableStep, (preview) => capStrings(preview)),
  },
});
