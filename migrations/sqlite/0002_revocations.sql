-- Every revocation until the revoked session would have expired: replayed
-- into the fast tier before it is trusted again (after an outage or a
-- restart), so that old data there never revives a revoked session.
CREATE TABLE IF NOT EXISTS revocations (
    token_hash BLOB PRIMARY KEY NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS revocations_by_expiry ON revocations (expires_at);
