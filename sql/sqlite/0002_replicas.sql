-- Kept in step with sql/postgres/0002_replicas.sql so both backends carry the same
-- versions. An embedded SQLite file serves one process, so nothing heartbeats here.
CREATE TABLE replicas (
    replica_id TEXT PRIMARY KEY NOT NULL,
    seen_at BIGINT NOT NULL
);
