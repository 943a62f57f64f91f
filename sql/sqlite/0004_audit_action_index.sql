-- A tenant's trail filtered by action (`?action=`) reads this index in order and stops at
-- the page's end. With only (tenant_id, id), a rare action meant reading every one of the
-- tenant's events: the tenant itself could make the store scan millions of rows per page.
CREATE INDEX audit_events_tenant_action_idx ON audit_events (tenant_id, action, id DESC);
