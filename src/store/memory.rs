//! The in-process fast tier: a bounded map whose entries expire with
//! their sessions. It serves one instance only; deployments with several
//! instances use Redis so that a revocation is seen by all of them.
//!
//! It is a plain hash map in a few mutex-guarded shards rather than a
//! general-purpose cache: an entry costs its 32-byte key, a pointer and
//! the session itself (about 200 bytes in all, against some 620 with a
//! cache that keeps per-entry recency and expiry timers), and a lookup is
//! one short critical section. Keys are SHA-256 hashes of random tokens,
//! and only tokens that passed their MAC check are ever looked up, so the
//! key's own bytes serve as its hash. When a shard is full, expired
//! entries go first, then an arbitrary eighth of it: a session dropped
//! early costs one durable read, which restores it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{Cached, FastTier, StoreResult};
use crate::session::{Session, now_ms};
use crate::token::TokenHash;

/// Shards: enough that a multi-threaded runtime rarely waits on one.
const SHARDS: usize = 16;

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
    fn until(&self) -> i64 {
        match self {
            Entry::Live(s) => s.expires_at,
            Entry::Revoked { until } => *until,
        }
    }
}

/// Hashes a token hash by its first eight bytes (already uniform).
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        if let Some(word) = bytes.first_chunk::<8>() {
            self.0 ^= u64::from_le_bytes(*word);
        }
    }

    fn write_usize(&mut self, _length: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

type Shard = HashMap<TokenHash, Entry, BuildHasherDefault<KeyHasher>>;

pub struct MemoryTier {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
}

impl MemoryTier {
    /// A tier holding at most about `capacity` entries (a lookup of one
    /// dropped restores it from the durable tier).
    pub fn new(capacity: u64) -> MemoryTier {
        let per_shard = (capacity as usize).div_ceil(SHARDS).max(1);
        MemoryTier {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard,
        }
    }

    fn shard(&self, key: &TokenHash) -> MutexGuard<'_, Shard> {
        // The last byte picks the shard; the first eight hash within it.
        let shard = &self.shards[key.0[31] as usize % SHARDS];
        // A panic while holding the lock cannot leave a map half-updated
        // in a way that matters to a cache.
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Entries held, expired ones included until they are dropped.
    pub fn len(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len() as u64)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inserts, making room first if the shard is full.
    fn insert(&self, key: &TokenHash, entry: Entry) {
        insert_bounded(&mut self.shard(key), key, entry, self.per_shard);
    }
}

fn insert_bounded(shard: &mut Shard, key: &TokenHash, entry: Entry, capacity: usize) {
    if shard.len() >= capacity && !shard.contains_key(key) {
        make_room(shard, capacity);
    }
    shard.insert(*key, entry);
}

fn make_room(shard: &mut Shard, capacity: usize) {
    let now = now_ms();
    shard.retain(|_, e| e.until() > now);
    if shard.len() >= capacity {
        let excess = shard.len() + 1 - capacity;
        let victims: Vec<TokenHash> = shard
            .keys()
            .take(excess.max(capacity / 8).max(1))
            .copied()
            .collect();
        for key in victims {
            shard.remove(&key);
        }
    }
}

#[async_trait]
impl FastTier for MemoryTier {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, key: &TokenHash) -> StoreResult<Cached> {
        let now = now_ms();
        let mut shard = self.shard(key);
        let found = match shard.get(key) {
            None => return Ok(Cached::Miss),
            Some(e) if e.until() <= now => None,
            Some(Entry::Live(s)) => Some(Cached::Live(s.clone())),
            Some(Entry::Revoked { .. }) => Some(Cached::Revoked),
        };
        Ok(found.unwrap_or_else(|| {
            shard.remove(key);
            Cached::Miss
        }))
    }

    async fn put(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        if session.is_live(now_ms()) {
            self.insert(key, Entry::Live(session));
        } else {
            self.shard(key).remove(key);
        }
        Ok(())
    }

    async fn restore(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        let now = now_ms();
        if !session.is_live(now) {
            return Ok(());
        }
        let mut shard = self.shard(key);
        // Whatever is there and current (a fresher record, a revocation)
        // wins over a copy read from the durable tier.
        if shard.get(key).is_some_and(|e| e.until() > now) {
            return Ok(());
        }
        insert_bounded(&mut shard, key, Entry::Live(session), self.per_shard);
        Ok(())
    }

    async fn refresh(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        let mut shard = self.shard(key);
        if let Some(entry @ Entry::Live(_)) = shard.get_mut(key) {
            *entry = Entry::Live(session);
        }
        Ok(())
    }

    async fn revoke(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()> {
        for (key, until) in entries {
            self.insert(key, Entry::Revoked { until: *until });
        }
        Ok(())
    }

    async fn remove(&self, keys: &[TokenHash]) -> StoreResult<()> {
        for key in keys {
            self.shard(key).remove(key);
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
    use std::time::Duration;

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
        // What survived is still served.
        let mut served = 0;
        for i in 0..1000u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            if matches!(tier.get(&TokenHash(k)).await.unwrap(), Cached::Live(_)) {
                served += 1;
            }
        }
        assert!(served > 0 && served <= 100, "{served} served");
    }

    #[tokio::test]
    async fn expired_entries_make_room_before_live_ones() {
        let tier = MemoryTier::new(16);
        let short = session(Duration::from_millis(30));
        for i in 0..16u8 {
            tier.put(&TokenHash([i; 32]), short.clone()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        let keep = TokenHash([200; 32]);
        tier.put(&keep, session(Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(matches!(tier.get(&keep).await.unwrap(), Cached::Live(_)));
        assert!(matches!(
            tier.get(&TokenHash([3; 32])).await.unwrap(),
            Cached::Miss
        ));
    }

    #[tokio::test]
    async fn a_restore_does_not_overwrite_a_fresher_record() {
        let tier = MemoryTier::new(100);
        let key = TokenHash([4; 32]);
        let fresh = session(Duration::from_secs(120));
        let stale = session(Duration::from_secs(60));
        tier.put(&key, fresh.clone()).await.unwrap();
        tier.restore(&key, stale).await.unwrap();
        match tier.get(&key).await.unwrap() {
            Cached::Live(s) => assert_eq!(s.expires_at, fresh.expires_at),
            _ => panic!("the fresh record is gone"),
        }
    }
}
