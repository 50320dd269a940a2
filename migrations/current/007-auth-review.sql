-- Auth review fixes.

-- 1. A read-scoped API token could write. Its role is viewer, but workbook access
-- (owner, editor) and organization ownership came from ownership and membership
-- alone, and account-level functions (connector accounts, CSV files, workbooks and
-- organizations) checked nothing but the user. Now:
-- - workbook_access caps owner/editor at viewer for a token without the write scope,
--   so require_workbook, require_table and row-level security all see read access;
-- - require_write_scope() refuses a token without it; require_organization calls it for
--   owners' actions, and the two places every write passes through call it as a
--   backstop: snapbase_private.audit (every API function that changes something audits
--   it, in the same transaction) and snapbase_private.enqueue_job.

create or replace function snapbase_private.token_may_write() returns boolean
language sql stable
set search_path = pg_catalog
as $$
  select snapbase_private.current_token_id() is null
      or coalesce(string_to_array(nullif(current_setting('jwt.claims.scopes', true), ''), ',') && array['write', 'admin'], false)
$$;
comment on function snapbase_private.token_may_write() is
  'False when the caller acts through an API token without the write (or admin) scope; true for sessions, DBAs and the worker. Never NULL.';
grant execute on function snapbase_private.token_may_write() to :ROLE_VIEWER;
grant execute on function snapbase_private.token_may_write() to :ROLE_AGENT;

create or replace function snapbase_private.require_write_scope() returns void
language plpgsql stable
set search_path = pg_catalog
as $$
begin
  -- Agents write suggestions only, and workbook_access already limits them to that.
  if snapbase.current_app_role() is distinct from 'agent' and not snapbase_private.token_may_write() then
    raise exception 'this API token has read access only: it cannot change anything (use a token with the write scope)'
      using errcode = '42501';
  end if;
end;
$$;
comment on function snapbase_private.require_write_scope() is
  'Raises 42501 when the caller acts through an API token without the write scope (agents excepted: their own rules apply). Called by audit and enqueue_job, which every write passes through.';
grant execute on function snapbase_private.require_write_scope() to :ROLE_VIEWER;
grant execute on function snapbase_private.require_write_scope() to :ROLE_AGENT;

CREATE OR REPLACE FUNCTION snapbase_private.workbook_access(workbook_id bigint)
 RETURNS text
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  select case
    when snapbase.current_user_id() is null then
      case when snapbase.current_app_role() = 'admin' then 'owner' end
    -- Owners, members and agents alike: only while the user belongs to the workbook's organization.
    when not exists (select 1 from snapbase.organization_members om
                      where om.organization_id = w.organization_id and om.user_id = snapbase.current_user_id()) then null
    when snapbase.current_app_role() = 'agent' then
      case when nullif(current_setting('jwt.claims.workbook_id', true), '')::bigint = w.id
             and (w.owner_id = snapbase.current_user_id()
                  or exists (select 1 from snapbase.workbook_members m
                              where m.workbook_id = w.id and m.user_id = snapbase.current_user_id() and m.access = 'editor'))
           then 'agent' end
    else (select case when a.access is not null and not snapbase_private.token_may_write() then 'viewer' else a.access end
            from (select case when w.owner_id = snapbase.current_user_id() then 'owner'
                              else (select m.access::text from snapbase.workbook_members m
                                     where m.workbook_id = w.id and m.user_id = snapbase.current_user_id()) end as access) a)
  end
  from snapbase.workbooks w where w.id = workbook_access.workbook_id
$function$;
comment on function snapbase_private.workbook_access(bigint) is 'The caller''s access to a workbook: owner, editor, viewer, agent, or NULL (none, or no such workbook). Only members of the workbook''s organization have any, its owner included. An API token without the write scope has viewer access at most. An agent token has access to its own workbook only while the user who made it may still edit it.';

CREATE OR REPLACE FUNCTION snapbase_private.require_organization(organization_id bigint, owner_action text)
 RETURNS snapbase.organizations
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  o snapbase.organizations;
  m snapbase.organization_members;
begin
  select * into o from snapbase.organizations org where org.id = organization_id;
  -- A DBA (the owner, no user) acts as every organization's owner.
  if snapbase.current_user_id() is null and snapbase.current_app_role() is not distinct from 'admin' then
    if o.id is null then
      raise exception 'no organization %', organization_id using errcode = 'P0002';
    end if;
    return o;
  end if;
  select * into m from snapbase.organization_members om where om.organization_id = o.id and om.user_id = snapbase.current_user_id();
  if o.id is null or m.user_id is null or snapbase.current_app_role() is not distinct from 'agent' then
    raise exception 'no organization %', organization_id using errcode = 'P0002';
  end if;
  if owner_action is not null then
    perform snapbase_private.require_write_scope();
  end if;
  if owner_action is not null and not m.is_owner then
    raise exception 'only an owner of organization % may %', organization_id, owner_action using errcode = '42501';
  end if;
  return o;
end;
$function$;
comment on function snapbase_private.require_organization(bigint,text) is 'The organization, when the caller is a member (and an owner, when owner_action says what for, through a token that may write); "no organization N" alike for a missing id and one the caller is not a member of.';

-- Every write is audited in its transaction: the backstop for read-scoped tokens.
-- Reads that are audited (a share link used, a change previewed) and the lockout
-- count stay allowed; so does signing out, which ends only the caller's own session.
CREATE OR REPLACE FUNCTION snapbase_private.audit(action text, subject_type text DEFAULT NULL::text, subject_id text DEFAULT NULL::text, table_name text DEFAULT NULL::text, details jsonb DEFAULT '{}'::jsonb)
 RETURNS bigint
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  select snapbase_private.require_write_scope()
   where action not in ('share_link_access', 'preview', 'sign_in_locked', 'sign_out');
  insert into snapbase.audit_log (action, actor, actor_user_id, actor_token_id, subject_type, subject_id, table_name, details)
  values (
    action,
    snapbase_private.actor_name(),
    snapbase.current_user_id(),
    snapbase_private.current_token_id(),
    subject_type, subject_id, table_name, coalesce(details, '{}')
  )
  returning id
$function$;

CREATE OR REPLACE FUNCTION snapbase_private.enqueue_job(j snapbase.jobs)
 RETURNS snapbase.jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  created snapbase.jobs;
begin
  perform snapbase_private.require_write_scope();
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
  return created;
end;
$function$;
comment on function snapbase_private.enqueue_job(snapbase.jobs) is 'Inserts the job and queues its graphile-worker task (job_key: one task per job); refuses an API token without the write scope.';

-- 3. visible_event(id) told an outsider which tenant an event belonged to: it called
-- visible_events for the event's topic, whose "no workbook 1" / "no connector account 1"
-- (or, for an agent, the role error of "changes") escaped, while a missing id gave NULL.
-- A topic the caller may not see now answers NULL, exactly as a missing id.
CREATE OR REPLACE FUNCTION snapbase.visible_event(event_id bigint)
 RETURNS jsonb
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  e snapbase_private.events;
  found jsonb;
begin
  select * into e from snapbase_private.events ev where ev.id = event_id;
  if e.id is null then
    return null;
  end if;
  begin
    select v into found from snapbase.visible_events(e.topic, e.id - 1, 1) v where (v ->> 'id')::bigint = e.id;
  exception when no_data_found or insufficient_privilege then
    -- The topic is not the caller's: the same answer as for an event that does not exist.
    return null;
  end;
  return found;
end;
$function$;
comment on function snapbase.visible_event(bigint) is 'One event, as visible_events would show it to you; NULL alike for a missing id, an event of a topic you may not see, and one you may not see within it.';

-- 4. A member removed from an organization kept owning the workbooks they had created
-- in it (workbook_access looked at owner_id alone), so they could still read and share
-- them and make agent tokens. workbook_access (above) now requires membership in the
-- workbook's organization; removing a member hands their workbooks there to the
-- remover (an owner), or, when they leave, to the organization's first owner, and
-- revokes their agent tokens for those workbooks, audited.
CREATE OR REPLACE FUNCTION snapbase.remove_organization_member(organization_id bigint, user_id bigint)
 RETURNS boolean
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  -- Anyone may leave; removing someone else is for owners.
  o snapbase.organizations := snapbase_private.require_organization(organization_id,
         case when user_id is distinct from snapbase.current_user_id() then 'remove members' end);
  m snapbase.organization_members;
  heir bigint;
  handed bigint[];
  revoked bigint[];
begin
  perform snapbase_private.require_write_scope();
  select * into m from snapbase.organization_members om where om.organization_id = o.id and om.user_id = remove_organization_member.user_id for update;
  if m.user_id is null then
    raise exception 'no member % in organization %', user_id, o.id using errcode = 'P0002';
  end if;
  if m.is_owner and not exists (select 1 from snapbase.organization_members om
                                 where om.organization_id = o.id and om.is_owner and om.user_id <> m.user_id) then
    raise exception 'organization % would have no owner left' , o.id using errcode = '55000';
  end if;
  -- Their shares of the organization's workbooks go with them (and so do their agents' rights).
  delete from snapbase.workbook_members wm using snapbase.workbooks w
   where w.id = wm.workbook_id and w.organization_id = o.id and wm.user_id = m.user_id;
  -- The workbooks they own there go to the owner removing them, or (leaving, or a DBA
  -- removing them) to the organization's longest-standing other owner.
  heir := case when snapbase.current_user_id() is distinct from m.user_id
                and exists (select 1 from snapbase.organization_members om
                             where om.organization_id = o.id and om.user_id = snapbase.current_user_id() and om.is_owner)
               then snapbase.current_user_id() end;
  if heir is null then
    select om.user_id into heir from snapbase.organization_members om
     where om.organization_id = o.id and om.is_owner and om.user_id <> m.user_id
     order by om.joined_at, om.user_id limit 1;
  end if;
  with moved as (
    update snapbase.workbooks w set owner_id = heir
     where w.organization_id = o.id and w.owner_id = m.user_id
    returning w.id)
  select coalesce(array_agg(id order by id), '{}') into handed from moved;
  -- Their agent tokens for the organization's workbooks end now.
  with ended as (
    update snapbase.api_tokens t set revoked_at = now()
      from snapbase.workbooks w
     where w.id = t.workbook_id and w.organization_id = o.id and t.user_id = m.user_id and t.revoked_at is null
    returning t.id)
  select coalesce(array_agg(id order by id), '{}') into revoked from ended;
  delete from snapbase.organization_members om where om.organization_id = o.id and om.user_id = m.user_id;
  perform snapbase_private.audit('remove_organization_member', 'organization', o.id::text, null,
    jsonb_build_object('user_id', m.user_id, 'workbooks', to_jsonb(handed), 'new_owner_id', case when cardinality(handed) > 0 then heir end,
                       'revoked_agent_tokens', to_jsonb(revoked)));
  return true;
end;
$function$;
comment on function snapbase.remove_organization_member(bigint,bigint) is 'Leave an organization (your own user id), or remove a member (owners); their shares of its workbooks end too, the workbooks they own there go to the owner removing them (or, when they leave, to the organization''s first owner), and their agent tokens for its workbooks are revoked. An organization keeps at least one owner.';

-- 6. Sign-in lockout could be raced: concurrent wrong passwords for one account all read
-- "not locked" before any counted its failure (20 at once got 8 password checks with a
-- limit of 5). attempt_login now serializes attempts per account and per address with
-- transaction-level advisory locks (released when its transaction ends) before the check.
CREATE OR REPLACE FUNCTION snapbase_private.attempt_login(email text, password text, client_address inet)
 RETURNS snapbase_private.login_result
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
  -- One attempt at a time per account and per client address, until this transaction
  -- ends: concurrent attempts would all pass the lock check below before any of them
  -- counted its failure, and check more passwords than the limit allows. Always the
  -- account first, then the address, so two attempts never wait for each other in turn.
  perform pg_advisory_xact_lock(hashtext('snapbase_login_account'), hashtext(account_key));
  if address_key is not null then
    perform pg_advisory_xact_lock(hashtext('snapbase_login_address'), hashtext(address_key));
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
$function$;
comment on function snapbase_private.attempt_login(text,text,inet) is 'For the server (as the authenticator): one attempt at a time per account and per client address (transaction advisory locks), checks the lockouts, then the password; counts a failure per account and per address; on success opens a session. Never raises for wrong credentials, so the count is committed even when the caller reports the failure as an error.';

-- 7. An app admin who was not a member of an organization read its workbooks' cell
-- values in the audit log (update_record, create_record, suggestions, bulk edits and
-- imports record values). Entries about a workbook (details.workbook_id) are now shown
-- only to those with access to it; once the workbook is gone, to members of the
-- organization it belonged to (recorded in the entry from now on). A DBA sees all.
CREATE OR REPLACE FUNCTION snapbase_private.audit_workbook(action text, workbook_id bigint, subject_type text, subject_id text, table_name text, details jsonb DEFAULT '{}'::jsonb)
 RETURNS void
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
  -- Agents act under their creator's user id; the entry says so.
  select snapbase_private.audit(action, subject_type, subject_id, table_name,
    coalesce(details, '{}') || jsonb_build_object('workbook_id', workbook_id)
      || coalesce((select jsonb_build_object('organization_id', w.organization_id) from snapbase.workbooks w where w.id = audit_workbook.workbook_id), '{}')
      || case when snapbase.current_app_role() = 'agent' then '{"agent": true}'::jsonb else '{}' end)
$function$;

create or replace function snapbase_private.audit_entry_visible(details jsonb) returns boolean
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
  select case
    when not (details ? 'workbook_id') or snapbase.current_user_id() is null then true
    when exists (select 1 from snapbase.workbooks w where w.id = (details ->> 'workbook_id')::bigint)
      then snapbase_private.workbook_access((details ->> 'workbook_id')::bigint) is not null
    else coalesce(snapbase_private.is_member((details ->> 'organization_id')::bigint), false)
  end
$$;
comment on function snapbase_private.audit_entry_visible(jsonb) is
  'May the caller see an audit entry with these details: entries about a workbook (they can hold its cell values) only with access to it, or, once it is deleted, as a member of its organization; everything else, and everything for a DBA. Never NULL.';
grant execute on function snapbase_private.audit_entry_visible(jsonb) to :ROLE_VIEWER;

drop policy if exists select_admin on snapbase.audit_log;
create policy select_admin on snapbase.audit_log for select to public
  using (snapbase.current_app_role() = 'admin' and snapbase_private.audit_entry_visible(details));
