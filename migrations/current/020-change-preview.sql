--------------------------------------------------------------------------------
-- Preview before approval: what a pending change would do, computed by running it
-- and always rolling it back.
--------------------------------------------------------------------------------
-- snapbase.preview_change(change_id) checks the change exactly as approval does
-- (check_change_sql with the submitter's rights, then execute_change as the change
-- runner) inside a subtransaction that is always rolled back. Three statement-level
-- triggers with transition tables, created inside that subtransaction, copy the
-- rows the statement wrote (before and after images) into a temporary table, and
-- the diff is read from there before the rollback. Nothing survives but an audit
-- entry "previewed". The triggers need SHARE ROW EXCLUSIVE on the table (writers
-- wait): the preview takes it with a short lock_timeout and holds it only while
-- it runs, under the request's statement_timeout.

alter type snapbase_private.probe_result add attribute tree text;
comment on type snapbase_private.probe_result is 'What probe_user_text found in user text: problems, relations read and written, columns, parameters, the top statement, and the parse tree itself.';

alter table snapbase.managed_tables add column if not exists sensitive_columns text[] not null default '{}';
comment on column snapbase.managed_tables.sensitive_columns is 'Columns an admin marked sensitive: a preview warns when a change writes them.';

insert into snapbase_private.settings (key, value) values ('preview_warn_rows', '1000'), ('preview_warn_percent', '10')
  on conflict (key) do nothing;

drop function if exists snapbase.preview_change(bigint, integer, integer) cascade;
drop function if exists snapbase.set_sensitive_columns(regclass, text[]) cascade;
drop function if exists snapbase_private.tg__preview_capture() cascade;
drop function if exists snapbase_private.unqualified_statement(text) cascade;

-- (probe_user_text records the tree: see 030-containment-hardening.sql.)

-- Whether the top statement of a parse tree is an UPDATE or DELETE with no WHERE:
-- its jointree (the only FROMEXPR at depth 2) has no quals.
create function snapbase_private.unqualified_statement(tree text) returns boolean
language sql immutable
set search_path = pg_catalog
as $$
  select coalesce((select f.value from snapbase_private.node_fields(tree) f
                     where f.node_type = 'QUERY' and f.depth = 1 and f.field = 'commandType' limit 1) in ('2', '4'), false)
     and exists (select 1 from snapbase_private.node_fields(tree) f
                  where f.node_type = 'FROMEXPR' and f.depth = 2 and f.field = 'quals' and f.value = '<>')
$$;

-- Copies a statement's transition rows into pg_temp.snapbase_preview_rows, while a
-- preview is capturing (only ever inside preview_change's rolled-back block).
create function snapbase_private.tg__preview_capture() returns trigger
language plpgsql
security definer
set search_path = pg_catalog
as $$
begin
  if tg_op in ('UPDATE', 'DELETE') then
    execute 'insert into pg_temp.snapbase_preview_rows (side, "row") select ''before'', to_jsonb(o) from old_rows o';
  end if;
  if tg_op in ('UPDATE', 'INSERT') then
    execute 'insert into pg_temp.snapbase_preview_rows (side, "row") select ''after'', to_jsonb(n) from new_rows n';
  end if;
  return null;
end;
$$;

create function snapbase.set_sensitive_columns(target regclass, columns text[]) returns snapbase.managed_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  mt snapbase.managed_tables;
  unknown text;
begin
  perform snapbase_private.require_role('admin');
  mt := snapbase_private.managed_table_for(target);
  select string_agg(c, ', ') into unknown from unnest(coalesce(columns, '{}')) c
   where not exists (select 1 from pg_attribute a where a.attrelid = target and a.attname = c and a.attnum > 0 and not a.attisdropped);
  if unknown is not null then
    raise exception '% has no column(s) %', target, unknown using errcode = '42703';
  end if;
  update snapbase.managed_tables m set sensitive_columns = coalesce(columns, '{}') where m.id = mt.id returning * into mt;
  perform snapbase_private.audit('set_sensitive_columns', 'managed_table', mt.id::text, mt.qualified_name,
    jsonb_build_object('columns', columns));
  return mt;
end;
$$;
comment on function snapbase.set_sensitive_columns(regclass, text[]) is 'Mark columns of a managed table sensitive (admins): previews warn when a change writes them.';
grant execute on function snapbase.set_sensitive_columns(regclass, text[]) to :ROLE_VIEWER;

-- What a pending change would do, without doing it. Returns
-- {change_request_id, rows_affected, total_changes, changes: [snapshot_diff rows],
--  next_offset, warnings: [{code, message}], columns_hidden: [...]}.
create function snapbase.preview_change(change_id bigint, max_rows integer default 100, offset_rows integer default 0)
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
set client_min_messages = warning
set standard_conforming_strings = on
as $$
declare
  cr snapbase.change_requests;
  mt snapbase.managed_tables;
  target regclass;
  pk text[];
  probe snapbase_private.probe_result;
  affected bigint;
  diff jsonb;
  hidden text[];
  warnings jsonb := '[]';
  estimate double precision;
  written_sensitive text[];
  result jsonb;
  err_code text;
  err_message text;
begin
  if max_rows not between 1 and 1000 or offset_rows < 0 then
    raise exception 'max_rows must be from 1 to 1000 and offset_rows at least 0' using errcode = '22023';
  end if;
  select * into cr from snapbase.change_requests c where c.id = change_id;
  select * into mt from snapbase.managed_tables m where m.id = cr.managed_table_id;
  -- Admins, and the submitter, who may read the table; anyone else: "no change request".
  if cr.id is null or not coalesce(snapbase_private.can_read(mt), false)
     or not (snapbase.current_app_role() = 'admin' or cr.submitted_by = snapbase.current_user_id()) then
    raise exception 'no change request %', change_id using errcode = 'P0002';
  end if;
  if cr.status <> 'pending' or cr.kind = 'restore' then
    raise exception 'change request % is %, not pending: its effect is in snapshot_diff', change_id, cr.status using errcode = '55000';
  end if;
  target := snapbase_private.relation_of(mt);
  if target is null then
    raise exception 'table % no longer exists', cr.table_name using errcode = '42P01';
  end if;
  pk := snapbase_private.primary_key(target);
  if pk is null then
    raise exception 'a preview needs a primary key on % (it compares rows by key)', target using errcode = '42P10';
  end if;
  hidden := array(select a.attname::text from pg_attribute a
                   where a.attrelid = target and a.attnum > 0 and not a.attisdropped
                     and not coalesce(has_column_privilege(snapbase_private.caller_role(), target, a.attnum, 'SELECT'), false));
  perform set_config('lock_timeout', '2s', true);
  begin
    execute format('lock table %s in share row exclusive mode', target);
    probe := snapbase_private.check_change_sql(target, cr.sql, snapbase_private.submitter_roles(cr));
    create temporary table if not exists snapbase_preview_rows (side text not null, "row" jsonb not null) on commit drop;
    execute format('create trigger snapbase_preview_insert after insert on %s referencing new table as new_rows for each statement execute function snapbase_private.tg__preview_capture()', target);
    execute format('create trigger snapbase_preview_update after update on %s referencing old table as old_rows new table as new_rows for each statement execute function snapbase_private.tg__preview_capture()', target);
    execute format('create trigger snapbase_preview_delete after delete on %s referencing old table as old_rows for each statement execute function snapbase_private.tg__preview_capture()', target);
    affected := snapbase_private.execute_change(target, cr.sql, probe, snapbase_private.submitter_roles(cr));
    -- Rows by key; a key written several times keeps its first before and last after.
    with keyed as (
      select side, "row", (select jsonb_object_agg(k, "row" -> k) from unnest(pk) k) as key,
             row_number() over () as n
        from pg_temp.snapbase_preview_rows
    ), befores as (
      select distinct on (key) key, "row" from keyed where side = 'before' order by key, n
    ), afters as (
      select distinct on (key) key, "row" from keyed where side = 'after' order by key, n desc
    ), changes as (
      select case when b.key is null then 'added' when a.key is null then 'removed' else 'changed' end as change,
             coalesce(a.key, b.key) as key,
             case when a.key is not null and b.key is not null then
               array(select f from jsonb_object_keys(a."row" || b."row") f
                      where (b."row" -> f) is distinct from (a."row" -> f) and f <> all (hidden) order by f) end as changed_fields,
             b."row" - hidden as before, a."row" - hidden as after,
             -- Every column written (hidden ones included), for the sensitive-column warning.
             array(select f from jsonb_object_keys(coalesce(a."row", '{}') || coalesce(b."row", '{}')) f
                    where (b."row" -> f) is distinct from (a."row" -> f)) as all_changed
        from befores b full join afters a on a.key = b.key
       where b."row" is distinct from a."row"
    )
    select jsonb_build_object(
             'total_changes', count(*),
             'changes', coalesce((select jsonb_agg(jsonb_build_object('change', p.change, 'key', p.key, 'changed_fields', p.changed_fields,
                                                                    'before', p.before, 'after', p.after) order by p.key)
                                    from (select * from changes order by key offset offset_rows limit max_rows) p), '[]'),
             'written_columns', coalesce((select jsonb_agg(distinct f) from changes, unnest(all_changed) f), '[]'))
      into diff from changes;
    raise exception 'preview done' using errcode = 'SBPRV';
  exception
    when sqlstate 'SBPRV' then
      null;
    when lock_not_available then
      raise exception 'table % is busy (being approved or written in bulk); try the preview again', target using errcode = '55P03';
    when others then
      get stacked diagnostics err_code = returned_sqlstate, err_message = message_text;
      diff := null;
  end;
  perform set_config('lock_timeout', '0', true);
  if diff is null then
    warnings := warnings || jsonb_build_object('code', 'fails', 'message',
      format('approving this change would fail now: %s (SQLSTATE %s)', left(err_message, 2000), err_code));
    result := jsonb_build_object('change_request_id', cr.id, 'rows_affected', null, 'total_changes', 0, 'changes', '[]'::jsonb,
                                 'next_offset', null, 'columns_hidden', to_jsonb(hidden));
  else
    if snapbase_private.unqualified_statement(probe.tree) then
      warnings := warnings || jsonb_build_object('code', 'no_where', 'message',
        format('this %s has no WHERE clause: it applies to every row of %s',
               case probe.command_type when 2 then 'UPDATE' else 'DELETE' end, target));
    end if;
    -- The planner's estimate of the table's size, or a count when it has none yet.
    select c.reltuples into estimate from pg_class c where c.oid = target;
    if estimate is null or estimate <= 0 then
      execute format('select count(*) from %s', target) into estimate;
    end if;
    if affected > snapbase_private.setting('preview_warn_rows')::bigint then
      warnings := warnings || jsonb_build_object('code', 'many_rows', 'message',
        format('this change writes %s rows (more than %s)', affected, snapbase_private.setting('preview_warn_rows')));
    end if;
    if estimate > 0 and affected * 100.0 / estimate > snapbase_private.setting('preview_warn_percent')::numeric then
      warnings := warnings || jsonb_build_object('code', 'large_share', 'message',
        format('this change writes about %s%% of %s', round(affected * 100.0 / estimate), target));
    end if;
    written_sensitive := array(select c from jsonb_array_elements_text(diff -> 'written_columns') c where c = any (mt.sensitive_columns) order by 1);
    if cardinality(written_sensitive) > 0 then
      warnings := warnings || jsonb_build_object('code', 'sensitive_columns', 'message',
        format('this change writes sensitive column(s): %s', array_to_string(written_sensitive, ', ')));
    end if;
    result := jsonb_build_object('change_request_id', cr.id, 'rows_affected', affected,
      'total_changes', diff -> 'total_changes', 'changes', diff -> 'changes',
      'next_offset', case when (diff ->> 'total_changes')::bigint > offset_rows + max_rows then offset_rows + max_rows end,
      'columns_hidden', to_jsonb(hidden));
  end if;
  perform snapbase_private.audit('preview', 'change_request', cr.id::text, cr.table_name,
    jsonb_build_object('rows_affected', result -> 'rows_affected', 'warnings', warnings));
  return result || jsonb_build_object('warnings', warnings);
end;
$$;
comment on function snapbase.preview_change(bigint, integer, integer) is
  'What a pending change would do, without doing it: rows affected, a paged before/after diff (snapshot_diff''s shape, only columns you may read) and warnings. Admins, and the submitter.';
grant execute on function snapbase.preview_change(bigint, integer, integer) to :ROLE_VIEWER;
