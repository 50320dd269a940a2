--! Previous: sha1:49f80c59ad39882c0c465dfa3af1eec47636dfb9
--! Hash: sha1:d80535d237b019814e7be8f49cd6debbe59481d4
--! Message: Red-team fixes: preview access with no submitter, dropped columns in snapshot readers, partial restore collations, drop and re-add of a column and inheritance detected by change tracking, row_history over hidden columns and gaps

--! split: 001-current.sql
-- Work in progress: one file per topic (NNN-topic.sql), applied in number order.

--! split: 050-red-team-fixes.sql
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

--! split: 510-snapshot-tracking-fixes.sql
-- Change tracking and row history fixes (red-team findings on migration 000020).
--
-- 1. A column dropped and added again with the same name and type leaves the row
--    layout and the storage (relfilenode) as they were, so the next snapshot was
--    built from the previous one and kept the old column's values. The fingerprint
--    now lists every attribute, dropped ones included, with its number, type, type
--    modifier and collation: DROP COLUMN and ADD COLUMN always change it.
-- 2. A table made an inheritance child (ALTER TABLE ... INHERIT) or a partition
--    (ATTACH PARTITION), written through its parent (which fires none of its
--    statement triggers) and detached again before the next snapshot was not
--    noticed: tracking_problem looks at inheritance only when a snapshot is taken.
--    A fifth trigger, a ROW trigger with a transition table that never fires
--    (disabled, and WHEN (false) should it be enabled), makes PostgreSQL refuse both
--    statements ("ROW triggers with transition tables are not supported in
--    inheritance hierarchies"; the check ignores whether the trigger is enabled).
--    Dropping it is noticed like dropping one of the other four.
-- 3. row_history said "changed" when only a column the caller may not read changed:
--    rows are now compared as the caller sees them, as snapshot_diff does.
-- 4. row_history lost a row put back after a snapshot in which no chunk held its
--    key (an empty table): the chunk identity of the snapshot before the gap was kept
--    and its row (none) taken over.

create or replace function snapbase_private.tracking_fingerprint(target regclass, text_form boolean) returns text
language sql stable
set search_path = pg_catalog
as $$
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
    case when text_form then (
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
      select string_agg(format('%s:%s:%s:%s', t.oid, t.xmin, p.xmin,
                               (select string_agg(e.oid::text || ':' || e.xmin::text, ',' order by e.oid) from pg_enum e where e.enumtypid = t.oid)),
                        ';' order by t.oid)
        from ty join pg_type t on t.oid = ty.oid left join pg_proc p on p.oid = t.typoutput
       where t.typnamespace <> 'pg_catalog'::regnamespace
    ) end)
$$;
comment on function snapbase_private.tracking_fingerprint(regclass, boolean) is
  'The catalog state under which recorded changes are complete; compared between consecutive snapshots (any difference: a full capture): the storage (relfilenode), every attribute with its number, type and collation (dropped ones too, so DROP COLUMN and ADD COLUMN change it), the tracking triggers'' catalog rows, and for text-form layouts the user-defined types. GRANTs, ANALYZE and SET DEFAULT do not change it.';

create or replace function snapbase_private.tracking_problem(target regclass, mt_id bigint) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
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
$$;
comment on function snapbase_private.tracking_problem(regclass, bigint) is
  'Null when the managed table''s changes are tracked, else why not. Tables whose rows can change without a statement trigger firing on them (partitions, inheritance parents and children, unlogged tables, subscribers) or whose visible rows depend on policies are never tracked; a tracked table''s fifth trigger (_900_snapbase_track_no_inheritance) keeps it from becoming an inheritance child or a partition between two snapshots.';

-- Puts the tracking triggers on a managed table: the four statement triggers that
-- record, made ENABLE ALWAYS (which needs ownership of the table), and
-- _900_snapbase_track_no_inheritance, an AFTER DELETE ROW trigger with a transition
-- table, disabled and WHEN (false): it never fires (the OLD TABLE it names is the one
-- the delete trigger keeps anyway), but while it exists, enabled or not, PostgreSQL
-- refuses ALTER TABLE ... INHERIT and ATTACH PARTITION on the table. Disabled, it
-- costs a bulk DELETE nothing measurable; enabled, its WHEN is evaluated for every
-- row (about 6% of a 1,000,000-row DELETE). Returns null when tracked, else why not.
-- Re-creating them invalidates the tracking base.
create or replace function snapbase_private.arm_tracking(mt snapbase.managed_tables, target regclass) returns text
language plpgsql
set search_path = pg_catalog
as $$
declare
  problem text := snapbase_private.tracking_problem(target, mt.id);
  owner name := (select c.relowner::regrole::name from pg_class c where c.oid = target);
  ev record;
begin
  if problem is null or problem not like 'the tracking triggers%' then
    return problem;
  end if;
  if snapbase_private.primary_key(target) is null then
    return 'a table without a primary key is not tracked';
  end if;
  if not pg_has_role(current_user, owner, 'USAGE') then
    return format('%s is owned by %s, so its tracking triggers cannot be made ENABLE ALWAYS', target, owner);
  end if;
  for ev in select * from (values ('insert', 'insert', 'referencing new table as new_rows', 'for each statement', 'enable always'),
                                  ('update', 'update', 'referencing old table as old_rows new table as new_rows', 'for each statement', 'enable always'),
                                  ('delete', 'delete', 'referencing old table as old_rows', 'for each statement', 'enable always'),
                                  ('truncate', 'truncate', '', 'for each statement', 'enable always'),
                                  ('no_inheritance', 'delete', 'referencing old table as old_rows', 'for each row when (false)', 'disable')) v(name, event, ref, fires, state) loop
    if exists (select 1 from pg_trigger t where t.tgrelid = target and t.tgname = '_900_snapbase_track_' || ev.name) then
      execute format('drop trigger %I on %s', '_900_snapbase_track_' || ev.name, target);
    end if;
    execute format('create trigger %I after %s on %s %s %s execute function snapbase_private.tg__track_changes(%L)',
      '_900_snapbase_track_' || ev.name, ev.event, target, ev.ref, ev.fires, mt.id);
    execute format('alter table %s %s trigger %I', target, ev.state, '_900_snapbase_track_' || ev.name);
  end loop;
  insert into snapbase_private.change_tracking (managed_table_id, base_snapshot_id, fingerprint)
  values (mt.id, null, null)
  on conflict (managed_table_id) do update set base_snapshot_id = null, fingerprint = null;
  return snapbase_private.tracking_problem(target, mt.id);
end;
$$;
comment on function snapbase_private.arm_tracking(snapbase.managed_tables, regclass) is
  'Installs (or confirms) the tracking triggers of a managed table: four ENABLE ALWAYS statement triggers that record changed keys, and a disabled ROW trigger with a transition table (WHEN (false)) that never fires but keeps the table from becoming an inheritance child or a partition. Owner only; called by register_table and, when the approving transaction already holds an EXCLUSIVE lock, by capture.';

-- Tables armed before the fifth trigger existed get it now (their next snapshot is
-- full: arming resets the tracking base, and the fingerprint changed anyway). Arming
-- takes a SHARE ROW EXCLUSIVE lock on each. One that cannot be re-armed here stays
-- correct: tracking_problem names the missing trigger, so its snapshots are full
-- until an approval or register_table re-arms it.
do $$
declare
  mt snapbase.managed_tables;
  target regclass;
begin
  for mt in select * from snapbase.managed_tables m order by m.id loop
    target := snapbase_private.relation_of(mt);
    -- Only tables whose four triggers are armed and which lack only the fifth.
    continue when target is null
               or coalesce(snapbase_private.tracking_problem(target, mt.id), '')
                  not like 'the tracking triggers are missing the disabled _900_snapbase_track_no_inheritance%';
    begin
      perform snapbase_private.arm_tracking(mt, target);
    exception when others then
      raise warning 'change tracking of % was not re-armed (%: %); its snapshots are full until register_table re-arms it',
        mt.qualified_name, sqlstate, sqlerrm;
    end;
  end loop;
end;
$$;

create or replace function snapbase.row_history(target regclass, key jsonb)
returns table (snapshot_id bigint, created_at timestamptz, change_request_id bigint, change text, changed_fields text[], "row" jsonb)
language plpgsql stable
security definer
set search_path = pg_catalog, pg_temp
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set timezone = 'UTC'
set extra_float_digits = 3
set bytea_output = 'hex'
as $$
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
  visible jsonb;
  previous jsonb;
  previous_visible jsonb;
  older boolean := false;
  out_ids bigint[] := '{}';
  out_at timestamptz[] := '{}';
  out_cr bigint[] := '{}';
  out_change text[] := '{}';
  out_fields text[] := '{}';
  out_rows jsonb[] := '{}';
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
        else
          execute format($q$
            select to_jsonb(r.rec) from %1$s c cross join lateral (select unnest(c.rows) as rec) r
             where %2$s and (%3$s) = (%4$s)
          $q$,
            case when chunk_table is not null and found.chunk_id is not null
                 then format('%s', chunk_table) else format('(select hash, rows::%s[] as rows from snapbase_private.chunk_store)', layout_type) end,
            case when found.chunk_id is not null then 'c.id = $1' else 'c.hash = $2' end,
            (select string_agg(format('(r.rec).%I', c), ', ') from unnest(s.primary_key) c),
            (select string_agg(format('(jsonb_populate_record(null::%s, $3)).%I', kt, c), ', ') from unnest(s.primary_key) c))
            into raw using found.chunk_id, found.chunk_hash, key;
        end if;
      elsif found.bounded is not null then
        -- A snapshot from before trees kept no text-chunk boundaries: read it all.
        execute format($q$
          select to_jsonb(r.rec) from %1$s c cross join lateral (select unnest(c.rows) as rec) r
           where c.snapshot_id = $1 and (%2$s) = (%3$s)
        $q$, snapbase_private.snapshot_chunk_source(s),
          (select string_agg(format('(r.rec).%I', c), ', ') from unnest(s.primary_key) c),
          (select string_agg(format('(jsonb_populate_record(null::%s, $2)).%I', kt, c), ', ') from unnest(s.primary_key) c))
          into raw using s.id, key;
      end if;
      -- (found is all nulls for a tree without pages, an empty table: no chunk, no row.)
    end if;
    -- The chunk this snapshot's row came from, or null when it came from none (an
    -- empty table, another primary key, a snapshot from before trees): only the very
    -- next snapshot may take the row over from it, never one after a gap.
    last_identity := chunk_identity;
    -- Compared as the caller sees them, as snapshot_diff does: a change in a column
    -- the caller may not read is no change.
    visible := raw - snapbase_private.hidden_columns(s);
    if raw is not null or previous is not null then
      n := n + 1;
      out_ids[n] := s.id;
      out_at[n] := s.created_at;
      out_cr[n] := s.change_request_id;
      out_rows[n] := visible;
      out_change[n] := case when raw is null then 'removed'
                            when previous is null then case when older then 'added' else 'initial' end
                            when visible = previous_visible then 'unchanged'
                            else 'changed' end;
    end if;
    previous := raw;
    previous_visible := visible;
    older := true;
  end loop;

  return query
    select u.id, u.at, u.cr, u.change,
           case when u.change = 'changed' then
             array(select f from (select jsonb_object_keys(coalesce(u.before_row, '{}') || u.r) as f) fs
                    where (u.before_row -> f) is distinct from (u.r -> f) order by f)
           end,
           u.r
      from (select x.*, lag(x.r) over (order by x.ord) as before_row
              from unnest(out_ids, out_at, out_cr, out_change, out_rows) with ordinality as x(id, at, cr, change, r, ord)) u
     order by u.ord desc;
end;
$$;
comment on function snapbase.row_history(regclass, jsonb) is
  'One row''s values across the table''s snapshots, newest first: initial (in the oldest snapshot), added, changed (with the fields), unchanged or removed, with the change request that took each snapshot. Rows are compared as the caller sees them: a change only in columns the caller may not read is unchanged. Reads only the chunk holding the key in each snapshot. Needs the right to read the live table.';
grant execute on function snapbase.row_history(regclass, jsonb) to :ROLE_VIEWER;
