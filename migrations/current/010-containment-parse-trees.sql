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
