--! Previous: -
--! Hash: sha1:0f21ae7df0b68c0a0701bb7271f0f89ba8e8932f
--! Message: foundation: users, auth, API tokens, audit log

-- Foundation: schemas, users, authentication (JWT signed in SQL), API tokens,
-- the append-only audit log and the helpers every later feature uses.
--
-- Roles (created by `src/db/bootstrap.ts`, cluster-wide, names configurable):
--   :DATABASE_OWNER          owns every object here, runs migrations and workers
--   :DATABASE_AUTHENTICATOR  PostGraphile logs in as it, then SET ROLE per request
--   :ROLE_ANONYMOUS          no token
--   :ROLE_VIEWER < :ROLE_EDITOR < :ROLE_ADMIN   (each a member of the previous)
--   :ROLE_AGENT              API tokens with the `agent` scope
-- current.sql must stay idempotent, so it starts by dropping what it creates.

drop schema if exists snapbase cascade;
drop schema if exists snapbase_private cascade;

create extension if not exists pgcrypto with schema public;

-- Functions are not executable by PUBLIC unless granted explicitly.
alter default privileges for role :DATABASE_OWNER revoke execute on functions from public;

create schema snapbase;
comment on schema snapbase is 'The Snapbase API: exposed by PostGraphile and called directly by DBAs.';
create schema snapbase_private;
comment on schema snapbase_private is 'Secrets, storage and internals. Never exposed.';
revoke all on schema snapbase_private from public;
grant usage on schema snapbase to :ROLE_ANONYMOUS, :ROLE_VIEWER, :ROLE_AGENT;
-- Usage lets invoker functions call the few helpers granted below; nothing else
-- in snapbase_private is executable or readable by application roles.
grant usage on schema snapbase_private to :DATABASE_AUTHENTICATOR, :ROLE_ANONYMOUS, :ROLE_VIEWER, :ROLE_AGENT;

--------------------------------------------------------------------------------
-- Who is calling?
--------------------------------------------------------------------------------

-- The role the caller acts as. Inside SECURITY DEFINER functions current_user
-- is the owner, but the `role` setting still holds what the request SET ROLE'd
-- to; a DBA in psql has no `role` set, so it is their login.
create function snapbase_private.caller_role() returns name
language sql stable
set search_path = pg_catalog
as $$
  select coalesce(nullif(current_setting('role'), 'none'), session_user)::name
$$;
grant execute on function snapbase_private.caller_role() to :ROLE_ANONYMOUS, :ROLE_VIEWER, :ROLE_AGENT;

-- 'admin' | 'editor' | 'viewer' | 'agent' | 'anonymous' | null (no app role).
-- Superusers and the owner (granted :ROLE_ADMIN) count as admins.
create function snapbase.current_app_role() returns text
language sql stable
set search_path = pg_catalog
as $$
  select case
    when pg_has_role(snapbase_private.caller_role(), ':ROLE_ADMIN', 'member') then 'admin'
    when pg_has_role(snapbase_private.caller_role(), ':ROLE_EDITOR', 'member') then 'editor'
    when pg_has_role(snapbase_private.caller_role(), ':ROLE_VIEWER', 'member') then 'viewer'
    when pg_has_role(snapbase_private.caller_role(), ':ROLE_AGENT', 'member') then 'agent'
    when pg_has_role(snapbase_private.caller_role(), ':ROLE_ANONYMOUS', 'member') then 'anonymous'
  end
$$;
comment on function snapbase.current_app_role() is 'The application role of the caller: admin, editor, viewer, agent or anonymous.';
grant execute on function snapbase.current_app_role() to :ROLE_ANONYMOUS, :ROLE_VIEWER, :ROLE_AGENT;

-- Raises 42501 unless the caller holds at least `minimum` (viewer < editor < admin).
create function snapbase_private.require_role(minimum text) returns void
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  rank constant jsonb := '{"viewer": 1, "editor": 2, "admin": 3}';
  have text := snapbase.current_app_role();
begin
  if coalesce((rank ->> have)::int, 0) < (rank ->> minimum)::int then
    raise exception 'this action requires the % role (you are %)', minimum, coalesce(have, 'not a Snapbase role')
      using errcode = '42501';
  end if;
end;
$$;
grant execute on function snapbase_private.require_role(text) to :ROLE_ANONYMOUS, :ROLE_VIEWER, :ROLE_AGENT;

create function snapbase.current_user_id() returns bigint
language sql stable
set search_path = pg_catalog
as $$
  select nullif(current_setting('jwt.claims.user_id', true), '')::bigint
$$;
comment on function snapbase.current_user_id() is 'The signed-in Snapbase user, or null (anonymous, or a DBA in psql).';
grant execute on function snapbase.current_user_id() to :ROLE_ANONYMOUS, :ROLE_VIEWER, :ROLE_AGENT;

create function snapbase_private.current_token_id() returns bigint
language sql stable
set search_path = pg_catalog
as $$
  select nullif(current_setting('jwt.claims.token_id', true), '')::bigint
$$;
grant execute on function snapbase_private.current_token_id() to :ROLE_ANONYMOUS, :ROLE_VIEWER, :ROLE_AGENT;

--------------------------------------------------------------------------------
-- Settings (secrets and switches; owner only)
--------------------------------------------------------------------------------

create table snapbase_private.settings (
  key text primary key,
  value text not null
);
insert into snapbase_private.settings (key, value) values
  ('jwt_ttl', '8 hours');

create function snapbase_private.setting(key text) returns text
language sql stable
set search_path = pg_catalog
as $$
  select value from snapbase_private.settings s where s.key = setting.key
$$;

--------------------------------------------------------------------------------
-- Conventional triggers
--------------------------------------------------------------------------------

create function snapbase_private.tg__timestamps() returns trigger
language plpgsql
set search_path = pg_catalog
as $$
begin
  new.created_at := case when tg_op = 'INSERT' then now() else old.created_at end;
  new.updated_at := case when tg_op = 'UPDATE' and old.updated_at >= now() then old.updated_at + interval '1 millisecond' else now() end;
  return new;
end;
$$;

-- For append-only tables: no UPDATE, DELETE or TRUNCATE, whoever asks.
create function snapbase_private.tg__append_only() returns trigger
language plpgsql
set search_path = pg_catalog
as $$
begin
  raise exception '% is append-only: % is not allowed', tg_table_schema || '.' || tg_table_name, lower(tg_op)
    using errcode = '42501';
end;
$$;

--------------------------------------------------------------------------------
-- Users
--------------------------------------------------------------------------------

create type snapbase.user_role as enum ('viewer', 'editor', 'admin');

create table snapbase.users (
  id bigint generated always as identity primary key,
  email text not null check (email ~ '^[^@\s]+@[^@\s]+$' and length(email) <= 320),
  role snapbase.user_role not null default 'viewer',
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
create unique index users_email_key on snapbase.users (lower(email));
create trigger _100_timestamps before insert or update on snapbase.users
  for each row execute function snapbase_private.tg__timestamps();
comment on table snapbase.users is 'People who sign in to Snapbase. Passwords live in snapbase_private.';

alter table snapbase.users enable row level security;
create policy select_self_or_admin on snapbase.users for select
  using (id = snapbase.current_user_id() or snapbase.current_app_role() = 'admin');
grant select on snapbase.users to :ROLE_VIEWER, :ROLE_AGENT;

create table snapbase_private.user_secrets (
  user_id bigint primary key references snapbase.users on delete cascade,
  password_hash text not null
);

create function snapbase.current_user() returns snapbase.users
language sql stable
set search_path = pg_catalog
as $$
  select * from snapbase.users where id = snapbase.current_user_id()
$$;
comment on function snapbase.current_user() is 'The signed-in user.';
grant execute on function snapbase.current_user() to :ROLE_VIEWER, :ROLE_AGENT;

--------------------------------------------------------------------------------
-- Audit log: append-only, written only through snapbase_private.audit()
--------------------------------------------------------------------------------

create table snapbase.audit_log (
  id bigint generated always as identity primary key,
  occurred_at timestamptz not null default clock_timestamp(),
  action text not null,
  actor text not null,
  actor_user_id bigint references snapbase.users on delete set null,
  actor_token_id bigint,
  subject_type text,
  subject_id text,
  table_name text,
  details jsonb not null default '{}'
);
create index audit_log_subject_idx on snapbase.audit_log (subject_type, subject_id);
create index audit_log_occurred_at_idx on snapbase.audit_log (occurred_at desc);
create index audit_log_actor_user_id_idx on snapbase.audit_log (actor_user_id);
comment on table snapbase.audit_log is 'Who did what, when. Append-only: nobody, admins included, may update or delete an entry.';
comment on column snapbase.audit_log.actor is 'The user''s email, or the database user for a DBA working in psql.';

create trigger _100_append_only before update or delete on snapbase.audit_log
  for each row execute function snapbase_private.tg__append_only();
create trigger _100_append_only_truncate before truncate on snapbase.audit_log
  for each statement execute function snapbase_private.tg__append_only();

alter table snapbase.audit_log enable row level security;
create policy select_admin on snapbase.audit_log for select
  using (snapbase.current_app_role() = 'admin');
grant select on snapbase.audit_log to :ROLE_ADMIN;

create function snapbase_private.audit(
  action text,
  subject_type text default null,
  subject_id text default null,
  table_name text default null,
  details jsonb default '{}'
) returns bigint
language sql
security definer
set search_path = pg_catalog
as $$
  insert into snapbase.audit_log (action, actor, actor_user_id, actor_token_id, subject_type, subject_id, table_name, details)
  values (
    action,
    coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user),
    snapbase.current_user_id(),
    snapbase_private.current_token_id(),
    subject_type, subject_id, table_name, coalesce(details, '{}')
  )
  returning id
$$;

--------------------------------------------------------------------------------
-- Authentication: bcrypt passwords, HS256 JWTs signed in the database
--------------------------------------------------------------------------------

create function snapbase_private.base64url(data bytea) returns text
language sql immutable strict
set search_path = pg_catalog
as $$
  select translate(rtrim(replace(encode(data, 'base64'), E'\n', ''), '='), '+/', '-_')
$$;

create function snapbase_private.sign_jwt(claims jsonb) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  secret text := snapbase_private.setting('jwt_secret');
  signing_input text;
begin
  if secret is null then
    raise exception 'the JWT secret is not configured (the server sets it at start)' using errcode = '55000';
  end if;
  signing_input := snapbase_private.base64url(convert_to('{"alg":"HS256","typ":"JWT"}', 'UTF8'))
    || '.' || snapbase_private.base64url(convert_to(claims::text, 'UTF8'));
  return signing_input || '.' || snapbase_private.base64url(public.hmac(signing_input, secret, 'sha256'));
end;
$$;

-- Called by the server at start with the configured secret (owner only).
create function snapbase_private.set_jwt_secret(secret text) returns void
language sql
set search_path = pg_catalog
as $$
  insert into snapbase_private.settings (key, value) values ('jwt_secret', secret)
  on conflict (key) do update set value = excluded.value
$$;

create function snapbase.create_user(email text, password text, role snapbase.user_role default 'viewer')
returns snapbase.users
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  created snapbase.users;
begin
  perform snapbase_private.require_role('admin');
  if password is null or length(password) < 8 then
    raise exception 'password must be at least 8 characters' using errcode = '22023';
  end if;
  if email is null or email !~ '^[^@\s]+@[^@\s]+$' then
    raise exception 'email % is not a valid address', coalesce(quote_literal(email), 'null') using errcode = '22023';
  end if;
  if exists (select 1 from snapbase.users u where lower(u.email) = lower(create_user.email)) then
    raise exception 'a user with email % already exists', email using errcode = '23505';
  end if;
  insert into snapbase.users (email, role) values (email, coalesce(role, 'viewer')) returning * into created;
  insert into snapbase_private.user_secrets (user_id, password_hash)
    values (created.id, public.crypt(password, public.gen_salt('bf', 10)));
  perform snapbase_private.audit('create_user', 'user', created.id::text, null,
    jsonb_build_object('email', created.email, 'role', created.role));
  return created;
end;
$$;
comment on function snapbase.create_user(text, text, snapbase.user_role) is 'Create a user (admins only). Passwords are stored as bcrypt hashes.';
-- Granted widely so non-admins get a clear refusal from require_role().
grant execute on function snapbase.create_user(text, text, snapbase.user_role) to :ROLE_VIEWER, :ROLE_AGENT;

-- The JWT every authenticated request carries.
create function snapbase_private.token_for(u snapbase.users) returns text
language sql stable
set search_path = pg_catalog
as $$
  select snapbase_private.sign_jwt(jsonb_build_object(
    'aud', 'snapbase',
    'sub', u.id::text,
    'user_id', u.id,
    'email', u.email,
    'role', u.role,
    'iat', extract(epoch from now())::bigint,
    'exp', extract(epoch from now() + snapbase_private.setting('jwt_ttl')::interval)::bigint
  ))
$$;

create function snapbase.authenticate(email text, password text) returns text
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  found snapbase.users;
  stored_hash text;
begin
  select u.* into found from snapbase.users u where lower(u.email) = lower(authenticate.email);
  select s.password_hash into stored_hash from snapbase_private.user_secrets s where s.user_id = found.id;
  -- Hash even for unknown users so response time does not reveal which emails exist.
  if stored_hash is null then
    perform public.crypt(coalesce(password, ''), public.gen_salt('bf', 10));
  end if;
  if stored_hash is null or password is null or public.crypt(password, stored_hash) <> stored_hash then
    raise exception 'invalid email or password' using errcode = '28P01';
  end if;
  return snapbase_private.token_for(found);
end;
$$;
comment on function snapbase.authenticate(text, text) is 'Exchange an email and password for a signed JWT (HS256).';
grant execute on function snapbase.authenticate(text, text) to :ROLE_ANONYMOUS, :ROLE_VIEWER, :ROLE_AGENT;

--------------------------------------------------------------------------------
-- API tokens: long-lived, scoped, stored hashed, shown once, revocable
--------------------------------------------------------------------------------
-- Scopes: read (viewer rights), write (editor), admin (admin), agent (read a
-- workbook and write suggestions only). A token never exceeds its user's role.

create table snapbase.api_tokens (
  id bigint generated always as identity primary key,
  user_id bigint not null references snapbase.users on delete cascade,
  name text not null check (length(name) between 1 and 200),
  scopes text[] not null check (cardinality(scopes) > 0 and scopes <@ array['read', 'write', 'admin', 'agent']),
  workbook_id bigint,
  created_at timestamptz not null default now(),
  expires_at timestamptz,
  revoked_at timestamptz,
  last_used_at timestamptz
);
create index api_tokens_user_id_idx on snapbase.api_tokens (user_id);
comment on table snapbase.api_tokens is 'Long-lived API tokens. The secret is shown once at creation; only its hash is kept.';

alter table snapbase.api_tokens enable row level security;
create policy select_own_or_admin on snapbase.api_tokens for select
  using (user_id = snapbase.current_user_id() or snapbase.current_app_role() = 'admin');
grant select on snapbase.api_tokens to :ROLE_VIEWER;

create table snapbase_private.api_token_hashes (
  token_id bigint primary key references snapbase.api_tokens on delete cascade,
  token_hash bytea not null unique
);

create function snapbase.create_api_token(name text, scopes text[], expires_at timestamptz default null)
returns text
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  me snapbase.users := snapbase.current_user();
  secret text := 'sbt_' || snapbase_private.base64url(public.gen_random_bytes(32));
  new_id bigint;
begin
  if me.id is null then
    raise exception 'sign in as a Snapbase user to create API tokens' using errcode = '42501';
  end if;
  if snapbase_private.current_token_id() is not null then
    raise exception 'API tokens cannot create other API tokens; sign in with a password' using errcode = '42501';
  end if;
  if scopes is null or cardinality(scopes) = 0 or not scopes <@ array['read', 'write', 'admin', 'agent'] then
    raise exception 'scopes must be a non-empty subset of read, write, admin, agent (got %)', coalesce(scopes::text, 'null')
      using errcode = '22023';
  end if;
  if 'admin' = any(scopes) and me.role <> 'admin' then
    raise exception 'the admin scope needs an admin user' using errcode = '42501';
  end if;
  if 'write' = any(scopes) and me.role = 'viewer' then
    raise exception 'the write scope needs an editor or admin user' using errcode = '42501';
  end if;
  if 'agent' = any(scopes) then
    raise exception 'agent tokens are created per workbook with create_agent_token' using errcode = '22023';
  end if;
  if expires_at is not null and expires_at <= now() then
    raise exception 'expires_at must be in the future' using errcode = '22023';
  end if;
  insert into snapbase.api_tokens (user_id, name, scopes, expires_at)
    values (me.id, name, scopes, expires_at) returning id into new_id;
  insert into snapbase_private.api_token_hashes (token_id, token_hash)
    values (new_id, public.digest(secret, 'sha256'));
  perform snapbase_private.audit('create_api_token', 'api_token', new_id::text, null,
    jsonb_build_object('name', name, 'scopes', scopes));
  return secret;
end;
$$;
comment on function snapbase.create_api_token(text, text[], timestamptz) is 'Create a scoped API token for yourself. The returned secret is shown once.';
grant execute on function snapbase.create_api_token(text, text[], timestamptz) to :ROLE_VIEWER;

create function snapbase.revoke_api_token(token_id bigint) returns snapbase.api_tokens
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  revoked snapbase.api_tokens;
begin
  update snapbase.api_tokens t set revoked_at = coalesce(t.revoked_at, now())
   where t.id = token_id
     and (t.user_id = snapbase.current_user_id() or snapbase.current_app_role() = 'admin')
  returning * into revoked;
  if revoked.id is null then
    raise exception 'no API token % of yours', token_id using errcode = 'P0002';
  end if;
  perform snapbase_private.audit('revoke_api_token', 'api_token', token_id::text);
  return revoked;
end;
$$;
comment on function snapbase.revoke_api_token(bigint) is 'Revoke one of your API tokens (admins: anyone''s).';
grant execute on function snapbase.revoke_api_token(bigint) to :ROLE_VIEWER;

-- For the server (as the authenticator): who does this API token act for?
-- The role is the highest one both the scopes and the user's role allow.
create function snapbase_private.resolve_api_token(secret text)
returns table (token_id bigint, user_id bigint, email text, role text, scopes text[], workbook_id bigint)
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.api_tokens;
  u snapbase.users;
begin
  select tok.* into t
    from snapbase_private.api_token_hashes h join snapbase.api_tokens tok on tok.id = h.token_id
   where h.token_hash = public.digest(secret, 'sha256');
  if t.id is null or t.revoked_at is not null or (t.expires_at is not null and t.expires_at <= now()) then
    return;
  end if;
  select * into u from snapbase.users where id = t.user_id;
  update snapbase.api_tokens set last_used_at = now()
   where id = t.id and (last_used_at is null or last_used_at < now() - interval '1 minute');
  return query select t.id, u.id, u.email,
    case
      when 'agent' = any(t.scopes) then 'agent'
      when 'admin' = any(t.scopes) and u.role = 'admin' then 'admin'
      when 'write' = any(t.scopes) and u.role in ('editor', 'admin') then 'editor'
      else 'viewer'
    end,
    t.scopes, t.workbook_id;
end;
$$;
grant execute on function snapbase_private.resolve_api_token(text) to :DATABASE_AUTHENTICATOR;
