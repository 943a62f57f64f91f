-- MCP sessions their clients ended (DELETE), by the SHA-256 digest of the session id, so
-- that no replica rebuilds one from its still well-sealed id: not one that missed the
-- announcement, not one started later. A sealed id can be rebuilt for 24 hours after it
-- was issued, so rows older than that are removed as new ones arrive. `ended_at` is
-- microseconds since the Unix epoch, like the audit trail's `at`.
CREATE TABLE ended_sessions (
    digest TEXT PRIMARY KEY NOT NULL,
    ended_at BIGINT NOT NULL
);
CREATE INDEX ended_sessions_ended_at ON ended_sessions (ended_at);
