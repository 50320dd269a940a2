--------------------------------------------------------------------------------
-- Tidy-up: no dead code, one implementation per concept, reasons a reader sees.
--------------------------------------------------------------------------------
-- * The NOTIFY channels nothing listens to are gone (snapbase:changes,
--   snapbase:snapshots, snapbase:jobs): every event goes through the event log
--   (snapbase_private.emit, the _500_event triggers) and its per-topic channels.
-- * The actor of audit entries, events and suggestions is snapbase_private.actor_name().
-- * Suggestions (values, new records, deletions) are written by one helper; account
--   jobs (test, list tables) are queued by one helper.
-- * Private helpers carry their reasoning in COMMENT ON FUNCTION (a dump drops `--`).
-- * Every SECURITY DEFINER function searches pg_temp last.

drop trigger if exists _500_notify on snapbase.change_requests;
drop function if exists snapbase_private.tg__change_submitted() cascade;
drop function if exists snapbase_private.suggester() cascade;
drop function if exists snapbase_private.suggestion_entries(jsonb) cascade;
drop function if exists snapbase_private.enqueue_account_job(bigint, snapbase.job_kind) cascade;

-- Who a suggestion is by: the signed-in user (or database user), marked when an agent token made it.
create function snapbase_private.suggester() returns text
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select snapbase_private.actor_name() || case when snapbase.current_app_role() = 'agent' then ' (agent)' else '' end
$$;
comment on function snapbase_private.suggester() is
  'Who a suggestion is by: the signed-in user (or the database user in psql), with " (agent)" when an agent token made it.';

-- {column: value} as the __suggested entries {column: {value, by, at}}.
create function snapbase_private.suggestion_entries(vals jsonb) returns jsonb
language sql stable
set search_path = pg_catalog, pg_temp
as $$
  select coalesce(jsonb_object_agg(k, jsonb_build_object('value', v, 'by', snapbase_private.suggester(), 'at', now())), '{}')
    from jsonb_each(vals) e(k, v)
$$;
comment on function snapbase_private.suggestion_entries(jsonb) is
  'Suggested values {column: value} as the entries a record''s __suggested column keeps: {column: {value, by, at}}.';

create or replace function snapbase.suggest_values(table_id bigint, record_id bigint, "values" jsonb) returns jsonb
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  is_new boolean;
begin
  perform snapbase_private.refuse_hidden_columns(t, "values");
  execute format('select __created or __suggested_new from %s where __id = $1', snapbase_private.table_rel(t)) into is_new using record_id;
  if is_new is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.check_values(t, "values", is_new);
  execute format('update %s set __suggested = __suggested || $2, __updated_at = now() where __id = $1', snapbase_private.table_rel(t))
    using record_id, snapbase_private.suggestion_entries("values");
  perform snapbase_private.audit_workbook('suggest_values', t.workbook_id, 'workbook_record', record_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id, 'values', "values"));
  return snapbase_private.get_record(t, record_id, snapbase_private.hidden_from_caller(t));
end;
$$;

create or replace function snapbase.suggest_new_record(table_id bigint, "values" jsonb) returns jsonb
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  new_id bigint;
begin
  perform snapbase_private.refuse_hidden_columns(t, "values");
  perform snapbase_private.check_values(t, "values", true);
  execute format('insert into %s (__suggested_new, __suggested) values (true, $1) returning __id', snapbase_private.table_rel(t))
    into new_id using snapbase_private.suggestion_entries("values");
  perform snapbase_private.audit_workbook('suggest_new_record', t.workbook_id, 'workbook_record', new_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id, 'values', "values"));
  return snapbase_private.get_record(t, new_id, snapbase_private.hidden_from_caller(t));
end;
$$;

create or replace function snapbase.suggest_delete(table_id bigint, record_id bigint) returns jsonb
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  found_id bigint;
begin
  execute format($u$update %s set __suggest_delete = jsonb_build_object('by', $2::text, 'at', now()), __updated_at = now()
                     where __id = $1 and not __suggested_new returning __id$u$, snapbase_private.table_rel(t))
    into found_id using record_id, snapbase_private.suggester();
  if found_id is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.audit_workbook('suggest_delete', t.workbook_id, 'workbook_record', record_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id));
  return snapbase_private.get_record(t, record_id, snapbase_private.hidden_from_caller(t));
end;
$$;

-- Queues a job that only talks to an account's source (test the connection, list its tables).
create function snapbase_private.enqueue_account_job(account_id bigint, kind snapbase.job_kind) returns snapbase.jobs
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
  j snapbase.jobs;
begin
  j.kind := kind;
  j.connector_account_id := (snapbase_private.require_account(account_id)).id;
  return snapbase_private.enqueue_job(j);
end;
$$;
comment on function snapbase_private.enqueue_account_job(bigint, snapbase.job_kind) is
  'Queues an account-level job (test_connection, list_tables) for an account of the caller''s; "no connector account N" otherwise.';

create or replace function snapbase.test_connector_account(account_id bigint) returns snapbase.jobs
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
  select snapbase_private.enqueue_account_job(account_id, 'test_connection')
$$;

create or replace function snapbase.list_remote_tables(account_id bigint) returns snapbase.jobs
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
  select snapbase_private.enqueue_account_job(account_id, 'list_tables')
$$;

-- The latest definitions of these, less the old NOTIFY channels and with the actor through actor_name():

-- snapbase_private.enqueue_job(snapbase.jobs): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.enqueue_job(j snapbase.jobs)
 RETURNS snapbase.jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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
  return created;
end;
$function$;

-- snapbase_private.start_job(bigint): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.start_job(job_id bigint)
 RETURNS snapbase.jobs
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
AS $function$
declare
  j snapbase.jobs;
begin
  perform snapbase_private.assert_job_runner(job_id);
  update snapbase.jobs set state = 'running', started_at = coalesce(started_at, now()), attempts = attempts + 1, error = null,
         message = case when state = 'queued' and attempts > 0 then 'resumed' else message end
   where id = job_id and state in ('queued', 'running') and not cancel_requested
  returning * into j;
  if j.id is null then
    update snapbase.jobs set state = 'cancelled', finished_at = now()
     where id = job_id and cancel_requested and state in ('queued', 'running');
    return null;
  end if;
  return j;
end;
$function$;

-- snapbase_private.job_progress(bigint,bigint,bigint,text): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.job_progress(job_id bigint, done bigint, total bigint, message text DEFAULT NULL::text)
 RETURNS boolean
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
AS $function$
declare
  j snapbase.jobs;
begin
  perform snapbase_private.assert_job_runner(job_id);
  update snapbase.jobs set done = coalesce(job_progress.done, jobs.done), total = coalesce(job_progress.total, jobs.total),
         message = coalesce(job_progress.message, jobs.message)
   where id = job_id returning * into j;
  return not j.cancel_requested;
end;
$function$;

-- snapbase_private.finish_job(bigint,snapbase.job_state,jsonb,text): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.finish_job(job_id bigint, final_state snapbase.job_state, result jsonb DEFAULT NULL::jsonb, error text DEFAULT NULL::text)
 RETURNS snapbase.jobs
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
AS $function$
declare
  j snapbase.jobs;
  settled boolean := final_state::text in ('succeeded', 'partial', 'failed', 'cancelled');
begin
  perform snapbase_private.assert_job_runner(job_id);
  update snapbase.jobs set state = final_state, result = coalesce(finish_job.result, jobs.result), error = finish_job.error,
         total = case when final_state::text in ('succeeded', 'partial') and jobs.total is not null then jobs.done else jobs.total end,
         message = case when settled then null else jobs.message end,
         finished_at = case when settled then now() end
   where id = job_id returning * into j;
  if j.kind = 'test_connection' then
    update snapbase.connector_accounts set last_tested_at = now(), last_test_error = finish_job.error where id = j.connector_account_id;
  end if;
  perform snapbase_private.audit('job_' || final_state, 'job', j.id::text, j.current_table,
    jsonb_strip_nulls(jsonb_build_object('kind', j.kind, 'workbook_id', j.workbook_id, 'table_id', j.table_id, 'done', j.done, 'error', error)));
  return j;
end;
$function$;

-- snapbase.cancel_job(bigint): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase.cancel_job(job_id bigint)
 RETURNS snapbase.jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  j snapbase.jobs;
  g record;
  now_ boolean;
  access text;
begin
  select * into j from snapbase.jobs where id = job_id;
  -- Another tenant's job is "no job N", as a missing one: workbook_access is NULL
  -- for an outsider, so every test here is NULL-proof (a NULL condition skips an IF).
  if j.workbook_id is not null then
    access := snapbase_private.workbook_access(j.workbook_id);
  elsif snapbase.current_app_role() is distinct from 'agent'
        and ((j.created_by is not distinct from snapbase.current_user_id() and snapbase.current_user_id() is not null)
             or (snapbase.current_user_id() is null and snapbase.current_app_role() is not distinct from 'admin')) then
    access := 'owner';
  end if;
  if j.id is null or access is null or (j.table_id is not null and not exists (
       select 1 from snapbase.workbook_tables t where t.id = j.table_id and snapbase_private.table_visible(t.workbook_id, t.hidden))) then
    raise exception 'no job %', job_id using errcode = 'P0002';
  end if;
  if access not in ('owner', 'editor') then
    raise exception 'cancelling job % needs edit access to workbook % (you have % access)', job_id, j.workbook_id, access using errcode = '42501';
  end if;
  if j.state not in ('queued', 'running') then
    raise exception 'job % is %, not queued or running', job_id, j.state using errcode = '55000';
  end if;
  select gj.locked_by, gj.locked_at into g from graphile_worker.jobs gj where gj.key = 'snapbase_job_' || j.id;
  -- A worker whose connection is gone counts as dead here at once: at worst a worker
  -- that is only reconnecting loses a job it was asked to stop anyway.
  now_ := j.state = 'queued' or g.locked_by is null or not snapbase_private.pool_alive(g.locked_by, g.locked_at, lock_grace => '0 seconds');
  if now_ and g.locked_by is not null then
    -- Its worker is dead: take the job back from it first.
    perform graphile_worker.force_unlock_workers(array[g.locked_by]);
  end if;
  if now_ then
    perform graphile_worker.remove_job('snapbase_job_' || j.id);
  end if;
  update snapbase.jobs set cancel_requested = true,
         state = case when now_ then 'cancelled'::snapbase.job_state else state end,
         finished_at = case when now_ then now() end
   where id = job_id returning * into j;
  perform snapbase_private.audit('cancel_job', 'job', j.id::text, j.current_table, jsonb_build_object('kind', j.kind));
  return j;
end;
$function$;

-- snapbase_private.publish_managed(bigint): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.publish_managed(job_id bigint)
 RETURNS snapbase.jobs
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
AS $function$
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
  return j;
end;
$function$;

-- snapbase_private.recover_pools(text[],text): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.recover_pools(pool_ids text[], why text)
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
AS $function$
declare
  j snapbase.jobs;
  r record;
  recovered integer := 0;
begin
  if coalesce(cardinality(pool_ids), 0) = 0 then
    return 0;
  end if;
  -- Ours first, while graphile-worker's lock still says which pool ran them.
  for r in
    select sj.id, sj.cancel_requested, g.attempts, g.max_attempts from snapbase.jobs sj
      join graphile_worker.jobs g on g.key = 'snapbase_job_' || sj.id
     where g.locked_by = any (recover_pools.pool_ids) and sj.state in ('queued', 'running')
     order by sj.id
  loop
    recovered := recovered + 1;
    if r.cancel_requested then
      update snapbase.jobs set state = 'cancelled', finished_at = now(), message = why where id = r.id returning * into j;
    elsif r.attempts >= r.max_attempts then
      update snapbase.jobs set state = 'failed', finished_at = now(), error = format('%s, during its last attempt (%s of %s)', why, r.attempts, r.max_attempts)
       where id = r.id returning * into j;
    else
      update snapbase.jobs set state = 'queued', message = why || '; it will run again on another worker' where id = r.id returning * into j;
    end if;
    if j.state <> 'queued' then
      perform snapbase_private.audit('job_' || j.state, 'job', j.id::text, j.current_table,
        jsonb_strip_nulls(jsonb_build_object('kind', j.kind, 'workbook_id', j.workbook_id, 'table_id', j.table_id, 'done', j.done, 'error', j.error, 'reason', why)));
    end if;
  end loop;
  perform graphile_worker.force_unlock_workers(pool_ids);
  -- Jobs that must not run again leave graphile-worker's queue.
  perform graphile_worker.remove_job('snapbase_job_' || sj.id)
     from snapbase.jobs sj
    where sj.state in ('cancelled', 'failed')
      and exists (select 1 from graphile_worker.jobs g where g.key = 'snapbase_job_' || sj.id and g.locked_by is null);
  return recovered;
end;
$function$;

-- snapbase_private.recover_dead_workers(interval,interval): without the old snapbase:jobs NOTIFY (events come from _500_event)
CREATE OR REPLACE FUNCTION snapbase_private.recover_dead_workers(dead_after interval DEFAULT '00:00:45'::interval, lock_grace interval DEFAULT '00:00:12'::interval)
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
AS $function$
declare
  dead text[];
  recovered integer;
  j snapbase.jobs;
begin
  if not pg_try_advisory_xact_lock(snapbase_private.worker_lock_space(), 0) then
    return 0;
  end if;
  with gone as (
    delete from snapbase_private.workers w
     where not snapbase_private.worker_alive(w, dead_after, lock_grace)
    returning w.pool_ids
  )
  select coalesce(array_agg(distinct p), '{}') into dead from gone cross join unnest(gone.pool_ids) p;
  -- Locks of pools no live process runs (their process died before registering, or its row was removed).
  dead := dead || coalesce((select array_agg(distinct g.locked_by) from graphile_worker.jobs g
                             where g.locked_by is not null and g.locked_by <> all (dead)
                               and not snapbase_private.pool_alive(g.locked_by, g.locked_at, dead_after, lock_grace)), '{}');
  recovered := snapbase_private.recover_pools(dead, 'its worker stopped responding');
  -- A queued job without its graphile-worker job (a worker finished it after it was
  -- taken away) is queued again; a running one whose graphile-worker job gave up
  -- or vanished can never finish.
  for j in
    select sj.* from snapbase.jobs sj
     where sj.state in ('queued', 'running') and sj.updated_at < now() - dead_after
       and not exists (select 1 from graphile_worker.jobs g where g.key = 'snapbase_job_' || sj.id
                        and (g.locked_by is not null or g.attempts < g.max_attempts))
     for update skip locked
  loop
    recovered := recovered + 1;
    if j.state = 'queued' and not j.cancel_requested
       and not exists (select 1 from graphile_worker.jobs g where g.key = 'snapbase_job_' || j.id) then
      perform graphile_worker.add_job(case when j.kind in ('test_connection', 'list_tables') then 'inspect_account' else j.kind::text end,
        json_build_object('job_id', j.id), job_key => 'snapbase_job_' || j.id, max_attempts => 5);
      continue;
    end if;
    update snapbase.jobs set state = 'failed', finished_at = now(),
           error = coalesce((select 'gave up after ' || g.attempts || ' attempts: ' || g.last_error from graphile_worker.jobs g
                              where g.key = 'snapbase_job_' || j.id), 'its worker lost the job')
     where id = j.id returning * into j;
  end loop;
  return recovered;
end;
$function$;

-- snapbase_private.finish_change(bigint,snapbase.change_status,bigint,bigint,text,text,text): without the old snapbase:changes NOTIFY
CREATE OR REPLACE FUNCTION snapbase_private.finish_change(change_id bigint, outcome snapbase.change_status, affected bigint, snap_id bigint, err_code text, err_message text, note text)
 RETURNS snapbase.change_requests
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  cr snapbase.change_requests;
begin
  update snapbase.change_requests set
    status = outcome, rows_affected = affected, snapshot_id = snap_id, error_code = err_code, error_message = err_message,
    decided_by = snapbase.current_user_id(), decided_by_name = snapbase_private.actor_name(), decided_at = now(),
    decision_reason = note
  where id = change_id
  returning * into cr;
  perform snapbase_private.audit(
    case outcome when 'approved' then case cr.kind when 'restore' then 'restore' else 'approve' end
                 when 'failed' then 'fail' else 'reject' end,
    'change_request', cr.id::text, cr.table_name,
    jsonb_strip_nulls(jsonb_build_object('sql', cr.sql, 'status', outcome, 'rows_affected', affected, 'snapshot_id', snap_id,
      'error_code', err_code, 'error', err_message, 'reason', note, 'restore_snapshot_id', cr.restore_snapshot_id)));
  return cr;
end;
$function$;

-- snapbase_private.audit(text,text,text,text,jsonb): the actor through actor_name()
CREATE OR REPLACE FUNCTION snapbase_private.audit(action text, subject_type text DEFAULT NULL::text, subject_id text DEFAULT NULL::text, table_name text DEFAULT NULL::text, details jsonb DEFAULT '{}'::jsonb)
 RETURNS bigint
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
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

-- snapbase_private.emit(text,text,jsonb): the actor through actor_name()
CREATE OR REPLACE FUNCTION snapbase_private.emit(topic text, kind text, payload jsonb)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  event jsonb;
  event_id bigint;
begin
  payload := payload || jsonb_build_object('by', snapbase_private.actor_name())
             || case when snapbase.current_app_role() = 'agent' then '{"agent": true}'::jsonb else '{}' end;
  insert into snapbase_private.events (topic, kind, payload) values (topic, kind, payload) returning id into event_id;
  event := jsonb_build_object('id', event_id, 'topic', topic, 'kind', kind) || payload;
  perform pg_notify('snapbase_events:' || topic, event::text);
end;
$function$;


drop function if exists snapbase_private.notify_job(snapbase.jobs) cascade;

-- Private helpers' reasoning, where a reader of the schema (or \df+) sees it.
comment on function snapbase_private.account_credentials(bigint,bytea) is
  'For the worker only (the owner): the credentials, opened with the secret key it unsealed.';
comment on function snapbase_private.acting_role() is
  'The role whose rights bound what the caller submits: the request''s role; for a job acting for a user (no role set, claims set), that user''s role; in psql, the database user.';
comment on function snapbase_private.add_csv_version(bigint,text,bigint,bigint,bigint[],jsonb) is
  'For the csv connector (the worker, as the owner): stores its rewrite of the file as the next version, with the row numbers of its records and the inferred types it was written under. The connector holds a lock on the csv_files row while it reads the latest version and writes the next, so concurrent publishes to one file apply one after the other.';
comment on function snapbase_private.apply_create(snapbase.workbook_tables,jsonb) is
  'Creates one record (used by create_record and bulk edits). Checks neither access nor audits: its callers do.';
comment on function snapbase_private.apply_update(snapbase.workbook_tables,bigint,jsonb) is
  'Updates one record''s values, flagging as edited the fields that differ from the source (used by update_record and bulk edits). Checks neither access nor audits: its callers do.';
comment on function snapbase_private.apply_delete(snapbase.workbook_tables,bigint) is
  'Deletes one record: a record new here goes at once, one known at the source is flagged deleted until published (used by delete_record and bulk edits). Checks neither access nor audits.';
comment on function snapbase_private.apply_undelete(snapbase.workbook_tables,bigint) is
  'Takes back a delete flag (used by undelete_record and bulk edits). Checks neither access nor audits.';
comment on function snapbase_private.apply_operation(snapbase.workbook_tables,jsonb) is
  'One bulk operation {"op": create|update|delete|undelete, "id"?, "values"?}, applied through the single-record functions; returns the record id.';
comment on function snapbase_private.attempt_login(text,text,inet) is
  'For the server (as the authenticator): checks the lockouts, then the password; counts a failure per account and per address; on success opens a session. Never raises for wrong credentials, so the count is committed even when the caller reports the failure as an error.';
comment on function snapbase_private.binary_chunk_store(snapbase_private.row_layouts) is
  'The layout''s binary chunk table, created on first use, or null when the layout must stay in text form. Each table comes with a store function whose statements are static, so capture plans them once per session instead of once per chunk.';
comment on function snapbase_private.caller_role() is
  'The role the caller acts as. Inside SECURITY DEFINER functions current_user is the owner, but the role setting still holds what the request SET ROLE''d to; a DBA in psql has no role set, so it is their login.';
comment on function snapbase_private.can_read(snapbase.managed_tables) is
  'May the caller read this live table? Snapshots, change requests and diffs follow it.';
comment on function snapbase_private.check_column_spec(jsonb) is
  'Validates one column spec {name, type, read_only?, scratch?} and returns it with the canonical type (resolve_type).';
comment on function snapbase_private.check_publish_conflicts(bigint,jsonb,jsonb) is
  'The conflict check before updates: a record conflicts when a field it would send changed at the source since it was last seen; unless the job forces, it is not sent and gets outcome conflict with the source''s values. A record the source no longer has fails. Returns the ids that may be sent.';
comment on function snapbase_private.check_values(snapbase.workbook_tables,jsonb,boolean) is
  'Checks a {column: value} object against the table: known columns, writable ones (read-only columns only on records new to the source), values of the right type. The type error names the column.';
comment on function snapbase_private.chunk_mask(regclass) is
  'The modulus minus one for content-defined chunk boundaries (hash & mask = 0), smaller for wide rows so a chunk stays near 4 MB. A table never analyzed has no row estimate: it is counted.';
comment on function snapbase_private.column_names(snapbase.workbook_tables,boolean) is
  'Names of a workbook table''s columns in order; published leaves out scratch columns.';
comment on function snapbase_private.connector_hosts_of(text,jsonb) is
  'The host a connector''s credentials name (for postgres, the URL''s host or a host parameter, as libpq reads it).';
comment on function snapbase_private.count_login_failure(text,text,integer,interval,jsonb) is
  'Counts one failed sign-in; at the limit, locks the account or the client address and audits it.';
comment on function snapbase_private.csv_file_content(bigint,integer) is
  'A CSV file''s version as text. No access check: for the owner (the worker) and snapbase.csv_file_content.';
comment on function snapbase_private.csv_record_count(text) is
  'Records in a CSV text as the connector parses it (RFC 4180: line breaks inside quoted fields do not end a record; blank lines are skipped), without the header; for the versions listing.';
comment on function snapbase_private.csv_rows_fit(bigint,integer[],text[]) is
  'Whether every mapped cell of a staged import converts to its column''s type (one statement: a clean file needs no cell-by-cell check).';
comment on function snapbase_private.db_role(text) is
  'The database role of a Snapbase user role (viewer, editor, admin).';
comment on function snapbase_private.enqueue_job(snapbase.jobs) is
  'Inserts the job and queues its graphile-worker task (job_key: one task per job).';
comment on function snapbase_private.ensure_sort_index(snapbase.workbook_tables,text) is
  'Sorting by a column keeps an index on (column, __id) so pages come from the index.';
comment on function snapbase_private.filter_columns(snapbase.workbook_tables,text) is
  'The columns a checked filter uses, as [{name, type}], recorded so the filter applies only while they are unchanged.';
comment on function snapbase_private.filter_parameters(snapbase.workbook_tables,text[]) is
  'The names a filter may use on a workbook table: its data and scratch columns with their catalog types, in table order, less hide.';
comment on function snapbase_private.filter_problem(snapbase.workbook_tables,text) is
  'Why a filter may not be used on a workbook table (null: it may): parsed as one expression over the table''s columns by probe_user_text, never planned or run.';
comment on function snapbase_private.finish_download(bigint) is
  'After the last batch of a complete download: records the source no longer has are removed when clean, or flagged __source_deleted when edited here.';
comment on function snapbase_private.hidden_columns(snapbase.snapshots) is
  'Columns of a snapshot''s live table the caller may not read: left out of every row a reader returns.';
comment on function snapbase_private.import_mapping(snapbase.csv_imports,snapbase.workbook_tables,jsonb) is
  'The effective CSV import mapping as rows (csv index, header, table column, its canonical type, new scratch?), checked against the table.';
comment on function snapbase_private.is_member(bigint) is
  'Whether the signed-in user belongs to the organization (security definer, so the membership policy does not recurse into itself).';
comment on function snapbase_private.job_progress(bigint,bigint,bigint,text) is
  'A job''s progress: done and total (null keeps them) and a message. Returns false once cancellation was requested.';
comment on function snapbase_private.managed_table_for(regclass) is
  'The managed table behind a relation, for a submitter who may read it ("no managed table" alike for tables that are not managed and for those you may not read).';
comment on function snapbase_private.next_to_publish(bigint,text,integer) is
  'The next batch of one kind (create, update, delete), marked pushing: [{id, remote_id, values, last_seen}] with only the fields to send (for a new record, the fields it was given: the source fills in the rest).';
comment on function snapbase_private.normalized_values(text,jsonb) is
  'A record''s values typed by the table''s columns and rendered back as JSON, so values from any source compare exactly with what the table holds ("12.5" and 12.50 are the same numeric). Only the given keys are kept.';
comment on function snapbase_private.prepare_download(bigint,jsonb) is
  'For the download task, once it has the source''s table spec: the job''s workbook table (created on the first download; on a refresh, checked against the spec).';
comment on function snapbase_private.publish_filter(text) is
  'Which records a publish sends, by kind (create, update, delete): one of three fixed conditions.';
comment on function snapbase_private.publish_managed(bigint) is
  'Publishing into a managed table of this database: all pending changes become one change request (structured edits submitted as the job''s creator), so approval, snapshot and audit apply; the job waits as awaiting_approval.';
comment on function snapbase_private.publish_pending(bigint) is
  'Records left to publish in a job, for its progress total.';
comment on function snapbase_private.readable_snapshot(bigint) is
  'The snapshot, if the caller may read its live table; "no snapshot N" otherwise (and for tables with row-level security, unless the caller bypasses it).';
comment on function snapbase_private.record_publish_outcomes(bigint,jsonb,bigint) is
  'Stores the outcomes of records just pushed: published records take the source''s stored values and remote id, their edit flags go, a deleted record is removed; otherwise the record keeps its changes and says why (failed or conflict).';
comment on function snapbase_private.remove_unused_chunks() is
  'Deletes stored chunks no snapshot uses any more, text and binary; returns how many. Excludes a capture in progress (advisory lock).';
comment on function snapbase_private.require_role(text) is
  'Raises 42501 unless the caller holds at least the given role (viewer < editor < admin).';
comment on function snapbase_private.require_workbook(bigint,text) is
  'Raises unless the caller may do what is asked with the workbook (read, suggest, edit or manage); "no workbook N" when it may not see it at all.';
comment on function snapbase_private.resolve_api_token(text) is
  'For the server (as the authenticator): who an API token acts for. Its role is the highest both its scopes and its user''s current role allow; disabled users and revoked or expired tokens get no row.';
comment on function snapbase_private.resolve_session(bigint,bigint) is
  'For the server (as the authenticator), on every request with a JWT: the user''s current email and role, or no row when the session or the user is gone.';
comment on function snapbase_private.sandbox_role(text) is
  'The sandbox roles by purpose (their names are configurable, so they come from the migration''s placeholders).';
comment on function snapbase_private.snapshot_chunk_source(snapbase.snapshots) is
  'A snapshot''s chunks as a FROM item (snapshot_id, seq, first_row, chunk_hash, chunk_id, row_count, rows), rows an array of the snapshot''s layout type whichever form it is stored in; text chunks are parsed only for the chunks a query keeps.';
comment on function snapbase_private.snapshot_records(bigint) is
  'Row texts of a snapshot, for a restore (run under apply_restore''s fixed output settings).';
comment on function snapbase_private.start_job(bigint) is
  'For tasks: marks the job running and counts the attempt; null when the job is finished or cancelled, so a retried task stops at once.';
comment on function snapbase_private.submitter_roles(snapbase.change_requests) is
  'The roles whose reading rights a change may use: the one it was submitted as and, when its submitter is a user, that user''s current role (a demotion takes effect).';
comment on function snapbase_private.suggestion_scope(snapbase.workbook_tables,bigint,boolean) is
  'The WHERE clause choosing which records'' suggestions to act on; within the filter, the filter reader finds the matching ids first.';
comment on function snapbase_private.table_columns(regclass) is
  'A table''s current columns, in order, as [{name, type}].';
comment on function snapbase_private.tg__add_record_event_triggers() is
  'A workbook table''s physical table is created after its row: the record event triggers are added at commit, when both exist.';
comment on function snapbase_private.tg__append_only() is
  'For append-only tables: no UPDATE, DELETE or TRUNCATE, whoever asks.';
comment on function snapbase_private.tg__job_follows_change() is
  'When an admin decides a change request a publish job waits for, the job and its records follow: approved, published; rejected or failed, failed with the reason on each record.';
comment on function snapbase_private.tg__records_event() is
  'Record changes as one event per statement (a 10,000-row accept is one event), saying what happened from the rows before and after.';
comment on function snapbase_private.tg__snapshots_immutable() is
  'Immutability: snapshots change only inside the retention job''s prune function.';
comment on function snapbase_private.create_workbook_table(snapbase.workbooks,text,jsonb,text,text,jsonb) is
  'Creates a workbook table (its row and the physical table in the workbook''s schema) from a checked column spec; callers check access and audit.';
comment on function snapbase_private.record_meta_columns() is
  'The metadata columns every workbook table has after its data columns.';
comment on function snapbase_private.apply_download_batch(bigint,jsonb,bigint) is
  'Applies one batch of source records to the job''s table: new records are inserted; a known record takes the source''s values except in fields edited here; the source''s values become __last_seen. Returns false when the job was cancelled.';

-- Temporary objects come last in every SECURITY DEFINER function's search path (if
-- pg_temp is not named, PostgreSQL searches it first for relations and types); this
-- runs last so it covers functions defined above and in earlier files.
do $$
declare
  f regprocedure;
begin
  for f in select p.oid::regprocedure from pg_proc p
            where p.prosecdef and p.pronamespace in ('snapbase'::regnamespace, 'snapbase_private'::regnamespace, 'snapbase_sandbox'::regnamespace)
              and 'search_path=pg_catalog' = any (p.proconfig) loop
    execute format('alter function %s set search_path = pg_catalog, pg_temp', f);
  end loop;
end $$;
