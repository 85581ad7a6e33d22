//! Many gateway instances on one Redis and one PostgreSQL: the replay of
//! the revocation log (who does it, what it announces), and a gateway that
//! starts while PostgreSQL is unreachable.
//!
//! The servers and gateways are `hybrid.rs`'s helpers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use sessiongate::metrics::Metrics;
use sessiongate::server;
use sessiongate::session::{Session, now_ms};
use sessiongate::store::layered::{LayeredTier, encode_batch};
use sessiongate::store::postgres::SWEEP_LOCK;
use sessiongate::store::redis::RedisTier;
use sessiongate::store::{DurableTier, SessionStore};
use sessiongate::token::TokenHash;

use crate::harness::{self, TestUpstream};
use crate::hybrid::{
    Gw, PgDb, RedisServer, SHARED_REDIS, TcpForwarder, admin_create, admin_delete, config, counter,
    pg_tier, prefix, redis_tier,
};

/// A store as one gateway instance builds it with a local cache: Redis
/// at `redis_url` under `prefix`, behind a local cache fed by Redis pub/sub.
fn cached_instance(redis_url: &str, prefix: &str, durable: Arc<dyn DurableTier>) -> SessionStore {
    let metrics = Arc::new(Metrics::new());
    let redis = Arc::new(redis_tier(redis_url, prefix));
    let fast = Arc::new(LayeredTier::with_invalidations(
        redis.clone(),
        redis,
        Duration::from_secs(60),
        10_000,
        metrics.local_cache.clone(),
    ));
    SessionStore::new(fast, durable, metrics)
}

async fn wait_subscribed(stores: &[&SessionStore]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stores
        .iter()
        .all(|s| s.metrics().local_cache.subscribed.get() == 1)
    {
        assert!(Instant::now() < deadline, "never subscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn random_key() -> TokenHash {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    TokenHash(bytes)
}

fn session(user: &str) -> Session {
    Session::new(user.into(), Default::default(), Duration::from_secs(600))
}

/// Issue 13: a replay used to announce every replayed hash to every
/// instance (N instances × the whole log). Now it announces nothing and
/// drops the replaying instance's own local cache once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_announces_nothing_and_drops_the_replaying_instances_local_cache() {
    const N: usize = 300;
    let db = PgDb::create().await;
    let prefix = prefix();
    let durable: Arc<dyn DurableTier> = Arc::new(pg_tier(&db.url()).await);
    let a = cached_instance(SHARED_REDIS, &prefix, durable.clone());
    let b = cached_instance(SHARED_REDIS, &prefix, durable);
    wait_subscribed(&[&a, &b]).await;

    let mut revoked = Vec::new();
    for i in 0..N {
        let key = random_key();
        a.create(&key, session(&format!("user{i}"))).await.unwrap();
        assert!(b.lookup(&key).await.unwrap().is_some(), "B caches it");
        revoked.push(key);
    }
    for key in &revoked {
        assert!(a.revoke(key).await.unwrap());
    }
    let published = &a.metrics().local_cache.invalidations_published;
    assert_eq!(published.get(), N as u64, "each revocation announced once");
    // A live session in A's local cache.
    let live = random_key();
    a.create(&live, session("carol")).await.unwrap();
    assert!(a.lookup(&live).await.unwrap().is_some());

    // A raw subscriber sees every message on the channel, from any instance.
    let client = redis::Client::open(SHARED_REDIS).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    let channel = format!("{prefix}invalidate");
    pubsub.subscribe(&channel).await.unwrap();

    let clears = a.metrics().local_cache.clears.get();
    a.distrust_fast();
    assert!(a.recover_fast().await, "replayed and trusted");
    assert_eq!(published.get(), N as u64, "the replay announced nothing");
    assert_eq!(
        a.metrics().local_cache.clears.get(),
        clears + 1,
        "A's local cache dropped once"
    );
    // Redis answers commands in order: a message published by the replay
    // would reach the raw subscriber before this one.
    let sentinel = encode_batch(&[random_key()]);
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("PUBLISH")
        .arg(&channel)
        .arg(&sentinel)
        .query_async::<i64>(&mut conn)
        .await
        .unwrap();
    let mut messages = pubsub.on_message();
    let first = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .expect("the sentinel arrives")
        .expect("subscribed");
    assert_eq!(
        first.get_payload_bytes(),
        &sentinel[..],
        "no batch message before the sentinel: the replay published nothing"
    );

    // A's local cache was emptied: with the live session's Redis key gone,
    // A asks PostgreSQL.
    redis::cmd("DEL")
        .arg(redis_tier(SHARED_REDIS, &prefix).key_for(&live))
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let queries = a.metrics().durable_queries.get();
    assert!(a.lookup(&live).await.unwrap().is_some());
    assert_eq!(
        a.metrics().durable_queries.get(),
        queries + 1,
        "not served from A's local cache"
    );
    // B has applied every message up to the sentinel.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.metrics().local_cache.invalidations_received.get() < N as u64 + 1 {
        assert!(Instant::now() < deadline, "B never received the sentinel");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for key in &revoked {
        assert!(a.lookup(key).await.unwrap().is_none());
        assert!(b.lookup(key).await.unwrap().is_none());
    }
    db.drop_db().await;
}

// ---------------------------------------------------------------------------
// Who replays the revocation log, and how much of it.
// ---------------------------------------------------------------------------

/// A store as one gateway instance builds it on plain Redis, untrusted
/// until its start replay (as `server::open_store` does).
fn redis_instance(redis_url: &str, prefix: &str, durable: Arc<dyn DurableTier>) -> SessionStore {
    let redis = RedisTier::connect(redis_url, prefix, Duration::from_millis(300)).expect("tier");
    let store = SessionStore::new(Arc::new(redis), durable, Arc::new(Metrics::new()));
    store.distrust_fast();
    store
}

/// `sessiongate_fast_tier_replays_total{kind}` of one instance.
fn replays(store: &SessionStore, kind: &str) -> f64 {
    counter(
        &store.metrics().render(),
        &format!("sessiongate_fast_tier_replays_total{{kind=\"{kind}\"}}"),
    )
}

fn replays_of(stores: &[SessionStore], kind: &str) -> f64 {
    stores.iter().map(|s| replays(s, kind)).sum()
}

/// Runs every instance's recovery at once, round after round (as their
/// maintenance loops do), until every one trusts the fast tier.
async fn recover_all(stores: &[SessionStore]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let trusted = join_all(stores.iter().map(|s| s.recover_fast())).await;
        if trusted.iter().all(|t| *t) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never trusted by all: {trusted:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 13: every instance used to replay the whole log for the same
/// event. Three instances on one Redis that restarts and comes back with
/// revoked sessions' old records (as a snapshot or a lagging replica from
/// before the revocations would hold them): exactly one replays the log,
/// the other two trust Redis once its mark is set, and no instance serves
/// a revoked session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_redis_gets_the_log_replayed_once_for_every_instance() {
    let mut redis = RedisServer::start(false).await;
    let db = PgDb::create().await;
    let durable: Arc<dyn DurableTier> = Arc::new(pg_tier(&db.url()).await);
    let prefix = prefix();
    let stores: Vec<SessionStore> = (0..3)
        .map(|_| redis_instance(&redis.url(), &prefix, durable.clone()))
        .collect();
    recover_all(&stores).await;
    assert_eq!(replays_of(&stores, "full"), 3.0, "each start replays");

    let keys: Vec<TokenHash> = (0..30).map(|_| random_key()).collect();
    for (i, key) in keys.iter().enumerate() {
        stores[i % 3]
            .create(key, session(&format!("user{i}")))
            .await
            .unwrap();
    }
    let redis_keys = redis_tier(&redis.url(), &prefix);
    let mut conn = redis.connection().await.unwrap();
    let (revoked, live) = keys.split_at(20);
    let mut stale = Vec::new();
    for (i, key) in revoked.iter().enumerate() {
        let record: Vec<u8> = redis::cmd("GET")
            .arg(redis_keys.key_for(key))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!record.is_empty());
        stale.push((redis_keys.key_for(key), record));
        assert!(stores[(i + 1) % 3].revoke(key).await.unwrap());
    }

    redis.restart().await;
    let mut conn = redis.connection().await.unwrap();
    for (key, record) in &stale {
        redis::cmd("SET")
            .arg(key)
            .arg(record)
            .arg("PX")
            .arg(600_000)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    recover_all(&stores).await;
    assert_eq!(
        replays_of(&stores, "full"),
        4.0,
        "exactly one instance replayed the log into the new server"
    );
    assert_eq!(
        replays_of(&stores, "skipped"),
        2.0,
        "the others relied on it"
    );
    for (key, _) in &stale {
        let record: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(record, None, "the revoked session's old record was deleted");
    }
    for store in &stores {
        assert!(store.fast_trusted());
        for key in revoked {
            assert!(store.lookup(key).await.unwrap().is_none(), "revoked");
        }
        for key in live {
            assert!(store.lookup(key).await.unwrap().is_some(), "live");
        }
    }
    db.drop_db().await;
}

/// A transient error (Redis unreachable from one instance, then back, the
/// same server): that instance writes only the revocation whose write
/// failed, at its next recovery; nothing replays the whole log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_transient_error_only_the_failed_revocation_is_written() {
    let redis = RedisServer::start(false).await;
    let link = TcpForwarder::start(&format!("127.0.0.1:{}", redis.port), Duration::ZERO).await;
    let db = PgDb::create().await;
    let durable: Arc<dyn DurableTier> = Arc::new(pg_tier(&db.url()).await);
    let prefix = prefix();
    // A reaches Redis through a link the test cuts; B directly.
    let a = redis_instance(&format!("redis://{}", link.addr), &prefix, durable.clone());
    let b = redis_instance(&redis.url(), &prefix, durable);
    let both = [a, b];
    recover_all(&both).await;
    let [a, b] = &both;
    let alice = random_key();
    a.create(&alice, session("alice")).await.unwrap();
    assert!(b.lookup(&alice).await.unwrap().is_some());

    link.cut();
    assert!(a.revoke(&alice).await.unwrap(), "revoked in PostgreSQL");
    assert!(!a.fast_trusted(), "A could not reach Redis");
    assert!(
        b.lookup(&alice).await.unwrap().is_some(),
        "the one window: B serves it while Redis is unreachable from A"
    );

    link.restore().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.recover_fast().await {
        assert!(Instant::now() < deadline, "A never trusted Redis again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(replays(a, "full"), 1.0, "only the start replay");
    assert_eq!(replays(a, "own"), 1.0);
    assert!(
        b.lookup(&alice).await.unwrap().is_none(),
        "A's failed write reached Redis at its recovery"
    );
    let mut conn = redis.connection().await.unwrap();
    let record: Vec<u8> = redis::cmd("GET")
        .arg(redis_tier(&redis.url(), &prefix).key_for(&alice))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(record, vec![0], "a tombstone");
    // B never failed: nothing to recover.
    assert!(b.recover_fast().await);
    assert_eq!(replays(b, "full") + replays(b, "own"), 1.0);
    db.drop_db().await;
}

/// Every gateway sweeps; a batch runs only under the sweep lock, so an
/// instance that finds another sweeping does nothing this round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_sweep_leaves_the_rows_to_the_instance_already_sweeping() {
    let db = PgDb::create().await;
    let tier = pg_tier(&db.url()).await;
    for i in 0..5 {
        let mut expired = session(&format!("user{i}"));
        expired.expires_at = now_ms() - 1_000;
        tier.insert(&random_key(), &expired).await.unwrap();
    }
    let pool = db.pool().await;
    let mut other = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(SWEEP_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    assert_eq!(tier.sweep_expired(now_ms(), 100).await.unwrap(), 0);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 5, "left to the instance holding the lock");
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(SWEEP_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    assert_eq!(tier.sweep_expired(now_ms(), 100).await.unwrap(), 5);
    drop(other);
    pool.close().await;
    db.drop_db().await;
}

// ---------------------------------------------------------------------------
// Starting while PostgreSQL is unreachable.
// ---------------------------------------------------------------------------

const TOKEN_SECRET: &str = "token_secret = \"instances-test-secret-0123456789abcdef\"";

/// Issue 13: a gateway whose token key does not come from the database
/// starts while PostgreSQL is unreachable, in the degraded mode of a
/// PostgreSQL lost while running, and recovers when it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_a_token_secret_starts_without_postgres_and_connects_when_it_answers() {
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let prefix = prefix();
    let store = format!(
        "redis_url = {SHARED_REDIS:?}\nredis_prefix = {prefix:?}\n\
         connect_timeout_ms = 300\nredis_retry_ms = 100"
    );
    // A, with PostgreSQL, makes a session, then stops.
    let a = Gw::start(config(&upstream, &db.url(), &store, TOKEN_SECRET)).await;
    let (alice, alice_id) = admin_create(&a, "alice").await;
    a.shutdown().await;

    // Nothing listens where B's PostgreSQL should be.
    let pg_addr = format!("127.0.0.1:{}", harness::free_port());
    let dead = db.url_via(&pg_addr);
    let refused = server::start(config(&upstream, &dead, &store, ""))
        .await
        .err()
        .expect("without session.token_secret the gateway refuses to start")
        .to_string();
    assert!(
        refused.contains("token MAC key is kept in the database")
            && refused.contains("session.token_secret"),
        "{refused}"
    );

    let b = Gw::start(config(&upstream, &dead, &store, TOKEN_SECRET)).await;
    assert_eq!(b.status("/", &alice).await, 200, "served from Redis");
    let body = harness::expect_error(b.login_response("bob").await, 503).await;
    assert_eq!(body["code"], "store_unavailable");
    let resp = admin_delete(&b, &format!("/v1/sessions/{alice_id}")).await;
    assert_eq!(resp.status(), 503, "a revocation needs PostgreSQL");
    let (status, body) = b.readyz().await;
    assert_eq!(status, 503);
    assert_eq!(body["down"], serde_json::json!(["postgres"]), "{body}");
    assert_eq!(b.status("/", &alice).await, 200, "still served");

    // PostgreSQL answers at that address.
    let link = TcpForwarder::start_on(&pg_addr, "127.0.0.1:5432", Duration::ZERO).await;
    b.wait_ready(Duration::from_secs(15)).await;
    let bob = b.login("bob").await;
    assert_eq!(b.status("/", &bob).await, 200, "creates work, no restart");
    let resp = admin_delete(&b, &format!("/v1/sessions/{alice_id}")).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(b.status("/", &alice).await, 401);
    // The start replay it owed ran once PostgreSQL answered.
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(
        &b.metrics().await,
        r#"sessiongate_fast_tier_replays_total{kind="full"}"#,
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "the owed replay never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.shutdown().await;
    drop(link);
    db.drop_db().await;
}

/// The same start on a database never migrated: the migrations run when
/// PostgreSQL answers (`store.migrate`, the default), before any query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_when_postgres_first_answers() {
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let pg_addr = format!("127.0.0.1:{}", harness::free_port());
    let gw = Gw::start(config(
        &upstream,
        &db.url_via(&pg_addr),
        "connect_timeout_ms = 300",
        TOKEN_SECRET,
    ))
    .await;
    assert_eq!(gw.readyz().await.0, 503);
    let link = TcpForwarder::start_on(&pg_addr, "127.0.0.1:5432", Duration::ZERO).await;
    gw.wait_ready(Duration::from_secs(15)).await;
    let token = gw.login("alice").await;
    assert_eq!(gw.status("/", &token).await, 200);
    let pool = db.pool().await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(applied >= 1);
    pool.close().await;
    gw.shutdown().await;
    drop(link);
    db.drop_db().await;
}

/// The election's record in Redis: held by one owner at a time, renewed
/// by its holder, taken over once it lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_claim_is_held_renewed_and_lapses() {
    use sessiongate::store::FastTier;
    let tier = redis_tier(SHARED_REDIS, &prefix());
    let lease = Duration::from_millis(300);
    assert!(tier.claim("replay:x", "a", lease).await.unwrap());
    assert!(
        !tier.claim("replay:x", "b", lease).await.unwrap(),
        "held by a"
    );
    assert!(tier.claim("replay:x", "a", lease).await.unwrap(), "renewed");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !tier.claim("replay:x", "b", lease).await.unwrap() {
        assert!(Instant::now() < deadline, "the claim never lapsed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !tier.claim("replay:x", "a", lease).await.unwrap(),
        "b took over"
    );
    assert!(!tier.marked("replayed:x").await.unwrap());
    tier.mark("replayed:x", lease).await.unwrap();
    assert!(tier.marked("replayed:x").await.unwrap());
}
