//! The embedded durable tier: SQLite through sqlx.
//!
//! One file, opened in WAL mode so that readers do not wait for the
//! writer; migrations from `migrations/sqlite` are compiled into the
//! binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use uuid::Uuid;

use super::{DurableTier, StoreError, StoreResult};
use crate::session::{Session, now_ms};
use crate::token::TokenHash;

const TIER: &str = "sqlite";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

pub struct SqliteTier {
    pool: SqlitePool,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable {
            tier: TIER,
            message: e.to_string(),
        },
        other => StoreError::Backend {
            tier: TIER,
            message: other.to_string(),
        },
    }
}

fn corrupt(message: String) -> StoreError {
    StoreError::Backend {
        tier: TIER,
        message,
    }
}

impl SqliteTier {
    /// Opens (creating if needed) the database at `url` (`sqlite://path`).
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<SqliteTier> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable {
                tier: TIER,
                message: format!("{url}: {e}"),
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            // 1 MiB of page cache per connection instead of 2: reads are
            // misses of the fast tier, and the OS caches the file anyway.
            .pragma("cache_size", "-1024");
        if let Some(path) = database_file(url, &options) {
            create_private(path)?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Unavailable {
                tier: TIER,
                message: format!("cannot open {url}: {e}"),
            })?;
        Ok(SqliteTier { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// The file behind `url`, when it is one on disk (not `:memory:`, not
/// `mode=memory`, not read-only).
fn database_file<'a>(url: &str, options: &'a SqliteConnectOptions) -> Option<&'a Path> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let in_memory_or_read_only = query
        .split('&')
        .any(|pair| matches!(pair, "mode=memory" | "mode=ro"));
    let path = options.get_filename();
    // sqlx names its in-memory databases `file:sqlx-in-memory-N`.
    let named_in_memory =
        path.as_os_str() == ":memory:" || path.to_str().is_some_and(|p| p.starts_with("file:"));
    (!in_memory_or_read_only && !named_in_memory && !path.as_os_str().is_empty()).then_some(path)
}

/// Creates the database file owner-only before SQLite opens it: it holds
/// the token MAC key and every session. SQLite gives the `-wal` and `-shm`
/// files it creates later the database file's mode, so they are 0600 too.
/// An existing file keeps its mode (the operator's choice; [`key_file_readable_by_others`]
/// makes start-up say so).
fn create_private(path: &Path) -> StoreResult<()> {
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    match open.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Unavailable {
            tier: TIER,
            message: format!("cannot create {}: {e}", path.display()),
        }),
    }
}

/// When the durable tier is a SQLite file that users other than its owner
/// can read (mode & 0o077 != 0), its path and mode: the token MAC key kept
/// in it is then readable by them.
pub(crate) fn key_file_readable_by_others(url: &str) -> Option<(PathBuf, u32)> {
    if !url.starts_with("sqlite:") {
        return None;
    }
    let options = SqliteConnectOptions::from_str(url).ok()?;
    let path = database_file(url, &options)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then(|| (path.to_path_buf(), mode))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

fn row_to_session(row: &sqlx::sqlite::SqliteRow) -> StoreResult<(TokenHash, Session)> {
    let hash: Vec<u8> = row.try_get("token_hash").map_err(unavailable)?;
    let key =
        TokenHash::from_slice(&hash).ok_or_else(|| corrupt("bad token_hash length".into()))?;
    let id: String = row.try_get("id").map_err(unavailable)?;
    let attributes: String = row.try_get("attributes").map_err(unavailable)?;
    let attributes: BTreeMap<String, String> = serde_json::from_str(&attributes)
        .map_err(|e| corrupt(format!("session {id}: bad attributes: {e}")))?;
    Ok((
        key,
        Session {
            id: Uuid::parse_str(&id).map_err(|e| corrupt(format!("bad session id {id}: {e}")))?,
            user_id: row.try_get("user_id").map_err(unavailable)?,
            created_at: row.try_get("created_at").map_err(unavailable)?,
            last_seen_at: row.try_get("last_seen_at").map_err(unavailable)?,
            expires_at: row.try_get("expires_at").map_err(unavailable)?,
            attributes,
        },
    ))
}

fn hash_and_expiry(row: &sqlx::sqlite::SqliteRow) -> StoreResult<(TokenHash, i64)> {
    let hash: Vec<u8> = row.try_get("token_hash").map_err(unavailable)?;
    let key =
        TokenHash::from_slice(&hash).ok_or_else(|| corrupt("bad token_hash length".into()))?;
    Ok((key, row.try_get("expires_at").map_err(unavailable)?))
}

#[async_trait]
impl DurableTier for SqliteTier {
    fn kind(&self) -> &'static str {
        TIER
    }

    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Backend {
                tier: TIER,
                message: format!("migration failed: {e}"),
            })
    }

    async fn insert(&self, key: &TokenHash, session: &Session) -> StoreResult<()> {
        let attributes = serde_json::to_string(&session.attributes)
            .map_err(|e| corrupt(format!("attributes: {e}")))?;
        sqlx::query(
            "INSERT INTO sessions (token_hash, id, user_id, created_at, last_seen_at, expires_at, attributes) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(key.as_bytes().to_vec())
        .bind(session.id.to_string())
        .bind(session.user_id.clone())
        .bind(session.created_at)
        .bind(session.last_seen_at)
        .bind(session.expires_at)
        .bind(attributes)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn get(&self, key: &TokenHash) -> StoreResult<Option<Session>> {
        let row = sqlx::query(
            "SELECT token_hash, id, user_id, created_at, last_seen_at, expires_at, attributes \
             FROM sessions WHERE token_hash = ?",
        )
        .bind(key.as_bytes().to_vec())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.map(|r| row_to_session(&r).map(|(_, s)| s)).transpose()
    }

    async fn get_by_id(&self, id: Uuid) -> StoreResult<Option<(TokenHash, Session)>> {
        let row = sqlx::query(
            "SELECT token_hash, id, user_id, created_at, last_seen_at, expires_at, attributes \
             FROM sessions WHERE id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.map(|r| row_to_session(&r)).transpose()
    }

    async fn update_activity(
        &self,
        key: &TokenHash,
        last_seen_at: i64,
        expires_at: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE sessions SET last_seen_at = MAX(last_seen_at, ?), expires_at = ? \
             WHERE token_hash = ?",
        )
        .bind(last_seen_at)
        .bind(expires_at)
        .bind(key.as_bytes().to_vec())
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete(&self, key: &TokenHash) -> StoreResult<Option<i64>> {
        let row = sqlx::query("DELETE FROM sessions WHERE token_hash = ? RETURNING expires_at")
            .bind(key.as_bytes().to_vec())
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.map(|r| r.try_get("expires_at").map_err(unavailable))
            .transpose()
    }

    async fn delete_by_id(&self, id: Uuid) -> StoreResult<Option<(TokenHash, i64)>> {
        let row = sqlx::query("DELETE FROM sessions WHERE id = ? RETURNING token_hash, expires_at")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.map(|r| hash_and_expiry(&r)).transpose()
    }

    async fn list_user(&self, user_id: &str, now: i64) -> StoreResult<Vec<(TokenHash, Session)>> {
        let rows = sqlx::query(
            "SELECT token_hash, id, user_id, created_at, last_seen_at, expires_at, attributes \
             FROM sessions WHERE user_id = ? AND expires_at > ? \
             ORDER BY created_at DESC, id DESC",
        )
        .bind(user_id.to_string())
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(row_to_session).collect()
    }

    async fn delete_user(&self, user_id: &str) -> StoreResult<Vec<(TokenHash, i64)>> {
        let rows =
            sqlx::query("DELETE FROM sessions WHERE user_id = ? RETURNING token_hash, expires_at")
                .bind(user_id.to_string())
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
        rows.iter().map(hash_and_expiry).collect()
    }

    async fn sweep_expired(&self, now: i64, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM sessions WHERE token_hash IN \
             (SELECT token_hash FROM sessions WHERE expires_at <= ? LIMIT ?)",
        )
        .bind(now)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        sqlx::query("DELETE FROM revocations WHERE expires_at <= ?")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn secret(&self, name: &str, fresh: &[u8]) -> StoreResult<Vec<u8>> {
        sqlx::query(
            "INSERT INTO gateway_secrets (name, value, created_at) VALUES (?, ?, ?) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name.to_string())
        .bind(fresh.to_vec())
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        let row = sqlx::query("SELECT value FROM gateway_secrets WHERE name = ?")
            .bind(name.to_string())
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        row.try_get("value").map_err(unavailable)
    }

    async fn record_revocations(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        for (key, expires_at) in entries {
            sqlx::query(
                "INSERT INTO revocations (token_hash, expires_at) VALUES (?, ?) \
                 ON CONFLICT (token_hash) DO NOTHING",
            )
            .bind(key.as_bytes().to_vec())
            .bind(*expires_at)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn revocations(
        &self,
        after: Option<TokenHash>,
        now: i64,
        limit: u32,
    ) -> StoreResult<Vec<TokenHash>> {
        let after = after.map(|k| k.as_bytes().to_vec()).unwrap_or_default();
        let rows = sqlx::query(
            "SELECT token_hash FROM revocations WHERE token_hash > ? AND expires_at > ? \
             ORDER BY token_hash LIMIT ?",
        )
        .bind(after)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                let hash: Vec<u8> = r.try_get("token_hash").map_err(unavailable)?;
                TokenHash::from_slice(&hash).ok_or_else(|| corrupt("bad token_hash length".into()))
            })
            .collect()
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(url: &str) -> Option<PathBuf> {
        let options = SqliteConnectOptions::from_str(url).unwrap();
        database_file(url, &options).map(Path::to_path_buf)
    }

    #[test]
    fn only_files_on_disk_are_created() {
        assert_eq!(file_of("sqlite://sg.db"), Some(PathBuf::from("sg.db")));
        assert_eq!(
            file_of("sqlite:///var/lib/sg/sg.db?mode=rwc"),
            Some(PathBuf::from("/var/lib/sg/sg.db"))
        );
        assert_eq!(file_of("sqlite::memory:"), None);
        assert_eq!(file_of("sqlite://sg.db?mode=memory"), None);
        assert_eq!(file_of("sqlite://sg.db?mode=ro"), None);
    }

    #[test]
    fn a_new_file_is_owner_only_and_an_old_one_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new.db");
        create_private(&new).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&new), 0o600);
        let url = format!("sqlite://{}", new.display());
        assert_eq!(key_file_readable_by_others(&url), None);

        let old = dir.path().join("old.db");
        std::fs::write(&old, b"").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o640)).unwrap();
        create_private(&old).unwrap();
        assert_eq!(mode(&old), 0o640);
        let url = format!("sqlite://{}", old.display());
        assert_eq!(key_file_readable_by_others(&url), Some((old, 0o640)));
        assert_eq!(
            key_file_readable_by_others("postgres://u@localhost/db"),
            None
        );
    }
}
