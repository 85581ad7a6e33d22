//! An in-process cache in front of a shared fast tier (Redis):
//! `store.local_cache_ttl_ms`.
//!
//! Lookups that hit it cost no network round trip. An entry lives at most
//! the configured lifetime (and never past its session's expiry), which is
//! how long another instance's revocation can go unseen here — the
//! contract's stated worst case. Revocations made by this instance apply to
//! the local cache at once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Cached, FastTier, StoreResult};
use crate::session::{Session, now_ms};
use crate::token::TokenHash;

pub struct LayeredTier {
    local: moka::sync::Cache<TokenHash, Arc<Session>>,
    remote: Arc<dyn FastTier>,
}

impl LayeredTier {
    pub fn new(remote: Arc<dyn FastTier>, ttl: Duration, capacity: u64) -> LayeredTier {
        LayeredTier {
            local: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            remote,
        }
    }
}

#[async_trait]
impl FastTier for LayeredTier {
    fn kind(&self) -> &'static str {
        self.remote.kind()
    }

    async fn get(&self, key: &TokenHash) -> StoreResult<Cached> {
        if let Some(session) = self.local.get(key)
            && session.is_live(now_ms())
        {
            return Ok(Cached::Live(session));
        }
        let found = self.remote.get(key).await?;
        if let Cached::Live(session) = &found {
            self.local.insert(*key, session.clone());
        }
        Ok(found)
    }

    async fn put(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.remote.put(key, session.clone()).await?;
        self.local.insert(*key, session);
        Ok(())
    }

    async fn restore(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.remote.restore(key, session).await
    }

    async fn refresh(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.local.invalidate(key);
        self.remote.refresh(key, session).await
    }

    async fn revoke(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()> {
        for (key, _) in entries {
            self.local.invalidate(key);
        }
        self.remote.revoke(entries).await
    }

    async fn remove(&self, keys: &[TokenHash]) -> StoreResult<()> {
        for key in keys {
            self.local.invalidate(key);
        }
        self.remote.remove(keys).await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.remote.ping().await
    }

    async fn instance_id(&self) -> StoreResult<Option<String>> {
        self.remote.instance_id().await
    }
}
