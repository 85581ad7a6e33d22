//! Many gateway instances on one Redis and one PostgreSQL: the replay of
//! the revocation log (who does it, what it announces), and a gateway that
//! starts while PostgreSQL is unreachable.
//!
//! The servers and gateways are `hybrid.rs`'s helpers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sessiongate::metrics::Metrics;
use sessiongate::session::Session;
use sessiongate::store::layered::{LayeredTier, encode_batch};
use sessiongate::store::{DurableTier, SessionStore};
use sessiongate::token::TokenHash;

use crate::hybrid::{PgDb, SHARED_REDIS, pg_tier, prefix, redis_tier};

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
