--! Previous: sha1:bd8df0ed8384cc4d69a3380b8c488662775622f8
--! Hash: sha1:38a8f4c660d7d1bedd0c866f7461fa22317ff3ff
--! Message: remote ids unique through a partial index

-- Remote ids are unique through a partial index that leaves out records without
-- one (created locally, imported, suggested as new): a unique index over a column
-- that is NULL for every imported row still cost 2.3 s per million rows inserted
-- (measured on a table of the workbook shape: 9.1 s with it, 6.8 s without).
-- Lookups by remote id (download, publish) use the partial index as before.

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
begin
  if jsonb_typeof(columns) is distinct from 'array' or jsonb_array_length(columns) = 0 then
    raise exception 'a workbook table needs a non-empty array of columns' using errcode = '22023';
  end if;
  select jsonb_agg(snapbase_private.check_column_spec(c) order by ord) into spec
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
  execute format($ddl$
    create table %I.%I (
      %s,
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
    (select string_agg(format('%I %s', c ->> 'name', c ->> 'type'), ', ') from jsonb_array_elements(spec) c));
  execute format('create index on %I.%I (__id) where __suggested <> ''{}'' or __suggest_delete is not null or __suggested_new',
    wb.schema_name, tname);
  execute format('create unique index on %I.%I (__remote_id) where __remote_id is not null', wb.schema_name, tname);
  execute format('comment on table %I.%I is %L', wb.schema_name, tname, format('Snapbase workbook table %s: %s', t.id, t.name));
  return t;
end;
$$;


-- Existing workbook tables: the same index in place of the constraint.
do $$
declare
  rel regclass;
  constraint_name text;
begin
  for rel in
    select to_regclass(format('%I.%I', w.schema_name, t.table_name))
      from snapbase.workbook_tables t join snapbase.workbooks w on w.id = t.workbook_id
  loop
    continue when rel is null;
    select c.conname into constraint_name
      from pg_constraint c
      join pg_attribute a on a.attrelid = c.conrelid and a.attnum = any (c.conkey)
     where c.conrelid = rel and c.contype = 'u' and a.attname = '__remote_id' and cardinality(c.conkey) = 1;
    if constraint_name is not null then
      execute format('alter table %s drop constraint %I', rel, constraint_name);
      execute format('create unique index on %s (__remote_id) where __remote_id is not null', rel);
    end if;
  end loop;
end $$;
