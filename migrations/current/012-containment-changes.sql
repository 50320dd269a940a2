--------------------------------------------------------------------------------
-- Containment, part 3: change SQL runs with no more rights than its author.
--------------------------------------------------------------------------------
-- Checked at submission and again at approval, from PostgreSQL's parse tree
-- (snapbase_private.probe_user_text; nothing is planned or run to check it):
--   * at most 1 MB, exactly one INSERT, UPDATE, DELETE or MERGE;
--   * it writes only its managed table (data-modifying CTEs included);
--   * every function and operator is a side-effect-free built-in: no dynamic SQL
--     (query_to_xml …), no set_config or current_setting, no advisory locks, no
--     large objects, nothing of Snapbase's own, nextval only on the table's own
--     sequences;
--   * every table and column it reads can be read by the submitter (as they are
--     now), and the submitter can read the managed table itself.
-- It then runs as the change runner role, which has no rights of its own: for the
-- approving transaction only, it is granted the managed table (and SELECT on what
-- the change reads). So a function that slipped through the allow-list would
-- still reach nothing else. Approval runs as the owner (SECURITY DEFINER) and
-- checks the caller's admin role itself.

drop function if exists snapbase_private.validate_change_sql_as_owner(regclass, text) cascade;
drop function if exists snapbase_private.validate_change_sql(regclass, text) cascade;
drop function if exists snapbase_private.check_change_sql(regclass, text, name[]) cascade;
drop function if exists snapbase_private.submitter_roles(snapbase.change_requests) cascade;
drop function if exists snapbase_private.db_role(text) cascade;
drop function if exists snapbase_private.acting_role() cascade;
drop function if exists snapbase_private.execute_change(regclass, text, snapbase_private.probe_result) cascade;
drop function if exists snapbase_sandbox.run_change(text, text) cascade;

alter table snapbase.change_requests add column if not exists submitted_role name;
comment on column snapbase.change_requests.submitted_role is
  E'@behavior -*\nThe database role the submitter acted as; the change may read only what this role (and the submitter''s current role) may read.';

-- The database role of a Snapbase user role.
create function snapbase_private.db_role(app_role text) returns name
language sql immutable
set search_path = pg_catalog
as $$
  select case app_role when 'admin' then ':ROLE_ADMIN' when 'editor' then ':ROLE_EDITOR' when 'viewer' then ':ROLE_VIEWER' end::name
$$;

-- The role whose rights bound what the caller submits: the request's role; for a
-- job acting for a user (no role set, claims set), that user's role; in psql, the
-- database user.
create function snapbase_private.acting_role() returns name
language sql stable
set search_path = pg_catalog
as $$
  select case
    when nullif(current_setting('role'), 'none') is not null then snapbase_private.caller_role()
    when snapbase.current_user_id() is not null then
      coalesce((select snapbase_private.db_role(u.role::text) from snapbase.users u where u.id = snapbase.current_user_id()), ':ROLE_ANONYMOUS')
    else session_user::name
  end
$$;

-- The roles whose reading rights a change may use: the one it was submitted as and,
-- when its submitter is a user, that user's current role (a demotion takes effect).
create function snapbase_private.submitter_roles(cr snapbase.change_requests) returns name[]
language sql stable
set search_path = pg_catalog
as $$
  select array_remove(array[
    coalesce(cr.submitted_role, snapbase_private.db_role('editor')),
    case when cr.submitted_by is not null then
      coalesce((select snapbase_private.db_role(u.role::text) from snapbase.users u where u.id = cr.submitted_by), ':ROLE_ANONYMOUS') end
  ], null)
$$;

-- Checks change SQL for `target`, read with the rights of every role in `readers`.
-- Raises a clear error (and names the part) when anything is not allowed; returns
-- the parse tree's findings otherwise.
create function snapbase_private.check_change_sql(target regclass, change_sql text, readers name[])
returns snapbase_private.probe_result
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  target_schema text := (select n.nspname from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = target);
  probe snapbase_private.probe_result;
  cleaned text := rtrim(btrim(change_sql), E'; \t\r\n');
  unreadable text;
  r name;
begin
  if cleaned is null or cleaned = '' then
    raise exception 'the change SQL is empty' using errcode = '22023';
  end if;
  if octet_length(change_sql) > 1024 * 1024 then
    raise exception 'the change SQL is % bytes; at most 1 MB (1048576 bytes) is accepted', octet_length(change_sql)
      using errcode = '54000';
  end if;
  foreach r in array readers loop
    if not coalesce(has_any_column_privilege(r, target, 'SELECT'), false) then
      raise exception 'you may not read %, so you cannot change it', target using errcode = '42501';
    end if;
  end loop;
  probe := snapbase_private.probe_user_text('returns void language sql begin atomic ', cleaned, E'\n; end', '',
    format('pg_catalog, %I', target_schema), 'change');
  if probe.statements <> 1 or probe.command_type not in (2, 3, 4, 5) then
    raise exception 'the change must be exactly one INSERT, UPDATE, DELETE or MERGE statement' using errcode = '42601';
  end if;
  if cardinality(probe.problems) > 0 then
    raise exception 'the change may not use %', array_to_string(probe.problems, ', ') using errcode = '42501';
  end if;
  if probe.written is distinct from array[target::oid] then
    raise exception 'the change may modify only %, but it modifies %', target,
      coalesce((select string_agg(w::regclass::text, ', ' order by w::regclass::text) from unnest(probe.written) w), 'nothing')
      using errcode = '42501';
  end if;
  -- Every relation it names: the table, its own sequences, or something every reader may read.
  foreach r in array readers loop
    select string_agg(rel::regclass::text, ', ' order by rel::regclass::text) into unreadable
      from unnest(probe.relations) rel
      join pg_class c on c.oid = rel
      join pg_namespace n on n.oid = c.relnamespace
     where rel <> target
       and not (c.relkind = 'S' and exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass and d.objid = rel
                                                and d.refobjid = target and d.deptype in ('a', 'i')))
       and (n.nspname in ('pg_catalog', 'information_schema', 'pg_toast', 'snapbase', 'snapbase_private', 'snapbase_sandbox',
                          'graphile_worker', 'graphile_migrate')
            or n.nspname like 'workbook\_%'
            or c.relkind = 'S'
            or not (
              coalesce(has_table_privilege(r, rel, 'SELECT'), false)
              or (jsonb_array_length(probe.columns -> rel::text) > 0
                  and not exists (select 1 from jsonb_array_elements_text(probe.columns -> rel::text) a
                                   where not coalesce(has_column_privilege(r, rel, a::smallint, 'SELECT'), false)))));
    if unreadable is not null then
      raise exception 'the change reads %, which you may not read', unreadable using errcode = '42501';
    end if;
    -- Columns of the table itself it reads or writes must be readable too.
    select string_agg(a.attname, ', ') into unreadable
      from jsonb_array_elements_text(coalesce(probe.columns -> target::oid::text, '[]')) x
      join pg_attribute a on a.attrelid = target and a.attnum = x::smallint
     where not coalesce(has_column_privilege(r, target, a.attnum, 'SELECT'), false);
    if unreadable is not null then
      raise exception 'the change uses columns of % you may not read: %', target, unreadable using errcode = '42501';
    end if;
  end loop;
  return probe;
end;
$$;
comment on function snapbase_private.check_change_sql(regclass, text, name[]) is
  'Checks change SQL from its parse tree (never planned or run): one INSERT/UPDATE/DELETE/MERGE of the target only, side-effect-free built-ins only, reads limited to what the readers may read. Raises with the reason.';

--------------------------------------------------------------------------------
-- The change runner's only entry point (owned by it; the owner alone may call it)
--------------------------------------------------------------------------------

grant create on schema snapbase_sandbox to :ROLE_CHANGE_RUNNER;
create function snapbase_sandbox.run_change(change_sql text, path text) returns bigint
language plpgsql security definer
set search_path = pg_catalog
as $$
declare
  n bigint;
begin
  perform set_config('search_path', path, true);
  execute change_sql;
  get diagnostics n = row_count;
  return n;
end;
$$;
alter function snapbase_sandbox.run_change(text, text) owner to :ROLE_CHANGE_RUNNER;
revoke create on schema snapbase_sandbox from :ROLE_CHANGE_RUNNER;
revoke all on function snapbase_sandbox.run_change(text, text) from public;
grant execute on function snapbase_sandbox.run_change(text, text) to :DATABASE_OWNER;
comment on function snapbase_sandbox.run_change(text, text) is
  'Runs checked change SQL as the change runner, which holds (for the approving transaction only) the managed table and what the change reads. Owner only.';

-- Runs checked change SQL for `target` as the change runner and returns the rows
-- affected. The runner is granted what the change needs for this transaction only:
-- the grants are revoked before returning (and undone with it on error).
create function snapbase_private.execute_change(target regclass, change_sql text, probe snapbase_private.probe_result)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  runner name := snapbase_private.sandbox_role('change_runner');
  rel oid;
  seqs oid[];
  reads oid[];
  schemas oid[];
  sch oid;
  affected bigint;
  missing text;
begin
  select coalesce(array_agg(d.objid), '{}') into seqs
    from pg_depend d join pg_class c on c.oid = d.objid
   where d.classid = 'pg_class'::regclass and d.refobjid = target and d.deptype in ('a', 'i') and c.relkind = 'S';
  reads := array(select x from unnest(probe.relations) x where x <> target and x <> all (seqs));
  select array_agg(distinct c.relnamespace order by c.relnamespace) into schemas
    from pg_class c where c.oid = any (array[target::oid] || reads);
  -- The owner can only pass on what it may pass on.
  select string_agg(x::regclass::text, ', ') into missing from unnest(array[target::oid]) x
   where not (has_table_privilege(x, 'SELECT WITH GRANT OPTION') and has_table_privilege(x, 'INSERT WITH GRANT OPTION')
              and has_table_privilege(x, 'UPDATE WITH GRANT OPTION') and has_table_privilege(x, 'DELETE WITH GRANT OPTION'));
  select concat_ws(', ', missing, string_agg(x::regclass::text, ', ')) into missing from unnest(reads) x
   where not has_table_privilege(x, 'SELECT WITH GRANT OPTION');
  if missing <> '' then
    raise exception 'Snapbase''s owner cannot let the change use %: run GRANT ALL ON % TO % WITH GRANT OPTION', missing, missing, current_user
      using errcode = '42501';
  end if;
  -- Schema USAGE lets the runner find names; it is kept (it grants no data). One
  -- approval at a time changes a schema's grants.
  foreach sch in array schemas loop
    if not has_schema_privilege(runner, sch, 'USAGE') then
      perform pg_advisory_xact_lock(hashtext('snapbase schema grant'), sch::int);
      if not has_schema_privilege(runner, sch, 'USAGE') then
        execute format('grant usage on schema %I to %I', (select nspname from pg_namespace where oid = sch), runner);
      end if;
    end if;
  end loop;
  -- The target is locked by the approval; other relations' grants are serialised.
  foreach rel in array reads loop
    perform pg_advisory_xact_lock(hashtext('snapbase relation grant'), rel::int);
  end loop;
  execute format('grant select, insert, update, delete on table %s to %I', target, runner);
  foreach rel in array seqs loop
    execute format('grant usage, select on sequence %s to %I', rel::regclass, runner);
  end loop;
  foreach rel in array reads loop
    execute format('grant select on table %s to %I', rel::regclass, runner);
  end loop;

  affected := snapbase_sandbox.run_change(change_sql,
    format('pg_catalog, %I', (select n.nspname from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = target)));

  execute format('revoke all on table %s from %I', target, runner);
  foreach rel in array seqs loop
    execute format('revoke all on sequence %s from %I', rel::regclass, runner);
  end loop;
  foreach rel in array reads loop
    execute format('revoke all on table %s from %I', rel::regclass, runner);
  end loop;
  return affected;
end;
$$;
comment on function snapbase_private.execute_change(regclass, text, snapbase_private.probe_result) is
  'Runs checked change SQL as the change runner with grants that last only while it runs.';

--------------------------------------------------------------------------------
-- Submitting
--------------------------------------------------------------------------------

create or replace function snapbase_private.store_change_request(
  mt snapbase.managed_tables, kind snapbase.change_kind, change_sql text, edits jsonb, reason text, restore_snapshot_id bigint
) returns snapbase.change_requests
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  created snapbase.change_requests;
begin
  insert into snapbase.change_requests (managed_table_id, table_name, kind, sql, edits, reason, restore_snapshot_id,
                                        submitted_by, submitted_by_name, submitted_role)
  values (mt.id, mt.qualified_name, kind, change_sql, edits, reason, restore_snapshot_id,
          snapbase.current_user_id(), snapbase_private.actor_name(), snapbase_private.acting_role())
  returning * into created;
  perform snapbase_private.audit('submit', 'change_request', created.id::text, mt.qualified_name,
    jsonb_build_object('kind', kind, 'sql', change_sql, 'reason', reason));
  return created;
end;
$$;

-- The managed table behind `target`, for a submitter who may read it ("no managed
-- table" alike for tables that are not managed and for those you may not read).
create or replace function snapbase_private.managed_table_for(target regclass) returns snapbase.managed_tables
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  found snapbase.managed_tables;
begin
  select m.* into found from snapbase.managed_tables m where snapbase_private.relation_of(m) = target;
  if found.id is null or not coalesce(has_any_column_privilege(snapbase_private.acting_role(), target, 'SELECT'), false) then
    raise exception 'no managed table % that you may read (register it with snapbase.register_table)', target
      using errcode = '42501';
  end if;
  return found;
end;
$$;

create or replace function snapbase.submit_change(target regclass, sql text, reason text default null)
returns snapbase.change_requests
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  mt snapbase.managed_tables;
begin
  perform snapbase_private.require_role('editor');
  mt := snapbase_private.managed_table_for(target);
  perform snapbase_private.check_change_sql(target, sql, array[snapbase_private.acting_role()]);
  return snapbase_private.store_change_request(mt, 'sql', rtrim(btrim(sql), E'; \t\r\n'), null, reason, null);
end;
$$;

create or replace function snapbase.submit_edits(target regclass, edits jsonb, reason text default null)
returns snapbase.change_requests
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  mt snapbase.managed_tables;
  generated text;
begin
  perform snapbase_private.require_role('editor');
  mt := snapbase_private.managed_table_for(target);
  generated := snapbase_private.edits_to_sql(target, edits);
  perform snapbase_private.check_change_sql(target, generated, array[snapbase_private.acting_role()]);
  return snapbase_private.store_change_request(mt, 'edits', generated, edits, reason, null);
end;
$$;

--------------------------------------------------------------------------------
-- Approving
--------------------------------------------------------------------------------

-- Approval runs as the owner and checks the caller itself: an admin who may read
-- the table, not the submitter (unless allowed). The change runs as the change
-- runner; a restore (SQL Snapbase generates from a snapshot) runs as the owner.
-- A failure is recorded (failed, with SQLSTATE and message), audited, and raised
-- as a WARNING so that psql shows it.
create or replace function snapbase.approve_change(change_id bigint) returns snapbase.change_requests
language plpgsql
security definer
set search_path = pg_catalog
set client_min_messages = warning
as $$
declare
  cr snapbase.change_requests;
  mt snapbase.managed_tables;
  target regclass;
  affected bigint;
  err_code text;
  err_message text;
  snap snapbase.snapshots;
  probe snapbase_private.probe_result;
  done snapbase.change_requests;
begin
  perform snapbase_private.require_role('admin');
  cr := snapbase_private.lock_pending_change(change_id);
  select * into mt from snapbase.managed_tables where id = cr.managed_table_id;
  if not snapbase_private.can_read(mt) then
    raise exception 'no change request %', change_id using errcode = 'P0002';
  end if;
  if cr.kind <> 'restore' and cr.submitted_by is not null and cr.submitted_by = snapbase.current_user_id()
     and snapbase_private.setting_allow_self_approval() is not true then
    raise exception 'you submitted change request %; another admin must approve it', change_id using errcode = '42501';
  end if;
  target := snapbase_private.relation_of(mt);
  if target is null then
    done := snapbase_private.finish_change(change_id, 'failed', null, null, '42P01', format('table %s no longer exists', cr.table_name), null);
    raise warning 'change request % failed: table % no longer exists (SQLSTATE 42P01)', change_id, cr.table_name;
    return done;
  end if;
  -- Writers wait until this transaction ends; readers carry on.
  execute format('lock table %s in exclusive mode', target);
  begin
    if cr.kind = 'restore' then
      affected := snapbase_private.apply_restore(cr.restore_snapshot_id, target);
    else
      -- Checked again now: the table, the allow-list or the submitter's rights may have changed.
      probe := snapbase_private.check_change_sql(target, cr.sql, snapbase_private.submitter_roles(cr));
      affected := snapbase_private.execute_change(target, cr.sql, probe);
      if cr.kind = 'edits' then
        perform snapbase_private.check_edits_applied(cr.edits, affected);
      end if;
    end if;
  exception when others then
    get stacked diagnostics err_code = returned_sqlstate, err_message = message_text;
    -- Only the message (no DETAIL or HINT), and not without bound.
    err_message := left(err_message, 2000);
    done := snapbase_private.finish_change(change_id, 'failed', null, null, err_code, err_message, null);
    raise warning 'change request % failed: % (SQLSTATE %)', change_id, err_message, err_code;
    return done;
  end;
  snap := snapbase_private.capture_for_change(cr);
  return snapbase_private.finish_change(change_id, 'approved', affected, snap.id, null, null, null);
end;
$$;

create or replace function snapbase.reject_change(change_id bigint, reason text default null) returns snapbase.change_requests
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  cr snapbase.change_requests;
  mt snapbase.managed_tables;
begin
  perform snapbase_private.require_role('admin');
  cr := snapbase_private.lock_pending_change(change_id);
  select * into mt from snapbase.managed_tables where id = cr.managed_table_id;
  if not snapbase_private.can_read(mt) then
    raise exception 'no change request %', change_id using errcode = 'P0002';
  end if;
  return snapbase_private.finish_change(change_id, 'rejected', null, null, null, null, reason);
end;
$$;

-- Functions approve_change no longer needs to expose to the admin role.
revoke execute on function snapbase_private.lock_pending_change(bigint) from :ROLE_ADMIN;
revoke execute on function snapbase_private.finish_change(bigint, snapbase.change_status, bigint, bigint, text, text, text) from :ROLE_ADMIN;
revoke execute on function snapbase_private.capture_for_change(snapbase.change_requests) from :ROLE_ADMIN;
revoke execute on function snapbase_private.apply_restore(bigint, regclass) from :ROLE_ADMIN;
revoke execute on function snapbase_private.snapshot_records(bigint) from :ROLE_ADMIN;
revoke execute on function snapbase_private.edits_to_sql(regclass, jsonb) from :ROLE_VIEWER;
