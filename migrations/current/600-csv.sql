--------------------------------------------------------------------------------
-- CSV: exports that follow the table's settings (issue 13).
--------------------------------------------------------------------------------
-- Export: snapbase.export_table_rows follows the table's column order and leaves its
-- hidden columns out, unless all_columns; table_export_query takes the columns to
-- write, so share links can pass theirs.

drop function if exists snapbase.export_table_rows(bigint, boolean) cascade;
drop function if exists snapbase_private.table_export_query(snapbase.workbook_tables, boolean) cascade;

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
