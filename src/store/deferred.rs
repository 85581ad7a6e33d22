//! A durable tier whose migrations wait for its database: what a gateway
//! uses when it started while PostgreSQL was unreachable
//! (`session.token_secret` set, `store.migrate` on).
//!
//! Until the migrations have run, every call tries them first, so that no
//! query runs against a schema older than the code: one caller at a time
//! (the others are told at once that the tier is unavailable, rather than
//! queueing behind a connect timeout each). Once they have run, a call
//! costs one atomic load more.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use uuid::Uuid;

use super::{DurableTier, StoreError, StoreResult};
use crate::session::Session;
use crate::token::TokenHash;

pub(crate) struct MigrateFirst {
    tier: Arc<dyn DurableTier>,
    migrated: AtomicBool,
    running: tokio::sync::Mutex<()>,
}

impl MigrateFirst {
    pub(crate) fn new(tier: Arc<dyn DurableTier>) -> MigrateFirst {
        MigrateFirst {
            tier,
            migrated: AtomicBool::new(false),
            running: tokio::sync::Mutex::new(()),
        }
    }

    async fn ready(&self) -> StoreResult<()> {
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        let Ok(_running) = self.running.try_lock() else {
            return Err(StoreError::Unavailable {
                tier: self.tier.kind(),
                message: "waiting for the database to apply its migrations".into(),
            });
        };
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        self.tier.migrate().await?;
        self.migrated.store(true, Ordering::Release);
        tracing::info!(
            tier = self.tier.kind(),
            "the durable tier answers: migrations applied"
        );
        Ok(())
    }
}

#[async_trait]
impl DurableTier for MigrateFirst {
    fn kind(&self) -> &'static str {
        self.tier.kind()
    }

    async fn migrate(&self) -> StoreResult<()> {
        self.ready().await
    }

    async fn insert(&self, key: &TokenHash, session: &Session) -> StoreResult<()> {
        self.ready().await?;
        self.tier.insert(key, session).await
    }

    async fn get(&self, key: &TokenHash) -> StoreResult<Option<Session>> {
        self.ready().await?;
        self.tier.get(key).await
    }

    async fn get_by_id(&self, id: Uuid) -> StoreResult<Option<(TokenHash, Session)>> {
        self.ready().await?;
        self.tier.get_by_id(id).await
    }

    async fn update_activity(
        &self,
        key: &TokenHash,
        last_seen_at: i64,
        expires_at: i64,
    ) -> StoreResult<bool> {
        self.ready().await?;
        self.tier
            .update_activity(key, last_seen_at, expires_at)
            .await
    }

    async fn delete(&self, key: &TokenHash) -> StoreResult<Option<i64>> {
        self.ready().await?;
        self.tier.delete(key).await
    }

    async fn delete_by_id(&self, id: Uuid) -> StoreResult<Option<(TokenHash, i64)>> {
        self.ready().await?;
        self.tier.delete_by_id(id).await
    }

    async fn list_user(&self, user_id: &str, now: i64) -> StoreResult<Vec<(TokenHash, Session)>> {
        self.ready().await?;
        self.tier.list_user(user_id, now).await
    }

    async fn delete_user(&self, user_id: &str) -> StoreResult<Vec<(TokenHash, i64)>> {
        self.ready().await?;
        self.tier.delete_user(user_id).await
    }

    async fn sweep_expired(&self, now: i64, limit: u32) -> StoreResult<u64> {
        self.ready().await?;
        self.tier.sweep_expired(now, limit).await
    }

    async fn secret(&self, name: &str, fresh: &[u8]) -> StoreResult<Vec<u8>> {
        self.ready().await?;
        self.tier.secret(name, fresh).await
    }

    async fn record_revocations(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()> {
        self.ready().await?;
        self.tier.record_revocations(entries).await
    }

    async fn revocations(
        &self,
        after: Option<TokenHash>,
        now: i64,
        limit: u32,
    ) -> StoreResult<Vec<TokenHash>> {
        self.ready().await?;
        self.tier.revocations(after, now, limit).await
    }

    /// Not ready (`/readyz`) until the migrations have run.
    async fn ping(&self) -> StoreResult<()> {
        self.ready().await?;
        self.tier.ping().await
    }
}
