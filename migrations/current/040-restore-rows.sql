--------------------------------------------------------------------------------
-- Partial restore: put back only some rows of a snapshot.
--------------------------------------------------------------------------------
-- snapbase.restore_rows(snapshot_id, keys) is restore_snapshot limited to the rows
-- with those primary keys (in the snapshot and in the table): a `restore` change
-- request that is approved, snapshotted and audited at once, like any restore.
-- Keys are objects of the primary key's columns, as snapshot_diff and row_history
-- give them: [{"id": 5}] or [{"region": "eu", "n": 2}].

alter table snapbase.change_requests add column if not exists restore_keys jsonb;
comment on column snapbase.change_requests.restore_keys is 'For a partial restore: the primary keys of the rows it puts back (null: the whole table).';

drop function if exists snapbase_private.apply_restore(bigint, regclass) cascade;
drop function if exists snapbase_private.apply_restore(bigint, regclass, jsonb) cascade;
drop function if exists snapbase.restore_rows(bigint, jsonb, text) cascade;

create function snapbase_private.apply_restore(snapshot_id bigint, target regclass, keys jsonb default null) returns bigint
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
      (select string_agg(format('t.%1$I = (__sb_k ->> %1$L)::%2$s', a.attname, format_type(a.atttypid, a.atttypmod)), ' and ')
         from unnest(pk) k join pg_attribute a on a.attrelid = target and a.attname = k));
    execute format('delete from pg_temp.snapbase_restore_source t where not %s', key_in_t);
  end if;
  execute 'analyze pg_temp.snapbase_restore_source';

  row_t := format('row(%s)::text', (select string_agg(format('t.%I', c), ', ') from unnest(shared) c));
  if pk is not null then
    key_match := (select string_agg(format('t.%1$I = s.%1$I', c), ' and ') from unnest(pk) c);
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
      affected := snapbase_private.apply_restore(cr.restore_snapshot_id, target, cr.restore_keys);
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

create function snapbase.restore_rows(snapshot_id bigint, keys jsonb, reason text default null) returns snapbase.change_requests
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
set client_min_messages = warning
as $$
declare
  snap snapbase.snapshots;
  mt snapbase.managed_tables;
  target regclass;
  cr snapbase.change_requests;
  bad text;
begin
  perform snapbase_private.require_role('admin');
  snap := snapbase_private.readable_snapshot(snapshot_id);
  if snap.primary_key is null then
    raise exception 'restoring some rows needs a primary key; snapshot % of % has none (restore it whole)', snap.id, snap.table_name
      using errcode = '42P10';
  end if;
  if jsonb_typeof(keys) is distinct from 'array' or jsonb_array_length(keys) = 0 or jsonb_array_length(keys) > 100000 then
    raise exception 'keys must be a non-empty array (at most 100000) of primary keys such as %', 
      (select jsonb_build_array(jsonb_object_agg(k, 1)) from unnest(snap.primary_key) k) using errcode = '22023';
  end if;
  select string_agg(distinct left(k::text, 200), ', ') into bad from jsonb_array_elements(keys) k
   where jsonb_typeof(k) <> 'object'
      or (select array_agg(x order by x) from jsonb_object_keys(k) x) is distinct from (select array_agg(p order by p) from unnest(snap.primary_key) p)
      or exists (select 1 from jsonb_each(k) e where jsonb_typeof(e.value) not in ('string', 'number', 'boolean'));
  if bad is not null then
    raise exception 'each key must be an object of exactly the primary key columns (%) with non-null values; not %',
      array_to_string(snap.primary_key, ', '), bad using errcode = '22023';
  end if;
  select * into mt from snapbase.managed_tables where id = snap.managed_table_id;
  target := snapbase_private.relation_of(mt);
  if target is null then
    raise exception 'table % no longer exists', snap.table_name using errcode = '42P01';
  end if;
  perform snapbase_private.restore_fit(snap, target);
  cr := snapbase_private.store_change_request(mt, 'restore',
          format(E'-- restore %s row(s) of %s to snapshot %s, by primary key (%s): %s',
                 jsonb_array_length(keys), target, snap.id, array_to_string(snap.primary_key, ', '), left(keys::text, 2000)),
          null, coalesce(reason, format('restore %s row(s) of snapshot %s', jsonb_array_length(keys), snap.id)), snap.id);
  update snapbase.change_requests c set restore_keys = keys where c.id = cr.id;
  -- A failure is recorded and raised as a WARNING there (psql shows it).
  return snapbase.approve_change(cr.id);
end;
$$;
comment on function snapbase.restore_rows(bigint, jsonb, text) is
  'Put some rows (by primary key) of a managed table back to a snapshot, as a restore change request approved, snapshotted and audited at once (admins).';
grant execute on function snapbase.restore_rows(bigint, jsonb, text) to :ROLE_VIEWER;
comment on function snapbase_private.apply_restore(bigint, regclass, jsonb) is
  'Puts a managed table back to a snapshot with the fewest row operations (by primary key, or by whole rows counting duplicates), or only the rows with the given keys; runs as the owner inside approve_change.';
