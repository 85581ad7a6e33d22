//! An in-process cache in front of a shared fast tier (Redis):
//! `store.local_cache_ttl_ms`.
//!
//! Lookups that hit it cost no network round trip. An entry lives at most
//! the configured lifetime (and never past its session's expiry), and the
//! cache holds at most `store.memory_capacity` sessions.
//!
//! # Revocations reach every instance at once
//!
//! A revocation made on another instance does not pass through this one,
//! so the shared tier announces it: after the shared tier has taken a
//! change that could leave another instance's copy granting more than the
//! truth (a revocation, a removal, an expiry brought forward), the token
//! hashes are published on an [`InvalidationBus`] — with Redis, the
//! pub/sub channel `<store.redis_prefix>invalidate` (see
//! [`encode_batch`] for the message) — and every instance, this one too,
//! drops its copies as the message arrives. New sessions and extended
//! expiries are not announced: a copy elsewhere can only grant less than
//! the truth, and its instance asks the shared tier once it runs out.
//!
//! Pub/sub delivers only to whoever is subscribed when a message is sent:
//! messages sent while an instance's subscription is down are lost to it.
//! So every (re)subscription begins by dropping the whole local cache, and
//! while it is down the cache keeps serving, each entry for at most its
//! lifetime. The worst case is therefore:
//!
//! * subscription up: the revocation is seen as soon as its message
//!   arrives (one Redis round trip after the tombstone is written);
//! * subscription down: at most `store.local_cache_ttl_ms`, and immediate
//!   again from the moment it is back;
//! * the announcement itself failing (the revocation still succeeds; the
//!   tombstone in Redis is the truth): at most the lifetime, counted in
//!   `sessiongate_local_cache_invalidation_publish_failures_total`.
//!
//! A lookup that read a session from the shared tier just before its
//! tombstone was written could put it into the cache just after the
//! announcement was applied and keep serving it; every invalidation bumps
//! a counter of the key's stripe, and such a lookup drops what it cached
//! if that counter moved while it was reading.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;

use super::{Cached, FastTier, StoreResult};
use crate::metrics::LocalCacheMetrics;
use crate::session::{Session, now_ms};
use crate::token::TokenHash;

/// The first byte of every invalidation message: the format's version.
pub const BATCH_VERSION: u8 = 1;
/// Most token hashes in one message (32 KiB of hashes).
pub const MAX_BATCH: usize = 1024;

const HASH_LEN: usize = 32;
/// Stripes of the invalidation counters (indexed by a hash's first byte,
/// uniformly distributed since it is SHA-256).
const STRIPES: usize = 256;
/// Resubscription backoff: doubling from the first to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Encodes an invalidation message: the version byte ([`BATCH_VERSION`]),
/// then the raw 32-byte SHA-256 token hashes back to back. Never tokens:
/// the hashes are what every tier stores already.
pub fn encode_batch(keys: &[TokenHash]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + keys.len() * HASH_LEN);
    out.push(BATCH_VERSION);
    for key in keys {
        out.extend_from_slice(key.as_bytes());
    }
    out
}

/// Why an invalidation message was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedBatch {
    #[error("empty message")]
    Empty,
    #[error("unknown message version {0}")]
    Version(u8),
    #[error("{0} bytes of hashes is not a whole number of 32-byte hashes")]
    Length(usize),
}

/// Decodes a message made by [`encode_batch`].
pub fn decode_batch(payload: &[u8]) -> Result<Vec<TokenHash>, MalformedBatch> {
    let (&version, hashes) = payload.split_first().ok_or(MalformedBatch::Empty)?;
    if version != BATCH_VERSION {
        return Err(MalformedBatch::Version(version));
    }
    if hashes.is_empty() || hashes.len() % HASH_LEN != 0 {
        return Err(MalformedBatch::Length(hashes.len()));
    }
    Ok(hashes
        .chunks_exact(HASH_LEN)
        .filter_map(TokenHash::from_slice)
        .collect())
}

/// Carries invalidation messages between the instances sharing a fast
/// tier (Redis pub/sub, [`super::redis::RedisTier`]).
#[async_trait]
pub trait InvalidationBus: Send + Sync + 'static {
    /// Sends one message to every current subscriber.
    async fn publish(&self, payload: Vec<u8>) -> StoreResult<()>;
    /// A subscription, established (the server has confirmed it) when
    /// this returns.
    async fn subscribe(&self) -> StoreResult<Box<dyn InvalidationFeed>>;
}

/// The messages of one subscription.
#[async_trait]
pub trait InvalidationFeed: Send {
    /// The next message; an error once the subscription is lost (it is
    /// never resumed: subscribe again).
    async fn next(&mut self) -> StoreResult<Vec<u8>>;
}

/// The cache and what keeps lookups from re-caching what was just
/// invalidated; shared with the subscriber task.
struct Local {
    cache: moka::sync::Cache<TokenHash, Arc<Session>>,
    stripes: [AtomicU64; STRIPES],
    /// Bumped by every whole-cache drop.
    generation: AtomicU64,
    metrics: LocalCacheMetrics,
}

/// What [`Local::stamp`] saw before a read of the shared tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp(u64, u64);

impl Local {
    fn new(ttl: Duration, capacity: u64, metrics: LocalCacheMetrics) -> Arc<Local> {
        Arc::new(Local {
            cache: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            stripes: std::array::from_fn(|_| AtomicU64::new(0)),
            generation: AtomicU64::new(0),
            metrics,
        })
    }

    fn stripe(&self, key: &TokenHash) -> &AtomicU64 {
        &self.stripes[usize::from(key.0[0]) % STRIPES]
    }

    fn stamp(&self, key: &TokenHash) -> Stamp {
        Stamp(
            self.generation.load(Ordering::SeqCst),
            self.stripe(key).load(Ordering::SeqCst),
        )
    }

    /// Caches what a read begun at `stamp` found, unless an invalidation
    /// that may concern it came in meanwhile. Inserting before checking
    /// leaves no gap: an invalidation after the check removes the entry.
    fn insert_read(&self, key: &TokenHash, session: Arc<Session>, stamp: Stamp) {
        self.cache.insert(*key, session);
        if self.stamp(key) != stamp {
            self.cache.invalidate(key);
        }
    }

    fn invalidate(&self, key: &TokenHash) {
        self.stripe(key).fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate(key);
    }

    fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate_all();
        self.metrics.clears.inc();
    }

    /// Applies one received message. One that cannot be read is from a
    /// newer or broken publisher and may have named any session: the
    /// whole cache goes.
    fn apply(&self, payload: &[u8]) {
        match decode_batch(payload) {
            Ok(keys) => {
                for key in &keys {
                    self.invalidate(key);
                }
                self.metrics
                    .invalidations_received
                    .inc_by(keys.len() as u64);
            }
            Err(e) => {
                self.metrics.malformed_messages.inc();
                tracing::warn!(error = %e, bytes = payload.len(),
                    "unreadable local-cache invalidation message; dropping the whole local cache");
                self.clear();
            }
        }
    }
}

pub struct LayeredTier {
    local: Arc<Local>,
    remote: Arc<dyn FastTier>,
    bus: Option<Arc<dyn InvalidationBus>>,
    /// Dropping it stops the subscriber task.
    _stop: Option<watch::Sender<()>>,
}

impl LayeredTier {
    /// A local cache that learns only of this instance's changes: another
    /// instance's revocation is seen here within `ttl`.
    pub fn new(remote: Arc<dyn FastTier>, ttl: Duration, capacity: u64) -> LayeredTier {
        LayeredTier {
            local: Local::new(ttl, capacity, LocalCacheMetrics::default()),
            remote,
            bus: None,
            _stop: None,
        }
    }

    /// A local cache whose changes are announced on `bus`, and which
    /// listens there for every instance's (see the module documentation).
    /// Spawns the subscriber task, which ends when the tier is dropped:
    /// call within a Tokio runtime.
    pub fn with_invalidations(
        remote: Arc<dyn FastTier>,
        bus: Arc<dyn InvalidationBus>,
        ttl: Duration,
        capacity: u64,
        metrics: LocalCacheMetrics,
    ) -> LayeredTier {
        let local = Local::new(ttl, capacity, metrics);
        let (stop, mut stopped) = watch::channel(());
        let listener = listen(local.clone(), bus.clone());
        tokio::spawn(async move {
            tokio::select! {
                // Only ever an error: nothing is sent, the sender is dropped.
                _ = stopped.changed() => {}
                () = listener => {}
            }
        });
        LayeredTier {
            local,
            remote,
            bus: Some(bus),
            _stop: Some(stop),
        }
    }

    async fn announce(&self, keys: &[TokenHash]) {
        if let Some(bus) = &self.bus {
            announce(bus.as_ref(), &self.local.metrics, keys).await;
        }
    }
}

/// Tells every instance (this one too) to drop its copies of `keys`.
/// The shared tier already holds the truth, so a failure here fails
/// nothing: the others then see it within their cache lifetime.
async fn announce(bus: &dyn InvalidationBus, metrics: &LocalCacheMetrics, keys: &[TokenHash]) {
    for chunk in keys.chunks(MAX_BATCH) {
        match bus.publish(encode_batch(chunk)).await {
            Ok(()) => {
                metrics.invalidations_published.inc_by(chunk.len() as u64);
            }
            Err(e) => {
                metrics.publish_failures.inc();
                tracing::warn!(error = %e, sessions = chunk.len(),
                    "could not announce invalidations to the other instances; \
                     they drop their copies within store.local_cache_ttl_ms");
            }
        }
    }
}

/// The subscriber: applies every message; resubscribes with backoff when
/// the subscription is lost, dropping the whole cache each time since the
/// messages of the gap are gone.
async fn listen(local: Arc<Local>, bus: Arc<dyn InvalidationBus>) {
    let metrics = &local.metrics;
    let mut backoff = FIRST_BACKOFF;
    // Whether the last attempt failed was already logged at warn.
    let mut failing = false;
    let mut ever_up = false;
    loop {
        match bus.subscribe().await {
            Ok(mut feed) => {
                local.clear();
                metrics.subscribed.set(1);
                tracing::info!(
                    again = ever_up,
                    "local-cache invalidations subscribed; local cache dropped"
                );
                failing = false;
                ever_up = true;
                let since = Instant::now();
                let lost = loop {
                    match feed.next().await {
                        Ok(payload) => local.apply(&payload),
                        Err(e) => break e,
                    }
                };
                metrics.subscribed.set(0);
                tracing::warn!(error = %lost,
                    "local-cache invalidations unsubscribed; other instances' revocations are \
                     seen within store.local_cache_ttl_ms until resubscribed");
                if since.elapsed() >= MAX_BACKOFF {
                    // A subscription that lasted is not a flapping one.
                    backoff = FIRST_BACKOFF;
                }
            }
            Err(e) => {
                if failing {
                    tracing::debug!(error = %e, "local-cache invalidations: subscribing failed");
                } else {
                    tracing::warn!(error = %e,
                        "local-cache invalidations: cannot subscribe; retrying with backoff");
                    failing = true;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[async_trait]
impl FastTier for LayeredTier {
    fn kind(&self) -> &'static str {
        self.remote.kind()
    }

    async fn get(&self, key: &TokenHash) -> StoreResult<Cached> {
        if let Some(session) = self.local.cache.get(key)
            && session.is_live(now_ms())
        {
            return Ok(Cached::Live(session));
        }
        let stamp = self.local.stamp(key);
        let found = self.remote.get(key).await?;
        if let Cached::Live(session) = &found {
            self.local.insert_read(key, session.clone(), stamp);
        }
        Ok(found)
    }

    /// A new session: no instance can hold a copy, so nothing is announced.
    async fn put(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.remote.put(key, session.clone()).await?;
        self.local.cache.insert(*key, session);
        Ok(())
    }

    /// Writes nothing over an existing record, so nothing to announce.
    async fn restore(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.remote.restore(key, session).await
    }

    async fn refresh(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        // Most refreshes move the expiry later (or only `last_seen_at`):
        // copies elsewhere then grant less than the truth and need no
        // message. An earlier expiry — or one this instance cannot compare,
        // holding no copy — is announced.
        let brought_forward = self
            .local
            .cache
            .get(key)
            .is_none_or(|old| session.expires_at < old.expires_at);
        self.local.invalidate(key);
        self.remote.refresh(key, session).await?;
        if brought_forward && self.bus.is_some() {
            self.local.invalidate(key);
            self.announce(std::slice::from_ref(key)).await;
        }
        Ok(())
    }

    async fn revoke(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()> {
        for (key, _) in entries {
            self.local.invalidate(key);
        }
        self.remote.revoke(entries).await?;
        let keys: Vec<TokenHash> = entries.iter().map(|(key, _)| *key).collect();
        // Again: a lookup may have read the record just before the
        // tombstone was written.
        for key in &keys {
            self.local.invalidate(key);
        }
        self.announce(&keys).await;
        Ok(())
    }

    async fn remove(&self, keys: &[TokenHash]) -> StoreResult<()> {
        for key in keys {
            self.local.invalidate(key);
        }
        self.remote.remove(keys).await?;
        for key in keys {
            self.local.invalidate(key);
        }
        self.announce(keys).await;
        Ok(())
    }

    /// Not announced, and this instance's copies are left to the caller's
    /// [`FastTier::drop_local`]: one whole-cache drop instead of one
    /// invalidation per key.
    async fn forget(&self, keys: &[TokenHash]) -> StoreResult<()> {
        self.remote.forget(keys).await
    }

    fn drop_local(&self) {
        self.local.clear();
    }

    async fn ping(&self) -> StoreResult<()> {
        self.remote.ping().await
    }

    async fn instance_id(&self) -> StoreResult<Option<String>> {
        self.remote.instance_id().await
    }

    async fn claim(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        self.remote.claim(name, owner, ttl).await
    }

    async fn mark(&self, name: &str, ttl: Duration) -> StoreResult<()> {
        self.remote.mark(name, ttl).await
    }

    async fn marked(&self, name: &str) -> StoreResult<bool> {
        self.remote.marked(name).await
    }
}

/// A shared tier used without a local cache that still announces its
/// revocations and removals on the bus: instances sharing the tier that do
/// cache (`store.local_cache_ttl_ms`, perhaps mid-way through a rolling
/// config change) then drop their copies at once, not after their
/// lifetime. Refreshes are not announced: holding no copy, this instance
/// cannot tell an earlier expiry from a later one, and announcing every
/// activity write would cost a publish per flushed session.
pub(crate) struct Announcing {
    remote: Arc<dyn FastTier>,
    bus: Arc<dyn InvalidationBus>,
    metrics: LocalCacheMetrics,
}

impl Announcing {
    pub(crate) fn new(
        remote: Arc<dyn FastTier>,
        bus: Arc<dyn InvalidationBus>,
        metrics: LocalCacheMetrics,
    ) -> Announcing {
        Announcing {
            remote,
            bus,
            metrics,
        }
    }
}

#[async_trait]
impl FastTier for Announcing {
    fn kind(&self) -> &'static str {
        self.remote.kind()
    }

    async fn get(&self, key: &TokenHash) -> StoreResult<Cached> {
        self.remote.get(key).await
    }

    async fn put(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.remote.put(key, session).await
    }

    async fn restore(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.remote.restore(key, session).await
    }

    async fn refresh(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.remote.refresh(key, session).await
    }

    async fn revoke(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()> {
        self.remote.revoke(entries).await?;
        let keys: Vec<TokenHash> = entries.iter().map(|(key, _)| *key).collect();
        announce(self.bus.as_ref(), &self.metrics, &keys).await;
        Ok(())
    }

    async fn remove(&self, keys: &[TokenHash]) -> StoreResult<()> {
        self.remote.remove(keys).await?;
        announce(self.bus.as_ref(), &self.metrics, keys).await;
        Ok(())
    }

    /// The replay: not announced (see [`FastTier::forget`]).
    async fn forget(&self, keys: &[TokenHash]) -> StoreResult<()> {
        self.remote.forget(keys).await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.remote.ping().await
    }

    async fn instance_id(&self) -> StoreResult<Option<String>> {
        self.remote.instance_id().await
    }

    async fn claim(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        self.remote.claim(name, owner, ttl).await
    }

    async fn mark(&self, name: &str, ttl: Duration) -> StoreResult<()> {
        self.remote.mark(name, ttl).await
    }

    async fn marked(&self, name: &str) -> StoreResult<bool> {
        self.remote.marked(name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;
    use crate::store::memory::MemoryTier;
    use tokio::sync::mpsc;

    fn hash(byte: u8) -> TokenHash {
        TokenHash([byte; 32])
    }

    #[test]
    fn batches_round_trip() {
        let keys: Vec<TokenHash> = (0..5).map(hash).collect();
        let payload = encode_batch(&keys);
        assert_eq!(payload.len(), 1 + 5 * 32);
        assert_eq!(payload[0], BATCH_VERSION);
        assert_eq!(decode_batch(&payload), Ok(keys));
        let one = encode_batch(&[hash(9)]);
        assert_eq!(decode_batch(&one), Ok(vec![hash(9)]));
    }

    #[test]
    fn malformed_batches_are_refused_without_panicking() {
        assert_eq!(decode_batch(b""), Err(MalformedBatch::Empty));
        assert_eq!(
            decode_batch(&[BATCH_VERSION]),
            Err(MalformedBatch::Length(0))
        );
        assert_eq!(
            decode_batch(&[BATCH_VERSION, 1, 2, 3]),
            Err(MalformedBatch::Length(3))
        );
        let mut long = encode_batch(&[hash(1), hash(2)]);
        long.push(0);
        assert_eq!(decode_batch(&long), Err(MalformedBatch::Length(65)));
        let mut newer = encode_batch(&[hash(1)]);
        newer[0] = 2;
        assert_eq!(decode_batch(&newer), Err(MalformedBatch::Version(2)));
        // Hex text (as a person might PUBLISH by hand) is not the format.
        let hex = hash(7).to_hex();
        assert!(decode_batch(hex.as_bytes()).is_err());
        // Every short length and version byte: no panic.
        for len in 0..100 {
            for first in [0, BATCH_VERSION, 255] {
                let mut payload = vec![0xab; len];
                if let Some(b) = payload.first_mut() {
                    *b = first;
                }
                let _ = decode_batch(&payload);
            }
        }
    }

    type Message = Result<Vec<u8>, StoreError>;

    /// A bus within the process: `subscribe` hands out a feed fed by the
    /// test (or by `publish`) and can be made to fail.
    struct TestBus {
        feeds: std::sync::Mutex<Vec<mpsc::UnboundedSender<Message>>>,
        refuse: std::sync::atomic::AtomicBool,
    }

    struct TestFeed(mpsc::UnboundedReceiver<Message>);

    impl TestBus {
        fn new() -> Arc<TestBus> {
            Arc::new(TestBus {
                feeds: std::sync::Mutex::new(Vec::new()),
                refuse: std::sync::atomic::AtomicBool::new(false),
            })
        }

        fn send(&self, message: Message) {
            for feed in self.feeds.lock().unwrap().iter() {
                let _ = feed.send(message.clone());
            }
        }

        fn drop_subscriptions(&self) {
            self.send(Err(StoreError::Unavailable {
                tier: "test",
                message: "gone".into(),
            }));
            self.feeds.lock().unwrap().clear();
        }
    }

    #[async_trait]
    impl InvalidationBus for TestBus {
        async fn publish(&self, payload: Vec<u8>) -> StoreResult<()> {
            self.send(Ok(payload));
            Ok(())
        }

        async fn subscribe(&self) -> StoreResult<Box<dyn InvalidationFeed>> {
            if self.refuse.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable {
                    tier: "test",
                    message: "refused".into(),
                });
            }
            let (tx, rx) = mpsc::unbounded_channel();
            self.feeds.lock().unwrap().push(tx);
            Ok(Box::new(TestFeed(rx)))
        }
    }

    #[async_trait]
    impl InvalidationFeed for TestFeed {
        async fn next(&mut self) -> StoreResult<Vec<u8>> {
            match self.0.recv().await {
                Some(message) => message,
                None => Err(StoreError::Unavailable {
                    tier: "test",
                    message: "closed".into(),
                }),
            }
        }
    }

    async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn session() -> Arc<Session> {
        Arc::new(Session::new(
            "alice".into(),
            Default::default(),
            Duration::from_secs(600),
        ))
    }

    /// Two tiers over one shared tier and one bus, as two instances over
    /// one Redis.
    async fn pair(bus: &Arc<TestBus>) -> (LayeredTier, LayeredTier, LocalCacheMetrics) {
        let shared: Arc<dyn FastTier> = Arc::new(MemoryTier::new(1_000));
        let metrics_b = LocalCacheMetrics::default();
        let a = LayeredTier::with_invalidations(
            shared.clone(),
            bus.clone(),
            Duration::from_secs(60),
            1_000,
            LocalCacheMetrics::default(),
        );
        let b = LayeredTier::with_invalidations(
            shared,
            bus.clone(),
            Duration::from_secs(60),
            1_000,
            metrics_b.clone(),
        );
        // The gauge is set once the first subscription's clear is done.
        eventually("both subscribed", || {
            a.local.metrics.subscribed.get() == 1 && b.local.metrics.subscribed.get() == 1
        })
        .await;
        (a, b, metrics_b)
    }

    #[tokio::test]
    async fn a_revocation_on_one_instance_drops_the_copy_on_another() {
        let bus = TestBus::new();
        let (a, b, metrics_b) = pair(&bus).await;
        let key = hash(1);
        a.put(&key, session()).await.unwrap();
        assert!(matches!(b.get(&key).await.unwrap(), Cached::Live(_)));
        assert!(b.local.cache.contains_key(&key), "B holds a copy");

        a.revoke(&[(key, now_ms() + 60_000)]).await.unwrap();
        eventually("B drops its copy", || !b.local.cache.contains_key(&key)).await;
        assert!(matches!(b.get(&key).await.unwrap(), Cached::Revoked));
        assert_eq!(metrics_b.invalidations_received.get(), 1);
    }

    #[tokio::test]
    async fn an_unreadable_message_drops_everything_and_is_survived() {
        let bus = TestBus::new();
        let (a, b, metrics_b) = pair(&bus).await;
        for i in 0..3 {
            a.put(&hash(i), session()).await.unwrap();
            b.get(&hash(i)).await.unwrap();
        }
        assert_eq!(b.local.cache.iter().count(), 3);
        let clears = metrics_b.clears.get();
        bus.send(Ok(vec![7, 7, 7]));
        eventually("B drops everything", || {
            metrics_b.malformed_messages.get() == 1 && metrics_b.clears.get() == clears + 1
        })
        .await;
        assert!(!b.local.cache.contains_key(&hash(0)));
        // Still listening.
        b.get(&hash(1)).await.unwrap();
        a.remove(&[hash(1)]).await.unwrap();
        eventually("B drops the removed copy", || {
            !b.local.cache.contains_key(&hash(1))
        })
        .await;
    }

    #[tokio::test]
    async fn a_resubscription_drops_the_whole_cache() {
        let bus = TestBus::new();
        let (a, b, metrics_b) = pair(&bus).await;
        let key = hash(3);
        a.put(&key, session()).await.unwrap();
        b.get(&key).await.unwrap();

        bus.refuse.store(true, Ordering::SeqCst);
        bus.drop_subscriptions();
        eventually("B unsubscribed", || metrics_b.subscribed.get() == 0).await;
        // While down, B keeps serving its copy (bounded by its lifetime).
        assert!(b.local.cache.contains_key(&key));
        let clears = metrics_b.clears.get();

        bus.refuse.store(false, Ordering::SeqCst);
        eventually("B subscribed again", || metrics_b.subscribed.get() == 1).await;
        assert_eq!(metrics_b.clears.get(), clears + 1);
        assert!(
            !b.local.cache.contains_key(&key),
            "the gap's messages are lost"
        );
        drop(a);
    }

    #[tokio::test]
    async fn an_extension_is_not_announced_but_an_earlier_expiry_is() {
        let bus = TestBus::new();
        let (a, b, _) = pair(&bus).await;
        let key = hash(4);
        let first = session();
        a.put(&key, first.clone()).await.unwrap();
        b.get(&key).await.unwrap();

        let mut later = (*first).clone();
        later.expires_at += 1_000;
        a.refresh(&key, Arc::new(later.clone())).await.unwrap();
        assert_eq!(a.local.metrics.invalidations_published.get(), 0);

        a.get(&key).await.unwrap();
        let mut earlier = later;
        earlier.expires_at -= 5_000;
        a.refresh(&key, Arc::new(earlier)).await.unwrap();
        assert_eq!(a.local.metrics.invalidations_published.get(), 1);
        eventually("B drops its copy", || !b.local.cache.contains_key(&key)).await;
    }

    #[tokio::test]
    async fn a_read_racing_an_invalidation_does_not_stay_cached() {
        let tier = LayeredTier::new(Arc::new(MemoryTier::new(10)), Duration::from_secs(60), 10);
        let key = hash(5);
        let stamp = tier.local.stamp(&key);
        // The invalidation lands while the read is under way.
        tier.local.invalidate(&key);
        tier.local.insert_read(&key, session(), stamp);
        assert!(!tier.local.cache.contains_key(&key));
        // Another stripe's invalidation does not concern it.
        let stamp = tier.local.stamp(&key);
        tier.local.invalidate(&hash(6));
        tier.local.insert_read(&key, session(), stamp);
        assert!(tier.local.cache.contains_key(&key));
    }

    #[tokio::test]
    async fn the_subscriber_stops_when_the_tier_is_dropped() {
        let bus = TestBus::new();
        let (a, b, _) = pair(&bus).await;
        drop(a);
        drop(b);
        // Each feed's receiver is dropped with its task.
        eventually("both subscriber tasks ended", || {
            bus.feeds.lock().unwrap().iter().all(|tx| tx.is_closed())
        })
        .await;
    }
}
