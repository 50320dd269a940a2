-- Tenants and agents (issue 11).
--
-- * Another tenant's id answers exactly like a missing one ("no X N"), everywhere.
--   cancel_job read NULL for an outsider's access, so its whole IF was NULL and
--   nothing was raised (and its state leaked): access checks here never leave a
--   NULL to an IF (coalesce / IS DISTINCT FROM). revoke_share_link named the
--   table of someone else's link.
-- * Agents never see hidden columns or hidden tables: a hidden table answers like
--   a missing id, a hidden column like one that does not exist, in every function
--   an agent may call and every table it may read (row-level security and column
--   privileges). Agents see no account-level jobs, and lose their access when the
--   user who made them can no longer edit the workbook.
-- * Organization members join by invitation, which the invitee accepts; inviting
--   answers the same whether or not the email has an account.
-- * Share links keep the filter and the columns they were made with (never hidden
--   or scratch ones), and create_share_link returns the link's id with its token.
-- Idempotent while in migrations/current/: replaced signatures are dropped first.
-- Every name is qualified; every function sets search_path = pg_catalog.

--------------------------------------------------------------------------------
-- Drop what this file creates, and what it replaces with another signature
--------------------------------------------------------------------------------

drop function if exists snapbase.add_organization_member(bigint, text);
-- The invitations table, after the functions of its row type; its policy's function after it.
drop function if exists snapbase.invite_organization_member(bigint, text);
drop function if exists snapbase.accept_organization_invitation(bigint);
drop function if exists snapbase.decline_organization_invitation(bigint);
drop function if exists snapbase.revoke_organization_invitation(bigint);
drop function if exists snapbase.remove_organization_member(bigint, bigint);
drop function if exists snapbase.organization_invitations_status(snapbase.organization_invitations);
drop function if exists snapbase_private.my_invitation(bigint);
drop table if exists snapbase.organization_invitations;
drop function if exists snapbase_private.invitation_visible(bigint, text);
drop function if exists snapbase_private.require_organization(bigint, text);
drop function if exists snapbase_private.current_user_email();
drop function if exists snapbase.create_share_link(bigint, boolean, timestamptz);
drop type if exists snapbase.new_share_link;
drop function if exists snapbase_private.shared_rows_query(snapbase.workbook_tables, text[]);
drop function if exists snapbase_private.refuse_hidden_columns(snapbase.workbook_tables, jsonb);
-- (table_visible and job_visible are in row-level security policies: replaced, never dropped.)

--------------------------------------------------------------------------------
-- Who may see a workbook, a table, a job
--------------------------------------------------------------------------------

-- An agent acts for the user who made it, and never beyond that user's rights:
-- once they can no longer edit the workbook (unshared, made a viewer), neither can it.
create or replace function snapbase_private.workbook_access(workbook_id bigint) returns text
  language sql stable security definer set search_path = pg_catalog as $$
  select case
    when snapbase.current_app_role() = 'agent' then
      case when nullif(current_setting('jwt.claims.workbook_id', true), '')::bigint = w.id
             and (w.owner_id = snapbase.current_user_id()
                  or exists (select 1 from snapbase.workbook_members m
                              where m.workbook_id = w.id and m.user_id = snapbase.current_user_id() and m.access = 'editor'))
           then 'agent' end
    when snapbase.current_user_id() is null then
      case when snapbase.current_app_role() = 'admin' then 'owner' end
    when w.owner_id = snapbase.current_user_id() then 'owner'
    else (select m.access::text from snapbase.workbook_members m
           where m.workbook_id = w.id and m.user_id = snapbase.current_user_id())
  end
  from snapbase.workbooks w where w.id = workbook_access.workbook_id
$$;
comment on function snapbase_private.workbook_access(bigint) is
  'The caller''s access to a workbook: owner, editor, viewer, agent, or NULL (none, or no such workbook). An agent token has access to its own workbook only while the user who made it may still edit it.';

create or replace function snapbase_private.table_visible(workbook_id bigint, hidden boolean) returns boolean
  language sql stable security definer set search_path = pg_catalog as $$
  select x.access is not null and (x.access <> 'agent' or not coalesce(hidden, false))
    from (select snapbase_private.workbook_access(workbook_id) as access) x
$$;
comment on function snapbase_private.table_visible(bigint, boolean) is
  'May the caller see a workbook table (of this workbook, hidden or not)? Never NULL: false without access, and false for an agent when the table is hidden. Used by require_table and row-level security alike.';
grant execute on function snapbase_private.table_visible(bigint, boolean) to :ROLE_VIEWER, :ROLE_AGENT;

create or replace function snapbase_private.job_visible(workbook_id bigint, table_id bigint, created_by bigint) returns boolean
  language sql stable security definer set search_path = pg_catalog as $$
  select case
    when workbook_id is null then
      -- Account-level jobs (connection tests, table lists) are their creator's, never an agent's.
      snapbase.current_app_role() is distinct from 'agent' and created_by is not distinct from snapbase.current_user_id()
      and snapbase.current_user_id() is not null
    when table_id is null then snapbase_private.workbook_access(workbook_id) is not null
    else exists (select 1 from snapbase.workbook_tables t
                  where t.id = job_visible.table_id and snapbase_private.table_visible(t.workbook_id, t.hidden))
  end
$$;
comment on function snapbase_private.job_visible(bigint, bigint, bigint) is
  'May the caller see a job? A workbook''s jobs: its members (an agent: not those of hidden tables); an account-level job: its creator, never an agent. Never NULL.';
grant execute on function snapbase_private.job_visible(bigint, bigint, bigint) to :ROLE_VIEWER, :ROLE_AGENT;

alter policy select_accessible on snapbase.workbook_tables using (snapbase_private.table_visible(workbook_id, hidden));
alter policy select_visible on snapbase.jobs using (snapbase_private.job_visible(workbook_id, table_id, created_by));

-- Agents read only these columns: the others can name hidden columns (columns,
-- hidden_columns, column_order, sort and title columns, the filter, the remote id
-- column) or quote values (a job's error, result, options and message).
revoke select on snapbase.workbook_tables from :ROLE_AGENT;
grant select (id, workbook_id, name, table_name, hidden, sort_descending, page_size, created_at, updated_at)
  on snapbase.workbook_tables to :ROLE_AGENT;
revoke select on snapbase.jobs from :ROLE_AGENT;
grant select (id, kind, state, workbook_id, table_id, created_at, started_at, finished_at, updated_at, done, total)
  on snapbase.jobs to :ROLE_AGENT;

create or replace function snapbase_private.require_table(table_id bigint, need text) returns snapbase.workbook_tables
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables;
begin
  select * into t from snapbase.workbook_tables wt where wt.id = table_id;
  if t.id is null or not snapbase_private.table_visible(t.workbook_id, t.hidden) then
    raise exception 'no workbook table %', table_id using errcode = 'P0002';
  end if;
  perform snapbase_private.require_workbook(t.workbook_id, need);
  return t;
end;
$$;
comment on function snapbase_private.require_table(bigint, text) is
  'The workbook table, when the caller has `need` access to it; "no workbook table N" alike for a missing id, another tenant''s table and (for an agent) a hidden one.';

create or replace function snapbase_private.hidden_from_caller(t snapbase.workbook_tables) returns text[]
  language sql stable set search_path = pg_catalog as $$
  select case when snapbase.current_app_role() = 'agent'
    then t.hidden_columns || case when t.remote_id_column = any (t.hidden_columns) then array['__remote_id'] else '{}'::text[] end
    else '{}'::text[] end
$$;
comment on function snapbase_private.hidden_from_caller(snapbase.workbook_tables) is
  'The columns of t the caller may not see: for an agent, the hidden columns (and "__remote_id" when the remote id column is hidden, since the remote id is its value); for members, none.';

create or replace function snapbase_private.require_account(account_id bigint) returns snapbase.connector_accounts
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  a snapbase.connector_accounts;
begin
  select * into a from snapbase.connector_accounts ca
   where ca.id = account_id
     and snapbase.current_app_role() is distinct from 'agent'
     and (ca.owner_id = snapbase.current_user_id() or (snapbase.current_user_id() is null and snapbase.current_app_role() = 'admin'));
  if a.id is null then
    raise exception 'no connector account %', account_id using errcode = 'P0002';
  end if;
  return a;
end;
$$;
comment on function snapbase_private.require_account(bigint) is
  'The connector account, when it is the caller''s (a DBA: any); "no connector account N" alike for missing ones, other users'' and any asked for by an agent.';

create or replace function snapbase_private.require_csv_file(file_id bigint) returns snapbase.csv_files
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  f snapbase.csv_files;
begin
  select * into f from snapbase.csv_files cf
   where cf.id = file_id
     and snapbase.current_app_role() is distinct from 'agent'
     and (cf.owner_id = snapbase.current_user_id() or (snapbase.current_user_id() is null and snapbase.current_app_role() = 'admin'));
  if f.id is null then
    raise exception 'no CSV file %', coalesce(file_id::text, 'null') using errcode = 'P0002';
  end if;
  return f;
end;
$$;
comment on function snapbase_private.require_csv_file(bigint) is
  'The uploaded CSV file, when it is the caller''s (a DBA: any); "no CSV file N" alike for missing ones, other users'' and any asked for by an agent.';

--------------------------------------------------------------------------------
-- cancel_job: access first, with no NULL left to the IF
--------------------------------------------------------------------------------

-- cancel_job: see 300-faults-jobs-publish.sql (one definition, with these access rules).

--------------------------------------------------------------------------------
-- revoke_share_link: someone else's link is "no share link N", as a missing one
--------------------------------------------------------------------------------

create or replace function snapbase.revoke_share_link(link_id bigint) returns snapbase.share_links
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  link snapbase.share_links;
  t snapbase.workbook_tables;
begin
  select * into link from snapbase.share_links l where l.id = link_id;
  select * into t from snapbase.workbook_tables wt where wt.id = link.table_id;
  -- Only the workbook's owner manages (and sees) its links.
  if link.id is null or snapbase_private.workbook_access(t.workbook_id) is distinct from 'owner' then
    raise exception 'no share link %', link_id using errcode = 'P0002';
  end if;
  update snapbase.share_links l set revoked_at = coalesce(l.revoked_at, now()) where l.id = link.id returning * into link;
  perform snapbase_private.audit_workbook('revoke_share_link', t.workbook_id, 'share_link', link.id::text, snapbase_private.table_rel(t));
  return link;
end;
$$;

--------------------------------------------------------------------------------
-- Records as agents see them: no hidden column, anywhere in the record
--------------------------------------------------------------------------------

create or replace function snapbase_private.record_json_sql(hide text[] default '{}') returns text
  language sql immutable set search_path = pg_catalog as $$
  select format($f$jsonb_build_object('id', r.__id, 'remote_id', %3$s,
    'values', to_jsonb(r.*) - %1$L::text[], 'edited', r.__edited - %2$L::text[], 'suggested', r.__suggested - %2$L::text[],
    'state', jsonb_build_object('created', r.__created, 'deleted', r.__deleted, 'dirty', %4$s,
                                'suggested_new', r.__suggested_new, 'suggest_delete', r.__suggest_delete,
                                'source_deleted', r.__source_deleted, 'publish', %5$s))$f$,
    snapbase_private.record_meta_columns() || hide, hide,
    case when '__remote_id' = any (hide) then 'null::text' else 'r.__remote_id' end,
    case when cardinality(hide) = 0 then 'r.__dirty'
         else format($d$(r.__created or r.__deleted or r.__edited - %L::text[] <> '{}')$d$, hide) end,
    case when cardinality(hide) = 0 then 'r.__publish'
         else format($p$(r.__publish - 'error' - 'source_values'
                         || case when r.__publish ? 'source_values'
                                 then jsonb_build_object('source_values', (r.__publish -> 'source_values') - %L::text[]) else '{}' end)$p$, hide) end)
$$;
comment on function snapbase_private.record_json_sql(text[]) is
  'The SQL expression of a record (alias r) as JSON, leaving out the columns in `hide` everywhere they could appear: values, edit flags, suggestions, the dirty flag (edits of hidden columns alone do not make a record dirty), a conflict''s source values and its message (which names columns); "__remote_id" in `hide` leaves out the remote id.';

create or replace function snapbase.workbook_record(table_id bigint, record_id bigint) returns jsonb
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
begin
  return snapbase_private.get_record(t, record_id, snapbase_private.hidden_from_caller(t));
end;
$$;

create or replace function snapbase.workbook_records(table_id bigint, page_size integer default null, after text default null,
    sort_column text default null, descending boolean default null, use_filter boolean default true, include_deleted boolean default true)
  returns jsonb
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
  rel text := snapbase_private.table_rel(t);
  hide text[] := snapbase_private.hidden_from_caller(t);
  -- An agent's default order ignores a saved sort on a column hidden from it.
  col text := coalesce(nullif(sort_column, ''), case when t.sort_column = any (hide) then null else t.sort_column end);
  desc_ boolean := coalesce(descending, t.sort_descending);
  n integer := coalesce(page_size, t.page_size);
  cur jsonb;
  cur_value text;
  cur_id bigint;
  base_where text;
  page jsonb := '[]';
  more jsonb;
  last_record jsonb;
  last_value text;
  -- A filter that reads a column hidden from the caller does not apply to it: the
  -- records it would pick out would tell what the hidden column holds.
  applies boolean := coalesce(use_filter, true) and t.filter is not null and not exists (
      select 1 from jsonb_array_elements(coalesce(t.filter_columns, '[]')) c where c ->> 'name' = any (hide));
  shown_columns jsonb := (select coalesce(jsonb_agg(c order by ord), '[]') from jsonb_array_elements(t.columns) with ordinality e(c, ord)
                           where c ->> 'name' <> all (hide));
begin
  if n not between 1 and 1000 then
    raise exception 'page_size must be from 1 to 1000 (got %)', n using errcode = '22023';
  end if;
  if col is not null and (col <> all (snapbase_private.column_names(t)) or col = any (hide)) then
    raise exception 'unknown sort column %', col using errcode = '22023';
  end if;
  if "after" is not null then
    begin
      cur := convert_from(decode("after", 'base64'), 'UTF8')::jsonb;
      cur_id := (cur ->> 'id')::bigint;
      cur_value := cur ->> 'v';
    exception when others then
      raise exception 'after is not a cursor returned by workbook_records' using errcode = '22023';
    end;
    if cur_id is null or (cur ->> 'c') is distinct from col or (cur ->> 'd')::boolean is distinct from desc_ then
      raise exception 'after is a cursor for another sort order' using errcode = '22023';
    end if;
  end if;
  base_where := 'not r.__suggested_new'
    || case when include_deleted then '' else ' and not r.__deleted' end
    || case when applies then ' and ' || snapbase_private.filter_clause(t) else '' end;

  -- The page queries carry the filter: the filter reader runs them ($1: text[] of arguments).
  if col is null then
    page := snapbase_sandbox.read_jsonb(format(
      'select coalesce(jsonb_agg(%s order by r.__id %s), ''[]'') from (select * from %s r where %s and ($1[1]::bigint is null or r.__id %s $1[1]::bigint) order by r.__id %s limit $1[2]::integer) r',
      snapbase_private.record_json_sql(hide), case when desc_ then 'desc' else '' end, rel, base_where,
      case when desc_ then '<' else '>' end, case when desc_ then 'desc' else '' end),
      array[cur_id::text, (n + 1)::text]);
  else
    -- Non-null values first, in (value, id) order through the (column, id) index; then the nulls.
    if "after" is null or cur_value is not null then
      page := snapbase_sandbox.read_jsonb(format($q$
        select coalesce(jsonb_agg(%1$s order by r.%4$I %5$s, r.__id %5$s), '[]')
          from (select * from %2$s r
                 where %3$s and r.%4$I is not null
                   and ($1[1] is null or (r.%4$I, r.__id) %6$s ($1[1]::%7$s, $1[2]::bigint))
                 order by r.%4$I %5$s, r.__id %5$s limit $1[3]::integer) r
        $q$, snapbase_private.record_json_sql(hide), rel, base_where, col,
        case when desc_ then 'desc' else 'asc' end, case when desc_ then '<' else '>' end,
        (select p.type from snapbase_private.filter_parameters(t) p where p.name = col)),
        array[cur_value, cur_id::text, (n + 1)::text]);
    end if;
    if jsonb_array_length(page) <= n then
      more := snapbase_sandbox.read_jsonb(format($q$
        select coalesce(jsonb_agg(%1$s order by r.__id %4$s), '[]')
          from (select * from %2$s r
                 where %3$s and r.%5$I is null and ($1[1]::bigint is null or r.__id %6$s $1[1]::bigint)
                 order by r.__id %4$s limit $1[2]::integer) r
        $q$, snapbase_private.record_json_sql(hide), rel, base_where, case when desc_ then 'desc' else 'asc' end, col,
        case when desc_ then '<' else '>' end),
        array[case when cur_value is null then cur_id end::text, (n + 1 - jsonb_array_length(page))::text]);
      page := page || more;
    end if;
  end if;

  if jsonb_array_length(page) > n then
    last_record := page -> (n - 1);
    page := page - n;
    -- The cursor keeps the sort value's own text form, which casts back exactly.
    if col is not null then
      execute format('select r.%I::text from %s r where r.__id = $1', col, rel) into last_value using (last_record ->> 'id')::bigint;
    end if;
    return jsonb_build_object('records', page, 'columns', shown_columns, 'sort_column', col, 'descending', desc_,
      'filter', case when applies then t.filter end,
      'next_cursor', encode(convert_to(jsonb_build_object('id', last_record -> 'id', 'c', col, 'd', desc_, 'v', last_value)::text, 'UTF8'), 'base64'));
  end if;
  return jsonb_build_object('records', page, 'columns', shown_columns, 'sort_column', col, 'descending', desc_,
    'filter', case when applies then t.filter end, 'next_cursor', null);
end;
$$;
comment on function snapbase.workbook_records(bigint, integer, text, text, boolean, boolean, boolean) is
  'A page of records: {records, columns, next_cursor, sort_column, descending, filter}. Keyset pages (pass next_cursor as after), nulls last, ties by id; `columns` are the column specs the caller may see; `filter` is the filter applied (null when none: an agent is never filtered by a filter that reads a column hidden from it).';

create or replace function snapbase.workbook_record_counts(table_id bigint) returns snapbase.record_counts
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
  hide text[] := snapbase_private.hidden_from_caller(t);
  applies boolean := t.filter is not null and not exists (
      select 1 from jsonb_array_elements(coalesce(t.filter_columns, '[]')) c where c ->> 'name' = any (hide));
begin
  -- Edits and suggestions of hidden columns alone do not count for whoever may not see them ($1).
  return jsonb_populate_record(null::snapbase.record_counts, snapbase_sandbox.read_jsonb(format($q$
    select jsonb_build_object(
             'total', count(*) filter (where not r.__suggested_new),
             'filtered', count(*) filter (where not r.__suggested_new and %s),
             'dirty', count(*) filter (where r.__created or r.__deleted or r.__edited - $1::text[] <> '{}'),
             'with_suggestions', count(*) filter (where r.__suggested - $1::text[] <> '{}' or r.__suggest_delete is not null or r.__suggested_new),
             'deleted', count(*) filter (where r.__deleted))
      from %s r$q$, case when applies then snapbase_private.filter_clause(t) else 'true' end, snapbase_private.table_rel(t)), hide));
end;
$$;

create or replace function snapbase.workbook_suggestions(table_id bigint, page_size integer default 100, after_id bigint default null) returns jsonb
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'read');
  hide text[] := snapbase_private.hidden_from_caller(t);
  page jsonb;
begin
  if page_size not between 1 and 1000 then
    raise exception 'page_size must be from 1 to 1000 (got %)', page_size using errcode = '22023';
  end if;
  -- Records whose only suggestions are of hidden columns are not listed to whoever may not see them ($3).
  execute format($q$
    select coalesce(jsonb_agg(%s order by r.__id), '[]')
      from (select * from %s r
             where (r.__suggested - $3::text[] <> '{}' or r.__suggest_delete is not null or r.__suggested_new)
               and ($1::bigint is null or r.__id > $1) order by r.__id limit $2) r$q$,
    snapbase_private.record_json_sql(hide), snapbase_private.table_rel(t))
    into page using after_id, page_size, hide;
  return page;
end;
$$;

-- A hidden column is, to an agent, a column that does not exist: the same message.
create function snapbase_private.refuse_hidden_columns(t snapbase.workbook_tables, vals jsonb) returns void
  language plpgsql stable set search_path = pg_catalog as $$
declare
  hide text[] := snapbase_private.hidden_from_caller(t);
  unknown text;
begin
  if cardinality(hide) = 0 or jsonb_typeof(vals) is distinct from 'object' then
    return;
  end if;
  select string_agg(key, ', ') into unknown from jsonb_object_keys(vals) key
   where key <> all (snapbase_private.column_names(t)) or key = any (hide);
  if unknown is not null then
    raise exception 'unknown column(s) in workbook table %: %', t.id, unknown using errcode = '22023';
  end if;
end;
$$;
comment on function snapbase_private.refuse_hidden_columns(snapbase.workbook_tables, jsonb) is
  'Refuses values naming a column hidden from the caller with the very message check_values gives for a column that does not exist, so an agent cannot tell the two apart.';

create or replace function snapbase.suggest_values(table_id bigint, record_id bigint, "values" jsonb) returns jsonb
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  by_whom text := coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user)
                  || case when snapbase.current_app_role() = 'agent' then ' (agent)' else '' end;
  is_new boolean;
begin
  perform snapbase_private.refuse_hidden_columns(t, "values");
  execute format('select __created or __suggested_new from %s where __id = $1', snapbase_private.table_rel(t)) into is_new using record_id;
  if is_new is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.check_values(t, "values", is_new);
  execute format($u$
    update %s set __suggested = __suggested || (select jsonb_object_agg(k, jsonb_build_object('value', v, 'by', $3::text, 'at', now()))
                                                  from jsonb_each($2) e(k, v)),
                  __updated_at = now()
     where __id = $1$u$, snapbase_private.table_rel(t)) using record_id, "values", by_whom;
  perform snapbase_private.audit_workbook('suggest_values', t.workbook_id, 'workbook_record', record_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id, 'values', "values"));
  return snapbase_private.get_record(t, record_id, snapbase_private.hidden_from_caller(t));
end;
$$;

create or replace function snapbase.suggest_new_record(table_id bigint, "values" jsonb) returns jsonb
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  by_whom text := coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user)
                  || case when snapbase.current_app_role() = 'agent' then ' (agent)' else '' end;
  new_id bigint;
begin
  perform snapbase_private.refuse_hidden_columns(t, "values");
  perform snapbase_private.check_values(t, "values", true);
  execute format($i$
    insert into %s (__suggested_new, __suggested)
    select true, coalesce(jsonb_object_agg(k, jsonb_build_object('value', v, 'by', $2::text, 'at', now())), '{}') from jsonb_each($1) e(k, v)
    returning __id$i$, snapbase_private.table_rel(t)) into new_id using "values", by_whom;
  perform snapbase_private.audit_workbook('suggest_new_record', t.workbook_id, 'workbook_record', new_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id, 'values', "values"));
  return snapbase_private.get_record(t, new_id, snapbase_private.hidden_from_caller(t));
end;
$$;

create or replace function snapbase.suggest_delete(table_id bigint, record_id bigint) returns jsonb
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'suggest');
  found_id bigint;
begin
  execute format($u$update %s set __suggest_delete = jsonb_build_object('by', $2::text, 'at', now()), __updated_at = now()
                     where __id = $1 and not __suggested_new returning __id$u$, snapbase_private.table_rel(t))
    into found_id
    using record_id, coalesce(nullif(current_setting('jwt.claims.email', true), ''), session_user)
                     || case when snapbase.current_app_role() = 'agent' then ' (agent)' else '' end;
  if found_id is null then
    raise exception 'no record % in workbook table %', record_id, t.id using errcode = 'P0002';
  end if;
  perform snapbase_private.audit_workbook('suggest_delete', t.workbook_id, 'workbook_record', record_id::text,
    snapbase_private.table_rel(t), jsonb_build_object('table_id', t.id));
  return snapbase_private.get_record(t, record_id, snapbase_private.hidden_from_caller(t));
end;
$$;

-- What publishing would do, as the caller may see it: an agent sees neither hidden
-- tables nor hidden columns (not in values, before/after, or a delete's before row).
create or replace function snapbase.publish_preview(workbook_id bigint, max_records integer default 100) returns jsonb
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  wb snapbase.workbooks := snapbase_private.require_workbook(workbook_id, 'read');
  t snapbase.workbook_tables;
  rel text;
  hide text[];
  leave_out text[];
  counts jsonb;
  creates jsonb;
  updates jsonb;
  deletes jsonb;
  tables jsonb := '[]';
begin
  for t in select * from snapbase.workbook_tables wt
            where wt.workbook_id = wb.id and snapbase_private.table_visible(wt.workbook_id, wt.hidden) order by wt.id loop
    rel := snapbase_private.table_rel(t);
    hide := snapbase_private.hidden_from_caller(t);
    -- Scratch columns are never published; hidden ones are not shown ($1).
    leave_out := snapbase_private.scratch_columns(t) || hide;
    -- Deleting a record that never reached the source removes it, so created and
    -- deleted exclude each other here.
    execute format($q$
      select jsonb_build_object(
        'create_count', count(*) filter (where r.__created),
        'update_count', count(*) filter (where not r.__created and not r.__deleted and r.__edited - $1 <> '{}'),
        'delete_count', count(*) filter (where r.__deleted))
        from %s r where r.__dirty$q$, rel)
      into counts using leave_out;
    execute format($q$
      select coalesce(jsonb_agg(jsonb_build_object('id', r.__id, 'values', to_jsonb(r.*) - $2 - $1) order by r.__id), '[]')
        from (select * from %s r where r.__created order by r.__id limit $3) r$q$, rel)
      into creates using leave_out, snapbase_private.record_meta_columns(), max_records;
    execute format($q$
      select coalesce(jsonb_agg(jsonb_build_object('id', r.__id, 'remote_id', case when $3 then r.__remote_id end, 'fields',
               (select jsonb_agg(jsonb_build_object('column', k, 'before', r.__last_seen -> k, 'after', to_jsonb(r.*) -> k,
                                                    'edited_at', r.__edited -> k) order by k)
                  from jsonb_object_keys(r.__edited - $1) k)) order by r.__id), '[]')
        from (select * from %s r where r.__dirty and not r.__created and not r.__deleted and r.__edited - $1 <> '{}'
               order by r.__id limit $2) r$q$, rel)
      into updates using leave_out, max_records, '__remote_id' <> all (hide);
    execute format($q$
      select coalesce(jsonb_agg(jsonb_build_object('id', r.__id, 'remote_id', case when $3 then r.__remote_id end,
                                                   'before', r.__last_seen - $2) order by r.__id), '[]')
        from (select * from %s r where r.__deleted order by r.__id limit $1) r$q$, rel)
      into deletes using max_records, hide, '__remote_id' <> all (hide);
    tables := tables || jsonb_build_array(jsonb_build_object('table_id', t.id, 'name', t.name)
                || counts || jsonb_build_object('creates', creates, 'updates', updates, 'deletes', deletes));
  end loop;
  return jsonb_build_object('workbook_id', wb.id, 'tables', tables);
end;
$$;

--------------------------------------------------------------------------------
-- Events as agents see them: none of a hidden table, none of an account
--------------------------------------------------------------------------------

create or replace function snapbase.visible_events(topic text, after_id bigint default 0, max_events integer default 500) returns setof jsonb
  language plpgsql stable security definer set search_path = pg_catalog as $$
begin
  if topic = 'changes' then
    perform snapbase_private.require_role('viewer');
    return query
      select jsonb_build_object('id', e.id, 'topic', e.topic, 'kind', e.kind) || e.payload
        from snapbase_private.events e
        join snapbase.managed_tables m on m.id = (e.payload ->> 'managed_table_id')::bigint
       where e.topic = 'changes' and e.id > coalesce(after_id, 0) and snapbase_private.can_read(m)
       order by e.id limit max_events;
  elsif topic ~ '^(workbook|account):\d{1,18}$' then
    if topic like 'workbook:%' then
      perform snapbase_private.require_workbook(split_part(topic, ':', 2)::bigint, 'read');
    else
      perform snapbase_private.require_account(split_part(topic, ':', 2)::bigint);
    end if;
    -- An event about a table is shown to an agent only while that table exists and is
    -- not hidden, or when it says a table the agent could see was removed.
    return query
      select jsonb_build_object('id', e.id, 'topic', e.topic, 'kind', e.kind) || (e.payload - 'hidden')
        from snapbase_private.events e
       where e.topic = visible_events.topic and e.id > coalesce(after_id, 0)
         and (e.payload ->> 'table_id' is null or snapbase.current_app_role() is distinct from 'agent'
              or exists (select 1 from snapbase.workbook_tables wt
                          where wt.id = (e.payload ->> 'table_id')::bigint and not wt.hidden)
              or (e.kind = 'table_removed' and e.payload -> 'hidden' = 'false'::jsonb))
       order by e.id limit max_events;
  elsif topic ~ '^(workbook|account):\d+$' then
    -- An id too large to exist: the same answer as any other missing one.
    raise exception 'no % %', case when topic like 'workbook:%' then 'workbook' else 'connector account' end, split_part(topic, ':', 2)
      using errcode = 'P0002';
  else
    raise exception 'topic must be changes, workbook:<id> or account:<id> (got %)', topic using errcode = '22023';
  end if;
end;
$$;

-- A removed table's event says whether it was hidden, so that agents hear of the
-- removal of a table they could see, and of no other (the flag is not shown).
create or replace function snapbase_private.tg__table_settings_event() returns trigger
  language plpgsql security definer set search_path = pg_catalog as $$
begin
  if tg_op = 'DELETE' then
    -- Gone with its workbook: nobody is left to tell.
    if exists (select 1 from snapbase.workbooks where id = old.workbook_id) then
      perform snapbase_private.emit('workbook:' || old.workbook_id, 'table_removed', jsonb_build_object('table_id', old.id, 'hidden', old.hidden));
    end if;
  else
    perform snapbase_private.emit('workbook:' || new.workbook_id,
      case when tg_op = 'INSERT' then 'table_added' else 'table_settings_changed' end, jsonb_build_object('table_id', new.id));
  end if;
  return null;
end;
$$;

--------------------------------------------------------------------------------
-- Organizations: members join by invitation, with the invitee's consent
--------------------------------------------------------------------------------

create function snapbase_private.current_user_email() returns text
  language sql stable security definer set search_path = pg_catalog as $$
  select lower(u.email) from snapbase.users u where u.id = snapbase.current_user_id()
$$;
comment on function snapbase_private.current_user_email() is
  'The signed-in user''s email as the users table has it now (not the JWT''s claim), lower-case; NULL without a user.';
grant execute on function snapbase_private.current_user_email() to :ROLE_VIEWER;

create function snapbase_private.require_organization(organization_id bigint, owner_action text) returns snapbase.organizations
  language plpgsql stable security definer set search_path = pg_catalog as $$
declare
  o snapbase.organizations;
  m snapbase.organization_members;
begin
  select * into o from snapbase.organizations org where org.id = organization_id;
  -- A DBA (the owner, no user) acts as every organization's owner.
  if snapbase.current_user_id() is null and snapbase.current_app_role() is not distinct from 'admin' then
    if o.id is null then
      raise exception 'no organization %', organization_id using errcode = 'P0002';
    end if;
    return o;
  end if;
  select * into m from snapbase.organization_members om where om.organization_id = o.id and om.user_id = snapbase.current_user_id();
  if o.id is null or m.user_id is null or snapbase.current_app_role() is not distinct from 'agent' then
    raise exception 'no organization %', organization_id using errcode = 'P0002';
  end if;
  if owner_action is not null and not m.is_owner then
    raise exception 'only an owner of organization % may %', organization_id, owner_action using errcode = '42501';
  end if;
  return o;
end;
$$;
comment on function snapbase_private.require_organization(bigint, text) is
  'The organization, when the caller is a member (and an owner, when owner_action says what for); "no organization N" alike for a missing id and one the caller is not a member of.';

create table snapbase.organization_invitations (
  id bigint generated always as identity primary key,
  organization_id bigint not null references snapbase.organizations on delete cascade,
  -- As they were when the invitation was made, for the invitee (who cannot see the organization yet).
  organization_name text not null,
  email text not null check (email ~ '^[^@\s]+@[^@\s]+$' and length(email) <= 320 and email = lower(email)),
  invited_by bigint references snapbase.users on delete set null,
  invited_by_email text,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  accepted_at timestamptz,
  declined_at timestamptz,
  revoked_at timestamptz
);
create index organization_invitations_organization_id_idx on snapbase.organization_invitations (organization_id);
create index organization_invitations_email_idx on snapbase.organization_invitations (email);
comment on table snapbase.organization_invitations is
  E'An invitation to join an organization, by email. Its owners see the organization''s invitations; the invitee sees theirs once signed in with that email, and accepts or declines. It never says whether the email has an account.';
comment on column snapbase.organization_invitations.email is 'The invited address, lower-case.';

create function snapbase_private.invitation_visible(organization_id bigint, email text) returns boolean
  language sql stable security definer set search_path = pg_catalog as $$
  select snapbase.current_app_role() is distinct from 'agent' and (
    (snapbase.current_user_id() is null and snapbase.current_app_role() is not distinct from 'admin')
    or exists (select 1 from snapbase.organization_members m
                where m.organization_id = invitation_visible.organization_id and m.user_id = snapbase.current_user_id() and m.is_owner)
    or email is not distinct from snapbase_private.current_user_email() and snapbase.current_user_id() is not null)
$$;
comment on function snapbase_private.invitation_visible(bigint, text) is
  'May the caller see an invitation: an owner of its organization, or the user signed in with the invited email. Never NULL.';
grant execute on function snapbase_private.invitation_visible(bigint, text) to :ROLE_VIEWER;

alter table snapbase.organization_invitations enable row level security;
create policy select_owners_and_invitee on snapbase.organization_invitations for select
  using (snapbase_private.invitation_visible(organization_id, email));
grant select on snapbase.organization_invitations to :ROLE_VIEWER;

create function snapbase.organization_invitations_status(i snapbase.organization_invitations) returns text
  language sql stable set search_path = pg_catalog as $$
  select case
    when i.revoked_at is not null then 'revoked'
    when i.accepted_at is not null then 'accepted'
    when i.declined_at is not null then 'declined'
    when i.expires_at <= now() then 'expired'
    else 'pending'
  end
$$;
comment on function snapbase.organization_invitations_status(snapbase.organization_invitations) is
  'pending, accepted, declined, revoked or expired.';
grant execute on function snapbase.organization_invitations_status(snapbase.organization_invitations) to :ROLE_VIEWER;

create function snapbase.invite_organization_member(organization_id bigint, email text) returns snapbase.organization_invitations
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  o snapbase.organizations := snapbase_private.require_organization(organization_id, 'invite members');
  address text := lower(trim(email));
  inv snapbase.organization_invitations;
begin
  if address is null or address !~ '^[^@\s]+@[^@\s]+$' or length(address) > 320 then
    raise exception 'email must be an address like name@example.com' using errcode = '22023';
  end if;
  -- One pending invitation per address: inviting again renews it. Nothing here
  -- depends on whether the address has an account (or is a member already).
  perform 1 from snapbase.organizations org where org.id = o.id for update;
  select * into inv from snapbase.organization_invitations i
   where i.organization_id = o.id and i.email = address
     and i.accepted_at is null and i.declined_at is null and i.revoked_at is null and i.expires_at > now()
   order by i.id desc limit 1;
  if inv.id is null then
    insert into snapbase.organization_invitations (organization_id, organization_name, email, invited_by, invited_by_email, expires_at)
      values (o.id, o.name, address, snapbase.current_user_id(), snapbase_private.current_user_email(), now() + interval '14 days')
      returning * into inv;
  else
    update snapbase.organization_invitations i
       set expires_at = now() + interval '14 days', invited_by = snapbase.current_user_id(),
           invited_by_email = snapbase_private.current_user_email(), organization_name = o.name
     where i.id = inv.id returning * into inv;
  end if;
  perform snapbase_private.audit('invite_organization_member', 'organization_invitation', inv.id::text, null,
    jsonb_build_object('organization_id', o.id, 'email', address, 'expires_at', inv.expires_at));
  return inv;
end;
$$;
comment on function snapbase.invite_organization_member(bigint, text) is
  'Invite an email address to an organization (its owners only). The invitee joins by accepting, once signed in with that address; the answer is the same whether or not the address has an account. Inviting again renews a pending invitation; it expires after 14 days.';
grant execute on function snapbase.invite_organization_member(bigint, text) to :ROLE_VIEWER;

-- The invitation, locked, when it is the caller's; "no invitation N" otherwise.
create function snapbase_private.my_invitation(invitation_id bigint) returns snapbase.organization_invitations
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  inv snapbase.organization_invitations;
begin
  select * into inv from snapbase.organization_invitations i where i.id = invitation_id for update;
  if inv.id is null or snapbase.current_user_id() is null or snapbase.current_app_role() is not distinct from 'agent'
     or inv.email is distinct from snapbase_private.current_user_email() then
    raise exception 'no invitation %', invitation_id using errcode = 'P0002';
  end if;
  if snapbase.organization_invitations_status(inv) = 'expired' then
    raise exception 'invitation % has expired', invitation_id using errcode = '55000';
  end if;
  if snapbase.organization_invitations_status(inv) <> 'pending' then
    raise exception 'invitation % is %, not pending', invitation_id, snapbase.organization_invitations_status(inv) using errcode = '55000';
  end if;
  return inv;
end;
$$;
comment on function snapbase_private.my_invitation(bigint) is
  'A pending invitation addressed to the signed-in user''s email, locked; "no invitation N" alike for a missing one and anyone else''s.';

create function snapbase.accept_organization_invitation(invitation_id bigint) returns snapbase.organization_members
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  inv snapbase.organization_invitations := snapbase_private.my_invitation(invitation_id);
  joined snapbase.organization_members;
begin
  insert into snapbase.organization_members (organization_id, user_id) values (inv.organization_id, snapbase.current_user_id())
    on conflict do nothing;
  update snapbase.organization_invitations i set accepted_at = now() where i.id = inv.id;
  select * into joined from snapbase.organization_members m where m.organization_id = inv.organization_id and m.user_id = snapbase.current_user_id();
  perform snapbase_private.audit('accept_organization_invitation', 'organization_invitation', inv.id::text, null,
    jsonb_build_object('organization_id', inv.organization_id, 'email', inv.email));
  return joined;
end;
$$;
comment on function snapbase.accept_organization_invitation(bigint) is 'Join the organization of a pending invitation to your email.';
grant execute on function snapbase.accept_organization_invitation(bigint) to :ROLE_VIEWER;

create function snapbase.decline_organization_invitation(invitation_id bigint) returns snapbase.organization_invitations
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  inv snapbase.organization_invitations := snapbase_private.my_invitation(invitation_id);
begin
  update snapbase.organization_invitations i set declined_at = now() where i.id = inv.id returning * into inv;
  perform snapbase_private.audit('decline_organization_invitation', 'organization_invitation', inv.id::text, null,
    jsonb_build_object('organization_id', inv.organization_id, 'email', inv.email));
  return inv;
end;
$$;
comment on function snapbase.decline_organization_invitation(bigint) is 'Decline a pending invitation to your email (its organization''s owners see it declined).';
grant execute on function snapbase.decline_organization_invitation(bigint) to :ROLE_VIEWER;

create function snapbase.revoke_organization_invitation(invitation_id bigint) returns snapbase.organization_invitations
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  inv snapbase.organization_invitations;
begin
  select * into inv from snapbase.organization_invitations i where i.id = invitation_id for update;
  if inv.id is null or not snapbase_private.invitation_visible(inv.organization_id, null) then
    raise exception 'no invitation %', invitation_id using errcode = 'P0002';
  end if;
  if snapbase.organization_invitations_status(inv) not in ('pending', 'expired') then
    raise exception 'invitation % is %, not pending', invitation_id, snapbase.organization_invitations_status(inv) using errcode = '55000';
  end if;
  update snapbase.organization_invitations i set revoked_at = now() where i.id = inv.id returning * into inv;
  perform snapbase_private.audit('revoke_organization_invitation', 'organization_invitation', inv.id::text, null,
    jsonb_build_object('organization_id', inv.organization_id, 'email', inv.email));
  return inv;
end;
$$;
comment on function snapbase.revoke_organization_invitation(bigint) is 'Withdraw an invitation before it is accepted (owners of its organization).';
grant execute on function snapbase.revoke_organization_invitation(bigint) to :ROLE_VIEWER;

create function snapbase.remove_organization_member(organization_id bigint, user_id bigint) returns boolean
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  -- Anyone may leave; removing someone else is for owners.
  o snapbase.organizations := snapbase_private.require_organization(organization_id,
         case when user_id is distinct from snapbase.current_user_id() then 'remove members' end);
  m snapbase.organization_members;
begin
  select * into m from snapbase.organization_members om where om.organization_id = o.id and om.user_id = remove_organization_member.user_id for update;
  if m.user_id is null then
    raise exception 'no member % in organization %', user_id, o.id using errcode = 'P0002';
  end if;
  if m.is_owner and not exists (select 1 from snapbase.organization_members om
                                 where om.organization_id = o.id and om.is_owner and om.user_id <> m.user_id) then
    raise exception 'organization % would have no owner left' , o.id using errcode = '55000';
  end if;
  -- Their shares of the organization's workbooks go with them (and so do their agents' rights).
  delete from snapbase.workbook_members wm using snapbase.workbooks w
   where w.id = wm.workbook_id and w.organization_id = o.id and wm.user_id = m.user_id;
  delete from snapbase.organization_members om where om.organization_id = o.id and om.user_id = m.user_id;
  perform snapbase_private.audit('remove_organization_member', 'organization', o.id::text, null, jsonb_build_object('user_id', m.user_id));
  return true;
end;
$$;
comment on function snapbase.remove_organization_member(bigint, bigint) is
  'Leave an organization (your own user id), or remove a member (owners); their shares of its workbooks end too. An organization keeps at least one owner.';
grant execute on function snapbase.remove_organization_member(bigint, bigint) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Share links: frozen when made, never hidden or scratch columns
--------------------------------------------------------------------------------

alter table snapbase.share_links
  add column if not exists filter text,
  add column if not exists filter_columns jsonb,
  add column if not exists columns text[];
comment on column snapbase.share_links.filter is 'The table''s filter when the link was made "with the active filter" (null: every record); later filter changes do not reach the link.';
comment on column snapbase.share_links.filter_columns is 'The columns (name and type) that filter reads, as when it was checked: a change of type stops the link rather than reinterpret it.';
comment on column snapbase.share_links.columns is 'The columns the link shares: those neither hidden nor scratch when it was made. A column hidden later is left out too; one shown later is not added.';
-- Links made before: frozen now, as they are at this moment.
update snapbase.share_links l
   set filter = case when l.use_filter then t.filter end,
       filter_columns = case when l.use_filter then t.filter_columns end,
       columns = array(select c from unnest(snapbase_private.column_names(t, true)) c where c <> all (t.hidden_columns))
  from snapbase.workbook_tables t
 where t.id = l.table_id and l.columns is null;
alter table snapbase.share_links alter column columns set not null;

create type snapbase.new_share_link as (
  link_id bigint,
  token text,
  table_id bigint,
  columns text[],
  filter text,
  expires_at timestamptz
);
comment on type snapbase.new_share_link is 'A share link just made: its id (to revoke it with) and its token, shown this once.';

create function snapbase.create_share_link(table_id bigint, use_filter boolean default false, expires_at timestamptz default null)
  returns snapbase.new_share_link
  language plpgsql security definer set search_path = pg_catalog as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'manage');
  token text := 'sbs_' || snapbase_private.base64url(public.gen_random_bytes(32));
  shared text[] := array(select c from unnest(snapbase_private.column_names(t, true)) c where c <> all (t.hidden_columns));
  made snapbase.new_share_link;
  link snapbase.share_links;
begin
  if expires_at is not null and expires_at <= now() then
    raise exception 'expires_at must be in the future' using errcode = '22023';
  end if;
  if cardinality(shared) = 0 then
    raise exception 'every column of workbook table % is hidden or scratch: a link would share nothing', t.id using errcode = '22023';
  end if;
  if coalesce(use_filter, false) and t.filter is not null then
    perform snapbase_private.filter_clause(t);  -- refuses a filter that no longer fits its columns
  end if;
  insert into snapbase.share_links (table_id, use_filter, created_by, expires_at, filter, filter_columns, columns)
    values (t.id, coalesce(use_filter, false), snapbase.current_user_id(), expires_at,
            case when use_filter then t.filter end, case when use_filter then t.filter_columns end, shared)
    returning * into link;
  insert into snapbase_private.share_link_tokens (link_id, token_hash) values (link.id, public.digest(token, 'sha256'));
  perform snapbase_private.audit_workbook('create_share_link', t.workbook_id, 'share_link', link.id::text, snapbase_private.table_rel(t),
    jsonb_build_object('table_id', t.id, 'use_filter', link.use_filter, 'filter', link.filter, 'columns', link.columns, 'expires_at', expires_at));
  made := row(link.id, token, t.id, link.columns, link.filter, link.expires_at);
  return made;
end;
$$;
comment on function snapbase.create_share_link(bigint, boolean, timestamptz) is
  'A public CSV link to a workbook table (its owner only): the columns that are neither hidden nor scratch now, and with use_filter the active filter as it is now; neither follows later changes. Returns the link''s id and its token (shown once; only its hash is kept).';
grant execute on function snapbase.create_share_link(bigint, boolean, timestamptz) to :ROLE_VIEWER;

create function snapbase_private.shared_rows_query(t snapbase.workbook_tables, cols text[]) returns text
  language sql stable set search_path = pg_catalog as $$
  select format('select array[%s] from %s r where not r.__deleted and not r.__suggested_new and %s order by r.__id',
    (select string_agg(format('r.%I::text', c), ', ') from unnest(cols) c),
    snapbase_private.table_rel(t),
    snapbase_private.filter_clause(t))
$$;
comment on function snapbase_private.shared_rows_query(snapbase.workbook_tables, text[]) is
  'The query of a share link''s rows (text[] each): the given columns, %I-quoted, of the records that are neither deleted nor suggested, under t.filter (the link''s frozen filter, checked by filter_clause). Run by the filter reader.';

create or replace function snapbase.shared_table_rows(token text) returns setof text[]
  language plpgsql security definer set search_path = pg_catalog
  set "DateStyle" = 'ISO, YMD' set "IntervalStyle" = 'postgres' set extra_float_digits = 3 set bytea_output = 'hex' as $$
declare
  link snapbase.share_links;
  t snapbase.workbook_tables;
  cols text[];
begin
  select l.* into link from snapbase_private.share_link_tokens k join snapbase.share_links l on l.id = k.link_id
   where k.token_hash = public.digest(token, 'sha256')
     and l.revoked_at is null and (l.expires_at is null or l.expires_at > now());
  if link.id is null then
    raise exception 'no such share link (it may have expired or been revoked)' using errcode = 'P0002';
  end if;
  select * into t from snapbase.workbook_tables where id = link.table_id;
  -- The link's own filter, frozen when it was made; it must still read the same columns with the same types.
  t.filter := link.filter;
  t.filter_columns := link.filter_columns;
  if t.filter is not null and (t.filter_columns is null or exists (
       select 1 from jsonb_array_elements(t.filter_columns) c
        where not exists (select 1 from snapbase_private.filter_parameters(t) p where p.name = c ->> 'name' and p.type = c ->> 'type'))) then
    raise exception 'this share link''s filter no longer fits its table; its owner can make a new link' using errcode = '55000';
  end if;
  -- Its columns, less any hidden or made scratch since, in the table's order.
  cols := array(select c from unnest(snapbase_private.column_names(t, true)) c where c = any (link.columns) and c <> all (t.hidden_columns));
  if cardinality(cols) = 0 then
    raise exception 'this share link''s columns are all hidden now; its owner can make a new link' using errcode = '55000';
  end if;
  update snapbase.share_links set last_used_at = now(), use_count = use_count + 1 where id = link.id;
  perform snapbase_private.audit('share_link_access', 'share_link', link.id::text, snapbase_private.table_rel(t),
    jsonb_build_object('workbook_id', t.workbook_id, 'table_id', t.id));
  return next cols;
  return query select * from snapbase_sandbox.read_text_rows(snapbase_private.shared_rows_query(t, cols), '{}');
end;
$$;
