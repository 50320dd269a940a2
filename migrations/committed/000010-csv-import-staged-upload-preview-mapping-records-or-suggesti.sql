--! Previous: sha1:7967193a1a8d84ff93d96d6a416bf45b067bacf8
--! Hash: sha1:b68cceb74aa9f33e6eed875d63512a93d5603430
--! Message: csv import: staged upload, preview, mapping, records or suggestions

-- CSV import into a workbook table: upload (staged), preview with a column
-- mapping, then import as new records or as suggestions on existing records.
--
-- The server streams the upload into snapbase_private.csv_import_rows in one
-- transaction (a malformed file stages nothing); every later step is set-based
-- SQL over the staged rows, so a large file is never held in memory anywhere.
-- A mapping is {"CSV header": "table column" | null (skip) | {"new_scratch": name, "type": type}};
-- by default each header maps to the table column of the same name.

drop function if exists snapbase.start_csv_import cascade;
drop function if exists snapbase.stage_csv_rows cascade;
drop function if exists snapbase.csv_import_preview cascade;
drop function if exists snapbase.import_csv cascade;
drop function if exists snapbase_private.cast_error cascade;
drop function if exists snapbase_private.import_mapping cascade;
drop function if exists snapbase_private.require_import cascade;
drop table if exists snapbase_private.csv_import_rows, snapbase.csv_imports cascade;

create table snapbase.csv_imports (
  id bigint generated always as identity primary key,
  table_id bigint not null references snapbase.workbook_tables on delete cascade,
  created_by bigint references snapbase.users on delete set null,
  created_at timestamptz not null default now(),
  header text[] not null,
  row_count bigint not null default 0,
  state text not null default 'staged' check (state in ('staged', 'imported')),
  result jsonb
);
create index csv_imports_table_id_idx on snapbase.csv_imports (table_id);
comment on table snapbase.csv_imports is 'Uploaded CSV files waiting to be imported into a workbook table (staged), and what importing them did.';

create table snapbase_private.csv_import_rows (
  import_id bigint not null references snapbase.csv_imports on delete cascade,
  line integer not null,
  cells text[] not null,
  primary key (import_id, line)
);

alter table snapbase.csv_imports enable row level security;
create policy select_accessible on snapbase.csv_imports for select using (exists (
  select 1 from snapbase.workbook_tables t where t.id = table_id and snapbase_private.workbook_access(t.workbook_id) in ('owner', 'editor')));
grant select on snapbase.csv_imports to :ROLE_VIEWER;

create function snapbase_private.require_import(import_id bigint) returns snapbase.csv_imports
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  imp snapbase.csv_imports;
begin
  select * into imp from snapbase.csv_imports i where i.id = import_id;
  if imp.id is null or coalesce(snapbase_private.workbook_access((select workbook_id from snapbase.workbook_tables where id = imp.table_id)), '') not in ('owner', 'editor') then
    raise exception 'no CSV import %', import_id using errcode = 'P0002';
  end if;
  return imp;
end;
$$;

create function snapbase.start_csv_import(table_id bigint, header text[]) returns snapbase.csv_imports
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  imp snapbase.csv_imports;
begin
  if coalesce(cardinality(header), 0) = 0 or exists (select 1 from unnest(header) h where coalesce(trim(h), '') = '') then
    raise exception 'the CSV header must name every column' using errcode = '22023';
  end if;
  if (select count(distinct h) from unnest(header) h) <> cardinality(header) then
    raise exception 'the CSV header names a column twice' using errcode = '22023';
  end if;
  insert into snapbase.csv_imports (table_id, created_by, header) values (t.id, snapbase.current_user_id(), header) returning * into imp;
  return imp;
end;
$$;
grant execute on function snapbase.start_csv_import(bigint, text[]) to :ROLE_VIEWER;

-- A batch of parsed rows [{line, cells}] for a staged import.
create function snapbase.stage_csv_rows(import_id bigint, rows jsonb) returns bigint
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
  select imp.id, (r ->> 'line')::int, array(select jsonb_array_elements_text(r -> 'cells')) from jsonb_array_elements(rows) r;
  get diagnostics added = row_count;
  update snapbase.csv_imports i set row_count = i.row_count + added where i.id = imp.id;
  return added;
end;
$$;
grant execute on function snapbase.stage_csv_rows(bigint, jsonb) to :ROLE_VIEWER;

-- Why a text does not fit a type (null when it does). An empty field is NULL.
create function snapbase_private.cast_error(value text, type text) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
begin
  if value is null or (value = '' and type <> 'text') then
    return null;
  end if;
  execute format('select %L::%s', value, type);
  return null;
exception when others then
  return sqlerrm;
end;
$$;

-- The effective mapping as rows (csv index, header, table column, its type, new scratch?),
-- checked against the table.
create function snapbase_private.import_mapping(imp snapbase.csv_imports, t snapbase.workbook_tables, mapping jsonb)
returns table (idx integer, header text, col text, col_type text, new_scratch boolean, read_only boolean)
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  bad text;
begin
  if mapping is not null and jsonb_typeof(mapping) <> 'object' then
    raise exception 'mapping must be an object {"CSV header": "table column" | null | {"new_scratch": name, "type": type}}' using errcode = '22023';
  end if;
  select string_agg(k, ', ') into bad from jsonb_object_keys(coalesce(mapping, '{}')) k where k <> all (imp.header);
  if bad is not null then
    raise exception 'the mapping names headers the file does not have: %', bad using errcode = '22023';
  end if;
  return query
    with wanted as (
      select h.ord::integer as idx, h.name as header,
             case when mapping is null or not mapping ? h.name
                  then (select c ->> 'name' from jsonb_array_elements(t.columns) c where lower(c ->> 'name') = lower(h.name) limit 1)
                  when jsonb_typeof(mapping -> h.name) = 'string' then mapping ->> h.name
                  when jsonb_typeof(mapping -> h.name) = 'object' then mapping -> h.name ->> 'new_scratch'
             end as col,
             jsonb_typeof(mapping -> h.name) = 'object' as new_scratch,
             mapping -> h.name ->> 'type' as scratch_type
        from unnest(imp.header) with ordinality as h(name, ord)
    )
    select w.idx, w.header, w.col,
           coalesce(w.scratch_type, 'text') as col_type, coalesce(w.new_scratch, false), false
      from wanted w where w.col is not null and w.new_scratch
    union all
    select w.idx, w.header, w.col, c ->> 'type', false, coalesce((c ->> 'read_only')::boolean, false)
      from wanted w join jsonb_array_elements(t.columns) c on c ->> 'name' = w.col
     where w.col is not null and not coalesce(w.new_scratch, false)
    order by 1;
  select string_agg(format('%s → %s', h.name, mapping ->> h.name), ', ') into bad
    from unnest(imp.header) h
   where jsonb_typeof(mapping -> h.name) = 'string'
     and not exists (select 1 from jsonb_array_elements(t.columns) c where c ->> 'name' = mapping ->> h.name);
  if bad is not null then
    raise exception 'the mapping names columns the table does not have: %', bad using errcode = '22023';
  end if;
end;
$$;

-- What an import would do: a sample, the types the values look like, the mapping
-- in effect, and the rows that would fail with why (at most 50).
create function snapbase.csv_import_preview(import_id bigint, mapping jsonb default null, sample_rows integer default 20) returns jsonb
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  imp snapbase.csv_imports := snapbase_private.require_import(import_id);
  t snapbase.workbook_tables;
begin
  select * into t from snapbase.workbook_tables where id = imp.table_id;
  return jsonb_build_object(
    'import_id', imp.id, 'header', to_jsonb(imp.header), 'row_count', imp.row_count,
    'sample', (select coalesce(jsonb_agg(jsonb_build_object('line', r.line, 'cells', to_jsonb(r.cells)) order by r.line), '[]')
                 from (select * from snapbase_private.csv_import_rows r where r.import_id = imp.id order by r.line limit sample_rows) r),
    -- From the first thousand rows: the narrowest type every non-empty value fits.
    'inferred_types', (select jsonb_object_agg(h.name, (
        select case
          when bool_and(v ~ '^-?\d{1,9}$') then 'integer'
          when bool_and(v ~ '^-?\d+(\.\d+)?$') then 'numeric'
          when bool_and(lower(v) in ('true', 'false')) then 'boolean'
          when bool_and(v ~ '^\d{4}-\d{2}-\d{2}$') then 'date'
          when bool_and(v ~ '^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}') then 'timestamptz'
          else 'text' end
          from (select r.cells[h.ord] as v from snapbase_private.csv_import_rows r where r.import_id = imp.id order by r.line limit 1000) s
         where v <> ''))
        from unnest(imp.header) with ordinality as h(name, ord)),
    'mapping', (select coalesce(jsonb_object_agg(m.header, case when m.new_scratch then jsonb_build_object('new_scratch', m.col, 'type', m.col_type)
                                                        else to_jsonb(m.col) end), '{}')
                  from snapbase_private.import_mapping(imp, t, mapping) m),
    'problems', (select coalesce(jsonb_agg(p order by (p ->> 'line')::int), '[]') from (
        select jsonb_build_object('line', r.line, 'column', m.col, 'value', r.cells[m.idx], 'error', e.err) as p
          from snapbase_private.csv_import_rows r
          cross join snapbase_private.import_mapping(imp, t, mapping) m
          cross join lateral (select snapbase_private.cast_error(r.cells[m.idx], m.col_type) as err) e
         where r.import_id = imp.id and e.err is not null
         order by r.line limit 50) x));
end;
$$;
comment on function snapbase.csv_import_preview(bigint, jsonb, integer) is
  'Preview a staged CSV import: sample rows, inferred types, the mapping in effect and the rows that would fail, with their line numbers.';
grant execute on function snapbase.csv_import_preview(bigint, jsonb, integer) to :ROLE_VIEWER;

-- Imports a staged file: as new records (mode 'records'), or as suggestions on the
-- records whose key_column equals the row's value for it (mode 'suggestions'). One
-- transaction: unless skip_bad_rows, a single bad row imports nothing and the result
-- lists every error with its line. Returns {ok, processed, created, suggested, skipped, errors}.
create function snapbase.import_csv(import_id bigint, mapping jsonb default null, mode text default 'records',
                                    key_column text default null, skip_bad_rows boolean default false)
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  imp snapbase.csv_imports := snapbase_private.require_import(import_id);
  t snapbase.workbook_tables;
  rel text;
  scratch record;
  key_idx integer;
  key_type text;
  errors jsonb;
  processed bigint;
  created bigint := 0;
  suggested bigint := 0;
  skipped bigint := 0;
  cells_sql text;
  outcome jsonb;
begin
  if imp.state <> 'staged' then
    raise exception 'CSV import % was imported already', imp.id using errcode = '55000';
  end if;
  if mode not in ('records', 'suggestions') then
    raise exception 'mode must be records or suggestions (got %)', coalesce(mode, 'null') using errcode = '22023';
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
    if mode = 'suggestions' then
      select idx, col_type into key_idx, key_type from snapbase_import_map where col = key_column;
      if key_idx is null then
        raise exception 'key_column must be a table column the mapping fills (got %)', coalesce(key_column, 'null') using errcode = '22023';
      end if;
    end if;
    if exists (select 1 from snapbase_import_map where read_only and col is distinct from key_column and mode = 'suggestions') then
      raise exception 'read-only column(s) cannot be suggested: %', (select string_agg(col, ', ') from snapbase_import_map where read_only and col <> key_column)
        using errcode = '22023';
    end if;

    -- Rows that do not fit, with every reason.
    create temporary table snapbase_import_bad on commit drop as
      select r.line, string_agg(format('column %s: %s', m.col, e.err), '; ' order by m.idx) as error
        from snapbase_private.csv_import_rows r
        cross join snapbase_import_map m
        cross join lateral (select snapbase_private.cast_error(r.cells[m.idx], m.col_type) as err) e
       where r.import_id = imp.id and e.err is not null
       group by r.line;
    select count(*) into processed from snapbase_private.csv_import_rows r where r.import_id = imp.id;
    -- A typed value per mapped column; an empty field is NULL except in text columns.
    cells_sql := (select string_agg(format('case when s.cells[%1$s] = %3$L and %2$L <> %4$L then null else s.cells[%1$s]::%2$s end', idx, col_type, '', 'text'), ', ' order by idx)
                    from snapbase_import_map);

    if mode = 'records' then
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
      -- Rows whose key matches no record are reported, and count as skipped.
      execute format($q$
        insert into snapbase_import_bad (line, error)
        select s.line, format('no record with %%s = %%s', $2::text, s.cells[%3$s])
          from snapbase_private.csv_import_rows s
         where s.import_id = $1 and not exists (select 1 from snapbase_import_bad b where b.line = s.line)
           and not exists (select 1 from %1$s r where not r.__suggested_new and r.%2$I = (case when s.cells[%3$s] = '' then null else s.cells[%3$s] end)::%4$s)$q$,
        rel, key_column, key_idx, key_type) using imp.id, key_column;
      execute format($q$
        update %1$s r set __suggested = r.__suggested || x.suggestion, __updated_at = now()
          from (select (case when s.cells[%3$s] = '' then null else s.cells[%3$s] end)::%4$s as key_value,
                       (select jsonb_object_agg(m.col, jsonb_build_object('value', a.typed -> (m.pos - 1)::int, 'by', $3::text, 'at', now()))
                          from (select col, row_number() over (order by idx) as pos from snapbase_import_map) m
                         where m.col <> $2) as suggestion
                  from snapbase_private.csv_import_rows s
                  cross join lateral (select jsonb_build_array(%5$s) as typed) a
                 where s.import_id = $1 and not exists (select 1 from snapbase_import_bad b where b.line = s.line)) x
         where not r.__suggested_new and r.%2$I = x.key_value$q$,
        rel, key_column, key_idx, key_type, cells_sql)
        using imp.id, key_column, coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user);
      get diagnostics suggested = row_count;
    end if;

    select coalesce(jsonb_agg(jsonb_build_object('line', b.line, 'error', b.error) order by b.line), '[]'), count(*)
      into errors, skipped from snapbase_import_bad b;
    if skipped > 0 and not skip_bad_rows then
      raise exception 'the file has bad rows' using errcode = 'SB002';
    end if;
  exception when sqlstate 'SB002' then
    -- Undoes everything above (scratch columns included); the errors are reported.
    return jsonb_build_object('ok', false, 'processed', processed, 'created', 0, 'suggested', 0, 'skipped', 0, 'errors', errors);
  end;
  outcome := jsonb_build_object('ok', true, 'processed', processed, 'created', created, 'suggested', suggested, 'skipped', skipped, 'errors', errors);
  update snapbase.csv_imports i set state = 'imported', result = outcome where i.id = imp.id;
  delete from snapbase_private.csv_import_rows r where r.import_id = imp.id;
  perform snapbase_private.audit_workbook('import_csv', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('import_id', imp.id, 'mode', mode, 'key_column', key_column) || (outcome - 'errors'));
  return outcome;
end;
$$;
comment on function snapbase.import_csv(bigint, jsonb, text, text, boolean) is
  'Import a staged CSV as new records or as suggestions (matched by key_column); all or nothing unless skip_bad_rows. Errors carry line numbers.';
grant execute on function snapbase.import_csv(bigint, jsonb, text, text, boolean) to :ROLE_VIEWER;
