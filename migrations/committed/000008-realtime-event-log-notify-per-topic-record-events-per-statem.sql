--! Previous: sha1:9f87289dae571d1598a738db8444d778d1bf81ba
--! Hash: sha1:1a4f3cd291f017836ee9fca6727aa20928b80d8f
--! Message: realtime: event log, notify per topic, record events per statement

-- Realtime: one event log feeding GraphQL subscriptions and SSE.
--
-- Every event is a small row in snapbase_private.events (ids, kind, counts, who —
-- never whole rows) and a NOTIFY on the channel of its topic, carrying the same
-- payload: `snapbase_events:changes` (change requests and snapshots),
-- `snapbase_events:workbook:<id>` (records, settings, jobs of one workbook) or
-- `snapbase_events:account:<id>` (jobs of a connector account). Servers
-- LISTEN, so an event caused through any instance reaches clients of every
-- instance; the log lets an SSE client that reconnects replay what it missed
-- (Last-Event-ID). The retention task keeps a day of it.

drop trigger if exists _500_event on snapbase.change_requests;
drop trigger if exists _500_event on snapbase.snapshots;
drop trigger if exists _500_event on snapbase.jobs;
drop trigger if exists _500_event on snapbase.workbook_tables;
do $$ declare t record; begin
  for t in select snapbase_private.table_rel(wt) as rel from snapbase.workbook_tables wt loop
    execute format('drop trigger if exists _500_event_insert on %1$s; drop trigger if exists _500_event_update on %1$s;
                    drop trigger if exists _500_event_delete on %1$s', t.rel);
  end loop;
end $$;
drop function if exists snapbase_private.emit cascade;
drop function if exists snapbase_private.tg__change_event cascade;
drop function if exists snapbase_private.tg__snapshot_event cascade;
drop function if exists snapbase_private.tg__job_event cascade;
drop function if exists snapbase_private.tg__table_settings_event cascade;
drop function if exists snapbase_private.tg__records_event cascade;
drop function if exists snapbase_private.add_record_event_triggers cascade;
drop function if exists snapbase_private.tg__add_record_event_triggers cascade;
drop function if exists snapbase.visible_events cascade;
drop function if exists snapbase.visible_event cascade;
drop function if exists snapbase.create_stream_token cascade;
drop function if exists snapbase.events_since cascade;
drop function if exists snapbase_private.prune_events cascade;
drop table if exists snapbase_private.events cascade;

create table snapbase_private.events (
  id bigint generated always as identity primary key,
  topic text not null,
  kind text not null,
  payload jsonb not null,
  created_at timestamptz not null default now()
);
create index events_topic_id_idx on snapbase_private.events (topic, id);

create function snapbase_private.emit(topic text, kind text, payload jsonb) returns void
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  event jsonb;
  event_id bigint;
begin
  payload := payload || jsonb_build_object('by', coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user))
             || case when snapbase.current_app_role() = 'agent' then '{"agent": true}'::jsonb else '{}' end;
  insert into snapbase_private.events (topic, kind, payload) values (topic, kind, payload) returning id into event_id;
  event := jsonb_build_object('id', event_id, 'topic', topic, 'kind', kind) || payload;
  perform pg_notify('snapbase_events:' || topic, event::text);
end;
$$;

-- Events of a topic after an id, as the caller may see them: 'changes' (change
-- requests and snapshots of tables the caller may read), 'workbook:<id>' (the
-- caller must have access to the workbook), 'account:<id>' (jobs of a connector
-- account the caller owns). [{id, topic, kind, ...payload}] in order.
create function snapbase.visible_events(topic text, after_id bigint default 0, max_events integer default 500) returns setof jsonb
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
begin
  if topic = 'changes' then
    perform snapbase_private.require_role('viewer');
    return query
      select jsonb_build_object('id', e.id, 'topic', e.topic, 'kind', e.kind) || e.payload
        from snapbase_private.events e
        join snapbase.managed_tables m on m.id = (e.payload ->> 'managed_table_id')::bigint
       where e.topic = 'changes' and e.id > coalesce(after_id, 0) and snapbase_private.can_read(m)
       order by e.id limit max_events;
  elsif topic ~ '^(workbook|account):\d+$' then
    if topic like 'workbook:%' then
      perform snapbase_private.require_workbook(split_part(topic, ':', 2)::bigint, 'read');
    else
      perform snapbase_private.require_account(split_part(topic, ':', 2)::bigint);
    end if;
    return query
      select jsonb_build_object('id', e.id, 'topic', e.topic, 'kind', e.kind) || e.payload
        from snapbase_private.events e
       where e.topic = visible_events.topic and e.id > coalesce(after_id, 0)
       order by e.id limit max_events;
  else
    raise exception 'topic must be changes, workbook:<id> or account:<id> (got %)', topic using errcode = '22023';
  end if;
end;
$$;
comment on function snapbase.visible_events(text, bigint, integer) is
  'Events of a topic (changes, workbook:<id>, account:<id>) after an event id, limited to what you may see: for catching up after a reconnect.';
grant execute on function snapbase.visible_events(text, bigint, integer) to :ROLE_VIEWER, :ROLE_AGENT;

-- One event by id, or null when the caller may not see it (subscriptions refetch with it).
create function snapbase.visible_event(event_id bigint) returns jsonb
language sql stable
security definer
set search_path = pg_catalog
as $$
  select v from snapbase_private.events e, snapbase.visible_events(e.topic, e.id - 1, 1) v
   where e.id = event_id and (v ->> 'id')::bigint = event_id
$$;
grant execute on function snapbase.visible_event(bigint) to :ROLE_VIEWER, :ROLE_AGENT;

-- A JWT for five minutes, for clients that must put it in a URL (EventSource).
create function snapbase.create_stream_token() returns text
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  me snapbase.users := snapbase.current_user();
begin
  if me.id is null or snapbase_private.current_token_id() is not null then
    raise exception 'sign in with a password to get a stream token (API tokens can be used as they are)' using errcode = '42501';
  end if;
  return snapbase_private.sign_jwt(jsonb_build_object('aud', 'snapbase', 'sub', me.id::text, 'user_id', me.id, 'email', me.email,
    'role', me.role, 'iat', extract(epoch from now())::bigint, 'exp', extract(epoch from now() + interval '5 minutes')::bigint));
end;
$$;
comment on function snapbase.create_stream_token() is 'A token valid for five minutes, for ?access_token= on event streams.';
grant execute on function snapbase.create_stream_token() to :ROLE_VIEWER;

create function snapbase_private.prune_events() returns bigint
language sql
set search_path = pg_catalog
as $$
  with gone as (delete from snapbase_private.events where created_at < now() - interval '1 day' returning 1)
  select count(*) from gone
$$;

--------------------------------------------------------------------------------
-- What emits
--------------------------------------------------------------------------------

create function snapbase_private.tg__change_event() returns trigger
language plpgsql
security definer
set search_path = pg_catalog
as $$
begin
  if tg_op = 'INSERT' then
    perform snapbase_private.emit('changes', 'change_submitted', jsonb_build_object('change_request_id', new.id,
      'managed_table_id', new.managed_table_id, 'table_name', new.table_name, 'change_kind', new.kind));
  elsif new.status is distinct from old.status then
    perform snapbase_private.emit('changes', 'change_' || new.status, jsonb_build_object('change_request_id', new.id,
      'managed_table_id', new.managed_table_id, 'table_name', new.table_name, 'rows_affected', new.rows_affected,
      'snapshot_id', new.snapshot_id));
  end if;
  return null;
end;
$$;
create trigger _500_event after insert or update of status on snapbase.change_requests
  for each row execute function snapbase_private.tg__change_event();

create function snapbase_private.tg__snapshot_event() returns trigger
language plpgsql
security definer
set search_path = pg_catalog
as $$
begin
  perform snapbase_private.emit('changes', 'snapshot_created', jsonb_build_object('snapshot_id', new.id,
    'managed_table_id', new.managed_table_id, 'table_name', new.table_name, 'change_request_id', new.change_request_id,
    'record_count', new.record_count));
  return null;
end;
$$;
create trigger _500_event after insert on snapbase.snapshots
  for each row execute function snapbase_private.tg__snapshot_event();

create function snapbase_private.tg__job_event() returns trigger
language plpgsql
security definer
set search_path = pg_catalog
as $$
begin
  if tg_op = 'UPDATE' and (new.state, new.done, new.total) is not distinct from (old.state, old.done, old.total) then
    return null;
  end if;
  perform snapbase_private.emit(
    case when new.workbook_id is not null then 'workbook:' || new.workbook_id else 'account:' || new.connector_account_id end,
    'job', jsonb_build_object('job_id', new.id, 'job_kind', new.kind, 'state', new.state, 'done', new.done, 'total', new.total,
                              'table_id', new.table_id));
  return null;
end;
$$;
create trigger _500_event after insert or update on snapbase.jobs
  for each row execute function snapbase_private.tg__job_event();

create function snapbase_private.tg__table_settings_event() returns trigger
language plpgsql
security definer
set search_path = pg_catalog
as $$
begin
  if tg_op = 'DELETE' then
    -- Gone with its workbook: nobody is left to tell.
    if exists (select 1 from snapbase.workbooks where id = old.workbook_id) then
      perform snapbase_private.emit('workbook:' || old.workbook_id, 'table_removed', jsonb_build_object('table_id', old.id));
    end if;
  else
    perform snapbase_private.emit('workbook:' || new.workbook_id,
      case when tg_op = 'INSERT' then 'table_added' else 'table_settings_changed' end, jsonb_build_object('table_id', new.id));
  end if;
  return null;
end;
$$;
create trigger _500_event after insert or update or delete on snapbase.workbook_tables
  for each row execute function snapbase_private.tg__table_settings_event();

-- Record changes: one event per statement (a 10,000-row accept is one event), with
-- what happened, inferred from the rows before and after: created / downloaded /
-- suggested (new records or values) / edited / accepted / rejected / published /
-- deleted. Arguments: workbook id, table id.
create function snapbase_private.tg__records_event() returns trigger
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  affected bigint;
  what text;
begin
  if tg_op = 'INSERT' then
    select count(*), case when bool_and(__suggested_new) then 'suggested' when bool_and(__seen_job is not null) then 'downloaded' else 'created' end
      into affected, what from new_rows;
  elsif tg_op = 'DELETE' then
    select count(*), case when bool_and(__suggested_new) then 'rejected' else 'deleted' end into affected, what from old_rows;
  else
    select count(*),
           case
             when bool_or(data_changed and n.__suggested <> o.__suggested) then 'accepted'
             when bool_or(n.__publish is distinct from o.__publish) then 'published'
             when bool_or(data_changed) then 'edited'
             when bool_or(not (o.__suggested @> n.__suggested) or n.__suggest_delete is not null and o.__suggest_delete is null) then 'suggested'
             when bool_or(n.__suggested <> o.__suggested or n.__suggest_delete is distinct from o.__suggest_delete) then 'rejected'
             else 'updated'
           end
      into affected, what
      from new_rows n join old_rows o on o.__id = n.__id,
           lateral (select (to_jsonb(n) - snapbase_private.record_meta_columns()) is distinct from (to_jsonb(o) - snapbase_private.record_meta_columns())
                             or n.__deleted <> o.__deleted as data_changed) c;
  end if;
  -- A bulk edit announces itself once, at its end.
  -- 'updated' alone (edit flags, timestamps) is bookkeeping that follows another event.
  if affected > 0 and what <> 'updated' and current_setting('snapbase.quiet_record_events', true) is distinct from 'on' then
    perform snapbase_private.emit('workbook:' || tg_argv[0], 'records', jsonb_build_object('table_id', tg_argv[1]::bigint,
      'action', what, 'count', affected));
  end if;
  return null;
end;
$$;

create function snapbase_private.add_record_event_triggers(table_id bigint) returns void
language plpgsql
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables;
  rel text;
begin
  select * into t from snapbase.workbook_tables where id = table_id;
  rel := snapbase_private.table_rel(t);
  if rel is null or to_regclass(rel) is null then
    return;
  end if;
  execute format($t$
    drop trigger if exists _500_event_insert on %1$s;
    drop trigger if exists _500_event_update on %1$s;
    drop trigger if exists _500_event_delete on %1$s;
    create trigger _500_event_insert after insert on %1$s referencing new table as new_rows
      for each statement execute function snapbase_private.tg__records_event(%2$L, %3$L);
    create trigger _500_event_update after update on %1$s referencing old table as old_rows new table as new_rows
      for each statement execute function snapbase_private.tg__records_event(%2$L, %3$L);
    create trigger _500_event_delete after delete on %1$s referencing old table as old_rows
      for each statement execute function snapbase_private.tg__records_event(%2$L, %3$L)
    $t$, rel, t.workbook_id, t.id);
end;
$$;

-- A workbook table's physical table is created after its row: the triggers are
-- added at commit, when both exist.
create function snapbase_private.tg__add_record_event_triggers() returns trigger
language plpgsql
security definer
set search_path = pg_catalog
as $$
begin
  perform snapbase_private.add_record_event_triggers(new.id);
  return null;
end;
$$;
drop trigger if exists _600_record_events on snapbase.workbook_tables;
create constraint trigger _600_record_events after insert on snapbase.workbook_tables
  deferrable initially deferred
  for each row execute function snapbase_private.tg__add_record_event_triggers();

do $$ declare t record; begin
  for t in select id from snapbase.workbook_tables loop
    perform snapbase_private.add_record_event_triggers(t.id);
  end loop;
end $$;

-- Bulk edits: one event for the whole batch, not one per operation.
create or replace function snapbase.bulk_edit_records(table_id bigint, operations jsonb) returns jsonb
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
  perform set_config('snapbase.quiet_record_events', 'on', true);
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
    perform set_config('snapbase.quiet_record_events', 'off', true);
    return jsonb_build_object('ok', false, 'applied', 0, 'record_ids', '[]'::jsonb, 'errors', errors);
  end;
  perform set_config('snapbase.quiet_record_events', 'off', true);
  perform snapbase_private.emit('workbook:' || t.workbook_id, 'records', jsonb_build_object('table_id', t.id, 'action', 'bulk_edited', 'count', i,
    'counts', (select jsonb_object_agg(k, n) from (select o ->> 'op' as k, count(*) as n from jsonb_array_elements(operations) o group by 1) c)));
  perform snapbase_private.audit_workbook('bulk_edit_records', t.workbook_id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('operations', i,
      'counts', (select jsonb_object_agg(k, n) from (select o ->> 'op' as k, count(*) as n from jsonb_array_elements(operations) o group by 1) c)));
  return jsonb_build_object('ok', true, 'applied', i, 'record_ids', ids, 'errors', errors);
end;
$$;
