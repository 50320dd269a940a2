--! Previous: sha1:e54ad74c7d863fb73c0d01ab04c11c8604750e15
--! Hash: sha1:fb702cc297cf599ab3c4dbde8250f44843753b17
--! Message: Agents are not shown events of edits to columns hidden from them

--! split: 001-current.sql
-- Work in progress: one file per topic (NNN-topic.sql), applied in number order.

--! split: 002-agent-record-events.sql
-- Agents learned from events that a column hidden from them was edited: a records
-- event said "edited" however little of the row the agent may see. Such an event is
-- now marked hidden_only, and agents are not shown it.

CREATE OR REPLACE FUNCTION snapbase_private.tg__records_event()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
declare
  affected bigint;
  what text;
  visible_change boolean := true;
  -- Hidden from agents: an edit of only these is not an event they may see.
  hidden text[] := coalesce((select wt.hidden_columns from snapbase.workbook_tables wt where wt.id = tg_argv[1]::bigint), '{}');
begin
  if tg_op = 'INSERT' then
    select count(*), case when bool_and(__sb_n.__suggested_new) then 'suggested' when bool_and(__sb_n.__seen_job is not null) then 'downloaded' else 'created' end
      into affected, what from new_rows __sb_n;
  elsif tg_op = 'DELETE' then
    select count(*), case when bool_and(__sb_o.__suggested_new) then 'rejected' else 'deleted' end into affected, what from old_rows __sb_o;
  else
    select count(*),
           case
             when bool_or(__sb_c.data_changed and __sb_n.__suggested <> __sb_o.__suggested) then 'accepted'
             when bool_or(__sb_c.publish_changed and __sb_n.__publish ->> 'state' = 'published') then 'published'
             when bool_or(__sb_c.publish_changed and __sb_n.__publish ->> 'state' = 'conflict') then 'conflict'
             when bool_or(__sb_c.publish_changed and __sb_n.__publish ->> 'state' = 'failed') then 'failed'
             when bool_or(__sb_c.data_changed) then 'edited'
             -- A publish state cleared without an edit: a decision (resolve_source_deleted).
             when bool_or(__sb_c.publish_changed and __sb_n.__publish is null) then 'resolved'
             when bool_or(not (__sb_o.__suggested @> __sb_n.__suggested) or __sb_n.__suggest_delete is not null and __sb_o.__suggest_delete is null) then 'suggested'
             when bool_or(__sb_n.__suggested <> __sb_o.__suggested or __sb_n.__suggest_delete is distinct from __sb_o.__suggest_delete) then 'rejected'
             else 'updated'
           end,
           bool_or(__sb_c.visible_changed)
      into affected, what, visible_change
      from new_rows __sb_n join old_rows __sb_o on __sb_o.__id = __sb_n.__id,
           lateral (select (to_jsonb(__sb_n.*) - snapbase_private.record_meta_columns()) is distinct from (to_jsonb(__sb_o.*) - snapbase_private.record_meta_columns())
                             or __sb_n.__deleted <> __sb_o.__deleted as data_changed,
                           case when cardinality(hidden) = 0 then true  -- the usual case: no second comparison
                                else (to_jsonb(__sb_n.*) - snapbase_private.record_meta_columns() - hidden) is distinct from (to_jsonb(__sb_o.*) - snapbase_private.record_meta_columns() - hidden)
                                     or __sb_n.__deleted <> __sb_o.__deleted end as visible_changed,
                           __sb_n.__publish is distinct from __sb_o.__publish as publish_changed) __sb_c;
  end if;
  -- A bulk edit announces itself once, at its end.
  -- 'updated' alone (edit flags, timestamps, records taken for a publish) is bookkeeping that follows another event.
  if affected > 0 and what <> 'updated' and current_setting('snapbase.quiet_record_events', true) is distinct from 'on' then
    perform snapbase_private.emit('workbook:' || tg_argv[0], 'records', jsonb_build_object('table_id', tg_argv[1]::bigint,
      'action', what, 'count', affected)
      || case when what = 'edited' and not visible_change then '{"hidden_only": true}'::jsonb else '{}'::jsonb end);
  end if;
  return null;
end;
$function$;
comment on function snapbase_private.tg__records_event() is 'Record changes as one event per statement (a 10,000-row accept is one event), saying what happened from the rows before and after. An edit of columns hidden from agents only is marked hidden_only, and agents are not shown it.';


CREATE OR REPLACE FUNCTION snapbase.visible_events(topic text, after_id bigint DEFAULT 0, max_events integer DEFAULT 500)
 RETURNS SETOF jsonb
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET standard_conforming_strings TO 'on'
AS $function$
begin
  if topic = 'changes' then
    perform snapbase_private.require_role('viewer');
    return query
      select jsonb_build_object('id', e.id, 'topic', e.topic, 'kind', e.kind) || e.payload
        from snapbase_private.events e
        join snapbase.managed_tables m on m.id = (e.payload ->> 'managed_table_id')::bigint
       where e.topic = 'changes' and e.id > coalesce(after_id, 0) and snapbase_private.can_read(m)
       order by e.id limit max_events;
  elsif topic ~ '^(workbook|account):\d{1,18}$' then
    if topic like 'workbook:%' then
      perform snapbase_private.require_workbook(split_part(topic, ':', 2)::bigint, 'read');
    else
      perform snapbase_private.require_account(split_part(topic, ':', 2)::bigint);
    end if;
    -- An event about a table is shown to an agent only while that table exists and is
    -- not hidden, or when it says a table the agent could see was removed; and not when
    -- it tells of an edit of hidden columns only.
    return query
      select jsonb_build_object('id', e.id, 'topic', e.topic, 'kind', e.kind) || (e.payload - 'hidden' - 'hidden_only')
        from snapbase_private.events e
       where e.topic = visible_events.topic and e.id > coalesce(after_id, 0)
         and (e.payload ->> 'table_id' is null or snapbase.current_app_role() is distinct from 'agent'
              or exists (select 1 from snapbase.workbook_tables wt
                          where wt.id = (e.payload ->> 'table_id')::bigint and not wt.hidden)
              or (e.kind = 'table_removed' and e.payload -> 'hidden' = 'false'::jsonb))
         and not (snapbase.current_app_role() = 'agent' and coalesce(e.payload -> 'hidden_only' = 'true'::jsonb, false))
       order by e.id limit max_events;
  elsif topic ~ '^(workbook|account):\d+$' then
    -- An id too large to exist: the same answer as any other missing one.
    raise exception 'no % %', case when topic like 'workbook:%' then 'workbook' else 'connector account' end, split_part(topic, ':', 2)
      using errcode = 'P0002';
  else
    raise exception 'topic must be changes, workbook:<id> or account:<id> (got %)', topic using errcode = '22023';
  end if;
end;
$function$;
comment on function snapbase.visible_events(text,bigint,integer) is 'Events of a topic (changes, workbook:<id>, account:<id>) after an event id, limited to what you may see: for catching up after a reconnect.';
grant execute on function snapbase.visible_events(text,bigint,integer) to :ROLE_AGENT;
grant execute on function snapbase.visible_events(text,bigint,integer) to :ROLE_VIEWER;
