//! The in-process fast tier: a bounded map whose entries expire with
//! their sessions. It serves one instance only; deployments with several
//! instances use Redis so that a revocation is seen by all of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::Expiry;
use moka::ops::compute::Op;
use moka::sync::Cache;

use super::{Cached, FastTier, StoreResult};
use crate::session::{Session, now_ms};
use crate::token::TokenHash;

#[derive(Clone)]
enum Entry {
    Live(Arc<Session>),
    /// A revocation marker until the session would have expired: a racing
    /// restore cannot bring the session back.
    Revoked {
        until: i64,
    },
}

impl Entry {
    fn remaining(&self) -> Duration {
        let until = match self {
            Entry::Live(s) => s.expires_at,
            Entry::Revoked { until } => *until,
        };
        Duration::from_millis((until - now_ms()).max(0) as u64)
    }
}

struct UntilExpiry;

impl Expiry<TokenHash, Entry> for UntilExpiry {
    fn expire_after_create(&self, _: &TokenHash, value: &Entry, _: Instant) -> Option<Duration> {
        Some(value.remaining())
    }

    fn expire_after_update(
        &self,
        _: &TokenHash,
        value: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.remaining())
    }
}

pub struct MemoryTier {
    cache: Cache<TokenHash, Entry>,
}

impl MemoryTier {
    /// A tier holding at most `capacity` entries; beyond that the least
    /// recently used are dropped (a later lookup restores them from the
    /// durable tier).
    pub fn new(capacity: u64) -> MemoryTier {
        MemoryTier {
            cache: Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilExpiry)
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

    async fn get(&self, key: &TokenHash) -> StoreResult<Cached> {
        Ok(match self.cache.get(key) {
            None => Cached::Miss,
            Some(Entry::Live(s)) => Cached::Live(s),
            Some(Entry::Revoked { .. }) => Cached::Revoked,
        })
    }

    async fn put(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        if session.is_live(now_ms()) {
            self.cache.insert(*key, Entry::Live(session));
        } else {
            self.cache.invalidate(key);
        }
        Ok(())
    }

    async fn restore(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        if session.is_live(now_ms()) {
            self.cache
                .entry(*key)
                .or_insert_with(|| Entry::Live(session));
        }
        Ok(())
    }

    async fn refresh(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.cache
            .entry(*key)
            .and_compute_with(|existing| match existing {
                Some(e) if matches!(e.value(), Entry::Live(_)) => Op::Put(Entry::Live(session)),
                _ => Op::Nop,
            });
        Ok(())
    }

    async fn revoke(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()> {
        for (key, until) in entries {
            self.cache.insert(*key, Entry::Revoked { until: *until });
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

    fn session(ttl: Duration) -> Arc<Session> {
        Arc::new(Session::new("u".into(), BTreeMap::new(), ttl))
    }

    #[tokio::test]
    async fn entries_expire_with_their_session() {
        let tier = MemoryTier::new(100);
        let key = TokenHash([1; 32]);
        tier.put(&key, session(Duration::from_millis(50)))
            .await
            .unwrap();
        assert!(matches!(tier.get(&key).await.unwrap(), Cached::Live(_)));
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(matches!(tier.get(&key).await.unwrap(), Cached::Miss));
    }

    #[tokio::test]
    async fn a_revocation_is_not_undone_by_a_restore_or_refresh() {
        let tier = MemoryTier::new(100);
        let key = TokenHash([2; 32]);
        let s = session(Duration::from_secs(60));
        tier.put(&key, s.clone()).await.unwrap();
        tier.revoke(&[(key, s.expires_at)]).await.unwrap();
        tier.restore(&key, s.clone()).await.unwrap();
        tier.refresh(&key, s.clone()).await.unwrap();
        assert!(matches!(tier.get(&key).await.unwrap(), Cached::Revoked));
    }

    #[tokio::test]
    async fn refresh_only_updates_a_present_session() {
        let tier = MemoryTier::new(100);
        let key = TokenHash([3; 32]);
        tier.refresh(&key, session(Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(matches!(tier.get(&key).await.unwrap(), Cached::Miss));
    }

    #[tokio::test]
    async fn capacity_is_bounded() {
        let tier = MemoryTier::new(100);
        for i in 0..1000u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            tier.put(&TokenHash(k), session(Duration::from_secs(60)))
                .await
                .unwrap();
        }
        assert!(tier.len() <= 100, "{} entries", tier.len());
    }
}
