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
