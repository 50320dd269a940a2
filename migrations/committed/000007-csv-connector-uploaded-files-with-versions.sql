--! Previous: sha1:a43d9b43ef4e7586ff6baaf44016c2acfa6cf359
--! Hash: sha1:9f87289dae571d1598a738db8444d778d1bf81ba
--! Message: csv connector: uploaded files with versions

-- CSV files as a connector source (issue: csv).
--
-- A user uploads a CSV file; a `csv` connector account ({"file_id": n}) makes it a
-- source table like any other: the worker infers its spec from the header and the
-- values (src/connectors/csv.ts), downloads it into a workbook, and publishing
-- writes a NEW version of the file, which the user downloads over REST. Versions
-- are immutable: version 1 is always the upload.
--
-- Parsing happens in the worker and the REST layer (csv-parse), never here: SQL only
-- stores versions, checks who may read them and counts records for the listing.

-- Idempotent while this is current.sql.
drop function if exists snapbase.upload_csv_file cascade;
drop function if exists snapbase.set_csv_column_types cascade;
drop function if exists snapbase.csv_file_versions cascade;
drop function if exists snapbase.csv_file_content cascade;
drop function if exists snapbase_private.csv_file_content cascade;
drop function if exists snapbase_private.add_csv_version cascade;
drop function if exists snapbase_private.require_csv_file cascade;
drop function if exists snapbase_private.csv_record_count cascade;
drop table if exists snapbase_private.csv_file_versions, snapbase.csv_files cascade;

--------------------------------------------------------------------------------
-- Files and their versions
--------------------------------------------------------------------------------

create table snapbase.csv_files (
  id bigint generated always as identity primary key,
  owner_id bigint not null references snapbase.users on delete cascade,
  name text not null check (length(trim(name)) between 1 and 200),
  -- The user's type overrides, {"column": "type"}: they win over the inferred types.
  column_types jsonb not null default '{}' check (jsonb_typeof(column_types) = 'object'),
  created_at timestamptz not null default now()
);
create index csv_files_owner_id_idx on snapbase.csv_files (owner_id);
comment on table snapbase.csv_files is 'Uploaded CSV files, usable as a source table through a csv connector account. Publishing to one adds a version.';
comment on column snapbase.csv_files.column_types is 'Type overrides {"column": "type"} applied over the types inferred from the values.';

alter table snapbase.csv_files enable row level security;
create policy select_own on snapbase.csv_files for select
  using (owner_id = snapbase.current_user_id() or (snapbase.current_user_id() is null and snapbase.current_app_role() = 'admin'));
grant select on snapbase.csv_files to :ROLE_VIEWER;

create table snapbase_private.csv_file_versions (
  file_id bigint not null references snapbase.csv_files on delete cascade,
  version integer not null check (version >= 1),
  content text not null,
  row_count bigint not null check (row_count >= 0),
  created_at timestamptz not null default now(),
  -- The publish job that wrote it (null: the upload).
  created_by_job bigint references snapbase.jobs on delete set null,
  -- Files without a usable id column are identified by row number (1-based data
  -- record). Those numbers must survive deletions and additions, or a workbook's
  -- remote ids would point at other rows after a publish: the connector stores
  -- them here, in file order. Null: 1..row_count (an upload).
  row_numbers bigint[],
  -- The next row number to give, so a deleted row's number is never reused.
  -- Null: row_count + 1.
  next_row_number bigint,
  -- The inferred column types {"column": "type"} the connector wrote this version
  -- under. Later downloads keep them instead of inferring again, so that an edit
  -- (deleting the one row whose code was not a number) cannot retype a column and
  -- break the workbooks already downloaded. Null: infer from the values (an upload).
  inferred_types jsonb,
  primary key (file_id, version),
  check (row_numbers is null or cardinality(row_numbers) = row_count)
);
comment on table snapbase_private.csv_file_versions is 'Every version of every CSV file: 1 is the upload, later ones come from publish jobs.';

-- Records in a CSV text, as the connector parses it (RFC 4180: line breaks inside
-- quoted fields do not end a record; blank lines are skipped), without the header.
-- Removing the quoted parts first ("a""b" is two adjacent quoted parts) leaves one
-- run of characters per non-blank line. Malformed files are refused by the parser,
-- so this count is only for the versions listing.
create function snapbase_private.csv_record_count(content text) returns bigint
language sql immutable strict
set search_path = pg_catalog
as $$
  select greatest(regexp_count(regexp_replace(content, '"[^"]*"', 'x', 'g'), '[^\r\n]+') - 1, 0)
$$;

-- The caller's file (a DBA without a user id, as admin: any file), or "no CSV file"
-- (P0002: REST answers 404), so other users' files look like missing ones.
create function snapbase_private.require_csv_file(file_id bigint) returns snapbase.csv_files
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  f snapbase.csv_files;
begin
  select * into f from snapbase.csv_files cf
   where cf.id = file_id
     and (cf.owner_id = snapbase.current_user_id() or (snapbase.current_user_id() is null and snapbase.current_app_role() = 'admin'));
  if f.id is null then
    raise exception 'no CSV file %', coalesce(file_id::text, 'null') using errcode = 'P0002';
  end if;
  return f;
end;
$$;

create function snapbase.upload_csv_file(name text, content text) returns snapbase.csv_files
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  f snapbase.csv_files;
  records bigint;
begin
  if snapbase.current_user_id() is null or snapbase.current_app_role() = 'agent' then
    raise exception 'sign in as a Snapbase user to upload CSV files' using errcode = '42501';
  end if;
  if coalesce(trim(name), '') = '' or length(trim(name)) > 200 then
    raise exception 'a CSV file needs a name of 1 to 200 characters' using errcode = '22023';
  end if;
  if coalesce(trim(content, E' \t\r\n'), '') = '' then
    raise exception 'the CSV file is empty: it needs at least a header line' using errcode = '22023';
  end if;
  records := snapbase_private.csv_record_count(content);
  insert into snapbase.csv_files (owner_id, name) values (snapbase.current_user_id(), trim(name)) returning * into f;
  insert into snapbase_private.csv_file_versions (file_id, version, content, row_count) values (f.id, 1, content, records);
  perform snapbase_private.audit('upload_csv_file', 'csv_file', f.id::text, null,
    jsonb_build_object('name', f.name, 'bytes', octet_length(content), 'row_count', records));
  return f;
end;
$$;
comment on function snapbase.upload_csv_file(text, text) is
  'Upload a CSV file (a header line, then records) as version 1. Use it as a source with a csv connector account {"file_id": id}.';
grant execute on function snapbase.upload_csv_file(text, text) to :ROLE_VIEWER;

-- Overrides are checked like workbook columns (a built-in type PostgreSQL accepts);
-- a null type removes the override. Whether each column exists is checked by the
-- connector, which reads the header.
create function snapbase.set_csv_column_types(file_id bigint, column_types jsonb) returns snapbase.csv_files
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
comment on function snapbase.set_csv_column_types(bigint, jsonb) is
  'Replace the file''s column type overrides {"column": "type"} (null: infer). They apply to the next download; a workbook already downloaded keeps its types.';
grant execute on function snapbase.set_csv_column_types(bigint, jsonb) to :ROLE_VIEWER;

-- id is the file's id (an output column cannot share the argument's name).
create function snapbase.csv_file_versions(file_id bigint)
returns table (id bigint, version integer, row_count bigint, created_at timestamptz, created_by_job bigint)
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  f snapbase.csv_files := snapbase_private.require_csv_file(file_id);
begin
  return query select v.file_id, v.version, v.row_count, v.created_at, v.created_by_job
                 from snapbase_private.csv_file_versions v where v.file_id = f.id order by v.version;
end;
$$;
comment on function snapbase.csv_file_versions(bigint) is 'The versions of one of your CSV files, oldest first (content: csv_file_content, or GET /api/v1/csv-files/:id/content).';
grant execute on function snapbase.csv_file_versions(bigint) to :ROLE_VIEWER;

-- No access check: for the owner (the worker) and the public function below.
create function snapbase_private.csv_file_content(file_id bigint, version integer default null) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  body text;
begin
  select v.content into body from snapbase_private.csv_file_versions v
   where v.file_id = csv_file_content.file_id and (csv_file_content.version is null or v.version = csv_file_content.version)
   order by v.version desc limit 1;
  if body is null then
    raise exception 'CSV file % has no version %', file_id, coalesce(version::text, '(none)') using errcode = 'P0002';
  end if;
  return body;
end;
$$;

create function snapbase.csv_file_content(file_id bigint, version integer default null) returns text
language sql stable
security definer
set search_path = pg_catalog
as $$
  select snapbase_private.csv_file_content((snapbase_private.require_csv_file(file_id)).id, version)
$$;
comment on function snapbase.csv_file_content(bigint, integer) is 'The text of a version of one of your CSV files (null: the latest).';
grant execute on function snapbase.csv_file_content(bigint, integer) to :ROLE_VIEWER;

-- For the csv connector (the worker, as the owner): stores its rewrite of the file
-- as the next version, with the row numbers of its records (files identified by
-- row number) and the inferred types it was written under. The connector holds a
-- lock on the csv_files row while it reads the latest version and writes the next,
-- so concurrent publishes to one file apply one after the other instead of
-- overwriting each other.
create function snapbase_private.add_csv_version(file_id bigint, content text, row_count bigint, job_id bigint default null,
                                                 row_numbers bigint[] default null, inferred_types jsonb default null)
returns integer
language plpgsql
set search_path = pg_catalog
as $$
declare
  previous snapbase_private.csv_file_versions;
  created integer;
begin
  select * into previous from snapbase_private.csv_file_versions v
   where v.file_id = add_csv_version.file_id order by v.version desc limit 1;
  if previous.file_id is null then
    raise exception 'no CSV file %', file_id using errcode = 'P0002';
  end if;
  insert into snapbase_private.csv_file_versions (file_id, version, content, row_count, created_by_job, row_numbers, inferred_types, next_row_number)
    values (file_id, previous.version + 1, content, row_count, job_id, row_numbers, inferred_types,
            case when row_numbers is not null then
              greatest(coalesce(previous.next_row_number, previous.row_count + 1),
                       coalesce((select max(n) + 1 from unnest(row_numbers) n), 1)) end)
    returning version into created;
  perform snapbase_private.audit('csv_file_version', 'csv_file', file_id::text, null,
    jsonb_strip_nulls(jsonb_build_object('version', created, 'row_count', row_count, 'job_id', job_id)));
  return created;
end;
$$;

--------------------------------------------------------------------------------
-- The csv connector kind
--------------------------------------------------------------------------------

alter table snapbase.connector_accounts drop constraint if exists connector_accounts_kind_check;
alter table snapbase.connector_accounts
  add constraint connector_accounts_kind_check check (kind in ('postgres', 'mysql', 'managed', 'csv'));

-- Now stable, not immutable: a csv account's file must exist and be the caller's
-- (the worker reads it as the owner, so this is where access is decided).
create or replace function snapbase_private.check_credentials(kind text, credentials jsonb) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  url text := credentials ->> 'connection_string';
  f snapbase.csv_files;
begin
  if jsonb_typeof(credentials) is distinct from 'object' then
    raise exception 'credentials must be a JSON object' using errcode = '22023';
  end if;
  case kind
    when 'postgres' then
      if url is null or url !~ '^postgres(ql)?://' then
        raise exception 'postgres credentials need a connection_string (postgres://user:password@host:5432/database)' using errcode = '22023';
      end if;
      return regexp_replace(url, '^(postgres(ql)?://)([^:@/]*)(:[^@/]*)?@', '\1\3@');
    when 'mysql' then
      if credentials ->> 'host' is null or credentials ->> 'user' is null or credentials ->> 'database' is null then
        raise exception 'mysql credentials need host, user, database (and password, port)' using errcode = '22023';
      end if;
      return format('%s@%s:%s/%s', credentials ->> 'user', credentials ->> 'host', coalesce(credentials ->> 'port', '3306'), credentials ->> 'database');
    when 'managed' then
      return 'managed tables of this database (publishing goes through change requests)';
    when 'csv' then
      if coalesce(jsonb_typeof(credentials -> 'file_id'), 'missing') not in ('number', 'string')
         or coalesce(credentials ->> 'file_id', '') !~ '^[1-9][0-9]{0,17}$' then
        raise exception 'csv credentials need the file_id of an uploaded CSV file ({"file_id": 12})' using errcode = '22023';
      end if;
      -- Only the caller's own files: another user's file is reported as missing.
      select * into f from snapbase.csv_files cf
       where cf.id = (credentials ->> 'file_id')::bigint and cf.owner_id = snapbase.current_user_id();
      if f.id is null then
        raise exception 'no CSV file %', credentials ->> 'file_id' using errcode = 'P0002';
      end if;
      return format('CSV file %s', f.name);
    else
      raise exception 'kind must be postgres, mysql, managed or csv (got %)', coalesce(kind, 'null') using errcode = '22023';
  end case;
end;
$$;

comment on function snapbase.create_connector_account(text, text, jsonb) is
  'Store credentials for a source: postgres {connection_string}, mysql {host, port, user, password, database}, managed {}, csv {file_id} (an uploaded CSV file). They are encrypted and never returned.';
