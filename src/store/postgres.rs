//! The PostgreSQL durable tier through sqlx.
//!
//! The pool reconnects by itself: when PostgreSQL comes back, the next
//! query succeeds without a restart. `acquire_timeout` is kept short so
//! that a request waiting for a dead database gets its 503 quickly.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow, PgSslMode};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{DurableTier, StoreError, StoreResult};
use crate::config::redact_url;
use crate::session::{Session, now_ms};
use crate::token::TokenHash;

const TIER: &str = "postgres";

/// The advisory lock key held by an expiry sweep batch (visible in
/// `pg_locks` as `objid`), ASCII `sg-sweep`.
pub const SWEEP_LOCK: i64 = 0x7367_2d73_7765_6570;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

pub struct PostgresTier {
    pool: PgPool,
    address: String,
}

/// Pool settings from `[store]`.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub min_connections: u32,
    pub acquire_timeout: Duration,
    pub idle_timeout: Duration,
}

fn classify(address: &str, e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable {
            tier: TIER,
            message: format!("{address}: {e}"),
        },
        sqlx::Error::Database(db) if db.code().is_some_and(|c| unavailable_sqlstate(&c)) => {
            StoreError::Unavailable {
                tier: TIER,
                message: format!("{address}: {e}"),
            }
        }
        _ => StoreError::Backend {
            tier: TIER,
            message: e.to_string(),
        },
    }
}

/// SQLSTATEs that say "not this server, not now" rather than "this
/// request is wrong": what a failover, a restart or a full server answers.
/// The same request succeeds once the new primary takes over, so it is a
/// 503 `store_unavailable` (retry), not a 500.
fn unavailable_sqlstate(code: &str) -> bool {
    // Class 08: connection exceptions.
    code.starts_with("08")
        || matches!(
            code,
            // read_only_sql_transaction: a standby, or a primary demoted by
            // the failover while our pool still points at it.
            "25006"
                // admin_shutdown, crash_shutdown, cannot_connect_now
                // (starting up or in recovery).
                | "57P01"
                | "57P02"
                | "57P03"
                // too_many_connections (also what a full PgBouncer says).
                | "53300"
        )
}

/// A connection error that says "not there (yet)" rather than "refused
/// you": nothing listening, no route, a server starting up. sqlx retries
/// a refused connection until the acquire timeout, then says
/// `PoolTimedOut`.
fn unreachable_server(e: &sqlx::Error) -> bool {
    use std::io::ErrorKind;
    match e {
        sqlx::Error::PoolTimedOut => true,
        // Not every I/O error: sqlx reports a TLS handshake that failed (an
        // untrusted or misnamed certificate) as `InvalidData`, a
        // misconfiguration that must stop the start.
        sqlx::Error::Io(io) => matches!(
            io.kind(),
            ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::NotConnected
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof
                | ErrorKind::TimedOut
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::NetworkDown
                | ErrorKind::AddrNotAvailable
        ),
        sqlx::Error::Database(db) => db.code().is_some_and(|c| unavailable_sqlstate(&c)),
        _ => false,
    }
}

fn corrupt(message: String) -> StoreError {
    StoreError::Backend {
        tier: TIER,
        message,
    }
}

fn hash_of(row: &PgRow, address: &str) -> StoreResult<TokenHash> {
    let hash: Vec<u8> = row
        .try_get("token_hash")
        .map_err(|e| classify(address, e))?;
    TokenHash::from_slice(&hash).ok_or_else(|| corrupt("bad token_hash length".into()))
}

impl PostgresTier {
    /// Connects (and checks the connection) to `url`.
    pub async fn connect(url: &str, settings: &PoolSettings) -> StoreResult<PostgresTier> {
        Self::connect_with_ca(url, settings, None).await
    }

    /// [`PostgresTier::connect`], verifying the server's certificate with
    /// the CA certificates of `ca_file` (`store.database_ca_file`; the
    /// URL's `sslmode` decides whether and how it is verified).
    pub async fn connect_with_ca(
        url: &str,
        settings: &PoolSettings,
        ca_file: Option<&Path>,
    ) -> StoreResult<PostgresTier> {
        match Self::connect_or_defer(url, settings, ca_file).await? {
            (tier, None) => Ok(tier),
            (_, Some(e)) => Err(e),
        }
    }

    /// [`PostgresTier::connect_with_ca`], except that a PostgreSQL that
    /// cannot be reached (nothing answers at the address, or it is still
    /// starting) is not an error: the tier comes back with a pool that
    /// connects once PostgreSQL answers, and with the error. A wrong
    /// certificate, password or URL is still an error.
    pub async fn connect_or_defer(
        url: &str,
        settings: &PoolSettings,
        ca_file: Option<&Path>,
    ) -> StoreResult<(PostgresTier, Option<StoreError>)> {
        let address = redact_url(url);
        let mut options: PgConnectOptions = url.parse().map_err(|e| StoreError::Unavailable {
            tier: TIER,
            message: format!("{address}: {e}"),
        })?;
        if let Some(ca_file) = ca_file {
            options = options.ssl_root_cert(ca_file);
        }
        if matches!(options.get_ssl_mode(), PgSslMode::Require) {
            tracing::warn!(
                address = %address,
                "sslmode=require encrypts the connection to PostgreSQL without checking whose \
                 certificate it is; use sslmode=verify-full with store.database_ca_file"
            );
        }
        let pool_options = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(settings.min_connections)
            .acquire_timeout(settings.acquire_timeout)
            .idle_timeout(Some(settings.idle_timeout));
        match pool_options.clone().connect_with(options.clone()).await {
            Ok(pool) => Ok((PostgresTier { pool, address }, None)),
            Err(e) if unreachable_server(&e) => {
                let error = StoreError::Unavailable {
                    tier: TIER,
                    message: format!(
                        "{address}: {e} (nothing answered within store.connect_timeout_ms)"
                    ),
                };
                let pool = pool_options.connect_lazy_with(options);
                Ok((PostgresTier { pool, address }, Some(error)))
            }
            Err(e) => Err(StoreError::Unavailable {
                tier: TIER,
                message: format!("{address}: {e}"),
            }),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn err(&self, e: sqlx::Error) -> StoreError {
        classify(&self.address, e)
    }

    fn row_to_session(&self, row: &PgRow) -> StoreResult<(TokenHash, Session)> {
        let key = hash_of(row, &self.address)?;
        let attributes: String = row.try_get("attributes").map_err(|e| self.err(e))?;
        let attributes: BTreeMap<String, String> = serde_json::from_str(&attributes)
            .map_err(|e| corrupt(format!("bad attributes: {e}")))?;
        Ok((
            key,
            Session {
                id: row.try_get("id").map_err(|e| self.err(e))?,
                user_id: row.try_get("user_id").map_err(|e| self.err(e))?,
                created_at: row.try_get("created_at").map_err(|e| self.err(e))?,
                last_seen_at: row.try_get("last_seen_at").map_err(|e| self.err(e))?,
                expires_at: row.try_get("expires_at").map_err(|e| self.err(e))?,
                attributes,
            },
        ))
    }
}

#[async_trait]
impl DurableTier for PostgresTier {
    fn kind(&self) -> &'static str {
        TIER
    }

    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await.map_err(|e| match e {
            // PostgreSQL went away or is failing over: retry later.
            sqlx::migrate::MigrateError::Execute(e) if unreachable_server(&e) => self.err(e),
            e => StoreError::Backend {
                tier: TIER,
                message: format!("migration failed: {e}"),
            },
        })
    }

    async fn insert(&self, key: &TokenHash, session: &Session) -> StoreResult<()> {
        let attributes = serde_json::to_string(&session.attributes)
            .map_err(|e| corrupt(format!("attributes: {e}")))?;
        sqlx::query(
            "INSERT INTO sessions (token_hash, id, user_id, created_at, last_seen_at, expires_at, attributes) \
             VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)",
        )
        .bind(key.as_bytes().to_vec())
        .bind(session.id)
        .bind(session.user_id.clone())
        .bind(session.created_at)
        .bind(session.last_seen_at)
        .bind(session.expires_at)
        .bind(attributes)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn get(&self, key: &TokenHash) -> StoreResult<Option<Session>> {
        let row = sqlx::query(
            "SELECT token_hash, id, user_id, created_at, last_seen_at, expires_at, attributes::text AS attributes \
             FROM sessions WHERE token_hash = $1",
        )
        .bind(key.as_bytes().to_vec())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        row.map(|r| self.row_to_session(&r).map(|(_, s)| s))
            .transpose()
    }

    async fn get_by_id(&self, id: Uuid) -> StoreResult<Option<(TokenHash, Session)>> {
        let row = sqlx::query(
            "SELECT token_hash, id, user_id, created_at, last_seen_at, expires_at, attributes::text AS attributes \
             FROM sessions WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        row.map(|r| self.row_to_session(&r)).transpose()
    }

    async fn update_activity(
        &self,
        key: &TokenHash,
        last_seen_at: i64,
        expires_at: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE sessions SET last_seen_at = GREATEST(last_seen_at, $1), expires_at = $2 \
             WHERE token_hash = $3",
        )
        .bind(last_seen_at)
        .bind(expires_at)
        .bind(key.as_bytes().to_vec())
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete(&self, key: &TokenHash) -> StoreResult<Option<i64>> {
        let row = sqlx::query("DELETE FROM sessions WHERE token_hash = $1 RETURNING expires_at")
            .bind(key.as_bytes().to_vec())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        row.map(|r| r.try_get("expires_at").map_err(|e| self.err(e)))
            .transpose()
    }

    async fn delete_by_id(&self, id: Uuid) -> StoreResult<Option<(TokenHash, i64)>> {
        let row =
            sqlx::query("DELETE FROM sessions WHERE id = $1 RETURNING token_hash, expires_at")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        match row {
            Some(r) => Ok(Some((
                hash_of(&r, &self.address)?,
                r.try_get("expires_at").map_err(|e| self.err(e))?,
            ))),
            None => Ok(None),
        }
    }

    async fn list_user(&self, user_id: &str, now: i64) -> StoreResult<Vec<(TokenHash, Session)>> {
        let rows = sqlx::query(
            "SELECT token_hash, id, user_id, created_at, last_seen_at, expires_at, attributes::text AS attributes \
             FROM sessions WHERE user_id = $1 AND expires_at > $2 \
             ORDER BY created_at DESC, id DESC",
        )
        .bind(user_id.to_string())
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        rows.iter().map(|r| self.row_to_session(r)).collect()
    }

    async fn delete_user(&self, user_id: &str) -> StoreResult<Vec<(TokenHash, i64)>> {
        let rows =
            sqlx::query("DELETE FROM sessions WHERE user_id = $1 RETURNING token_hash, expires_at")
                .bind(user_id.to_string())
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                Ok((
                    hash_of(r, &self.address)?,
                    r.try_get("expires_at").map_err(|e| self.err(e))?,
                ))
            })
            .collect()
    }

    /// Every gateway sweeps; concurrent sweeps are safe (measured: three
    /// sweepers over 20,000 expired rows, no error or deadlock, no live row
    /// touched) but would each lock and scan the same rows. So each batch
    /// runs under the transaction-scoped advisory lock [`SWEEP_LOCK`]: an
    /// instance that finds it taken sweeps nothing this round (another is
    /// at it). Transaction-scoped, so it works behind PgBouncer in
    /// transaction mode and is released by a failed connection.
    async fn sweep_expired(&self, now: i64, limit: u32) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(SWEEP_LOCK)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        if !ours {
            return Ok(0);
        }
        let done = sqlx::query(
            "DELETE FROM sessions WHERE token_hash IN \
             (SELECT token_hash FROM sessions WHERE expires_at <= $1 LIMIT $2)",
        )
        .bind(now)
        .bind(i64::from(limit))
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        sqlx::query("DELETE FROM revocations WHERE expires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(done.rows_affected())
    }

    async fn secret(&self, name: &str, fresh: &[u8]) -> StoreResult<Vec<u8>> {
        sqlx::query(
            "INSERT INTO gateway_secrets (name, value, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name.to_string())
        .bind(fresh.to_vec())
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        let row = sqlx::query("SELECT value FROM gateway_secrets WHERE name = $1")
            .bind(name.to_string())
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        row.try_get("value").map_err(|e| self.err(e))
    }

    async fn record_revocations(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let hashes: Vec<Vec<u8>> = entries.iter().map(|(k, _)| k.as_bytes().to_vec()).collect();
        let expiries: Vec<i64> = entries.iter().map(|(_, e)| *e).collect();
        sqlx::query(
            "INSERT INTO revocations (token_hash, expires_at) \
             SELECT * FROM UNNEST($1::bytea[], $2::bigint[]) \
             ON CONFLICT (token_hash) DO NOTHING",
        )
        .bind(hashes)
        .bind(expiries)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn revocations(
        &self,
        after: Option<TokenHash>,
        now: i64,
        limit: u32,
    ) -> StoreResult<Vec<TokenHash>> {
        let after = after.map(|k| k.as_bytes().to_vec()).unwrap_or_default();
        let rows = sqlx::query(
            "SELECT token_hash FROM revocations WHERE token_hash > $1 AND expires_at > $2 \
             ORDER BY token_hash LIMIT $3",
        )
        .bind(after)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        rows.iter().map(|r| hash_of(r, &self.address)).collect()
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{unavailable_sqlstate, unreachable_server};

    #[test]
    fn only_a_server_not_there_defers_the_start() {
        use std::io::{Error, ErrorKind};
        for kind in [
            ErrorKind::ConnectionRefused,
            ErrorKind::TimedOut,
            ErrorKind::ConnectionReset,
        ] {
            assert!(
                unreachable_server(&sqlx::Error::Io(Error::from(kind))),
                "{kind:?}"
            );
        }
        assert!(unreachable_server(&sqlx::Error::PoolTimedOut));
        // A failed TLS handshake, as sqlx reports it.
        let tls = Error::new(
            ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        );
        assert!(!unreachable_server(&sqlx::Error::Io(tls)));
        assert!(!unreachable_server(&sqlx::Error::Tls("bad CA file".into())));
        assert!(!unreachable_server(&sqlx::Error::Configuration(
            "bad URL".into()
        )));
    }

    #[test]
    fn failover_sqlstates_are_unavailability_and_request_errors_are_not() {
        for code in [
            "08006", "08001", "25006", "57P01", "57P02", "57P03", "53300",
        ] {
            assert!(unavailable_sqlstate(code), "{code}");
        }
        // unique_violation, undefined_table, syntax_error, serialization_failure
        for code in ["23505", "42P01", "42601", "40001"] {
            assert!(!unavailable_sqlstate(code), "{code}");
        }
    }
}
