--! Previous: sha1:d80535d237b019814e7be8f49cd6debbe59481d4
--! Hash: sha1:e54ad74c7d863fb73c0d01ab04c11c8604750e15
--! Message: Fourth review: MERGE columns and failed-change messages, previews that change nothing, exact snapshots under more catalog changes, working copies of enum and domain columns, read-scoped tokens, organization removal, audit visibility, sign-in races

--! split: 001-current.sql
-- Work in progress: one file per topic (NNN-topic.sql), applied in number order.

--! split: 002-change-sql-review.sql
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

--! split: 003-snapshot-exactness.sql
-- Fourth review, snapshots:
-- * Changes are recorded under the primary key of their moment: a key moved to other
--   columns and back went unnoticed, and the next snapshot missed rows. The tracking
--   fingerprint now holds the primary key's index.
-- * Catalog changes that alter the text of unchanged rows: a composite type's new
--   attribute (fingerprint), and names printed by reg* columns (never tracked).
-- * snapshot_diff and row_history compared rows as jsonb, which calls 1.0 and 1.00,
--   -0 and 0, JSON null and SQL NULL equal; they compare values' texts now. A restore
--   also puts back a key's own text (1.00 to 1).

create or replace function snapbase_private.column_types(target regclass)
 returns setof oid
 language sql
 stable
 set search_path to 'pg_catalog'
as $function$
  with recursive ty(oid) as (
    select a.atttypid from pg_attribute a where a.attrelid = target and a.attnum > 0 and not a.attisdropped
    union
    select n.x from ty join pg_type t on t.oid = ty.oid
      cross join lateral (
        select t.typbasetype union all select t.typelem
        union all select a2.atttypid from pg_attribute a2 where t.typrelid <> 0 and a2.attrelid = t.typrelid and a2.attnum > 0 and not a2.attisdropped
        union all select r.rngsubtype from pg_range r where r.rngtypid = t.oid
      ) n(x)
     where n.x <> 0
  )
  select oid from ty
$function$;
comment on function snapbase_private.column_types(regclass) is 'Every type a table''s values are made of: its columns'' types and, recursively, their domains'' base types, array elements, composite attributes and range subtypes.';

CREATE OR REPLACE FUNCTION snapbase_private.tracking_fingerprint(target regclass, text_form boolean)
 RETURNS text
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog'
AS $function$
  select concat_ws('|',
    (select c.relfilenode::text from pg_class c where c.oid = target),
    -- Every attribute, dropped ones too: a column dropped and added again (same name
    -- and type, so the same layout, and no rewrite) is a new attribute whose values
    -- come from its default, not from any statement. Also a column's collation, which
    -- can change without a rewrite, and with it the key order.
    (select string_agg(format('%s:%s:%s:%s', a.attnum, a.atttypid, a.atttypmod, a.attcollation), ',' order by a.attnum)
       from pg_attribute a where a.attrelid = target and a.attnum > 0),
    (select string_agg(format('%s:%s:%s:%s', t.oid, t.xmin, t.tgenabled, t.tgname), ',' order by t.tgname)
       from pg_trigger t where t.tgrelid = target and t.tgfoid = 'snapbase_private.tg__track_changes()'::regprocedure),
    -- The primary key's index: changes are recorded under the key of their moment, so
    -- a key dropped and made again (on other columns, and back) breaks the record.
    (select format('pk %s:%s', i.indexrelid, i.indkey) from pg_index i where i.indrelid = target and i.indisprimary),
    case when text_form then (
      -- A composite type's attributes too: ALTER TYPE … ADD ATTRIBUTE changes the text
      -- of every stored value of it without writing the table.
      select string_agg(format('%s:%s:%s:%s:%s', t.oid, t.xmin, p.xmin,
                               (select string_agg(e.oid::text || ':' || e.xmin::text, ',' order by e.oid) from pg_enum e where e.enumtypid = t.oid),
                               (select string_agg(format('%s.%s.%s.%s', a.attnum, a.atttypid, a.atttypmod, a.attisdropped), ',' order by a.attnum)
                                  from pg_attribute a where t.typrelid <> 0 and a.attrelid = t.typrelid and a.attnum > 0)),
                        ';' order by t.oid)
        from snapbase_private.column_types(target) ty(oid) join pg_type t on t.oid = ty.oid left join pg_proc p on p.oid = t.typoutput
       where t.typnamespace <> 'pg_catalog'::regnamespace
    ) end)
$function$;
comment on function snapbase_private.tracking_fingerprint(regclass,boolean) is 'The catalog state under which recorded changes are complete; compared between consecutive snapshots (any difference: a full capture): the storage (relfilenode), every attribute with its number, type and collation (dropped ones too, so DROP COLUMN and ADD COLUMN change it), the tracking triggers'' catalog rows, the primary key''s index, and for text-form layouts the user-defined types (enum labels and composite attributes included). GRANTs, ANALYZE and SET DEFAULT do not change it.';


CREATE OR REPLACE FUNCTION snapbase_private.tracking_problem(target regclass, mt_id bigint)
 RETURNS text
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'pg_catalog'
 SET standard_conforming_strings TO 'on'
AS $function$
declare
  rel record;
  armed integer;
begin
  select c.relkind, c.relispartition, c.relpersistence, c.relrowsecurity, c.relforcerowsecurity, c.relowner
    into rel from pg_class c where c.oid = target;
  if rel.relkind <> 'r' then
    return 'a partitioned table is not tracked';
  elsif rel.relispartition then
    return 'a partition is not tracked (writes through its parent do not fire its triggers)';
  elsif rel.relpersistence = 'u' then
    return 'an unlogged table is not tracked (crash recovery empties it without triggers)';
  elsif exists (select 1 from pg_inherits i where i.inhparent = target) then
    return 'the table has inheritance children, whose rows it shows and whose writes it does not see';
  elsif exists (select 1 from pg_inherits i where i.inhrelid = target) then
    return 'the table inherits from another, and statements on the parent write it without firing its triggers';
  elsif rel.relrowsecurity and (rel.relforcerowsecurity or not pg_has_role(current_user, rel.relowner, 'USAGE'))
        and not (select r.rolsuper or r.rolbypassrls from pg_roles r where r.rolname = current_user) then
    return 'row-level security applies to the snapshot reader, so policies could change what it sees';
  elsif exists (select 1 from pg_subscription_rel s where s.srrelid = target) then
    return 'logical replication writes into the table without firing statement triggers';
  elsif exists (
      select 1 from snapbase_private.column_types(target) ty(oid) join pg_type t on t.oid = ty.oid
       where t.typnamespace = 'pg_catalog'::regnamespace and t.typname ~ '^reg' and t.typcategory <> 'A') then
    -- regclass and its siblings print names, which change (RENAME, search_path) without the table being written.
    return 'a column of a reg* type (regclass, regtype, …) shows object names, which change without the table being written';
  end if;
  -- Four statement triggers that record, ENABLE ALWAYS.
  select count(*) into armed
    from pg_trigger t
   where t.tgrelid = target
     and t.tgfoid = 'snapbase_private.tg__track_changes()'::regprocedure
     and t.tgenabled = 'A'
     and t.tgnargs = 1 and encode(t.tgargs, 'escape') = mt_id::text || '\000'
     and (t.tgname, t.tgtype) in (('_900_snapbase_track_insert'::name, 4::int2), ('_900_snapbase_track_update'::name, 16::int2),
                                  ('_900_snapbase_track_delete'::name, 8::int2), ('_900_snapbase_track_truncate'::name, 32::int2));
  if armed < 4 then
    return 'the tracking triggers are missing, disabled or not ENABLE ALWAYS (snapbase.register_table re-arms them)';
  end if;
  -- And one ROW trigger with a transition table that never fires (disabled, WHEN
  -- (false)) but makes PostgreSQL refuse to make the table an inheritance child or a
  -- partition, whose parent's statements would write it without firing the four; a
  -- table detached again before the next snapshot would look untouched. Enabled it
  -- would still guard, at a cost to every DELETE: only the armed form counts.
  if not exists (
       select 1 from pg_trigger t
        where t.tgrelid = target
          and t.tgname = '_900_snapbase_track_no_inheritance'
          and t.tgfoid = 'snapbase_private.tg__track_changes()'::regprocedure
          and t.tgenabled = 'D'
          and t.tgtype = 9::int2  -- ROW, AFTER DELETE
          and t.tgoldtable is not null
          and t.tgnargs = 1 and encode(t.tgargs, 'escape') = mt_id::text || '\000') then
    return 'the tracking triggers are missing the disabled _900_snapbase_track_no_inheritance, which keeps the table from becoming an inheritance child or a partition (snapbase.register_table re-arms it)';
  end if;
  return null;
end;
$function$;
comment on function snapbase_private.tracking_problem(regclass,bigint) is 'Null when the managed table''s changes are tracked, else why not. Tables whose rows can change without a statement trigger firing on them (partitions, inheritance parents and children, unlogged tables, subscribers) or whose visible rows depend on policies are never tracked; a tracked table''s fifth trigger (_900_snapbase_track_no_inheritance) keeps it from becoming an inheritance child or a partition between two snapshots.';


CREATE OR REPLACE FUNCTION snapbase.snapshot_diff(from_id bigint, to_id bigint)
 RETURNS SETOF snapbase.snapshot_diff_row
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET "DateStyle" TO 'ISO, YMD'
 SET "IntervalStyle" TO 'postgres'
 SET "TimeZone" TO 'UTC'
 SET extra_float_digits TO '3'
 SET bytea_output TO 'hex'
AS $function$
declare
  a snapbase.snapshots := snapbase_private.readable_snapshot(from_id);
  b snapbase.snapshots := snapbase_private.readable_snapshot(to_id);
  key_cols text[];
  hidden text[];
begin
  if a.managed_table_id <> b.managed_table_id then
    raise exception 'snapshots % and % are of different tables (% and %)', from_id, to_id, a.table_name, b.table_name
      using errcode = '22023';
  end if;
  key_cols := coalesce(b.primary_key, a.primary_key);
  if key_cols is null or key_cols is distinct from a.primary_key then
    raise exception 'diff needs the same primary key in both snapshots' using errcode = '42P10';
  end if;
  hidden := snapbase_private.hidden_columns(b) || snapbase_private.hidden_columns(a);
  -- Rows and fields compare by their values' text (t): jsonb (j, what is shown)
  -- calls 1.0 and 1.00, -0 and 0, JSON null and SQL NULL equal.
  -- Pages both snapshots share hold identical chunks, and chunks both hold identical
  -- rows: only chunks of pages they do not share, and then not in the other, are decoded.
  return query execute format($q$
    with pa as (select unnest(t.page_ids) as id from snapbase_private.snapshot_trees t where t.snapshot_id = $1),
         pb as (select unnest(t.page_ids) as id from snapbase_private.snapshot_trees t where t.snapshot_id = $2),
         ea as materialized (
           select coalesce(v.chunk_id, -1) as cid, coalesce(v.chunk_hash, '\x') as chash
             from snapbase_private.snapshot_pages p cross join lateral unnest(p.chunk_ids, p.chunk_hashes) as v(chunk_id, chunk_hash)
            where p.id in (select id from pa except select id from pb)),
         eb as materialized (
           select coalesce(v.chunk_id, -1) as cid, coalesce(v.chunk_hash, '\x') as chash
             from snapbase_private.snapshot_pages p cross join lateral unnest(p.chunk_ids, p.chunk_hashes) as v(chunk_id, chunk_hash)
            where p.id in (select id from pb except select id from pa)),
         only_a as (
           select to_jsonb(r.rec) - $4 as j, %3$s - $4 as t
             from %1$s c cross join lateral (select unnest(c.rows) as rec) r
            where c.snapshot_id = $1
              and exists (select 1 from ea where ea.cid = coalesce(c.chunk_id, -1) and ea.chash = coalesce(c.chunk_hash, '\x'))
              and not exists (select 1 from eb where eb.cid = coalesce(c.chunk_id, -1) and eb.chash = coalesce(c.chunk_hash, '\x'))),
         only_b as (
           select to_jsonb(r.rec) - $4 as j, %4$s - $4 as t
             from %2$s c cross join lateral (select unnest(c.rows) as rec) r
            where c.snapshot_id = $2
              and exists (select 1 from eb where eb.cid = coalesce(c.chunk_id, -1) and eb.chash = coalesce(c.chunk_hash, '\x'))
              and not exists (select 1 from ea where ea.cid = coalesce(c.chunk_id, -1) and ea.chash = coalesce(c.chunk_hash, '\x'))),
         keyed_a as (
           select (select jsonb_object_agg(k, j -> k) from unnest($3::text[]) k) as key, j, t from only_a
         ), keyed_b as (
           select (select jsonb_object_agg(k, j -> k) from unnest($3::text[]) k) as key, j, t from only_b
         )
    select case when ka.key is null then 'added' when kb.key is null then 'removed' else 'changed' end,
           coalesce(kb.key, ka.key),
           case when ka.key is not null and kb.key is not null then
             array(select f from (select jsonb_object_keys(ka.t || kb.t) as f) fs
                    where (ka.t -> f) is distinct from (kb.t -> f) order by f)
           end,
           ka.j, kb.j
      from keyed_a ka full join keyed_b kb on ka.key = kb.key
     where ka.t is distinct from kb.t
     order by coalesce(kb.key, ka.key)
  $q$, snapbase_private.snapshot_chunk_source(a), snapbase_private.snapshot_chunk_source(b),
    snapbase_private.row_texts_sql(snapbase_private.layout_relid(a.layout_id), 'r.rec'),
    snapbase_private.row_texts_sql(snapbase_private.layout_relid(b.layout_id), 'r.rec'))
  using a.id, b.id, key_cols, hidden;
end;
$function$;
comment on function snapbase.snapshot_diff(bigint,bigint) is 'Rows added, removed and changed (with the changed fields) between two snapshots of one table, by primary key.';
grant execute on function snapbase.snapshot_diff(bigint,bigint) to :ROLE_VIEWER;


CREATE OR REPLACE FUNCTION snapbase.row_history(target regclass, key jsonb)
 RETURNS TABLE(snapshot_id bigint, created_at timestamp with time zone, change_request_id bigint, change text, changed_fields text[], "row" jsonb)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET "DateStyle" TO 'ISO, YMD'
 SET "IntervalStyle" TO 'postgres'
 SET "TimeZone" TO 'UTC'
 SET extra_float_digits TO '3'
 SET bytea_output TO 'hex'
AS $function$
#variable_conflict use_column
declare
  mt snapbase.managed_tables := snapbase_private.readable_managed_table(target);
  newest snapbase.snapshots;
  s snapbase.snapshots;
  tree snapbase_private.snapshot_trees;
  key_types jsonb := '{}';
  kt text;
  layout_type text;
  chunk_table text;
  bad text;
  found record;
  chunk_identity text;
  last_identity text;
  raw jsonb;
  raw_texts jsonb;
  visible jsonb;
  previous jsonb;
  previous_texts jsonb;
  previous_visible jsonb;
  older boolean := false;
  out_ids bigint[] := '{}';
  out_at timestamptz[] := '{}';
  out_cr bigint[] := '{}';
  out_change text[] := '{}';
  out_fields text[] := '{}';
  out_rows jsonb[] := '{}';
  out_texts jsonb[] := '{}';
  n integer := 0;
begin
  select * into newest from snapbase.snapshots x where x.managed_table_id = mt.id order by x.id desc limit 1;
  if newest.id is null then
    return;
  end if;
  perform snapbase_private.readable_snapshot(newest.id);
  if newest.primary_key is null then
    raise exception 'row history needs a primary key; % has none', mt.qualified_name using errcode = '42P10';
  end if;
  if jsonb_typeof(key) is distinct from 'object' then
    raise exception 'the key must be a JSON object of the primary key columns (%)', array_to_string(newest.primary_key, ', ')
      using errcode = '22023';
  end if;
  select string_agg(k, ', ') into bad from jsonb_object_keys(key) k where k <> all (newest.primary_key);
  if bad is null then
    select string_agg(c, ', ') into bad from unnest(newest.primary_key) c where key -> c is null or key -> c = 'null';
    if bad is not null then
      raise exception 'the key must give every primary key column of %: % missing', mt.qualified_name, bad using errcode = '22023';
    end if;
  else
    raise exception 'the key names columns that are not the primary key of % (%): %', mt.qualified_name,
      array_to_string(newest.primary_key, ', '), bad using errcode = '22023';
  end if;

  -- Oldest first, so that each snapshot is compared with the one before it.
  for s in select * from snapbase.snapshots x where x.managed_table_id = mt.id order by x.id loop
    raw := null;
    raw_texts := null;
    chunk_identity := null;
    if s.primary_key is not distinct from newest.primary_key then
      select * into tree from snapbase_private.snapshot_trees t where t.snapshot_id = s.id;
      -- The key's composite type the snapshot's boundaries parse into (made by
      -- capture; only snapshots from before trees need one made here).
      kt := coalesce(tree.key_type, key_types ->> s.layout_id::text);
      if kt is null then
        kt := (snapbase_private.ensure_layout((select jsonb_agg(c order by array_position(s.primary_key, c ->> 'name'))
                                                  from jsonb_array_elements(s.columns) c where (c ->> 'name') = any (s.primary_key)))).type_name;
        key_types := key_types || jsonb_build_object(s.layout_id::text, kt);
      end if;
      select l.type_name, l.chunk_table into layout_type, chunk_table from snapbase_private.row_layouts l where l.id = s.layout_id;
      -- The one chunk whose key range holds the key: its page by the pages' first
      -- keys, then the chunk by the page's chunk boundaries.
      execute format($q$
        with k as (select jsonb_populate_record(null::%1$s, $2) as k),
             p as (select coalesce(max(u.ord) filter (where u.b::%1$s <= k.k), 1) as ord
                     from k, unnest($1::text[]) with ordinality as u(b, ord)),
             pg as (select pg.* from p join snapbase_private.snapshot_pages pg on pg.id = ($3::bigint[])[p.ord]),
             c as (select coalesce(max(w.ord) filter (where w.b::%1$s <= k.k), 1) as ord
                     from k, pg, unnest(pg.bounds) with ordinality as w(b, ord))
        select pg.chunk_ids[c.ord] as chunk_id, pg.chunk_hashes[c.ord] as chunk_hash,
               (select every(x is not null) from unnest(pg.bounds) x) as bounded
          from pg, c
      $q$, kt) into found using tree.page_bounds, key, tree.page_ids;
      -- (A record IS NOT NULL only when every field is: test a field.)
      if found.bounded then
        chunk_identity := coalesce(found.chunk_id::text, encode(found.chunk_hash, 'hex'));
        if chunk_identity = last_identity then
          raw := previous;  -- the same chunk as the snapshot before: the same row
          raw_texts := previous_texts;
        else
          execute format($q$
            select to_jsonb(r.rec), %5$s from %1$s c cross join lateral (select unnest(c.rows) as rec) r
             where %2$s and (%3$s) = (%4$s)
          $q$,
            case when chunk_table is not null and found.chunk_id is not null
                 then format('%s', chunk_table) else format('(select hash, rows::%s[] as rows from snapbase_private.chunk_store)', layout_type) end,
            case when found.chunk_id is not null then 'c.id = $1' else 'c.hash = $2' end,
            (select string_agg(format('(r.rec).%I', c), ', ') from unnest(s.primary_key) c),
            (select string_agg(format('(jsonb_populate_record(null::%s, $3)).%I', kt, c), ', ') from unnest(s.primary_key) c),
            snapbase_private.row_texts_sql(snapbase_private.layout_relid(s.layout_id), 'r.rec'))
            into raw, raw_texts using found.chunk_id, found.chunk_hash, key;
        end if;
      elsif found.bounded is not null then
        -- A snapshot from before trees kept no text-chunk boundaries: read it all.
        execute format($q$
          select to_jsonb(r.rec), %4$s from %1$s c cross join lateral (select unnest(c.rows) as rec) r
           where c.snapshot_id = $1 and (%2$s) = (%3$s)
        $q$, snapbase_private.snapshot_chunk_source(s),
          (select string_agg(format('(r.rec).%I', c), ', ') from unnest(s.primary_key) c),
          (select string_agg(format('(jsonb_populate_record(null::%s, $2)).%I', kt, c), ', ') from unnest(s.primary_key) c),
          snapbase_private.row_texts_sql(snapbase_private.layout_relid(s.layout_id), 'r.rec'))
          into raw, raw_texts using s.id, key;
      end if;
      -- (found is all nulls for a tree without pages, an empty table: no chunk, no row.)
    end if;
    -- The chunk this snapshot's row came from, or null when it came from none (an
    -- empty table, another primary key, a snapshot from before trees): only the very
    -- next snapshot may take the row over from it, never one after a gap.
    last_identity := chunk_identity;
    -- Compared as the caller sees them, and by their values' text, as snapshot_diff
    -- does: a change in a column the caller may not read is no change.
    visible := raw_texts - snapbase_private.hidden_columns(s);
    if raw is not null or previous is not null then
      n := n + 1;
      out_ids[n] := s.id;
      out_at[n] := s.created_at;
      out_cr[n] := s.change_request_id;
      out_rows[n] := raw - snapbase_private.hidden_columns(s);
      out_texts[n] := visible;
      out_change[n] := case when raw is null then 'removed'
                            when previous is null then case when older then 'added' else 'initial' end
                            when visible = previous_visible then 'unchanged'
                            else 'changed' end;
    end if;
    previous := raw;
    previous_texts := raw_texts;
    previous_visible := visible;
    older := true;
  end loop;

  return query
    select u.id, u.at, u.cr, u.change,
           case when u.change = 'changed' then
             array(select f from (select jsonb_object_keys(coalesce(u.before_texts, '{}') || u.texts) as f) fs
                    where (u.before_texts -> f) is distinct from (u.texts -> f) order by f)
           end,
           u.r
      from (select x.*, lag(x.texts) over (order by x.ord) as before_texts
              from unnest(out_ids, out_at, out_cr, out_change, out_rows, out_texts) with ordinality as x(id, at, cr, change, r, texts, ord)) u
     order by u.ord desc;
end;
$function$;
comment on function snapbase.row_history(regclass,jsonb) is 'One row''s values across the table''s snapshots, newest first: initial (in the oldest snapshot), added, changed (with the fields), unchanged or removed, with the change request that took each snapshot. Rows are compared as the caller sees them: a change only in columns the caller may not read is unchanged. Reads only the chunk holding the key in each snapshot. Needs the right to read the live table.';
grant execute on function snapbase.row_history(regclass,jsonb) to :ROLE_VIEWER;


CREATE OR REPLACE FUNCTION snapbase_private.apply_restore(snapshot_id bigint, target regclass, keys jsonb DEFAULT NULL::jsonb)
 RETURNS bigint
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
 SET "DateStyle" TO 'ISO, YMD'
 SET "IntervalStyle" TO 'postgres'
 SET "TimeZone" TO 'UTC'
 SET extra_float_digits TO '3'
 SET bytea_output TO 'hex'
 SET client_min_messages TO 'warning'
AS $function$
declare
  snap snapbase.snapshots;
  layout text;
  pk text[];
  shared text[];      -- columns both the snapshot and the table have, in table order
  writable text[];    -- of those, the ones not generated
  settable text[];    -- of those, the ones an UPDATE may set (not identity always; keys too: 1.00 is
                      -- the key 1, but not its value)
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
  key_in_t text := 'true';  -- for a partial restore: the row of t has one of the keys
begin
  select * into snap from snapbase.snapshots s where s.id = snapshot_id;
  perform snapbase_private.restore_fit(snap, target);
  layout := snapbase_private.layout_type(snap.layout_id);
  pk := snap.primary_key;
  select coalesce(array_agg(c.name order by c.ord) filter (where true), '{}'),
         coalesce(array_agg(c.name order by c.ord) filter (where not c.generated), '{}'),
         coalesce(array_agg(c.name order by c.ord) filter (where not c.generated and not c.identity_always), '{}'),
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
  -- A partial restore: only the rows with these keys, in the snapshot and in the table.
  if keys is not null then
    key_in_t := format('exists (select 1 from jsonb_array_elements(%L::jsonb) __sb_k where %s)', keys,
      (select string_agg(format('t.%1$I = (__sb_k ->> %1$L)::%2$s%3$s', a.attname, format_type(a.atttypid, a.atttypmod),
                                snapbase_private.collate_clause(a.attcollation)), ' and ')
         from unnest(pk) k join pg_attribute a on a.attrelid = target and a.attname = k));
    execute format('delete from pg_temp.snapbase_restore_source t where not %s', key_in_t);
  end if;
  execute 'analyze pg_temp.snapbase_restore_source';

  row_t := format('row(%s)::text', (select string_agg(format('t.%I', c), ', ') from unnest(shared) c));
  if pk is not null then
    -- Keys compare under the table's collations (the copy's columns have the default one).
    key_match := (select string_agg(format('t.%1$I = s.%1$I%2$s', a.attname, snapbase_private.collate_clause(a.attcollation)), ' and ')
                    from unnest(pk) k join pg_attribute a on a.attrelid = target and a.attname = k);
    -- Rows the snapshot lacks, and rows whose non-key identity value cannot be updated back.
    execute format('delete from %s t where %s and not exists (select 1 from pg_temp.snapbase_restore_source s where %s%s)',
      target, key_in_t, key_match,
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
$function$;
comment on function snapbase_private.apply_restore(bigint,regclass,jsonb) is 'Puts a managed table back to a snapshot with the fewest row operations (by primary key, or by whole rows counting duplicates), or only the rows with the given keys; runs as the owner inside approve_change.';

--! split: 004-copy-managed-table-types.sql
-- copy_managed_table_to_workbook refused every managed table with an enum or a domain
-- column (the workbook's column spec takes only built-in types): it now maps columns
-- as the postgres connector does.

create or replace function snapbase_private.workbook_column_types(rel regclass)
 returns table(attnum smallint, name text, source_type text, workbook_type text)
 language sql
 stable
 set search_path to 'pg_catalog'
as $function$
  with recursive base as (
    select a.attnum, a.atttypid as typid, a.atttypmod as typmod
      from pg_attribute a where a.attrelid = rel and a.attnum > 0 and not a.attisdropped
    union all
    select b.attnum, t.typbasetype, t.typtypmod from base b join pg_type t on t.oid = b.typid where t.typtype = 'd'
  )
  select a.attnum, a.attname::text, format_type(a.atttypid, a.atttypmod),
         case when coalesce(e.typtype, t.typtype) = 'c' then 'jsonb'
              when t.typnamespace = 'pg_catalog'::regnamespace and t.typtype in ('b', 'r', 'm') and t.typname !~ '^_?reg'
                then format_type(b.typid, b.typmod)
              when e.oid is not null then 'text[]'
              else 'text' end
    from base b
    join pg_type t on t.oid = b.typid and t.typtype <> 'd'
    join pg_attribute a on a.attrelid = rel and a.attnum = b.attnum
    left join pg_type e on e.oid = t.typelem and t.typcategory = 'A'
$function$;
comment on function snapbase_private.workbook_column_types(regclass) is 'Each column of a table with the type a workbook copy of it has, as the postgres connector maps them: built-in scalar, range and array types as they are (domains as their base type), composites (and their arrays) as jsonb, everything else (enums, extension types, reg*) as text or text[].';

CREATE OR REPLACE FUNCTION snapbase.copy_managed_table_to_workbook(workbook_id bigint, managed_table text, name text DEFAULT NULL::text)
 RETURNS snapbase.workbook_tables
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'edit');
  mt snapbase.managed_tables := snapbase.resolve_managed_table(managed_table);
  rel regclass := snapbase_private.relation_of(mt);
  pk text[] := snapbase_private.primary_key(rel);
  cols jsonb;
  col_list text;
  col_values text;
  t snapbase.workbook_tables;
  copied bigint;
begin
  if not has_table_privilege(snapbase_private.caller_role(), rel, 'SELECT') then
    raise exception 'you may not read %', mt.qualified_name using errcode = '42501';
  end if;
  if cardinality(pk) is distinct from 1 then
    raise exception '% needs a single-column primary key to be copied into a workbook', mt.qualified_name using errcode = '22023';
  end if;
  -- Only the columns the caller may read are copied (column privileges hold here too),
  -- each as a type a workbook holds (as the postgres connector maps them): domains
  -- as their base type, composites as jsonb, enums and other non-built-in types as text.
  select jsonb_agg(jsonb_build_object('name', w.name, 'type', w.workbook_type, 'read_only', w.name = pk[1]) order by w.attnum),
         string_agg(format('%I', w.name), ', ' order by w.attnum),
         string_agg(case w.workbook_type
                      when 'jsonb' then case when w.workbook_type = w.source_type then format('__sb_s.%I', w.name) else format('to_jsonb(__sb_s.%I)', w.name) end
                      else format('__sb_s.%I::%s', w.name, w.workbook_type) end, ', ' order by w.attnum)
    into cols, col_list, col_values
    from snapbase_private.workbook_column_types(rel) w
   where has_column_privilege(snapbase_private.caller_role(), rel, w.attnum, 'SELECT');
  if not cols @> jsonb_build_array(jsonb_build_object('name', pk[1])) then
    raise exception 'you may not read the primary key % of %', pk[1], mt.qualified_name using errcode = '42501';
  end if;
  t := snapbase_private.create_workbook_table(wb, coalesce(name, mt.table_name), cols, pk[1], null,
         jsonb_build_object('kind', 'managed_table', 'table', mt.qualified_name, 'managed_table_id', mt.id));
  execute format('insert into %s (%s, __remote_id, __last_seen) select __sb_seen.*, __sb_s.%I::text, to_jsonb(__sb_seen.*) from %s __sb_s, lateral (select %s) __sb_seen',
    snapbase_private.table_rel(t), col_list, pk[1], rel, col_values);
  get diagnostics copied = row_count;
  perform snapbase_private.audit_workbook('copy_managed_table', wb.id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('source', mt.qualified_name, 'records', copied));
  return t;
end;
$function$;
comment on function snapbase.copy_managed_table_to_workbook(bigint,text,text) is 'Add a working copy of a managed table you may read.';
grant execute on function snapbase.copy_managed_table_to_workbook(bigint,text,text) to :ROLE_VIEWER;

--! split: 007-auth-review.sql
-- Auth review fixes.

-- 1. A read-scoped API token could write. Its role is viewer, but workbook access
-- (owner, editor) and organization ownership came from ownership and membership
-- alone, and account-level functions (connector accounts, CSV files, workbooks and
-- organizations) checked nothing but the user. Now:
-- - workbook_access caps owner/editor at viewer for a token without the write scope,
--   so require_workbook, require_table and row-level security all see read access;
-- - require_write_scope() refuses a token without it; require_organization calls it for
--   owners' actions, and the two places every write passes through call it as a
--   backstop: snapbase_private.audit (every API function that changes something audits
--   it, in the same transaction) and snapbase_private.enqueue_job.

create or replace function snapbase_private.token_may_write() returns boolean
language sql stable
set search_path = pg_catalog
as $$
  select snapbase_private.current_token_id() is null
      or coalesce(string_to_array(nullif(current_setting('jwt.claims.scopes', true), ''), ',') && array['write', 'admin'], false)
$$;
comment on function snapbase_private.token_may_write() is
  'False when the caller acts through an API token without the write (or admin) scope; true for sessions, DBAs and the worker. Never NULL.';
grant execute on function snapbase_private.token_may_write() to :ROLE_VIEWER;
grant execute on function snapbase_private.token_may_write() to :ROLE_AGENT;

create or replace function snapbase_private.require_write_scope() returns void
language plpgsql stable
set search_path = pg_catalog
as $$
begin
  -- Agents write suggestions only, and workbook_access already limits them to that.
  if snapbase.current_app_role() is distinct from 'agent' and not snapbase_private.token_may_write() then
    raise exception 'this API token has read access only: it cannot change anything (use a token with the write scope)'
      using errcode = '42501';
  end if;
end;
$$;
comment on function snapbase_private.require_write_scope() is
  'Raises 42501 when the caller acts through an API token without the write scope (agents excepted: their own rules apply). Called by audit and enqueue_job, which every write passes through.';
grant execute on function snapbase_private.require_write_scope() to :ROLE_VIEWER;
grant execute on function snapbase_private.require_write_scope() to :ROLE_AGENT;

CREATE OR REPLACE FUNCTION snapbase_private.workbook_access(workbook_id bigint)
 RETURNS text
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  select case
    when snapbase.current_user_id() is null then
      case when snapbase.current_app_role() = 'admin' then 'owner' end
    -- Owners, members and agents alike: only while the user belongs to the workbook's organization.
    when not exists (select 1 from snapbase.organization_members om
                      where om.organization_id = w.organization_id and om.user_id = snapbase.current_user_id()) then null
    when snapbase.current_app_role() = 'agent' then
      case when nullif(current_setting('jwt.claims.workbook_id', true), '')::bigint = w.id
             and (w.owner_id = snapbase.current_user_id()
                  or exists (select 1 from snapbase.workbook_members m
                              where m.workbook_id = w.id and m.user_id = snapbase.current_user_id() and m.access = 'editor'))
           then 'agent' end
    else (select case when a.access is not null and not snapbase_private.token_may_write() then 'viewer' else a.access end
            from (select case when w.owner_id = snapbase.current_user_id() then 'owner'
                              else (select m.access::text from snapbase.workbook_members m
                                     where m.workbook_id = w.id and m.user_id = snapbase.current_user_id()) end as access) a)
  end
  from snapbase.workbooks w where w.id = workbook_access.workbook_id
$function$;
comment on function snapbase_private.workbook_access(bigint) is 'The caller''s access to a workbook: owner, editor, viewer, agent, or NULL (none, or no such workbook). Only members of the workbook''s organization have any, its owner included. An API token without the write scope has viewer access at most. An agent token has access to its own workbook only while the user who made it may still edit it.';

CREATE OR REPLACE FUNCTION snapbase_private.require_organization(organization_id bigint, owner_action text)
 RETURNS snapbase.organizations
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
  if owner_action is not null then
    perform snapbase_private.require_write_scope();
  end if;
  if owner_action is not null and not m.is_owner then
    raise exception 'only an owner of organization % may %', organization_id, owner_action using errcode = '42501';
  end if;
  return o;
end;
$function$;
comment on function snapbase_private.require_organization(bigint,text) is 'The organization, when the caller is a member (and an owner, when owner_action says what for, through a token that may write); "no organization N" alike for a missing id and one the caller is not a member of.';

-- Every write is audited in its transaction: the backstop for read-scoped tokens.
-- Reads that are audited (a share link used, a change previewed) and the lockout
-- count stay allowed; so does signing out, which ends only the caller's own session.
CREATE OR REPLACE FUNCTION snapbase_private.audit(action text, subject_type text DEFAULT NULL::text, subject_id text DEFAULT NULL::text, table_name text DEFAULT NULL::text, details jsonb DEFAULT '{}'::jsonb)
 RETURNS bigint
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  select snapbase_private.require_write_scope()
   where action not in ('share_link_access', 'preview', 'sign_in_locked', 'sign_out');
  insert into snapbase.audit_log (action, actor, actor_user_id, actor_token_id, subject_type, subject_id, table_name, details)
  values (
    action,
    snapbase_private.actor_name(),
    snapbase.current_user_id(),
    snapbase_private.current_token_id(),
    subject_type, subject_id, table_name, coalesce(details, '{}')
  )
  returning id
$function$;

CREATE OR REPLACE FUNCTION snapbase_private.enqueue_job(j snapbase.jobs)
 RETURNS snapbase.jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  created snapbase.jobs;
begin
  perform snapbase_private.require_write_scope();
  begin
    insert into snapbase.jobs (kind, connector_account_id, workbook_id, table_id, options, created_by, current_table)
      values (j.kind, j.connector_account_id, j.workbook_id, j.table_id, coalesce(j.options, '{}'), snapbase.current_user_id(), j.current_table)
      returning * into created;
  exception when unique_violation then
    raise exception 'workbook table % already has a job queued or running', j.table_id using errcode = '55P03';
  end;
  perform graphile_worker.add_job(
    case when j.kind in ('test_connection', 'list_tables') then 'inspect_account' else j.kind::text end,
    json_build_object('job_id', created.id), job_key => 'snapbase_job_' || created.id, max_attempts => 5);
  return created;
end;
$function$;
comment on function snapbase_private.enqueue_job(snapbase.jobs) is 'Inserts the job and queues its graphile-worker task (job_key: one task per job); refuses an API token without the write scope.';

-- 3. visible_event(id) told an outsider which tenant an event belonged to: it called
-- visible_events for the event's topic, whose "no workbook 1" / "no connector account 1"
-- (or, for an agent, the role error of "changes") escaped, while a missing id gave NULL.
-- A topic the caller may not see now answers NULL, exactly as a missing id.
CREATE OR REPLACE FUNCTION snapbase.visible_event(event_id bigint)
 RETURNS jsonb
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  e snapbase_private.events;
  found jsonb;
begin
  select * into e from snapbase_private.events ev where ev.id = event_id;
  if e.id is null then
    return null;
  end if;
  begin
    select v into found from snapbase.visible_events(e.topic, e.id - 1, 1) v where (v ->> 'id')::bigint = e.id;
  exception when no_data_found or insufficient_privilege then
    -- The topic is not the caller's: the same answer as for an event that does not exist.
    return null;
  end;
  return found;
end;
$function$;
comment on function snapbase.visible_event(bigint) is 'One event, as visible_events would show it to you; NULL alike for a missing id, an event of a topic you may not see, and one you may not see within it.';

-- 4. A member removed from an organization kept owning the workbooks they had created
-- in it (workbook_access looked at owner_id alone), so they could still read and share
-- them and make agent tokens. workbook_access (above) now requires membership in the
-- workbook's organization; removing a member hands their workbooks there to the
-- remover (an owner), or, when they leave, to the organization's first owner, and
-- revokes their agent tokens for those workbooks, audited.
CREATE OR REPLACE FUNCTION snapbase.remove_organization_member(organization_id bigint, user_id bigint)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  -- Anyone may leave; removing someone else is for owners.
  o snapbase.organizations := snapbase_private.require_organization(organization_id,
         case when user_id is distinct from snapbase.current_user_id() then 'remove members' end);
  m snapbase.organization_members;
  heir bigint;
  handed bigint[];
  revoked bigint[];
begin
  perform snapbase_private.require_write_scope();
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
  -- The workbooks they own there go to the owner removing them, or (leaving, or a DBA
  -- removing them) to the organization's longest-standing other owner.
  heir := case when snapbase.current_user_id() is distinct from m.user_id
                and exists (select 1 from snapbase.organization_members om
                             where om.organization_id = o.id and om.user_id = snapbase.current_user_id() and om.is_owner)
               then snapbase.current_user_id() end;
  if heir is null then
    select om.user_id into heir from snapbase.organization_members om
     where om.organization_id = o.id and om.is_owner and om.user_id <> m.user_id
     order by om.joined_at, om.user_id limit 1;
  end if;
  with moved as (
    update snapbase.workbooks w set owner_id = heir
     where w.organization_id = o.id and w.owner_id = m.user_id
    returning w.id)
  select coalesce(array_agg(id order by id), '{}') into handed from moved;
  -- Their agent tokens for the organization's workbooks end now.
  with ended as (
    update snapbase.api_tokens t set revoked_at = now()
      from snapbase.workbooks w
     where w.id = t.workbook_id and w.organization_id = o.id and t.user_id = m.user_id and t.revoked_at is null
    returning t.id)
  select coalesce(array_agg(id order by id), '{}') into revoked from ended;
  delete from snapbase.organization_members om where om.organization_id = o.id and om.user_id = m.user_id;
  perform snapbase_private.audit('remove_organization_member', 'organization', o.id::text, null,
    jsonb_build_object('user_id', m.user_id, 'workbooks', to_jsonb(handed), 'new_owner_id', case when cardinality(handed) > 0 then heir end,
                       'revoked_agent_tokens', to_jsonb(revoked)));
  return true;
end;
$function$;
comment on function snapbase.remove_organization_member(bigint,bigint) is 'Leave an organization (your own user id), or remove a member (owners); their shares of its workbooks end too, the workbooks they own there go to the owner removing them (or, when they leave, to the organization''s first owner), and their agent tokens for its workbooks are revoked. An organization keeps at least one owner.';

-- 6. Sign-in lockout could be raced: concurrent wrong passwords for one account all read
-- "not locked" before any counted its failure (20 at once got 8 password checks with a
-- limit of 5). attempt_login now serializes attempts per account and per address with
-- transaction-level advisory locks (released when its transaction ends) before the check.
CREATE OR REPLACE FUNCTION snapbase_private.attempt_login(email text, password text, client_address inet)
 RETURNS snapbase_private.login_result
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
  -- One attempt at a time per account and per client address, until this transaction
  -- ends: concurrent attempts would all pass the lock check below before any of them
  -- counted its failure, and check more passwords than the limit allows. Always the
  -- account first, then the address, so two attempts never wait for each other in turn.
  perform pg_advisory_xact_lock(hashtext('snapbase_login_account'), hashtext(account_key));
  if address_key is not null then
    perform pg_advisory_xact_lock(hashtext('snapbase_login_address'), hashtext(address_key));
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
$function$;
comment on function snapbase_private.attempt_login(text,text,inet) is 'For the server (as the authenticator): one attempt at a time per account and per client address (transaction advisory locks), checks the lockouts, then the password; counts a failure per account and per address; on success opens a session. Never raises for wrong credentials, so the count is committed even when the caller reports the failure as an error.';

-- 7. An app admin who was not a member of an organization read its workbooks' cell
-- values in the audit log (update_record, create_record, suggestions, bulk edits and
-- imports record values). Entries about a workbook (details.workbook_id) are now shown
-- only to those with access to it; once the workbook is gone, to members of the
-- organization it belonged to (recorded in the entry from now on). A DBA sees all.
CREATE OR REPLACE FUNCTION snapbase_private.audit_workbook(action text, workbook_id bigint, subject_type text, subject_id text, table_name text, details jsonb DEFAULT '{}'::jsonb)
 RETURNS void
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  -- Agents act under their creator's user id; the entry says so.
  select snapbase_private.audit(action, subject_type, subject_id, table_name,
    coalesce(details, '{}') || jsonb_build_object('workbook_id', workbook_id)
      || coalesce((select jsonb_build_object('organization_id', w.organization_id) from snapbase.workbooks w where w.id = audit_workbook.workbook_id), '{}')
      || case when snapbase.current_app_role() = 'agent' then '{"agent": true}'::jsonb else '{}' end)
$function$;

create or replace function snapbase_private.audit_entry_visible(details jsonb) returns boolean
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
  select case
    when not (details ? 'workbook_id') or snapbase.current_user_id() is null then true
    when exists (select 1 from snapbase.workbooks w where w.id = (details ->> 'workbook_id')::bigint)
      then snapbase_private.workbook_access((details ->> 'workbook_id')::bigint) is not null
    else coalesce(snapbase_private.is_member((details ->> 'organization_id')::bigint), false)
  end
$$;
comment on function snapbase_private.audit_entry_visible(jsonb) is
  'May the caller see an audit entry with these details: entries about a workbook (they can hold its cell values) only with access to it, or, once it is deleted, as a member of its organization; everything else, and everything for a DBA. Never NULL.';
grant execute on function snapbase_private.audit_entry_visible(jsonb) to :ROLE_VIEWER;

drop policy if exists select_admin on snapbase.audit_log;
create policy select_admin on snapbase.audit_log for select to public
  using (snapbase.current_app_role() = 'admin' and snapbase_private.audit_entry_visible(details));

--! split: 099-pin-standard-conforming-strings.sql
-- Every function whose body holds a backslash pins standard_conforming_strings: in a
-- session with it off, tracking_problem's '\000' made every snapshot fail. Last, so
-- that it covers every function the files before it define.
do $$
declare
  fn regprocedure;
begin
  for fn in
    select p.oid::regprocedure from pg_proc p
     where p.pronamespace in ('snapbase'::regnamespace, 'snapbase_private'::regnamespace, 'snapbase_sandbox'::regnamespace)
       and strpos(p.prosrc, chr(92)) > 0
       and not coalesce('standard_conforming_strings=on' = any (p.proconfig), false)
       and pg_has_role(current_user, p.proowner, 'MEMBER')
  loop
    execute format('alter function %s set standard_conforming_strings = on', fn);
  end loop;
end
$$;
