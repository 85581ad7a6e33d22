//! The hybrid session store: a fast tier in front of a durable tier.
//!
//! Two roles, each a trait with one implementation per backend:
//!
//! * [`FastTier`] — answers most lookups: the in-process [`memory`] tier by
//!   default, [`redis`] in a shared deployment. It may forget anything at
//!   any time; it is a cache of the durable tier, never the only copy.
//! * [`DurableTier`] — the truth: [`sqlite`] by default, [`postgres`] in a
//!   shared deployment. Every session lives here first.
//!
//! [`SessionStore`] composes the two and implements the semantics once,
//! for every pair of tiers:
//!
//! * **lookup**: the fast tier; on a miss the durable tier, and a live
//!   session found there is restored into the fast tier with its remaining
//!   lifetime. Concurrent misses for one token share one durable query
//!   (miss coalescing), and tokens the durable tier does not know are
//!   remembered for a while in a bounded negative cache.
//! * **create**: the durable tier first, then the fast tier. A session is
//!   handed out only once it is durable.
//! * **activity** (last seen, a later expiry): the fast tier at once, the
//!   durable tier coalesced by a background writer every
//!   `store.activity_flush_ms` and at shutdown. At most
//!   `store.activity_buffer_capacity` sessions wait (beyond it the one
//!   waiting longest is dropped and counted, so a durable tier that is down
//!   costs bounded memory), and the final flush stops at
//!   `server.shutdown_grace_ms` (a durable tier that hangs cannot hold
//!   shutdown). The window: if the process
//!   dies, up to one interval of activity is lost from the durable tier
//!   (the fast tier has it, Redis across a restart too); a session then
//!   looks idle for up to that long more than it was. Nothing is granted
//!   that was not: an expiry is only ever extended by policy.
//! * **revoke**: the durable tier first, then a tombstone in the fast tier,
//!   and the call returns only when both are done — or when the fast
//!   tier's part is safely recorded, below.
//!
//! # When the fast tier fails
//!
//! Any fast-tier error marks it *untrusted*: lookups skip it (no request
//! waits out a Redis timeout more than once per retry interval) and are
//! answered by the durable tier; logins and revocations keep working. Every
//! revocation is logged in the durable tier (`revocations`, kept until the
//! revoked session would have expired) before the fast tier is told. The
//! maintenance loop ([`SessionStore::maintain`]) pings an untrusted fast
//! tier every `store.redis_retry_ms`; when it answers, the whole log is
//! replayed into it, and only then is it trusted again. So a Redis that
//! comes back — even one restarted from an append-only file holding
//! sessions revoked meanwhile, or one that lost a tombstone in its fsync
//! window — never serves a revoked session. The loop also watches Redis's
//! `run_id`, so a restart that no request noticed is treated the same way,
//! and a gateway starts with its Redis untrusted until the log is replayed.
//!
//! One window remains: under a partial partition where instance A cannot
//! reach Redis but instance B can, B may serve a session A revoked until A
//! can reach Redis again and replays its record. Sessions created meanwhile
//! are durable and restored on first lookup: nothing is lost.
//!
//! # When the durable tier fails
//!
//! Sessions in the fast tier keep working (reads and activity refreshes are
//! served there; the activity writer retries); creating or revoking a
//! session fails with [`StoreError::Unavailable`] (the gateway answers
//! 503): a session that is not durable is never handed out. The sqlx pool
//! reconnects by itself when the database returns.
//!
//! Backend errors are converted into [`StoreError`] at each backend's edge:
//! no `sqlx` or `redis` type leaves its module.

pub mod codec;
pub mod layered;
pub mod memory;
pub mod postgres;
pub mod redis;
pub mod sqlite;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt;
use futures_util::future::Shared;
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

/// What the fast tier knows of a token.
#[derive(Debug, Clone)]
pub enum Cached {
    Miss,
    Live(Arc<Session>),
    /// Revoked: no need to ask the durable tier.
    Revoked,
}

/// The fast tier: a cache of live sessions (and revocation tombstones)
/// keyed by token hash.
#[async_trait]
pub trait FastTier: Send + Sync + 'static {
    /// A short name for logs, metrics and `/readyz` (`memory`, `redis`).
    fn kind(&self) -> &'static str;
    async fn get(&self, key: &TokenHash) -> StoreResult<Cached>;
    /// Stores a new session until its `expires_at`.
    async fn put(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()>;
    /// Stores a session read from the durable tier, unless the key already
    /// holds anything (a fresher copy or a tombstone).
    async fn restore(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()>;
    /// Replaces a live session's record; does nothing if the key holds no
    /// live session (so a revocation is never undone).
    async fn refresh(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()>;
    /// Marks sessions revoked until the given expiry times.
    async fn revoke(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()>;
    /// Forgets keys entirely.
    async fn remove(&self, keys: &[TokenHash]) -> StoreResult<()>;
    /// Forgets keys in the shared tier without telling other instances:
    /// the replay of the revocation log, whose keys every instance learnt
    /// of when they were revoked (see [`SessionStore::recover_fast`]).
    /// The caller drops this instance's own copies with
    /// [`FastTier::drop_local`].
    async fn forget(&self, keys: &[TokenHash]) -> StoreResult<()> {
        self.remove(keys).await
    }
    /// Drops every copy this process holds in front of the shared tier
    /// (the local cache), at once; nothing elsewhere.
    fn drop_local(&self) {}
    async fn ping(&self) -> StoreResult<()>;
    /// An id that changes when the backing server restarts (Redis's
    /// `run_id`), if there is one.
    async fn instance_id(&self) -> StoreResult<Option<String>> {
        Ok(None)
    }
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
    /// Deletes one session; returns its expiry if there was one.
    async fn delete(&self, key: &TokenHash) -> StoreResult<Option<i64>>;
    async fn delete_by_id(&self, id: Uuid) -> StoreResult<Option<(TokenHash, i64)>>;
    /// Live sessions of a user, newest first.
    async fn list_user(&self, user_id: &str, now: i64) -> StoreResult<Vec<(TokenHash, Session)>>;
    /// Deletes every session of a user; returns their keys and expiries.
    async fn delete_user(&self, user_id: &str) -> StoreResult<Vec<(TokenHash, i64)>>;
    /// Deletes at most `limit` sessions that expired before `now` (and
    /// logged revocations that no longer matter).
    async fn sweep_expired(&self, now: i64, limit: u32) -> StoreResult<u64>;
    /// The stored secret named `name`, stored as `fresh` if there is none
    /// yet; every instance sharing the store agrees on the result.
    async fn secret(&self, name: &str, fresh: &[u8]) -> StoreResult<Vec<u8>>;
    /// Logs revocations (key, the session's expiry) until they expire.
    async fn record_revocations(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()>;
    /// Unexpired logged revocations with keys after `after`, in key order.
    async fn revocations(
        &self,
        after: Option<TokenHash>,
        now: i64,
        limit: u32,
    ) -> StoreResult<Vec<TokenHash>>;
    async fn ping(&self) -> StoreResult<()>;
}

/// Tuning of the composition; the defaults suit most deployments.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Unknown tokens remembered, and for how long.
    pub negative_cache_capacity: u64,
    pub negative_cache_ttl: Duration,
    /// How often an untrusted fast tier is retried.
    pub fast_retry_interval: Duration,
    /// How often coalesced activity is written to the durable tier.
    pub activity_flush_interval: Duration,
    /// Sessions whose activity may wait for a flush; beyond it the one
    /// waiting longest is dropped.
    pub activity_buffer_capacity: usize,
    /// How long the last activity flush at shutdown may take.
    pub final_flush_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            negative_cache_capacity: 100_000,
            negative_cache_ttl: Duration::from_secs(10),
            fast_retry_interval: Duration::from_secs(1),
            activity_flush_interval: Duration::from_secs(1),
            activity_buffer_capacity: 100_000,
            final_flush_timeout: Duration::from_secs(30),
        }
    }
}

/// Activity not yet written to the durable tier, per session, in the order
/// the sessions started waiting.
#[derive(Default)]
struct PendingActivity {
    /// Last seen, expiry, and the ticket of the entry's place in `order`.
    latest: HashMap<TokenHash, (i64, i64, u64)>,
    /// Oldest first. A key whose ticket no longer matches `latest` (its
    /// activity was flushed or revoked meanwhile) is a stale place, skipped.
    order: VecDeque<(TokenHash, u64)>,
    next_ticket: u64,
}

impl PendingActivity {
    /// Records activity; returns how many waiting sessions were dropped to
    /// stay within `capacity`.
    fn record(&mut self, key: TokenHash, seen: i64, expires: i64, capacity: usize) -> u64 {
        match self.latest.entry(key) {
            Entry::Occupied(mut e) => {
                let entry = e.get_mut();
                entry.0 = entry.0.max(seen);
                entry.1 = expires;
                0
            }
            Entry::Vacant(e) => {
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                e.insert((seen, expires, ticket));
                self.order.push_back((key, ticket));
                self.shrink_to(capacity)
            }
        }
    }

    /// Puts back activity a flush could not write, as the oldest waiting
    /// (it is), unless newer activity for the session arrived meanwhile.
    fn put_back(&mut self, failed: Vec<(TokenHash, (i64, i64))>, capacity: usize) -> u64 {
        for (key, (seen, expires)) in failed.into_iter().rev() {
            if let Entry::Vacant(e) = self.latest.entry(key) {
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                e.insert((seen, expires, ticket));
                self.order.push_front((key, ticket));
            }
        }
        self.shrink_to(capacity)
    }

    fn remove(&mut self, key: &TokenHash) {
        self.latest.remove(key);
    }

    /// Everything waiting, oldest first.
    fn drain(&mut self) -> Vec<(TokenHash, (i64, i64))> {
        let mut out = Vec::with_capacity(self.latest.len());
        for (key, ticket) in self.order.drain(..) {
            if let Some(&(seen, expires, t)) = self.latest.get(&key)
                && t == ticket
            {
                out.push((key, (seen, expires)));
            }
        }
        self.latest.clear();
        out
    }

    fn len(&self) -> usize {
        self.latest.len()
    }

    /// Drops the sessions waiting longest until at most `capacity` wait;
    /// also sheds stale places so that `order` stays within twice that.
    fn shrink_to(&mut self, capacity: usize) -> u64 {
        let mut dropped = 0;
        while self.latest.len() > capacity {
            let Some((key, ticket)) = self.order.pop_front() else {
                break;
            };
            if self.latest.get(&key).is_some_and(|e| e.2 == ticket) {
                self.latest.remove(&key);
                dropped += 1;
            }
        }
        if self.order.len() > 2 * capacity.max(1) {
            let latest = &self.latest;
            self.order
                .retain(|(key, ticket)| latest.get(key).is_some_and(|e| e.2 == *ticket));
        }
        dropped
    }
}

/// What a flush did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Flushed {
    pub(crate) written: usize,
    /// Still waiting: a write failed, or the deadline came.
    pub(crate) left: usize,
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

type DurableLookup = Shared<Pin<Box<dyn Future<Output = StoreResult<Option<Session>>> + Send>>>;

struct Inner {
    fast: Arc<dyn FastTier>,
    durable: Arc<dyn DurableTier>,
    metrics: Arc<Metrics>,
    options: StoreOptions,
    /// False from a fast-tier error until the recorded revocations are replayed.
    fast_trusted: AtomicBool,
    fast_instance: Mutex<Option<String>>,
    negative: moka::sync::Cache<TokenHash, ()>,
    inflight: Mutex<HashMap<TokenHash, DurableLookup>>,
    /// Activity not yet written to the durable tier.
    activity: Mutex<PendingActivity>,
}

/// The hybrid composition. Cheap to clone.
#[derive(Clone)]
pub struct SessionStore {
    inner: Arc<Inner>,
}

/// How many pending revocations are replayed per round trip.
const REPLAY_BATCH: u32 = 1_000;
/// Attempts to write a revocation to the fast tier before it is left to
/// the next replay, and the pause between them (each attempt is bounded by
/// the tier's own timeout, `store.redis_timeout_ms`).
const FAST_REVOKE_ATTEMPTS: u32 = 2;
const FAST_REVOKE_RETRY_DELAY: Duration = Duration::from_millis(20);

impl SessionStore {
    pub fn new(
        fast: Arc<dyn FastTier>,
        durable: Arc<dyn DurableTier>,
        metrics: Arc<Metrics>,
    ) -> SessionStore {
        Self::with_options(fast, durable, metrics, StoreOptions::default())
    }

    /// A store whose fast tier starts trusted: call
    /// [`SessionStore::recover_fast`] first when the fast tier may hold
    /// data from before (Redis).
    pub fn with_options(
        fast: Arc<dyn FastTier>,
        durable: Arc<dyn DurableTier>,
        metrics: Arc<Metrics>,
        options: StoreOptions,
    ) -> SessionStore {
        let negative = moka::sync::Cache::builder()
            .max_capacity(options.negative_cache_capacity)
            .time_to_live(options.negative_cache_ttl)
            .build();
        SessionStore {
            inner: Arc::new(Inner {
                fast,
                durable,
                metrics,
                options,
                fast_trusted: AtomicBool::new(true),
                fast_instance: Mutex::new(None),
                negative,
                inflight: Mutex::new(HashMap::new()),
                activity: Mutex::new(PendingActivity::default()),
            }),
        }
    }

    pub fn durable(&self) -> &Arc<dyn DurableTier> {
        &self.inner.durable
    }

    pub fn fast(&self) -> &Arc<dyn FastTier> {
        &self.inner.fast
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Whether lookups currently use the fast tier.
    pub fn fast_trusted(&self) -> bool {
        self.inner.fast_trusted.load(Ordering::Acquire)
    }

    fn fast_failed(&self, what: &str, e: &StoreError) {
        self.inner.metrics.lookup("fast", "error");
        if self.inner.fast_trusted.swap(false, Ordering::AcqRel) {
            tracing::warn!(error = %e, operation = what,
                "fast tier failed; serving from the durable tier until it recovers");
        }
    }

    /// The live session for `key`, if any.
    pub async fn lookup(&self, key: &TokenHash) -> StoreResult<Option<Arc<Session>>> {
        let inner = &self.inner;
        let now = now_ms();
        if self.fast_trusted() {
            match inner.fast.get(key).await {
                Ok(Cached::Live(session)) if session.is_live(now) => {
                    inner.metrics.lookup("fast", "hit");
                    return Ok(Some(session));
                }
                Ok(Cached::Revoked) => {
                    inner.metrics.lookup("fast", "revoked");
                    return Ok(None);
                }
                Ok(_) => inner.metrics.lookup("fast", "miss"),
                Err(e) => self.fast_failed("lookup", &e),
            }
        } else {
            inner.metrics.lookup("fast", "skipped");
        }
        if inner.negative.contains_key(key) {
            inner.metrics.lookup("negative_cache", "hit");
            return Ok(None);
        }
        let found = match self.coalesced_durable_get(key).await {
            Ok(found) => found,
            Err(e) => {
                inner.metrics.lookup("durable", "error");
                return Err(e);
            }
        };
        match found {
            Some(session) if session.is_live(now) => {
                inner.metrics.lookup("durable", "hit");
                let session = Arc::new(session);
                if self.fast_trusted()
                    && let Err(e) = inner.fast.restore(key, session.clone()).await
                {
                    self.fast_failed("restore", &e);
                }
                Ok(Some(session))
            }
            _ => {
                inner.metrics.lookup("durable", "miss");
                inner.negative.insert(*key, ());
                Ok(None)
            }
        }
    }

    /// One durable query per key at a time: concurrent callers share it.
    async fn coalesced_durable_get(&self, key: &TokenHash) -> StoreResult<Option<Session>> {
        let lookup = {
            let mut inflight = self.inner.inflight.lock().expect("inflight lock");
            if let Some(existing) = inflight.get(key) {
                existing.clone()
            } else {
                let durable = self.inner.durable.clone();
                let metrics = self.inner.metrics.clone();
                let k = *key;
                let fut: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
                    metrics.durable_queries.inc();
                    durable.get(&k).await
                });
                let shared = fut.shared();
                inflight.insert(*key, shared.clone());
                shared
            }
        };
        let result = lookup.clone().await;
        let mut inflight = self.inner.inflight.lock().expect("inflight lock");
        if inflight
            .get(key)
            .is_some_and(|current| current.ptr_eq(&lookup))
        {
            inflight.remove(key);
        }
        result
    }

    /// Stores a new session; it is durable when this returns.
    pub async fn create(&self, key: &TokenHash, session: Session) -> StoreResult<Arc<Session>> {
        let inner = &self.inner;
        inner.durable.insert(key, &session).await?;
        inner.negative.invalidate(key);
        let session = Arc::new(session);
        if self.fast_trusted()
            && let Err(e) = inner.fast.put(key, session.clone()).await
        {
            // The durable copy is the truth and a later lookup restores it.
            self.fast_failed("create", &e);
        }
        inner.metrics.sessions_created.inc();
        Ok(session)
    }

    /// Writes a changed session (a policy's new expiry) to both tiers now.
    pub async fn update(&self, key: &TokenHash, session: Session) -> StoreResult<Arc<Session>> {
        let inner = &self.inner;
        inner
            .durable
            .update_activity(key, session.last_seen_at, session.expires_at)
            .await?;
        let session = Arc::new(session);
        if self.fast_trusted()
            && let Err(e) = inner.fast.refresh(key, session.clone()).await
        {
            self.fast_failed("update", &e);
        }
        Ok(session)
    }

    /// Records activity: the fast tier now, the durable tier within one
    /// flush interval.
    pub async fn record_activity(&self, key: &TokenHash, session: Session) {
        let inner = &self.inner;
        let dropped = inner.activity.lock().expect("activity lock").record(
            *key,
            session.last_seen_at,
            session.expires_at,
            inner.options.activity_buffer_capacity,
        );
        if dropped > 0 {
            inner.metrics.activity_dropped.inc_by(dropped);
        }
        if self.fast_trusted()
            && let Err(e) = inner.fast.refresh(key, Arc::new(session)).await
        {
            self.fast_failed("activity", &e);
        }
    }

    /// Writes pending activity to the durable tier; what fails stays
    /// pending for the next flush.
    pub async fn flush_activity(&self) -> StoreResult<usize> {
        let (flushed, failed) = self.flush_activity_until(None).await;
        match failed {
            Some(e) => Err(e),
            None => Ok(flushed.written),
        }
    }

    /// Sessions whose activity waits for the next flush.
    pub fn pending_activity(&self) -> usize {
        self.inner.activity.lock().expect("activity lock").len()
    }

    /// Writes pending activity, oldest first, until a write fails or
    /// `deadline` comes; what is not written stays pending.
    async fn flush_activity_until(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> (Flushed, Option<StoreError>) {
        let batch = self.inner.activity.lock().expect("activity lock").drain();
        let mut written = 0;
        let mut failed = None;
        let mut rest = Vec::new();
        let mut batch = batch.into_iter();
        for (key, (seen, expires)) in batch.by_ref() {
            let write = self.inner.durable.update_activity(&key, seen, expires);
            let result = match deadline {
                Some(at) => tokio::time::timeout_at(at, write).await.ok(),
                None => Some(write.await),
            };
            match result {
                Some(Ok(_)) => written += 1,
                Some(Err(e)) => {
                    rest.push((key, (seen, expires)));
                    failed = Some(e);
                    break;
                }
                None => {
                    rest.push((key, (seen, expires)));
                    break;
                }
            }
        }
        rest.extend(batch);
        let left = rest.len();
        if !rest.is_empty() {
            let dropped = self
                .inner
                .activity
                .lock()
                .expect("activity lock")
                .put_back(rest, self.inner.options.activity_buffer_capacity);
            if dropped > 0 {
                self.inner.metrics.activity_dropped.inc_by(dropped);
            }
        }
        self.inner.metrics.activity_flushed.inc_by(written as u64);
        (Flushed { written, left }, failed)
    }

    /// The last flush, at shutdown: bounded by
    /// [`StoreOptions::final_flush_timeout`] (`server.shutdown_grace_ms`).
    pub async fn final_flush(&self) -> usize {
        let deadline = tokio::time::Instant::now() + self.inner.options.final_flush_timeout;
        let (flushed, failed) = self.flush_activity_until(Some(deadline)).await;
        match (failed, flushed.left) {
            (_, 0) => {}
            (Some(e), left) => tracing::error!(
                error = %e,
                written = flushed.written,
                left,
                "final activity flush failed; {left} sessions' activity not written to the durable tier"
            ),
            (None, left) => tracing::error!(
                written = flushed.written,
                left,
                "final activity flush stopped at server.shutdown_grace_ms; {left} sessions' activity not written to the durable tier"
            ),
        }
        flushed.left
    }

    /// Logs revocations in the durable tier and applies them to the fast
    /// tier; if the fast tier cannot take them, the log is replayed into it
    /// before it is trusted again.
    async fn revoke_in_fast(&self, entries: Vec<(TokenHash, i64)>) -> StoreResult<()> {
        let inner = &self.inner;
        inner.durable.record_revocations(&entries).await?;
        for (key, _) in &entries {
            inner.negative.insert(*key, ());
        }
        {
            let mut pending = inner.activity.lock().expect("activity lock");
            for (key, _) in &entries {
                pending.remove(key);
            }
        }
        // Tried even while the fast tier is distrusted: another instance
        // may trust it (its own connection never broke), and would serve
        // the session from it until this one's next replay. A tombstone
        // is never wrong to write, so the only cost of trying is the wait.
        // One retry, because the usual failure is a connection that broke
        // under the last command and is being re-made.
        let mut last_error = None;
        for attempt in 0..FAST_REVOKE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(FAST_REVOKE_RETRY_DELAY).await;
            }
            match inner.fast.revoke(&entries).await {
                Ok(()) => return Ok(()),
                Err(e) => last_error = Some(e),
            }
        }
        if let Some(e) = last_error {
            self.fast_failed("revoke", &e);
        }
        inner
            .metrics
            .fast_deletes_deferred
            .inc_by(entries.len() as u64);
        Ok(())
    }

    /// Revokes the session held under `key`; true if there was a live one
    /// (an expired one not yet swept is deleted too, but not counted).
    pub async fn revoke(&self, key: &TokenHash) -> StoreResult<bool> {
        match self.inner.durable.delete(key).await? {
            Some(expires_at) => self.revoked(vec![(*key, expires_at)]).await.map(|n| n > 0),
            None => {
                if self.fast_trusted() {
                    // Nothing durable: make sure no stale copy lingers.
                    if let Err(e) = self.inner.fast.remove(std::slice::from_ref(key)).await {
                        self.fast_failed("revoke", &e);
                    }
                }
                Ok(false)
            }
        }
    }

    /// Revokes a session by its public id; true if there was a live one.
    pub async fn revoke_id(&self, id: Uuid) -> StoreResult<bool> {
        match self.inner.durable.delete_by_id(id).await? {
            Some(entry) => self.revoked(vec![entry]).await.map(|n| n > 0),
            None => Ok(false),
        }
    }

    /// Revokes every session of a user; returns how many live ones there were.
    pub async fn revoke_user(&self, user_id: &str) -> StoreResult<u64> {
        let entries = self.inner.durable.delete_user(user_id).await?;
        self.revoked(entries).await
    }

    /// Finishes revocations deleted from the durable tier: the fast tier
    /// and the revocation log for the live ones. Returns how many were live.
    async fn revoked(&self, entries: Vec<(TokenHash, i64)>) -> StoreResult<u64> {
        let now = now_ms();
        let live: Vec<(TokenHash, i64)> = entries.into_iter().filter(|(_, e)| *e > now).collect();
        let n = live.len() as u64;
        if !live.is_empty() {
            self.revoke_in_fast(live).await?;
        }
        self.inner.metrics.sessions_revoked.inc_by(n);
        Ok(n)
    }

    /// A live session by its public id.
    pub async fn get_by_id(&self, id: Uuid) -> StoreResult<Option<Session>> {
        let now = now_ms();
        Ok(self
            .inner
            .durable
            .get_by_id(id)
            .await?
            .map(|(_, s)| s)
            .filter(|s| s.is_live(now)))
    }

    /// A user's live sessions, newest first, with their keys.
    pub async fn list_user_keyed(&self, user_id: &str) -> StoreResult<Vec<(TokenHash, Session)>> {
        self.inner.durable.list_user(user_id, now_ms()).await
    }

    /// A user's live sessions, newest first.
    pub async fn list_user(&self, user_id: &str) -> StoreResult<Vec<Session>> {
        Ok(self
            .list_user_keyed(user_id)
            .await?
            .into_iter()
            .map(|(_, s)| s)
            .collect())
    }

    /// The health of both tiers.
    pub async fn health(&self) -> Vec<TierHealth> {
        let inner = &self.inner;
        let (fast, durable) = tokio::join!(inner.fast.ping(), inner.durable.ping());
        let fast_error = match (&fast, self.fast_trusted()) {
            (Err(e), _) => Some(e.to_string()),
            (Ok(()), false) => Some("recovering: replaying revocations before use".to_string()),
            (Ok(()), true) => None,
        };
        vec![
            TierHealth {
                tier: "fast",
                kind: inner.fast.kind(),
                ok: fast_error.is_none(),
                error: fast_error,
            },
            TierHealth {
                tier: "durable",
                kind: inner.durable.kind(),
                ok: durable.is_ok(),
                error: durable.err().map(|e| e.to_string()),
            },
        ]
    }

    /// Brings an untrusted fast tier back: replays every recorded
    /// revocation into it, then trusts it. Also notices a restart of the
    /// fast tier's server. Returns whether the fast tier is trusted.
    pub async fn recover_fast(&self) -> bool {
        let inner = &self.inner;
        let trusted = self.fast_trusted();
        let instance = match inner.fast.instance_id().await {
            Ok(id) => id,
            Err(e) => {
                if trusted {
                    self.fast_failed("health check", &e);
                }
                return false;
            }
        };
        let restarted = {
            let mut known = inner.fast_instance.lock().expect("instance lock");
            let restarted = matches!((&*known, &instance), (Some(a), Some(b)) if a != b);
            *known = instance;
            restarted
        };
        if trusted && !restarted {
            return true;
        }
        if restarted {
            inner.fast_trusted.store(false, Ordering::Release);
            tracing::warn!("the fast tier's server restarted; replaying revocations before use");
        }
        match self.replay_pending().await {
            Ok(n) => {
                // The replay announced nothing: this instance's copies go
                // at once, before anything is read from the fast tier.
                inner.fast.drop_local();
                inner.fast_trusted.store(true, Ordering::Release);
                tracing::info!(replayed = n, "fast tier trusted again");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "fast tier recovery failed; will retry");
                false
            }
        }
    }

    async fn replay_pending(&self) -> StoreResult<usize> {
        let inner = &self.inner;
        let now = now_ms();
        let mut total = 0;
        let mut after = None;
        loop {
            let keys = inner.durable.revocations(after, now, REPLAY_BATCH).await?;
            let Some(last) = keys.last().copied() else {
                return Ok(total);
            };
            // Deleting is enough here: the durable tier no longer has these
            // sessions, so nothing can restore them. Not announced to the
            // other instances' local caches: N instances replaying the
            // whole log would make N² deliveries, for keys whose
            // revocations were announced when made (see `recover_fast`).
            inner.fast.forget(&keys).await?;
            total += keys.len();
            after = Some(last);
        }
    }

    /// Marks the fast tier untrusted until [`SessionStore::recover_fast`]
    /// has replayed the revocation log into it: for a fast tier that may
    /// hold data from before this process started.
    pub fn distrust_fast(&self) {
        self.inner.fast_trusted.store(false, Ordering::Release);
    }

    /// Deletes expired sessions from the durable tier in batches of
    /// `batch`, so that one sweep never holds the database for long.
    pub async fn sweep(&self, batch: u32) -> StoreResult<u64> {
        let now = now_ms();
        let mut total = 0;
        loop {
            let n = self.inner.durable.sweep_expired(now, batch).await?;
            total += n;
            if n < u64::from(batch) {
                break;
            }
            tokio::task::yield_now().await;
        }
        self.inner.metrics.sessions_swept.inc_by(total);
        Ok(total)
    }

    /// The background loop: fast-tier recovery and the activity writer,
    /// until `shutdown` turns true; then a last activity flush.
    pub async fn maintain(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let options = &self.inner.options;
        let mut recover = tokio::time::interval(options.fast_retry_interval);
        let mut flush = tokio::time::interval(options.activity_flush_interval);
        recover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = recover.tick() => { self.recover_fast().await; }
                _ = flush.tick() => {
                    if let Err(e) = self.flush_activity().await {
                        tracing::warn!(error = %e, "activity flush failed; will retry");
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        self.final_flush().await;
    }
}
