// Finds format() calls in SQL function bodies whose %s placeholder takes an
// expression naming one of the function's parameters: the classic way user text
// reaches SQL. (%I quotes identifiers and %L literals; %s pastes text as it is.)

export interface FormatUse {
  fn: string;
  /** The argument expression %s receives, whitespace-normalised. */
  argument: string;
}

/** The end index (exclusive) of the string/quoted token starting at i, or i when none starts there. */
function skipQuoted(src: string, i: number): number {
  const c = src[i];
  if (c === "'" || ((c === "E" || c === "e") && src[i + 1] === "'")) {
    const backslashes = c !== "'";
    let j = backslashes ? i + 2 : i + 1;
    while (j < src.length) {
      if (backslashes && src[j] === "\\") j += 2;
      else if (src[j] === "'" && src[j + 1] === "'") j += 2;
      else if (src[j] === "'") return j + 1;
      else j++;
    }
    return j;
  }
  if (c === '"') {
    const end = src.indexOf('"', i + 1);
    return end < 0 ? src.length : end + 1;
  }
  if (c === "$") {
    const m = /^\$([A-Za-z_][A-Za-z_0-9]*)?\$/.exec(src.slice(i));
    if (m) {
      const end = src.indexOf(m[0], i + m[0].length);
      return end < 0 ? src.length : end + m[0].length;
    }
  }
  if (c === "-" && src[i + 1] === "-") {
    const end = src.indexOf("\n", i);
    return end < 0 ? src.length : end;
  }
  return i;
}

/** The top-level arguments of the call whose "(" is at `open`. */
function callArguments(src: string, open: number): string[] {
  const args: string[] = [];
  let depth = 0;
  let start = open + 1;
  for (let i = open; i < src.length; ) {
    const skipped = skipQuoted(src, i);
    if (skipped !== i) {
      i = skipped;
      continue;
    }
    const c = src[i];
    if (c === "(" || c === "[") depth++;
    else if (c === ")" || c === "]") {
      depth--;
      if (depth === 0) {
        args.push(src.slice(start, i));
        return args;
      }
    } else if (c === "," && depth === 1) {
      args.push(src.slice(start, i));
      start = i + 1;
    }
    i++;
  }
  return args;
}

/** The text of a string literal (plain, E'' or dollar-quoted), or null. */
function literalText(expr: string): string | null {
  const e = expr.trim();
  let m = /^\$([A-Za-z_][A-Za-z_0-9]*)?\$([\s\S]*)\$\1\$$/.exec(e);
  if (m) return m[2]!;
  m = /^[Ee]'([\s\S]*)'$/.exec(e);
  if (m) return m[1]!.replace(/''/g, "'").replace(/\\(.)/g, "$1");
  m = /^'([\s\S]*)'$/.exec(e);
  if (m) return m[1]!.replace(/''/g, "'");
  return null;
}

/** Indexes (0-based, into the arguments after the format string) of the %s placeholders. */
function sPlaceholders(fmt: string): number[] {
  const found: number[] = [];
  let next = 0;
  const spec = /%(?:(\d+)\$)?-?(?:\*(?:\d+\$)?|\d+)?([sIL%])/g;
  for (let m = spec.exec(fmt); m; m = spec.exec(fmt)) {
    if (m[2] === "%") continue;
    const index = m[1] ? Number(m[1]) - 1 : next;
    next = index + 1;
    if (m[2] === "s") found.push(index);
  }
  return found;
}

/** Parameter types whose text form cannot carry SQL: numbers, booleans, and reg*
 *  values (which print as quoted identifiers). */
const INERT_TYPES = /^(bigint|integer|smallint|boolean|numeric|oid|regclass|regtype|regprocedure|inet|timestamp with time zone|interval)$/;

/** Calls whose result is safe to paste whatever their input: they quote, or resolve
 *  to catalog spellings. */
const SANITIZERS = /^(pg_catalog\.)?(quote_ident|quote_literal|quote_nullable|format_type|snapbase_private\.resolve_type|snapbase_private\.check_column_spec|snapbase_private\.table_rel|snapbase_private\.filter_clause)\s*\(/i;

const wordsOf = (expr: string) => expr.toLowerCase().match(/(?<![.'"A-Za-z0-9_$])[a-z_][a-z0-9_]*/g) ?? [];

/** Parameter names, plus local variables assigned from them (`x type := …`, `x := …`),
 *  unless the assignment passes them through a sanitizer. */
function taintedNames(source: string, parameters: string[]): string[] {
  const tainted = new Set(parameters);
  const assignments = [...source.matchAll(/(?:^|[;\n]|declare)\s*([A-Za-z_][A-Za-z0-9_]*)(?:\s+[A-Za-z_][\w. \[\]()]*?)?\s*:=\s*([^;]+);/gi)]
    .map((m) => ({ name: m[1]!.toLowerCase(), expr: m[2]!.trim() }));
  for (let changed = true; changed; ) {
    changed = false;
    for (const a of assignments) {
      if (tainted.has(a.name) || SANITIZERS.test(a.expr)) continue;
      if (wordsOf(a.expr).some((w) => tainted.has(w))) {
        tainted.add(a.name);
        changed = true;
      }
    }
  }
  return [...tainted];
}

export function formatUses(fn: string, source: string, parameters: { name: string; type: string }[]): FormatUse[] {
  const uses: FormatUse[] = [];
  const names = taintedNames(source, parameters.filter((p) => p.name && !INERT_TYPES.test(p.type)).map((p) => p.name.toLowerCase()));
  const call = /(?<![A-Za-z0-9_.])format\s*\(/gi;
  for (let m = call.exec(source); m; m = call.exec(source)) {
    const args = callArguments(source, m.index + m[0].length - 1);
    const fmt = args[0] === undefined ? null : literalText(args[0]);
    if (fmt === null) continue;
    for (const index of sPlaceholders(fmt)) {
      const argument = args[index + 1];
      if (argument === undefined) continue;
      if (wordsOf(argument).some((w) => names.includes(w))) uses.push({ fn, argument: argument.replace(/\s+/g, " ").trim() });
    }
  }
  return uses;
}
