-- Fourth review, snapshots:
-- * Changes are recorded under the primary key of their moment: a key moved to other
--   columns and back went unnoticed, and the next snapshot missed rows. The tracking
--   fingerprint now holds the primary key's index.
-- * Catalog changes that alter the text of unchanged rows: a composite type's new
--   attribute (fingerprint), and names printed by reg* columns (never tracked).
-- * snapshot_diff and row_history compared rows as jsonb, which calls 1.0 and 1.00,
--   -0 and 0, JSON null and SQL NULL equal; they compare values' texts now. A restore
--   also puts back a key's own text (1.00 to 1).

create or replace function snapbase_private.column_types(target regclass)
 returns setof oid
 language sql
 stable
 set search_path to 'pg_catalog'
as $function$
  with recursive ty(oid) as (
    select a.atttypid from pg_attribute a where a.attrelid = target and a.attnum > 0 and not a.attisdropped
    union
    select n.x from ty join pg_type t on t.oid = ty.oid
      cross join lateral (
        select t.typbasetype union all select t.typelem
        union all select a2.atttypid from pg_attribute a2 where t.typrelid <> 0 and a2.attrelid = t.typrelid and a2.attnum > 0 and not a2.attisdropped
        union all select r.rngsubtype from pg_range r where r.rngtypid = t.oid
      ) n(x)
     where n.x <> 0
  )
  select oid from ty
$function$;
comment on function snapbase_private.column_types(regclass) is 'Every type a table''s values are made of: its columns'' types and, recursively, their domains'' base types, array elements, composite attributes and range subtypes.';

CREATE OR REPLACE FUNCTION snapbase_private.tracking_fingerprint(target regclass, text_form boolean)
 RETURNS text
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog'
AS $function$
  select concat_ws('|',
    (select c.relfilenode::text from pg_class c where c.oid = target),
    -- Every attribute, dropped ones too: a column dropped and added again (same name
    -- and type, so the same layout, and no rewrite) is a new attribute whose values
    -- come from its default, not from any statement. Also a column's collation, which
    -- can change without a rewrite, and with it the key order.
    (select string_agg(format('%s:%s:%s:%s', a.attnum, a.atttypid, a.atttypmod, a.attcollation), ',' order by a.attnum)
       from pg_attribute a where a.attrelid = target and a.attnum > 0),
    (select string_agg(format('%s:%s:%s:%s', t.oid, t.xmin, t.tgenabled, t.tgname), ',' order by t.tgname)
       from pg_trigger t where t.tgrelid = target and t.tgfoid = 'snapbase_private.tg__track_changes()'::regprocedure),
    -- The primary key's index: changes are recorded under the key of their moment, so
    -- a key dropped and made again (on other columns, and back) breaks the record.
    (select format('pk %s:%s', i.indexrelid, i.indkey) from pg_index i where i.indrelid = target and i.indisprimary),
    case when text_form then (
      -- A composite type's attributes too: ALTER TYPE … ADD ATTRIBUTE changes the text
      -- of every stored value of it without writing the table.
      select string_agg(format('%s:%s:%s:%s:%s', t.oid, t.xmin, p.xmin,
                               (select string_agg(e.oid::text || ':' || e.xmin::text, ',' order by e.oid) from pg_enum e where e.enumtypid = t.oid),
                               (select string_agg(format('%s.%s.%s.%s', a.attnum, a.atttypid, a.atttypmod, a.attisdropped), ',' order by a.attnum)
                                  from pg_attribute a where t.typrelid <> 0 and a.attrelid = t.typrelid and a.attnum > 0)),
                        ';' order by t.oid)
        from snapbase_private.column_types(target) ty(oid) join pg_type t on t.oid = ty.oid left join pg_proc p on p.oid = t.typoutput
       where t.typnamespace <> 'pg_catalog'::regnamespace
    ) end)
$function$;
comment on function snapbase_private.tracking_fingerprint(regclass,boolean) is 'The catalog state under which recorded changes are complete; compared between consecutive snapshots (any difference: a full capture): the storage (relfilenode), every attribute with its number, type and collation (dropped ones too, so DROP COLUMN and ADD COLUMN change it), the tracking triggers'' catalog rows, the primary key''s index, and for text-form layouts the user-defined types (enum labels and composite attributes included). GRANTs, ANALYZE and SET DEFAULT do not change it.';


CREATE OR REPLACE FUNCTION snapbase_private.tracking_problem(target regclass, mt_id bigint)
 RETURNS text
 LANGUAGE plpgsql
 STABLE
 SET search_path TO 'pg_catalog'
 SET standard_conforming_strings TO 'on'
AS $function$
declare
  rel record;
  armed integer;
begin
  select c.relkind, c.relispartition, c.relpersistence, c.relrowsecurity, c.relforcerowsecurity, c.relowner
    into rel from pg_class c where c.oid = target;
  if rel.relkind <> 'r' then
    return 'a partitioned table is not tracked';
  elsif rel.relispartition then
    return 'a partition is not tracked (writes through its parent do not fire its triggers)';
  elsif rel.relpersistence = 'u' then
    return 'an unlogged table is not tracked (crash recovery empties it without triggers)';
  elsif exists (select 1 from pg_inherits i where i.inhparent = target) then
    return 'the table has inheritance children, whose rows it shows and whose writes it does not see';
  elsif exists (select 1 from pg_inherits i where i.inhrelid = target) then
    return 'the table inherits from another, and statements on the parent write it without firing its triggers';
  elsif rel.relrowsecurity and (rel.relforcerowsecurity or not pg_has_role(current_user, rel.relowner, 'USAGE'))
        and not (select r.rolsuper or r.rolbypassrls from pg_roles r where r.rolname = current_user) then
    return 'row-level security applies to the snapshot reader, so policies could change what it sees';
  elsif exists (select 1 from pg_subscription_rel s where s.srrelid = target) then
    return 'logical replication writes into the table without firing statement triggers';
  elsif exists (
      select 1 from snapbase_private.column_types(target) ty(oid) join pg_type t on t.oid = ty.oid
       where t.typnamespace = 'pg_catalog'::regnamespace and t.typname ~ '^reg' and t.typcategory <> 'A') then
    -- regclass and its siblings print names, which change (RENAME, search_path) without the table being written.
    return 'a column of a reg* type (regclass, regtype, …) shows object names, which change without the table being written';
  end if;
  -- Four statement triggers that record, ENABLE ALWAYS.
  select count(*) into armed
    from pg_trigger t
   where t.tgrelid = target
     and t.tgfoid = 'snapbase_private.tg__track_changes()'::regprocedure
     and t.tgenabled = 'A'
     and t.tgnargs = 1 and encode(t.tgargs, 'escape') = mt_id::text || '\000'
     and (t.tgname, t.tgtype) in (('_900_snapbase_track_insert'::name, 4::int2), ('_900_snapbase_track_update'::name, 16::int2),
                                  ('_900_snapbase_track_delete'::name, 8::int2), ('_900_snapbase_track_truncate'::name, 32::int2));
  if armed < 4 then
    return 'the tracking triggers are missing, disabled or not ENABLE ALWAYS (snapbase.register_table re-arms them)';
  end if;
  -- And one ROW trigger with a transition table that never fires (disabled, WHEN
  -- (false)) but makes PostgreSQL refuse to make the table an inheritance child or a
  -- partition, whose parent's statements would write it without firing the four; a
  -- table detached again before the next snapshot would look untouched. Enabled it
  -- would still guard, at a cost to every DELETE: only the armed form counts.
  if not exists (
       select 1 from pg_trigger t
        where t.tgrelid = target
          and t.tgname = '_900_snapbase_track_no_inheritance'
          and t.tgfoid = 'snapbase_private.tg__track_changes()'::regprocedure
          and t.tgenabled = 'D'
          and t.tgtype = 9::int2  -- ROW, AFTER DELETE
          and t.tgoldtable is not null
          and t.tgnargs = 1 and encode(t.tgargs, 'escape') = mt_id::text || '\000') then
    return 'the tracking triggers are missing the disabled _900_snapbase_track_no_inheritance, which keeps the table from becoming an inheritance child or a partition (snapbase.register_table re-arms it)';
  end if;
  return null;
end;
$function$;
comment on function snapbase_private.tracking_problem(regclass,bigint) is 'Null when the managed table''s changes are tracked, else why not. Tables whose rows can change without a statement trigger firing on them (partitions, inheritance parents and children, unlogged tables, subscribers) or whose visible rows depend on policies are never tracked; a tracked table''s fifth trigger (_900_snapbase_track_no_inheritance) keeps it from becoming an inheritance child or a partition between two snapshots.';


CREATE OR REPLACE FUNCTION snapbase.snapshot_diff(from_id bigint, to_id bigint)
 RETURNS SETOF snapbase.snapshot_diff_row
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET "DateStyle" TO 'ISO, YMD'
 SET "IntervalStyle" TO 'postgres'
 SET "TimeZone" TO 'UTC'
 SET extra_float_digits TO '3'
 SET bytea_output TO 'hex'
AS $function$
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
  -- Rows and fields compare by their values' text (t): jsonb (j, what is shown)
  -- calls 1.0 and 1.00, -0 and 0, JSON null and SQL NULL equal.
  -- Pages both snapshots share hold identical chunks, and chunks both hold identical
  -- rows: only chunks of pages they do not share, and then not in the other, are decoded.
  return query execute format($q$
    with pa as (select unnest(t.page_ids) as id from snapbase_private.snapshot_trees t where t.snapshot_id = $1),
         pb as (select unnest(t.page_ids) as id from snapbase_private.snapshot_trees t where t.snapshot_id = $2),
         ea as materialized (
           select coalesce(v.chunk_id, -1) as cid, coalesce(v.chunk_hash, '\x') as chash
             from snapbase_private.snapshot_pages p cross join lateral unnest(p.chunk_ids, p.chunk_hashes) as v(chunk_id, chunk_hash)
            where p.id in (select id from pa except select id from pb)),
         eb as materialized (
           select coalesce(v.chunk_id, -1) as cid, coalesce(v.chunk_hash, '\x') as chash
             from snapbase_private.snapshot_pages p cross join lateral unnest(p.chunk_ids, p.chunk_hashes) as v(chunk_id, chunk_hash)
            where p.id in (select id from pb except select id from pa)),
         only_a as (
           select to_jsonb(r.rec) - $4 as j, %3$s - $4 as t
             from %1$s c cross join lateral (select unnest(c.rows) as rec) r
            where c.snapshot_id = $1
              and exists (select 1 from ea where ea.cid = coalesce(c.chunk_id, -1) and ea.chash = coalesce(c.chunk_hash, '\x'))
              and not exists (select 1 from eb where eb.cid = coalesce(c.chunk_id, -1) and eb.chash = coalesce(c.chunk_hash, '\x'))),
         only_b as (
           select to_jsonb(r.rec) - $4 as j, %4$s - $4 as t
             from %2$s c cross join lateral (select unnest(c.rows) as rec) r
            where c.snapshot_id = $2
              and exists (select 1 from eb where eb.cid = coalesce(c.chunk_id, -1) and eb.chash = coalesce(c.chunk_hash, '\x'))
              and not exists (select 1 from ea where ea.cid = coalesce(c.chunk_id, -1) and ea.chash = coalesce(c.chunk_hash, '\x'))),
         keyed_a as (
           select (select jsonb_object_agg(k, j -> k) from unnest($3::text[]) k) as key, j, t from only_a
         ), keyed_b as (
           select (select jsonb_object_agg(k, j -> k) from unnest($3::text[]) k) as key, j, t from only_b
         )
    select case when ka.key is null then 'added' when kb.key is null then 'removed' else 'changed' end,
           coalesce(kb.key, ka.key),
           case when ka.key is not null and kb.key is not null then
             array(select f from (select jsonb_object_keys(ka.t || kb.t) as f) fs
                    where (ka.t -> f) is distinct from (kb.t -> f) order by f)
           end,
           ka.j, kb.j
      from keyed_a ka full join keyed_b kb on ka.key = kb.key
     where ka.t is distinct from kb.t
     order by coalesce(kb.key, ka.key)
  $q$, snapbase_private.snapshot_chunk_source(a), snapbase_private.snapshot_chunk_source(b),
    snapbase_private.row_texts_sql(snapbase_private.layout_relid(a.layout_id), 'r.rec'),
    snapbase_private.row_texts_sql(snapbase_private.layout_relid(b.layout_id), 'r.rec'))
  using a.id, b.id, key_cols, hidden;
end;
$function$;
comment on function snapbase.snapshot_diff(bigint,bigint) is 'Rows added, removed and changed (with the changed fields) between two snapshots of one table, by primary key.';
grant execute on function snapbase.snapshot_diff(bigint,bigint) to :ROLE_VIEWER;


CREATE OR REPLACE FUNCTION snapbase.row_history(target regclass, key jsonb)
 RETURNS TABLE(snapshot_id bigint, created_at timestamp with time zone, change_request_id bigint, change text, changed_fields text[], "row" jsonb)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
 SET "DateStyle" TO 'ISO, YMD'
 SET "IntervalStyle" TO 'postgres'
 SET "TimeZone" TO 'UTC'
 SET extra_float_digits TO '3'
 SET bytea_output TO 'hex'
AS $function$
#variable_conflict use_column
declare
  mt snapbase.managed_tables := snapbase_private.readable_managed_table(target);
  newest snapbase.snapshots;
  s snapbase.snapshots;
  tree snapbase_private.snapshot_trees;
  key_types jsonb := '{}';
  kt text;
  layout_type text;
  chunk_table text;
  bad text;
  found record;
  chunk_identity text;
  last_identity text;
  raw jsonb;
  raw_texts jsonb;
  visible jsonb;
  previous jsonb;
  previous_texts jsonb;
  previous_visible jsonb;
  older boolean := false;
  out_ids bigint[] := '{}';
  out_at timestamptz[] := '{}';
  out_cr bigint[] := '{}';
  out_change text[] := '{}';
  out_fields text[] := '{}';
  out_rows jsonb[] := '{}';
  out_texts jsonb[] := '{}';
  n integer := 0;
begin
  select * into newest from snapbase.snapshots x where x.managed_table_id = mt.id order by x.id desc limit 1;
  if newest.id is null then
    return;
  end if;
  perform snapbase_private.readable_snapshot(newest.id);
  if newest.primary_key is null then
    raise exception 'row history needs a primary key; % has none', mt.qualified_name using errcode = '42P10';
  end if;
  if jsonb_typeof(key) is distinct from 'object' then
    raise exception 'the key must be a JSON object of the primary key columns (%)', array_to_string(newest.primary_key, ', ')
      using errcode = '22023';
  end if;
  select string_agg(k, ', ') into bad from jsonb_object_keys(key) k where k <> all (newest.primary_key);
  if bad is null then
    select string_agg(c, ', ') into bad from unnest(newest.primary_key) c where key -> c is null or key -> c = 'null';
    if bad is not null then
      raise exception 'the key must give every primary key column of %: % missing', mt.qualified_name, bad using errcode = '22023';
    end if;
  else
    raise exception 'the key names columns that are not the primary key of % (%): %', mt.qualified_name,
      array_to_string(newest.primary_key, ', '), bad using errcode = '22023';
  end if;

  -- Oldest first, so that each snapshot is compared with the one before it.
  for s in select * from snapbase.snapshots x where x.managed_table_id = mt.id order by x.id loop
    raw := null;
    raw_texts := null;
    chunk_identity := null;
    if s.primary_key is not distinct from newest.primary_key then
      select * into tree from snapbase_private.snapshot_trees t where t.snapshot_id = s.id;
      -- The key's composite type the snapshot's boundaries parse into (made by
      -- capture; only snapshots from before trees need one made here).
      kt := coalesce(tree.key_type, key_types ->> s.layout_id::text);
      if kt is null then
        kt := (snapbase_private.ensure_layout((select jsonb_agg(c order by array_position(s.primary_key, c ->> 'name'))
                                                  from jsonb_array_elements(s.columns) c where (c ->> 'name') = any (s.primary_key)))).type_name;
        key_types := key_types || jsonb_build_object(s.layout_id::text, kt);
      end if;
      select l.type_name, l.chunk_table into layout_type, chunk_table from snapbase_private.row_layouts l where l.id = s.layout_id;
      -- The one chunk whose key range holds the key: its page by the pages' first
      -- keys, then the chunk by the page's chunk boundaries.
      execute format($q$
        with k as (select jsonb_populate_record(null::%1$s, $2) as k),
             p as (select coalesce(max(u.ord) filter (where u.b::%1$s <= k.k), 1) as ord
                     from k, unnest($1::text[]) with ordinality as u(b, ord)),
             pg as (select pg.* from p join snapbase_private.snapshot_pages pg on pg.id = ($3::bigint[])[p.ord]),
             c as (select coalesce(max(w.ord) filter (where w.b::%1$s <= k.k), 1) as ord
                     from k, pg, unnest(pg.bounds) with ordinality as w(b, ord))
        select pg.chunk_ids[c.ord] as chunk_id, pg.chunk_hashes[c.ord] as chunk_hash,
               (select every(x is not null) from unnest(pg.bounds) x) as bounded
          from pg, c
      $q$, kt) into found using tree.page_bounds, key, tree.page_ids;
      -- (A record IS NOT NULL only when every field is: test a field.)
      if found.bounded then
        chunk_identity := coalesce(found.chunk_id::text, encode(found.chunk_hash, 'hex'));
        if chunk_identity = last_identity then
          raw := previous;  -- the same chunk as the snapshot before: the same row
          raw_texts := previous_texts;
        else
          execute format($q$
            select to_jsonb(r.rec), %5$s from %1$s c cross join lateral (select unnest(c.rows) as rec) r
             where %2$s and (%3$s) = (%4$s)
          $q$,
            case when chunk_table is not null and found.chunk_id is not null
                 then format('%s', chunk_table) else format('(select hash, rows::%s[] as rows from snapbase_private.chunk_store)', layout_type) end,
            case when found.chunk_id is not null then 'c.id = $1' else 'c.hash = $2' end,
            (select string_agg(format('(r.rec).%I', c), ', ') from unnest(s.primary_key) c),
            (select string_agg(format('(jsonb_populate_record(null::%s, $3)).%I', kt, c), ', ') from unnest(s.primary_key) c),
            snapbase_private.row_texts_sql(snapbase_private.layout_relid(s.layout_id), 'r.rec'))
            into raw, raw_texts using found.chunk_id, found.chunk_hash, key;
        end if;
      elsif found.bounded is not null then
        -- A snapshot from before trees kept no text-chunk boundaries: read it all.
        execute format($q$
          select to_jsonb(r.rec), %4$s from %1$s c cross join lateral (select unnest(c.rows) as rec) r
           where c.snapshot_id = $1 and (%2$s) = (%3$s)
        $q$, snapbase_private.snapshot_chunk_source(s),
          (select string_agg(format('(r.rec).%I', c), ', ') from unnest(s.primary_key) c),
          (select string_agg(format('(jsonb_populate_record(null::%s, $2)).%I', kt, c), ', ') from unnest(s.primary_key) c),
          snapbase_private.row_texts_sql(snapbase_private.layout_relid(s.layout_id), 'r.rec'))
          into raw, raw_texts using s.id, key;
      end if;
      -- (found is all nulls for a tree without pages, an empty table: no chunk, no row.)
    end if;
    -- The chunk this snapshot's row came from, or null when it came from none (an
    -- empty table, another primary key, a snapshot from before trees): only the very
    -- next snapshot may take the row over from it, never one after a gap.
    last_identity := chunk_identity;
    -- Compared as the caller sees them, and by their values' text, as snapshot_diff
    -- does: a change in a column the caller may not read is no change.
    visible := raw_texts - snapbase_private.hidden_columns(s);
    if raw is not null or previous is not null then
      n := n + 1;
      out_ids[n] := s.id;
      out_at[n] := s.created_at;
      out_cr[n] := s.change_request_id;
      out_rows[n] := raw - snapbase_private.hidden_columns(s);
      out_texts[n] := visible;
      out_change[n] := case when raw is null then 'removed'
                            when previous is null then case when older then 'added' else 'initial' end
                            when visible = previous_visible then 'unchanged'
                            else 'changed' end;
    end if;
    previous := raw;
    previous_texts := raw_texts;
    previous_visible := visible;
    older := true;
  end loop;

  return query
    select u.id, u.at, u.cr, u.change,
           case when u.change = 'changed' then
             array(select f from (select jsonb_object_keys(coalesce(u.before_texts, '{}') || u.texts) as f) fs
                    where (u.before_texts -> f) is distinct from (u.texts -> f) order by f)
           end,
           u.r
      from (select x.*, lag(x.texts) over (order by x.ord) as before_texts
              from unnest(out_ids, out_at, out_cr, out_change, out_rows, out_texts) with ordinality as x(id, at, cr, change, r, texts, ord)) u
     order by u.ord desc;
end;
$function$;
comment on function snapbase.row_history(regclass,jsonb) is 'One row''s values across the table''s snapshots, newest first: initial (in the oldest snapshot), added, changed (with the fields), unchanged or removed, with the change request that took each snapshot. Rows are compared as the caller sees them: a change only in columns the caller may not read is unchanged. Reads only the chunk holding the key in each snapshot. Needs the right to read the live table.';
grant execute on function snapbase.row_history(regclass,jsonb) to :ROLE_VIEWER;


CREATE OR REPLACE FUNCTION snapbase_private.apply_restore(snapshot_id bigint, target regclass, keys jsonb DEFAULT NULL::jsonb)
 RETURNS bigint
 LANGUAGE plpgsql
 SET search_path TO 'pg_catalog'
 SET "DateStyle" TO 'ISO, YMD'
 SET "IntervalStyle" TO 'postgres'
 SET "TimeZone" TO 'UTC'
 SET extra_float_digits TO '3'
 SET bytea_output TO 'hex'
 SET client_min_messages TO 'warning'
AS $function$
declare
  snap snapbase.snapshots;
  layout text;
  pk text[];
  shared text[];      -- columns both the snapshot and the table have, in table order
  writable text[];    -- of those, the ones not generated
  settable text[];    -- of those, the ones an UPDATE may set (not identity always; keys too: 1.00 is
                      -- the key 1, but not its value)
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
  key_in_t text := 'true';  -- for a partial restore: the row of t has one of the keys
begin
  select * into snap from snapbase.snapshots s where s.id = snapshot_id;
  perform snapbase_private.restore_fit(snap, target);
  layout := snapbase_private.layout_type(snap.layout_id);
  pk := snap.primary_key;
  select coalesce(array_agg(c.name order by c.ord) filter (where true), '{}'),
         coalesce(array_agg(c.name order by c.ord) filter (where not c.generated), '{}'),
         coalesce(array_agg(c.name order by c.ord) filter (where not c.generated and not c.identity_always), '{}'),
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
  -- A partial restore: only the rows with these keys, in the snapshot and in the table.
  if keys is not null then
    key_in_t := format('exists (select 1 from jsonb_array_elements(%L::jsonb) __sb_k where %s)', keys,
      (select string_agg(format('t.%1$I = (__sb_k ->> %1$L)::%2$s%3$s', a.attname, format_type(a.atttypid, a.atttypmod),
                                snapbase_private.collate_clause(a.attcollation)), ' and ')
         from unnest(pk) k join pg_attribute a on a.attrelid = target and a.attname = k));
    execute format('delete from pg_temp.snapbase_restore_source t where not %s', key_in_t);
  end if;
  execute 'analyze pg_temp.snapbase_restore_source';

  row_t := format('row(%s)::text', (select string_agg(format('t.%I', c), ', ') from unnest(shared) c));
  if pk is not null then
    -- Keys compare under the table's collations (the copy's columns have the default one).
    key_match := (select string_agg(format('t.%1$I = s.%1$I%2$s', a.attname, snapbase_private.collate_clause(a.attcollation)), ' and ')
                    from unnest(pk) k join pg_attribute a on a.attrelid = target and a.attname = k);
    -- Rows the snapshot lacks, and rows whose non-key identity value cannot be updated back.
    execute format('delete from %s t where %s and not exists (select 1 from pg_temp.snapbase_restore_source s where %s%s)',
      target, key_in_t, key_match,
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
$function$;
comment on function snapbase_private.apply_restore(bigint,regclass,jsonb) is 'Puts a managed table back to a snapshot with the fewest row operations (by primary key, or by whole rows counting duplicates), or only the rows with the given keys; runs as the owner inside approve_change.';


