-- The replicas of a fleet sharing this database, for fleet-wide rate limits: each replica
-- upserts its row every few seconds and counts the rows seen recently. `seen_at` is the
-- database's clock, so replicas with skewed clocks still agree.
CREATE TABLE replicas (
    replica_id TEXT PRIMARY KEY NOT NULL,
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX replicas_seen_at ON replicas (seen_at);
