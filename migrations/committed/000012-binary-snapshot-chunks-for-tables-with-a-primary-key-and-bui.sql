--! Previous: sha1:74d1b1649e72ae0855a25f13a83d2098c3cdb81d
--! Hash: sha1:8dd1de4eb15b869eb529b2a59abd37f7ba829950
--! Message: binary snapshot chunks for tables with a primary key and built-in column types

-- Snapshots of tables with a primary key store their chunks in binary form.
--
-- Measured at 100k rows: rendering every row as text (record_out) alone cost about
-- 1.7x a CREATE TABLE AS copy, and hashing the text for deduplication more on top,
-- so a snapshot took 3-4x the copy. A chunk is now an array of the layout's own
-- composite type, built without any output function, and stored in a table per
-- layout. Deduplication no longer hashes anything: a chunk is reused when an
-- earlier chunk of the same layout starts at the same key, holds as many rows and
-- is byte-for-byte identical (record_image_eq), which is exact. Edits, inserts and
-- deletes still change only the chunks they fall in, because chunk boundaries are
-- the content-defined keys of migration 000003.
--
-- Binary storage is used only when every column has a built-in type (pg_catalog),
-- which can never be dropped or altered under the stored values. Columns of
-- user-defined types (enums, domains, extension types) and OID-valued reg* types
-- keep the text form, as do tables without a primary key.
--
-- Readers get a snapshot's chunks as arrays of its layout type whatever the storage
-- (snapshot_chunk_source), so each reader has one code path.

drop function if exists snapbase_private.chunk_query(regclass, text[], text);
drop function if exists snapbase_private.binary_chunk_store(snapbase_private.row_layouts);
drop function if exists snapbase_private.snapshot_chunk_source(snapbase.snapshots);

create sequence if not exists snapbase_private.binary_chunk_ids;

alter table snapbase_private.row_layouts add column if not exists chunk_table text;
comment on column snapbase_private.row_layouts.chunk_table is
  'The table holding this layout''s binary chunks (rows as an array of the layout type); null until first used, and always null for layouts with user-defined types.';

alter table snapbase_private.snapshot_chunks add column if not exists chunk_id bigint;
alter table snapbase_private.snapshot_chunks alter column chunk_hash drop not null;
alter table snapbase_private.snapshot_chunks drop constraint if exists snapshot_chunks_one_store;
alter table snapbase_private.snapshot_chunks add constraint snapshot_chunks_one_store
  check ((chunk_hash is null) <> (chunk_id is null));
comment on column snapbase_private.snapshot_chunks.chunk_id is
  'A binary chunk, in the chunk table of the snapshot''s layout (ids are unique across those tables); chunk_hash is then null.';
create index if not exists snapshot_chunks_id_idx on snapbase_private.snapshot_chunks (chunk_id) where chunk_id is not null;

-- The layout's binary chunk table, created on first use, or null when the layout
-- must stay in text form. The table comes with a store function whose statements
-- are static, so capture plans them once per session instead of once per chunk.
create function snapbase_private.binary_chunk_store(layout snapbase_private.row_layouts) returns text
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
  -- Returns the id of an identical stored chunk, or stores this one. SQL, not
  -- PL/pgSQL: PL/pgSQL would expand the array argument element by element on entry
  -- (measured: 0.3 ms a chunk), and a SQL function keeps its plan for the query.
  execute format($fn$
    create function snapbase_private.store_chunk_%1$s(boundary text, rows %2$s[], out id bigint, out is_new boolean)
    language sql
    set search_path = pg_catalog
    as $body$
      with found as (
        select c.id from %3$s c
         where c.boundary = $1 and c.row_count = cardinality($2) and record_image_eq(row(c.rows, 0), row($2, 0))
         order by c.id desc limit 1
      ), stored as (
        insert into %3$s (boundary, row_count, rows)
        select $1, cardinality($2), $2 where not exists (select from found)
        returning %3$s.id
      )
      select id, false from found union all select id, true from stored
    $body$
  $fn$, layout.id, layout.type_name, store);
  update snapbase_private.row_layouts set chunk_table = store where id = layout.id;
  return store;
end;
$$;

-- The query yielding a table's chunks in order, as (rows, row_count, boundary).
-- With a primary key the chunks are arrays of row_expression (aggregated over rows
-- aliased t) and boundary is the chunk's first key as text; without one, the rows'
-- text form in a single ordered pass, and no boundary.
create function snapbase_private.chunk_query(target regclass, pk text[], row_expression text) returns text
language sql stable
set search_path = pg_catalog
as $$
  with k as (
    select string_agg(format('t.%I', c), ', ' order by i) as key,
           string_agg(format('t.%I as k%s', c, i), ', ' order by i) as key_as,
           string_agg(format('b.k%s', i), ', ' order by i) as lo,
           string_agg(format('b.h%s', i), ', ' order by i) as hi,
           string_agg(format('x.k%s', i), ', ' order by i) as x_key,
           string_agg(format('lead(x.k%1$s) over w as h%1$s', i), ', ' order by i) as leads
      from unnest(pk) with ordinality as u(c, i)
  )
  select case when pk is null then format($q$
    select array_agg(g.rec order by g.rec) as rows, count(*)::integer as row_count, null::text as boundary
      from (select t::text as rec,
                   count(*) filter (where %1$s & 255 = 0) over (order by t::text rows unbounded preceding) as seq
              from %2$s t) g
     group by g.seq
     order by g.seq
  $q$, snapbase_private.chunk_boundary_expression(target, pk), target)
  else format($q$
    select c.rows, cardinality(c.rows) as row_count, c.boundary
      from (
        -- ARRAY(SELECT ... ORDER BY) takes the index scan's order as it comes; an
        -- ordered aggregate would sort every chunk again (PostgreSQL 15).
        select case when b.last
                    then array(select %9$s from %2$s t where (%1$s) >= (%3$s) order by %1$s)
                    else array(select %9$s from %2$s t where (%1$s) >= (%3$s) and (%1$s) < (%4$s) order by %1$s)
               end as rows,
               row(%3$s)::text as boundary
          from (select x.*, %5$s, row_number() over w = count(*) over () as last
                  from ((select %6$s from %2$s t order by %1$s limit 1)
                        union
                        (select %6$s from %2$s t where %7$s & 255 = 0)) x
                window w as (order by %8$s)) b
         order by %3$s
      ) c
  $q$, k.key, target, k.lo, k.hi, k.leads, k.key_as, snapbase_private.chunk_boundary_expression(target, pk), k.x_key,
       row_expression)
  end
  from k
$$;
drop function if exists snapbase_private.chunk_query(regclass, text[]);

create or replace function snapbase_private.capture_snapshot(mt snapbase.managed_tables, change_request_id bigint, reason text)
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
as $$
declare
  target regclass := snapbase_private.relation_of(mt);
  cols jsonb;
  pk text[];
  layout snapbase_private.row_layouts;
  chunk_table text;
  chunk record;
  n integer := 0;
  first_rows bigint[] := '{}';
  hashes bytea[] := '{}';
  ids bigint[] := '{}';
  is_new boolean[] := '{}';
  total bigint := 0;
  inserted integer;
  stored bigint;
  new_stored bigint;
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
  end if;

  if chunk_table is not null then
    -- Each chunk is stored (or found) inside the query, so its rows are never copied
    -- into this function.
    for chunk in execute format('select s.id, s.is_new, q.row_count from (%s) q cross join lateral snapbase_private.store_chunk_%s(q.boundary, q.rows) s',
                                snapbase_private.chunk_query(target, pk, format('row(t.*)::%s', layout.type_name)), layout.id)
    loop
      n := n + 1;
      ids[n] := chunk.id;
      is_new[n] := chunk.is_new;
      first_rows[n] := total;
      total := total + chunk.row_count;
    end loop;
    execute format('select coalesce(sum(pg_column_size(c.rows)), 0), coalesce(sum(pg_column_size(c.rows)) filter (where u.is_new), 0)
                      from unnest($1, $2) u(id, is_new) join %s c on c.id = u.id', chunk_table)
      into stored, new_stored using ids, is_new;
  else
    for chunk in execute snapbase_private.chunk_query(target, pk, 't::text')
    loop
      -- Subscript assignment extends the arrays in place.
      n := n + 1;
      hashes[n] := sha256(array_send(chunk.rows));
      first_rows[n] := total;
      total := total + chunk.row_count;
      insert into snapbase_private.chunk_store (hash, row_count, rows)
        values (hashes[n], chunk.row_count, chunk.rows)
        on conflict (hash) do nothing;
      get diagnostics inserted = row_count;
      is_new[n] := inserted > 0;
    end loop;
    select coalesce(sum(pg_column_size(cs.rows)), 0), coalesce(sum(pg_column_size(cs.rows)) filter (where h.is_new), 0)
      into stored, new_stored
      from unnest(hashes, is_new) h(hash, is_new) join snapbase_private.chunk_store cs on cs.hash = h.hash;
  end if;

  insert into snapbase.snapshots (managed_table_id, table_name, change_request_id, reason, created_by,
                                  record_count, columns, primary_key, chunk_count, stored_bytes, new_stored_bytes, layout_id)
  values (mt.id, mt.qualified_name, change_request_id, reason,
          coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user),
          total, cols, pk, n, stored, new_stored, layout.id)
  returning * into snap;
  if chunk_table is not null then
    insert into snapbase_private.snapshot_chunks (snapshot_id, seq, first_row, chunk_id)
      select snap.id, u.seq - 1, u.first_row, u.id from unnest(first_rows, ids) with ordinality as u(first_row, id, seq);
  else
    insert into snapbase_private.snapshot_chunks (snapshot_id, seq, first_row, chunk_hash)
      select snap.id, u.seq - 1, u.first_row, u.hash from unnest(first_rows, hashes) with ordinality as u(first_row, hash, seq);
  end if;

  perform pg_notify('snapbase:snapshots', json_build_object('kind', 'snapshot_created', 'id', snap.id,
    'managed_table_id', mt.id, 'change_request_id', change_request_id, 'record_count', snap.record_count)::text);
  return snap;
end;
$$;

-- A snapshot's chunks as a FROM item with (snapshot_id, seq, first_row, chunk_hash,
-- chunk_id, row_count, rows), rows being an array of the snapshot's layout type
-- whichever way they are stored. Text chunks are parsed only for chunks a query
-- keeps. Unnest rows in the select list (SRFs there yield the composite as one
-- value), e.g. lateral (select unnest(c.rows) as rec, generate_series(1, c.row_count) as i).
create function snapbase_private.snapshot_chunk_source(snap snapbase.snapshots) returns text
language sql stable
set search_path = pg_catalog
as $$
  select case when exists (select 1 from snapbase_private.snapshot_chunks sc where sc.snapshot_id = snap.id and sc.chunk_id is not null)
    then format('(select sc.snapshot_id, sc.seq, sc.first_row, sc.chunk_hash, sc.chunk_id, c.row_count, c.rows
                    from snapbase_private.snapshot_chunks sc join %s c on c.id = sc.chunk_id)', l.chunk_table)
    else format('(select sc.snapshot_id, sc.seq, sc.first_row, sc.chunk_hash, sc.chunk_id, c.row_count, c.rows::%s[] as rows
                    from snapbase_private.snapshot_chunks sc join snapbase_private.chunk_store c on c.hash = sc.chunk_hash)', l.type_name)
  end
  from snapbase_private.row_layouts l where l.id = snap.layout_id
$$;

create or replace function snapbase.snapshot_rows(snapshot_id bigint, offset_rows bigint default 0, limit_rows bigint default null)
returns table (ordinal bigint, "row" jsonb)
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
  snap snapbase.snapshots := snapbase_private.readable_snapshot(snapshot_id);
  hidden text[] := snapbase_private.hidden_columns(snap);
  first_wanted bigint := greatest(coalesce(offset_rows, 0), 0);
  last_wanted bigint := case when limit_rows is null then null else first_wanted + greatest(limit_rows, 0) end;
begin
  -- Decode only the chunks that overlap the requested range.
  return query execute format($q$
    select c.first_row + r.i - 1 as ordinal, to_jsonb(r.rec) - $2 as "row"
      from %s c
      cross join lateral (select unnest(c.rows) as rec, generate_series(1, c.row_count) as i) r
     where c.snapshot_id = $1
       and c.first_row + c.row_count > $3
       and ($4::bigint is null or c.first_row < $4)
       and c.first_row + r.i - 1 >= $3
       and ($4::bigint is null or c.first_row + r.i - 1 < $4)
     order by c.seq, r.i
  $q$, snapbase_private.snapshot_chunk_source(snap)) using snap.id, hidden, first_wanted, last_wanted;
end;
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
  -- Chunks present in both snapshots hold identical rows: only the others are decoded.
  return query execute format($q$
    with only_a as (
      select to_jsonb(r.rec) - $4 as j
        from %1$s c cross join lateral (select unnest(c.rows) as rec) r
       where c.snapshot_id = $1
         and not exists (select 1 from snapbase_private.snapshot_chunks o
                          where o.snapshot_id = $2 and (o.chunk_hash = c.chunk_hash or o.chunk_id = c.chunk_id))
    ), only_b as (
      select to_jsonb(r.rec) - $4 as j
        from %2$s c cross join lateral (select unnest(c.rows) as rec) r
       where c.snapshot_id = $2
         and not exists (select 1 from snapbase_private.snapshot_chunks o
                          where o.snapshot_id = $1 and (o.chunk_hash = c.chunk_hash or o.chunk_id = c.chunk_id))
    ), keyed_a as (
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

-- Row texts of a snapshot, for the restore run by the approving admin (who calls it
-- under apply_restore's fixed output settings).
create or replace function snapbase_private.snapshot_records(snapshot_id bigint) returns setof text
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  snap snapbase.snapshots;
begin
  select * into snap from snapbase.snapshots s where s.id = snapshot_records.snapshot_id;
  return query execute format('select r.rec::text from %s c cross join lateral (select unnest(c.rows) as rec) r where c.snapshot_id = $1',
    snapbase_private.snapshot_chunk_source(snap)) using snap.id;
end;
$$;

create or replace function snapbase.export_snapshot_rows(snapshot_id bigint) returns setof text[]
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
  snap snapbase.snapshots := snapbase_private.readable_snapshot(snapshot_id);
  visible text[] := array(select c ->> 'name' from jsonb_array_elements(snap.columns) with ordinality as e(c, ord)
                          where (c ->> 'name') <> all (snapbase_private.hidden_columns(snap)) order by ord);
begin
  return next visible;
  return query execute format($q$
    select array[%s]
      from %s c
      cross join lateral (select unnest(c.rows) as rec, generate_series(1, c.row_count) as i) r
     where c.snapshot_id = $1
     order by c.seq, r.i$q$,
    (select string_agg(format('(r.rec).%I::text', c), ', ') from unnest(visible) c), snapbase_private.snapshot_chunk_source(snap))
    using snap.id;
end;
$$;

-- Deletes stored chunks no snapshot uses any more, text and binary; returns how many.
create or replace function snapbase_private.remove_unused_chunks() returns bigint
language plpgsql
set search_path = pg_catalog
as $$
declare
  removed bigint := 0;
  n bigint;
  chunk_table text;
begin
  delete from snapbase_private.chunk_store cs
   where not exists (select 1 from snapbase_private.snapshot_chunks sc where sc.chunk_hash = cs.hash);
  get diagnostics n = row_count;
  removed := removed + n;
  for chunk_table in select l.chunk_table from snapbase_private.row_layouts l where l.chunk_table is not null loop
    execute format('delete from %s c where not exists (select 1 from snapbase_private.snapshot_chunks sc where sc.chunk_id = c.id)', chunk_table);
    get diagnostics n = row_count;
    removed := removed + n;
  end loop;
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
  if cardinality(doomed) = 0 then
    return 0;
  end if;
  perform set_config('snapbase.pruning', 'on', true);
  delete from snapbase.snapshots where id = any(doomed);
  chunks_removed := snapbase_private.remove_unused_chunks();
  perform set_config('snapbase.pruning', 'off', true);
  perform snapbase_private.audit('retention_prune', 'snapshot', null, null,
    jsonb_build_object('snapshot_ids', doomed, 'chunks_removed', chunks_removed));
  return cardinality(doomed);
end;
$$;
