-- copy_managed_table_to_workbook refused every managed table with an enum or a domain
-- column (the workbook's column spec takes only built-in types): it now maps columns
-- as the postgres connector does.

create or replace function snapbase_private.workbook_column_types(rel regclass)
 returns table(attnum smallint, name text, source_type text, workbook_type text)
 language sql
 stable
 set search_path to 'pg_catalog'
as $function$
  with recursive base as (
    select a.attnum, a.atttypid as typid, a.atttypmod as typmod
      from pg_attribute a where a.attrelid = rel and a.attnum > 0 and not a.attisdropped
    union all
    select b.attnum, t.typbasetype, t.typtypmod from base b join pg_type t on t.oid = b.typid where t.typtype = 'd'
  )
  select a.attnum, a.attname::text, format_type(a.atttypid, a.atttypmod),
         case when coalesce(e.typtype, t.typtype) = 'c' then 'jsonb'
              when t.typnamespace = 'pg_catalog'::regnamespace and t.typtype in ('b', 'r', 'm') and t.typname !~ '^_?reg'
                then format_type(b.typid, b.typmod)
              when e.oid is not null then 'text[]'
              else 'text' end
    from base b
    join pg_type t on t.oid = b.typid and t.typtype <> 'd'
    join pg_attribute a on a.attrelid = rel and a.attnum = b.attnum
    left join pg_type e on e.oid = t.typelem and t.typcategory = 'A'
$function$;
comment on function snapbase_private.workbook_column_types(regclass) is 'Each column of a table with the type a workbook copy of it has, as the postgres connector maps them: built-in scalar, range and array types as they are (domains as their base type), composites (and their arrays) as jsonb, everything else (enums, extension types, reg*) as text or text[].';

CREATE OR REPLACE FUNCTION snapbase.copy_managed_table_to_workbook(workbook_id bigint, managed_table text, name text DEFAULT NULL::text)
 RETURNS snapbase.workbook_tables
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'edit');
  mt snapbase.managed_tables := snapbase.resolve_managed_table(managed_table);
  rel regclass := snapbase_private.relation_of(mt);
  pk text[] := snapbase_private.primary_key(rel);
  cols jsonb;
  col_list text;
  col_values text;
  t snapbase.workbook_tables;
  copied bigint;
begin
  if not has_table_privilege(snapbase_private.caller_role(), rel, 'SELECT') then
    raise exception 'you may not read %', mt.qualified_name using errcode = '42501';
  end if;
  if cardinality(pk) is distinct from 1 then
    raise exception '% needs a single-column primary key to be copied into a workbook', mt.qualified_name using errcode = '22023';
  end if;
  -- Only the columns the caller may read are copied (column privileges hold here too),
  -- each as a type a workbook holds (as the postgres connector maps them): domains
  -- as their base type, composites as jsonb, enums and other non-built-in types as text.
  select jsonb_agg(jsonb_build_object('name', w.name, 'type', w.workbook_type, 'read_only', w.name = pk[1]) order by w.attnum),
         string_agg(format('%I', w.name), ', ' order by w.attnum),
         string_agg(case w.workbook_type
                      when 'jsonb' then case when w.workbook_type = w.source_type then format('__sb_s.%I', w.name) else format('to_jsonb(__sb_s.%I)', w.name) end
                      else format('__sb_s.%I::%s', w.name, w.workbook_type) end, ', ' order by w.attnum)
    into cols, col_list, col_values
    from snapbase_private.workbook_column_types(rel) w
   where has_column_privilege(snapbase_private.caller_role(), rel, w.attnum, 'SELECT');
  if not cols @> jsonb_build_array(jsonb_build_object('name', pk[1])) then
    raise exception 'you may not read the primary key % of %', pk[1], mt.qualified_name using errcode = '42501';
  end if;
  t := snapbase_private.create_workbook_table(wb, coalesce(name, mt.table_name), cols, pk[1], null,
         jsonb_build_object('kind', 'managed_table', 'table', mt.qualified_name, 'managed_table_id', mt.id));
  execute format('insert into %s (%s, __remote_id, __last_seen) select __sb_seen.*, __sb_s.%I::text, to_jsonb(__sb_seen.*) from %s __sb_s, lateral (select %s) __sb_seen',
    snapbase_private.table_rel(t), col_list, pk[1], rel, col_values);
  get diagnostics copied = row_count;
  perform snapbase_private.audit_workbook('copy_managed_table', wb.id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('source', mt.qualified_name, 'records', copied));
  return t;
end;
$function$;
comment on function snapbase.copy_managed_table_to_workbook(bigint,text,text) is 'Add a working copy of a managed table you may read.';
grant execute on function snapbase.copy_managed_table_to_workbook(bigint,text,text) to :ROLE_VIEWER;

