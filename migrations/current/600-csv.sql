--------------------------------------------------------------------------------
-- CSV: one set of type inference rules, import options, exports that follow the
-- table's settings (issue 13).
--------------------------------------------------------------------------------
-- Type inference. Before, src/connectors/csv.ts and csv_import_preview had rules of
-- their own that disagreed ("007", an 11-digit integer, "2024-02-30"), and the
-- preview read only the first 1,000 rows. Now there is one table of rules,
-- snapbase_private.csv_type_rules(), and two evaluators that only interpret it, both
-- over every row: SQL's (csv_column_kinds, set-based, for rows already in the
-- database: stage_csv_rows, imports staged before) and the server's
-- (src/connectors/csv-inference.ts, for rows streaming through it: an import's
-- upload, a file the csv connector downloads). The server evaluates what it streams
-- because PostgreSQL's regular expressions cost about 1 µs a cell (a third more
-- time for a 300,000-row upload); in JavaScript the same rules cost a few percent.
-- A column's kinds (the types all its cells fit) are kept per import
-- (csv_import_kinds), so a preview reads them instead of the rows.
--
-- Imports: options skip_unchanged (a suggestion equal to the record's current value
-- is not made) and empty_cells ('skip': an empty cell suggests nothing; 'null': it
-- suggests NULL). The preview takes the same options and reports what the import
-- would do, computed by the same SQL (csv_suggestions_sql).
--
-- Export: snapbase.export_table_rows follows the table's column order and leaves its
-- hidden columns out, unless all_columns; table_export_query takes the columns to
-- write, so share links can pass theirs.

drop function if exists snapbase.csv_import_preview(bigint, jsonb, integer) cascade;
drop function if exists snapbase.import_csv(bigint, jsonb, text, text, boolean) cascade;
drop function if exists snapbase.export_table_rows(bigint, boolean) cascade;
drop function if exists snapbase_private.table_export_query(snapbase.workbook_tables, boolean) cascade;
drop function if exists snapbase_private.stage_csv_copy(bigint) cascade;

--------------------------------------------------------------------------------
-- The rules
--------------------------------------------------------------------------------
-- One table of rules, read by two evaluators that only interpret it: SQL's
-- (csv_value_fits, csv_column_kinds: rows already in the database) and the one in
-- src/connectors/csv-inference.ts (rows streaming through the server: an import's
-- upload, a file the csv connector reads), which loads these rows. A cell fits a
-- type when it matches the pattern (a regular expression PostgreSQL and JavaScript
-- read alike: anchors, [0-9] classes, groups, ?, *, +, {m,n}, |), then, where given,
-- its number lies within [min_value, max_value] and its first ten characters name a
-- day that exists (csv_day_exists). Empty cells decide nothing.
--
-- Only forms that read the same in every session (DateStyle, TimeZone) and lose
-- nothing the cell says: no leading zeros (007 is an identifier, not 7), no plus
-- sign, no spaces around a value, no exponent, no NaN or Infinity, no day that does
-- not exist, at most microseconds, and a zone only where the cell gives one.
--
-- rank orders the types, narrowest first, and is the type's bit in a kinds mask.
-- Types of one chain (integer < bigint < numeric, date < timestamp) are wider than
-- those before them: a cell that fits one fits every wider one of its chain. No cell
-- fits types of two chains. test/csv-types.test.ts holds both evaluators, and these
-- properties, to the same answers.
create or replace function snapbase_private.csv_type_rules()
returns table (rank integer, type text, pattern text, min_value numeric, max_value numeric, day_first boolean)
language sql immutable parallel safe
set search_path = pg_catalog
as $$
  values
    (0, 'boolean', '^(true|false|TRUE|FALSE|True|False)$', null::numeric, null::numeric, false),
    (1, 'integer', '^(0|-?[1-9][0-9]*)$', -2147483648, 2147483647, false),
    (2, 'bigint', '^(0|-?[1-9][0-9]*)$', -9223372036854775808, 9223372036854775807, false),
    (3, 'numeric', '^(0|-?[1-9][0-9]*|-?(0|[1-9][0-9]*)\.[0-9]+)$', null, null, false),
    (4, 'date', '^[0-9]{4}-[0-9]{2}-[0-9]{2}$', null, null, true),
    (5, 'timestamp', '^[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?)?$', null, null, true),
    (6, 'timestamptz',
     '^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?([Zz]|[+-](0[0-9]|1[0-5])(:?[0-5][0-9])?)$',
     null, null, true)
$$;
-- The server reads them as the uploading user.
grant execute on function snapbase_private.csv_type_rules() to :ROLE_VIEWER;
comment on function snapbase_private.csv_type_rules() is
  'The rules of CSV type inference, one row per type (rank: narrowest first, and its bit in a kinds mask): a cell fits when it matches pattern, its number is within [min_value, max_value] where given, and (day_first) its first ten characters are a day that exists. Read by SQL and by the server (src/connectors/csv-inference.ts).';

-- The types inference gives, narrowest first (bit i of a kinds mask is the i-th, 0-based).
create or replace function snapbase_private.csv_types() returns text[]
language sql immutable parallel safe
set search_path = pg_catalog
as $$
  select array_agg(r.type order by r.rank) from snapbase_private.csv_type_rules() r
$$;
comment on function snapbase_private.csv_types() is 'The types CSV type inference gives (besides text), narrowest first.';

-- Whether the first ten characters of a text name a day that exists: YYYY-MM-DD with
-- year 0001 to 9999, month 01 to 12, a day the month has (29 February in leap years).
-- Text comparisons only (the JavaScript evaluator does the same), so it never raises.
create or replace function snapbase_private.csv_day_exists(v text) returns boolean
language sql immutable parallel safe
return left(v, 4) <> '0000' and case
  when substr(v, 6, 2) in ('01', '03', '05', '07', '08', '10', '12') then substr(v, 9, 2) collate "C" between '01' and '31'
  when substr(v, 6, 2) in ('04', '06', '09', '11') then substr(v, 9, 2) collate "C" between '01' and '30'
  when substr(v, 6, 2) = '02' then substr(v, 9, 2) collate "C" between '01' and (case
    -- a leap year: divisible by 4, and not by 100 unless by 400
    when substr(v, 3, 2) in ('04', '08', '12', '16', '20', '24', '28', '32', '36', '40', '44', '48', '52', '56', '60', '64', '68',
                             '72', '76', '80', '84', '88', '92', '96')
      or (substr(v, 3, 2) = '00' and left(v, 2) in ('00', '04', '08', '12', '16', '20', '24', '28', '32', '36', '40', '44', '48',
                                                    '52', '56', '60', '64', '68', '72', '76', '80', '84', '88', '92', '96'))
    then '29' else '28' end)
  else false
end;
comment on function snapbase_private.csv_day_exists(text) is
  'CSV type inference: whether the text''s first ten characters, YYYY-MM-DD, are a day that exists (year 1 to 9999). Never raises.';

-- SQL testing whether cell i of the row x.cells fits the rule of `type`; the cast to
-- numeric runs only once the pattern has matched, so it never raises.
create or replace function snapbase_private.csv_rule_sql(i integer, type text) returns text
language sql immutable
set search_path = pg_catalog
as $$
  select format('(case when x.cells[%1$s] ~ %2$L then %3$s and %4$s else false end)', i, r.pattern,
                case when r.min_value is null then 'true' else format('x.cells[%s]::numeric between %L and %L', i, r.min_value, r.max_value) end,
                case when r.day_first then format('snapbase_private.csv_day_exists(x.cells[%s])', i) else 'true' end)
    from snapbase_private.csv_type_rules() r where r.type = csv_rule_sql.type
$$;
comment on function snapbase_private.csv_rule_sql(integer, text) is
  'CSV type inference: SQL testing whether cell i of x.cells fits the rule of `type` (csv_type_rules).';

-- Whether one non-empty cell fits the type (one of csv_types()).
create or replace function snapbase_private.csv_value_fits(v text, type text) returns boolean
language sql immutable parallel safe
set search_path = pg_catalog
as $$
  select coalesce((select case when v ~ r.pattern
                               then (r.min_value is null or v::numeric between r.min_value and r.max_value)
                                    and (not r.day_first or snapbase_private.csv_day_exists(v))
                               else false end
                     from snapbase_private.csv_type_rules() r where r.type = csv_value_fits.type), false)
$$;
comment on function snapbase_private.csv_value_fits(text, text) is
  'CSV type inference: whether a non-empty cell fits the type''s rule (csv_type_rules).';

-- The types a cell fits, as a mask (bit i: the i-th of csv_types()); null for an
-- empty cell, which decides nothing.
create or replace function snapbase_private.csv_value_kinds(v text) returns integer
language sql immutable parallel safe
set search_path = pg_catalog
as $$
  select case when v <> '' then coalesce(sum(1 << r.rank) filter (where snapbase_private.csv_value_fits(v, r.type)), 0)::integer end
    from snapbase_private.csv_type_rules() r
$$;
comment on function snapbase_private.csv_value_kinds(text) is
  'The types a CSV cell fits, as a mask over csv_types() (bit 0: boolean … bit 6: timestamptz); null for an empty cell.';

-- The narrowest type of a kinds mask; text when it has none, or when there was no
-- value at all (null).
create or replace function snapbase_private.csv_kinds_type(kinds integer) returns text
language sql immutable parallel safe
set search_path = pg_catalog
as $$
  select coalesce((select r.type from snapbase_private.csv_type_rules() r where kinds & (1 << r.rank) <> 0 order by r.rank limit 1), 'text')
$$;
comment on function snapbase_private.csv_kinds_type(integer) is
  'The type CSV type inference gives a column whose cells all fit the kinds mask: its narrowest type, or text.';

-- Two column kinds of the same file, from different rows, as one: the types every
-- cell of both fits (null: no value yet).
create or replace function snapbase_private.csv_kinds_merge(a integer[], b integer[]) returns integer[]
language sql immutable parallel safe
set search_path = pg_catalog
as $$
  select array(select case when x is null then y when y is null then x else x & y end
                 from unnest(a, b) with ordinality as u(x, y, i) order by u.i)
$$;
comment on function snapbase_private.csv_kinds_merge(integer[], integer[]) is
  'Kinds of one file''s columns from two sets of its rows, combined (elementwise AND; null means no value seen).';

-- The kinds of each of a file's first `width` columns over ALL its rows: for each
-- column, the types every non-empty cell fits; null when it has no value. The rows
-- are those of pg_temp.snapbase_csv_staging, or of a staged import.
--
-- Set-based: a column's candidate is the narrowest type its first value fits (a
-- first value that fits nothing makes it text at once), and one scan checks every
-- column's candidate; a column whose candidate fails tries the next wider type its
-- first value fits, in another scan.
create or replace function snapbase_private.csv_column_kinds(width integer, import_id bigint default null) returns integer[]
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  types text[] := snapbase_private.csv_types();
  source text := case when import_id is null then 'select s.cells from pg_temp.snapbase_csv_staging s'
                      else 'select s.cells from snapbase_private.csv_import_rows s where s.import_id = $1' end;
  kinds integer[] := array_fill(null::integer, array[greatest(width, 0)]);
  first_value text;
  first_kinds integer[] := array_fill(null::integer, array[greatest(width, 0)]);
  candidate integer[] := array_fill(null::integer, array[greatest(width, 0)]);
  checks text;
  verdicts boolean[];
  i integer;
  n integer;
begin
  for i in 1 .. width loop
    execute format('select x.cells[%s] from (%s) x where x.cells[%s] <> %L limit 1', i, source, i, '') into first_value using import_id;
    if first_value is not null then
      first_kinds[i] := snapbase_private.csv_value_kinds(first_value);
      kinds[i] := 0;
      candidate[i] := (select min(b) from generate_series(0, cardinality(types) - 1) b where first_kinds[i] & (1 << b) <> 0);
    end if;
  end loop;
  loop
    select string_agg(format('coalesce(bool_and(%s) filter (where x.cells[%s] <> %L), true)',
                             snapbase_private.csv_rule_sql(c.i, types[candidate[c.i] + 1]), c.i, ''), ', ' order by c.i)
      into checks
      from generate_series(1, width) c(i) where candidate[c.i] is not null;
    exit when checks is null;
    execute format('select array[%s] from (%s) x', checks, source) into verdicts using import_id;
    n := 0;
    for i in 1 .. width loop
      continue when candidate[i] is null;
      n := n + 1;
      if verdicts[n] then
        -- Every cell fits the candidate, so every wider type of its chain too.
        kinds[i] := first_kinds[i] & ~((1 << candidate[i]) - 1);
        candidate[i] := null;
      else
        candidate[i] := (select min(b) from generate_series(candidate[i] + 1, cardinality(types) - 1) b where first_kinds[i] & (1 << b) <> 0);
      end if;
    end loop;
  end loop;
  return kinds;
end;
$$;
comment on function snapbase_private.csv_column_kinds(integer, bigint) is
  'CSV type inference over every row, in SQL: per column, the kinds mask all its non-empty cells fit (null: no value). Rows of pg_temp.snapbase_csv_staging, or of a staged import.';

--------------------------------------------------------------------------------
-- Staging an import keeps what its columns fit
--------------------------------------------------------------------------------

create table if not exists snapbase_private.csv_import_kinds (
  import_id bigint primary key references snapbase.csv_imports on delete cascade,
  kinds integer[] not null
);
comment on table snapbase_private.csv_import_kinds is
  'Per staged import, the kinds of its columns over every staged row (csv_column_kinds). Missing for imports staged before it existed: the preview then reads the rows.';

-- Moves the rows of pg_temp.snapbase_csv_staging into a staged import. `kinds`: the
-- kinds of those rows' columns, when the caller (the REST upload, which reads every
-- row as it streams) computed them with the same rules (csv_type_rules); null: they
-- are computed here. They only inform the preview's inferred types.
create or replace function snapbase_private.stage_csv_copy(import_id bigint, kinds integer[] default null) returns bigint
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  imp snapbase.csv_imports := snapbase_private.require_import(import_id);
  added bigint;
begin
  if imp.state <> 'staged' then
    raise exception 'CSV import % is %', imp.id, imp.state using errcode = '55000';
  end if;
  insert into snapbase_private.csv_import_rows (import_id, line, cells)
  select imp.id, s.line, s.cells from pg_temp.snapbase_csv_staging s;
  get diagnostics added = row_count;
  update snapbase.csv_imports i set row_count = i.row_count + added where i.id = imp.id;
  -- The kinds cover every row or are not kept (an import staged before they were).
  if added > 0 and (imp.row_count = 0 or exists (select 1 from snapbase_private.csv_import_kinds k where k.import_id = imp.id)) then
    if kinds is null or cardinality(kinds) <> cardinality(imp.header) then
      kinds := snapbase_private.csv_column_kinds(cardinality(imp.header));
    end if;
    insert into snapbase_private.csv_import_kinds as k (import_id, kinds) values (imp.id, kinds)
      on conflict on constraint csv_import_kinds_pkey do update set kinds = snapbase_private.csv_kinds_merge(k.kinds, excluded.kinds);
  end if;
  return added;
end;
$$;
comment on function snapbase_private.stage_csv_copy(bigint, integer[]) is
  'Moves the rows of pg_temp.snapbase_csv_staging (line, cells) into a staged import, keeping the kinds of its columns (given by the REST upload, else computed). For the REST upload and stage_csv_rows.';
grant execute on function snapbase_private.stage_csv_copy(bigint, integer[]) to :ROLE_VIEWER;

-- A batch of parsed rows [{line, cells}] for a staged import: through the same
-- staging table as an upload, so the same checks and inference apply.
create or replace function snapbase.stage_csv_rows(import_id bigint, rows jsonb) returns bigint
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  imp snapbase.csv_imports := snapbase_private.require_import(import_id);
  added bigint;
begin
  if imp.state <> 'staged' then
    raise exception 'CSV import % is %', imp.id, imp.state using errcode = '55000';
  end if;
  if jsonb_typeof(rows) is distinct from 'array'
     or exists (select 1 from jsonb_array_elements(rows) r
                 where jsonb_typeof(r) <> 'object' or jsonb_typeof(r -> 'line') <> 'number' or jsonb_typeof(r -> 'cells') <> 'array'
                    or exists (select 1 from jsonb_array_elements(r -> 'cells') c where jsonb_typeof(c) <> 'string')) then
    raise exception 'rows must be [{"line": n, "cells": ["text", …]}, …]' using errcode = '22023';
  end if;
  create temporary table if not exists snapbase_csv_staging (line integer not null, cells text[] not null) on commit drop;
  truncate pg_temp.snapbase_csv_staging;
  insert into pg_temp.snapbase_csv_staging (line, cells)
  select (r ->> 'line')::integer, array(select jsonb_array_elements_text(r -> 'cells')) from jsonb_array_elements(rows) r;
  added := snapbase_private.stage_csv_copy(imp.id);
  truncate pg_temp.snapbase_csv_staging;
  return added;
end;
$$;
comment on function snapbase.stage_csv_rows(bigint, jsonb) is
  'Stage a batch of parsed rows [{"line": 2, "cells": ["A", "1"]}, …] for a CSV import started with start_csv_import.';

-- The inferred type of each header column of a staged import.
create or replace function snapbase_private.csv_import_types(imp snapbase.csv_imports) returns jsonb
language sql stable
set search_path = pg_catalog
as $$
  select coalesce(jsonb_object_agg(h.name, snapbase_private.csv_kinds_type(k.kinds[h.ord])), '{}')
    from unnest(imp.header) with ordinality as h(name, ord)
    cross join (select coalesce((select ik.kinds from snapbase_private.csv_import_kinds ik where ik.import_id = imp.id),
                                snapbase_private.csv_column_kinds(cardinality(imp.header), imp.id)) as kinds) k
$$;
comment on function snapbase_private.csv_import_types(snapbase.csv_imports) is
  'The type inferred for each header column of a staged import, over all its rows: {"header": "type"}.';

--------------------------------------------------------------------------------
-- Import: typed cells, options, and what an import does (shared with the preview)
--------------------------------------------------------------------------------

-- The typed value of cell i of a staged row s. An empty cell is NULL in every type,
-- text included, as the csv connector reads it.
create or replace function snapbase_private.typed_cell_sql(i integer, type text) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  canonical text := snapbase_private.resolve_type(type);
begin
  return format('case when s.cells[%1$s] = %3$L then null else s.cells[%1$s]::%2$s end', i, canonical, '');
end;
$$;
comment on function snapbase_private.typed_cell_sql(integer, text) is
  'SQL for the typed value of cell i of staged row s (alias s): NULL when empty, else the cell cast to the canonical type.';

-- Why a text does not fit a type (null when it does). An empty cell is NULL, which fits.
create or replace function snapbase_private.cast_error(value text, type text) returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  canonical text := snapbase_private.resolve_type(type);
begin
  if value is null or value = '' then
    return null;
  end if;
  execute format('select $1::%s', canonical) using value;
  return null;
exception when data_exception then
  return sqlerrm;
end;
$$;
comment on function snapbase_private.cast_error(text, text) is
  'Why a CSV cell does not convert to the type (PostgreSQL''s message), or null when it does; an empty cell is NULL and fits.';

-- The options of an import (and of its preview), checked, with defaults filled in.
create or replace function snapbase_private.csv_import_options(mode text, key_column text, skip_unchanged boolean, empty_cells text)
returns jsonb
language plpgsql immutable
set search_path = pg_catalog
as $$
begin
  if coalesce(mode, 'records') not in ('records', 'suggestions') then
    raise exception 'mode must be records or suggestions (got %)', left(mode, 50) using errcode = '22023';
  end if;
  if coalesce(empty_cells, 'skip') not in ('skip', 'null') then
    raise exception 'empty_cells must be skip or null (got %)', left(empty_cells, 50) using errcode = '22023';
  end if;
  return jsonb_build_object('mode', coalesce(mode, 'records'), 'key_column', key_column,
    'skip_unchanged', coalesce(skip_unchanged, true), 'empty_cells', coalesce(empty_cells, 'skip'));
end;
$$;
comment on function snapbase_private.csv_import_options(text, text, boolean, text) is
  'Checks a CSV import''s options (mode, key_column, skip_unchanged, empty_cells) and returns them with their defaults.';

-- In mode suggestions, the key column (its cell index and type), after checking that
-- the mapping can be suggested: the key is a table column the mapping fills, and no
-- other mapped column is read-only. `map` is import_mapping's rows as a JSON array.
create or replace function snapbase_private.csv_import_key(map jsonb, options jsonb, out key_idx integer, out key_type text)
language plpgsql immutable
set search_path = pg_catalog
as $$
begin
  if options ->> 'mode' <> 'suggestions' then
    return;
  end if;
  select (m ->> 'idx')::integer, m ->> 'col_type' into key_idx, key_type
    from jsonb_array_elements(map) m
   where m ->> 'col' = options ->> 'key_column' and not (m ->> 'new_scratch')::boolean;
  if key_idx is null then
    raise exception 'key_column must be a table column the mapping fills (got %)', coalesce(left(options ->> 'key_column', 100), 'null')
      using errcode = '22023';
  end if;
  if exists (select 1 from jsonb_array_elements(map) m where (m ->> 'read_only')::boolean and m ->> 'col' <> options ->> 'key_column') then
    raise exception 'read-only column(s) cannot be suggested: %',
      (select string_agg(m ->> 'col', ', ') from jsonb_array_elements(map) m where (m ->> 'read_only')::boolean and m ->> 'col' <> options ->> 'key_column')
      using errcode = '22023';
  end if;
end;
$$;
comment on function snapbase_private.csv_import_key(jsonb, jsonb) is
  'For a CSV import as suggestions: the key column''s cell index and type; refuses a key the mapping does not fill and read-only columns.';

-- The staged rows (not among the lines $2) whose key matches no record: (line, value).
-- Parameters: $1 import id, $2 lines to leave out.
create or replace function snapbase_private.csv_unmatched_sql(t snapbase.workbook_tables, key_column text, key_idx integer, key_type text) returns text
language sql stable
set search_path = pg_catalog
as $$
  select format($q$select s.line, s.cells[%3$s] as value
      from snapbase_private.csv_import_rows s
     where s.import_id = $1 and s.line <> all ($2)
       and not exists (select 1 from %1$s r where not r.__suggested_new and r.%2$I = %4$s)$q$,
    snapbase_private.table_rel(t), key_column, key_idx, snapbase_private.typed_cell_sql(key_idx, key_type))
$$;
comment on function snapbase_private.csv_unmatched_sql(snapbase.workbook_tables, text, integer, text) is
  'SQL listing the staged rows whose key matches no record ($1 import id, $2 lines left out).';

-- What importing as suggestions does to each record a staged row's key matches, one
-- row per record (the file's last row for it wins): __id, the suggestion to merge into
-- __suggested ({} when nothing is to be suggested), and how many cells were suggested,
-- left alone as equal to the current value, and left alone as empty. A cell is
-- suggested unless it is empty and $5 is false (empty_cells 'skip'), or $4
-- (skip_unchanged) and its value, as JSON, equals the record's current value (NULL
-- equals NULL). Parameters: $1 import id, $2 lines to leave out, $3 who suggests,
-- $4 skip_unchanged, $5 empty cells suggest NULL. Both import_csv and the preview run it.
create or replace function snapbase_private.csv_suggestions_sql(t snapbase.workbook_tables, key_column text, key_idx integer, key_type text, map jsonb)
returns text
language sql stable
set search_path = pg_catalog
as $$
  with m as (
    select e.idx, e.col, e.col_type, e.new_scratch, row_number() over (order by e.idx) as j,
           format('coalesce(s.cells[%s], %L) <> %L', e.idx, '', '') as filled,
           format('(to_jsonb(x.%I) is not distinct from to_jsonb(%s))', 'v' || e.idx,
                  case when e.new_scratch then 'null' else format('r.%I', e.col) end) as same
      from jsonb_to_recordset(map) as e(idx integer, col text, col_type text, new_scratch boolean)
     where e.col <> key_column
  ), p as (
    select m.*, format('((%s or $5) and not ($4 and %s))', m.filled, m.same) as suggest from m
  )
  select format($q$select distinct on (r.__id) r.__id, %1$s as suggestion,
           %2$s as suggested_cells, %3$s as unchanged_cells, %4$s as empty_cells_skipped
      from snapbase_private.csv_import_rows s
      cross join lateral (select %5$s) x
      join %6$s r on r.%7$I = %8$s and not r.__suggested_new
     where s.import_id = $1 and s.line <> all ($2)
     order by r.__id, s.line desc$q$,
    coalesce(string_agg(format('case when %s then jsonb_build_object(%L, jsonb_build_object(%L, x.%I, %L, $3::text, %L, now())) else %L::jsonb end',
                               p.suggest, p.col, 'value', 'v' || p.idx, 'by', 'at', '{}'), ' || ' order by p.j), quote_literal('{}') || '::jsonb'),
    coalesce(string_agg(format('%s::integer', p.suggest), ' + ' order by p.j), '0'),
    coalesce(string_agg(format('((%s or $5) and $4 and %s)::integer', p.filled, p.same), ' + ' order by p.j), '0'),
    coalesce(string_agg(format('(not %s and not $5)::integer', p.filled), ' + ' order by p.j), '0'),
    coalesce(string_agg(format('%s as %I', snapbase_private.typed_cell_sql(p.idx, p.col_type), 'v' || p.idx), ', ' order by p.j), '1 as v0'),
    snapbase_private.table_rel(t), key_column, snapbase_private.typed_cell_sql(key_idx, key_type))
  from p
$$;
comment on function snapbase_private.csv_suggestions_sql(snapbase.workbook_tables, text, integer, text, jsonb) is
  'SQL computing, per matched record, the suggestion a CSV import makes and its cell counts ($1 import, $2 lines left out, $3 by, $4 skip_unchanged, $5 empty cells as NULL). Shared by import_csv and csv_import_preview.';

-- What an import would do: a sample, the types the values look like (over every
-- row), the mapping and options in effect, the cells that would fail (at most 50,
-- with line and reason; in mode suggestions also the rows whose key matches no
-- record), and the outcome: what import_csv with the same arguments would report,
-- computed by the same SQL. The outcome is null when it cannot be told cheaply:
-- nothing is mapped, or more than 50 cells fail (fix the mapping first).
create or replace function snapbase.csv_import_preview(import_id bigint, mapping jsonb default null, sample_rows integer default 20,
                                                       mode text default 'records', key_column text default null,
                                                       skip_unchanged boolean default true, empty_cells text default 'skip')
returns jsonb
language plpgsql stable
security definer
set search_path = pg_catalog
as $$
declare
  imp snapbase.csv_imports := snapbase_private.require_import(import_id);
  options jsonb := snapbase_private.csv_import_options(mode, key_column, skip_unchanged, empty_cells);
  t snapbase.workbook_tables;
  map jsonb;
  key record;
  problems jsonb := '[]';
  found bigint := 0;
  bad integer[] := '{}';
  complete boolean := true;
  unmatched bigint;
  unmatched_problems jsonb;
  outcome jsonb;
  counts record;
begin
  select * into t from snapbase.workbook_tables where id = imp.table_id;
  select coalesce(jsonb_agg(to_jsonb(m) order by m.idx), '[]') into map from snapbase_private.import_mapping(imp, t, mapping) m;
  select * into key from snapbase_private.csv_import_key(map, options);
  if jsonb_array_length(map) = 0 then
    complete := false;
  elsif not snapbase_private.csv_rows_fit(imp.id, array(select (e ->> 'idx')::integer from jsonb_array_elements(map) e order by 1),
                                          array(select e ->> 'col_type' from jsonb_array_elements(map) e order by (e ->> 'idx')::integer)) then
    -- Cell by cell, in line order, until 51 failures: with 50 or fewer, every row was
    -- checked and the failing lines are known.
    select coalesce(jsonb_agg(x.p order by x.line, x.idx), '[]'), count(*), coalesce(array_agg(distinct x.line), '{}')
      into problems, found, bad
      from (select jsonb_build_object('line', r.line, 'column', m.col, 'value', r.cells[m.idx], 'error', e.err) as p, r.line, m.idx
              from snapbase_private.csv_import_rows r
              cross join jsonb_to_recordset(map) as m(idx integer, col text, col_type text)
              cross join lateral (select snapbase_private.cast_error(r.cells[m.idx], m.col_type) as err) e
             where r.import_id = imp.id and e.err is not null
             order by r.line, m.idx limit 51) x;
    complete := found <= 50;
    if not complete then
      problems := problems - 50;
    end if;
  end if;
  if complete and options ->> 'mode' = 'records' then
    outcome := jsonb_build_object('created', imp.row_count - cardinality(bad), 'bad_rows', cardinality(bad));
  elsif complete then
    execute format('select count(*), coalesce(jsonb_agg(jsonb_build_object(%L, u.line, %L, $3::text, %L, u.value, %L, format(%L, $3::text, u.value)) order by u.line)
                             filter (where u.n <= 50), %L) from (select u.*, row_number() over (order by u.line) as n from (%s) u) u',
                   'line', 'column', 'value', 'error', 'no record with %s = %s', '[]',
                   snapbase_private.csv_unmatched_sql(t, key_column, key.key_idx, key.key_type))
      into unmatched, unmatched_problems using imp.id, bad, key_column;
    problems := (select coalesce(jsonb_agg(p order by (p ->> 'line')::integer, p ->> 'column'), '[]')
                   from (select p from jsonb_array_elements(problems || unmatched_problems) p order by (p ->> 'line')::integer limit 50) x);
    execute format('select count(*) filter (where m.suggestion <> %L) as suggested, coalesce(sum(m.suggested_cells), 0) as suggested_cells,
                           coalesce(sum(m.unchanged_cells), 0) as unchanged_cells, coalesce(sum(m.empty_cells_skipped), 0) as empty_cells_skipped
                      from (%s) m', '{}', snapbase_private.csv_suggestions_sql(t, key_column, key.key_idx, key.key_type, map))
      into counts
      using imp.id, bad, coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user), options -> 'skip_unchanged' = 'true',
            options ->> 'empty_cells' = 'null';
    outcome := jsonb_build_object('suggested', counts.suggested, 'suggested_cells', counts.suggested_cells,
      'unchanged_cells', counts.unchanged_cells, 'empty_cells_skipped', counts.empty_cells_skipped,
      'unmatched', unmatched, 'bad_rows', cardinality(bad));
  end if;
  return jsonb_build_object(
    'import_id', imp.id, 'header', to_jsonb(imp.header), 'row_count', imp.row_count,
    'sample', (select coalesce(jsonb_agg(jsonb_build_object('line', r.line, 'cells', to_jsonb(r.cells)) order by r.line), '[]')
                 from (select * from snapbase_private.csv_import_rows r where r.import_id = imp.id order by r.line limit sample_rows) r),
    'inferred_types', snapbase_private.csv_import_types(imp),
    'mapping', (select coalesce(jsonb_object_agg(m ->> 'header', case when (m ->> 'new_scratch')::boolean
                                                                     then jsonb_build_object('new_scratch', m ->> 'col', 'type', m ->> 'col_type')
                                                                     else m -> 'col' end), '{}')
                  from jsonb_array_elements(map) m),
    'options', options,
    'problems', problems,
    'outcome', outcome);
end;
$$;
comment on function snapbase.csv_import_preview(bigint, jsonb, integer, text, text, boolean, text) is
  'Preview a staged CSV import with import_csv''s arguments: sample rows, inferred types (every row), the mapping and options in effect, failing cells (line, column, reason; at most 50) and the outcome import_csv would report (null when nothing is mapped or more than 50 cells fail).';
grant execute on function snapbase.csv_import_preview(bigint, jsonb, integer, text, text, boolean, text) to :ROLE_VIEWER;

-- Imports a staged file: as new records (mode 'records'), or as suggestions on the
-- records whose key_column equals the row's value for it (mode 'suggestions'), where
-- skip_unchanged leaves out values equal to the record's current ones and empty_cells
-- says what an empty cell suggests ('skip': nothing; 'null': NULL). In mode records
-- an empty cell is an empty (NULL) field. One transaction: unless skip_bad_rows, a
-- single bad row imports nothing and the result lists every error with its line.
-- A clean file is converted in one statement; cell-by-cell checks run only when some
-- value does not fit its column, to name each failing line.
create or replace function snapbase.import_csv(import_id bigint, mapping jsonb default null, mode text default 'records',
                                               key_column text default null, skip_bad_rows boolean default false,
                                               skip_unchanged boolean default true, empty_cells text default 'skip')
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  imp snapbase.csv_imports := snapbase_private.require_import(import_id);
  options jsonb := snapbase_private.csv_import_options(mode, key_column, skip_unchanged, empty_cells);
  t snapbase.workbook_tables;
  rel text;
  scratch record;
  key record;
  map jsonb;
  errors jsonb;
  bad_lines integer[];
  processed bigint;
  created bigint := 0;
  suggested bigint := 0;
  suggested_cells bigint := 0;
  unchanged_cells bigint := 0;
  empty_cells_skipped bigint := 0;
  unmatched bigint := 0;
  skipped bigint := 0;
  cells_sql text;
  outcome jsonb;
begin
  if imp.state <> 'staged' then
    raise exception 'CSV import % was imported already', imp.id using errcode = '55000';
  end if;
  select * into t from snapbase.workbook_tables where id = imp.table_id;
  begin
    -- New scratch columns first, so the rest sees them.
    for scratch in select * from snapbase_private.import_mapping(imp, t, mapping) where new_scratch loop
      t := snapbase.add_scratch_column(t.id, scratch.col, scratch.col_type);
    end loop;
    rel := snapbase_private.table_rel(t);
    create temporary table snapbase_import_map on commit drop as
      select * from snapbase_private.import_mapping(imp, t, mapping);
    if not exists (select 1 from snapbase_import_map) then
      raise exception 'the mapping imports no column' using errcode = '22023';
    end if;
    select coalesce(jsonb_agg(to_jsonb(m) order by m.idx), '[]') into map from snapbase_import_map m;
    select * into key from snapbase_private.csv_import_key(map, options);

    select count(*) into processed from snapbase_private.csv_import_rows r where r.import_id = imp.id;
    cells_sql := (select string_agg(snapbase_private.typed_cell_sql(idx, col_type), ', ' order by idx) from snapbase_import_map);
    -- Rows that do not fit, with every reason; filled only if the first attempt fails.
    create temporary table snapbase_import_bad (line integer not null, error text not null) on commit drop;

    <<attempts>>
    for attempt in 1..2 loop
      begin
        if options ->> 'mode' = 'records' then
          execute format($q$
            insert into %1$s (%2$s, __created, __edited)
            select %3$s, true, $2
              from snapbase_private.csv_import_rows s
             where s.import_id = $1 and not exists (select 1 from snapbase_import_bad b where b.line = s.line)
             order by s.line$q$,
            rel, (select string_agg(format('%I', col), ', ' order by idx) from snapbase_import_map), cells_sql)
            using imp.id, (select jsonb_object_agg(col, now()) from snapbase_import_map);
          get diagnostics created = row_count;
        else
          bad_lines := array(select b.line from snapbase_import_bad b);
          -- Rows whose key matches no record are reported, and count as skipped.
          execute format($q$insert into snapbase_import_bad (line, error)
                            select u.line, format('no record with %%s = %%s', $3::text, u.value) from (%s) u$q$,
                         snapbase_private.csv_unmatched_sql(t, key_column, key.key_idx, key.key_type))
            using imp.id, bad_lines, key_column;
          get diagnostics unmatched = row_count;
          execute format($q$with m as materialized (%s),
              u as (update %s r set __suggested = r.__suggested || m.suggestion, __updated_at = now()
                      from m where r.__id = m.__id and m.suggestion <> '{}' returning 1)
            select (select count(*) from u), coalesce(sum(m.suggested_cells), 0), coalesce(sum(m.unchanged_cells), 0),
                   coalesce(sum(m.empty_cells_skipped), 0)
              from m$q$,
            snapbase_private.csv_suggestions_sql(t, key_column, key.key_idx, key.key_type, map), rel)
            into suggested, suggested_cells, unchanged_cells, empty_cells_skipped
            using imp.id, bad_lines, coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user),
                  options -> 'skip_unchanged' = 'true', options ->> 'empty_cells' = 'null';
        end if;
        exit attempts;
      exception when data_exception then
        -- Some value does not fit its column (this attempt is undone): find every
        -- such row, then write the others.
        if attempt = 2 then
          raise;
        end if;
        insert into snapbase_import_bad (line, error)
        select r.line, string_agg(format('column %s: %s', m.col, e.err), '; ' order by m.idx)
          from snapbase_private.csv_import_rows r
          cross join snapbase_import_map m
          cross join lateral (select snapbase_private.cast_error(r.cells[m.idx], m.col_type) as err) e
         where r.import_id = imp.id and e.err is not null
         group by r.line;
      end;
    end loop;

    select coalesce(jsonb_agg(jsonb_build_object('line', b.line, 'error', b.error) order by b.line), '[]'), count(*)
      into errors, skipped from snapbase_import_bad b;
    if skipped > 0 and not coalesce(skip_bad_rows, false) then
      raise exception 'the file has bad rows' using errcode = 'SB002';
    end if;
  exception when sqlstate 'SB002' then
    -- Undoes everything above (scratch columns included); the errors are reported.
    return jsonb_build_object('ok', false, 'processed', processed, 'created', 0, 'suggested', 0, 'suggested_cells', 0,
      'unchanged_cells', 0, 'empty_cells_skipped', 0, 'unmatched', unmatched, 'bad_rows', skipped - unmatched, 'skipped', 0,
      'errors', errors, 'options', options);
  end;
  outcome := jsonb_build_object('ok', true, 'processed', processed, 'created', created, 'suggested', suggested,
    'suggested_cells', suggested_cells, 'unchanged_cells', unchanged_cells, 'empty_cells_skipped', empty_cells_skipped,
    'unmatched', unmatched, 'bad_rows', skipped - unmatched, 'skipped', skipped, 'errors', errors, 'options', options);
  update snapbase.csv_imports i set state = 'imported', result = outcome where i.id = imp.id;
  delete from snapbase_private.csv_import_rows r where r.import_id = imp.id;
  delete from snapbase_private.csv_import_kinds k where k.import_id = imp.id;
  perform snapbase_private.audit_workbook('import_csv', t.workbook_id, 'workbook_table', t.id::text, rel,
    jsonb_build_object('import_id', imp.id) || options || (outcome - 'errors' - 'options'));
  return outcome;
end;
$$;
comment on function snapbase.import_csv(bigint, jsonb, text, text, boolean, boolean, text) is
  'Import a staged CSV as new records or as suggestions (matched by key_column; skip_unchanged: no suggestion equal to the current value; empty_cells skip|null); all or nothing unless skip_bad_rows. Errors carry line numbers.';
grant execute on function snapbase.import_csv(bigint, jsonb, text, text, boolean, boolean, text) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Export follows the table's settings
--------------------------------------------------------------------------------

-- The columns an export of t writes, in order. By default the table's settings: the
-- columns of column_order first, in that order, then the others in table order,
-- hidden_columns left out. all_columns: every column in table order (what COPY ...
-- CSV HEADER into a table of the same definition expects). Agents never get hidden
-- columns.
create or replace function snapbase_private.export_columns(t snapbase.workbook_tables, all_columns boolean default false) returns text[]
language sql stable
set search_path = pg_catalog
as $$
  select coalesce(array_agg(c.name order by
                    case when all_columns then null
                         else (select min(o.pos) from unnest(t.column_order) with ordinality as o(name, pos) where o.name = c.name) end nulls last,
                    c.ord), '{}')
    from jsonb_array_elements(t.columns) with ordinality as e(spec, ord)
    cross join lateral (select e.spec ->> 'name' as name, e.ord) c
   where not (c.name = any (t.hidden_columns) and (not coalesce(all_columns, false) or snapbase.current_app_role() is not distinct from 'agent'))
$$;
comment on function snapbase_private.export_columns(snapbase.workbook_tables, boolean) is
  'The columns a CSV export of the table writes: its column order and hidden columns by default; every column in table order with all_columns (never hidden ones for agents).';

-- The query yielding a workbook table's rows as text[] (records deleted here or only
-- suggested are not part of the table), optionally within its active filter. Run it
-- with snapbase_sandbox.read_text_rows. `columns`: the columns to write, in order
-- (null: every column in table order); each must be one of the table's.
create or replace function snapbase_private.table_export_query(t snapbase.workbook_tables, use_filter boolean, columns text[] default null)
returns text
language plpgsql stable
set search_path = pg_catalog
as $$
declare
  unknown text;
begin
  select string_agg(c, ', ') into unknown from unnest(columns) c where c is null or c <> all (snapbase_private.column_names(t));
  if unknown is not null or array_position(columns, null) is not null then
    raise exception 'no such column(s) in workbook table %: %', t.id, coalesce(left(unknown, 500), 'null') using errcode = '22023';
  end if;
  return format('select array[%s]::text[] from %s r where not r.__deleted and not r.__suggested_new and %s order by r.__id',
    (select coalesce(string_agg(format('r.%I::text', c), ', ' order by o), '') from unnest(coalesce(columns, snapbase_private.column_names(t))) with ordinality as u(c, o)),
    snapbase_private.table_rel(t),
    case when use_filter then snapbase_private.filter_clause(t) else 'true' end);
end;
$$;
comment on function snapbase_private.table_export_query(snapbase.workbook_tables, boolean, text[]) is
  'SQL yielding the table''s records as text[] rows of the given columns (null: all, in table order), optionally within its active filter. Run it with snapbase_sandbox.read_text_rows; the header is the columns.';

create or replace function snapbase.export_table_rows(table_id bigint, use_filter boolean default false, all_columns boolean default false)
returns setof text[]
language plpgsql stable
security definer
set search_path = pg_catalog
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set extra_float_digits = 3
set bytea_output = 'hex'
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
  columns text[];
begin
  if snapbase.current_app_role() = 'agent' then
    raise exception 'agent tokens cannot export tables' using errcode = '42501';
  end if;
  columns := snapbase_private.export_columns(t, coalesce(all_columns, false));
  return next columns;
  return query select * from snapbase_sandbox.read_text_rows(snapbase_private.table_export_query(t, use_filter, columns), '{}');
end;
$$;
comment on function snapbase.export_table_rows(bigint, boolean, boolean) is
  'A workbook table as text rows for CSV, header first: the table''s column order without its hidden columns (all_columns: every column, in table order); only the active filter''s records when use_filter. Reads only.';
grant execute on function snapbase.export_table_rows(bigint, boolean, boolean) to :ROLE_VIEWER;
