-- Change tracking and row history fixes (red-team findings on migration 000020).
--
-- 1. A column dropped and added again with the same name and type leaves the row
--    layout and the storage (relfilenode) as they were, so the next snapshot was
--    built from the previous one and kept the old column's values. The fingerprint
--    now lists every attribute, dropped ones included, with its number, type, type
--    modifier and collation: DROP COLUMN and ADD COLUMN always change it.

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
