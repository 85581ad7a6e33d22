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
//! revoked session would have expired) before the fast tier is told, and
//! the fast tier is told even while untrusted (another instance may trust
//! it), with one retry. The maintenance loop ([`SessionStore::recover_fast`],
//! every `store.redis_retry_ms`) pings an untrusted fast tier and, when it
//! answers, pays what it is owed before trusting it again — no more than
//! the event calls for, since every instance sharing the fast tier recovers
//! from the same event:
//!
//! * **a transient error** (a broken connection, a timeout; the server's
//!   fingerprint, Redis's `run_id`, unchanged): the server lost nothing,
//!   so only the revocations whose write failed *here* are written (a
//!   bounded list; past 10,000 the whole log is replayed).
//! * **the server changed** (a restart, a failover: the fingerprint
//!   differs, whether or not a request noticed): it may hold old data —
//!   restarted from an append-only file with sessions revoked meanwhile,
//!   or missing tombstones lost in its fsync window. The whole log is
//!   replayed once for all instances: the first to claim
//!   `<prefix>replay:<fingerprint>` replays it, then sets
//!   `<prefix>replayed:<fingerprint>`; the others stay untrusted until
//!   that mark is set (then write only their own failed writes). The
//!   replaying instance renews its claim; if it dies, the claim lapses
//!   within 30 s and another instance claims and replays; an instance
//!   waits at most 2 minutes before replaying itself. No
//!   instance trusts the new server before the whole log is in it.
//! * **process start**: the whole log, always. It covers an instance that
//!   crashed between a revocation's durable write and its fast-tier write
//!   (a revocation the others could serve until then).
//!
//! A replay deletes the logged keys without announcing them to the other
//! instances' local caches ([`layered`]) and drops this instance's local
//! cache once. The announcements are not needed: a revocation written to
//! Redis was announced when made; one whose write failed is announced when
//! its instance writes it at recovery; and a copy another instance holds
//! of a session whose announcement was lost (its subscription down: it
//! drops its whole cache on resubscribing; the publish failed; the
//! revoking instance crashed) lives at most `store.local_cache_ttl_ms`.
//!
//! Two windows remain, both needing Redis itself unreachable: under a
//! partial partition where instance A cannot reach Redis but instance B
//! can, B may serve a session A revoked until A can reach Redis again
//! (and writes it); and if A crashes before that, until some instance
//! starts (its full replay) or the server changes. Sessions created
//! meanwhile are durable and restored on first lookup: nothing is lost.
//!
//! # When the durable tier fails
//!
//! Sessions in the fast tier keep working (reads and activity refreshes are
//! served there; the activity writer retries); creating or revoking a
//! session fails with [`StoreError::Unavailable`] (the gateway answers
//! 503): a session that is not durable is never handed out. The sqlx pool
//! reconnects by itself when the database returns.
//!
//! A process can also *start* that way (`session.token_secret` set, so the
//! token key is not read from the database): the start replay cannot read
//! the log, so the fast tier is trusted only if another instance replayed
//! the log into the very same server (its `replayed` mark); this
//! instance's own replay, and the migrations (`deferred.rs`), run once the
//! database answers.
//!
//! Backend errors are converted into [`StoreError`] at each backend's edge:
//! no `sqlx` or `redis` type leaves its module.

pub mod codec;
pub(crate) mod deferred;
pub mod layered;
pub mod memory;
pub mod postgres;
pub mod redis;
pub mod sqlite;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Sets the small record `name` to `owner` for `ttl` unless another
    /// owner holds it (Redis: `<prefix><name>`, one-key script); true if
    /// `owner` holds it now. Calling it again extends the hold. The
    /// instances sharing the tier elect with it the one that replays the
    /// revocation log for all. A tier no other instance shares elects every
    /// caller.
    async fn claim(&self, _name: &str, _owner: &str, _ttl: Duration) -> StoreResult<bool> {
        Ok(true)
    }
    /// Sets the record `name` for `ttl`.
    async fn mark(&self, _name: &str, _ttl: Duration) -> StoreResult<()> {
        Ok(())
    }
    /// Whether the record `name` exists. A tier without shared records
    /// says no: every instance then does the work itself.
    async fn marked(&self, _name: &str) -> StoreResult<bool> {
        Ok(false)
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
    /// How long the claim of the instance elected to replay the revocation
    /// log into a changed fast-tier server lasts unless renewed (it renews
    /// it every third of this while it replays: 200,000 revocations took
    /// 3.6 s on a 2-core machine); the others wait for its `replayed` mark
    /// at most four times this before replaying themselves.
    pub replay_lease: Duration,
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
            replay_lease: Duration::from_secs(30),
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
    /// False from a fast-tier error until what it is owed is paid.
    fast_trusted: AtomicBool,
    /// Fast-tier failures so far: a recovery during which one happened
    /// does not trust the fast tier.
    fast_failures: AtomicU64,
    recovery: Mutex<Recovery>,
    recovering: tokio::sync::Mutex<()>,
    /// This instance's name in the replay election.
    owner: String,
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
/// How long a server's `replayed` mark is kept: past it, an instance
/// that notices the server change late replays once more (harmless).
const REPLAYED_MARKER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Revocations whose fast-tier write failed, remembered for the next
/// recovery; beyond it, the next recovery replays the whole log.
const UNSENT_CAPACITY: usize = 10_000;

/// What the fast tier is owed before this instance trusts it again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owed {
    /// The revocations whose fast-tier write failed here: after a
    /// transient error (a broken connection, a timeout) the server kept
    /// everything else.
    Own,
    /// The server changed (a restart, a failover): the whole log, replayed
    /// by one instance for all (the election of [`FastTier::claim`]); the
    /// others wait up to `wait_until` for its mark
    /// ([`StoreOptions::replay_lease`]).
    Shared {
        fingerprint: String,
        wait_until: Option<tokio::time::Instant>,
    },
    /// At process start: the whole log (it covers the revocations of an
    /// instance that crashed before writing them to the fast tier), or,
    /// while the durable tier is unreachable, another instance's replay
    /// into the same server.
    Start,
    /// The whole log, by this instance.
    Full,
}

impl Owed {
    /// What a larger debt covers.
    fn rank(&self) -> u8 {
        match self {
            Owed::Own => 0,
            Owed::Shared { .. } => 1,
            Owed::Start => 2,
            Owed::Full => 3,
        }
    }
}

/// The fast tier's recovery state.
#[derive(Default)]
struct Recovery {
    /// The server as last seen ([`FastTier::instance_id`]).
    fingerprint: Option<String>,
    owed: Option<Owed>,
    /// Trusted at start on another instance's replay while the durable
    /// tier was unreachable: this instance's own replay is due.
    replay_due: bool,
    /// Revocations (key, expiry) whose fast-tier write failed here.
    unsent: HashMap<TokenHash, i64>,
    unsent_overflowed: bool,
}

impl Recovery {
    fn owe(&mut self, owed: Owed) {
        match &self.owed {
            Some(current) if current.rank() > owed.rank() => {}
            _ => self.owed = Some(owed),
        }
    }

    fn unsent(&mut self, entries: &[(TokenHash, i64)]) {
        for (key, expires) in entries {
            self.unsent.insert(*key, *expires);
        }
        if self.unsent.len() > UNSENT_CAPACITY {
            // The whole log covers them all; the memory is not kept.
            self.unsent = HashMap::new();
            self.unsent_overflowed = true;
        }
    }
}

/// How a recovery went.
enum Recovered {
    /// Waiting for the instance elected to replay the log.
    Waiting,
    Own,
    Full,
    /// Another instance replayed the log into this server.
    Skipped,
}

impl Recovered {
    /// The `kind` label of `sessiongate_fast_tier_replays_total`.
    fn kind(&self) -> &'static str {
        match self {
            Recovered::Waiting => "waiting",
            Recovered::Own => "own",
            Recovered::Full => "full",
            Recovered::Skipped => "skipped",
        }
    }
}

/// Why a recovery did not finish.
enum Failed {
    Fast(StoreError),
    Durable(StoreError),
    /// The fast tier's server changed during the recovery.
    Changed,
}

/// The name of a shared record about one fast-tier server: a short hash
/// of its fingerprint (a cluster's spans every primary).
fn marker(what: &str, fingerprint: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(fingerprint.as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("{what}:{hex}")
}
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
                fast_failures: AtomicU64::new(0),
                recovery: Mutex::new(Recovery::default()),
                recovering: tokio::sync::Mutex::new(()),
                owner: Uuid::now_v7().to_string(),
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
        // Counted before the swap (both SeqCst): see `recover_fast`.
        self.inner.fast_failures.fetch_add(1, Ordering::SeqCst);
        if self.inner.fast_trusted.swap(false, Ordering::SeqCst) {
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
        // Remembered before the fast tier is marked failed, so that a
        // recovery that sees the failure also sees what it owes.
        inner
            .recovery
            .lock()
            .expect("recovery lock")
            .unsent(&entries);
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

    /// Brings an untrusted fast tier back, paying what it is owed first
    /// (see the module docs), and notices a change of the fast tier's server
    /// (`instance_id`: a restart, a failover). Returns whether the fast
    /// tier is trusted. Called by the maintenance loop every
    /// `store.redis_retry_ms`.
    pub async fn recover_fast(&self) -> bool {
        let inner = &self.inner;
        // One recovery at a time per instance (the loop, and a test or the
        // start calling it directly).
        let _one = inner.recovering.lock().await;
        let failures = inner.fast_failures.load(Ordering::SeqCst);
        let fingerprint = match inner.fast.instance_id().await {
            Ok(id) => id,
            Err(e) => {
                if self.fast_trusted() {
                    self.fast_failed("health check", &e);
                }
                return false;
            }
        };
        let (owed, replay_due) = {
            let mut state = inner.recovery.lock().expect("recovery lock");
            if state.fingerprint != fingerprint {
                if let (Some(_), Some(new)) = (&state.fingerprint, &fingerprint) {
                    tracing::warn!(
                        "the fast tier's server changed (a restart or a failover); \
                         distrusting it until the revocation log is replayed into it"
                    );
                    state.owe(Owed::Shared {
                        fingerprint: new.clone(),
                        wait_until: None,
                    });
                }
                state.fingerprint = fingerprint.clone();
            }
            if state.owed.is_none() && !self.fast_trusted() {
                // A transient error: the server kept its data.
                state.owe(Owed::Own);
            }
            if state.owed == Some(Owed::Own) && (fingerprint.is_none() || state.unsent_overflowed) {
                // No way to tell whether the server kept its data, or more
                // failed writes than were remembered.
                state.owed = Some(Owed::Full);
            }
            (state.owed.clone(), state.replay_due)
        };
        let Some(owed) = owed else {
            if replay_due {
                self.replay_while_trusted(fingerprint.as_deref()).await;
            }
            return true;
        };
        inner.fast_trusted.store(false, Ordering::Release);
        let fp = fingerprint.as_deref();
        let paying = owed.clone();
        let outcome = match owed {
            Owed::Own => self
                .write_unsent()
                .await
                .map(|_| Recovered::Own)
                .map_err(Failed::Fast),
            Owed::Full => self.replay_all(fp).await,
            Owed::Start => match self.replay_all(fp).await {
                Err(Failed::Durable(e)) => self.trust_anothers_replay(fp, e).await,
                other => other,
            },
            Owed::Shared {
                fingerprint,
                wait_until,
            } => self.replay_once_for_all(&fingerprint, wait_until).await,
        };
        match outcome {
            Ok(Recovered::Waiting) => false,
            Ok(done) => {
                if inner.fast_failures.load(Ordering::SeqCst) != failures {
                    // The fast tier failed meanwhile (a revocation's write,
                    // perhaps): what failed is owed on top of what was just
                    // paid; the next round pays it.
                    let mut state = inner.recovery.lock().expect("recovery lock");
                    if state.fingerprint.as_deref() == fp && state.owed.as_ref() == Some(&paying) {
                        state.owed = Some(Owed::Own);
                    }
                    return false;
                }
                {
                    let mut state = inner.recovery.lock().expect("recovery lock");
                    if state.fingerprint.as_deref() != fp {
                        return false;
                    }
                    state.owed = None;
                }
                // Whatever this instance's local cache read before is
                // dropped once, before anything is read from the fast tier.
                inner.fast.drop_local();
                inner.fast_trusted.store(true, Ordering::SeqCst);
                // A failure between the check above and the store: either
                // its `fast_failed` comes after the store (and distrusts
                // again), or its count is seen here.
                if inner.fast_failures.load(Ordering::SeqCst) != failures {
                    inner.fast_trusted.store(false, Ordering::SeqCst);
                    return false;
                }
                let kind = done.kind();
                inner.metrics.fast_tier_replay(kind);
                tracing::info!(recovery = kind, "fast tier trusted again");
                true
            }
            Err(Failed::Changed) => false,
            Err(Failed::Fast(e) | Failed::Durable(e)) => {
                tracing::warn!(error = %e, "fast tier recovery failed; will retry");
                false
            }
        }
    }

    /// The whole log by this instance, then what failed here; marks the
    /// server `replayed` for the other instances.
    async fn replay_all(&self, fingerprint: Option<&str>) -> Result<Recovered, Failed> {
        let inner = &self.inner;
        inner
            .recovery
            .lock()
            .expect("recovery lock")
            .unsent_overflowed = false;
        let replayed = self.replay_pending(fingerprint).await?;
        // Their keys were just deleted; the tombstones are written (and
        // announced: those announcements were never made) as well.
        self.write_unsent().await.map_err(Failed::Fast)?;
        if let Some(fp) = fingerprint {
            self.same_server(fp).await?;
            inner
                .fast
                .mark(&marker("replayed", fp), REPLAYED_MARKER_TTL)
                .await
                .map_err(Failed::Fast)?;
        }
        tracing::info!(replayed, "revocation log replayed into the fast tier");
        Ok(Recovered::Full)
    }

    /// A changed server: the first instance to claim it replays the log
    /// for all; the others wait (bounded) for its `replayed` mark, then
    /// write only what failed here.
    async fn replay_once_for_all(
        &self,
        fingerprint: &str,
        wait_until: Option<tokio::time::Instant>,
    ) -> Result<Recovered, Failed> {
        let fast = &self.inner.fast;
        if fast
            .marked(&marker("replayed", fingerprint))
            .await
            .map_err(Failed::Fast)?
        {
            self.write_unsent().await.map_err(Failed::Fast)?;
            return Ok(Recovered::Skipped);
        }
        if fast
            .claim(
                &marker("replay", fingerprint),
                &self.inner.owner,
                self.inner.options.replay_lease,
            )
            .await
            .map_err(Failed::Fast)?
        {
            return self.replay_all(Some(fingerprint)).await;
        }
        // Another instance holds the claim and renews it while it replays;
        // if it dies, the claim lapses within the lease and the next claim
        // (this instance's or another's) takes over. A winner that renews
        // but never finishes is not waited for forever.
        let now = tokio::time::Instant::now();
        let wait_until = wait_until.unwrap_or(now + self.inner.options.replay_lease * 4);
        if now >= wait_until {
            tracing::warn!(
                "no other instance finished replaying the revocation log into the fast \
                 tier's new server in time; replaying it here"
            );
            return self.replay_all(Some(fingerprint)).await;
        }
        let mut state = self.inner.recovery.lock().expect("recovery lock");
        if let Some(Owed::Shared {
            fingerprint: owed,
            wait_until: until,
        }) = &mut state.owed
            && owed == fingerprint
        {
            *until = Some(wait_until);
        }
        Ok(Recovered::Waiting)
    }

    /// At start with the durable tier unreachable, the log cannot be read:
    /// the fast tier is trusted if another instance has replayed the log
    /// into this very server (its `replayed` mark), so that sessions keep
    /// being served; this instance's own replay is then due as soon as the
    /// durable tier answers. Without the mark, the fast tier may hold
    /// sessions revoked before it restarted: it stays untrusted.
    async fn trust_anothers_replay(
        &self,
        fingerprint: Option<&str>,
        durable: StoreError,
    ) -> Result<Recovered, Failed> {
        let Some(fp) = fingerprint else {
            return Err(Failed::Durable(durable));
        };
        if !self
            .inner
            .fast
            .marked(&marker("replayed", fp))
            .await
            .map_err(Failed::Fast)?
        {
            return Err(Failed::Durable(durable));
        }
        tracing::warn!(error = %durable,
            "the durable tier is unreachable; trusting the fast tier on another instance's \
             replay of the revocation log until it answers");
        self.inner
            .recovery
            .lock()
            .expect("recovery lock")
            .replay_due = true;
        Ok(Recovered::Skipped)
    }

    /// The replay owed since a start without the durable tier, while the
    /// fast tier is trusted: nothing is distrusted meanwhile.
    async fn replay_while_trusted(&self, fingerprint: Option<&str>) {
        match self.replay_all(fingerprint).await {
            Ok(_) => {
                self.inner
                    .recovery
                    .lock()
                    .expect("recovery lock")
                    .replay_due = false;
                self.inner.fast.drop_local();
                self.inner.metrics.fast_tier_replay("full");
            }
            Err(Failed::Fast(e)) => self.fast_failed("replay", &e),
            Err(Failed::Durable(e)) => {
                tracing::debug!(error = %e, "revocation log replay still waiting for the durable tier");
            }
            Err(Failed::Changed) => {}
        }
    }

    /// Fails with [`Failed::Changed`] unless the fast tier's server is
    /// still `fingerprint`.
    async fn same_server(&self, fingerprint: &str) -> Result<(), Failed> {
        let now = self.inner.fast.instance_id().await.map_err(Failed::Fast)?;
        if now.as_deref() == Some(fingerprint) {
            Ok(())
        } else {
            Err(Failed::Changed)
        }
    }

    /// Writes the revocations whose fast-tier write failed here (announced
    /// to the other instances' local caches, which never heard of them).
    async fn write_unsent(&self) -> StoreResult<usize> {
        let now = now_ms();
        let batch: Vec<(TokenHash, i64)> = {
            let mut state = self.inner.recovery.lock().expect("recovery lock");
            state.unsent.retain(|_, expires| *expires > now);
            state.unsent.iter().map(|(k, e)| (*k, *e)).collect()
        };
        for chunk in batch.chunks(REPLAY_BATCH as usize) {
            self.inner.fast.revoke(chunk).await?;
            let mut state = self.inner.recovery.lock().expect("recovery lock");
            for (key, expires) in chunk {
                if state.unsent.get(key) == Some(expires) {
                    state.unsent.remove(key);
                }
            }
        }
        Ok(batch.len())
    }

    /// Every logged revocation, deleted from the fast tier. With the
    /// server's fingerprint, the replay claims it (renewing the claim every
    /// third of the lease), so that the other instances wait for this
    /// replay rather than start their own.
    async fn replay_pending(&self, fingerprint: Option<&str>) -> Result<usize, Failed> {
        let inner = &self.inner;
        let now = now_ms();
        let lease = inner.options.replay_lease;
        let mut renewed: Option<tokio::time::Instant> = None;
        let mut total = 0;
        let mut after = None;
        loop {
            if let Some(fp) = fingerprint
                && renewed.is_none_or(|at| at.elapsed() >= lease / 3)
            {
                // Whether this instance holds it or not, the replay goes on:
                // two replays are only more work.
                inner
                    .fast
                    .claim(&marker("replay", fp), &inner.owner, lease)
                    .await
                    .map_err(Failed::Fast)?;
                renewed = Some(tokio::time::Instant::now());
            }
            let keys = inner
                .durable
                .revocations(after, now, REPLAY_BATCH)
                .await
                .map_err(Failed::Durable)?;
            let Some(last) = keys.last().copied() else {
                return Ok(total);
            };
            // Deleting is enough here: the durable tier no longer has these
            // sessions, so nothing can restore them. Not announced to the
            // other instances' local caches: N instances replaying the
            // whole log would make N² deliveries, for keys whose
            // revocations were announced when made (see the module docs).
            inner.fast.forget(&keys).await.map_err(Failed::Fast)?;
            total += keys.len();
            after = Some(last);
        }
    }

    /// Marks the fast tier untrusted until [`SessionStore::recover_fast`]
    /// has replayed the whole revocation log into it: for a fast tier that
    /// may hold data from before this process started (it covers the
    /// revocations of an instance that crashed before its fast-tier write).
    pub fn distrust_fast(&self) {
        self.inner
            .recovery
            .lock()
            .expect("recovery lock")
            .owe(Owed::Start);
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

#[cfg(test)]
mod tests {
    use super::memory::MemoryTier;
    use super::sqlite::SqliteTier;
    use super::*;

    /// A fast tier on the in-process one whose server fingerprint, and the
    /// answers of the replay election, the test decides.
    struct Shared {
        tier: MemoryTier,
        fingerprint: Mutex<String>,
        claims: AtomicBool,
        marked: AtomicBool,
        forgotten: AtomicU64,
    }

    #[async_trait]
    impl FastTier for Shared {
        fn kind(&self) -> &'static str {
            "shared"
        }
        async fn get(&self, key: &TokenHash) -> StoreResult<Cached> {
            self.tier.get(key).await
        }
        async fn put(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
            self.tier.put(key, session).await
        }
        async fn restore(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
            self.tier.restore(key, session).await
        }
        async fn refresh(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
            self.tier.refresh(key, session).await
        }
        async fn revoke(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()> {
            self.tier.revoke(entries).await
        }
        async fn remove(&self, keys: &[TokenHash]) -> StoreResult<()> {
            self.tier.remove(keys).await
        }
        async fn forget(&self, keys: &[TokenHash]) -> StoreResult<()> {
            self.forgotten
                .fetch_add(keys.len() as u64, Ordering::SeqCst);
            self.tier.remove(keys).await
        }
        async fn ping(&self) -> StoreResult<()> {
            Ok(())
        }
        async fn instance_id(&self) -> StoreResult<Option<String>> {
            Ok(Some(self.fingerprint.lock().unwrap().clone()))
        }
        async fn claim(&self, _: &str, _: &str, _: Duration) -> StoreResult<bool> {
            Ok(self.claims.load(Ordering::SeqCst))
        }
        async fn marked(&self, _: &str) -> StoreResult<bool> {
            Ok(self.marked.load(Ordering::SeqCst))
        }
    }

    async fn store(lease: Duration) -> (SessionStore, Arc<Shared>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let durable = SqliteTier::connect(&url, 1).await.unwrap();
        durable.migrate().await.unwrap();
        let fast = Arc::new(Shared {
            tier: MemoryTier::new(100),
            fingerprint: Mutex::new("first".into()),
            claims: AtomicBool::new(true),
            marked: AtomicBool::new(false),
            forgotten: AtomicU64::new(0),
        });
        let options = StoreOptions {
            replay_lease: lease,
            ..StoreOptions::default()
        };
        let store = SessionStore::with_options(
            fast.clone(),
            Arc::new(durable),
            Arc::new(Metrics::new()),
            options,
        );
        store.distrust_fast();
        assert!(store.recover_fast().await);
        (store, fast, dir)
    }

    fn replays(store: &SessionStore, kind: &'static str) -> u64 {
        store
            .metrics()
            .fast_tier_replays
            .get_or_create(&crate::metrics::KindLabels { kind })
            .get()
    }

    async fn revoked_session(store: &SessionStore) -> TokenHash {
        let key = TokenHash([7; 32]);
        let session = Session::new("alice".into(), Default::default(), Duration::from_secs(60));
        store.create(&key, session).await.unwrap();
        assert!(store.revoke(&key).await.unwrap());
        key
    }

    #[tokio::test]
    async fn an_instance_that_loses_the_election_waits_for_the_mark_then_skips() {
        let (store, fast, _dir) = store(Duration::from_secs(600)).await;
        revoked_session(&store).await;
        assert_eq!(replays(&store, "full"), 1, "the start");
        let forgotten = fast.forgotten.load(Ordering::SeqCst);

        *fast.fingerprint.lock().unwrap() = "second".into();
        fast.claims.store(false, Ordering::SeqCst);
        assert!(!store.recover_fast().await, "waits for the winner");
        assert!(!store.fast_trusted());
        assert!(!store.recover_fast().await, "still waiting");
        fast.marked.store(true, Ordering::SeqCst);
        assert!(store.recover_fast().await);
        assert_eq!(replays(&store, "skipped"), 1);
        assert_eq!(replays(&store, "full"), 1, "did not replay the log itself");
        assert_eq!(fast.forgotten.load(Ordering::SeqCst), forgotten);
    }

    #[tokio::test]
    async fn an_instance_replays_itself_when_the_winner_never_marks() {
        let (store, fast, _dir) = store(Duration::from_millis(100)).await;
        revoked_session(&store).await;
        let forgotten = fast.forgotten.load(Ordering::SeqCst);

        *fast.fingerprint.lock().unwrap() = "second".into();
        fast.claims.store(false, Ordering::SeqCst);
        assert!(!store.recover_fast().await, "waits for the winner");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !store.recover_fast().await {
            assert!(std::time::Instant::now() < deadline, "never replayed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(replays(&store, "full"), 2, "the start and the fallback");
        assert_eq!(fast.forgotten.load(Ordering::SeqCst), forgotten + 1);
    }

    #[tokio::test]
    async fn too_many_failed_writes_make_the_next_recovery_a_full_replay() {
        let (store, _fast, _dir) = store(Duration::from_secs(600)).await;
        let entries: Vec<(TokenHash, i64)> = (0..=UNSENT_CAPACITY as u32)
            .map(|i| {
                let mut key = [0u8; 32];
                key[..4].copy_from_slice(&i.to_be_bytes());
                (TokenHash(key), now_ms() + 60_000)
            })
            .collect();
        {
            let mut state = store.inner.recovery.lock().unwrap();
            state.unsent(&entries);
            assert!(state.unsent_overflowed);
            assert!(state.unsent.is_empty(), "the memory is given back");
        }
        store.fast_failed(
            "test",
            &StoreError::Unavailable {
                tier: "test",
                message: "x".into(),
            },
        );
        assert!(store.recover_fast().await);
        assert_eq!(replays(&store, "full"), 2);
        assert_eq!(replays(&store, "own"), 0);
        assert!(!store.inner.recovery.lock().unwrap().unsent_overflowed);
    }
}
