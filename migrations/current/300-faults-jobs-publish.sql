-- Faults (issue 12): jobs whose worker died, exactly-once publishing, and outcomes
-- a client cannot misread.
--
-- * Dead workers. Each worker process registers in snapbase_private.workers and
--   holds a session advisory lock for as long as its connection lives; it beats
--   every few seconds. A process whose lock is gone (killed, connection lost) and
--   that has not beaten since lock_grace, or whose heartbeat is older than
--   dead_after (hung), is dead: recover_dead_workers, run by every
--   live worker, hands its graphile-worker jobs back with graphile-worker's own
--   force_unlock_workers, and puts their snapbase.jobs back to 'queued' (or ends
--   them, when cancelled or out of attempts). cancel_job ends a job at once when
--   no live worker runs it.
-- * Fencing. A task runs each statement with `snapbase.job_runner` set to its
--   graphile-worker pool id; job functions refuse (SQLSTATE SBJ01) a runner that
--   no longer holds the job's lock, so a worker declared dead cannot write after
--   another took its job over.
-- * Exactly-once publishing. Before a batch's source transaction commits, the task
--   records an intent (publish_batches: what the source is about to commit, and
--   how to recognise that transaction at the source). A publish first settles the
--   table's unsettled batches: committed at the source → their outcomes are
--   recorded; rolled back → sent again; unknown → each record is compared with the
--   source. A record is never sent twice.
-- * Outcomes. A job that settled every record but some failed or conflicted ends
--   'partial' (not 'succeeded'), with counts in result and a summary in error; done
--   and total agree when a job ends.

--------------------------------------------------------------------------------
-- Job states
--------------------------------------------------------------------------------

alter type snapbase.job_state add value if not exists 'partial' after 'succeeded';
comment on type snapbase.job_state is
  'queued → running → succeeded | partial | failed | cancelled; a publish into a managed table waits as awaiting_approval. partial: every record was settled, but some failed or conflicted (result has the counts).';

-- The jobs still to settle, which every worker's sweep reads every few seconds.
create index if not exists jobs_active_idx on snapbase.jobs (updated_at) where state in ('queued', 'running');

--------------------------------------------------------------------------------
-- Worker processes and their liveness
--------------------------------------------------------------------------------

create table if not exists snapbase_private.workers (
  -- With the constant of worker_lock_space(), the key of the advisory lock its process holds.
  id integer generated always as identity primary key,
  process text not null,
  -- graphile-worker pool ids of the process (jobs are locked by pool id).
  pool_ids text[] not null default '{}',
  started_at timestamptz not null default now(),
  heartbeat_at timestamptz not null default now()
);
comment on table snapbase_private.workers is
  'Live worker processes. A process holds advisory lock (worker_lock_space(), id) on its own connection while it lives and updates heartbeat_at every few seconds.';

create or replace function snapbase_private.worker_lock_space() returns integer
language sql immutable
as $$ select 1397637456 $$; -- "SNAP"

-- Whether the process of worker row `worker` still holds its lock, i.e. its connection is alive.
create or replace function snapbase_private.worker_lock_held(worker integer) returns boolean
language sql stable
set search_path = pg_catalog
as $$
  select exists (select 1 from pg_locks l
                  where l.locktype = 'advisory' and l.granted
                    and l.database = (select oid from pg_database where datname = current_database())
                    and l.classid = snapbase_private.worker_lock_space()::oid and l.objid = worker::oid and l.objsubid = 2)
$$;

-- For a worker process, on its own long-lived connection: registers and takes the lock.
create or replace function snapbase_private.register_worker(process text) returns integer
language plpgsql
set search_path = pg_catalog
as $$
declare
  worker integer;
begin
  insert into snapbase_private.workers (process) values (process) returning id into worker;
  perform pg_advisory_lock(snapbase_private.worker_lock_space(), worker);
  return worker;
end;
$$;

-- The heartbeat, on the same connection. Takes the lock again after a reconnect.
-- False when the row is gone (the process was declared dead): register again.
create or replace function snapbase_private.worker_heartbeat(worker integer, pool_ids text[]) returns boolean
language plpgsql
set search_path = pg_catalog
as $$
begin
  if not exists (select 1 from snapbase_private.workers w where w.id = worker) then
    return false;
  end if;
  if not exists (select 1 from pg_locks l
                  where l.locktype = 'advisory' and l.pid = pg_backend_pid() and l.granted
                    and l.classid = snapbase_private.worker_lock_space()::oid and l.objid = worker::oid and l.objsubid = 2)
     and not pg_try_advisory_lock(snapbase_private.worker_lock_space(), worker) then
    return false;
  end if;
  update snapbase_private.workers w set heartbeat_at = now(), pool_ids = coalesce(worker_heartbeat.pool_ids, w.pool_ids)
   where w.id = worker;
  return found;
end;
$$;

drop function if exists snapbase_private.pool_alive(text, timestamptz, interval);
drop function if exists snapbase_private.recover_dead_workers(interval);

-- Whether a worker process is alive: it beat within dead_after, and it holds its
-- lock or beat within lock_grace (a process whose connection blipped, e.g. in a
-- database restart, takes its lock again at its next beat).
create or replace function snapbase_private.worker_alive(w snapbase_private.workers, dead_after interval, lock_grace interval)
returns boolean
language sql stable
set search_path = pg_catalog
as $$
  select w.heartbeat_at > now() - dead_after
     and (w.heartbeat_at > now() - lock_grace or snapbase_private.worker_lock_held(w.id))
$$;

-- Whether a graphile-worker pool is run by a live process. A pool no process has
-- registered (yet) counts as alive while its lock is younger than dead_after.
create or replace function snapbase_private.pool_alive(pool_id text, locked_at timestamptz,
                                                       dead_after interval default '45 seconds', lock_grace interval default '12 seconds')
returns boolean
language sql stable
set search_path = pg_catalog
as $$
  select case
    when exists (select 1 from snapbase_private.workers w where pool_id = any (w.pool_ids)
                  and snapbase_private.worker_alive(w, dead_after, lock_grace)) then true
    when exists (select 1 from snapbase_private.workers w where pool_id = any (w.pool_ids)) then false
    else coalesce(locked_at > now() - dead_after, false)
  end
$$;

-- Hands the graphile-worker jobs of these pools back (graphile-worker's own
-- force_unlock_workers) and settles the snapbase.jobs they ran: cancelled when a
-- cancel was asked, failed when no attempt is left, else queued for another worker.
-- Returns how many snapbase.jobs were recovered.
create or replace function snapbase_private.recover_pools(pool_ids text[], why text) returns integer
language plpgsql
set search_path = pg_catalog
as $$
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
    perform snapbase_private.notify_job(j);
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
$$;

-- Run by every live worker every few seconds: finds dead processes (lock gone for
-- longer than lock_grace, or no heartbeat for dead_after) and locks held by pools
-- nobody runs, and recovers their jobs. One sweeper at a time; returns how many
-- jobs it recovered.
create or replace function snapbase_private.recover_dead_workers(dead_after interval default '45 seconds', lock_grace interval default '12 seconds')
returns integer
language plpgsql
set search_path = pg_catalog
as $$
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
    perform snapbase_private.notify_job(j);
  end loop;
  return recovered;
end;
$$;

-- A worker process shutting down hands its jobs back at once instead of waiting
-- to be found dead.
create or replace function snapbase_private.release_worker(worker integer) returns integer
language plpgsql
set search_path = pg_catalog
as $$
declare
  pools text[];
begin
  delete from snapbase_private.workers w where w.id = worker returning w.pool_ids into pools;
  perform pg_advisory_unlock(snapbase_private.worker_lock_space(), worker);
  return snapbase_private.recover_pools(pools, 'its worker shut down before it finished');
end;
$$;

--------------------------------------------------------------------------------
-- Running jobs: start, progress, finish, cancel
--------------------------------------------------------------------------------

-- Refuses a task whose graphile-worker pool no longer holds the job (it was
-- declared dead and the job recovered): its writes would race the new runner.
-- Statements outside a task (no snapbase.job_runner setting) are not checked.
create or replace function snapbase_private.assert_job_runner(job_id bigint) returns void
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  runner text := nullif(current_setting('snapbase.job_runner', true), '');
begin
  if runner is not null and not exists (select 1 from graphile_worker.jobs g
                                         where g.key = 'snapbase_job_' || job_id and g.locked_by = runner) then
    raise exception 'job % is no longer run by this worker (it was taken over after the worker stopped responding)', job_id
      using errcode = 'SBJ01';
  end if;
end;
$$;

-- For tasks: marks the job running and counts the attempt. Returns null when the
-- job is finished or cancelled, so a retried task stops at once.
create or replace function snapbase_private.start_job(job_id bigint) returns snapbase.jobs
language plpgsql
set search_path = pg_catalog
as $$
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
  perform snapbase_private.notify_job(j);
  return j;
end;
$$;

-- Progress: done and total (null keeps them). Returns false once cancellation was requested.
create or replace function snapbase_private.job_progress(job_id bigint, done bigint, total bigint, message text default null) returns boolean
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
begin
  perform snapbase_private.assert_job_runner(job_id);
  update snapbase.jobs set done = coalesce(job_progress.done, jobs.done), total = coalesce(job_progress.total, jobs.total),
         message = coalesce(job_progress.message, jobs.message)
   where id = job_id returning * into j;
  perform snapbase_private.notify_job(j);
  return not j.cancel_requested;
end;
$$;

-- Settles a job. A job that ends succeeded or partial has done = total.
create or replace function snapbase_private.finish_job(job_id bigint, final_state snapbase.job_state, result jsonb default null, error text default null)
returns snapbase.jobs
language plpgsql
set search_path = pg_catalog
as $$
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
  perform snapbase_private.notify_job(j);
  perform snapbase_private.audit('job_' || final_state, 'job', j.id::text, j.current_table,
    jsonb_strip_nulls(jsonb_build_object('kind', j.kind, 'workbook_id', j.workbook_id, 'table_id', j.table_id, 'done', j.done, 'error', error)));
  return j;
end;
$$;

-- Cancels a job. Queued: now. Running on a live worker: at its next batch. Running
-- with no live worker (waiting to retry, or its worker died): now, and its
-- graphile-worker job is removed.
create or replace function snapbase.cancel_job(job_id bigint) returns snapbase.jobs
language plpgsql
security definer
set search_path = pg_catalog
as $$
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
  perform snapbase_private.notify_job(j);
  perform snapbase_private.audit('cancel_job', 'job', j.id::text, j.current_table, jsonb_build_object('kind', j.kind));
  return j;
end;
$$;
grant execute on function snapbase.cancel_job(bigint) to :ROLE_VIEWER;
comment on function snapbase.cancel_job(bigint) is
  'Cancel a job: a queued one, or one no live worker is running (waiting to retry, or its worker died), is cancelled at once; a running one stops at its next batch.';

--------------------------------------------------------------------------------
-- Publishing exactly once
--------------------------------------------------------------------------------

create table if not exists snapbase_private.publish_batches (
  id bigint generated always as identity primary key,
  job_id bigint not null,
  table_id bigint not null references snapbase.workbook_tables on delete cascade,
  kind text not null check (kind in ('create', 'update', 'delete')),
  -- How to recognise the batch's transaction at the source (connector-specific, e.g. {"txid": "812"}).
  receipt jsonb not null,
  -- Per record, what the source is about to commit: [{id, ok, remote_id, error, values}].
  planned jsonb not null,
  created_at timestamptz not null default now(),
  settled_at timestamptz,
  -- committed | rolled_back | compared (found out record by record) | recorded (the task recorded its outcomes)
  verdict text
);
create index if not exists publish_batches_unsettled_idx on snapbase_private.publish_batches (table_id) where settled_at is null;
comment on table snapbase_private.publish_batches is
  'Publish intents: written before a batch''s source transaction commits, settled when its outcomes are recorded. An unsettled batch is what a crash cut off; the next publish of the table settles it first.';

-- For the publish task, just before the source commits a batch: the intent. Its
-- records go from 'pushing' to 'sending'.
create or replace function snapbase_private.record_publish_intent(job_id bigint, kind text, receipt jsonb, planned jsonb) returns bigint
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  batch_id bigint;
begin
  perform snapbase_private.assert_job_runner(job_id);
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  insert into snapbase_private.publish_batches (job_id, table_id, kind, receipt, planned)
    values (job_id, t.id, kind, receipt, planned) returning id into batch_id;
  execute format($q$update %s r set __publish = jsonb_build_object('state', 'sending', 'job_id', $1, 'batch_id', $2, 'at', now())
                    where r.__id in (select (p ->> 'id')::bigint from jsonb_array_elements($3) p)$q$, snapbase_private.table_rel(t))
    using job_id, batch_id, planned;
  return batch_id;
end;
$$;

-- The job's table's batches a crash left unsettled: [{id, kind, receipt, planned}].
create or replace function snapbase_private.unsettled_publish_batches(job_id bigint) returns jsonb
language sql stable
set search_path = pg_catalog
as $$
  select coalesce(jsonb_agg(jsonb_build_object('id', b.id, 'kind', b.kind, 'receipt', b.receipt, 'planned', b.planned) order by b.id), '[]')
    from snapbase.jobs j join snapbase_private.publish_batches b on b.table_id = j.table_id and b.settled_at is null
   where j.id = unsettled_publish_batches.job_id
$$;

drop function if exists snapbase_private.record_publish_outcomes(bigint, jsonb);
-- Stores outcomes [{id, ok, remote_id?, error?, state?, source_values?}] of records
-- just pushed (and settles their batch). Published: a created record gets its
-- remote id, its values become __last_seen, the edit flags go, a deleted record is
-- removed. Otherwise the record keeps its changes and says why ('failed' or
-- 'conflict'). Counts go to the job's result. Returns false when the job was cancelled.
create or replace function snapbase_private.record_publish_outcomes(job_id bigint, outcomes jsonb, batch_id bigint default null) returns boolean
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  rel text;
  published integer;
  conflicts integer;
begin
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  rel := snapbase_private.table_rel(t);
  execute format('delete from %s r using jsonb_array_elements($1) __sb_o where r.__id = (__sb_o ->> ''id'')::bigint and (__sb_o ->> ''ok'')::boolean and r.__deleted', rel)
    using outcomes;
  execute format($q$
    update %1$s r set
      __remote_id = case when (__sb_o ->> 'ok')::boolean and r.__created then __sb_o ->> 'remote_id' else r.__remote_id end,
      __last_seen = case when (__sb_o ->> 'ok')::boolean then to_jsonb(r.*) - $3::text[] else r.__last_seen end,
      __edited = case when (__sb_o ->> 'ok')::boolean then '{}' else r.__edited end,
      __created = r.__created and not (__sb_o ->> 'ok')::boolean,
      __publish = jsonb_strip_nulls(jsonb_build_object(
        'state', case when (__sb_o ->> 'ok')::boolean then 'published' else coalesce(__sb_o ->> 'state', 'failed') end,
        'job_id', $2, 'at', now(), 'error', __sb_o ->> 'error', 'source_values', __sb_o -> 'source_values')),
      __updated_at = now()
      from jsonb_array_elements($1) __sb_o
     where r.__id = (__sb_o ->> 'id')::bigint
    $q$, rel) using outcomes, job_id, snapbase_private.record_meta_columns() || snapbase_private.scratch_columns(t);
  if batch_id is not null then
    update snapbase_private.publish_batches b set settled_at = now(), verdict = coalesce(b.verdict, 'recorded')
     where b.id = batch_id and b.settled_at is null;
  end if;
  select count(*) filter (where (o ->> 'ok')::boolean), count(*) filter (where not (o ->> 'ok')::boolean and o ->> 'state' = 'conflict')
    into published, conflicts from jsonb_array_elements(outcomes) o;
  update snapbase.jobs set result = coalesce(jobs.result, '{}') || jsonb_build_object(
           'published', coalesce((jobs.result ->> 'published')::bigint, 0) + published,
           'failed', coalesce((jobs.result ->> 'failed')::bigint, 0) + jsonb_array_length(outcomes) - published - conflicts,
           'conflicts', coalesce((jobs.result ->> 'conflicts')::bigint, 0) + conflicts)
   where id = job_id;
  return snapbase_private.job_progress(job_id, j.done + jsonb_array_length(outcomes), null);
end;
$$;

-- Settles a batch a crash left unsettled, by what the source says of its transaction:
-- 'committed' → the planned outcomes are recorded; 'rolled_back' → its records are
-- sent again; 'unknown' → each record is compared with `current` (the source's
-- values now, by remote id): a created record whose planned id exists, an update
-- whose fields hold what was sent, a delete whose record is gone were published;
-- the others are sent again (and meet the conflict check then). Returns the counts.
create or replace function snapbase_private.settle_publish_batch(job_id bigint, batch_id bigint, verdict text, current jsonb default null)
returns jsonb
language plpgsql
set search_path = pg_catalog
as $$
declare
  b snapbase_private.publish_batches;
  t snapbase.workbook_tables;
  rel text;
  p jsonb;
  landed boolean;
  outcomes jsonb := '[]';
  resend bigint[] := '{}';
begin
  perform snapbase_private.assert_job_runner(job_id);
  select * into b from snapbase_private.publish_batches where id = batch_id for update;
  if b.id is null or b.settled_at is not null then
    return jsonb_build_object('published', 0, 'resent', 0);
  end if;
  if verdict not in ('committed', 'rolled_back', 'unknown') then
    raise exception 'verdict must be committed, rolled_back or unknown (got %)', verdict using errcode = '22023';
  end if;
  select * into t from snapbase.workbook_tables where id = b.table_id;
  rel := snapbase_private.table_rel(t);
  for p in select * from jsonb_array_elements(b.planned) loop
    if verdict = 'rolled_back' then
      landed := false;
    elsif not (p ->> 'ok')::boolean then
      -- Refused record by record at the source (its savepoint rolled back): nothing of it applied.
      landed := verdict = 'committed';
    elsif verdict = 'committed' then
      landed := true;
    elsif b.kind = 'create' then
      landed := coalesce(current ? (p ->> 'remote_id'), false);
    elsif b.kind = 'delete' then
      landed := current is not null and not (current ? (p ->> 'remote_id'));
    else
      landed := coalesce(current ? (p ->> 'remote_id'), false) and not exists (
        select 1 from jsonb_object_keys(p -> 'values') k
         where snapbase_private.normalized_values(rel, current -> (p ->> 'remote_id')) -> k
               is distinct from snapbase_private.normalized_values(rel, p -> 'values') -> k);
    end if;
    if landed then
      outcomes := outcomes || jsonb_strip_nulls(jsonb_build_object('id', p -> 'id', 'ok', p -> 'ok', 'remote_id', p -> 'remote_id', 'error', p -> 'error'));
    else
      resend := resend || (p ->> 'id')::bigint;
    end if;
  end loop;
  -- Sent again by this job: next_to_publish hands out records in 'pushing' state.
  execute format($q$update %s r set __publish = jsonb_build_object('state', 'pushing', 'job_id', $1, 'at', now())
                    where r.__id = any ($2)$q$, rel) using job_id, resend;
  update snapbase_private.publish_batches set verdict = case settle_publish_batch.verdict when 'unknown' then 'compared' else settle_publish_batch.verdict end
   where id = batch_id;
  perform snapbase_private.record_publish_outcomes(job_id, outcomes, batch_id);
  perform snapbase_private.audit_workbook('publish_reconciled', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('job_id', job_id, 'batch_id', batch_id, 'verdict', verdict, 'published', jsonb_array_length(outcomes), 'resent', cardinality(resend)));
  return jsonb_build_object('published', jsonb_array_length(outcomes), 'resent', cardinality(resend));
end;
$$;

-- Records left to publish in this job, for its progress total: what the filter
-- selects, less what this job already settled (failed and conflicting records stay dirty).
create or replace function snapbase_private.publish_pending(job_id bigint) returns bigint
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables;
  n bigint;
begin
  select wt.* into t from snapbase.jobs j join snapbase.workbook_tables wt on wt.id = j.table_id where j.id = job_id;
  execute format($q$select count(*) from %s r where ((%s) or (%s) or (%s))
                      and not coalesce((r.__publish ->> 'job_id')::bigint = $1 and r.__publish ->> 'state' in ('published', 'failed', 'conflict'), false)$q$,
    snapbase_private.table_rel(t),
    snapbase_private.publish_filter('create'), snapbase_private.publish_filter('update'), snapbase_private.publish_filter('delete'))
    into n using job_id;
  return n;
end;
$$;

-- The next batch of one kind ('create' | 'update' | 'delete'), marked 'pushing':
-- [{id, remote_id, values, last_seen}] where values holds the fields to send: the
-- edited ones (for a new record, the fields it was given: the source fills in the
-- rest with its defaults). Records of an unsettled batch ('sending') are not handed
-- out: the publish settles them first.
create or replace function snapbase_private.next_to_publish(job_id bigint, what text, batch_size integer) returns jsonb
language plpgsql
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables;
  batch jsonb;
begin
  perform snapbase_private.assert_job_runner(job_id);
  select wt.* into t from snapbase.jobs j join snapbase.workbook_tables wt on wt.id = j.table_id where j.id = job_id;
  execute format($q$
    with chosen as (
      select r.__id from %1$s r
       where %2$s
         and (r.__publish is null or (r.__publish ->> 'job_id')::bigint is distinct from $1 or r.__publish ->> 'state' = 'pushing')
         and r.__publish ->> 'state' is distinct from 'sending'
       order by r.__id limit $2
       for update
    ), marked as (
      update %1$s r set __publish = jsonb_build_object('state', 'pushing', 'job_id', $1, 'at', now())
        from chosen c where r.__id = c.__id
      returning r.__id, jsonb_build_object('id', r.__id, 'remote_id', r.__remote_id,
        'values', (select coalesce(jsonb_object_agg(k, to_jsonb(r.*) -> k), '{}') from jsonb_object_keys(r.__edited) k where k <> all ($4)),
        'last_seen', r.__last_seen) as item
    )
    select coalesce(jsonb_agg(item order by __id), '[]') from marked
    $q$, snapbase_private.table_rel(t), snapbase_private.publish_filter(what))
    into batch using job_id, batch_size, null, snapbase_private.scratch_columns(t);
  return batch;
end;
$$;

-- The conflict check before updates. `current` maps remote ids to the source's
-- values now. A record conflicts when a field it would send has changed at the
-- source since it was last seen; unless the job forces, it is not sent and gets
-- outcome 'conflict' with the source's values. A record the source no longer has
-- fails and is flagged deleted at the source. Returns the ids that may be sent.
create or replace function snapbase_private.check_publish_conflicts(job_id bigint, batch jsonb, current jsonb) returns bigint[]
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
  perform snapbase_private.assert_job_runner(job_id);
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
    update snapbase.jobs set result = coalesce(jobs.result, '{}')
           || jsonb_build_object('held_back', coalesce((jobs.result ->> 'held_back')::bigint, 0) + jsonb_array_length(refused))
     where id = job_id;
    perform snapbase_private.record_publish_outcomes(job_id, refused);
  end if;
  return sendable;
end;
$$;

-- Ends a publish job from its counts: 'partial' when some records failed or
-- conflicted (error says how many, each record says why), else 'succeeded'.
create or replace function snapbase_private.finish_publish(job_id bigint) returns snapbase.jobs
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  published bigint;
  failed bigint;
  conflicts bigint;
begin
  select * into j from snapbase.jobs where id = job_id;
  published := coalesce((j.result ->> 'published')::bigint, 0);
  failed := coalesce((j.result ->> 'failed')::bigint, 0);
  conflicts := coalesce((j.result ->> 'conflicts')::bigint, 0);
  update snapbase.jobs set result = coalesce(jobs.result, '{}') || jsonb_build_object('published', published, 'failed', failed,
           'conflicts', conflicts, 'held_back', coalesce((jobs.result ->> 'held_back')::bigint, 0))
   where id = job_id;
  if failed + conflicts = 0 then
    return snapbase_private.finish_job(job_id, 'succeeded');
  end if;
  return snapbase_private.finish_job(job_id, 'partial', null,
    format('%s of %s records were not published (%s failed, %s in conflict with the source); each record''s state.publish says why',
           failed + conflicts, published + failed + conflicts, failed, conflicts));
end;
$$;
