--! Previous: sha1:6b95176eefb379d87ac1d55baa4b6f125f84bca5
--! Hash: sha1:bd8df0ed8384cc4d69a3380b8c488662775622f8
--! Message: smaller snapshot chunks for wide rows

-- Chunks of wide rows hold fewer rows. A chunk ended after a key hashing to 0 mod
-- 256 whatever the rows held, so a table of 5 MB documents made chunks of about
-- 1.3 GB, past PostgreSQL's 1 GB limit for one value: its snapshot (and so every
-- approval on it) failed. The modulus is now the power of two that keeps a chunk
-- near 4 MB by the table's average row size (relation size with TOAST and indexes
-- over its row estimate), at most 256 and at least 1. Tables of rows under about
-- 16 kB keep 256, so their chunks and deduplication are unchanged; a wide table's
-- modulus moves only when its average row size crosses a power of two.

-- The modulus minus one, for "hash & mask = 0". A table never analyzed has no row
-- estimate: it is counted.
create or replace function snapbase_private.chunk_mask(target regclass) returns integer
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  estimate double precision := (select c.reltuples from pg_class c where c.oid = target);
begin
  if estimate < 0 then
    execute format('select count(*) from %s', target) into estimate;
  end if;
  if estimate <= 0 then
    return 255;
  end if;
  return (2 ^ least(8, greatest(0, floor(log(2, greatest(1, 4194304 / greatest(1, pg_total_relation_size(target) / estimate))::numeric)))))::integer - 1;
end;
$$;

-- The query yielding a table's chunks in order, as (rows, row_count, boundary).
-- With a primary key the chunks are arrays of row_expression (aggregated over rows
-- aliased t) and boundary is the chunk's first key as text; without one, the rows'
-- text form in a single ordered pass, and no boundary.
create or replace function snapbase_private.chunk_query(target regclass, pk text[], row_expression text) returns text
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
                   count(*) filter (where %1$s & %3$s = 0) over (order by t::text rows unbounded preceding) as seq
              from %2$s t) g
     group by g.seq
     order by g.seq
  $q$, snapbase_private.chunk_boundary_expression(target, pk), target, snapbase_private.chunk_mask(target))
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
                        (select %6$s from %2$s t where %7$s & %10$s = 0)) x
                window w as (order by %8$s)) b
         order by %3$s
      ) c
  $q$, k.key, target, k.lo, k.hi, k.leads, k.key_as, snapbase_private.chunk_boundary_expression(target, pk), k.x_key,
       row_expression, snapbase_private.chunk_mask(target))
  end
  from k
$$;
