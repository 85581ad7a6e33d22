-- Sessions, keyed by the SHA-256 of the token (never the token itself).
-- Times are milliseconds since the Unix epoch, as in every tier.
CREATE TABLE IF NOT EXISTS sessions (
    token_hash   BYTEA PRIMARY KEY,
    id           UUID NOT NULL UNIQUE,
    user_id      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    attributes   JSONB NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_id, created_at DESC);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at);

-- Secrets every instance on this store must share (the token MAC key).
CREATE TABLE IF NOT EXISTS gateway_secrets (
    name       TEXT PRIMARY KEY,
    value      BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);

-- Every revocation until the revoked session would have expired: replayed
-- into the fast tier before it is trusted again (after an outage or a
-- restart), so that old data there never revives a revoked session.
CREATE TABLE IF NOT EXISTS revocations (
    token_hash BYTEA PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS revocations_by_expiry ON revocations (expires_at);
