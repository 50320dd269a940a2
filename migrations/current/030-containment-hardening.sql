--------------------------------------------------------------------------------
-- Containment, part 6: hardening after a red-team review.
--------------------------------------------------------------------------------
-- * The parse-tree reader tokenizes exactly as PostgreSQL's own reader (pg_strtok):
--   only unescaped whitespace and ( ) { } separate tokens; quotes and brackets
--   mean nothing. A field label is a `:name` token that is not itself the value of
--   the label before it (a user's alias may be `:funcid`, but it always follows
--   its own label). It fails closed on anything it cannot read.
-- * Change SQL reads only plain tables without row-level security, may not write
--   other tables through cascading foreign keys or inheritance, and the change runner
--   gets SELECT only on the columns every reader may read, so whole-row references
--   cannot reach the others.
-- * Functions taking object identifiers (oid, reg*) are refused; filters may not
--   build values of any size (repeat, lpad, …).
-- * Everything that lexes user text or stored filters pins standard_conforming_strings.
-- * Connector hosts: one unambiguous host, no parameters but harmless ones, more
--   reserved address ranges refused.
-- * SECURITY DEFINER functions search pg_temp last.

do $$
begin
  if not exists (select 1 from pg_attribute where attrelid = 'snapbase_private.probe_result'::regclass and attname = 'whole_row' and not attisdropped) then
    alter type snapbase_private.probe_result add attribute whole_row boolean;
  end if;
end $$;

drop function if exists snapbase_private.execute_change(regclass, text, snapbase_private.probe_result) cascade;
drop function if exists snapbase_private.execute_change(regclass, text, snapbase_private.probe_result, name[]) cascade;

create or replace function snapbase_private.assert_tree_readable(problem text) returns boolean
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
  if problem is not null then
    raise exception 'the parse tree could not be read (%): refused', problem using errcode = '42501';
  end if;
  return true;
end;
$$;

create or replace function snapbase_private.node_fields(tree text)
returns table (node bigint, depth bigint, node_type text, field text, value text)
language sql immutable strict
set search_path = pg_catalog, pg_temp
as $$
  with tokens as materialized (
    -- A constant's datum prints as `:constvalue <length> [ b1 b2 … ]`, one token per
    -- byte: most of a large change's tree, and nothing that is checked. (A user's
    -- name cannot forge this: its spaces are backslash-escaped.)
    select t.ord, t.m[1] as tok
      from regexp_matches(regexp_replace(tree, '(:constvalue [0-9]+ )\[[ 0-9-]*\]', '\1[]', 'g'),
                          '([{}()]|(?:[^\s{}()\\]|\\.)+)', 'g') with ordinality as t(m, ord)
  ), runs as materialized (
    select ord, tok,
           sum(case when tok = '{' then 1 when tok = '}' then -1 else 0 end) over (order by ord) as depth,
           -- Consecutive `:x` tokens alternate label, value: the run's first follows a non-label.
           count(*) filter (where left(tok, 1) <> ':') over (order by ord) as run,
           lead(tok) over (order by ord) as next_tok
      from tokens
  ), classified as materialized (
    select ord, tok, depth, next_tok,
           left(tok, 1) = ':' and row_number() over (partition by run order by ord) % 2 = 0 as label,
           max(case when tok = '{' then ord end) over (partition by depth order by ord) as owner
      from runs
  ), readable as (
    select snapbase_private.assert_tree_readable(case
             when exists (select 1 from runs where depth < 0) then 'unbalanced braces'
             when (select r.depth from runs r order by r.ord desc limit 1) <> 0 then 'unbalanced braces'
             when exists (select 1 from runs where tok = '{' and coalesce(next_tok, '') !~ '^[A-Z][A-Z0-9_]*$') then 'a node without a name'
           end) as ok
  )
  select o.owner, o.depth, n.next_tok, substr(o.tok, 2), o.next_tok
    from classified o join classified n on n.ord = o.owner
   where (select ok from readable) and o.label and o.next_tok is not null and o.next_tok not in (')', '}')
$$;
comment on function snapbase_private.node_fields(text) is
  'The fields of a PostgreSQL parse tree (pg_proc.prosqlbody) as (node, depth, node type, field, value), tokenized as pg_strtok does; a field whose value is a node or a list has the value { or (. Raises on a tree it cannot read.';

create or replace function snapbase_private.function_allowed(fn oid, purpose text) returns boolean
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
       -- Functions handed an object identifier open, lock or describe that object.
       and (p.proname in ('nextval', 'currval')  -- only the table's own sequences: the relation check and the runner's grants
            or not exists (select 1 from unnest(p.proargtypes::oid[]) a where format_type(a, null) = 'oid' or format_type(a, null) ~ '^reg'))
       and p.proname not in ('satisfies_hash_partition')
       -- A filter is evaluated for every row: nothing that builds values of any size from a number.
       and not (purpose = 'filter' and p.proname in ('repeat', 'lpad', 'rpad', 'array_fill', 'generate_series'))
      from pg_proc p where p.oid = fn), false)
$$;

create or replace function snapbase_private.tree_problems(tree text, purpose text) returns text[]
language sql stable
set search_path = pg_catalog
as $$
  with f as materialized (select * from snapbase_private.node_fields(tree)),
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

create or replace function snapbase_private.check_change_sql(target regclass, change_sql text, readers name[])
returns snapbase_private.probe_result
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
set standard_conforming_strings = on
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
  -- Only plain tables (and the table's own sequences): a view or a foreign table runs
  -- with someone else's rights, and row-level security would be applied to the change
  -- runner (under the approver's claims), not to the submitter.
  select string_agg(rel::regclass::text, ', ' order by rel::regclass::text) into unreadable
    from unnest(probe.relations) rel join pg_class c on c.oid = rel
   where not (c.relkind in ('r', 'p') or (c.relkind = 'S' and rel <> target::oid))
      or c.relrowsecurity;
  if unreadable is not null then
    raise exception 'the change may read only plain tables without row-level security: % %', unreadable,
      'cannot be used (read the tables behind a view directly)' using errcode = '42501';
  end if;
  -- What the statement would write besides the table, without naming it: rows of
  -- other tables through cascading foreign keys, and rows of inheritance children.
  if probe.command_type in (2, 4, 5) then
    select string_agg(distinct k.conrelid::regclass::text, ', ') into unreadable
      from pg_constraint k
     where k.contype = 'f' and k.confrelid = target and k.conrelid <> target
       and ((probe.command_type in (4, 5) and k.confdeltype in ('c', 'n', 'd'))
            or (probe.command_type in (2, 5) and k.confupdtype in ('c', 'n', 'd')));
    if unreadable is not null then
      raise exception 'the change could write % through cascading foreign keys of %; only changes that write nothing but % can be approved',
        unreadable, target, target using errcode = '42501';
    end if;
  end if;
  if exists (select 1 from pg_inherits i join pg_class c on c.oid = target where i.inhparent = target and c.relkind = 'r') then
    raise exception '% has inheritance children, which the change would write too', target using errcode = '42501';
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
              -- A whole-row reference (t::text, row_to_json(t)) reads every column.
              or (not probe.whole_row and jsonb_array_length(probe.columns -> rel::text) > 0
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
    if unreadable is null and probe.whole_row and not coalesce(has_table_privilege(r, target, 'SELECT'), false) then
      unreadable := 'every column (a whole-row reference)';
    end if;
    if unreadable is not null then
      raise exception 'the change uses columns of % you may not read: %', target, unreadable using errcode = '42501';
    end if;
  end loop;
  return probe;
end;
$$;

create function snapbase_private.execute_change(target regclass, change_sql text, probe snapbase_private.probe_result, readers name[])
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
set standard_conforming_strings = on
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
  -- SELECT only on the columns every reader may read: PostgreSQL itself then refuses
  -- anything reaching for the others (a whole-row reference included).
  execute format('grant insert, update, delete on table %s to %I', target, runner);
  foreach rel in array array[target::oid] || reads loop
    select string_agg(format('%I', a.attname), ', ' order by a.attnum) into missing
      from pg_attribute a
     where a.attrelid = rel and a.attnum > 0 and not a.attisdropped
       and not exists (select 1 from unnest(readers) r where not coalesce(has_column_privilege(r, rel, a.attnum, 'SELECT'), false));
    if missing is not null then
      execute format('grant select (%s) on table %s to %I', missing, rel::regclass, runner);
    end if;
  end loop;
  foreach rel in array seqs loop
    execute format('grant usage, select on sequence %s to %I', rel::regclass, runner);
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
      affected := snapbase_private.execute_change(target, cr.sql, probe, snapbase_private.submitter_roles(cr));
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

create or replace function snapbase_private.connector_address_problem(host text, address inet default null) returns text
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
    -- Everything that is not a public unicast address: this host, private and shared
    -- networks, link-local (cloud metadata), benchmarking, documentation, multicast,
    -- reserved, and IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo).
    local_ := exists (select 1 from unnest(array[
      '0.0.0.0/8', '10.0.0.0/8', '100.64.0.0/10', '127.0.0.0/8', '169.254.0.0/16', '172.16.0.0/12', '192.0.0.0/24',
      '192.0.2.0/24', '192.88.99.0/24', '192.168.0.0/16', '198.18.0.0/15', '198.51.100.0/24', '203.0.113.0/24',
      '224.0.0.0/4', '240.0.0.0/4', '::/96', '::1/128', '::ffff:0.0.0.0/96', '64:ff9b::/96', '64:ff9b:1::/48', '100::/64',
      '2001::/32', '2001:db8::/32', '2002::/16', 'fc00::/7', 'fe80::/10', 'fec0::/10', 'ff00::/8']::inet[]) n
      where family(n) = family(ip) and ip <<= n);
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
    -- The host is the URL's, and only harmless parameters may follow: no fragment, no
    -- escaped or repeated keys, no host/hostaddr/options, nothing that reads a file.
    if kind = 'postgres' and (url ~ '#' or exists (
         select 1 from regexp_split_to_table(substring(url from '\?(.*)$'), '&') p
          where p <> '' and split_part(p, '=', 1) not in ('sslmode', 'connect_timeout', 'application_name', 'ssl'))) then
      raise exception 'a postgres connection string may carry only sslmode, connect_timeout and application_name parameters, and no fragment'
        using errcode = '22023';
    end if;
    if kind = 'postgres' and coalesce(host, '') = '' then
      raise exception 'a postgres connection string must name its host' using errcode = '22023';
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


create or replace function snapbase_private.probe_user_text(body_prefix text, body text, body_suffix text,
                                                 params text default '', path text default 'pg_catalog',
                                                 purpose text default 'filter')
returns snapbase_private.probe_result
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
set standard_conforming_strings = on
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
    -- One pass over the tree for the rest: relations written (requiredPerms has INSERT 1,
    -- UPDATE 4 or DELETE 8), the probe's parameters used (PARAM_EXTERN, kind 0: for
    -- filters, the columns), the top-level statements (QUERY nodes at depth 1), and
    -- whole-row references (a Var of attribute 0 reads every column).
    with f as materialized (select * from snapbase_private.node_fields(tree))
    select coalesce((select array_agg(distinct r.value::oid) from f r
                       join f p on p.node = r.node and p.field = 'requiredPerms' and p.value ~ '^\d+$' and p.value::int & 13 <> 0
                      where r.node_type in ('RANGETBLENTRY', 'RTEPERMISSIONINFO') and r.field = 'relid' and r.value ~ '^\d+$'
                        and r.value <> '0'), '{}'),
           coalesce((select array_agg(distinct x.value::int order by x.value::int) from f x
                       join f k on k.node = x.node and k.field = 'paramkind' and k.value = '0'
                      where x.node_type = 'PARAM' and x.field = 'paramid' and x.value ~ '^\d+$'), '{}'),
           (select min(q.value::int) from f q where q.node_type = 'QUERY' and q.depth = 1 and q.field = 'commandType'),
           (select count(*) from f q where q.node_type = 'QUERY' and q.depth = 1 and q.field = 'commandType'),
           exists (select 1 from f v where v.node_type = 'VAR' and v.field = 'varattno' and v.value = '0')
      into result.written, result.params, result.command_type, result.statements, result.whole_row;
    result.tree := tree;
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


-- Stored filters are lexed again where they run: pin the lexer's one setting.
alter function snapbase_sandbox.read_jsonb(text, text[]) set standard_conforming_strings = on;
alter function snapbase_sandbox.read_text_rows(text, text[]) set standard_conforming_strings = on;
alter function snapbase_sandbox.read_ids(text, text[]) set standard_conforming_strings = on;
alter function snapbase_sandbox.run_change(text, text) set standard_conforming_strings = on;

