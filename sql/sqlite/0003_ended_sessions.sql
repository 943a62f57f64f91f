-- Kept in step with sql/postgres/0003_ended_sessions.sql: MCP sessions their clients ended,
-- by the digest of the session id, so that the gateway does not rebuild one from its id
-- after a restart. `ended_at` is microseconds since the Unix epoch.
CREATE TABLE ended_sessions (
    digest TEXT PRIMARY KEY NOT NULL,
    ended_at BIGINT NOT NULL
);
CREATE INDEX ended_sessions_ended_at ON ended_sessions (ended_at);
