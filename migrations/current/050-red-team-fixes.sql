-- Red-team fixes (review of the surfaces 000020 added).
-- preview_change: a change submitted in psql (no submitter) was previewable by anyone
-- who could read the table (NULL in the access check).
-- hidden_columns: a column dropped from the live table made every snapshot reader raise.
-- apply_restore: a partial restore matched keys under the default collation in its copy
-- of the snapshot and under the column's in the table, so a key equal only under a
-- nondeterministic collation was deleted and not put back.

create or replace function snapbase_private.collate_clause(coll oid) returns text
language sql stable
set search_path = pg_catalog
as $$
  select coalesce((select format(' collate %I.%I', n.nspname, co.collname)
                     from pg_collation co join pg_namespace n on n.oid = co.collnamespace
                    where co.oid = coll and coll <> 100), '')
$$;
comment on function snapbase_private.collate_clause(oid) is
  'An explicit COLLATE clause for a column''s collation (empty for none or the default), so that keys copied into a temporary table compare as they do in the table.';

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
$function$;
comment on function snapbase.preview_change(bigint,integer,integer) is 'What a pending change would do, without doing it: rows affected, a paged before/after diff (snapshot_diff''s shape, only columns you may read) and warnings. Admins, and the submitter.';
grant execute on function snapbase.preview_change(bigint,integer,integer) to :ROLE_VIEWER;

CREATE OR REPLACE FUNCTION snapbase_private.hidden_columns(snap snapbase.snapshots)
 RETURNS text[]
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog'
AS $function$
  -- A column the live table no longer has has no privileges of its own: it is shown
  -- to whoever may read the whole table (has_column_privilege would raise for it).
  select coalesce(array_agg(c ->> 'name'), '{}')
    from jsonb_array_elements(snap.columns) c
    join snapbase.managed_tables m on m.id = snap.managed_table_id
    left join pg_attribute a on a.attrelid = snapbase_private.relation_of(m) and a.attname = c ->> 'name' and a.attnum > 0 and not a.attisdropped
   where not coalesce(case when a.attnum is null
                           then has_table_privilege(snapbase_private.caller_role(), snapbase_private.relation_of(m), 'SELECT')
                           else has_column_privilege(snapbase_private.caller_role(), a.attrelid, a.attnum, 'SELECT') end, false)
$function$;
comment on function snapbase_private.hidden_columns(snapbase.snapshots) is 'Columns of a snapshot''s live table the caller may not read: left out of every row a reader returns.';
grant execute on function snapbase_private.hidden_columns(snapbase.snapshots) to :ROLE_VIEWER;

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
  key_in_t text := 'true';  -- for a partial restore: the row of t has one of the keys
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
