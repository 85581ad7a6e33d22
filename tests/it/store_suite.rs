//! One behaviour suite for the hybrid `SessionStore`, run against every
//! fast/durable pair of tiers.
//!
//! Each check is an `async fn` taking a [`Factory`] that builds a fresh,
//! empty, migrated store. [`store_pair!`] turns every check into one
//! `#[tokio::test]` per pair: adding a pair is one line naming a fast-tier
//! part and a durable-tier part, e.g.
//!
//! ```ignore
//! store_pair!(redis_postgres: redis_fast, postgres_durable);
//! ```
//!
//! The Redis and PostgreSQL pairs need the servers `scripts/services.sh`
//! starts (Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432 with
//! trust auth); `SG_TEST_REDIS_URL` and `SG_TEST_POSTGRES_URL` point
//! elsewhere. Every fixture gets its own Redis key prefix and its own
//! PostgreSQL schema, dropped afterwards, so tests run in parallel.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sessiongate::metrics::Metrics;
use sessiongate::session::{Session, now_ms};
use sessiongate::store::layered::LayeredTier;
use sessiongate::store::memory::MemoryTier;
use sessiongate::store::postgres::{PoolSettings, PostgresTier};
use sessiongate::store::redis::RedisTier;
use sessiongate::store::sqlite::SqliteTier;
use sessiongate::store::{Cached, DurableTier, FastTier, SessionStore, StoreError, StoreResult};
use sessiongate::token::{TokenHash, TokenKey};
use sqlx::Row;
use uuid::Uuid;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Builds a fresh store (empty, migrated) for one check.
pub type Factory = fn() -> BoxFuture<Fixture>;

/// Everything a tier keeps at rest, as labelled byte strings (files, rows,
/// keys and values), for the "no raw token at rest" check.
type AtRest = Arc<dyn Fn() -> BoxFuture<Vec<(String, Vec<u8>)>> + Send + Sync>;

/// Something to do when the fixture goes away (drop a schema, delete keys).
pub(crate) struct OnDrop(Option<Box<dyn FnOnce() + Send>>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Runs `work` to completion on a runtime of its own (usable from `Drop`
/// inside a test's runtime).
fn block_on_side<F: Future<Output = ()> + Send + 'static>(work: F) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cleanup runtime")
            .block_on(work)
    })
    .join();
}

pub struct FastPart {
    tier: Arc<dyn FastTier>,
    at_rest: Option<AtRest>,
    keep: Vec<OnDrop>,
}

pub struct DurablePart {
    tier: Arc<dyn DurableTier>,
    at_rest: AtRest,
    keep: Vec<OnDrop>,
}

pub struct Fixture {
    pub store: SessionStore,
    /// The metrics the store counts into (fresh for every fixture).
    pub metrics: Arc<Metrics>,
    /// Set to make every call to that tier fail as if it were unreachable
    /// (the data it holds stays as it was).
    pub fast_down: Arc<AtomicBool>,
    pub durable_down: Arc<AtomicBool>,
    at_rest: Vec<AtRest>,
    _keep: Vec<OnDrop>,
}

impl Fixture {
    async fn from_parts(fast: FastPart, durable: DurablePart) -> Fixture {
        durable
            .tier
            .migrate()
            .await
            .expect("migrate the durable tier");
        let metrics = Arc::new(Metrics::new());
        let fast_down = Arc::new(AtomicBool::new(false));
        let durable_down = Arc::new(AtomicBool::new(false));
        let store = SessionStore::new(
            Arc::new(Switchable {
                inner: fast.tier,
                down: fast_down.clone(),
            }),
            Arc::new(Switchable {
                inner: durable.tier,
                down: durable_down.clone(),
            }),
            metrics.clone(),
        );
        let mut at_rest = vec![durable.at_rest];
        at_rest.extend(fast.at_rest);
        let mut keep = durable.keep;
        keep.extend(fast.keep);
        Fixture {
            store,
            metrics,
            fast_down,
            durable_down,
            at_rest,
            _keep: keep,
        }
    }

    /// Everything the store's tiers keep outside this process.
    async fn dump_at_rest(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for dump in &self.at_rest {
            out.extend(dump().await);
        }
        out
    }
}

/// A tier that can be switched "unreachable": every call then fails with
/// [`StoreError::Unavailable`] without reaching the tier underneath.
struct Switchable<T: ?Sized> {
    inner: Arc<T>,
    down: Arc<AtomicBool>,
}

impl<T: ?Sized> Switchable<T> {
    fn check(&self) -> StoreResult<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable {
                tier: "switched-off",
                message: "switched off by the test".into(),
            })
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl FastTier for Switchable<dyn FastTier> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn get(&self, key: &TokenHash) -> StoreResult<Cached> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn put(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.check()?;
        self.inner.put(key, session).await
    }
    async fn restore(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.check()?;
        self.inner.restore(key, session).await
    }
    async fn refresh(&self, key: &TokenHash, session: Arc<Session>) -> StoreResult<()> {
        self.check()?;
        self.inner.refresh(key, session).await
    }
    async fn revoke(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()> {
        self.check()?;
        self.inner.revoke(entries).await
    }
    async fn remove(&self, keys: &[TokenHash]) -> StoreResult<()> {
        self.check()?;
        self.inner.remove(keys).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.check()?;
        self.inner.ping().await
    }
    async fn instance_id(&self) -> StoreResult<Option<String>> {
        self.check()?;
        self.inner.instance_id().await
    }
}

#[async_trait]
impl DurableTier for Switchable<dyn DurableTier> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn migrate(&self) -> StoreResult<()> {
        self.check()?;
        self.inner.migrate().await
    }
    async fn insert(&self, key: &TokenHash, session: &Session) -> StoreResult<()> {
        self.check()?;
        self.inner.insert(key, session).await
    }
    async fn get(&self, key: &TokenHash) -> StoreResult<Option<Session>> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn get_by_id(&self, id: Uuid) -> StoreResult<Option<(TokenHash, Session)>> {
        self.check()?;
        self.inner.get_by_id(id).await
    }
    async fn update_activity(
        &self,
        key: &TokenHash,
        last_seen_at: i64,
        expires_at: i64,
    ) -> StoreResult<bool> {
        self.check()?;
        self.inner
            .update_activity(key, last_seen_at, expires_at)
            .await
    }
    async fn delete(&self, key: &TokenHash) -> StoreResult<Option<i64>> {
        self.check()?;
        self.inner.delete(key).await
    }
    async fn delete_by_id(&self, id: Uuid) -> StoreResult<Option<(TokenHash, i64)>> {
        self.check()?;
        self.inner.delete_by_id(id).await
    }
    async fn list_user(&self, user_id: &str, now: i64) -> StoreResult<Vec<(TokenHash, Session)>> {
        self.check()?;
        self.inner.list_user(user_id, now).await
    }
    async fn delete_user(&self, user_id: &str) -> StoreResult<Vec<(TokenHash, i64)>> {
        self.check()?;
        self.inner.delete_user(user_id).await
    }
    async fn sweep_expired(&self, now: i64, limit: u32) -> StoreResult<u64> {
        self.check()?;
        self.inner.sweep_expired(now, limit).await
    }
    async fn secret(&self, name: &str, fresh: &[u8]) -> StoreResult<Vec<u8>> {
        self.check()?;
        self.inner.secret(name, fresh).await
    }
    async fn record_revocations(&self, entries: &[(TokenHash, i64)]) -> StoreResult<()> {
        self.check()?;
        self.inner.record_revocations(entries).await
    }
    async fn revocations(
        &self,
        after: Option<TokenHash>,
        now: i64,
        limit: u32,
    ) -> StoreResult<Vec<TokenHash>> {
        self.check()?;
        self.inner.revocations(after, now, limit).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.check()?;
        self.inner.ping().await
    }
}

// ---------------------------------------------------------------------------
// The tiers.
// ---------------------------------------------------------------------------

pub(crate) fn redis_url() -> String {
    std::env::var("SG_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn postgres_url() -> String {
    std::env::var("SG_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn memory_fast() -> FastPart {
    FastPart {
        tier: Arc::new(MemoryTier::new(10_000)),
        at_rest: None,
        keep: Vec::new(),
    }
}

/// A Redis key prefix of its own; its keys are deleted when the returned
/// guard goes away.
pub(crate) fn redis_prefix() -> (String, OnDrop) {
    let prefix = format!("sgtest:{}:", Uuid::now_v7().simple());
    let client = redis::Client::open(redis_url().as_str()).expect("Redis client");
    let pattern = format!("{prefix}*");
    let cleanup = OnDrop(Some(Box::new(move || {
        block_on_side(async move {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                for key in redis_keys(&mut conn, &pattern).await {
                    let _ = redis::cmd("DEL")
                        .arg(&key)
                        .query_async::<()>(&mut conn)
                        .await;
                }
            }
        })
    })));
    (prefix, cleanup)
}

/// A Redis tier under a key prefix of its own.
async fn redis_tier() -> (Arc<RedisTier>, AtRest, OnDrop) {
    let url = redis_url();
    let (prefix, cleanup) = redis_prefix();
    let tier = RedisTier::connect(&url, &prefix, Duration::from_secs(2)).expect("Redis client");
    tier.ping().await.unwrap_or_else(|e| {
        panic!(
            "Redis at {url} does not answer ({e}); run scripts/services.sh or set SG_TEST_REDIS_URL"
        )
    });
    let client = redis::Client::open(url.as_str()).expect("Redis client");
    let pattern = format!("{prefix}*");
    let at_rest: AtRest = Arc::new(move || {
        let client = client.clone();
        let pattern = pattern.clone();
        Box::pin(async move {
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("Redis connection");
            let mut out = Vec::new();
            for key in redis_keys(&mut conn, &pattern).await {
                let value: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .expect("GET");
                out.push((format!("redis key name {key}"), key.clone().into_bytes()));
                if let Some(value) = value {
                    out.push((format!("redis value of {key}"), value));
                }
            }
            out
        })
    });
    (Arc::new(tier), at_rest, cleanup)
}

async fn redis_keys(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

async fn redis_fast() -> FastPart {
    let (tier, at_rest, cleanup) = redis_tier().await;
    FastPart {
        tier,
        at_rest: Some(at_rest),
        keep: vec![cleanup],
    }
}

/// Redis behind the in-process local cache (`store.local_cache_ttl_ms`),
/// its invalidations over Redis pub/sub.
async fn layered_redis_fast() -> FastPart {
    let (tier, at_rest, cleanup) = redis_tier().await;
    FastPart {
        tier: Arc::new(LayeredTier::with_invalidations(
            tier.clone(),
            tier,
            Duration::from_secs(5),
            10_000,
            Default::default(),
        )),
        at_rest: Some(at_rest),
        keep: vec![cleanup],
    }
}

async fn sqlite_durable() -> DurablePart {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("sessions.db");
    let url = format!("sqlite://{}", path.display());
    let tier = SqliteTier::connect(&url, 4)
        .await
        .expect("open the SQLite tier");
    let pool = tier.pool().clone();
    let at_rest: AtRest = Arc::new(move || {
        let pool = pool.clone();
        let path = path.clone();
        Box::pin(async move { sqlite_at_rest(&pool, &path).await })
    });
    DurablePart {
        tier: Arc::new(tier),
        at_rest,
        keep: vec![OnDrop(Some(Box::new(move || drop(dir))))],
    }
}

/// The database file with its WAL and shared-memory companions, plus every
/// cell of every table as bytes.
async fn sqlite_at_rest(pool: &sqlx::SqlitePool, db: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let file = PathBuf::from(format!("{}{suffix}", db.display()));
        if let Ok(bytes) = std::fs::read(&file) {
            out.push((format!("file {}", file.display()), bytes));
        }
    }
    let tables: Vec<String> =
        sqlx::query("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(pool)
            .await
            .expect("list tables")
            .iter()
            .map(|r| r.get::<String, _>("name"))
            .collect();
    assert!(
        tables.iter().any(|t| t == "sessions"),
        "no sessions table: {tables:?}"
    );
    for table in tables {
        let columns: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT name FROM pragma_table_info('{table}')"
        )))
        .fetch_all(pool)
        .await
        .expect("table columns")
        .iter()
        .map(|r| r.get::<String, _>("name"))
        .collect();
        for column in columns {
            let cells = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT CAST(\"{column}\" AS BLOB) AS v FROM \"{table}\""
            )))
            .fetch_all(pool)
            .await
            .expect("read cells");
            for (i, row) in cells.iter().enumerate() {
                if let Some(v) = row.get::<Option<Vec<u8>>, _>("v") {
                    out.push((format!("sqlite {table}.{column} row {i}"), v));
                }
            }
        }
    }
    out
}

/// A PostgreSQL schema of its own, dropped when this goes away; `url`
/// connects with it as the search path.
pub(crate) struct PgSchema {
    pub url: String,
    pub name: String,
    _drop: OnDrop,
}

pub(crate) async fn postgres_schema() -> PgSchema {
    let base = postgres_url();
    let schema = format!("sg_suite_{}", Uuid::now_v7().simple());
    let admin = sqlx::PgPool::connect(&base).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL at {base} does not answer ({e}); run scripts/services.sh or set SG_TEST_POSTGRES_URL"
        )
    });
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(&admin)
        .await
        .expect("create a schema");
    admin.close().await;
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
    let name = schema.clone();
    let drop = OnDrop(Some(Box::new(move || {
        block_on_side(async move {
            if let Ok(admin) = sqlx::PgPool::connect(&base).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                )))
                .execute(&admin)
                .await;
                admin.close().await;
            }
        })
    })));
    PgSchema {
        url,
        name,
        _drop: drop,
    }
}

/// A PostgreSQL tier in a schema of its own, dropped with the fixture.
async fn postgres_durable() -> DurablePart {
    let schema = postgres_schema().await;
    let settings = PoolSettings {
        max_connections: 4,
        min_connections: 0,
        acquire_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
    };
    let tier = PostgresTier::connect(&schema.url, &settings)
        .await
        .expect("open the PostgreSQL tier");
    let pool = tier.pool().clone();
    let dump_schema = schema.name.clone();
    let at_rest: AtRest = Arc::new(move || {
        let pool = pool.clone();
        let schema = dump_schema.clone();
        Box::pin(async move { postgres_at_rest(&pool, &schema).await })
    });
    DurablePart {
        tier: Arc::new(tier),
        at_rest,
        keep: vec![OnDrop(Some(Box::new(move || drop(schema))))],
    }
}

/// Every cell of every table in `schema`: byte columns as stored, the
/// others as text.
async fn postgres_at_rest(pool: &sqlx::PgPool, schema: &str) -> Vec<(String, Vec<u8>)> {
    let columns = sqlx::query(
        "SELECT table_name::text AS t, column_name::text AS c, data_type::text AS ty \
         FROM information_schema.columns WHERE table_schema = $1 ORDER BY t, c",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .expect("list columns");
    assert!(
        columns
            .iter()
            .any(|r| r.get::<String, _>("t") == "sessions"),
        "no sessions table in {schema}"
    );
    let mut out = Vec::new();
    for row in columns {
        let (table, column, ty): (String, String, String) =
            (row.get("t"), row.get("c"), row.get("ty"));
        let sql = if ty == "bytea" {
            format!("SELECT \"{column}\" AS v FROM \"{schema}\".\"{table}\"")
        } else {
            format!(
                "SELECT convert_to(\"{column}\"::text, 'UTF8') AS v FROM \"{schema}\".\"{table}\""
            )
        };
        let cells = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(pool)
            .await
            .expect("read cells");
        for (i, cell) in cells.iter().enumerate() {
            if let Some(v) = cell.get::<Option<Vec<u8>>, _>("v") {
                out.push((format!("postgres {table}.{column} row {i}"), v));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Running every check against every pair.
// ---------------------------------------------------------------------------

macro_rules! store_pair {
    ($pair:ident: $fast:ident, $durable:ident) => {
        mod $pair {
            fn factory() -> super::BoxFuture<super::Fixture> {
                Box::pin(async {
                    super::Fixture::from_parts(super::$fast().await, super::$durable().await).await
                })
            }
            store_pair!(@checks
                create_then_lookup,
                lookup_of_unknown_key_is_none,
                durable_only_session_is_restored_into_fast_tier,
                evicted_session_is_restored_into_fast_tier,
                session_created_already_expired_is_never_returned,
                expired_durable_session_is_not_returned_or_restored,
                session_is_not_returned_once_it_expires,
                revoke_removes_from_both_tiers_once,
                revoke_id_removes_from_both_tiers,
                revoke_user_revokes_only_that_users_sessions,
                revocations_count_live_sessions_only,
                list_user_is_newest_first_and_live_only,
                get_by_id_returns_live_sessions_only,
                update_extends_expiry_in_both_tiers,
                activity_is_seen_at_once_and_durable_after_flush,
                revoked_session_is_not_revived_by_activity_or_restore,
                stale_fast_tier_data_is_cleared_before_it_is_trusted,
                unknown_key_is_asked_of_the_durable_tier_once,
                concurrent_misses_share_a_durable_query,
                fast_tier_outage_costs_speed_not_availability,
                revocation_during_fast_tier_outage_holds_when_it_returns,
                durable_tier_outage_keeps_cached_sessions_and_refuses_writes,
                sweep_deletes_expired_rows_only,
                secret_is_stored_once,
                attributes_round_trip,
                no_raw_token_at_rest,
                lookups_are_counted_by_tier_and_outcome,
            );
        }
    };
    (@checks $($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                super::$check(factory).await;
            }
        )*
    };
}

store_pair!(memory_sqlite: memory_fast, sqlite_durable);
store_pair!(memory_postgres: memory_fast, postgres_durable);
store_pair!(redis_sqlite: redis_fast, sqlite_durable);
store_pair!(redis_postgres: redis_fast, postgres_durable);
store_pair!(layered_redis_postgres: layered_redis_fast, postgres_durable);

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

fn key() -> TokenKey {
    TokenKey::new(b"store-suite-test-key-0123456789abcdef")
}

fn session(user: &str, ttl: Duration) -> Session {
    Session::new(user.to_string(), BTreeMap::new(), ttl)
}

/// A session that expired `ago` before now.
fn expired_session(user: &str, ago: Duration) -> Session {
    let now = now_ms();
    let ago = ago.as_millis() as i64;
    Session {
        id: Uuid::now_v7(),
        user_id: user.to_string(),
        created_at: now - ago - 60_000,
        last_seen_at: now - ago - 60_000,
        expires_at: now - ago,
        attributes: BTreeMap::new(),
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// Creates a live session for `user` through the store; returns its token,
/// key and the session as stored.
async fn create(store: &SessionStore, user: &str) -> (String, TokenHash, Session) {
    let (token, hash) = key().issue();
    let s = session(user, HOUR);
    let stored = store.create(&hash, s.clone()).await.expect("create");
    assert_eq!(*stored, s, "create returns the session it stored");
    (token, hash, s)
}

/// The live session the fast tier holds for `hash`, if any.
async fn in_fast(store: &SessionStore, hash: &TokenHash) -> Option<Session> {
    match store.fast().get(hash).await.expect("fast tier get") {
        Cached::Live(s) => Some((*s).clone()),
        Cached::Miss | Cached::Revoked => None,
    }
}

async fn in_durable(store: &SessionStore, hash: &TokenHash) -> Option<Session> {
    store.durable().get(hash).await.expect("durable tier get")
}

async fn lookup(store: &SessionStore, hash: &TokenHash) -> Option<Session> {
    store
        .lookup(hash)
        .await
        .expect("lookup")
        .map(|s| (*s).clone())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn assert_metric(text: &str, line: &str) {
    assert!(
        text.lines().any(|l| l == line),
        "missing `{line}` in:\n{text}"
    );
}

// ---------------------------------------------------------------------------
// The checks.
// ---------------------------------------------------------------------------

async fn create_then_lookup(new: Factory) {
    let fx = new().await;
    let (_, hash, s) = create(&fx.store, "alice").await;
    assert_eq!(lookup(&fx.store, &hash).await, Some(s.clone()));
    // A new session is durable and cached.
    assert_eq!(in_durable(&fx.store, &hash).await, Some(s.clone()));
    assert_eq!(in_fast(&fx.store, &hash).await, Some(s));
}

async fn lookup_of_unknown_key_is_none(new: Factory) {
    let fx = new().await;
    create(&fx.store, "alice").await;
    let (_, unknown) = key().issue();
    assert_eq!(lookup(&fx.store, &unknown).await, None);
    assert_eq!(in_fast(&fx.store, &unknown).await, None);
    assert_eq!(lookup(&fx.store, &unknown).await, None, "asked twice");
}

async fn durable_only_session_is_restored_into_fast_tier(new: Factory) {
    let fx = new().await;
    let (_, hash) = key().issue();
    let s = session("bob", HOUR);
    fx.store.durable().insert(&hash, &s).await.expect("insert");
    assert_eq!(in_fast(&fx.store, &hash).await, None);

    assert_eq!(lookup(&fx.store, &hash).await, Some(s.clone()));
    assert_eq!(
        in_fast(&fx.store, &hash).await,
        Some(s),
        "a session found in the durable tier is restored into the fast tier"
    );
}

async fn evicted_session_is_restored_into_fast_tier(new: Factory) {
    let fx = new().await;
    let (_, hash, s) = create(&fx.store, "bob").await;
    fx.store.fast().remove(&[hash]).await.expect("remove");
    assert_eq!(in_fast(&fx.store, &hash).await, None);

    assert_eq!(lookup(&fx.store, &hash).await, Some(s.clone()));
    assert_eq!(in_fast(&fx.store, &hash).await, Some(s));
}

async fn session_created_already_expired_is_never_returned(new: Factory) {
    let fx = new().await;
    let (_, hash) = key().issue();
    let s = expired_session("carol", Duration::from_secs(5));
    fx.store.create(&hash, s.clone()).await.expect("create");
    assert_eq!(lookup(&fx.store, &hash).await, None);
    assert_eq!(fx.store.get_by_id(s.id).await.expect("get_by_id"), None);
    assert!(
        fx.store
            .list_user("carol")
            .await
            .expect("list_user")
            .is_empty()
    );
    assert_eq!(in_fast(&fx.store, &hash).await, None);
}

async fn expired_durable_session_is_not_returned_or_restored(new: Factory) {
    let fx = new().await;
    let (_, hash) = key().issue();
    let s = expired_session("carol", Duration::from_millis(1));
    fx.store.durable().insert(&hash, &s).await.expect("insert");
    assert_eq!(lookup(&fx.store, &hash).await, None);
    assert_eq!(
        in_fast(&fx.store, &hash).await,
        None,
        "an expired session must not be restored into the fast tier"
    );
}

async fn session_is_not_returned_once_it_expires(new: Factory) {
    let fx = new().await;
    let (_, hash) = key().issue();
    let s = session("dave", Duration::from_millis(300));
    fx.store.create(&hash, s.clone()).await.expect("create");
    assert_eq!(lookup(&fx.store, &hash).await, Some(s.clone()));

    tokio::time::sleep(Duration::from_millis(450)).await;
    // Whichever tier answers, an expired session is not returned.
    assert_eq!(lookup(&fx.store, &hash).await, None);
    fx.store.fast().remove(&[hash]).await.expect("remove");
    assert_eq!(
        lookup(&fx.store, &hash).await,
        None,
        "from the durable tier"
    );
    assert_eq!(fx.store.get_by_id(s.id).await.expect("get_by_id"), None);
}

async fn revoke_removes_from_both_tiers_once(new: Factory) {
    let fx = new().await;
    let (_, hash, _) = create(&fx.store, "erin").await;
    let (_, other, other_session) = create(&fx.store, "erin").await;

    assert!(fx.store.revoke(&hash).await.expect("revoke"));
    assert_eq!(lookup(&fx.store, &hash).await, None);
    assert_eq!(in_fast(&fx.store, &hash).await, None);
    assert_eq!(in_durable(&fx.store, &hash).await, None);
    assert!(
        !fx.store.revoke(&hash).await.expect("second revoke"),
        "revoking twice answers false the second time"
    );
    // The other session of the same user is untouched.
    assert_eq!(lookup(&fx.store, &other).await, Some(other_session));
}

async fn revoke_id_removes_from_both_tiers(new: Factory) {
    let fx = new().await;
    let (_, hash, s) = create(&fx.store, "frank").await;
    assert!(fx.store.revoke_id(s.id).await.expect("revoke_id"));
    assert_eq!(lookup(&fx.store, &hash).await, None);
    assert_eq!(in_fast(&fx.store, &hash).await, None);
    assert_eq!(in_durable(&fx.store, &hash).await, None);
    assert!(!fx.store.revoke_id(s.id).await.expect("revoke_id again"));
    assert!(
        !fx.store
            .revoke_id(Uuid::now_v7())
            .await
            .expect("revoke_id unknown")
    );
}

async fn revoke_user_revokes_only_that_users_sessions(new: Factory) {
    let fx = new().await;
    let mut grace = Vec::new();
    for _ in 0..3 {
        grace.push(create(&fx.store, "grace").await.1);
    }
    let (_, heidi, heidi_session) = create(&fx.store, "heidi").await;
    // One of grace's sessions only in the durable tier.
    fx.store.fast().remove(&[grace[0]]).await.expect("remove");

    assert_eq!(fx.store.revoke_user("grace").await.expect("revoke_user"), 3);
    for hash in &grace {
        assert_eq!(lookup(&fx.store, hash).await, None);
        assert_eq!(in_fast(&fx.store, hash).await, None);
        assert_eq!(in_durable(&fx.store, hash).await, None);
    }
    assert_eq!(lookup(&fx.store, &heidi).await, Some(heidi_session));
    assert_eq!(fx.store.revoke_user("grace").await.expect("again"), 0);
    assert_eq!(fx.store.revoke_user("nobody").await.expect("nobody"), 0);
}

async fn revocations_count_live_sessions_only(new: Factory) {
    let fx = new().await;
    // An expired session that the sweeper has not deleted yet.
    let expired = expired_session("uri", Duration::from_secs(1));
    let (_, expired_key) = key().issue();
    fx.store
        .durable()
        .insert(&expired_key, &expired)
        .await
        .expect("insert");
    let (_, _, _) = create(&fx.store, "uri").await;
    assert_eq!(fx.store.list_user("uri").await.expect("list").len(), 1);

    assert!(
        !fx.store.revoke_id(expired.id).await.expect("revoke_id"),
        "an expired session, which get_by_id does not find, was \"revoked\""
    );
    assert!(
        !fx.store.revoke(&expired_key).await.expect("revoke"),
        "an expired session was \"revoked\""
    );
    assert_eq!(
        fx.store.revoke_user("uri").await.expect("revoke_user"),
        1,
        "the user had one live session"
    );
    assert_metric(&fx.metrics.render(), "sessiongate_sessions_revoked_total 1");
}

async fn list_user_is_newest_first_and_live_only(new: Factory) {
    let fx = new().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(create(&fx.store, "ivan").await.2.id);
        // Distinct creation times.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let (_, expired) = key().issue();
    fx.store
        .durable()
        .insert(&expired, &expired_session("ivan", Duration::from_secs(1)))
        .await
        .expect("insert expired");
    create(&fx.store, "judy").await;

    let listed: Vec<Uuid> = fx
        .store
        .list_user("ivan")
        .await
        .expect("list_user")
        .iter()
        .map(|s| s.id)
        .collect();
    ids.reverse();
    assert_eq!(listed, ids, "live sessions, newest first");
    assert!(fx.store.list_user("nobody").await.expect("list").is_empty());
}

async fn get_by_id_returns_live_sessions_only(new: Factory) {
    let fx = new().await;
    let (_, hash, s) = create(&fx.store, "ken").await;
    // Even when the fast tier has forgotten it.
    fx.store.fast().remove(&[hash]).await.expect("remove");
    assert_eq!(fx.store.get_by_id(s.id).await.expect("get_by_id"), Some(s));
    assert_eq!(
        fx.store.get_by_id(Uuid::now_v7()).await.expect("unknown"),
        None
    );
    let expired = expired_session("ken", Duration::from_secs(1));
    let (_, expired_hash) = key().issue();
    fx.store
        .durable()
        .insert(&expired_hash, &expired)
        .await
        .expect("insert");
    assert_eq!(fx.store.get_by_id(expired.id).await.expect("expired"), None);
}

async fn update_extends_expiry_in_both_tiers(new: Factory) {
    let fx = new().await;
    let (_, hash) = key().issue();
    let s = session("leo", Duration::from_secs(60));
    fx.store.create(&hash, s.clone()).await.expect("create");

    let now = now_ms();
    let touched = Session {
        last_seen_at: now + 5,
        expires_at: now + 7_200_000,
        ..s.clone()
    };
    fx.store
        .update(&hash, touched.clone())
        .await
        .expect("update");

    assert_eq!(lookup(&fx.store, &hash).await, Some(touched.clone()));
    assert_eq!(in_durable(&fx.store, &hash).await, Some(touched.clone()));
    // After the fast tier forgets it, the restored copy has the new expiry.
    fx.store.fast().remove(&[hash]).await.expect("remove");
    assert_eq!(lookup(&fx.store, &hash).await, Some(touched));
}

async fn activity_is_seen_at_once_and_durable_after_flush(new: Factory) {
    let fx = new().await;
    let (_, hash) = key().issue();
    let s = session("lena", Duration::from_secs(60));
    fx.store.create(&hash, s.clone()).await.expect("create");

    let now = now_ms();
    let active = Session {
        last_seen_at: now + 5,
        expires_at: now + 7_200_000,
        ..s.clone()
    };
    fx.store.record_activity(&hash, active.clone()).await;
    assert_eq!(
        lookup(&fx.store, &hash).await,
        Some(active.clone()),
        "activity is visible on the next lookup"
    );

    assert_eq!(fx.store.flush_activity().await.expect("flush"), 1);
    assert_eq!(in_durable(&fx.store, &hash).await, Some(active.clone()));
    assert_eq!(fx.store.flush_activity().await.expect("flush again"), 0);
    fx.store.fast().remove(&[hash]).await.expect("remove");
    assert_eq!(lookup(&fx.store, &hash).await, Some(active));
}

async fn revoked_session_is_not_revived_by_activity_or_restore(new: Factory) {
    let fx = new().await;
    let (_, hash, s) = create(&fx.store, "mallory").await;
    // Requests that looked the session up before it was revoked record
    // their activity, or restore the copy they read, afterwards.
    assert!(fx.store.revoke(&hash).await.expect("revoke"));
    let now = now_ms();
    let touched = Session {
        last_seen_at: now,
        expires_at: now + 3_600_000,
        ..s.clone()
    };
    let _ = fx.store.update(&hash, touched.clone()).await;
    assert_eq!(lookup(&fx.store, &hash).await, None, "after update");
    fx.store.record_activity(&hash, touched.clone()).await;
    let _ = fx.store.flush_activity().await;
    assert_eq!(lookup(&fx.store, &hash).await, None, "after activity");
    fx.store
        .fast()
        .restore(&hash, Arc::new(s))
        .await
        .expect("restore");
    assert_eq!(lookup(&fx.store, &hash).await, None, "after a late restore");
    assert_eq!(in_fast(&fx.store, &hash).await, None);
    assert_eq!(in_durable(&fx.store, &hash).await, None);
}

async fn stale_fast_tier_data_is_cleared_before_it_is_trusted(new: Factory) {
    let fx = new().await;
    let (_, hash, s) = create(&fx.store, "nick").await;
    assert!(fx.store.revoke(&hash).await.expect("revoke"));
    // The fast tier comes back with data from before the revocation (it was
    // unreachable when it happened, or restarted from an old snapshot).
    fx.store.fast().remove(&[hash]).await.expect("remove");
    fx.store
        .fast()
        .put(&hash, Arc::new(s))
        .await
        .expect("stale put");
    fx.store.distrust_fast();
    assert_eq!(lookup(&fx.store, &hash).await, None, "while untrusted");

    assert!(fx.store.recover_fast().await, "the fast tier answers");
    assert!(fx.store.fast_trusted());
    assert_eq!(
        in_fast(&fx.store, &hash).await,
        None,
        "recovery must replay the revocation into the fast tier"
    );
    assert_eq!(lookup(&fx.store, &hash).await, None);
}

async fn unknown_key_is_asked_of_the_durable_tier_once(new: Factory) {
    let fx = new().await;
    let (_, unknown) = key().issue();
    for _ in 0..50 {
        assert_eq!(lookup(&fx.store, &unknown).await, None);
    }
    assert_metric(
        &fx.metrics.render(),
        "sessiongate_durable_lookup_queries_total 1",
    );
    // A session created under a key the store remembered as unknown is
    // found at once.
    let (_, hash) = key().issue();
    assert_eq!(lookup(&fx.store, &hash).await, None);
    let s = session("olivia", HOUR);
    fx.store.create(&hash, s.clone()).await.expect("create");
    fx.store.fast().remove(&[hash]).await.expect("remove");
    assert_eq!(lookup(&fx.store, &hash).await, Some(s));
}

async fn concurrent_misses_share_a_durable_query(new: Factory) {
    let fx = new().await;
    let (_, hash, s) = create(&fx.store, "pat").await;
    fx.store.fast().remove(&[hash]).await.expect("remove");
    let lookups = (0..20).map(|_| fx.store.lookup(&hash));
    for found in futures_util::future::join_all(lookups).await {
        assert_eq!(found.expect("lookup").as_deref(), Some(&s));
    }
    let text = fx.metrics.render();
    let queries: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("sessiongate_durable_lookup_queries_total "))
        .unwrap_or_else(|| panic!("no durable query counter in:\n{text}"))
        .trim()
        .parse()
        .expect("a count");
    assert!(
        (1..20).contains(&queries),
        "20 concurrent misses for one token made {queries} durable queries"
    );
}

async fn fast_tier_outage_costs_speed_not_availability(new: Factory) {
    let fx = new().await;
    let (_, before, before_session) = create(&fx.store, "quinn").await;
    fx.fast_down.store(true, Ordering::SeqCst);

    assert_eq!(
        lookup(&fx.store, &before).await,
        Some(before_session.clone())
    );
    let (_, during) = key().issue();
    let s = session("quinn", HOUR);
    fx.store
        .create(&during, s.clone())
        .await
        .expect("create while the fast tier is down");
    assert_eq!(lookup(&fx.store, &during).await, Some(s.clone()));
    let (_, unknown) = key().issue();
    assert_eq!(lookup(&fx.store, &unknown).await, None);
    assert!(!fx.store.fast_trusted());
    let health = fx.store.health().await;
    assert!(
        health.iter().any(|t| t.tier == "fast" && !t.ok),
        "{health:?}"
    );
    assert!(
        health.iter().any(|t| t.tier == "durable" && t.ok),
        "{health:?}"
    );

    fx.fast_down.store(false, Ordering::SeqCst);
    assert!(fx.store.recover_fast().await);
    assert!(fx.store.fast_trusted());
    assert!(fx.store.health().await.iter().all(|t| t.ok));
    assert_eq!(lookup(&fx.store, &during).await, Some(s));
    assert_eq!(lookup(&fx.store, &before).await, Some(before_session));
}

async fn revocation_during_fast_tier_outage_holds_when_it_returns(new: Factory) {
    let fx = new().await;
    let (_, hash, _) = create(&fx.store, "rosa").await;
    let (_, by_id, by_id_session) = create(&fx.store, "rosa").await;
    let (_, by_user, _) = create(&fx.store, "sam").await;
    for h in [&hash, &by_id, &by_user] {
        assert!(in_fast(&fx.store, h).await.is_some());
    }

    fx.fast_down.store(true, Ordering::SeqCst);
    assert!(fx.store.revoke(&hash).await.expect("revoke while down"));
    assert!(
        fx.store
            .revoke_id(by_id_session.id)
            .await
            .expect("revoke_id while down")
    );
    assert_eq!(fx.store.revoke_user("sam").await.expect("revoke_user"), 1);
    for h in [&hash, &by_id, &by_user] {
        assert_eq!(lookup(&fx.store, h).await, None, "revoked while down");
    }

    // The fast tier comes back still holding the three live copies.
    fx.fast_down.store(false, Ordering::SeqCst);
    for h in [&hash, &by_id, &by_user] {
        assert!(in_fast(&fx.store, h).await.is_some(), "stale copy kept");
    }
    assert!(fx.store.recover_fast().await);
    for h in [&hash, &by_id, &by_user] {
        assert_eq!(
            in_fast(&fx.store, h).await,
            None,
            "recovery must apply the revocations made while it was down"
        );
        assert_eq!(lookup(&fx.store, h).await, None);
    }
}

async fn durable_tier_outage_keeps_cached_sessions_and_refuses_writes(new: Factory) {
    let fx = new().await;
    let (_, hash, s) = create(&fx.store, "tess").await;
    fx.durable_down.store(true, Ordering::SeqCst);

    assert_eq!(lookup(&fx.store, &hash).await, Some(s.clone()), "cached");
    let (_, new_key) = key().issue();
    let refused = fx.store.create(&new_key, session("tess", HOUR)).await;
    assert!(
        matches!(refused, Err(StoreError::Unavailable { .. })),
        "a session that is not durable must not be handed out: {refused:?}"
    );
    assert!(matches!(
        fx.store.revoke(&hash).await,
        Err(StoreError::Unavailable { .. })
    ));
    let (_, unknown) = key().issue();
    assert!(
        fx.store.lookup(&unknown).await.is_err(),
        "an unknown token cannot be answered without the durable tier"
    );
    let health = fx.store.health().await;
    assert!(
        health.iter().any(|t| t.tier == "durable" && !t.ok),
        "{health:?}"
    );

    fx.durable_down.store(false, Ordering::SeqCst);
    // The failed revoke changed nothing; the refused create left nothing.
    assert_eq!(lookup(&fx.store, &hash).await, Some(s));
    assert_eq!(lookup(&fx.store, &new_key).await, None);
    assert_eq!(fx.store.list_user("tess").await.expect("list").len(), 1);
}

async fn sweep_deletes_expired_rows_only(new: Factory) {
    let fx = new().await;
    let mut expired = Vec::new();
    for _ in 0..3 {
        let (_, hash) = key().issue();
        fx.store
            .durable()
            .insert(&hash, &expired_session("nina", Duration::from_secs(2)))
            .await
            .expect("insert");
        expired.push(hash);
    }
    let (_, live, live_session) = create(&fx.store, "nina").await;

    // A batch smaller than the work: the sweep keeps going until done.
    assert_eq!(fx.store.sweep(2).await.expect("sweep"), 3);
    for hash in &expired {
        assert_eq!(in_durable(&fx.store, hash).await, None);
    }
    assert_eq!(
        in_durable(&fx.store, &live).await,
        Some(live_session.clone())
    );
    assert_eq!(lookup(&fx.store, &live).await, Some(live_session));
    assert_eq!(fx.store.sweep(2).await.expect("sweep again"), 0);
    assert_metric(&fx.metrics.render(), "sessiongate_sessions_swept_total 3");
}

async fn secret_is_stored_once(new: Factory) {
    let fx = new().await;
    let durable = fx.store.durable();
    let first = durable
        .secret("token_mac_key", b"first-secret")
        .await
        .expect("secret");
    assert_eq!(first, b"first-secret");
    let second = durable
        .secret("token_mac_key", b"second-secret")
        .await
        .expect("secret again");
    assert_eq!(second, b"first-secret", "the stored secret wins");
    let other = durable
        .secret("other", b"other-secret")
        .await
        .expect("other secret");
    assert_eq!(other, b"other-secret", "secrets are per name");
}

async fn attributes_round_trip(new: Factory) {
    let fx = new().await;
    let attributes = BTreeMap::from([
        ("remember_me".to_string(), "true".to_string()),
        ("quote".to_string(), "she said \"hi\"; \\ ok".to_string()),
        ("unicode".to_string(), "Grüße, 東京 🎉".to_string()),
        ("empty".to_string(), String::new()),
    ]);
    let (_, hash) = key().issue();
    let s = Session::new("olga@example.com".into(), attributes.clone(), HOUR);
    fx.store.create(&hash, s.clone()).await.expect("create");
    assert_eq!(in_fast(&fx.store, &hash).await, Some(s.clone()));
    assert_eq!(lookup(&fx.store, &hash).await, Some(s.clone()));
    fx.store.fast().remove(&[hash]).await.expect("remove");
    assert_eq!(
        lookup(&fx.store, &hash).await,
        Some(s.clone()),
        "from durable"
    );
    let listed = fx.store.list_user("olga@example.com").await.expect("list");
    assert_eq!(listed, vec![s.clone()]);
    assert_eq!(fx.store.get_by_id(s.id).await.expect("get_by_id"), Some(s));
}

async fn no_raw_token_at_rest(new: Factory) {
    let fx = new().await;
    let mut tokens = Vec::new();
    for user in ["peggy", "peggy", "quentin", "rita"] {
        tokens.push(create(&fx.store, user).await);
    }
    // Updates, activity, restores and revocations write too.
    let now = now_ms();
    let (_, h0, s0) = &tokens[0];
    let later = Session {
        last_seen_at: now,
        expires_at: now + 7_200_000,
        ..s0.clone()
    };
    fx.store.update(h0, later.clone()).await.expect("update");
    fx.store.record_activity(h0, later).await;
    fx.store.flush_activity().await.expect("flush");
    let (_, h1, _) = &tokens[1];
    fx.store.fast().remove(&[*h1]).await.expect("remove");
    lookup(&fx.store, h1).await.expect("restored");
    let (_, h3, _) = &tokens[3];
    assert!(fx.store.revoke(h3).await.expect("revoke"));

    let dump = fx.dump_at_rest().await;
    assert!(!dump.is_empty(), "nothing at rest to inspect");
    for (i, (token, _, s)) in tokens.iter().enumerate() {
        // The dump sees the data: the public id is stored …
        if i != 3 {
            assert!(
                dump.iter().any(|(_, bytes)| {
                    contains(bytes, s.id.to_string().as_bytes()) || contains(bytes, s.id.as_bytes())
                }),
                "session {} not found at rest: the dump misses the data",
                s.id
            );
        }
        // … but never the token, in text or decoded form.
        let raw = URL_SAFE_NO_PAD.decode(token).expect("token is base64url");
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let hex_upper = hex.to_uppercase();
        let forms: [(&str, &[u8]); 5] = [
            ("token text", token.as_bytes()),
            ("decoded token", &raw),
            ("random part of the token", &raw[..32]),
            ("hex of the token", hex.as_bytes()),
            ("HEX of the token", hex_upper.as_bytes()),
        ];
        for (label, bytes) in dump.iter() {
            for (form, needle) in &forms {
                assert!(
                    !contains(bytes, needle),
                    "{form} of a session token found at rest in {label}"
                );
            }
        }
    }
}

async fn lookups_are_counted_by_tier_and_outcome(new: Factory) {
    let fx = new().await;
    let (_, hash, _) = create(&fx.store, "rupert").await;
    lookup(&fx.store, &hash).await.expect("fast hit");
    fx.store.fast().remove(&[hash]).await.expect("remove");
    lookup(&fx.store, &hash).await.expect("durable restore");
    let (_, unknown) = key().issue();
    assert_eq!(lookup(&fx.store, &unknown).await, None);
    assert!(fx.store.revoke(&hash).await.expect("revoke"));
    assert_eq!(lookup(&fx.store, &hash).await, None);

    let text = fx.metrics.render();
    for line in [
        r#"sessiongate_store_lookups_total{tier="fast",outcome="hit"} 1"#,
        r#"sessiongate_store_lookups_total{tier="fast",outcome="miss"} 2"#,
        r#"sessiongate_store_lookups_total{tier="fast",outcome="revoked"} 1"#,
        r#"sessiongate_store_lookups_total{tier="durable",outcome="hit"} 1"#,
        r#"sessiongate_store_lookups_total{tier="durable",outcome="miss"} 1"#,
        "sessiongate_durable_lookup_queries_total 2",
        "sessiongate_sessions_created_total 1",
        "sessiongate_sessions_revoked_total 1",
    ] {
        assert_metric(&text, line);
    }
    assert!(
        !text.contains(r#"outcome="error""#),
        "no lookup failed: {text}"
    );
}
