-- Change tracking and row history fixes (red-team findings on migration 000020).
--
-- 1. A column dropped and added again with the same name and type leaves the row
--    layout and the storage (relfilenode) as they were, so the next snapshot was
--    built from the previous one and kept the old column's values. The fingerprint
--    now lists every attribute, dropped ones included, with its number, type, type
--    modifier and collation: DROP COLUMN and ADD COLUMN always change it.
-- 2. A table made an inheritance child (ALTER TABLE ... INHERIT) or a partition
--    (ATTACH PARTITION), written through its parent (which fires none of its
--    statement triggers) and detached again before the next snapshot was not
--    noticed: tracking_problem looks at inheritance only when a snapshot is taken.
--    A fifth trigger, a ROW trigger with a transition table that never fires
--    (disabled, and WHEN (false) should it be enabled), makes PostgreSQL refuse both
--    statements ("ROW triggers with transition tables are not supported in
--    inheritance hierarchies"; the check ignores whether the trigger is enabled).
--    Dropping it is noticed like dropping one of the other four.

create or replace function snapbase_private.tracking_fingerprint(target regclass, text_form boolean) returns text
language sql stable
set search_path = pg_catalog
as $$
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
    case when text_form then (
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
      select string_agg(format('%s:%s:%s:%s', t.oid, t.xmin, p.xmin,
                               (select string_agg(e.oid::text || ':' || e.xmin::text, ',' order by e.oid) from pg_enum e where e.enumtypid = t.oid)),
                        ';' order by t.oid)
        from ty join pg_type t on t.oid = ty.oid left join pg_proc p on p.oid = t.typoutput
       where t.typnamespace <> 'pg_catalog'::regnamespace
    ) end)
$$;
comment on function snapbase_private.tracking_fingerprint(regclass, boolean) is
  'The catalog state under which recorded changes are complete; compared between consecutive snapshots (any difference: a full capture): the storage (relfilenode), every attribute with its number, type and collation (dropped ones too, so DROP COLUMN and ADD COLUMN change it), the tracking triggers'' catalog rows, and for text-form layouts the user-defined types. GRANTs, ANALYZE and SET DEFAULT do not change it.';

create or replace function snapbase_private.tracking_problem(target regclass, mt_id bigint) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
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
$$;
comment on function snapbase_private.tracking_problem(regclass, bigint) is
  'Null when the managed table''s changes are tracked, else why not. Tables whose rows can change without a statement trigger firing on them (partitions, inheritance parents and children, unlogged tables, subscribers) or whose visible rows depend on policies are never tracked; a tracked table''s fifth trigger (_900_snapbase_track_no_inheritance) keeps it from becoming an inheritance child or a partition between two snapshots.';

-- Puts the tracking triggers on a managed table: the four statement triggers that
-- record, made ENABLE ALWAYS (which needs ownership of the table), and
-- _900_snapbase_track_no_inheritance, an AFTER DELETE ROW trigger with a transition
-- table, disabled and WHEN (false): it never fires (the OLD TABLE it names is the one
-- the delete trigger keeps anyway), but while it exists, enabled or not, PostgreSQL
-- refuses ALTER TABLE ... INHERIT and ATTACH PARTITION on the table. Disabled, it
-- costs a bulk DELETE nothing measurable; enabled, its WHEN is evaluated for every
-- row (about 6% of a 1,000,000-row DELETE). Returns null when tracked, else why not.
-- Re-creating them invalidates the tracking base.
create or replace function snapbase_private.arm_tracking(mt snapbase.managed_tables, target regclass) returns text
language plpgsql
set search_path = pg_catalog
as $$
declare
  problem text := snapbase_private.tracking_problem(target, mt.id);
  owner name := (select c.relowner::regrole::name from pg_class c where c.oid = target);
  ev record;
begin
  if problem is null or problem not like 'the tracking triggers%' then
    return problem;
  end if;
  if snapbase_private.primary_key(target) is null then
    return 'a table without a primary key is not tracked';
  end if;
  if not pg_has_role(current_user, owner, 'USAGE') then
    return format('%s is owned by %s, so its tracking triggers cannot be made ENABLE ALWAYS', target, owner);
  end if;
  for ev in select * from (values ('insert', 'insert', 'referencing new table as new_rows', 'for each statement', 'enable always'),
                                  ('update', 'update', 'referencing old table as old_rows new table as new_rows', 'for each statement', 'enable always'),
                                  ('delete', 'delete', 'referencing old table as old_rows', 'for each statement', 'enable always'),
                                  ('truncate', 'truncate', '', 'for each statement', 'enable always'),
                                  ('no_inheritance', 'delete', 'referencing old table as old_rows', 'for each row when (false)', 'disable')) v(name, event, ref, fires, state) loop
    if exists (select 1 from pg_trigger t where t.tgrelid = target and t.tgname = '_900_snapbase_track_' || ev.name) then
      execute format('drop trigger %I on %s', '_900_snapbase_track_' || ev.name, target);
    end if;
    execute format('create trigger %I after %s on %s %s %s execute function snapbase_private.tg__track_changes(%L)',
      '_900_snapbase_track_' || ev.name, ev.event, target, ev.ref, ev.fires, mt.id);
    execute format('alter table %s %s trigger %I', target, ev.state, '_900_snapbase_track_' || ev.name);
  end loop;
  insert into snapbase_private.change_tracking (managed_table_id, base_snapshot_id, fingerprint)
  values (mt.id, null, null)
  on conflict (managed_table_id) do update set base_snapshot_id = null, fingerprint = null;
  return snapbase_private.tracking_problem(target, mt.id);
end;
$$;
comment on function snapbase_private.arm_tracking(snapbase.managed_tables, regclass) is
  'Installs (or confirms) the tracking triggers of a managed table: four ENABLE ALWAYS statement triggers that record changed keys, and a disabled ROW trigger with a transition table (WHEN (false)) that never fires but keeps the table from becoming an inheritance child or a partition. Owner only; called by register_table and, when the approving transaction already holds an EXCLUSIVE lock, by capture.';

-- Tables armed before the fifth trigger existed get it now (their next snapshot is
-- full: arming resets the tracking base, and the fingerprint changed anyway). Arming
-- takes a SHARE ROW EXCLUSIVE lock on each. One that cannot be re-armed here stays
-- correct: tracking_problem names the missing trigger, so its snapshots are full
-- until an approval or register_table re-arms it.
do $$
declare
  mt snapbase.managed_tables;
  target regclass;
begin
  for mt in select * from snapbase.managed_tables m order by m.id loop
    target := snapbase_private.relation_of(mt);
    -- Only tables whose four triggers are armed and which lack only the fifth.
    continue when target is null
               or coalesce(snapbase_private.tracking_problem(target, mt.id), '')
                  not like 'the tracking triggers are missing the disabled _900_snapbase_track_no_inheritance%';
    begin
      perform snapbase_private.arm_tracking(mt, target);
    exception when others then
      raise warning 'change tracking of % was not re-armed (%: %); its snapshots are full until register_table re-arms it',
        mt.qualified_name, sqlstate, sqlerrm;
    end;
  end loop;
end;
$$;
