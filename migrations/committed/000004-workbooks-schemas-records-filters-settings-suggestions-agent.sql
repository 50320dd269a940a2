--! Previous: sha1:2fabccfa015dacd0bc11bcf2cb2fe346e3d6c6af
--! Hash: sha1:cacb92f12add7caf3b9478eca28a965b2a8a69dc
--! Message: workbooks: schemas, records, filters, settings, suggestions, agent tokens, publish preview

-- Workbooks (seed 003): per-workbook schemas holding working copies of tables,
-- with local edits, suggestions, validated filters, settings and agent tokens.
--
-- Each workbook owns a schema `workbook_<id>`; each of its tables is a real table
-- there: the typed columns of the source (plus scratch columns), then metadata
-- columns named `__*`. Application roles have no privileges on these schemas: every
-- read and write goes through the functions below, which check workbook access.
-- A DBA can `\dt workbook_12.*` and query the tables with plain SQL.

-- Idempotent while this is current.sql.
do $$ declare s record; begin
  for s in select nspname from pg_namespace where nspname ~ '^workbook_\d+$' loop
    execute format('drop schema %I cascade', s.nspname);
  end loop;
end $$;
alter table snapbase.api_tokens drop constraint if exists api_tokens_workbook_id_fkey;
drop function if exists snapbase_private.workbook_access cascade;
drop function if exists snapbase_private.require_workbook cascade;
drop function if exists snapbase_private.require_table cascade;
drop function if exists snapbase_private.record_meta_columns cascade;
drop function if exists snapbase_private.table_rel cascade;
drop function if exists snapbase_private.column_names cascade;
drop function if exists snapbase_private.scratch_columns cascade;
drop function if exists snapbase_private.is_member cascade;
drop function if exists snapbase_private.check_column_spec cascade;
drop function if exists snapbase_private.check_values cascade;
drop function if exists snapbase_private.record_json_sql cascade;
drop function if exists snapbase_private.get_record cascade;
drop function if exists snapbase_private.apply_create cascade;
drop function if exists snapbase_private.apply_update cascade;
drop function if exists snapbase_private.apply_delete cascade;
drop function if exists snapbase_private.apply_undelete cascade;
drop function if exists snapbase_private.apply_operation cascade;
drop function if exists snapbase_private.check_filter cascade;
drop function if exists snapbase_private.filter_problem cascade;
drop function if exists snapbase_private.suggestion_scope cascade;
drop function if exists snapbase_private.audit_workbook cascade;
drop function if exists snapbase_private.ensure_sort_index cascade;
drop function if exists snapbase_private.create_workbook_table cascade;
drop function if exists snapbase.create_organization cascade;
drop function if exists snapbase.add_organization_member cascade;
drop function if exists snapbase.create_workbook cascade;
drop function if exists snapbase.rename_workbook cascade;
drop function if exists snapbase.delete_workbook cascade;
drop function if exists snapbase.share_workbook cascade;
drop function if exists snapbase.unshare_workbook cascade;
drop function if exists snapbase.add_workbook_table cascade;
drop function if exists snapbase.copy_managed_table_to_workbook cascade;
drop function if exists snapbase.remove_workbook_table cascade;
drop function if exists snapbase.set_workbook_table_hidden cascade;
drop function if exists snapbase.workbook_records cascade;
drop function if exists snapbase.workbook_record cascade;
drop function if exists snapbase.workbook_record_counts cascade;
drop function if exists snapbase.create_record cascade;
drop function if exists snapbase.update_record cascade;
drop function if exists snapbase.delete_record cascade;
drop function if exists snapbase.undelete_record cascade;
drop function if exists snapbase.bulk_edit_records cascade;
drop function if exists snapbase.set_table_filter cascade;
drop function if exists snapbase.update_table_settings cascade;
drop function if exists snapbase.add_scratch_column cascade;
drop function if exists snapbase.remove_scratch_column cascade;
drop function if exists snapbase.suggest_values cascade;
drop function if exists snapbase.suggest_new_record cascade;
drop function if exists snapbase.suggest_delete cascade;
drop function if exists snapbase.accept_suggestions cascade;
drop function if exists snapbase.reject_suggestions cascade;
drop function if exists snapbase.workbook_suggestions cascade;
drop function if exists snapbase.create_agent_token cascade;
drop function if exists snapbase.publish_preview cascade;
drop table if exists snapbase.workbook_tables, snapbase.workbook_members, snapbase.workbooks,
  snapbase.organization_members, snapbase.organizations, snapbase_private.filter_functions cascade;
drop type if exists snapbase.workbook_access_level, snapbase.record_counts cascade;

--------------------------------------------------------------------------------
-- Organizations
--------------------------------------------------------------------------------

create table snapbase.organizations (
  id bigint generated always as identity primary key,
  name text not null check (length(trim(name)) between 1 and 200),
  created_at timestamptz not null default now()
);
comment on table snapbase.organizations is 'Groups of users. A workbook belongs to one organization and is shared only within it.';

create table snapbase.organization_members (
  organization_id bigint not null references snapbase.organizations on delete cascade,
  user_id bigint not null references snapbase.users on delete cascade,
  is_owner boolean not null default false,
  joined_at timestamptz not null default now(),
  primary key (organization_id, user_id)
);
create index organization_members_user_id_idx on snapbase.organization_members (user_id);

-- Whether the signed-in user belongs to the organization (security definer: the
-- membership policy must not recurse into itself).
create function snapbase_private.is_member(organization_id bigint) returns boolean
language sql stable
security definer
set search_path = pg_catalog
as $$
  select exists (select 1 from snapbase.organization_members m
                  where m.organization_id = is_member.organization_id and m.user_id = snapbase.current_user_id())
$$;
grant execute on function snapbase_private.is_member(bigint) to :ROLE_VIEWER;

alter table snapbase.organizations enable row level security;
create policy select_member on snapbase.organizations for select using (snapbase_private.is_member(id));
grant select on snapbase.organizations to :ROLE_VIEWER;
alter table snapbase.organization_members enable row level security;
create policy select_member on snapbase.organization_members for select using (snapbase_private.is_member(organization_id));
grant select on snapbase.organization_members to :ROLE_VIEWER;

create function snapbase.create_organization(name text) returns snapbase.organizations
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  org snapbase.organizations;
begin
  if snapbase.current_user_id() is null then
    raise exception 'sign in as a Snapbase user to create an organization' using errcode = '42501';
  end if;
  insert into snapbase.organizations (name) values (trim(name)) returning * into org;
  insert into snapbase.organization_members (organization_id, user_id, is_owner) values (org.id, snapbase.current_user_id(), true);
  perform snapbase_private.audit('create_organization', 'organization', org.id::text, null, jsonb_build_object('name', org.name));
  return org;
end;
$$;
comment on function snapbase.create_organization(text) is 'Create an organization; you become its owner.';
grant execute on function snapbase.create_organization(text) to :ROLE_VIEWER;

create function snapbase.add_organization_member(organization_id bigint, email text) returns snapbase.organization_members
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  member_id bigint;
  added snapbase.organization_members;
begin
  if not exists (select 1 from snapbase.organization_members m
                  where m.organization_id = add_organization_member.organization_id
                    and m.user_id = snapbase.current_user_id() and m.is_owner)
     and snapbase.current_app_role() <> 'admin' then
    raise exception 'only an owner of organization % may add members', organization_id using errcode = '42501';
  end if;
  select id into member_id from snapbase.users where lower(users.email) = lower(add_organization_member.email);
  if member_id is null then
    raise exception 'no user with email %', email using errcode = 'P0002';
  end if;
  insert into snapbase.organization_members (organization_id, user_id) values (organization_id, member_id)
    on conflict do nothing;
  select * into added from snapbase.organization_members m where m.organization_id = add_organization_member.organization_id and m.user_id = member_id;
  perform snapbase_private.audit('add_organization_member', 'organization', organization_id::text, null, jsonb_build_object('email', email));
  return added;
end;
$$;
comment on function snapbase.add_organization_member(bigint, text) is 'Add a user to an organization (its owners, or admins).';
grant execute on function snapbase.add_organization_member(bigint, text) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Workbooks and access
--------------------------------------------------------------------------------

create type snapbase.workbook_access_level as enum ('viewer', 'editor');

create table snapbase.workbooks (
  id bigint generated always as identity primary key,
  name text not null check (length(trim(name)) between 1 and 200),
  owner_id bigint references snapbase.users on delete set null,
  organization_id bigint not null references snapbase.organizations on delete cascade,
  schema_name text not null unique,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
create index workbooks_owner_id_idx on snapbase.workbooks (owner_id);
create index workbooks_organization_id_idx on snapbase.workbooks (organization_id);
create trigger _100_timestamps before insert or update on snapbase.workbooks
  for each row execute function snapbase_private.tg__timestamps();
comment on table snapbase.workbooks is 'Working copies of tables, each in its own schema (schema_name), owned by a user and shared within an organization.';

create table snapbase.workbook_members (
  workbook_id bigint not null references snapbase.workbooks on delete cascade,
  user_id bigint not null references snapbase.users on delete cascade,
  access snapbase.workbook_access_level not null,
  primary key (workbook_id, user_id)
);
create index workbook_members_user_id_idx on snapbase.workbook_members (user_id);

alter table snapbase.api_tokens add constraint api_tokens_workbook_id_fkey
  foreign key (workbook_id) references snapbase.workbooks on delete cascade;

-- What the caller may do with a workbook: 'owner', 'editor', 'viewer', 'agent' or
-- null (no access: callers then say "no such workbook", so ids cannot be probed).
-- An agent token reaches exactly its own workbook, whatever its user could do.
-- A DBA in psql (no signed-in user, database owner or superuser) counts as owner.
create function snapbase_private.workbook_access(workbook_id bigint) returns text
language sql stable
security definer
set search_path = pg_catalog
as $$
  select case
    when snapbase.current_app_role() = 'agent' then
      case when nullif(current_setting('jwt.claims.workbook_id', true), '')::bigint = w.id then 'agent' end
    when snapbase.current_user_id() is null then
      case when snapbase.current_app_role() = 'admin' then 'owner' end
    when w.owner_id = snapbase.current_user_id() then 'owner'
    else (select m.access::text from snapbase.workbook_members m
           where m.workbook_id = w.id and m.user_id = snapbase.current_user_id())
  end
  from snapbase.workbooks w where w.id = workbook_access.workbook_id
$$;
grant execute on function snapbase_private.workbook_access(bigint) to :ROLE_VIEWER, :ROLE_AGENT;

-- Raises unless the caller may `need` ('read', 'suggest', 'edit' or 'manage').
create function snapbase_private.require_workbook(workbook_id bigint, need text) returns snapbase.workbooks
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  access text := snapbase_private.workbook_access(workbook_id);
  allowed constant jsonb := '{"owner": ["read", "suggest", "edit", "manage"], "editor": ["read", "suggest", "edit"],
                              "viewer": ["read"], "agent": ["read", "suggest"]}';
  wb snapbase.workbooks;
begin
  if access is null then
    raise exception 'no workbook %', workbook_id using errcode = 'P0002';
  end if;
  if not (allowed -> access) ? need then
    raise exception 'this needs % access to workbook % (you have % access)', need, workbook_id, access
      using errcode = '42501';
  end if;
  select * into wb from snapbase.workbooks w where w.id = workbook_id;
  return wb;
end;
$$;

alter table snapbase.workbooks enable row level security;
create policy select_accessible on snapbase.workbooks for select
  using (snapbase_private.workbook_access(id) is not null);
grant select on snapbase.workbooks to :ROLE_VIEWER, :ROLE_AGENT;
alter table snapbase.workbook_members enable row level security;
create policy select_accessible on snapbase.workbook_members for select
  using (snapbase_private.workbook_access(workbook_id) in ('owner', 'editor', 'viewer'));
grant select on snapbase.workbook_members to :ROLE_VIEWER;

create function snapbase_private.audit_workbook(action text, workbook_id bigint, subject_type text, subject_id text,
                                                 table_name text, details jsonb default '{}')
returns void
language sql
security definer
set search_path = pg_catalog
as $$
  -- Agents act under their creator's user id; the entry says so.
  select snapbase_private.audit(action, subject_type, subject_id, table_name,
    coalesce(details, '{}') || jsonb_build_object('workbook_id', workbook_id)
      || case when snapbase.current_app_role() = 'agent' then '{"agent": true}'::jsonb else '{}' end)
$$;

create function snapbase.create_workbook(name text, organization_id bigint default null) returns snapbase.workbooks
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
  elsif not snapbase_private.is_member(org) then
    raise exception 'no organization % of yours', org using errcode = 'P0002';
  end if;
  insert into snapbase.workbooks (name, owner_id, organization_id, schema_name)
    values (trim(name), me, org, 'pending') returning * into wb;
  update snapbase.workbooks set schema_name = 'workbook_' || wb.id where id = wb.id returning * into wb;
  execute format('create schema %I', wb.schema_name);
  execute format('comment on schema %I is %L', wb.schema_name, format('Snapbase workbook %s: %s', wb.id, wb.name));
  perform snapbase_private.audit_workbook('create_workbook', wb.id, 'workbook', wb.id::text, null, jsonb_build_object('name', wb.name));
  return wb;
end;
$$;
comment on function snapbase.create_workbook(text, bigint) is 'Create a workbook (and its schema) in one of your organizations.';
grant execute on function snapbase.create_workbook(text, bigint) to :ROLE_VIEWER;

create function snapbase.rename_workbook(workbook_id bigint, name text) returns snapbase.workbooks
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'manage');
  old_name text := wb.name;
begin
  update snapbase.workbooks w set name = trim(rename_workbook.name) where w.id = workbook_id returning * into wb;
  perform snapbase_private.audit_workbook('rename_workbook', wb.id, 'workbook', wb.id::text, null,
    jsonb_build_object('from', old_name, 'to', wb.name));
  return wb;
end;
$$;
grant execute on function snapbase.rename_workbook(bigint, text) to :ROLE_VIEWER;

create function snapbase.delete_workbook(workbook_id bigint) returns snapbase.workbooks
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'manage');
begin
  execute format('drop schema if exists %I cascade', wb.schema_name);
  delete from snapbase.workbooks w where w.id = workbook_id;
  perform snapbase_private.audit_workbook('delete_workbook', wb.id, 'workbook', wb.id::text, null, jsonb_build_object('name', wb.name));
  return wb;
end;
$$;
comment on function snapbase.delete_workbook(bigint) is 'Delete a workbook, its schema and its agent tokens (owner only).';
grant execute on function snapbase.delete_workbook(bigint) to :ROLE_VIEWER;

create function snapbase.share_workbook(workbook_id bigint, email text, access snapbase.workbook_access_level)
returns snapbase.workbook_members
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'manage');
  member snapbase.users;
  shared snapbase.workbook_members;
begin
  select * into member from snapbase.users u where lower(u.email) = lower(share_workbook.email);
  if member.id is null or not exists (select 1 from snapbase.organization_members m
                                       where m.organization_id = wb.organization_id and m.user_id = member.id) then
    raise exception 'no member % in the workbook''s organization', email using errcode = 'P0002';
  end if;
  if member.id = wb.owner_id then
    raise exception '% owns this workbook already', email using errcode = '22023';
  end if;
  insert into snapbase.workbook_members (workbook_id, user_id, access) values (wb.id, member.id, access)
    on conflict on constraint workbook_members_pkey do update set access = excluded.access
    returning * into shared;
  perform snapbase_private.audit_workbook('share_workbook', wb.id, 'workbook', wb.id::text, null,
    jsonb_build_object('email', member.email, 'access', access));
  return shared;
end;
$$;
comment on function snapbase.share_workbook(bigint, text, snapbase.workbook_access_level) is 'Give a member of the workbook''s organization viewer or editor access (owner only).';
grant execute on function snapbase.share_workbook(bigint, text, snapbase.workbook_access_level) to :ROLE_VIEWER;

create function snapbase.unshare_workbook(workbook_id bigint, email text) returns boolean
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'manage');
begin
  delete from snapbase.workbook_members m
   using snapbase.users u
   where m.workbook_id = wb.id and u.id = m.user_id and lower(u.email) = lower(unshare_workbook.email);
  if not found then
    return false;
  end if;
  perform snapbase_private.audit_workbook('unshare_workbook', wb.id, 'workbook', wb.id::text, null, jsonb_build_object('email', email));
  return true;
end;
$$;
grant execute on function snapbase.unshare_workbook(bigint, text) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Workbook tables
--------------------------------------------------------------------------------

create table snapbase.workbook_tables (
  id bigint generated always as identity primary key,
  workbook_id bigint not null references snapbase.workbooks on delete cascade,
  name text not null check (length(trim(name)) between 1 and 200),
  table_name text not null,
  columns jsonb not null,
  remote_id_column text,
  source jsonb not null default '{"kind": "local"}',
  hidden boolean not null default false,
  -- Settings, returned with the table.
  title_column text,
  hidden_columns text[] not null default '{}',
  column_order text[] not null default '{}',
  sort_column text,
  sort_descending boolean not null default false,
  page_size integer not null default 50 check (page_size between 1 and 1000),
  filter text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  unique (workbook_id, table_name)
);
create trigger _100_timestamps before insert or update on snapbase.workbook_tables
  for each row execute function snapbase_private.tg__timestamps();
comment on table snapbase.workbook_tables is 'Tables of a workbook, each a real table <workbook schema>.<table_name>, with its column spec and settings.';
comment on column snapbase.workbook_tables.columns is 'Column spec: [{name, type, read_only, scratch}] in table order. Scratch columns are local and never published.';
comment on column snapbase.workbook_tables.remote_id_column is 'The column holding the record''s id at the source; its text is kept in __remote_id.';
comment on column snapbase.workbook_tables.filter is 'The active filter: a SQL expression over this table''s columns, validated by PostgreSQL''s parser.';

alter table snapbase.workbook_tables enable row level security;
create policy select_accessible on snapbase.workbook_tables for select
  using (snapbase_private.workbook_access(workbook_id) is not null);
grant select on snapbase.workbook_tables to :ROLE_VIEWER, :ROLE_AGENT;

create function snapbase_private.require_table(table_id bigint, need text) returns snapbase.workbook_tables
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables;
begin
  select * into t from snapbase.workbook_tables wt where wt.id = table_id;
  if t.id is null or snapbase_private.workbook_access(t.workbook_id) is null then
    raise exception 'no workbook table %', table_id using errcode = 'P0002';
  end if;
  perform snapbase_private.require_workbook(t.workbook_id, need);
  return t;
end;
$$;

-- Metadata columns of every workbook table, in table order after the data columns.
create function snapbase_private.record_meta_columns() returns text[]
language sql immutable
as $$
  select array['__id', '__remote_id', '__last_seen', '__edited', '__suggested', '__suggest_delete',
               '__created', '__deleted', '__suggested_new', '__dirty', '__updated_at']
$$;

create function snapbase_private.table_rel(t snapbase.workbook_tables) returns text
language sql stable
set search_path = pg_catalog
as $$
  select format('%I.%I', w.schema_name, t.table_name) from snapbase.workbooks w where w.id = t.workbook_id
$$;

-- Names of the table's columns; `published` leaves out scratch columns.
create function snapbase_private.column_names(t snapbase.workbook_tables, published boolean default false) returns text[]
language sql immutable
as $$
  select coalesce(array_agg(c ->> 'name' order by ord), '{}')
    from jsonb_array_elements(t.columns) with ordinality as e(c, ord)
   where not (published and coalesce((c ->> 'scratch')::boolean, false))
$$;

create function snapbase_private.scratch_columns(t snapbase.workbook_tables) returns text[]
language sql immutable
as $$
  select coalesce(array_agg(c ->> 'name'), '{}') from jsonb_array_elements(t.columns) c where (c ->> 'scratch')::boolean
$$;

-- Validates one column spec {name, type, read_only?, scratch?} and returns it normalized.
create function snapbase_private.check_column_spec(spec jsonb) returns jsonb
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  col_name text := spec ->> 'name';
  col_type regtype;
begin
  if jsonb_typeof(spec) is distinct from 'object' or col_name is null or length(col_name) not between 1 and 63 then
    raise exception 'each column needs a name of 1 to 63 characters (got %)', spec using errcode = '22023';
  end if;
  if col_name like '\_\_%' then
    raise exception 'column names starting with __ are reserved for metadata (got %)', col_name using errcode = '22023';
  end if;
  begin
    col_type := (spec ->> 'type')::regtype;
  exception when others then
    raise exception 'column %: unknown type %', col_name, coalesce(spec ->> 'type', 'null') using errcode = '22023';
  end;
  if col_type is null or (select t.typnamespace <> 'pg_catalog'::regnamespace or t.typtype not in ('b', 'r', 'm')
                                      or t.typname ~ '^_?reg' from pg_type t where t.oid = col_type) then
    raise exception 'column %: type % is not supported (built-in scalar, range and array types only)', col_name, spec ->> 'type'
      using errcode = '22023';
  end if;
  -- The type is kept as written (with its modifiers), once PostgreSQL has accepted it
  -- and it has the plain shape of a type name, so it is safe to put into DDL.
  if lower(trim(spec ->> 'type')) !~ '^[a-z][a-z0-9_ ]*(\(\d+(,\s*\d+)?\))?( ?\[\])*$' then
    raise exception 'column %: type % is not a plain type name', col_name, spec ->> 'type' using errcode = '22023';
  end if;
  return jsonb_build_object('name', col_name, 'type', lower(trim(spec ->> 'type')),
    'read_only', coalesce((spec ->> 'read_only')::boolean, false), 'scratch', coalesce((spec ->> 'scratch')::boolean, false));
end;
$$;

-- Creates the workbook table from a spec; the caller checks access and audits.
create function snapbase_private.create_workbook_table(wb snapbase.workbooks, name text, columns jsonb,
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
      __remote_id text unique,
      __last_seen jsonb,
      __edited jsonb not null default '{}',
      __suggested jsonb not null default '{}',
      __suggest_delete jsonb,
      __created boolean not null default false,
      __deleted boolean not null default false,
      __suggested_new boolean not null default false,
      __dirty boolean generated always as (__created or __deleted or __edited <> '{}') stored,
      __updated_at timestamptz not null default now()
    )$ddl$, wb.schema_name, tname,
    (select string_agg(format('%I %s', c ->> 'name', c ->> 'type'), ', ') from jsonb_array_elements(spec) c));
  execute format('create index on %I.%I (__id) where __suggested <> ''{}'' or __suggest_delete is not null or __suggested_new',
    wb.schema_name, tname);
  execute format('comment on table %I.%I is %L', wb.schema_name, tname, format('Snapbase workbook table %s: %s', t.id, t.name));
  return t;
end;
$$;

create function snapbase.add_workbook_table(workbook_id bigint, name text, columns jsonb,
                                            remote_id_column text default null, title_column text default null)
returns snapbase.workbook_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'edit');
  t snapbase.workbook_tables;
begin
  t := snapbase_private.create_workbook_table(wb, name, columns, remote_id_column, title_column, null);
  perform snapbase_private.audit_workbook('add_workbook_table', wb.id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('name', t.name, 'columns', t.columns));
  return t;
end;
$$;
comment on function snapbase.add_workbook_table(bigint, text, jsonb, text, text) is
  'Add an empty table from a spec: columns [{name, type, read_only?, scratch?}], the remote id column, the title column.';
grant execute on function snapbase.add_workbook_table(bigint, text, jsonb, text, text) to :ROLE_VIEWER;

-- A working copy of a managed table in the same database: the columns you may
-- read, keyed by its single-column primary key. Publishing back (issue: connectors)
-- goes through change requests.
create function snapbase.copy_managed_table_to_workbook(workbook_id bigint, managed_table text, name text default null)
returns snapbase.workbook_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'edit');
  mt snapbase.managed_tables := snapbase.resolve_managed_table(managed_table);
  rel regclass := snapbase_private.relation_of(mt);
  pk text[] := snapbase_private.primary_key(rel);
  cols jsonb;
  col_list text;
  t snapbase.workbook_tables;
  copied bigint;
begin
  if not has_table_privilege(snapbase_private.caller_role(), rel, 'SELECT') then
    raise exception 'you may not read %', mt.qualified_name using errcode = '42501';
  end if;
  if cardinality(pk) is distinct from 1 then
    raise exception '% needs a single-column primary key to be copied into a workbook', mt.qualified_name using errcode = '22023';
  end if;
  -- Only the columns the caller may read are copied (column privileges hold here too).
  select jsonb_agg(jsonb_build_object('name', c ->> 'name', 'type', c ->> 'type', 'read_only', (c ->> 'name') = pk[1]) order by ord),
         string_agg(format('%I', c ->> 'name'), ', ' order by ord)
    into cols, col_list
    from jsonb_array_elements(snapbase_private.table_columns(rel)) with ordinality as e(c, ord)
   where has_column_privilege(snapbase_private.caller_role(), rel, c ->> 'name', 'SELECT');
  if not cols @> jsonb_build_array(jsonb_build_object('name', pk[1])) then
    raise exception 'you may not read the primary key % of %', pk[1], mt.qualified_name using errcode = '42501';
  end if;
  t := snapbase_private.create_workbook_table(wb, coalesce(name, mt.table_name), cols, pk[1], null,
         jsonb_build_object('kind', 'managed_table', 'table', mt.qualified_name, 'managed_table_id', mt.id));
  execute format('insert into %s (%s, __remote_id, __last_seen) select seen.*, s.%I::text, to_jsonb(seen) from %s s, lateral (select %s) seen',
    snapbase_private.table_rel(t), col_list, pk[1], rel,
    (select string_agg(format('s.%I', c ->> 'name'), ', ') from jsonb_array_elements(cols) c));
  get diagnostics copied = row_count;
  perform snapbase_private.audit_workbook('copy_managed_table', wb.id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('source', mt.qualified_name, 'records', copied));
  return t;
end;
$$;
comment on function snapbase.copy_managed_table_to_workbook(bigint, text, text) is 'Add a working copy of a managed table you may read.';
grant execute on function snapbase.copy_managed_table_to_workbook(bigint, text, text) to :ROLE_VIEWER;

create function snapbase.remove_workbook_table(table_id bigint) returns snapbase.workbook_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  rel text := snapbase_private.table_rel(t);
begin
  execute format('drop table %s', rel);
  delete from snapbase.workbook_tables wt where wt.id = t.id;
  perform snapbase_private.audit_workbook('remove_workbook_table', t.workbook_id, 'workbook_table', t.id::text, rel);
  return t;
end;
$$;
grant execute on function snapbase.remove_workbook_table(bigint) to :ROLE_VIEWER;

create function snapbase.set_workbook_table_hidden(table_id bigint, hidden boolean) returns snapbase.workbook_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
begin
  update snapbase.workbook_tables wt set hidden = set_workbook_table_hidden.hidden where wt.id = t.id returning * into t;
  perform snapbase_private.audit_workbook('set_table_hidden', t.workbook_id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('hidden', hidden));
  return t;
end;
$$;
grant execute on function snapbase.set_workbook_table_hidden(bigint, boolean) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Filters: a SQL expression over the table's columns, checked by PostgreSQL
--------------------------------------------------------------------------------
-- PostgreSQL parses the filter inside `SELECT ... WHERE (<filter>)`: through a
-- cursor first (which refuses more than one statement before running anything),
-- then as a temporary view, whose stored parse tree names every relation,
-- column, function, operator and type the expression uses. Those must be: this
-- table's own data columns; functions from the allow-list below and casts between
-- ordinary types; pg_catalog operators that are not volatile; no subqueries; no
-- reg* types (which look up catalog objects by name). Filters run inside STABLE
-- functions (PostgreSQL refuses any write there) under the request's statement_timeout.

create table snapbase_private.filter_functions (name text primary key);
insert into snapbase_private.filter_functions (name) values
  ('lower'), ('upper'), ('initcap'), ('length'), ('char_length'), ('character_length'), ('octet_length'),
  ('btrim'), ('ltrim'), ('rtrim'), ('substr'), ('substring'), ('left'), ('right'), ('replace'), ('strpos'),
  ('position'), ('starts_with'), ('split_part'), ('concat'), ('concat_ws'), ('lpad'), ('rpad'), ('reverse'),
  ('abs'), ('round'), ('trunc'), ('floor'), ('ceil'), ('ceiling'), ('mod'), ('sign'), ('power'), ('sqrt'),
  ('date_trunc'), ('date_part'), ('extract'), ('now'), ('age'), ('to_char'), ('to_date'), ('to_timestamp'),
  ('make_date'), ('make_interval'), ('array_length'), ('cardinality'), ('array_position'),
  ('jsonb_typeof'), ('jsonb_array_length'), ('jsonb_extract_path'), ('jsonb_extract_path_text'),
  ('regexp_like'), ('textregexeq'), ('texticregexeq'), ('isfinite'), ('timezone');

create function snapbase_private.filter_problem(t snapbase.workbook_tables, filter text) returns text
language plpgsql
set search_path = pg_catalog
as $$
declare
  rel regclass := snapbase_private.table_rel(t)::regclass;
  probe_sql text := format('select 1 from %s where (%s)', rel, filter);
  cur refcursor;
  view_oid oid;
  tree text;
  problem text;
begin
  if length(filter) > 4000 then
    return 'the filter is longer than 4000 characters';
  end if;
  if filter ~ '(--|/\*)' and regexp_replace(filter, '''([^'']|'''')*''', '', 'g') ~ '(--|/\*)' then
    return 'comments are not allowed in a filter';
  end if;
  begin
    open cur for execute probe_sql;
    close cur;
  exception when others then
    if sqlerrm ~ 'multi-query|cannot open' then
      return 'a filter must be a single expression (found more than one statement)';
    end if;
    return sqlerrm;
  end;
  execute 'create temporary view snapbase_filter_probe as ' || probe_sql;
  view_oid := 'pg_temp.snapbase_filter_probe'::regclass;
  select r.ev_action::text into tree from pg_rewrite r where r.ev_class = view_oid;
  -- PostgreSQL's parse tree, as nodeToString prints it. (pg_depend would not do:
  -- it records no dependency on built-in objects.)
  with found as (
    select 'subqueries' as what where tree like '%{SUBLINK%'
    union all
    select 'current_user and similar session functions' where tree ~ '\{SQLVALUEFUNCTION :op (1[0-9])'
    union all
    select format('the relation %s', m[1]::oid::regclass) from regexp_matches(tree, ':relid (\d+)', 'g') m
     where m[1]::oid not in (rel, view_oid)
    union all
    select case when m[1]::int = 0 then 'a whole-row reference (name the columns)'
                else format('the column %s', coalesce((select a.attname from pg_attribute a where a.attrelid = rel and a.attnum = m[1]::int), m[1])) end
      from regexp_matches(tree, ':varattno (-?\d+)', 'g') m
     where m[1]::int <= 0
        or (select a.attname like '\_\_%' from pg_attribute a where a.attrelid = rel and a.attnum = m[1]::int)
    union all
    select format('the function %s', m[1]::oid::regprocedure) from regexp_matches(tree, ':(?:funcid|opfuncid) (\d+)', 'g') m
     where m[1] <> '0' and not exists (
       select 1 from pg_proc p
        where p.oid = m[1]::oid and p.pronamespace = 'pg_catalog'::regnamespace and p.provolatile <> 'v'
          and (p.proname in (select name from snapbase_private.filter_functions)
               or exists (select 1 from pg_operator o where o.oprcode = p.oid and o.oprnamespace = 'pg_catalog'::regnamespace)
               or exists (select 1 from pg_cast c where c.castfunc = p.oid
                           and format_type(c.castsource, null) !~ '^reg' and format_type(c.casttarget, null) !~ '^reg')))
    union all
    select format('the operator %s', m[1]::oid::regoperator) from regexp_matches(tree, ':opno (\d+)', 'g') m
     where not exists (select 1 from pg_operator o join pg_proc p on p.oid = o.oprcode
                        where o.oid = m[1]::oid and o.oprnamespace = 'pg_catalog'::regnamespace and p.provolatile <> 'v')
    union all
    select format('the type %s', m[1]::oid::regtype) from regexp_matches(tree, ':(?:consttype|resulttype|funcresulttype|array_typeid|element_typeid|typeid) (\d+)', 'g') m
     where format_type(m[1]::oid, null) ~ '^reg'
  )
  select string_agg(distinct what, ', ') into problem from found;
  if problem is not null then
    problem := problem || ' may not be used in a filter';
  end if;
  execute 'drop view pg_temp.snapbase_filter_probe';
  return problem;
end;
$$;

create function snapbase_private.check_filter(t snapbase.workbook_tables, filter text) returns void
language plpgsql
set search_path = pg_catalog
as $$
declare
  problem text := snapbase_private.filter_problem(t, filter);
begin
  if problem is not null then
    raise exception 'filter refused: %', problem using errcode = '22023', detail = format('filter: %s', filter);
  end if;
end;
$$;

create function snapbase.set_table_filter(table_id bigint, filter text) returns snapbase.workbook_tables
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
  update snapbase.workbook_tables wt set filter = cleaned where wt.id = t.id returning * into t;
  perform snapbase_private.audit_workbook('set_table_filter', t.workbook_id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('filter', cleaned));
  return t;
end;
$$;
comment on function snapbase.set_table_filter(bigint, text) is
  'Save the active filter: a SQL expression over the table''s columns (e.g. amount > 100 and lower(city) = ''paris''), or null to clear it.';
grant execute on function snapbase.set_table_filter(bigint, text) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Settings and scratch columns
--------------------------------------------------------------------------------

-- Sorting by a column keeps an index on (column, __id) so pages come from the index.
create function snapbase_private.ensure_sort_index(t snapbase.workbook_tables, col text) returns void
language plpgsql
set search_path = pg_catalog
as $$
begin
  execute format('create index if not exists %I on %s (%I, __id)', left('sort_' || md5(col), 40), snapbase_private.table_rel(t), col);
end;
$$;

create function snapbase.update_table_settings(
  table_id bigint,
  hidden_columns text[] default null,
  column_order text[] default null,
  sort_column text default null,
  sort_descending boolean default null,
  title_column text default null,
  page_size integer default null
) returns snapbase.workbook_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  known text[] := snapbase_private.column_names(t);
  unknown text[];
begin
  select array_agg(c) into unknown
    from unnest(coalesce(hidden_columns, '{}') || coalesce(column_order, '{}')
                || array_remove(array[sort_column, title_column], null)) c
   where c <> all (known) and c <> '';
  if unknown is not null then
    raise exception 'unknown column(s): %', array_to_string(unknown, ', ') using errcode = '22023';
  end if;
  if page_size is not null and page_size not between 1 and 1000 then
    raise exception 'page_size must be from 1 to 1000 (got %)', page_size using errcode = '22023';
  end if;
  -- An empty string clears sort_column or title_column; null leaves a setting as it is.
  update snapbase.workbook_tables wt set
    hidden_columns = coalesce(update_table_settings.hidden_columns, wt.hidden_columns),
    column_order = coalesce(update_table_settings.column_order, wt.column_order),
    sort_column = case when update_table_settings.sort_column is null then wt.sort_column else nullif(update_table_settings.sort_column, '') end,
    sort_descending = coalesce(update_table_settings.sort_descending, wt.sort_descending),
    title_column = case when update_table_settings.title_column is null then wt.title_column else nullif(update_table_settings.title_column, '') end,
    page_size = coalesce(update_table_settings.page_size, wt.page_size)
   where wt.id = t.id
  returning * into t;
  if t.sort_column is not null then
    perform snapbase_private.ensure_sort_index(t, t.sort_column);
  end if;
  perform snapbase_private.audit_workbook('update_table_settings', t.workbook_id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_strip_nulls(jsonb_build_object('hidden_columns', hidden_columns, 'column_order', column_order,
      'sort_column', sort_column, 'sort_descending', sort_descending, 'title_column', title_column, 'page_size', page_size)));
  return t;
end;
$$;
comment on function snapbase.update_table_settings(bigint, text[], text[], text, boolean, text, integer) is
  'Change a table''s view settings; arguments left null keep their value, an empty sort or title column clears it.';
grant execute on function snapbase.update_table_settings(bigint, text[], text[], text, boolean, text, integer) to :ROLE_VIEWER;

create function snapbase.add_scratch_column(table_id bigint, name text, type text default 'text') returns snapbase.workbook_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  spec jsonb := snapbase_private.check_column_spec(jsonb_build_object('name', name, 'type', type, 'scratch', true));
begin
  if name = any (snapbase_private.column_names(t)) then
    raise exception 'column % exists already', name using errcode = '42701';
  end if;
  execute format('alter table %s add column %I %s', snapbase_private.table_rel(t), spec ->> 'name', spec ->> 'type');
  update snapbase.workbook_tables wt set columns = wt.columns || jsonb_build_array(spec) where wt.id = t.id returning * into t;
  perform snapbase_private.audit_workbook('add_scratch_column', t.workbook_id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), spec);
  return t;
end;
$$;
comment on function snapbase.add_scratch_column(bigint, text, text) is 'Add a local-only column; it is never published.';
grant execute on function snapbase.add_scratch_column(bigint, text, text) to :ROLE_VIEWER;

create function snapbase.remove_scratch_column(table_id bigint, column_name text) returns snapbase.workbook_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  rel text := snapbase_private.table_rel(t);
  col constant text := column_name;
  rejected bigint;
begin
  if not t.columns @> jsonb_build_array(jsonb_build_object('name', col, 'scratch', true)) then
    raise exception 'no scratch column % (source columns cannot be removed)', col using errcode = '22023';
  end if;
  -- Pending suggestions on the column are rejected first, and say so in the audit log.
  execute format('update %s set __suggested = __suggested - %L, __updated_at = now() where __suggested ? %L', rel, col, col);
  get diagnostics rejected = row_count;
  execute format('alter table %s drop column %I', rel, col);
  update snapbase.workbook_tables wt set
    columns = (select jsonb_agg(c order by ord) from jsonb_array_elements(wt.columns) with ordinality as e(c, ord) where c ->> 'name' <> col),
    hidden_columns = array_remove(wt.hidden_columns, col),
    column_order = array_remove(wt.column_order, col),
    sort_column = nullif(wt.sort_column, col),
    title_column = nullif(wt.title_column, col)
   where wt.id = t.id
  returning * into t;
  -- A filter that used the column can no longer run: it is cleared, and the audit entry records it.
  if t.filter is not null and snapbase_private.filter_problem(t, t.filter) is not null then
    update snapbase.workbook_tables wt set filter = null where wt.id = t.id returning * into t;
  end if;
  perform snapbase_private.audit_workbook('remove_scratch_column', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('name', col, 'suggestions_rejected', rejected, 'filter_cleared', t.filter is null));
  return t;
end;
$$;
comment on function snapbase.remove_scratch_column(bigint, text) is 'Remove a scratch column, rejecting its pending suggestions first.';
grant execute on function snapbase.remove_scratch_column(bigint, text) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Records
--------------------------------------------------------------------------------
-- A record as the API returns it:
--   {id, remote_id, values: {column: value}, edited: {column: time},
--    suggested: {column: {value, by, at}}, state: {created, deleted, dirty, suggested_new, suggest_delete}}

-- The SELECT list producing a record's JSON from alias r, leaving out `hide` columns.
create function snapbase_private.record_json_sql(hide text[] default '{}') returns text
language sql immutable
as $$
  select format($f$jsonb_build_object('id', r.__id, 'remote_id', r.__remote_id,
    'values', to_jsonb(r) - %L::text[], 'edited', r.__edited - %2$L::text[], 'suggested', r.__suggested - %2$L::text[],
    'state', jsonb_build_object('created', r.__created, 'deleted', r.__deleted, 'dirty', r.__dirty,
                                'suggested_new', r.__suggested_new, 'suggest_delete', r.__suggest_delete))$f$,
    snapbase_private.record_meta_columns() || hide, hide)
$$;

create function snapbase_private.get_record(t snapbase.workbook_tables, record_id bigint, hide text[] default '{}') returns jsonb
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  rec jsonb;
begin
  execute format('select %s from %s r where r.__id = $1', snapbase_private.record_json_sql(hide), snapbase_private.table_rel(t))
    into rec using record_id;
  if rec is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  return rec;
end;
$$;

-- Checks a {column: value} object against the table: known columns, writable ones
-- (read-only columns only on records new to the source), values of the right type.
-- The type error names the column.
create function snapbase_private.check_values(t snapbase.workbook_tables, vals jsonb, allow_read_only boolean) returns void
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  bad text;
  k text;
  rel text := snapbase_private.table_rel(t);
begin
  if jsonb_typeof(vals) is distinct from 'object' then
    raise exception 'values must be a JSON object of column: value (got %)', coalesce(jsonb_typeof(vals), 'null') using errcode = '22023';
  end if;
  select string_agg(key, ', ') into bad from jsonb_object_keys(vals) key where key <> all (snapbase_private.column_names(t));
  if bad is not null then
    raise exception 'unknown column(s) in workbook table %: %', t.id, bad using errcode = '22023';
  end if;
  if not allow_read_only then
    select string_agg(c ->> 'name', ', ') into bad from jsonb_array_elements(t.columns) c
     where (c ->> 'read_only')::boolean and vals ? (c ->> 'name');
    if bad is not null then
      raise exception 'read-only column(s) cannot be changed: %', bad using errcode = '22023';
    end if;
  end if;
  for k in select jsonb_object_keys(vals) loop
    begin
      execute format('select (jsonb_populate_record(null::%s, $1)).%I', rel, k) using jsonb_build_object(k, vals -> k);
    exception when others then
      raise exception 'column %: %', k, sqlerrm using errcode = '22023';
    end;
  end loop;
end;
$$;

-- The single-record operations, shared by the one-record functions and bulk edits.
-- They neither check access nor audit: their callers do.
create function snapbase_private.apply_create(t snapbase.workbook_tables, vals jsonb) returns bigint
language plpgsql
set search_path = pg_catalog
as $$
declare
  cols text;
  new_id bigint;
begin
  perform snapbase_private.check_values(t, vals, true);
  select string_agg(format('%I', k), ', ') into cols from jsonb_object_keys(vals) k;
  if cols is null then
    execute format('insert into %s (__created) values (true) returning __id', snapbase_private.table_rel(t)) into new_id;
  else
    execute format('insert into %1$s (%2$s, __created, __edited) select %2$s, true, $2 from jsonb_populate_record(null::%1$s, $1) returning __id',
      snapbase_private.table_rel(t), cols)
      into new_id using vals, (select jsonb_object_agg(k, now()) from jsonb_object_keys(vals) k);
  end if;
  return new_id;
end;
$$;

create function snapbase_private.apply_update(t snapbase.workbook_tables, record_id bigint, vals jsonb) returns void
language plpgsql
set search_path = pg_catalog
as $$
declare
  rel text := snapbase_private.table_rel(t);
  cols text;
  scratch text[] := snapbase_private.scratch_columns(t);
  is_new boolean;
begin
  execute format('select __created or __suggested_new from %s where __id = $1', rel) into is_new using record_id;
  if is_new is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.check_values(t, vals, is_new);
  select string_agg(format('%I', k), ', ') into cols from jsonb_object_keys(vals) k;
  if cols is null then
    return;
  end if;
  -- A field counts as edited while it differs from the value last seen at the source;
  -- scratch columns are never flagged (they are never published).
  execute format($u$
    update %1$s r set (%2$s) = (select %2$s from jsonb_populate_record(r, $2)), __updated_at = now()
     where r.__id = $1;
    $u$, rel, cols) using record_id, vals;
  execute format($u$
    update %1$s r set __edited = (r.__edited - $2::text[]) || coalesce((
        select jsonb_object_agg(k, now()) from unnest($2::text[]) k
         where k <> all ($3) and (r.__created or (to_jsonb(r) -> k) is distinct from (r.__last_seen -> k))), '{}')
     where r.__id = $1
    $u$, rel) using record_id, array(select jsonb_object_keys(vals)), scratch;
end;
$$;

create function snapbase_private.apply_delete(t snapbase.workbook_tables, record_id bigint) returns text
language plpgsql
set search_path = pg_catalog
as $$
declare
  rel text := snapbase_private.table_rel(t);
  outcome text;
begin
  -- Records that exist only here go away; others are marked for deletion at the source.
  execute format('delete from %s where __id = $1 and (__created or __suggested_new) returning ''removed''', rel) into outcome using record_id;
  if outcome is null then
    execute format('update %s set __deleted = true, __updated_at = now() where __id = $1 returning ''marked_deleted''', rel)
      into outcome using record_id;
  end if;
  if outcome is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  return outcome;
end;
$$;

create function snapbase_private.apply_undelete(t snapbase.workbook_tables, record_id bigint) returns void
language plpgsql
set search_path = pg_catalog
as $$
declare
  found_id bigint;
begin
  execute format('update %s set __deleted = false, __updated_at = now() where __id = $1 returning __id', snapbase_private.table_rel(t))
    into found_id using record_id;
  if found_id is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
end;
$$;

-- One bulk operation: {"op": "create", "values": {...}} | {"op": "update", "id": n, "values": {...}}
-- | {"op": "delete", "id": n} | {"op": "undelete", "id": n}. Returns the record id.
create function snapbase_private.apply_operation(t snapbase.workbook_tables, op jsonb) returns bigint
language plpgsql
set search_path = pg_catalog
as $$
declare
  record_id bigint;
begin
  if jsonb_typeof(op) is distinct from 'object' then
    raise exception 'each operation must be an object' using errcode = '22023';
  end if;
  if not coalesce(op ->> 'op' = any (array['create', 'update', 'delete', 'undelete']), false) then
    raise exception 'op must be create, update, delete or undelete (got %)', coalesce(op ->> 'op', 'null') using errcode = '22023';
  end if;
  if op ->> 'op' <> 'create' then
    record_id := (op ->> 'id')::bigint;
    if record_id is null then
      raise exception 'operation % needs an id', op ->> 'op' using errcode = '22023';
    end if;
  end if;
  case op ->> 'op'
    when 'create' then record_id := snapbase_private.apply_create(t, coalesce(op -> 'values', '{}'));
    when 'update' then perform snapbase_private.apply_update(t, record_id, coalesce(op -> 'values', '{}'));
    when 'delete' then perform snapbase_private.apply_delete(t, record_id);
    when 'undelete' then perform snapbase_private.apply_undelete(t, record_id);
  end case;
  return record_id;
end;
$$;

create function snapbase.create_record(table_id bigint, "values" jsonb) returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  new_id bigint := snapbase_private.apply_create(t, "values");
begin
  perform snapbase_private.audit_workbook('create_record', t.workbook_id, 'workbook_record', new_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id, 'values', "values"));
  return snapbase_private.get_record(t, new_id);
end;
$$;
grant execute on function snapbase.create_record(bigint, jsonb) to :ROLE_VIEWER;

create function snapbase.update_record(table_id bigint, record_id bigint, "values" jsonb) returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
begin
  perform snapbase_private.apply_update(t, record_id, "values");
  perform snapbase_private.audit_workbook('update_record', t.workbook_id, 'workbook_record', record_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id, 'values', "values"));
  return snapbase_private.get_record(t, record_id);
end;
$$;
grant execute on function snapbase.update_record(bigint, bigint, jsonb) to :ROLE_VIEWER;

create function snapbase.delete_record(table_id bigint, record_id bigint) returns text
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  outcome text := snapbase_private.apply_delete(t, record_id);
begin
  perform snapbase_private.audit_workbook('delete_record', t.workbook_id, 'workbook_record', record_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id, 'outcome', outcome));
  return outcome;
end;
$$;
comment on function snapbase.delete_record(bigint, bigint) is
  'Delete a record locally: "removed" if it never existed at the source, else "marked_deleted" (deleted at the source on publish).';
grant execute on function snapbase.delete_record(bigint, bigint) to :ROLE_VIEWER;

create function snapbase.undelete_record(table_id bigint, record_id bigint) returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
begin
  perform snapbase_private.apply_undelete(t, record_id);
  perform snapbase_private.audit_workbook('undelete_record', t.workbook_id, 'workbook_record', record_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id));
  return snapbase_private.get_record(t, record_id);
end;
$$;
grant execute on function snapbase.undelete_record(bigint, bigint) to :ROLE_VIEWER;

-- All or nothing: every operation runs; if any fails, none is kept and the result
-- lists each failure with its position. {"ok", "applied", "record_ids", "errors": [{index, id, error}]}
create function snapbase.bulk_edit_records(table_id bigint, operations jsonb) returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  op jsonb;
  i integer := 0;
  ids jsonb := '[]';
  errors jsonb := '[]';
begin
  if jsonb_typeof(operations) is distinct from 'array' then
    raise exception 'operations must be a JSON array' using errcode = '22023';
  end if;
  begin
    for op in select value from jsonb_array_elements(operations) loop
      begin
        ids := ids || to_jsonb(snapbase_private.apply_operation(t, op));
      exception when others then
        errors := errors || jsonb_build_object('index', i, 'id', op -> 'id', 'error', sqlerrm);
      end;
      i := i + 1;
    end loop;
    if jsonb_array_length(errors) > 0 then
      raise exception 'the batch had errors' using errcode = 'SB001';
    end if;
  exception when sqlstate 'SB001' then
    -- Undoes every operation of the batch; the errors are reported below.
    return jsonb_build_object('ok', false, 'applied', 0, 'record_ids', '[]'::jsonb, 'errors', errors);
  end;
  perform snapbase_private.audit_workbook('bulk_edit_records', t.workbook_id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('operations', i,
      'counts', (select jsonb_object_agg(k, n) from (select o ->> 'op' as k, count(*) as n from jsonb_array_elements(operations) o group by 1) c)));
  return jsonb_build_object('ok', true, 'applied', i, 'record_ids', ids, 'errors', errors);
end;
$$;
comment on function snapbase.bulk_edit_records(bigint, jsonb) is
  'Apply [{op: create|update|delete|undelete, id?, values?}] all or nothing; failures are reported per operation.';
grant execute on function snapbase.bulk_edit_records(bigint, jsonb) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Reading records
--------------------------------------------------------------------------------

create function snapbase.workbook_record(table_id bigint, record_id bigint) returns jsonb
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
begin
  return snapbase_private.get_record(t, record_id,
    case when snapbase.current_app_role() = 'agent' then t.hidden_columns else '{}' end);
end;
$$;
grant execute on function snapbase.workbook_record(bigint, bigint) to :ROLE_VIEWER, :ROLE_AGENT;

-- One page of records, keyset-paginated: pass the returned next_cursor as `after`.
-- Sorting is by sort_column (default: the table's saved sort, then record id),
-- nulls last, ties broken by record id. The active filter applies unless
-- use_filter is false. Agents never see hidden columns.
-- Returns {records: [...], next_cursor: text | null, sort_column, descending, filter}.
create function snapbase.workbook_records(
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
  base_where := format('not r.__suggested_new%s%s',
    case when include_deleted then '' else ' and not r.__deleted' end,
    case when use_filter and t.filter is not null then format(' and (%s)', t.filter) else '' end);

  if col is null then
    execute format('select coalesce(jsonb_agg(%s order by r.__id %s), ''[]'') from (select * from %s r where %s and ($1 is null or r.__id %s $1) order by r.__id %s limit $2) r',
      snapbase_private.record_json_sql(hide), case when desc_ then 'desc' else '' end, rel, base_where,
      case when desc_ then '<' else '>' end, case when desc_ then 'desc' else '' end)
      into page using cur_id, n + 1;
  else
    -- Non-null values first, in (value, id) order through the (column, id) index; then the nulls.
    if "after" is null or cur_value is not null then
      execute format($q$
        select coalesce(jsonb_agg(%1$s order by r.%4$I %5$s, r.__id %5$s), '[]')
          from (select * from %2$s r
                 where %3$s and r.%4$I is not null
                   and ($1::text is null or (r.%4$I, r.__id) %6$s ($1::text::%7$s, $2))
                 order by r.%4$I %5$s, r.__id %5$s limit $3) r
        $q$, snapbase_private.record_json_sql(hide), rel, base_where, col,
        case when desc_ then 'desc' else 'asc' end, case when desc_ then '<' else '>' end,
        (select c ->> 'type' from jsonb_array_elements(t.columns) c where c ->> 'name' = col))
        into page using cur_value, cur_id, n + 1;
    end if;
    if jsonb_array_length(page) <= n then
      execute format($q$
        select coalesce(jsonb_agg(%1$s order by r.__id %4$s), '[]')
          from (select * from %2$s r
                 where %3$s and r.%5$I is null and ($1::bigint is null or r.__id %6$s $1)
                 order by r.__id %4$s limit $2) r
        $q$, snapbase_private.record_json_sql(hide), rel, base_where, case when desc_ then 'desc' else 'asc' end, col,
        case when desc_ then '<' else '>' end)
        into more using case when cur_value is null then cur_id end, n + 1 - jsonb_array_length(page);
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
    return jsonb_build_object('records', page, 'sort_column', col, 'descending', desc_, 'filter', case when use_filter then t.filter end,
      'next_cursor', encode(convert_to(jsonb_build_object('id', last_record -> 'id', 'c', col, 'd', desc_, 'v', last_value)::text, 'UTF8'), 'base64'));
  end if;
  return jsonb_build_object('records', page, 'sort_column', col, 'descending', desc_, 'filter', case when use_filter then t.filter end,
    'next_cursor', null);
end;
$$;
comment on function snapbase.workbook_records(bigint, integer, text, text, boolean, boolean, boolean) is
  'A page of records (keyset-paginated: pass next_cursor as after), sorted and filtered by the table''s settings unless overridden.';
grant execute on function snapbase.workbook_records(bigint, integer, text, text, boolean, boolean, boolean) to :ROLE_VIEWER, :ROLE_AGENT;

create type snapbase.record_counts as (total bigint, filtered bigint, dirty bigint, with_suggestions bigint, deleted bigint);

create function snapbase.workbook_record_counts(table_id bigint) returns snapbase.record_counts
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
  counts snapbase.record_counts;
begin
  execute format($q$
    select count(*) filter (where not r.__suggested_new),
           count(*) filter (where not r.__suggested_new and %s),
           count(*) filter (where r.__dirty),
           count(*) filter (where r.__suggested <> '{}' or r.__suggest_delete is not null or r.__suggested_new),
           count(*) filter (where r.__deleted)
      from %s r$q$, coalesce(t.filter, 'true'), snapbase_private.table_rel(t))
    into counts;
  return counts;
end;
$$;
comment on function snapbase.workbook_record_counts(bigint) is 'Record counts: all, within the active filter, dirty, with suggestions, deleted.';
grant execute on function snapbase.workbook_record_counts(bigint) to :ROLE_VIEWER, :ROLE_AGENT;

--------------------------------------------------------------------------------
-- Suggestions
--------------------------------------------------------------------------------

create function snapbase.suggest_values(table_id bigint, record_id bigint, "values" jsonb) returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  by_whom text := coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user)
                  || case when snapbase.current_app_role() = 'agent' then ' (agent)' else '' end;
  is_new boolean;
begin
  if snapbase.current_app_role() = 'agent' and exists (select 1 from jsonb_object_keys("values") k where k = any (t.hidden_columns)) then
    raise exception 'unknown column(s) in workbook table %', t.id using errcode = '22023';
  end if;
  execute format('select __created or __suggested_new from %s where __id = $1', snapbase_private.table_rel(t)) into is_new using record_id;
  if is_new is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.check_values(t, "values", is_new);
  execute format($u$
    update %s set __suggested = __suggested || (select jsonb_object_agg(k, jsonb_build_object('value', v, 'by', $3::text, 'at', now()))
                                                  from jsonb_each($2) e(k, v)),
                  __updated_at = now()
     where __id = $1$u$, snapbase_private.table_rel(t)) using record_id, "values", by_whom;
  perform snapbase_private.audit_workbook('suggest_values', t.workbook_id, 'workbook_record', record_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id, 'values', "values"));
  return snapbase_private.get_record(t, record_id, case when snapbase.current_app_role() = 'agent' then t.hidden_columns else '{}' end);
end;
$$;
comment on function snapbase.suggest_values(bigint, bigint, jsonb) is 'Suggest new values for some cells of a record (people and agents).';
grant execute on function snapbase.suggest_values(bigint, bigint, jsonb) to :ROLE_VIEWER, :ROLE_AGENT;

create function snapbase.suggest_new_record(table_id bigint, "values" jsonb) returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  by_whom text := coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user)
                  || case when snapbase.current_app_role() = 'agent' then ' (agent)' else '' end;
  new_id bigint;
begin
  if snapbase.current_app_role() = 'agent' and exists (select 1 from jsonb_object_keys("values") k where k = any (t.hidden_columns)) then
    raise exception 'unknown column(s) in workbook table %', t.id using errcode = '22023';
  end if;
  perform snapbase_private.check_values(t, "values", true);
  execute format($i$
    insert into %s (__suggested_new, __suggested)
    select true, coalesce(jsonb_object_agg(k, jsonb_build_object('value', v, 'by', $2::text, 'at', now())), '{}') from jsonb_each($1) e(k, v)
    returning __id$i$, snapbase_private.table_rel(t)) into new_id using "values", by_whom;
  perform snapbase_private.audit_workbook('suggest_new_record', t.workbook_id, 'workbook_record', new_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id, 'values', "values"));
  return snapbase_private.get_record(t, new_id, case when snapbase.current_app_role() = 'agent' then t.hidden_columns else '{}' end);
end;
$$;
comment on function snapbase.suggest_new_record(bigint, jsonb) is 'Suggest a new record; it becomes a record when accepted.';
grant execute on function snapbase.suggest_new_record(bigint, jsonb) to :ROLE_VIEWER, :ROLE_AGENT;

create function snapbase.suggest_delete(table_id bigint, record_id bigint) returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  found_id bigint;
begin
  execute format($u$update %s set __suggest_delete = jsonb_build_object('by', $2::text, 'at', now()), __updated_at = now()
                     where __id = $1 and not __suggested_new returning __id$u$, snapbase_private.table_rel(t))
    into found_id
    using record_id, coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user)
                     || case when snapbase.current_app_role() = 'agent' then ' (agent)' else '' end;
  if found_id is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.audit_workbook('suggest_delete', t.workbook_id, 'workbook_record', record_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id));
  return snapbase_private.get_record(t, record_id, case when snapbase.current_app_role() = 'agent' then t.hidden_columns else '{}' end);
end;
$$;
grant execute on function snapbase.suggest_delete(bigint, bigint) to :ROLE_VIEWER, :ROLE_AGENT;

-- The WHERE clause choosing which records' suggestions to act on.
create function snapbase_private.suggestion_scope(t snapbase.workbook_tables, record_id bigint, within_filter boolean) returns text
language sql stable
set search_path = pg_catalog
as $$
  select concat_ws(' and ',
    '(r.__suggested <> ''{}'' or r.__suggest_delete is not null or r.__suggested_new)',
    case when record_id is not null then format('r.__id = %s', record_id) end,
    case when within_filter and t.filter is not null then format('(%s)', t.filter) end)
$$;

-- Accepts suggestions: of one record or all (optionally only within the active
-- filter), for one column or all. Accepted values are copied with type checks and
-- flagged as edited; suggested new records become new records; suggested deletions
-- mark the record deleted. One UPDATE (and one DELETE-free pass): all or nothing.
-- Returns {records, cells, created, deleted}.
create function snapbase.accept_suggestions(table_id bigint, record_id bigint default null, column_name text default null,
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
  scratch text[] := snapbase_private.scratch_columns(t);
  result jsonb;
begin
  if column_name is not null and column_name <> all (snapbase_private.column_names(t)) then
    raise exception 'unknown column %', column_name using errcode = '22023';
  end if;
  execute format($u$
    with chosen as (
      select r.__id, r.__created, r.__suggested_new, r.__suggest_delete is not null and $1::text is null as accept_delete,
             (select coalesce(jsonb_object_agg(k, v -> 'value'), '{}') from jsonb_each(r.__suggested) e(k, v)
               where $1::text is null or k = $1) as patch
        from %1$s r
       where %2$s
       for update
    ), applied as (
      update %1$s r set
        (%3$s) = (select %3$s from jsonb_populate_record(r, c.patch)),
        __edited = r.__edited || coalesce((select jsonb_object_agg(k, now()) from jsonb_object_keys(c.patch) k where k <> all ($2)), '{}'),
        __suggested = case when $1::text is null then '{}' else r.__suggested - $1 end,
        __created = r.__created or (c.__suggested_new and $1::text is null),
        __suggested_new = r.__suggested_new and $1::text is not null,
        __deleted = r.__deleted or c.accept_delete,
        __suggest_delete = case when c.accept_delete then null else r.__suggest_delete end,
        __updated_at = now()
        from chosen c
       where r.__id = c.__id
      returning c.patch, c.__suggested_new, c.accept_delete
    )
    select jsonb_build_object('records', count(*), 'cells', coalesce(sum((select count(*) from jsonb_object_keys(patch))), 0),
                              'created', count(*) filter (where __suggested_new and $1::text is null),
                              'deleted', count(*) filter (where accept_delete))
      from applied
    $u$, rel, snapbase_private.suggestion_scope(t, record_id, within_filter), cols)
    into result using column_name, scratch;
  perform snapbase_private.audit_workbook('accept_suggestions', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('record_id', record_id, 'column', column_name, 'within_filter', within_filter) || result);
  return result;
end;
$$;
comment on function snapbase.accept_suggestions(bigint, bigint, text, boolean) is
  'Accept suggestions of one record or all (optionally within the active filter), for one column or all. Returns {records, cells, created, deleted}.';
grant execute on function snapbase.accept_suggestions(bigint, bigint, text, boolean) to :ROLE_VIEWER;

create function snapbase.reject_suggestions(table_id bigint, record_id bigint default null, column_name text default null,
                                            within_filter boolean default false)
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  rel text := snapbase_private.table_rel(t);
  scope text := snapbase_private.suggestion_scope(t, record_id, within_filter);
  records bigint;
  removed bigint := 0;
begin
  -- Rejecting a whole suggested new record removes it.
  if column_name is null then
    execute format('delete from %s r where %s and r.__suggested_new', rel, scope);
    get diagnostics removed = row_count;
  end if;
  execute format($u$
    with changed as (
      update %s r set
        __suggested = case when $1::text is null then '{}' else r.__suggested - $1 end,
        __suggest_delete = case when $1::text is null then null else r.__suggest_delete end,
        __updated_at = now()
       where %s and ($1::text is null or r.__suggested ? $1)
      returning r.__id
    )
    select count(*) from changed$u$, rel, scope)
    into records using column_name;
  perform snapbase_private.audit_workbook('reject_suggestions', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('record_id', record_id, 'column', column_name, 'within_filter', within_filter,
                       'records', records + removed, 'removed_new_records', removed));
  return jsonb_build_object('records', records + removed, 'removed_new_records', removed);
end;
$$;
comment on function snapbase.reject_suggestions(bigint, bigint, text, boolean) is
  'Reject suggestions of one record or all (optionally within the active filter), for one column or all.';
grant execute on function snapbase.reject_suggestions(bigint, bigint, text, boolean) to :ROLE_VIEWER;

-- Records with pending suggestions, by record id; pass the last id as after_id.
create function snapbase.workbook_suggestions(table_id bigint, page_size integer default 100, after_id bigint default null)
returns jsonb
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
  hide text[] := case when snapbase.current_app_role() = 'agent' then t.hidden_columns else '{}' end;
  page jsonb;
begin
  if page_size not between 1 and 1000 then
    raise exception 'page_size must be from 1 to 1000 (got %)', page_size using errcode = '22023';
  end if;
  execute format($q$
    select coalesce(jsonb_agg(%s order by r.__id), '[]')
      from (select * from %s r where %s and ($1::bigint is null or r.__id > $1) order by r.__id limit $2) r$q$,
    snapbase_private.record_json_sql(hide), snapbase_private.table_rel(t), snapbase_private.suggestion_scope(t, null, false))
    into page using after_id, page_size;
  return page;
end;
$$;
grant execute on function snapbase.workbook_suggestions(bigint, integer, bigint) to :ROLE_VIEWER, :ROLE_AGENT;

--------------------------------------------------------------------------------
-- Agent tokens
--------------------------------------------------------------------------------

create function snapbase.create_agent_token(workbook_id bigint, name text, expires_at timestamptz default null)
returns text
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'edit');
  secret text := 'sbt_' || snapbase_private.base64url(public.gen_random_bytes(32));
  new_id bigint;
begin
  if snapbase_private.current_token_id() is not null then
    raise exception 'API tokens cannot create other API tokens; sign in with a password' using errcode = '42501';
  end if;
  if expires_at is not null and expires_at <= now() then
    raise exception 'expires_at must be in the future' using errcode = '22023';
  end if;
  insert into snapbase.api_tokens (user_id, name, scopes, workbook_id, expires_at)
    values (snapbase.current_user_id(), name, array['agent'], wb.id, expires_at) returning id into new_id;
  insert into snapbase_private.api_token_hashes (token_id, token_hash) values (new_id, public.digest(secret, 'sha256'));
  perform snapbase_private.audit_workbook('create_agent_token', wb.id, 'api_token', new_id::text, null, jsonb_build_object('name', name));
  return secret;
end;
$$;
comment on function snapbase.create_agent_token(bigint, text, timestamptz) is
  'Create an agent token for one workbook: it may read records page by page (hidden columns left out) and write suggestions, nothing else. Shown once.';
grant execute on function snapbase.create_agent_token(bigint, text, timestamptz) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Publish preview
--------------------------------------------------------------------------------

-- Per table: the records publishing would create, update (with before/after per
-- edited field) and delete. Scratch columns never appear. At most `max_records`
-- of each kind are listed; the counts are exact.
create function snapbase.publish_preview(workbook_id bigint, max_records integer default 100) returns jsonb
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'read');
  t snapbase.workbook_tables;
  rel text;
  scratch text[];
  counts jsonb;
  creates jsonb;
  updates jsonb;
  deletes jsonb;
  tables jsonb := '[]';
begin
  for t in select * from snapbase.workbook_tables wt where wt.workbook_id = wb.id order by wt.id loop
    rel := snapbase_private.table_rel(t);
    scratch := snapbase_private.scratch_columns(t);
    -- Deleting a record that never reached the source removes it, so created and
    -- deleted exclude each other here.
    execute format($q$
      select jsonb_build_object(
        'create_count', count(*) filter (where r.__created),
        'update_count', count(*) filter (where not r.__created and not r.__deleted and r.__edited - $1 <> '{}'),
        'delete_count', count(*) filter (where r.__deleted))
        from %s r where r.__dirty$q$, rel)
      into counts using scratch;
    execute format($q$
      select coalesce(jsonb_agg(jsonb_build_object('id', r.__id, 'values', to_jsonb(r) - $2 - $1) order by r.__id), '[]')
        from (select * from %s r where r.__created order by r.__id limit $3) r$q$, rel)
      into creates using scratch, snapbase_private.record_meta_columns(), max_records;
    execute format($q$
      select coalesce(jsonb_agg(jsonb_build_object('id', r.__id, 'remote_id', r.__remote_id, 'fields',
               (select jsonb_agg(jsonb_build_object('column', k, 'before', r.__last_seen -> k, 'after', to_jsonb(r) -> k,
                                                    'edited_at', r.__edited -> k) order by k)
                  from jsonb_object_keys(r.__edited - $1) k)) order by r.__id), '[]')
        from (select * from %s r where r.__dirty and not r.__created and not r.__deleted and r.__edited - $1 <> '{}'
               order by r.__id limit $2) r$q$, rel)
      into updates using scratch, max_records;
    execute format($q$
      select coalesce(jsonb_agg(jsonb_build_object('id', r.__id, 'remote_id', r.__remote_id, 'before', r.__last_seen) order by r.__id), '[]')
        from (select * from %s r where r.__deleted order by r.__id limit $1) r$q$, rel)
      into deletes using max_records;
    tables := tables || jsonb_build_array(jsonb_build_object('table_id', t.id, 'name', t.name)
                || counts || jsonb_build_object('creates', creates, 'updates', updates, 'deletes', deletes));
  end loop;
  return jsonb_build_object('workbook_id', wb.id, 'tables', tables);
end;
$$;
comment on function snapbase.publish_preview(bigint, integer) is
  'What publishing would do, per table: records to create, update (before/after per edited field) and delete. Scratch columns never appear.';
grant execute on function snapbase.publish_preview(bigint, integer) to :ROLE_VIEWER, :ROLE_AGENT;
