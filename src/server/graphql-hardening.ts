// Limits on what one GraphQL operation may ask for, and what production hides.
// - Aliases, depth and estimated cost are checked while the document is validated,
//   by GraphQL Armor's rules (maintained by Escape), so an oversized operation is
//   refused with a clear, coded error before any planning or SQL. Grafast's own
//   `maxPlanningDepth` is a last-resort guard that expects validation to do this.
// - "Did you mean …?" suggestions: graphql-js' rules ask the validation context
//   whether to hide them; errors after validation (variables) are trimmed in maskError.
// - Introspection by anonymous requests is refused at execution time, because
//   validation results are cached per document for every caller alike.
// - Page sizes: Armor's cost rule sees only literal `first:`/`last:` values, so a page
//   size in a variable, or none at all (PostGraphile then returns every row), escaped
//   the cost limit. At execution, with the variables known, every `first`/`last` must
//   be at most GRAPHQL_MAX_PAGE_SIZE (`page_too_large`); a field taking them that gets
//   neither is given `first: GRAPHQL_DEFAULT_PAGE_SIZE`; and the cost is estimated
//   again over the document with those values written in (`query_too_costly`).
import { costLimitRule } from "@escape.tech/graphql-armor-cost-limit";
import { maxAliasesRule } from "@escape.tech/graphql-armor-max-aliases";
import { maxDepthRule } from "@escape.tech/graphql-armor-max-depth";
import {
  type ArgumentNode, type DocumentNode, type FieldNode, GraphQLError, type GraphQLSchema, Kind, TypeInfo, validate, visit,
  visitWithTypeInfo, type ValidationContext, type ValidationRule, type ValueNode,
} from "postgraphile/graphql";
import { SafeError } from "postgraphile/grafast";
import type { HttpOptions } from "../config.ts";
import { ExactNumber } from "../exact-json.ts";
import { isCanonicalBigint } from "../rest/params.ts";
import { MAX_NESTING } from "./body.ts";

type Limits = HttpOptions["graphqlLimits"];

/** Armor reports "… limit of N exceeded, found M."; the numbers make our message. */
function limitError(code: string, describe: (limit: string, found: string) => string) {
  return (context: ValidationContext | null, error: GraphQLError): void => {
    if (!context) throw error;
    const m = /of (\d+(?:\.\d+)?) exceeded, found (\d+(?:\.\d+)?)/.exec(error.message);
    const found = m ? String(Math.round(Number(m[2]))) : "more";
    context.reportError(new GraphQLError(describe(m?.[1] ?? "the limit", found), { extensions: { code } }));
  };
}

function costRule(limits: Limits): ValidationRule {
  return costLimitRule({
    exposeLimits: true,
    propagateOnRejection: false,
    maxCost: limits.maxCost,
    onReject: [limitError("query_too_costly", (n, found) =>
      `the estimated cost of this operation is ${found}, above the limit of ${n}: ask for fewer items (first: …) or fewer nested lists`)],
  }) as unknown as ValidationRule;
}

export function limitRules(limits: Limits): ValidationRule[] {
  const common = { exposeLimits: true, propagateOnRejection: false } as const;
  return [
    maxAliasesRule({
      ...common,
      n: limits.maxAliases,
      onReject: [limitError("too_many_aliases", (n, found) => `at most ${n} aliases are allowed in one operation; found ${found}`)],
    }) as unknown as ValidationRule,
    maxDepthRule({
      ...common,
      n: limits.maxDepth,
      onReject: [limitError("query_too_deep", (n, found) => `operations may have a depth of at most ${n}; found ${found}`)],
    }) as unknown as ValidationRule,
    costRule(limits),
  ];
}

const PAGE_ARGS = new Set(["first", "last"]);
const intValue = (n: number): ValueNode => ({ kind: Kind.INT, value: String(n) });
const pageArgument = (name: string, n: number): ArgumentNode => ({ kind: Kind.ARGUMENT, name: { kind: Kind.NAME, value: name }, value: intValue(n) });

/**
 * The document as it will run and as its cost is estimated, with the request's
 * variables: `first`/`last` variables written in as literals (for the estimate), and
 * `first: <default>` added where a field taking them gets neither (for both).
 */
function pagedDocuments(schema: GraphQLSchema, document: DocumentNode, variables: Record<string, unknown>, limits: Limits):
  { run: DocumentNode; estimate: DocumentNode; perRequest: boolean; tooLarge?: string } {
  const defaults = new Map<string, unknown>();
  for (const def of document.definitions) {
    if (def.kind !== Kind.OPERATION_DEFINITION) continue;
    for (const v of def.variableDefinitions ?? []) {
      if (v.defaultValue?.kind === Kind.INT) defaults.set(v.variable.name.value, Number(v.defaultValue.value));
    }
  }
  const valueOf = (node: ValueNode): number | null | undefined => {
    if (node.kind === Kind.INT) return Number(node.value);
    if (node.kind === Kind.NULL) return null;
    if (node.kind === Kind.VARIABLE) {
      const name = node.name.value;
      const v = Object.hasOwn(variables, name) ? variables[name] : defaults.get(name);
      return typeof v === "number" ? v : v === null || v === undefined ? null : undefined;
    }
    return undefined;
  };
  let tooLarge: string | undefined;
  let perRequest = false;
  const typeInfo = new TypeInfo(schema);
  const rewrite = (forEstimate: boolean) => visit(document, visitWithTypeInfo(typeInfo, {
    [Kind.FIELD]: {
      enter(node: FieldNode) {
        const def = typeInfo.getFieldDef();
        if (!def || !def.args.some((a) => PAGE_ARGS.has(a.name))) return undefined;
        const args: ArgumentNode[] = [];
        let given = false;
        for (const arg of node.arguments ?? []) {
          if (!PAGE_ARGS.has(arg.name.value)) {
            args.push(arg);
            continue;
          }
          const n = valueOf(arg.value);
          if (typeof n === "number" && n > limits.maxPageSize) {
            tooLarge ??= `${arg.name.value} may be at most ${limits.maxPageSize} (got ${n}); ask for the next page with after: …`;
          }
          if (n === null) {
            // A null page size (a variable left out) would return every row.
            if (!forEstimate) perRequest = true;
            continue;
          }
          given = true;
          args.push(forEstimate && typeof n === "number" ? pageArgument(arg.name.value, n) : arg);
        }
        if (!given) args.push(pageArgument("first", limits.defaultPageSize));
        if (!forEstimate && args.length === (node.arguments ?? []).length && args.every((a, i) => a === node.arguments![i])) return undefined;
        return { ...node, arguments: args };
      },
    },
  }));
  const run = rewrite(false);
  const estimate = rewrite(true);
  return { run, estimate, perRequest, tooLarge };
}

/** Applies the page limits to one operation: the document to run, or the errors to answer with. */
export function limitPages(schema: GraphQLSchema, document: DocumentNode, variables: Record<string, unknown> | null | undefined, limits: Limits,
  cache: WeakMap<DocumentNode, DocumentNode>): { document: DocumentNode } | { errors: GraphQLError[] } {
  const paged = pagedDocuments(schema, document, variables ?? {}, limits);
  if (paged.tooLarge) return { errors: [new GraphQLError(paged.tooLarge, { extensions: { code: "page_too_large" } })] };
  const errors = validate(schema, paged.estimate, [costRule(limits)]);
  if (errors.length) return { errors: [...errors] };
  if (paged.perRequest) return { document: paged.run };
  // The same rewritten document for every request of this document, so plans are reused.
  let run = cache.get(document);
  if (!run) cache.set(document, (run = paged.run));
  return { document: run };
}

/** The same rule, told by its context to leave "Did you mean …?" out of its errors. */
export function withoutSuggestions(rule: ValidationRule): ValidationRule {
  return (context) => rule(Object.create(context, { hideSuggestions: { value: true } }) as ValidationContext);
}

export const stripSuggestions = (message: string): string => message.replace(/\s*Did you mean [^?]*\?/g, "");

export function usesIntrospection(document: import("postgraphile/graphql").DocumentNode): boolean {
  let found = false;
  visit(document, {
    [Kind.FIELD](node) {
      if (node.name.value === "__schema" || node.name.value === "__type") found = true;
    },
  });
  return found;
}

/** How deeply a GraphQL document nests braces, brackets and parentheses (strings,
 *  block strings and comments skipped), counted without recursion: graphql-js'
 *  recursive parser overflows the stack on a list literal a few thousand deep. */
export function nestingDepth(text: string, limit: number): number {
  let depth = 0;
  let max = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x23) {
      // # comment, to the end of the line
      while (i < text.length && text.charCodeAt(i) !== 0x0a && text.charCodeAt(i) !== 0x0d) i++;
    } else if (c === 0x22) {
      if (text.startsWith('"""', i)) {
        // block string: ends at """ not preceded by a backslash
        i += 3;
        while (i < text.length && !text.startsWith('"""', i)) i += text.startsWith('\\"""', i) ? 4 : 1;
        i += 2;
      } else {
        i++;
        while (i < text.length && text.charCodeAt(i) !== 0x22 && text.charCodeAt(i) !== 0x0a) i += text.charCodeAt(i) === 0x5c ? 2 : 1;
      }
    } else if (c === 0x7b || c === 0x5b || c === 0x28) {
      if (++depth > max) max = depth;
      if (max > limit) return max;
    } else if (c === 0x7d || c === 0x5d || c === 0x29) depth--;
  }
  return max;
}

const invalidBigint = (shown: string) =>
  new GraphQLError(`a BigInt must be an integer from -9223372036854775808 to 9223372036854775807 written with digits only (no spaces, "+" or leading zeros); got ${shown.slice(0, 50)}`, {
    extensions: { code: "invalid_bigint" },
  });

/** A BigInt input as the canonical text REST ids use (isCanonicalBigint): a string, a JSON
 *  integer, or a wide JSON integer kept exact (ExactNumber). */
export function parseBigintInput(value: unknown): string {
  const text = typeof value === "string" ? value
    : typeof value === "number" && Number.isSafeInteger(value) ? String(value)
    : value instanceof ExactNumber ? value.text
    : undefined;
  if (text === undefined || !isCanonicalBigint(text)) throw invalidBigint(typeof value === "string" ? JSON.stringify(value) : String(value));
  return text;
}

/** A refusal grafserv answers itself, before parsing (HTTP status 400; the status stays out of the JSON). */
function refusal(message: string, code: string): SafeError {
  const extensions: Record<string, unknown> = { code };
  Object.defineProperty(extensions, "statusCode", { value: 400, enumerable: false });
  return new SafeError(message, extensions);
}

export function makeHardeningPlugin(opts: { http: HttpOptions; anonymousRole: string }): GraphileConfig.Plugin {
  const { http } = opts;
  const runDocuments = new WeakMap<DocumentNode, DocumentNode>();
  return {
    name: "SnapbaseHardeningPlugin",
    version: "1.0.0",
    grafserv: {
      middleware: {
        processGraphQLRequestBody(next, event) {
          const query = (event.body as { query?: unknown }).query;
          if (typeof query === "string" && nestingDepth(query, MAX_NESTING) > MAX_NESTING) {
            throw refusal(`the GraphQL document nests braces, brackets and parentheses more than ${MAX_NESTING} levels deep`, "query_too_deep");
          }
          return next();
        },
        setPreset(next, event) {
          const rules = [...event.validationRules, ...limitRules(http.graphqlLimits)];
          event.validationRules.splice(0, event.validationRules.length, ...(http.suggestions ? rules : rules.map(withoutSuggestions)));
          return next();
        },
      },
    },
    schema: {
      hooks: {
        // BigInt arguments: PostgreSQL's int8 input would take " 1" and "+1"; REST refuses them, and so does GraphQL.
        GraphQLScalarType(config, build) {
          if (config.name !== build.inflection.builtin("BigInt")) return config;
          return {
            ...config,
            parseValue: parseBigintInput,
            parseLiteral(ast) {
              // (As before: a literal BigInt is a string, "5", not 5.)
              if (ast.kind === Kind.STRING) return parseBigintInput(ast.value);
              throw invalidBigint(`a literal of kind ${ast.kind} (write it as a string)`);
            },
          };
        },
      },
    },
    grafast: {
      middleware: {
        execute(next, event) {
          const { args } = event;
          const paged = limitPages(args.schema, args.document, args.variableValues as Record<string, unknown> | undefined, http.graphqlLimits, runDocuments);
          if ("errors" in paged) return { errors: paged.errors };
          args.document = paged.document;
          if (!http.publicIntrospection && (args.contextValue as Grafast.Context | undefined)?.pgSettings?.role === opts.anonymousRole &&
            usesIntrospection(args.document)) {
            return {
              errors: [new GraphQLError("introspection needs a signed-in user here (GRAPHQL_PUBLIC_INTROSPECTION is off)", {
                extensions: { code: "introspection_disabled" },
              })],
            };
          }
          return next();
        },
      },
    },
  };
}
