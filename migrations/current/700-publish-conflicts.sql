--------------------------------------------------------------------------------
-- Publishing and conflicts (issue 13).
--------------------------------------------------------------------------------
-- * Write-back: a created or updated record's outcome carries the record as the
--   source stored it (`source_values`: identity ids, defaults, generated columns,
--   what triggers set); its data columns and __last_seen take those values, typed
--   through the table's row type. Exactly once still: the intent of a batch keeps
--   them, and settling an interrupted batch writes back what the source holds.
-- * Conflicts: a record is in conflict when a field edited here changed at the
--   source since it was last seen (__publish = {state: 'conflict', job_id, at,
--   error, source_values: {column: the source's value}}). For a conflicting field
--   __last_seen keeps the value the edit was made against, so that every publish
--   finds the conflict again at the source until someone decides. Publish and
--   refresh both find conflicts, and leave the same state. publish_worklist lists
--   records in conflict or failed; resolve_conflict decides a cell or a record:
--   'theirs' takes the source's value and drops the edit, 'mine' accepts that the
--   next publish overwrites the source's value (it becomes the value last seen).
-- * One vocabulary: a record's publish state is pushing / sending /
--   awaiting_approval on its way, then published, conflict or failed; a publish
--   job's result counts published, conflicts and failed (no more `held_back`, which
--   counted conflicts and records gone at the source together); records events
--   say published, conflict, failed and resolved.
-- * add_remote_table makes the workbook table at once (no columns until its first
--   download fills them), so its job names the table from the start.
-- Idempotent: functions are replaced or dropped by their exact signature.

drop function if exists snapbase.resolve_conflict(bigint, bigint, text, text);
drop function if exists snapbase.publish_worklist(bigint, text, integer, bigint);
drop function if exists snapbase_private.conflict_message(jsonb);
drop function if exists snapbase_private.conflict_fields(jsonb, jsonb, jsonb, text[]);
drop function if exists snapbase_private.refresh_conflicts(jsonb, jsonb, jsonb, jsonb);
drop function if exists snapbase_private.refreshed_publish_state(jsonb, jsonb, bigint);
drop trigger if exists _600_discard_first_download on snapbase.jobs;
drop function if exists snapbase_private.tg__discard_first_download();

--------------------------------------------------------------------------------
-- One vocabulary in stored data: job results lose held_back
--------------------------------------------------------------------------------

update snapbase.jobs set result = result - 'held_back' where result ? 'held_back';

--------------------------------------------------------------------------------
-- Workbook tables: made before their first download; publish issues indexed
--------------------------------------------------------------------------------

-- As before (000017), and: a table whose columns come from a connector may be made
-- with none (add_remote_table; its first download adds them), and records with a
-- publish issue (conflict or failed) are indexed for publish_worklist.
create or replace function snapbase_private.create_workbook_table(wb snapbase.workbooks, name text, columns jsonb,
                                                       remote_id_column text, title_column text, source jsonb)
returns snapbase.workbook_tables
language plpgsql
set search_path = pg_catalog
as $$
declare
  spec jsonb;
  base text := left(trim(both '_' from regexp_replace(lower(trim(name)), '[^a-z0-9]+', '_', 'g')), 50);
  tname text;
  t snapbase.workbook_tables;
  waits_for_download boolean := coalesce(source ->> 'kind', 'local') not in ('local', 'managed_table');
begin
  if jsonb_typeof(columns) is distinct from 'array' or (jsonb_array_length(columns) = 0 and not waits_for_download) then
    raise exception 'a workbook table needs a non-empty array of columns' using errcode = '22023';
  end if;
  select coalesce(jsonb_agg(snapbase_private.check_column_spec(c) order by ord), '[]') into spec
    from jsonb_array_elements(columns) with ordinality as e(c, ord);
  if (select count(distinct c ->> 'name') from jsonb_array_elements(spec) c) <> jsonb_array_length(spec) then
    raise exception 'column names must be unique' using errcode = '22023';
  end if;
  if remote_id_column is not null and not spec @> jsonb_build_array(jsonb_build_object('name', remote_id_column)) then
    raise exception 'remote_id_column % is not one of the columns', remote_id_column using errcode = '22023';
  end if;
  if title_column is not null and not spec @> jsonb_build_array(jsonb_build_object('name', title_column)) then
    raise exception 'title_column % is not one of the columns', title_column using errcode = '22023';
  end if;
  tname := coalesce(nullif(base, ''), 'table');
  while exists (select 1 from snapbase.workbook_tables wt where wt.workbook_id = wb.id and wt.table_name = tname) loop
    tname := coalesce(nullif(base, ''), 'table') || '_' || (floor(random() * 9000) + 1000)::int;
  end loop;
  insert into snapbase.workbook_tables (workbook_id, name, table_name, columns, remote_id_column, title_column, source)
    values (wb.id, trim(name), tname, spec, remote_id_column, title_column, coalesce(source, '{"kind": "local"}'))
    returning * into t;
  -- Types are check_column_spec's: accepted by PostgreSQL and of the plain shape of a type name.
  execute format($ddl$
    create table %I.%I (
      %s
      __id bigint generated always as identity primary key,
      __remote_id text,
      __last_seen jsonb,
      __edited jsonb not null default '{}',
      __suggested jsonb not null default '{}',
      __suggest_delete jsonb,
      __created boolean not null default false,
      __deleted boolean not null default false,
      __suggested_new boolean not null default false,
      __dirty boolean generated always as (__created or __deleted or __edited <> '{}') stored,
      __updated_at timestamptz not null default now(),
      __source_deleted boolean not null default false,
      __publish jsonb,
      __seen_job bigint
    )$ddl$, wb.schema_name, tname,
    (select coalesce(string_agg(format('%I %s,', c ->> 'name', c ->> 'type'), ' '), '') from jsonb_array_elements(spec) c));
  execute format('create index on %I.%I (__id) where __suggested <> ''{}'' or __suggest_delete is not null or __suggested_new',
    wb.schema_name, tname);
  execute format('create unique index on %I.%I (__remote_id) where __remote_id is not null', wb.schema_name, tname);
  perform snapbase_private.index_publish_issues(t);
  execute format('comment on table %I.%I is %L', wb.schema_name, tname, format('Snapbase workbook table %s: %s', t.id, t.name));
  return t;
end;
$$;

-- (Defined after its first caller: plpgsql resolves calls when they run.)
create or replace function snapbase_private.index_publish_issues(t snapbase.workbook_tables) returns void
language plpgsql
set search_path = pg_catalog
as $$
declare
  schema_name text := (select w.schema_name from snapbase.workbooks w where w.id = t.workbook_id);
  index_name text := '__sb_publish_issues_' || t.id;
begin
  if to_regclass(format('%I.%I', schema_name, index_name)) is null then
    execute format('create index %I on %I.%I (__id) where (__publish ->> ''state'') in (''conflict'', ''failed'')',
      index_name, schema_name, t.table_name);
  end if;
end;
$$;
comment on function snapbase_private.index_publish_issues(snapbase.workbook_tables) is
  'The partial index publish_worklist pages through: records whose last publish outcome is a conflict or a failure, by id. Named by the table''s id, so it is made once.';

do $$
declare
  t snapbase.workbook_tables;
begin
  for t in select * from snapbase.workbook_tables loop
    if to_regclass(snapbase_private.table_rel(t)) is not null then
      perform snapbase_private.index_publish_issues(t);
    end if;
  end loop;
end $$;

--------------------------------------------------------------------------------
-- add_remote_table: the job names its table from the start
--------------------------------------------------------------------------------

create or replace function snapbase.add_remote_table(workbook_id bigint, account_id bigint, remote_table text) returns snapbase.jobs
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'edit');
  a snapbase.connector_accounts := snapbase_private.require_account(account_id);
  t snapbase.workbook_tables;
  j snapbase.jobs;
begin
  if coalesce(trim(remote_table), '') = '' then
    raise exception 'remote_table is required' using errcode = '22023';
  end if;
  -- The worker reads managed tables as the job's creator: check here that the caller may.
  if a.kind = 'managed' then
    remote_table := (snapbase.resolve_managed_table(remote_table)).qualified_name;
    if not has_table_privilege(snapbase_private.caller_role(), remote_table::regclass, 'SELECT') then
      raise exception 'you may not read %', remote_table using errcode = '42501';
    end if;
  end if;
  t := snapbase_private.create_download_table(wb, a, remote_table);
  j.kind := 'download';
  j.connector_account_id := a.id;
  j.workbook_id := wb.id;
  j.table_id := t.id;
  j.current_table := remote_table;
  -- new_table: the job's first download fills the table; if it fails or is cancelled the table goes.
  j.options := jsonb_build_object('remote_table', remote_table, 'new_table', true);
  return snapbase_private.enqueue_job(j);
end;
$$;
comment on function snapbase.add_remote_table(bigint, bigint, text) is
  'Add a source table to the workbook: the table is made now (the job''s tableId; it gets its columns and records from the download job); a first download that fails or is cancelled removes it again.';
grant execute on function snapbase.add_remote_table(bigint, bigint, text) to :ROLE_VIEWER;

create or replace function snapbase_private.create_download_table(wb snapbase.workbooks, a snapbase.connector_accounts, remote_table text)
returns snapbase.workbook_tables
language plpgsql
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables;
begin
  t := snapbase_private.create_workbook_table(wb, remote_table, '[]', null, null, jsonb_build_object('kind', a.kind, 'table', remote_table));
  update snapbase.workbook_tables wt set connector_account_id = a.id, remote_table = create_download_table.remote_table
   where wt.id = t.id returning * into t;
  return t;
end;
$$;
comment on function snapbase_private.create_download_table(snapbase.workbooks, snapbase.connector_accounts, text) is
  'A workbook table for a source table, with no columns yet: its first download (prepare_download) adds them.';

-- For the download task, once it has the source's table spec (columns under their
-- workbook names, with `sourceName` where that differs): the job's workbook table.
-- A table without columns yet (made by add_remote_table) gets the source's; one
-- that has them (a refresh, or a first download retried) must still fit the source.
create or replace function snapbase_private.prepare_download(job_id bigint, spec jsonb) returns snapbase.workbook_tables
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  wb snapbase.workbooks;
  a snapbase.connector_accounts;
  misfits text;
  cols jsonb;
begin
  select * into j from snapbase.jobs where id = job_id;
  if j.table_id is null then
    -- Queued before add_remote_table made tables itself.
    select * into wb from snapbase.workbooks where id = j.workbook_id;
    select * into a from snapbase.connector_accounts where id = j.connector_account_id;
    t := snapbase_private.create_download_table(wb, a, j.options ->> 'remote_table');
    update snapbase.jobs set table_id = t.id, options = options || '{"new_table": true}' where id = job_id;
  else
    select * into t from snapbase.workbook_tables where id = j.table_id;
  end if;
  if t.columns <> '[]' then
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
  -- The first download: the source's columns. The remote id column identifies
  -- records at the source, so it is never edited here; columns named otherwise here
  -- keep the source's name.
  select coalesce(jsonb_agg(snapbase_private.check_column_spec(jsonb_build_object('name', s ->> 'name', 'type', s ->> 'type',
                    'read_only', coalesce((s ->> 'readOnly')::boolean, false) or s ->> 'name' = spec ->> 'remoteIdColumn'))
                  || case when s ->> 'sourceName' is not null then jsonb_build_object('source_name', s ->> 'sourceName') else '{}' end
                  order by ord), '[]')
    into cols from jsonb_array_elements(spec -> 'columns') with ordinality as e(s, ord);
  if jsonb_array_length(cols) = 0 or (select count(distinct c ->> 'name') from jsonb_array_elements(cols) c) <> jsonb_array_length(cols) then
    raise exception 'the source table % has no columns, or two of the same name', t.remote_table using errcode = '22023';
  end if;
  if not cols @> jsonb_build_array(jsonb_build_object('name', spec ->> 'remoteIdColumn')) then
    raise exception 'remote_id_column % is not one of the columns', spec ->> 'remoteIdColumn' using errcode = '22023';
  end if;
  -- Types are check_column_spec's: accepted by PostgreSQL and of the plain shape of a type name.
  execute format('alter table %s %s', snapbase_private.table_rel(t),
    (select string_agg(format('add column %I %s', c ->> 'name', c ->> 'type'), ', ' order by ord)
       from jsonb_array_elements(cols) with ordinality as e(c, ord)));
  update snapbase.workbook_tables wt set columns = cols, remote_id_column = spec ->> 'remoteIdColumn'
   where wt.id = t.id returning * into t;
  return t;
end;
$$;

-- A new table's first download that fails or is cancelled, however it ends (the
-- task, a cancel while queued, a dead worker's recovery), leaves no table behind
-- unless someone edited it meanwhile (discard_download decides).
create or replace function snapbase_private.tg__discard_first_download() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  perform snapbase_private.discard_download(new.id);
  return null;
end;
$$;
create trigger _600_discard_first_download after update of state on snapbase.jobs
  for each row
  when (new.kind = 'download' and new.state in ('failed', 'cancelled') and old.state is distinct from new.state
        and new.table_id is not null and new.options ->> 'new_table' = 'true')
  execute function snapbase_private.tg__discard_first_download();

--------------------------------------------------------------------------------
-- Conflicts: one state, whoever finds them
--------------------------------------------------------------------------------

create or replace function snapbase_private.conflict_message(source_values jsonb) returns text
language sql immutable
set search_path = pg_catalog
as $$
  select 'changed at the source since download: ' || string_agg(k, ', ' order by k) from jsonb_object_keys(source_values) k
$$;
comment on function snapbase_private.conflict_message(jsonb) is
  'The error of a record in conflict, naming its conflicting columns (the keys of its source_values) in one order, whoever found the conflict.';

-- The conflicts a refresh finds: fields edited here (whose local value differs from
-- the source's new one) that changed at the source since last seen. Edited fields
-- the source changed to the local value are no conflict (the edit is then dropped).
create or replace function snapbase_private.refresh_conflicts(local_values jsonb, edited jsonb, last_seen jsonb, seen jsonb) returns jsonb
language sql immutable
set search_path = pg_catalog
as $$
  select coalesce(jsonb_object_agg(k, seen -> k), '{}') from jsonb_object_keys(edited) k
   where seen ? k and (local_values -> k) is distinct from (seen -> k) and (last_seen -> k) is distinct from (seen -> k)
$$;
comment on function snapbase_private.refresh_conflicts(jsonb, jsonb, jsonb, jsonb) is
  'The source''s new values of the fields a refresh finds in conflict: edited here, still different from the source, and changed at the source since last seen (values as typed JSON).';

-- A record's publish state after a refresh compared it with the source: a conflict
-- (found now, or found before and still there) is stated afresh; one that went away
-- is cleared; a record on its way to the source (sending, awaiting approval) keeps
-- its state (its outcome is recorded when the source answers).
create or replace function snapbase_private.refreshed_publish_state(publish jsonb, conflicts jsonb, job_id bigint) returns jsonb
language sql stable
set search_path = pg_catalog
as $$
  select case
    when publish ->> 'state' in ('sending', 'awaiting_approval') then publish
    when conflicts <> '{}' then jsonb_build_object('state', 'conflict', 'job_id', job_id, 'at', now(),
                                                  'error', snapbase_private.conflict_message(conflicts), 'source_values', conflicts)
    when publish ->> 'state' = 'conflict' then null
    else publish
  end
$$;

comment on function snapbase_private.refreshed_publish_state(jsonb, jsonb, bigint) is
  'A record''s publish state after a refresh: a conflict stated afresh (same shape as one a publish finds), a conflict that went away cleared, a record on its way to the source left alone.';

-- Applies one batch of source records [{remote_id, values}] to the job's table.
-- New records are inserted; a known record takes the source's values except in
-- the fields edited here, which keep the local value, and a field stays edited
-- only while it differs from the source's value. The source's values become
-- __last_seen, except in conflicting fields (see refresh_conflicts), which keep the
-- value the edit was made against, so that publishing finds the conflict at the
-- source again; the record's publish state says conflict (refreshed_publish_state).
-- Returns false when the job was cancelled.
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
        __last_seen = __sb_i.__sb_seen || case when __sb_r.__edited = '{}' then '{}'::jsonb else coalesce((
                        select jsonb_object_agg(__sb_c.key, coalesce(__sb_r.__last_seen -> __sb_c.key, 'null'))
                          from jsonb_each(snapbase_private.refresh_conflicts(to_jsonb(__sb_r.*), __sb_r.__edited, __sb_r.__last_seen, __sb_i.__sb_seen)) __sb_c),
                        '{}') end,
        __edited = coalesce((select jsonb_object_agg(__sb_x.key, __sb_x.value) from jsonb_each(__sb_r.__edited) __sb_x
                              where (to_jsonb(__sb_r.*) -> __sb_x.key) is distinct from (__sb_i.__sb_seen -> __sb_x.key)), '{}'),
        __publish = case when __sb_r.__edited = '{}' and __sb_r.__publish ->> 'state' is distinct from 'conflict' then __sb_r.__publish
                         else snapbase_private.refreshed_publish_state(__sb_r.__publish,
                                snapbase_private.refresh_conflicts(to_jsonb(__sb_r.*), __sb_r.__edited, __sb_r.__last_seen, __sb_i.__sb_seen), $2) end,
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

-- After the last batch of a complete download: records the source no longer has
-- are removed when clean, or flagged __source_deleted when edited here (a conflict
-- of such a record becomes a failure: the record is gone at the source, and
-- resolve_source_deleted decides). The result counts the records in conflict.
create or replace function snapbase_private.finish_download(job_id bigint) returns snapbase.jobs
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  rel text;
  removed bigint;
  flagged bigint;
  conflicts bigint;
begin
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  rel := snapbase_private.table_rel(t);
  execute format('delete from %s where __remote_id is not null and __seen_job is distinct from $1 and not __dirty', rel)
    using job_id;
  get diagnostics removed = row_count;
  execute format($q$update %s __sb_r set __source_deleted = true, __updated_at = now(),
                      __publish = case when __sb_r.__publish ->> 'state' = 'conflict'
                                       then jsonb_build_object('state', 'failed', 'job_id', $1, 'at', now(),
                                                               'error', format('record %%s no longer exists at the source', __sb_r.__remote_id))
                                       else __sb_r.__publish end
                     where __sb_r.__remote_id is not null and __sb_r.__seen_job is distinct from $1 and not __sb_r.__source_deleted$q$, rel)
    using job_id;
  get diagnostics flagged = row_count;
  execute format($q$select count(*) from %s __sb_r where (__sb_r.__publish ->> 'state') = 'conflict'$q$, rel)
    into conflicts;
  perform snapbase_private.audit_workbook('download', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('job_id', job_id, 'records', j.done, 'removed_deleted_at_source', removed, 'flagged_deleted_at_source', flagged,
                       'conflicts', conflicts));
  return snapbase_private.finish_job(job_id, 'succeeded',
    jsonb_build_object('records', j.done, 'removed_deleted_at_source', removed, 'flagged_deleted_at_source', flagged, 'conflicts', conflicts));
end;
$$;

--------------------------------------------------------------------------------
-- Publishing: outcomes carry what the source stored
--------------------------------------------------------------------------------

-- For the publish task, just before the source commits a batch: the intent
-- (planned: [{id, ok, remote_id, error, values (sent), source_values (stored)}]).
-- Its records go from 'pushing' to 'sending'; `at` stays when the publish took them,
-- so that edits made since are told apart when the outcome is recorded.
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
  execute format($q$update %s __sb_r set __publish = jsonb_build_object('state', 'sending', 'job_id', $1, 'batch_id', $2,
                                                                       'at', coalesce(__sb_r.__publish -> 'at', to_jsonb(now())))
                    where __sb_r.__id in (select (__sb_p ->> 'id')::bigint from jsonb_array_elements($3) __sb_p)$q$, snapbase_private.table_rel(t))
    using job_id, batch_id, planned;
  return batch_id;
end;
$$;

-- Stores outcomes [{id, ok, remote_id?, error?, state?, source_values?}] of records
-- just pushed (and settles their batch). Published: a created record gets its
-- remote id; the data columns take the record as the source stored it
-- (source_values, typed by the table's columns), which also becomes __last_seen;
-- the edit flags go, except those of fields edited after the publish took the
-- record (which keep the local value); a deleted record is removed. Otherwise the
-- record keeps its changes and says why: 'failed' (with the source's message) or
-- 'conflict' (with the source's values of the conflicting fields). Counts go to
-- the job's result: published, conflicts, failed. Returns false when the job was
-- cancelled.
create or replace function snapbase_private.record_publish_outcomes(job_id bigint, outcomes jsonb, batch_id bigint default null) returns boolean
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  rel text;
  cols text[];
  published integer;
  conflicts integer;
begin
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  rel := snapbase_private.table_rel(t);
  cols := snapbase_private.column_names(t, true);
  execute format('delete from %s __sb_r using jsonb_array_elements($1) __sb_o where __sb_r.__id = (__sb_o ->> ''id'')::bigint and (__sb_o ->> ''ok'')::boolean and __sb_r.__deleted', rel)
    using outcomes;
  execute format($q$
    with __sb_x as (
      select __sb_w.__id as __sb_id, (__sb_o ->> 'ok')::boolean as __sb_ok, __sb_o as __sb_out, __sb_n as __sb_stored,
             -- The stored record's fields, as typed JSON.
             (select coalesce(jsonb_object_agg(__sb_f.key, __sb_f.value), '{}') from jsonb_each(to_jsonb(__sb_n.*)) __sb_f
               where __sb_o -> 'source_values' ? __sb_f.key and __sb_f.key = any ($4)) as __sb_seen,
             -- Edits made after this publish took the record: they were not sent.
             (select coalesce(jsonb_object_agg(__sb_e.key, __sb_e.value), '{}') from jsonb_each(__sb_w.__edited) __sb_e
               where (__sb_w.__publish ->> 'job_id')::bigint = $2 and __sb_e.value #>> '{}' ~ '^\d{4}-\d\d-\d\d[T ]\d\d:\d\d'
                 and (__sb_e.value #>> '{}')::timestamptz > (__sb_w.__publish ->> 'at')::timestamptz) as __sb_kept
        from jsonb_array_elements($1) __sb_o
        join %1$s __sb_w on __sb_w.__id = (__sb_o ->> 'id')::bigint
        cross join lateral jsonb_populate_record(null::%1$s, coalesce(__sb_o -> 'source_values', '{}')) __sb_n
    )
    update %1$s __sb_r set
      %2$s
      __remote_id = case when __sb_x.__sb_ok and __sb_r.__created then __sb_x.__sb_out ->> 'remote_id' else __sb_r.__remote_id end,
      __last_seen = case when __sb_x.__sb_ok then (to_jsonb(__sb_r.*) - $3::text[]) || __sb_x.__sb_seen else __sb_r.__last_seen end,
      __edited = case when __sb_x.__sb_ok then __sb_x.__sb_kept else __sb_r.__edited end,
      __created = __sb_r.__created and not __sb_x.__sb_ok,
      __publish = jsonb_strip_nulls(jsonb_build_object(
        'state', case when __sb_x.__sb_ok then 'published' else coalesce(__sb_x.__sb_out ->> 'state', 'failed') end,
        'job_id', $2, 'at', now(), 'error', __sb_x.__sb_out ->> 'error',
        'source_values', case when not __sb_x.__sb_ok then __sb_x.__sb_out -> 'source_values' end)),
      __updated_at = now()
      from __sb_x
     where __sb_r.__id = __sb_x.__sb_id
    $q$, rel,
    (select string_agg(format('%1$I = case when __sb_x.__sb_ok and __sb_x.__sb_seen ? %1$L and not __sb_x.__sb_kept ? %1$L then (__sb_x.__sb_stored).%1$I else __sb_r.%1$I end,', c), ' ')
       from unnest(cols) c))
    using outcomes, job_id, snapbase_private.record_meta_columns() || snapbase_private.scratch_columns(t), cols;
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
-- 'committed' → the planned outcomes are recorded (with the records as the source
-- stored them, kept in the intent); 'rolled_back' → its records are sent again;
-- 'unknown' → each record is compared with `current` (the source's values now, by
-- remote id): a created record whose planned id exists, an update whose fields hold
-- what was sent, a delete whose record is gone were published, and the workbook
-- takes the source's current values for them; the others are sent again (and meet
-- the conflict check then). Returns the counts.
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
      outcomes := outcomes || jsonb_strip_nulls(jsonb_build_object('id', p -> 'id', 'ok', p -> 'ok', 'remote_id', p -> 'remote_id', 'error', p -> 'error',
        'source_values', case when (p ->> 'ok')::boolean and b.kind <> 'delete'
                              then coalesce(current -> (p ->> 'remote_id'), p -> 'source_values') end));
    else
      resend := resend || (p ->> 'id')::bigint;
    end if;
  end loop;
  -- Sent again by this job: next_to_publish hands out records in 'pushing' state.
  execute format($q$update %s __sb_r set __publish = jsonb_build_object('state', 'pushing', 'job_id', $1, 'at', now())
                    where __sb_r.__id = any ($2)$q$, rel) using job_id, resend;
  update snapbase_private.publish_batches set verdict = case settle_publish_batch.verdict when 'unknown' then 'compared' else settle_publish_batch.verdict end
   where id = batch_id;
  perform snapbase_private.record_publish_outcomes(job_id, outcomes, batch_id);
  perform snapbase_private.audit_workbook('publish_reconciled', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('job_id', job_id, 'batch_id', batch_id, 'verdict', verdict, 'published', jsonb_array_length(outcomes), 'resent', cardinality(resend)));
  return jsonb_build_object('published', jsonb_array_length(outcomes), 'resent', cardinality(resend));
end;
$$;

-- The conflict check before updates. `current` maps remote ids to the source's
-- values now. A record is in conflict when a field it would send changed at the
-- source since it was last seen (and the source does not already hold the value
-- it would send); unless the job forces, it is not sent and its outcome is
-- 'conflict' with the source's values of those fields: the same state a refresh
-- leaves. A record the source no longer has fails and is flagged deleted at the
-- source. Returns the ids that may be sent.
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
  changed jsonb;
  sendable bigint[] := '{}';
  refused jsonb := '[]';
begin
  perform snapbase_private.assert_job_runner(job_id);
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  rel := snapbase_private.table_rel(t);
  for rec in select * from jsonb_array_elements(batch) loop
    if not current ? (rec ->> 'remote_id') then
      execute format('update %s __sb_r set __source_deleted = true where __sb_r.__id = $1', rel) using (rec ->> 'id')::bigint;
      refused := refused || jsonb_build_object('id', rec -> 'id', 'ok', false,
        'error', format('record %s no longer exists at the source', rec ->> 'remote_id'));
      continue;
    end if;
    now_values := snapbase_private.normalized_values(rel, current -> (rec ->> 'remote_id'));
    select coalesce(jsonb_object_agg(k, now_values -> k), '{}') into changed from jsonb_object_keys(rec -> 'values') k
     where (now_values -> k) is distinct from (rec -> 'last_seen' -> k) and (now_values -> k) is distinct from (rec -> 'values' -> k);
    if changed <> '{}' and not coalesce((j.options ->> 'force')::boolean, false) then
      refused := refused || jsonb_build_object('id', rec -> 'id', 'ok', false, 'state', 'conflict',
        'error', snapbase_private.conflict_message(changed), 'source_values', changed);
    else
      sendable := sendable || (rec ->> 'id')::bigint;
    end if;
  end loop;
  if jsonb_array_length(refused) > 0 then
    perform snapbase_private.record_publish_outcomes(job_id, refused);
  end if;
  return sendable;
end;
$$;

-- Ends a publish job from its counts: 'partial' when some records failed or are in
-- conflict (error says how many, each record says why), else 'succeeded'. The
-- result is {published, conflicts, failed}.
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
  update snapbase.jobs set result = (coalesce(jobs.result, '{}') - 'held_back')
           || jsonb_build_object('published', published, 'failed', failed, 'conflicts', conflicts)
   where id = job_id;
  if failed + conflicts = 0 then
    return snapbase_private.finish_job(job_id, 'succeeded');
  end if;
  return snapbase_private.finish_job(job_id, 'partial', null,
    format('%s of %s records were not published (%s failed, %s in conflict with the source); each record''s state.publish says why',
           failed + conflicts, published + failed + conflicts, failed, conflicts));
end;
$$;

--------------------------------------------------------------------------------
-- Working through conflicts: the worklist, and resolving a cell or a record
--------------------------------------------------------------------------------

-- [{column, mine, theirs, last_seen}] of a record in conflict, in the table's column order.
create or replace function snapbase_private.conflict_fields(publish jsonb, local_values jsonb, last_seen jsonb, columns text[]) returns jsonb
language sql immutable
set search_path = pg_catalog
as $$
  select coalesce(jsonb_agg(jsonb_build_object('column', k, 'mine', local_values -> k, 'theirs', publish -> 'source_values' -> k,
                                               'last_seen', last_seen -> k)
                            order by array_position(columns, k), k), '[]')
    from jsonb_object_keys(case when publish ->> 'state' = 'conflict' then coalesce(publish -> 'source_values', '{}') else '{}' end) k
   where k = any (columns)
$$;
comment on function snapbase_private.conflict_fields(jsonb, jsonb, jsonb, text[]) is
  'The fields of a record in conflict, as the worklist shows them: the local value (mine), the source''s (theirs) and the value the edit was made against (last_seen); only the given (visible) columns.';

create or replace function snapbase.publish_worklist(table_id bigint, publish_state text default null, page_size integer default 100,
                                                    after_id bigint default null)
returns jsonb
language plpgsql stable
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
  rel text := snapbase_private.table_rel(t);
  hide text[] := snapbase_private.hidden_from_caller(t);
  shown text[];
  page jsonb;
  counts jsonb;
  n integer := coalesce(page_size, 100);
begin
  if publish_state is not null and publish_state not in ('conflict', 'failed') then
    raise exception 'publish_state must be conflict or failed (got %)', publish_state using errcode = '22023';
  end if;
  if n not between 1 and 1000 then
    raise exception 'page_size must be from 1 to 1000 (got %)', n using errcode = '22023';
  end if;
  shown := array(select c from unnest(snapbase_private.column_names(t)) c where c <> all (hide));
  -- The first condition is the partial index's (index_publish_issues). record_json_sql reads alias r.
  execute format($q$
    select coalesce(jsonb_agg(%s || jsonb_build_object('conflicts', snapbase_private.conflict_fields(r.__publish, to_jsonb(r.*), r.__last_seen, $4))
                              order by r.__id), '[]')
      from (select * from %s r
             where (r.__publish ->> 'state') in ('conflict', 'failed') and ($1::text is null or r.__publish ->> 'state' = $1)
               and ($2::bigint is null or r.__id > $2)
             order by r.__id limit $3) r$q$, snapbase_private.record_json_sql(hide), rel)
    into page using publish_state, after_id, n + 1, shown;
  execute format($q$
    select jsonb_build_object('conflict', count(*) filter (where __sb_r.__publish ->> 'state' = 'conflict'),
                              'failed', count(*) filter (where __sb_r.__publish ->> 'state' = 'failed'))
      from %s __sb_r where (__sb_r.__publish ->> 'state') in ('conflict', 'failed')$q$, rel)
    into counts;
  return jsonb_build_object('records', case when jsonb_array_length(page) > n then page - n else page end,
                            'next_after_id', case when jsonb_array_length(page) > n then page -> (n - 1) -> 'id' end,
                            'counts', counts);
end;
$$;
comment on function snapbase.publish_worklist(bigint, text, integer, bigint) is
  'Records whose last publish outcome is a conflict or a failure (publish_state: conflict or failed; null: both), by id: {records, next_after_id, counts: {conflict, failed}}. Each record carries `conflicts`: [{column, mine, theirs, last_seen}]; pass next_after_id as after_id for the next page. Resolve conflicts with resolve_conflict.';
grant execute on function snapbase.publish_worklist(bigint, text, integer, bigint) to :ROLE_VIEWER;

create or replace function snapbase.resolve_conflict(table_id bigint, record_id bigint, keep text, column_name text default null)
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  rel text := snapbase_private.table_rel(t);
  found boolean;
  pub jsonb;
  decided jsonb;
  left_over jsonb;
  cols text;
begin
  if keep is null or keep not in ('mine', 'theirs') then
    raise exception 'keep must be mine or theirs (got %)', coalesce(keep, 'null') using errcode = '22023';
  end if;
  execute format('select true, __sb_r.__publish from %s __sb_r where __sb_r.__id = $1 for update', rel) into found, pub using record_id;
  if found is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  if pub ->> 'state' is distinct from 'conflict' then
    raise exception 'record % of workbook table % is not in conflict', record_id, t.id using errcode = '55000';
  end if;
  if column_name is not null and not coalesce(pub -> 'source_values' ? column_name, false) then
    raise exception 'record % has no conflict in column %', record_id, column_name using errcode = '22023';
  end if;
  -- The source's values of the fields decided, and what is left in conflict.
  decided := case when column_name is null then coalesce(pub -> 'source_values', '{}')
                  else jsonb_build_object(column_name, pub -> 'source_values' -> column_name) end;
  left_over := coalesce(pub -> 'source_values', '{}') - array(select jsonb_object_keys(decided));
  select string_agg(format('%I', k), ', ') into cols from jsonb_object_keys(decided) k;
  -- One event for the resolution, with its own action (not the edit it amounts to).
  perform set_config('snapbase.quiet_record_events', 'on', true);
  if keep = 'theirs' then
    -- The source's values, and they are what was last seen there: the edits go.
    execute format($u$
      update %1$s __sb_r set (%2$s) = (select %2$s from jsonb_populate_record(__sb_r.*, $2)),
             __last_seen = coalesce(__sb_r.__last_seen, '{}') || $2, __edited = __sb_r.__edited - $3::text[],
             __publish = $4, __updated_at = now()
       where __sb_r.__id = $1$u$, rel, cols)
      using record_id, decided, array(select jsonb_object_keys(decided)),
            case when left_over = '{}' then null
                 else pub || jsonb_build_object('error', snapbase_private.conflict_message(left_over), 'source_values', left_over) end;
  else
    -- The local values stay edited, now against the source's: the next publish may overwrite them.
    execute format($u$
      update %1$s __sb_r set __last_seen = coalesce(__sb_r.__last_seen, '{}') || $2,
             __edited = __sb_r.__edited - array(select __sb_k from jsonb_object_keys($2) __sb_k where to_jsonb(__sb_r.*) -> __sb_k = $2 -> __sb_k),
             __publish = $3, __updated_at = now()
       where __sb_r.__id = $1$u$, rel)
      using record_id, decided,
            case when left_over = '{}' then null
                 else pub || jsonb_build_object('error', snapbase_private.conflict_message(left_over), 'source_values', left_over) end;
  end if;
  perform set_config('snapbase.quiet_record_events', 'off', true);
  perform snapbase_private.emit('workbook:' || t.workbook_id, 'records', jsonb_build_object('table_id', t.id, 'action', 'resolved', 'count', 1));
  perform snapbase_private.audit_workbook('resolve_conflict', t.workbook_id, 'workbook_record', record_id::text, rel,
    jsonb_build_object('table_id', t.id, 'keep', keep, 'columns', (select jsonb_agg(k order by k) from jsonb_object_keys(decided) k),
                       'source_values', decided));
  return snapbase_private.get_record(t, record_id, snapbase_private.hidden_from_caller(t));
end;
$$;
comment on function snapbase.resolve_conflict(bigint, bigint, text, text) is
  'Decide a record''s conflict with the source, for one column or (column_name null) all of them: keep ''theirs'' takes the source''s value and drops the local edit; keep ''mine'' keeps the local value, to overwrite the source''s at the next publish. Editors; audited. Returns the record.';
grant execute on function snapbase.resolve_conflict(bigint, bigint, text, text) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Records events: publish outcomes by their own names
--------------------------------------------------------------------------------

-- As before (000019), except for publish states: a statement that publishes records
-- says 'published'; one that finds conflicts (publish or refresh) 'conflict'; one
-- that records failures 'failed'; one that clears a record's publish state without
-- editing it 'resolved'; taking records for a publish (pushing, sending, awaiting
-- approval) is bookkeeping, not announced.
create or replace function snapbase_private.tg__records_event() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
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
             when bool_or(__sb_c.publish_changed and __sb_n.__publish ->> 'state' = 'published') then 'published'
             when bool_or(__sb_c.publish_changed and __sb_n.__publish ->> 'state' = 'conflict') then 'conflict'
             when bool_or(__sb_c.publish_changed and __sb_n.__publish ->> 'state' = 'failed') then 'failed'
             when bool_or(__sb_c.data_changed) then 'edited'
             -- A publish state cleared without an edit: a decision (resolve_source_deleted).
             when bool_or(__sb_c.publish_changed and __sb_n.__publish is null) then 'resolved'
             when bool_or(not (__sb_o.__suggested @> __sb_n.__suggested) or __sb_n.__suggest_delete is not null and __sb_o.__suggest_delete is null) then 'suggested'
             when bool_or(__sb_n.__suggested <> __sb_o.__suggested or __sb_n.__suggest_delete is distinct from __sb_o.__suggest_delete) then 'rejected'
             else 'updated'
           end
      into affected, what
      from new_rows __sb_n join old_rows __sb_o on __sb_o.__id = __sb_n.__id,
           lateral (select (to_jsonb(__sb_n.*) - snapbase_private.record_meta_columns()) is distinct from (to_jsonb(__sb_o.*) - snapbase_private.record_meta_columns())
                             or __sb_n.__deleted <> __sb_o.__deleted as data_changed,
                           __sb_n.__publish is distinct from __sb_o.__publish as publish_changed) __sb_c;
  end if;
  -- A bulk edit announces itself once, at its end.
  -- 'updated' alone (edit flags, timestamps, records taken for a publish) is bookkeeping that follows another event.
  if affected > 0 and what <> 'updated' and current_setting('snapbase.quiet_record_events', true) is distinct from 'on' then
    perform snapbase_private.emit('workbook:' || tg_argv[0], 'records', jsonb_build_object('table_id', tg_argv[1]::bigint,
      'action', what, 'count', affected));
  end if;
  return null;
end;
$$;

-- Job events: as before (000008), and a settled job's counts under `result` (a
-- publish's published, conflicts and failed; a refresh's records and conflicts, …):
-- numbers only, never values.
create or replace function snapbase_private.tg__job_event() returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
  if tg_op = 'UPDATE' and (new.state, new.done, new.total) is not distinct from (old.state, old.done, old.total) then
    return null;
  end if;
  perform snapbase_private.emit(
    case when new.workbook_id is not null then 'workbook:' || new.workbook_id else 'account:' || new.connector_account_id end,
    'job', jsonb_build_object('job_id', new.id, 'job_kind', new.kind, 'state', new.state, 'done', new.done, 'total', new.total,
                              'table_id', new.table_id)
           || case when new.state::text in ('succeeded', 'partial') and new.kind in ('publish', 'download')
                   then jsonb_build_object('result', (select coalesce(jsonb_object_agg(__sb_c.key, __sb_c.value), '{}')
                                                        from jsonb_each(coalesce(new.result, '{}')) __sb_c where jsonb_typeof(__sb_c.value) = 'number'))
                   else '{}' end);
  return null;
end;
$$;
