--! Previous: sha1:1a4f3cd291f017836ee9fca6727aa20928b80d8f
--! Hash: sha1:7967193a1a8d84ff93d96d6a416bf45b067bacf8
--! Message: csv export and share links

-- CSV export of workbook tables and snapshots, and public share links.
--
-- Export functions return text[] rows, the first being the header: every value in
-- PostgreSQL's own text form, so a file written from them loads back with COPY ...
-- CSV HEADER into an equal table. No metadata columns; exporting reads only, and
-- changes no data and no flag.

drop function if exists snapbase.export_table_rows cascade;
drop function if exists snapbase.export_snapshot_rows cascade;
drop function if exists snapbase.create_share_link cascade;
drop function if exists snapbase.revoke_share_link cascade;
drop function if exists snapbase.shared_table_rows cascade;
drop function if exists snapbase_private.table_export_query cascade;
drop table if exists snapbase.share_links, snapbase_private.share_link_tokens cascade;

-- The query yielding a workbook table's rows as text[] (records deleted here or only
-- suggested are not part of the table), optionally within its active filter.
create function snapbase_private.table_export_query(t snapbase.workbook_tables, use_filter boolean) returns text
language sql stable
set search_path = pg_catalog
as $$
  select format('select array[%s] from %s r where not r.__deleted and not r.__suggested_new%s order by r.__id',
    (select string_agg(format('r.%I::text', c), ', ') from unnest(snapbase_private.column_names(t)) c),
    snapbase_private.table_rel(t),
    case when use_filter and t.filter is not null then format(' and (%s)', t.filter) else '' end)
$$;

create function snapbase.export_table_rows(table_id bigint, use_filter boolean default false) returns setof text[]
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
begin
  if snapbase.current_app_role() = 'agent' then
    raise exception 'agent tokens cannot export tables' using errcode = '42501';
  end if;
  return next snapbase_private.column_names(t);
  return query execute snapbase_private.table_export_query(t, use_filter);
end;
$$;
comment on function snapbase.export_table_rows(bigint, boolean) is
  'A workbook table as text rows for CSV, header first; only the active filter''s records when use_filter. Reads only.';
grant execute on function snapbase.export_table_rows(bigint, boolean) to :ROLE_VIEWER;

create function snapbase.export_snapshot_rows(snapshot_id bigint) returns setof text[]
language plpgsql stable
security definer
set search_path = pg_catalog
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set timezone = 'UTC'
set extra_float_digits = 3
set bytea_output = 'hex'
as $$
declare
  snap snapbase.snapshots := snapbase_private.readable_snapshot(snapshot_id);
  layout text := (select type_name from snapbase_private.row_layouts where id = snap.layout_id);
  visible text[] := array(select c ->> 'name' from jsonb_array_elements(snap.columns) with ordinality as e(c, ord)
                          where (c ->> 'name') <> all (snapbase_private.hidden_columns(snap)) order by ord);
begin
  return next visible;
  return query execute format($q$
    select array[%s]
      from snapbase_private.snapshot_chunks sc
      join snapbase_private.chunk_store cs on cs.hash = sc.chunk_hash
      cross join lateral unnest(cs.rows) with ordinality as r(rec, i)
      cross join lateral (select (r.rec::%s).*) x
     where sc.snapshot_id = $1
     order by sc.seq, r.i$q$,
    (select string_agg(format('x.%I::text', c), ', ') from unnest(visible) c), layout)
    using snap.id;
end;
$$;
comment on function snapbase.export_snapshot_rows(bigint) is 'A snapshot as text rows for CSV, header first (columns you may read).';
grant execute on function snapbase.export_snapshot_rows(bigint) to :ROLE_VIEWER;

--------------------------------------------------------------------------------
-- Share links
--------------------------------------------------------------------------------
-- A public link serves one table's CSV to anyone holding its random token (not the
-- workbook id). Only a hash of the token is kept; links expire and can be revoked;
-- every access is audited.

create table snapbase.share_links (
  id bigint generated always as identity primary key,
  table_id bigint not null references snapbase.workbook_tables on delete cascade,
  use_filter boolean not null default false,
  created_by bigint references snapbase.users on delete set null,
  created_at timestamptz not null default now(),
  expires_at timestamptz,
  revoked_at timestamptz,
  last_used_at timestamptz,
  use_count bigint not null default 0
);
create index share_links_table_id_idx on snapbase.share_links (table_id);
comment on table snapbase.share_links is 'Public CSV links to one workbook table. The token is shown once at creation.';

create table snapbase_private.share_link_tokens (
  link_id bigint primary key references snapbase.share_links on delete cascade,
  token_hash bytea not null unique
);

alter table snapbase.share_links enable row level security;
create policy select_managers on snapbase.share_links for select using (exists (
  select 1 from snapbase.workbook_tables t where t.id = table_id and snapbase_private.workbook_access(t.workbook_id) = 'owner'));
grant select on snapbase.share_links to :ROLE_VIEWER;

create function snapbase.create_share_link(table_id bigint, use_filter boolean default false, expires_at timestamptz default null)
returns text
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  t snapbase.workbook_tables := snapbase_private.require_table(table_id, 'manage');
  token text := 'sbs_' || snapbase_private.base64url(public.gen_random_bytes(32));
  link_id bigint;
begin
  if expires_at is not null and expires_at <= now() then
    raise exception 'expires_at must be in the future' using errcode = '22023';
  end if;
  insert into snapbase.share_links (table_id, use_filter, created_by, expires_at)
    values (t.id, coalesce(use_filter, false), snapbase.current_user_id(), expires_at) returning id into link_id;
  insert into snapbase_private.share_link_tokens (link_id, token_hash) values (link_id, public.digest(token, 'sha256'));
  perform snapbase_private.audit_workbook('create_share_link', t.workbook_id, 'share_link', link_id::text, snapbase_private.table_rel(t),
    jsonb_build_object('table_id', t.id, 'use_filter', use_filter, 'expires_at', expires_at));
  return token;
end;
$$;
comment on function snapbase.create_share_link(bigint, boolean, timestamptz) is
  'A public link to the table''s CSV (owner only): GET /api/v1/share/<token>. The token is returned once.';
grant execute on function snapbase.create_share_link(bigint, boolean, timestamptz) to :ROLE_VIEWER;

create function snapbase.revoke_share_link(link_id bigint) returns snapbase.share_links
language plpgsql
security definer
set search_path = pg_catalog
as $$
declare
  link snapbase.share_links;
  t snapbase.workbook_tables;
begin
  select * into link from snapbase.share_links l where l.id = link_id;
  if link.id is null then
    raise exception 'no share link %', link_id using errcode = 'P0002';
  end if;
  t := snapbase_private.require_table(link.table_id, 'manage');
  update snapbase.share_links l set revoked_at = coalesce(l.revoked_at, now()) where l.id = link.id returning * into link;
  perform snapbase_private.audit_workbook('revoke_share_link', t.workbook_id, 'share_link', link.id::text, snapbase_private.table_rel(t));
  return link;
end;
$$;
grant execute on function snapbase.revoke_share_link(bigint) to :ROLE_VIEWER;

-- The public side: anyone with the token, no sign-in. Unknown, revoked and expired
-- tokens all answer "no such share link", so tokens cannot be probed.
create function snapbase.shared_table_rows(token text) returns setof text[]
language plpgsql
security definer
set search_path = pg_catalog
set datestyle = 'ISO, YMD'
set intervalstyle = 'postgres'
set extra_float_digits = 3
set bytea_output = 'hex'
as $$
declare
  link snapbase.share_links;
  t snapbase.workbook_tables;
begin
  select l.* into link from snapbase_private.share_link_tokens k join snapbase.share_links l on l.id = k.link_id
   where k.token_hash = public.digest(token, 'sha256')
     and l.revoked_at is null and (l.expires_at is null or l.expires_at > now());
  if link.id is null then
    raise exception 'no such share link (it may have expired or been revoked)' using errcode = 'P0002';
  end if;
  select * into t from snapbase.workbook_tables where id = link.table_id;
  update snapbase.share_links set last_used_at = now(), use_count = use_count + 1 where id = link.id;
  perform snapbase_private.audit('share_link_access', 'share_link', link.id::text, snapbase_private.table_rel(t),
    jsonb_build_object('workbook_id', t.workbook_id, 'table_id', t.id));
  return next snapbase_private.column_names(t);
  return query execute snapbase_private.table_export_query(t, link.use_filter);
end;
$$;
comment on function snapbase.shared_table_rows(text) is 'The rows behind a public share link (header first); every access is audited.';
grant execute on function snapbase.shared_table_rows(text) to :ROLE_ANONYMOUS, :ROLE_VIEWER;
