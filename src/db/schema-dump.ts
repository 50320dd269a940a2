// The readable schema: the current definition of every schema object of Snapbase
// (schemas snapbase, snapbase_private, snapbase_sandbox), one file per capability
// under schema/, generated from the catalogs of a migrated database. It is written
// with SQL alone (pg_get_functiondef, pg_get_constraintdef, pg_get_indexdef,
// pg_get_triggerdef, pg_policy, format_type, aclexplode, obj_description), not
// pg_dump, so it works against any server, the embedded one included, and reads
// the same on PostgreSQL 15 to 17.
//
// Which file an object goes to is written down in schema/capabilities.json: a new
// object that is not listed there, or a listed one that no longer exists, stops the
// dump with a message saying so. Tables take their columns, constraints, indexes,
// row-level security, policies, triggers, grants and comments with them; functions
// their grants and comments. Role names appear as the migrations' placeholders
// (:ROLE_VIEWER …), so the dump is the same whatever the role prefix.
import { readdirSync, readFileSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import path from "node:path";
import type pg from "pg";
import type { RoleNames } from "../config.ts";
import { log } from "../log.ts";
import { bootstrapCluster } from "./bootstrap.ts";
import { projectRoot, rolePlaceholders, runMigrations, type MigrationTarget } from "./migrate.ts";
import { withClient } from "./pools.ts";
import { databaseName, withUrlParts } from "./urls.ts";

export const schemaFolder = path.join(projectRoot, "schema");
export const capabilitiesFile = path.join(schemaFolder, "capabilities.json");
export const dumpedSchemas = ["snapbase", "snapbase_private", "snapbase_sandbox"];
const DUMP_COMMAND = "npm run schema:dump";

export interface Capability {
  /** The file's title, e.g. "Auth and tokens". */
  title: string;
  /** One line on what the capability covers. */
  about: string;
  /** Schemas, and schema-qualified names of tables, views, types, sequences and functions (all overloads). */
  objects: string[];
}

export interface CapabilityMap {
  /** File name (without .sql) → capability. */
  capabilities: Record<string, Capability>;
  /** Objects that functions create at run time (one per snapshot row layout, …): never dumped. */
  runtime: { about: string; patterns: string[] };
}

export function loadCapabilities(file = capabilitiesFile): CapabilityMap {
  return JSON.parse(readFileSync(file, "utf8")) as CapabilityMap;
}

/** The dump cannot be written: objects the mapping does not place, or places twice, or no longer finds. */
export class SchemaMappingError extends Error {
  readonly problems: string[];
  constructor(problems: string[]) {
    super(`${path.relative(projectRoot, capabilitiesFile)} does not match the database:\n  - ${problems.join("\n  - ")}`);
    this.name = "SchemaMappingError";
    this.problems = problems;
  }
}

// --- Reading the catalogs --------------------------------------------------------

interface AclEntry {
  grantee: string; // a role name, or "public"
  privilege: string;
  grantable: boolean;
}

/** SQL for the entries of an ACL (its kind's default when null: `kind` is acldefault's
 *  letter, as SQL), without the object owner's own rights, as JSON AclEntry[]. */
const aclJson = (acl: string, kind: string, owner: string) => `coalesce((
    select json_agg(json_build_object('grantee', case when a.grantee = 0 then 'public' else pg_get_userbyid(a.grantee) end,
                                      'privilege', lower(a.privilege_type), 'grantable', a.is_grantable)
                    order by case when a.grantee = 0 then '' else pg_get_userbyid(a.grantee)::text end collate "C", a.privilege_type)
      from aclexplode(coalesce(${acl}, acldefault(${kind}, ${owner}))) a
     where a.grantee <> ${owner}), '[]'::json)`;

const ownerName = (owner: string) => `pg_get_userbyid(${owner})`;

interface SchemaRow { name: string; ident: string; owner: string; comment: string | null; acl: AclEntry[] }
interface ExtensionRow { name: string; schema: string }
interface DefaultAclRow { role: string; schema: string | null; objtype: string; acl: AclEntry[]; defaults: AclEntry[] }
interface TypeRow { key: string; name: string; kind: string; owner: string; comment: string | null; acl: AclEntry[]; labels: string[] | null; attributes: { name: string; type: string }[] | null; domain: { base: string; notnull: boolean; default: string | null; checks: string[] } | null }
interface SequenceRow { key: string; name: string; owner: string; type: string; start: string; increment: string; min: string; max: string; cache: string; cycle: boolean; comment: string | null; acl: AclEntry[] }
// (A column's compression is left out: the migrations ask for lz4 where the server
// has it, so it depends on how the server was built, not on the schema.)
interface ColumnRow { name: string; type: string; notnull: boolean; default: string | null; identity: string; generated: string; comment: string | null; acl: AclEntry[] }
interface TableRow {
  key: string; name: string; kind: string; owner: string; persistence: string; rls: boolean; forceRls: boolean; comment: string | null; acl: AclEntry[];
  columns: ColumnRow[]; constraints: { name: string; def: string; comment: string | null }[]; indexes: { name: string; def: string; comment: string | null }[];
  policies: { name: string; permissive: boolean; cmd: string; roles: string[]; qual: string | null; check: string | null }[];
  triggers: { name: string; def: string; enabled: string; comment: string | null }[];
  sequences: { name: string; acl: AclEntry[] }[]; viewdef: string | null; options: string[] | null;
}
interface FunctionRow { key: string; signature: string; kind: string; owner: string; def: string | null; comment: string | null; acl: AclEntry[]; triggers: string[] }

async function readCatalogs(client: pg.ClientBase, runtime: RegExp[]) {
  const schemas = dumpedSchemas;
  // The owner of everything: the owner of schema snapbase.
  const { rows: [{ owner: dbOwner }] } = await client.query<{ owner: string }>(
    "select pg_get_userbyid(nspowner) as owner from pg_namespace where nspname = 'snapbase'");
  if (!dbOwner) throw new Error("schema snapbase does not exist: is the database migrated?");

  const schemaRows = (await client.query<SchemaRow>(`
    select n.nspname as name, quote_ident(n.nspname) as ident, ${ownerName("n.nspowner")} as owner,
           obj_description(n.oid, 'pg_namespace') as comment, ${aclJson("n.nspacl", "'n'", "n.nspowner")} as acl
      from pg_namespace n where n.nspname = any($1) order by n.nspname collate "C"`, [schemas])).rows;

  const extensions = (await client.query<ExtensionRow>(`
    select quote_ident(e.extname) as name, quote_ident(n.nspname) as schema
      from pg_extension e join pg_namespace n on n.oid = e.extnamespace
     where e.extname <> 'plpgsql' order by e.extname collate "C"`)).rows;

  // Default privileges of the owner: what differs from PostgreSQL's built-in defaults.
  const defaultAcls = (await client.query<DefaultAclRow>(`
    select pg_get_userbyid(d.defaclrole) as role, n.nspname as schema, d.defaclobjtype as objtype,
           ${aclJson("d.defaclacl", "case d.defaclobjtype when 'S' then 's' else d.defaclobjtype end", "d.defaclrole")} as acl,
           ${aclJson("null", "case d.defaclobjtype when 'S' then 's' else d.defaclobjtype end", "d.defaclrole")} as defaults
      from pg_default_acl d left join pg_namespace n on n.oid = d.defaclnamespace
     where d.defaclrole = (select nspowner from pg_namespace where nspname = 'snapbase')
     order by n.nspname collate "C" nulls first, d.defaclobjtype`)).rows;

  const extensionMember = (classid: string, oid: string) =>
    `exists (select 1 from pg_depend x where x.classid = '${classid}'::regclass and x.objid = ${oid} and x.deptype = 'e')`;

  const types = (await client.query<TypeRow>(`
    select n.nspname || '.' || t.typname as key, t.oid::regtype::text as name, t.typtype as kind, ${ownerName("t.typowner")} as owner,
           obj_description(t.oid, 'pg_type') as comment, ${aclJson("t.typacl", "'T'", "t.typowner")} as acl,
           (select json_agg(e.enumlabel order by e.enumsortorder) from pg_enum e where e.enumtypid = t.oid) as labels,
           (select json_agg(json_build_object('name', quote_ident(a.attname),
                     'type', format_type(a.atttypid, a.atttypmod) || case when a.attcollation <> 0 and a.attcollation <> (select typcollation from pg_type where oid = a.atttypid)
                                                                     then ' collate ' || a.attcollation::regcollation::text else '' end) order by a.attnum)
              from pg_attribute a where a.attrelid = t.typrelid and a.attnum > 0 and not a.attisdropped) as attributes,
           case when t.typtype = 'd' then json_build_object('base', format_type(t.typbasetype, t.typtypmod), 'notnull', t.typnotnull,
             'default', t.typdefault,
             'checks', coalesce((select json_agg('constraint ' || quote_ident(c.conname) || ' ' || pg_get_constraintdef(c.oid) order by c.conname collate "C")
                                   from pg_constraint c where c.contypid = t.oid), '[]')) end as domain
      from pg_type t join pg_namespace n on n.oid = t.typnamespace
     where n.nspname = any($1)
       and (t.typtype in ('e', 'd', 'r') or (t.typtype = 'c' and (select c.relkind from pg_class c where c.oid = t.typrelid) = 'c'))
       and not ${extensionMember("pg_type", "t.oid")}
     order by n.nspname collate "C", t.typname collate "C"`, [schemas])).rows;

  // Sequences not owned by a column (those come with their table).
  const sequences = (await client.query<SequenceRow>(`
    select n.nspname || '.' || c.relname as key, c.oid::regclass::text as name, ${ownerName("c.relowner")} as owner,
           format_type(s.seqtypid, null) as type, s.seqstart::text as start, s.seqincrement::text as increment,
           s.seqmin::text as min, s.seqmax::text as max, s.seqcache::text as cache, s.seqcycle as cycle,
           obj_description(c.oid, 'pg_class') as comment, ${aclJson("c.relacl", "'s'", "c.relowner")} as acl
      from pg_class c join pg_namespace n on n.oid = c.relnamespace join pg_sequence s on s.seqrelid = c.oid
     where n.nspname = any($1) and c.relkind = 'S'
       and not exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass and d.objid = c.oid
                                                  and d.refclassid = 'pg_class'::regclass and d.deptype in ('a', 'i'))
       and not ${extensionMember("pg_class", "c.oid")}
     order by n.nspname collate "C", c.relname collate "C"`, [schemas])).rows;

  const tables = (await client.query<TableRow>(`
    select n.nspname || '.' || c.relname as key, c.oid::regclass::text as name, c.relkind as kind, ${ownerName("c.relowner")} as owner,
           c.relpersistence as persistence, c.relrowsecurity as rls, c.relforcerowsecurity as "forceRls", c.reloptions as options,
           obj_description(c.oid, 'pg_class') as comment, ${aclJson("c.relacl", "'r'", "c.relowner")} as acl,
           case when c.relkind in ('v', 'm') then pg_get_viewdef(c.oid, true) end as viewdef,
           coalesce((select json_agg(json_build_object(
                      'name', quote_ident(a.attname),
                      'type', format_type(a.atttypid, a.atttypmod) || case when a.attcollation <> 0 and a.attcollation <> (select typcollation from pg_type where oid = a.atttypid)
                                                                      then ' collate ' || a.attcollation::regcollation::text else '' end,
                      'notnull', a.attnotnull, 'identity', a.attidentity, 'generated', a.attgenerated,
                      'default', pg_get_expr(d.adbin, d.adrelid),
                      'comment', col_description(c.oid, a.attnum),
                      'acl', coalesce((select json_agg(json_build_object('grantee', case when x.grantee = 0 then 'public' else pg_get_userbyid(x.grantee) end,
                                                                          'privilege', lower(x.privilege_type), 'grantable', x.is_grantable)
                                                        order by case when x.grantee = 0 then '' else pg_get_userbyid(x.grantee)::text end collate "C", x.privilege_type)
                                         from aclexplode(a.attacl) x where x.grantee <> c.relowner), '[]'))
                    order by a.attnum)
              from pg_attribute a left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
             where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped), '[]') as columns,
           coalesce((select json_agg(json_build_object('name', quote_ident(k.conname), 'def', pg_get_constraintdef(k.oid),
                                                       'comment', obj_description(k.oid, 'pg_constraint'))
                                     order by k.conname collate "C")
              from pg_constraint k where k.conrelid = c.oid and k.contype not in ('n', 't')), '[]') as constraints,
           coalesce((select json_agg(json_build_object('name', i.indexrelid::regclass::text, 'def', pg_get_indexdef(i.indexrelid),
                                                       'comment', obj_description(i.indexrelid, 'pg_class'))
                                     order by i.indexrelid::regclass::text collate "C")
              from pg_index i where i.indrelid = c.oid
               and not exists (select 1 from pg_constraint k where k.conindid = i.indexrelid and k.conrelid = c.oid)), '[]') as indexes,
           coalesce((select json_agg(json_build_object('name', quote_ident(p.polname), 'permissive', p.polpermissive, 'cmd', p.polcmd,
                                                       'roles', (select array_agg(case when r = 0 then 'public' else pg_get_userbyid(r) end)
                                                                   from unnest(p.polroles) r),
                                                       'qual', pg_get_expr(p.polqual, p.polrelid), 'check', pg_get_expr(p.polwithcheck, p.polrelid))
                                     order by p.polname collate "C")
              from pg_policy p where p.polrelid = c.oid), '[]') as policies,
           coalesce((select json_agg(json_build_object('name', quote_ident(g.tgname), 'def', pg_get_triggerdef(g.oid), 'enabled', g.tgenabled,
                                                       'comment', obj_description(g.oid, 'pg_trigger'))
                                     order by g.tgname collate "C")
              from pg_trigger g where g.tgrelid = c.oid and not g.tgisinternal), '[]') as triggers,
           coalesce((select json_agg(json_build_object('name', s.oid::regclass::text, 'acl', ${aclJson("s.relacl", "'s'", "s.relowner")})
                                     order by s.relname collate "C")
              from pg_depend d join pg_class s on s.oid = d.objid
             where d.classid = 'pg_class'::regclass and d.refclassid = 'pg_class'::regclass and d.refobjid = c.oid
               and d.deptype in ('a', 'i') and s.relkind = 'S'), '[]') as sequences
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where n.nspname = any($1) and c.relkind in ('r', 'p', 'v', 'm', 'f')
       and not ${extensionMember("pg_class", "c.oid")}
     order by n.nspname collate "C", c.relname collate "C"`, [schemas])).rows;

  const functions = (await client.query<FunctionRow>(`
    select n.nspname || '.' || p.proname as key, p.oid::regprocedure::text as signature, p.prokind as kind, ${ownerName("p.proowner")} as owner,
           case when p.prokind <> 'a' then pg_get_functiondef(p.oid) end as def,
           obj_description(p.oid, 'pg_proc') as comment, ${aclJson("p.proacl", "'f'", "p.proowner")} as acl,
           coalesce((select array_agg('trigger ' || quote_ident(g.tgname) || ' on ' || g.tgrelid::regclass::text order by g.tgrelid::regclass::text collate "C", g.tgname collate "C")
                       from pg_trigger g where g.tgfoid = p.oid and not g.tgisinternal), '{}') as triggers
      from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname = any($1) and not ${extensionMember("pg_proc", "p.oid")}
     order by n.nspname collate "C", p.proname collate "C", pg_get_function_identity_arguments(p.oid) collate "C"`, [schemas])).rows;

  // Generated once per installation by a migration, and written into a comment: not part of the schema's shape.
  const installationId = (await client.query<{ id: string | null }>(
    "select case when to_regclass('snapbase_private.settings') is not null then snapbase_private.setting('installation_id') end as id")).rows[0]?.id ?? null;

  const isRuntime = (key: string) => runtime.some((r) => r.test(key));
  return {
    dbOwner,
    installationId,
    schemas: schemaRows,
    extensions,
    defaultAcls,
    types: types.filter((t) => !isRuntime(t.key)),
    sequences: sequences.filter((s) => !isRuntime(s.key)),
    tables: tables.filter((t) => !isRuntime(t.key)),
    functions: functions.filter((f) => !isRuntime(f.key)),
  };
}

// --- Rendering -------------------------------------------------------------------

type Catalogs = Awaited<ReturnType<typeof readCatalogs>>;

const literal = (text: string) => `'${text.replace(/'/g, "''")}'`;
/** The schema of a schema.name key. */
const schemaOf = (key: string) => key.slice(0, key.indexOf("."));
/** An identifier as SQL writes it (quoted unless plainly lower-case; keywords are never schema names here). */
const quoteName = (name: string) => (/^[a-z_][a-z0-9_$]*$/.test(name) ? name : `"${name.replace(/"/g, '""')}"`);
/** Code-point order: the same on every server and locale. */
const compare = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);

class Renderer {
  private readonly roleNames: Map<string, string>;
  private readonly dbOwner: string;
  private readonly defaultAcls: DefaultAclRow[];

  constructor(roles: RoleNames, dbOwner: string, defaultAcls: DefaultAclRow[]) {
    this.dbOwner = dbOwner;
    this.defaultAcls = defaultAcls;
    // Real role name → the placeholder the migrations write.
    this.roleNames = new Map(Object.entries(rolePlaceholders(roles)).map(([placeholder, name]) => [name, placeholder]));
    this.roleNames.set(dbOwner, ":DATABASE_OWNER");
  }

  role(name: string): string {
    if (name === "public") return "public";
    const placeholder = this.roleNames.get(name);
    if (placeholder) return placeholder;
    return /^[a-z_][a-z0-9_$]*$/.test(name) ? name : `"${name.replace(/"/g, '""')}"`;
  }

  /** Role names written into SQL text (function bodies, policies) back to their placeholders. */
  placeholders(text: string): string {
    let out = text;
    for (const [name, placeholder] of [...this.roleNames].sort((a, b) => b[0].length - a[0].length)) {
      if (placeholder === ":DATABASE_OWNER") {
        // Mostly a grantee or an owner, rendered through role(); in SQL text only as a whole
        // string literal (registration_problems' ':DATABASE_OWNER'). Its name may be any word
        // (DATABASE_URL's user), so nothing else is replaced.
        out = out.replaceAll(`'${name.replace(/'/g, "''")}'`, `'${placeholder}'`);
        continue;
      }
      out = out.replace(new RegExp(`(?<![A-Za-z0-9_$])${name.replace(/[$]/g, "\\$")}(?![A-Za-z0-9_$])`, "g"), placeholder);
    }
    return out;
  }

  /**
   * What a new object of a kind gets in this database: PostgreSQL's built-in default
   * (PUBLIC may execute functions and use types) as the owner's default privileges
   * change it, for the whole database and then for the object's schema.
   */
  private creationDefault(objtype: "r" | "S" | "f" | "T" | "n", schema: string | null): AclEntry[] {
    const builtIn: Record<string, AclEntry[]> = { f: [{ grantee: "public", privilege: "execute", grantable: false }], T: [{ grantee: "public", privilege: "usage", grantable: false }] };
    const global = this.defaultAcls.find((d) => d.schema === null && d.objtype === objtype);
    const perSchema = schema === null ? undefined : this.defaultAcls.find((d) => d.schema === schema && d.objtype === objtype);
    return [...(global ? global.acl : builtIn[objtype] ?? []), ...(perSchema?.acl ?? [])];
  }

  /**
   * GRANT (and REVOKE) statements that take a new object of its kind to `acl`: what
   * differs from creationDefault. `on` is what they name, e.g. "table snapbase.users".
   */
  privileges(acl: AclEntry[], objtype: "r" | "S" | "f" | "T" | "n", schema: string | null, on: string): string[] {
    const key = (e: AclEntry) => `${e.grantee}/${e.privilege}/${e.grantable}`;
    const defaults = this.creationDefault(objtype, schema);
    const has = new Set(acl.map(key));
    const given = new Set(defaults.map(key));
    const revokes = defaults.filter((e) => !has.has(key(e)))
      .map((e) => `revoke ${e.privilege} on ${on} from ${this.role(e.grantee)};`).sort(compare);
    return [...revokes, ...this.grants(acl.filter((e) => !given.has(key(e))), on)];
  }

  /** GRANT statements for ACL entries; privileges on `on` (e.g. "table snapbase.users"). */
  grants(acl: AclEntry[], on: string, columns?: string): string[] {
    const byGrantee = new Map<string, { plain: string[]; grantable: string[] }>();
    for (const e of acl) {
      // PostgreSQL 17's MAINTAIN comes with ALL; nothing here grants it on its own.
      if (e.privilege === "maintain") continue;
      const entry = byGrantee.get(e.grantee) ?? { plain: [], grantable: [] };
      (e.grantable ? entry.grantable : entry.plain).push(e.privilege + (columns ? ` (${columns})` : ""));
      byGrantee.set(e.grantee, entry);
    }
    const lines: string[] = [];
    const byRole = [...byGrantee].map(([grantee, privileges]) => [this.role(grantee), privileges] as const).sort((a, b) => compare(a[0], b[0]));
    for (const [role, { plain, grantable }] of byRole) {
      if (plain.length) lines.push(`grant ${plain.join(", ")} on ${on} to ${role};`);
      if (grantable.length) lines.push(`grant ${grantable.join(", ")} on ${on} to ${role} with grant option;`);
    }
    return lines;
  }

  ownerLine(kind: string, name: string, owner: string): string[] {
    return owner === this.dbOwner ? [] : [`alter ${kind} ${name} owner to ${this.role(owner)};`];
  }

  comment(kind: string, name: string, text: string | null): string[] {
    return text === null ? [] : [`comment on ${kind} ${name} is ${literal(text)};`];
  }

  schema(s: SchemaRow): string {
    return [`create schema ${s.ident};`, ...this.ownerLine("schema", s.ident, s.owner), ...this.comment("schema", s.ident, s.comment),
      ...this.privileges(s.acl, "n", null, `schema ${s.ident}`)].join("\n");
  }

  defaultAcl(d: DefaultAclRow): string {
    const objects: Record<string, string> = { r: "tables", S: "sequences", f: "functions", T: "types", n: "schemas" };
    const head = `alter default privileges for role ${this.role(d.role)}${d.schema ? ` in schema ${quoteName(d.schema)}` : ""}`;
    const key = (e: AclEntry) => `${e.grantee}/${e.privilege}/${e.grantable}`;
    const has = new Set(d.acl.map(key));
    const lines: string[] = [];
    // Per schema, default privileges only add; for the whole database they replace the built-in ones.
    if (!d.schema) {
      for (const e of d.defaults) if (!has.has(key(e))) lines.push(`${head} revoke ${e.privilege} on ${objects[d.objtype]} from ${this.role(e.grantee)};`);
    }
    const defaults = new Set(d.schema ? [] : d.defaults.map(key));
    for (const e of d.acl) {
      if (!defaults.has(key(e))) lines.push(`${head} grant ${e.privilege} on ${objects[d.objtype]} to ${this.role(e.grantee)}${e.grantable ? " with grant option" : ""};`);
    }
    return lines.join("\n");
  }

  type(t: TypeRow): string {
    let body: string;
    if (t.kind === "e") body = `create type ${t.name} as enum (${(t.labels ?? []).map(literal).join(", ")});`;
    else if (t.kind === "c") body = `create type ${t.name} as (\n${(t.attributes ?? []).map((a) => `  ${a.name} ${a.type}`).join(",\n")}\n);`;
    else if (t.kind === "d" && t.domain) {
      const d = t.domain;
      body = [`create domain ${t.name} as ${d.base}`, ...(d.default !== null ? [`  default ${d.default}`] : []), ...(d.notnull ? ["  not null"] : []),
        ...d.checks.map((c) => `  ${c}`)].join("\n") + ";";
    } else throw new Error(`type ${t.name}: the schema dump does not render types of kind ${t.kind} yet (src/db/schema-dump.ts)`);
    return [body, ...this.ownerLine("type", t.name, t.owner), ...this.comment("type", t.name, t.comment), ...this.privileges(t.acl, "T", schemaOf(t.key), `type ${t.name}`)].join("\n");
  }

  sequence(s: SequenceRow): string {
    const options = [`as ${s.type}`];
    if (s.increment !== "1") options.push(`increment by ${s.increment}`);
    if (s.start !== "1") options.push(`start with ${s.start}`);
    options.push(`minvalue ${s.min}`, `maxvalue ${s.max}`);
    if (s.cache !== "1") options.push(`cache ${s.cache}`);
    if (s.cycle) options.push("cycle");
    return [`create sequence ${s.name} ${options.join(" ")};`, ...this.ownerLine("sequence", s.name, s.owner),
      ...this.comment("sequence", s.name, s.comment), ...this.privileges(s.acl, "S", schemaOf(s.key), `sequence ${s.name}`)].join("\n");
  }

  table(t: TableRow): string {
    if (t.kind === "v" || t.kind === "m") {
      const kind = t.kind === "v" ? "view" : "materialized view";
      const options = t.options?.length ? ` with (${t.options.join(", ")})` : "";
      return [`create ${kind} ${t.name}${options} as\n${(t.viewdef ?? "").replace(/;\s*$/, "")};`, ...this.ownerLine(kind, t.name, t.owner),
        ...this.comment(kind, t.name, t.comment), ...this.privileges(t.acl, "r", schemaOf(t.key), `table ${t.name}`), ...this.columnExtras(t)].join("\n");
    }
    if (t.kind !== "r") throw new Error(`${t.name}: the schema dump does not render relations of kind ${t.kind} yet (src/db/schema-dump.ts)`);
    const lines = t.columns.map((c) => {
      let line = `  ${c.name} ${c.type}`;
      if (c.generated === "s") line += ` generated always as (${c.default}) stored`;
      else if (c.default !== null) line += ` default ${c.default}`;
      if (c.identity === "a") line += " generated always as identity";
      if (c.identity === "d") line += " generated by default as identity";
      if (c.notnull) line += " not null";
      return line;
    });
    for (const k of t.constraints) lines.push(`  constraint ${k.name} ${k.def}`);
    const out = [`create ${t.persistence === "u" ? "unlogged " : ""}table ${t.name} (\n${lines.join(",\n")}\n)${t.options?.length ? ` with (${t.options.join(", ")})` : ""};`];
    out.push(...this.ownerLine("table", t.name, t.owner));
    for (const i of t.indexes) out.push(`${i.def};`);
    if (t.rls) out.push(`alter table ${t.name} enable row level security;`);
    if (t.forceRls) out.push(`alter table ${t.name} force row level security;`);
    for (const p of t.policies) out.push(this.policy(t.name, p));
    for (const g of t.triggers) {
      out.push(`${g.def};`);
      const state: Record<string, string> = { D: "disable", R: "enable replica", A: "enable always" };
      if (state[g.enabled]) out.push(`alter table ${t.name} ${state[g.enabled]} trigger ${g.name};`);
    }
    out.push(...this.privileges(t.acl, "r", schemaOf(t.key), `table ${t.name}`));
    out.push(...this.columnExtras(t));
    for (const s of t.sequences) out.push(...this.privileges(s.acl, "S", schemaOf(t.key), `sequence ${s.name}`));
    out.push(...this.comment("table", t.name, t.comment));
    for (const k of t.constraints) out.push(...this.comment("constraint", `${k.name} on ${t.name}`, k.comment));
    for (const i of t.indexes) out.push(...this.comment("index", i.name, i.comment));
    for (const g of t.triggers) out.push(...this.comment("trigger", `${g.name} on ${t.name}`, g.comment));
    return out.join("\n");
  }

  /** Column grants and comments. */
  private columnExtras(t: TableRow): string[] {
    const out: string[] = [];
    // One GRANT per grantee and privilege, naming its columns in table order.
    const byGrant = new Map<string, string[]>();
    for (const c of t.columns) for (const e of c.acl) {
      const k = JSON.stringify([e.grantee, e.privilege, e.grantable]);
      byGrant.set(k, [...(byGrant.get(k) ?? []), c.name]);
    }
    const columnGrants = [...byGrant].map(([k, columns]) => {
      const [grantee, privilege, grantable] = JSON.parse(k) as [string, string, boolean];
      return this.grants([{ grantee, privilege, grantable }], `table ${t.name}`, columns.join(", "))[0]!;
    });
    out.push(...columnGrants.sort(compare));
    for (const c of t.columns) out.push(...this.comment("column", `${t.name}.${c.name}`, c.comment));
    return out;
  }

  private policy(table: string, p: TableRow["policies"][number]): string {
    const commands: Record<string, string> = { r: "select", a: "insert", w: "update", d: "delete", "*": "all" };
    const roles = p.roles.map((r) => this.role(r)).sort(compare).join(", ");
    let sql = `create policy ${p.name} on ${table}${p.permissive ? "" : " as restrictive"} for ${commands[p.cmd]} to ${roles}`;
    if (p.qual !== null) sql += `\n  using (${p.qual})`;
    if (p.check !== null) sql += `\n  with check (${p.check})`;
    return sql + ";";
  }

  function(f: FunctionRow): string {
    if (f.def === null) throw new Error(`${f.signature}: the schema dump does not render aggregates yet (src/db/schema-dump.ts)`);
    const kind = f.kind === "p" ? "procedure" : "function";
    const out: string[] = [];
    if (f.triggers.length) out.push(`-- fires as ${f.triggers.join(", ")}`);
    out.push(`${f.def.trimEnd()};`, ...this.ownerLine(kind, f.signature, f.owner), ...this.comment(kind, f.signature, f.comment));
    out.push(...this.privileges(f.acl, "f", schemaOf(f.key), `${kind} ${f.signature}`));
    return out.join("\n");
  }
}

// --- Capabilities ------------------------------------------------------------------

function assign(catalogs: Catalogs, map: CapabilityMap) {
  const where = new Map<string, string>();
  const problems: string[] = [];
  for (const [file, capability] of Object.entries(map.capabilities)) {
    for (const name of capability.objects) {
      const other = where.get(name);
      if (other) problems.push(`${name} is listed under both "${other}" and "${file}": keep one`);
      where.set(name, file);
    }
  }
  const found = new Map<string, string>(); // key → what it is
  for (const s of catalogs.schemas) found.set(s.name, "schema");
  for (const t of catalogs.types) found.set(t.key, "type");
  for (const s of catalogs.sequences) found.set(s.key, "sequence");
  for (const t of catalogs.tables) found.set(t.key, t.kind === "r" ? "table" : "view");
  for (const f of catalogs.functions) found.set(f.key, f.kind === "p" ? "procedure" : "function");
  const unmapped = [...found].filter(([key]) => !where.has(key));
  for (const [key, kind] of unmapped) {
    problems.push(`${kind} ${key} is in no capability: add "${key}" to the "objects" of the capability it belongs to in ${path.relative(projectRoot, capabilitiesFile)} (its file is schema/<capability>.sql)`);
  }
  for (const [name, file] of where) {
    if (!found.has(name)) problems.push(`"${name}" (under "${file}") is not in the database any more: remove it from ${path.relative(projectRoot, capabilitiesFile)}`);
  }
  if (problems.length) throw new SchemaMappingError(problems);
  return (key: string) => where.get(key)!;
}

/** The dump as file name → text, one file per capability of the map. */
export async function dumpSchema(client: pg.ClientBase, roles: RoleNames, map: CapabilityMap = loadCapabilities()): Promise<Map<string, string>> {
  await client.query("begin isolation level repeatable read read only");
  let catalogs: Catalogs;
  try {
    // Names print schema-qualified unless they are in pg_catalog.
    await client.query("set local search_path = pg_catalog");
    catalogs = await readCatalogs(client, map.runtime.patterns.map((p) => new RegExp(p)));
  } finally {
    await client.query("rollback");
  }
  const capabilityOf = assign(catalogs, map);
  const r = new Renderer(roles, catalogs.dbOwner, catalogs.defaultAcls);
  const sections = new Map<string, Map<string, string[]>>();
  const add = (file: string, section: string, text: string) => {
    const file_ = sections.get(file) ?? new Map<string, string[]>();
    file_.set(section, [...(file_.get(section) ?? []), text]);
    sections.set(file, file_);
  };
  for (const s of catalogs.schemas) add(capabilityOf(s.name), "Schemas", r.schema(s));
  const foundation = capabilityOf("snapbase");
  for (const e of catalogs.extensions) add(foundation, "Extensions", `create extension if not exists ${e.name} with schema ${e.schema};`);
  for (const d of catalogs.defaultAcls) {
    const text = r.defaultAcl(d);
    if (text) add(foundation, "Default privileges", text);
  }
  for (const t of catalogs.types) add(capabilityOf(t.key), "Types", r.type(t));
  for (const s of catalogs.sequences) add(capabilityOf(s.key), "Sequences", r.sequence(s));
  for (const t of catalogs.tables) add(capabilityOf(t.key), t.kind === "r" ? "Tables" : "Views", r.table(t));
  for (const f of catalogs.functions) add(capabilityOf(f.key), "Functions", r.function(f));

  const order = ["Schemas", "Extensions", "Default privileges", "Types", "Sequences", "Tables", "Views", "Functions"];
  const files = new Map<string, string>();
  for (const [file, capability] of Object.entries(map.capabilities)) {
    const parts = sections.get(file) ?? new Map<string, string[]>();
    const header = [
      `-- ${capability.title}: ${capability.about}`,
      "--",
      `-- GENERATED by \`${DUMP_COMMAND}\` from a freshly migrated database: do not edit.`,
      "-- Change the schema with a migration (migrations/current/), then regenerate;",
      "-- schema/capabilities.json says which file each object goes to.",
      "-- Role names are the migrations' placeholders (:ROLE_VIEWER …, :DATABASE_OWNER).",
    ];
    const body: string[] = [];
    for (const section of order) {
      const items = parts.get(section);
      if (!items?.length) continue;
      body.push(`-- ${"=".repeat(76)}\n-- ${section}\n-- ${"=".repeat(76)}`, ...items);
    }
    let text = r.placeholders([header.join("\n"), ...body].join("\n\n")) + "\n";
    if (catalogs.installationId) text = text.replaceAll(catalogs.installationId, "<installation_id>");
    files.set(`${file}.sql`, text);
  }
  return files;
}

/** The committed dump: every .sql file of schema/. */
export function readDump(folder = schemaFolder): Map<string, string> {
  const files = new Map<string, string>();
  let names: string[] = [];
  try {
    names = readdirSync(folder).filter((f) => f.endsWith(".sql")).sort();
  } catch {
    return files;
  }
  for (const name of names) files.set(name, readFileSync(path.join(folder, name), "utf8"));
  return files;
}

/** The files that differ between a dump and schema/ (missing, extra or changed). */
export function dumpDrift(files: Map<string, string>, folder = schemaFolder): string[] {
  const committed = readDump(folder);
  const names = [...new Set([...files.keys(), ...committed.keys()])].sort();
  return names.filter((name) => files.get(name) !== committed.get(name));
}

/** Writes the dump to schema/, removing .sql files no capability produces any more. */
export function writeDump(files: Map<string, string>, folder = schemaFolder): void {
  mkdirSync(folder, { recursive: true });
  for (const name of readDump(folder).keys()) if (!files.has(name)) rmSync(path.join(folder, name));
  for (const [name, text] of files) writeFileSync(path.join(folder, name), text);
}

/**
 * The dump of a freshly migrated database: a scratch copy `<database>_schema_dump`
 * built from the migrations when the target has a root connection (the embedded
 * server always has), then dropped; otherwise the target database itself, which
 * the caller has just migrated (leftovers of earlier work in migrations/current/
 * would then show).
 */
export async function dumpFromMigrations(target: MigrationTarget, opts: { includeCurrent: boolean }): Promise<Map<string, string>> {
  if (!target.rootUrl) {
    log.warn("no ROOT_DATABASE_URL: dumping the database itself rather than a fresh copy built from the migrations");
    return withClient("schema dump", target.ownerUrl, (c) => dumpSchema(c, target.roles));
  }
  const scratch = `${databaseName(target.ownerUrl)}_schema_dump`.slice(0, 63);
  const dropScratch = () => withClient("schema dump", target.rootUrl!, (c) => c.query(`drop database if exists ${c.escapeIdentifier(scratch)} with (force)`));
  await dropScratch();
  try {
    await bootstrapCluster({ rootUrl: target.rootUrl, database: scratch, roles: target.roles });
    const ownerUrl = withUrlParts(target.ownerUrl, { database: scratch });
    await runMigrations({ ownerUrl, roles: target.roles, rootUrl: target.rootUrl }, opts);
    return await withClient("schema dump", ownerUrl, (c) => dumpSchema(c, target.roles));
  } finally {
    await dropScratch();
  }
}
