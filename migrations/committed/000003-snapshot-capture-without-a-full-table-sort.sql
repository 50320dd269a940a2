--! Previous: sha1:515c56902638a74befc4ea19c3d24374b20d6709
--! Hash: sha1:2fabccfa015dacd0bc11bcf2cb2fe346e3d6c6af
--! Message: snapshot capture without a full-table sort

-- Snapshot capture without a full-table sort.
--
-- With a primary key, chunk boundaries are the keys that hash to 0 mod 256, found
-- with one index-only pass; each chunk is then read with an index range scan and
-- aggregated on its own. Boundaries depend on content, not position, so an edit
-- changes only the chunk it falls in, and memory holds one chunk, not the table.
-- (Migration 000002 numbered every row with ROW_NUMBER, then sorted and windowed
-- the whole table a second time: about 5x the cost of CREATE TABLE AS at 1M rows.)
-- Tables without a primary key keep a single ordered pass over their row text.
-- Each chunk is hashed from its binary array form and written straight into
-- chunk_store: no intermediate copy of the rows.
--
-- The hash and boundary functions differ from migration 000002, so the first
-- snapshot of each table after this migration shares no chunks with older ones;
-- later snapshots deduplicate as before.

create or replace function snapbase_private.chunk_boundary_expression(target regclass, pk text[]) returns text
language sql stable
set search_path = pg_catalog
as $$
  -- Integer keys hash directly; anything else hashes its text form.
  select case
    when pk is null then 'hashtext(t::text)'
    when cardinality(pk) = 1 then
      case (select a.atttypid from pg_attribute a where a.attrelid = target and a.attname = pk[1])
        when 'int4'::regtype then format('hashint4(t.%I)', pk[1])
        when 'int8'::regtype then format('hashint8(t.%I)', pk[1])
        when 'int2'::regtype then format('hashint2(t.%I)', pk[1])
        else format('hashtext(t.%I::text)', pk[1])
      end
    else format('hashtext(row(%s)::text)', (select string_agg(format('t.%I', c), ', ') from unnest(pk) c))
  end
$$;

-- The query yielding a table's chunks, in order, as (rows text[], row_count integer).
create or replace function snapbase_private.chunk_query(target regclass, pk text[]) returns text
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
    select array_agg(g.rec order by g.rec) as rows, count(*)::integer as row_count
      from (select t::text as rec,
                   count(*) filter (where %1$s & 255 = 0) over (order by t::text rows unbounded preceding) as seq
              from %2$s t) g
     group by g.seq
     order by g.seq
  $q$, snapbase_private.chunk_boundary_expression(target, pk), target)
  else format($q$
    select c.rows, cardinality(c.rows) as row_count
      from (
        select case when b.last
                    then (select array_agg(t::text order by %1$s) from %2$s t where (%1$s) >= (%3$s))
                    else (select array_agg(t::text order by %1$s) from %2$s t where (%1$s) >= (%3$s) and (%1$s) < (%4$s))
               end as rows
          from (select x.*, %5$s, row_number() over w = count(*) over () as last
                  from ((select %6$s from %2$s t order by %1$s limit 1)
                        union
                        (select %6$s from %2$s t where %7$s & 255 = 0)) x
                window w as (order by %8$s)) b
         order by %3$s
      ) c
  $q$, k.key, target, k.lo, k.hi, k.leads, k.key_as, snapbase_private.chunk_boundary_expression(target, pk), k.x_key)
  end
  from k
$$;

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
  chunk record;
  n integer := 0;
  first_rows bigint[] := '{}';
  hashes bytea[] := '{}';
  is_new boolean[] := '{}';
  total bigint := 0;
  inserted integer;
  snap snapbase.snapshots;
begin
  if target is null then
    raise exception 'managed table % no longer exists', mt.qualified_name using errcode = '42P01';
  end if;
  cols := snapbase_private.table_columns(target);
  pk := snapbase_private.primary_key(target);
  layout := snapbase_private.ensure_layout(cols);
  for chunk in execute snapbase_private.chunk_query(target, pk)
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

  insert into snapbase.snapshots (managed_table_id, table_name, change_request_id, reason, created_by,
                                  record_count, columns, primary_key, chunk_count, stored_bytes, new_stored_bytes, layout_id)
  select mt.id, mt.qualified_name, change_request_id, reason,
         coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user),
         total, cols, pk, cardinality(hashes),
         coalesce(sum(pg_column_size(cs.rows)), 0),
         coalesce(sum(pg_column_size(cs.rows)) filter (where h.is_new), 0),
         layout.id
    from unnest(hashes, is_new) h(hash, is_new) join snapbase_private.chunk_store cs on cs.hash = h.hash
  returning * into snap;
  insert into snapbase_private.snapshot_chunks (snapshot_id, seq, first_row, chunk_hash)
    select snap.id, u.seq - 1, u.first_row, u.hash from unnest(first_rows, hashes) with ordinality as u(first_row, hash, seq);

  perform pg_notify('snapbase:snapshots', json_build_object('kind', 'snapshot_created', 'id', snap.id,
    'managed_table_id', mt.id, 'change_request_id', change_request_id, 'record_count', snap.record_count)::text);
  return snap;
end;
$$;
