--! Previous: sha1:0f21ae7df0b68c0a0701bb7271f0f89ba8e8932f
--! Hash: sha1:515c56902638a74befc4ea19c3d24374b20d6709
--! Message: change control: change requests, approval, chunked snapshots, diff, restore, retention

-- Change control: managed tables, change requests, approval with a snapshot of the
-- whole table in the same transaction, chunked deduplicated snapshot storage,
-- diff, restore and retention.
drop function if exists snapbase_private.relation_of cascade;
drop function if exists snapbase_private.can_read cascade;
drop function if exists snapbase_private.managed_table_for cascade;
drop function if exists snapbase_private.tg__snapshots_immutable cascade;
drop function if exists snapbase_private.table_columns cascade;
drop function if exists snapbase_private.primary_key cascade;
drop function if exists snapbase_private.ensure_layout cascade;
drop function if exists snapbase_private.capture_snapshot cascade;
drop function if exists snapbase_private.validate_change_sql cascade;
drop function if exists snapbase_private.validate_change_sql_as_owner cascade;
drop function if exists snapbase_private.actor_name cascade;
drop function if exists snapbase_private.store_change_request cascade;
drop function if exists snapbase_private.edits_to_sql cascade;
drop function if exists snapbase_private.lock_pending_change cascade;
drop function if exists snapbase_private.finish_change cascade;
drop function if exists snapbase_private.capture_for_change cascade;
drop function if exists snapbase_private.setting_allow_self_approval cascade;
drop function if exists snapbase_private.check_edits_applied cascade;
drop function if exists snapbase_private.readable_snapshot cascade;
drop function if exists snapbase_private.hidden_columns cascade;
drop function if exists snapbase_private.snapshot_records cascade;
drop function if exists snapbase_private.restore_fit cascade;
drop function if exists snapbase_private.describe_restore cascade;
drop function if exists snapbase_private.layout_type cascade;
drop function if exists snapbase_private.apply_restore cascade;
drop function if exists snapbase_private.prune_snapshots cascade;
drop function if exists snapbase_private.tg__change_submitted cascade;
drop function if exists snapbase.register_table(regclass, integer, integer);
drop function if exists snapbase.submit_change(regclass, text, text);
drop function if exists snapbase.submit_edits(regclass, jsonb, text);
drop function if exists snapbase.approve_change(bigint);
drop function if exists snapbase.reject_change(bigint, text);
drop function if exists snapbase.take_snapshot(regclass, text);
drop function if exists snapbase.snapshot_rows(bigint, bigint, bigint);
drop function if exists snapbase.snapshot_diff(bigint, bigint);
drop function if exists snapbase.restore_snapshot(bigint, text);
drop function if exists snapbase.resolve_managed_table(text);
drop table if exists snapbase_private.snapshot_chunks, snapbase_private.chunk_store, snapbase_private.row_layouts cascade;
drop table if exists snapbase.snapshots, snapbase.change_requests, snapbase.managed_tables cascade;
drop type if exists snapbase.change_status, snapbase.change_kind, snapbase.snapshot_diff_row cascade;
do $$ declare t record; begin
  for t in select typname from pg_type where typnamespace = 'snapbase_private'::regnamespace and typname ~ '^layout_\d+$' and typtype = 'c' loop
    execute format('drop type snapbase_private.%I cascade', t.typname);
  end loop;
end $$;

--------------------------------------------------------------------------------
-- Managed tables
--------------------------------------------------------------------------------

create table snapbase.managed_tables (
  id bigint generated always as identity primary key,
  schema_name text not null,
  table_name text not null,
  qualified_name text generated always as (schema_name || '.' || table_name) stored,
  keep_last integer check (keep_last is null or keep_last >= 1),
  keep_days integer check (keep_days is null or keep_days >= 1),
  registered_at timestamptz not null default now(),
  registered_by text not null,
  unique (schema_name, table_name)
);
comment on table snapbase.managed_tables is 'Live tables under change control, with their snapshot retention policy.';
comment on column snapbase.managed_tables.keep_last is 'Keep at least the newest N snapshots (null: no count limit).';
comment on column snapbase.managed_tables.keep_days is 'Keep snapshots younger than D days (null: no age limit). The newest snapshot is never pruned.';

create function snapbase_private.relation_of(mt snapbase.managed_tables) returns regclass
language sql stable
set search_path = pg_catalog
as $$
  select to_regclass(format('%I.%I', mt.schema_name, mt.table_name))
$$;

-- May the caller read this live table? Snapshots, change requests and diffs follow it.
create function snapbase_private.can_read(mt snapbase.managed_tables) returns boolean
language sql stable
set search_path = pg_catalog
as $$
  select coalesce(has_any_column_privilege(snapbase_private.caller_role(), snapbase_private.relation_of(mt), 'SELECT'), false)
$$;
grant execute on function snapbase_private.relation_of(snapbase.managed_tables) to :ROLE_VIEWER, :ROLE_AGENT;
grant execute on function snapbase_private.can_read(snapbase.managed_tables) to :ROLE_VIEWER, :ROLE_AGENT;

alter table snapbase.managed_tables enable row level security;
create policy select_readable on snapbase.managed_tables for select
  using (snapbase_private.can_read(managed_tables));
grant select on snapbase.managed_tables to :ROLE_VIEWER;

create function snapbase.register_table(target regclass, keep_last integer default 50, keep_days integer default null)
returns snapbase.managed_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  rel record;
  registered snapbase.managed_tables;
begin
  perform snapbase_private.require_role('admin');
  select n.nspname, c.relname, c.relkind into rel
    from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = target;
  if rel.relkind not in ('r', 'p') then
    raise exception '% is not a table', target using errcode = '42809';
  end if;
  if rel.nspname in ('snapbase', 'snapbase_private', 'pg_catalog', 'information_schema') then
    raise exception 'tables in schema % cannot be placed under change control', rel.nspname using errcode = '42501';
  end if;
  insert into snapbase.managed_tables (schema_name, table_name, keep_last, keep_days, registered_by)
  values (rel.nspname, rel.relname, keep_last, keep_days,
          coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user))
  on conflict (schema_name, table_name) do update
    set keep_last = excluded.keep_last, keep_days = excluded.keep_days
  returning * into registered;
  perform snapbase_private.audit('register_table', 'managed_table', registered.id::text, registered.qualified_name,
    jsonb_build_object('keep_last', keep_last, 'keep_days', keep_days));
  return registered;
end;
$$;
comment on function snapbase.register_table(regclass, integer, integer) is 'Put a table under change control (admins). Re-registering updates the retention policy.';
grant execute on function snapbase.register_table(regclass, integer, integer) to :ROLE_VIEWER;

-- The managed table for a name as people type it: `dev.users`, or `users` when only
-- one managed table has that name.
create function snapbase.resolve_managed_table(name text) returns snapbase.managed_tables
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  found snapbase.managed_tables;
  candidates text;
  n integer;
begin
  select count(*), string_agg(m.qualified_name, ', ' order by m.qualified_name) into n, candidates
    from snapbase.managed_tables m
   where m.qualified_name = name or (position('.' in name) = 0 and m.table_name = name);
  if n = 0 then
    raise exception 'no managed table named %', name using errcode = 'P0002';
  elsif n > 1 then
    raise exception 'table name % is ambiguous: %', name, candidates using errcode = '42P09';
  end if;
  select * into found from snapbase.managed_tables m
   where m.qualified_name = name or (position('.' in name) = 0 and m.table_name = name);
  return found;
end;
$$;
comment on function snapbase.resolve_managed_table(text) is 'The managed table for `schema.table`, or for a bare name when it is unique.';
grant execute on function snapbase.resolve_managed_table(text) to :ROLE_VIEWER;

create function snapbase_private.managed_table_for(target regclass) returns snapbase.managed_tables
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  found snapbase.managed_tables;
begin
  select m.* into found from snapbase.managed_tables m
   where snapbase_private.relation_of(m) = target;
  if found.id is null then
    raise exception 'table % is not under change control (register it with snapbase.register_table)', target
      using errcode = '42501';
  end if;
  return found;
end;
$$;
grant execute on function snapbase_private.managed_table_for(regclass) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Change requests
--------------------------------------------------------------------------------

create type snapbase.change_status as enum ('pending', 'approved', 'rejected', 'failed');
create type snapbase.change_kind as enum ('sql', 'edits', 'restore');

create table snapbase.change_requests (
  id bigint generated always as identity primary key,
  managed_table_id bigint not null references snapbase.managed_tables on delete restrict,
  table_name text not null,
  kind snapbase.change_kind not null default 'sql',
  sql text not null,
  edits jsonb,
  restore_snapshot_id bigint,
  reason text,
  status snapbase.change_status not null default 'pending',
  submitted_by bigint references snapbase.users on delete set null,
  submitted_by_name text not null,
  submitted_at timestamptz not null default now(),
  decided_by bigint references snapbase.users on delete set null,
  decided_by_name text,
  decided_at timestamptz,
  decision_reason text,
  rows_affected bigint,
  snapshot_id bigint,
  error_code text,
  error_message text
);
create index change_requests_status_idx on snapbase.change_requests (status, id desc);
create index change_requests_table_idx on snapbase.change_requests (managed_table_id, id desc);
create index change_requests_submitted_by_idx on snapbase.change_requests (submitted_by);
comment on table snapbase.change_requests is 'Proposed changes to managed tables: pending, then approved, rejected or failed.';
comment on column snapbase.change_requests.sql is 'Exactly the statement that runs on approval (generated for structured edits and restores).';

alter table snapbase.change_requests enable row level security;
create policy select_readable on snapbase.change_requests for select
  using (exists (select 1 from snapbase.managed_tables m where m.id = managed_table_id));
grant select on snapbase.change_requests to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Snapshot storage
--------------------------------------------------------------------------------
-- A snapshot is an ordered list of chunks. Rows are kept in their exact PostgreSQL
-- text form (record_out, with fixed DateStyle/TimeZone/float settings), ordered by
-- primary key; a chunk ends after each row whose key hashes to 0 mod 256, so chunk
-- boundaries depend on content, not position: a change to one row changes one
-- chunk, and an insert or delete does not shift the others. Chunks are stored once
-- per content hash and compressed by TOAST (lz4 where the server has it).

-- One composite type per distinct column layout, so a snapshot reads back exactly as
-- it was even after the live table is altered.
create table snapbase_private.row_layouts (
  id bigint generated always as identity primary key,
  columns jsonb not null,
  signature text not null unique,
  type_name text not null
);

create table snapbase.snapshots (
  id bigint generated always as identity primary key,
  managed_table_id bigint not null references snapbase.managed_tables on delete restrict,
  table_name text not null,
  change_request_id bigint references snapbase.change_requests on delete restrict,
  reason text,
  created_at timestamptz not null default now(),
  created_by text not null,
  record_count bigint not null,
  columns jsonb not null,
  primary_key text[],
  chunk_count integer not null,
  stored_bytes bigint not null,
  new_stored_bytes bigint not null,
  layout_id bigint not null references snapbase_private.row_layouts
);
create index snapshots_table_idx on snapbase.snapshots (managed_table_id, id desc);
comment on table snapbase.snapshots is 'Immutable, complete copies of a whole managed table. Nobody may update or delete them; only the retention job prunes.';
comment on column snapbase.snapshots.stored_bytes is 'Compressed size of all chunks this snapshot references.';
comment on column snapbase.snapshots.new_stored_bytes is 'Compressed size of the chunks this snapshot added (the rest were already stored).';

alter table snapbase.change_requests
  add constraint change_requests_snapshot_fk foreign key (snapshot_id) references snapbase.snapshots on delete set null,
  add constraint change_requests_restore_fk foreign key (restore_snapshot_id) references snapbase.snapshots on delete set null;

create table snapbase_private.chunk_store (
  hash bytea primary key,
  row_count integer not null,
  rows text[] not null
);
do $$ begin
  alter table snapbase_private.chunk_store alter column rows set compression lz4;
exception when feature_not_supported or invalid_parameter_value then
  null; -- server built without lz4: TOAST's default pglz
end $$;

create table snapbase_private.snapshot_chunks (
  snapshot_id bigint not null references snapbase.snapshots on delete cascade,
  seq integer not null,
  first_row bigint not null,
  chunk_hash bytea not null references snapbase_private.chunk_store,
  primary key (snapshot_id, seq)
);
create index snapshot_chunks_hash_idx on snapbase_private.snapshot_chunks (chunk_hash);

-- Immutability: snapshots change only inside the retention job's prune function.
create function snapbase_private.tg__snapshots_immutable() returns trigger
language plpgsql
set search_path = pg_catalog
as $$
begin
  if tg_op = 'DELETE' and current_setting('snapbase.pruning', true) = 'on' then
    return old;
  end if;
  raise exception 'snapshots are immutable: % is not allowed (only the retention job prunes)', lower(tg_op)
    using errcode = '42501';
end;
$$;
create trigger _100_immutable before update or delete on snapbase.snapshots
  for each row execute function snapbase_private.tg__snapshots_immutable();
create trigger _100_immutable_truncate before truncate on snapbase.snapshots
  for each statement execute function snapbase_private.tg__append_only();
create trigger _100_immutable before update or delete on snapbase_private.snapshot_chunks
  for each row execute function snapbase_private.tg__snapshots_immutable();

alter table snapbase.snapshots enable row level security;
create policy select_readable on snapbase.snapshots for select
  using (exists (select 1 from snapbase.managed_tables m where m.id = managed_table_id));
grant select on snapbase.snapshots to :ROLE_VIEWER;

-- The table's current columns, in order, as [{name, type}].
create function snapbase_private.table_columns(target regclass) returns jsonb
language sql stable
set search_path = pg_catalog
as $$
  select coalesce(jsonb_agg(jsonb_build_object('name', a.attname, 'type', format_type(a.atttypid, a.atttypmod)) order by a.attnum), '[]')
    from pg_attribute a
   where a.attrelid = target and a.attnum > 0 and not a.attisdropped
$$;

create function snapbase_private.primary_key(target regclass) returns text[]
language sql stable
set search_path = pg_catalog
as $$
  select array_agg(a.attname order by k.ord)
    from pg_index i
    cross join lateral unnest(i.indkey) with ordinality as k(attnum, ord)
    join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
   where i.indrelid = target and i.indisprimary
$$;

create function snapbase_private.ensure_layout(columns jsonb) returns snapbase_private.row_layouts
language plpgsql
set search_path = pg_catalog
as $$
declare
  sig text := md5(columns::text);
  layout snapbase_private.row_layouts;
begin
  select * into layout from snapbase_private.row_layouts where signature = sig;
  if layout.id is not null then
    return layout;
  end if;
  perform pg_advisory_xact_lock(hashtext('snapbase layout ' || sig));
  select * into layout from snapbase_private.row_layouts where signature = sig;
  if layout.id is null then
    insert into snapbase_private.row_layouts (columns, signature, type_name)
      values (columns, sig, 'pending') returning * into layout;
    layout.type_name := format('snapbase_private.layout_%s', layout.id);
    update snapbase_private.row_layouts set type_name = layout.type_name where id = layout.id;
    execute format('create type %s as (%s)', layout.type_name,
      (select string_agg(format('%I %s', c ->> 'name', c ->> 'type'), ', ') from jsonb_array_elements(columns) c));
  end if;
  return layout;
end;
$$;

-- Stores the table as it stands now. Runs as the owner; callers check rights.
create function snapbase_private.capture_snapshot(mt snapbase.managed_tables, change_request_id bigint, reason text)
returns snapbase.snapshots
language plpgsql
security definer
set search_path = pg_catalog
-- Fixed output settings make each row's text form exact and reproducible.
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set timezone = 'UTC'
set extra_float_digits = 3
set bytea_output = 'hex'
as $$
declare
  target regclass := snapbase_private.relation_of(mt);
  cols jsonb;
  pk text[];
  layout snapbase_private.row_layouts;
  order_by text;
  boundary_key text;
  snap snapbase.snapshots;
begin
  if target is null then
    raise exception 'managed table % no longer exists', mt.qualified_name using errcode = '42P01';
  end if;
  cols := snapbase_private.table_columns(target);
  pk := snapbase_private.primary_key(target);
  layout := snapbase_private.ensure_layout(cols);
  if pk is not null then
    order_by := (select string_agg(format('t.%I', c), ', ') from unnest(pk) c);
    boundary_key := case when cardinality(pk) = 1 then format('hashtext(t.%I::text)', pk[1])
                         else format('hashtext(row(%s)::text)', order_by) end;
  else
    order_by := 't::text';
    boundary_key := 'hashtext(t::text)';
  end if;

  create temp table if not exists snapbase_capture (
    seq integer, first_row bigint, row_count integer, hash bytea, rows text[], existed boolean
  ) on commit drop;
  truncate snapbase_capture;
  execute format($q$
    insert into snapbase_capture (seq, first_row, row_count, hash, rows)
    select c.seq, coalesce(sum(c.row_count) over (order by c.seq rows between unbounded preceding and 1 preceding), 0),
           c.row_count, sha256(convert_to(array_to_string(c.rows, E'\x1e'), 'UTF8')), c.rows
      from (
        select b.seq::integer as seq, count(*)::integer as row_count, array_agg(b.rec order by b.ord) as rows
          from (
            select r.rec, r.ord,
                   coalesce(sum(r.ends) over (order by r.ord rows between unbounded preceding and 1 preceding), 0) as seq
              from (
                select t::text as rec, row_number() over (order by %1$s) as ord,
                       (%2$s & 255 = 0)::int as ends
                  from %3$s t
              ) r
          ) b
         group by b.seq
      ) c
  $q$, order_by, boundary_key, target);

  update snapbase_capture c set existed = exists (select 1 from snapbase_private.chunk_store cs where cs.hash = c.hash);
  insert into snapbase_private.chunk_store (hash, row_count, rows)
    select distinct on (hash) hash, row_count, rows from snapbase_capture where not existed
  on conflict (hash) do nothing;

  insert into snapbase.snapshots (managed_table_id, table_name, change_request_id, reason, created_by,
                                  record_count, columns, primary_key, chunk_count, stored_bytes, new_stored_bytes, layout_id)
  select mt.id, mt.qualified_name, change_request_id, reason,
         coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user),
         coalesce(sum(c.row_count), 0), cols, pk, count(*),
         coalesce(sum(pg_column_size(cs.rows)), 0),
         coalesce(sum(pg_column_size(cs.rows)) filter (where not c.existed), 0),
         layout.id
    from snapbase_capture c join snapbase_private.chunk_store cs on cs.hash = c.hash
  returning * into snap;
  insert into snapbase_private.snapshot_chunks (snapshot_id, seq, first_row, chunk_hash)
    select snap.id, seq, first_row, hash from snapbase_capture;
  truncate snapbase_capture;

  perform pg_notify('snapbase:snapshots', json_build_object('kind', 'snapshot_created', 'id', snap.id,
    'managed_table_id', mt.id, 'change_request_id', change_request_id, 'record_count', snap.record_count)::text);
  return snap;
end;
$$;

--------------------------------------------------------------------------------
-- Validating change SQL with PostgreSQL itself
--------------------------------------------------------------------------------
-- The statement is planned with EXPLAIN through a cursor: PostgreSQL refuses to
-- open a cursor over more than one statement *before running anything*, and
-- EXPLAIN (without ANALYZE) plans without executing. Only INSERT, UPDATE, DELETE
-- and MERGE produce a ModifyTable plan node; every ModifyTable node (data-modifying
-- CTEs included) must target the declared table.
create function snapbase_private.validate_change_sql(target regclass, change_sql text) returns void
language plpgsql
set search_path = pg_catalog
as $$
declare
  plan_cursor refcursor;
  plan json;
  top json;
  node json;
  modified text[];
  expected text;
  err text;
begin
  if change_sql is null or btrim(change_sql) = '' then
    raise exception 'the change SQL is empty' using errcode = '22023';
  end if;
  select format('%I.%I', n.nspname, c.relname) into expected
    from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = target;
  begin
    open plan_cursor for execute 'explain (verbose, format json) ' || change_sql;
    fetch plan_cursor into plan;
    close plan_cursor;
  exception
    when others then
      get stacked diagnostics err = message_text;
      if err like 'cannot open multi-query plan as cursor%' then
        raise exception 'the change must be exactly one statement; this text holds several' using errcode = '42601';
      elsif sqlstate = '42601' then
        raise exception 'the change must be one INSERT, UPDATE, DELETE or MERGE statement: %', err using errcode = '42601';
      end if;
      raise exception 'the change does not plan: %', err using errcode = sqlstate;
  end;
  top := plan -> 0 -> 'Plan';
  if top ->> 'Node Type' <> 'ModifyTable' then
    raise exception 'the change must be an INSERT, UPDATE, DELETE or MERGE (this statement modifies nothing)'
      using errcode = '42601';
  end if;
  with recursive nodes(n) as (
    select top
    union all
    select child from nodes, json_array_elements(coalesce(nodes.n -> 'Plans', '[]')) child
  )
  select array_agg(distinct format('%I.%I', n ->> 'Schema', n ->> 'Relation Name')) into modified
    from nodes where n ->> 'Node Type' = 'ModifyTable';
  if modified <> array[expected] then
    raise exception 'the change may modify only %, but it modifies %', expected, array_to_string(modified, ', ')
      using errcode = '42501';
  end if;
end;
$$;

-- Validation plans as the owner so editors (who cannot write managed tables) may
-- submit; the change itself runs only on approval, as the approver.
create function snapbase_private.validate_change_sql_as_owner(target regclass, change_sql text) returns void
language sql
security definer
set search_path = pg_catalog
as $$
  select snapbase_private.validate_change_sql(target, change_sql)
$$;
grant execute on function snapbase_private.validate_change_sql_as_owner(regclass, text) to :ROLE_VIEWER;

create function snapbase_private.actor_name() returns text
language sql stable
set search_path = pg_catalog
as $$
  select coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user)
$$;
grant execute on function snapbase_private.actor_name() to :ROLE_ANONYMOUS, :ROLE_VIEWER, :ROLE_AGENT;

create function snapbase_private.store_change_request(
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
                                        submitted_by, submitted_by_name)
  values (mt.id, mt.qualified_name, kind, change_sql, edits, reason, restore_snapshot_id,
          snapbase.current_user_id(), snapbase_private.actor_name())
  returning * into created;
  perform snapbase_private.audit('submit', 'change_request', created.id::text, mt.qualified_name,
    jsonb_build_object('kind', kind, 'sql', change_sql, 'reason', reason));
  return created;
end;
$$;
grant execute on function snapbase_private.store_change_request(snapbase.managed_tables, snapbase.change_kind, text, jsonb, text, bigint) to :ROLE_VIEWER;

create function snapbase.submit_change(target regclass, sql text, reason text default null)
returns snapbase.change_requests
language plpgsql
set search_path = pg_catalog
as $$
declare
  mt snapbase.managed_tables;
begin
  perform snapbase_private.require_role('editor');
  mt := snapbase_private.managed_table_for(target);
  perform snapbase_private.validate_change_sql_as_owner(target, sql);
  return snapbase_private.store_change_request(mt, 'sql', btrim(sql), null, reason, null);
end;
$$;
comment on function snapbase.submit_change(regclass, text, text) is 'Propose one INSERT, UPDATE, DELETE or MERGE on a managed table (editors and admins).';
grant execute on function snapbase.submit_change(regclass, text, text) to :ROLE_VIEWER;

-- Structured edits: {"insert": [{col: value, ...}], "update": [{"key": {pk: v}, "set": {col: v}}],
-- "delete": [{pk: v}]} become one MERGE keyed by the primary key.
create function snapbase_private.edits_to_sql(target regclass, edits jsonb) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  pk text[] := snapbase_private.primary_key(target);
  cols text[] := array(select c ->> 'name' from jsonb_array_elements(snapbase_private.table_columns(target)) c);
  items jsonb := '[]';
  e jsonb;
  k text;
  update_cols text[] := '{}';
  insert_cols text[] := '{}';
  clauses text[] := '{}';
  bad text;
begin
  if pk is null then
    raise exception 'structured edits need a primary key on %', target using errcode = '42P10';
  end if;
  if jsonb_typeof(edits) <> 'object' or exists (select 1 from jsonb_object_keys(edits) x where x not in ('insert', 'update', 'delete')) then
    raise exception 'edits must be an object with "insert", "update" and/or "delete" arrays' using errcode = '22023';
  end if;
  for e in select * from jsonb_array_elements(coalesce(edits -> 'insert', '[]')) loop
    if jsonb_typeof(e) <> 'object' then raise exception 'each insert must be an object of column values' using errcode = '22023'; end if;
    items := items || jsonb_build_object('op', 'insert', 'row', e);
    insert_cols := insert_cols || array(select jsonb_object_keys(e));
  end loop;
  for e in select * from jsonb_array_elements(coalesce(edits -> 'update', '[]')) loop
    if jsonb_typeof(e -> 'key') <> 'object' or jsonb_typeof(e -> 'set') <> 'object' or e -> 'set' = '{}' then
      raise exception 'each update must be {"key": {...primary key...}, "set": {...columns...}}' using errcode = '22023';
    end if;
    items := items || jsonb_build_object('op', 'update', 'row', (e -> 'key') || (e -> 'set'), 'set', e -> 'set');
    update_cols := update_cols || array(select jsonb_object_keys(e -> 'set'));
  end loop;
  for e in select * from jsonb_array_elements(coalesce(edits -> 'delete', '[]')) loop
    if jsonb_typeof(e) <> 'object' then raise exception 'each delete must be an object holding the primary key' using errcode = '22023'; end if;
    items := items || jsonb_build_object('op', 'delete', 'row', e);
  end loop;
  if jsonb_array_length(items) = 0 then
    raise exception 'edits hold no insert, update or delete' using errcode = '22023';
  end if;
  -- Every row must carry its full key; every column must exist.
  select string_agg(distinct x, ', ') into bad
    from jsonb_array_elements(items) i, jsonb_object_keys(i -> 'row') x where x <> all (cols);
  if bad is not null then
    raise exception 'edits name columns that % does not have: %', target, bad using errcode = '42703';
  end if;
  foreach k in array pk loop
    if exists (select 1 from jsonb_array_elements(items) i where i -> 'row' -> k is null or i -> 'row' -> k = 'null') then
      raise exception 'every edit must give the primary key column %', k using errcode = '22023';
    end if;
  end loop;
  select array_agg(distinct c order by c) into update_cols from unnest(update_cols) c where c <> all (pk);
  select array_agg(distinct c order by c) into insert_cols from unnest(insert_cols) c;
  if exists (select 1 from jsonb_array_elements(items) i where i ->> 'op' = 'delete') then
    clauses := clauses || 'WHEN MATCHED AND s.op = ''delete'' THEN DELETE'::text;
  end if;
  if update_cols is not null then
    clauses := clauses || format('WHEN MATCHED AND s.op = ''update'' THEN UPDATE SET %s',
      (select string_agg(format('%1$I = CASE WHEN s.set ? %2$L THEN s.%1$I ELSE t.%1$I END', c, c), ', ') from unnest(update_cols) c));
  end if;
  if insert_cols is not null then
    clauses := clauses || format('WHEN NOT MATCHED AND s.op = ''insert'' THEN INSERT (%s) VALUES (%s)',
      (select string_agg(format('%I', c), ', ') from unnest(insert_cols) c),
      (select string_agg(format('s.%I', c), ', ') from unnest(insert_cols) c));
  end if;
  return format(E'MERGE INTO %s AS t\nUSING (\n  SELECT e.op, e.set, r.*\n    FROM jsonb_to_recordset(%L::jsonb) AS e(op text, "row" jsonb, set jsonb),\n         LATERAL jsonb_populate_record(NULL::%s, e."row") AS r\n) AS s\nON %s\n%s',
    target, items, target,
    (select string_agg(format('t.%1$I = s.%1$I', c), ' AND ') from unnest(pk) c),
    array_to_string(clauses, E'\n'));
end;
$$;

create function snapbase.submit_edits(target regclass, edits jsonb, reason text default null)
returns snapbase.change_requests
language plpgsql
set search_path = pg_catalog
as $$
declare
  mt snapbase.managed_tables;
  generated text;
begin
  perform snapbase_private.require_role('editor');
  mt := snapbase_private.managed_table_for(target);
  generated := snapbase_private.edits_to_sql(target, edits);
  perform snapbase_private.validate_change_sql_as_owner(target, generated);
  return snapbase_private.store_change_request(mt, 'edits', generated, edits, reason, null);
end;
$$;
comment on function snapbase.submit_edits(regclass, jsonb, text) is 'Propose row edits as JSON ({"insert": [...], "update": [{"key", "set"}], "delete": [...]}); stored with the MERGE generated from them.';
grant execute on function snapbase.submit_edits(regclass, jsonb, text) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Approval
--------------------------------------------------------------------------------

create function snapbase_private.lock_pending_change(change_id bigint) returns snapbase.change_requests
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  cr snapbase.change_requests;
begin
  select * into cr from snapbase.change_requests where id = change_id for update;
  if cr.id is null then
    raise exception 'no change request %', change_id using errcode = 'P0002';
  end if;
  if cr.status <> 'pending' then
    raise exception 'change request % is %, not pending', change_id, cr.status using errcode = '55000';
  end if;
  return cr;
end;
$$;
grant execute on function snapbase_private.lock_pending_change(bigint) to :ROLE_ADMIN;

create function snapbase_private.finish_change(
  change_id bigint, outcome snapbase.change_status, affected bigint, snap_id bigint, err_code text, err_message text, note text
) returns snapbase.change_requests
language plpgsql
security definer
set search_path = pg_catalog
as $$
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
  perform pg_notify('snapbase:changes', json_build_object('kind', 'change_' || outcome, 'id', cr.id,
    'managed_table_id', cr.managed_table_id, 'snapshot_id', snap_id, 'actor', snapbase_private.actor_name())::text);
  return cr;
end;
$$;
grant execute on function snapbase_private.finish_change(bigint, snapbase.change_status, bigint, bigint, text, text, text) to :ROLE_ADMIN;

create function snapbase_private.capture_for_change(cr snapbase.change_requests) returns snapbase.snapshots
language sql
security definer
set search_path = pg_catalog
as $$
  select snapbase_private.capture_snapshot(m, cr.id, coalesce(cr.reason, format('change request %s', cr.id)))
    from snapbase.managed_tables m where m.id = cr.managed_table_id
$$;
grant execute on function snapbase_private.capture_for_change(snapbase.change_requests) to :ROLE_ADMIN;

-- Runs as the approver (SECURITY INVOKER): the change executes with their rights.
create function snapbase.approve_change(change_id bigint) returns snapbase.change_requests
language plpgsql
set search_path = pg_catalog
as $$
declare
  cr snapbase.change_requests;
  mt snapbase.managed_tables;
  target regclass;
  affected bigint;
  err_code text;
  err_message text;
  snap snapbase.snapshots;
begin
  perform snapbase_private.require_role('admin');
  cr := snapbase_private.lock_pending_change(change_id);
  if cr.kind <> 'restore' and cr.submitted_by is not null and cr.submitted_by = snapbase.current_user_id()
     and snapbase_private.setting_allow_self_approval() is not true then
    raise exception 'you submitted change request %; another admin must approve it', change_id using errcode = '42501';
  end if;
  select * into mt from snapbase.managed_tables where id = cr.managed_table_id;
  if mt.id is null then
    raise exception 'you cannot read %, so you cannot approve changes to it', cr.table_name using errcode = '42501';
  end if;
  target := snapbase_private.relation_of(mt);
  if target is null then
    return snapbase_private.finish_change(change_id, 'failed', null, null, '42P01', format('table %s no longer exists', cr.table_name), null);
  end if;
  -- Writers wait until this transaction ends; readers carry on.
  execute format('lock table %s in exclusive mode', target);
  begin
    if cr.kind = 'restore' then
      affected := snapbase_private.apply_restore(cr.restore_snapshot_id, target);
    else
      perform snapbase_private.validate_change_sql(target, cr.sql);
      execute cr.sql;
      get diagnostics affected = row_count;
      if cr.kind = 'edits' then
        perform snapbase_private.check_edits_applied(cr.edits, affected);
      end if;
    end if;
  exception when others then
    get stacked diagnostics err_code = returned_sqlstate, err_message = message_text;
    return snapbase_private.finish_change(change_id, 'failed', null, null, err_code, err_message, null);
  end;
  snap := snapbase_private.capture_for_change(cr);
  return snapbase_private.finish_change(change_id, 'approved', affected, snap.id, null, null, null);
end;
$$;
comment on function snapbase.approve_change(bigint) is 'Apply a pending change as the approving admin, snapshot the whole table and audit it, in one transaction. A failing change leaves nothing behind and marks the request failed.';
grant execute on function snapbase.approve_change(bigint) to :ROLE_VIEWER;

create function snapbase_private.setting_allow_self_approval() returns boolean
language sql stable
security definer
set search_path = pg_catalog
as $$
  select coalesce(snapbase_private.setting('allow_self_approval')::boolean, false)
$$;
grant execute on function snapbase_private.setting_allow_self_approval() to :ROLE_ADMIN;

create function snapbase_private.check_edits_applied(edits jsonb, affected bigint) returns void
language plpgsql immutable
set search_path = pg_catalog
as $$
declare
  expected bigint := coalesce(jsonb_array_length(edits -> 'insert'), 0) + coalesce(jsonb_array_length(edits -> 'update'), 0)
                   + coalesce(jsonb_array_length(edits -> 'delete'), 0);
begin
  if affected <> expected then
    raise exception '% edits matched % rows: an updated or deleted key is missing, or an inserted key already exists', expected, affected
      using errcode = '23000';
  end if;
end;
$$;
grant execute on function snapbase_private.check_edits_applied(jsonb, bigint) to :ROLE_ADMIN;

create function snapbase.reject_change(change_id bigint, reason text default null) returns snapbase.change_requests
language plpgsql
set search_path = pg_catalog
as $$
begin
  perform snapbase_private.require_role('admin');
  perform snapbase_private.lock_pending_change(change_id);
  return snapbase_private.finish_change(change_id, 'rejected', null, null, null, null, reason);
end;
$$;
comment on function snapbase.reject_change(bigint, text) is 'Reject a pending change request (admins).';
grant execute on function snapbase.reject_change(bigint, text) to :ROLE_VIEWER;

create function snapbase.take_snapshot(target regclass, reason text default null) returns snapbase.snapshots
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  mt snapbase.managed_tables;
  snap snapbase.snapshots;
begin
  perform snapbase_private.require_role('admin');
  mt := snapbase_private.managed_table_for(target);
  -- A consistent copy: no writer may commit while we read.
  execute format('lock table %s in share mode', target);
  snap := snapbase_private.capture_snapshot(mt, null, coalesce(reason, 'manual snapshot'));
  perform snapbase_private.audit('snapshot', 'snapshot', snap.id::text, mt.qualified_name,
    jsonb_build_object('reason', snap.reason, 'record_count', snap.record_count));
  return snap;
end;
$$;
comment on function snapbase.take_snapshot(regclass, text) is 'Snapshot a managed table now (admins).';
grant execute on function snapbase.take_snapshot(regclass, text) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Reading snapshots
--------------------------------------------------------------------------------

-- The snapshot, if the caller may read its live table (else a clear error).
create function snapbase_private.readable_snapshot(snapshot_id bigint) returns snapbase.snapshots
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  snap snapbase.snapshots;
  mt snapbase.managed_tables;
begin
  select * into snap from snapbase.snapshots s where s.id = snapshot_id;
  if snap.id is null then
    raise exception 'no snapshot %', snapshot_id using errcode = 'P0002';
  end if;
  select * into mt from snapbase.managed_tables where id = snap.managed_table_id;
  if not snapbase_private.can_read(mt) then
    raise exception 'no snapshot %', snapshot_id using errcode = 'P0002';
  end if;
  if snapbase_private.relation_of(mt) is not null
     and (select c.relrowsecurity from pg_class c where c.oid = snapbase_private.relation_of(mt))
     and not pg_has_role(snapbase_private.caller_role(), (select c.relowner from pg_class c where c.oid = snapbase_private.relation_of(mt)), 'member')
     and not (select r.rolbypassrls or r.rolsuper from pg_roles r where r.rolname = snapbase_private.caller_role()) then
    raise exception 'snapshot % is of %, which has row-level security; only roles that bypass it may read its snapshots', snapshot_id, mt.qualified_name
      using errcode = '42501';
  end if;
  return snap;
end;
$$;

-- Columns of the live table the caller may not read are left out of every row.
create function snapbase_private.hidden_columns(snap snapbase.snapshots) returns text[]
language sql stable
set search_path = pg_catalog
as $$
  select coalesce(array_agg(c ->> 'name'), '{}')
    from jsonb_array_elements(snap.columns) c
    join snapbase.managed_tables m on m.id = snap.managed_table_id
   where not coalesce(has_column_privilege(snapbase_private.caller_role(), snapbase_private.relation_of(m), c ->> 'name', 'SELECT'), false)
$$;

create function snapbase.snapshot_rows(snapshot_id bigint, offset_rows bigint default 0, limit_rows bigint default null)
returns table (ordinal bigint, "row" jsonb)
language plpgsql stable
security definer
set search_path = pg_catalog
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set timezone = 'UTC'
set extra_float_digits = 3
set bytea_output = 'hex'
as $$
declare
  snap snapbase.snapshots := snapbase_private.readable_snapshot(snapshot_id);
  layout text := (select type_name from snapbase_private.row_layouts where id = snap.layout_id);
  hidden text[] := snapbase_private.hidden_columns(snap);
  first_wanted bigint := greatest(coalesce(offset_rows, 0), 0);
  last_wanted bigint := case when limit_rows is null then null else first_wanted + greatest(limit_rows, 0) end;
begin
  -- Decode only the chunks that overlap the requested range.
  return query execute format($q$
    select sc.first_row + r.i - 1 as ordinal, to_jsonb(r.rec::%s) - $2 as "row"
      from snapbase_private.snapshot_chunks sc
      join snapbase_private.chunk_store cs on cs.hash = sc.chunk_hash
      cross join lateral unnest(cs.rows) with ordinality as r(rec, i)
     where sc.snapshot_id = $1
       and sc.first_row + cs.row_count > $3
       and ($4::bigint is null or sc.first_row < $4)
       and sc.first_row + r.i - 1 >= $3
       and ($4::bigint is null or sc.first_row + r.i - 1 < $4)
     order by sc.seq, r.i
  $q$, layout) using snap.id, hidden, first_wanted, last_wanted;
end;
$$;
comment on function snapbase.snapshot_rows(bigint, bigint, bigint) is 'Every row of a snapshot as jsonb, in primary-key order (optionally a range). Needs the right to read the live table.';
grant execute on function snapbase.snapshot_rows(bigint, bigint, bigint) to :ROLE_VIEWER;

create type snapbase.snapshot_diff_row as (
  change text,
  key jsonb,
  changed_fields text[],
  before jsonb,
  after jsonb
);
comment on type snapbase.snapshot_diff_row is 'One difference between two snapshots: added, removed or changed, by primary key.';

create function snapbase.snapshot_diff(from_id bigint, to_id bigint) returns setof snapbase.snapshot_diff_row
language plpgsql stable
security definer
set search_path = pg_catalog
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set timezone = 'UTC'
set extra_float_digits = 3
set bytea_output = 'hex'
as $$
declare
  a snapbase.snapshots := snapbase_private.readable_snapshot(from_id);
  b snapbase.snapshots := snapbase_private.readable_snapshot(to_id);
  key_cols text[];
  hidden text[];
begin
  if a.managed_table_id <> b.managed_table_id then
    raise exception 'snapshots % and % are of different tables (% and %)', from_id, to_id, a.table_name, b.table_name
      using errcode = '22023';
  end if;
  key_cols := coalesce(b.primary_key, a.primary_key);
  if key_cols is null or key_cols is distinct from a.primary_key then
    raise exception 'diff needs the same primary key in both snapshots' using errcode = '42P10';
  end if;
  hidden := snapbase_private.hidden_columns(b) || snapbase_private.hidden_columns(a);
  -- Chunks present in both snapshots hold identical rows: only the others are decoded.
  return query execute format($q$
    with only_a as (
      select to_jsonb(r.rec::%1$s) - $4 as j
        from snapbase_private.snapshot_chunks sc join snapbase_private.chunk_store cs on cs.hash = sc.chunk_hash,
             unnest(cs.rows) r(rec)
       where sc.snapshot_id = $1
         and not exists (select 1 from snapbase_private.snapshot_chunks o where o.snapshot_id = $2 and o.chunk_hash = sc.chunk_hash)
    ), only_b as (
      select to_jsonb(r.rec::%2$s) - $4 as j
        from snapbase_private.snapshot_chunks sc join snapbase_private.chunk_store cs on cs.hash = sc.chunk_hash,
             unnest(cs.rows) r(rec)
       where sc.snapshot_id = $2
         and not exists (select 1 from snapbase_private.snapshot_chunks o where o.snapshot_id = $1 and o.chunk_hash = sc.chunk_hash)
    ), keyed_a as (
      select (select jsonb_object_agg(k, j -> k) from unnest($3::text[]) k) as key, j from only_a
    ), keyed_b as (
      select (select jsonb_object_agg(k, j -> k) from unnest($3::text[]) k) as key, j from only_b
    )
    select case when ka.key is null then 'added' when kb.key is null then 'removed' else 'changed' end,
           coalesce(kb.key, ka.key),
           case when ka.key is not null and kb.key is not null then
             array(select f from (select jsonb_object_keys(ka.j || kb.j) as f) fs
                    where (ka.j -> f) is distinct from (kb.j -> f) order by f)
           end,
           ka.j, kb.j
      from keyed_a ka full join keyed_b kb on ka.key = kb.key
     where ka.j is distinct from kb.j
     order by coalesce(kb.key, ka.key)
  $q$,
    (select type_name from snapbase_private.row_layouts where id = a.layout_id),
    (select type_name from snapbase_private.row_layouts where id = b.layout_id))
  using a.id, b.id, key_cols, hidden;
end;
$$;
comment on function snapbase.snapshot_diff(bigint, bigint) is 'Rows added, removed and changed (with the changed fields) between two snapshots of one table, by primary key.';
grant execute on function snapbase.snapshot_diff(bigint, bigint) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Restore
--------------------------------------------------------------------------------

-- Row texts of a snapshot, for the restore run by the approving admin.
create function snapbase_private.snapshot_records(snapshot_id bigint) returns setof text
language sql stable
security definer
set search_path = pg_catalog
as $$
  select r.rec
    from snapbase_private.snapshot_chunks sc
    join snapbase_private.chunk_store cs on cs.hash = sc.chunk_hash
    cross join lateral unnest(cs.rows) r(rec)
   where sc.snapshot_id = snapshot_records.snapshot_id
$$;
grant execute on function snapbase_private.snapshot_records(bigint) to :ROLE_ADMIN;

create function snapbase_private.restore_fit(snap snapbase.snapshots, target regclass) returns void
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  now_cols jsonb := snapbase_private.table_columns(target);
  missing text;
  added text;
begin
  if now_cols = snap.columns then
    return;
  end if;
  select string_agg(format('%s %s', c ->> 'name', c ->> 'type'), ', ') into missing
    from jsonb_array_elements(snap.columns) c where not now_cols @> jsonb_build_array(c);
  select string_agg(format('%s %s', c ->> 'name', c ->> 'type'), ', ') into added
    from jsonb_array_elements(now_cols) c where not snap.columns @> jsonb_build_array(c);
  raise exception 'snapshot % no longer fits %: the snapshot has (%) that the table lacks, the table has (%) that the snapshot lacks',
    snap.id, snap.table_name, coalesce(missing, 'nothing'), coalesce(added, 'nothing')
    using errcode = '42804';
end;
$$;
grant execute on function snapbase_private.restore_fit(snapbase.snapshots, regclass) to :ROLE_ADMIN;

create function snapbase_private.describe_restore(snap snapbase.snapshots, target regclass) returns text
language sql stable
set search_path = pg_catalog
as $$
  select case when snap.primary_key is not null then format(
    E'-- restore %1$s to snapshot %2$s (%3$s rows), by primary key (%4$s):\n'
    '-- DELETE rows whose key is not in the snapshot;\n'
    '-- UPDATE rows whose values differ from the snapshot;\n'
    '-- INSERT snapshot rows whose key is missing.',
    target, snap.id, snap.record_count, array_to_string(snap.primary_key, ', '))
  else format(E'-- restore %1$s to snapshot %2$s (%3$s rows); no primary key:\n'
    '-- DELETE rows not in the snapshot and INSERT snapshot rows not in the table (matching whole rows).',
    target, snap.id, snap.record_count) end
$$;

create function snapbase_private.layout_type(layout_id bigint) returns text
language sql stable
security definer
set search_path = pg_catalog
as $$
  select type_name from snapbase_private.row_layouts where id = layout_id
$$;
grant execute on function snapbase_private.layout_type(bigint) to :ROLE_ADMIN;
grant execute on function snapbase_private.table_columns(regclass) to :ROLE_VIEWER;
grant execute on function snapbase_private.primary_key(regclass) to :ROLE_VIEWER;
grant execute on function snapbase_private.edits_to_sql(regclass, jsonb) to :ROLE_VIEWER;
grant execute on function snapbase_private.readable_snapshot(bigint) to :ROLE_VIEWER;
grant execute on function snapbase_private.hidden_columns(snapbase.snapshots) to :ROLE_VIEWER;
grant execute on function snapbase_private.describe_restore(snapbase.snapshots, regclass) to :ROLE_ADMIN;
grant execute on function snapbase_private.validate_change_sql(regclass, text) to :ROLE_ADMIN;

-- Puts the table back to the snapshot with the fewest row operations. Runs as the
-- approving admin (invoker), inside approve_change.
create function snapbase_private.apply_restore(snapshot_id bigint, target regclass) returns bigint
language plpgsql
set search_path = pg_catalog
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set timezone = 'UTC'
set extra_float_digits = 3
set bytea_output = 'hex'
as $$
declare
  snap snapbase.snapshots;
  layout text;
  pk text[];
  writable text[];
  key_match text;
  n bigint;
  total bigint := 0;
begin
  select * into snap from snapbase.snapshots s where s.id = snapshot_id;
  perform snapbase_private.restore_fit(snap, target);
  layout := snapbase_private.layout_type(snap.layout_id);
  pk := snap.primary_key;
  writable := array(select a.attname::text from pg_attribute a
                     where a.attrelid = target and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''
                     order by a.attnum);
  drop table if exists snapbase_restore_source;
  execute format('create temp table snapbase_restore_source on commit drop as select (r::%s).* from snapbase_private.snapshot_records($1) r', layout)
    using snap.id;
  if pk is not null then
    key_match := (select string_agg(format('t.%1$I = s.%1$I', c), ' and ') from unnest(pk) c);
    execute format('delete from %s t where not exists (select 1 from snapbase_restore_source s where %s)', target, key_match);
    get diagnostics n = row_count; total := total + n;
    execute format('update %s t set %s from snapbase_restore_source s where %s and row(%s)::text is distinct from row(%s)::text',
      target,
      (select string_agg(format('%1$I = s.%1$I', c), ', ') from unnest(writable) c),
      key_match,
      (select string_agg(format('t.%I', c), ', ') from unnest(writable) c),
      (select string_agg(format('s.%I', c), ', ') from unnest(writable) c));
    get diagnostics n = row_count; total := total + n;
    execute format('insert into %1$s (%2$s) overriding system value select %2$s from snapbase_restore_source s where not exists (select 1 from %1$s t where %3$s)',
      target, (select string_agg(format('%I', c), ', ') from unnest(writable) c), key_match);
    get diagnostics n = row_count; total := total + n;
  else
    execute format('delete from %s t where not exists (select 1 from snapbase_restore_source s where s::text = t::text)', target);
    get diagnostics n = row_count; total := total + n;
    execute format('insert into %1$s (%2$s) overriding system value select %2$s from snapbase_restore_source s where not exists (select 1 from %1$s t where s::text = t::text)',
      target, (select string_agg(format('%I', c), ', ') from unnest(writable) c));
    get diagnostics n = row_count; total := total + n;
  end if;
  drop table snapbase_restore_source;
  return total;
end;
$$;
grant execute on function snapbase_private.apply_restore(bigint, regclass) to :ROLE_ADMIN;

create function snapbase.restore_snapshot(snapshot_id bigint, reason text default null) returns snapbase.change_requests
language plpgsql
set search_path = pg_catalog
as $$
declare
  snap snapbase.snapshots;
  mt snapbase.managed_tables;
  target regclass;
  cr snapbase.change_requests;
begin
  perform snapbase_private.require_role('admin');
  snap := snapbase_private.readable_snapshot(snapshot_id);
  select * into mt from snapbase.managed_tables where id = snap.managed_table_id;
  target := snapbase_private.relation_of(mt);
  if target is null then
    raise exception 'table % no longer exists', snap.table_name using errcode = '42P01';
  end if;
  perform snapbase_private.restore_fit(snap, target);
  cr := snapbase_private.store_change_request(mt, 'restore', snapbase_private.describe_restore(snap, target), null,
          coalesce(reason, format('restore snapshot %s', snap.id)), snap.id);
  return snapbase.approve_change(cr.id);
end;
$$;
comment on function snapbase.restore_snapshot(bigint, text) is 'Put the live table back to a snapshot, as a restore change request that is approved, snapshotted and audited at once (admins).';
grant execute on function snapbase.restore_snapshot(bigint, text) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Retention (run by the `retention` worker task; owner only)
--------------------------------------------------------------------------------

create function snapbase_private.prune_snapshots() returns integer
language plpgsql
set search_path = pg_catalog
as $$
declare
  doomed bigint[];
  chunks_removed integer;
begin
  select coalesce(array_agg(s.id), '{}') into doomed
    from (
      select s.id, s.created_at, m.keep_last, m.keep_days,
             row_number() over (partition by s.managed_table_id order by s.id desc) as newest_rank
        from snapbase.snapshots s join snapbase.managed_tables m on m.id = s.managed_table_id
    ) s
   where s.newest_rank > 1
     and (s.keep_last is not null or s.keep_days is not null)
     and (s.keep_last is null or s.newest_rank > s.keep_last)
     and (s.keep_days is null or s.created_at < now() - make_interval(days => s.keep_days));
  if cardinality(doomed) = 0 then
    return 0;
  end if;
  perform set_config('snapbase.pruning', 'on', true);
  delete from snapbase.snapshots where id = any(doomed);
  delete from snapbase_private.chunk_store cs
   where not exists (select 1 from snapbase_private.snapshot_chunks sc where sc.chunk_hash = cs.hash);
  get diagnostics chunks_removed = row_count;
  perform set_config('snapbase.pruning', 'off', true);
  perform snapbase_private.audit('retention_prune', 'snapshot', null, null,
    jsonb_build_object('snapshot_ids', doomed, 'chunks_removed', chunks_removed));
  return cardinality(doomed);
end;
$$;

--------------------------------------------------------------------------------
-- Notifications for submitted change requests
--------------------------------------------------------------------------------

create function snapbase_private.tg__change_submitted() returns trigger
language plpgsql
set search_path = pg_catalog
as $$
begin
  perform pg_notify('snapbase:changes', json_build_object('kind', 'change_submitted', 'id', new.id,
    'managed_table_id', new.managed_table_id, 'actor', new.submitted_by_name)::text);
  return null;
end;
$$;
create trigger _500_notify after insert on snapbase.change_requests
  for each row execute function snapbase_private.tg__change_submitted();
