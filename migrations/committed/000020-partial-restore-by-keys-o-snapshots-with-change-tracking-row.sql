--! Previous: sha1:484144f1f99ad303ba4f2e12dc2f082552ee9030
--! Hash: sha1:49f80c59ad39882c0c465dfa3af1eec47636dfb9
--! Message: Partial restore by keys, O(Δ) snapshots with change tracking, row history and as-of reads, CSV rules, publish conflicts and their resolution, tidy-up

--! split: 001-current.sql
-- Work in progress: one file per topic (NNN-topic.sql), applied in number order.

--! split: 040-restore-rows.sql
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

--! split: 500-snapshots-incremental.sql
-- O(Δ) snapshots (issue 15, first part).
--
-- Every approval used to read the whole table while holding the lock that keeps
-- writers out (7.9 s for a one-row UPDATE on 5M rows). Now:
--
-- * Change tracking. register_table puts four statement-level AFTER triggers on
--   a managed table (INSERT, UPDATE, DELETE with transition tables; TRUNCATE),
--   ENABLE ALWAYS so that they also fire under session_replication_role =
--   replica. They append the primary keys a statement touched (up to 10,000), or
--   the range of its first key column (bigger statements), or "everything"
--   (statements touching over a twentieth of the table, TRUNCATE) to
--   snapbase_private.table_changes. Whoever writes (approval's role, an admin,
--   the owner, a superuser, COPY, a foreign-key cascade), the keys are recorded.
-- * A snapshot is a two-level tree: snapbase_private.snapshot_trees holds, per
--   snapshot, its list of pages; snapbase_private.snapshot_pages holds runs of
--   chunk references with each chunk's first key. Pages, like chunks, start at
--   content-defined keys (a chunk boundary whose hash has 8 more zero bits), so
--   a tree depends only on the table's content, never on its edit history.
-- * Capture starts from the previous snapshot's tree. The chunks whose key
--   ranges hold changed keys are rebuilt, with boundaries recomputed inside those
--   ranges, and only their pages are rewritten; everything else is referenced as
--   it is. The result is exactly the tree a full capture would build (a test
--   checks it), so readers are unchanged and record counts and sizes stay exact.
-- * Whatever tracking cannot vouch for falls back to a full capture, and the
--   snapshot says why (build, build_reason): the first snapshot, changed columns,
--   primary key or chunk size, a table rewrite (relfilenode), tracking triggers
--   disabled, dropped or re-created since the last snapshot (pg_trigger xmin),
--   changed user-defined types (text-form layouts) or column collations, tables
--   without a primary key, partitioned tables, partitions, inheritance parents and
--   children, unlogged tables, tables with row-level security the owner does not
--   bypass, logical replication subscribers, and tables whose owner is not the
--   Snapbase owner (their triggers could not be made ENABLE ALWAYS).
-- * Text-form layouts (enums, domains) with a primary key are incremental too;
--   tables without a primary key are always captured in full.
--
-- snapbase_private.snapshot_chunks is now a view over the trees (same columns,
-- plus row_count, chunk_bytes and boundary); existing snapshots are converted.

--------------------------------------------------------------------------------
-- Storage: trees of pages of chunks
--------------------------------------------------------------------------------

alter table snapbase.snapshots add column if not exists build text;
alter table snapbase.snapshots add column if not exists build_reason text;
alter table snapbase.snapshots add column if not exists chunks_built integer;
alter table snapbase.snapshots add column if not exists build_ms double precision;
comment on column snapbase.snapshots.build is 'incremental: built from the previous snapshot and the keys changed since; full: the whole table was read (build_reason says why).';
comment on column snapbase.snapshots.build_reason is 'Why the whole table was read (null for an incremental snapshot).';
comment on column snapbase.snapshots.chunks_built is 'Chunks read from the live table to build this snapshot (all of them for a full capture); the rest were taken from the previous snapshot.';
comment on column snapbase.snapshots.build_ms is 'Time the capture took, in milliseconds (inside the transaction that took the snapshot).';
create index if not exists snapshots_table_time_idx on snapbase.snapshots (managed_table_id, created_at desc, id desc);

create sequence if not exists snapbase_private.snapshot_page_ids;

create table if not exists snapbase_private.snapshot_pages (
  id bigint primary key,
  chunk_ids bigint[],
  chunk_hashes bytea[],
  bounds text[],
  row_counts integer[] not null,
  chunk_bytes integer[] not null,
  row_count bigint not null,
  stored_bytes bigint not null,
  constraint snapshot_pages_one_store check ((chunk_ids is null) <> (chunk_hashes is null))
);
comment on table snapbase_private.snapshot_pages is
  'Immutable runs of consecutive chunks, shared between snapshots. chunk_ids (binary chunks in the layout''s chunk table) or chunk_hashes (text chunks in chunk_store); bounds: each chunk''s first key as record text (null without a primary key); chunk_bytes: each chunk''s stored (compressed) size.';

create table if not exists snapbase_private.snapshot_trees (
  snapshot_id bigint primary key references snapbase.snapshots on delete cascade,
  page_ids bigint[] not null,
  page_chunks integer[] not null,
  page_rows bigint[] not null,
  page_bytes bigint[] not null,
  page_bounds text[] not null,
  chunk_mask integer
);
alter table snapbase_private.snapshot_trees add column if not exists key_type text;
comment on column snapbase_private.snapshot_trees.key_type is
  'The composite type of the primary key the chunk boundaries (bounds) parse into, with its collations; null without a primary key or before trees.';
comment on table snapbase_private.snapshot_trees is
  'One row per snapshot: its pages in key order, with each page''s chunk count, row count, stored bytes and first key. chunk_mask: the boundary mask the chunks were cut with; null when the tree cannot be a base for an incremental snapshot (converted from before trees, or no primary key).';

do $$ begin
  if not exists (select 1 from pg_trigger where tgrelid = 'snapbase_private.snapshot_pages'::regclass and tgname = '_100_immutable') then
    create trigger _100_immutable before update or delete on snapbase_private.snapshot_pages
      for each row execute function snapbase_private.tg__snapshots_immutable();
    create trigger _100_immutable before update or delete on snapbase_private.snapshot_trees
      for each row execute function snapbase_private.tg__snapshots_immutable();
  end if;
end $$;

-- Snapshots taken before this migration: their chunk lists become trees of pages
-- of 256 chunks (not content-defined, so they never serve as a base: chunk_mask
-- is null). The table becomes a view of the same name.
do $$
declare
  l record;
begin
  if (select c.relkind from pg_class c where c.oid = to_regclass('snapbase_private.snapshot_chunks')) is distinct from 'r' then
    return;
  end if;
  create temp table snapbase_legacy_chunks (snapshot_id bigint, seq integer, chunk_id bigint, chunk_hash bytea,
                                            bound text, row_count integer, bytes integer) on commit drop;
  insert into snapbase_legacy_chunks
    select sc.snapshot_id, sc.seq, null, sc.chunk_hash, null, cs.row_count, pg_column_size(cs.rows)
      from snapbase_private.snapshot_chunks sc join snapbase_private.chunk_store cs on cs.hash = sc.chunk_hash;
  for l in select r.chunk_table from snapbase_private.row_layouts r where r.chunk_table is not null loop
    execute format('insert into snapbase_legacy_chunks
                      select sc.snapshot_id, sc.seq, c.id, null, c.boundary, c.row_count, pg_column_size(c.rows)
                        from snapbase_private.snapshot_chunks sc join %s c on c.id = sc.chunk_id', l.chunk_table);
  end loop;
  with g as (
    select x.snapshot_id, x.seq / 256 as page,
           case when bool_and(x.chunk_id is null) then null else array_agg(x.chunk_id order by x.seq) end as ids,
           case when bool_and(x.chunk_hash is null) then null else array_agg(x.chunk_hash order by x.seq) end as hashes,
           array_agg(x.bound order by x.seq) as bounds, array_agg(x.row_count order by x.seq) as counts,
           array_agg(x.bytes order by x.seq) as bytes, sum(x.row_count) as row_count, sum(x.bytes) as stored_bytes,
           count(*)::integer as n, (array_agg(x.bound order by x.seq))[1] as first_bound
      from snapbase_legacy_chunks x group by x.snapshot_id, x.seq / 256
  ), w as (
    select nextval('snapbase_private.snapshot_page_ids') as id, g.* from g
  ), ins as (
    insert into snapbase_private.snapshot_pages (id, chunk_ids, chunk_hashes, bounds, row_counts, chunk_bytes, row_count, stored_bytes)
    select w.id, w.ids, w.hashes, w.bounds, w.counts, w.bytes, w.row_count, w.stored_bytes from w
  )
  insert into snapbase_private.snapshot_trees (snapshot_id, page_ids, page_chunks, page_rows, page_bytes, page_bounds, chunk_mask)
  select s.id,
         coalesce(array_agg(w.id order by w.page) filter (where w.id is not null), '{}'),
         coalesce(array_agg(w.n order by w.page) filter (where w.id is not null), '{}'),
         coalesce(array_agg(w.row_count order by w.page) filter (where w.id is not null), '{}'),
         coalesce(array_agg(w.stored_bytes order by w.page) filter (where w.id is not null), '{}'),
         coalesce(array_agg(w.first_bound order by w.page) filter (where w.id is not null), '{}'),
         null
    from snapbase.snapshots s left join w on w.snapshot_id = s.id
   group by s.id;
  drop table snapbase_private.snapshot_chunks;
end $$;

-- Every chunk of every snapshot, in order: what the table of this name held before
-- trees (plus row_count, chunk_bytes and boundary). Filter by snapshot_id.
drop view if exists snapbase_private.snapshot_chunks;
create view snapbase_private.snapshot_chunks as
  select t.snapshot_id, (p.first_seq + c.ord - 1)::integer as seq, (p.first_row + c.row_offset)::bigint as first_row,
         c.chunk_hash, c.chunk_id, c.row_count, c.chunk_bytes, c.boundary
    from snapbase_private.snapshot_trees t
    cross join lateral (
      select u.page_id, sum(u.chunks) over w - u.chunks as first_seq, (sum(u.rows) over w - u.rows)::bigint as first_row
        from unnest(t.page_ids, t.page_chunks, t.page_rows) with ordinality as u(page_id, chunks, rows, ord)
      window w as (order by u.ord)
    ) p
    join snapbase_private.snapshot_pages pg on pg.id = p.page_id
    cross join lateral (
      select v.ord, v.chunk_id, v.chunk_hash, v.row_count, v.chunk_bytes, v.boundary,
             sum(v.row_count) over (order by v.ord) - v.row_count as row_offset
        from unnest(pg.chunk_ids, pg.chunk_hashes, pg.row_counts, pg.chunk_bytes, pg.bounds)
             with ordinality as v(chunk_id, chunk_hash, row_count, chunk_bytes, boundary, ord)
    ) c;
comment on view snapbase_private.snapshot_chunks is
  'Every chunk of every snapshot in order (seq, first_row), expanded from snapshot_trees and snapshot_pages. Always filter by snapshot_id.';

--------------------------------------------------------------------------------
-- Change tracking
--------------------------------------------------------------------------------

create table if not exists snapbase_private.table_changes (
  managed_table_id bigint not null,
  keys text[],
  range_lo text,
  range_hi text,
  everything text
);
create index if not exists table_changes_table_idx on snapbase_private.table_changes (managed_table_id);
comment on table snapbase_private.table_changes is
  'Appended by the tracking triggers of managed tables, one row per statement: the primary keys it touched (record text), or the range of its first key column, or why everything must be re-read. Consumed (deleted) by the next snapshot of the table. Never updated, so writers never wait on each other here.';

create table if not exists snapbase_private.change_tracking (
  managed_table_id bigint primary key references snapbase.managed_tables on delete cascade,
  base_snapshot_id bigint,
  fingerprint text
);
comment on table snapbase_private.change_tracking is
  'Per managed table: the snapshot the rows of table_changes are relative to, and the fingerprint (relfilenode, tracking triggers, user-defined types) it was taken under. A snapshot is built incrementally only from that snapshot and under the same fingerprint.';

create table if not exists snapbase_private.pruned_snapshots (
  snapshot_id bigint primary key,
  managed_table_id bigint not null,
  created_at timestamptz not null
);
create index if not exists pruned_snapshots_table_idx on snapbase_private.pruned_snapshots (managed_table_id, created_at);
comment on table snapbase_private.pruned_snapshots is
  'Snapshots removed by retention, so that snapshot_as_of can say that the snapshot in force at a time is gone rather than answer an older one.';

-- Appends what a statement changed (see table_changes). Statement-level, so a bulk
-- statement costs one call; its transition tables are read up to 10,001 rows, and
-- up to a twentieth of the table when the statement is bigger. SECURITY DEFINER: whoever writes
-- the table (a restricted approval role, a DBA), only the owner writes
-- snapbase_private. Key texts use capture's fixed output settings, so they are
-- byte-identical to chunk boundaries and parse back to the same values. The
-- primary key is read from the catalog, never from trigger arguments.
create or replace function snapbase_private.tg__track_changes() returns trigger
language plpgsql
security definer
set search_path = pg_catalog
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set timezone = 'UTC'
set extra_float_digits = 3
set bytea_output = 'hex'
as $$
declare
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
$$;
comment on function snapbase_private.tg__track_changes() is
  'Tracking trigger of managed tables (argument: the managed table id). Records the keys a statement changed so that the next snapshot rebuilds only their chunks. Writes only snapbase_private.table_changes, by appending.';

-- Why the table's changes cannot be tracked right now, or null when its four
-- tracking triggers are in place and fire always. Cheap catalog reads.
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
  return null;
end;
$$;
comment on function snapbase_private.tracking_problem(regclass, bigint) is
  'Null when the managed table''s changes are tracked, else why not. Tables whose rows can change without a statement trigger firing on them (partitions, inheritance parents and children, unlogged tables, subscribers) or whose visible rows depend on policies are never tracked.';

-- What must stay the same between two snapshots for the changes recorded in
-- between to be the whole story: the table's storage (relfilenode: a rewrite such
-- as ALTER COLUMN ... TYPE ... USING changes values without DML), the tracking
-- triggers' catalog rows (xmin moves when they are disabled and enabled again, or
-- re-created), the columns' collations (the key order), and for text-form layouts the user-defined types the rows are
-- rendered with (a renamed enum label changes the text of unchanged rows).
create or replace function snapbase_private.tracking_fingerprint(target regclass, text_form boolean) returns text
language sql stable
set search_path = pg_catalog
as $$
  select concat_ws('|',
    (select c.relfilenode::text from pg_class c where c.oid = target),
    -- A column's collation can change without a rewrite, and with it the key order.
    (select string_agg(a.attcollation::text, ',' order by a.attnum) from pg_attribute a
      where a.attrelid = target and a.attnum > 0 and not a.attisdropped),
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
  'The catalog state under which recorded changes are complete; compared between consecutive snapshots (any difference: a full capture). GRANTs and ANALYZE do not change it.';

-- Puts the four tracking triggers on a managed table (or leaves them when already
-- right). Returns null when tracked, else why not (the table is then snapshotted in
-- full every time). Triggers are made ENABLE ALWAYS, which needs ownership of the
-- table. Re-creating them invalidates the tracking base.
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
  for ev in select * from (values ('insert', 'insert', 'referencing new table as new_rows'),
                                  ('update', 'update', 'referencing old table as old_rows new table as new_rows'),
                                  ('delete', 'delete', 'referencing old table as old_rows'),
                                  ('truncate', 'truncate', '')) v(name, event, ref) loop
    if exists (select 1 from pg_trigger t where t.tgrelid = target and t.tgname = '_900_snapbase_track_' || ev.name) then
      execute format('drop trigger %I on %s', '_900_snapbase_track_' || ev.name, target);
    end if;
    execute format('create trigger %I after %s on %s %s for each statement execute function snapbase_private.tg__track_changes(%L)',
      '_900_snapbase_track_' || ev.name, ev.event, target, ev.ref, mt.id);
    execute format('alter table %s enable always trigger %I', target, '_900_snapbase_track_' || ev.name);
  end loop;
  insert into snapbase_private.change_tracking (managed_table_id, base_snapshot_id, fingerprint)
  values (mt.id, null, null)
  on conflict (managed_table_id) do update set base_snapshot_id = null, fingerprint = null;
  return snapbase_private.tracking_problem(target, mt.id);
end;
$$;
comment on function snapbase_private.arm_tracking(snapbase.managed_tables, regclass) is
  'Installs (or confirms) the tracking triggers of a managed table. Owner only; called by register_table and, when the approving transaction already holds an EXCLUSIVE lock, by capture.';

--------------------------------------------------------------------------------
-- Capture
--------------------------------------------------------------------------------

-- The modulus minus one, for "hash & mask = 0" (migration 000016), unless the
-- setting snapbase.chunk_mask names one (2^k - 1, at most 255): tests use it to
-- get many chunks and pages from few rows. Any mask cuts correct snapshots; a
-- snapshot cut with another mask than its predecessor is captured in full.
create or replace function snapbase_private.chunk_mask(target regclass) returns integer
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  forced text := current_setting('snapbase.chunk_mask', true);
  estimate double precision := (select c.reltuples from pg_class c where c.oid = target);
begin
  if forced in ('0', '1', '3', '7', '15', '31', '63', '127', '255') then
    return forced::integer;
  end if;
  if estimate < 0 then
    execute format('select count(*) from %s', target) into estimate;
  end if;
  if estimate <= 0 then
    return 255;
  end if;
  return (2 ^ least(8, greatest(0, floor(log(2, greatest(1, 4194304 / greatest(1, pg_total_relation_size(target) / estimate))::numeric)))))::integer - 1;
end;
$$;

-- The store function of a layout's binary chunk table: returns the id of an
-- identical stored chunk, or stores this one. Migration 000012 looked for the newest
-- identical chunk (ORDER BY id DESC LIMIT 1); with the chunk table never analyzed,
-- the planner then walked the primary key backwards over every chunk of every
-- snapshot for each lookup (measured at 10M rows: 284 s to store a snapshot of new
-- chunks, 36x the same work into an empty table). Any identical chunk will do, and
-- the boundary index finds the candidates: scans of the whole table are switched
-- off for this one statement. SQL, not PL/pgSQL: PL/pgSQL would expand the array
-- argument element by element on entry.
create or replace function snapbase_private.define_chunk_store(layout_id bigint, type_name text, chunk_table text) returns void
language plpgsql
set search_path = pg_catalog
as $$
begin
  execute format($fn$
    create or replace function snapbase_private.store_chunk_%1$s(boundary text, rows %2$s[], out id bigint, out is_new boolean)
    language sql
    set search_path = pg_catalog
    set enable_seqscan = off
    as $body$
      with found as (
        select c.id from %3$s c
         where c.boundary = $1 and c.row_count = cardinality($2) and record_image_eq(row(c.rows, 0), row($2, 0))
         limit 1
      ), stored as (
        insert into %3$s (boundary, row_count, rows)
        select $1, cardinality($2), $2 where not exists (select from found)
        returning %3$s.id
      )
      select id, false from found union all select id, true from stored
    $body$
  $fn$, layout_id, type_name, chunk_table);
end;
$$;
comment on function snapbase_private.define_chunk_store(bigint, text, text) is
  'Creates or replaces a layout''s store_chunk_<id> function (deduplicating insert into its chunk table, found through the boundary index).';

-- The layout's binary chunk table, created on first use, or null when the layout
-- must stay in text form (migration 000012; the store function is now defined by
-- define_chunk_store).
create or replace function snapbase_private.binary_chunk_store(layout snapbase_private.row_layouts) returns text
language plpgsql
set search_path = pg_catalog
as $$
declare
  store text := format('snapbase_private.chunks_%s', layout.id);
  all_builtin boolean;
begin
  if layout.chunk_table is not null then
    return layout.chunk_table;
  end if;
  select bool_and(t.typnamespace = 'pg_catalog'::regnamespace and t.typname !~ '^_?reg') into all_builtin
    from pg_type lt
    join pg_attribute a on a.attrelid = lt.typrelid and a.attnum > 0 and not a.attisdropped
    join pg_type t on t.oid = a.atttypid
   where lt.oid = layout.type_name::regtype;
  if not coalesce(all_builtin, false) then
    return null;
  end if;
  perform pg_advisory_xact_lock(hashtext('snapbase chunk table ' || layout.id));
  select r.chunk_table into layout.chunk_table from snapbase_private.row_layouts r where r.id = layout.id;
  if layout.chunk_table is not null then
    return layout.chunk_table;
  end if;
  execute format($ddl$
    create table %1$s (
      id bigint primary key default nextval('snapbase_private.binary_chunk_ids'),
      boundary text not null,
      row_count integer not null,
      rows %2$s[] not null
    );
    create index on %1$s (boundary);
    comment on table %1$s is 'Binary snapshot chunks of row layout %3$s; rows never change, only retention deletes unused chunks.';
  $ddl$, store, layout.type_name, layout.id);
  begin
    execute format('alter table %s alter column rows set compression lz4', store);
  exception when feature_not_supported or invalid_parameter_value then
    null; -- server built without lz4: TOAST's default pglz
  end;
  perform snapbase_private.define_chunk_store(layout.id, layout.type_name, store);
  update snapbase_private.row_layouts set chunk_table = store where id = layout.id;
  return store;
end;
$$;

do $$
declare
  l snapbase_private.row_layouts;
begin
  for l in select * from snapbase_private.row_layouts r where r.chunk_table is not null loop
    perform snapbase_private.define_chunk_store(l.id, l.type_name, l.chunk_table);
  end loop;
end $$;

-- The composite type of a table's primary key columns (a row layout of its own),
-- so that key texts (chunk boundaries, tracked keys) parse back into typed values
-- that compare exactly as the table orders them, collation included.
create or replace function snapbase_private.key_type(target regclass, pk text[]) returns text
language sql
set search_path = pg_catalog
as $$
  select (snapbase_private.ensure_layout(jsonb_agg(jsonb_build_object('name', a.attname,
            'type', format_type(a.atttypid, a.atttypmod)
                    || coalesce((select format(' collate %I.%I', n.nspname, co.collname)
                                   from pg_collation co join pg_namespace n on n.oid = co.collnamespace
                                  where co.oid = a.attcollation and a.attcollation <> 100), ''))
          order by k.ord))).type_name
    from unnest(pk) with ordinality as k(name, ord)
    join pg_attribute a on a.attrelid = target and a.attname = k.name
$$;
comment on function snapbase_private.key_type(regclass, text[]) is
  'The composite type of the primary key columns (with their collations), for parsing key texts back into comparable values.';

-- The query yielding the chunks of key ranges, in order, as (region, boundary, h,
-- rows). $1 and $2 are the ranges' first and last keys (inclusive, record text of
-- key_type). Inside each range a chunk starts at the range's first row and at every
-- key hashing to 0 under the mask, exactly as a capture of the whole table cuts
-- (which is the single range from the first key to the last). h is the boundary
-- key's hash (pages start where it has 8 more zero bits). The arrays are built
-- after the sort (PostgreSQL postpones costly target expressions past ORDER BY),
-- so memory holds one chunk.
create or replace function snapbase_private.region_chunk_query(target regclass, pk text[], key_type text, row_expression text, mask integer)
returns text
language sql stable
set search_path = pg_catalog
as $$
  with k as (
    select string_agg(format('t.%I', c), ', ' order by i) as key,
           string_agg(format('t.%I as k%s', c, i), ', ' order by i) as key_as,
           string_agg(format('b.k%s', i), ', ' order by i) as b_key,
           string_agg(format('b.n%s', i), ', ' order by i) as b_next,
           string_agg(format('x.k%s', i), ', ' order by i) as x_key,
           string_agg(format('lead(x.k%1$s) over w as n%1$s', i), ', ' order by i) as leads,
           string_agg(format('(r.lo).%I', c), ', ' order by i) as lo,
           string_agg(format('(r.hi).%I', c), ', ' order by i) as hi,
           string_agg(format('(b.region_hi).%I', c), ', ' order by i) as b_hi
      from unnest(pk) with ordinality as u(c, i)
  )
  select format($q$
    select b.region, row(%3$s)::text as boundary, b.h,
           case when b.last
                then array(select %12$s from %2$s t where (%1$s) >= (%3$s) and (%1$s) <= (%14$s) order by %1$s)
                else array(select %12$s from %2$s t where (%1$s) >= (%3$s) and (%1$s) < (%4$s) order by %1$s)
           end as rows
      from (
        select r.region, r.hi as region_hi, x.*, %6$s, row_number() over w = count(*) over (partition by r.region) as last
          from (select u.region, u.lo::%9$s as lo, u.hi::%9$s as hi
                  from unnest($1::text[], $2::text[]) with ordinality as u(lo, hi, region)) r
          cross join lateral (
            (select %7$s, %8$s as h from %2$s t where (%1$s) >= (%10$s) and (%1$s) <= (%11$s) order by %1$s limit 1)
            union
            (select %7$s, %8$s as h from %2$s t where (%1$s) >= (%10$s) and (%1$s) <= (%11$s) and %8$s & %13$s = 0)
          ) x
        window w as (partition by r.region order by %5$s)
      ) b
     order by b.region, %3$s
  $q$, k.key, target, k.b_key, k.b_next, k.x_key, k.leads, k.key_as, snapbase_private.chunk_boundary_expression(target, pk),
       key_type, k.lo, k.hi, row_expression, mask, k.b_hi)
  from k
$$;
comment on function snapbase_private.region_chunk_query(regclass, text[], text, text, integer) is
  'Chunks of key ranges, cut exactly as a whole-table capture cuts them; a full capture is the one range from the first key to the last.';

-- Builds and stores the chunks of key ranges (see region_chunk_query): binary
-- chunks through the layout's store function, text chunks into chunk_store by
-- SHA-256. Returns, per chunk in order: its range (1-based), reference, boundary,
-- boundary hash, row count, stored size and whether it was new.
create or replace function snapbase_private.build_chunks(
  target regclass, pk text[], key_type text, layout snapbase_private.row_layouts, chunk_table text, mask integer,
  lo text[], hi text[],
  out regions integer[], out ids bigint[], out hashes bytea[], out bounds text[], out boundary_hashes integer[],
  out row_counts integer[], out chunk_bytes integer[], out is_new boolean[])
language plpgsql
set search_path = pg_catalog
as $$
declare
  chunk record;
  n integer := 0;
  inserted integer;
begin
  regions := '{}'; bounds := '{}'; boundary_hashes := '{}'; row_counts := '{}'; is_new := '{}'; chunk_bytes := '{}';
  if cardinality(lo) = 0 then
    ids := case when chunk_table is not null then '{}'::bigint[] end;
    hashes := case when chunk_table is null then '{}'::bytea[] end;
    return;
  end if;
  if chunk_table is not null then
    ids := '{}';
    -- Each chunk is stored (or found) inside the query: its rows never enter this function.
    for chunk in execute format('select q.region, q.boundary, q.h, cardinality(q.rows) as row_count, s.id, s.is_new
                                   from (%s) q cross join lateral snapbase_private.store_chunk_%s(q.boundary, q.rows) s',
                                snapbase_private.region_chunk_query(target, pk, key_type, format('row(t.*)::%s', layout.type_name), mask),
                                layout.id)
                 using lo, hi
    loop
      -- Subscript assignment extends the arrays in place.
      n := n + 1;
      regions[n] := chunk.region;
      ids[n] := chunk.id;
      bounds[n] := chunk.boundary;
      boundary_hashes[n] := chunk.h;
      row_counts[n] := chunk.row_count;
      is_new[n] := chunk.is_new;
    end loop;
    execute format('select coalesce(array_agg(pg_column_size(c.rows) order by u.ord), ''{}'')
                      from unnest($1) with ordinality as u(id, ord) join %s c on c.id = u.id', chunk_table)
      into chunk_bytes using ids;
  else
    hashes := '{}';
    for chunk in execute snapbase_private.region_chunk_query(target, pk, key_type, 't::text', mask) using lo, hi
    loop
      n := n + 1;
      regions[n] := chunk.region;
      hashes[n] := sha256(array_send(chunk.rows));
      bounds[n] := chunk.boundary;
      boundary_hashes[n] := chunk.h;
      row_counts[n] := cardinality(chunk.rows);
      insert into snapbase_private.chunk_store (hash, row_count, rows)
        values (hashes[n], row_counts[n], chunk.rows)
        on conflict (hash) do nothing;
      get diagnostics inserted = row_count;
      is_new[n] := inserted > 0;
    end loop;
    select coalesce(array_agg(pg_column_size(cs.rows) order by u.ord), '{}') into chunk_bytes
      from unnest(hashes) with ordinality as u(hash, ord) join snapbase_private.chunk_store cs on cs.hash = u.hash;
  end if;
end;
$$;
comment on function snapbase_private.build_chunks(regclass, text[], text, snapbase_private.row_layouts, text, integer, text[], text[]) is
  'Reads key ranges of the live table into stored chunks (deduplicated), returning their references and sizes in key order.';

-- Groups consecutive chunks into pages and stores them: a page starts where
-- starts[i] is true, at the first chunk, and wherever runs[i] changes (pages never
-- span two runs). A page equal to one in reuse is not stored again. Returns the
-- pages in order, with the run each belongs to.
create or replace function snapbase_private.store_pages(
  runs integer[], starts boolean[], chunk_ids bigint[], chunk_hashes bytea[], bounds text[], row_counts integer[],
  chunk_bytes integer[], reuse bigint[],
  out page_runs integer[], out page_ids bigint[], out page_chunks integer[], out page_rows bigint[], out page_bytes bigint[],
  out page_bounds text[])
language sql
set search_path = pg_catalog
as $$
  with u as (
    select u.*, u.ord = 1 or u.start or u.run is distinct from lag(u.run) over (order by u.ord) as first_of_page
      from unnest(runs, starts, chunk_ids, chunk_hashes, bounds, row_counts, chunk_bytes)
           with ordinality as u(run, start, id, hash, bound, cnt, bytes, ord)
  ), e as (
    select u.*, sum(u.first_of_page::integer) over (order by u.ord) as page from u
  ), g as (
    select e.page, min(e.run) as run,
           case when bool_and(e.id is null) then null else array_agg(e.id order by e.ord) end as ids,
           case when bool_and(e.hash is null) then null else array_agg(e.hash order by e.ord) end as hashes,
           case when bool_and(e.bound is null) then null else array_agg(e.bound order by e.ord) end as bounds,
           array_agg(e.cnt order by e.ord) as counts, array_agg(e.bytes order by e.ord) as bytes,
           sum(e.cnt) as row_count, sum(e.bytes) as stored_bytes, count(*)::integer as n,
           (array_agg(e.bound order by e.ord))[1] as first_bound
      from e group by e.page
  ), r as (
    select g.*, (select o.id from snapbase_private.snapshot_pages o
                  where o.id = any(reuse) and o.chunk_ids is not distinct from g.ids and o.chunk_hashes is not distinct from g.hashes
                  limit 1) as reused
      from g
  ), w as (
    select coalesce(r.reused, nextval('snapbase_private.snapshot_page_ids')) as id, r.* from r
  ), ins as (
    insert into snapbase_private.snapshot_pages (id, chunk_ids, chunk_hashes, bounds, row_counts, chunk_bytes, row_count, stored_bytes)
    select w.id, w.ids, w.hashes, w.bounds, w.counts, w.bytes, w.row_count, w.stored_bytes from w where w.reused is null
  )
  select coalesce(array_agg(w.run order by w.page), '{}'), coalesce(array_agg(w.id order by w.page), '{}'),
         coalesce(array_agg(w.n order by w.page), '{}'), coalesce(array_agg(w.row_count order by w.page), '{}'),
         coalesce(array_agg(w.stored_bytes order by w.page), '{}'), coalesce(array_agg(w.first_bound order by w.page), '{}')
    from w
$$;
comment on function snapbase_private.store_pages(integer[], boolean[], bigint[], bytea[], text[], integer[], integer[], bigint[]) is
  'Cuts a chunk sequence into pages at the given starts and stores the pages (reusing identical ones from reuse).';

-- A snapshot built from the previous one's tree: locate the pages, then the chunks,
-- whose key ranges hold a changed key (or meet a changed range of the first key
-- column); widen each run of such chunks left while its first key is gone (its rows
-- now belong to the chunk before); re-read those ranges of the live table, cut
-- exactly as a full capture would; and rewrite only their pages. Chunks and pages
-- elsewhere are referenced as they are. Returns note (and no tree) when it would
-- re-read nearly everything anyway.
create or replace function snapbase_private.build_incremental(
  target regclass, pk text[], key_type text, layout snapbase_private.row_layouts, chunk_table text,
  prev snapbase_private.snapshot_trees, keys text[], range_lo text[], range_hi text[],
  out tree snapbase_private.snapshot_trees, out chunks_built integer, out new_bytes bigint, out note text)
language plpgsql
set search_path = pg_catalog
as $$
declare
  page_mask integer := (prev.chunk_mask + 1) * 256 - 1;
  first_seqs integer[];
  total_chunks integer;
  first_col text := pk[1];
  first_type text := (select format_type(a.atttypid, a.atttypmod) from pg_attribute a where a.attrelid = target and a.attname = pk[1]);
  key_list text := (select string_agg(format('t.%I', c), ', ') from unnest(pk) c);
  key_of_k text := (select string_agg(format('(k.k).%I', c), ', ') from unnest(pk) c);
  key_row text := (select format('row(%s)::text', string_agg(format('t.%I', c), ', ')) from unnest(pk) c);
  -- One key column sorts as itself, faster than as a record.
  sort_key text := case when cardinality(pk) = 1 then format('(m.k).%I', pk[1]) else 'm.k' end;
  hit integer[];
  forced integer[] := '{}';
  missing integer[];
  loaded record;
  dirty integer[];
  reg record;
  live record;
  built record;
  spliced record;
  pages record;
  root record;
  kept integer[];
begin
  select coalesce(array_agg(x.s order by x.o), '{}'), coalesce(sum(x.c), 0) into first_seqs, total_chunks
    from (select u.o, u.c, (sum(u.c) over (order by u.o) - u.c)::integer as s
            from unnest(prev.page_chunks) with ordinality as u(c, o)) x;
  if total_chunks = 0 then
    note := 'the previous snapshot is empty';
    return;
  end if;
  if cardinality(keys) = 0 and cardinality(range_lo) = 0 then
    tree := prev;
    chunks_built := 0;
    new_bytes := 0;
    return;
  end if;

  -- Pages whose key range holds a changed key or meets a changed range.
  execute format($q$
    with pb as materialized (select u.ord::integer as ord, u.b::%1$s as k from unnest($1::text[]) with ordinality as u(b, ord)),
         m as (select pb.k, pb.ord from pb union all select k::%1$s, null::integer from (select distinct k from unnest($2::text[]) as k) ks),
         located as (select m.ord, coalesce(max(m.ord) over (order by %4$s, m.ord is null rows unbounded preceding), 1) as page from m),
         -- Materialized: otherwise the join below re-runs these scans for every page.
         rp as materialized (select coalesce((select max(q.ord) from pb q where (q.k).%2$I < r.lo::%3$s), 1) as first_page,
                       coalesce((select max(q.ord) from pb q where (q.k).%2$I <= r.hi::%3$s), 1) as last_page
                  from unnest($3::text[], $4::text[]) as r(lo, hi))
    select coalesce(array_agg(distinct x.page order by x.page), '{}')
      from (select located.page from located where located.ord is null
            union select pb.ord from pb join rp on pb.ord between rp.first_page and rp.last_page) x
  $q$, key_type, first_col, first_type, sort_key) into hit using prev.page_bounds, keys, range_lo, range_hi;

  loop
    -- The chunks of those pages (seq: position in the whole snapshot).
    select coalesce(array_agg(v.seq order by v.seq), '{}') as seq, coalesce(array_agg(v.page order by v.seq), '{}') as page,
           coalesce(array_agg(v.pos order by v.seq), '{}') as pos, coalesce(array_agg(v.chunk_id order by v.seq), '{}') as id,
           coalesce(array_agg(v.chunk_hash order by v.seq), '{}') as hash, coalesce(array_agg(v.bound order by v.seq), '{}') as bound,
           coalesce(array_agg(v.row_count order by v.seq), '{}') as cnt, coalesce(array_agg(v.bytes order by v.seq), '{}') as bytes
      into loaded
      from (select first_seqs[h.p] + c.ord::integer - 1 as seq, h.p as page, c.ord::integer as pos, c.chunk_id, c.chunk_hash,
                   c.bound, c.row_count, c.bytes
              from unnest(hit) as h(p)
              join snapbase_private.snapshot_pages pg on pg.id = prev.page_ids[h.p]
              cross join lateral unnest(pg.chunk_ids, pg.chunk_hashes, pg.bounds, pg.row_counts, pg.chunk_bytes)
                         with ordinality as c(chunk_id, chunk_hash, bound, row_count, bytes, ord)) v;

    -- The chunks whose key range holds a changed key or meets a changed range.
    execute format($q$
      with cb as materialized (select u.seq, u.b::%1$s as k from unnest($1::integer[], $2::text[]) as u(seq, b)),
           m as (select cb.k, cb.seq from cb union all select k::%1$s, null::integer from (select distinct k from unnest($3::text[]) as k) ks),
           located as (select m.seq, coalesce(max(m.seq) over (order by %4$s, m.seq is null rows unbounded preceding), 0) as chunk from m),
           -- Materialized: otherwise the join below re-runs these scans for every chunk.
           rc as materialized (select coalesce((select max(q.seq) from cb q where (q.k).%2$I < r.lo::%3$s), 0) as first_chunk,
                         coalesce((select max(q.seq) from cb q where (q.k).%2$I <= r.hi::%3$s), 0) as last_chunk
                    from unnest($4::text[], $5::text[]) as r(lo, hi))
      select coalesce(array_agg(distinct x.chunk order by x.chunk), '{}')
        from (select located.chunk from located where located.seq is null
              union select cb.seq from cb join rc on cb.seq between rc.first_chunk and rc.last_chunk
              union select unnest($6::integer[])) x
    $q$, key_type, first_col, first_type, sort_key) into dirty using loaded.seq, loaded.bound, keys, range_lo, range_hi, forced;

    -- Runs of consecutive dirty chunks, with the old boundary keys around them
    -- (null: the start or the end of the table).
    select coalesce(array_agg(r.s order by r.s), '{}') as s, coalesce(array_agg(r.e order by r.s), '{}') as e,
           coalesce(array_agg(case when r.s = 0 then null else e1.bound end order by r.s), '{}') as lo,
           coalesce(array_agg(case when r.e + 1 >= total_chunks then null
                                   else coalesce(e2.bound, prev.page_bounds[array_position(first_seqs, r.e + 1)]) end order by r.s), '{}') as hi
      into reg
      from (select min(g.seq) as s, max(g.seq) as e
              from (select d.seq, d.seq - row_number() over (order by d.seq) as grp from unnest(dirty) as d(seq)) g
             group by g.grp) r
      left join unnest(loaded.seq, loaded.bound) as e1(seq, bound) on e1.seq = r.s
      left join unnest(loaded.seq, loaded.bound) as e2(seq, bound) on e2.seq = r.e + 1;

    -- A run whose first key is gone: its rows up to the next boundary now belong to
    -- the chunk before, which must be rebuilt too.
    execute format($q$
      select coalesce(array_agg(u.s - 1), '{}')
        from unnest($1::integer[], $2::text[]) as u(s, lo)
        cross join lateral (select u.lo::%1$s as k) k
       where u.lo is not null and not exists (select from %2$s t where (%3$s) = (%4$s))
    $q$, key_type, target, key_list, key_of_k) into missing using reg.s, reg.lo;
    exit when cardinality(missing) = 0;
    forced := forced || missing;
    select array_agg(distinct p order by p) into hit
      from (select unnest(hit) as p
            union select (select max(u.o)::integer from unnest(first_seqs) with ordinality as u(f, o) where u.f <= m.s)
              from unnest(missing) as m(s)) x;
  end loop;

  -- Past half the chunks, reading the table in one range is cheaper than many ranges.
  if cardinality(dirty) > 16 and cardinality(dirty) * 2 > total_chunks then
    note := format('%s of %s chunks changed', cardinality(dirty), total_chunks);
    return;
  end if;

  -- The live keys that now start and end each run (null when the run is now empty).
  execute format($q$
    select coalesce(array_agg(case when x.lo_live is null or x.hi_live is null or x.hi_live::%1$s < x.lo_live::%1$s then null else x.lo_live end order by u.i), '{}') as lo,
           coalesce(array_agg(case when x.lo_live is null or x.hi_live is null or x.hi_live::%1$s < x.lo_live::%1$s then null else x.hi_live end order by u.i), '{}') as hi
      from unnest($1::text[], $2::text[]) with ordinality as u(lo, hi, i)
      cross join lateral (select u.hi::%1$s as k) k
      cross join lateral (
        select case when u.lo is null then (select %4$s from %2$s t order by %3$s limit 1) else u.lo end as lo_live,
               case when u.hi is null then (select %4$s from %2$s t order by %5$s limit 1)
                    else (select %4$s from %2$s t where (%3$s) < (%6$s) order by %5$s limit 1) end as hi_live
      ) x
  $q$, key_type, target, key_list, key_row,
       (select string_agg(format('t.%I desc', c), ', ') from unnest(pk) c), key_of_k)
    into live using reg.lo, reg.hi;

  select array_agg(u.i::integer order by u.i) into kept from unnest(live.lo) with ordinality as u(lo, i) where u.lo is not null;
  built := snapbase_private.build_chunks(target, pk, key_type, layout, chunk_table, prev.chunk_mask,
             coalesce((select array_agg(live.lo[k]) from unnest(kept) k), '{}'),
             coalesce((select array_agg(live.hi[k]) from unnest(kept) k), '{}'));

  -- The new chunk sequence of each run of consecutive rewritten pages: the pages'
  -- chunks outside dirty runs, and the rebuilt chunks in place of each dirty run.
  select coalesce(array_agg(z.run order by z.run, z.k1, z.k2), '{}') as run,
         coalesce(array_agg(z.start order by z.run, z.k1, z.k2), '{}') as start,
         case when chunk_table is null then null else coalesce(array_agg(z.id order by z.run, z.k1, z.k2), '{}') end as id,
         case when chunk_table is null then coalesce(array_agg(z.hash order by z.run, z.k1, z.k2), '{}') end as hash,
         coalesce(array_agg(z.bound order by z.run, z.k1, z.k2), '{}') as bound,
         coalesce(array_agg(z.cnt order by z.run, z.k1, z.k2), '{}') as cnt,
         coalesce(array_agg(z.bytes order by z.run, z.k1, z.k2), '{}') as bytes
    into spliced
    from (
      with runs as (select h.p, min(h.p) over (partition by h.p - h.o) as run
                      from unnest(hit) with ordinality as h(p, o)),
           spans as (select u.s, u.e, u.i from unnest(reg.s, reg.e) with ordinality as u(s, e, i)),
           old as (select * from unnest(loaded.seq, loaded.page, loaded.pos, loaded.id, loaded.hash, loaded.bound, loaded.cnt, loaded.bytes)
                              as o(seq, page, pos, id, hash, bound, cnt, bytes))
      select runs.run, old.seq as k1, 0 as k2, old.pos = 1 as start, old.id, old.hash, old.bound, old.cnt, old.bytes
        from old join runs on runs.p = old.page
       where not exists (select 1 from unnest(dirty) as d(seq) where d.seq = old.seq)
      union all
      select runs.run, spans.s, n.idx::integer, (n.h & page_mask) = 0, n.id, n.hash, n.bound, n.cnt, n.bytes
        from unnest(built.regions, built.ids, built.hashes, built.bounds, built.boundary_hashes, built.row_counts, built.chunk_bytes)
             with ordinality as n(reg, id, hash, bound, h, cnt, bytes, idx)
        join spans on spans.i = kept[n.reg]
        join old on old.seq = spans.s
        join runs on runs.p = old.page
    ) z;
  pages := snapbase_private.store_pages(spliced.run, spliced.start, spliced.id, spliced.hash, spliced.bound, spliced.cnt,
                                        spliced.bytes, (select array_agg(prev.page_ids[h]) from unnest(hit) h));

  -- The new root: untouched pages as they were, each run of rewritten pages replaced.
  select coalesce(array_agg(m.id order by m.k1, m.k2), '{}') as ids, coalesce(array_agg(m.chunks order by m.k1, m.k2), '{}') as chunks,
         coalesce(array_agg(m.rows order by m.k1, m.k2), '{}') as rows, coalesce(array_agg(m.bytes order by m.k1, m.k2), '{}') as bytes,
         coalesce(array_agg(m.bound order by m.k1, m.k2), '{}') as bounds
    into root
    from (select o.ord::integer as k1, 0 as k2, o.id, o.chunks, o.rows, o.bytes, o.bound
            from unnest(prev.page_ids, prev.page_chunks, prev.page_rows, prev.page_bytes, prev.page_bounds)
                 with ordinality as o(id, chunks, rows, bytes, bound, ord)
           where o.ord <> all (hit)
          union all
          select n.run, n.i::integer, n.id, n.chunks, n.rows, n.bytes, n.bound
            from unnest(pages.page_runs, pages.page_ids, pages.page_chunks, pages.page_rows, pages.page_bytes, pages.page_bounds)
                 with ordinality as n(run, id, chunks, rows, bytes, bound, i)) m;

  tree := row(null, root.ids, root.chunks, root.rows, root.bytes, root.bounds, prev.chunk_mask, key_type)::snapbase_private.snapshot_trees;
  chunks_built := cardinality(built.row_counts);
  new_bytes := coalesce((select sum(b) from unnest(built.chunk_bytes, built.is_new) as u(b, n) where u.n), 0);
end;
$$;
comment on function snapbase_private.build_incremental(regclass, text[], text, snapbase_private.row_layouts, text, snapbase_private.snapshot_trees, text[], text[], text[]) is
  'The next tree from the previous one and the changed keys/ranges, touching only the chunks and pages that hold them; the result equals a full capture''s tree.';

-- A tree of the whole table, read in full.
create or replace function snapbase_private.build_full(
  target regclass, pk text[], key_type text, layout snapbase_private.row_layouts, chunk_table text,
  out tree snapbase_private.snapshot_trees, out chunks_built integer, out new_bytes bigint)
language plpgsql
set search_path = pg_catalog
as $$
declare
  mask integer := snapbase_private.chunk_mask(target);
  first_key text;
  last_key text;
  built record;
  pages record;
  chunk record;
  n integer := 0;
  hashes bytea[] := '{}';
  counts integer[] := '{}';
  is_new boolean[] := '{}';
  bytes integer[];
  inserted integer;
begin
  if pk is not null then
    -- One range, from the first key to the last.
    execute format('select (select row(%1$s)::text from %2$s t order by %1$s limit 1), (select row(%1$s)::text from %2$s t order by %3$s limit 1)',
                   (select string_agg(format('t.%I', c), ', ') from unnest(pk) c), target,
                   (select string_agg(format('t.%I desc', c), ', ') from unnest(pk) c))
      into first_key, last_key;
    built := snapbase_private.build_chunks(target, pk, key_type, layout, chunk_table, mask,
               case when first_key is null then '{}' else array[first_key] end,
               case when first_key is null then '{}' else array[last_key] end);
    pages := snapbase_private.store_pages(array_fill(1, array[cardinality(built.row_counts)]),
               array(select u.ord = 1 or (u.h & ((mask + 1) * 256 - 1)) = 0 from unnest(built.boundary_hashes) with ordinality as u(h, ord) order by u.ord),
               built.ids, built.hashes, built.bounds, built.row_counts, built.chunk_bytes, '{}');
    chunks_built := cardinality(built.row_counts);
    new_bytes := coalesce((select sum(b) from unnest(built.chunk_bytes, built.is_new) as u(b, n) where u.n), 0);
  else
    -- No primary key: the rows' text in one ordered pass (migration 000016), pages of 256 chunks.
    for chunk in execute snapbase_private.chunk_query(target, pk, 't::text')
    loop
      n := n + 1;
      hashes[n] := sha256(array_send(chunk.rows));
      counts[n] := chunk.row_count;
      insert into snapbase_private.chunk_store (hash, row_count, rows)
        values (hashes[n], chunk.row_count, chunk.rows)
        on conflict (hash) do nothing;
      get diagnostics inserted = row_count;
      is_new[n] := inserted > 0;
    end loop;
    select coalesce(array_agg(pg_column_size(cs.rows) order by u.ord), '{}') into bytes
      from unnest(hashes) with ordinality as u(hash, ord) join snapbase_private.chunk_store cs on cs.hash = u.hash;
    pages := snapbase_private.store_pages(array_fill(1, array[n]), array(select (g - 1) % 256 = 0 from generate_series(1, n) g),
               null, hashes, array_fill(null::text, array[n]), counts, bytes, '{}');
    chunks_built := n;
    new_bytes := coalesce((select sum(b) from unnest(bytes, is_new) as u(b, x) where u.x), 0);
    mask := null;
  end if;
  tree := row(null, pages.page_ids, pages.page_chunks, pages.page_rows, pages.page_bytes, pages.page_bounds, mask,
              case when pk is not null then key_type end)::snapbase_private.snapshot_trees;
end;
$$;
comment on function snapbase_private.build_full(regclass, text[], text, snapbase_private.row_layouts, text) is
  'A tree of the whole table read in full: the first snapshot, and every fallback of capture_snapshot.';

-- Stores the table as it stands now. Runs as the owner; callers check rights and
-- hold a lock that keeps writers out. Built from the previous snapshot and the
-- changes tracked since whenever that is known to be exact; otherwise (or with
-- full_capture, or snapbase.capture = 'full') from the whole table. The snapshot
-- records which (build, build_reason, chunks_built, build_ms).
drop function if exists snapbase_private.capture_snapshot(snapbase.managed_tables, bigint, text);
create or replace function snapbase_private.capture_snapshot(mt snapbase.managed_tables, change_request_id bigint, reason text,
                                                             full_capture boolean default false)
returns snapbase.snapshots
language plpgsql
security definer
set search_path = pg_catalog
-- Fixed output settings make each row's text form exact and reproducible.
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set timezone = 'UTC'
set extra_float_digits = 3
set bytea_output = 'hex'
-- Thousands of small index scans: compiling them costs more than it saves.
set jit = off
-- No internal NOTICE reaches whoever approves ("already exists, skipping" and the like).
set client_min_messages = warning
as $$
declare
  started timestamptz := clock_timestamp();
  target regclass := snapbase_private.relation_of(mt);
  cols jsonb;
  pk text[];
  layout snapbase_private.row_layouts;
  chunk_table text;
  key_type text;
  problem text;
  fingerprint text;
  tracking snapbase_private.change_tracking;
  prev snapbase.snapshots;
  prev_tree snapbase_private.snapshot_trees;
  why text;
  everything text;
  keys text[];
  range_lo text[];
  range_hi text[];
  built record;
  tree snapbase_private.snapshot_trees;
  chunks_built integer;
  new_bytes bigint;
  snap snapbase.snapshots;
begin
  if target is null then
    raise exception 'managed table % no longer exists', mt.qualified_name using errcode = '42P01';
  end if;
  cols := snapbase_private.table_columns(target);
  pk := snapbase_private.primary_key(target);
  layout := snapbase_private.ensure_layout(cols);
  if pk is not null then
    chunk_table := snapbase_private.binary_chunk_store(layout);
    key_type := snapbase_private.key_type(target, pk);
  end if;

  -- Retention deletes chunks no snapshot references; a capture may have just found
  -- such a chunk identical to one it builds. Captures share this lock, retention
  -- takes it alone (remove_unused_chunks), so neither sees the other half done.
  perform pg_advisory_xact_lock_shared(hashtext('snapbase chunk retention'));
  problem := snapbase_private.tracking_problem(target, mt.id);
  -- Triggers someone disabled or dropped are put back when this transaction already
  -- holds a lock at least as strong as the one that takes (approval holds EXCLUSIVE);
  -- take_snapshot's SHARE lock could deadlock on the upgrade.
  if problem like 'the tracking triggers%' and exists (
       select 1 from pg_locks l
        where l.locktype = 'relation' and l.relation = target and l.pid = pg_backend_pid() and l.granted
          and l.database = (select d.oid from pg_database d where d.datname = current_database())
          and l.mode in ('ExclusiveLock', 'AccessExclusiveLock')) then
    problem := snapbase_private.arm_tracking(mt, target);
  end if;
  fingerprint := snapbase_private.tracking_fingerprint(target, chunk_table is null);
  select * into tracking from snapbase_private.change_tracking c where c.managed_table_id = mt.id;
  select * into prev from snapbase.snapshots s where s.managed_table_id = mt.id order by s.id desc limit 1;
  if prev.id is not null then
    select * into prev_tree from snapbase_private.snapshot_trees t where t.snapshot_id = prev.id;
  end if;

  -- A TRUNCATE or a statement over a twentieth of the table: re-read it all.
  select min(c.everything) into everything from snapbase_private.table_changes c where c.managed_table_id = mt.id;
  why := case
    when full_capture or current_setting('snapbase.capture', true) = 'full' then 'a full capture was asked for'
    when pk is null then 'the table has no primary key'
    when prev.id is null then 'the first snapshot of the table'
    when problem is not null then 'changes are not tracked: ' || problem
    when tracking.base_snapshot_id is distinct from prev.id then format('changes since snapshot %s were not tracked', prev.id)
    when prev.layout_id <> layout.id then format('the columns changed since snapshot %s', prev.id)
    when prev.primary_key is distinct from pk then format('the primary key changed since snapshot %s', prev.id)
    when everything is not null then everything
    when tracking.fingerprint is distinct from fingerprint then
      format('the table was rewritten, or its tracking triggers or column types were altered, since snapshot %s', prev.id)
    when prev_tree.chunk_mask is null then format('snapshot %s predates incremental snapshots', prev.id)
    when prev_tree.key_type is distinct from key_type then format('the primary key''s types or collations changed since snapshot %s', prev.id)
    -- Never-analyzed tables keep the previous mask (chunk_mask would count every row).
    when (select c.reltuples from pg_class c where c.oid = target) >= 0
         and snapbase_private.chunk_mask(target) <> prev_tree.chunk_mask then 'the average row size changed the chunk size'
  end;
  if why is null then
    select coalesce(array_agg(k), '{}') into keys
      from snapbase_private.table_changes c cross join lateral unnest(c.keys) k where c.managed_table_id = mt.id;
    select coalesce(array_agg(c.range_lo), '{}'), coalesce(array_agg(c.range_hi), '{}') into range_lo, range_hi
      from snapbase_private.table_changes c where c.managed_table_id = mt.id and c.range_lo is not null;
    if cardinality(keys) > greatest(100000, prev.record_count / 4) then
      why := format('%s keys changed', cardinality(keys));
    else
      built := snapbase_private.build_incremental(target, pk, key_type, layout, chunk_table, prev_tree, keys, range_lo, range_hi);
      why := built.note;
      tree := built.tree;
      chunks_built := built.chunks_built;
      new_bytes := built.new_bytes;
    end if;
  end if;
  if why is not null then
    built := snapbase_private.build_full(target, pk, key_type, layout, chunk_table);
    tree := built.tree;
    chunks_built := built.chunks_built;
    new_bytes := built.new_bytes;
  end if;

  insert into snapbase.snapshots (managed_table_id, table_name, change_request_id, reason, created_by,
                                  record_count, columns, primary_key, chunk_count, stored_bytes, new_stored_bytes, layout_id,
                                  build, build_reason, chunks_built, build_ms)
  values (mt.id, mt.qualified_name, change_request_id, reason,
          snapbase_private.actor_name(),
          coalesce((select sum(r) from unnest(tree.page_rows) r), 0), cols, pk,
          coalesce((select sum(c) from unnest(tree.page_chunks) c), 0),
          coalesce((select sum(b) from unnest(tree.page_bytes) b), 0), new_bytes, layout.id,
          case when why is null then 'incremental' else 'full' end, why, chunks_built,
          extract(epoch from clock_timestamp() - started) * 1000)
  returning * into snap;
  tree.snapshot_id := snap.id;
  insert into snapbase_private.snapshot_trees select tree.*;

  -- The changes recorded so far are in this snapshot; later ones are relative to it.
  insert into snapbase_private.change_tracking (managed_table_id, base_snapshot_id, fingerprint)
  values (mt.id, case when problem is null then snap.id end, fingerprint)
  on conflict (managed_table_id) do update set base_snapshot_id = excluded.base_snapshot_id, fingerprint = excluded.fingerprint;
  delete from snapbase_private.table_changes c where c.managed_table_id = mt.id;

  return snap;
end;
$$;
comment on function snapbase_private.capture_snapshot(snapbase.managed_tables, bigint, text, boolean) is
  'Snapshot the managed table now (owner; callers check rights and lock out writers). Incremental when the tracked changes since the newest snapshot are known to be complete, else full; the snapshot row says which and why.';

-- Approval's entry point (its signature is a contract with approve_change).
create or replace function snapbase_private.capture_for_change(cr snapbase.change_requests) returns snapbase.snapshots
language sql
security definer
set search_path = pg_catalog
as $$
  select snapbase_private.capture_snapshot(m, cr.id, coalesce(cr.reason, format('change request %s', cr.id)))
    from snapbase.managed_tables m where m.id = cr.managed_table_id
$$;

--------------------------------------------------------------------------------
-- Readers
--------------------------------------------------------------------------------

-- A snapshot's chunks as a FROM item with (snapshot_id, seq, first_row, chunk_hash,
-- chunk_id, row_count, rows), rows being an array of the snapshot's layout type
-- whichever way they are stored. Filter it by snapshot_id. Text chunks are parsed
-- only for chunks a query keeps.
create or replace function snapbase_private.snapshot_chunk_source(snap snapbase.snapshots) returns text
language sql stable
set search_path = pg_catalog
as $$
  select case when exists (select 1 from snapbase_private.snapshot_trees t join snapbase_private.snapshot_pages p on p.id = t.page_ids[1]
                            where t.snapshot_id = snap.id and p.chunk_ids is not null)
    then format('(select sc.snapshot_id, sc.seq, sc.first_row, sc.chunk_hash, sc.chunk_id, sc.row_count, c.rows
                    from snapbase_private.snapshot_chunks sc join %s c on c.id = sc.chunk_id)', l.chunk_table)
    else format('(select sc.snapshot_id, sc.seq, sc.first_row, sc.chunk_hash, sc.chunk_id, sc.row_count, c.rows::%s[] as rows
                    from snapbase_private.snapshot_chunks sc join snapbase_private.chunk_store c on c.hash = sc.chunk_hash)', l.type_name)
  end
  from snapbase_private.row_layouts l where l.id = snap.layout_id
$$;

create or replace function snapbase.snapshot_diff(from_id bigint, to_id bigint) returns setof snapbase.snapshot_diff_row
language plpgsql stable
security definer
set search_path = pg_catalog
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set timezone = 'UTC'
set extra_float_digits = 3
set bytea_output = 'hex'
as $$
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
           select to_jsonb(r.rec) - $4 as j
             from %1$s c cross join lateral (select unnest(c.rows) as rec) r
            where c.snapshot_id = $1
              and exists (select 1 from ea where ea.cid = coalesce(c.chunk_id, -1) and ea.chash = coalesce(c.chunk_hash, '\x'))
              and not exists (select 1 from eb where eb.cid = coalesce(c.chunk_id, -1) and eb.chash = coalesce(c.chunk_hash, '\x'))),
         only_b as (
           select to_jsonb(r.rec) - $4 as j
             from %2$s c cross join lateral (select unnest(c.rows) as rec) r
            where c.snapshot_id = $2
              and exists (select 1 from eb where eb.cid = coalesce(c.chunk_id, -1) and eb.chash = coalesce(c.chunk_hash, '\x'))
              and not exists (select 1 from ea where ea.cid = coalesce(c.chunk_id, -1) and ea.chash = coalesce(c.chunk_hash, '\x'))),
         keyed_a as (
           select (select jsonb_object_agg(k, j -> k) from unnest($3::text[]) k) as key, j from only_a
         ), keyed_b as (
           select (select jsonb_object_agg(k, j -> k) from unnest($3::text[]) k) as key, j from only_b
         )
    select case when ka.key is null then 'added' when kb.key is null then 'removed' else 'changed' end,
           coalesce(kb.key, ka.key),
           case when ka.key is not null and kb.key is not null then
             array(select f from (select jsonb_object_keys(ka.j || kb.j) as f) fs
                    where (ka.j -> f) is distinct from (kb.j -> f) order by f)
           end,
           ka.j, kb.j
      from keyed_a ka full join keyed_b kb on ka.key = kb.key
     where ka.j is distinct from kb.j
     order by coalesce(kb.key, ka.key)
  $q$, snapbase_private.snapshot_chunk_source(a), snapbase_private.snapshot_chunk_source(b))
  using a.id, b.id, key_cols, hidden;
end;
$$;

--------------------------------------------------------------------------------
-- Retention
--------------------------------------------------------------------------------

-- Deletes stored pages and chunks no snapshot uses any more; returns how many chunks.
-- Waits for captures in progress, and they for it.
create or replace function snapbase_private.remove_unused_chunks() returns bigint
language plpgsql
set search_path = pg_catalog
as $$
declare
  removed bigint := 0;
  n bigint;
  chunk_table text;
  pruning text := current_setting('snapbase.pruning', true);
begin
  -- No capture is between finding a stored chunk and referencing it (see capture_snapshot).
  perform pg_advisory_xact_lock(hashtext('snapbase chunk retention'));
  perform set_config('snapbase.pruning', 'on', true);
  delete from snapbase_private.snapshot_pages p
   where not exists (select 1 from (select unnest(t.page_ids) as id from snapbase_private.snapshot_trees t) r where r.id = p.id);
  delete from snapbase_private.chunk_store cs
   where not exists (select 1 from (select unnest(p.chunk_hashes) as hash from snapbase_private.snapshot_pages p) r where r.hash = cs.hash);
  get diagnostics n = row_count;
  removed := removed + n;
  for chunk_table in select l.chunk_table from snapbase_private.row_layouts l where l.chunk_table is not null loop
    execute format('delete from %s c where not exists (select 1 from (select unnest(p.chunk_ids) as id from snapbase_private.snapshot_pages p) r where r.id = c.id)',
                   chunk_table);
    get diagnostics n = row_count;
    removed := removed + n;
  end loop;
  perform set_config('snapbase.pruning', coalesce(pruning, 'off'), true);
  return removed;
end;
$$;

create or replace function snapbase_private.prune_snapshots() returns integer
language plpgsql
set search_path = pg_catalog
as $$
declare
  doomed bigint[];
  chunks_removed bigint;
begin
  select coalesce(array_agg(s.id order by s.id), '{}') into doomed
    from (
      select s.id, s.created_at, m.keep_last, m.keep_days,
             row_number() over (partition by s.managed_table_id order by s.id desc) as newest_rank
        from snapbase.snapshots s join snapbase.managed_tables m on m.id = s.managed_table_id
    ) s
   where s.newest_rank > 1
     and (s.keep_last is not null or s.keep_days is not null)
     and (s.keep_last is null or s.newest_rank > s.keep_last)
     and (s.keep_days is null or s.created_at < now() - make_interval(days => s.keep_days));
  -- Changes recorded for tables no longer managed.
  delete from snapbase_private.table_changes c
   where not exists (select 1 from snapbase.managed_tables m where m.id = c.managed_table_id);
  if cardinality(doomed) = 0 then
    return 0;
  end if;
  insert into snapbase_private.pruned_snapshots (snapshot_id, managed_table_id, created_at)
    select s.id, s.managed_table_id, s.created_at from snapbase.snapshots s where s.id = any(doomed)
  on conflict do nothing;
  perform set_config('snapbase.pruning', 'on', true);
  delete from snapbase.snapshots where id = any(doomed);
  chunks_removed := snapbase_private.remove_unused_chunks();
  perform set_config('snapbase.pruning', 'off', true);
  perform snapbase_private.audit('retention_prune', 'snapshot', null, null,
    jsonb_build_object('snapshot_ids', doomed, 'chunks_removed', chunks_removed));
  return cardinality(doomed);
end;
$$;

--------------------------------------------------------------------------------
-- Registering a table arms its tracking
--------------------------------------------------------------------------------

create or replace function snapbase.register_table(target regclass, keep_last integer default 50, keep_days integer default null)
returns snapbase.managed_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  rel record;
  registered snapbase.managed_tables;
  untracked text;
begin
  perform snapbase_private.require_role('admin');
  select n.nspname, c.relname, c.relkind into rel
    from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = target;
  if rel.relkind not in ('r', 'p') then
    raise exception '% is not a table', target using errcode = '42809';
  end if;
  if rel.nspname in ('snapbase', 'snapbase_private', 'pg_catalog', 'information_schema') then
    raise exception 'tables in schema % cannot be placed under change control', rel.nspname using errcode = '42501';
  end if;
  insert into snapbase.managed_tables (schema_name, table_name, keep_last, keep_days, registered_by)
  values (rel.nspname, rel.relname, keep_last, keep_days,
          snapbase_private.actor_name())
  on conflict (schema_name, table_name) do update
    set keep_last = excluded.keep_last, keep_days = excluded.keep_days
  returning * into registered;
  -- Change tracking (snapshots built from the previous one); null when armed.
  untracked := snapbase_private.arm_tracking(registered, target);
  perform snapbase_private.audit('register_table', 'managed_table', registered.id::text, registered.qualified_name,
    jsonb_build_object('keep_last', keep_last, 'keep_days', keep_days)
      || case when untracked is null then '{}'::jsonb else jsonb_build_object('untracked', untracked) end);
  -- What the table still needs before changes to it can be approved (a WARNING, with the GRANTs to run).
  perform snapbase_private.warn_registration_problems(target);
  return registered;
end;
$$;
comment on function snapbase.register_table(regclass, integer, integer) is 'Put a table under change control (admins). Re-registering updates the retention policy and re-arms change tracking.';

--------------------------------------------------------------------------------
-- Row history and the snapshot in force at a time
--------------------------------------------------------------------------------

-- The managed table for a relation, if the caller may read it; the same error
-- whether it is not managed or not readable.
create or replace function snapbase_private.readable_managed_table(target regclass) returns snapbase.managed_tables
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  found snapbase.managed_tables;
begin
  select m.* into found from snapbase.managed_tables m where snapbase_private.relation_of(m) = target;
  if found.id is null or not snapbase_private.can_read(found) then
    raise exception 'table % is not under change control', target using errcode = '42501';
  end if;
  return found;
end;
$$;
grant execute on function snapbase_private.readable_managed_table(regclass) to :ROLE_VIEWER;

create or replace function snapbase.row_history(target regclass, key jsonb)
returns table (snapshot_id bigint, created_at timestamptz, change_request_id bigint, change text, changed_fields text[], "row" jsonb)
language plpgsql stable
security definer
set search_path = pg_catalog
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
        if chunk_identity is not distinct from last_identity then
          raw := previous;  -- the same chunk: the same row
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
        last_identity := chunk_identity;
      elsif found.bounded is not null then
        -- A snapshot from before trees kept no text-chunk boundaries: read it all.
        execute format($q$
          select to_jsonb(r.rec) from %1$s c cross join lateral (select unnest(c.rows) as rec) r
           where c.snapshot_id = $1 and (%2$s) = (%3$s)
        $q$, snapbase_private.snapshot_chunk_source(s),
          (select string_agg(format('(r.rec).%I', c), ', ') from unnest(s.primary_key) c),
          (select string_agg(format('(jsonb_populate_record(null::%s, $2)).%I', kt, c), ', ') from unnest(s.primary_key) c))
          into raw using s.id, key;
        last_identity := null;
      end if;
    end if;
    visible := raw - snapbase_private.hidden_columns(s);
    if raw is not null or previous is not null then
      n := n + 1;
      out_ids[n] := s.id;
      out_at[n] := s.created_at;
      out_cr[n] := s.change_request_id;
      out_rows[n] := visible;
      out_change[n] := case when raw is null then 'removed'
                            when previous is null then case when older then 'added' else 'initial' end
                            when raw = previous then 'unchanged'
                            else 'changed' end;
    end if;
    previous := raw;
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
  'One row''s values across the table''s snapshots, newest first: initial (in the oldest snapshot), added, changed (with the fields), unchanged or removed, with the change request that took each snapshot. Reads only the chunk holding the key in each snapshot. Needs the right to read the live table.';
grant execute on function snapbase.row_history(regclass, jsonb) to :ROLE_VIEWER;

create or replace function snapbase.snapshot_as_of(target regclass, "at" timestamptz) returns snapbase.snapshots
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  mt snapbase.managed_tables := snapbase_private.readable_managed_table(target);
  snap snapbase.snapshots;
  gone bigint;
begin
  select * into snap from snapbase.snapshots s
   where s.managed_table_id = mt.id and s.created_at <= "at"
   order by s.created_at desc, s.id desc limit 1;
  select p.snapshot_id into gone from snapbase_private.pruned_snapshots p
   where p.managed_table_id = mt.id and p.created_at <= "at"
     and (snap.id is null or (p.created_at, p.snapshot_id) > (snap.created_at, snap.id))
   order by p.created_at desc, p.snapshot_id desc limit 1;
  if gone is not null then
    raise exception 'the snapshot of % in force at % (snapshot %) was removed by retention', mt.qualified_name, "at", gone
      using errcode = 'P0002';
  end if;
  if snap.id is null then
    raise exception 'no snapshot of % was taken by %', mt.qualified_name, "at" using errcode = 'P0002';
  end if;
  return snapbase_private.readable_snapshot(snap.id);
end;
$$;
comment on function snapbase.snapshot_as_of(regclass, timestamptz) is
  'The snapshot of a table in force at a time: the newest one taken by then (a snapshot''s created_at is the start of the transaction that took it). Needs the right to read the live table.';
grant execute on function snapbase.snapshot_as_of(regclass, timestamptz) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Tables already under change control get their tracking triggers
--------------------------------------------------------------------------------

do $$
declare
  m snapbase.managed_tables;
begin
  for m in select * from snapbase.managed_tables loop
    if snapbase_private.relation_of(m) is not null then
      perform snapbase_private.arm_tracking(m, snapbase_private.relation_of(m));
    end if;
  end loop;
end $$;

--! split: 600-csv.sql
--------------------------------------------------------------------------------
-- CSV: one set of type inference rules, import options, exports that follow the
-- table's settings (issue 13).
--------------------------------------------------------------------------------
-- Type inference. Before, src/connectors/csv.ts and csv_import_preview had rules of
-- their own that disagreed ("007", an 11-digit integer, "2024-02-30"), and the
-- preview read only the first 1,000 rows. Now there is one table of rules,
-- snapbase_private.csv_type_rules(), and two evaluators that only interpret it, both
-- over every row: SQL's (csv_column_kinds, set-based, for rows already in the
-- database: stage_csv_rows, imports staged before) and the server's
-- (src/connectors/csv-inference.ts, for rows streaming through it: an import's
-- upload, a file the csv connector downloads). The server evaluates what it streams
-- because PostgreSQL's regular expressions cost about 1 µs a cell (a third more
-- time for a 300,000-row upload); in JavaScript the same rules cost a few percent.
-- A column's kinds (the types all its cells fit) are kept per import
-- (csv_import_kinds), so a preview reads them instead of the rows.
--
-- Imports: options skip_unchanged (a suggestion equal to the record's current value
-- is not made) and empty_cells ('skip': an empty cell suggests nothing; 'null': it
-- suggests NULL). The preview takes the same options and reports what the import
-- would do, computed by the same SQL (csv_suggestions_sql).
--
-- Export: snapbase.export_table_rows follows the table's column order and leaves its
-- hidden columns out, unless all_columns; table_export_query takes the columns to
-- write, so share links can pass theirs.

drop function if exists snapbase.csv_import_preview(bigint, jsonb, integer) cascade;
drop function if exists snapbase.import_csv(bigint, jsonb, text, text, boolean) cascade;
drop function if exists snapbase.export_table_rows(bigint, boolean) cascade;
drop function if exists snapbase_private.table_export_query(snapbase.workbook_tables, boolean) cascade;
drop function if exists snapbase_private.stage_csv_copy(bigint) cascade;

--------------------------------------------------------------------------------
-- The rules
--------------------------------------------------------------------------------
-- One table of rules, read by two evaluators that only interpret it: SQL's
-- (csv_value_fits, csv_column_kinds: rows already in the database) and the one in
-- src/connectors/csv-inference.ts (rows streaming through the server: an import's
-- upload, a file the csv connector reads), which loads these rows. A cell fits a
-- type when it matches the pattern (a regular expression PostgreSQL and JavaScript
-- read alike: anchors, [0-9] classes, groups, ?, *, +, {m,n}, |), then, where given,
-- its number lies within [min_value, max_value] and its first ten characters name a
-- day that exists (csv_day_exists). Empty cells decide nothing.
--
-- Only forms that read the same in every session (DateStyle, TimeZone) and lose
-- nothing the cell says: no leading zeros (007 is an identifier, not 7), no plus
-- sign, no spaces around a value, no exponent, no NaN or Infinity, no day that does
-- not exist, at most microseconds, and a zone only where the cell gives one.
--
-- rank orders the types, narrowest first, and is the type's bit in a kinds mask.
-- Types of one chain (integer < bigint < numeric, date < timestamp) are wider than
-- those before them: a cell that fits one fits every wider one of its chain. No cell
-- fits types of two chains. test/csv-types.test.ts holds both evaluators, and these
-- properties, to the same answers.
create or replace function snapbase_private.csv_type_rules()
returns table (rank integer, type text, pattern text, min_value numeric, max_value numeric, day_first boolean)
language sql immutable parallel safe
set search_path = pg_catalog
as $$
  values
    (0, 'boolean', '^(true|false|TRUE|FALSE|True|False)$', null::numeric, null::numeric, false),
    (1, 'integer', '^(0|-?[1-9][0-9]*)$', -2147483648, 2147483647, false),
    (2, 'bigint', '^(0|-?[1-9][0-9]*)$', -9223372036854775808, 9223372036854775807, false),
    (3, 'numeric', '^(0|-?[1-9][0-9]*|-?(0|[1-9][0-9]*)\.[0-9]+)$', null, null, false),
    (4, 'date', '^[0-9]{4}-[0-9]{2}-[0-9]{2}$', null, null, true),
    (5, 'timestamp', '^[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?)?$', null, null, true),
    (6, 'timestamptz',
     '^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?([Zz]|[+-](0[0-9]|1[0-5])(:?[0-5][0-9])?)$',
     null, null, true)
$$;
-- The server reads them as the uploading user.
grant execute on function snapbase_private.csv_type_rules() to :ROLE_VIEWER;
comment on function snapbase_private.csv_type_rules() is
  'The rules of CSV type inference, one row per type (rank: narrowest first, and its bit in a kinds mask): a cell fits when it matches pattern, its number is within [min_value, max_value] where given, and (day_first) its first ten characters are a day that exists. Read by SQL and by the server (src/connectors/csv-inference.ts).';

-- The types inference gives, narrowest first (bit i of a kinds mask is the i-th, 0-based).
create or replace function snapbase_private.csv_types() returns text[]
language sql immutable parallel safe
set search_path = pg_catalog
as $$
  select array_agg(r.type order by r.rank) from snapbase_private.csv_type_rules() r
$$;
comment on function snapbase_private.csv_types() is 'The types CSV type inference gives (besides text), narrowest first.';

-- Whether the first ten characters of a text name a day that exists: YYYY-MM-DD with
-- year 0001 to 9999, month 01 to 12, a day the month has (29 February in leap years).
-- Text comparisons only (the JavaScript evaluator does the same), so it never raises.
create or replace function snapbase_private.csv_day_exists(v text) returns boolean
language sql immutable parallel safe
return left(v, 4) <> '0000' and case
  when substr(v, 6, 2) in ('01', '03', '05', '07', '08', '10', '12') then substr(v, 9, 2) collate "C" between '01' and '31'
  when substr(v, 6, 2) in ('04', '06', '09', '11') then substr(v, 9, 2) collate "C" between '01' and '30'
  when substr(v, 6, 2) = '02' then substr(v, 9, 2) collate "C" between '01' and (case
    -- a leap year: divisible by 4, and not by 100 unless by 400
    when substr(v, 3, 2) in ('04', '08', '12', '16', '20', '24', '28', '32', '36', '40', '44', '48', '52', '56', '60', '64', '68',
                             '72', '76', '80', '84', '88', '92', '96')
      or (substr(v, 3, 2) = '00' and left(v, 2) in ('00', '04', '08', '12', '16', '20', '24', '28', '32', '36', '40', '44', '48',
                                                    '52', '56', '60', '64', '68', '72', '76', '80', '84', '88', '92', '96'))
    then '29' else '28' end)
  else false
end;
comment on function snapbase_private.csv_day_exists(text) is
  'CSV type inference: whether the text''s first ten characters, YYYY-MM-DD, are a day that exists (year 1 to 9999). Never raises.';

-- SQL testing whether cell i of the row x.cells fits the rule of `type`; the cast to
-- numeric runs only once the pattern has matched, so it never raises.
create or replace function snapbase_private.csv_rule_sql(i integer, type text) returns text
language sql immutable
set search_path = pg_catalog
as $$
  select format('(case when x.cells[%1$s] ~ %2$L then %3$s and %4$s else false end)', i, r.pattern,
                case when r.min_value is null then 'true' else format('x.cells[%s]::numeric between %L and %L', i, r.min_value, r.max_value) end,
                case when r.day_first then format('snapbase_private.csv_day_exists(x.cells[%s])', i) else 'true' end)
    from snapbase_private.csv_type_rules() r where r.type = csv_rule_sql.type
$$;
comment on function snapbase_private.csv_rule_sql(integer, text) is
  'CSV type inference: SQL testing whether cell i of x.cells fits the rule of `type` (csv_type_rules).';

-- Whether one non-empty cell fits the type (one of csv_types()).
create or replace function snapbase_private.csv_value_fits(v text, type text) returns boolean
language sql immutable parallel safe
set search_path = pg_catalog
as $$
  select coalesce((select case when v ~ r.pattern
                               then (r.min_value is null or v::numeric between r.min_value and r.max_value)
                                    and (not r.day_first or snapbase_private.csv_day_exists(v))
                               else false end
                     from snapbase_private.csv_type_rules() r where r.type = csv_value_fits.type), false)
$$;
comment on function snapbase_private.csv_value_fits(text, text) is
  'CSV type inference: whether a non-empty cell fits the type''s rule (csv_type_rules).';

-- The types a cell fits, as a mask (bit i: the i-th of csv_types()); null for an
-- empty cell, which decides nothing.
create or replace function snapbase_private.csv_value_kinds(v text) returns integer
language sql immutable parallel safe
set search_path = pg_catalog
as $$
  select case when v <> '' then coalesce(sum(1 << r.rank) filter (where snapbase_private.csv_value_fits(v, r.type)), 0)::integer end
    from snapbase_private.csv_type_rules() r
$$;
comment on function snapbase_private.csv_value_kinds(text) is
  'The types a CSV cell fits, as a mask over csv_types() (bit 0: boolean … bit 6: timestamptz); null for an empty cell.';

-- The narrowest type of a kinds mask; text when it has none, or when there was no
-- value at all (null).
create or replace function snapbase_private.csv_kinds_type(kinds integer) returns text
language sql immutable parallel safe
set search_path = pg_catalog
as $$
  select coalesce((select r.type from snapbase_private.csv_type_rules() r where kinds & (1 << r.rank) <> 0 order by r.rank limit 1), 'text')
$$;
comment on function snapbase_private.csv_kinds_type(integer) is
  'The type CSV type inference gives a column whose cells all fit the kinds mask: its narrowest type, or text.';

-- Two column kinds of the same file, from different rows, as one: the types every
-- cell of both fits (null: no value yet).
create or replace function snapbase_private.csv_kinds_merge(a integer[], b integer[]) returns integer[]
language sql immutable parallel safe
set search_path = pg_catalog
as $$
  select array(select case when x is null then y when y is null then x else x & y end
                 from unnest(a, b) with ordinality as u(x, y, i) order by u.i)
$$;
comment on function snapbase_private.csv_kinds_merge(integer[], integer[]) is
  'Kinds of one file''s columns from two sets of its rows, combined (elementwise AND; null means no value seen).';

-- The kinds of each of a file's first `width` columns over ALL its rows: for each
-- column, the types every non-empty cell fits; null when it has no value. The rows
-- are those of pg_temp.snapbase_csv_staging, or of a staged import.
--
-- Set-based: a column's candidate is the narrowest type its first value fits (a
-- first value that fits nothing makes it text at once), and one scan checks every
-- column's candidate; a column whose candidate fails tries the next wider type its
-- first value fits, in another scan.
create or replace function snapbase_private.csv_column_kinds(width integer, import_id bigint default null) returns integer[]
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  types text[] := snapbase_private.csv_types();
  source text := case when import_id is null then 'select s.cells from pg_temp.snapbase_csv_staging s'
                      else 'select s.cells from snapbase_private.csv_import_rows s where s.import_id = $1' end;
  kinds integer[] := array_fill(null::integer, array[greatest(width, 0)]);
  first_value text;
  first_kinds integer[] := array_fill(null::integer, array[greatest(width, 0)]);
  candidate integer[] := array_fill(null::integer, array[greatest(width, 0)]);
  checks text;
  verdicts boolean[];
  i integer;
  n integer;
begin
  for i in 1 .. width loop
    execute format('select x.cells[%s] from (%s) x where x.cells[%s] <> %L limit 1', i, source, i, '') into first_value using import_id;
    if first_value is not null then
      first_kinds[i] := snapbase_private.csv_value_kinds(first_value);
      kinds[i] := 0;
      candidate[i] := (select min(b) from generate_series(0, cardinality(types) - 1) b where first_kinds[i] & (1 << b) <> 0);
    end if;
  end loop;
  loop
    select string_agg(format('coalesce(bool_and(%s) filter (where x.cells[%s] <> %L), true)',
                             snapbase_private.csv_rule_sql(c.i, types[candidate[c.i] + 1]), c.i, ''), ', ' order by c.i)
      into checks
      from generate_series(1, width) c(i) where candidate[c.i] is not null;
    exit when checks is null;
    execute format('select array[%s] from (%s) x', checks, source) into verdicts using import_id;
    n := 0;
    for i in 1 .. width loop
      continue when candidate[i] is null;
      n := n + 1;
      if verdicts[n] then
        -- Every cell fits the candidate, so every wider type of its chain too.
        kinds[i] := first_kinds[i] & ~((1 << candidate[i]) - 1);
        candidate[i] := null;
      else
        candidate[i] := (select min(b) from generate_series(candidate[i] + 1, cardinality(types) - 1) b where first_kinds[i] & (1 << b) <> 0);
      end if;
    end loop;
  end loop;
  return kinds;
end;
$$;
comment on function snapbase_private.csv_column_kinds(integer, bigint) is
  'CSV type inference over every row, in SQL: per column, the kinds mask all its non-empty cells fit (null: no value). Rows of pg_temp.snapbase_csv_staging, or of a staged import.';

--------------------------------------------------------------------------------
-- Staging an import keeps what its columns fit
--------------------------------------------------------------------------------

create table if not exists snapbase_private.csv_import_kinds (
  import_id bigint primary key references snapbase.csv_imports on delete cascade,
  kinds integer[] not null
);
comment on table snapbase_private.csv_import_kinds is
  'Per staged import, the kinds of its columns over every staged row (csv_column_kinds). Missing for imports staged before it existed: the preview then reads the rows.';

-- Moves the rows of pg_temp.snapbase_csv_staging into a staged import. `kinds`: the
-- kinds of those rows' columns, when the caller (the REST upload, which reads every
-- row as it streams) computed them with the same rules (csv_type_rules); null: they
-- are computed here. They only inform the preview's inferred types.
create or replace function snapbase_private.stage_csv_copy(import_id bigint, kinds integer[] default null) returns bigint
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  imp snapbase.csv_imports := snapbase_private.require_import(import_id);
  added bigint;
begin
  if imp.state <> 'staged' then
    raise exception 'CSV import % is %', imp.id, imp.state using errcode = '55000';
  end if;
  insert into snapbase_private.csv_import_rows (import_id, line, cells)
  select imp.id, s.line, s.cells from pg_temp.snapbase_csv_staging s;
  get diagnostics added = row_count;
  update snapbase.csv_imports i set row_count = i.row_count + added where i.id = imp.id;
  -- The kinds cover every row or are not kept (an import staged before they were).
  if added > 0 and (imp.row_count = 0 or exists (select 1 from snapbase_private.csv_import_kinds k where k.import_id = imp.id)) then
    if kinds is null or cardinality(kinds) <> cardinality(imp.header) then
      kinds := snapbase_private.csv_column_kinds(cardinality(imp.header));
    end if;
    insert into snapbase_private.csv_import_kinds as k (import_id, kinds) values (imp.id, kinds)
      on conflict on constraint csv_import_kinds_pkey do update set kinds = snapbase_private.csv_kinds_merge(k.kinds, excluded.kinds);
  end if;
  return added;
end;
$$;
comment on function snapbase_private.stage_csv_copy(bigint, integer[]) is
  'Moves the rows of pg_temp.snapbase_csv_staging (line, cells) into a staged import, keeping the kinds of its columns (given by the REST upload, else computed). For the REST upload and stage_csv_rows.';
grant execute on function snapbase_private.stage_csv_copy(bigint, integer[]) to :ROLE_VIEWER;

-- A batch of parsed rows [{line, cells}] for a staged import: through the same
-- staging table as an upload, so the same checks and inference apply.
create or replace function snapbase.stage_csv_rows(import_id bigint, rows jsonb) returns bigint
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  imp snapbase.csv_imports := snapbase_private.require_import(import_id);
  added bigint;
begin
  if imp.state <> 'staged' then
    raise exception 'CSV import % is %', imp.id, imp.state using errcode = '55000';
  end if;
  if jsonb_typeof(rows) is distinct from 'array'
     or exists (select 1 from jsonb_array_elements(rows) r
                 where jsonb_typeof(r) <> 'object' or jsonb_typeof(r -> 'line') <> 'number' or jsonb_typeof(r -> 'cells') <> 'array'
                    or exists (select 1 from jsonb_array_elements(r -> 'cells') c where jsonb_typeof(c) <> 'string')) then
    raise exception 'rows must be [{"line": n, "cells": ["text", …]}, …]' using errcode = '22023';
  end if;
  create temporary table if not exists snapbase_csv_staging (line integer not null, cells text[] not null) on commit drop;
  truncate pg_temp.snapbase_csv_staging;
  insert into pg_temp.snapbase_csv_staging (line, cells)
  select (r ->> 'line')::integer, array(select jsonb_array_elements_text(r -> 'cells')) from jsonb_array_elements(rows) r;
  added := snapbase_private.stage_csv_copy(imp.id);
  truncate pg_temp.snapbase_csv_staging;
  return added;
end;
$$;
comment on function snapbase.stage_csv_rows(bigint, jsonb) is
  'Stage a batch of parsed rows [{"line": 2, "cells": ["A", "1"]}, …] for a CSV import started with start_csv_import.';

-- The inferred type of each header column of a staged import.
create or replace function snapbase_private.csv_import_types(imp snapbase.csv_imports) returns jsonb
language sql stable
set search_path = pg_catalog
as $$
  select coalesce(jsonb_object_agg(h.name, snapbase_private.csv_kinds_type(k.kinds[h.ord])), '{}')
    from unnest(imp.header) with ordinality as h(name, ord)
    cross join (select coalesce((select ik.kinds from snapbase_private.csv_import_kinds ik where ik.import_id = imp.id),
                                snapbase_private.csv_column_kinds(cardinality(imp.header), imp.id)) as kinds) k
$$;
comment on function snapbase_private.csv_import_types(snapbase.csv_imports) is
  'The type inferred for each header column of a staged import, over all its rows: {"header": "type"}.';

--------------------------------------------------------------------------------
-- Import: typed cells, options, and what an import does (shared with the preview)
--------------------------------------------------------------------------------

-- The typed value of cell i of a staged row s. An empty cell is NULL in every type,
-- text included, as the csv connector reads it.
create or replace function snapbase_private.typed_cell_sql(i integer, type text) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  canonical text := snapbase_private.resolve_type(type);
begin
  return format('case when s.cells[%1$s] = %3$L then null else s.cells[%1$s]::%2$s end', i, canonical, '');
end;
$$;
comment on function snapbase_private.typed_cell_sql(integer, text) is
  'SQL for the typed value of cell i of staged row s (alias s): NULL when empty, else the cell cast to the canonical type.';

-- Why a text does not fit a type (null when it does). An empty cell is NULL, which fits.
create or replace function snapbase_private.cast_error(value text, type text) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  canonical text := snapbase_private.resolve_type(type);
begin
  if value is null or value = '' then
    return null;
  end if;
  execute format('select $1::%s', canonical) using value;
  return null;
exception when data_exception then
  return sqlerrm;
end;
$$;
comment on function snapbase_private.cast_error(text, text) is
  'Why a CSV cell does not convert to the type (PostgreSQL''s message), or null when it does; an empty cell is NULL and fits.';

-- The options of an import (and of its preview), checked, with defaults filled in.
create or replace function snapbase_private.csv_import_options(mode text, key_column text, skip_unchanged boolean, empty_cells text)
returns jsonb
language plpgsql immutable
set search_path = pg_catalog
as $$
begin
  if coalesce(mode, 'records') not in ('records', 'suggestions') then
    raise exception 'mode must be records or suggestions (got %)', left(mode, 50) using errcode = '22023';
  end if;
  if coalesce(empty_cells, 'skip') not in ('skip', 'null') then
    raise exception 'empty_cells must be skip or null (got %)', left(empty_cells, 50) using errcode = '22023';
  end if;
  return jsonb_build_object('mode', coalesce(mode, 'records'), 'key_column', key_column,
    'skip_unchanged', coalesce(skip_unchanged, true), 'empty_cells', coalesce(empty_cells, 'skip'));
end;
$$;
comment on function snapbase_private.csv_import_options(text, text, boolean, text) is
  'Checks a CSV import''s options (mode, key_column, skip_unchanged, empty_cells) and returns them with their defaults.';

-- In mode suggestions, the key column (its cell index and type), after checking that
-- the mapping can be suggested: the key is a table column the mapping fills, and no
-- other mapped column is read-only. `map` is import_mapping's rows as a JSON array.
create or replace function snapbase_private.csv_import_key(map jsonb, options jsonb, out key_idx integer, out key_type text)
language plpgsql immutable
set search_path = pg_catalog
as $$
begin
  if options ->> 'mode' <> 'suggestions' then
    return;
  end if;
  select (m ->> 'idx')::integer, m ->> 'col_type' into key_idx, key_type
    from jsonb_array_elements(map) m
   where m ->> 'col' = options ->> 'key_column' and not (m ->> 'new_scratch')::boolean;
  if key_idx is null then
    raise exception 'key_column must be a table column the mapping fills (got %)', coalesce(left(options ->> 'key_column', 100), 'null')
      using errcode = '22023';
  end if;
  if exists (select 1 from jsonb_array_elements(map) m where (m ->> 'read_only')::boolean and m ->> 'col' <> options ->> 'key_column') then
    raise exception 'read-only column(s) cannot be suggested: %',
      (select string_agg(m ->> 'col', ', ') from jsonb_array_elements(map) m where (m ->> 'read_only')::boolean and m ->> 'col' <> options ->> 'key_column')
      using errcode = '22023';
  end if;
end;
$$;
comment on function snapbase_private.csv_import_key(jsonb, jsonb) is
  'For a CSV import as suggestions: the key column''s cell index and type; refuses a key the mapping does not fill and read-only columns.';

-- The staged rows (not among the lines $2) whose key matches no record: (line, value).
-- Parameters: $1 import id, $2 lines to leave out.
create or replace function snapbase_private.csv_unmatched_sql(t snapbase.workbook_tables, key_column text, key_idx integer, key_type text) returns text
language sql stable
set search_path = pg_catalog
as $$
  select format($q$select s.line, s.cells[%3$s] as value
      from snapbase_private.csv_import_rows s
     where s.import_id = $1 and s.line <> all ($2)
       and not exists (select 1 from %1$s r where not r.__suggested_new and r.%2$I = %4$s)$q$,
    snapbase_private.table_rel(t), key_column, key_idx, snapbase_private.typed_cell_sql(key_idx, key_type))
$$;
comment on function snapbase_private.csv_unmatched_sql(snapbase.workbook_tables, text, integer, text) is
  'SQL listing the staged rows whose key matches no record ($1 import id, $2 lines left out).';

-- What importing as suggestions does to each record a staged row's key matches, one
-- row per record (the file's last row for it wins): __id, the suggestion to merge into
-- __suggested ({} when nothing is to be suggested), and how many cells were suggested,
-- left alone as equal to the current value, and left alone as empty. A cell is
-- suggested unless it is empty and $5 is false (empty_cells 'skip'), or $4
-- (skip_unchanged) and its value, as JSON, equals the record's current value (NULL
-- equals NULL). Parameters: $1 import id, $2 lines to leave out, $3 who suggests,
-- $4 skip_unchanged, $5 empty cells suggest NULL. Both import_csv and the preview run it.
create or replace function snapbase_private.csv_suggestions_sql(t snapbase.workbook_tables, key_column text, key_idx integer, key_type text, map jsonb)
returns text
language sql stable
set search_path = pg_catalog
as $$
  with m as (
    select e.idx, e.col, e.col_type, e.new_scratch, row_number() over (order by e.idx) as j,
           format('coalesce(s.cells[%s], %L) <> %L', e.idx, '', '') as filled,
           format('(to_jsonb(x.%I) is not distinct from to_jsonb(%s))', 'v' || e.idx,
                  case when e.new_scratch then 'null' else format('r.%I', e.col) end) as same
      from jsonb_to_recordset(map) as e(idx integer, col text, col_type text, new_scratch boolean)
     where e.col <> key_column
  ), p as (
    select m.*, format('((%s or $5) and not ($4 and %s))', m.filled, m.same) as suggest from m
  )
  select format($q$select distinct on (r.__id) r.__id, %1$s as suggestion,
           %2$s as suggested_cells, %3$s as unchanged_cells, %4$s as empty_cells_skipped
      from snapbase_private.csv_import_rows s
      cross join lateral (select %5$s) x
      join %6$s r on r.%7$I = %8$s and not r.__suggested_new
     where s.import_id = $1 and s.line <> all ($2)
     order by r.__id, s.line desc$q$,
    coalesce(string_agg(format('case when %s then jsonb_build_object(%L, jsonb_build_object(%L, x.%I, %L, $3::text, %L, now())) else %L::jsonb end',
                               p.suggest, p.col, 'value', 'v' || p.idx, 'by', 'at', '{}'), ' || ' order by p.j), quote_literal('{}') || '::jsonb'),
    coalesce(string_agg(format('%s::integer', p.suggest), ' + ' order by p.j), '0'),
    coalesce(string_agg(format('((%s or $5) and $4 and %s)::integer', p.filled, p.same), ' + ' order by p.j), '0'),
    coalesce(string_agg(format('(not %s and not $5)::integer', p.filled), ' + ' order by p.j), '0'),
    coalesce(string_agg(format('%s as %I', snapbase_private.typed_cell_sql(p.idx, p.col_type), 'v' || p.idx), ', ' order by p.j), '1 as v0'),
    snapbase_private.table_rel(t), key_column, snapbase_private.typed_cell_sql(key_idx, key_type))
  from p
$$;
comment on function snapbase_private.csv_suggestions_sql(snapbase.workbook_tables, text, integer, text, jsonb) is
  'SQL computing, per matched record, the suggestion a CSV import makes and its cell counts ($1 import, $2 lines left out, $3 by, $4 skip_unchanged, $5 empty cells as NULL). Shared by import_csv and csv_import_preview.';

-- What an import would do: a sample, the types the values look like (over every
-- row), the mapping and options in effect, the cells that would fail (at most 50,
-- with line and reason; in mode suggestions also the rows whose key matches no
-- record), and the outcome: what import_csv with the same arguments would report,
-- computed by the same SQL. The outcome is null when it cannot be told cheaply:
-- nothing is mapped, or more than 50 cells fail (fix the mapping first).
create or replace function snapbase.csv_import_preview(import_id bigint, mapping jsonb default null, sample_rows integer default 20,
                                                       mode text default 'records', key_column text default null,
                                                       skip_unchanged boolean default true, empty_cells text default 'skip')
returns jsonb
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  imp snapbase.csv_imports := snapbase_private.require_import(import_id);
  options jsonb := snapbase_private.csv_import_options(mode, key_column, skip_unchanged, empty_cells);
  t snapbase.workbook_tables;
  map jsonb;
  key record;
  problems jsonb := '[]';
  found bigint := 0;
  bad integer[] := '{}';
  complete boolean := true;
  unmatched bigint;
  unmatched_problems jsonb;
  outcome jsonb;
  counts record;
begin
  select * into t from snapbase.workbook_tables where id = imp.table_id;
  select coalesce(jsonb_agg(to_jsonb(m) order by m.idx), '[]') into map from snapbase_private.import_mapping(imp, t, mapping) m;
  select * into key from snapbase_private.csv_import_key(map, options);
  if jsonb_array_length(map) = 0 then
    complete := false;
  elsif not snapbase_private.csv_rows_fit(imp.id, array(select (e ->> 'idx')::integer from jsonb_array_elements(map) e order by 1),
                                          array(select e ->> 'col_type' from jsonb_array_elements(map) e order by (e ->> 'idx')::integer)) then
    -- Cell by cell, in line order, until 51 failures: with 50 or fewer, every row was
    -- checked and the failing lines are known.
    select coalesce(jsonb_agg(x.p order by x.line, x.idx), '[]'), count(*), coalesce(array_agg(distinct x.line), '{}')
      into problems, found, bad
      from (select jsonb_build_object('line', r.line, 'column', m.col, 'value', r.cells[m.idx], 'error', e.err) as p, r.line, m.idx
              from snapbase_private.csv_import_rows r
              cross join jsonb_to_recordset(map) as m(idx integer, col text, col_type text)
              cross join lateral (select snapbase_private.cast_error(r.cells[m.idx], m.col_type) as err) e
             where r.import_id = imp.id and e.err is not null
             order by r.line, m.idx limit 51) x;
    complete := found <= 50;
    if not complete then
      problems := problems - 50;
    end if;
  end if;
  if complete and options ->> 'mode' = 'records' then
    outcome := jsonb_build_object('created', imp.row_count - cardinality(bad), 'bad_rows', cardinality(bad));
  elsif complete then
    execute format('select count(*), coalesce(jsonb_agg(jsonb_build_object(%L, u.line, %L, $3::text, %L, u.value, %L, format(%L, $3::text, u.value)) order by u.line)
                             filter (where u.n <= 50), %L) from (select u.*, row_number() over (order by u.line) as n from (%s) u) u',
                   'line', 'column', 'value', 'error', 'no record with %s = %s', '[]',
                   snapbase_private.csv_unmatched_sql(t, key_column, key.key_idx, key.key_type))
      into unmatched, unmatched_problems using imp.id, bad, key_column;
    problems := (select coalesce(jsonb_agg(p order by (p ->> 'line')::integer, p ->> 'column'), '[]')
                   from (select p from jsonb_array_elements(problems || unmatched_problems) p order by (p ->> 'line')::integer limit 50) x);
    execute format('select count(*) filter (where m.suggestion <> %L) as suggested, coalesce(sum(m.suggested_cells), 0) as suggested_cells,
                           coalesce(sum(m.unchanged_cells), 0) as unchanged_cells, coalesce(sum(m.empty_cells_skipped), 0) as empty_cells_skipped
                      from (%s) m', '{}', snapbase_private.csv_suggestions_sql(t, key_column, key.key_idx, key.key_type, map))
      into counts
      using imp.id, bad, snapbase_private.actor_name(), options -> 'skip_unchanged' = 'true',
            options ->> 'empty_cells' = 'null';
    outcome := jsonb_build_object('suggested', counts.suggested, 'suggested_cells', counts.suggested_cells,
      'unchanged_cells', counts.unchanged_cells, 'empty_cells_skipped', counts.empty_cells_skipped,
      'unmatched', unmatched, 'bad_rows', cardinality(bad));
  end if;
  return jsonb_build_object(
    'import_id', imp.id, 'header', to_jsonb(imp.header), 'row_count', imp.row_count,
    'sample', (select coalesce(jsonb_agg(jsonb_build_object('line', r.line, 'cells', to_jsonb(r.cells)) order by r.line), '[]')
                 from (select * from snapbase_private.csv_import_rows r where r.import_id = imp.id order by r.line limit sample_rows) r),
    'inferred_types', snapbase_private.csv_import_types(imp),
    'mapping', (select coalesce(jsonb_object_agg(m ->> 'header', case when (m ->> 'new_scratch')::boolean
                                                                     then jsonb_build_object('new_scratch', m ->> 'col', 'type', m ->> 'col_type')
                                                                     else m -> 'col' end), '{}')
                  from jsonb_array_elements(map) m),
    'options', options,
    'problems', problems,
    'outcome', outcome);
end;
$$;
comment on function snapbase.csv_import_preview(bigint, jsonb, integer, text, text, boolean, text) is
  'Preview a staged CSV import with import_csv''s arguments: sample rows, inferred types (every row), the mapping and options in effect, failing cells (line, column, reason; at most 50) and the outcome import_csv would report (null when nothing is mapped or more than 50 cells fail).';
grant execute on function snapbase.csv_import_preview(bigint, jsonb, integer, text, text, boolean, text) to :ROLE_VIEWER;

-- Imports a staged file: as new records (mode 'records'), or as suggestions on the
-- records whose key_column equals the row's value for it (mode 'suggestions'), where
-- skip_unchanged leaves out values equal to the record's current ones and empty_cells
-- says what an empty cell suggests ('skip': nothing; 'null': NULL). In mode records
-- an empty cell is an empty (NULL) field. One transaction: unless skip_bad_rows, a
-- single bad row imports nothing and the result lists every error with its line.
-- A clean file is converted in one statement; cell-by-cell checks run only when some
-- value does not fit its column, to name each failing line.
create or replace function snapbase.import_csv(import_id bigint, mapping jsonb default null, mode text default 'records',
                                               key_column text default null, skip_bad_rows boolean default false,
                                               skip_unchanged boolean default true, empty_cells text default 'skip')
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  imp snapbase.csv_imports := snapbase_private.require_import(import_id);
  options jsonb := snapbase_private.csv_import_options(mode, key_column, skip_unchanged, empty_cells);
  t snapbase.workbook_tables;
  rel text;
  scratch record;
  key record;
  map jsonb;
  errors jsonb;
  bad_lines integer[];
  processed bigint;
  created bigint := 0;
  suggested bigint := 0;
  suggested_cells bigint := 0;
  unchanged_cells bigint := 0;
  empty_cells_skipped bigint := 0;
  unmatched bigint := 0;
  skipped bigint := 0;
  cells_sql text;
  outcome jsonb;
begin
  if imp.state <> 'staged' then
    raise exception 'CSV import % was imported already', imp.id using errcode = '55000';
  end if;
  select * into t from snapbase.workbook_tables where id = imp.table_id;
  begin
    -- New scratch columns first, so the rest sees them.
    for scratch in select * from snapbase_private.import_mapping(imp, t, mapping) where new_scratch loop
      t := snapbase.add_scratch_column(t.id, scratch.col, scratch.col_type);
    end loop;
    rel := snapbase_private.table_rel(t);
    create temporary table snapbase_import_map on commit drop as
      select * from snapbase_private.import_mapping(imp, t, mapping);
    if not exists (select 1 from snapbase_import_map) then
      raise exception 'the mapping imports no column' using errcode = '22023';
    end if;
    select coalesce(jsonb_agg(to_jsonb(m) order by m.idx), '[]') into map from snapbase_import_map m;
    select * into key from snapbase_private.csv_import_key(map, options);

    select count(*) into processed from snapbase_private.csv_import_rows r where r.import_id = imp.id;
    cells_sql := (select string_agg(snapbase_private.typed_cell_sql(idx, col_type), ', ' order by idx) from snapbase_import_map);
    -- Rows that do not fit, with every reason; filled only if the first attempt fails.
    create temporary table snapbase_import_bad (line integer not null, error text not null) on commit drop;

    <<attempts>>
    for attempt in 1..2 loop
      begin
        if options ->> 'mode' = 'records' then
          execute format($q$
            insert into %1$s (%2$s, __created, __edited)
            select %3$s, true, $2
              from snapbase_private.csv_import_rows s
             where s.import_id = $1 and not exists (select 1 from snapbase_import_bad b where b.line = s.line)
             order by s.line$q$,
            rel, (select string_agg(format('%I', col), ', ' order by idx) from snapbase_import_map), cells_sql)
            using imp.id, (select jsonb_object_agg(col, now()) from snapbase_import_map);
          get diagnostics created = row_count;
        else
          bad_lines := array(select b.line from snapbase_import_bad b);
          -- Rows whose key matches no record are reported, and count as skipped.
          execute format($q$insert into snapbase_import_bad (line, error)
                            select u.line, format('no record with %%s = %%s', $3::text, u.value) from (%s) u$q$,
                         snapbase_private.csv_unmatched_sql(t, key_column, key.key_idx, key.key_type))
            using imp.id, bad_lines, key_column;
          get diagnostics unmatched = row_count;
          execute format($q$with m as materialized (%s),
              u as (update %s r set __suggested = r.__suggested || m.suggestion, __updated_at = now()
                      from m where r.__id = m.__id and m.suggestion <> '{}' returning 1)
            select (select count(*) from u), coalesce(sum(m.suggested_cells), 0), coalesce(sum(m.unchanged_cells), 0),
                   coalesce(sum(m.empty_cells_skipped), 0)
              from m$q$,
            snapbase_private.csv_suggestions_sql(t, key_column, key.key_idx, key.key_type, map), rel)
            into suggested, suggested_cells, unchanged_cells, empty_cells_skipped
            using imp.id, bad_lines, snapbase_private.actor_name(),
                  options -> 'skip_unchanged' = 'true', options ->> 'empty_cells' = 'null';
        end if;
        exit attempts;
      exception when data_exception then
        -- Some value does not fit its column (this attempt is undone): find every
        -- such row, then write the others.
        if attempt = 2 then
          raise;
        end if;
        insert into snapbase_import_bad (line, error)
        select r.line, string_agg(format('column %s: %s', m.col, e.err), '; ' order by m.idx)
          from snapbase_private.csv_import_rows r
          cross join snapbase_import_map m
          cross join lateral (select snapbase_private.cast_error(r.cells[m.idx], m.col_type) as err) e
         where r.import_id = imp.id and e.err is not null
         group by r.line;
      end;
    end loop;

    select coalesce(jsonb_agg(jsonb_build_object('line', b.line, 'error', b.error) order by b.line), '[]'), count(*)
      into errors, skipped from snapbase_import_bad b;
    if skipped > 0 and not coalesce(skip_bad_rows, false) then
      raise exception 'the file has bad rows' using errcode = 'SB002';
    end if;
  exception when sqlstate 'SB002' then
    -- Undoes everything above (scratch columns included); the errors are reported.
    return jsonb_build_object('ok', false, 'processed', processed, 'created', 0, 'suggested', 0, 'suggested_cells', 0,
      'unchanged_cells', 0, 'empty_cells_skipped', 0, 'unmatched', unmatched, 'bad_rows', skipped - unmatched, 'skipped', 0,
      'errors', errors, 'options', options);
  end;
  outcome := jsonb_build_object('ok', true, 'processed', processed, 'created', created, 'suggested', suggested,
    'suggested_cells', suggested_cells, 'unchanged_cells', unchanged_cells, 'empty_cells_skipped', empty_cells_skipped,
    'unmatched', unmatched, 'bad_rows', skipped - unmatched, 'skipped', skipped, 'errors', errors, 'options', options);
  update snapbase.csv_imports i set state = 'imported', result = outcome where i.id = imp.id;
  delete from snapbase_private.csv_import_rows r where r.import_id = imp.id;
  delete from snapbase_private.csv_import_kinds k where k.import_id = imp.id;
  perform snapbase_private.audit_workbook('import_csv', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('import_id', imp.id) || options || (outcome - 'errors' - 'options'));
  return outcome;
end;
$$;
comment on function snapbase.import_csv(bigint, jsonb, text, text, boolean, boolean, text) is
  'Import a staged CSV as new records or as suggestions (matched by key_column; skip_unchanged: no suggestion equal to the current value; empty_cells skip|null); all or nothing unless skip_bad_rows. Errors carry line numbers.';
grant execute on function snapbase.import_csv(bigint, jsonb, text, text, boolean, boolean, text) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Export follows the table's settings
--------------------------------------------------------------------------------

-- The columns an export of t writes, in order. By default the table's settings: the
-- columns of column_order first, in that order, then the others in table order,
-- hidden_columns left out. all_columns: every column in table order (what COPY ...
-- CSV HEADER into a table of the same definition expects). Agents never get hidden
-- columns.
create or replace function snapbase_private.export_columns(t snapbase.workbook_tables, all_columns boolean default false) returns text[]
language sql stable
set search_path = pg_catalog
as $$
  select coalesce(array_agg(c.name order by
                    case when all_columns then null
                         else (select min(o.pos) from unnest(t.column_order) with ordinality as o(name, pos) where o.name = c.name) end nulls last,
                    c.ord), '{}')
    from jsonb_array_elements(t.columns) with ordinality as e(spec, ord)
    cross join lateral (select e.spec ->> 'name' as name, e.ord) c
   where not (c.name = any (t.hidden_columns) and (not coalesce(all_columns, false) or snapbase.current_app_role() is not distinct from 'agent'))
$$;
comment on function snapbase_private.export_columns(snapbase.workbook_tables, boolean) is
  'The columns a CSV export of the table writes: its column order and hidden columns by default; every column in table order with all_columns (never hidden ones for agents).';

-- The query yielding a workbook table's rows as text[] (records deleted here or only
-- suggested are not part of the table), optionally within its active filter. Run it
-- with snapbase_sandbox.read_text_rows. `columns`: the columns to write, in order
-- (null: every column in table order); each must be one of the table's.
create or replace function snapbase_private.table_export_query(t snapbase.workbook_tables, use_filter boolean, columns text[] default null)
returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  unknown text;
begin
  select string_agg(c, ', ') into unknown from unnest(columns) c where c is null or c <> all (snapbase_private.column_names(t));
  if unknown is not null or array_position(columns, null) is not null then
    raise exception 'no such column(s) in workbook table %: %', t.id, coalesce(left(unknown, 500), 'null') using errcode = '22023';
  end if;
  return format('select array[%s]::text[] from %s r where not r.__deleted and not r.__suggested_new and %s order by r.__id',
    (select coalesce(string_agg(format('r.%I::text', c), ', ' order by o), '') from unnest(coalesce(columns, snapbase_private.column_names(t))) with ordinality as u(c, o)),
    snapbase_private.table_rel(t),
    case when use_filter then snapbase_private.filter_clause(t) else 'true' end);
end;
$$;
comment on function snapbase_private.table_export_query(snapbase.workbook_tables, boolean, text[]) is
  'SQL yielding the table''s records as text[] rows of the given columns (null: all, in table order), optionally within its active filter. Run it with snapbase_sandbox.read_text_rows; the header is the columns.';

create or replace function snapbase.export_table_rows(table_id bigint, use_filter boolean default false, all_columns boolean default false)
returns setof text[]
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
  columns text[];
begin
  if snapbase.current_app_role() = 'agent' then
    raise exception 'agent tokens cannot export tables' using errcode = '42501';
  end if;
  columns := snapbase_private.export_columns(t, coalesce(all_columns, false));
  return next columns;
  return query select * from snapbase_sandbox.read_text_rows(snapbase_private.table_export_query(t, use_filter, columns), '{}');
end;
$$;
comment on function snapbase.export_table_rows(bigint, boolean, boolean) is
  'A workbook table as text rows for CSV, header first: the table''s column order without its hidden columns (all_columns: every column, in table order); only the active filter''s records when use_filter. Reads only.';
grant execute on function snapbase.export_table_rows(bigint, boolean, boolean) to :ROLE_VIEWER;

--! split: 700-publish-conflicts.sql
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

--! split: 950-tidy-up.sql
--------------------------------------------------------------------------------
-- Tidy-up: no dead code, one implementation per concept, reasons a reader sees.
--------------------------------------------------------------------------------
-- * The NOTIFY channels nothing listens to are gone (snapbase:changes,
--   snapbase:snapshots, snapbase:jobs): every event goes through the event log
--   (snapbase_private.emit, the _500_event triggers) and its per-topic channels.
-- * The actor of audit entries, events and suggestions is snapbase_private.actor_name().
-- * Suggestions (values, new records, deletions) are written by one helper; account
--   jobs (test, list tables) are queued by one helper.
-- * Private helpers carry their reasoning in COMMENT ON FUNCTION (a dump drops `--`).
-- * Every SECURITY DEFINER function searches pg_temp last.

drop trigger if exists _500_notify on snapbase.change_requests;
drop function if exists snapbase_private.tg__change_submitted() cascade;
drop function if exists snapbase_private.suggester() cascade;
drop function if exists snapbase_private.suggestion_entries(jsonb) cascade;
drop function if exists snapbase_private.enqueue_account_job(bigint, snapbase.job_kind) cascade;

-- Who a suggestion is by: the signed-in user (or database user), marked when an agent token made it.
create function snapbase_private.suggester() returns text
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select snapbase_private.actor_name() || case when snapbase.current_app_role() = 'agent' then ' (agent)' else '' end
$$;
comment on function snapbase_private.suggester() is
  'Who a suggestion is by: the signed-in user (or the database user in psql), with " (agent)" when an agent token made it.';

-- {column: value} as the __suggested entries {column: {value, by, at}}.
create function snapbase_private.suggestion_entries(vals jsonb) returns jsonb
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select coalesce(jsonb_object_agg(k, jsonb_build_object('value', v, 'by', snapbase_private.suggester(), 'at', now())), '{}')
    from jsonb_each(vals) e(k, v)
$$;
comment on function snapbase_private.suggestion_entries(jsonb) is
  'Suggested values {column: value} as the entries a record''s __suggested column keeps: {column: {value, by, at}}.';

create or replace function snapbase.suggest_values(table_id bigint, record_id bigint, "values" jsonb) returns jsonb
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  is_new boolean;
begin
  perform snapbase_private.refuse_hidden_columns(t, "values");
  execute format('select __created or __suggested_new from %s where __id = $1', snapbase_private.table_rel(t)) into is_new using record_id;
  if is_new is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.check_values(t, "values", is_new);
  execute format('update %s set __suggested = __suggested || $2, __updated_at = now() where __id = $1', snapbase_private.table_rel(t))
    using record_id, snapbase_private.suggestion_entries("values");
  perform snapbase_private.audit_workbook('suggest_values', t.workbook_id, 'workbook_record', record_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id, 'values', "values"));
  return snapbase_private.get_record(t, record_id, snapbase_private.hidden_from_caller(t));
end;
$$;

create or replace function snapbase.suggest_new_record(table_id bigint, "values" jsonb) returns jsonb
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  new_id bigint;
begin
  perform snapbase_private.refuse_hidden_columns(t, "values");
  perform snapbase_private.check_values(t, "values", true);
  execute format('insert into %s (__suggested_new, __suggested) values (true, $1) returning __id', snapbase_private.table_rel(t))
    into new_id using snapbase_private.suggestion_entries("values");
  perform snapbase_private.audit_workbook('suggest_new_record', t.workbook_id, 'workbook_record', new_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id, 'values', "values"));
  return snapbase_private.get_record(t, new_id, snapbase_private.hidden_from_caller(t));
end;
$$;

create or replace function snapbase.suggest_delete(table_id bigint, record_id bigint) returns jsonb
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  found_id bigint;
begin
  execute format($u$update %s set __suggest_delete = jsonb_build_object('by', $2::text, 'at', now()), __updated_at = now()
                     where __id = $1 and not __suggested_new returning __id$u$, snapbase_private.table_rel(t))
    into found_id using record_id, snapbase_private.suggester();
  if found_id is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.audit_workbook('suggest_delete', t.workbook_id, 'workbook_record', record_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id));
  return snapbase_private.get_record(t, record_id, snapbase_private.hidden_from_caller(t));
end;
$$;

-- Queues a job that only talks to an account's source (test the connection, list its tables).
create function snapbase_private.enqueue_account_job(account_id bigint, kind snapbase.job_kind) returns snapbase.jobs
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  j snapbase.jobs;
begin
  j.kind := kind;
  j.connector_account_id := (snapbase_private.require_account(account_id)).id;
  return snapbase_private.enqueue_job(j);
end;
$$;
comment on function snapbase_private.enqueue_account_job(bigint, snapbase.job_kind) is
  'Queues an account-level job (test_connection, list_tables) for an account of the caller''s; "no connector account N" otherwise.';

create or replace function snapbase.test_connector_account(account_id bigint) returns snapbase.jobs
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
  select snapbase_private.enqueue_account_job(account_id, 'test_connection')
$$;

create or replace function snapbase.list_remote_tables(account_id bigint) returns snapbase.jobs
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
  select snapbase_private.enqueue_account_job(account_id, 'list_tables')
$$;

-- The latest definitions of these, less the old NOTIFY channels and with the actor through actor_name():

-- snapbase_private.enqueue_job(snapbase.jobs): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.enqueue_job(j snapbase.jobs)
 RETURNS snapbase.jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  created snapbase.jobs;
begin
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

-- snapbase_private.start_job(bigint): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.start_job(job_id bigint)
 RETURNS snapbase.jobs
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
AS $function$
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
  return j;
end;
$function$;

-- snapbase_private.job_progress(bigint,bigint,bigint,text): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.job_progress(job_id bigint, done bigint, total bigint, message text DEFAULT NULL::text)
 RETURNS boolean
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
AS $function$
declare
  j snapbase.jobs;
begin
  perform snapbase_private.assert_job_runner(job_id);
  update snapbase.jobs set done = coalesce(job_progress.done, jobs.done), total = coalesce(job_progress.total, jobs.total),
         message = coalesce(job_progress.message, jobs.message)
   where id = job_id returning * into j;
  return not j.cancel_requested;
end;
$function$;

-- snapbase_private.finish_job(bigint,snapbase.job_state,jsonb,text): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.finish_job(job_id bigint, final_state snapbase.job_state, result jsonb DEFAULT NULL::jsonb, error text DEFAULT NULL::text)
 RETURNS snapbase.jobs
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
AS $function$
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
  perform snapbase_private.audit('job_' || final_state, 'job', j.id::text, j.current_table,
    jsonb_strip_nulls(jsonb_build_object('kind', j.kind, 'workbook_id', j.workbook_id, 'table_id', j.table_id, 'done', j.done, 'error', error)));
  return j;
end;
$function$;

-- snapbase.cancel_job(bigint): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase.cancel_job(job_id bigint)
 RETURNS snapbase.jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
  perform snapbase_private.audit('cancel_job', 'job', j.id::text, j.current_table, jsonb_build_object('kind', j.kind));
  return j;
end;
$function$;

-- snapbase_private.publish_managed(bigint): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.publish_managed(job_id bigint)
 RETURNS snapbase.jobs
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
AS $function$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  rel text;
  hidden text[];
  missing_key jsonb;
  creates jsonb;
  updates jsonb;
  deletes jsonb;
  cr snapbase.change_requests;
begin
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  rel := snapbase_private.table_rel(t);
  hidden := snapbase_private.record_meta_columns() || snapbase_private.scratch_columns(t);
  -- Submitted as the job's creator, who must be allowed to submit changes.
  if coalesce((select role::text from snapbase.users where id = j.created_by), 'viewer') = 'viewer' then
    return snapbase_private.finish_job(job_id, 'failed', null, 'publishing to a managed table needs the editor or admin role');
  end if;
  perform set_config('jwt.claims.user_id', coalesce(j.created_by::text, ''), true);
  perform set_config('jwt.claims.email', coalesce((select email from snapbase.users where id = j.created_by), ''), true);
  -- A new record must carry its primary key: that is how the source will know it.
  execute format($q$
    select coalesce(jsonb_agg(jsonb_build_object('id', r.__id, 'ok', false,
             'error', format('the primary key %%s is required to create a record in a managed table', $1))), '[]')
      from %s r where %s and to_jsonb(r) -> $1 = 'null'$q$, rel, snapbase_private.publish_filter('create'))
    into missing_key using t.remote_id_column;
  if jsonb_array_length(missing_key) > 0 then
    perform snapbase_private.record_publish_outcomes(job_id, missing_key);
  end if;
  execute format($q$
    select coalesce(jsonb_agg((select jsonb_object_agg(k, to_jsonb(r) -> k) from jsonb_object_keys(r.__edited) k where k <> all ($3)) order by r.__id)
                    filter (where %2$s and to_jsonb(r) -> $1 <> 'null'), '[]'),
           coalesce(jsonb_agg(jsonb_build_object('key', jsonb_build_object($1, r.__last_seen -> $1),
                      'set', (select jsonb_object_agg(k, to_jsonb(r) -> k) from jsonb_object_keys(r.__edited) k where k <> all ($3))) order by r.__id)
                    filter (where %3$s), '[]'),
           coalesce(jsonb_agg(jsonb_build_object($1, r.__last_seen -> $1) order by r.__id) filter (where %4$s), '[]')
      from %1$s r$q$, rel, snapbase_private.publish_filter('create'), snapbase_private.publish_filter('update'), snapbase_private.publish_filter('delete'))
    into creates, updates, deletes
    using t.remote_id_column, hidden, snapbase_private.scratch_columns(t);
  if jsonb_array_length(creates) + jsonb_array_length(updates) + jsonb_array_length(deletes) = 0 then
    return snapbase_private.finish_job(job_id, 'succeeded', jsonb_build_object('records', 0));
  end if;
  cr := snapbase.submit_edits((t.remote_table)::regclass,
          jsonb_build_object('insert', creates, 'update', updates, 'delete', deletes),
          format('Published from workbook %s, table %s (job %s)', t.workbook_id, t.name, job_id));
  execute format($q$update %s r set __publish = jsonb_build_object('state', 'awaiting_approval', 'job_id', $1, 'at', now(), 'change_request_id', $2)
                    where ((%s) and to_jsonb(r) -> $3 <> 'null') or (%s) or (%s)$q$,
    rel, snapbase_private.publish_filter('create'), snapbase_private.publish_filter('update'), snapbase_private.publish_filter('delete'))
    using job_id, cr.id, t.remote_id_column;
  update snapbase.jobs set state = 'awaiting_approval', change_request_id = cr.id,
         total = done + jsonb_array_length(creates) + jsonb_array_length(updates) + jsonb_array_length(deletes),
         message = format('awaiting approval of change request %s', cr.id)
   where id = job_id returning * into j;
  return j;
end;
$function$;

-- snapbase_private.recover_pools(text[],text): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.recover_pools(pool_ids text[], why text)
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
AS $function$
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
$function$;

-- snapbase_private.recover_dead_workers(interval,interval): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.recover_dead_workers(dead_after interval DEFAULT '00:00:45'::interval, lock_grace interval DEFAULT '00:00:12'::interval)
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
AS $function$
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
  end loop;
  return recovered;
end;
$function$;

-- snapbase_private.finish_change(bigint,snapbase.change_status,bigint,bigint,text,text,text): without the old snapbase:changes NOTIFY
CREATE OR REPLACE FUNCTION snapbase_private.finish_change(change_id bigint, outcome snapbase.change_status, affected bigint, snap_id bigint, err_code text, err_message text, note text)
 RETURNS snapbase.change_requests
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  cr snapbase.change_requests;
begin
  update snapbase.change_requests set
    status = outcome, rows_affected = affected, snapshot_id = snap_id, error_code = err_code, error_message = err_message,
    decided_by = snapbase.current_user_id(), decided_by_name = snapbase_private.actor_name(), decided_at = now(),
    decision_reason = note
  where id = change_id
  returning * into cr;
  perform snapbase_private.audit(
    case outcome when 'approved' then case cr.kind when 'restore' then 'restore' else 'approve' end
                 when 'failed' then 'fail' else 'reject' end,
    'change_request', cr.id::text, cr.table_name,
    jsonb_strip_nulls(jsonb_build_object('sql', cr.sql, 'status', outcome, 'rows_affected', affected, 'snapshot_id', snap_id,
      'error_code', err_code, 'error', err_message, 'reason', note, 'restore_snapshot_id', cr.restore_snapshot_id)));
  return cr;
end;
$function$;

-- snapbase_private.audit(text,text,text,text,jsonb): the actor through actor_name()
CREATE OR REPLACE FUNCTION snapbase_private.audit(action text, subject_type text DEFAULT NULL::text, subject_id text DEFAULT NULL::text, table_name text DEFAULT NULL::text, details jsonb DEFAULT '{}'::jsonb)
 RETURNS bigint
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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

-- snapbase_private.emit(text,text,jsonb): the actor through actor_name()
CREATE OR REPLACE FUNCTION snapbase_private.emit(topic text, kind text, payload jsonb)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  event jsonb;
  event_id bigint;
begin
  payload := payload || jsonb_build_object('by', snapbase_private.actor_name())
             || case when snapbase.current_app_role() = 'agent' then '{"agent": true}'::jsonb else '{}' end;
  insert into snapbase_private.events (topic, kind, payload) values (topic, kind, payload) returning id into event_id;
  event := jsonb_build_object('id', event_id, 'topic', topic, 'kind', kind) || payload;
  perform pg_notify('snapbase_events:' || topic, event::text);
end;
$function$;


drop function if exists snapbase_private.notify_job(snapbase.jobs) cascade;

-- Private helpers' reasoning, where a reader of the schema (or \df+) sees it.
comment on function snapbase_private.account_credentials(bigint,bytea) is
  'For the worker only (the owner): the credentials, opened with the secret key it unsealed.';
comment on function snapbase_private.acting_role() is
  'The role whose rights bound what the caller submits: the request''s role; for a job acting for a user (no role set, claims set), that user''s role; in psql, the database user.';
comment on function snapbase_private.add_csv_version(bigint,text,bigint,bigint,bigint[],jsonb) is
  'For the csv connector (the worker, as the owner): stores its rewrite of the file as the next version, with the row numbers of its records and the inferred types it was written under. The connector holds a lock on the csv_files row while it reads the latest version and writes the next, so concurrent publishes to one file apply one after the other.';
comment on function snapbase_private.apply_create(snapbase.workbook_tables,jsonb) is
  'Creates one record (used by create_record and bulk edits). Checks neither access nor audits: its callers do.';
comment on function snapbase_private.apply_update(snapbase.workbook_tables,bigint,jsonb) is
  'Updates one record''s values, flagging as edited the fields that differ from the source (used by update_record and bulk edits). Checks neither access nor audits: its callers do.';
comment on function snapbase_private.apply_delete(snapbase.workbook_tables,bigint) is
  'Deletes one record: a record new here goes at once, one known at the source is flagged deleted until published (used by delete_record and bulk edits). Checks neither access nor audits.';
comment on function snapbase_private.apply_undelete(snapbase.workbook_tables,bigint) is
  'Takes back a delete flag (used by undelete_record and bulk edits). Checks neither access nor audits.';
comment on function snapbase_private.apply_operation(snapbase.workbook_tables,jsonb) is
  'One bulk operation {"op": create|update|delete|undelete, "id"?, "values"?}, applied through the single-record functions; returns the record id.';
comment on function snapbase_private.attempt_login(text,text,inet) is
  'For the server (as the authenticator): checks the lockouts, then the password; counts a failure per account and per address; on success opens a session. Never raises for wrong credentials, so the count is committed even when the caller reports the failure as an error.';
comment on function snapbase_private.binary_chunk_store(snapbase_private.row_layouts) is
  'The layout''s binary chunk table, created on first use, or null when the layout must stay in text form. Each table comes with a store function whose statements are static, so capture plans them once per session instead of once per chunk.';
comment on function snapbase_private.caller_role() is
  'The role the caller acts as. Inside SECURITY DEFINER functions current_user is the owner, but the role setting still holds what the request SET ROLE''d to; a DBA in psql has no role set, so it is their login.';
comment on function snapbase_private.can_read(snapbase.managed_tables) is
  'May the caller read this live table? Snapshots, change requests and diffs follow it.';
comment on function snapbase_private.check_column_spec(jsonb) is
  'Validates one column spec {name, type, read_only?, scratch?} and returns it with the canonical type (resolve_type).';
comment on function snapbase_private.check_publish_conflicts(bigint,jsonb,jsonb) is
  'The conflict check before updates: a record conflicts when a field it would send changed at the source since it was last seen; unless the job forces, it is not sent and gets outcome conflict with the source''s values. A record the source no longer has fails. Returns the ids that may be sent.';
comment on function snapbase_private.check_values(snapbase.workbook_tables,jsonb,boolean) is
  'Checks a {column: value} object against the table: known columns, writable ones (read-only columns only on records new to the source), values of the right type. The type error names the column.';
comment on function snapbase_private.chunk_mask(regclass) is
  'The modulus minus one for content-defined chunk boundaries (hash & mask = 0), smaller for wide rows so a chunk stays near 4 MB. A table never analyzed has no row estimate: it is counted.';
comment on function snapbase_private.column_names(snapbase.workbook_tables,boolean) is
  'Names of a workbook table''s columns in order; published leaves out scratch columns.';
comment on function snapbase_private.connector_hosts_of(text,jsonb) is
  'The host a connector''s credentials name (for postgres, the URL''s host or a host parameter, as libpq reads it).';
comment on function snapbase_private.count_login_failure(text,text,integer,interval,jsonb) is
  'Counts one failed sign-in; at the limit, locks the account or the client address and audits it.';
comment on function snapbase_private.csv_file_content(bigint,integer) is
  'A CSV file''s version as text. No access check: for the owner (the worker) and snapbase.csv_file_content.';
comment on function snapbase_private.csv_record_count(text) is
  'Records in a CSV text as the connector parses it (RFC 4180: line breaks inside quoted fields do not end a record; blank lines are skipped), without the header; for the versions listing.';
comment on function snapbase_private.csv_rows_fit(bigint,integer[],text[]) is
  'Whether every mapped cell of a staged import converts to its column''s type (one statement: a clean file needs no cell-by-cell check).';
comment on function snapbase_private.db_role(text) is
  'The database role of a Snapbase user role (viewer, editor, admin).';
comment on function snapbase_private.enqueue_job(snapbase.jobs) is
  'Inserts the job and queues its graphile-worker task (job_key: one task per job).';
comment on function snapbase_private.ensure_sort_index(snapbase.workbook_tables,text) is
  'Sorting by a column keeps an index on (column, __id) so pages come from the index.';
comment on function snapbase_private.filter_columns(snapbase.workbook_tables,text) is
  'The columns a checked filter uses, as [{name, type}], recorded so the filter applies only while they are unchanged.';
comment on function snapbase_private.filter_parameters(snapbase.workbook_tables,text[]) is
  'The names a filter may use on a workbook table: its data and scratch columns with their catalog types, in table order, less hide.';
comment on function snapbase_private.filter_problem(snapbase.workbook_tables,text) is
  'Why a filter may not be used on a workbook table (null: it may): parsed as one expression over the table''s columns by probe_user_text, never planned or run.';
comment on function snapbase_private.finish_download(bigint) is
  'After the last batch of a complete download: records the source no longer has are removed when clean, or flagged __source_deleted when edited here.';
comment on function snapbase_private.hidden_columns(snapbase.snapshots) is
  'Columns of a snapshot''s live table the caller may not read: left out of every row a reader returns.';
comment on function snapbase_private.import_mapping(snapbase.csv_imports,snapbase.workbook_tables,jsonb) is
  'The effective CSV import mapping as rows (csv index, header, table column, its canonical type, new scratch?), checked against the table.';
comment on function snapbase_private.is_member(bigint) is
  'Whether the signed-in user belongs to the organization (security definer, so the membership policy does not recurse into itself).';
comment on function snapbase_private.job_progress(bigint,bigint,bigint,text) is
  'A job''s progress: done and total (null keeps them) and a message. Returns false once cancellation was requested.';
comment on function snapbase_private.managed_table_for(regclass) is
  'The managed table behind a relation, for a submitter who may read it ("no managed table" alike for tables that are not managed and for those you may not read).';
comment on function snapbase_private.next_to_publish(bigint,text,integer) is
  'The next batch of one kind (create, update, delete), marked pushing: [{id, remote_id, values, last_seen}] with only the fields to send (for a new record, the fields it was given: the source fills in the rest).';
comment on function snapbase_private.normalized_values(text,jsonb) is
  'A record''s values typed by the table''s columns and rendered back as JSON, so values from any source compare exactly with what the table holds ("12.5" and 12.50 are the same numeric). Only the given keys are kept.';
comment on function snapbase_private.prepare_download(bigint,jsonb) is
  'For the download task, once it has the source''s table spec: the job''s workbook table (created on the first download; on a refresh, checked against the spec).';
comment on function snapbase_private.publish_filter(text) is
  'Which records a publish sends, by kind (create, update, delete): one of three fixed conditions.';
comment on function snapbase_private.publish_managed(bigint) is
  'Publishing into a managed table of this database: all pending changes become one change request (structured edits submitted as the job''s creator), so approval, snapshot and audit apply; the job waits as awaiting_approval.';
comment on function snapbase_private.publish_pending(bigint) is
  'Records left to publish in a job, for its progress total.';
comment on function snapbase_private.readable_snapshot(bigint) is
  'The snapshot, if the caller may read its live table; "no snapshot N" otherwise (and for tables with row-level security, unless the caller bypasses it).';
comment on function snapbase_private.record_publish_outcomes(bigint,jsonb,bigint) is
  'Stores the outcomes of records just pushed: published records take the source''s stored values and remote id, their edit flags go, a deleted record is removed; otherwise the record keeps its changes and says why (failed or conflict).';
comment on function snapbase_private.remove_unused_chunks() is
  'Deletes stored chunks no snapshot uses any more, text and binary; returns how many. Excludes a capture in progress (advisory lock).';
comment on function snapbase_private.require_role(text) is
  'Raises 42501 unless the caller holds at least the given role (viewer < editor < admin).';
comment on function snapbase_private.require_workbook(bigint,text) is
  'Raises unless the caller may do what is asked with the workbook (read, suggest, edit or manage); "no workbook N" when it may not see it at all.';
comment on function snapbase_private.resolve_api_token(text) is
  'For the server (as the authenticator): who an API token acts for. Its role is the highest both its scopes and its user''s current role allow; disabled users and revoked or expired tokens get no row.';
comment on function snapbase_private.resolve_session(bigint,bigint) is
  'For the server (as the authenticator), on every request with a JWT: the user''s current email and role, or no row when the session or the user is gone.';
comment on function snapbase_private.sandbox_role(text) is
  'The sandbox roles by purpose (their names are configurable, so they come from the migration''s placeholders).';
comment on function snapbase_private.snapshot_chunk_source(snapbase.snapshots) is
  'A snapshot''s chunks as a FROM item (snapshot_id, seq, first_row, chunk_hash, chunk_id, row_count, rows), rows an array of the snapshot''s layout type whichever form it is stored in; text chunks are parsed only for the chunks a query keeps.';
comment on function snapbase_private.snapshot_records(bigint) is
  'Row texts of a snapshot, for a restore (run under apply_restore''s fixed output settings).';
comment on function snapbase_private.start_job(bigint) is
  'For tasks: marks the job running and counts the attempt; null when the job is finished or cancelled, so a retried task stops at once.';
comment on function snapbase_private.submitter_roles(snapbase.change_requests) is
  'The roles whose reading rights a change may use: the one it was submitted as and, when its submitter is a user, that user''s current role (a demotion takes effect).';
comment on function snapbase_private.suggestion_scope(snapbase.workbook_tables,bigint,boolean) is
  'The WHERE clause choosing which records'' suggestions to act on; within the filter, the filter reader finds the matching ids first.';
comment on function snapbase_private.table_columns(regclass) is
  'A table''s current columns, in order, as [{name, type}].';
comment on function snapbase_private.tg__add_record_event_triggers() is
  'A workbook table''s physical table is created after its row: the record event triggers are added at commit, when both exist.';
comment on function snapbase_private.tg__append_only() is
  'For append-only tables: no UPDATE, DELETE or TRUNCATE, whoever asks.';
comment on function snapbase_private.tg__job_follows_change() is
  'When an admin decides a change request a publish job waits for, the job and its records follow: approved, published; rejected or failed, failed with the reason on each record.';
comment on function snapbase_private.tg__records_event() is
  'Record changes as one event per statement (a 10,000-row accept is one event), saying what happened from the rows before and after.';
comment on function snapbase_private.tg__snapshots_immutable() is
  'Immutability: snapshots change only inside the retention job''s prune function.';
comment on function snapbase_private.create_workbook_table(snapbase.workbooks,text,jsonb,text,text,jsonb) is
  'Creates a workbook table (its row and the physical table in the workbook''s schema) from a checked column spec; callers check access and audit.';
comment on function snapbase_private.record_meta_columns() is
  'The metadata columns every workbook table has after its data columns.';
comment on function snapbase_private.apply_download_batch(bigint,jsonb,bigint) is
  'Applies one batch of source records to the job''s table: new records are inserted; a known record takes the source''s values except in fields edited here; the source''s values become __last_seen. Returns false when the job was cancelled.';

-- Temporary objects come last in every SECURITY DEFINER function's search path (if
-- pg_temp is not named, PostgreSQL searches it first for relations and types); this
-- runs last so it covers functions defined above and in earlier files.
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
