-- Pending change requests from the demo editor (claims set by the loader), so a new
-- admin can approve one right away.
select snapbase.submit_change('dev.users', $$update dev.users set plan = 'pro' where id = 3$$, 'Customer upgraded by phone');
select snapbase.submit_edits('dev.products',
  '{"insert": [{"sku": "SB-005", "name": "Diff highlighter", "price": 2.40, "tags": ["office"]}],
    "update": [{"key": {"sku": "SB-002"}, "set": {"price": 5.49}}]}',
  'New product and a price change');
select snapbase.submit_change('dev.users', $$delete from dev.users where active = false$$, 'Clean up inactive accounts');
