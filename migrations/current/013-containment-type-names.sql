--------------------------------------------------------------------------------
-- Containment, part 4: type names from users are data.
--------------------------------------------------------------------------------
-- A type name (column specs, scratch columns, CSV import mappings, CSV column
-- types) is never put into SQL as written. snapbase_private.resolve_type reads it
-- as a name, optional modifiers and optional [], resolves the name with to_regtype,
-- computes the modifiers with the type's own typmod input function, and returns
-- PostgreSQL's canonical spelling (format_type). Only that is put into DDL or casts.

drop function if exists snapbase_private.resolve_type(text) cascade;

create function snapbase_private.resolve_type(type_name text) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  parts text[];
  base regtype;
  t pg_type;
  mods text[];
  typmod integer := -1;
  canonical text;
begin
  if type_name is null or length(type_name) > 100 then
    raise exception 'a type name is required (at most 100 characters)' using errcode = '22023';
  end if;
  -- words, optional (n[, n]), optional trailing words (timestamp(3) with time zone), optional []
  parts := regexp_match(lower(btrim(type_name)),
    '^([a-z][a-z0-9_]*(?: [a-z][a-z0-9_]*)*)(?: ?\( *(\d{1,5}) *(?:, *(-?\d{1,5}) *)?\))?((?: [a-z][a-z0-9_]*)*)( ?\[ *\])*$');
  if parts is null then
    raise exception 'type % is not a type name (letters, digits and _, optional modifiers such as (10,2), optional [])', quote_literal(type_name)
      using errcode = '22023';
  end if;
  begin
    base := to_regtype(parts[1] || coalesce(parts[4], ''));
  exception when others then
    base := null;
  end;
  if base is null then
    raise exception 'unknown type %', type_name using errcode = '22023';
  end if;
  select * into t from pg_type where oid = base;
  if t.typnamespace <> 'pg_catalog'::regnamespace or t.typtype not in ('b', 'r', 'm')
     or t.typname ~ '^(reg|pg_|_)' or t.typname in ('oid', 'xid', 'xid8', 'cid', 'tid', 'aclitem', 'refcursor', 'gtsvector',
                                                    'int2vector', 'oidvector', 'txid_snapshot', 'unknown', 'cstring') then
    raise exception 'type % is not supported (built-in scalar, range and array types only)', quote_literal(type_name)
      using errcode = '22023';
  end if;
  mods := array_remove(array[parts[2], parts[3]], null);
  if cardinality(mods) > 0 then
    if t.typmodin = 0 then
      raise exception 'type % takes no modifiers', format_type(base, null) using errcode = '22023';
    end if;
    begin
      -- The type's own modifier parser (from the catalog) validates and encodes them.
      execute format('select %s($1::cstring[])', t.typmodin) into typmod using mods;
    exception when others then
      raise exception 'type %: %', quote_literal(type_name), sqlerrm using errcode = '22023';
    end;
  end if;
  canonical := format_type(case when parts[5] is not null then t.typarray else base end, typmod);
  if parts[5] is not null and t.typarray = 0 then
    raise exception 'type % has no array type', format_type(base, null) using errcode = '22023';
  end if;
  return canonical;
end;
$$;
comment on function snapbase_private.resolve_type(text) is
  'A user''s type name as PostgreSQL''s canonical spelling (format_type of to_regtype, modifiers through the type''s typmodin), or 22023. Only built-in scalar, range and array types.';

-- Validates one column spec {name, type, read_only?, scratch?} and returns it with
-- the canonical type.
create or replace function snapbase_private.check_column_spec(spec jsonb) returns jsonb
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  col_name text := spec ->> 'name';
  col_type text;
begin
  if jsonb_typeof(spec) is distinct from 'object' or col_name is null or length(col_name) not between 1 and 63
     or octet_length(col_name) > 63 then
    raise exception 'each column needs a name of 1 to 63 characters (got %)', left(coalesce(spec::text, 'null'), 200) using errcode = '22023';
  end if;
  if col_name like '\_\_%' then
    raise exception 'column names starting with __ are reserved for metadata (got %)', col_name using errcode = '22023';
  end if;
  if jsonb_typeof(spec -> 'type') is distinct from 'string' then
    raise exception 'column %: type must be a type name' , col_name using errcode = '22023';
  end if;
  begin
    col_type := snapbase_private.resolve_type(spec ->> 'type');
  exception when others then
    raise exception 'column %: %', col_name, sqlerrm using errcode = '22023';
  end;
  if jsonb_typeof(coalesce(spec -> 'read_only', 'false')) <> 'boolean' or jsonb_typeof(coalesce(spec -> 'scratch', 'false')) <> 'boolean' then
    raise exception 'column %: read_only and scratch must be true or false', col_name using errcode = '22023';
  end if;
  return jsonb_build_object('name', col_name, 'type', col_type,
    'read_only', coalesce((spec ->> 'read_only')::boolean, false), 'scratch', coalesce((spec ->> 'scratch')::boolean, false));
end;
$$;

-- Why a text does not fit a type (null when it does). An empty field is NULL.
create or replace function snapbase_private.cast_error(value text, type text) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  canonical text := snapbase_private.resolve_type(type);
begin
  if value is null or (value = '' and canonical <> 'text') then
    return null;
  end if;
  execute format('select $1::%s', canonical) using value;
  return null;
exception when data_exception then
  return sqlerrm;
end;
$$;

-- The typed value of cell i of a staged row s; an empty field is NULL except in text.
create or replace function snapbase_private.typed_cell_sql(i integer, type text) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  canonical text := snapbase_private.resolve_type(type);
begin
  return format('case when s.cells[%1$s] = %3$L and %2$L <> %4$L then null else s.cells[%1$s]::%2$s end', i, canonical, '', 'text');
end;
$$;

-- The effective mapping as rows (csv index, header, table column, its type, new
-- scratch?), checked against the table. Types are canonical: a new scratch
-- column's through resolve_type, an existing column's from the catalog.
create or replace function snapbase_private.import_mapping(imp snapbase.csv_imports, t snapbase.workbook_tables, mapping jsonb)
returns table (idx integer, header text, col text, col_type text, new_scratch boolean, read_only boolean)
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  bad text;
  spec jsonb;
  h text;
begin
  if mapping is not null and jsonb_typeof(mapping) <> 'object' then
    raise exception 'mapping must be an object {"CSV header": "table column" | null | {"new_scratch": name, "type": type}}' using errcode = '22023';
  end if;
  select string_agg(k, ', ') into bad from jsonb_object_keys(coalesce(mapping, '{}')) k where k <> all (imp.header);
  if bad is not null then
    raise exception 'the mapping names headers the file does not have: %', left(bad, 500) using errcode = '22023';
  end if;
  for h, spec in select e.key, e.value from jsonb_each(coalesce(mapping, '{}')) e loop
    if jsonb_typeof(spec) not in ('string', 'null', 'object') then
      raise exception 'mapping of %: a column name, null, or {"new_scratch": name, "type": type}', h using errcode = '22023';
    end if;
    if jsonb_typeof(spec) = 'object' and (jsonb_typeof(spec -> 'new_scratch') is distinct from 'string'
         or exists (select 1 from jsonb_object_keys(spec) k where k not in ('new_scratch', 'type'))) then
      raise exception 'mapping of %: a new scratch column is {"new_scratch": name, "type": type}', h using errcode = '22023';
    end if;
  end loop;
  return query
    with wanted as (
      select h.ord::integer as idx, h.name as header,
             case when mapping is null or not mapping ? h.name
                  then (select c ->> 'name' from jsonb_array_elements(t.columns) c where lower(c ->> 'name') = lower(h.name) limit 1)
                  when jsonb_typeof(mapping -> h.name) = 'string' then mapping ->> h.name
                  when jsonb_typeof(mapping -> h.name) = 'object' then mapping -> h.name ->> 'new_scratch'
             end as col,
             jsonb_typeof(mapping -> h.name) = 'object' as new_scratch,
             mapping -> h.name -> 'type' as scratch_type
        from unnest(imp.header) with ordinality as h(name, ord)
    )
    select w.idx, w.header, w.col,
           snapbase_private.check_column_spec(jsonb_build_object('name', w.col, 'type', coalesce(w.scratch_type, '"text"'), 'scratch', true)) ->> 'type',
           true, false
      from wanted w where w.col is not null and w.new_scratch
    union all
    select w.idx, w.header, w.col, p.type, false, coalesce((c ->> 'read_only')::boolean, false)
      from wanted w
      join jsonb_array_elements(t.columns) c on c ->> 'name' = w.col
      join snapbase_private.filter_parameters(t) p on p.name = w.col
     where w.col is not null and not coalesce(w.new_scratch, false)
    order by 1;
  select string_agg(format('%s → %s', h.name, mapping ->> h.name), ', ') into bad
    from unnest(imp.header) h
   where jsonb_typeof(mapping -> h.name) = 'string'
     and not exists (select 1 from jsonb_array_elements(t.columns) c where c ->> 'name' = mapping ->> h.name);
  if bad is not null then
    raise exception 'the mapping names columns the table does not have: %', left(bad, 500) using errcode = '22023';
  end if;
end;
$$;

-- CSV files' column type overrides are canonical type names too.
create or replace function snapbase.set_csv_column_types(file_id bigint, column_types jsonb) returns snapbase.csv_files
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  f snapbase.csv_files := snapbase_private.require_csv_file(file_id);
  checked jsonb;
begin
  if jsonb_typeof(column_types) is distinct from 'object' then
    raise exception 'column_types must be a JSON object {"column": "type"}' using errcode = '22023';
  end if;
  if exists (select 1 from jsonb_each(column_types) e where jsonb_typeof(e.value) not in ('string', 'null')) then
    raise exception 'each column type must be a type name (text), or null to infer it again' using errcode = '22023';
  end if;
  select coalesce(jsonb_object_agg(e.key, snapbase_private.check_column_spec(jsonb_build_object('name', e.key, 'type', e.value)) ->> 'type'), '{}')
    into checked
    from jsonb_each(column_types) e where jsonb_typeof(e.value) = 'string';
  update snapbase.csv_files cf set column_types = checked where cf.id = f.id returning * into f;
  perform snapbase_private.audit('set_csv_column_types', 'csv_file', f.id::text, null, jsonb_build_object('column_types', checked));
  return f;
end;
$$;
