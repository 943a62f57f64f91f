-- A tenant's trail filtered by action (`?action=`) reads this index in order and stops at
-- the page's end. With only (tenant_id, id), a rare action meant reading every one of the
-- tenant's events: the tenant itself could make the store scan millions of rows per page.
--
-- Built CONCURRENTLY, outside a transaction (the migration is marked so, and its statements
-- run one by one): a plain CREATE INDEX blocks every audit insert while it builds, which on
-- a large trail, in a rolling upgrade, holds up the replicas still serving. A build cut off
-- halfway leaves an invalid index of this name behind, which the next attempt drops first.
DROP INDEX CONCURRENTLY IF EXISTS audit_events_tenant_action_idx;
CREATE INDEX CONCURRENTLY audit_events_tenant_action_idx ON audit_events (tenant_id, action, id DESC);
