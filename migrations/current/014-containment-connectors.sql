--------------------------------------------------------------------------------
-- Containment, part 5: connectors reach allowed hosts only, never this database,
-- and no request can read the key that protects their credentials.
--------------------------------------------------------------------------------
-- Credentials are sealed with an OpenPGP public key (pgcrypto's pgp_pub_encrypt):
-- sealing needs no secret, so requests and psql store credentials without any key
-- in reach. The matching secret key is kept sealed under SNAPBASE_CREDENTIALS_KEY
-- (AES-256-GCM, by the server at its first start), and only the worker unseals it
-- to open credentials (src/connectors/credential-keys.ts). Credentials stored
-- before are re-sealed at the worker's start (it holds the old symmetric key).
--
-- Hosts: every host a connector names is checked when the account is created or
-- rotated, and each address it resolves to is checked again by the worker right
-- before it connects (DNS can change); the worker then connects to that checked
-- address. The rules are snapbase_private.connector_address_problem's. And a
-- PostgreSQL connector refuses any database holding this installation's marker.

drop function if exists snapbase_private.credentials_key() cascade;
drop function if exists snapbase_private.account_credentials(bigint, text) cascade;
drop function if exists snapbase_private.account_credentials(bigint, bytea) cascade;
drop function if exists snapbase_private.seal_credentials(jsonb) cascade;
drop function if exists snapbase_private.connector_address_problem(text, inet) cascade;
drop function if exists snapbase_private.connector_hosts_of(text, jsonb) cascade;
drop function if exists snapbase.set_connector_allowed_hosts(text[]) cascade;
drop function if exists snapbase.connector_allowed_hosts() cascade;

alter table snapbase_private.connector_credentials add column if not exists scheme text not null default 'symmetric'
  check (scheme in ('symmetric', 'public_key'));
comment on column snapbase_private.connector_credentials.scheme is
  'public_key: sealed with the credentials public key; symmetric: sealed before 2026-11 with SNAPBASE_CREDENTIALS_KEY, re-sealed by the worker at start.';

-- A marker PostgreSQL connectors look for: a source holding it is this database.
insert into snapbase_private.settings (key, value) values ('installation_id', gen_random_uuid()::text)
  on conflict (key) do nothing;
do $$ begin
  execute format('comment on schema snapbase_private is %L',
    format('Secrets, storage and internals. Never exposed. (Snapbase installation %s)', snapbase_private.setting('installation_id')));
end $$;

create function snapbase_private.seal_credentials(credentials jsonb) returns bytea
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  public_key text := snapbase_private.setting('credentials_public_key');
begin
  if public_key is null then
    raise exception 'connector credentials cannot be stored yet: start the server once with SNAPBASE_CREDENTIALS_KEY set (it creates the credentials key)'
      using errcode = '55000';
  end if;
  return public.pgp_pub_encrypt(credentials::text, decode(public_key, 'base64'));
end;
$$;
comment on function snapbase_private.seal_credentials(jsonb) is
  'Seals connector credentials with the public key; only the worker (holding the secret key) can open them.';

-- For the worker only (the owner): the credentials, opened with the secret key it unsealed.
create function snapbase_private.account_credentials(account_id bigint, secret_key bytea) returns jsonb
language sql stable
set search_path = pg_catalog
as $$
  select public.pgp_pub_decrypt(c.secret, secret_key)::jsonb from snapbase_private.connector_credentials c
   where c.account_id = account_credentials.account_id and c.scheme = 'public_key'
$$;

--------------------------------------------------------------------------------
-- Which hosts connectors may reach
--------------------------------------------------------------------------------
-- Rules (snapbase_private.settings): `connector_hosts` comes from the environment
-- (SNAPBASE_CONNECTOR_HOSTS), `connector_hosts_admin` from set_connector_allowed_hosts;
-- both are JSON arrays of entries: a host name (`db.example.com`, `*.example.com`),
-- an address or network (`10.1.2.3`, `10.0.0.0/8`, `fd00::/8`), `public` (every
-- address that is not loopback, private, link-local or unique-local) or `*`
-- (anything). With no entry at all: `public` in production, `*` otherwise.

create function snapbase_private.connector_address_problem(host text, address inet default null) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  entries jsonb := coalesce(snapbase_private.setting('connector_hosts')::jsonb, '[]')
                || coalesce(snapbase_private.setting('connector_hosts_admin')::jsonb, '[]');
  h text := lower(rtrim(btrim(coalesce(host, '')), '.'));
  ip inet := address;
  local_ boolean;
  entry text;
begin
  if h = '' then
    return 'the connector names no host';
  end if;
  if jsonb_array_length(entries) = 0 then
    entries := case when snapbase_private.setting('environment') = 'production' then '["public"]' else '["*"]' end;
  end if;
  if ip is null then
    begin
      ip := trim(both '[]' from h)::inet;
    exception when others then
      ip := null;
    end;
  end if;
  if left(h, 1) = '/' then
    -- A Unix socket is this machine.
    local_ := true;
  elsif ip is not null then
    local_ := ip << inet '127.0.0.0/8' or ip = inet '::1' or ip << inet '10.0.0.0/8' or ip << inet '172.16.0.0/12'
           or ip << inet '192.168.0.0/16' or ip << inet '169.254.0.0/16' or ip << inet '100.64.0.0/10' or ip << inet 'fc00::/7'
           or ip << inet 'fe80::/10' or ip = inet '0.0.0.0' or ip = inet '::' or ip << inet '::ffff:0.0.0.0/96';
  else
    local_ := h = 'localhost' or h like '%.localhost' or h like '%.local' or h like '%.internal' or position('.' in h) = 0;
  end if;
  for entry in select lower(btrim(e)) from jsonb_array_elements_text(entries) e loop
    if entry = '*' or entry = h or (entry like '*.%' and h like '%' || substr(entry, 2)) then
      return null;
    end if;
    if entry = 'public' and not local_ then
      return null;
    end if;
    if ip is not null and entry ~ '^[0-9a-f.:]+(/\d{1,3})?$' then
      begin
        if ip <<= entry::inet then
          return null;
        end if;
      exception when others then
        null;
      end;
    end if;
  end loop;
  return format('connectors may not reach %s%s: it is not on the allowed hosts list (SNAPBASE_CONNECTOR_HOSTS or snapbase.set_connector_allowed_hosts)',
    host, case when address is not null and address::text <> h then format(' (%s)', host(address)) else '' end);
end;
$$;
comment on function snapbase_private.connector_address_problem(text, inet) is
  'Why a connector may not reach this host (and the address it resolved to), or null. Used when an account is created and by the worker before each connection.';

-- The host a connector's credentials name.
create function snapbase_private.connector_hosts_of(kind text, credentials jsonb) returns text
language plpgsql immutable
set search_path = pg_catalog
as $$
declare
  url text := credentials ->> 'connection_string';
  m text[];
begin
  if kind = 'mysql' then
    return credentials ->> 'host';
  elsif kind = 'postgres' then
    -- postgres://user:password@host:port/db?host=... (a host parameter wins, as in libpq).
    m := regexp_match(url, '[?&]host=([^&]*)');
    if m is not null then
      return m[1];
    end if;
    -- The user part ends at the last @ before the path (a password may hold @).
    m := regexp_match(url, '^postgres(?:ql)?://(?:[^/?#]*@)?(\[[^\]]*\]|[^:/?#,@]*)');
    return nullif(coalesce(m[1], ''), '');
  end if;
  return null;
end;
$$;

-- Checks the credentials' shape for the kind and where they lead; returns the
-- summary shown instead of them (no password, wherever it was written).
create or replace function snapbase_private.check_credentials(kind text, credentials jsonb) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  url text := credentials ->> 'connection_string';
  f snapbase.csv_files;
  host text;
  problem text;
begin
  if jsonb_typeof(credentials) is distinct from 'object' then
    raise exception 'credentials must be a JSON object' using errcode = '22023';
  end if;
  if kind in ('postgres', 'mysql') then
    host := snapbase_private.connector_hosts_of(kind, credentials);
    if kind = 'postgres' and (url is null or url !~ '^postgres(ql)?://') then
      raise exception 'postgres credentials need a connection_string (postgres://user:password@host:5432/database)' using errcode = '22023';
    end if;
    if kind = 'postgres' and (url ~ '^postgres(ql)?://[^/?#]*,' or url ~ '[?&]host=[^&]*,') then
      raise exception 'a postgres connection string may name one host only' using errcode = '22023';
    end if;
    if kind = 'mysql' and (credentials ->> 'host' is null or credentials ->> 'user' is null or credentials ->> 'database' is null) then
      raise exception 'mysql credentials need host, user, database (and password, port)' using errcode = '22023';
    end if;
    problem := snapbase_private.connector_address_problem(host);
    if problem is not null then
      raise exception '%', problem using errcode = '42501';
    end if;
  end if;
  case kind
    when 'postgres' then
      return format('postgres://%s%s%s',
        coalesce(nullif(substring(url from '^postgres(?:ql)?://([^:/?#@]*)[^/?#]*@'), '') || '@', ''),
        host,
        coalesce(substring(url from '^postgres(?:ql)?://(?:[^/?#]*@)?(?:\[[^\]]*\]|[^:/?#@]*)((?::\d+)?/[^?#]*)'), ''));
    when 'mysql' then
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
      raise exception 'kind must be postgres, mysql, managed or csv (got %)', left(coalesce(kind, 'null'), 50) using errcode = '22023';
  end case;
end;
$$;

create or replace function snapbase.create_connector_account(kind text, name text, credentials jsonb default '{}') returns snapbase.connector_accounts
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
  insert into snapbase_private.connector_credentials (account_id, secret, scheme)
    values (a.id, snapbase_private.seal_credentials(credentials), 'public_key');
  perform snapbase_private.audit('create_connector_account', 'connector_account', a.id::text, null,
    jsonb_build_object('kind', kind, 'name', a.name, 'summary', summary));
  return a;
end;
$$;

create or replace function snapbase.rotate_connector_credentials(account_id bigint, credentials jsonb) returns snapbase.connector_accounts
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  a snapbase.connector_accounts := snapbase_private.require_account(account_id);
  new_summary text := snapbase_private.check_credentials(a.kind, credentials);
begin
  update snapbase_private.connector_credentials c
     set secret = snapbase_private.seal_credentials(credentials), scheme = 'public_key'
   where c.account_id = a.id;
  update snapbase.connector_accounts ca set summary = new_summary, credentials_rotated_at = now(),
         last_tested_at = null, last_test_error = null
   where ca.id = a.id returning * into a;
  perform snapbase_private.audit('rotate_connector_credentials', 'connector_account', a.id::text, null, jsonb_build_object('summary', new_summary));
  return a;
end;
$$;

create function snapbase.set_connector_allowed_hosts(hosts text[]) returns text[]
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  bad text;
begin
  perform snapbase_private.require_role('admin');
  select string_agg(quote_literal(h), ', ') into bad from unnest(coalesce(hosts, '{}')) h
   where lower(btrim(h)) !~ '^(\*|public|(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*|[0-9a-f.:]+(/\d{1,3})?)$';
  if bad is not null then
    raise exception 'not a host name, address, network, public or *: %', left(bad, 500) using errcode = '22023';
  end if;
  insert into snapbase_private.settings (key, value) values ('connector_hosts_admin', to_jsonb(coalesce(hosts, '{}'))::text)
    on conflict (key) do update set value = excluded.value;
  perform snapbase_private.audit('set_connector_allowed_hosts', 'settings', 'connector_hosts_admin', null, jsonb_build_object('hosts', hosts));
  return hosts;
end;
$$;
comment on function snapbase.set_connector_allowed_hosts(text[]) is
  'Admins: the hosts connectors may reach, besides SNAPBASE_CONNECTOR_HOSTS (names, *.domain, addresses, networks, public, *).';
grant execute on function snapbase.set_connector_allowed_hosts(text[]) to :ROLE_VIEWER;

create function snapbase.connector_allowed_hosts() returns jsonb
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
begin
  perform snapbase_private.require_role('admin');
  return jsonb_build_object(
    'environment', coalesce(snapbase_private.setting('connector_hosts')::jsonb, '[]'),
    'admin', coalesce(snapbase_private.setting('connector_hosts_admin')::jsonb, '[]'),
    'default', case when snapbase_private.setting('environment') = 'production' then 'public' else '*' end);
end;
$$;
comment on function snapbase.connector_allowed_hosts() is 'Admins: the connector host rules in force.';
grant execute on function snapbase.connector_allowed_hosts() to :ROLE_VIEWER;
