-- Every function whose body holds a backslash pins standard_conforming_strings: in a
-- session with it off, tracking_problem's '\000' made every snapshot fail. Last, so
-- that it covers every function the files before it define.
do $$
declare
  fn regprocedure;
begin
  for fn in
    select p.oid::regprocedure from pg_proc p
     where p.pronamespace in ('snapbase'::regnamespace, 'snapbase_private'::regnamespace, 'snapbase_sandbox'::regnamespace)
       and strpos(p.prosrc, chr(92)) > 0
       and not coalesce('standard_conforming_strings=on' = any (p.proconfig), false)
       and pg_has_role(current_user, p.proowner, 'MEMBER')
  loop
    execute format('alter function %s set standard_conforming_strings = on', fn);
  end loop;
end
$$;
