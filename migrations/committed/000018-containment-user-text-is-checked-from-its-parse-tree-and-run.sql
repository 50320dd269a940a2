--! Previous: sha1:38a8f4c660d7d1bedd0c866f7461fa22317ff3ff
--! Hash: sha1:cd9fe9098213b20860bf6ab4ce98ca84f6cc271e
--! Message: containment: user text is checked from its parse tree and runs as sandbox roles; sealed connector credentials; allowed connector hosts

--! split: 001-current.sql
-- Work in progress: one file per topic (NNN-topic.sql), applied in number order.

--! split: 010-containment-parse-trees.sql
--------------------------------------------------------------------------------
-- Containment, part 1: reading user text from PostgreSQL's own parse tree.
--------------------------------------------------------------------------------
-- User text (filters, change SQL) is never planned, evaluated or executed before
-- it is proven harmless. PostgreSQL analyses a SQL-standard function body when the
-- function is created (names resolved, types checked, nothing planned or run) and
-- keeps the analysed tree in pg_proc.prosqlbody. So the text becomes the body of a
-- throw-away "probe" function, created and dropped in a subtransaction that is
-- always rolled back, and the stored tree is inspected:
--   * every node type must be on an allow-list (fail closed on anything new);
--   * every function, aggregate, window function and operator it calls must be a
--     side-effect-free built-in (snapbase_private.function_allowed);
--   * every relation and column it touches comes from pg_depend (exact, per column);
--   * reg* values (which look catalog objects up by name) are refused.
-- Only then is the text planned and run, and then under a role that can reach
-- nothing else (the sandbox roles, see 012 and 011).
--
-- Splicing text into CREATE FUNCTION could smuggle in a second statement, so the
-- whole CREATE text is first opened as a cursor: PostgreSQL parses (never runs) it,
-- and refuses with "cannot open multi-query plan as cursor" when it holds more
-- than one statement, or with "cannot open CREATE FUNCTION query as cursor" when it
-- is exactly the one utility statement we wrote. Only the latter goes on.

create schema if not exists snapbase_sandbox;
comment on schema snapbase_sandbox is
  'Where user text is analysed (throw-away probe functions, never committed) and the only entry points of the sandbox roles that run it.';
revoke all on schema snapbase_sandbox from public;
grant usage on schema snapbase_sandbox to :ROLE_CHANGE_RUNNER, :ROLE_FILTER_READER;

drop function if exists snapbase_private.node_fields(text) cascade;
drop function if exists snapbase_private.sandbox_role(text) cascade;

-- The sandbox roles by purpose (names are configurable, so they come from the migration's placeholders).
create function snapbase_private.sandbox_role(kind text) returns name
language sql immutable
set search_path = pg_catalog
as $$
  select case kind when 'filter_reader' then ':ROLE_FILTER_READER' when 'change_runner' then ':ROLE_CHANGE_RUNNER' end::name
$$;
drop function if exists snapbase_private.function_allowed(oid, text) cascade;
drop function if exists snapbase_private.operator_allowed(oid, text) cascade;
drop function if exists snapbase_private.probe_user_text(text, text, text) cascade;
drop function if exists snapbase_private.tree_problems(text, text) cascade;
drop type if exists snapbase_private.probe_result cascade;

-- The scalar fields of a nodeToString() tree: one row per (node, field, value).
-- Tokens: `{NODE`, `}`, `(`, `)`, `<>`, `:field`, quoted strings, `[ datum bytes ]`,
-- and bare words (with backslash escapes). A field belongs to the innermost open
-- node: the last `{` seen at its depth. User-chosen names (aliases, column names)
-- are printed with spaces and leading digits escaped, so a name can never forge a
-- `:field number` pair: only real fields carry bare numeric values.
create function snapbase_private.node_fields(tree text)
returns table (node bigint, depth bigint, node_type text, field text, value text)
language sql immutable strict parallel safe
set search_path = pg_catalog
as $$
  with tokens as (
    select t.ord, t.m[1] as tok
      from regexp_matches(tree, '(\{[A-Za-z_0-9]+|\}|\(|\)|<>|"(?:[^"\\]|\\.)*"|\[[^\]]*\]|(?:[^\s(){}"\\]|\\.)+)', 'g')
           with ordinality as t(m, ord)
  ), depths as (
    select ord, tok,
           sum(case when left(tok, 1) = '{' then 1 when tok = '}' then -1 else 0 end) over (order by ord) as depth,
           lead(tok) over (order by ord) as next_tok
      from tokens
  ), owned as (
    select ord, tok, depth, next_tok,
           max(case when left(tok, 1) = '{' then ord end) over (partition by depth order by ord) as owner
      from depths
  )
  select o.owner, o.depth, substr(n.tok, 2), substr(o.tok, 2), o.next_tok
    from owned o join owned n on n.ord = o.owner
   where left(o.tok, 1) = ':' and o.next_tok is not null
     and left(o.next_tok, 1) not in (':', '{', '(', ')', '}', '[')
$$;
comment on function snapbase_private.node_fields(text) is
  'Scalar fields of a PostgreSQL parse tree as printed by nodeToString (pg_proc.prosqlbody). Used to check user text before it runs.';

-- May user text of this purpose ('filter' or 'change') call this function?
-- Built-ins only (pg_catalog). Immutable ones compute on their arguments alone;
-- stable and volatile ones may read settings, catalogs, files or tables, or
-- change session state, so only those named here are allowed.
create function snapbase_private.function_allowed(fn oid, purpose text) returns boolean
language sql stable
set search_path = pg_catalog
as $$
  select coalesce((
    select p.pronamespace = 'pg_catalog'::regnamespace
       and not p.prosecdef
       and p.prokind in ('f', 'a', 'w')
       and (purpose = 'change' or (p.prokind = 'f' and not p.proretset))
       and (
         (p.provolatile = 'i' and p.proname not in ('pg_get_keywords'))
         or (p.provolatile = 's' and (
               p.proname in (
                 -- dates and times
                 'now', 'statement_timestamp', 'transaction_timestamp', 'to_char', 'to_timestamp', 'to_date',
                 'to_number', 'date_trunc', 'date_part', 'extract', 'date_bin', 'age', 'timezone', 'make_timestamptz',
                 'justify_days', 'justify_hours', 'justify_interval', 'date_add', 'date_subtract', 'isfinite',
                 -- text and JSON
                 'format', 'concat', 'concat_ws', 'array_to_string', 'to_json', 'to_jsonb', 'json_build_object',
                 'json_build_array', 'jsonb_build_object', 'jsonb_build_array', 'row_to_json', 'array_to_json',
                 'json_agg', 'jsonb_agg', 'json_object_agg', 'jsonb_object_agg', 'json_agg_strict', 'jsonb_agg_strict',
                 'json_object_agg_strict', 'jsonb_object_agg_strict', 'json_object_agg_unique', 'jsonb_object_agg_unique',
                 'json_object_agg_unique_strict', 'jsonb_object_agg_unique_strict',
                 'jsonb_path_exists_tz', 'jsonb_path_match_tz', 'jsonb_path_query_tz', 'jsonb_path_query_array_tz',
                 'jsonb_path_query_first_tz', 'to_tsvector', 'to_tsquery', 'plainto_tsquery', 'phraseto_tsquery',
                 'websearch_to_tsquery', 'pg_typeof', 'num_nulls', 'num_nonnulls',
                 -- rows from JSON (structured edits are a MERGE over jsonb_to_recordset)
                 'jsonb_to_record', 'jsonb_to_recordset', 'jsonb_populate_record', 'jsonb_populate_recordset',
                 'json_to_record', 'json_to_recordset', 'json_populate_record', 'json_populate_recordset')
               -- casts between ordinary types (timestamptz → date and the like)
               or exists (select 1 from pg_cast c
                           where c.castfunc = p.oid
                             and format_type(c.castsource, null) !~ '^reg' and format_type(c.casttarget, null) !~ '^reg')
               -- operators' functions (comparisons across date and timestamptz, …)
               or exists (select 1 from pg_operator o where o.oprcode = p.oid and o.oprnamespace = 'pg_catalog'::regnamespace)))
         or (p.provolatile = 'v' and purpose = 'change'
             and p.proname in ('random', 'gen_random_uuid', 'clock_timestamp', 'timeofday', 'nextval'))
         -- Built-in aggregates and window functions only combine their inputs.
         or (purpose = 'change' and p.prokind in ('a', 'w'))
       )
       and p.proname not in ('current_setting', 'set_config', 'query_to_xml', 'query_to_xmlschema', 'query_to_xml_and_xmlschema',
                             'table_to_xml', 'table_to_xmlschema', 'table_to_xml_and_xmlschema', 'cursor_to_xml',
                             'cursor_to_xmlschema', 'schema_to_xml', 'schema_to_xmlschema', 'schema_to_xml_and_xmlschema',
                             'database_to_xml', 'database_to_xmlschema', 'database_to_xml_and_xmlschema')
       and p.proname !~ '^(pg_|lo_|has_|to_reg|txid_|pg_stat|dblink)'
      from pg_proc p where p.oid = fn), false)
$$;
comment on function snapbase_private.function_allowed(oid, text) is
  'The allow-list for user text: built-in functions that only compute on their arguments (immutable ones, and the named stable and volatile ones). Everything that reads settings, catalogs, files or tables, runs SQL, or changes session state is refused.';

create function snapbase_private.operator_allowed(op oid, purpose text) returns boolean
language sql stable
set search_path = pg_catalog
as $$
  select coalesce((
    select o.oprnamespace = 'pg_catalog'::regnamespace
       and (o.oprcode = 0 or snapbase_private.function_allowed(o.oprcode, purpose))
      from pg_operator o where o.oid = op), false)
$$;

-- What a probe found: the problems (empty: none), and what it touches.
create type snapbase_private.probe_result as (
  problems text[],
  relations oid[],          -- every relation the text names (pg_depend)
  written oid[],            -- relations it inserts into, updates, deletes from or merges into
  columns jsonb,            -- {relation oid: [attnum, ...]} read or written
  params integer[],         -- for filters: which parameters (columns) it uses
  command_type integer,     -- of the top statement: 1 select, 2 update, 3 insert, 4 delete, 5 merge
  statements integer
);

-- Checks a parse tree. Node types not listed here are refused outright.
create function snapbase_private.tree_problems(tree text, purpose text) returns text[]
language sql stable
set search_path = pg_catalog
as $$
  with f as (select * from snapbase_private.node_fields(tree)),
  node_types as (select distinct node_type from f),
  allowed_nodes(name) as (
    select unnest(array[
      'VAR', 'CONST', 'PARAM', 'FUNCEXPR', 'OPEXPR', 'DISTINCTEXPR', 'NULLIFEXPR', 'SCALARARRAYOPEXPR', 'BOOLEXPR',
      'CASEEXPR', 'CASEWHEN', 'CASETESTEXPR', 'ARRAYEXPR', 'ROWEXPR', 'COALESCEEXPR', 'MINMAXEXPR', 'NULLTEST',
      'BOOLEANTEST', 'RELABELTYPE', 'COERCEVIAIO', 'ARRAYCOERCEEXPR', 'COLLATEEXPR', 'COERCETODOMAIN',
      'COERCETODOMAINVALUE', 'FIELDSELECT', 'SUBSCRIPTINGREF', 'SQLVALUEFUNCTION', 'ALIAS', 'QUERY', 'TARGETENTRY',
      'FROMEXPR'])
    union all
    select unnest(array[
      'SUBLINK', 'RANGETBLENTRY', 'RTEPERMISSIONINFO', 'JOINEXPR', 'RANGETBLREF', 'SORTGROUPCLAUSE',
      'AGGREF', 'WINDOWFUNC', 'WINDOWCLAUSE', 'COMMONTABLEEXPR', 'ONCONFLICTEXPR', 'INFERENCEELEM', 'MERGEACTION',
      'SETOPERATIONSTMT', 'RANGETBLFUNCTION', 'FIELDSTORE', 'GROUPINGSET', 'GROUPINGFUNC', 'NEXTVALUEEXPR'])
     where purpose = 'change'
  ),
  labels(name, label) as (values
    ('SUBLINK', 'subqueries'), ('RANGETBLENTRY', 'tables'), ('RANGETBLREF', null), ('JOINEXPR', null), ('RTEPERMISSIONINFO', null),
    ('AGGREF', 'aggregates'), ('WINDOWFUNC', 'window functions'), ('WINDOWCLAUSE', null), ('SORTGROUPCLAUSE', null),
    ('COMMONTABLEEXPR', 'WITH queries'), ('SETOPERATIONSTMT', 'UNION, INTERSECT and EXCEPT'), ('RANGETBLFUNCTION', null),
    ('FIELDSTORE', 'assignments to fields'), ('NEXTVALUEEXPR', 'sequences'), ('CURRENTOFEXPR', 'WHERE CURRENT OF'),
    ('XMLEXPR', 'XML constructors'), ('TABLEFUNC', 'XMLTABLE and JSON_TABLE'), ('ROWCOMPAREEXPR', 'row comparisons'),
    ('GROUPINGFUNC', 'GROUPING'), ('TABLESAMPLECLAUSE', 'TABLESAMPLE')
  ),
  found as (
    select coalesce(l.label, format('%s (%s)', 'this construct', lower(n.node_type))) as problem
      from node_types n left join labels l on l.name = n.node_type
     where n.node_type not in (select name from allowed_nodes)
       and (l.name is null or l.label is not null)
    union all
    -- Who is asking (current_user and the like; PostgreSQL 15 keeps them as SQLValueFunction ops 9 to 14).
    select 'current_user and similar session functions'
      from f v where v.node_type = 'SQLVALUEFUNCTION' and v.field = 'op' and v.value ~ '^\d+$' and v.value::int >= 9
    union all
    -- Functions (also an operator's function, a sort's or window frame's support function).
    select format('the function %s', v.value::oid::regprocedure)
      from f v
     where v.field in ('funcid', 'opfuncid', 'aggfnoid', 'winfnoid', 'hashfuncid', 'negfuncid', 'startInRangeFunc', 'endInRangeFunc')
       and v.value ~ '^\d+$' and v.value <> '0'
       and not snapbase_private.function_allowed(v.value::oid, purpose)
    union all
    select format('the operator %s', v.value::oid::regoperator)
      from f v
     where v.field in ('opno', 'eqop', 'sortop') and v.value ~ '^\d+$' and v.value <> '0'
       and not snapbase_private.operator_allowed(v.value::oid, purpose)
    union all
    -- reg* values look catalog objects up by name (and feed nextval, setval, …).
    select format('values of type %s', format_type(v.value::oid, null))
      from f v
     where v.field in ('consttype', 'resulttype', 'paramtype', 'vartype', 'funcresulttype', 'opresulttype', 'array_typeid',
                       'element_typeid', 'row_typeid', 'minmaxtype', 'coalescetype', 'casetype', 'type', 'typeId',
                       'refcontainertype', 'refelemtype', 'refrestype', 'aggtype', 'wintype')
       and v.value ~ '^\d+$' and v.value <> '0'
       and format_type(v.value::oid, null) ~ '^reg'
       and not (purpose = 'change' and v.node_type = 'CONST' and v.value = 'regclass'::regtype::oid::text)
    union all
    -- Row locks (FOR UPDATE/SHARE) would reach into other tables; utility statements never belong here.
    select 'FOR UPDATE and FOR SHARE' from f v where v.node_type = 'QUERY' and v.field = 'hasForUpdate' and v.value = 'true'
    union all
    select 'utility statements' from f v where v.node_type = 'QUERY' and v.field = 'utilityStmt' and v.value <> '<>'
    union all
    select 'a table sample' from f v where v.node_type = 'RANGETBLENTRY' and v.field = 'tablesample' and v.value <> '<>'
    union all
    select 'XMLTABLE and JSON_TABLE' from f v where v.node_type = 'RANGETBLENTRY' and v.field = 'rtekind' and v.value = '4'
  )
  select coalesce(array_agg(distinct problem order by problem), '{}') from found
$$;
comment on function snapbase_private.tree_problems(text, text) is
  'What a parse tree of user text uses that it may not: node types off the allow-list, functions and operators that are not side-effect-free built-ins, reg* values, row locks, utility statements.';

-- Analyses `body` (the text after `prefix`, e.g. `returns boolean return` or
-- `returns void begin atomic`) as the body of a throw-away function in
-- snapbase_sandbox with the given parameter list, under `search_path`, and returns
-- what it found. Nothing is planned or run; the probe never outlives the call.
-- Errors in the text (syntax, unknown names, types) are raised as 22023 / 42601
-- with PostgreSQL's message and no DETAIL or HINT (a hint can name objects).
create function snapbase_private.probe_user_text(body_prefix text, body text, body_suffix text,
                                                 params text default '', path text default 'pg_catalog',
                                                 purpose text default 'filter')
returns snapbase_private.probe_result
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  probe_name text := 'probe_' || md5(random()::text || clock_timestamp()::text);
  ddl text := format('create function snapbase_sandbox.%I(%s) %s ', probe_name, params, body_prefix) || body || body_suffix;
  c refcursor;
  err text;
  state text;
  result snapbase_private.probe_result;
  probe oid;
  tree text;
  shifted_tree text;
begin
  -- One statement, and it is our CREATE FUNCTION: parsed, never run.
  begin
    open c for execute ddl;
    close c;
    raise exception 'the text is not a function body' using errcode = '42601';
  exception when invalid_cursor_definition then
    get stacked diagnostics err = message_text;
    if err <> 'cannot open CREATE FUNCTION query as cursor' then
      raise exception 'this must be a single % (the text holds more than one statement)',
        case purpose when 'filter' then 'expression' else 'statement' end using errcode = '42601';
    end if;
  when syntax_error then
    get stacked diagnostics err = message_text;
    raise exception '%', err using errcode = '42601';
  end;
  begin
    perform set_config('search_path', path, true);
    perform set_config('check_function_bodies', 'on', true);
    execute ddl;
    probe := format('snapbase_sandbox.%I', probe_name)::regproc::oid;
    select p.prosqlbody::text into tree from pg_proc p where p.oid = probe;
    result.problems := snapbase_private.tree_problems(tree, purpose);
    select coalesce(array_agg(r.relid), '{}'), coalesce(jsonb_object_agg(r.relid, r.cols), '{}')
      into result.relations, result.columns
      from (select d.refobjid as relid, coalesce(jsonb_agg(distinct d.refobjsubid) filter (where d.refobjsubid > 0), '[]') as cols
              from pg_depend d
             where d.classid = 'pg_proc'::regclass and d.objid = probe and d.refclassid = 'pg_class'::regclass
             group by d.refobjid) r;
    -- Non-built-in functions, operators and types show up as dependencies.
    result.problems := result.problems || array(
      select distinct format('the %s %s', case d.refclassid when 'pg_proc'::regclass then 'function' else 'operator' end,
                             case d.refclassid when 'pg_proc'::regclass then d.refobjid::regprocedure::text else d.refobjid::regoperator::text end)
        from pg_depend d
       where d.classid = 'pg_proc'::regclass and d.objid = probe and d.refclassid in ('pg_proc'::regclass, 'pg_operator'::regclass));
    -- Relations written: requiredPerms has INSERT (1), UPDATE (4) or DELETE (8).
    select coalesce(array_agg(distinct r.relid), '{}') into result.written
      from (select f.node, f.value::oid as relid from snapbase_private.node_fields(tree) f
             where f.node_type in ('RANGETBLENTRY', 'RTEPERMISSIONINFO') and f.field = 'relid' and f.value ~ '^\d+$' and f.value <> '0') r
      join snapbase_private.node_fields(tree) p on p.node = r.node and p.field = 'requiredPerms' and p.value ~ '^\d+$'
     where p.value::int & 13 <> 0;
    -- $1-style references would mean something else where the text finally runs.
    -- The tree cannot tell `$1` from the first parameter's name (and PostgreSQL 16+
    -- stores no locations), so the text is analysed again with one more parameter
    -- in front: a name moves to the next number, `$1` does not.
    if params <> '' then
      begin
        execute format('create function snapbase_sandbox.%I(%s) %s ', probe_name || '_shifted', '"$shift" bigint, ' || params, body_prefix)
          || body || body_suffix;
        select p.prosqlbody::text into shifted_tree from pg_proc p
         where p.oid = format('snapbase_sandbox.%I', probe_name || '_shifted')::regproc::oid;
        if exists (
          with a as (select f.value::int as id, row_number() over (order by f.node) as n from snapbase_private.node_fields(tree) f
                      where f.node_type = 'PARAM' and f.field = 'paramid' and f.value ~ '^\d+$'),
               b as (select f.value::int as id, row_number() over (order by f.node) as n from snapbase_private.node_fields(shifted_tree) f
                      where f.node_type = 'PARAM' and f.field = 'paramid' and f.value ~ '^\d+$')
          select 1 from a full join b on a.n = b.n where b.id is distinct from a.id + 1) then
          result.problems := result.problems || 'positional parameters ($1)'::text;
        end if;
      exception when others then
        result.problems := result.problems || 'positional parameters ($1)'::text;
      end;
    end if;
    -- Parameters of the probe (PARAM_EXTERN, kind 0): for filters, the columns used.
    select coalesce(array_agg(distinct f.value::int order by f.value::int), '{}') into result.params
      from snapbase_private.node_fields(tree) f
      join snapbase_private.node_fields(tree) k on k.node = f.node and k.field = 'paramkind' and k.value = '0'
     where f.node_type = 'PARAM' and f.field = 'paramid' and f.value ~ '^\d+$';
    -- Top-level statements are the QUERY nodes at depth 1.
    select min(f.value::int), count(*) into result.command_type, result.statements
      from snapbase_private.node_fields(tree) f where f.node_type = 'QUERY' and f.depth = 1 and f.field = 'commandType';
    -- Undo the probe (and anything the DDL did) by failing this block on purpose.
    raise exception 'probe done' using errcode = 'SBPRB';
  exception
    when sqlstate 'SBPRB' then
      null;
    when others then
      get stacked diagnostics err = message_text, state = returned_sqlstate;
      if state = '0A000' and purpose = 'change' then
        -- "DROP TABLE is not yet supported in unquoted SQL function body" and the like.
        raise exception 'the change must be exactly one INSERT, UPDATE, DELETE or MERGE statement (%)',
          regexp_replace(err, ' is not yet supported in unquoted SQL function body', ' is not allowed') using errcode = '42601';
      end if;
      if state in ('42P13') then
        raise exception '%', case purpose when 'filter' then 'a filter must be a true/false expression' else err end
          using errcode = '22023';
      end if;
      raise exception '%', err using errcode = case when state like '42%' or state like '22%' then state else '22023' end;
  end;
  return result;
end;
$$;
comment on function snapbase_private.probe_user_text(text, text, text, text, text, text) is
  'Analyses user text as the body of a throw-away function (never planned, never run, always rolled back) and returns its parse tree''s problems and dependencies.';

--! split: 011-containment-filters.sql
--------------------------------------------------------------------------------
-- Containment, part 2: workbook filters.
--------------------------------------------------------------------------------
-- A filter is parsed as ONE standalone expression: the body of a throw-away
-- `returns boolean ... return <filter>` function whose parameters are the table's
-- data columns (so nothing else can be named: no metadata columns, no other
-- relation, no whole row). Its parse tree must call only side-effect-free built-ins
-- and hold no subquery (snapbase_private.probe_user_text). It is never wrapped in
-- parentheses to be checked, so `id = 1) or (true` is a syntax error.
--
-- A checked filter runs only inside queries executed by the filter reader role
-- (snapbase_sandbox.read_*: SELECT on workbook tables, no other right, read-only
-- functions) under the request's statement_timeout.

drop function if exists snapbase_private.filter_parameters(snapbase.workbook_tables, text[]) cascade;
drop function if exists snapbase_private.filter_columns(snapbase.workbook_tables, text) cascade;
drop function if exists snapbase_private.filter_clause(snapbase.workbook_tables) cascade;
drop function if exists snapbase_sandbox.read_jsonb(text, text[]) cascade;
drop function if exists snapbase_sandbox.read_text_rows(text, text[]) cascade;
drop function if exists snapbase_sandbox.read_ids(text, text[]) cascade;
drop table if exists snapbase_private.filter_functions cascade;

alter table snapbase.workbook_tables add column if not exists filter_columns jsonb;
comment on column snapbase.workbook_tables.filter_columns is
  'The columns (name and type) the active filter uses, recorded when it was checked; the filter applies only while they are unchanged.';

--------------------------------------------------------------------------------
-- The filter reader's entry points. They run the owner's query text (which holds
-- at most one checked filter) with the reader's rights; only the owner may call them.
--------------------------------------------------------------------------------

grant create on schema snapbase_sandbox to :ROLE_FILTER_READER;

create function snapbase_sandbox.read_jsonb(query text, args text[]) returns jsonb
language plpgsql stable security definer
set search_path = pg_catalog
as $$
declare
  result jsonb;
begin
  execute query into result using args;
  return result;
end;
$$;
alter function snapbase_sandbox.read_jsonb(text, text[]) owner to :ROLE_FILTER_READER;

create function snapbase_sandbox.read_text_rows(query text, args text[]) returns setof text[]
language plpgsql stable security definer
set search_path = pg_catalog
as $$
begin
  return query execute query using args;
end;
$$;
alter function snapbase_sandbox.read_text_rows(text, text[]) owner to :ROLE_FILTER_READER;

create function snapbase_sandbox.read_ids(query text, args text[]) returns bigint[]
language plpgsql stable security definer
set search_path = pg_catalog
as $$
declare
  result bigint[];
begin
  execute format('select coalesce(array_agg(x.id), ''{}'') from (%s) x(id)', query) into result using args;
  return result;
end;
$$;
alter function snapbase_sandbox.read_ids(text, text[]) owner to :ROLE_FILTER_READER;

revoke create on schema snapbase_sandbox from :ROLE_FILTER_READER;
revoke all on function snapbase_sandbox.read_jsonb(text, text[]), snapbase_sandbox.read_text_rows(text, text[]),
  snapbase_sandbox.read_ids(text, text[]) from public;
grant execute on function snapbase_sandbox.read_jsonb(text, text[]), snapbase_sandbox.read_text_rows(text, text[]),
  snapbase_sandbox.read_ids(text, text[]) to :DATABASE_OWNER;
comment on function snapbase_sandbox.read_jsonb(text, text[]) is
  'Runs a workbook query that may carry a checked filter as the filter reader (SELECT on workbook tables only, read-only). Owner only.';

-- The reader may read every workbook table (and nothing else): existing ones now,
-- new ones through each workbook schema's default privileges (see create_workbook).
do $$
declare
  s text;
begin
  for s in select w.schema_name from snapbase.workbooks w where exists (select 1 from pg_namespace n where n.nspname = w.schema_name) loop
    execute format('grant usage on schema %I to :ROLE_FILTER_READER', s);
    execute format('grant select on all tables in schema %I to :ROLE_FILTER_READER', s);
    execute format('alter default privileges in schema %I grant select on tables to :ROLE_FILTER_READER', s);
  end loop;
end $$;

create or replace function snapbase.create_workbook(name text, organization_id bigint default null) returns snapbase.workbooks
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  me bigint := snapbase.current_user_id();
  org bigint := organization_id;
  wb snapbase.workbooks;
begin
  if me is null then
    raise exception 'sign in as a Snapbase user to create a workbook' using errcode = '42501';
  end if;
  if snapbase.current_app_role() = 'agent' then
    raise exception 'agent tokens cannot create workbooks' using errcode = '42501';
  end if;
  if org is null then
    -- Your only organization, or a personal one made on first use.
    select min(m.organization_id) into org
      from snapbase.organization_members m where m.user_id = me
      having count(*) <= 1;
    if not found then
      raise exception 'you belong to several organizations: pass organization_id' using errcode = '22023';
    end if;
    if org is null then
      org := (snapbase.create_organization('Personal: ' || current_setting('jwt.claims.email', true))).id;
    end if;
  elsif not coalesce(snapbase_private.is_member(org), false) then
    raise exception 'no organization % of yours', org using errcode = 'P0002';
  end if;
  insert into snapbase.workbooks (name, owner_id, organization_id, schema_name)
    values (trim(name), me, org, 'pending') returning * into wb;
  update snapbase.workbooks set schema_name = 'workbook_' || wb.id where id = wb.id returning * into wb;
  execute format('create schema %I', wb.schema_name);
  execute format('comment on schema %I is %L', wb.schema_name, format('Snapbase workbook %s: %s', wb.id, wb.name));
  -- Filters on this workbook's tables run as the filter reader, which reads them and nothing else.
  execute format('grant usage on schema %I to %I', wb.schema_name, snapbase_private.sandbox_role('filter_reader'));
  execute format('alter default privileges in schema %I grant select on tables to %I', wb.schema_name,
                 snapbase_private.sandbox_role('filter_reader'));
  perform snapbase_private.audit_workbook('create_workbook', wb.id, 'workbook', wb.id::text, null, jsonb_build_object('name', wb.name));
  return wb;
end;
$$;

--------------------------------------------------------------------------------
-- Checking and applying filters
--------------------------------------------------------------------------------

-- The names a filter may use for table t: its data and scratch columns with their
-- catalog types, in table order, less `hide`.
create function snapbase_private.filter_parameters(t snapbase.workbook_tables, hide text[] default '{}')
returns table (ord integer, name text, type text)
language sql stable
set search_path = pg_catalog
as $$
  select row_number() over (order by a.attnum)::integer, a.attname::text, format_type(a.atttypid, a.atttypmod)
    from pg_attribute a
   where a.attrelid = to_regclass(snapbase_private.table_rel(t)) and a.attnum > 0 and not a.attisdropped
     and a.attname::text = any (snapbase_private.column_names(t)) and a.attname::text <> all (coalesce(hide, '{}'))
   order by a.attnum
$$;

-- Why `filter` may not be used on table t (null: it may), and the columns it uses.
create or replace function snapbase_private.filter_problem(t snapbase.workbook_tables, filter text) returns text
language plpgsql
set search_path = pg_catalog
as $$
declare
  probe snapbase_private.probe_result;
begin
  if filter is null then
    return null;
  end if;
  if length(filter) > 4000 then
    return 'the filter is longer than 4000 characters';
  end if;
  begin
    probe := snapbase_private.probe_user_text('returns boolean language sql stable return ', filter, '',
      (select string_agg(format('%I %s', p.name, p.type), ', ' order by p.ord) from snapbase_private.filter_parameters(t) p),
      'pg_catalog', 'filter');
  exception when others then
    return sqlerrm;
  end;
  if cardinality(probe.problems) > 0 then
    return array_to_string(probe.problems, ', ') || ' may not be used in a filter';
  end if;
  return null;
end;
$$;

create or replace function snapbase_private.check_filter(t snapbase.workbook_tables, filter text) returns void
language plpgsql
set search_path = pg_catalog
as $$
declare
  problem text := snapbase_private.filter_problem(t, filter);
begin
  if problem is not null then
    raise exception 'filter refused: %', problem using errcode = '22023';
  end if;
end;
$$;

-- The columns a checked filter uses, as [{name, type}].
create function snapbase_private.filter_columns(t snapbase.workbook_tables, filter text) returns jsonb
language plpgsql
set search_path = pg_catalog
as $$
declare
  probe snapbase_private.probe_result := snapbase_private.probe_user_text('returns boolean language sql stable return ', filter, '',
      (select string_agg(format('%I %s', p.name, p.type), ', ' order by p.ord) from snapbase_private.filter_parameters(t) p),
      'pg_catalog', 'filter');
begin
  return (select coalesce(jsonb_agg(jsonb_build_object('name', p.name, 'type', p.type) order by p.ord), '[]')
            from snapbase_private.filter_parameters(t) p where p.ord = any (probe.params));
end;
$$;

create or replace function snapbase.set_table_filter(table_id bigint, filter text) returns snapbase.workbook_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  cleaned text := nullif(trim(filter), '');
begin
  if cleaned is not null then
    perform snapbase_private.check_filter(t, cleaned);
  end if;
  update snapbase.workbook_tables wt
     set filter = cleaned, filter_columns = case when cleaned is not null then snapbase_private.filter_columns(t, cleaned) end
   where wt.id = t.id returning * into t;
  perform snapbase_private.audit_workbook('set_table_filter', t.workbook_id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('filter', cleaned));
  return t;
end;
$$;

-- The active filter of t as a condition to put in a WHERE clause over alias r (its
-- columns are the filter's names), or 'true'. Only checked filters are ever stored;
-- one whose columns changed since is refused rather than reinterpreted.
create function snapbase_private.filter_clause(t snapbase.workbook_tables) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
begin
  if t.filter is null then
    return 'true';
  end if;
  if t.filter_columns is null or exists (
       select 1 from jsonb_array_elements(t.filter_columns) c
        where not exists (select 1 from snapbase_private.filter_parameters(t) p where p.name = c ->> 'name' and p.type = c ->> 'type')) then
    raise exception 'the active filter of workbook table % no longer fits its columns; set it again', t.id using errcode = '22023';
  end if;
  -- A checked filter is one expression; the newline ends a trailing -- comment.
  return '(' || t.filter || E'\n)';
end;
$$;
comment on function snapbase_private.filter_clause(snapbase.workbook_tables) is
  'The active filter as a WHERE condition: text checked by filter_problem when it was set, parenthesised; for queries run by snapbase_sandbox.read_* only.';

-- Filters stored before this check existed are checked now; a failing one is cleared and audited.
do $$
declare
  t snapbase.workbook_tables;
  problem text;
begin
  for t in select * from snapbase.workbook_tables where filter is not null loop
    problem := snapbase_private.filter_problem(t, t.filter);
    if problem is null then
      update snapbase.workbook_tables set filter_columns = snapbase_private.filter_columns(t, t.filter) where id = t.id;
    else
      update snapbase.workbook_tables set filter = null, filter_columns = null where id = t.id;
      perform snapbase_private.audit('clear_unsafe_filter', 'workbook_table', t.id::text, snapbase_private.table_rel(t),
        jsonb_build_object('filter', t.filter, 'problem', problem, 'workbook_id', t.workbook_id));
    end if;
  end loop;
end $$;

--------------------------------------------------------------------------------
-- Every reader of a filtered set goes through the filter reader
--------------------------------------------------------------------------------

create or replace function snapbase.workbook_records(
  table_id bigint,
  page_size integer default null,
  "after" text default null,
  sort_column text default null,
  descending boolean default null,
  use_filter boolean default true,
  include_deleted boolean default true
) returns jsonb
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
  rel text := snapbase_private.table_rel(t);
  hide text[] := case when snapbase.current_app_role() = 'agent' then t.hidden_columns else '{}' end;
  -- An agent's default order ignores a saved sort on a column hidden from it.
  col text := coalesce(nullif(sort_column, ''), case when t.sort_column = any (hide) then null else t.sort_column end);
  desc_ boolean := coalesce(descending, t.sort_descending);
  n integer := coalesce(page_size, t.page_size);
  cur jsonb;
  cur_value text;
  cur_id bigint;
  base_where text;
  page jsonb := '[]';
  more jsonb;
  last_record jsonb;
  last_value text;
  -- The filter's text is not shown to whoever may not see a column it names.
  shown_filter text := case when use_filter and not exists (
      select 1 from jsonb_array_elements(coalesce(t.filter_columns, '[]')) c where c ->> 'name' = any (hide)) then t.filter end;
begin
  if n not between 1 and 1000 then
    raise exception 'page_size must be from 1 to 1000 (got %)', n using errcode = '22023';
  end if;
  if col is not null and (col <> all (snapbase_private.column_names(t)) or col = any (hide)) then
    raise exception 'unknown sort column %', col using errcode = '22023';
  end if;
  if "after" is not null then
    begin
      cur := convert_from(decode("after", 'base64'), 'UTF8')::jsonb;
      cur_id := (cur ->> 'id')::bigint;
      cur_value := cur ->> 'v';
    exception when others then
      raise exception 'after is not a cursor returned by workbook_records' using errcode = '22023';
    end;
    if cur_id is null or (cur ->> 'c') is distinct from col or (cur ->> 'd')::boolean is distinct from desc_ then
      raise exception 'after is a cursor for another sort order' using errcode = '22023';
    end if;
  end if;
  base_where := 'not r.__suggested_new'
    || case when include_deleted then '' else ' and not r.__deleted' end
    || case when use_filter and t.filter is not null then ' and ' || snapbase_private.filter_clause(t) else '' end;

  -- The page queries carry the filter: the filter reader runs them ($1: text[] of arguments).
  if col is null then
    page := snapbase_sandbox.read_jsonb(format(
      'select coalesce(jsonb_agg(%s order by r.__id %s), ''[]'') from (select * from %s r where %s and ($1[1]::bigint is null or r.__id %s $1[1]::bigint) order by r.__id %s limit $1[2]::integer) r',
      snapbase_private.record_json_sql(hide), case when desc_ then 'desc' else '' end, rel, base_where,
      case when desc_ then '<' else '>' end, case when desc_ then 'desc' else '' end),
      array[cur_id::text, (n + 1)::text]);
  else
    -- Non-null values first, in (value, id) order through the (column, id) index; then the nulls.
    if "after" is null or cur_value is not null then
      page := snapbase_sandbox.read_jsonb(format($q$
        select coalesce(jsonb_agg(%1$s order by r.%4$I %5$s, r.__id %5$s), '[]')
          from (select * from %2$s r
                 where %3$s and r.%4$I is not null
                   and ($1[1] is null or (r.%4$I, r.__id) %6$s ($1[1]::%7$s, $1[2]::bigint))
                 order by r.%4$I %5$s, r.__id %5$s limit $1[3]::integer) r
        $q$, snapbase_private.record_json_sql(hide), rel, base_where, col,
        case when desc_ then 'desc' else 'asc' end, case when desc_ then '<' else '>' end,
        (select p.type from snapbase_private.filter_parameters(t) p where p.name = col)),
        array[cur_value, cur_id::text, (n + 1)::text]);
    end if;
    if jsonb_array_length(page) <= n then
      more := snapbase_sandbox.read_jsonb(format($q$
        select coalesce(jsonb_agg(%1$s order by r.__id %4$s), '[]')
          from (select * from %2$s r
                 where %3$s and r.%5$I is null and ($1[1]::bigint is null or r.__id %6$s $1[1]::bigint)
                 order by r.__id %4$s limit $1[2]::integer) r
        $q$, snapbase_private.record_json_sql(hide), rel, base_where, case when desc_ then 'desc' else 'asc' end, col,
        case when desc_ then '<' else '>' end),
        array[case when cur_value is null then cur_id end::text, (n + 1 - jsonb_array_length(page))::text]);
      page := page || more;
    end if;
  end if;

  if jsonb_array_length(page) > n then
    last_record := page -> (n - 1);
    page := page - n;
    -- The cursor keeps the sort value's own text form, which casts back exactly.
    if col is not null then
      execute format('select r.%I::text from %s r where r.__id = $1', col, rel) into last_value using (last_record ->> 'id')::bigint;
    end if;
    return jsonb_build_object('records', page, 'sort_column', col, 'descending', desc_, 'filter', shown_filter,
      'next_cursor', encode(convert_to(jsonb_build_object('id', last_record -> 'id', 'c', col, 'd', desc_, 'v', last_value)::text, 'UTF8'), 'base64'));
  end if;
  return jsonb_build_object('records', page, 'sort_column', col, 'descending', desc_, 'filter', shown_filter,
    'next_cursor', null);
end;
$$;

create or replace function snapbase.workbook_record_counts(table_id bigint) returns snapbase.record_counts
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
begin
  return jsonb_populate_record(null::snapbase.record_counts, snapbase_sandbox.read_jsonb(format($q$
    select jsonb_build_object(
             'total', count(*) filter (where not r.__suggested_new),
             'filtered', count(*) filter (where not r.__suggested_new and %s),
             'dirty', count(*) filter (where r.__dirty),
             'with_suggestions', count(*) filter (where r.__suggested <> '{}' or r.__suggest_delete is not null or r.__suggested_new),
             'deleted', count(*) filter (where r.__deleted))
      from %s r$q$, snapbase_private.filter_clause(t), snapbase_private.table_rel(t)), '{}'));
end;
$$;

-- The WHERE clause choosing which records' suggestions to act on. Within the
-- filter, the matching ids are found by the filter reader first.
create or replace function snapbase_private.suggestion_scope(t snapbase.workbook_tables, record_id bigint, within_filter boolean) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
begin
  return concat_ws(' and ',
    '(r.__suggested <> ''{}'' or r.__suggest_delete is not null or r.__suggested_new)',
    case when record_id is not null then format('r.__id = %L::bigint', record_id) end,
    case when within_filter and t.filter is not null then
      format('r.__id = any (%L::bigint[])', snapbase_sandbox.read_ids(
        format('select r.__id from %s r where %s', snapbase_private.table_rel(t), snapbase_private.filter_clause(t)), '{}'))
    end);
end;
$$;

-- The query yielding a workbook table's rows as text[] (records deleted here or only
-- suggested are not part of the table), optionally within its active filter. Run it
-- with snapbase_sandbox.read_text_rows.
create or replace function snapbase_private.table_export_query(t snapbase.workbook_tables, use_filter boolean) returns text
language sql stable
set search_path = pg_catalog
as $$
  select format('select array[%s] from %s r where not r.__deleted and not r.__suggested_new and %s order by r.__id',
    (select string_agg(format('r.%I::text', c), ', ') from unnest(snapbase_private.column_names(t)) c),
    snapbase_private.table_rel(t),
    case when use_filter then snapbase_private.filter_clause(t) else 'true' end)
$$;

create or replace function snapbase.export_table_rows(table_id bigint, use_filter boolean default false) returns setof text[]
language plpgsql stable
security definer
set search_path = pg_catalog
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set extra_float_digits = 3
set bytea_output = 'hex'
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
begin
  if snapbase.current_app_role() = 'agent' then
    raise exception 'agent tokens cannot export tables' using errcode = '42501';
  end if;
  return next snapbase_private.column_names(t);
  return query select * from snapbase_sandbox.read_text_rows(snapbase_private.table_export_query(t, use_filter), '{}');
end;
$$;

create or replace function snapbase.shared_table_rows(token text) returns setof text[]
language plpgsql
security definer
set search_path = pg_catalog
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set extra_float_digits = 3
set bytea_output = 'hex'
as $$
declare
  link snapbase.share_links;
  t snapbase.workbook_tables;
begin
  select l.* into link from snapbase_private.share_link_tokens k join snapbase.share_links l on l.id = k.link_id
   where k.token_hash = public.digest(token, 'sha256')
     and l.revoked_at is null and (l.expires_at is null or l.expires_at > now());
  if link.id is null then
    raise exception 'no such share link (it may have expired or been revoked)' using errcode = 'P0002';
  end if;
  select * into t from snapbase.workbook_tables where id = link.table_id;
  update snapbase.share_links set last_used_at = now(), use_count = use_count + 1 where id = link.id;
  perform snapbase_private.audit('share_link_access', 'share_link', link.id::text, snapbase_private.table_rel(t),
    jsonb_build_object('workbook_id', t.workbook_id, 'table_id', t.id));
  return next snapbase_private.column_names(t);
  return query select * from snapbase_sandbox.read_text_rows(snapbase_private.table_export_query(t, link.use_filter), '{}');
end;
$$;

--! split: 012-containment-changes.sql
--------------------------------------------------------------------------------
-- Containment, part 3: change SQL runs with no more rights than its author.
--------------------------------------------------------------------------------
-- Checked at submission and again at approval, from PostgreSQL's parse tree
-- (snapbase_private.probe_user_text; nothing is planned or run to check it):
--   * at most 1 MB, exactly one INSERT, UPDATE, DELETE or MERGE;
--   * it writes only its managed table (data-modifying CTEs included);
--   * every function and operator is a side-effect-free built-in: no dynamic SQL
--     (query_to_xml …), no set_config or current_setting, no advisory locks, no
--     large objects, nothing of Snapbase's own, nextval only on the table's own
--     sequences;
--   * every table and column it reads can be read by the submitter (as they are
--     now), and the submitter can read the managed table itself.
-- It then runs as the change runner role, which has no rights of its own: for the
-- approving transaction only, it is granted the managed table (and SELECT on what
-- the change reads). So a function that slipped through the allow-list would
-- still reach nothing else. Approval runs as the owner (SECURITY DEFINER) and
-- checks the caller's admin role itself.

drop function if exists snapbase_private.validate_change_sql_as_owner(regclass, text) cascade;
drop function if exists snapbase_private.validate_change_sql(regclass, text) cascade;
drop function if exists snapbase_private.check_change_sql(regclass, text, name[]) cascade;
drop function if exists snapbase_private.submitter_roles(snapbase.change_requests) cascade;
drop function if exists snapbase_private.db_role(text) cascade;
drop function if exists snapbase_private.acting_role() cascade;
drop function if exists snapbase_private.execute_change(regclass, text, snapbase_private.probe_result) cascade;
drop function if exists snapbase_sandbox.run_change(text, text) cascade;

alter table snapbase.change_requests add column if not exists submitted_role name;
comment on column snapbase.change_requests.submitted_role is
  E'@behavior -*\nThe database role the submitter acted as; the change may read only what this role (and the submitter''s current role) may read.';

-- The database role of a Snapbase user role.
create function snapbase_private.db_role(app_role text) returns name
language sql immutable
set search_path = pg_catalog
as $$
  select case app_role when 'admin' then ':ROLE_ADMIN' when 'editor' then ':ROLE_EDITOR' when 'viewer' then ':ROLE_VIEWER' end::name
$$;

-- The role whose rights bound what the caller submits: the request's role; for a
-- job acting for a user (no role set, claims set), that user's role; in psql, the
-- database user.
create function snapbase_private.acting_role() returns name
language sql stable
set search_path = pg_catalog
as $$
  select case
    when nullif(current_setting('role'), 'none') is not null then snapbase_private.caller_role()
    when snapbase.current_user_id() is not null then
      coalesce((select snapbase_private.db_role(u.role::text) from snapbase.users u where u.id = snapbase.current_user_id()), ':ROLE_ANONYMOUS')
    else session_user::name
  end
$$;

-- The roles whose reading rights a change may use: the one it was submitted as and,
-- when its submitter is a user, that user's current role (a demotion takes effect).
create function snapbase_private.submitter_roles(cr snapbase.change_requests) returns name[]
language sql stable
set search_path = pg_catalog
as $$
  select array_remove(array[
    coalesce(cr.submitted_role, snapbase_private.db_role('editor')),
    case when cr.submitted_by is not null then
      coalesce((select snapbase_private.db_role(u.role::text) from snapbase.users u where u.id = cr.submitted_by), ':ROLE_ANONYMOUS') end
  ], null)
$$;

-- Checks change SQL for `target`, read with the rights of every role in `readers`.
-- Raises a clear error (and names the part) when anything is not allowed; returns
-- the parse tree's findings otherwise.
create function snapbase_private.check_change_sql(target regclass, change_sql text, readers name[])
returns snapbase_private.probe_result
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  target_schema text := (select n.nspname from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = target);
  probe snapbase_private.probe_result;
  cleaned text := rtrim(btrim(change_sql), E'; \t\r\n');
  unreadable text;
  r name;
begin
  if cleaned is null or cleaned = '' then
    raise exception 'the change SQL is empty' using errcode = '22023';
  end if;
  if octet_length(change_sql) > 1024 * 1024 then
    raise exception 'the change SQL is % bytes; at most 1 MB (1048576 bytes) is accepted', octet_length(change_sql)
      using errcode = '54000';
  end if;
  foreach r in array readers loop
    if not coalesce(has_any_column_privilege(r, target, 'SELECT'), false) then
      raise exception 'you may not read %, so you cannot change it', target using errcode = '42501';
    end if;
  end loop;
  probe := snapbase_private.probe_user_text('returns void language sql begin atomic ', cleaned, E'\n; end', '',
    format('pg_catalog, %I', target_schema), 'change');
  if probe.statements <> 1 or probe.command_type not in (2, 3, 4, 5) then
    raise exception 'the change must be exactly one INSERT, UPDATE, DELETE or MERGE statement' using errcode = '42601';
  end if;
  if cardinality(probe.problems) > 0 then
    raise exception 'the change may not use %', array_to_string(probe.problems, ', ') using errcode = '42501';
  end if;
  if probe.written is distinct from array[target::oid] then
    raise exception 'the change may modify only %, but it modifies %', target,
      coalesce((select string_agg(w::regclass::text, ', ' order by w::regclass::text) from unnest(probe.written) w), 'nothing')
      using errcode = '42501';
  end if;
  -- Every relation it names: the table, its own sequences, or something every reader may read.
  foreach r in array readers loop
    select string_agg(rel::regclass::text, ', ' order by rel::regclass::text) into unreadable
      from unnest(probe.relations) rel
      join pg_class c on c.oid = rel
      join pg_namespace n on n.oid = c.relnamespace
     where rel <> target
       and not (c.relkind = 'S' and exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass and d.objid = rel
                                                and d.refobjid = target and d.deptype in ('a', 'i')))
       and (n.nspname in ('pg_catalog', 'information_schema', 'pg_toast', 'snapbase', 'snapbase_private', 'snapbase_sandbox',
                          'graphile_worker', 'graphile_migrate')
            or n.nspname like 'workbook\_%'
            or c.relkind = 'S'
            or not (
              coalesce(has_table_privilege(r, rel, 'SELECT'), false)
              or (jsonb_array_length(probe.columns -> rel::text) > 0
                  and not exists (select 1 from jsonb_array_elements_text(probe.columns -> rel::text) a
                                   where not coalesce(has_column_privilege(r, rel, a::smallint, 'SELECT'), false)))));
    if unreadable is not null then
      raise exception 'the change reads %, which you may not read', unreadable using errcode = '42501';
    end if;
    -- Columns of the table itself it reads or writes must be readable too.
    select string_agg(a.attname, ', ') into unreadable
      from jsonb_array_elements_text(coalesce(probe.columns -> target::oid::text, '[]')) x
      join pg_attribute a on a.attrelid = target and a.attnum = x::smallint
     where not coalesce(has_column_privilege(r, target, a.attnum, 'SELECT'), false);
    if unreadable is not null then
      raise exception 'the change uses columns of % you may not read: %', target, unreadable using errcode = '42501';
    end if;
  end loop;
  return probe;
end;
$$;
comment on function snapbase_private.check_change_sql(regclass, text, name[]) is
  'Checks change SQL from its parse tree (never planned or run): one INSERT/UPDATE/DELETE/MERGE of the target only, side-effect-free built-ins only, reads limited to what the readers may read. Raises with the reason.';

--------------------------------------------------------------------------------
-- The change runner's only entry point (owned by it; the owner alone may call it)
--------------------------------------------------------------------------------

grant create on schema snapbase_sandbox to :ROLE_CHANGE_RUNNER;
create function snapbase_sandbox.run_change(change_sql text, path text) returns bigint
language plpgsql security definer
set search_path = pg_catalog
as $$
declare
  n bigint;
begin
  perform set_config('search_path', path, true);
  execute change_sql;
  get diagnostics n = row_count;
  return n;
end;
$$;
alter function snapbase_sandbox.run_change(text, text) owner to :ROLE_CHANGE_RUNNER;
revoke create on schema snapbase_sandbox from :ROLE_CHANGE_RUNNER;
revoke all on function snapbase_sandbox.run_change(text, text) from public;
grant execute on function snapbase_sandbox.run_change(text, text) to :DATABASE_OWNER;
comment on function snapbase_sandbox.run_change(text, text) is
  'Runs checked change SQL as the change runner, which holds (for the approving transaction only) the managed table and what the change reads. Owner only.';

-- Runs checked change SQL for `target` as the change runner and returns the rows
-- affected. The runner is granted what the change needs for this transaction only:
-- the grants are revoked before returning (and undone with it on error).
create function snapbase_private.execute_change(target regclass, change_sql text, probe snapbase_private.probe_result)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  runner name := snapbase_private.sandbox_role('change_runner');
  rel oid;
  seqs oid[];
  reads oid[];
  schemas oid[];
  sch oid;
  affected bigint;
  missing text;
begin
  select coalesce(array_agg(d.objid), '{}') into seqs
    from pg_depend d join pg_class c on c.oid = d.objid
   where d.classid = 'pg_class'::regclass and d.refobjid = target and d.deptype in ('a', 'i') and c.relkind = 'S';
  reads := array(select x from unnest(probe.relations) x where x <> target and x <> all (seqs));
  select array_agg(distinct c.relnamespace order by c.relnamespace) into schemas
    from pg_class c where c.oid = any (array[target::oid] || reads);
  -- The owner can only pass on what it may pass on.
  select string_agg(x::regclass::text, ', ') into missing from unnest(array[target::oid]) x
   where not (has_table_privilege(x, 'SELECT WITH GRANT OPTION') and has_table_privilege(x, 'INSERT WITH GRANT OPTION')
              and has_table_privilege(x, 'UPDATE WITH GRANT OPTION') and has_table_privilege(x, 'DELETE WITH GRANT OPTION'));
  select concat_ws(', ', missing, string_agg(x::regclass::text, ', ')) into missing from unnest(reads) x
   where not has_table_privilege(x, 'SELECT WITH GRANT OPTION');
  if missing <> '' then
    raise exception 'Snapbase''s owner cannot let the change use %: run GRANT ALL ON % TO % WITH GRANT OPTION', missing, missing, current_user
      using errcode = '42501';
  end if;
  -- Schema USAGE lets the runner find names; it is kept (it grants no data). One
  -- approval at a time changes a schema's grants.
  foreach sch in array schemas loop
    if not has_schema_privilege(runner, sch, 'USAGE') then
      perform pg_advisory_xact_lock(hashtext('snapbase schema grant'), sch::int);
      if not has_schema_privilege(runner, sch, 'USAGE') then
        execute format('grant usage on schema %I to %I', (select nspname from pg_namespace where oid = sch), runner);
      end if;
    end if;
  end loop;
  -- The target is locked by the approval; other relations' grants are serialised.
  foreach rel in array reads loop
    perform pg_advisory_xact_lock(hashtext('snapbase relation grant'), rel::int);
  end loop;
  execute format('grant select, insert, update, delete on table %s to %I', target, runner);
  foreach rel in array seqs loop
    execute format('grant usage, select on sequence %s to %I', rel::regclass, runner);
  end loop;
  foreach rel in array reads loop
    execute format('grant select on table %s to %I', rel::regclass, runner);
  end loop;

  affected := snapbase_sandbox.run_change(change_sql,
    format('pg_catalog, %I', (select n.nspname from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = target)));

  execute format('revoke all on table %s from %I', target, runner);
  foreach rel in array seqs loop
    execute format('revoke all on sequence %s from %I', rel::regclass, runner);
  end loop;
  foreach rel in array reads loop
    execute format('revoke all on table %s from %I', rel::regclass, runner);
  end loop;
  return affected;
end;
$$;
comment on function snapbase_private.execute_change(regclass, text, snapbase_private.probe_result) is
  'Runs checked change SQL as the change runner with grants that last only while it runs.';

--------------------------------------------------------------------------------
-- Submitting
--------------------------------------------------------------------------------

create or replace function snapbase_private.store_change_request(
  mt snapbase.managed_tables, kind snapbase.change_kind, change_sql text, edits jsonb, reason text, restore_snapshot_id bigint
) returns snapbase.change_requests
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  created snapbase.change_requests;
begin
  insert into snapbase.change_requests (managed_table_id, table_name, kind, sql, edits, reason, restore_snapshot_id,
                                        submitted_by, submitted_by_name, submitted_role)
  values (mt.id, mt.qualified_name, kind, change_sql, edits, reason, restore_snapshot_id,
          snapbase.current_user_id(), snapbase_private.actor_name(), snapbase_private.acting_role())
  returning * into created;
  perform snapbase_private.audit('submit', 'change_request', created.id::text, mt.qualified_name,
    jsonb_build_object('kind', kind, 'sql', change_sql, 'reason', reason));
  return created;
end;
$$;

-- The managed table behind `target`, for a submitter who may read it ("no managed
-- table" alike for tables that are not managed and for those you may not read).
create or replace function snapbase_private.managed_table_for(target regclass) returns snapbase.managed_tables
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  found snapbase.managed_tables;
begin
  select m.* into found from snapbase.managed_tables m where snapbase_private.relation_of(m) = target;
  if found.id is null or not coalesce(has_any_column_privilege(snapbase_private.acting_role(), target, 'SELECT'), false) then
    raise exception 'no managed table % that you may read (register it with snapbase.register_table)', target
      using errcode = '42501';
  end if;
  return found;
end;
$$;

create or replace function snapbase.submit_change(target regclass, sql text, reason text default null)
returns snapbase.change_requests
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  mt snapbase.managed_tables;
begin
  perform snapbase_private.require_role('editor');
  mt := snapbase_private.managed_table_for(target);
  perform snapbase_private.check_change_sql(target, sql, array[snapbase_private.acting_role()]);
  return snapbase_private.store_change_request(mt, 'sql', rtrim(btrim(sql), E'; \t\r\n'), null, reason, null);
end;
$$;

create or replace function snapbase.submit_edits(target regclass, edits jsonb, reason text default null)
returns snapbase.change_requests
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  mt snapbase.managed_tables;
  generated text;
begin
  perform snapbase_private.require_role('editor');
  mt := snapbase_private.managed_table_for(target);
  generated := snapbase_private.edits_to_sql(target, edits);
  perform snapbase_private.check_change_sql(target, generated, array[snapbase_private.acting_role()]);
  return snapbase_private.store_change_request(mt, 'edits', generated, edits, reason, null);
end;
$$;

--------------------------------------------------------------------------------
-- Approving
--------------------------------------------------------------------------------

-- Approval runs as the owner and checks the caller itself: an admin who may read
-- the table, not the submitter (unless allowed). The change runs as the change
-- runner; a restore (SQL Snapbase generates from a snapshot) runs as the owner.
-- A failure is recorded (failed, with SQLSTATE and message), audited, and raised
-- as a WARNING so that psql shows it.
create or replace function snapbase.approve_change(change_id bigint) returns snapbase.change_requests
language plpgsql
security definer
set search_path = pg_catalog
set client_min_messages = warning
as $$
declare
  cr snapbase.change_requests;
  mt snapbase.managed_tables;
  target regclass;
  affected bigint;
  err_code text;
  err_message text;
  snap snapbase.snapshots;
  probe snapbase_private.probe_result;
  done snapbase.change_requests;
begin
  perform snapbase_private.require_role('admin');
  cr := snapbase_private.lock_pending_change(change_id);
  select * into mt from snapbase.managed_tables where id = cr.managed_table_id;
  if not snapbase_private.can_read(mt) then
    raise exception 'no change request %', change_id using errcode = 'P0002';
  end if;
  if cr.kind <> 'restore' and cr.submitted_by is not null and cr.submitted_by = snapbase.current_user_id()
     and snapbase_private.setting_allow_self_approval() is not true then
    raise exception 'you submitted change request %; another admin must approve it', change_id using errcode = '42501';
  end if;
  target := snapbase_private.relation_of(mt);
  if target is null then
    done := snapbase_private.finish_change(change_id, 'failed', null, null, '42P01', format('table %s no longer exists', cr.table_name), null);
    raise warning 'change request % failed: table % no longer exists (SQLSTATE 42P01)', change_id, cr.table_name;
    return done;
  end if;
  -- Writers wait until this transaction ends; readers carry on.
  execute format('lock table %s in exclusive mode', target);
  begin
    if cr.kind = 'restore' then
      affected := snapbase_private.apply_restore(cr.restore_snapshot_id, target);
    else
      -- Checked again now: the table, the allow-list or the submitter's rights may have changed.
      probe := snapbase_private.check_change_sql(target, cr.sql, snapbase_private.submitter_roles(cr));
      affected := snapbase_private.execute_change(target, cr.sql, probe);
      if cr.kind = 'edits' then
        perform snapbase_private.check_edits_applied(cr.edits, affected);
      end if;
    end if;
  exception when others then
    get stacked diagnostics err_code = returned_sqlstate, err_message = message_text;
    -- Only the message (no DETAIL or HINT), and not without bound.
    err_message := left(err_message, 2000);
    done := snapbase_private.finish_change(change_id, 'failed', null, null, err_code, err_message, null);
    raise warning 'change request % failed: % (SQLSTATE %)', change_id, err_message, err_code;
    return done;
  end;
  snap := snapbase_private.capture_for_change(cr);
  return snapbase_private.finish_change(change_id, 'approved', affected, snap.id, null, null, null);
end;
$$;

create or replace function snapbase.reject_change(change_id bigint, reason text default null) returns snapbase.change_requests
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  cr snapbase.change_requests;
  mt snapbase.managed_tables;
begin
  perform snapbase_private.require_role('admin');
  cr := snapbase_private.lock_pending_change(change_id);
  select * into mt from snapbase.managed_tables where id = cr.managed_table_id;
  if not snapbase_private.can_read(mt) then
    raise exception 'no change request %', change_id using errcode = 'P0002';
  end if;
  return snapbase_private.finish_change(change_id, 'rejected', null, null, null, null, reason);
end;
$$;

-- Functions approve_change no longer needs to expose to the admin role.
revoke execute on function snapbase_private.lock_pending_change(bigint) from :ROLE_ADMIN;
revoke execute on function snapbase_private.finish_change(bigint, snapbase.change_status, bigint, bigint, text, text, text) from :ROLE_ADMIN;
revoke execute on function snapbase_private.capture_for_change(snapbase.change_requests) from :ROLE_ADMIN;
revoke execute on function snapbase_private.apply_restore(bigint, regclass) from :ROLE_ADMIN;
revoke execute on function snapbase_private.snapshot_records(bigint) from :ROLE_ADMIN;
revoke execute on function snapbase_private.edits_to_sql(regclass, jsonb) from :ROLE_VIEWER;

--! split: 013-containment-type-names.sql
--------------------------------------------------------------------------------
-- Containment, part 4: type names from users are data.
--------------------------------------------------------------------------------
-- A type name (column specs, scratch columns, CSV import mappings, CSV column
-- types) is never put into SQL as written. snapbase_private.resolve_type reads it
-- as a name, optional modifiers and optional [], resolves the name with to_regtype,
-- computes the modifiers with the type's own typmod input function, and returns
-- PostgreSQL's canonical spelling (format_type). Only that is put into DDL or casts.

drop function if exists snapbase_private.resolve_type(text) cascade;

create function snapbase_private.resolve_type(type_name text) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  parts text[];
  base regtype;
  t pg_type;
  mods text[];
  typmod integer := -1;
  canonical text;
begin
  if type_name is null or length(type_name) > 100 then
    raise exception 'a type name is required (at most 100 characters)' using errcode = '22023';
  end if;
  -- words, optional (n[, n]), optional trailing words (timestamp(3) with time zone), optional []
  parts := regexp_match(lower(btrim(type_name)),
    '^([a-z][a-z0-9_]*(?: [a-z][a-z0-9_]*)*)(?: ?\( *(\d{1,5}) *(?:, *(-?\d{1,5}) *)?\))?((?: [a-z][a-z0-9_]*)*)( ?\[ *\])*$');
  if parts is null then
    raise exception 'type % is not a type name (letters, digits and _, optional modifiers such as (10,2), optional [])', quote_literal(type_name)
      using errcode = '22023';
  end if;
  begin
    base := to_regtype(parts[1] || coalesce(parts[4], ''));
  exception when others then
    base := null;
  end;
  if base is null then
    raise exception 'unknown type %', type_name using errcode = '22023';
  end if;
  select * into t from pg_type where oid = base;
  if t.typnamespace <> 'pg_catalog'::regnamespace or t.typtype not in ('b', 'r', 'm')
     or t.typname ~ '^(reg|pg_|_)' or t.typname in ('oid', 'xid', 'xid8', 'cid', 'tid', 'aclitem', 'refcursor', 'gtsvector',
                                                    'int2vector', 'oidvector', 'txid_snapshot', 'unknown', 'cstring') then
    raise exception 'type % is not supported (built-in scalar, range and array types only)', quote_literal(type_name)
      using errcode = '22023';
  end if;
  mods := array_remove(array[parts[2], parts[3]], null);
  if cardinality(mods) > 0 then
    if t.typmodin = 0 then
      raise exception 'type % takes no modifiers', format_type(base, null) using errcode = '22023';
    end if;
    begin
      -- The type's own modifier parser (from the catalog) validates and encodes them.
      execute format('select %s($1::cstring[])', t.typmodin) into typmod using mods;
    exception when others then
      raise exception 'type %: %', quote_literal(type_name), sqlerrm using errcode = '22023';
    end;
  end if;
  canonical := format_type(case when parts[5] is not null then t.typarray else base end, typmod);
  if parts[5] is not null and t.typarray = 0 then
    raise exception 'type % has no array type', format_type(base, null) using errcode = '22023';
  end if;
  return canonical;
end;
$$;
comment on function snapbase_private.resolve_type(text) is
  'A user''s type name as PostgreSQL''s canonical spelling (format_type of to_regtype, modifiers through the type''s typmodin), or 22023. Only built-in scalar, range and array types.';

-- Validates one column spec {name, type, read_only?, scratch?} and returns it with
-- the canonical type.
create or replace function snapbase_private.check_column_spec(spec jsonb) returns jsonb
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  col_name text := spec ->> 'name';
  col_type text;
begin
  if jsonb_typeof(spec) is distinct from 'object' or col_name is null or length(col_name) not between 1 and 63
     or octet_length(col_name) > 63 then
    raise exception 'each column needs a name of 1 to 63 characters (got %)', left(coalesce(spec::text, 'null'), 200) using errcode = '22023';
  end if;
  if col_name like '\_\_%' then
    raise exception 'column names starting with __ are reserved for metadata (got %)', col_name using errcode = '22023';
  end if;
  if jsonb_typeof(spec -> 'type') is distinct from 'string' then
    raise exception 'column %: type must be a type name' , col_name using errcode = '22023';
  end if;
  begin
    col_type := snapbase_private.resolve_type(spec ->> 'type');
  exception when others then
    raise exception 'column %: %', col_name, sqlerrm using errcode = '22023';
  end;
  if jsonb_typeof(coalesce(spec -> 'read_only', 'false')) <> 'boolean' or jsonb_typeof(coalesce(spec -> 'scratch', 'false')) <> 'boolean' then
    raise exception 'column %: read_only and scratch must be true or false', col_name using errcode = '22023';
  end if;
  return jsonb_build_object('name', col_name, 'type', col_type,
    'read_only', coalesce((spec ->> 'read_only')::boolean, false), 'scratch', coalesce((spec ->> 'scratch')::boolean, false));
end;
$$;

-- Why a text does not fit a type (null when it does). An empty field is NULL.
create or replace function snapbase_private.cast_error(value text, type text) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  canonical text := snapbase_private.resolve_type(type);
begin
  if value is null or (value = '' and canonical <> 'text') then
    return null;
  end if;
  execute format('select $1::%s', canonical) using value;
  return null;
exception when data_exception then
  return sqlerrm;
end;
$$;

-- The typed value of cell i of a staged row s; an empty field is NULL except in text.
create or replace function snapbase_private.typed_cell_sql(i integer, type text) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  canonical text := snapbase_private.resolve_type(type);
begin
  return format('case when s.cells[%1$s] = %3$L and %2$L <> %4$L then null else s.cells[%1$s]::%2$s end', i, canonical, '', 'text');
end;
$$;

-- The effective mapping as rows (csv index, header, table column, its type, new
-- scratch?), checked against the table. Types are canonical: a new scratch
-- column's through resolve_type, an existing column's from the catalog.
create or replace function snapbase_private.import_mapping(imp snapbase.csv_imports, t snapbase.workbook_tables, mapping jsonb)
returns table (idx integer, header text, col text, col_type text, new_scratch boolean, read_only boolean)
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  bad text;
  spec jsonb;
  h text;
begin
  if mapping is not null and jsonb_typeof(mapping) <> 'object' then
    raise exception 'mapping must be an object {"CSV header": "table column" | null | {"new_scratch": name, "type": type}}' using errcode = '22023';
  end if;
  select string_agg(k, ', ') into bad from jsonb_object_keys(coalesce(mapping, '{}')) k where k <> all (imp.header);
  if bad is not null then
    raise exception 'the mapping names headers the file does not have: %', left(bad, 500) using errcode = '22023';
  end if;
  for h, spec in select e.key, e.value from jsonb_each(coalesce(mapping, '{}')) e loop
    if jsonb_typeof(spec) not in ('string', 'null', 'object') then
      raise exception 'mapping of %: a column name, null, or {"new_scratch": name, "type": type}', h using errcode = '22023';
    end if;
    if jsonb_typeof(spec) = 'object' and (jsonb_typeof(spec -> 'new_scratch') is distinct from 'string'
         or exists (select 1 from jsonb_object_keys(spec) k where k not in ('new_scratch', 'type'))) then
      raise exception 'mapping of %: a new scratch column is {"new_scratch": name, "type": type}', h using errcode = '22023';
    end if;
  end loop;
  return query
    with wanted as (
      select h.ord::integer as idx, h.name as header,
             case when mapping is null or not mapping ? h.name
                  then (select c ->> 'name' from jsonb_array_elements(t.columns) c where lower(c ->> 'name') = lower(h.name) limit 1)
                  when jsonb_typeof(mapping -> h.name) = 'string' then mapping ->> h.name
                  when jsonb_typeof(mapping -> h.name) = 'object' then mapping -> h.name ->> 'new_scratch'
             end as col,
             jsonb_typeof(mapping -> h.name) = 'object' as new_scratch,
             mapping -> h.name -> 'type' as scratch_type
        from unnest(imp.header) with ordinality as h(name, ord)
    )
    select w.idx, w.header, w.col,
           snapbase_private.check_column_spec(jsonb_build_object('name', w.col, 'type', coalesce(w.scratch_type, '"text"'), 'scratch', true)) ->> 'type',
           true, false
      from wanted w where w.col is not null and w.new_scratch
    union all
    select w.idx, w.header, w.col, p.type, false, coalesce((c ->> 'read_only')::boolean, false)
      from wanted w
      join jsonb_array_elements(t.columns) c on c ->> 'name' = w.col
      join snapbase_private.filter_parameters(t) p on p.name = w.col
     where w.col is not null and not coalesce(w.new_scratch, false)
    order by 1;
  select string_agg(format('%s → %s', h.name, mapping ->> h.name), ', ') into bad
    from unnest(imp.header) h
   where jsonb_typeof(mapping -> h.name) = 'string'
     and not exists (select 1 from jsonb_array_elements(t.columns) c where c ->> 'name' = mapping ->> h.name);
  if bad is not null then
    raise exception 'the mapping names columns the table does not have: %', left(bad, 500) using errcode = '22023';
  end if;
end;
$$;

-- CSV files' column type overrides are canonical type names too.
create or replace function snapbase.set_csv_column_types(file_id bigint, column_types jsonb) returns snapbase.csv_files
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  f snapbase.csv_files := snapbase_private.require_csv_file(file_id);
  checked jsonb;
begin
  if jsonb_typeof(column_types) is distinct from 'object' then
    raise exception 'column_types must be a JSON object {"column": "type"}' using errcode = '22023';
  end if;
  if exists (select 1 from jsonb_each(column_types) e where jsonb_typeof(e.value) not in ('string', 'null')) then
    raise exception 'each column type must be a type name (text), or null to infer it again' using errcode = '22023';
  end if;
  select coalesce(jsonb_object_agg(e.key, snapbase_private.check_column_spec(jsonb_build_object('name', e.key, 'type', e.value)) ->> 'type'), '{}')
    into checked
    from jsonb_each(column_types) e where jsonb_typeof(e.value) = 'string';
  update snapbase.csv_files cf set column_types = checked where cf.id = f.id returning * into f;
  perform snapbase_private.audit('set_csv_column_types', 'csv_file', f.id::text, null, jsonb_build_object('column_types', checked));
  return f;
end;
$$;

--! split: 014-containment-connectors.sql
--------------------------------------------------------------------------------
-- Containment, part 5: connectors reach allowed hosts only, never this database,
-- and no request can read the key that protects their credentials.
--------------------------------------------------------------------------------
-- Credentials are sealed with an OpenPGP public key (pgcrypto's pgp_pub_encrypt):
-- sealing needs no secret, so requests and psql store credentials without any key
-- in reach. The matching secret key is kept sealed under SNAPBASE_CREDENTIALS_KEY
-- (AES-256-GCM, by the server at its first start), and only the worker unseals it
-- to open credentials (src/connectors/credential-keys.ts). Credentials stored
-- before are re-sealed at the worker's start (it holds the old symmetric key).
--
-- Hosts: every host a connector names is checked when the account is created or
-- rotated, and each address it resolves to is checked again by the worker right
-- before it connects (DNS can change); the worker then connects to that checked
-- address. The rules are snapbase_private.connector_address_problem's. And a
-- PostgreSQL connector refuses any database holding this installation's marker.

drop function if exists snapbase_private.credentials_key() cascade;
drop function if exists snapbase_private.account_credentials(bigint, text) cascade;
drop function if exists snapbase_private.account_credentials(bigint, bytea) cascade;
drop function if exists snapbase_private.seal_credentials(jsonb) cascade;
drop function if exists snapbase_private.connector_address_problem(text, inet) cascade;
drop function if exists snapbase_private.connector_hosts_of(text, jsonb) cascade;
drop function if exists snapbase.set_connector_allowed_hosts(text[]) cascade;
drop function if exists snapbase.connector_allowed_hosts() cascade;

alter table snapbase_private.connector_credentials add column if not exists scheme text not null default 'symmetric'
  check (scheme in ('symmetric', 'public_key'));
comment on column snapbase_private.connector_credentials.scheme is
  'public_key: sealed with the credentials public key; symmetric: sealed before 2026-11 with SNAPBASE_CREDENTIALS_KEY, re-sealed by the worker at start.';

-- A marker PostgreSQL connectors look for: a source holding it is this database.
insert into snapbase_private.settings (key, value) values ('installation_id', gen_random_uuid()::text)
  on conflict (key) do nothing;
do $$ begin
  execute format('comment on schema snapbase_private is %L',
    format('Secrets, storage and internals. Never exposed. (Snapbase installation %s)', snapbase_private.setting('installation_id')));
end $$;

create function snapbase_private.seal_credentials(credentials jsonb) returns bytea
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  public_key text := snapbase_private.setting('credentials_public_key');
begin
  if public_key is null then
    raise exception 'connector credentials cannot be stored yet: start the server once with SNAPBASE_CREDENTIALS_KEY set (it creates the credentials key)'
      using errcode = '55000';
  end if;
  return public.pgp_pub_encrypt(credentials::text, decode(public_key, 'base64'));
end;
$$;
comment on function snapbase_private.seal_credentials(jsonb) is
  'Seals connector credentials with the public key; only the worker (holding the secret key) can open them.';

-- For the worker only (the owner): the credentials, opened with the secret key it unsealed.
create function snapbase_private.account_credentials(account_id bigint, secret_key bytea) returns jsonb
language sql stable
set search_path = pg_catalog
as $$
  select public.pgp_pub_decrypt(c.secret, secret_key)::jsonb from snapbase_private.connector_credentials c
   where c.account_id = account_credentials.account_id and c.scheme = 'public_key'
$$;

--------------------------------------------------------------------------------
-- Which hosts connectors may reach
--------------------------------------------------------------------------------
-- Rules (snapbase_private.settings): `connector_hosts` comes from the environment
-- (SNAPBASE_CONNECTOR_HOSTS), `connector_hosts_admin` from set_connector_allowed_hosts;
-- both are JSON arrays of entries: a host name (`db.example.com`, `*.example.com`),
-- an address or network (`10.1.2.3`, `10.0.0.0/8`, `fd00::/8`), `public` (every
-- address that is not loopback, private, link-local or unique-local) or `*`
-- (anything). With no entry at all: `public` in production, `*` otherwise.

create function snapbase_private.connector_address_problem(host text, address inet default null) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  entries jsonb := coalesce(snapbase_private.setting('connector_hosts')::jsonb, '[]')
                || coalesce(snapbase_private.setting('connector_hosts_admin')::jsonb, '[]');
  h text := lower(rtrim(btrim(coalesce(host, '')), '.'));
  ip inet := address;
  local_ boolean;
  entry text;
begin
  if h = '' then
    return 'the connector names no host';
  end if;
  if jsonb_array_length(entries) = 0 then
    entries := case when snapbase_private.setting('environment') = 'production' then '["public"]' else '["*"]' end;
  end if;
  if ip is null then
    begin
      ip := trim(both '[]' from h)::inet;
    exception when others then
      ip := null;
    end;
  end if;
  if left(h, 1) = '/' then
    -- A Unix socket is this machine.
    local_ := true;
  elsif ip is not null then
    local_ := ip << inet '127.0.0.0/8' or ip = inet '::1' or ip << inet '10.0.0.0/8' or ip << inet '172.16.0.0/12'
           or ip << inet '192.168.0.0/16' or ip << inet '169.254.0.0/16' or ip << inet '100.64.0.0/10' or ip << inet 'fc00::/7'
           or ip << inet 'fe80::/10' or ip = inet '0.0.0.0' or ip = inet '::' or ip << inet '::ffff:0.0.0.0/96';
  else
    local_ := h = 'localhost' or h like '%.localhost' or h like '%.local' or h like '%.internal' or position('.' in h) = 0;
  end if;
  for entry in select lower(btrim(e)) from jsonb_array_elements_text(entries) e loop
    if entry = '*' or entry = h or (entry like '*.%' and h like '%' || substr(entry, 2)) then
      return null;
    end if;
    if entry = 'public' and not local_ then
      return null;
    end if;
    if ip is not null and entry ~ '^[0-9a-f.:]+(/\d{1,3})?$' then
      begin
        if ip <<= entry::inet then
          return null;
        end if;
      exception when others then
        null;
      end;
    end if;
  end loop;
  return format('connectors may not reach %s%s: it is not on the allowed hosts list (SNAPBASE_CONNECTOR_HOSTS or snapbase.set_connector_allowed_hosts)',
    host, case when address is not null and address::text <> h then format(' (%s)', host(address)) else '' end);
end;
$$;
comment on function snapbase_private.connector_address_problem(text, inet) is
  'Why a connector may not reach this host (and the address it resolved to), or null. Used when an account is created and by the worker before each connection.';

-- The host a connector's credentials name.
create function snapbase_private.connector_hosts_of(kind text, credentials jsonb) returns text
language plpgsql immutable
set search_path = pg_catalog
as $$
declare
  url text := credentials ->> 'connection_string';
  m text[];
begin
  if kind = 'mysql' then
    return credentials ->> 'host';
  elsif kind = 'postgres' then
    -- postgres://user:password@host:port/db?host=... (a host parameter wins, as in libpq).
    m := regexp_match(url, '[?&]host=([^&]*)');
    if m is not null then
      return m[1];
    end if;
    -- The user part ends at the last @ before the path (a password may hold @).
    m := regexp_match(url, '^postgres(?:ql)?://(?:[^/?#]*@)?(\[[^\]]*\]|[^:/?#,@]*)');
    return nullif(coalesce(m[1], ''), '');
  end if;
  return null;
end;
$$;

-- Checks the credentials' shape for the kind and where they lead; returns the
-- summary shown instead of them (no password, wherever it was written).
create or replace function snapbase_private.check_credentials(kind text, credentials jsonb) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  url text := credentials ->> 'connection_string';
  f snapbase.csv_files;
  host text;
  problem text;
begin
  if jsonb_typeof(credentials) is distinct from 'object' then
    raise exception 'credentials must be a JSON object' using errcode = '22023';
  end if;
  if kind in ('postgres', 'mysql') then
    host := snapbase_private.connector_hosts_of(kind, credentials);
    if kind = 'postgres' and (url is null or url !~ '^postgres(ql)?://') then
      raise exception 'postgres credentials need a connection_string (postgres://user:password@host:5432/database)' using errcode = '22023';
    end if;
    if kind = 'postgres' and (url ~ '^postgres(ql)?://[^/?#]*,' or url ~ '[?&]host=[^&]*,') then
      raise exception 'a postgres connection string may name one host only' using errcode = '22023';
    end if;
    if kind = 'mysql' and (credentials ->> 'host' is null or credentials ->> 'user' is null or credentials ->> 'database' is null) then
      raise exception 'mysql credentials need host, user, database (and password, port)' using errcode = '22023';
    end if;
    problem := snapbase_private.connector_address_problem(host);
    if problem is not null then
      raise exception '%', problem using errcode = '42501';
    end if;
  end if;
  case kind
    when 'postgres' then
      return format('postgres://%s%s%s',
        coalesce(nullif(substring(url from '^postgres(?:ql)?://([^:/?#@]*)[^/?#]*@'), '') || '@', ''),
        host,
        coalesce(substring(url from '^postgres(?:ql)?://(?:[^/?#]*@)?(?:\[[^\]]*\]|[^:/?#@]*)((?::\d+)?/[^?#]*)'), ''));
    when 'mysql' then
      return format('%s@%s:%s/%s', credentials ->> 'user', credentials ->> 'host', coalesce(credentials ->> 'port', '3306'), credentials ->> 'database');
    when 'managed' then
      return 'managed tables of this database (publishing goes through change requests)';
    when 'csv' then
      if coalesce(jsonb_typeof(credentials -> 'file_id'), 'missing') not in ('number', 'string')
         or coalesce(credentials ->> 'file_id', '') !~ '^[1-9][0-9]{0,17}$' then
        raise exception 'csv credentials need the file_id of an uploaded CSV file ({"file_id": 12})' using errcode = '22023';
      end if;
      -- Only the caller's own files: another user's file is reported as missing.
      select * into f from snapbase.csv_files cf
       where cf.id = (credentials ->> 'file_id')::bigint and cf.owner_id = snapbase.current_user_id();
      if f.id is null then
        raise exception 'no CSV file %', credentials ->> 'file_id' using errcode = 'P0002';
      end if;
      return format('CSV file %s', f.name);
    else
      raise exception 'kind must be postgres, mysql, managed or csv (got %)', left(coalesce(kind, 'null'), 50) using errcode = '22023';
  end case;
end;
$$;

create or replace function snapbase.create_connector_account(kind text, name text, credentials jsonb default '{}') returns snapbase.connector_accounts
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  summary text := snapbase_private.check_credentials(kind, credentials);
  a snapbase.connector_accounts;
begin
  if snapbase.current_user_id() is null or snapbase.current_app_role() = 'agent' then
    raise exception 'sign in as a Snapbase user to create connector accounts' using errcode = '42501';
  end if;
  insert into snapbase.connector_accounts (owner_id, name, kind, summary)
    values (snapbase.current_user_id(), trim(name), kind, summary) returning * into a;
  insert into snapbase_private.connector_credentials (account_id, secret, scheme)
    values (a.id, snapbase_private.seal_credentials(credentials), 'public_key');
  perform snapbase_private.audit('create_connector_account', 'connector_account', a.id::text, null,
    jsonb_build_object('kind', kind, 'name', a.name, 'summary', summary));
  return a;
end;
$$;

create or replace function snapbase.rotate_connector_credentials(account_id bigint, credentials jsonb) returns snapbase.connector_accounts
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  a snapbase.connector_accounts := snapbase_private.require_account(account_id);
  new_summary text := snapbase_private.check_credentials(a.kind, credentials);
begin
  update snapbase_private.connector_credentials c
     set secret = snapbase_private.seal_credentials(credentials), scheme = 'public_key'
   where c.account_id = a.id;
  update snapbase.connector_accounts ca set summary = new_summary, credentials_rotated_at = now(),
         last_tested_at = null, last_test_error = null
   where ca.id = a.id returning * into a;
  perform snapbase_private.audit('rotate_connector_credentials', 'connector_account', a.id::text, null, jsonb_build_object('summary', new_summary));
  return a;
end;
$$;

create function snapbase.set_connector_allowed_hosts(hosts text[]) returns text[]
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  bad text;
begin
  perform snapbase_private.require_role('admin');
  select string_agg(quote_literal(h), ', ') into bad from unnest(coalesce(hosts, '{}')) h
   where lower(btrim(h)) !~ '^(\*|public|(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*|[0-9a-f.:]+(/\d{1,3})?)$';
  if bad is not null then
    raise exception 'not a host name, address, network, public or *: %', left(bad, 500) using errcode = '22023';
  end if;
  insert into snapbase_private.settings (key, value) values ('connector_hosts_admin', to_jsonb(coalesce(hosts, '{}'))::text)
    on conflict (key) do update set value = excluded.value;
  perform snapbase_private.audit('set_connector_allowed_hosts', 'settings', 'connector_hosts_admin', null, jsonb_build_object('hosts', hosts));
  return hosts;
end;
$$;
comment on function snapbase.set_connector_allowed_hosts(text[]) is
  'Admins: the hosts connectors may reach, besides SNAPBASE_CONNECTOR_HOSTS (names, *.domain, addresses, networks, public, *).';
grant execute on function snapbase.set_connector_allowed_hosts(text[]) to :ROLE_VIEWER;

create function snapbase.connector_allowed_hosts() returns jsonb
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
begin
  perform snapbase_private.require_role('admin');
  return jsonb_build_object(
    'environment', coalesce(snapbase_private.setting('connector_hosts')::jsonb, '[]'),
    'admin', coalesce(snapbase_private.setting('connector_hosts_admin')::jsonb, '[]'),
    'default', case when snapbase_private.setting('environment') = 'production' then 'public' else '*' end);
end;
$$;
comment on function snapbase.connector_allowed_hosts() is 'Admins: the connector host rules in force.';
grant execute on function snapbase.connector_allowed_hosts() to :ROLE_VIEWER;
