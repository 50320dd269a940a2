-- Tokens and sessions (issue 11) and the JWT secret out of the database (issue 10).
--
-- * The database never sees the JWT secret: the server signs and verifies JWTs.
--   `authenticate` and `create_stream_token` return the claims (snapbase.jwt_claims)
--   that the server signs.
-- * A JWT names a session (snapbase_private.sessions). Every request resolves the
--   session and the user's current role and status in one query
--   (snapbase_private.resolve_session), so demotion, sign-out, "revoke all my
--   sessions", disabling and deleting a user take effect at once.
-- * Sign-in is throttled per account and per client address, with the state here
--   (any number of servers share it). snapbase_private.attempt_login never raises
--   for a wrong password, so the failure it counts is committed.
-- Idempotent while in migrations/current/: everything is dropped first.

--------------------------------------------------------------------------------
-- Drop what this file creates, and what it replaces
--------------------------------------------------------------------------------

delete from snapbase_private.settings where key = 'jwt_secret';
drop function if exists snapbase_private.set_jwt_secret(text);
drop function if exists snapbase_private.token_for(snapbase.users);
drop function if exists snapbase_private.sign_jwt(jsonb);
drop function if exists snapbase.authenticate(text, text);
drop function if exists snapbase.create_stream_token();
drop function if exists snapbase_private.attempt_login(text, text, inet);
drop function if exists snapbase_private.count_login_failure(text, text, integer, interval, jsonb);
drop function if exists snapbase_private.resolve_session(bigint, bigint);
drop function if exists snapbase_private.current_session_id();
drop function if exists snapbase.sign_out();
drop function if exists snapbase.revoke_all_sessions(bigint);
drop function if exists snapbase.set_user_role(bigint, snapbase.user_role);
drop function if exists snapbase.set_user_disabled(bigint, boolean);
drop function if exists snapbase.clear_sign_in_lock(text);
drop type if exists snapbase_private.login_result;
drop type if exists snapbase.jwt_claims;
drop table if exists snapbase_private.login_throttle;
drop table if exists snapbase_private.sessions;

--------------------------------------------------------------------------------
-- Settings the SQL layer reads (not secrets; the server writes them at start)
--------------------------------------------------------------------------------

insert into snapbase_private.settings (key, value) values
  ('login_max_failures', '5'),
  ('login_max_failures_per_address', '20'),
  ('login_lockout', '15 minutes')
on conflict (key) do nothing;

--------------------------------------------------------------------------------
-- Users: a disabled user is refused everywhere
--------------------------------------------------------------------------------

alter table snapbase.users add column if not exists disabled_at timestamptz;
comment on column snapbase.users.disabled_at is 'When an admin disabled the user: they cannot sign in, and their sessions and API tokens are refused.';

--------------------------------------------------------------------------------
-- Sessions
--------------------------------------------------------------------------------

create table snapbase_private.sessions (
  id bigint generated always as identity primary key,
  user_id bigint not null references snapbase.users on delete cascade,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  revoked_at timestamptz,
  client_address inet
);
create index sessions_user_id_idx on snapbase_private.sessions (user_id);
comment on table snapbase_private.sessions is 'One row per sign-in. A JWT carries its id (sid); revoking the row ends the JWT and its stream tokens at once.';

-- What the server signs into a JWT (the database never holds the secret).
create type snapbase.jwt_claims as (
  session_id bigint,
  user_id bigint,
  email text,
  role text,
  kind text,
  issued_at timestamptz,
  expires_at timestamptz
);
comment on type snapbase.jwt_claims is E'@behavior -*\nThe claims of a session (kind session) or stream token (kind stream); the server signs them.';

create function snapbase_private.current_session_id() returns bigint
language sql stable
set search_path = pg_catalog
as $$
  select nullif(current_setting('jwt.claims.session_id', true), '')::bigint
$$;
grant execute on function snapbase_private.current_session_id() to :ROLE_VIEWER, :ROLE_AGENT;

-- For the server (as the authenticator), on every request with a JWT: the user's
-- current email and role, or no row when the session or the user is gone.
create function snapbase_private.resolve_session(session_id bigint, user_id bigint)
returns table (email text, role text)
language sql stable
security definer
set search_path = pg_catalog
as $$
  select u.email, u.role::text
    from snapbase_private.sessions s join snapbase.users u on u.id = s.user_id
   where s.id = resolve_session.session_id and s.user_id = resolve_session.user_id
     and s.revoked_at is null and s.expires_at > now() and u.disabled_at is null
$$;
grant execute on function snapbase_private.resolve_session(bigint, bigint) to :DATABASE_AUTHENTICATOR;

--------------------------------------------------------------------------------
-- Sign-in with throttling
--------------------------------------------------------------------------------

create table snapbase_private.login_throttle (
  scope text not null check (scope in ('account', 'address')),
  key text not null,
  failures integer not null default 0,
  window_started_at timestamptz not null default now(),
  locked_until timestamptz,
  primary key (scope, key)
);
create index login_throttle_window_idx on snapbase_private.login_throttle (window_started_at);
comment on table snapbase_private.login_throttle is 'Failed sign-ins per account (lower-case email) and per client address within the lockout window, and lockouts.';

create type snapbase_private.login_result as (
  outcome text,          -- ok | invalid | disabled | locked
  retry_after integer,   -- seconds, when locked
  claims snapbase.jwt_claims
);

-- Counts one failure; at the limit, locks the account or address and audits it.
create function snapbase_private.count_login_failure(lock_scope text, lock_key text, max_failures integer, lockout interval, details jsonb)
returns void
language plpgsql
set search_path = pg_catalog
as $$
declare
  counted integer;
begin
  insert into snapbase_private.login_throttle as t (scope, key, failures, window_started_at)
  values (lock_scope, lock_key, 1, now())
  on conflict (scope, key) do update
    set failures = case when t.window_started_at < now() - lockout then 1 else t.failures + 1 end,
        window_started_at = case when t.window_started_at < now() - lockout then now() else t.window_started_at end
  returning t.failures into counted;
  if counted >= max_failures then
    update snapbase_private.login_throttle t
       set locked_until = now() + lockout, failures = 0, window_started_at = now()
     where t.scope = lock_scope and t.key = lock_key;
    perform snapbase_private.audit('sign_in_locked', case lock_scope when 'account' then 'account' else 'address' end, lock_key, null,
      details || jsonb_build_object('scope', lock_scope, 'failures', counted, 'locked_until', now() + lockout));
  end if;
end;
$$;

-- For the server (as the authenticator): checks the lockouts, then the password;
-- counts a failure per account and per address (when given); on success opens a
-- session. Never raises for wrong credentials, so the count is committed even
-- when the caller reports the failure as an error.
create function snapbase_private.attempt_login(email text, password text, client_address inet)
returns snapbase_private.login_result
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  account_key constant text := lower(btrim(coalesce(email, '')));
  address_key constant text := host(client_address);
  lockout constant interval := coalesce(snapbase_private.setting('login_lockout')::interval, interval '15 minutes');
  locked timestamptz;
  found snapbase.users;
  stored_hash text;
  opened snapbase_private.sessions;
begin
  if account_key = '' or password is null or password = '' then
    raise exception 'send an email and a password' using errcode = '22023';
  end if;
  select max(t.locked_until) into locked
    from snapbase_private.login_throttle t
   where t.locked_until > now()
     and ((t.scope = 'account' and t.key = account_key) or (t.scope = 'address' and t.key = address_key));
  if locked is not null then
    return row('locked', greatest(1, ceil(extract(epoch from locked - now())))::integer, null)::snapbase_private.login_result;
  end if;

  select u.* into found from snapbase.users u where lower(u.email) = account_key;
  select s.password_hash into stored_hash from snapbase_private.user_secrets s where s.user_id = found.id;
  -- Hash even for unknown users so response time does not reveal which emails exist.
  if stored_hash is null then
    perform public.crypt(password, public.gen_salt('bf', 10));
  end if;
  if stored_hash is null or public.crypt(password, stored_hash) <> stored_hash then
    perform snapbase_private.count_login_failure('account', account_key,
      coalesce(snapbase_private.setting('login_max_failures')::integer, 5), lockout,
      jsonb_build_object('email', account_key, 'address', address_key));
    if address_key is not null then
      perform snapbase_private.count_login_failure('address', address_key,
        coalesce(snapbase_private.setting('login_max_failures_per_address')::integer, 20), lockout,
        jsonb_build_object('address', address_key, 'email', account_key));
    end if;
    -- Stale rows of other keys go a few at a time.
    delete from snapbase_private.login_throttle t
     where t.ctid = any (array(select t2.ctid from snapbase_private.login_throttle t2
                                where t2.window_started_at < now() - 2 * lockout
                                  and (t2.locked_until is null or t2.locked_until < now())
                                limit 20));
    return row('invalid', null, null)::snapbase_private.login_result;
  end if;
  if found.disabled_at is not null then
    return row('disabled', null, null)::snapbase_private.login_result;
  end if;

  delete from snapbase_private.login_throttle t where t.scope = 'account' and t.key = account_key;
  delete from snapbase_private.sessions s
   where s.user_id = found.id and greatest(s.expires_at, s.revoked_at) < now() - interval '1 day';
  insert into snapbase_private.sessions (user_id, expires_at, client_address)
  values (found.id, now() + coalesce(snapbase_private.setting('jwt_ttl'), '8 hours')::interval, client_address)
  returning * into opened;
  return row('ok', null,
    row(opened.id, found.id, found.email, found.role::text, 'session', opened.created_at, opened.expires_at)::snapbase.jwt_claims
  )::snapbase_private.login_result;
end;
$$;
grant execute on function snapbase_private.attempt_login(text, text, inet) to :DATABASE_AUTHENTICATOR;

-- For DBAs in psql: the same check (and lockouts), returning the new session's
-- claims. A failure raises, which rolls back its count: only the server's sign-in
-- (which calls attempt_login) counts failures. Not exposed through GraphQL, whose
-- `authenticate` mutation the server implements over attempt_login.
create function snapbase.authenticate(email text, password text) returns snapbase.jwt_claims
language plpgsql
set search_path = pg_catalog
as $$
declare
  r snapbase_private.login_result := snapbase_private.attempt_login(email, password, null);
begin
  case r.outcome
    when 'ok' then return r.claims;
    when 'disabled' then raise exception 'this account is disabled' using errcode = '28000';
    when 'locked' then raise exception 'too many failed sign-ins; try again in % seconds', r.retry_after using errcode = '28000';
    else raise exception 'invalid email or password' using errcode = '28P01';
  end case;
end;
$$;
comment on function snapbase.authenticate(text, text) is E'@behavior -*\nCheck an email and password and open a session: returns the claims the server signs into a JWT (the database never holds the JWT secret).';

-- Claims for a five-minute stream token of the caller's session, for clients that
-- must put a token in a URL (EventSource). The server accepts it only on the event
-- streams; it ends with its session.
create function snapbase.create_stream_token() returns snapbase.jwt_claims
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  me snapbase.users := snapbase.current_user();
  s snapbase_private.sessions;
begin
  select * into s from snapbase_private.sessions ss
   where ss.id = snapbase_private.current_session_id() and ss.user_id = me.id
     and ss.revoked_at is null and ss.expires_at > now();
  if me.id is null or s.id is null or snapbase_private.current_token_id() is not null then
    raise exception 'sign in with a password to get a stream token (API tokens can be used as they are)' using errcode = '42501';
  end if;
  return row(s.id, me.id, me.email, me.role::text, 'stream', now(), least(s.expires_at, now() + interval '5 minutes'))::snapbase.jwt_claims;
end;
$$;
comment on function snapbase.create_stream_token() is E'@behavior -*\nClaims of a token valid for five minutes, for ?access_token= on event streams (the server signs them).';
grant execute on function snapbase.create_stream_token() to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Signing out, and revoking sessions
--------------------------------------------------------------------------------

create function snapbase.sign_out() returns boolean
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  ended bigint;
begin
  update snapbase_private.sessions s set revoked_at = now()
   where s.id = snapbase_private.current_session_id() and s.user_id = snapbase.current_user_id() and s.revoked_at is null
  returning s.id into ended;
  if ended is not null then
    perform snapbase_private.audit('sign_out', 'session', ended::text);
  end if;
  return ended is not null;
end;
$$;
comment on function snapbase.sign_out() is 'End the session of this JWT (and its stream tokens) now. False when the request carries no session (an API token: revoke it with revokeApiToken).';
grant execute on function snapbase.sign_out() to :ROLE_VIEWER;

create function snapbase.revoke_all_sessions(user_id bigint default null) returns integer
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  target bigint := coalesce(revoke_all_sessions.user_id, snapbase.current_user_id());
  ended integer;
begin
  if target is null then
    raise exception 'name the user whose sessions to revoke' using errcode = '22023';
  end if;
  if target is distinct from snapbase.current_user_id() then
    perform snapbase_private.require_role('admin');
    if not exists (select 1 from snapbase.users u where u.id = target) then
      raise exception 'no user %', target using errcode = 'P0002';
    end if;
  end if;
  update snapbase_private.sessions s set revoked_at = now()
   where s.user_id = target and s.revoked_at is null and s.expires_at > now();
  get diagnostics ended = row_count;
  perform snapbase_private.audit('revoke_all_sessions', 'user', target::text, null, jsonb_build_object('sessions', ended));
  return ended;
end;
$$;
comment on function snapbase.revoke_all_sessions(bigint) is 'End every session of a user now (default: yourself; admins: anyone), this one included. API tokens are not sessions: revoke them with revokeApiToken.';
grant execute on function snapbase.revoke_all_sessions(bigint) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Managing users: role and disabled, effective on the next request
--------------------------------------------------------------------------------

create function snapbase.set_user_role(user_id bigint, role snapbase.user_role) returns snapbase.users
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  before snapbase.users;
  after snapbase.users;
begin
  perform snapbase_private.require_role('admin');
  if role is null then
    raise exception 'role must be viewer, editor or admin' using errcode = '22023';
  end if;
  if set_user_role.user_id = snapbase.current_user_id() then
    raise exception 'you cannot change your own role' using errcode = '42501';
  end if;
  select * into before from snapbase.users u where u.id = set_user_role.user_id for update;
  if before.id is null then
    raise exception 'no user %', set_user_role.user_id using errcode = 'P0002';
  end if;
  update snapbase.users u set role = set_user_role.role where u.id = before.id returning * into after;
  perform snapbase_private.audit('set_user_role', 'user', after.id::text, null,
    jsonb_build_object('email', after.email, 'from', before.role, 'to', after.role));
  return after;
end;
$$;
comment on function snapbase.set_user_role(bigint, snapbase.user_role) is 'Change a user''s role (admins only); their sessions and API tokens act with it from the next request.';
grant execute on function snapbase.set_user_role(bigint, snapbase.user_role) to :ROLE_VIEWER;

create function snapbase.set_user_disabled(user_id bigint, disabled boolean) returns snapbase.users
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  changed snapbase.users;
begin
  perform snapbase_private.require_role('admin');
  if disabled is null then
    raise exception 'disabled must be true or false' using errcode = '22023';
  end if;
  if set_user_disabled.user_id = snapbase.current_user_id() then
    raise exception 'you cannot disable yourself' using errcode = '42501';
  end if;
  update snapbase.users u
     set disabled_at = case when set_user_disabled.disabled then coalesce(u.disabled_at, now()) end
   where u.id = set_user_disabled.user_id
  returning * into changed;
  if changed.id is null then
    raise exception 'no user %', set_user_disabled.user_id using errcode = 'P0002';
  end if;
  if set_user_disabled.disabled then
    -- Re-enabling must not revive old sessions.
    update snapbase_private.sessions s set revoked_at = now() where s.user_id = changed.id and s.revoked_at is null;
  end if;
  perform snapbase_private.audit(case when set_user_disabled.disabled then 'disable_user' else 'enable_user' end,
    'user', changed.id::text, null, jsonb_build_object('email', changed.email));
  return changed;
end;
$$;
comment on function snapbase.set_user_disabled(bigint, boolean) is 'Disable a user (admins only): sign-in, sessions and API tokens are refused from the next request. Enabling lets them sign in again.';
grant execute on function snapbase.set_user_disabled(bigint, boolean) to :ROLE_VIEWER;

-- Lifts the sign-in lockout of an account (by email) or of a client address.
create function snapbase.clear_sign_in_lock(account_or_address text) returns integer
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  cleared integer;
begin
  perform snapbase_private.require_role('admin');
  delete from snapbase_private.login_throttle t
   where (t.scope = 'account' and t.key = lower(btrim(account_or_address)))
      or (t.scope = 'address' and t.key = btrim(account_or_address));
  get diagnostics cleared = row_count;
  perform snapbase_private.audit('clear_sign_in_lock', 'sign_in_lock', account_or_address, null, jsonb_build_object('cleared', cleared));
  return cleared;
end;
$$;
comment on function snapbase.clear_sign_in_lock(text) is 'Lift the sign-in lockout of an account (its email) or a client address (admins only).';
grant execute on function snapbase.clear_sign_in_lock(text) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- API tokens of a disabled user are refused (otherwise as in 000001)
--------------------------------------------------------------------------------

create or replace function snapbase_private.resolve_api_token(secret text)
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
  if u.id is null or u.disabled_at is not null then
    return;
  end if;
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
