-- Run as the demo editor (claims set by the loader).

-- Pending change requests, so a new admin can approve one right away.
select snapbase.submit_change('dev.users', $$update dev.users set plan = 'pro' where id = 3$$, 'Customer upgraded by phone');
select snapbase.submit_edits('dev.products',
  '{"insert": [{"sku": "SB-005", "name": "Diff highlighter", "price": 2.40, "tags": ["office"]}],
    "update": [{"key": {"sku": "SB-002"}, "set": {"price": 5.49}}]}',
  'New product and a price change');
select snapbase.submit_change('dev.users', $$delete from dev.users where active = false$$, 'Clean up inactive accounts');

-- A workbook: a working copy of dev.users, with an edit and a suggestion waiting.
select snapbase.create_workbook('Customer cleanup');
select snapbase.copy_managed_table_to_workbook((select max(id) from snapbase.workbooks), 'dev.users', 'Users');
select snapbase.update_table_settings((select max(id) from snapbase.workbook_tables), sort_column => 'credits', sort_descending => true);
select snapbase.update_record((select max(id) from snapbase.workbook_tables), 2, '{"full_name": "Renamed in the workbook"}');
select snapbase.suggest_values((select max(id) from snapbase.workbook_tables), 1, '{"plan": "enterprise"}');
