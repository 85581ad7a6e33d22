//! The in-process fast tier: a bounded map whose entries expire with
//! their sessions. It serves one instance only; deployments with several
//! instances use Redis so that a revocation is seen by all of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::Expiry;
use moka::sync::Cache;

use super::{FastTier, StoreResult};
use crate::session::{Session, now_ms};
use crate::token::TokenHash;

struct UntilSessionExpires;

impl Expiry<TokenHash, Arc<Session>> for UntilSessionExpires {
    fn expire_after_create(
        &self,
        _key: &TokenHash,
        value: &Arc<Session>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_millis(value.remaining_ms(now_ms()) as u64))
    }

    fn expire_after_update(
        &self,
        _key: &TokenHash,
        value: &Arc<Session>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(Duration::from_millis(value.remaining_ms(now_ms()) as u64))
    }
}

pub struct MemoryTier {
    cache: Cache<TokenHash, Arc<Session>>,
}

impl MemoryTier {
    /// A tier holding at most `capacity` sessions; beyond that the least
    /// recently used are dropped (a later lookup restores them from the
    /// durable tier).
    pub fn new(capacity: u64) -> MemoryTier {
        MemoryTier {
            cache: Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilSessionExpires)
                .build(),
        }
    }

    pub fn len(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl FastTier for MemoryTier {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, key: &TokenHash) -> StoreResult<Option<Arc<Session>>> {
        Ok(self.cache.get(key))
    }

    async fn put(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        if session.is_live(now_ms()) {
            self.cache.insert(*key, session);
        } else {
            self.cache.invalidate(key);
        }
        Ok(())
    }

    async fn remove(&self, keys: &[TokenHash]) -> StoreResult<()> {
        for key in keys {
            self.cache.invalidate(key);
        }
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[tokio::test]
    async fn entries_expire_with_their_session() {
        let tier = MemoryTier::new(100);
        let key = TokenHash([1; 32]);
        let s = Session::new("u".into(), BTreeMap::new(), Duration::from_millis(50));
        tier.put(&key, Arc::new(s)).await.unwrap();
        assert!(tier.get(&key).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(tier.get(&key).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn capacity_is_bounded() {
        let tier = MemoryTier::new(100);
        for i in 0..1000u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            let s = Session::new("u".into(), BTreeMap::new(), Duration::from_secs(60));
            tier.put(&TokenHash(k), Arc::new(s)).await.unwrap();
        }
        assert!(tier.len() <= 100, "{} entries", tier.len());
    }
}
