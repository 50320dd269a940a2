--! Previous: sha1:cacb92f12add7caf3b9478eca28a965b2a8a69dc
--! Hash: sha1:5ae8ece5577e0567acfef35e6a6d0a2965cac500
--! Message: accept suggestions in one update, flagging edits like update_record

-- accept_suggestions in one UPDATE, flagging edits the way update_record does.
--
-- The 000004 version selected and locked the chosen rows in a CTE, then updated
-- them through a join: twice the work of the UPDATE itself (which locks its rows
-- anyway). It also flagged every accepted column as edited, even when the accepted
-- value equals the one last seen at the source; update_record clears the flag then,
-- and now both agree: a field is edited while it differs from the source.

create or replace function snapbase.accept_suggestions(table_id bigint, record_id bigint default null, column_name text default null,
                                                       within_filter boolean default false)
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  rel text := snapbase_private.table_rel(t);
  cols text := (select string_agg(format('%I', c), ', ') from unnest(snapbase_private.column_names(t)) c);
  -- The accepted values of row r: its suggestions, or only the one for column_name ($1).
  patch constant text := '(select coalesce(jsonb_object_agg(k, v -> ''value''), ''{}'') from jsonb_each(r.__suggested) e(k, v)
                            where $1::text is null or k = $1)';
  result jsonb;
begin
  if column_name is not null and column_name <> all (snapbase_private.column_names(t)) then
    raise exception 'unknown column %', column_name using errcode = '22023';
  end if;
  -- The counts come from the same snapshot the UPDATE starts from.
  execute format($u$
    with counted as (
      select count(*) as records,
             coalesce(sum((select count(*) from jsonb_object_keys(%4$s))), 0) as cells,
             count(*) filter (where r.__suggested_new and $1::text is null) as created,
             count(*) filter (where r.__suggest_delete is not null and $1::text is null) as deleted
        from %1$s r where %2$s
    ), applied as (
      -- One pass per row: the patch, its values typed by the table's row type, and those
      -- as JSON (to compare with the source's) are each computed once.
      update %1$s r set
        (%3$s, __edited) = (
          select %5$s,
                 (r.__edited - array(select jsonb_object_keys(x.p))) || coalesce((
                   select jsonb_object_agg(k, now()) from jsonb_object_keys(x.p) k
                    where k <> all ($2) and (r.__created or r.__suggested_new or j.v -> k is distinct from r.__last_seen -> k)), '{}')
            from (select %4$s as p offset 0) x  -- offset 0: computed once, not inlined at each use
            cross join lateral jsonb_populate_record(null::%1$s, x.p) n
            cross join lateral (select to_jsonb(n) as v) j),
        __suggested = case when $1::text is null then '{}' else r.__suggested - $1 end,
        __created = r.__created or (r.__suggested_new and $1::text is null),
        __suggested_new = r.__suggested_new and $1::text is not null,
        __deleted = r.__deleted or (r.__suggest_delete is not null and $1::text is null),
        __suggest_delete = case when $1::text is null then null else r.__suggest_delete end,
        __updated_at = now()
       where %2$s
      returning 1
    )
    select jsonb_build_object('records', (select count(*) from applied), 'cells', c.cells, 'created', c.created, 'deleted', c.deleted)
      from counted c
    $u$, rel, snapbase_private.suggestion_scope(t, record_id, within_filter), cols, patch,
    (select string_agg(format('case when x.p ? %1$L then n.%1$I else r.%1$I end', c), ', ') from unnest(snapbase_private.column_names(t)) c))
    into result using column_name, snapbase_private.scratch_columns(t);
  perform snapbase_private.audit_workbook('accept_suggestions', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('record_id', record_id, 'column', column_name, 'within_filter', within_filter) || result);
  return result;
end;
$$;
