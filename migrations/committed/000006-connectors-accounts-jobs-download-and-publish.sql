--! Previous: sha1:5ae8ece5577e0567acfef35e6a6d0a2965cac500
--! Hash: sha1:a43d9b43ef4e7586ff6baaf44016c2acfa6cf359
--! Message: connectors: accounts, jobs, download and publish

-- Connectors, connector accounts, jobs, download and publish (issue: connectors).
--
-- External systems are reached only by graphile-worker tasks (tasks/*.ts) through
-- the connector interface (src/connectors/). Everything they need from the
-- database is a function here: claim a job, apply a batch of downloaded records,
-- hand out the next records to publish, store each record's outcome as it happens.
-- Users start, watch and cancel jobs through the `jobs` table and the functions
-- below; all of it appears in GraphQL.

-- Idempotent while this is current.sql.
drop trigger if exists _500_job_follows_change on snapbase.change_requests;
drop function if exists snapbase_private.tg__job_follows_change cascade;
drop function if exists snapbase_private.credentials_key cascade;
drop function if exists snapbase_private.account_credentials cascade;
drop function if exists snapbase_private.check_credentials cascade;
drop function if exists snapbase_private.enqueue_job cascade;
drop function if exists snapbase_private.start_job cascade;
drop function if exists snapbase_private.finish_job cascade;
drop function if exists snapbase_private.job_progress cascade;
drop function if exists snapbase_private.require_account cascade;
drop function if exists snapbase_private.prepare_download cascade;
drop function if exists snapbase_private.apply_download_batch cascade;
drop function if exists snapbase_private.finish_download cascade;
drop function if exists snapbase_private.next_to_publish cascade;
drop function if exists snapbase_private.record_publish_outcomes cascade;
drop function if exists snapbase_private.check_publish_conflicts cascade;
drop function if exists snapbase_private.publish_managed cascade;
drop function if exists snapbase_private.normalized_values cascade;
drop function if exists snapbase_private.notify_job cascade;
drop function if exists snapbase_private.publish_filter cascade;
drop function if exists snapbase_private.publish_pending cascade;
drop function if exists snapbase.create_connector_account cascade;
drop function if exists snapbase.rotate_connector_credentials cascade;
drop function if exists snapbase.delete_connector_account cascade;
drop function if exists snapbase.test_connector_account cascade;
drop function if exists snapbase.list_remote_tables cascade;
drop function if exists snapbase.add_remote_table cascade;
drop function if exists snapbase.create_workbook_from_remote cascade;
drop function if exists snapbase.refresh_workbook_table cascade;
drop function if exists snapbase.publish_workbook cascade;
drop function if exists snapbase.cancel_job cascade;
drop function if exists snapbase.resolve_source_deleted cascade;
drop table if exists snapbase.jobs, snapbase_private.connector_credentials cascade;
alter table if exists snapbase.workbook_tables drop column if exists connector_account_id, drop column if exists remote_table;
drop table if exists snapbase.connector_accounts cascade;
drop type if exists snapbase.job_kind, snapbase.job_state cascade;

--------------------------------------------------------------------------------
-- Sync metadata on every workbook table
--------------------------------------------------------------------------------
-- __source_deleted: gone at the source but edited here (the user re-creates or deletes it)
-- __publish: the last publish outcome {state, job_id, at, error?, source_values?}
-- __seen_job: the download job that last saw the record (to find source deletions)

do $$ declare t record; begin
  for t in select snapbase_private.table_rel(wt) as rel from snapbase.workbook_tables wt loop
    execute format('alter table %s add column if not exists __source_deleted boolean not null default false,
                    add column if not exists __publish jsonb, add column if not exists __seen_job bigint', t.rel);
  end loop;
end $$;

create or replace function snapbase_private.record_meta_columns() returns text[]
language sql immutable
as $$
  select array['__id', '__remote_id', '__last_seen', '__edited', '__suggested', '__suggest_delete',
               '__created', '__deleted', '__suggested_new', '__dirty', '__updated_at',
               '__source_deleted', '__publish', '__seen_job']
$$;

create or replace function snapbase_private.record_json_sql(hide text[] default '{}') returns text
language sql immutable
as $$
  select format($f$jsonb_build_object('id', r.__id, 'remote_id', r.__remote_id,
    'values', to_jsonb(r) - %L::text[], 'edited', r.__edited - %2$L::text[], 'suggested', r.__suggested - %2$L::text[],
    'state', jsonb_build_object('created', r.__created, 'deleted', r.__deleted, 'dirty', r.__dirty,
                                'suggested_new', r.__suggested_new, 'suggest_delete', r.__suggest_delete,
                                'source_deleted', r.__source_deleted, 'publish', r.__publish))$f$,
    snapbase_private.record_meta_columns() || hide, hide)
$$;

-- Workbook tables now carry the sync metadata columns too.
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
      __remote_id text unique,
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
  execute format('comment on table %I.%I is %L', wb.schema_name, tname, format('Snapbase workbook table %s: %s', t.id, t.name));
  return t;
end;
$$;


-- A record's values typed by the table's columns and rendered back as JSON, so that
-- values from any source compare exactly with what the table holds ("12.5" and
-- 12.50 are the same numeric). Only the given keys are kept.
create function snapbase_private.normalized_values(rel text, vals jsonb) returns jsonb
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  typed jsonb;
begin
  execute format('select to_jsonb(jsonb_populate_record(null::%s, $1))', rel) into typed using vals;
  return (select coalesce(jsonb_object_agg(k, typed -> k), '{}') from jsonb_object_keys(vals) k);
end;
$$;

--------------------------------------------------------------------------------
-- Connector accounts
--------------------------------------------------------------------------------
-- Credentials are encrypted with pgp_sym_encrypt under a key that lives only in
-- the servers' environment (SNAPBASE_CREDENTIALS_KEY): the API passes it as the
-- transaction setting snapbase.credentials_key, the worker as an argument. The
-- database alone cannot decrypt them, and no API returns them.

create table snapbase.connector_accounts (
  id bigint generated always as identity primary key,
  owner_id bigint not null references snapbase.users on delete cascade,
  name text not null check (length(trim(name)) between 1 and 200),
  kind text not null check (kind in ('postgres', 'mysql', 'managed')),
  -- Where it points, without secrets (user, host, port, database).
  summary text not null default '',
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  credentials_rotated_at timestamptz,
  last_tested_at timestamptz,
  last_test_error text
);
create index connector_accounts_owner_id_idx on snapbase.connector_accounts (owner_id);
create trigger _100_timestamps before insert or update on snapbase.connector_accounts
  for each row execute function snapbase_private.tg__timestamps();
comment on table snapbase.connector_accounts is 'Credentials for an external source (postgres, mysql) or this database''s managed tables. Secrets are stored encrypted and never returned.';

create table snapbase_private.connector_credentials (
  account_id bigint primary key references snapbase.connector_accounts on delete cascade,
  secret bytea not null
);

alter table snapbase.connector_accounts enable row level security;
create policy select_own on snapbase.connector_accounts for select
  using (owner_id = snapbase.current_user_id() or (snapbase.current_user_id() is null and snapbase.current_app_role() = 'admin'));
grant select on snapbase.connector_accounts to :ROLE_VIEWER;

alter table snapbase.workbook_tables
  add column connector_account_id bigint references snapbase.connector_accounts on delete set null,
  add column remote_table text;
comment on column snapbase.workbook_tables.connector_account_id is 'The connector account the table was downloaded from (null: local or copied).';

create function snapbase_private.credentials_key() returns text
language plpgsql stable
set search_path = pg_catalog
as $$
begin
  if coalesce(current_setting('snapbase.credentials_key', true), '') = '' then
    raise exception 'connector credentials cannot be stored: the server has no SNAPBASE_CREDENTIALS_KEY (in psql: set snapbase.credentials_key = ''...'')'
      using errcode = '55000';
  end if;
  return current_setting('snapbase.credentials_key');
end;
$$;

-- Checks the credentials' shape for the kind; returns the summary shown instead of them.
create function snapbase_private.check_credentials(kind text, credentials jsonb) returns text
language plpgsql immutable
set search_path = pg_catalog
as $$
declare
  url text := credentials ->> 'connection_string';
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
    else
      raise exception 'kind must be postgres, mysql or managed (got %)', coalesce(kind, 'null') using errcode = '22023';
  end case;
end;
$$;

create function snapbase_private.require_account(account_id bigint) returns snapbase.connector_accounts
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  a snapbase.connector_accounts;
begin
  select * into a from snapbase.connector_accounts ca
   where ca.id = account_id
     and (ca.owner_id = snapbase.current_user_id() or (snapbase.current_user_id() is null and snapbase.current_app_role() = 'admin'));
  if a.id is null then
    raise exception 'no connector account %', account_id using errcode = 'P0002';
  end if;
  return a;
end;
$$;

create function snapbase.create_connector_account(kind text, name text, credentials jsonb default '{}') returns snapbase.connector_accounts
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  summary text := snapbase_private.check_credentials(kind, credentials);
  a snapbase.connector_accounts;
begin
  if snapbase.current_user_id() is null or snapbase.current_app_role() = 'agent' then
    raise exception 'sign in as a Snapbase user to create connector accounts' using errcode = '42501';
  end if;
  insert into snapbase.connector_accounts (owner_id, name, kind, summary)
    values (snapbase.current_user_id(), trim(name), kind, summary) returning * into a;
  insert into snapbase_private.connector_credentials (account_id, secret)
    values (a.id, public.pgp_sym_encrypt(credentials::text, snapbase_private.credentials_key()));
  perform snapbase_private.audit('create_connector_account', 'connector_account', a.id::text, null,
    jsonb_build_object('kind', kind, 'name', a.name, 'summary', summary));
  return a;
end;
$$;
comment on function snapbase.create_connector_account(text, text, jsonb) is
  'Store credentials for a source: postgres {connection_string}, mysql {host, port, user, password, database}, managed {}. They are encrypted and never returned.';
grant execute on function snapbase.create_connector_account(text, text, jsonb) to :ROLE_VIEWER;

create function snapbase.rotate_connector_credentials(account_id bigint, credentials jsonb) returns snapbase.connector_accounts
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  a snapbase.connector_accounts := snapbase_private.require_account(account_id);
  new_summary text := snapbase_private.check_credentials(a.kind, credentials);
begin
  update snapbase_private.connector_credentials c
     set secret = public.pgp_sym_encrypt(credentials::text, snapbase_private.credentials_key())
   where c.account_id = a.id;
  update snapbase.connector_accounts ca set summary = new_summary, credentials_rotated_at = now(),
         last_tested_at = null, last_test_error = null
   where ca.id = a.id returning * into a;
  perform snapbase_private.audit('rotate_connector_credentials', 'connector_account', a.id::text, null, jsonb_build_object('summary', new_summary));
  return a;
end;
$$;
grant execute on function snapbase.rotate_connector_credentials(bigint, jsonb) to :ROLE_VIEWER;

create function snapbase.delete_connector_account(account_id bigint) returns snapbase.connector_accounts
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  a snapbase.connector_accounts := snapbase_private.require_account(account_id);
begin
  delete from snapbase.connector_accounts ca where ca.id = a.id;
  perform snapbase_private.audit('delete_connector_account', 'connector_account', a.id::text, null, jsonb_build_object('name', a.name));
  return a;
end;
$$;
grant execute on function snapbase.delete_connector_account(bigint) to :ROLE_VIEWER;

-- For the worker only (the owner): the decrypted credentials, given the key.
create function snapbase_private.account_credentials(account_id bigint, key text) returns jsonb
language sql stable
set search_path = pg_catalog
as $$
  select public.pgp_sym_decrypt(c.secret, key)::jsonb from snapbase_private.connector_credentials c
   where c.account_id = account_credentials.account_id
$$;

--------------------------------------------------------------------------------
-- Jobs
--------------------------------------------------------------------------------

create type snapbase.job_kind as enum ('test_connection', 'list_tables', 'download', 'publish');
create type snapbase.job_state as enum ('queued', 'running', 'awaiting_approval', 'succeeded', 'failed', 'cancelled');

create table snapbase.jobs (
  id bigint generated always as identity primary key,
  kind snapbase.job_kind not null,
  state snapbase.job_state not null default 'queued',
  connector_account_id bigint references snapbase.connector_accounts on delete cascade,
  workbook_id bigint references snapbase.workbooks on delete cascade,
  table_id bigint references snapbase.workbook_tables on delete cascade,
  options jsonb not null default '{}',
  created_by bigint references snapbase.users on delete set null,
  created_at timestamptz not null default now(),
  started_at timestamptz,
  finished_at timestamptz,
  updated_at timestamptz not null default now(),
  done bigint not null default 0,
  total bigint,
  current_table text,
  message text,
  error text,
  result jsonb,
  attempts integer not null default 0,
  cancel_requested boolean not null default false,
  change_request_id bigint references snapbase.change_requests on delete set null
);
comment on table snapbase.jobs is 'Background work that talks to a source: connection tests, table lists, downloads, publishes. Progress is done/total; cancel with cancel_job.';
create index jobs_workbook_id_idx on snapbase.jobs (workbook_id);
create index jobs_change_request_id_idx on snapbase.jobs (change_request_id) where change_request_id is not null;
-- Never two jobs at once on one table.
create unique index jobs_one_active_per_table on snapbase.jobs (table_id) where state in ('queued', 'running') and table_id is not null;
create trigger _100_timestamps before insert or update on snapbase.jobs
  for each row execute function snapbase_private.tg__timestamps();

alter table snapbase.jobs enable row level security;
create policy select_visible on snapbase.jobs for select using (
  (workbook_id is not null and snapbase_private.workbook_access(workbook_id) is not null)
  or (workbook_id is null and created_by = snapbase.current_user_id()));
grant select on snapbase.jobs to :ROLE_VIEWER, :ROLE_AGENT;

create function snapbase_private.notify_job(j snapbase.jobs) returns void
language sql
set search_path = pg_catalog
as $$
  select pg_notify('snapbase:jobs', json_build_object('id', j.id, 'kind', j.kind, 'state', j.state, 'done', j.done, 'total', j.total,
    'workbook_id', j.workbook_id, 'table_id', j.table_id)::text)
$$;

-- Inserts the job and queues its graphile-worker task (job_key: one task per job).
create function snapbase_private.enqueue_job(j snapbase.jobs) returns snapbase.jobs
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  created snapbase.jobs;
begin
  begin
    insert into snapbase.jobs (kind, connector_account_id, workbook_id, table_id, options, created_by, current_table)
      values (j.kind, j.connector_account_id, j.workbook_id, j.table_id, coalesce(j.options, '{}'), snapbase.current_user_id(), j.current_table)
      returning * into created;
  exception when unique_violation then
    raise exception 'workbook table % already has a job queued or running', j.table_id using errcode = '55P03';
  end;
  perform graphile_worker.add_job(
    case when j.kind in ('test_connection', 'list_tables') then 'inspect_account' else j.kind::text end,
    json_build_object('job_id', created.id), job_key => 'snapbase_job_' || created.id, max_attempts => 5);
  perform snapbase_private.notify_job(created);
  return created;
end;
$$;

-- For tasks: marks the job running and counts the attempt. Returns null when the
-- job is finished or cancelled, so a retried task stops at once.
create function snapbase_private.start_job(job_id bigint) returns snapbase.jobs
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
begin
  update snapbase.jobs set state = 'running', started_at = coalesce(started_at, now()), attempts = attempts + 1, error = null
   where id = job_id and state in ('queued', 'running') and not cancel_requested
  returning * into j;
  if j.id is null then
    update snapbase.jobs set state = 'cancelled', finished_at = now()
     where id = job_id and cancel_requested and state in ('queued', 'running');
    return null;
  end if;
  perform snapbase_private.notify_job(j);
  return j;
end;
$$;

-- Progress: done and total (null keeps them). Returns false once cancellation was requested.
create function snapbase_private.job_progress(job_id bigint, done bigint, total bigint, message text default null) returns boolean
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
begin
  update snapbase.jobs set done = coalesce(job_progress.done, jobs.done), total = coalesce(job_progress.total, jobs.total),
         message = coalesce(job_progress.message, jobs.message)
   where id = job_id returning * into j;
  perform snapbase_private.notify_job(j);
  return not j.cancel_requested;
end;
$$;

create function snapbase_private.finish_job(job_id bigint, final_state snapbase.job_state, result jsonb default null, error text default null)
returns snapbase.jobs
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
begin
  update snapbase.jobs set state = final_state, result = coalesce(finish_job.result, jobs.result), error = finish_job.error,
         finished_at = case when final_state in ('succeeded', 'failed', 'cancelled') then now() end
   where id = job_id returning * into j;
  if j.kind = 'test_connection' then
    update snapbase.connector_accounts set last_tested_at = now(), last_test_error = finish_job.error where id = j.connector_account_id;
  end if;
  perform snapbase_private.notify_job(j);
  perform snapbase_private.audit('job_' || final_state, 'job', j.id::text, j.current_table,
    jsonb_strip_nulls(jsonb_build_object('kind', j.kind, 'workbook_id', j.workbook_id, 'table_id', j.table_id, 'done', j.done, 'error', error)));
  return j;
end;
$$;

create function snapbase.cancel_job(job_id bigint) returns snapbase.jobs
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
begin
  select * into j from snapbase.jobs where id = job_id;
  if j.id is null or not ((j.workbook_id is not null and snapbase_private.workbook_access(j.workbook_id) in ('owner', 'editor'))
                          or (j.workbook_id is null and j.created_by = snapbase.current_user_id())) then
    raise exception 'no job %', job_id using errcode = 'P0002';
  end if;
  if j.state not in ('queued', 'running') then
    raise exception 'job % is %, not queued or running', job_id, j.state using errcode = '55000';
  end if;
  -- A queued job is cancelled now; a running one stops at its next batch.
  update snapbase.jobs set cancel_requested = true,
         state = case when state = 'queued' then 'cancelled'::snapbase.job_state else state end,
         finished_at = case when state = 'queued' then now() end
   where id = job_id returning * into j;
  perform snapbase_private.notify_job(j);
  perform snapbase_private.audit('cancel_job', 'job', j.id::text, j.current_table, jsonb_build_object('kind', j.kind));
  return j;
end;
$$;
grant execute on function snapbase.cancel_job(bigint) to :ROLE_VIEWER;

create function snapbase.test_connector_account(account_id bigint) returns snapbase.jobs
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  a snapbase.connector_accounts := snapbase_private.require_account(account_id);
  j snapbase.jobs;
begin
  j.kind := 'test_connection';
  j.connector_account_id := a.id;
  return snapbase_private.enqueue_job(j);
end;
$$;
comment on function snapbase.test_connector_account(bigint) is 'Test the account''s connection in the background: watch the returned job (state, error).';
grant execute on function snapbase.test_connector_account(bigint) to :ROLE_VIEWER;

create function snapbase.list_remote_tables(account_id bigint) returns snapbase.jobs
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  a snapbase.connector_accounts := snapbase_private.require_account(account_id);
  j snapbase.jobs;
begin
  j.kind := 'list_tables';
  j.connector_account_id := a.id;
  return snapbase_private.enqueue_job(j);
end;
$$;
comment on function snapbase.list_remote_tables(bigint) is 'List the source''s tables in the background: the job''s result is {"tables": [...]}.';
grant execute on function snapbase.list_remote_tables(bigint) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Download
--------------------------------------------------------------------------------

-- Adds a table from an account to a workbook: the download job reads its spec,
-- creates the workbook table, then fills it.
create function snapbase.add_remote_table(workbook_id bigint, account_id bigint, remote_table text) returns snapbase.jobs
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'edit');
  a snapbase.connector_accounts := snapbase_private.require_account(account_id);
  j snapbase.jobs;
begin
  if coalesce(trim(remote_table), '') = '' then
    raise exception 'remote_table is required' using errcode = '22023';
  end if;
  -- The worker reads managed tables as the owner: check here that the caller may.
  if a.kind = 'managed' then
    remote_table := (snapbase.resolve_managed_table(remote_table)).qualified_name;
    if not has_table_privilege(snapbase_private.caller_role(), remote_table::regclass, 'SELECT') then
      raise exception 'you may not read %', remote_table using errcode = '42501';
    end if;
  end if;
  j.kind := 'download';
  j.connector_account_id := a.id;
  j.workbook_id := wb.id;
  j.current_table := remote_table;
  j.options := jsonb_build_object('remote_table', remote_table);
  return snapbase_private.enqueue_job(j);
end;
$$;
comment on function snapbase.add_remote_table(bigint, bigint, text) is 'Queue the download of a source table into a new table of the workbook (see jobs).';
grant execute on function snapbase.add_remote_table(bigint, bigint, text) to :ROLE_VIEWER;

create function snapbase.create_workbook_from_remote(name text, account_id bigint, remote_tables text[]) returns snapbase.workbooks
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  wb snapbase.workbooks;
  t text;
begin
  if coalesce(cardinality(remote_tables), 0) = 0 then
    raise exception 'choose at least one remote table' using errcode = '22023';
  end if;
  perform snapbase_private.require_account(account_id);
  wb := snapbase.create_workbook(name);
  foreach t in array remote_tables loop
    perform snapbase.add_remote_table(wb.id, account_id, t);
  end loop;
  return wb;
end;
$$;
comment on function snapbase.create_workbook_from_remote(text, bigint, text[]) is 'Create a workbook and queue a download of each chosen remote table (see jobs).';
grant execute on function snapbase.create_workbook_from_remote(text, bigint, text[]) to :ROLE_VIEWER;

create function snapbase.refresh_workbook_table(table_id bigint) returns snapbase.jobs
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  j snapbase.jobs;
begin
  if t.connector_account_id is null then
    raise exception 'workbook table % was not downloaded from a connector account', t.id using errcode = '22023';
  end if;
  j.kind := 'download';
  j.connector_account_id := t.connector_account_id;
  j.workbook_id := t.workbook_id;
  j.table_id := t.id;
  j.current_table := t.remote_table;
  j.options := jsonb_build_object('remote_table', t.remote_table);
  return snapbase_private.enqueue_job(j);
end;
$$;
comment on function snapbase.refresh_workbook_table(bigint) is
  'Download the table again: local edits stay (the source''s new values become "last seen"), new records arrive, records deleted at the source go (or are flagged if edited here).';
grant execute on function snapbase.refresh_workbook_table(bigint) to :ROLE_VIEWER;

-- For the download task, once it has the source's table spec: the job's workbook
-- table (created on the first download; on a refresh, checked against the spec).
create function snapbase_private.prepare_download(job_id bigint, spec jsonb) returns snapbase.workbook_tables
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  wb snapbase.workbooks;
  misfits text;
begin
  select * into j from snapbase.jobs where id = job_id;
  if j.table_id is not null then
    select * into t from snapbase.workbook_tables where id = j.table_id;
    select string_agg(c ->> 'name', ', ') into misfits from jsonb_array_elements(t.columns) c
     where not coalesce((c ->> 'scratch')::boolean, false)
       and not exists (select 1 from jsonb_array_elements(spec -> 'columns') s
                        where s ->> 'name' = c ->> 'name' and to_regtype(s ->> 'type') = to_regtype(c ->> 'type'));
    if misfits is not null then
      raise exception 'the source table % no longer matches workbook table % (missing or retyped: %)', t.remote_table, t.id, misfits
        using errcode = '22023';
    end if;
    return t;
  end if;
  select * into wb from snapbase.workbooks where id = j.workbook_id;
  t := snapbase_private.create_workbook_table(wb, j.options ->> 'remote_table',
         (select jsonb_agg(jsonb_build_object('name', c ->> 'name', 'type', c ->> 'type', 'read_only', coalesce((c ->> 'readOnly')::boolean, false)))
            from jsonb_array_elements(spec -> 'columns') c),
         spec ->> 'remoteIdColumn', null,
         jsonb_build_object('kind', (select kind from snapbase.connector_accounts where id = j.connector_account_id), 'table', j.options ->> 'remote_table'));
  -- The remote id column identifies records at the source: it is never edited here.
  update snapbase.workbook_tables set connector_account_id = j.connector_account_id, remote_table = j.options ->> 'remote_table',
         columns = (select jsonb_agg(case when c ->> 'name' = spec ->> 'remoteIdColumn' then c || '{"read_only": true}' else c end order by ord)
                      from jsonb_array_elements(columns) with ordinality as e(c, ord))
   where id = t.id returning * into t;
  update snapbase.jobs set table_id = t.id where id = job_id;
  return t;
end;
$$;

-- Applies one batch of source records [{remote_id, values}] to the job's table.
-- New records are inserted; a known record takes the source's values except in
-- the fields edited here, which keep the local value. Either way the source's
-- values become __last_seen, and a field stays edited only while it differs from
-- them. Returns false when the job was cancelled.
create function snapbase_private.apply_download_batch(job_id bigint, records jsonb, done bigint) returns boolean
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
      select e ->> 'remote_id' as remote_id, n as typed, to_jsonb(n) - $3::text[] as seen
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
    (select string_agg(format('(i.typed).%I', c), ', ') from unnest(cols) c))
    using records, job_id, snapbase_private.scratch_columns(t) || snapbase_private.record_meta_columns();
  return snapbase_private.job_progress(job_id, done, null);
end;
$$;

-- After the last batch of a complete download: records the source no longer has
-- are removed when clean, or flagged __source_deleted when edited here.
create function snapbase_private.finish_download(job_id bigint) returns snapbase.jobs
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  removed bigint;
  flagged bigint;
begin
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  execute format('delete from %s where __remote_id is not null and __seen_job is distinct from $1 and not __dirty', snapbase_private.table_rel(t))
    using job_id;
  get diagnostics removed = row_count;
  execute format('update %s set __source_deleted = true, __updated_at = now()
                   where __remote_id is not null and __seen_job is distinct from $1 and not __source_deleted',
    snapbase_private.table_rel(t)) using job_id;
  get diagnostics flagged = row_count;
  perform snapbase_private.audit_workbook('download', t.workbook_id, 'workbook_table', t.id::text, snapbase_private.table_rel(t),
    jsonb_build_object('job_id', job_id, 'records', j.done, 'removed_deleted_at_source', removed, 'flagged_deleted_at_source', flagged));
  return snapbase_private.finish_job(job_id, 'succeeded',
    jsonb_build_object('records', j.done, 'removed_deleted_at_source', removed, 'flagged_deleted_at_source', flagged));
end;
$$;

-- A record deleted at the source but edited here: 'recreate' publishes it as a new
-- record next time; 'delete' removes it here.
create function snapbase.resolve_source_deleted(table_id bigint, record_id bigint, action text) returns text
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  rel text := snapbase_private.table_rel(t);
  hit bigint;
begin
  if action = 'recreate' then
    -- Re-created with all its values: every published field counts as given.
    execute format('update %s r set __source_deleted = false, __created = true, __remote_id = null, __last_seen = null, __publish = null,
                    __edited = (select jsonb_object_agg(k, now()) from jsonb_object_keys(to_jsonb(r) - $2::text[]) k),
                    __updated_at = now() where __id = $1 and __source_deleted returning __id', rel)
      into hit using record_id, snapbase_private.record_meta_columns() || snapbase_private.scratch_columns(t);
  elsif action = 'delete' then
    execute format('delete from %s where __id = $1 and __source_deleted returning __id', rel) into hit using record_id;
  else
    raise exception 'action must be recreate or delete (got %)', coalesce(action, 'null') using errcode = '22023';
  end if;
  if hit is null then
    raise exception 'no record % deleted at the source in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.audit_workbook('resolve_source_deleted', t.workbook_id, 'workbook_record', record_id::text, rel,
    jsonb_build_object('table_id', t.id, 'action', action));
  return action;
end;
$$;
comment on function snapbase.resolve_source_deleted(bigint, bigint, text) is 'For a record deleted at the source but edited here: recreate (publish it again) or delete.';
grant execute on function snapbase.resolve_source_deleted(bigint, bigint, text) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Publish
--------------------------------------------------------------------------------
-- Per table: creates, then updates, then deletes, in batches. next_to_publish hands
-- out a batch and marks it 'pushing'; the task writes it to the source and
-- record_publish_outcomes stores each record's outcome at once. A retried job
-- resumes with what is left (including records left 'pushing'); records the job
-- already settled are not handed out again. Only edited, non-scratch fields are sent.

create function snapbase.publish_workbook(workbook_id bigint, table_ids bigint[] default null, force boolean default false)
returns setof snapbase.jobs
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'edit');
  t snapbase.workbook_tables;
  j snapbase.jobs;
  queued integer := 0;
begin
  for t in select * from snapbase.workbook_tables wt
            where wt.workbook_id = wb.id and (table_ids is null or wt.id = any (table_ids)) order by wt.id loop
    if t.connector_account_id is null then
      if table_ids is not null then
        raise exception 'workbook table % has no connector account to publish to', t.id using errcode = '22023';
      end if;
      continue;
    end if;
    j := null;
    j.kind := 'publish';
    j.connector_account_id := t.connector_account_id;
    j.workbook_id := wb.id;
    j.table_id := t.id;
    j.current_table := t.remote_table;
    j.options := jsonb_build_object('remote_table', t.remote_table, 'force', coalesce(force, false));
    return next snapbase_private.enqueue_job(j);
    queued := queued + 1;
  end loop;
  if queued = 0 then
    raise exception 'nothing to publish: no table of workbook % came from a connector account', wb.id using errcode = '22023';
  end if;
end;
$$;
comment on function snapbase.publish_workbook(bigint, bigint[], boolean) is
  'Publish local changes of all (or the chosen) tables in the background, one job per table. force overwrites values changed at the source since download.';
grant execute on function snapbase.publish_workbook(bigint, bigint[], boolean) to :ROLE_VIEWER;

-- Which records a publish sends, by kind.
create function snapbase_private.publish_filter(what text) returns text
language sql immutable
as $$
  select case what
    when 'create' then 'r.__created and not r.__deleted'
    when 'update' then 'not r.__created and not r.__deleted and r.__edited <> ''{}'''
    when 'delete' then 'r.__deleted and not r.__created'
  end || ' and not r.__suggested_new and not r.__source_deleted'
$$;

-- Records left to publish in this job, for its progress total.
create function snapbase_private.publish_pending(job_id bigint) returns bigint
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables;
  n bigint;
begin
  select wt.* into t from snapbase.jobs j join snapbase.workbook_tables wt on wt.id = j.table_id where j.id = job_id;
  execute format('select count(*) from %s r where (%s) or (%s) or (%s)', snapbase_private.table_rel(t),
    snapbase_private.publish_filter('create'), snapbase_private.publish_filter('update'), snapbase_private.publish_filter('delete'))
    into n;
  return n;
end;
$$;

-- The next batch of one kind ('create' | 'update' | 'delete'), marked 'pushing':
-- [{id, remote_id, values, last_seen}] where values holds the fields to send: the
-- edited ones (for a new record, the fields it was given: the source fills in the
-- rest with its defaults).
create function snapbase_private.next_to_publish(job_id bigint, what text, batch_size integer) returns jsonb
language plpgsql
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables;
  batch jsonb;
begin
  select wt.* into t from snapbase.jobs j join snapbase.workbook_tables wt on wt.id = j.table_id where j.id = job_id;
  execute format($q$
    with chosen as (
      select r.__id from %1$s r
       where %2$s
         and (r.__publish is null or (r.__publish ->> 'job_id')::bigint is distinct from $1 or r.__publish ->> 'state' = 'pushing')
       order by r.__id limit $2
       for update
    ), marked as (
      update %1$s r set __publish = jsonb_build_object('state', 'pushing', 'job_id', $1, 'at', now())
        from chosen c where r.__id = c.__id
      returning r.__id, jsonb_build_object('id', r.__id, 'remote_id', r.__remote_id,
        'values', (select coalesce(jsonb_object_agg(k, to_jsonb(r) -> k), '{}') from jsonb_object_keys(r.__edited) k where k <> all ($4)),
        'last_seen', r.__last_seen) as item
    )
    select coalesce(jsonb_agg(item order by __id), '[]') from marked
    $q$, snapbase_private.table_rel(t), snapbase_private.publish_filter(what))
    into batch using job_id, batch_size, null, snapbase_private.scratch_columns(t);
  return batch;
end;
$$;

-- Stores outcomes [{id, ok, remote_id?, error?, state?, source_values?}] of records
-- just pushed. Published: a created record gets its remote id, its values become
-- __last_seen, the edit flags go, a deleted record is removed. Otherwise the record
-- keeps its changes and says why ('failed' or 'conflict'). Returns false when the
-- job was cancelled.
create function snapbase_private.record_publish_outcomes(job_id bigint, outcomes jsonb) returns boolean
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  rel text;
begin
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  rel := snapbase_private.table_rel(t);
  execute format('delete from %s r using jsonb_array_elements($1) o where r.__id = (o ->> ''id'')::bigint and (o ->> ''ok'')::boolean and r.__deleted', rel)
    using outcomes;
  execute format($q$
    update %1$s r set
      __remote_id = case when (o ->> 'ok')::boolean and r.__created then o ->> 'remote_id' else r.__remote_id end,
      __last_seen = case when (o ->> 'ok')::boolean then to_jsonb(r) - $3::text[] else r.__last_seen end,
      __edited = case when (o ->> 'ok')::boolean then '{}' else r.__edited end,
      __created = r.__created and not (o ->> 'ok')::boolean,
      __publish = jsonb_strip_nulls(jsonb_build_object(
        'state', case when (o ->> 'ok')::boolean then 'published' else coalesce(o ->> 'state', 'failed') end,
        'job_id', $2, 'at', now(), 'error', o ->> 'error', 'source_values', o -> 'source_values')),
      __updated_at = now()
      from jsonb_array_elements($1) o
     where r.__id = (o ->> 'id')::bigint
    $q$, rel) using outcomes, job_id, snapbase_private.record_meta_columns() || snapbase_private.scratch_columns(t);
  return snapbase_private.job_progress(job_id, j.done + jsonb_array_length(outcomes), null);
end;
$$;

-- The conflict check before updates. `current` maps remote ids to the source's
-- values now. A record conflicts when a field it would send has changed at the
-- source since it was last seen; unless the job forces, it is not sent and gets
-- outcome 'conflict' with the source's values. A record the source no longer has
-- fails and is flagged deleted at the source. Returns the ids that may be sent.
create function snapbase_private.check_publish_conflicts(job_id bigint, batch jsonb, current jsonb) returns bigint[]
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  rel text;
  rec jsonb;
  now_values jsonb;
  changed text[];
  sendable bigint[] := '{}';
  refused jsonb := '[]';
begin
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  rel := snapbase_private.table_rel(t);
  for rec in select * from jsonb_array_elements(batch) loop
    if not current ? (rec ->> 'remote_id') then
      execute format('update %s set __source_deleted = true where __id = $1', rel) using (rec ->> 'id')::bigint;
      refused := refused || jsonb_build_object('id', rec -> 'id', 'ok', false,
        'error', format('record %s no longer exists at the source', rec ->> 'remote_id'));
      continue;
    end if;
    now_values := snapbase_private.normalized_values(rel, current -> (rec ->> 'remote_id'));
    select array_agg(k order by k) into changed from jsonb_object_keys(rec -> 'values') k
     where (now_values -> k) is distinct from (rec -> 'last_seen' -> k);
    if changed is not null and not coalesce((j.options ->> 'force')::boolean, false) then
      refused := refused || jsonb_build_object('id', rec -> 'id', 'ok', false, 'state', 'conflict',
        'error', format('changed at the source since download: %s', array_to_string(changed, ', ')),
        'source_values', (select jsonb_object_agg(k, now_values -> k) from unnest(changed) k));
    else
      sendable := sendable || (rec ->> 'id')::bigint;
    end if;
  end loop;
  if jsonb_array_length(refused) > 0 then
    perform snapbase_private.record_publish_outcomes(job_id, refused);
  end if;
  return sendable;
end;
$$;

-- Publishing into a managed table of this database: all pending changes become one
-- change request (structured edits, submitted as the job's creator), so approval,
-- snapshot and audit apply. The job waits as 'awaiting_approval'; the trigger below
-- settles it when an admin decides.
create function snapbase_private.publish_managed(job_id bigint) returns snapbase.jobs
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  rel text;
  hidden text[];
  missing_key jsonb;
  creates jsonb;
  updates jsonb;
  deletes jsonb;
  cr snapbase.change_requests;
begin
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  rel := snapbase_private.table_rel(t);
  hidden := snapbase_private.record_meta_columns() || snapbase_private.scratch_columns(t);
  -- Submitted as the job's creator, who must be allowed to submit changes.
  if coalesce((select role::text from snapbase.users where id = j.created_by), 'viewer') = 'viewer' then
    return snapbase_private.finish_job(job_id, 'failed', null, 'publishing to a managed table needs the editor or admin role');
  end if;
  perform set_config('jwt.claims.user_id', coalesce(j.created_by::text, ''), true);
  perform set_config('jwt.claims.email', coalesce((select email from snapbase.users where id = j.created_by), ''), true);
  -- A new record must carry its primary key: that is how the source will know it.
  execute format($q$
    select coalesce(jsonb_agg(jsonb_build_object('id', r.__id, 'ok', false,
             'error', format('the primary key %%s is required to create a record in a managed table', $1))), '[]')
      from %s r where %s and to_jsonb(r) -> $1 = 'null'$q$, rel, snapbase_private.publish_filter('create'))
    into missing_key using t.remote_id_column;
  if jsonb_array_length(missing_key) > 0 then
    perform snapbase_private.record_publish_outcomes(job_id, missing_key);
  end if;
  execute format($q$
    select coalesce(jsonb_agg((select jsonb_object_agg(k, to_jsonb(r) -> k) from jsonb_object_keys(r.__edited) k where k <> all ($3)) order by r.__id)
                    filter (where %2$s and to_jsonb(r) -> $1 <> 'null'), '[]'),
           coalesce(jsonb_agg(jsonb_build_object('key', jsonb_build_object($1, r.__last_seen -> $1),
                      'set', (select jsonb_object_agg(k, to_jsonb(r) -> k) from jsonb_object_keys(r.__edited) k where k <> all ($3))) order by r.__id)
                    filter (where %3$s), '[]'),
           coalesce(jsonb_agg(jsonb_build_object($1, r.__last_seen -> $1) order by r.__id) filter (where %4$s), '[]')
      from %1$s r$q$, rel, snapbase_private.publish_filter('create'), snapbase_private.publish_filter('update'), snapbase_private.publish_filter('delete'))
    into creates, updates, deletes
    using t.remote_id_column, hidden, snapbase_private.scratch_columns(t);
  if jsonb_array_length(creates) + jsonb_array_length(updates) + jsonb_array_length(deletes) = 0 then
    return snapbase_private.finish_job(job_id, 'succeeded', jsonb_build_object('records', 0));
  end if;
  cr := snapbase.submit_edits((t.remote_table)::regclass,
          jsonb_build_object('insert', creates, 'update', updates, 'delete', deletes),
          format('Published from workbook %s, table %s (job %s)', t.workbook_id, t.name, job_id));
  execute format($q$update %s r set __publish = jsonb_build_object('state', 'awaiting_approval', 'job_id', $1, 'at', now(), 'change_request_id', $2)
                    where ((%s) and to_jsonb(r) -> $3 <> 'null') or (%s) or (%s)$q$,
    rel, snapbase_private.publish_filter('create'), snapbase_private.publish_filter('update'), snapbase_private.publish_filter('delete'))
    using job_id, cr.id, t.remote_id_column;
  update snapbase.jobs set state = 'awaiting_approval', change_request_id = cr.id,
         total = done + jsonb_array_length(creates) + jsonb_array_length(updates) + jsonb_array_length(deletes),
         message = format('awaiting approval of change request %s', cr.id)
   where id = job_id returning * into j;
  perform snapbase_private.notify_job(j);
  return j;
end;
$$;

-- When an admin decides a change request a publish job waits for, the job and its
-- records follow: approved → published; rejected or failed → failed, with the
-- reason on each record.
create function snapbase_private.tg__job_follows_change() returns trigger
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  approved boolean := new.status = 'approved';
  why text := format('change request %s was %s%s', new.id, new.status, coalesce(': ' || coalesce(new.error_message, new.decision_reason), ''));
  outcomes jsonb;
begin
  if new.status = old.status or new.status = 'pending' then
    return null;
  end if;
  for j in select * from snapbase.jobs where change_request_id = new.id and state = 'awaiting_approval' loop
    select * into t from snapbase.workbook_tables where id = j.table_id;
    execute format($q$
      select coalesce(jsonb_agg(jsonb_build_object('id', r.__id, 'ok', $2, 'remote_id', to_jsonb(r) ->> $3, 'error', $4)), '[]')
        from %s r where r.__publish ->> 'state' = 'awaiting_approval' and (r.__publish ->> 'job_id')::bigint = $1$q$,
      snapbase_private.table_rel(t))
      into outcomes using j.id, approved, t.remote_id_column, case when not approved then why end;
    perform snapbase_private.record_publish_outcomes(j.id, outcomes);
    perform snapbase_private.finish_job(j.id, case when approved then 'succeeded'::snapbase.job_state else 'failed' end,
      jsonb_build_object('change_request_id', new.id, 'records', jsonb_array_length(outcomes)),
      case when not approved then why end);
  end loop;
  return null;
end;
$$;
create trigger _500_job_follows_change after update of status on snapbase.change_requests
  for each row execute function snapbase_private.tg__job_follows_change();
