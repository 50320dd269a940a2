--! Previous: sha1:b68cceb74aa9f33e6eed875d63512a93d5603430
--! Hash: sha1:74d1b1649e72ae0855a25f13a83d2098c3cdb81d
--! Message: downloads build last-seen values from the data columns

-- Downloads: each record's "last seen" values are built from the data columns
-- alone (measured: about a third of apply_download_batch's time went to rendering
-- whole rows as JSON and removing the metadata again).

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
    with incoming as (
      select e ->> 'remote_id' as remote_id, n as typed, %5$s as seen
        from jsonb_array_elements($1) e
        cross join lateral jsonb_populate_record(null::%1$s, e -> 'values') n
    ), updated as (
      update %1$s r set
        %2$s,
        __last_seen = i.seen,
        __edited = coalesce((select jsonb_object_agg(k, v) from jsonb_each(r.__edited) e(k, v)
                              where (to_jsonb(r) -> k) is distinct from (i.seen -> k)), '{}'),
        __source_deleted = false,
        __seen_job = $2,
        __updated_at = now()
        from incoming i
       where r.__remote_id = i.remote_id
      returning r.__remote_id
    )
    insert into %1$s (%3$s, __remote_id, __last_seen, __seen_job)
    select %4$s, i.remote_id, i.seen, $2 from incoming i
     where not exists (select 1 from updated u where u.__remote_id = i.remote_id)
    $q$, rel,
    (select string_agg(format('%1$I = case when r.__edited ? %1$L then r.%1$I else (i.typed).%1$I end', c), ', ') from unnest(cols) c),
    (select string_agg(format('%I', c), ', ') from unnest(cols) c),
    (select string_agg(format('(i.typed).%I', c), ', ') from unnest(cols) c),
    -- The source's values as JSON, built from the data columns alone: cheaper than
    -- rendering the whole row (metadata included) and removing the metadata again.
    -- jsonb_build_object takes at most 100 arguments, so wide tables keep that way.
    case when cardinality(cols) <= 50
         then format('jsonb_build_object(%s)', (select string_agg(format('%L, n.%I', c, c), ', ') from unnest(cols) c))
         else 'to_jsonb(n) - $3::text[]' end)
    using records, job_id, snapbase_private.scratch_columns(t) || snapbase_private.record_meta_columns();
  return snapbase_private.job_progress(job_id, done, null);
end;
$$;
