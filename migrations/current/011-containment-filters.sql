--------------------------------------------------------------------------------
-- Containment, part 2: workbook filters.
--------------------------------------------------------------------------------
-- A filter is parsed as ONE standalone expression: the body of a throw-away
-- `returns boolean ... return <filter>` function whose parameters are the table's
-- data columns (so nothing else can be named: no metadata columns, no other
-- relation, no whole row). Its parse tree must call only side-effect-free built-ins
-- and hold no subquery (snapbase_private.probe_user_text). It is never wrapped in
-- parentheses to be checked, so `id = 1) or (true` is a syntax error.
--
-- A checked filter runs only inside queries executed by the filter reader role
-- (snapbase_sandbox.read_*: SELECT on workbook tables, no other right, read-only
-- functions) under the request's statement_timeout.

drop function if exists snapbase_private.filter_parameters(snapbase.workbook_tables, text[]) cascade;
drop function if exists snapbase_private.filter_columns(snapbase.workbook_tables, text) cascade;
drop function if exists snapbase_private.filter_clause(snapbase.workbook_tables) cascade;
drop function if exists snapbase_sandbox.read_jsonb(text, text[]) cascade;
drop function if exists snapbase_sandbox.read_text_rows(text, text[]) cascade;
drop function if exists snapbase_sandbox.read_ids(text, text[]) cascade;
drop table if exists snapbase_private.filter_functions cascade;

alter table snapbase.workbook_tables add column if not exists filter_columns jsonb;
comment on column snapbase.workbook_tables.filter_columns is
  'The columns (name and type) the active filter uses, recorded when it was checked; the filter applies only while they are unchanged.';

--------------------------------------------------------------------------------
-- The filter reader's entry points. They run the owner's query text (which holds
-- at most one checked filter) with the reader's rights; only the owner may call them.
--------------------------------------------------------------------------------

grant create on schema snapbase_sandbox to :ROLE_FILTER_READER;

create function snapbase_sandbox.read_jsonb(query text, args text[]) returns jsonb
language plpgsql stable security definer
set search_path = pg_catalog
as $$
declare
  result jsonb;
begin
  execute query into result using args;
  return result;
end;
$$;
alter function snapbase_sandbox.read_jsonb(text, text[]) owner to :ROLE_FILTER_READER;

create function snapbase_sandbox.read_text_rows(query text, args text[]) returns setof text[]
language plpgsql stable security definer
set search_path = pg_catalog
as $$
begin
  return query execute query using args;
end;
$$;
alter function snapbase_sandbox.read_text_rows(text, text[]) owner to :ROLE_FILTER_READER;

create function snapbase_sandbox.read_ids(query text, args text[]) returns bigint[]
language plpgsql stable security definer
set search_path = pg_catalog
as $$
declare
  result bigint[];
begin
  execute format('select coalesce(array_agg(x.id), ''{}'') from (%s) x(id)', query) into result using args;
  return result;
end;
$$;
alter function snapbase_sandbox.read_ids(text, text[]) owner to :ROLE_FILTER_READER;

revoke create on schema snapbase_sandbox from :ROLE_FILTER_READER;
revoke all on function snapbase_sandbox.read_jsonb(text, text[]), snapbase_sandbox.read_text_rows(text, text[]),
  snapbase_sandbox.read_ids(text, text[]) from public;
grant execute on function snapbase_sandbox.read_jsonb(text, text[]), snapbase_sandbox.read_text_rows(text, text[]),
  snapbase_sandbox.read_ids(text, text[]) to :DATABASE_OWNER;
comment on function snapbase_sandbox.read_jsonb(text, text[]) is
  'Runs a workbook query that may carry a checked filter as the filter reader (SELECT on workbook tables only, read-only). Owner only.';

-- The reader may read every workbook table (and nothing else): existing ones now,
-- new ones through each workbook schema's default privileges (see create_workbook).
do $$
declare
  s text;
begin
  for s in select w.schema_name from snapbase.workbooks w where exists (select 1 from pg_namespace n where n.nspname = w.schema_name) loop
    execute format('grant usage on schema %I to :ROLE_FILTER_READER', s);
    execute format('grant select on all tables in schema %I to :ROLE_FILTER_READER', s);
    execute format('alter default privileges in schema %I grant select on tables to :ROLE_FILTER_READER', s);
  end loop;
end $$;

create or replace function snapbase.create_workbook(name text, organization_id bigint default null) returns snapbase.workbooks
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  me bigint := snapbase.current_user_id();
  org bigint := organization_id;
  wb snapbase.workbooks;
begin
  if me is null then
    raise exception 'sign in as a Snapbase user to create a workbook' using errcode = '42501';
  end if;
  if snapbase.current_app_role() = 'agent' then
    raise exception 'agent tokens cannot create workbooks' using errcode = '42501';
  end if;
  if org is null then
    -- Your only organization, or a personal one made on first use.
    select min(m.organization_id) into org
      from snapbase.organization_members m where m.user_id = me
      having count(*) <= 1;
    if not found then
      raise exception 'you belong to several organizations: pass organization_id' using errcode = '22023';
    end if;
    if org is null then
      org := (snapbase.create_organization('Personal: ' || current_setting('jwt.claims.email', true))).id;
    end if;
  elsif not coalesce(snapbase_private.is_member(org), false) then
    raise exception 'no organization % of yours', org using errcode = 'P0002';
  end if;
  insert into snapbase.workbooks (name, owner_id, organization_id, schema_name)
    values (trim(name), me, org, 'pending') returning * into wb;
  update snapbase.workbooks set schema_name = 'workbook_' || wb.id where id = wb.id returning * into wb;
  execute format('create schema %I', wb.schema_name);
  execute format('comment on schema %I is %L', wb.schema_name, format('Snapbase workbook %s: %s', wb.id, wb.name));
  -- Filters on this workbook's tables run as the filter reader, which reads them and nothing else.
  execute format('grant usage on schema %I to %I', wb.schema_name, snapbase_private.sandbox_role('filter_reader'));
  execute format('alter default privileges in schema %I grant select on tables to %I', wb.schema_name,
                 snapbase_private.sandbox_role('filter_reader'));
  perform snapbase_private.audit_workbook('create_workbook', wb.id, 'workbook', wb.id::text, null, jsonb_build_object('name', wb.name));
  return wb;
end;
$$;

--------------------------------------------------------------------------------
-- Checking and applying filters
--------------------------------------------------------------------------------

-- The names a filter may use for table t: its data and scratch columns with their
-- catalog types, in table order, less `hide`.
create function snapbase_private.filter_parameters(t snapbase.workbook_tables, hide text[] default '{}')
returns table (ord integer, name text, type text)
language sql stable
set search_path = pg_catalog
as $$
  select row_number() over (order by a.attnum)::integer, a.attname::text, format_type(a.atttypid, a.atttypmod)
    from pg_attribute a
   where a.attrelid = to_regclass(snapbase_private.table_rel(t)) and a.attnum > 0 and not a.attisdropped
     and a.attname::text = any (snapbase_private.column_names(t)) and a.attname::text <> all (coalesce(hide, '{}'))
   order by a.attnum
$$;

-- Why `filter` may not be used on table t (null: it may), and the columns it uses.
create or replace function snapbase_private.filter_problem(t snapbase.workbook_tables, filter text) returns text
language plpgsql
set search_path = pg_catalog
as $$
declare
  probe snapbase_private.probe_result;
begin
  if filter is null then
    return null;
  end if;
  if length(filter) > 4000 then
    return 'the filter is longer than 4000 characters';
  end if;
  begin
    probe := snapbase_private.probe_user_text('returns boolean language sql stable return ', filter, '',
      (select string_agg(format('%I %s', p.name, p.type), ', ' order by p.ord) from snapbase_private.filter_parameters(t) p),
      'pg_catalog', 'filter');
  exception when others then
    return sqlerrm;
  end;
  if cardinality(probe.problems) > 0 then
    return array_to_string(probe.problems, ', ') || ' may not be used in a filter';
  end if;
  return null;
end;
$$;

create or replace function snapbase_private.check_filter(t snapbase.workbook_tables, filter text) returns void
language plpgsql
set search_path = pg_catalog
as $$
declare
  problem text := snapbase_private.filter_problem(t, filter);
begin
  if problem is not null then
    raise exception 'filter refused: %', problem using errcode = '22023';
  end if;
end;
$$;

-- The columns a checked filter uses, as [{name, type}].
create function snapbase_private.filter_columns(t snapbase.workbook_tables, filter text) returns jsonb
language plpgsql
set search_path = pg_catalog
as $$
declare
  probe snapbase_private.probe_result := snapbase_private.probe_user_text('returns boolean language sql stable return ', filter, '',
      (select string_agg(format('%I %s', p.name, p.type), ', ' order by p.ord) from snapbase_private.filter_parameters(t) p),
      'pg_catalog', 'filter');
begin
  return (select coalesce(jsonb_agg(jsonb_build_object('name', p.name, 'type', p.type) order by p.ord), '[]')
            from snapbase_private.filter_parameters(t) p where p.ord = any (probe.params));
end;
$$;

create or replace function snapbase.set_table_filter(table_id bigint, filter text) returns snapbase.workbook_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  cleaned text := nullif(trim(filter), '');
begin
  if cleaned is not null then
    perform snapbase_private.check_filter(t, cleaned);
  end if;
  update snapbase.workbook_tables wt
     set filter = cleaned, filter_columns = case when cleaned is not null then snapbase_private.filter_columns(t, cleaned) end
   where wt.id = t.id returning * into t;
  perform snapbase_private.audit_workbook('set_table_filter', t.workbook_id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('filter', cleaned));
  return t;
end;
$$;

-- The active filter of t as a condition to put in a WHERE clause over alias r (its
-- columns are the filter's names), or 'true'. Only checked filters are ever stored;
-- one whose columns changed since is refused rather than reinterpreted.
create function snapbase_private.filter_clause(t snapbase.workbook_tables) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
begin
  if t.filter is null then
    return 'true';
  end if;
  if t.filter_columns is null or exists (
       select 1 from jsonb_array_elements(t.filter_columns) c
        where not exists (select 1 from snapbase_private.filter_parameters(t) p where p.name = c ->> 'name' and p.type = c ->> 'type')) then
    raise exception 'the active filter of workbook table % no longer fits its columns; set it again', t.id using errcode = '22023';
  end if;
  -- A checked filter is one expression; the newline ends a trailing -- comment.
  return '(' || t.filter || E'\n)';
end;
$$;
comment on function snapbase_private.filter_clause(snapbase.workbook_tables) is
  'The active filter as a WHERE condition: text checked by filter_problem when it was set, parenthesised; for queries run by snapbase_sandbox.read_* only.';

-- Filters stored before this check existed are checked now; a failing one is cleared and audited.
do $$
declare
  t snapbase.workbook_tables;
  problem text;
begin
  for t in select * from snapbase.workbook_tables where filter is not null loop
    problem := snapbase_private.filter_problem(t, t.filter);
    if problem is null then
      update snapbase.workbook_tables set filter_columns = snapbase_private.filter_columns(t, t.filter) where id = t.id;
    else
      update snapbase.workbook_tables set filter = null, filter_columns = null where id = t.id;
      perform snapbase_private.audit('clear_unsafe_filter', 'workbook_table', t.id::text, snapbase_private.table_rel(t),
        jsonb_build_object('filter', t.filter, 'problem', problem, 'workbook_id', t.workbook_id));
    end if;
  end loop;
end $$;

--------------------------------------------------------------------------------
-- Every reader of a filtered set goes through the filter reader
--------------------------------------------------------------------------------

create or replace function snapbase.workbook_records(
  table_id bigint,
  page_size integer default null,
  "after" text default null,
  sort_column text default null,
  descending boolean default null,
  use_filter boolean default true,
  include_deleted boolean default true
) returns jsonb
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
  rel text := snapbase_private.table_rel(t);
  hide text[] := case when snapbase.current_app_role() = 'agent' then t.hidden_columns else '{}' end;
  -- An agent's default order ignores a saved sort on a column hidden from it.
  col text := coalesce(nullif(sort_column, ''), case when t.sort_column = any (hide) then null else t.sort_column end);
  desc_ boolean := coalesce(descending, t.sort_descending);
  n integer := coalesce(page_size, t.page_size);
  cur jsonb;
  cur_value text;
  cur_id bigint;
  base_where text;
  page jsonb := '[]';
  more jsonb;
  last_record jsonb;
  last_value text;
  -- The filter's text is not shown to whoever may not see a column it names.
  shown_filter text := case when use_filter and not exists (
      select 1 from jsonb_array_elements(coalesce(t.filter_columns, '[]')) c where c ->> 'name' = any (hide)) then t.filter end;
begin
  if n not between 1 and 1000 then
    raise exception 'page_size must be from 1 to 1000 (got %)', n using errcode = '22023';
  end if;
  if col is not null and (col <> all (snapbase_private.column_names(t)) or col = any (hide)) then
    raise exception 'unknown sort column %', col using errcode = '22023';
  end if;
  if "after" is not null then
    begin
      cur := convert_from(decode("after", 'base64'), 'UTF8')::jsonb;
      cur_id := (cur ->> 'id')::bigint;
      cur_value := cur ->> 'v';
    exception when others then
      raise exception 'after is not a cursor returned by workbook_records' using errcode = '22023';
    end;
    if cur_id is null or (cur ->> 'c') is distinct from col or (cur ->> 'd')::boolean is distinct from desc_ then
      raise exception 'after is a cursor for another sort order' using errcode = '22023';
    end if;
  end if;
  base_where := 'not r.__suggested_new'
    || case when include_deleted then '' else ' and not r.__deleted' end
    || case when use_filter and t.filter is not null then ' and ' || snapbase_private.filter_clause(t) else '' end;

  -- The page queries carry the filter: the filter reader runs them ($1: text[] of arguments).
  if col is null then
    page := snapbase_sandbox.read_jsonb(format(
      'select coalesce(jsonb_agg(%s order by r.__id %s), ''[]'') from (select * from %s r where %s and ($1[1]::bigint is null or r.__id %s $1[1]::bigint) order by r.__id %s limit $1[2]::integer) r',
      snapbase_private.record_json_sql(hide), case when desc_ then 'desc' else '' end, rel, base_where,
      case when desc_ then '<' else '>' end, case when desc_ then 'desc' else '' end),
      array[cur_id::text, (n + 1)::text]);
  else
    -- Non-null values first, in (value, id) order through the (column, id) index; then the nulls.
    if "after" is null or cur_value is not null then
      page := snapbase_sandbox.read_jsonb(format($q$
        select coalesce(jsonb_agg(%1$s order by r.%4$I %5$s, r.__id %5$s), '[]')
          from (select * from %2$s r
                 where %3$s and r.%4$I is not null
                   and ($1[1] is null or (r.%4$I, r.__id) %6$s ($1[1]::%7$s, $1[2]::bigint))
                 order by r.%4$I %5$s, r.__id %5$s limit $1[3]::integer) r
        $q$, snapbase_private.record_json_sql(hide), rel, base_where, col,
        case when desc_ then 'desc' else 'asc' end, case when desc_ then '<' else '>' end,
        (select p.type from snapbase_private.filter_parameters(t) p where p.name = col)),
        array[cur_value, cur_id::text, (n + 1)::text]);
    end if;
    if jsonb_array_length(page) <= n then
      more := snapbase_sandbox.read_jsonb(format($q$
        select coalesce(jsonb_agg(%1$s order by r.__id %4$s), '[]')
          from (select * from %2$s r
                 where %3$s and r.%5$I is null and ($1[1]::bigint is null or r.__id %6$s $1[1]::bigint)
                 order by r.__id %4$s limit $1[2]::integer) r
        $q$, snapbase_private.record_json_sql(hide), rel, base_where, case when desc_ then 'desc' else 'asc' end, col,
        case when desc_ then '<' else '>' end),
        array[case when cur_value is null then cur_id end::text, (n + 1 - jsonb_array_length(page))::text]);
      page := page || more;
    end if;
  end if;

  if jsonb_array_length(page) > n then
    last_record := page -> (n - 1);
    page := page - n;
    -- The cursor keeps the sort value's own text form, which casts back exactly.
    if col is not null then
      execute format('select r.%I::text from %s r where r.__id = $1', col, rel) into last_value using (last_record ->> 'id')::bigint;
    end if;
    return jsonb_build_object('records', page, 'sort_column', col, 'descending', desc_, 'filter', shown_filter,
      'next_cursor', encode(convert_to(jsonb_build_object('id', last_record -> 'id', 'c', col, 'd', desc_, 'v', last_value)::text, 'UTF8'), 'base64'));
  end if;
  return jsonb_build_object('records', page, 'sort_column', col, 'descending', desc_, 'filter', shown_filter,
    'next_cursor', null);
end;
$$;

create or replace function snapbase.workbook_record_counts(table_id bigint) returns snapbase.record_counts
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
begin
  return jsonb_populate_record(null::snapbase.record_counts, snapbase_sandbox.read_jsonb(format($q$
    select jsonb_build_object(
             'total', count(*) filter (where not r.__suggested_new),
             'filtered', count(*) filter (where not r.__suggested_new and %s),
             'dirty', count(*) filter (where r.__dirty),
             'with_suggestions', count(*) filter (where r.__suggested <> '{}' or r.__suggest_delete is not null or r.__suggested_new),
             'deleted', count(*) filter (where r.__deleted))
      from %s r$q$, snapbase_private.filter_clause(t), snapbase_private.table_rel(t)), '{}'));
end;
$$;

-- The WHERE clause choosing which records' suggestions to act on. Within the
-- filter, the matching ids are found by the filter reader first.
create or replace function snapbase_private.suggestion_scope(t snapbase.workbook_tables, record_id bigint, within_filter boolean) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
begin
  return concat_ws(' and ',
    '(r.__suggested <> ''{}'' or r.__suggest_delete is not null or r.__suggested_new)',
    case when record_id is not null then format('r.__id = %L::bigint', record_id) end,
    case when within_filter and t.filter is not null then
      format('r.__id = any (%L::bigint[])', snapbase_sandbox.read_ids(
        format('select r.__id from %s r where %s', snapbase_private.table_rel(t), snapbase_private.filter_clause(t)), '{}'))
    end);
end;
$$;

-- The query yielding a workbook table's rows as text[] (records deleted here or only
-- suggested are not part of the table), optionally within its active filter. Run it
-- with snapbase_sandbox.read_text_rows.
create or replace function snapbase_private.table_export_query(t snapbase.workbook_tables, use_filter boolean) returns text
language sql stable
set search_path = pg_catalog
as $$
  select format('select array[%s] from %s r where not r.__deleted and not r.__suggested_new and %s order by r.__id',
    (select string_agg(format('r.%I::text', c), ', ') from unnest(snapbase_private.column_names(t)) c),
    snapbase_private.table_rel(t),
    case when use_filter then snapbase_private.filter_clause(t) else 'true' end)
$$;

create or replace function snapbase.export_table_rows(table_id bigint, use_filter boolean default false) returns setof text[]
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
begin
  if snapbase.current_app_role() = 'agent' then
    raise exception 'agent tokens cannot export tables' using errcode = '42501';
  end if;
  return next snapbase_private.column_names(t);
  return query select * from snapbase_sandbox.read_text_rows(snapbase_private.table_export_query(t, use_filter), '{}');
end;
$$;

create or replace function snapbase.shared_table_rows(token text) returns setof text[]
language plpgsql
security definer
set search_path = pg_catalog
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set extra_float_digits = 3
set bytea_output = 'hex'
as $$
declare
  link snapbase.share_links;
  t snapbase.workbook_tables;
begin
  select l.* into link from snapbase_private.share_link_tokens k join snapbase.share_links l on l.id = k.link_id
   where k.token_hash = public.digest(token, 'sha256')
     and l.revoked_at is null and (l.expires_at is null or l.expires_at > now());
  if link.id is null then
    raise exception 'no such share link (it may have expired or been revoked)' using errcode = 'P0002';
  end if;
  select * into t from snapbase.workbook_tables where id = link.table_id;
  update snapbase.share_links set last_used_at = now(), use_count = use_count + 1 where id = link.id;
  perform snapbase_private.audit('share_link_access', 'share_link', link.id::text, snapbase_private.table_rel(t),
    jsonb_build_object('workbook_id', t.workbook_id, 'table_id', t.id));
  return next snapbase_private.column_names(t);
  return query select * from snapbase_sandbox.read_text_rows(snapbase_private.table_export_query(t, link.use_filter), '{}');
end;
$$;
