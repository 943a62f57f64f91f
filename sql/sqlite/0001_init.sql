-- Tenants and their audit trail. Timestamps are unix microseconds (BIGINT, stored by
-- SQLite as a 64-bit integer) as in the PostgreSQL schema, so the Rust code is the same
-- and page cursors compare exactly. Text compares bytewise (BINARY collation), so UUIDv7
-- ids sort by time.

CREATE TABLE tenants (
    id                 TEXT PRIMARY KEY NOT NULL,
    name               TEXT NULL,
    integration_key    TEXT NOT NULL,
    sealed_token       BLOB NOT NULL,
    api_key_hash       BLOB NOT NULL UNIQUE,
    upstream_url       TEXT NULL,
    upstream_transport TEXT NOT NULL
        CHECK (upstream_transport IN ('streamable-http', 'sse', 'auto')),
    enabled            INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    rate_rps           INTEGER NULL,
    rate_burst         INTEGER NULL,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    version            BIGINT NOT NULL,
    CHECK ((rate_rps IS NULL) = (rate_burst IS NULL))
);

CREATE INDEX tenants_created_at_id_idx ON tenants (created_at DESC, id DESC);

-- No foreign key to tenants: the audit trail outlives a deleted tenant.
CREATE TABLE audit_events (
    id             TEXT PRIMARY KEY NOT NULL,
    at             BIGINT NOT NULL,
    tenant_id      TEXT NULL,
    action         TEXT NOT NULL,
    actor          TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    request_id     TEXT NULL,
    tool           TEXT NULL,
    latency_ms     BIGINT NULL,
    request_bytes  BIGINT NULL,
    response_bytes BIGINT NULL,
    detail         TEXT NULL
);

CREATE INDEX audit_events_tenant_id_idx ON audit_events (tenant_id, id DESC);
CREATE INDEX audit_events_at_idx ON audit_events (at);
