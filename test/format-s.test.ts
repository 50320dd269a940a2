// No SQL function pastes user text into SQL with format('%s'): every %s whose
// argument names a parameter (of a type whose text could carry SQL) must be listed
// in format-s-allowlist.json with the reason it is safe. A new use fails here
// until someone writes that reason; a listed use that no longer exists must go.
import { readFileSync } from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { projectRoot } from "../src/db/migrate.ts";
import { formatUses } from "./format-uses.ts";
import { owner } from "./helpers.ts";

type Allowlist = Record<string, { reason: string; arguments: string[] }>;

describe("format('%s') in SQL functions", () => {
  it("takes no parameter-derived value unless listed with a reason", async () => {
    const { rows } = await owner().query(`
      select p.oid::regprocedure::text as fn, p.prosrc,
             coalesce((select jsonb_agg(jsonb_build_object('name', n, 'type', format_type(t, null)))
                         from unnest(p.proargnames, p.proargtypes::oid[]) u(n, t)), '[]') as params
        from pg_proc p
       where p.pronamespace::regnamespace::text in ('snapbase', 'snapbase_private', 'snapbase_sandbox')
       order by 1`);
    const found = rows.flatMap((r) => formatUses(r.fn, r.prosrc, r.params));
    const allow = JSON.parse(readFileSync(path.join(projectRoot, "test/format-s-allowlist.json"), "utf8")) as Allowlist;
    const unlisted = found.filter((u) => !allow[u.fn]?.arguments.includes(u.argument));
    expect(unlisted, "format('%s') takes a value derived from a parameter: use %I / %L, or list it with a reason").toEqual([]);
    const stale = Object.entries(allow).flatMap(([fn, e]) =>
      e.arguments.filter((a) => !found.some((u) => u.fn === fn && u.argument === a)).map((argument) => ({ fn, argument })));
    expect(stale, "listed uses that no longer exist").toEqual([]);
    for (const [fn, e] of Object.entries(allow)) expect(e.reason.length, `a reason for ${fn}`).toBeGreaterThan(20);
  });
});
