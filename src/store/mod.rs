//! The hybrid session store: a fast tier in front of a durable tier.
//!
//! Two roles, each a trait with one implementation per backend:
//!
//! * [`FastTier`] — answers most lookups: the in-process [`memory`] tier by
//!   default (Redis in a shared deployment). It may forget anything at any
//!   time; it is a cache of the durable tier, never the only copy.
//! * [`DurableTier`] — the truth: [`sqlite`] by default (PostgreSQL in a
//!   shared deployment). Every session lives here first.
//!
//! [`SessionStore`] composes the two and implements the contract's
//! semantics once, for every pair of tiers:
//!
//! * **lookup**: the fast tier; on a miss the durable tier, and a live
//!   session found there is restored into the fast tier with its remaining
//!   lifetime. A fast tier that errors is skipped (counted), so a broken
//!   cache costs speed, not availability.
//! * **create / update**: the durable tier first, then the fast tier. A
//!   session is handed out only once it is durable.
//! * **revoke**: the durable tier first, then the fast tier, and the call
//!   returns only when both are done, so that "revoked" is never said of a
//!   session the fast tier would still accept.
//!
//! Backend errors are converted into [`StoreError`] at each backend's edge:
//! no `sqlx` or driver type leaves its module.

pub mod memory;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::session::{Session, now_ms};
use crate::token::TokenHash;

/// A store failure, classified by what the caller can do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or did not answer in time.
    #[error("{tier} store unavailable: {message}")]
    Unavailable { tier: &'static str, message: String },
    /// The backend answered with something unexpected (a bug or a corrupt row).
    #[error("{tier} store error: {message}")]
    Backend { tier: &'static str, message: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The fast tier: a cache of live sessions keyed by token hash.
#[async_trait]
pub trait FastTier: Send + Sync + 'static {
    /// A short name for logs, metrics and `/readyz` (`memory`, `redis`).
    fn kind(&self) -> &'static str;
    async fn get(&self, key: &TokenHash) -> StoreResult<Option<Arc<Session>>>;
    /// Stores `session` until its `expires_at`.
    async fn put(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()>;
    async fn remove(&self, keys: &[TokenHash]) -> StoreResult<()>;
    async fn ping(&self) -> StoreResult<()>;
}

/// The durable tier: every session, keyed by token hash, findable by id and user.
#[async_trait]
pub trait DurableTier: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    /// Applies the schema migrations.
    async fn migrate(&self) -> StoreResult<()>;
    async fn insert(&self, key: &TokenHash, session: &Session) -> StoreResult<()>;
    async fn get(&self, key: &TokenHash) -> StoreResult<Option<Session>>;
    async fn get_by_id(&self, id: Uuid) -> StoreResult<Option<(TokenHash, Session)>>;
    /// Records activity; false when the session no longer exists.
    async fn update_activity(
        &self,
        key: &TokenHash,
        last_seen_at: i64,
        expires_at: i64,
    ) -> StoreResult<bool>;
    /// Deletes one session; false when there was none.
    async fn delete(&self, key: &TokenHash) -> StoreResult<bool>;
    async fn delete_by_id(&self, id: Uuid) -> StoreResult<Option<TokenHash>>;
    /// Live sessions of a user, newest first.
    async fn list_user(&self, user_id: &str, now: i64) -> StoreResult<Vec<(TokenHash, Session)>>;
    /// Deletes every session of a user and returns their keys.
    async fn delete_user(&self, user_id: &str) -> StoreResult<Vec<TokenHash>>;
    /// Deletes at most `limit` sessions that expired before `now`.
    async fn sweep_expired(&self, now: i64, limit: u32) -> StoreResult<u64>;
    /// The stored secret named `name`, stored as `fresh` if there is none
    /// yet; every instance sharing the store agrees on the result.
    async fn secret(&self, name: &str, fresh: &[u8]) -> StoreResult<Vec<u8>>;
    async fn ping(&self) -> StoreResult<()>;
}

/// The state of one tier for `/readyz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TierHealth {
    pub tier: &'static str,
    pub kind: &'static str,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The hybrid composition. Cheap to clone.
#[derive(Clone)]
pub struct SessionStore {
    fast: Arc<dyn FastTier>,
    durable: Arc<dyn DurableTier>,
    metrics: Arc<Metrics>,
}

impl SessionStore {
    pub fn new(
        fast: Arc<dyn FastTier>,
        durable: Arc<dyn DurableTier>,
        metrics: Arc<Metrics>,
    ) -> SessionStore {
        SessionStore {
            fast,
            durable,
            metrics,
        }
    }

    pub fn durable(&self) -> &Arc<dyn DurableTier> {
        &self.durable
    }

    pub fn fast(&self) -> &Arc<dyn FastTier> {
        &self.fast
    }

    /// The live session for `key`, if any.
    pub async fn lookup(&self, key: &TokenHash) -> StoreResult<Option<Arc<Session>>> {
        let now = now_ms();
        match self.fast.get(key).await {
            Ok(Some(session)) if session.is_live(now) => {
                self.metrics.lookup("fast", "hit");
                return Ok(Some(session));
            }
            Ok(_) => self.metrics.lookup("fast", "miss"),
            Err(e) => {
                self.metrics.lookup("fast", "error");
                tracing::warn!(error = %e, "fast tier lookup failed; asking the durable tier");
            }
        }
        let found = match self.durable.get(key).await {
            Ok(found) => found,
            Err(e) => {
                self.metrics.lookup("durable", "error");
                return Err(e);
            }
        };
        match found {
            Some(session) if session.is_live(now) => {
                self.metrics.lookup("durable", "hit");
                let session = Arc::new(session);
                if let Err(e) = self.fast.put(key, session.clone()).await {
                    tracing::warn!(error = %e, "could not restore a session into the fast tier");
                }
                Ok(Some(session))
            }
            _ => {
                self.metrics.lookup("durable", "miss");
                Ok(None)
            }
        }
    }

    /// Stores a new session; it is durable when this returns.
    pub async fn create(&self, key: &TokenHash, session: Session) -> StoreResult<Arc<Session>> {
        self.durable.insert(key, &session).await?;
        let session = Arc::new(session);
        if let Err(e) = self.fast.put(key, session.clone()).await {
            // The durable copy is the truth and a later lookup restores it.
            tracing::warn!(error = %e, "could not cache a new session in the fast tier");
        }
        self.metrics.sessions_created.inc();
        Ok(session)
    }

    /// Records activity on a session (last seen, possibly a later expiry).
    pub async fn touch(&self, key: &TokenHash, session: Session) -> StoreResult<Arc<Session>> {
        self.durable
            .update_activity(key, session.last_seen_at, session.expires_at)
            .await?;
        let session = Arc::new(session);
        self.fast.put(key, session.clone()).await?;
        Ok(session)
    }

    /// Revokes the session held under `key`; true if there was one.
    pub async fn revoke(&self, key: &TokenHash) -> StoreResult<bool> {
        let existed = self.durable.delete(key).await?;
        self.fast.remove(std::slice::from_ref(key)).await?;
        if existed {
            self.metrics.sessions_revoked.inc();
        }
        Ok(existed)
    }

    /// Revokes a session by its public id; true if there was one.
    pub async fn revoke_id(&self, id: Uuid) -> StoreResult<bool> {
        match self.durable.delete_by_id(id).await? {
            Some(key) => {
                self.fast.remove(&[key]).await?;
                self.metrics.sessions_revoked.inc();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Revokes every session of a user; returns how many there were.
    pub async fn revoke_user(&self, user_id: &str) -> StoreResult<u64> {
        let keys = self.durable.delete_user(user_id).await?;
        if !keys.is_empty() {
            self.fast.remove(&keys).await?;
        }
        self.metrics.sessions_revoked.inc_by(keys.len() as u64);
        Ok(keys.len() as u64)
    }

    /// A live session by its public id.
    pub async fn get_by_id(&self, id: Uuid) -> StoreResult<Option<Session>> {
        let now = now_ms();
        Ok(self
            .durable
            .get_by_id(id)
            .await?
            .map(|(_, s)| s)
            .filter(|s| s.is_live(now)))
    }

    /// A user's live sessions, newest first.
    pub async fn list_user(&self, user_id: &str) -> StoreResult<Vec<Session>> {
        let now = now_ms();
        Ok(self
            .durable
            .list_user(user_id, now)
            .await?
            .into_iter()
            .map(|(_, s)| s)
            .collect())
    }

    /// The health of both tiers.
    pub async fn health(&self) -> Vec<TierHealth> {
        let (fast, durable) = tokio::join!(self.fast.ping(), self.durable.ping());
        vec![
            TierHealth {
                tier: "fast",
                kind: self.fast.kind(),
                ok: fast.is_ok(),
                error: fast.err().map(|e| e.to_string()),
            },
            TierHealth {
                tier: "durable",
                kind: self.durable.kind(),
                ok: durable.is_ok(),
                error: durable.err().map(|e| e.to_string()),
            },
        ]
    }

    /// Deletes expired sessions from the durable tier in batches of
    /// `batch`, so that one sweep never holds the database for long.
    pub async fn sweep(&self, batch: u32) -> StoreResult<u64> {
        let now = now_ms();
        let mut total = 0;
        loop {
            let n = self.durable.sweep_expired(now, batch).await?;
            total += n;
            if n < u64::from(batch) {
                break;
            }
            tokio::task::yield_now().await;
        }
        self.metrics.sessions_swept.inc_by(total);
        Ok(total)
    }
}
