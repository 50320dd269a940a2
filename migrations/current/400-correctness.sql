--------------------------------------------------------------------------------
-- Correctness (issue 13): change control and workbooks for every column kind and
-- name, failures the DBA can see, what a table needs before it is registered.
--------------------------------------------------------------------------------

--------------------------------------------------------------------------------
-- Restore: every column kind, and columns added or dropped since the snapshot
--------------------------------------------------------------------------------
-- The snapshot's columns against the table's: a column both have is restored
-- (it must keep its type); a column only the snapshot has is gone and cannot be
-- restored (the change request says so); a column only the table has keeps its
-- values on rows the restore keeps and takes its default (or NULL, or its
-- generated value) on rows it puts back, so it must not be NOT NULL without a
-- default. The primary key must be the same columns.
--
-- Rows: matched by primary key. DELETE the rows the snapshot lacks, UPDATE the
-- rows whose values differ, INSERT the rows the table lacks (OVERRIDING SYSTEM
-- VALUE, so identity columns get the snapshot's values back). Key columns and
-- GENERATED ALWAYS identity columns cannot be updated: a row whose non-key
-- identity value differs is deleted and inserted again. Stored generated columns
-- are computed by PostgreSQL. Identity and serial sequences are moved past the
-- values put back. Without a primary key, rows are matched by their values, as
-- many times as each appears (a multiset), so duplicates survive.

drop function if exists snapbase_private.restore_columns(snapbase.snapshots, regclass);

create function snapbase_private.restore_columns(snap snapbase.snapshots, target regclass)
returns table (name text, snapshot_type text, table_type text, ord integer, generated boolean, identity_always boolean,
               is_key boolean, needs_value boolean)
language sql stable
set search_path = pg_catalog
as $$
  with s as (
    select c ->> 'name' as name, c ->> 'type' as type from jsonb_array_elements(snap.columns) c
  ), a as (
    select a.attname::text as name, format_type(a.atttypid, a.atttypmod) as type, a.attnum::integer as ord,
           a.attgenerated <> '' as generated, a.attidentity = 'a' as identity_always,
           a.attnotnull and not a.atthasdef and a.attidentity = '' and a.attgenerated = '' as needs_value
      from pg_attribute a
     where a.attrelid = target and a.attnum > 0 and not a.attisdropped
  )
  select coalesce(a.name, s.name), s.type, a.type, a.ord, coalesce(a.generated, false), coalesce(a.identity_always, false),
         coalesce(a.name = any (snapbase_private.primary_key(target)), false), coalesce(a.needs_value, false)
    from a full join s on s.name = a.name
   order by a.ord nulls last, s.name
$$;
grant execute on function snapbase_private.restore_columns(snapbase.snapshots, regclass) to :ROLE_ADMIN;
comment on function snapbase_private.restore_columns(snapbase.snapshots, regclass) is
  'The columns of a snapshot and of its table now, side by side (a name only one side has is null on the other): what a restore can put back.';

create or replace function snapbase_private.restore_fit(snap snapbase.snapshots, target regclass) returns void
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  problems text[];
  key_now text[] := snapbase_private.primary_key(target);
begin
  select coalesce(array_agg(p.problem order by p.ord), '{}') into problems from (
    select c.ord, format('column %s: %s in the snapshot, %s now', quote_ident(c.name), c.snapshot_type, c.table_type) as problem
      from snapbase_private.restore_columns(snap, target) c
     where c.snapshot_type is not null and c.table_type is not null and c.snapshot_type <> c.table_type
    union all
    select c.ord, format('column %s is NOT NULL without a default, and the snapshot has no values for it', quote_ident(c.name))
      from snapbase_private.restore_columns(snap, target) c
     where c.snapshot_type is null and c.needs_value
  ) p;
  if snap.primary_key is distinct from key_now then
    problems := format('the primary key was (%s), it is (%s) now',
                       coalesce(array_to_string(snap.primary_key, ', '), 'none'), coalesce(array_to_string(key_now, ', '), 'none')) || problems;
  end if;
  if cardinality(problems) > 0 then
    raise exception 'snapshot % no longer fits %: %', snap.id, snap.table_name, array_to_string(problems, '; ')
      using errcode = '42804';
  end if;
end;
$$;
comment on function snapbase_private.restore_fit(snapbase.snapshots, regclass) is
  'Raises (42804, naming each column) when a snapshot cannot be restored into its table as it is now: a column changed type, a new NOT NULL column has no default, or the primary key changed.';

create or replace function snapbase_private.describe_restore(snap snapbase.snapshots, target regclass) returns text
language sql stable
set search_path = pg_catalog
as $$
  select concat_ws(E'\n',
    case when snap.primary_key is not null then format(
      E'-- restore %1$s to snapshot %2$s (%3$s rows), by primary key (%4$s):\n'
      '-- DELETE rows whose key is not in the snapshot;\n'
      '-- UPDATE rows whose values differ from the snapshot;\n'
      '-- INSERT snapshot rows whose key is missing.',
      target, snap.id, snap.record_count, array_to_string(snap.primary_key, ', '))
    else format(E'-- restore %1$s to snapshot %2$s (%3$s rows); no primary key:\n'
      '-- DELETE rows not in the snapshot and INSERT snapshot rows not in the table (matching whole rows, duplicates counted).',
      target, snap.id, snap.record_count) end,
    (select '-- columns of the snapshot the table no longer has are not restored: ' || string_agg(quote_ident(c.name), ', ')
       from snapbase_private.restore_columns(snap, target) c where c.table_type is null),
    (select '-- columns added since keep their values on kept rows and take their defaults on rows put back: ' || string_agg(quote_ident(c.name), ', ')
       from snapbase_private.restore_columns(snap, target) c where c.snapshot_type is null))
$$;

create or replace function snapbase_private.apply_restore(snapshot_id bigint, target regclass) returns bigint
language plpgsql
set search_path = pg_catalog
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set timezone = 'UTC'
set extra_float_digits = 3
set bytea_output = 'hex'
set client_min_messages = warning
as $$
declare
  snap snapbase.snapshots;
  layout text;
  pk text[];
  shared text[];      -- columns both the snapshot and the table have, in table order
  writable text[];    -- of those, the ones not generated
  settable text[];    -- of those, the ones an UPDATE may set (not key, not identity always)
  fixed text[];       -- non-key GENERATED ALWAYS identity columns: a difference means delete and insert
  key_name text := '__snapbase_key';
  count_name text := '__snapbase_occurrence';
  key_match text;
  row_t text;
  row_s text;
  n bigint;
  total bigint := 0;
  col text;
  seq regclass;
  inc bigint;
  next_value numeric;
  top numeric;
begin
  select * into snap from snapbase.snapshots s where s.id = snapshot_id;
  perform snapbase_private.restore_fit(snap, target);
  layout := snapbase_private.layout_type(snap.layout_id);
  pk := snap.primary_key;
  select coalesce(array_agg(c.name order by c.ord) filter (where true), '{}'),
         coalesce(array_agg(c.name order by c.ord) filter (where not c.generated), '{}'),
         coalesce(array_agg(c.name order by c.ord) filter (where not c.generated and not c.is_key and not c.identity_always), '{}'),
         coalesce(array_agg(c.name order by c.ord) filter (where not c.generated and not c.is_key and c.identity_always), '{}')
    into shared, writable, settable, fixed
    from snapbase_private.restore_columns(snap, target) c
   where c.snapshot_type is not null and c.table_type is not null;
  -- Names of our own bookkeeping columns, unlike any of the table's.
  while key_name = any (shared) loop key_name := key_name || '_'; end loop;
  while count_name = any (shared) loop count_name := count_name || '_'; end loop;

  -- The snapshot's rows (the columns the table still has); for tables without a key,
  -- each with its values' text and, among equal rows, its occurrence number.
  if to_regclass('pg_temp.snapbase_restore_source') is not null then
    drop table pg_temp.snapbase_restore_source;
  end if;
  row_s := format('row(%s)::text', (select string_agg(format('(x.rec).%I', c), ', ') from unnest(shared) c));
  execute format($q$
    create temp table snapbase_restore_source on commit drop as
    select %1$s%2$s
      from (select src.rec::%3$s as rec from snapbase_private.snapshot_records($1) as src(rec) offset 0) x
    $q$, (select string_agg(format('(x.rec).%1$I as %1$I', c), ', ') from unnest(shared) c),
    case when pk is null then format(', %1$s as %2$I, row_number() over (partition by %1$s) as %3$I', row_s, key_name, count_name) else '' end,
    layout)
    using snap.id;
  execute 'analyze pg_temp.snapbase_restore_source';

  row_t := format('row(%s)::text', (select string_agg(format('t.%I', c), ', ') from unnest(shared) c));
  if pk is not null then
    key_match := (select string_agg(format('t.%1$I = s.%1$I', c), ' and ') from unnest(pk) c);
    -- Rows the snapshot lacks, and rows whose non-key identity value cannot be updated back.
    execute format('delete from %s t where not exists (select 1 from pg_temp.snapbase_restore_source s where %s%s)',
      target, key_match,
      case when cardinality(fixed) > 0 then format(' and row(%s)::text is not distinct from row(%s)::text',
        (select string_agg(format('t.%I', c), ', ') from unnest(fixed) c), (select string_agg(format('s.%I', c), ', ') from unnest(fixed) c))
      else '' end);
    get diagnostics n = row_count; total := total + n;
    if cardinality(settable) > 0 then
      execute format('update %s t set %s from pg_temp.snapbase_restore_source s where %s and row(%s)::text is distinct from row(%s)::text',
        target,
        (select string_agg(format('%1$I = s.%1$I', c), ', ') from unnest(settable) c),
        key_match,
        (select string_agg(format('t.%I', c), ', ') from unnest(settable) c),
        (select string_agg(format('s.%I', c), ', ') from unnest(settable) c));
      get diagnostics n = row_count; total := total + n;
    end if;
    execute format('insert into %1$s (%2$s) overriding system value select %3$s from pg_temp.snapbase_restore_source s where not exists (select 1 from %1$s t where %4$s)',
      target, (select string_agg(format('%I', c), ', ') from unnest(writable) c),
      (select string_agg(format('s.%I', c), ', ') from unnest(writable) c), key_match);
    get diagnostics n = row_count; total := total + n;
  else
    -- The k-th copy of a row stays when the snapshot has at least k copies of it.
    execute format($q$
      with live as (
        select t.tableoid as rel, t.ctid as tid, %2$s as k, row_number() over (partition by %2$s order by t.tableoid, t.ctid) as occurrence
          from %1$s t)
      delete from %1$s t using live l
       where t.tableoid = l.rel and t.ctid = l.tid
         and not exists (select 1 from pg_temp.snapbase_restore_source s where s.%3$I = l.k and s.%4$I = l.occurrence)
      $q$, target, row_t, key_name, count_name);
    get diagnostics n = row_count; total := total + n;
    execute format($q$
      with live as (select %2$s as k, count(*) as copies from %1$s t group by 1)
      insert into %1$s (%3$s) overriding system value
      select %4$s from pg_temp.snapbase_restore_source s left join live l on l.k = s.%5$I
       where s.%6$I > coalesce(l.copies, 0)
      $q$, target, row_t, (select string_agg(format('%I', c), ', ') from unnest(writable) c),
      (select string_agg(format('s.%I', c), ', ') from unnest(writable) c), key_name, count_name);
    get diagnostics n = row_count; total := total + n;
  end if;
  drop table pg_temp.snapbase_restore_source;

  -- Identity and serial sequences go past the values put back (when the owner may move them).
  foreach col in array writable loop
    seq := pg_get_serial_sequence(target::text, col)::regclass;
    continue when seq is null or not has_sequence_privilege(seq, 'SELECT') or not has_sequence_privilege(seq, 'UPDATE');
    select s.seqincrement into inc from pg_sequence s where s.seqrelid = seq;
    continue when inc <= 0;
    execute format('select max(t.%I)::numeric from %s t', col, target) into top;
    next_value := coalesce(pg_sequence_last_value(seq) + inc, (select s.seqstart from pg_sequence s where s.seqrelid = seq));
    if top is not null and top >= next_value then
      perform setval(seq, top::bigint, true);
    end if;
  end loop;
  return total;
end;
$$;
comment on function snapbase_private.apply_restore(bigint, regclass) is
  'Puts a managed table back to a snapshot with the fewest row operations (by primary key, or by whole rows counting duplicates); runs as the owner inside approve_change.';

create or replace function snapbase.restore_snapshot(snapshot_id bigint, reason text default null) returns snapbase.change_requests
language plpgsql
set search_path = pg_catalog
set client_min_messages = warning
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
  -- A failure is recorded and raised as a WARNING there (psql shows it).
  return snapbase.approve_change(cr.id);
end;
$$;
comment on function snapbase.restore_snapshot(bigint, text) is
  'Put the live table back to a snapshot, as a restore change request that is approved, snapshotted and audited at once (admins). Columns dropped since are not restored; columns added since keep or default their values. A failure is recorded on the request and raised as a WARNING.';

-- Capturing a snapshot twice in one transaction must not tell anyone that its
-- scratch table "already exists, skipping".
alter function snapbase_private.capture_snapshot(snapbase.managed_tables, bigint, text) set client_min_messages = warning;

--------------------------------------------------------------------------------
-- Structured edits for every column kind
--------------------------------------------------------------------------------
-- One MERGE keyed by the primary key. Rows travel as one composite value per edit
-- (jsonb_populate_record of the table's row type), so no column name can collide
-- with the statement's own (op, set, shape, rec). Inserts are grouped by the
-- columns they give, and each group inserts only those: a column an insert leaves
-- out takes its default (identity, serial, DEFAULT), never NULL. A key column with
-- an identity or a default may be left out of an insert; giving a GENERATED ALWAYS
-- identity value inserts it as given (OVERRIDING SYSTEM VALUE). Setting a stored
-- generated column, updating a GENERATED ALWAYS identity column or a key column
-- are refused at submission, saying why.

create or replace function snapbase_private.edits_to_sql(target regclass, edits jsonb) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  pk text[] := snapbase_private.primary_key(target);
  items jsonb := '[]';
  e jsonb;
  k text;
  given text[];
  shapes text[] := '{}';     -- each insert group's column list, as text
  shape_no integer;
  update_cols text[] := '{}';
  clauses text[] := '{}';
  bad text;
  all_cols text[];
  generated_cols text[];
  identity_always_cols text[];
  defaulted_cols text[];
begin
  if pk is null then
    raise exception 'structured edits need a primary key on %', target using errcode = '42P10';
  end if;
  if jsonb_typeof(edits) is distinct from 'object' or exists (select 1 from jsonb_object_keys(edits) x where x not in ('insert', 'update', 'delete'))
     or exists (select 1 from jsonb_each(edits) x where jsonb_typeof(x.value) <> 'array') then
    raise exception 'edits must be an object with "insert", "update" and/or "delete" arrays' using errcode = '22023';
  end if;
  select coalesce(array_agg(a.attname::text), '{}'),
         coalesce(array_agg(a.attname::text) filter (where a.attgenerated <> ''), '{}'),
         coalesce(array_agg(a.attname::text) filter (where a.attidentity = 'a'), '{}'),
         coalesce(array_agg(a.attname::text) filter (where a.atthasdef or a.attidentity <> ''), '{}')
    into all_cols, generated_cols, identity_always_cols, defaulted_cols
    from pg_attribute a where a.attrelid = target and a.attnum > 0 and not a.attisdropped;

  for e in select * from jsonb_array_elements(coalesce(edits -> 'insert', '[]')) loop
    if jsonb_typeof(e) <> 'object' or e = '{}' then
      raise exception 'each insert must be an object of column values' using errcode = '22023';
    end if;
    given := array(select x from jsonb_object_keys(e) x order by x);
    shape_no := array_position(shapes, given::text);
    if shape_no is null then
      shapes := shapes || given::text;
      shape_no := cardinality(shapes);
    end if;
    items := items || jsonb_build_object('op', 'insert', 'row', e, 'shape', shape_no);
  end loop;
  for e in select * from jsonb_array_elements(coalesce(edits -> 'update', '[]')) loop
    if jsonb_typeof(e -> 'key') is distinct from 'object' or jsonb_typeof(e -> 'set') is distinct from 'object' or e -> 'set' = '{}' then
      raise exception 'each update must be {"key": {...primary key...}, "set": {...columns...}}' using errcode = '22023';
    end if;
    select string_agg(quote_ident(x), ', ') into bad from jsonb_object_keys(e -> 'key') x where x <> all (pk);
    if bad is not null then
      raise exception 'an update''s key holds the primary key columns only (%), not %', array_to_string(pk, ', '), bad using errcode = '22023';
    end if;
    select string_agg(quote_ident(x), ', ') into bad from jsonb_object_keys(e -> 'set') x where x = any (pk);
    if bad is not null then
      raise exception 'an update cannot change the primary key column %: delete the row and insert it again', bad using errcode = '22023';
    end if;
    items := items || jsonb_build_object('op', 'update', 'row', (e -> 'set') || (e -> 'key'), 'set', e -> 'set');
    update_cols := update_cols || array(select jsonb_object_keys(e -> 'set'));
  end loop;
  for e in select * from jsonb_array_elements(coalesce(edits -> 'delete', '[]')) loop
    if jsonb_typeof(e) <> 'object' then
      raise exception 'each delete must be an object holding the primary key' using errcode = '22023';
    end if;
    select string_agg(quote_ident(x), ', ') into bad from unnest(pk) x where e -> x is null or e -> x = 'null';
    if bad is not null then
      raise exception 'every edit must give the primary key column %', bad using errcode = '22023';
    end if;
    select string_agg(quote_ident(x), ', ') into bad from jsonb_object_keys(e) x where x <> all (pk);
    if bad is not null then
      raise exception 'a delete gives the primary key columns only (%), not %', array_to_string(pk, ', '), bad using errcode = '22023';
    end if;
    items := items || jsonb_build_object('op', 'delete', 'row', e);
  end loop;
  if jsonb_array_length(items) = 0 then
    raise exception 'edits hold no insert, update or delete' using errcode = '22023';
  end if;

  select string_agg(distinct quote_ident(x), ', ') into bad
    from jsonb_array_elements(items) i, jsonb_object_keys(i -> 'row') x
   where x <> all (all_cols);
  if bad is not null then
    raise exception 'edits name columns that % does not have: %', target, bad using errcode = '42703';
  end if;
  select string_agg(distinct quote_ident(x), ', ') into bad
    from jsonb_array_elements(items) i, jsonb_object_keys(i -> 'row') x where x = any (generated_cols);
  if bad is not null then
    raise exception 'column % is generated by the database: edits cannot set it', bad using errcode = '428C9';
  end if;
  select string_agg(distinct quote_ident(x), ', ') into bad
    from unnest(update_cols) x where x = any (identity_always_cols);
  if bad is not null then
    raise exception 'column % is an identity column (GENERATED ALWAYS): the database sets it, updates cannot', bad using errcode = '428C9';
  end if;
  -- Updates and deletes name their row by its whole key; inserts may leave out key
  -- columns the database fills in.
  foreach k in array pk loop
    if exists (select 1 from jsonb_array_elements(items) i
                where (i ->> 'op' <> 'insert' or k <> all (defaulted_cols))
                  and (i -> 'row' -> k is null or i -> 'row' -> k = 'null')) then
      raise exception 'every edit must give the primary key column %', k using errcode = '22023';
    end if;
  end loop;

  select array_agg(distinct c order by c) into update_cols from unnest(update_cols) c;
  if exists (select 1 from jsonb_array_elements(items) i where i ->> 'op' = 'delete') then
    clauses := clauses || 'WHEN MATCHED AND s.op = ''delete'' THEN DELETE'::text;
  end if;
  if update_cols is not null then
    clauses := clauses || format('WHEN MATCHED AND s.op = ''update'' THEN UPDATE SET %s',
      (select string_agg(format('%1$I = CASE WHEN s.set ? %2$L THEN (s.rec).%1$I ELSE t.%1$I END', c, c), ', ') from unnest(update_cols) c));
  end if;
  for shape_no in 1 .. cardinality(shapes) loop
    given := shapes[shape_no]::text[];
    clauses := clauses || format('WHEN NOT MATCHED AND s.op = ''insert'' AND s.shape = %s THEN INSERT (%s)%s VALUES (%s)',
      shape_no,
      (select string_agg(format('%I', c), ', ') from unnest(given) c),
      case when given && identity_always_cols then ' OVERRIDING SYSTEM VALUE' else '' end,
      (select string_agg(format('(s.rec).%I', c), ', ') from unnest(given) c));
  end loop;
  -- (OFFSET 0 keeps the subquery whole, so each row's record is built once, not once per column read.)
  return format(E'MERGE INTO %1$s AS t\nUSING (\n  SELECT e.op, e.set, e.shape, jsonb_populate_record(NULL::%1$s, e."row") AS rec\n    FROM jsonb_to_recordset(%2$L::jsonb) AS e(op text, "row" jsonb, set jsonb, shape integer)\n  OFFSET 0\n) AS s\nON %3$s\n%4$s',
    target, items,
    (select string_agg(format('t.%1$I = (s.rec).%1$I', c), ' AND ') from unnest(pk) c),
    array_to_string(clauses, E'\n'));
end;
$$;
comment on function snapbase_private.edits_to_sql(regclass, jsonb) is
  'Structured edits ({"insert", "update", "delete"}) as one MERGE keyed by the primary key: omitted insert columns take their defaults, identity values given are kept, generated and identity-always columns cannot be set.';

--------------------------------------------------------------------------------
-- What a managed table needs, said when it is registered
--------------------------------------------------------------------------------
-- Approval runs the change as the change runner, which Snapbase's owner grants the
-- table (and its sequences, and USAGE on its schema) for that transaction only: so
-- the owner must hold those WITH GRANT OPTION. Restores and snapshots run as the
-- owner. Submitters (editors) and those who see change requests and snapshots
-- (viewers) must be able to read the table. Row-level security would hide rows
-- from the runner and the owner unless a policy lets them through.
-- registration_problems lists the statements still to run (as the table's owner or
-- a superuser); register_table reports them as a WARNING, managed tables show them
-- as missing_grants (GraphQL: missingGrants), and grant_change_control runs them.

drop function if exists snapbase_private.registration_problems(regclass);
drop function if exists snapbase_private.warn_registration_problems(regclass);
drop function if exists snapbase.managed_tables_missing_grants(snapbase.managed_tables);
drop function if exists snapbase.grant_change_control(regclass);

create function snapbase_private.registration_problems(target regclass) returns text[]
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  owner_role constant name := ':DATABASE_OWNER';
  runner constant name := ':ROLE_CHANGE_RUNNER';
  viewer constant name := ':ROLE_VIEWER';
  rel record;
  missing text[];
  seq record;
  statements text[] := '{}';
  policy_roles text[];
begin
  select c.oid, c.relrowsecurity, c.relforcerowsecurity, c.relowner, n.oid as nsp, quote_ident(n.nspname) as schema_sql,
         format('%I.%I', n.nspname, c.relname) as table_sql
    into rel
    from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = target;
  if rel.oid is null then
    return statements;
  end if;
  -- Snapbase's owner: USAGE on the schema (to name the table, and pass it on to the runner).
  if not has_schema_privilege(owner_role, rel.nsp, 'USAGE WITH GRANT OPTION') then
    statements := statements || format('GRANT USAGE ON SCHEMA %s TO %I WITH GRANT OPTION;', rel.schema_sql, owner_role);
  end if;
  -- The table's rows, to pass on to the runner and to snapshot and restore.
  missing := array(select p from unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE']) p
                    where not has_table_privilege(owner_role, rel.oid, p || ' WITH GRANT OPTION'));
  if cardinality(missing) > 0 then
    statements := statements || format('GRANT %s ON TABLE %s TO %I WITH GRANT OPTION;', array_to_string(missing, ', '), rel.table_sql, owner_role);
  end if;
  -- Its identity and serial sequences: nextval for the runner, setval for restores.
  for seq in
    select format('%I.%I', sn.nspname, s.relname) as seq_sql, s.oid
      from pg_depend d
      join pg_class s on s.oid = d.objid and s.relkind = 'S'
      join pg_namespace sn on sn.oid = s.relnamespace
     where d.classid = 'pg_class'::regclass and d.refclassid = 'pg_class'::regclass and d.refobjid = rel.oid and d.deptype in ('a', 'i')
     order by s.relname
  loop
    missing := array(select p from unnest(array['USAGE', 'SELECT', 'UPDATE']) p
                      where not has_sequence_privilege(owner_role, seq.oid, p || ' WITH GRANT OPTION'));
    if cardinality(missing) > 0 then
      statements := statements || format('GRANT %s ON SEQUENCE %s TO %I WITH GRANT OPTION;', array_to_string(missing, ', '), seq.seq_sql, owner_role);
    end if;
  end loop;
  -- Viewers (so editors and admins): the submitter must read the table, and change
  -- requests and snapshots are shown to those who may read it.
  if not has_schema_privilege(viewer, rel.nsp, 'USAGE') then
    statements := statements || format('GRANT USAGE ON SCHEMA %s TO %I;', rel.schema_sql, viewer);
  end if;
  if not has_any_column_privilege(viewer, rel.oid, 'SELECT') then
    statements := statements || format('GRANT SELECT ON TABLE %s TO %I;', rel.table_sql, viewer);
  end if;
  -- Row-level security applies to the runner always, and to the owner unless it owns
  -- the table (and security is not forced) or bypasses it.
  if rel.relrowsecurity then
    policy_roles := array_remove(array[
      case when not ((rel.relowner = to_regrole(owner_role) and not rel.relforcerowsecurity)
                     or (select r.rolbypassrls or r.rolsuper from pg_roles r where r.rolname = owner_role))
                and not exists (select 1 from pg_policy p where p.polrelid = rel.oid and p.polpermissive and p.polcmd = '*'
                                   and (0 = any (p.polroles) or to_regrole(owner_role) = any (p.polroles)))
           then quote_ident(owner_role) end,
      case when not exists (select 1 from pg_policy p where p.polrelid = rel.oid and p.polpermissive and p.polcmd = '*'
                               and (0 = any (p.polroles) or to_regrole(runner) = any (p.polroles)))
           then quote_ident(runner) end], null);
    if cardinality(policy_roles) > 0 then
      statements := statements || format('CREATE POLICY snapbase_change_control ON %s TO %s USING (true) WITH CHECK (true);',
        rel.table_sql, array_to_string(policy_roles, ', '));
    end if;
  end if;
  return statements;
end;
$$;
comment on function snapbase_private.registration_problems(regclass) is
  'The statements (GRANT, CREATE POLICY) a managed table still needs before changes to it can be approved, snapshotted and restored, and read by submitters; empty when it needs none.';
grant execute on function snapbase_private.registration_problems(regclass) to :ROLE_VIEWER;

-- For register_table: a WARNING (psql shows it) listing what is still needed.
create function snapbase_private.warn_registration_problems(target regclass) returns text[]
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  statements text[] := snapbase_private.registration_problems(target);
begin
  if cardinality(statements) > 0 then
    raise warning '% is under change control, but changes to it will fail until these are run (as its owner or a superuser): %',
      target, array_to_string(statements, ' ')
      using errcode = '01007', hint = format('Or run: select snapbase.grant_change_control(%L);', target::text);
  end if;
  return statements;
end;
$$;
comment on function snapbase_private.warn_registration_problems(regclass) is
  'Raises a WARNING listing the GRANTs a managed table still needs (registration_problems); register_table calls it.';
grant execute on function snapbase_private.warn_registration_problems(regclass) to :ROLE_VIEWER;

create function snapbase.managed_tables_missing_grants(mt snapbase.managed_tables) returns text[]
language sql stable
set search_path = pg_catalog
as $$
  select coalesce(snapbase_private.registration_problems(snapbase_private.relation_of(mt)), '{}')
$$;
comment on function snapbase.managed_tables_missing_grants(snapbase.managed_tables) is
  'Statements (GRANT, CREATE POLICY) still to run, as the table''s owner or a superuser, before changes to this table can be approved and restored; empty when none.';
grant execute on function snapbase.managed_tables_missing_grants(snapbase.managed_tables) to :ROLE_VIEWER;

-- For the DBA in psql: runs those statements with the caller's own rights (it runs
-- as the caller, so it can grant only what the caller may grant).
create function snapbase.grant_change_control(target regclass) returns text[]
language plpgsql
set search_path = pg_catalog
as $$
declare
  statements text[] := snapbase_private.registration_problems(target);
  statement text;
  still text[];
begin
  foreach statement in array statements loop
    execute statement;
  end loop;
  still := snapbase_private.registration_problems(target);
  if cardinality(still) > 0 then
    raise exception 'you may not grant everything % needs; run these as its owner or a superuser: %', target, array_to_string(still, ' ')
      using errcode = '42501';
  end if;
  return statements;
end;
$$;
comment on function snapbase.grant_change_control(regclass) is
  E'@behavior -*\nRuns, as the caller (a DBA who owns the table, or a superuser), the GRANTs and policy a managed table needs (snapbase_private.registration_problems). Returns what it ran.';
grant execute on function snapbase.grant_change_control(regclass) to :ROLE_ADMIN;

--------------------------------------------------------------------------------
-- Workbooks: every column name works
--------------------------------------------------------------------------------
-- A workbook table's data columns may be named anything PostgreSQL allows
-- (reserved words, spaces, quotes, Unicode, single letters) except names starting
-- with "__", which are Snapbase's metadata. So the SQL that works on these tables
-- must never let a data column capture one of its own names: a whole row is
-- always written `alias.*` (to_jsonb(r.*)), never `alias` alone (which means the
-- column when one is named so), and every alias a statement introduces next to
-- the data columns starts with "__sb_" (no data column can be named so; a bare
-- __sb_ alias is a whole row). Functions returning rows stay in FROM, so they run
-- once per row, not once per column read from them. Source
-- columns a workbook cannot name as they are (starting with "__", or longer than
-- 63 bytes) get a local name and keep their own as `source_name` (the connectors'
-- rule: src/connectors/names.ts).

-- record_json_sql: see 200-tenants-agents.sql (one definition: it hides what an agent may not see, and reads r.* so a column named r cannot capture it).

-- For the download task, once it has the source's table spec (columns under their
-- workbook names, with `sourceName` where that differs): the job's workbook table,
-- created on the first download; on a refresh, checked against the spec.
create or replace function snapbase_private.prepare_download(job_id bigint, spec jsonb) returns snapbase.workbook_tables
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  wb snapbase.workbooks;
  misfits text;
begin
  select * into j from snapbase.jobs where id = job_id;
  if j.table_id is not null then
    select * into t from snapbase.workbook_tables where id = j.table_id;
    select string_agg(quote_ident(c ->> 'name'), ', ') into misfits from jsonb_array_elements(t.columns) c
     where not coalesce((c ->> 'scratch')::boolean, false)
       and not exists (select 1 from jsonb_array_elements(spec -> 'columns') s
                        where s ->> 'name' = c ->> 'name' and to_regtype(s ->> 'type') = to_regtype(c ->> 'type'));
    if misfits is not null then
      raise exception 'the source table % no longer matches workbook table % (missing or retyped: %)', t.remote_table, t.id, misfits
        using errcode = '22023';
    end if;
    return t;
  end if;
  select * into wb from snapbase.workbooks where id = j.workbook_id;
  t := snapbase_private.create_workbook_table(wb, j.options ->> 'remote_table',
         (select jsonb_agg(jsonb_build_object('name', c ->> 'name', 'type', c ->> 'type', 'read_only', coalesce((c ->> 'readOnly')::boolean, false)))
            from jsonb_array_elements(spec -> 'columns') c),
         spec ->> 'remoteIdColumn', null,
         jsonb_build_object('kind', (select kind from snapbase.connector_accounts where id = j.connector_account_id), 'table', j.options ->> 'remote_table'));
  -- The remote id column identifies records at the source: it is never edited here.
  -- Columns named otherwise here keep the source's name.
  update snapbase.workbook_tables set connector_account_id = j.connector_account_id, remote_table = j.options ->> 'remote_table',
         columns = (select jsonb_agg(c
                             || case when c ->> 'name' = spec ->> 'remoteIdColumn' then '{"read_only": true}'::jsonb else '{}' end
                             || coalesce((select jsonb_build_object('source_name', s ->> 'sourceName') from jsonb_array_elements(spec -> 'columns') s
                                           where s ->> 'name' = c ->> 'name' and s ->> 'sourceName' is not null), '{}')
                             order by ord)
                      from jsonb_array_elements(columns) with ordinality as e(c, ord))
   where id = t.id returning * into t;
  update snapbase.jobs set table_id = t.id where id = job_id;
  return t;
end;
$$;

-- Applies one batch of source records [{remote_id, values}] to the job's table.
-- New records are inserted; a known record takes the source's values except in
-- the fields edited here, which keep the local value. Either way the source's
-- values become __last_seen, and a field stays edited only while it differs from
-- them. Returns false when the job was cancelled.
create or replace function snapbase_private.apply_download_batch(job_id bigint, records jsonb, done bigint) returns boolean
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  rel text;
  cols text[];
begin
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  rel := snapbase_private.table_rel(t);
  cols := snapbase_private.column_names(t, true);
  execute format($q$
    with __sb_incoming as (
      select __sb_e.value ->> 'remote_id' as __sb_remote_id, __sb_n as __sb_typed, %5$s as __sb_seen
        from jsonb_array_elements($1) as __sb_e
        cross join lateral jsonb_populate_record(null::%1$s, __sb_e.value -> 'values') as __sb_n
    ), __sb_updated as (
      update %1$s __sb_r set
        %2$s,
        __last_seen = __sb_i.__sb_seen,
        __edited = coalesce((select jsonb_object_agg(__sb_x.key, __sb_x.value) from jsonb_each(__sb_r.__edited) __sb_x
                              where (to_jsonb(__sb_r.*) -> __sb_x.key) is distinct from (__sb_i.__sb_seen -> __sb_x.key)), '{}'),
        __source_deleted = false,
        __seen_job = $2,
        __updated_at = now()
        from __sb_incoming __sb_i
       where __sb_r.__remote_id = __sb_i.__sb_remote_id
      returning __sb_r.__remote_id
    )
    insert into %1$s (%3$s, __remote_id, __last_seen, __seen_job)
    select %4$s, __sb_i.__sb_remote_id, __sb_i.__sb_seen, $2 from __sb_incoming __sb_i
     where not exists (select 1 from __sb_updated __sb_u where __sb_u.__remote_id = __sb_i.__sb_remote_id)
    $q$, rel,
    (select string_agg(format('%1$I = case when __sb_r.__edited ? %1$L then __sb_r.%1$I else (__sb_i.__sb_typed).%1$I end', c), ', ') from unnest(cols) c),
    (select string_agg(format('%I', c), ', ') from unnest(cols) c),
    (select string_agg(format('(__sb_i.__sb_typed).%I', c), ', ') from unnest(cols) c),
    -- The source's values as JSON, built from the data columns alone (cheaper than
    -- the whole row less its metadata); jsonb_build_object takes at most 100
    -- arguments, so wide tables take the whole row.
    case when cardinality(cols) <= 50
         then format('jsonb_build_object(%s)', (select string_agg(format('%L, __sb_n.%I', c, c), ', ') from unnest(cols) c))
         else 'to_jsonb(__sb_n.*) - $3::text[]' end)
    using records, job_id, snapbase_private.scratch_columns(t) || snapbase_private.record_meta_columns();
  return snapbase_private.job_progress(job_id, done, null);
end;
$$;

-- A first download that failed or was cancelled leaves no table behind: the
-- download task calls this for the table its job created (when no one has edited
-- or suggested anything in it meanwhile). Returns whether it was removed.
drop function if exists snapbase_private.discard_download(bigint);
create function snapbase_private.discard_download(job_id bigint) returns boolean
language plpgsql
set search_path = pg_catalog
as $$
declare
  j snapbase.jobs;
  t snapbase.workbook_tables;
  touched boolean;
begin
  select * into j from snapbase.jobs where id = job_id;
  select * into t from snapbase.workbook_tables where id = j.table_id;
  if t.id is null then
    return false;
  end if;
  if to_regclass(snapbase_private.table_rel(t)) is not null then
    execute format('select exists (select 1 from %s where __dirty or __suggested <> ''{}'' or __suggest_delete is not null or __suggested_new)',
      snapbase_private.table_rel(t)) into touched;
    if touched then
      return false;
    end if;
    execute format('drop table %s', snapbase_private.table_rel(t));
  end if;
  -- (The job row would go with its table: jobs.table_id cascades.)
  update snapbase.jobs set table_id = null where id = job_id;
  delete from snapbase.workbook_tables where id = t.id;
  perform snapbase_private.audit_workbook('discard_download', t.workbook_id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('job_id', job_id, 'remote_table', t.remote_table));
  return true;
end;
$$;
comment on function snapbase_private.discard_download(bigint) is
  'Removes the workbook table a failed or cancelled first download created (unless someone edited it meanwhile). Worker only.';

create or replace function snapbase_private.apply_update(t snapbase.workbook_tables, record_id bigint, vals jsonb) returns void
language plpgsql
set search_path = pg_catalog
as $$
declare
  rel text := snapbase_private.table_rel(t);
  cols text;
  scratch text[] := snapbase_private.scratch_columns(t);
  is_new boolean;
begin
  execute format('select __created or __suggested_new from %s where __id = $1', rel) into is_new using record_id;
  if is_new is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.check_values(t, vals, is_new);
  select string_agg(format('%I', k), ', ') into cols from jsonb_object_keys(vals) k;
  if cols is null then
    return;
  end if;
  -- A field counts as edited while it differs from the value last seen at the source;
  -- scratch columns are never flagged (they are never published).
  execute format($u$
    update %1$s __sb_r set (%2$s) = (select %2$s from jsonb_populate_record(__sb_r.*, $2)), __updated_at = now()
     where __sb_r.__id = $1;
    $u$, rel, cols) using record_id, vals;
  execute format($u$
    update %1$s __sb_r set __edited = (__sb_r.__edited - $2::text[]) || coalesce((
        select jsonb_object_agg(__sb_k.k, now()) from unnest($2::text[]) __sb_k(k)
         where __sb_k.k <> all ($3) and (__sb_r.__created or (to_jsonb(__sb_r.*) -> __sb_k.k) is distinct from (__sb_r.__last_seen -> __sb_k.k))), '{}')
     where __sb_r.__id = $1
    $u$, rel) using record_id, array(select jsonb_object_keys(vals)), scratch;
end;
$$;

create or replace function snapbase.resolve_source_deleted(table_id bigint, record_id bigint, action text) returns text
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  rel text := snapbase_private.table_rel(t);
  hit bigint;
begin
  if action = 'recreate' then
    -- Re-created with all its values: every published field counts as given.
    execute format('update %s __sb_r set __source_deleted = false, __created = true, __remote_id = null, __last_seen = null, __publish = null,
                    __edited = (select jsonb_object_agg(__sb_k.k, now()) from jsonb_object_keys(to_jsonb(__sb_r.*) - $2::text[]) __sb_k(k)),
                    __updated_at = now() where __sb_r.__id = $1 and __sb_r.__source_deleted returning __sb_r.__id', rel)
      into hit using record_id, snapbase_private.record_meta_columns() || snapbase_private.scratch_columns(t);
  elsif action = 'delete' then
    execute format('delete from %s where __id = $1 and __source_deleted returning __id', rel) into hit using record_id;
  else
    raise exception 'action must be recreate or delete (got %)', coalesce(action, 'null') using errcode = '22023';
  end if;
  if hit is null then
    raise exception 'no record % deleted at the source in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.audit_workbook('resolve_source_deleted', t.workbook_id, 'workbook_record', record_id::text, rel,
    jsonb_build_object('table_id', t.id, 'action', action));
  return action;
end;
$$;

create or replace function snapbase_private.tg__records_event() returns trigger
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  affected bigint;
  what text;
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
             when bool_or(__sb_n.__publish is distinct from __sb_o.__publish) then 'published'
             when bool_or(__sb_c.data_changed) then 'edited'
             when bool_or(not (__sb_o.__suggested @> __sb_n.__suggested) or __sb_n.__suggest_delete is not null and __sb_o.__suggest_delete is null) then 'suggested'
             when bool_or(__sb_n.__suggested <> __sb_o.__suggested or __sb_n.__suggest_delete is distinct from __sb_o.__suggest_delete) then 'rejected'
             else 'updated'
           end
      into affected, what
      from new_rows __sb_n join old_rows __sb_o on __sb_o.__id = __sb_n.__id,
           lateral (select (to_jsonb(__sb_n.*) - snapbase_private.record_meta_columns()) is distinct from (to_jsonb(__sb_o.*) - snapbase_private.record_meta_columns())
                             or __sb_n.__deleted <> __sb_o.__deleted as data_changed) __sb_c;
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

create or replace function snapbase.copy_managed_table_to_workbook(workbook_id bigint, managed_table text, name text default null)
returns snapbase.workbook_tables
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'edit');
  mt snapbase.managed_tables := snapbase.resolve_managed_table(managed_table);
  rel regclass := snapbase_private.relation_of(mt);
  pk text[] := snapbase_private.primary_key(rel);
  cols jsonb;
  col_list text;
  t snapbase.workbook_tables;
  copied bigint;
begin
  if not has_table_privilege(snapbase_private.caller_role(), rel, 'SELECT') then
    raise exception 'you may not read %', mt.qualified_name using errcode = '42501';
  end if;
  if cardinality(pk) is distinct from 1 then
    raise exception '% needs a single-column primary key to be copied into a workbook', mt.qualified_name using errcode = '22023';
  end if;
  -- Only the columns the caller may read are copied (column privileges hold here too).
  select jsonb_agg(jsonb_build_object('name', c ->> 'name', 'type', c ->> 'type', 'read_only', (c ->> 'name') = pk[1]) order by ord),
         string_agg(format('%I', c ->> 'name'), ', ' order by ord)
    into cols, col_list
    from jsonb_array_elements(snapbase_private.table_columns(rel)) with ordinality as e(c, ord)
   where has_column_privilege(snapbase_private.caller_role(), rel, c ->> 'name', 'SELECT');
  if not cols @> jsonb_build_array(jsonb_build_object('name', pk[1])) then
    raise exception 'you may not read the primary key % of %', pk[1], mt.qualified_name using errcode = '42501';
  end if;
  t := snapbase_private.create_workbook_table(wb, coalesce(name, mt.table_name), cols, pk[1], null,
         jsonb_build_object('kind', 'managed_table', 'table', mt.qualified_name, 'managed_table_id', mt.id));
  execute format('insert into %s (%s, __remote_id, __last_seen) select __sb_seen.*, __sb_s.%I::text, to_jsonb(__sb_seen.*) from %s __sb_s, lateral (select %s) __sb_seen',
    snapbase_private.table_rel(t), col_list, pk[1], rel,
    (select string_agg(format('__sb_s.%I', c ->> 'name'), ', ') from jsonb_array_elements(cols) c));
  get diagnostics copied = row_count;
  perform snapbase_private.audit_workbook('copy_managed_table', wb.id, 'workbook_table', t.id::text,
    snapbase_private.table_rel(t), jsonb_build_object('source', mt.qualified_name, 'records', copied));
  return t;
end;
$$;

--------------------------------------------------------------------------------
-- Accepting and rejecting suggestions: one result shape
--------------------------------------------------------------------------------
-- Both return {records, cells, created, deleted}: the records acted on, and of
-- their suggestions the cells, the suggested new records (accepted: created;
-- rejected: removed) and the suggested deletions (accepted: marked deleted;
-- rejected: dropped) that were accepted or rejected.

create or replace function snapbase.accept_suggestions(table_id bigint, record_id bigint default null, column_name text default null,
                                                       within_filter boolean default false)
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  rel text := snapbase_private.table_rel(t);
  cols text := (select string_agg(format('%I', c), ', ') from unnest(snapbase_private.column_names(t)) c);
  -- The accepted values of row r: its suggestions, or only the one for column_name ($1).
  patch constant text := '(select coalesce(jsonb_object_agg(__sb_e.key, __sb_e.value -> ''value''), ''{}'') from jsonb_each(r.__suggested) __sb_e
                            where $1::text is null or __sb_e.key = $1)';
  result jsonb;
begin
  if column_name is not null and column_name <> all (snapbase_private.column_names(t)) then
    raise exception 'unknown column %', column_name using errcode = '22023';
  end if;
  -- The counts come from the same snapshot the UPDATE starts from.
  execute format($u$
    with __sb_counted as (
      select count(*) as records,
             coalesce(sum((select count(*) from jsonb_object_keys(%4$s))), 0) as cells,
             count(*) filter (where r.__suggested_new and $1::text is null) as created,
             count(*) filter (where r.__suggest_delete is not null and $1::text is null) as deleted
        from %1$s r where %2$s
    ), __sb_applied as (
      -- One pass per row: the patch, its values typed by the table's row type, and those
      -- as JSON (to compare with the source's) are each computed once.
      update %1$s r set
        (%3$s, __edited) = (
          select %5$s,
                 (r.__edited - array(select jsonb_object_keys(__sb_x.p))) || coalesce((
                   select jsonb_object_agg(__sb_k.k, now()) from jsonb_object_keys(__sb_x.p) __sb_k(k)
                    where __sb_k.k <> all ($2) and (r.__created or r.__suggested_new or __sb_j.v -> __sb_k.k is distinct from r.__last_seen -> __sb_k.k)), '{}')
            from (select %4$s as p offset 0) __sb_x  -- offset 0: computed once, not inlined at each use
            cross join lateral jsonb_populate_record(null::%1$s, __sb_x.p) __sb_n
            cross join lateral (select to_jsonb(__sb_n.*) as v) __sb_j),
        __suggested = case when $1::text is null then '{}' else r.__suggested - $1 end,
        __created = r.__created or (r.__suggested_new and $1::text is null),
        __suggested_new = r.__suggested_new and $1::text is not null,
        __deleted = r.__deleted or (r.__suggest_delete is not null and $1::text is null),
        __suggest_delete = case when $1::text is null then null else r.__suggest_delete end,
        __updated_at = now()
       where %2$s
      returning 1
    )
    select jsonb_build_object('records', (select count(*) from __sb_applied), 'cells', c.cells, 'created', c.created, 'deleted', c.deleted)
      from __sb_counted c
    $u$, rel, snapbase_private.suggestion_scope(t, record_id, within_filter), cols, patch,
    (select string_agg(format('case when __sb_x.p ? %1$L then __sb_n.%1$I else r.%1$I end', c), ', ') from unnest(snapbase_private.column_names(t)) c))
    into result using column_name, snapbase_private.scratch_columns(t);
  perform snapbase_private.audit_workbook('accept_suggestions', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('record_id', record_id, 'column', column_name, 'within_filter', within_filter) || result);
  return result;
end;
$$;
comment on function snapbase.accept_suggestions(bigint, bigint, text, boolean) is
  'Accept suggestions of one record or all (optionally within the active filter), for one column or all. Returns {records, cells, created, deleted}, like reject_suggestions.';

create or replace function snapbase.reject_suggestions(table_id bigint, record_id bigint default null, column_name text default null,
                                                       within_filter boolean default false)
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'edit');
  rel text := snapbase_private.table_rel(t);
  scope text := snapbase_private.suggestion_scope(t, record_id, within_filter);
  result jsonb;
  removed bigint := 0;
begin
  if column_name is not null and column_name <> all (snapbase_private.column_names(t)) then
    raise exception 'unknown column %', column_name using errcode = '22023';
  end if;
  -- Counted from the same snapshot the statements start from.
  execute format($q$
    select jsonb_build_object(
             'records', count(*) filter (where $1::text is null or r.__suggested ? $1),
             'cells', coalesce(sum((select count(*) from jsonb_object_keys(r.__suggested) __sb_k(k) where $1::text is null or __sb_k.k = $1)), 0),
             'created', count(*) filter (where r.__suggested_new and $1::text is null),
             'deleted', count(*) filter (where r.__suggest_delete is not null and $1::text is null))
      from %s r where %s$q$, rel, scope)
    into result using column_name;
  -- Rejecting a whole suggested new record removes it.
  if column_name is null then
    execute format('delete from %s r where %s and r.__suggested_new', rel, scope);
    get diagnostics removed = row_count;
  end if;
  execute format($u$
    update %s r set
      __suggested = case when $1::text is null then '{}' else r.__suggested - $1 end,
      __suggest_delete = case when $1::text is null then null else r.__suggest_delete end,
      __updated_at = now()
     where %s and ($1::text is null or r.__suggested ? $1)$u$, rel, scope)
    using column_name;
  perform snapbase_private.audit_workbook('reject_suggestions', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('record_id', record_id, 'column', column_name, 'within_filter', within_filter) || result);
  return result;
end;
$$;
comment on function snapbase.reject_suggestions(bigint, bigint, text, boolean) is
  'Reject suggestions of one record or all (optionally within the active filter), for one column or all. Returns {records, cells, created, deleted}, like accept_suggestions: what was rejected (created: suggested new records removed; deleted: suggested deletions dropped).';
