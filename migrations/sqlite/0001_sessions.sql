-- Sessions, keyed by the SHA-256 of the token (never the token itself).
-- Times are milliseconds since the Unix epoch.
CREATE TABLE IF NOT EXISTS sessions (
    token_hash   BLOB PRIMARY KEY NOT NULL,
    id           TEXT NOT NULL UNIQUE,
    user_id      TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    attributes   TEXT NOT NULL DEFAULT '{}'
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_id, created_at);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);

-- Secrets every instance on this store must share (the token MAC key).
CREATE TABLE IF NOT EXISTS gateway_secrets (
    name       TEXT PRIMARY KEY NOT NULL,
    value      BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
