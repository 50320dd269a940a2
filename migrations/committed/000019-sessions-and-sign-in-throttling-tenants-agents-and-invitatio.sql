--! Previous: sha1:cd9fe9098213b20860bf6ab4ce98ca84f6cc271e
--! Hash: sha1:484144f1f99ad303ba4f2e12dc2f082552ee9030
--! Message: sessions and sign-in throttling; tenants, agents and invitations; faults: worker liveness, exactly-once publish, partial outcomes; correctness: restores for every column kind, column names, registration checks; change preview; containment hardening

--! split: 001-current.sql
-- Work in progress: one file per topic (NNN-topic.sql), applied in number order.

--! split: 020-change-preview.sql
--------------------------------------------------------------------------------
-- Preview before approval: what a pending change would do, computed by running it
-- and always rolling it back.
--------------------------------------------------------------------------------
-- snapbase.preview_change(change_id) checks the change exactly as approval does
-- (check_change_sql with the submitter's rights, then execute_change as the change
-- runner) inside a subtransaction that is always rolled back. Three statement-level
-- triggers with transition tables, created inside that subtransaction, copy the
-- rows the statement wrote (before and after images) into a temporary table, and
-- the diff is read from there before the rollback. Nothing survives but an audit
-- entry "previewed". The triggers need SHARE ROW EXCLUSIVE on the table (writers
-- wait): the preview takes it with a short lock_timeout and holds it only while
-- it runs, under the request's statement_timeout.

do $$
begin
  if not exists (select 1 from pg_attribute where attrelid = 'snapbase_private.probe_result'::regclass and attname = 'tree' and not attisdropped) then
    alter type snapbase_private.probe_result add attribute tree text;
  end if;
end $$;
comment on type snapbase_private.probe_result is 'What probe_user_text found in user text: problems, relations read and written, columns, parameters, the top statement, and the parse tree itself.';

alter table snapbase.managed_tables add column if not exists sensitive_columns text[] not null default '{}';
comment on column snapbase.managed_tables.sensitive_columns is 'Columns an admin marked sensitive: a preview warns when a change writes them.';

insert into snapbase_private.settings (key, value) values ('preview_warn_rows', '1000'), ('preview_warn_percent', '10')
  on conflict (key) do nothing;

drop function if exists snapbase.preview_change(bigint, integer, integer) cascade;
drop function if exists snapbase.set_sensitive_columns(regclass, text[]) cascade;
drop function if exists snapbase_private.tg__preview_capture() cascade;
drop function if exists snapbase_private.unqualified_statement(text) cascade;

-- (probe_user_text records the tree: see 030-containment-hardening.sql.)

-- Whether the top statement of a parse tree is an UPDATE or DELETE with no WHERE:
-- its jointree (the only FROMEXPR at depth 2) has no quals.
create function snapbase_private.unqualified_statement(tree text) returns boolean
language sql immutable
set search_path = pg_catalog
as $$
  select coalesce((select f.value from snapbase_private.node_fields(tree) f
                     where f.node_type = 'QUERY' and f.depth = 1 and f.field = 'commandType' limit 1) in ('2', '4'), false)
     and exists (select 1 from snapbase_private.node_fields(tree) f
                  where f.node_type = 'FROMEXPR' and f.depth = 2 and f.field = 'quals' and f.value = '<>')
$$;

-- Copies a statement's transition rows into pg_temp.snapbase_preview_rows, while a
-- preview is capturing (only ever inside preview_change's rolled-back block).
create function snapbase_private.tg__preview_capture() returns trigger
language plpgsql
security definer
set search_path = pg_catalog
as $$
begin
  if tg_op in ('UPDATE', 'DELETE') then
    execute 'insert into pg_temp.snapbase_preview_rows (side, "row") select ''before'', to_jsonb(o) from old_rows o';
  end if;
  if tg_op in ('UPDATE', 'INSERT') then
    execute 'insert into pg_temp.snapbase_preview_rows (side, "row") select ''after'', to_jsonb(n) from new_rows n';
  end if;
  return null;
end;
$$;

create function snapbase.set_sensitive_columns(target regclass, columns text[]) returns snapbase.managed_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  mt snapbase.managed_tables;
  unknown text;
begin
  perform snapbase_private.require_role('admin');
  mt := snapbase_private.managed_table_for(target);
  select string_agg(c, ', ') into unknown from unnest(coalesce(columns, '{}')) c
   where not exists (select 1 from pg_attribute a where a.attrelid = target and a.attname = c and a.attnum > 0 and not a.attisdropped);
  if unknown is not null then
    raise exception '% has no column(s) %', target, unknown using errcode = '42703';
  end if;
  update snapbase.managed_tables m set sensitive_columns = coalesce(columns, '{}') where m.id = mt.id returning * into mt;
  perform snapbase_private.audit('set_sensitive_columns', 'managed_table', mt.id::text, mt.qualified_name,
    jsonb_build_object('columns', columns));
  return mt;
end;
$$;
comment on function snapbase.set_sensitive_columns(regclass, text[]) is 'Mark columns of a managed table sensitive (admins): previews warn when a change writes them.';
grant execute on function snapbase.set_sensitive_columns(regclass, text[]) to :ROLE_VIEWER;

-- What a pending change would do, without doing it. Returns
-- {change_request_id, rows_affected, total_changes, changes: [snapshot_diff rows],
--  next_offset, warnings: [{code, message}], columns_hidden: [...]}.
create function snapbase.preview_change(change_id bigint, max_rows integer default 100, offset_rows integer default 0)
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
set client_min_messages = warning
set standard_conforming_strings = on
as $$
declare
  cr snapbase.change_requests;
  mt snapbase.managed_tables;
  target regclass;
  pk text[];
  probe snapbase_private.probe_result;
  affected bigint;
  diff jsonb;
  hidden text[];
  warnings jsonb := '[]';
  estimate double precision;
  written_sensitive text[];
  result jsonb;
  err_code text;
  err_message text;
begin
  if max_rows not between 1 and 1000 or offset_rows < 0 then
    raise exception 'max_rows must be from 1 to 1000 and offset_rows at least 0' using errcode = '22023';
  end if;
  select * into cr from snapbase.change_requests c where c.id = change_id;
  select * into mt from snapbase.managed_tables m where m.id = cr.managed_table_id;
  -- Admins, and the submitter, who may read the table; anyone else: "no change request".
  if cr.id is null or not coalesce(snapbase_private.can_read(mt), false)
     or not (snapbase.current_app_role() = 'admin' or cr.submitted_by = snapbase.current_user_id()) then
    raise exception 'no change request %', change_id using errcode = 'P0002';
  end if;
  if cr.status <> 'pending' or cr.kind = 'restore' then
    raise exception 'change request % is %, not pending: its effect is in snapshot_diff', change_id, cr.status using errcode = '55000';
  end if;
  target := snapbase_private.relation_of(mt);
  if target is null then
    raise exception 'table % no longer exists', cr.table_name using errcode = '42P01';
  end if;
  pk := snapbase_private.primary_key(target);
  if pk is null then
    raise exception 'a preview needs a primary key on % (it compares rows by key)', target using errcode = '42P10';
  end if;
  hidden := array(select a.attname::text from pg_attribute a
                   where a.attrelid = target and a.attnum > 0 and not a.attisdropped
                     and not coalesce(has_column_privilege(snapbase_private.caller_role(), target, a.attnum, 'SELECT'), false));
  perform set_config('lock_timeout', '2s', true);
  begin
    execute format('lock table %s in share row exclusive mode', target);
    probe := snapbase_private.check_change_sql(target, cr.sql, snapbase_private.submitter_roles(cr));
    create temporary table if not exists snapbase_preview_rows (side text not null, "row" jsonb not null) on commit drop;
    execute format('create trigger snapbase_preview_insert after insert on %s referencing new table as new_rows for each statement execute function snapbase_private.tg__preview_capture()', target);
    execute format('create trigger snapbase_preview_update after update on %s referencing old table as old_rows new table as new_rows for each statement execute function snapbase_private.tg__preview_capture()', target);
    execute format('create trigger snapbase_preview_delete after delete on %s referencing old table as old_rows for each statement execute function snapbase_private.tg__preview_capture()', target);
    affected := snapbase_private.execute_change(target, cr.sql, probe, snapbase_private.submitter_roles(cr));
    -- Rows by key; a key written several times keeps its first before and last after.
    with keyed as (
      select side, "row", (select jsonb_object_agg(k, "row" -> k) from unnest(pk) k) as key,
             row_number() over () as n
        from pg_temp.snapbase_preview_rows
    ), befores as (
      select distinct on (key) key, "row" from keyed where side = 'before' order by key, n
    ), afters as (
      select distinct on (key) key, "row" from keyed where side = 'after' order by key, n desc
    ), changes as (
      select case when b.key is null then 'added' when a.key is null then 'removed' else 'changed' end as change,
             coalesce(a.key, b.key) as key,
             case when a.key is not null and b.key is not null then
               array(select f from jsonb_object_keys(a."row" || b."row") f
                      where (b."row" -> f) is distinct from (a."row" -> f) and f <> all (hidden) order by f) end as changed_fields,
             b."row" - hidden as before, a."row" - hidden as after,
             -- Every column written (hidden ones included), for the sensitive-column warning.
             array(select f from jsonb_object_keys(coalesce(a."row", '{}') || coalesce(b."row", '{}')) f
                    where (b."row" -> f) is distinct from (a."row" -> f)) as all_changed
        from befores b full join afters a on a.key = b.key
       where b."row" is distinct from a."row"
    )
    select jsonb_build_object(
             'total_changes', count(*),
             'changes', coalesce((select jsonb_agg(jsonb_build_object('change', p.change, 'key', p.key, 'changed_fields', p.changed_fields,
                                                                    'before', p.before, 'after', p.after) order by p.key)
                                    from (select * from changes order by key offset offset_rows limit max_rows) p), '[]'),
             'written_columns', coalesce((select jsonb_agg(distinct f) from changes, unnest(all_changed) f), '[]'))
      into diff from changes;
    raise exception 'preview done' using errcode = 'SBPRV';
  exception
    when sqlstate 'SBPRV' then
      null;
    when lock_not_available then
      raise exception 'table % is busy (being approved or written in bulk); try the preview again', target using errcode = '55P03';
    when others then
      get stacked diagnostics err_code = returned_sqlstate, err_message = message_text;
      diff := null;
  end;
  perform set_config('lock_timeout', '0', true);
  if diff is null then
    warnings := warnings || jsonb_build_object('code', 'fails', 'message',
      format('approving this change would fail now: %s (SQLSTATE %s)', left(err_message, 2000), err_code));
    result := jsonb_build_object('change_request_id', cr.id, 'rows_affected', null, 'total_changes', 0, 'changes', '[]'::jsonb,
                                 'next_offset', null, 'columns_hidden', to_jsonb(hidden));
  else
    if snapbase_private.unqualified_statement(probe.tree) then
      warnings := warnings || jsonb_build_object('code', 'no_where', 'message',
        format('this %s has no WHERE clause: it applies to every row of %s',
               case probe.command_type when 2 then 'UPDATE' else 'DELETE' end, target));
    end if;
    -- The planner's estimate of the table's size, or a count when it has none yet.
    select c.reltuples into estimate from pg_class c where c.oid = target;
    if estimate is null or estimate <= 0 then
      execute format('select count(*) from %s', target) into estimate;
    end if;
    if affected > snapbase_private.setting('preview_warn_rows')::bigint then
      warnings := warnings || jsonb_build_object('code', 'many_rows', 'message',
        format('this change writes %s rows (more than %s)', affected, snapbase_private.setting('preview_warn_rows')));
    end if;
    if estimate > 0 and affected * 100.0 / estimate > snapbase_private.setting('preview_warn_percent')::numeric then
      warnings := warnings || jsonb_build_object('code', 'large_share', 'message',
        format('this change writes about %s%% of %s', round(affected * 100.0 / estimate), target));
    end if;
    written_sensitive := array(select c from jsonb_array_elements_text(diff -> 'written_columns') c where c = any (mt.sensitive_columns) order by 1);
    if cardinality(written_sensitive) > 0 then
      warnings := warnings || jsonb_build_object('code', 'sensitive_columns', 'message',
        format('this change writes sensitive column(s): %s', array_to_string(written_sensitive, ', ')));
    end if;
    result := jsonb_build_object('change_request_id', cr.id, 'rows_affected', affected,
      'total_changes', diff -> 'total_changes', 'changes', diff -> 'changes',
      'next_offset', case when (diff ->> 'total_changes')::bigint > offset_rows + max_rows then offset_rows + max_rows end,
      'columns_hidden', to_jsonb(hidden));
  end if;
  perform snapbase_private.audit('preview', 'change_request', cr.id::text, cr.table_name,
    jsonb_build_object('rows_affected', result -> 'rows_affected', 'warnings', warnings));
  return result || jsonb_build_object('warnings', warnings);
end;
$$;
comment on function snapbase.preview_change(bigint, integer, integer) is
  'What a pending change would do, without doing it: rows affected, a paged before/after diff (snapshot_diff''s shape, only columns you may read) and warnings. Admins, and the submitter.';
grant execute on function snapbase.preview_change(bigint, integer, integer) to :ROLE_VIEWER;

--! split: 030-containment-hardening.sql
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

--! split: 100-auth-sessions.sql
-- Tokens and sessions (issue 11) and the JWT secret out of the database (issue 10).
--
-- * The database never sees the JWT secret: the server signs and verifies JWTs.
--   `authenticate` and `create_stream_token` return the claims (snapbase.jwt_claims)
--   that the server signs.
-- * A JWT names a session (snapbase_private.sessions). Every request resolves the
--   session and the user's current role and status in one query
--   (snapbase_private.resolve_session), so demotion, sign-out, "revoke all my
--   sessions", disabling and deleting a user take effect at once.
-- * Sign-in is throttled per account and per client address, with the state here
--   (any number of servers share it). snapbase_private.attempt_login never raises
--   for a wrong password, so the failure it counts is committed.
-- Idempotent while in migrations/current/: everything is dropped first.

--------------------------------------------------------------------------------
-- Drop what this file creates, and what it replaces
--------------------------------------------------------------------------------

delete from snapbase_private.settings where key = 'jwt_secret';
drop function if exists snapbase_private.set_jwt_secret(text);
drop function if exists snapbase_private.token_for(snapbase.users);
drop function if exists snapbase_private.sign_jwt(jsonb);
drop function if exists snapbase.authenticate(text, text);
drop function if exists snapbase.create_stream_token();
drop function if exists snapbase_private.attempt_login(text, text, inet);
drop function if exists snapbase_private.count_login_failure(text, text, integer, interval, jsonb);
drop function if exists snapbase_private.resolve_session(bigint, bigint);
drop function if exists snapbase_private.current_session_id();
drop function if exists snapbase.sign_out();
drop function if exists snapbase.revoke_all_sessions(bigint);
drop function if exists snapbase.set_user_role(bigint, snapbase.user_role);
drop function if exists snapbase.set_user_disabled(bigint, boolean);
drop function if exists snapbase.clear_sign_in_lock(text);
drop type if exists snapbase_private.login_result;
drop type if exists snapbase.jwt_claims;
drop table if exists snapbase_private.login_throttle;
drop table if exists snapbase_private.sessions;

--------------------------------------------------------------------------------
-- Settings the SQL layer reads (not secrets; the server writes them at start)
--------------------------------------------------------------------------------

insert into snapbase_private.settings (key, value) values
  ('login_max_failures', '5'),
  ('login_max_failures_per_address', '20'),
  ('login_lockout', '15 minutes')
on conflict (key) do nothing;

--------------------------------------------------------------------------------
-- Users: a disabled user is refused everywhere
--------------------------------------------------------------------------------

alter table snapbase.users add column if not exists disabled_at timestamptz;
comment on column snapbase.users.disabled_at is 'When an admin disabled the user: they cannot sign in, and their sessions and API tokens are refused.';

--------------------------------------------------------------------------------
-- Sessions
--------------------------------------------------------------------------------

create table snapbase_private.sessions (
  id bigint generated always as identity primary key,
  user_id bigint not null references snapbase.users on delete cascade,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  revoked_at timestamptz,
  client_address inet
);
create index sessions_user_id_idx on snapbase_private.sessions (user_id);
comment on table snapbase_private.sessions is 'One row per sign-in. A JWT carries its id (sid); revoking the row ends the JWT and its stream tokens at once.';

-- What the server signs into a JWT (the database never holds the secret).
create type snapbase.jwt_claims as (
  session_id bigint,
  user_id bigint,
  email text,
  role text,
  kind text,
  issued_at timestamptz,
  expires_at timestamptz
);
comment on type snapbase.jwt_claims is E'@behavior -*\nThe claims of a session (kind session) or stream token (kind stream); the server signs them.';

create function snapbase_private.current_session_id() returns bigint
language sql stable
set search_path = pg_catalog
as $$
  select nullif(current_setting('jwt.claims.session_id', true), '')::bigint
$$;
grant execute on function snapbase_private.current_session_id() to :ROLE_VIEWER, :ROLE_AGENT;

-- For the server (as the authenticator), on every request with a JWT: the user's
-- current email and role, or no row when the session or the user is gone.
create function snapbase_private.resolve_session(session_id bigint, user_id bigint)
returns table (email text, role text)
language sql stable
security definer
set search_path = pg_catalog
as $$
  select u.email, u.role::text
    from snapbase_private.sessions s join snapbase.users u on u.id = s.user_id
   where s.id = resolve_session.session_id and s.user_id = resolve_session.user_id
     and s.revoked_at is null and s.expires_at > now() and u.disabled_at is null
$$;
grant execute on function snapbase_private.resolve_session(bigint, bigint) to :DATABASE_AUTHENTICATOR;

--------------------------------------------------------------------------------
-- Sign-in with throttling
--------------------------------------------------------------------------------

create table snapbase_private.login_throttle (
  scope text not null check (scope in ('account', 'address')),
  key text not null,
  failures integer not null default 0,
  window_started_at timestamptz not null default now(),
  locked_until timestamptz,
  primary key (scope, key)
);
create index login_throttle_window_idx on snapbase_private.login_throttle (window_started_at);
comment on table snapbase_private.login_throttle is 'Failed sign-ins per account (lower-case email) and per client address within the lockout window, and lockouts.';

create type snapbase_private.login_result as (
  outcome text,          -- ok | invalid | disabled | locked
  retry_after integer,   -- seconds, when locked
  claims snapbase.jwt_claims
);

-- Counts one failure; at the limit, locks the account or address and audits it.
create function snapbase_private.count_login_failure(lock_scope text, lock_key text, max_failures integer, lockout interval, details jsonb)
returns void
language plpgsql
set search_path = pg_catalog
as $$
declare
  counted integer;
begin
  insert into snapbase_private.login_throttle as t (scope, key, failures, window_started_at)
  values (lock_scope, lock_key, 1, now())
  on conflict (scope, key) do update
    set failures = case when t.window_started_at < now() - lockout then 1 else t.failures + 1 end,
        window_started_at = case when t.window_started_at < now() - lockout then now() else t.window_started_at end
  returning t.failures into counted;
  if counted >= max_failures then
    update snapbase_private.login_throttle t
       set locked_until = now() + lockout, failures = 0, window_started_at = now()
     where t.scope = lock_scope and t.key = lock_key;
    perform snapbase_private.audit('sign_in_locked', case lock_scope when 'account' then 'account' else 'address' end, lock_key, null,
      details || jsonb_build_object('scope', lock_scope, 'failures', counted, 'locked_until', now() + lockout));
  end if;
end;
$$;

-- For the server (as the authenticator): checks the lockouts, then the password;
-- counts a failure per account and per address (when given); on success opens a
-- session. Never raises for wrong credentials, so the count is committed even
-- when the caller reports the failure as an error.
create function snapbase_private.attempt_login(email text, password text, client_address inet)
returns snapbase_private.login_result
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  account_key constant text := lower(btrim(coalesce(email, '')));
  address_key constant text := host(client_address);
  lockout constant interval := coalesce(snapbase_private.setting('login_lockout')::interval, interval '15 minutes');
  locked timestamptz;
  found snapbase.users;
  stored_hash text;
  opened snapbase_private.sessions;
begin
  if account_key = '' or password is null or password = '' then
    raise exception 'send an email and a password' using errcode = '22023';
  end if;
  select max(t.locked_until) into locked
    from snapbase_private.login_throttle t
   where t.locked_until > now()
     and ((t.scope = 'account' and t.key = account_key) or (t.scope = 'address' and t.key = address_key));
  if locked is not null then
    return row('locked', greatest(1, ceil(extract(epoch from locked - now())))::integer, null)::snapbase_private.login_result;
  end if;

  select u.* into found from snapbase.users u where lower(u.email) = account_key;
  select s.password_hash into stored_hash from snapbase_private.user_secrets s where s.user_id = found.id;
  -- Hash even for unknown users so response time does not reveal which emails exist.
  if stored_hash is null then
    perform public.crypt(password, public.gen_salt('bf', 10));
  end if;
  if stored_hash is null or public.crypt(password, stored_hash) <> stored_hash then
    perform snapbase_private.count_login_failure('account', account_key,
      coalesce(snapbase_private.setting('login_max_failures')::integer, 5), lockout,
      jsonb_build_object('email', account_key, 'address', address_key));
    if address_key is not null then
      perform snapbase_private.count_login_failure('address', address_key,
        coalesce(snapbase_private.setting('login_max_failures_per_address')::integer, 20), lockout,
        jsonb_build_object('address', address_key, 'email', account_key));
    end if;
    -- Stale rows of other keys go a few at a time.
    delete from snapbase_private.login_throttle t
     where t.ctid = any (array(select t2.ctid from snapbase_private.login_throttle t2
                                where t2.window_started_at < now() - 2 * lockout
                                  and (t2.locked_until is null or t2.locked_until < now())
                                limit 20));
    return row('invalid', null, null)::snapbase_private.login_result;
  end if;
  if found.disabled_at is not null then
    return row('disabled', null, null)::snapbase_private.login_result;
  end if;

  delete from snapbase_private.login_throttle t where t.scope = 'account' and t.key = account_key;
  delete from snapbase_private.sessions s
   where s.user_id = found.id and greatest(s.expires_at, s.revoked_at) < now() - interval '1 day';
  insert into snapbase_private.sessions (user_id, expires_at, client_address)
  values (found.id, now() + coalesce(snapbase_private.setting('jwt_ttl'), '8 hours')::interval, client_address)
  returning * into opened;
  return row('ok', null,
    row(opened.id, found.id, found.email, found.role::text, 'session', opened.created_at, opened.expires_at)::snapbase.jwt_claims
  )::snapbase_private.login_result;
end;
$$;
grant execute on function snapbase_private.attempt_login(text, text, inet) to :DATABASE_AUTHENTICATOR;

-- For DBAs in psql: the same check (and lockouts), returning the new session's
-- claims. A failure raises, which rolls back its count: only the server's sign-in
-- (which calls attempt_login) counts failures. Not exposed through GraphQL, whose
-- `authenticate` mutation the server implements over attempt_login.
create function snapbase.authenticate(email text, password text) returns snapbase.jwt_claims
language plpgsql
set search_path = pg_catalog
as $$
declare
  r snapbase_private.login_result := snapbase_private.attempt_login(email, password, null);
begin
  case r.outcome
    when 'ok' then return r.claims;
    when 'disabled' then raise exception 'this account is disabled' using errcode = '28000';
    when 'locked' then raise exception 'too many failed sign-ins; try again in % seconds', r.retry_after using errcode = '28000';
    else raise exception 'invalid email or password' using errcode = '28P01';
  end case;
end;
$$;
comment on function snapbase.authenticate(text, text) is E'@behavior -*\nCheck an email and password and open a session: returns the claims the server signs into a JWT (the database never holds the JWT secret).';

-- Claims for a five-minute stream token of the caller's session, for clients that
-- must put a token in a URL (EventSource). The server accepts it only on the event
-- streams; it ends with its session.
create function snapbase.create_stream_token() returns snapbase.jwt_claims
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  me snapbase.users := snapbase.current_user();
  s snapbase_private.sessions;
begin
  select * into s from snapbase_private.sessions ss
   where ss.id = snapbase_private.current_session_id() and ss.user_id = me.id
     and ss.revoked_at is null and ss.expires_at > now();
  if me.id is null or s.id is null or snapbase_private.current_token_id() is not null then
    raise exception 'sign in with a password to get a stream token (API tokens can be used as they are)' using errcode = '42501';
  end if;
  return row(s.id, me.id, me.email, me.role::text, 'stream', now(), least(s.expires_at, now() + interval '5 minutes'))::snapbase.jwt_claims;
end;
$$;
comment on function snapbase.create_stream_token() is E'@behavior -*\nClaims of a token valid for five minutes, for ?access_token= on event streams (the server signs them).';
grant execute on function snapbase.create_stream_token() to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Signing out, and revoking sessions
--------------------------------------------------------------------------------

create function snapbase.sign_out() returns boolean
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  ended bigint;
begin
  update snapbase_private.sessions s set revoked_at = now()
   where s.id = snapbase_private.current_session_id() and s.user_id = snapbase.current_user_id() and s.revoked_at is null
  returning s.id into ended;
  if ended is not null then
    perform snapbase_private.audit('sign_out', 'session', ended::text);
  end if;
  return ended is not null;
end;
$$;
comment on function snapbase.sign_out() is 'End the session of this JWT (and its stream tokens) now. False when the request carries no session (an API token: revoke it with revokeApiToken).';
grant execute on function snapbase.sign_out() to :ROLE_VIEWER;

create function snapbase.revoke_all_sessions(user_id bigint default null) returns integer
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  target bigint := coalesce(revoke_all_sessions.user_id, snapbase.current_user_id());
  ended integer;
begin
  if target is null then
    raise exception 'name the user whose sessions to revoke' using errcode = '22023';
  end if;
  if target is distinct from snapbase.current_user_id() then
    perform snapbase_private.require_role('admin');
    if not exists (select 1 from snapbase.users u where u.id = target) then
      raise exception 'no user %', target using errcode = 'P0002';
    end if;
  end if;
  update snapbase_private.sessions s set revoked_at = now()
   where s.user_id = target and s.revoked_at is null and s.expires_at > now();
  get diagnostics ended = row_count;
  perform snapbase_private.audit('revoke_all_sessions', 'user', target::text, null, jsonb_build_object('sessions', ended));
  return ended;
end;
$$;
comment on function snapbase.revoke_all_sessions(bigint) is 'End every session of a user now (default: yourself; admins: anyone), this one included. API tokens are not sessions: revoke them with revokeApiToken.';
grant execute on function snapbase.revoke_all_sessions(bigint) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Managing users: role and disabled, effective on the next request
--------------------------------------------------------------------------------

create function snapbase.set_user_role(user_id bigint, role snapbase.user_role) returns snapbase.users
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  before snapbase.users;
  after snapbase.users;
begin
  perform snapbase_private.require_role('admin');
  if role is null then
    raise exception 'role must be viewer, editor or admin' using errcode = '22023';
  end if;
  if set_user_role.user_id = snapbase.current_user_id() then
    raise exception 'you cannot change your own role' using errcode = '42501';
  end if;
  select * into before from snapbase.users u where u.id = set_user_role.user_id for update;
  if before.id is null then
    raise exception 'no user %', set_user_role.user_id using errcode = 'P0002';
  end if;
  update snapbase.users u set role = set_user_role.role where u.id = before.id returning * into after;
  perform snapbase_private.audit('set_user_role', 'user', after.id::text, null,
    jsonb_build_object('email', after.email, 'from', before.role, 'to', after.role));
  return after;
end;
$$;
comment on function snapbase.set_user_role(bigint, snapbase.user_role) is 'Change a user''s role (admins only); their sessions and API tokens act with it from the next request.';
grant execute on function snapbase.set_user_role(bigint, snapbase.user_role) to :ROLE_VIEWER;

create function snapbase.set_user_disabled(user_id bigint, disabled boolean) returns snapbase.users
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  changed snapbase.users;
begin
  perform snapbase_private.require_role('admin');
  if disabled is null then
    raise exception 'disabled must be true or false' using errcode = '22023';
  end if;
  if set_user_disabled.user_id = snapbase.current_user_id() then
    raise exception 'you cannot disable yourself' using errcode = '42501';
  end if;
  update snapbase.users u
     set disabled_at = case when set_user_disabled.disabled then coalesce(u.disabled_at, now()) end
   where u.id = set_user_disabled.user_id
  returning * into changed;
  if changed.id is null then
    raise exception 'no user %', set_user_disabled.user_id using errcode = 'P0002';
  end if;
  if set_user_disabled.disabled then
    -- Re-enabling must not revive old sessions.
    update snapbase_private.sessions s set revoked_at = now() where s.user_id = changed.id and s.revoked_at is null;
  end if;
  perform snapbase_private.audit(case when set_user_disabled.disabled then 'disable_user' else 'enable_user' end,
    'user', changed.id::text, null, jsonb_build_object('email', changed.email));
  return changed;
end;
$$;
comment on function snapbase.set_user_disabled(bigint, boolean) is 'Disable a user (admins only): sign-in, sessions and API tokens are refused from the next request. Enabling lets them sign in again.';
grant execute on function snapbase.set_user_disabled(bigint, boolean) to :ROLE_VIEWER;

-- Lifts the sign-in lockout of an account (by email) or of a client address.
create function snapbase.clear_sign_in_lock(account_or_address text) returns integer
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  cleared integer;
begin
  perform snapbase_private.require_role('admin');
  delete from snapbase_private.login_throttle t
   where (t.scope = 'account' and t.key = lower(btrim(account_or_address)))
      or (t.scope = 'address' and t.key = btrim(account_or_address));
  get diagnostics cleared = row_count;
  perform snapbase_private.audit('clear_sign_in_lock', 'sign_in_lock', account_or_address, null, jsonb_build_object('cleared', cleared));
  return cleared;
end;
$$;
comment on function snapbase.clear_sign_in_lock(text) is 'Lift the sign-in lockout of an account (its email) or a client address (admins only).';
grant execute on function snapbase.clear_sign_in_lock(text) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- API tokens of a disabled user are refused (otherwise as in 000001)
--------------------------------------------------------------------------------

create or replace function snapbase_private.resolve_api_token(secret text)
returns table (token_id bigint, user_id bigint, email text, role text, scopes text[], workbook_id bigint)
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.api_tokens;
  u snapbase.users;
begin
  select tok.* into t
    from snapbase_private.api_token_hashes h join snapbase.api_tokens tok on tok.id = h.token_id
   where h.token_hash = public.digest(secret, 'sha256');
  if t.id is null or t.revoked_at is not null or (t.expires_at is not null and t.expires_at <= now()) then
    return;
  end if;
  select * into u from snapbase.users where id = t.user_id;
  if u.id is null or u.disabled_at is not null then
    return;
  end if;
  update snapbase.api_tokens set last_used_at = now()
   where id = t.id and (last_used_at is null or last_used_at < now() - interval '1 minute');
  return query select t.id, u.id, u.email,
    case
      when 'agent' = any(t.scopes) then 'agent'
      when 'admin' = any(t.scopes) and u.role = 'admin' then 'admin'
      when 'write' = any(t.scopes) and u.role in ('editor', 'admin') then 'editor'
      else 'viewer'
    end,
    t.scopes, t.workbook_id;
end;
$$;
grant execute on function snapbase_private.resolve_api_token(text) to :DATABASE_AUTHENTICATOR;

--! split: 200-tenants-agents.sql
-- Tenants and agents (issue 11).
--
-- * Another tenant's id answers exactly like a missing one ("no X N"), everywhere.
--   cancel_job read NULL for an outsider's access, so its whole IF was NULL and
--   nothing was raised (and its state leaked): access checks here never leave a
--   NULL to an IF (coalesce / IS DISTINCT FROM). revoke_share_link named the
--   table of someone else's link.
-- * Agents never see hidden columns or hidden tables: a hidden table answers like
--   a missing id, a hidden column like one that does not exist, in every function
--   an agent may call and every table it may read (row-level security and column
--   privileges). Agents see no account-level jobs, and lose their access when the
--   user who made them can no longer edit the workbook.
-- * Organization members join by invitation, which the invitee accepts; inviting
--   answers the same whether or not the email has an account.
-- * Share links keep the filter and the columns they were made with (never hidden
--   or scratch ones), and create_share_link returns the link's id with its token.
-- Idempotent while in migrations/current/: replaced signatures are dropped first.
-- Every name is qualified; every function sets search_path = pg_catalog.

--------------------------------------------------------------------------------
-- Drop what this file creates, and what it replaces with another signature
--------------------------------------------------------------------------------

drop function if exists snapbase.add_organization_member(bigint, text);
-- The invitations table, after the functions of its row type; its policy's function after it.
drop function if exists snapbase.invite_organization_member(bigint, text);
drop function if exists snapbase.accept_organization_invitation(bigint);
drop function if exists snapbase.decline_organization_invitation(bigint);
drop function if exists snapbase.revoke_organization_invitation(bigint);
drop function if exists snapbase.remove_organization_member(bigint, bigint);
drop function if exists snapbase.organization_invitations_status(snapbase.organization_invitations);
drop function if exists snapbase_private.my_invitation(bigint);
drop table if exists snapbase.organization_invitations;
drop function if exists snapbase_private.invitation_visible(bigint, text);
drop function if exists snapbase_private.require_organization(bigint, text);
drop function if exists snapbase_private.current_user_email();
drop function if exists snapbase.create_share_link(bigint, boolean, timestamptz);
drop type if exists snapbase.new_share_link;
drop function if exists snapbase_private.shared_rows_query(snapbase.workbook_tables, text[]);
drop function if exists snapbase_private.refuse_hidden_columns(snapbase.workbook_tables, jsonb);
-- (table_visible and job_visible are in row-level security policies: replaced, never dropped.)

--------------------------------------------------------------------------------
-- Who may see a workbook, a table, a job
--------------------------------------------------------------------------------

-- An agent acts for the user who made it, and never beyond that user's rights:
-- once they can no longer edit the workbook (unshared, made a viewer), neither can it.
create or replace function snapbase_private.workbook_access(workbook_id bigint) returns text
  language sql stable security definer set search_path = pg_catalog as $$
  select case
    when snapbase.current_app_role() = 'agent' then
      case when nullif(current_setting('jwt.claims.workbook_id', true), '')::bigint = w.id
             and (w.owner_id = snapbase.current_user_id()
                  or exists (select 1 from snapbase.workbook_members m
                              where m.workbook_id = w.id and m.user_id = snapbase.current_user_id() and m.access = 'editor'))
           then 'agent' end
    when snapbase.current_user_id() is null then
      case when snapbase.current_app_role() = 'admin' then 'owner' end
    when w.owner_id = snapbase.current_user_id() then 'owner'
    else (select m.access::text from snapbase.workbook_members m
           where m.workbook_id = w.id and m.user_id = snapbase.current_user_id())
  end
  from snapbase.workbooks w where w.id = workbook_access.workbook_id
$$;
comment on function snapbase_private.workbook_access(bigint) is
  'The caller''s access to a workbook: owner, editor, viewer, agent, or NULL (none, or no such workbook). An agent token has access to its own workbook only while the user who made it may still edit it.';

create or replace function snapbase_private.table_visible(workbook_id bigint, hidden boolean) returns boolean
  language sql stable security definer set search_path = pg_catalog as $$
  select x.access is not null and (x.access <> 'agent' or not coalesce(hidden, false))
    from (select snapbase_private.workbook_access(workbook_id) as access) x
$$;
comment on function snapbase_private.table_visible(bigint, boolean) is
  'May the caller see a workbook table (of this workbook, hidden or not)? Never NULL: false without access, and false for an agent when the table is hidden. Used by require_table and row-level security alike.';
grant execute on function snapbase_private.table_visible(bigint, boolean) to :ROLE_VIEWER, :ROLE_AGENT;

create or replace function snapbase_private.job_visible(workbook_id bigint, table_id bigint, created_by bigint) returns boolean
  language sql stable security definer set search_path = pg_catalog as $$
  select case
    when workbook_id is null then
      -- Account-level jobs (connection tests, table lists) are their creator's, never an agent's.
      snapbase.current_app_role() is distinct from 'agent' and created_by is not distinct from snapbase.current_user_id()
      and snapbase.current_user_id() is not null
    when table_id is null then snapbase_private.workbook_access(workbook_id) is not null
    else exists (select 1 from snapbase.workbook_tables t
                  where t.id = job_visible.table_id and snapbase_private.table_visible(t.workbook_id, t.hidden))
  end
$$;
comment on function snapbase_private.job_visible(bigint, bigint, bigint) is
  'May the caller see a job? A workbook''s jobs: its members (an agent: not those of hidden tables); an account-level job: its creator, never an agent. Never NULL.';
grant execute on function snapbase_private.job_visible(bigint, bigint, bigint) to :ROLE_VIEWER, :ROLE_AGENT;

alter policy select_accessible on snapbase.workbook_tables using (snapbase_private.table_visible(workbook_id, hidden));
alter policy select_visible on snapbase.jobs using (snapbase_private.job_visible(workbook_id, table_id, created_by));

-- Agents read only these columns: the others can name hidden columns (columns,
-- hidden_columns, column_order, sort and title columns, the filter, the remote id
-- column) or quote values (a job's error, result, options and message).
revoke select on snapbase.workbook_tables from :ROLE_AGENT;
grant select (id, workbook_id, name, table_name, hidden, sort_descending, page_size, created_at, updated_at)
  on snapbase.workbook_tables to :ROLE_AGENT;
revoke select on snapbase.jobs from :ROLE_AGENT;
grant select (id, kind, state, workbook_id, table_id, created_at, started_at, finished_at, updated_at, done, total)
  on snapbase.jobs to :ROLE_AGENT;

create or replace function snapbase_private.require_table(table_id bigint, need text) returns snapbase.workbook_tables
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables;
begin
  select * into t from snapbase.workbook_tables wt where wt.id = table_id;
  if t.id is null or not snapbase_private.table_visible(t.workbook_id, t.hidden) then
    raise exception 'no workbook table %', table_id using errcode = 'P0002';
  end if;
  perform snapbase_private.require_workbook(t.workbook_id, need);
  return t;
end;
$$;
comment on function snapbase_private.require_table(bigint, text) is
  'The workbook table, when the caller has `need` access to it; "no workbook table N" alike for a missing id, another tenant''s table and (for an agent) a hidden one.';

create or replace function snapbase_private.hidden_from_caller(t snapbase.workbook_tables) returns text[]
  language sql stable set search_path = pg_catalog as $$
  select case when snapbase.current_app_role() = 'agent'
    then t.hidden_columns || case when t.remote_id_column = any (t.hidden_columns) then array['__remote_id'] else '{}'::text[] end
    else '{}'::text[] end
$$;
comment on function snapbase_private.hidden_from_caller(snapbase.workbook_tables) is
  'The columns of t the caller may not see: for an agent, the hidden columns (and "__remote_id" when the remote id column is hidden, since the remote id is its value); for members, none.';

create or replace function snapbase_private.require_account(account_id bigint) returns snapbase.connector_accounts
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  a snapbase.connector_accounts;
begin
  select * into a from snapbase.connector_accounts ca
   where ca.id = account_id
     and snapbase.current_app_role() is distinct from 'agent'
     and (ca.owner_id = snapbase.current_user_id() or (snapbase.current_user_id() is null and snapbase.current_app_role() = 'admin'));
  if a.id is null then
    raise exception 'no connector account %', account_id using errcode = 'P0002';
  end if;
  return a;
end;
$$;
comment on function snapbase_private.require_account(bigint) is
  'The connector account, when it is the caller''s (a DBA: any); "no connector account N" alike for missing ones, other users'' and any asked for by an agent.';

create or replace function snapbase_private.require_csv_file(file_id bigint) returns snapbase.csv_files
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  f snapbase.csv_files;
begin
  select * into f from snapbase.csv_files cf
   where cf.id = file_id
     and snapbase.current_app_role() is distinct from 'agent'
     and (cf.owner_id = snapbase.current_user_id() or (snapbase.current_user_id() is null and snapbase.current_app_role() = 'admin'));
  if f.id is null then
    raise exception 'no CSV file %', coalesce(file_id::text, 'null') using errcode = 'P0002';
  end if;
  return f;
end;
$$;
comment on function snapbase_private.require_csv_file(bigint) is
  'The uploaded CSV file, when it is the caller''s (a DBA: any); "no CSV file N" alike for missing ones, other users'' and any asked for by an agent.';

--------------------------------------------------------------------------------
-- cancel_job: access first, with no NULL left to the IF
--------------------------------------------------------------------------------

-- cancel_job: see 300-faults-jobs-publish.sql (one definition, with these access rules).

--------------------------------------------------------------------------------
-- revoke_share_link: someone else's link is "no share link N", as a missing one
--------------------------------------------------------------------------------

create or replace function snapbase.revoke_share_link(link_id bigint) returns snapbase.share_links
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  link snapbase.share_links;
  t snapbase.workbook_tables;
begin
  select * into link from snapbase.share_links l where l.id = link_id;
  select * into t from snapbase.workbook_tables wt where wt.id = link.table_id;
  -- Only the workbook's owner manages (and sees) its links.
  if link.id is null or snapbase_private.workbook_access(t.workbook_id) is distinct from 'owner' then
    raise exception 'no share link %', link_id using errcode = 'P0002';
  end if;
  update snapbase.share_links l set revoked_at = coalesce(l.revoked_at, now()) where l.id = link.id returning * into link;
  perform snapbase_private.audit_workbook('revoke_share_link', t.workbook_id, 'share_link', link.id::text, snapbase_private.table_rel(t));
  return link;
end;
$$;

--------------------------------------------------------------------------------
-- Records as agents see them: no hidden column, anywhere in the record
--------------------------------------------------------------------------------

create or replace function snapbase_private.record_json_sql(hide text[] default '{}') returns text
  language sql immutable set search_path = pg_catalog as $$
  select format($f$jsonb_build_object('id', r.__id, 'remote_id', %3$s,
    'values', to_jsonb(r.*) - %1$L::text[], 'edited', r.__edited - %2$L::text[], 'suggested', r.__suggested - %2$L::text[],
    'state', jsonb_build_object('created', r.__created, 'deleted', r.__deleted, 'dirty', %4$s,
                                'suggested_new', r.__suggested_new, 'suggest_delete', r.__suggest_delete,
                                'source_deleted', r.__source_deleted, 'publish', %5$s))$f$,
    snapbase_private.record_meta_columns() || hide, hide,
    case when '__remote_id' = any (hide) then 'null::text' else 'r.__remote_id' end,
    case when cardinality(hide) = 0 then 'r.__dirty'
         else format($d$(r.__created or r.__deleted or r.__edited - %L::text[] <> '{}')$d$, hide) end,
    case when cardinality(hide) = 0 then 'r.__publish'
         else format($p$(r.__publish - 'error' - 'source_values'
                         || case when r.__publish ? 'source_values'
                                 then jsonb_build_object('source_values', (r.__publish -> 'source_values') - %L::text[]) else '{}' end)$p$, hide) end)
$$;
comment on function snapbase_private.record_json_sql(text[]) is
  'The SQL expression of a record (alias r) as JSON, leaving out the columns in `hide` everywhere they could appear: values, edit flags, suggestions, the dirty flag (edits of hidden columns alone do not make a record dirty), a conflict''s source values and its message (which names columns); "__remote_id" in `hide` leaves out the remote id.';

create or replace function snapbase.workbook_record(table_id bigint, record_id bigint) returns jsonb
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
begin
  return snapbase_private.get_record(t, record_id, snapbase_private.hidden_from_caller(t));
end;
$$;

create or replace function snapbase.workbook_records(table_id bigint, page_size integer default null, after text default null,
    sort_column text default null, descending boolean default null, use_filter boolean default true, include_deleted boolean default true)
  returns jsonb
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
  rel text := snapbase_private.table_rel(t);
  hide text[] := snapbase_private.hidden_from_caller(t);
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
  -- A filter that reads a column hidden from the caller does not apply to it: the
  -- records it would pick out would tell what the hidden column holds.
  applies boolean := coalesce(use_filter, true) and t.filter is not null and not exists (
      select 1 from jsonb_array_elements(coalesce(t.filter_columns, '[]')) c where c ->> 'name' = any (hide));
  shown_columns jsonb := (select coalesce(jsonb_agg(c order by ord), '[]') from jsonb_array_elements(t.columns) with ordinality e(c, ord)
                           where c ->> 'name' <> all (hide));
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
    || case when applies then ' and ' || snapbase_private.filter_clause(t) else '' end;

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
    return jsonb_build_object('records', page, 'columns', shown_columns, 'sort_column', col, 'descending', desc_,
      'filter', case when applies then t.filter end,
      'next_cursor', encode(convert_to(jsonb_build_object('id', last_record -> 'id', 'c', col, 'd', desc_, 'v', last_value)::text, 'UTF8'), 'base64'));
  end if;
  return jsonb_build_object('records', page, 'columns', shown_columns, 'sort_column', col, 'descending', desc_,
    'filter', case when applies then t.filter end, 'next_cursor', null);
end;
$$;
comment on function snapbase.workbook_records(bigint, integer, text, text, boolean, boolean, boolean) is
  'A page of records: {records, columns, next_cursor, sort_column, descending, filter}. Keyset pages (pass next_cursor as after), nulls last, ties by id; `columns` are the column specs the caller may see; `filter` is the filter applied (null when none: an agent is never filtered by a filter that reads a column hidden from it).';

create or replace function snapbase.workbook_record_counts(table_id bigint) returns snapbase.record_counts
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
  hide text[] := snapbase_private.hidden_from_caller(t);
  applies boolean := t.filter is not null and not exists (
      select 1 from jsonb_array_elements(coalesce(t.filter_columns, '[]')) c where c ->> 'name' = any (hide));
begin
  -- Edits and suggestions of hidden columns alone do not count for whoever may not see them ($1).
  return jsonb_populate_record(null::snapbase.record_counts, snapbase_sandbox.read_jsonb(format($q$
    select jsonb_build_object(
             'total', count(*) filter (where not r.__suggested_new),
             'filtered', count(*) filter (where not r.__suggested_new and %s),
             'dirty', count(*) filter (where r.__created or r.__deleted or r.__edited - $1::text[] <> '{}'),
             'with_suggestions', count(*) filter (where r.__suggested - $1::text[] <> '{}' or r.__suggest_delete is not null or r.__suggested_new),
             'deleted', count(*) filter (where r.__deleted))
      from %s r$q$, case when applies then snapbase_private.filter_clause(t) else 'true' end, snapbase_private.table_rel(t)), hide));
end;
$$;

create or replace function snapbase.workbook_suggestions(table_id bigint, page_size integer default 100, after_id bigint default null) returns jsonb
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
  hide text[] := snapbase_private.hidden_from_caller(t);
  page jsonb;
begin
  if page_size not between 1 and 1000 then
    raise exception 'page_size must be from 1 to 1000 (got %)', page_size using errcode = '22023';
  end if;
  -- Records whose only suggestions are of hidden columns are not listed to whoever may not see them ($3).
  execute format($q$
    select coalesce(jsonb_agg(%s order by r.__id), '[]')
      from (select * from %s r
             where (r.__suggested - $3::text[] <> '{}' or r.__suggest_delete is not null or r.__suggested_new)
               and ($1::bigint is null or r.__id > $1) order by r.__id limit $2) r$q$,
    snapbase_private.record_json_sql(hide), snapbase_private.table_rel(t))
    into page using after_id, page_size, hide;
  return page;
end;
$$;

-- A hidden column is, to an agent, a column that does not exist: the same message.
create function snapbase_private.refuse_hidden_columns(t snapbase.workbook_tables, vals jsonb) returns void
  language plpgsql stable set search_path = pg_catalog as $$
declare
  hide text[] := snapbase_private.hidden_from_caller(t);
  unknown text;
begin
  if cardinality(hide) = 0 or jsonb_typeof(vals) is distinct from 'object' then
    return;
  end if;
  select string_agg(key, ', ') into unknown from jsonb_object_keys(vals) key
   where key <> all (snapbase_private.column_names(t)) or key = any (hide);
  if unknown is not null then
    raise exception 'unknown column(s) in workbook table %: %', t.id, unknown using errcode = '22023';
  end if;
end;
$$;
comment on function snapbase_private.refuse_hidden_columns(snapbase.workbook_tables, jsonb) is
  'Refuses values naming a column hidden from the caller with the very message check_values gives for a column that does not exist, so an agent cannot tell the two apart.';

create or replace function snapbase.suggest_values(table_id bigint, record_id bigint, "values" jsonb) returns jsonb
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  by_whom text := coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user)
                  || case when snapbase.current_app_role() = 'agent' then ' (agent)' else '' end;
  is_new boolean;
begin
  perform snapbase_private.refuse_hidden_columns(t, "values");
  execute format('select __created or __suggested_new from %s where __id = $1', snapbase_private.table_rel(t)) into is_new using record_id;
  if is_new is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.check_values(t, "values", is_new);
  execute format($u$
    update %s set __suggested = __suggested || (select jsonb_object_agg(k, jsonb_build_object('value', v, 'by', $3::text, 'at', now()))
                                                  from jsonb_each($2) e(k, v)),
                  __updated_at = now()
     where __id = $1$u$, snapbase_private.table_rel(t)) using record_id, "values", by_whom;
  perform snapbase_private.audit_workbook('suggest_values', t.workbook_id, 'workbook_record', record_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id, 'values', "values"));
  return snapbase_private.get_record(t, record_id, snapbase_private.hidden_from_caller(t));
end;
$$;

create or replace function snapbase.suggest_new_record(table_id bigint, "values" jsonb) returns jsonb
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  by_whom text := coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user)
                  || case when snapbase.current_app_role() = 'agent' then ' (agent)' else '' end;
  new_id bigint;
begin
  perform snapbase_private.refuse_hidden_columns(t, "values");
  perform snapbase_private.check_values(t, "values", true);
  execute format($i$
    insert into %s (__suggested_new, __suggested)
    select true, coalesce(jsonb_object_agg(k, jsonb_build_object('value', v, 'by', $2::text, 'at', now())), '{}') from jsonb_each($1) e(k, v)
    returning __id$i$, snapbase_private.table_rel(t)) into new_id using "values", by_whom;
  perform snapbase_private.audit_workbook('suggest_new_record', t.workbook_id, 'workbook_record', new_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id, 'values', "values"));
  return snapbase_private.get_record(t, new_id, snapbase_private.hidden_from_caller(t));
end;
$$;

create or replace function snapbase.suggest_delete(table_id bigint, record_id bigint) returns jsonb
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  found_id bigint;
begin
  execute format($u$update %s set __suggest_delete = jsonb_build_object('by', $2::text, 'at', now()), __updated_at = now()
                     where __id = $1 and not __suggested_new returning __id$u$, snapbase_private.table_rel(t))
    into found_id
    using record_id, coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user)
                     || case when snapbase.current_app_role() = 'agent' then ' (agent)' else '' end;
  if found_id is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.audit_workbook('suggest_delete', t.workbook_id, 'workbook_record', record_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id));
  return snapbase_private.get_record(t, record_id, snapbase_private.hidden_from_caller(t));
end;
$$;

-- What publishing would do, as the caller may see it: an agent sees neither hidden
-- tables nor hidden columns (not in values, before/after, or a delete's before row).
create or replace function snapbase.publish_preview(workbook_id bigint, max_records integer default 100) returns jsonb
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'read');
  t snapbase.workbook_tables;
  rel text;
  hide text[];
  leave_out text[];
  counts jsonb;
  creates jsonb;
  updates jsonb;
  deletes jsonb;
  tables jsonb := '[]';
begin
  for t in select * from snapbase.workbook_tables wt
            where wt.workbook_id = wb.id and snapbase_private.table_visible(wt.workbook_id, wt.hidden) order by wt.id loop
    rel := snapbase_private.table_rel(t);
    hide := snapbase_private.hidden_from_caller(t);
    -- Scratch columns are never published; hidden ones are not shown ($1).
    leave_out := snapbase_private.scratch_columns(t) || hide;
    -- Deleting a record that never reached the source removes it, so created and
    -- deleted exclude each other here.
    execute format($q$
      select jsonb_build_object(
        'create_count', count(*) filter (where r.__created),
        'update_count', count(*) filter (where not r.__created and not r.__deleted and r.__edited - $1 <> '{}'),
        'delete_count', count(*) filter (where r.__deleted))
        from %s r where r.__dirty$q$, rel)
      into counts using leave_out;
    execute format($q$
      select coalesce(jsonb_agg(jsonb_build_object('id', r.__id, 'values', to_jsonb(r.*) - $2 - $1) order by r.__id), '[]')
        from (select * from %s r where r.__created order by r.__id limit $3) r$q$, rel)
      into creates using leave_out, snapbase_private.record_meta_columns(), max_records;
    execute format($q$
      select coalesce(jsonb_agg(jsonb_build_object('id', r.__id, 'remote_id', case when $3 then r.__remote_id end, 'fields',
               (select jsonb_agg(jsonb_build_object('column', k, 'before', r.__last_seen -> k, 'after', to_jsonb(r.*) -> k,
                                                    'edited_at', r.__edited -> k) order by k)
                  from jsonb_object_keys(r.__edited - $1) k)) order by r.__id), '[]')
        from (select * from %s r where r.__dirty and not r.__created and not r.__deleted and r.__edited - $1 <> '{}'
               order by r.__id limit $2) r$q$, rel)
      into updates using leave_out, max_records, '__remote_id' <> all (hide);
    execute format($q$
      select coalesce(jsonb_agg(jsonb_build_object('id', r.__id, 'remote_id', case when $3 then r.__remote_id end,
                                                   'before', r.__last_seen - $2) order by r.__id), '[]')
        from (select * from %s r where r.__deleted order by r.__id limit $1) r$q$, rel)
      into deletes using max_records, hide, '__remote_id' <> all (hide);
    tables := tables || jsonb_build_array(jsonb_build_object('table_id', t.id, 'name', t.name)
                || counts || jsonb_build_object('creates', creates, 'updates', updates, 'deletes', deletes));
  end loop;
  return jsonb_build_object('workbook_id', wb.id, 'tables', tables);
end;
$$;

--------------------------------------------------------------------------------
-- Events as agents see them: none of a hidden table, none of an account
--------------------------------------------------------------------------------

create or replace function snapbase.visible_events(topic text, after_id bigint default 0, max_events integer default 500) returns setof jsonb
  language plpgsql stable security definer set search_path = pg_catalog as $$
begin
  if topic = 'changes' then
    perform snapbase_private.require_role('viewer');
    return query
      select jsonb_build_object('id', e.id, 'topic', e.topic, 'kind', e.kind) || e.payload
        from snapbase_private.events e
        join snapbase.managed_tables m on m.id = (e.payload ->> 'managed_table_id')::bigint
       where e.topic = 'changes' and e.id > coalesce(after_id, 0) and snapbase_private.can_read(m)
       order by e.id limit max_events;
  elsif topic ~ '^(workbook|account):\d{1,18}$' then
    if topic like 'workbook:%' then
      perform snapbase_private.require_workbook(split_part(topic, ':', 2)::bigint, 'read');
    else
      perform snapbase_private.require_account(split_part(topic, ':', 2)::bigint);
    end if;
    -- An event about a table is shown to an agent only while that table exists and is
    -- not hidden, or when it says a table the agent could see was removed.
    return query
      select jsonb_build_object('id', e.id, 'topic', e.topic, 'kind', e.kind) || (e.payload - 'hidden')
        from snapbase_private.events e
       where e.topic = visible_events.topic and e.id > coalesce(after_id, 0)
         and (e.payload ->> 'table_id' is null or snapbase.current_app_role() is distinct from 'agent'
              or exists (select 1 from snapbase.workbook_tables wt
                          where wt.id = (e.payload ->> 'table_id')::bigint and not wt.hidden)
              or (e.kind = 'table_removed' and e.payload -> 'hidden' = 'false'::jsonb))
       order by e.id limit max_events;
  elsif topic ~ '^(workbook|account):\d+$' then
    -- An id too large to exist: the same answer as any other missing one.
    raise exception 'no % %', case when topic like 'workbook:%' then 'workbook' else 'connector account' end, split_part(topic, ':', 2)
      using errcode = 'P0002';
  else
    raise exception 'topic must be changes, workbook:<id> or account:<id> (got %)', topic using errcode = '22023';
  end if;
end;
$$;

-- A removed table's event says whether it was hidden, so that agents hear of the
-- removal of a table they could see, and of no other (the flag is not shown).
create or replace function snapbase_private.tg__table_settings_event() returns trigger
  language plpgsql security definer set search_path = pg_catalog as $$
begin
  if tg_op = 'DELETE' then
    -- Gone with its workbook: nobody is left to tell.
    if exists (select 1 from snapbase.workbooks where id = old.workbook_id) then
      perform snapbase_private.emit('workbook:' || old.workbook_id, 'table_removed', jsonb_build_object('table_id', old.id, 'hidden', old.hidden));
    end if;
  else
    perform snapbase_private.emit('workbook:' || new.workbook_id,
      case when tg_op = 'INSERT' then 'table_added' else 'table_settings_changed' end, jsonb_build_object('table_id', new.id));
  end if;
  return null;
end;
$$;

--------------------------------------------------------------------------------
-- Organizations: members join by invitation, with the invitee's consent
--------------------------------------------------------------------------------

create function snapbase_private.current_user_email() returns text
  language sql stable security definer set search_path = pg_catalog as $$
  select lower(u.email) from snapbase.users u where u.id = snapbase.current_user_id()
$$;
comment on function snapbase_private.current_user_email() is
  'The signed-in user''s email as the users table has it now (not the JWT''s claim), lower-case; NULL without a user.';
grant execute on function snapbase_private.current_user_email() to :ROLE_VIEWER;

create function snapbase_private.require_organization(organization_id bigint, owner_action text) returns snapbase.organizations
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  o snapbase.organizations;
  m snapbase.organization_members;
begin
  select * into o from snapbase.organizations org where org.id = organization_id;
  -- A DBA (the owner, no user) acts as every organization's owner.
  if snapbase.current_user_id() is null and snapbase.current_app_role() is not distinct from 'admin' then
    if o.id is null then
      raise exception 'no organization %', organization_id using errcode = 'P0002';
    end if;
    return o;
  end if;
  select * into m from snapbase.organization_members om where om.organization_id = o.id and om.user_id = snapbase.current_user_id();
  if o.id is null or m.user_id is null or snapbase.current_app_role() is not distinct from 'agent' then
    raise exception 'no organization %', organization_id using errcode = 'P0002';
  end if;
  if owner_action is not null and not m.is_owner then
    raise exception 'only an owner of organization % may %', organization_id, owner_action using errcode = '42501';
  end if;
  return o;
end;
$$;
comment on function snapbase_private.require_organization(bigint, text) is
  'The organization, when the caller is a member (and an owner, when owner_action says what for); "no organization N" alike for a missing id and one the caller is not a member of.';

create table snapbase.organization_invitations (
  id bigint generated always as identity primary key,
  organization_id bigint not null references snapbase.organizations on delete cascade,
  -- As they were when the invitation was made, for the invitee (who cannot see the organization yet).
  organization_name text not null,
  email text not null check (email ~ '^[^@\s]+@[^@\s]+$' and length(email) <= 320 and email = lower(email)),
  invited_by bigint references snapbase.users on delete set null,
  invited_by_email text,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  accepted_at timestamptz,
  declined_at timestamptz,
  revoked_at timestamptz
);
create index organization_invitations_organization_id_idx on snapbase.organization_invitations (organization_id);
create index organization_invitations_email_idx on snapbase.organization_invitations (email);
comment on table snapbase.organization_invitations is
  E'An invitation to join an organization, by email. Its owners see the organization''s invitations; the invitee sees theirs once signed in with that email, and accepts or declines. It never says whether the email has an account.';
comment on column snapbase.organization_invitations.email is 'The invited address, lower-case.';

create function snapbase_private.invitation_visible(organization_id bigint, email text) returns boolean
  language sql stable security definer set search_path = pg_catalog as $$
  select snapbase.current_app_role() is distinct from 'agent' and (
    (snapbase.current_user_id() is null and snapbase.current_app_role() is not distinct from 'admin')
    or exists (select 1 from snapbase.organization_members m
                where m.organization_id = invitation_visible.organization_id and m.user_id = snapbase.current_user_id() and m.is_owner)
    or email is not distinct from snapbase_private.current_user_email() and snapbase.current_user_id() is not null)
$$;
comment on function snapbase_private.invitation_visible(bigint, text) is
  'May the caller see an invitation: an owner of its organization, or the user signed in with the invited email. Never NULL.';
grant execute on function snapbase_private.invitation_visible(bigint, text) to :ROLE_VIEWER;

alter table snapbase.organization_invitations enable row level security;
create policy select_owners_and_invitee on snapbase.organization_invitations for select
  using (snapbase_private.invitation_visible(organization_id, email));
grant select on snapbase.organization_invitations to :ROLE_VIEWER;

create function snapbase.organization_invitations_status(i snapbase.organization_invitations) returns text
  language sql stable set search_path = pg_catalog as $$
  select case
    when i.revoked_at is not null then 'revoked'
    when i.accepted_at is not null then 'accepted'
    when i.declined_at is not null then 'declined'
    when i.expires_at <= now() then 'expired'
    else 'pending'
  end
$$;
comment on function snapbase.organization_invitations_status(snapbase.organization_invitations) is
  'pending, accepted, declined, revoked or expired.';
grant execute on function snapbase.organization_invitations_status(snapbase.organization_invitations) to :ROLE_VIEWER;

create function snapbase.invite_organization_member(organization_id bigint, email text) returns snapbase.organization_invitations
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  o snapbase.organizations := snapbase_private.require_organization(organization_id, 'invite members');
  address text := lower(trim(email));
  inv snapbase.organization_invitations;
begin
  if address is null or address !~ '^[^@\s]+@[^@\s]+$' or length(address) > 320 then
    raise exception 'email must be an address like name@example.com' using errcode = '22023';
  end if;
  -- One pending invitation per address: inviting again renews it. Nothing here
  -- depends on whether the address has an account (or is a member already).
  perform 1 from snapbase.organizations org where org.id = o.id for update;
  select * into inv from snapbase.organization_invitations i
   where i.organization_id = o.id and i.email = address
     and i.accepted_at is null and i.declined_at is null and i.revoked_at is null and i.expires_at > now()
   order by i.id desc limit 1;
  if inv.id is null then
    insert into snapbase.organization_invitations (organization_id, organization_name, email, invited_by, invited_by_email, expires_at)
      values (o.id, o.name, address, snapbase.current_user_id(), snapbase_private.current_user_email(), now() + interval '14 days')
      returning * into inv;
  else
    update snapbase.organization_invitations i
       set expires_at = now() + interval '14 days', invited_by = snapbase.current_user_id(),
           invited_by_email = snapbase_private.current_user_email(), organization_name = o.name
     where i.id = inv.id returning * into inv;
  end if;
  perform snapbase_private.audit('invite_organization_member', 'organization_invitation', inv.id::text, null,
    jsonb_build_object('organization_id', o.id, 'email', address, 'expires_at', inv.expires_at));
  return inv;
end;
$$;
comment on function snapbase.invite_organization_member(bigint, text) is
  'Invite an email address to an organization (its owners only). The invitee joins by accepting, once signed in with that address; the answer is the same whether or not the address has an account. Inviting again renews a pending invitation; it expires after 14 days.';
grant execute on function snapbase.invite_organization_member(bigint, text) to :ROLE_VIEWER;

-- The invitation, locked, when it is the caller's; "no invitation N" otherwise.
create function snapbase_private.my_invitation(invitation_id bigint) returns snapbase.organization_invitations
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  inv snapbase.organization_invitations;
begin
  select * into inv from snapbase.organization_invitations i where i.id = invitation_id for update;
  if inv.id is null or snapbase.current_user_id() is null or snapbase.current_app_role() is not distinct from 'agent'
     or inv.email is distinct from snapbase_private.current_user_email() then
    raise exception 'no invitation %', invitation_id using errcode = 'P0002';
  end if;
  if snapbase.organization_invitations_status(inv) = 'expired' then
    raise exception 'invitation % has expired', invitation_id using errcode = '55000';
  end if;
  if snapbase.organization_invitations_status(inv) <> 'pending' then
    raise exception 'invitation % is %, not pending', invitation_id, snapbase.organization_invitations_status(inv) using errcode = '55000';
  end if;
  return inv;
end;
$$;
comment on function snapbase_private.my_invitation(bigint) is
  'A pending invitation addressed to the signed-in user''s email, locked; "no invitation N" alike for a missing one and anyone else''s.';

create function snapbase.accept_organization_invitation(invitation_id bigint) returns snapbase.organization_members
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  inv snapbase.organization_invitations := snapbase_private.my_invitation(invitation_id);
  joined snapbase.organization_members;
begin
  insert into snapbase.organization_members (organization_id, user_id) values (inv.organization_id, snapbase.current_user_id())
    on conflict do nothing;
  update snapbase.organization_invitations i set accepted_at = now() where i.id = inv.id;
  select * into joined from snapbase.organization_members m where m.organization_id = inv.organization_id and m.user_id = snapbase.current_user_id();
  perform snapbase_private.audit('accept_organization_invitation', 'organization_invitation', inv.id::text, null,
    jsonb_build_object('organization_id', inv.organization_id, 'email', inv.email));
  return joined;
end;
$$;
comment on function snapbase.accept_organization_invitation(bigint) is 'Join the organization of a pending invitation to your email.';
grant execute on function snapbase.accept_organization_invitation(bigint) to :ROLE_VIEWER;

create function snapbase.decline_organization_invitation(invitation_id bigint) returns snapbase.organization_invitations
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  inv snapbase.organization_invitations := snapbase_private.my_invitation(invitation_id);
begin
  update snapbase.organization_invitations i set declined_at = now() where i.id = inv.id returning * into inv;
  perform snapbase_private.audit('decline_organization_invitation', 'organization_invitation', inv.id::text, null,
    jsonb_build_object('organization_id', inv.organization_id, 'email', inv.email));
  return inv;
end;
$$;
comment on function snapbase.decline_organization_invitation(bigint) is 'Decline a pending invitation to your email (its organization''s owners see it declined).';
grant execute on function snapbase.decline_organization_invitation(bigint) to :ROLE_VIEWER;

create function snapbase.revoke_organization_invitation(invitation_id bigint) returns snapbase.organization_invitations
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  inv snapbase.organization_invitations;
begin
  select * into inv from snapbase.organization_invitations i where i.id = invitation_id for update;
  if inv.id is null or not snapbase_private.invitation_visible(inv.organization_id, null) then
    raise exception 'no invitation %', invitation_id using errcode = 'P0002';
  end if;
  if snapbase.organization_invitations_status(inv) not in ('pending', 'expired') then
    raise exception 'invitation % is %, not pending', invitation_id, snapbase.organization_invitations_status(inv) using errcode = '55000';
  end if;
  update snapbase.organization_invitations i set revoked_at = now() where i.id = inv.id returning * into inv;
  perform snapbase_private.audit('revoke_organization_invitation', 'organization_invitation', inv.id::text, null,
    jsonb_build_object('organization_id', inv.organization_id, 'email', inv.email));
  return inv;
end;
$$;
comment on function snapbase.revoke_organization_invitation(bigint) is 'Withdraw an invitation before it is accepted (owners of its organization).';
grant execute on function snapbase.revoke_organization_invitation(bigint) to :ROLE_VIEWER;

create function snapbase.remove_organization_member(organization_id bigint, user_id bigint) returns boolean
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  -- Anyone may leave; removing someone else is for owners.
  o snapbase.organizations := snapbase_private.require_organization(organization_id,
         case when user_id is distinct from snapbase.current_user_id() then 'remove members' end);
  m snapbase.organization_members;
begin
  select * into m from snapbase.organization_members om where om.organization_id = o.id and om.user_id = remove_organization_member.user_id for update;
  if m.user_id is null then
    raise exception 'no member % in organization %', user_id, o.id using errcode = 'P0002';
  end if;
  if m.is_owner and not exists (select 1 from snapbase.organization_members om
                                 where om.organization_id = o.id and om.is_owner and om.user_id <> m.user_id) then
    raise exception 'organization % would have no owner left' , o.id using errcode = '55000';
  end if;
  -- Their shares of the organization's workbooks go with them (and so do their agents' rights).
  delete from snapbase.workbook_members wm using snapbase.workbooks w
   where w.id = wm.workbook_id and w.organization_id = o.id and wm.user_id = m.user_id;
  delete from snapbase.organization_members om where om.organization_id = o.id and om.user_id = m.user_id;
  perform snapbase_private.audit('remove_organization_member', 'organization', o.id::text, null, jsonb_build_object('user_id', m.user_id));
  return true;
end;
$$;
comment on function snapbase.remove_organization_member(bigint, bigint) is
  'Leave an organization (your own user id), or remove a member (owners); their shares of its workbooks end too. An organization keeps at least one owner.';
grant execute on function snapbase.remove_organization_member(bigint, bigint) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Share links: frozen when made, never hidden or scratch columns
--------------------------------------------------------------------------------

alter table snapbase.share_links
  add column if not exists filter text,
  add column if not exists filter_columns jsonb,
  add column if not exists columns text[];
comment on column snapbase.share_links.filter is 'The table''s filter when the link was made "with the active filter" (null: every record); later filter changes do not reach the link.';
comment on column snapbase.share_links.filter_columns is 'The columns (name and type) that filter reads, as when it was checked: a change of type stops the link rather than reinterpret it.';
comment on column snapbase.share_links.columns is 'The columns the link shares: those neither hidden nor scratch when it was made. A column hidden later is left out too; one shown later is not added.';
-- Links made before: frozen now, as they are at this moment.
update snapbase.share_links l
   set filter = case when l.use_filter then t.filter end,
       filter_columns = case when l.use_filter then t.filter_columns end,
       columns = array(select c from unnest(snapbase_private.column_names(t, true)) c where c <> all (t.hidden_columns))
  from snapbase.workbook_tables t
 where t.id = l.table_id and l.columns is null;
alter table snapbase.share_links alter column columns set not null;

create type snapbase.new_share_link as (
  link_id bigint,
  token text,
  table_id bigint,
  columns text[],
  filter text,
  expires_at timestamptz
);
comment on type snapbase.new_share_link is 'A share link just made: its id (to revoke it with) and its token, shown this once.';

create function snapbase.create_share_link(table_id bigint, use_filter boolean default false, expires_at timestamptz default null)
  returns snapbase.new_share_link
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'manage');
  token text := 'sbs_' || snapbase_private.base64url(public.gen_random_bytes(32));
  shared text[] := array(select c from unnest(snapbase_private.column_names(t, true)) c where c <> all (t.hidden_columns));
  made snapbase.new_share_link;
  link snapbase.share_links;
begin
  if expires_at is not null and expires_at <= now() then
    raise exception 'expires_at must be in the future' using errcode = '22023';
  end if;
  if cardinality(shared) = 0 then
    raise exception 'every column of workbook table % is hidden or scratch: a link would share nothing', t.id using errcode = '22023';
  end if;
  if coalesce(use_filter, false) and t.filter is not null then
    perform snapbase_private.filter_clause(t);  -- refuses a filter that no longer fits its columns
  end if;
  insert into snapbase.share_links (table_id, use_filter, created_by, expires_at, filter, filter_columns, columns)
    values (t.id, coalesce(use_filter, false), snapbase.current_user_id(), expires_at,
            case when use_filter then t.filter end, case when use_filter then t.filter_columns end, shared)
    returning * into link;
  insert into snapbase_private.share_link_tokens (link_id, token_hash) values (link.id, public.digest(token, 'sha256'));
  perform snapbase_private.audit_workbook('create_share_link', t.workbook_id, 'share_link', link.id::text, snapbase_private.table_rel(t),
    jsonb_build_object('table_id', t.id, 'use_filter', link.use_filter, 'filter', link.filter, 'columns', link.columns, 'expires_at', expires_at));
  made := row(link.id, token, t.id, link.columns, link.filter, link.expires_at);
  return made;
end;
$$;
comment on function snapbase.create_share_link(bigint, boolean, timestamptz) is
  'A public CSV link to a workbook table (its owner only): the columns that are neither hidden nor scratch now, and with use_filter the active filter as it is now; neither follows later changes. Returns the link''s id and its token (shown once; only its hash is kept).';
grant execute on function snapbase.create_share_link(bigint, boolean, timestamptz) to :ROLE_VIEWER;

create function snapbase_private.shared_rows_query(t snapbase.workbook_tables, cols text[]) returns text
  language sql stable set search_path = pg_catalog as $$
  select format('select array[%s] from %s r where not r.__deleted and not r.__suggested_new and %s order by r.__id',
    (select string_agg(format('r.%I::text', c), ', ') from unnest(cols) c),
    snapbase_private.table_rel(t),
    snapbase_private.filter_clause(t))
$$;
comment on function snapbase_private.shared_rows_query(snapbase.workbook_tables, text[]) is
  'The query of a share link''s rows (text[] each): the given columns, %I-quoted, of the records that are neither deleted nor suggested, under t.filter (the link''s frozen filter, checked by filter_clause). Run by the filter reader.';

create or replace function snapbase.shared_table_rows(token text) returns setof text[]
  language plpgsql security definer set search_path = pg_catalog
  set "DateStyle" = 'ISO, YMD' set "IntervalStyle" = 'postgres' set extra_float_digits = 3 set bytea_output = 'hex' as $$
declare
  link snapbase.share_links;
  t snapbase.workbook_tables;
  cols text[];
begin
  select l.* into link from snapbase_private.share_link_tokens k join snapbase.share_links l on l.id = k.link_id
   where k.token_hash = public.digest(token, 'sha256')
     and l.revoked_at is null and (l.expires_at is null or l.expires_at > now());
  if link.id is null then
    raise exception 'no such share link (it may have expired or been revoked)' using errcode = 'P0002';
  end if;
  select * into t from snapbase.workbook_tables where id = link.table_id;
  -- The link's own filter, frozen when it was made; it must still read the same columns with the same types.
  t.filter := link.filter;
  t.filter_columns := link.filter_columns;
  if t.filter is not null and (t.filter_columns is null or exists (
       select 1 from jsonb_array_elements(t.filter_columns) c
        where not exists (select 1 from snapbase_private.filter_parameters(t) p where p.name = c ->> 'name' and p.type = c ->> 'type'))) then
    raise exception 'this share link''s filter no longer fits its table; its owner can make a new link' using errcode = '55000';
  end if;
  -- Its columns, less any hidden or made scratch since, in the table's order.
  cols := array(select c from unnest(snapbase_private.column_names(t, true)) c where c = any (link.columns) and c <> all (t.hidden_columns));
  if cardinality(cols) = 0 then
    raise exception 'this share link''s columns are all hidden now; its owner can make a new link' using errcode = '55000';
  end if;
  update snapbase.share_links set last_used_at = now(), use_count = use_count + 1 where id = link.id;
  perform snapbase_private.audit('share_link_access', 'share_link', link.id::text, snapbase_private.table_rel(t),
    jsonb_build_object('workbook_id', t.workbook_id, 'table_id', t.id));
  return next cols;
  return query select * from snapbase_sandbox.read_text_rows(snapbase_private.shared_rows_query(t, cols), '{}');
end;
$$;

--! split: 300-faults-jobs-publish.sql
-- Faults (issue 12): jobs whose worker died, exactly-once publishing, and outcomes
-- a client cannot misread.
--
-- * Dead workers. Each worker process registers in snapbase_private.workers and
--   holds a session advisory lock for as long as its connection lives; it beats
--   every few seconds. A process whose lock is gone (killed, connection lost) and
--   that has not beaten since lock_grace, or whose heartbeat is older than
--   dead_after (hung), is dead: recover_dead_workers, run by every
--   live worker, hands its graphile-worker jobs back with graphile-worker's own
--   force_unlock_workers, and puts their snapbase.jobs back to 'queued' (or ends
--   them, when cancelled or out of attempts). cancel_job ends a job at once when
--   no live worker runs it.
-- * Fencing. A task runs each statement with `snapbase.job_runner` set to its
--   graphile-worker pool id; job functions refuse (SQLSTATE SBJ01) a runner that
--   no longer holds the job's lock, so a worker declared dead cannot write after
--   another took its job over.
-- * Exactly-once publishing. Before a batch's source transaction commits, the task
--   records an intent (publish_batches: what the source is about to commit, and
--   how to recognise that transaction at the source). A publish first settles the
--   table's unsettled batches: committed at the source → their outcomes are
--   recorded; rolled back → sent again; unknown → each record is compared with the
--   source. A record is never sent twice.
-- * Outcomes. A job that settled every record but some failed or conflicted ends
--   'partial' (not 'succeeded'), with counts in result and a summary in error; done
--   and total agree when a job ends.

--------------------------------------------------------------------------------
-- Job states
--------------------------------------------------------------------------------

alter type snapbase.job_state add value if not exists 'partial' after 'succeeded';
comment on type snapbase.job_state is
  'queued → running → succeeded | partial | failed | cancelled; a publish into a managed table waits as awaiting_approval. partial: every record was settled, but some failed or conflicted (result has the counts).';

-- The jobs still to settle, which every worker's sweep reads every few seconds.
create index if not exists jobs_active_idx on snapbase.jobs (updated_at) where state in ('queued', 'running');

--------------------------------------------------------------------------------
-- Worker processes and their liveness
--------------------------------------------------------------------------------

create table if not exists snapbase_private.workers (
  -- With the constant of worker_lock_space(), the key of the advisory lock its process holds.
  id integer generated always as identity primary key,
  process text not null,
  -- graphile-worker pool ids of the process (jobs are locked by pool id).
  pool_ids text[] not null default '{}',
  started_at timestamptz not null default now(),
  heartbeat_at timestamptz not null default now()
);
comment on table snapbase_private.workers is
  'Live worker processes. A process holds advisory lock (worker_lock_space(), id) on its own connection while it lives and updates heartbeat_at every few seconds.';

create or replace function snapbase_private.worker_lock_space() returns integer
language sql immutable
as $$ select 1397637456 $$; -- "SNAP"

-- Whether the process of worker row `worker` still holds its lock, i.e. its connection is alive.
create or replace function snapbase_private.worker_lock_held(worker integer) returns boolean
language sql stable
set search_path = pg_catalog
as $$
  select exists (select 1 from pg_locks l
                  where l.locktype = 'advisory' and l.granted
                    and l.database = (select oid from pg_database where datname = current_database())
                    and l.classid = snapbase_private.worker_lock_space()::oid and l.objid = worker::oid and l.objsubid = 2)
$$;

-- For a worker process, on its own long-lived connection: registers and takes the lock.
create or replace function snapbase_private.register_worker(process text) returns integer
language plpgsql
set search_path = pg_catalog
as $$
declare
  worker integer;
begin
  insert into snapbase_private.workers (process) values (process) returning id into worker;
  perform pg_advisory_lock(snapbase_private.worker_lock_space(), worker);
  return worker;
end;
$$;

-- The heartbeat, on the same connection. Takes the lock again after a reconnect.
-- False when the row is gone (the process was declared dead): register again.
create or replace function snapbase_private.worker_heartbeat(worker integer, pool_ids text[]) returns boolean
language plpgsql
set search_path = pg_catalog
as $$
begin
  if not exists (select 1 from snapbase_private.workers w where w.id = worker) then
    return false;
  end if;
  if not exists (select 1 from pg_locks l
                  where l.locktype = 'advisory' and l.pid = pg_backend_pid() and l.granted
                    and l.classid = snapbase_private.worker_lock_space()::oid and l.objid = worker::oid and l.objsubid = 2)
     and not pg_try_advisory_lock(snapbase_private.worker_lock_space(), worker) then
    return false;
  end if;
  update snapbase_private.workers w set heartbeat_at = now(), pool_ids = coalesce(worker_heartbeat.pool_ids, w.pool_ids)
   where w.id = worker;
  return found;
end;
$$;

drop function if exists snapbase_private.pool_alive(text, timestamptz, interval);
drop function if exists snapbase_private.recover_dead_workers(interval);

-- Whether a worker process is alive: it beat within dead_after, and it holds its
-- lock or beat within lock_grace (a process whose connection blipped, e.g. in a
-- database restart, takes its lock again at its next beat).
create or replace function snapbase_private.worker_alive(w snapbase_private.workers, dead_after interval, lock_grace interval)
returns boolean
language sql stable
set search_path = pg_catalog
as $$
  select w.heartbeat_at > now() - dead_after
     and (w.heartbeat_at > now() - lock_grace or snapbase_private.worker_lock_held(w.id))
$$;

-- Whether a graphile-worker pool is run by a live process. A pool no process has
-- registered (yet) counts as alive while its lock is younger than dead_after.
create or replace function snapbase_private.pool_alive(pool_id text, locked_at timestamptz,
                                                       dead_after interval default '45 seconds', lock_grace interval default '12 seconds')
returns boolean
language sql stable
set search_path = pg_catalog
as $$
  select case
    when exists (select 1 from snapbase_private.workers w where pool_id = any (w.pool_ids)
                  and snapbase_private.worker_alive(w, dead_after, lock_grace)) then true
    when exists (select 1 from snapbase_private.workers w where pool_id = any (w.pool_ids)) then false
    else coalesce(locked_at > now() - dead_after, false)
  end
$$;

-- Hands the graphile-worker jobs of these pools back (graphile-worker's own
-- force_unlock_workers) and settles the snapbase.jobs they ran: cancelled when a
-- cancel was asked, failed when no attempt is left, else queued for another worker.
-- Returns how many snapbase.jobs were recovered.
create or replace function snapbase_private.recover_pools(pool_ids text[], why text) returns integer
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  r record;
  recovered integer := 0;
begin
  if coalesce(cardinality(pool_ids), 0) = 0 then
    return 0;
  end if;
  -- Ours first, while graphile-worker's lock still says which pool ran them.
  for r in
    select sj.id, sj.cancel_requested, g.attempts, g.max_attempts from snapbase.jobs sj
      join graphile_worker.jobs g on g.key = 'snapbase_job_' || sj.id
     where g.locked_by = any (recover_pools.pool_ids) and sj.state in ('queued', 'running')
     order by sj.id
  loop
    recovered := recovered + 1;
    if r.cancel_requested then
      update snapbase.jobs set state = 'cancelled', finished_at = now(), message = why where id = r.id returning * into j;
    elsif r.attempts >= r.max_attempts then
      update snapbase.jobs set state = 'failed', finished_at = now(), error = format('%s, during its last attempt (%s of %s)', why, r.attempts, r.max_attempts)
       where id = r.id returning * into j;
    else
      update snapbase.jobs set state = 'queued', message = why || '; it will run again on another worker' where id = r.id returning * into j;
    end if;
    perform snapbase_private.notify_job(j);
    if j.state <> 'queued' then
      perform snapbase_private.audit('job_' || j.state, 'job', j.id::text, j.current_table,
        jsonb_strip_nulls(jsonb_build_object('kind', j.kind, 'workbook_id', j.workbook_id, 'table_id', j.table_id, 'done', j.done, 'error', j.error, 'reason', why)));
    end if;
  end loop;
  perform graphile_worker.force_unlock_workers(pool_ids);
  -- Jobs that must not run again leave graphile-worker's queue.
  perform graphile_worker.remove_job('snapbase_job_' || sj.id)
     from snapbase.jobs sj
    where sj.state in ('cancelled', 'failed')
      and exists (select 1 from graphile_worker.jobs g where g.key = 'snapbase_job_' || sj.id and g.locked_by is null);
  return recovered;
end;
$$;

-- Run by every live worker every few seconds: finds dead processes (lock gone for
-- longer than lock_grace, or no heartbeat for dead_after) and locks held by pools
-- nobody runs, and recovers their jobs. One sweeper at a time; returns how many
-- jobs it recovered.
create or replace function snapbase_private.recover_dead_workers(dead_after interval default '45 seconds', lock_grace interval default '12 seconds')
returns integer
language plpgsql
set search_path = pg_catalog
as $$
declare
  dead text[];
  recovered integer;
  j snapbase.jobs;
begin
  if not pg_try_advisory_xact_lock(snapbase_private.worker_lock_space(), 0) then
    return 0;
  end if;
  with gone as (
    delete from snapbase_private.workers w
     where not snapbase_private.worker_alive(w, dead_after, lock_grace)
    returning w.pool_ids
  )
  select coalesce(array_agg(distinct p), '{}') into dead from gone cross join unnest(gone.pool_ids) p;
  -- Locks of pools no live process runs (their process died before registering, or its row was removed).
  dead := dead || coalesce((select array_agg(distinct g.locked_by) from graphile_worker.jobs g
                             where g.locked_by is not null and g.locked_by <> all (dead)
                               and not snapbase_private.pool_alive(g.locked_by, g.locked_at, dead_after, lock_grace)), '{}');
  recovered := snapbase_private.recover_pools(dead, 'its worker stopped responding');
  -- A queued job without its graphile-worker job (a worker finished it after it was
  -- taken away) is queued again; a running one whose graphile-worker job gave up
  -- or vanished can never finish.
  for j in
    select sj.* from snapbase.jobs sj
     where sj.state in ('queued', 'running') and sj.updated_at < now() - dead_after
       and not exists (select 1 from graphile_worker.jobs g where g.key = 'snapbase_job_' || sj.id
                        and (g.locked_by is not null or g.attempts < g.max_attempts))
     for update skip locked
  loop
    recovered := recovered + 1;
    if j.state = 'queued' and not j.cancel_requested
       and not exists (select 1 from graphile_worker.jobs g where g.key = 'snapbase_job_' || j.id) then
      perform graphile_worker.add_job(case when j.kind in ('test_connection', 'list_tables') then 'inspect_account' else j.kind::text end,
        json_build_object('job_id', j.id), job_key => 'snapbase_job_' || j.id, max_attempts => 5);
      continue;
    end if;
    update snapbase.jobs set state = 'failed', finished_at = now(),
           error = coalesce((select 'gave up after ' || g.attempts || ' attempts: ' || g.last_error from graphile_worker.jobs g
                              where g.key = 'snapbase_job_' || j.id), 'its worker lost the job')
     where id = j.id returning * into j;
    perform snapbase_private.notify_job(j);
  end loop;
  return recovered;
end;
$$;

-- A worker process shutting down hands its jobs back at once instead of waiting
-- to be found dead.
create or replace function snapbase_private.release_worker(worker integer) returns integer
language plpgsql
set search_path = pg_catalog
as $$
declare
  pools text[];
begin
  delete from snapbase_private.workers w where w.id = worker returning w.pool_ids into pools;
  perform pg_advisory_unlock(snapbase_private.worker_lock_space(), worker);
  return snapbase_private.recover_pools(pools, 'its worker shut down before it finished');
end;
$$;

--------------------------------------------------------------------------------
-- Running jobs: start, progress, finish, cancel
--------------------------------------------------------------------------------

-- Refuses a task whose graphile-worker pool no longer holds the job (it was
-- declared dead and the job recovered): its writes would race the new runner.
-- Statements outside a task (no snapbase.job_runner setting) are not checked.
create or replace function snapbase_private.assert_job_runner(job_id bigint) returns void
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  runner text := nullif(current_setting('snapbase.job_runner', true), '');
begin
  if runner is not null and not exists (select 1 from graphile_worker.jobs g
                                         where g.key = 'snapbase_job_' || job_id and g.locked_by = runner) then
    raise exception 'job % is no longer run by this worker (it was taken over after the worker stopped responding)', job_id
      using errcode = 'SBJ01';
  end if;
end;
$$;

-- For tasks: marks the job running and counts the attempt. Returns null when the
-- job is finished or cancelled, so a retried task stops at once.
create or replace function snapbase_private.start_job(job_id bigint) returns snapbase.jobs
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
begin
  perform snapbase_private.assert_job_runner(job_id);
  update snapbase.jobs set state = 'running', started_at = coalesce(started_at, now()), attempts = attempts + 1, error = null,
         message = case when state = 'queued' and attempts > 0 then 'resumed' else message end
   where id = job_id and state in ('queued', 'running') and not cancel_requested
  returning * into j;
  if j.id is null then
    update snapbase.jobs set state = 'cancelled', finished_at = now()
     where id = job_id and cancel_requested and state in ('queued', 'running');
    return null;
  end if;
  perform snapbase_private.notify_job(j);
  return j;
end;
$$;

-- Progress: done and total (null keeps them). Returns false once cancellation was requested.
create or replace function snapbase_private.job_progress(job_id bigint, done bigint, total bigint, message text default null) returns boolean
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
begin
  perform snapbase_private.assert_job_runner(job_id);
  update snapbase.jobs set done = coalesce(job_progress.done, jobs.done), total = coalesce(job_progress.total, jobs.total),
         message = coalesce(job_progress.message, jobs.message)
   where id = job_id returning * into j;
  perform snapbase_private.notify_job(j);
  return not j.cancel_requested;
end;
$$;

-- Settles a job. A job that ends succeeded or partial has done = total.
create or replace function snapbase_private.finish_job(job_id bigint, final_state snapbase.job_state, result jsonb default null, error text default null)
returns snapbase.jobs
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  settled boolean := final_state::text in ('succeeded', 'partial', 'failed', 'cancelled');
begin
  perform snapbase_private.assert_job_runner(job_id);
  update snapbase.jobs set state = final_state, result = coalesce(finish_job.result, jobs.result), error = finish_job.error,
         total = case when final_state::text in ('succeeded', 'partial') and jobs.total is not null then jobs.done else jobs.total end,
         message = case when settled then null else jobs.message end,
         finished_at = case when settled then now() end
   where id = job_id returning * into j;
  if j.kind = 'test_connection' then
    update snapbase.connector_accounts set last_tested_at = now(), last_test_error = finish_job.error where id = j.connector_account_id;
  end if;
  perform snapbase_private.notify_job(j);
  perform snapbase_private.audit('job_' || final_state, 'job', j.id::text, j.current_table,
    jsonb_strip_nulls(jsonb_build_object('kind', j.kind, 'workbook_id', j.workbook_id, 'table_id', j.table_id, 'done', j.done, 'error', error)));
  return j;
end;
$$;

-- Cancels a job. Queued: now. Running on a live worker: at its next batch. Running
-- with no live worker (waiting to retry, or its worker died): now, and its
-- graphile-worker job is removed.
create or replace function snapbase.cancel_job(job_id bigint) returns snapbase.jobs
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  g record;
  now_ boolean;
  access text;
begin
  select * into j from snapbase.jobs where id = job_id;
  -- Another tenant's job is "no job N", as a missing one: workbook_access is NULL
  -- for an outsider, so every test here is NULL-proof (a NULL condition skips an IF).
  if j.workbook_id is not null then
    access := snapbase_private.workbook_access(j.workbook_id);
  elsif snapbase.current_app_role() is distinct from 'agent'
        and ((j.created_by is not distinct from snapbase.current_user_id() and snapbase.current_user_id() is not null)
             or (snapbase.current_user_id() is null and snapbase.current_app_role() is not distinct from 'admin')) then
    access := 'owner';
  end if;
  if j.id is null or access is null or (j.table_id is not null and not exists (
       select 1 from snapbase.workbook_tables t where t.id = j.table_id and snapbase_private.table_visible(t.workbook_id, t.hidden))) then
    raise exception 'no job %', job_id using errcode = 'P0002';
  end if;
  if access not in ('owner', 'editor') then
    raise exception 'cancelling job % needs edit access to workbook % (you have % access)', job_id, j.workbook_id, access using errcode = '42501';
  end if;
  if j.state not in ('queued', 'running') then
    raise exception 'job % is %, not queued or running', job_id, j.state using errcode = '55000';
  end if;
  select gj.locked_by, gj.locked_at into g from graphile_worker.jobs gj where gj.key = 'snapbase_job_' || j.id;
  -- A worker whose connection is gone counts as dead here at once: at worst a worker
  -- that is only reconnecting loses a job it was asked to stop anyway.
  now_ := j.state = 'queued' or g.locked_by is null or not snapbase_private.pool_alive(g.locked_by, g.locked_at, lock_grace => '0 seconds');
  if now_ and g.locked_by is not null then
    -- Its worker is dead: take the job back from it first.
    perform graphile_worker.force_unlock_workers(array[g.locked_by]);
  end if;
  if now_ then
    perform graphile_worker.remove_job('snapbase_job_' || j.id);
  end if;
  update snapbase.jobs set cancel_requested = true,
         state = case when now_ then 'cancelled'::snapbase.job_state else state end,
         finished_at = case when now_ then now() end
   where id = job_id returning * into j;
  perform snapbase_private.notify_job(j);
  perform snapbase_private.audit('cancel_job', 'job', j.id::text, j.current_table, jsonb_build_object('kind', j.kind));
  return j;
end;
$$;
grant execute on function snapbase.cancel_job(bigint) to :ROLE_VIEWER;
comment on function snapbase.cancel_job(bigint) is
  'Cancel a job: a queued one, or one no live worker is running (waiting to retry, or its worker died), is cancelled at once; a running one stops at its next batch.';

--------------------------------------------------------------------------------
-- Publishing exactly once
--------------------------------------------------------------------------------

create table if not exists snapbase_private.publish_batches (
  id bigint generated always as identity primary key,
  job_id bigint not null,
  table_id bigint not null references snapbase.workbook_tables on delete cascade,
  kind text not null check (kind in ('create', 'update', 'delete')),
  -- How to recognise the batch's transaction at the source (connector-specific, e.g. {"txid": "812"}).
  receipt jsonb not null,
  -- Per record, what the source is about to commit: [{id, ok, remote_id, error, values}].
  planned jsonb not null,
  created_at timestamptz not null default now(),
  settled_at timestamptz,
  -- committed | rolled_back | compared (found out record by record) | recorded (the task recorded its outcomes)
  verdict text
);
create index if not exists publish_batches_unsettled_idx on snapbase_private.publish_batches (table_id) where settled_at is null;
comment on table snapbase_private.publish_batches is
  'Publish intents: written before a batch''s source transaction commits, settled when its outcomes are recorded. An unsettled batch is what a crash cut off; the next publish of the table settles it first.';

-- For the publish task, just before the source commits a batch: the intent. Its
-- records go from 'pushing' to 'sending'.
create or replace function snapbase_private.record_publish_intent(job_id bigint, kind text, receipt jsonb, planned jsonb) returns bigint
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  batch_id bigint;
begin
  perform snapbase_private.assert_job_runner(job_id);
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  insert into snapbase_private.publish_batches (job_id, table_id, kind, receipt, planned)
    values (job_id, t.id, kind, receipt, planned) returning id into batch_id;
  execute format($q$update %s r set __publish = jsonb_build_object('state', 'sending', 'job_id', $1, 'batch_id', $2, 'at', now())
                    where r.__id in (select (p ->> 'id')::bigint from jsonb_array_elements($3) p)$q$, snapbase_private.table_rel(t))
    using job_id, batch_id, planned;
  return batch_id;
end;
$$;

-- The job's table's batches a crash left unsettled: [{id, kind, receipt, planned}].
create or replace function snapbase_private.unsettled_publish_batches(job_id bigint) returns jsonb
language sql stable
set search_path = pg_catalog
as $$
  select coalesce(jsonb_agg(jsonb_build_object('id', b.id, 'kind', b.kind, 'receipt', b.receipt, 'planned', b.planned) order by b.id), '[]')
    from snapbase.jobs j join snapbase_private.publish_batches b on b.table_id = j.table_id and b.settled_at is null
   where j.id = unsettled_publish_batches.job_id
$$;

drop function if exists snapbase_private.record_publish_outcomes(bigint, jsonb);
-- Stores outcomes [{id, ok, remote_id?, error?, state?, source_values?}] of records
-- just pushed (and settles their batch). Published: a created record gets its
-- remote id, its values become __last_seen, the edit flags go, a deleted record is
-- removed. Otherwise the record keeps its changes and says why ('failed' or
-- 'conflict'). Counts go to the job's result. Returns false when the job was cancelled.
create or replace function snapbase_private.record_publish_outcomes(job_id bigint, outcomes jsonb, batch_id bigint default null) returns boolean
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  rel text;
  published integer;
  conflicts integer;
begin
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  rel := snapbase_private.table_rel(t);
  execute format('delete from %s r using jsonb_array_elements($1) __sb_o where r.__id = (__sb_o ->> ''id'')::bigint and (__sb_o ->> ''ok'')::boolean and r.__deleted', rel)
    using outcomes;
  execute format($q$
    update %1$s r set
      __remote_id = case when (__sb_o ->> 'ok')::boolean and r.__created then __sb_o ->> 'remote_id' else r.__remote_id end,
      __last_seen = case when (__sb_o ->> 'ok')::boolean then to_jsonb(r.*) - $3::text[] else r.__last_seen end,
      __edited = case when (__sb_o ->> 'ok')::boolean then '{}' else r.__edited end,
      __created = r.__created and not (__sb_o ->> 'ok')::boolean,
      __publish = jsonb_strip_nulls(jsonb_build_object(
        'state', case when (__sb_o ->> 'ok')::boolean then 'published' else coalesce(__sb_o ->> 'state', 'failed') end,
        'job_id', $2, 'at', now(), 'error', __sb_o ->> 'error', 'source_values', __sb_o -> 'source_values')),
      __updated_at = now()
      from jsonb_array_elements($1) __sb_o
     where r.__id = (__sb_o ->> 'id')::bigint
    $q$, rel) using outcomes, job_id, snapbase_private.record_meta_columns() || snapbase_private.scratch_columns(t);
  if batch_id is not null then
    update snapbase_private.publish_batches b set settled_at = now(), verdict = coalesce(b.verdict, 'recorded')
     where b.id = batch_id and b.settled_at is null;
  end if;
  select count(*) filter (where (o ->> 'ok')::boolean), count(*) filter (where not (o ->> 'ok')::boolean and o ->> 'state' = 'conflict')
    into published, conflicts from jsonb_array_elements(outcomes) o;
  update snapbase.jobs set result = coalesce(jobs.result, '{}') || jsonb_build_object(
           'published', coalesce((jobs.result ->> 'published')::bigint, 0) + published,
           'failed', coalesce((jobs.result ->> 'failed')::bigint, 0) + jsonb_array_length(outcomes) - published - conflicts,
           'conflicts', coalesce((jobs.result ->> 'conflicts')::bigint, 0) + conflicts)
   where id = job_id;
  return snapbase_private.job_progress(job_id, j.done + jsonb_array_length(outcomes), null);
end;
$$;

-- Settles a batch a crash left unsettled, by what the source says of its transaction:
-- 'committed' → the planned outcomes are recorded; 'rolled_back' → its records are
-- sent again; 'unknown' → each record is compared with `current` (the source's
-- values now, by remote id): a created record whose planned id exists, an update
-- whose fields hold what was sent, a delete whose record is gone were published;
-- the others are sent again (and meet the conflict check then). Returns the counts.
create or replace function snapbase_private.settle_publish_batch(job_id bigint, batch_id bigint, verdict text, current jsonb default null)
returns jsonb
language plpgsql
set search_path = pg_catalog
as $$
declare
  b snapbase_private.publish_batches;
  t snapbase.workbook_tables;
  rel text;
  p jsonb;
  landed boolean;
  outcomes jsonb := '[]';
  resend bigint[] := '{}';
begin
  perform snapbase_private.assert_job_runner(job_id);
  select * into b from snapbase_private.publish_batches where id = batch_id for update;
  if b.id is null or b.settled_at is not null then
    return jsonb_build_object('published', 0, 'resent', 0);
  end if;
  if verdict not in ('committed', 'rolled_back', 'unknown') then
    raise exception 'verdict must be committed, rolled_back or unknown (got %)', verdict using errcode = '22023';
  end if;
  select * into t from snapbase.workbook_tables where id = b.table_id;
  rel := snapbase_private.table_rel(t);
  for p in select * from jsonb_array_elements(b.planned) loop
    if verdict = 'rolled_back' then
      landed := false;
    elsif not (p ->> 'ok')::boolean then
      -- Refused record by record at the source (its savepoint rolled back): nothing of it applied.
      landed := verdict = 'committed';
    elsif verdict = 'committed' then
      landed := true;
    elsif b.kind = 'create' then
      landed := coalesce(current ? (p ->> 'remote_id'), false);
    elsif b.kind = 'delete' then
      landed := current is not null and not (current ? (p ->> 'remote_id'));
    else
      landed := coalesce(current ? (p ->> 'remote_id'), false) and not exists (
        select 1 from jsonb_object_keys(p -> 'values') k
         where snapbase_private.normalized_values(rel, current -> (p ->> 'remote_id')) -> k
               is distinct from snapbase_private.normalized_values(rel, p -> 'values') -> k);
    end if;
    if landed then
      outcomes := outcomes || jsonb_strip_nulls(jsonb_build_object('id', p -> 'id', 'ok', p -> 'ok', 'remote_id', p -> 'remote_id', 'error', p -> 'error'));
    else
      resend := resend || (p ->> 'id')::bigint;
    end if;
  end loop;
  -- Sent again by this job: next_to_publish hands out records in 'pushing' state.
  execute format($q$update %s r set __publish = jsonb_build_object('state', 'pushing', 'job_id', $1, 'at', now())
                    where r.__id = any ($2)$q$, rel) using job_id, resend;
  update snapbase_private.publish_batches set verdict = case settle_publish_batch.verdict when 'unknown' then 'compared' else settle_publish_batch.verdict end
   where id = batch_id;
  perform snapbase_private.record_publish_outcomes(job_id, outcomes, batch_id);
  perform snapbase_private.audit_workbook('publish_reconciled', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('job_id', job_id, 'batch_id', batch_id, 'verdict', verdict, 'published', jsonb_array_length(outcomes), 'resent', cardinality(resend)));
  return jsonb_build_object('published', jsonb_array_length(outcomes), 'resent', cardinality(resend));
end;
$$;

-- Records left to publish in this job, for its progress total: what the filter
-- selects, less what this job already settled (failed and conflicting records stay dirty).
create or replace function snapbase_private.publish_pending(job_id bigint) returns bigint
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables;
  n bigint;
begin
  select wt.* into t from snapbase.jobs j join snapbase.workbook_tables wt on wt.id = j.table_id where j.id = job_id;
  execute format($q$select count(*) from %s r where ((%s) or (%s) or (%s))
                      and not coalesce((r.__publish ->> 'job_id')::bigint = $1 and r.__publish ->> 'state' in ('published', 'failed', 'conflict'), false)$q$,
    snapbase_private.table_rel(t),
    snapbase_private.publish_filter('create'), snapbase_private.publish_filter('update'), snapbase_private.publish_filter('delete'))
    into n using job_id;
  return n;
end;
$$;

-- The next batch of one kind ('create' | 'update' | 'delete'), marked 'pushing':
-- [{id, remote_id, values, last_seen}] where values holds the fields to send: the
-- edited ones (for a new record, the fields it was given: the source fills in the
-- rest with its defaults). Records of an unsettled batch ('sending') are not handed
-- out: the publish settles them first.
create or replace function snapbase_private.next_to_publish(job_id bigint, what text, batch_size integer) returns jsonb
language plpgsql
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables;
  batch jsonb;
begin
  perform snapbase_private.assert_job_runner(job_id);
  select wt.* into t from snapbase.jobs j join snapbase.workbook_tables wt on wt.id = j.table_id where j.id = job_id;
  execute format($q$
    with chosen as (
      select r.__id from %1$s r
       where %2$s
         and (r.__publish is null or (r.__publish ->> 'job_id')::bigint is distinct from $1 or r.__publish ->> 'state' = 'pushing')
         and r.__publish ->> 'state' is distinct from 'sending'
       order by r.__id limit $2
       for update
    ), marked as (
      update %1$s r set __publish = jsonb_build_object('state', 'pushing', 'job_id', $1, 'at', now())
        from chosen c where r.__id = c.__id
      returning r.__id, jsonb_build_object('id', r.__id, 'remote_id', r.__remote_id,
        'values', (select coalesce(jsonb_object_agg(k, to_jsonb(r.*) -> k), '{}') from jsonb_object_keys(r.__edited) k where k <> all ($4)),
        'last_seen', r.__last_seen) as item
    )
    select coalesce(jsonb_agg(item order by __id), '[]') from marked
    $q$, snapbase_private.table_rel(t), snapbase_private.publish_filter(what))
    into batch using job_id, batch_size, null, snapbase_private.scratch_columns(t);
  return batch;
end;
$$;

-- The conflict check before updates. `current` maps remote ids to the source's
-- values now. A record conflicts when a field it would send has changed at the
-- source since it was last seen; unless the job forces, it is not sent and gets
-- outcome 'conflict' with the source's values. A record the source no longer has
-- fails and is flagged deleted at the source. Returns the ids that may be sent.
create or replace function snapbase_private.check_publish_conflicts(job_id bigint, batch jsonb, current jsonb) returns bigint[]
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  rel text;
  rec jsonb;
  now_values jsonb;
  changed text[];
  sendable bigint[] := '{}';
  refused jsonb := '[]';
begin
  perform snapbase_private.assert_job_runner(job_id);
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  rel := snapbase_private.table_rel(t);
  for rec in select * from jsonb_array_elements(batch) loop
    if not current ? (rec ->> 'remote_id') then
      execute format('update %s set __source_deleted = true where __id = $1', rel) using (rec ->> 'id')::bigint;
      refused := refused || jsonb_build_object('id', rec -> 'id', 'ok', false,
        'error', format('record %s no longer exists at the source', rec ->> 'remote_id'));
      continue;
    end if;
    now_values := snapbase_private.normalized_values(rel, current -> (rec ->> 'remote_id'));
    select array_agg(k order by k) into changed from jsonb_object_keys(rec -> 'values') k
     where (now_values -> k) is distinct from (rec -> 'last_seen' -> k);
    if changed is not null and not coalesce((j.options ->> 'force')::boolean, false) then
      refused := refused || jsonb_build_object('id', rec -> 'id', 'ok', false, 'state', 'conflict',
        'error', format('changed at the source since download: %s', array_to_string(changed, ', ')),
        'source_values', (select jsonb_object_agg(k, now_values -> k) from unnest(changed) k));
    else
      sendable := sendable || (rec ->> 'id')::bigint;
    end if;
  end loop;
  if jsonb_array_length(refused) > 0 then
    update snapbase.jobs set result = coalesce(jobs.result, '{}')
           || jsonb_build_object('held_back', coalesce((jobs.result ->> 'held_back')::bigint, 0) + jsonb_array_length(refused))
     where id = job_id;
    perform snapbase_private.record_publish_outcomes(job_id, refused);
  end if;
  return sendable;
end;
$$;

-- Ends a publish job from its counts: 'partial' when some records failed or
-- conflicted (error says how many, each record says why), else 'succeeded'.
create or replace function snapbase_private.finish_publish(job_id bigint) returns snapbase.jobs
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  published bigint;
  failed bigint;
  conflicts bigint;
begin
  select * into j from snapbase.jobs where id = job_id;
  published := coalesce((j.result ->> 'published')::bigint, 0);
  failed := coalesce((j.result ->> 'failed')::bigint, 0);
  conflicts := coalesce((j.result ->> 'conflicts')::bigint, 0);
  update snapbase.jobs set result = coalesce(jobs.result, '{}') || jsonb_build_object('published', published, 'failed', failed,
           'conflicts', conflicts, 'held_back', coalesce((jobs.result ->> 'held_back')::bigint, 0))
   where id = job_id;
  if failed + conflicts = 0 then
    return snapbase_private.finish_job(job_id, 'succeeded');
  end if;
  return snapbase_private.finish_job(job_id, 'partial', null,
    format('%s of %s records were not published (%s failed, %s in conflict with the source); each record''s state.publish says why',
           failed + conflicts, published + failed + conflicts, failed, conflicts));
end;
$$;

--! split: 400-correctness.sql
--------------------------------------------------------------------------------
-- Correctness (issue 13): change control and workbooks for every column kind and
-- name, failures the DBA can see, what a table needs before it is registered.
--------------------------------------------------------------------------------

--------------------------------------------------------------------------------
-- Restore: every column kind, and columns added or dropped since the snapshot
--------------------------------------------------------------------------------
-- The snapshot's columns against the table's: a column both have is restored
-- (it must keep its type); a column only the snapshot has is gone and cannot be
-- restored (the change request says so); a column only the table has keeps its
-- values on rows the restore keeps and takes its default (or NULL, or its
-- generated value) on rows it puts back, so it must not be NOT NULL without a
-- default. The primary key must be the same columns.
--
-- Rows: matched by primary key. DELETE the rows the snapshot lacks, UPDATE the
-- rows whose values differ, INSERT the rows the table lacks (OVERRIDING SYSTEM
-- VALUE, so identity columns get the snapshot's values back). Key columns and
-- GENERATED ALWAYS identity columns cannot be updated: a row whose non-key
-- identity value differs is deleted and inserted again. Stored generated columns
-- are computed by PostgreSQL. Identity and serial sequences are moved past the
-- values put back. Without a primary key, rows are matched by their values, as
-- many times as each appears (a multiset), so duplicates survive.

drop function if exists snapbase_private.restore_columns(snapbase.snapshots, regclass);

create function snapbase_private.restore_columns(snap snapbase.snapshots, target regclass)
returns table (name text, snapshot_type text, table_type text, ord integer, generated boolean, identity_always boolean,
               is_key boolean, needs_value boolean)
language sql stable
set search_path = pg_catalog
as $$
  with s as (
    select c ->> 'name' as name, c ->> 'type' as type from jsonb_array_elements(snap.columns) c
  ), a as (
    select a.attname::text as name, format_type(a.atttypid, a.atttypmod) as type, a.attnum::integer as ord,
           a.attgenerated <> '' as generated, a.attidentity = 'a' as identity_always,
           a.attnotnull and not a.atthasdef and a.attidentity = '' and a.attgenerated = '' as needs_value
      from pg_attribute a
     where a.attrelid = target and a.attnum > 0 and not a.attisdropped
  )
  select coalesce(a.name, s.name), s.type, a.type, a.ord, coalesce(a.generated, false), coalesce(a.identity_always, false),
         coalesce(a.name = any (snapbase_private.primary_key(target)), false), coalesce(a.needs_value, false)
    from a full join s on s.name = a.name
   order by a.ord nulls last, s.name
$$;
grant execute on function snapbase_private.restore_columns(snapbase.snapshots, regclass) to :ROLE_ADMIN;
comment on function snapbase_private.restore_columns(snapbase.snapshots, regclass) is
  'The columns of a snapshot and of its table now, side by side (a name only one side has is null on the other): what a restore can put back.';

create or replace function snapbase_private.restore_fit(snap snapbase.snapshots, target regclass) returns void
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  problems text[];
  key_now text[] := snapbase_private.primary_key(target);
begin
  select coalesce(array_agg(p.problem order by p.ord), '{}') into problems from (
    select c.ord, format('column %s: %s in the snapshot, %s now', quote_ident(c.name), c.snapshot_type, c.table_type) as problem
      from snapbase_private.restore_columns(snap, target) c
     where c.snapshot_type is not null and c.table_type is not null and c.snapshot_type <> c.table_type
    union all
    select c.ord, format('column %s is NOT NULL without a default, and the snapshot has no values for it', quote_ident(c.name))
      from snapbase_private.restore_columns(snap, target) c
     where c.snapshot_type is null and c.needs_value
  ) p;
  if snap.primary_key is distinct from key_now then
    problems := format('the primary key was (%s), it is (%s) now',
                       coalesce(array_to_string(snap.primary_key, ', '), 'none'), coalesce(array_to_string(key_now, ', '), 'none')) || problems;
  end if;
  if cardinality(problems) > 0 then
    raise exception 'snapshot % no longer fits %: %', snap.id, snap.table_name, array_to_string(problems, '; ')
      using errcode = '42804';
  end if;
end;
$$;
comment on function snapbase_private.restore_fit(snapbase.snapshots, regclass) is
  'Raises (42804, naming each column) when a snapshot cannot be restored into its table as it is now: a column changed type, a new NOT NULL column has no default, or the primary key changed.';

create or replace function snapbase_private.describe_restore(snap snapbase.snapshots, target regclass) returns text
language sql stable
set search_path = pg_catalog
as $$
  select concat_ws(E'\n',
    case when snap.primary_key is not null then format(
      E'-- restore %1$s to snapshot %2$s (%3$s rows), by primary key (%4$s):\n'
      '-- DELETE rows whose key is not in the snapshot;\n'
      '-- UPDATE rows whose values differ from the snapshot;\n'
      '-- INSERT snapshot rows whose key is missing.',
      target, snap.id, snap.record_count, array_to_string(snap.primary_key, ', '))
    else format(E'-- restore %1$s to snapshot %2$s (%3$s rows); no primary key:\n'
      '-- DELETE rows not in the snapshot and INSERT snapshot rows not in the table (matching whole rows, duplicates counted).',
      target, snap.id, snap.record_count) end,
    (select '-- columns of the snapshot the table no longer has are not restored: ' || string_agg(quote_ident(c.name), ', ')
       from snapbase_private.restore_columns(snap, target) c where c.table_type is null),
    (select '-- columns added since keep their values on kept rows and take their defaults on rows put back: ' || string_agg(quote_ident(c.name), ', ')
       from snapbase_private.restore_columns(snap, target) c where c.snapshot_type is null))
$$;

create or replace function snapbase_private.apply_restore(snapshot_id bigint, target regclass) returns bigint
language plpgsql
set search_path = pg_catalog
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set timezone = 'UTC'
set extra_float_digits = 3
set bytea_output = 'hex'
set client_min_messages = warning
as $$
declare
  snap snapbase.snapshots;
  layout text;
  pk text[];
  shared text[];      -- columns both the snapshot and the table have, in table order
  writable text[];    -- of those, the ones not generated
  settable text[];    -- of those, the ones an UPDATE may set (not key, not identity always)
  fixed text[];       -- non-key GENERATED ALWAYS identity columns: a difference means delete and insert
  key_name text := '__snapbase_key';
  count_name text := '__snapbase_occurrence';
  key_match text;
  row_t text;
  row_s text;
  n bigint;
  total bigint := 0;
  col text;
  seq regclass;
  inc bigint;
  next_value numeric;
  top numeric;
begin
  select * into snap from snapbase.snapshots s where s.id = snapshot_id;
  perform snapbase_private.restore_fit(snap, target);
  layout := snapbase_private.layout_type(snap.layout_id);
  pk := snap.primary_key;
  select coalesce(array_agg(c.name order by c.ord) filter (where true), '{}'),
         coalesce(array_agg(c.name order by c.ord) filter (where not c.generated), '{}'),
         coalesce(array_agg(c.name order by c.ord) filter (where not c.generated and not c.is_key and not c.identity_always), '{}'),
         coalesce(array_agg(c.name order by c.ord) filter (where not c.generated and not c.is_key and c.identity_always), '{}')
    into shared, writable, settable, fixed
    from snapbase_private.restore_columns(snap, target) c
   where c.snapshot_type is not null and c.table_type is not null;
  -- Names of our own bookkeeping columns, unlike any of the table's.
  while key_name = any (shared) loop key_name := key_name || '_'; end loop;
  while count_name = any (shared) loop count_name := count_name || '_'; end loop;

  -- The snapshot's rows (the columns the table still has); for tables without a key,
  -- each with its values' text and, among equal rows, its occurrence number.
  if to_regclass('pg_temp.snapbase_restore_source') is not null then
    drop table pg_temp.snapbase_restore_source;
  end if;
  row_s := format('row(%s)::text', (select string_agg(format('(x.rec).%I', c), ', ') from unnest(shared) c));
  execute format($q$
    create temp table snapbase_restore_source on commit drop as
    select %1$s%2$s
      from (select src.rec::%3$s as rec from snapbase_private.snapshot_records($1) as src(rec) offset 0) x
    $q$, (select string_agg(format('(x.rec).%1$I as %1$I', c), ', ') from unnest(shared) c),
    case when pk is null then format(', %1$s as %2$I, row_number() over (partition by %1$s) as %3$I', row_s, key_name, count_name) else '' end,
    layout)
    using snap.id;
  execute 'analyze pg_temp.snapbase_restore_source';

  row_t := format('row(%s)::text', (select string_agg(format('t.%I', c), ', ') from unnest(shared) c));
  if pk is not null then
    key_match := (select string_agg(format('t.%1$I = s.%1$I', c), ' and ') from unnest(pk) c);
    -- Rows the snapshot lacks, and rows whose non-key identity value cannot be updated back.
    execute format('delete from %s t where not exists (select 1 from pg_temp.snapbase_restore_source s where %s%s)',
      target, key_match,
      case when cardinality(fixed) > 0 then format(' and row(%s)::text is not distinct from row(%s)::text',
        (select string_agg(format('t.%I', c), ', ') from unnest(fixed) c), (select string_agg(format('s.%I', c), ', ') from unnest(fixed) c))
      else '' end);
    get diagnostics n = row_count; total := total + n;
    if cardinality(settable) > 0 then
      execute format('update %s t set %s from pg_temp.snapbase_restore_source s where %s and row(%s)::text is distinct from row(%s)::text',
        target,
        (select string_agg(format('%1$I = s.%1$I', c), ', ') from unnest(settable) c),
        key_match,
        (select string_agg(format('t.%I', c), ', ') from unnest(settable) c),
        (select string_agg(format('s.%I', c), ', ') from unnest(settable) c));
      get diagnostics n = row_count; total := total + n;
    end if;
    execute format('insert into %1$s (%2$s) overriding system value select %3$s from pg_temp.snapbase_restore_source s where not exists (select 1 from %1$s t where %4$s)',
      target, (select string_agg(format('%I', c), ', ') from unnest(writable) c),
      (select string_agg(format('s.%I', c), ', ') from unnest(writable) c), key_match);
    get diagnostics n = row_count; total := total + n;
  else
    -- The k-th copy of a row stays when the snapshot has at least k copies of it.
    execute format($q$
      with live as (
        select t.tableoid as rel, t.ctid as tid, %2$s as k, row_number() over (partition by %2$s order by t.tableoid, t.ctid) as occurrence
          from %1$s t)
      delete from %1$s t using live l
       where t.tableoid = l.rel and t.ctid = l.tid
         and not exists (select 1 from pg_temp.snapbase_restore_source s where s.%3$I = l.k and s.%4$I = l.occurrence)
      $q$, target, row_t, key_name, count_name);
    get diagnostics n = row_count; total := total + n;
    execute format($q$
      with live as (select %2$s as k, count(*) as copies from %1$s t group by 1)
      insert into %1$s (%3$s) overriding system value
      select %4$s from pg_temp.snapbase_restore_source s left join live l on l.k = s.%5$I
       where s.%6$I > coalesce(l.copies, 0)
      $q$, target, row_t, (select string_agg(format('%I', c), ', ') from unnest(writable) c),
      (select string_agg(format('s.%I', c), ', ') from unnest(writable) c), key_name, count_name);
    get diagnostics n = row_count; total := total + n;
  end if;
  drop table pg_temp.snapbase_restore_source;

  -- Identity and serial sequences go past the values put back (when the owner may move them).
  foreach col in array writable loop
    seq := pg_get_serial_sequence(target::text, col)::regclass;
    continue when seq is null or not has_sequence_privilege(seq, 'SELECT') or not has_sequence_privilege(seq, 'UPDATE');
    select s.seqincrement into inc from pg_sequence s where s.seqrelid = seq;
    continue when inc <= 0;
    execute format('select max(t.%I)::numeric from %s t', col, target) into top;
    next_value := coalesce(pg_sequence_last_value(seq) + inc, (select s.seqstart from pg_sequence s where s.seqrelid = seq));
    if top is not null and top >= next_value then
      perform setval(seq, top::bigint, true);
    end if;
  end loop;
  return total;
end;
$$;
comment on function snapbase_private.apply_restore(bigint, regclass) is
  'Puts a managed table back to a snapshot with the fewest row operations (by primary key, or by whole rows counting duplicates); runs as the owner inside approve_change.';

create or replace function snapbase.restore_snapshot(snapshot_id bigint, reason text default null) returns snapbase.change_requests
language plpgsql
set search_path = pg_catalog
set client_min_messages = warning
as $$
declare
  snap snapbase.snapshots;
  mt snapbase.managed_tables;
  target regclass;
  cr snapbase.change_requests;
begin
  perform snapbase_private.require_role('admin');
  snap := snapbase_private.readable_snapshot(snapshot_id);
  select * into mt from snapbase.managed_tables where id = snap.managed_table_id;
  target := snapbase_private.relation_of(mt);
  if target is null then
    raise exception 'table % no longer exists', snap.table_name using errcode = '42P01';
  end if;
  perform snapbase_private.restore_fit(snap, target);
  cr := snapbase_private.store_change_request(mt, 'restore', snapbase_private.describe_restore(snap, target), null,
          coalesce(reason, format('restore snapshot %s', snap.id)), snap.id);
  -- A failure is recorded and raised as a WARNING there (psql shows it).
  return snapbase.approve_change(cr.id);
end;
$$;
comment on function snapbase.restore_snapshot(bigint, text) is
  'Put the live table back to a snapshot, as a restore change request that is approved, snapshotted and audited at once (admins). Columns dropped since are not restored; columns added since keep or default their values. A failure is recorded on the request and raised as a WARNING.';

-- Capturing a snapshot twice in one transaction must not tell anyone that its
-- scratch table "already exists, skipping".
alter function snapbase_private.capture_snapshot(snapbase.managed_tables, bigint, text) set client_min_messages = warning;

--------------------------------------------------------------------------------
-- Structured edits for every column kind
--------------------------------------------------------------------------------
-- One MERGE keyed by the primary key. Rows travel as one composite value per edit
-- (jsonb_populate_record of the table's row type), so no column name can collide
-- with the statement's own (op, set, shape, rec). Inserts are grouped by the
-- columns they give, and each group inserts only those: a column an insert leaves
-- out takes its default (identity, serial, DEFAULT), never NULL. A key column with
-- an identity or a default may be left out of an insert; giving a GENERATED ALWAYS
-- identity value inserts it as given (OVERRIDING SYSTEM VALUE). Setting a stored
-- generated column, updating a GENERATED ALWAYS identity column or a key column
-- are refused at submission, saying why.

create or replace function snapbase_private.edits_to_sql(target regclass, edits jsonb) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  pk text[] := snapbase_private.primary_key(target);
  items jsonb := '[]';
  e jsonb;
  k text;
  given text[];
  shapes text[] := '{}';     -- each insert group's column list, as text
  shape_no integer;
  update_cols text[] := '{}';
  clauses text[] := '{}';
  bad text;
  all_cols text[];
  generated_cols text[];
  identity_always_cols text[];
  defaulted_cols text[];
begin
  if pk is null then
    raise exception 'structured edits need a primary key on %', target using errcode = '42P10';
  end if;
  if jsonb_typeof(edits) is distinct from 'object' or exists (select 1 from jsonb_object_keys(edits) x where x not in ('insert', 'update', 'delete'))
     or exists (select 1 from jsonb_each(edits) x where jsonb_typeof(x.value) <> 'array') then
    raise exception 'edits must be an object with "insert", "update" and/or "delete" arrays' using errcode = '22023';
  end if;
  select coalesce(array_agg(a.attname::text), '{}'),
         coalesce(array_agg(a.attname::text) filter (where a.attgenerated <> ''), '{}'),
         coalesce(array_agg(a.attname::text) filter (where a.attidentity = 'a'), '{}'),
         coalesce(array_agg(a.attname::text) filter (where a.atthasdef or a.attidentity <> ''), '{}')
    into all_cols, generated_cols, identity_always_cols, defaulted_cols
    from pg_attribute a where a.attrelid = target and a.attnum > 0 and not a.attisdropped;

  for e in select * from jsonb_array_elements(coalesce(edits -> 'insert', '[]')) loop
    if jsonb_typeof(e) <> 'object' or e = '{}' then
      raise exception 'each insert must be an object of column values' using errcode = '22023';
    end if;
    given := array(select x from jsonb_object_keys(e) x order by x);
    shape_no := array_position(shapes, given::text);
    if shape_no is null then
      shapes := shapes || given::text;
      shape_no := cardinality(shapes);
    end if;
    items := items || jsonb_build_object('op', 'insert', 'row', e, 'shape', shape_no);
  end loop;
  for e in select * from jsonb_array_elements(coalesce(edits -> 'update', '[]')) loop
    if jsonb_typeof(e -> 'key') is distinct from 'object' or jsonb_typeof(e -> 'set') is distinct from 'object' or e -> 'set' = '{}' then
      raise exception 'each update must be {"key": {...primary key...}, "set": {...columns...}}' using errcode = '22023';
    end if;
    select string_agg(quote_ident(x), ', ') into bad from jsonb_object_keys(e -> 'key') x where x <> all (pk);
    if bad is not null then
      raise exception 'an update''s key holds the primary key columns only (%), not %', array_to_string(pk, ', '), bad using errcode = '22023';
    end if;
    select string_agg(quote_ident(x), ', ') into bad from jsonb_object_keys(e -> 'set') x where x = any (pk);
    if bad is not null then
      raise exception 'an update cannot change the primary key column %: delete the row and insert it again', bad using errcode = '22023';
    end if;
    items := items || jsonb_build_object('op', 'update', 'row', (e -> 'set') || (e -> 'key'), 'set', e -> 'set');
    update_cols := update_cols || array(select jsonb_object_keys(e -> 'set'));
  end loop;
  for e in select * from jsonb_array_elements(coalesce(edits -> 'delete', '[]')) loop
    if jsonb_typeof(e) <> 'object' then
      raise exception 'each delete must be an object holding the primary key' using errcode = '22023';
    end if;
    select string_agg(quote_ident(x), ', ') into bad from unnest(pk) x where e -> x is null or e -> x = 'null';
    if bad is not null then
      raise exception 'every edit must give the primary key column %', bad using errcode = '22023';
    end if;
    select string_agg(quote_ident(x), ', ') into bad from jsonb_object_keys(e) x where x <> all (pk);
    if bad is not null then
      raise exception 'a delete gives the primary key columns only (%), not %', array_to_string(pk, ', '), bad using errcode = '22023';
    end if;
    items := items || jsonb_build_object('op', 'delete', 'row', e);
  end loop;
  if jsonb_array_length(items) = 0 then
    raise exception 'edits hold no insert, update or delete' using errcode = '22023';
  end if;

  select string_agg(distinct quote_ident(x), ', ') into bad
    from jsonb_array_elements(items) i, jsonb_object_keys(i -> 'row') x
   where x <> all (all_cols);
  if bad is not null then
    raise exception 'edits name columns that % does not have: %', target, bad using errcode = '42703';
  end if;
  select string_agg(distinct quote_ident(x), ', ') into bad
    from jsonb_array_elements(items) i, jsonb_object_keys(i -> 'row') x where x = any (generated_cols);
  if bad is not null then
    raise exception 'column % is generated by the database: edits cannot set it', bad using errcode = '428C9';
  end if;
  select string_agg(distinct quote_ident(x), ', ') into bad
    from unnest(update_cols) x where x = any (identity_always_cols);
  if bad is not null then
    raise exception 'column % is an identity column (GENERATED ALWAYS): the database sets it, updates cannot', bad using errcode = '428C9';
  end if;
  -- Updates and deletes name their row by its whole key; inserts may leave out key
  -- columns the database fills in.
  foreach k in array pk loop
    if exists (select 1 from jsonb_array_elements(items) i
                where (i ->> 'op' <> 'insert' or k <> all (defaulted_cols))
                  and (i -> 'row' -> k is null or i -> 'row' -> k = 'null')) then
      raise exception 'every edit must give the primary key column %', k using errcode = '22023';
    end if;
  end loop;

  select array_agg(distinct c order by c) into update_cols from unnest(update_cols) c;
  if exists (select 1 from jsonb_array_elements(items) i where i ->> 'op' = 'delete') then
    clauses := clauses || 'WHEN MATCHED AND s.op = ''delete'' THEN DELETE'::text;
  end if;
  if update_cols is not null then
    clauses := clauses || format('WHEN MATCHED AND s.op = ''update'' THEN UPDATE SET %s',
      (select string_agg(format('%1$I = CASE WHEN s.set ? %2$L THEN (s.rec).%1$I ELSE t.%1$I END', c, c), ', ') from unnest(update_cols) c));
  end if;
  for shape_no in 1 .. cardinality(shapes) loop
    given := shapes[shape_no]::text[];
    clauses := clauses || format('WHEN NOT MATCHED AND s.op = ''insert'' AND s.shape = %s THEN INSERT (%s)%s VALUES (%s)',
      shape_no,
      (select string_agg(format('%I', c), ', ') from unnest(given) c),
      case when given && identity_always_cols then ' OVERRIDING SYSTEM VALUE' else '' end,
      (select string_agg(format('(s.rec).%I', c), ', ') from unnest(given) c));
  end loop;
  -- (OFFSET 0 keeps the subquery whole, so each row's record is built once, not once per column read.)
  return format(E'MERGE INTO %1$s AS t\nUSING (\n  SELECT e.op, e.set, e.shape, jsonb_populate_record(NULL::%1$s, e."row") AS rec\n    FROM jsonb_to_recordset(%2$L::jsonb) AS e(op text, "row" jsonb, set jsonb, shape integer)\n  OFFSET 0\n) AS s\nON %3$s\n%4$s',
    target, items,
    (select string_agg(format('t.%1$I = (s.rec).%1$I', c), ' AND ') from unnest(pk) c),
    array_to_string(clauses, E'\n'));
end;
$$;
comment on function snapbase_private.edits_to_sql(regclass, jsonb) is
  'Structured edits ({"insert", "update", "delete"}) as one MERGE keyed by the primary key: omitted insert columns take their defaults, identity values given are kept, generated and identity-always columns cannot be set.';

--------------------------------------------------------------------------------
-- What a managed table needs, said when it is registered
--------------------------------------------------------------------------------
-- Approval runs the change as the change runner, which Snapbase's owner grants the
-- table (and its sequences, and USAGE on its schema) for that transaction only: so
-- the owner must hold those WITH GRANT OPTION. Restores and snapshots run as the
-- owner. Submitters (editors) and those who see change requests and snapshots
-- (viewers) must be able to read the table. Row-level security would hide rows
-- from the runner and the owner unless a policy lets them through.
-- registration_problems lists the statements still to run (as the table's owner or
-- a superuser); register_table reports them as a WARNING, managed tables show them
-- as missing_grants (GraphQL: missingGrants), and grant_change_control runs them.

drop function if exists snapbase_private.registration_problems(regclass);
drop function if exists snapbase_private.warn_registration_problems(regclass);
drop function if exists snapbase.managed_tables_missing_grants(snapbase.managed_tables);
drop function if exists snapbase.grant_change_control(regclass);

create function snapbase_private.registration_problems(target regclass) returns text[]
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  owner_role constant name := ':DATABASE_OWNER';
  runner constant name := ':ROLE_CHANGE_RUNNER';
  viewer constant name := ':ROLE_VIEWER';
  rel record;
  missing text[];
  seq record;
  statements text[] := '{}';
  policy_roles text[];
begin
  select c.oid, c.relrowsecurity, c.relforcerowsecurity, c.relowner, n.oid as nsp, quote_ident(n.nspname) as schema_sql,
         format('%I.%I', n.nspname, c.relname) as table_sql
    into rel
    from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = target;
  if rel.oid is null then
    return statements;
  end if;
  -- Snapbase's owner: USAGE on the schema (to name the table, and pass it on to the runner).
  if not has_schema_privilege(owner_role, rel.nsp, 'USAGE WITH GRANT OPTION') then
    statements := statements || format('GRANT USAGE ON SCHEMA %s TO %I WITH GRANT OPTION;', rel.schema_sql, owner_role);
  end if;
  -- The table's rows, to pass on to the runner and to snapshot and restore.
  missing := array(select p from unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE']) p
                    where not has_table_privilege(owner_role, rel.oid, p || ' WITH GRANT OPTION'));
  if cardinality(missing) > 0 then
    statements := statements || format('GRANT %s ON TABLE %s TO %I WITH GRANT OPTION;', array_to_string(missing, ', '), rel.table_sql, owner_role);
  end if;
  -- Its identity and serial sequences: nextval for the runner, setval for restores.
  for seq in
    select format('%I.%I', sn.nspname, s.relname) as seq_sql, s.oid
      from pg_depend d
      join pg_class s on s.oid = d.objid and s.relkind = 'S'
      join pg_namespace sn on sn.oid = s.relnamespace
     where d.classid = 'pg_class'::regclass and d.refclassid = 'pg_class'::regclass and d.refobjid = rel.oid and d.deptype in ('a', 'i')
     order by s.relname
  loop
    missing := array(select p from unnest(array['USAGE', 'SELECT', 'UPDATE']) p
                      where not has_sequence_privilege(owner_role, seq.oid, p || ' WITH GRANT OPTION'));
    if cardinality(missing) > 0 then
      statements := statements || format('GRANT %s ON SEQUENCE %s TO %I WITH GRANT OPTION;', array_to_string(missing, ', '), seq.seq_sql, owner_role);
    end if;
  end loop;
  -- Viewers (so editors and admins): the submitter must read the table, and change
  -- requests and snapshots are shown to those who may read it.
  if not has_schema_privilege(viewer, rel.nsp, 'USAGE') then
    statements := statements || format('GRANT USAGE ON SCHEMA %s TO %I;', rel.schema_sql, viewer);
  end if;
  if not has_any_column_privilege(viewer, rel.oid, 'SELECT') then
    statements := statements || format('GRANT SELECT ON TABLE %s TO %I;', rel.table_sql, viewer);
  end if;
  -- Row-level security applies to the runner always, and to the owner unless it owns
  -- the table (and security is not forced) or bypasses it.
  if rel.relrowsecurity then
    policy_roles := array_remove(array[
      case when not ((rel.relowner = to_regrole(owner_role) and not rel.relforcerowsecurity)
                     or (select r.rolbypassrls or r.rolsuper from pg_roles r where r.rolname = owner_role))
                and not exists (select 1 from pg_policy p where p.polrelid = rel.oid and p.polpermissive and p.polcmd = '*'
                                   and (0 = any (p.polroles) or to_regrole(owner_role) = any (p.polroles)))
           then quote_ident(owner_role) end,
      case when not exists (select 1 from pg_policy p where p.polrelid = rel.oid and p.polpermissive and p.polcmd = '*'
                               and (0 = any (p.polroles) or to_regrole(runner) = any (p.polroles)))
           then quote_ident(runner) end], null);
    if cardinality(policy_roles) > 0 then
      statements := statements || format('CREATE POLICY snapbase_change_control ON %s TO %s USING (true) WITH CHECK (true);',
        rel.table_sql, array_to_string(policy_roles, ', '));
    end if;
  end if;
  return statements;
end;
$$;
comment on function snapbase_private.registration_problems(regclass) is
  'The statements (GRANT, CREATE POLICY) a managed table still needs before changes to it can be approved, snapshotted and restored, and read by submitters; empty when it needs none.';
grant execute on function snapbase_private.registration_problems(regclass) to :ROLE_VIEWER;

-- For register_table: a WARNING (psql shows it) listing what is still needed.
create function snapbase_private.warn_registration_problems(target regclass) returns text[]
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  statements text[] := snapbase_private.registration_problems(target);
begin
  if cardinality(statements) > 0 then
    raise warning '% is under change control, but changes to it will fail until these are run (as its owner or a superuser): %',
      target, array_to_string(statements, ' ')
      using errcode = '01007', hint = format('Or run: select snapbase.grant_change_control(%L);', target::text);
  end if;
  return statements;
end;
$$;
comment on function snapbase_private.warn_registration_problems(regclass) is
  'Raises a WARNING listing the GRANTs a managed table still needs (registration_problems); register_table calls it.';
grant execute on function snapbase_private.warn_registration_problems(regclass) to :ROLE_VIEWER;

create function snapbase.managed_tables_missing_grants(mt snapbase.managed_tables) returns text[]
language sql stable
set search_path = pg_catalog
as $$
  select coalesce(snapbase_private.registration_problems(snapbase_private.relation_of(mt)), '{}')
$$;
comment on function snapbase.managed_tables_missing_grants(snapbase.managed_tables) is
  'Statements (GRANT, CREATE POLICY) still to run, as the table''s owner or a superuser, before changes to this table can be approved and restored; empty when none.';
grant execute on function snapbase.managed_tables_missing_grants(snapbase.managed_tables) to :ROLE_VIEWER;

-- For the DBA in psql: runs those statements with the caller's own rights (it runs
-- as the caller, so it can grant only what the caller may grant).
create function snapbase.grant_change_control(target regclass) returns text[]
language plpgsql
set search_path = pg_catalog
as $$
declare
  statements text[] := snapbase_private.registration_problems(target);
  statement text;
  still text[];
begin
  foreach statement in array statements loop
    execute statement;
  end loop;
  still := snapbase_private.registration_problems(target);
  if cardinality(still) > 0 then
    raise exception 'you may not grant everything % needs; run these as its owner or a superuser: %', target, array_to_string(still, ' ')
      using errcode = '42501';
  end if;
  return statements;
end;
$$;
comment on function snapbase.grant_change_control(regclass) is
  E'@behavior -*\nRuns, as the caller (a DBA who owns the table, or a superuser), the GRANTs and policy a managed table needs (snapbase_private.registration_problems). Returns what it ran.';
grant execute on function snapbase.grant_change_control(regclass) to :ROLE_ADMIN;

--------------------------------------------------------------------------------
-- Workbooks: every column name works
--------------------------------------------------------------------------------
-- A workbook table's data columns may be named anything PostgreSQL allows
-- (reserved words, spaces, quotes, Unicode, single letters) except names starting
-- with "__", which are Snapbase's metadata. So the SQL that works on these tables
-- must never let a data column capture one of its own names: a whole row is
-- always written `alias.*` (to_jsonb(r.*)), never `alias` alone (which means the
-- column when one is named so), and every alias a statement introduces next to
-- the data columns starts with "__sb_" (no data column can be named so; a bare
-- __sb_ alias is a whole row). Functions returning rows stay in FROM, so they run
-- once per row, not once per column read from them. Source
-- columns a workbook cannot name as they are (starting with "__", or longer than
-- 63 bytes) get a local name and keep their own as `source_name` (the connectors'
-- rule: src/connectors/names.ts).

-- record_json_sql: see 200-tenants-agents.sql (one definition: it hides what an agent may not see, and reads r.* so a column named r cannot capture it).

-- For the download task, once it has the source's table spec (columns under their
-- workbook names, with `sourceName` where that differs): the job's workbook table,
-- created on the first download; on a refresh, checked against the spec.
create or replace function snapbase_private.prepare_download(job_id bigint, spec jsonb) returns snapbase.workbook_tables
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  wb snapbase.workbooks;
  misfits text;
begin
  select * into j from snapbase.jobs where id = job_id;
  if j.table_id is not null then
    select * into t from snapbase.workbook_tables where id = j.table_id;
    select string_agg(quote_ident(c ->> 'name'), ', ') into misfits from jsonb_array_elements(t.columns) c
     where not coalesce((c ->> 'scratch')::boolean, false)
       and not exists (select 1 from jsonb_array_elements(spec -> 'columns') s
                        where s ->> 'name' = c ->> 'name' and to_regtype(s ->> 'type') = to_regtype(c ->> 'type'));
    if misfits is not null then
      raise exception 'the source table % no longer matches workbook table % (missing or retyped: %)', t.remote_table, t.id, misfits
        using errcode = '22023';
    end if;
    return t;
  end if;
  select * into wb from snapbase.workbooks where id = j.workbook_id;
  t := snapbase_private.create_workbook_table(wb, j.options ->> 'remote_table',
         (select jsonb_agg(jsonb_build_object('name', c ->> 'name', 'type', c ->> 'type', 'read_only', coalesce((c ->> 'readOnly')::boolean, false)))
            from jsonb_array_elements(spec -> 'columns') c),
         spec ->> 'remoteIdColumn', null,
         jsonb_build_object('kind', (select kind from snapbase.connector_accounts where id = j.connector_account_id), 'table', j.options ->> 'remote_table'));
  -- The remote id column identifies records at the source: it is never edited here.
  -- Columns named otherwise here keep the source's name.
  update snapbase.workbook_tables set connector_account_id = j.connector_account_id, remote_table = j.options ->> 'remote_table',
         columns = (select jsonb_agg(c
                             || case when c ->> 'name' = spec ->> 'remoteIdColumn' then '{"read_only": true}'::jsonb else '{}' end
                             || coalesce((select jsonb_build_object('source_name', s ->> 'sourceName') from jsonb_array_elements(spec -> 'columns') s
                                           where s ->> 'name' = c ->> 'name' and s ->> 'sourceName' is not null), '{}')
                             order by ord)
                      from jsonb_array_elements(columns) with ordinality as e(c, ord))
   where id = t.id returning * into t;
  update snapbase.jobs set table_id = t.id where id = job_id;
  return t;
end;
$$;

-- Applies one batch of source records [{remote_id, values}] to the job's table.
-- New records are inserted; a known record takes the source's values except in
-- the fields edited here, which keep the local value. Either way the source's
-- values become __last_seen, and a field stays edited only while it differs from
-- them. Returns false when the job was cancelled.
create or replace function snapbase_private.apply_download_batch(job_id bigint, records jsonb, done bigint) returns boolean
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  rel text;
  cols text[];
begin
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  rel := snapbase_private.table_rel(t);
  cols := snapbase_private.column_names(t, true);
  execute format($q$
    with __sb_incoming as (
      select __sb_e.value ->> 'remote_id' as __sb_remote_id, __sb_n as __sb_typed, %5$s as __sb_seen
        from jsonb_array_elements($1) as __sb_e
        cross join lateral jsonb_populate_record(null::%1$s, __sb_e.value -> 'values') as __sb_n
    ), __sb_updated as (
      update %1$s __sb_r set
        %2$s,
        __last_seen = __sb_i.__sb_seen,
        __edited = coalesce((select jsonb_object_agg(__sb_x.key, __sb_x.value) from jsonb_each(__sb_r.__edited) __sb_x
                              where (to_jsonb(__sb_r.*) -> __sb_x.key) is distinct from (__sb_i.__sb_seen -> __sb_x.key)), '{}'),
        __source_deleted = false,
        __seen_job = $2,
        __updated_at = now()
        from __sb_incoming __sb_i
       where __sb_r.__remote_id = __sb_i.__sb_remote_id
      returning __sb_r.__remote_id
    )
    insert into %1$s (%3$s, __remote_id, __last_seen, __seen_job)
    select %4$s, __sb_i.__sb_remote_id, __sb_i.__sb_seen, $2 from __sb_incoming __sb_i
     where not exists (select 1 from __sb_updated __sb_u where __sb_u.__remote_id = __sb_i.__sb_remote_id)
    $q$, rel,
    (select string_agg(format('%1$I = case when __sb_r.__edited ? %1$L then __sb_r.%1$I else (__sb_i.__sb_typed).%1$I end', c), ', ') from unnest(cols) c),
    (select string_agg(format('%I', c), ', ') from unnest(cols) c),
    (select string_agg(format('(__sb_i.__sb_typed).%I', c), ', ') from unnest(cols) c),
    -- The source's values as JSON, built from the data columns alone (cheaper than
    -- the whole row less its metadata); jsonb_build_object takes at most 100
    -- arguments, so wide tables take the whole row.
    case when cardinality(cols) <= 50
         then format('jsonb_build_object(%s)', (select string_agg(format('%L, __sb_n.%I', c, c), ', ') from unnest(cols) c))
         else 'to_jsonb(__sb_n.*) - $3::text[]' end)
    using records, job_id, snapbase_private.scratch_columns(t) || snapbase_private.record_meta_columns();
  return snapbase_private.job_progress(job_id, done, null);
end;
$$;

-- A first download that failed or was cancelled leaves no table behind: the
-- download task calls this for the table its job created (when no one has edited
-- or suggested anything in it meanwhile). Returns whether it was removed.
drop function if exists snapbase_private.discard_download(bigint);
create function snapbase_private.discard_download(job_id bigint) returns boolean
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  touched boolean;
begin
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  if t.id is null then
    return false;
  end if;
  if to_regclass(snapbase_private.table_rel(t)) is not null then
    execute format('select exists (select 1 from %s where __dirty or __suggested <> ''{}'' or __suggest_delete is not null or __suggested_new)',
      snapbase_private.table_rel(t)) into touched;
    if touched then
      return false;
    end if;
    execute format('drop table %s', snapbase_private.table_rel(t));
  end if;
  -- (The job row would go with its table: jobs.table_id cascades.)
  update snapbase.jobs set table_id = null where id = job_id;
  delete from snapbase.workbook_tables where id = t.id;
  perform snapbase_private.audit_workbook('discard_download', t.workbook_id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('job_id', job_id, 'remote_table', t.remote_table));
  return true;
end;
$$;
comment on function snapbase_private.discard_download(bigint) is
  'Removes the workbook table a failed or cancelled first download created (unless someone edited it meanwhile). Worker only.';

create or replace function snapbase_private.apply_update(t snapbase.workbook_tables, record_id bigint, vals jsonb) returns void
language plpgsql
set search_path = pg_catalog
as $$
declare
  rel text := snapbase_private.table_rel(t);
  cols text;
  scratch text[] := snapbase_private.scratch_columns(t);
  is_new boolean;
begin
  execute format('select __created or __suggested_new from %s where __id = $1', rel) into is_new using record_id;
  if is_new is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.check_values(t, vals, is_new);
  select string_agg(format('%I', k), ', ') into cols from jsonb_object_keys(vals) k;
  if cols is null then
    return;
  end if;
  -- A field counts as edited while it differs from the value last seen at the source;
  -- scratch columns are never flagged (they are never published).
  execute format($u$
    update %1$s __sb_r set (%2$s) = (select %2$s from jsonb_populate_record(__sb_r.*, $2)), __updated_at = now()
     where __sb_r.__id = $1;
    $u$, rel, cols) using record_id, vals;
  execute format($u$
    update %1$s __sb_r set __edited = (__sb_r.__edited - $2::text[]) || coalesce((
        select jsonb_object_agg(__sb_k.k, now()) from unnest($2::text[]) __sb_k(k)
         where __sb_k.k <> all ($3) and (__sb_r.__created or (to_jsonb(__sb_r.*) -> __sb_k.k) is distinct from (__sb_r.__last_seen -> __sb_k.k))), '{}')
     where __sb_r.__id = $1
    $u$, rel) using record_id, array(select jsonb_object_keys(vals)), scratch;
end;
$$;

create or replace function snapbase.resolve_source_deleted(table_id bigint, record_id bigint, action text) returns text
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  rel text := snapbase_private.table_rel(t);
  hit bigint;
begin
  if action = 'recreate' then
    -- Re-created with all its values: every published field counts as given.
    execute format('update %s __sb_r set __source_deleted = false, __created = true, __remote_id = null, __last_seen = null, __publish = null,
                    __edited = (select jsonb_object_agg(__sb_k.k, now()) from jsonb_object_keys(to_jsonb(__sb_r.*) - $2::text[]) __sb_k(k)),
                    __updated_at = now() where __sb_r.__id = $1 and __sb_r.__source_deleted returning __sb_r.__id', rel)
      into hit using record_id, snapbase_private.record_meta_columns() || snapbase_private.scratch_columns(t);
  elsif action = 'delete' then
    execute format('delete from %s where __id = $1 and __source_deleted returning __id', rel) into hit using record_id;
  else
    raise exception 'action must be recreate or delete (got %)', coalesce(action, 'null') using errcode = '22023';
  end if;
  if hit is null then
    raise exception 'no record % deleted at the source in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.audit_workbook('resolve_source_deleted', t.workbook_id, 'workbook_record', record_id::text, rel,
    jsonb_build_object('table_id', t.id, 'action', action));
  return action;
end;
$$;

create or replace function snapbase_private.tg__records_event() returns trigger
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  affected bigint;
  what text;
begin
  if tg_op = 'INSERT' then
    select count(*), case when bool_and(__sb_n.__suggested_new) then 'suggested' when bool_and(__sb_n.__seen_job is not null) then 'downloaded' else 'created' end
      into affected, what from new_rows __sb_n;
  elsif tg_op = 'DELETE' then
    select count(*), case when bool_and(__sb_o.__suggested_new) then 'rejected' else 'deleted' end into affected, what from old_rows __sb_o;
  else
    select count(*),
           case
             when bool_or(__sb_c.data_changed and __sb_n.__suggested <> __sb_o.__suggested) then 'accepted'
             when bool_or(__sb_n.__publish is distinct from __sb_o.__publish) then 'published'
             when bool_or(__sb_c.data_changed) then 'edited'
             when bool_or(not (__sb_o.__suggested @> __sb_n.__suggested) or __sb_n.__suggest_delete is not null and __sb_o.__suggest_delete is null) then 'suggested'
             when bool_or(__sb_n.__suggested <> __sb_o.__suggested or __sb_n.__suggest_delete is distinct from __sb_o.__suggest_delete) then 'rejected'
             else 'updated'
           end
      into affected, what
      from new_rows __sb_n join old_rows __sb_o on __sb_o.__id = __sb_n.__id,
           lateral (select (to_jsonb(__sb_n.*) - snapbase_private.record_meta_columns()) is distinct from (to_jsonb(__sb_o.*) - snapbase_private.record_meta_columns())
                             or __sb_n.__deleted <> __sb_o.__deleted as data_changed) __sb_c;
  end if;
  -- A bulk edit announces itself once, at its end.
  -- 'updated' alone (edit flags, timestamps) is bookkeeping that follows another event.
  if affected > 0 and what <> 'updated' and current_setting('snapbase.quiet_record_events', true) is distinct from 'on' then
    perform snapbase_private.emit('workbook:' || tg_argv[0], 'records', jsonb_build_object('table_id', tg_argv[1]::bigint,
      'action', what, 'count', affected));
  end if;
  return null;
end;
$$;

create or replace function snapbase.copy_managed_table_to_workbook(workbook_id bigint, managed_table text, name text default null)
returns snapbase.workbook_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'edit');
  mt snapbase.managed_tables := snapbase.resolve_managed_table(managed_table);
  rel regclass := snapbase_private.relation_of(mt);
  pk text[] := snapbase_private.primary_key(rel);
  cols jsonb;
  col_list text;
  t snapbase.workbook_tables;
  copied bigint;
begin
  if not has_table_privilege(snapbase_private.caller_role(), rel, 'SELECT') then
    raise exception 'you may not read %', mt.qualified_name using errcode = '42501';
  end if;
  if cardinality(pk) is distinct from 1 then
    raise exception '% needs a single-column primary key to be copied into a workbook', mt.qualified_name using errcode = '22023';
  end if;
  -- Only the columns the caller may read are copied (column privileges hold here too).
  select jsonb_agg(jsonb_build_object('name', c ->> 'name', 'type', c ->> 'type', 'read_only', (c ->> 'name') = pk[1]) order by ord),
         string_agg(format('%I', c ->> 'name'), ', ' order by ord)
    into cols, col_list
    from jsonb_array_elements(snapbase_private.table_columns(rel)) with ordinality as e(c, ord)
   where has_column_privilege(snapbase_private.caller_role(), rel, c ->> 'name', 'SELECT');
  if not cols @> jsonb_build_array(jsonb_build_object('name', pk[1])) then
    raise exception 'you may not read the primary key % of %', pk[1], mt.qualified_name using errcode = '42501';
  end if;
  t := snapbase_private.create_workbook_table(wb, coalesce(name, mt.table_name), cols, pk[1], null,
         jsonb_build_object('kind', 'managed_table', 'table', mt.qualified_name, 'managed_table_id', mt.id));
  execute format('insert into %s (%s, __remote_id, __last_seen) select __sb_seen.*, __sb_s.%I::text, to_jsonb(__sb_seen.*) from %s __sb_s, lateral (select %s) __sb_seen',
    snapbase_private.table_rel(t), col_list, pk[1], rel,
    (select string_agg(format('__sb_s.%I', c ->> 'name'), ', ') from jsonb_array_elements(cols) c));
  get diagnostics copied = row_count;
  perform snapbase_private.audit_workbook('copy_managed_table', wb.id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('source', mt.qualified_name, 'records', copied));
  return t;
end;
$$;

--------------------------------------------------------------------------------
-- Accepting and rejecting suggestions: one result shape
--------------------------------------------------------------------------------
-- Both return {records, cells, created, deleted}: the records acted on, and of
-- their suggestions the cells, the suggested new records (accepted: created;
-- rejected: removed) and the suggested deletions (accepted: marked deleted;
-- rejected: dropped) that were accepted or rejected.

create or replace function snapbase.accept_suggestions(table_id bigint, record_id bigint default null, column_name text default null,
                                                       within_filter boolean default false)
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  rel text := snapbase_private.table_rel(t);
  cols text := (select string_agg(format('%I', c), ', ') from unnest(snapbase_private.column_names(t)) c);
  -- The accepted values of row r: its suggestions, or only the one for column_name ($1).
  patch constant text := '(select coalesce(jsonb_object_agg(__sb_e.key, __sb_e.value -> ''value''), ''{}'') from jsonb_each(r.__suggested) __sb_e
                            where $1::text is null or __sb_e.key = $1)';
  result jsonb;
begin
  if column_name is not null and column_name <> all (snapbase_private.column_names(t)) then
    raise exception 'unknown column %', column_name using errcode = '22023';
  end if;
  -- The counts come from the same snapshot the UPDATE starts from.
  execute format($u$
    with __sb_counted as (
      select count(*) as records,
             coalesce(sum((select count(*) from jsonb_object_keys(%4$s))), 0) as cells,
             count(*) filter (where r.__suggested_new and $1::text is null) as created,
             count(*) filter (where r.__suggest_delete is not null and $1::text is null) as deleted
        from %1$s r where %2$s
    ), __sb_applied as (
      -- One pass per row: the patch, its values typed by the table's row type, and those
      -- as JSON (to compare with the source's) are each computed once.
      update %1$s r set
        (%3$s, __edited) = (
          select %5$s,
                 (r.__edited - array(select jsonb_object_keys(__sb_x.p))) || coalesce((
                   select jsonb_object_agg(__sb_k.k, now()) from jsonb_object_keys(__sb_x.p) __sb_k(k)
                    where __sb_k.k <> all ($2) and (r.__created or r.__suggested_new or __sb_j.v -> __sb_k.k is distinct from r.__last_seen -> __sb_k.k)), '{}')
            from (select %4$s as p offset 0) __sb_x  -- offset 0: computed once, not inlined at each use
            cross join lateral jsonb_populate_record(null::%1$s, __sb_x.p) __sb_n
            cross join lateral (select to_jsonb(__sb_n.*) as v) __sb_j),
        __suggested = case when $1::text is null then '{}' else r.__suggested - $1 end,
        __created = r.__created or (r.__suggested_new and $1::text is null),
        __suggested_new = r.__suggested_new and $1::text is not null,
        __deleted = r.__deleted or (r.__suggest_delete is not null and $1::text is null),
        __suggest_delete = case when $1::text is null then null else r.__suggest_delete end,
        __updated_at = now()
       where %2$s
      returning 1
    )
    select jsonb_build_object('records', (select count(*) from __sb_applied), 'cells', c.cells, 'created', c.created, 'deleted', c.deleted)
      from __sb_counted c
    $u$, rel, snapbase_private.suggestion_scope(t, record_id, within_filter), cols, patch,
    (select string_agg(format('case when __sb_x.p ? %1$L then __sb_n.%1$I else r.%1$I end', c), ', ') from unnest(snapbase_private.column_names(t)) c))
    into result using column_name, snapbase_private.scratch_columns(t);
  perform snapbase_private.audit_workbook('accept_suggestions', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('record_id', record_id, 'column', column_name, 'within_filter', within_filter) || result);
  return result;
end;
$$;
comment on function snapbase.accept_suggestions(bigint, bigint, text, boolean) is
  'Accept suggestions of one record or all (optionally within the active filter), for one column or all. Returns {records, cells, created, deleted}, like reject_suggestions.';

create or replace function snapbase.reject_suggestions(table_id bigint, record_id bigint default null, column_name text default null,
                                                       within_filter boolean default false)
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  rel text := snapbase_private.table_rel(t);
  scope text := snapbase_private.suggestion_scope(t, record_id, within_filter);
  result jsonb;
  removed bigint := 0;
begin
  if column_name is not null and column_name <> all (snapbase_private.column_names(t)) then
    raise exception 'unknown column %', column_name using errcode = '22023';
  end if;
  -- Counted from the same snapshot the statements start from.
  execute format($q$
    select jsonb_build_object(
             'records', count(*) filter (where $1::text is null or r.__suggested ? $1),
             'cells', coalesce(sum((select count(*) from jsonb_object_keys(r.__suggested) __sb_k(k) where $1::text is null or __sb_k.k = $1)), 0),
             'created', count(*) filter (where r.__suggested_new and $1::text is null),
             'deleted', count(*) filter (where r.__suggest_delete is not null and $1::text is null))
      from %s r where %s$q$, rel, scope)
    into result using column_name;
  -- Rejecting a whole suggested new record removes it.
  if column_name is null then
    execute format('delete from %s r where %s and r.__suggested_new', rel, scope);
    get diagnostics removed = row_count;
  end if;
  execute format($u$
    update %s r set
      __suggested = case when $1::text is null then '{}' else r.__suggested - $1 end,
      __suggest_delete = case when $1::text is null then null else r.__suggest_delete end,
      __updated_at = now()
     where %s and ($1::text is null or r.__suggested ? $1)$u$, rel, scope)
    using column_name;
  perform snapbase_private.audit_workbook('reject_suggestions', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('record_id', record_id, 'column', column_name, 'within_filter', within_filter) || result);
  return result;
end;
$$;
comment on function snapbase.reject_suggestions(bigint, bigint, text, boolean) is
  'Reject suggestions of one record or all (optionally within the active filter), for one column or all. Returns {records, cells, created, deleted}, like accept_suggestions: what was rejected (created: suggested new records removed; deleted: suggested deletions dropped).';

--! split: 900-definer-search-path.sql
-- Runs after every other file: applies to all functions, whichever file defined them.

-- Temporary objects come last in every SECURITY DEFINER function's search path (if
-- pg_temp is not named, PostgreSQL searches it first for relations and types).
do $$
declare
  f regprocedure;
begin
  for f in select p.oid::regprocedure from pg_proc p
            where p.prosecdef and p.pronamespace in ('snapbase'::regnamespace, 'snapbase_private'::regnamespace, 'snapbase_sandbox'::regnamespace)
              and 'search_path=pg_catalog' = any (p.proconfig) loop
    execute format('alter function %s set search_path = pg_catalog, pg_temp', f);
  end loop;
end $$;
