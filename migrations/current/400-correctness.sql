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

  -- The snapshot's rows (the columns the table still has), each with its values'
  -- text and, among equal rows, its occurrence number (for tables without a key).
  if to_regclass('pg_temp.snapbase_restore_source') is not null then
    drop table pg_temp.snapbase_restore_source;
  end if;
  row_s := format('row(%s)::text', (select string_agg(format('(x.rec).%I', c), ', ') from unnest(shared) c));
  execute format($q$
    create temp table snapbase_restore_source on commit drop as
    select %1$s, %2$s as %3$I, row_number() over (partition by %2$s) as %4$I
      from (select src.rec::%5$s as rec from snapbase_private.snapshot_records($1) as src(rec) offset 0) x
    $q$, (select string_agg(format('(x.rec).%1$I as %1$I', c), ', ') from unnest(shared) c), row_s, key_name, count_name, layout)
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
  return format(E'MERGE INTO %1$s AS t\nUSING (\n  SELECT e.op, e.set, e.shape, jsonb_populate_record(NULL::%1$s, e."row") AS rec\n    FROM jsonb_to_recordset(%2$L::jsonb) AS e(op text, "row" jsonb, set jsonb, shape integer)\n) AS s\nON %3$s\n%4$s',
    target, items,
    (select string_agg(format('t.%1$I = (s.rec).%1$I', c), ' AND ') from unnest(pk) c),
    array_to_string(clauses, E'\n'));
end;
$$;
comment on function snapbase_private.edits_to_sql(regclass, jsonb) is
  'Structured edits ({"insert", "update", "delete"}) as one MERGE keyed by the primary key: omitted insert columns take their defaults, identity values given are kept, generated and identity-always columns cannot be set.';
