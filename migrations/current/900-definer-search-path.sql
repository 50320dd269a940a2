-- Runs after every other file: applies to all functions, whichever file defined them.

-- Temporary objects come last in every SECURITY DEFINER function's search path (if
-- pg_temp is not named, PostgreSQL searches it first for relations and types).
do $$
declare
  f regprocedure;
begin
  for f in select p.oid::regprocedure from pg_proc p
            where p.prosecdef and p.pronamespace in ('snapbase'::regnamespace, 'snapbase_private'::regnamespace, 'snapbase_sandbox'::regnamespace)
              and 'search_path=pg_catalog' = any (p.proconfig) loop
    execute format('alter function %s set search_path = pg_catalog, pg_temp', f);
  end loop;
end $$;
