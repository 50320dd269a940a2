-- Fourth review, change SQL and preview:
-- * A MERGE could write columns its submitter may not read: pg_depend records the
--   target columns of INSERT and UPDATE but not of MERGE actions. The check now reads
--   the written columns from the tree (insertedCols/updatedCols, the sets PostgreSQL
--   checks column privileges with), and the change runner gets INSERT and UPDATE only
--   on the columns every reader may read.
-- * A failed change's error was shown to everyone who sees the request, though it
--   could quote values of columns only the submitter may read.
-- * Deferred constraint triggers ran at commit, after the approval's snapshot.
-- * preview_change used up the table's sequence values, and kept every writer out
--   for as long as the previewed statement ran. Tracked tables now capture the
--   preview in their tracking triggers (no lock beyond the statement's own); a
--   preview that may draw from the table's sequences keeps writers out and puts the
--   sequences back.
-- * Previews compare values by their text, as snapshot_diff now does.

create or replace function snapbase_private.failure_message_for_readers(target regclass, err_code text, err_message text)
 returns text
 language sql
 stable
 set search_path to 'pg_catalog'
as $function$
  -- Everyone who may read any column of the table sees its change requests. A
  -- change runs with its submitter's column rights, so its error may quote values
  -- of columns the submitter may read and another reader may not ("invalid input
  -- syntax for type integer: "…""). Messages of classes that quote no values
  -- (integrity, access and syntax, resources, locks, cancellation) are kept; the
  -- rest are kept only when every application role that sees the request reads
  -- the whole table.
  select case
    when left(err_code, 2) in ('0A', '23', '40', '42', '53', '54', '55', '57') then err_message
    when not exists (select 1 from unnest(array[':ROLE_VIEWER', ':ROLE_EDITOR', ':ROLE_ADMIN', ':ROLE_AGENT']::name[]) r
                      join pg_attribute a on a.attrelid = target and a.attnum > 0 and not a.attisdropped
                     where coalesce(has_any_column_privilege(r, target, 'SELECT'), false)
                       and not coalesce(has_column_privilege(r, target, a.attnum, 'SELECT'), false)) then err_message
    else 'the change failed (SQLSTATE ' || err_code || '); its message is shown only to the approving admin, because it may quote values of columns that some who see this request may not read'
  end
$function$;
comment on function snapbase_private.failure_message_for_readers(regclass,text,text) is 'What a failed change''s stored error says: its message, unless the message may quote values of columns some readers of the change request may not read (then only its SQLSTATE).';
create or replace function snapbase_private.row_texts_sql(rel oid, row_alias text)
 returns text
 language sql
 stable
 set search_path to 'pg_catalog'
as $function$
  select format('jsonb_object(%L::text[], array[%s]::text[])',
                coalesce(array_agg(a.attname::text order by a.attnum), '{}'),
                coalesce(string_agg(format('(%s).%I::text', row_alias, a.attname), ', ' order by a.attnum), ''))
    from pg_attribute a
   where a.attrelid = rel and a.attnum > 0 and not a.attisdropped
$function$;
comment on function snapbase_private.row_texts_sql(oid,text) is 'An SQL expression for a row of rel (a table, or a row layout''s composite type) called row_alias: {column: the value''s text}. Rows are compared by it where jsonb would call different values equal (1.0 and 1.00, -0 and 0, JSON null and SQL NULL). row_alias is always a literal alias of the caller''s own query.';

create or replace function snapbase_private.preview_capture_statements(op text, rel oid)
 returns text[]
 language sql
 stable
 set search_path to 'pg_catalog'
as $function$
  select array_remove(array[
    case when op in ('UPDATE', 'DELETE') then
      format('insert into pg_temp.snapbase_preview_rows (side, "row", texts) select %L, to_jsonb(o), %s from old_rows o',
             'before', snapbase_private.row_texts_sql(rel, 'o')) end,
    case when op in ('UPDATE', 'INSERT') then
      format('insert into pg_temp.snapbase_preview_rows (side, "row", texts) select %L, to_jsonb(o), %s from new_rows o',
             'after', snapbase_private.row_texts_sql(rel, 'o')) end], null)
$function$;
comment on function snapbase_private.preview_capture_statements(text,oid) is 'For a statement trigger with transition tables (old_rows, new_rows) on rel: the statements that copy its rows before and after, as values and as texts, into preview_change''s temporary table.';

create or replace function snapbase_private.sequence_state(seq regclass)
 returns jsonb
 language plpgsql
 stable
 set search_path to 'pg_catalog'
as $function$
declare
  state jsonb;
begin
  execute format('select jsonb_build_object(%L, s.last_value::text, %L, s.is_called) from %s s', 'last_value', 'is_called', seq)
    into state;
  return state;
exception when insufficient_privilege then
  return null;
end;
$function$;
comment on function snapbase_private.sequence_state(regclass) is 'A sequence''s position (last_value, is_called), or null when the caller may not read it.';

create or replace function snapbase_private.restore_sequence_state(seq regclass, state jsonb)
 returns boolean
 language plpgsql
 set search_path to 'pg_catalog'
as $function$
begin
  if state is not null and snapbase_private.sequence_state(seq) = state then
    return true;
  end if;
  if state is null or not has_sequence_privilege(seq, 'UPDATE') then
    return false;
  end if;
  perform setval(seq, (state ->> 'last_value')::bigint, (state ->> 'is_called')::boolean);
  return true;
end;
$function$;
comment on function snapbase_private.restore_sequence_state(regclass,jsonb) is 'Puts a sequence back where sequence_state found it (callers make sure nobody else drew from it meanwhile); false when it cannot.';

create or replace function snapbase_private.layout_relid(layout_id bigint)
 returns oid
 language sql
 stable
 set search_path to 'pg_catalog'
as $function$
  select t.typrelid from pg_type t where t.oid = snapbase_private.layout_type(layout_id)::regtype
$function$;
comment on function snapbase_private.layout_relid(bigint) is 'The pg_class row of a row layout''s composite type (its attributes are the layout''s columns).';

CREATE OR REPLACE FUNCTION snapbase_private.probe_user_text(body_prefix text, body text, body_suffix text, params text DEFAULT ''::text, path text DEFAULT 'pg_catalog'::text, purpose text DEFAULT 'filter'::text)
 RETURNS snapbase_private.probe_result
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET standard_conforming_strings TO 'on'
AS $function$
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
  written_columns jsonb;
  written_rel oid;
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
    -- Columns written count as used: INSERT and UPDATE targets, and a MERGE's actions,
    -- which pg_depend does not record. They are the tree's insertedCols/updatedCols,
    -- the sets PostgreSQL checks column privileges with (attnum + 7, as
    -- FirstLowInvalidHeapAttributeNumber is -7). Only a written relation has them.
    if cardinality(result.written) > 0 then
      select coalesce(jsonb_agg(distinct w.attnum), '[]') into strict written_columns
        from (select m.member::int - 7 as attnum
                from regexp_matches(tree, ':(?:insertedCols|updatedCols) \(b((?: [0-9]+)*)\)', 'g') as x(sets)
               cross join lateral regexp_split_to_table(btrim(x.sets[1]), ' ') as m(member)
               where m.member <> '') w;
      foreach written_rel in array result.written loop
        result.columns := jsonb_set(result.columns, array[written_rel::text],
          (select coalesce(jsonb_agg(distinct v order by v), '[]')
             from (select jsonb_array_elements(coalesce(result.columns -> written_rel::text, '[]')) as v
                   union select jsonb_array_elements(written_columns)) u));
      end loop;
    end if;
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
$function$;
comment on function snapbase_private.probe_user_text(text,text,text,text,text,text) is 'Analyses user text as the body of a throw-away function (never planned, never run, always rolled back) and returns its parse tree''s problems and dependencies.';


CREATE OR REPLACE FUNCTION snapbase_sandbox.run_change(change_sql text, path text)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET standard_conforming_strings TO 'on'
AS $function$
declare
  n bigint;
begin
  perform set_config('search_path', path, true);
  execute change_sql;
  get diagnostics n = row_count;
  -- Deferred constraint triggers fire now, as the runner and before the snapshot,
  -- not at commit: the snapshot then holds what the approval commits, and a preview
  -- shows (and fails on) what they do.
  set constraints all immediate;
  return n;
end;
$function$;
alter function snapbase_sandbox.run_change(text,text) owner to :ROLE_CHANGE_RUNNER;
comment on function snapbase_sandbox.run_change(text,text) is 'Runs checked change SQL as the change runner, which holds (for the approving transaction only) the managed table and what the change reads. Owner only.';
grant execute on function snapbase_sandbox.run_change(text,text) to :DATABASE_OWNER;


CREATE OR REPLACE FUNCTION snapbase_private.execute_change(target regclass, change_sql text, probe snapbase_private.probe_result, readers name[])
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET standard_conforming_strings TO 'on'
AS $function$
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
  -- Previews take no table lock that keeps them apart (approvals do): grants on the
  -- target are serialised like the others.
  perform pg_advisory_xact_lock(hashtext('snapbase relation grant'), target::oid::int);
  -- SELECT, INSERT and UPDATE only on the columns every reader may read: PostgreSQL
  -- itself then refuses anything reaching for the others (a whole-row reference, or a
  -- column written by a MERGE action, included).
  execute format('grant delete on table %s to %I', target, runner);
  foreach rel in array array[target::oid] || reads loop
    select string_agg(format('%I', a.attname), ', ' order by a.attnum) into missing
      from pg_attribute a
     where a.attrelid = rel and a.attnum > 0 and not a.attisdropped
       and not exists (select 1 from unnest(readers) r where not coalesce(has_column_privilege(r, rel, a.attnum, 'SELECT'), false));
    if missing is not null then
      execute format('grant select (%1$s)%2$s on table %3$s to %4$I', missing,
        case when rel = target then format(', insert (%1$s), update (%1$s)', missing) else '' end, rel::regclass, runner);
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
$function$;



CREATE OR REPLACE FUNCTION snapbase.approve_change(change_id bigint)
 RETURNS snapbase.change_requests
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET client_min_messages TO 'warning'
AS $function$
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
  running boolean := false;
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
      running := true;
      affected := snapbase_private.apply_restore(cr.restore_snapshot_id, target, cr.restore_keys);
      -- Deferred triggers fire before the snapshot, so that it holds what this commits.
      set constraints all immediate;
    else
      -- Checked again now: the table, the allow-list or the submitter's rights may have changed.
      probe := snapbase_private.check_change_sql(target, cr.sql, snapbase_private.submitter_roles(cr));
      running := true;
      affected := snapbase_private.execute_change(target, cr.sql, probe, snapbase_private.submitter_roles(cr));
      if cr.kind = 'edits' then
        perform snapbase_private.check_edits_applied(cr.edits, affected);
      end if;
    end if;
  exception when others then
    get stacked diagnostics err_code = returned_sqlstate, err_message = message_text;
    -- Only the message (no DETAIL or HINT), and not without bound.
    err_message := left(err_message, 2000);
    -- The approving admin is told; the request, which others see, may keep less.
    raise warning 'change request % failed: % (SQLSTATE %)', change_id, err_message, err_code;
    if running then
      err_message := snapbase_private.failure_message_for_readers(target, err_code, err_message);
    end if;
    done := snapbase_private.finish_change(change_id, 'failed', null, null, err_code, err_message, null);
    return done;
  end;
  snap := snapbase_private.capture_for_change(cr);
  return snapbase_private.finish_change(change_id, 'approved', affected, snap.id, null, null, null);
end;
$function$;
comment on function snapbase.approve_change(bigint) is 'Apply a pending change as the approving admin, snapshot the whole table and audit it, in one transaction. A failing change leaves nothing behind and marks the request failed.';
grant execute on function snapbase.approve_change(bigint) to :ROLE_VIEWER;


CREATE OR REPLACE FUNCTION snapbase_private.tg__preview_capture()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET "DateStyle" TO 'ISO, YMD'
 SET "IntervalStyle" TO 'postgres'
 SET "TimeZone" TO 'UTC'
 SET extra_float_digits TO '3'
 SET bytea_output TO 'hex'
AS $function$
declare
  capture_sql text;
begin
  foreach capture_sql in array snapbase_private.preview_capture_statements(tg_op, tg_relid) loop
    execute capture_sql;
  end loop;
  return null;
end;
$function$;



CREATE OR REPLACE FUNCTION snapbase_private.tg__track_changes()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET "DateStyle" TO 'ISO, YMD'
 SET "IntervalStyle" TO 'postgres'
 SET "TimeZone" TO 'UTC'
 SET extra_float_digits TO '3'
 SET bytea_output TO 'hex'
AS $function$
declare
  capture_sql text;
  mt_id bigint := tg_argv[0]::bigint;
  key_cols text[];
  key_row text;
  first_col text;
  seen bigint;
  big bigint;
  keys text[];
  lo text;
  hi text;
  lo2 text;
  hi2 text;
begin
  if tg_op = 'TRUNCATE' then
    insert into snapbase_private.table_changes (managed_table_id, everything) values (mt_id, 'TRUNCATE');
    return null;
  end if;
  -- preview_change on this table, in this transaction: the statement's rows too.
  if current_setting('snapbase.preview_relid', true) = tg_relid::text then
    foreach capture_sql in array snapbase_private.preview_capture_statements(tg_op, tg_relid) loop
      execute capture_sql;
    end loop;
  end if;
  key_cols := snapbase_private.primary_key(tg_relid);
  if key_cols is null then
    insert into snapbase_private.table_changes (managed_table_id, everything) values (mt_id, 'no primary key');
    return null;
  end if;
  key_row := (select string_agg(format('r.%I', c), ', ') from unnest(key_cols) c);
  -- Up to 10,000 rows: their keys. Old and new keys of an UPDATE differ only when it
  -- moves rows; the snapshot removes duplicates, so none are removed here.
  execute format('select count(*) from (select from %s limit 10001) x', case tg_op when 'DELETE' then 'old_rows' else 'new_rows' end)
    into seen;
  if seen = 0 then
    return null;
  elsif seen <= 10000 then
    execute format(case tg_op
      when 'INSERT' then 'select array_agg(row(%1$s)::text) from new_rows r'
      when 'DELETE' then 'select array_agg(row(%1$s)::text) from old_rows r'
      else 'select array_agg(k) from (select row(%1$s)::text as k from new_rows r union all select row(%1$s)::text from old_rows r) u'
    end, key_row) into keys;
    insert into snapbase_private.table_changes (managed_table_id, keys) values (mt_id, keys);
    return null;
  end if;
  -- A bigger statement: the range of its first key column, read in the same pass
  -- that finds whether it touched over a twentieth of the table (then re-read it
  -- all: the pass stops there, so a bulk statement reads little of its rows again).
  big := greatest(10000, (select c.reltuples from pg_class c where c.oid = tg_relid)::bigint / 20);
  first_col := format('r.%I', key_cols[1]);
  begin
    execute format('select count(*), min(k)::text, max(k)::text from (select %s as k from %s r limit %s) x',
                   first_col, case tg_op when 'DELETE' then 'old_rows' else 'new_rows' end, big + 1)
      into seen, lo, hi;
    if seen <= big and tg_op = 'UPDATE' then
      execute format('select min(%1$s)::text, max(%1$s)::text from old_rows r', first_col) into lo2, hi2;
    end if;
  exception when undefined_function then
    -- No min/max for the key's type (uuid, for one): re-read everything.
    insert into snapbase_private.table_changes (managed_table_id, everything)
      values (mt_id, format('a statement (%s) changed over 10000 rows and the key type has no min/max', tg_op));
    return null;
  end;
  if seen > big then
    insert into snapbase_private.table_changes (managed_table_id, everything)
      values (mt_id, format('a statement (%s) changed over %s rows', tg_op, big));
    return null;
  end if;
  insert into snapbase_private.table_changes (managed_table_id, range_lo, range_hi) values (mt_id, lo, hi);
  if lo2 is not null and (lo2, hi2) is distinct from (lo, hi) then
    insert into snapbase_private.table_changes (managed_table_id, range_lo, range_hi) values (mt_id, lo2, hi2);
  end if;
  return null;
end;
$function$;
comment on function snapbase_private.tg__track_changes() is 'Tracking trigger of managed tables (argument: the managed table id). Records the keys a statement changed so that the next snapshot rebuilds only their chunks. Writes only snapbase_private.table_changes, by appending.';


CREATE OR REPLACE FUNCTION snapbase.preview_change(change_id bigint, max_rows integer DEFAULT 100, offset_rows integer DEFAULT 0)
 RETURNS jsonb
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET client_min_messages TO 'warning'
 SET standard_conforming_strings TO 'on'
AS $function$
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
  seqs regclass[];
  seq_states jsonb[];
  draws boolean := false;
  capture_by_tracking boolean;
begin
  if max_rows not between 1 and 1000 or offset_rows < 0 then
    raise exception 'max_rows must be from 1 to 1000 and offset_rows at least 0' using errcode = '22023';
  end if;
  select * into cr from snapbase.change_requests c where c.id = change_id;
  select * into mt from snapbase.managed_tables m where m.id = cr.managed_table_id;
  -- Admins, and the submitter, who may read the table; anyone else: "no change request".
  -- A change submitted in psql has no submitter: NULL must not let anyone through.
  if cr.id is null or not coalesce(snapbase_private.can_read(mt), false)
     or not (snapbase.current_app_role() = 'admin' or coalesce(cr.submitted_by = snapbase.current_user_id(), false)) then
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
  -- The table's own sequences: values a preview draws are used up (sequences are not
  -- transactional), so they are put back afterwards; to do that safely the preview
  -- keeps the table's writers out while it runs. Other previews only take the lock
  -- their statement takes (ROW EXCLUSIVE, and the rows they touch).
  select coalesce(array_agg(d.objid::regclass order by d.objid), '{}') into seqs
    from pg_depend d join pg_class c on c.oid = d.objid
   where d.classid = 'pg_class'::regclass and d.refobjid = target and d.deptype in ('a', 'i') and c.relkind = 'S';
  begin
    probe := snapbase_private.check_change_sql(target, cr.sql, snapbase_private.submitter_roles(cr));
  exception when others then
    get stacked diagnostics err_code = returned_sqlstate, err_message = message_text;
  end;
  if err_code is null then
    -- INSERT and MERGE may draw (a column left to its default), an UPDATE through
    -- SET x = DEFAULT (still a node of its own in the tree) or nextval.
    draws := cardinality(seqs) > 0
             and (probe.command_type in (3, 5) or seqs::oid[] && probe.relations
                  or exists (select 1 from snapbase_private.node_fields(probe.tree) f where f.node_type = 'SETTODEFAULT'));
    -- Tracked tables capture the preview's rows in their tracking triggers; others
    -- get triggers of the preview's own, which CREATE TRIGGER's lock keeps writers from.
    capture_by_tracking := snapbase_private.tracking_problem(target, mt.id) is null;
    perform set_config('lock_timeout', '2s', true);
    begin
      execute format('lock table %s in %s mode', target,
                     case when draws or not capture_by_tracking then 'share row exclusive' else 'row exclusive' end);
    exception when lock_not_available then
      raise exception 'table % is busy (being approved or written in bulk); try the preview again', target using errcode = '55P03';
    end;
    perform set_config('lock_timeout', '0', true);
    if draws then
      seq_states := array(select snapbase_private.sequence_state(x) from unnest(seqs) x);
    end if;
    begin
      create temporary table if not exists snapbase_preview_rows (side text not null, "row" jsonb not null, texts jsonb not null) on commit drop;
      if capture_by_tracking then
        perform set_config('snapbase.preview_relid', target::oid::text, true);
      else
        execute format('create trigger snapbase_preview_insert after insert on %s referencing new table as new_rows for each statement execute function snapbase_private.tg__preview_capture()', target);
        execute format('create trigger snapbase_preview_update after update on %s referencing old table as old_rows new table as new_rows for each statement execute function snapbase_private.tg__preview_capture()', target);
        execute format('create trigger snapbase_preview_delete after delete on %s referencing old table as old_rows for each statement execute function snapbase_private.tg__preview_capture()', target);
      end if;
      affected := snapbase_private.execute_change(target, cr.sql, probe, snapbase_private.submitter_roles(cr));
      -- Rows by key; a key written several times keeps its first before and last after.
      -- Values compare by their text, as snapshot_diff does (1.0 and 1.00 differ).
      with keyed as (
        select side, "row", texts, (select jsonb_object_agg(k, "row" -> k) from unnest(pk) k) as key,
               row_number() over () as n
          from pg_temp.snapbase_preview_rows
      ), befores as (
        select distinct on (key) key, "row", texts from keyed where side = 'before' order by key, n
      ), afters as (
        select distinct on (key) key, "row", texts from keyed where side = 'after' order by key, n desc
      ), changes as (
        select case when b.key is null then 'added' when a.key is null then 'removed' else 'changed' end as change,
               coalesce(a.key, b.key) as key,
               case when a.key is not null and b.key is not null then
                 array(select f from jsonb_object_keys(a.texts || b.texts) f
                        where (b.texts -> f) is distinct from (a.texts -> f) and f <> all (hidden) order by f) end as changed_fields,
               b."row" - hidden as before, a."row" - hidden as after,
               -- Every column written (hidden ones included), for the sensitive-column warning.
               array(select f from jsonb_object_keys(coalesce(a.texts, '{}') || coalesce(b.texts, '{}')) f
                      where (b.texts -> f) is distinct from (a.texts -> f)) as all_changed
          from befores b full join afters a on a.key = b.key
         where b.texts is distinct from a.texts
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
      when others then
        get stacked diagnostics err_code = returned_sqlstate, err_message = message_text;
        diff := null;
    end;
    -- Rolled back, but what it drew from sequences is not: put them back (writers of
    -- the table were kept out, so nobody else drew meanwhile).
    if draws then
      for i in 1 .. cardinality(seqs) loop
        if not snapbase_private.restore_sequence_state(seqs[i], seq_states[i]) then
          warnings := warnings || jsonb_build_object('code', 'sequence_values_used', 'message',
            format('this preview used up values of sequence %s, which Snapbase''s owner may not set back (GRANT UPDATE ON SEQUENCE %s TO %I)',
                   seqs[i], seqs[i], current_user));
        end if;
      end loop;
    end if;
  end if;
  if diff is null then
    -- The change ran with its submitter's column rights: its error is theirs to see.
    if not coalesce(cr.submitted_by = snapbase.current_user_id(), false) then
      err_message := snapbase_private.failure_message_for_readers(target, err_code, err_message);
    end if;
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
$function$;
comment on function snapbase.preview_change(bigint,integer,integer) is 'What a pending change would do, without doing it: rows affected, a paged before/after diff (snapshot_diff''s shape, only columns you may read) and warnings. Admins, and the submitter.';
grant execute on function snapbase.preview_change(bigint,integer,integer) to :ROLE_VIEWER;

