--! Previous: sha1:44d445d8e2f99f5d62cc3226f285a0bf1dc88599
--! Hash: sha1:6b95176eefb379d87ac1d55baa4b6f125f84bca5
--! Message: staged csv rows without a per-row foreign key check

-- Staged CSV rows lose their foreign key: PostgreSQL checked it row by row (measured:
-- 4.7 s of every million staged rows, all of them pointing at the same import).
-- Only stage_csv_rows and stage_csv_copy insert rows, each after require_import;
-- the cascade the key gave is now a statement-level trigger on csv_imports, which
-- also runs when a workbook table's deletion cascades to its imports.

alter table snapbase_private.csv_import_rows drop constraint if exists csv_import_rows_import_id_fkey;

create or replace function snapbase_private.tg__csv_imports_drop_rows() returns trigger
language plpgsql
security definer
set search_path = pg_catalog
as $$
begin
  delete from snapbase_private.csv_import_rows r using gone g where r.import_id = g.id;
  return null;
end;
$$;

drop trigger if exists _900_drop_rows on snapbase.csv_imports;
create trigger _900_drop_rows after delete on snapbase.csv_imports
  referencing old table as gone
  for each statement execute function snapbase_private.tg__csv_imports_drop_rows();
