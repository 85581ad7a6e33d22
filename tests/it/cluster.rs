//! The Redis fast tier on a real 6-node Redis Cluster (3 primaries, 3
//! replicas) of each test's own ([`RedisCluster`]): keys on every primary,
//! per-slot revocations, the fingerprint over every primary, invalidations
//! across nodes, and the configuration of `store.redis_cluster_urls`;
//! then faults under load through three gateways: `CLUSTER FAILOVER`, a
//! primary killed with SIGKILL, a live reshard, and the invalidation
//! channel's slot moving and its node dying.

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::Value;
use sessiongate::config::Config;

use crate::harness::{self, ADMIN_TOKEN, NodeLine, RedisCluster, TestUpstream};
use crate::hybrid::{
    Gw, PgDb, admin_create, admin_delete, config, counter, prefix, time_to_401, token_hash,
    wait_subscribed,
};

/// What a one-gateway test needs besides its cluster: an upstream, a
/// SQLite database and a key prefix of its own.
struct OneGateway {
    dir: tempfile::TempDir,
    upstream: TestUpstream,
    prefix: String,
}

impl OneGateway {
    async fn new() -> OneGateway {
        OneGateway {
            dir: tempfile::tempdir().unwrap(),
            upstream: TestUpstream::start().await,
            prefix: prefix(),
        }
    }

    /// The gateway's config on the cluster `seeds`, with `extra` `[store]` keys.
    fn config(&self, seeds: &[String], extra: &str) -> Config {
        config(
            &self.upstream,
            &harness::database_url(&self.dir),
            &cluster_store(seeds, &self.prefix, extra),
            "",
        )
    }
}

/// `[store]` keys for a cluster fast tier under `prefix`, with `extra`.
fn cluster_store(seeds: &[String], prefix: &str, extra: &str) -> String {
    let seeds: Vec<String> = seeds.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "redis_cluster_urls = [{}]\nredis_prefix = {prefix:?}\n{extra}",
        seeds.join(", ")
    )
}

/// A cluster client of the test's own, to look at what the gateway wrote.
async fn cluster_conn(cluster: &RedisCluster) -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClient::new(cluster.urls())
        .expect("cluster client")
        .get_async_connection()
        .await
        .expect("cluster connection")
}

/// The Redis key of a token's session.
fn key_of(prefix: &str, token: &str) -> String {
    format!("{prefix}s:{}", harness::hex(&token_hash(token)))
}

/// The fast tier's lookups with `outcome` (`hit`, `miss`, `revoked`, `error`).
fn fast_lookups(metrics: &str, outcome: &str) -> f64 {
    counter(
        metrics,
        &format!("sessiongate_store_lookups_total{{tier=\"fast\",outcome=\"{outcome}\"}} "),
    )
}

/// `n` sessions of `user` made through the admin API, concurrently.
async fn create_many(gw: &Gw, user: &str, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(20) {
        let made =
            futures_util::future::join_all(chunk.iter().map(|_| admin_create(gw, user))).await;
        out.extend(made);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_over_every_primary_and_every_slot_is_served() {
    let cluster = RedisCluster::start().await;
    let one = OneGateway::new().await;
    let prefix = one.prefix.clone();
    let gw = Gw::start(one.config(&cluster.urls()[..1], "")).await;
    assert_eq!(gw.readyz().await.0, 200, "{:?}", gw.readyz().await.1);

    let sessions = create_many(&gw, "alice", 300).await;
    let mut per_primary = Vec::new();
    for port in cluster.primaries() {
        let n = cluster
            .cli(port, &["--scan", "--pattern", &format!("{prefix}s:*")])
            .lines()
            .count();
        per_primary.push((port, n));
    }
    println!("keys per primary (300 sessions): {per_primary:?}");
    assert_eq!(per_primary.len(), 3);
    assert_eq!(per_primary.iter().map(|p| p.1).sum::<usize>(), 300);
    for (port, n) in &per_primary {
        assert!(
            *n >= 50,
            "primary {port} holds {n} of 300 keys: {per_primary:?}"
        );
    }

    // Every token, whatever its slot, is served from the cluster: no
    // MOVED error ever reaches the store (it would distrust the tier).
    for (token, _) in &sessions {
        assert_eq!(gw.status("/", token).await, 200);
    }
    let metrics = gw.metrics().await;
    assert_eq!(fast_lookups(&metrics, "hit"), 300.0, "{metrics}");
    assert_eq!(fast_lookups(&metrics, "error"), 0.0, "{metrics}");
    assert!(gw.running().gateway().store().fast_trusted());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_user_with_sessions_in_many_slots_leaves_tombstones_and_401s() {
    let cluster = RedisCluster::start().await;
    let one = OneGateway::new().await;
    let prefix = one.prefix.clone();
    let gw = Gw::start(one.config(&cluster.urls(), "")).await;
    let sessions = create_many(&gw, "bob", 200).await;
    let keep = gw.login("carol").await;
    for (token, _) in &sessions {
        assert_eq!(gw.status("/", token).await, 200);
    }

    let started = Instant::now();
    let resp = gw
        .client
        .delete(gw.admin_url("/v1/users/bob/sessions"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["revoked"], 200);
    println!("revoking 200 sessions across slots took {took:?}");

    // Every key now holds the one-byte tombstone, on whichever primary
    // owns its slot.
    let mut conn = cluster_conn(&cluster).await;
    for (token, _) in &sessions {
        let value: Option<Vec<u8>> = conn.get(key_of(&prefix, token)).await.unwrap();
        assert_eq!(value.as_deref(), Some(&[0u8][..]), "a tombstone");
    }
    for (token, _) in &sessions {
        assert_eq!(gw.status("/", token).await, 401);
    }
    assert_eq!(gw.status("/", &keep).await, 200, "another user's session");
    let metrics = gw.metrics().await;
    assert_eq!(
        fast_lookups(&metrics, "revoked"),
        200.0,
        "each answered by its tombstone: {metrics}"
    );
    assert_eq!(fast_lookups(&metrics, "error"), 0.0, "{metrics}");
    assert_eq!(
        counter(&metrics, "sessiongate_fast_revocations_deferred_total "),
        0.0,
        "no revocation waited for a replay: {metrics}"
    );
    assert!(gw.running().gateway().store().fast_trusted());
    gw.shutdown().await;
}

/// The fingerprint covers every primary: a `CLUSTER FAILOVER` (no request
/// fails, so nothing else would tell) makes the gateway replay the
/// revocation log, which removes a revoked session that the promoted
/// replica still held (as one that missed the tombstone would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_changes_the_fingerprint_and_the_log_is_replayed() {
    let cluster = RedisCluster::start().await;
    let one = OneGateway::new().await;
    let prefix = one.prefix.clone();
    let gw = Gw::start(one.config(&cluster.urls(), "redis_retry_ms = 100")).await;
    let store = gw.running().gateway().store().clone();
    let before = store
        .fast()
        .instance_id()
        .await
        .unwrap()
        .expect("a fingerprint");
    assert_eq!(
        before.split(',').count(),
        3,
        "one entry per primary: {before}"
    );

    let (token, id) = admin_create(&gw, "dave").await;
    let key = key_of(&prefix, &token);
    let mut conn = cluster_conn(&cluster).await;
    let record: Vec<u8> = conn.get(&key).await.unwrap();
    assert_eq!(
        admin_delete(&gw, &format!("/v1/sessions/{id}"))
            .await
            .status(),
        204
    );
    assert_eq!(gw.status("/", &token).await, 401);
    // The tombstone lost: the live record is back, as on a replica that
    // was promoted before the tombstone reached it.
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&record)
        .arg("PX")
        .arg(600_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        gw.status("/", &token).await,
        200,
        "the precondition: a stale record is served while nothing tells"
    );

    let owner = cluster
        .primaries()
        .into_iter()
        .find(|&p| cluster.cli(p, &["EXISTS", &key]).trim() == "1")
        .expect("a primary holds the key");
    let replica = cluster.replica_of(owner).expect("the owner has a replica");
    let started = Instant::now();
    cluster.failover(replica).await;
    let promoted = started.elapsed();
    let replayed = time_to_401(&gw, &token, Duration::from_secs(10)).await;
    println!(
        "CLUSTER FAILOVER: promoted in {promoted:?}; the stale record refused {replayed:?} \
         after the promotion (redis_retry_ms = 100)"
    );
    cluster.wait_ok(Duration::from_secs(10)).await;
    let after = store
        .fast()
        .instance_id()
        .await
        .unwrap()
        .expect("a fingerprint");
    assert_ne!(before, after, "the fingerprint changed");
    let metrics = gw.metrics().await;
    assert_eq!(
        fast_lookups(&metrics, "error"),
        0.0,
        "no request failed: the fingerprint alone told: {metrics}"
    );
    assert!(
        cluster.primaries().contains(&replica),
        "the replica is a primary"
    );
    assert_eq!(
        cluster.cli(replica, &["EXISTS", &key]).trim(),
        "0",
        "the replay removed the stale record from the new primary"
    );
    gw.shutdown().await;
}

/// An invalidation published through one node reaches a gateway whose
/// subscription is on another (classic pub/sub crosses the cluster bus);
/// a subscription node that freezes (SIGSTOP: the connection stays open
/// and silent) is noticed by the missed heartbeat, and the gateway
/// resubscribes through another seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_cross_nodes_and_a_silent_subscription_node_is_left() {
    let cluster = RedisCluster::start().await;
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let prefix = prefix();
    let channel = format!("{prefix}invalidate");
    // B subscribes through a replica first (which no command needs), then
    // through the other seed.
    let primaries = cluster.primaries();
    let sub_node = cluster.replica_of(primaries[0]).expect("a replica");
    let other_seed = primaries[1];
    let publish_node = primaries[2];
    let a = Gw::start(config(
        &upstream,
        &db.url(),
        &cluster_store(&cluster.urls(), &prefix, ""),
        "",
    ))
    .await;
    let b = Gw::start(config(
        &upstream,
        &db.url(),
        &cluster_store(
            &[cluster.node(sub_node).url(), cluster.node(other_seed).url()],
            &prefix,
            "local_cache_ttl_ms = 600000",
        ),
        "",
    ))
    .await;
    wait_subscribed(&b, true).await;
    let subscribers = |port: u16| {
        cluster
            .cli(port, &["PUBSUB", "NUMSUB", &channel])
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    assert_eq!(subscribers(sub_node), 1, "B subscribed through {sub_node}");
    assert_eq!(subscribers(publish_node), 0);

    // A revocation whose announcement was lost: B's copy stays until a
    // message says otherwise.
    let (token, _) = admin_create(&a, "erin").await;
    assert_eq!(b.status("/", &token).await, 200, "B caches the session");
    revoke_unannounced(&cluster, &prefix, &token).await;
    assert_eq!(b.status("/", &token).await, 200, "B's copy, unannounced");
    publish_batch(&cluster, publish_node, &channel, &token);
    let delay = time_to_401(&b, &token, Duration::from_secs(2)).await;
    println!("an invalidation through {publish_node} reached B on {sub_node} in {delay:?}");

    // The subscription's node freezes: no reset, no close, nothing.
    let clears = counter(&b.metrics().await, "sessiongate_local_cache_clears_total ");
    cluster.pause(sub_node);
    let frozen = Instant::now();
    while subscribers(other_seed) == 0 {
        assert!(
            frozen.elapsed() < Duration::from_secs(10),
            "B never resubscribed through {other_seed}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back = frozen.elapsed();
    println!("a frozen subscription node: B resubscribed through another seed in {back:?}");
    assert!(
        back < Duration::from_secs(5),
        "within the heartbeat bound: {back:?}"
    );
    wait_subscribed(&b, true).await;
    let metrics = b.metrics().await;
    assert!(
        counter(&metrics, "sessiongate_local_cache_clears_total ") > clears,
        "resubscribing dropped the local cache: {metrics}"
    );
    assert_eq!(
        counter(
            &metrics,
            "sessiongate_local_cache_invalidation_malformed_total "
        ),
        0.0,
        "no heartbeat was read as a batch: {metrics}"
    );

    // Invalidations arrive again.
    let (token, _) = admin_create(&a, "erin").await;
    assert_eq!(b.status("/", &token).await, 200);
    revoke_unannounced(&cluster, &prefix, &token).await;
    assert_eq!(b.status("/", &token).await, 200, "B's copy, unannounced");
    publish_batch(&cluster, publish_node, &channel, &token);
    time_to_401(&b, &token, Duration::from_secs(2)).await;
    cluster.resume(sub_node);
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

/// With `server.worker_threads = 2` every worker's requests reach the
/// cluster (its connection lives on the runtime that opened the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_cluster_tier() {
    let cluster = RedisCluster::start().await;
    let one = OneGateway::new().await;
    let mut config = one.config(&cluster.urls(), "local_cache_ttl_ms = 60000");
    config.server.worker_threads = Some(2);
    let gw = Gw::start(config).await;
    let sessions = create_many(&gw, "hana", 40).await;
    // A fresh connection per request: the SO_REUSEPORT group spreads them
    // over both workers.
    let status = |token: String| {
        let url = gw.url("/");
        async move {
            harness::client()
                .get(url)
                .header("cookie", harness::cookie(&token))
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }
    };
    for (token, _) in &sessions {
        assert_eq!(status(token.clone()).await, 200);
    }
    let resp = gw
        .client
        .delete(gw.admin_url("/v1/users/hana/sessions"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for (token, _) in &sessions {
        assert_eq!(status(token.clone()).await, 401);
    }
    let metrics = gw.metrics().await;
    assert_eq!(fast_lookups(&metrics, "error"), 0.0, "{metrics}");
    for worker in 0..2 {
        assert!(
            counter(
                &metrics,
                &format!("sessiongate_worker_connections_total{{worker=\"{worker}\"}} ")
            ) > 0.0,
            "worker {worker} served connections: {metrics}"
        );
    }
    gw.shutdown().await;
}

/// A session key's slot and the invalidation channel's slot move to
/// other primaries (a live reshard's steps): lookups follow the key (no
/// error reaches the store), and a revocation's announcement still
/// reaches the other gateway (classic pub/sub does not depend on slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_invalidations_follow_moved_slots() {
    let cluster = RedisCluster::start().await;
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let prefix = prefix();
    let channel = format!("{prefix}invalidate");
    // A reads Redis on every lookup (its local cache lives 1 ms) but
    // announces its revocations; B keeps its copies until told.
    let a = Gw::start(config(
        &upstream,
        &db.url(),
        &cluster_store(&cluster.urls(), &prefix, "local_cache_ttl_ms = 1"),
        "",
    ))
    .await;
    let b = Gw::start(config(
        &upstream,
        &db.url(),
        &cluster_store(&cluster.urls(), &prefix, "local_cache_ttl_ms = 600000"),
        "",
    ))
    .await;
    wait_subscribed(&a, true).await;
    wait_subscribed(&b, true).await;
    let (token, id) = admin_create(&a, "judy").await;
    assert_eq!(a.status("/", &token).await, 200);
    assert_eq!(b.status("/", &token).await, 200, "B caches the session");

    let key = key_of(&prefix, &token);
    for name in [key.as_str(), channel.as_str()] {
        let slot = cluster.slot_of(name);
        let from = cluster.owner_of(slot);
        let to = cluster
            .primaries()
            .into_iter()
            .find(|&p| p != from)
            .unwrap();
        let started = Instant::now();
        let moved = cluster.move_slot(slot, to).await;
        println!(
            "slot {slot} of {name} moved from {from} to {to} ({moved} keys) in {:?}",
            started.elapsed()
        );
        assert_eq!(cluster.owner_of(slot), to);
    }
    assert_eq!(a.status("/", &token).await, 200, "the key followed");
    assert_eq!(
        admin_delete(&a, &format!("/v1/sessions/{id}"))
            .await
            .status(),
        204
    );
    assert_eq!(a.status("/", &token).await, 401);
    time_to_401(&b, &token, Duration::from_secs(1)).await;
    for gw in [&a, &b] {
        let metrics = gw.metrics().await;
        assert_eq!(fast_lookups(&metrics, "error"), 0.0, "{metrics}");
        assert_eq!(
            counter(
                &metrics,
                "sessiongate_local_cache_invalidation_publish_failures_total "
            ),
            0.0,
            "{metrics}"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

/// A healthy subscription is never dropped by its heartbeat: over 5 s
/// (five heartbeats) the local cache is not cleared again, and the
/// subscription's own heartbeat channel is the only one there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_subscription_keeps_its_cache() {
    let cluster = RedisCluster::start().await;
    let one = OneGateway::new().await;
    let prefix = one.prefix.clone();
    let gw = Gw::start(one.config(&cluster.urls(), "local_cache_ttl_ms = 600000")).await;
    wait_subscribed(&gw, true).await;
    let (token, _) = admin_create(&gw, "ivan").await;
    assert_eq!(gw.status("/", &token).await, 200);
    let clears = counter(&gw.metrics().await, "sessiongate_local_cache_clears_total ");
    let heartbeat_channels = || {
        cluster
            .nodes
            .iter()
            .flat_map(|n| {
                cluster
                    .cli(
                        n.port,
                        &[
                            "PUBSUB",
                            "CHANNELS",
                            &format!("{prefix}invalidate:heartbeat:*"),
                        ],
                    )
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(heartbeat_channels().len(), 1, "{:?}", heartbeat_channels());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let metrics = gw.metrics().await;
        assert_eq!(
            counter(&metrics, "sessiongate_local_cache_clears_total "),
            clears,
            "no resubscription: {metrics}"
        );
        assert_eq!(
            counter(&metrics, "sessiongate_local_cache_subscribed "),
            1.0
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let metrics = gw.metrics().await;
    assert_eq!(fast_lookups(&metrics, "miss"), 0.0, "{metrics}");
    gw.shutdown().await;
}

/// A gateway whose only seed is lost subscribes through another node the
/// cluster knows of, and its invalidations keep arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_moves_to_a_known_node_when_the_only_seed_is_lost() {
    let mut cluster = RedisCluster::start().await;
    let one = OneGateway::new().await;
    let prefix = one.prefix.clone();
    let channel = format!("{prefix}invalidate");
    let primaries = cluster.primaries();
    let seed = cluster.replica_of(primaries[0]).expect("a replica");
    let gw =
        Gw::start(one.config(&[cluster.node(seed).url()], "local_cache_ttl_ms = 600000")).await;
    wait_subscribed(&gw, true).await;
    let subscribed_on = |cluster: &RedisCluster| -> Vec<u16> {
        cluster
            .nodes
            .iter()
            .filter(|n| n.pid().is_some())
            .filter(|n| {
                cluster
                    .cli(n.port, &["PUBSUB", "NUMSUB", &channel])
                    .lines()
                    .nth(1)
                    .is_some_and(|c| c.trim() == "1")
            })
            .map(|n| n.port)
            .collect()
    };
    assert_eq!(subscribed_on(&cluster), vec![seed]);

    cluster.kill(seed);
    let killed = Instant::now();
    let moved_to = loop {
        if let [port] = subscribed_on(&cluster)[..] {
            break port;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "never subscribed elsewhere"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "the only seed killed: subscribed through {moved_to} after {:?}",
        killed.elapsed()
    );
    wait_subscribed(&gw, true).await;

    // A tombstone written behind the gateway's back (as by another
    // instance), announced through another node.
    let (token, _) = admin_create(&gw, "gina").await;
    assert_eq!(gw.status("/", &token).await, 200);
    let mut conn = cluster_conn(&cluster).await;
    let _: () = conn.set(key_of(&prefix, &token), &[0u8][..]).await.unwrap();
    assert_eq!(gw.status("/", &token).await, 200, "its local copy");
    let publish_node = primaries.iter().copied().find(|&p| p != moved_to).unwrap();
    publish_batch(&cluster, publish_node, &channel, &token);
    time_to_401(&gw, &token, Duration::from_secs(2)).await;
    gw.shutdown().await;
}

/// A gateway that starts while the whole cluster is down serves from the
/// durable tier, then finds the cluster through its seeds once it is back
/// (the cluster client connects lazily and again), replays the log and
/// serves from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_while_the_cluster_is_down_uses_it_once_it_is_up() {
    let mut cluster = RedisCluster::start().await;
    let one = OneGateway::new().await;
    let prefix = one.prefix.clone();
    cluster.kill_all();
    let started = Instant::now();
    let gw = Gw::start(one.config(&cluster.urls(), "redis_retry_ms = 100")).await;
    println!(
        "the gateway started in {:?} with the cluster down",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the start does not wait for the cluster"
    );
    let (status, body) = gw.readyz().await;
    assert_eq!(status, 503, "{body}");
    let token = gw.login("frank").await;
    assert_eq!(
        gw.status("/", &token).await,
        200,
        "served from the durable tier"
    );

    cluster.restart_all().await;
    gw.wait_ready(Duration::from_secs(15)).await;
    let before = fast_lookups(&gw.metrics().await, "hit");
    assert_eq!(gw.status("/", &token).await, 200);
    assert_eq!(gw.logout(&token).await, 200);
    assert_eq!(gw.status("/", &token).await, 401);
    let metrics = gw.metrics().await;
    assert!(
        fast_lookups(&metrics, "hit") > before,
        "served from the cluster again: {metrics}"
    );
    let mut conn = cluster_conn(&cluster).await;
    let value: Option<Vec<u8>> = conn.get(key_of(&prefix, &token)).await.unwrap();
    assert_eq!(value.as_deref(), Some(&[0u8][..]), "the logout's tombstone");
    gw.shutdown().await;
}

/// The tombstone of `token`'s session written straight into the cluster,
/// as by an instance whose announcement was lost: only a message tells a
/// local cache.
async fn revoke_unannounced(cluster: &RedisCluster, prefix: &str, token: &str) {
    let mut conn = cluster_conn(cluster).await;
    let _: () = conn.set(key_of(prefix, token), &[0u8][..]).await.unwrap();
}

/// `PUBLISH channel <batch of the token's hash>` through `redis-cli` on
/// the node on `port` (the batch is binary: `-x` reads it from stdin).
fn publish_batch(cluster: &RedisCluster, port: u16, channel: &str, token: &str) {
    use std::io::Write;
    let mut batch = vec![1u8];
    batch.extend(token_hash(token));
    let mut child = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-x",
            "PUBLISH",
            channel,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli runs");
    child.stdin.take().unwrap().write_all(&batch).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "PUBLISH through {port}");
    let _ = cluster;
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

fn store_config(store: &str) -> Result<Config, String> {
    let text = harness::GatewaySpec::standard("http://127.0.0.1:9")
        .to_toml("sqlite://sg.db", "127.0.0.1:0", "127.0.0.1:0")
        .replacen("[store]\n", &format!("[store]\n{store}\n"), 1);
    Config::from_toml_str(&text).map_err(|e| e.to_string())
}

#[test]
fn cluster_urls_are_checked() {
    let both = store_config(
        "redis_url = \"redis://127.0.0.1:6379\"\nredis_cluster_urls = [\"redis://127.0.0.1:7000\"]",
    )
    .unwrap_err();
    assert!(
        both.contains("store.redis_cluster_urls") && both.contains("store.redis_url"),
        "names both keys: {both}"
    );
    assert!(both.contains("mutually exclusive"), "{both}");

    let empty = store_config("redis_cluster_urls = []").unwrap_err();
    assert!(
        empty.contains("store.redis_cluster_urls") && empty.contains("at least one seed"),
        "{empty}"
    );

    let scheme = store_config("redis_cluster_urls = [\"http://127.0.0.1:7000\"]").unwrap_err();
    assert!(scheme.contains("redis:// or rediss://"), "{scheme}");

    let mixed = store_config(
        "redis_cluster_urls = [\"redis://127.0.0.1:7000\", \"rediss://127.0.0.1:7001\"]",
    )
    .unwrap_err();
    assert!(mixed.contains("mixes rediss:// and redis://"), "{mixed}");

    let insecure =
        store_config("redis_cluster_urls = [\"rediss://127.0.0.1:7000/#insecure\"]").unwrap_err();
    assert!(insecure.contains("#insecure"), "{insecure}");

    let tls_files = store_config(
        "redis_cluster_urls = [\"redis://127.0.0.1:7000\"]\nredis_ca_file = \"ca.pem\"",
    )
    .unwrap_err();
    assert!(
        tls_files.contains("store.redis_cluster_urls must start with rediss://"),
        "{tls_files}"
    );

    let ok = store_config(
        "redis_cluster_urls = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]\n\
         local_cache_ttl_ms = 100",
    )
    .unwrap();
    assert_eq!(ok.store.redis_cluster_urls.len(), 2);
    assert!(ok.store.redis_url.is_none());
    assert_eq!(
        ok.store.redacted_redis().as_deref(),
        Some("redis://127.0.0.1:7000,redis://127.0.0.1:7001")
    );
}

/// `SESSIONGATE_STORE__REDIS_CLUSTER_URLS` sets the key like any other
/// `[store]` key (checked by `sessiongate check`, a process of its own, so
/// no other test sees the variable).
#[test]
fn cluster_urls_come_from_the_environment_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let text = harness::GatewaySpec::standard("http://127.0.0.1:9").to_toml(
        &format!("sqlite://{}/sg.db", dir.path().display()),
        "127.0.0.1:0",
        "127.0.0.1:0",
    );
    std::fs::write(&path, &text).unwrap();
    let check = |value: &str, file: &str| {
        std::fs::write(
            &path,
            text.replacen("[store]\n", &format!("[store]\n{file}\n"), 1),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sessiongate"));
        for (name, _) in std::env::vars() {
            if name.starts_with("SESSIONGATE_") {
                cmd.env_remove(name);
            }
        }
        let out = cmd
            .args(["check", "--config", path.to_str().unwrap()])
            .env("SESSIONGATE_STORE__REDIS_CLUSTER_URLS", value)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = check(r#"["redis://127.0.0.1:7000","redis://127.0.0.1:7001"]"#, "");
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = check("[]", "");
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("SESSIONGATE_STORE__REDIS_CLUSTER_URLS")
            && stderr.contains("at least one seed"),
        "{stderr}"
    );
    let (code, stderr) = check(
        r#"["redis://127.0.0.1:7000"]"#,
        "redis_url = \"redis://127.0.0.1:6379\"",
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("mutually exclusive"), "{stderr}");
}

// ---------------------------------------------------------------------------
// Faults under load (issue 13, item 5): three gateways on one cluster and
// one PostgreSQL database, clients looping on all three while a replica
// takes over, a primary is killed or slots move, and revocations go
// through every gateway meanwhile. Every answer is recorded with when it
// was asked for and when it came, so each fault's failure window (first to
// last non-200, how many) is measured, bounded and printed
// ("FAILURE WINDOW ..." lines, quoted in BENCHMARKS.md).
// ---------------------------------------------------------------------------

/// Request loops per gateway while a fault runs.
const LOOPS_PER_GATEWAY: usize = 2;
/// Once the cluster is ok again, how long the gateways may take to use it
/// again (a `redis_retry_ms` tick, the fingerprint, a replay) before a
/// 503 counts as a failure.
const SETTLE: Duration = Duration::from_secs(3);
/// Sessions that stay valid through a fault, and sessions revoked under it.
const VALID: usize = 48;
const VICTIMS: usize = 16;
/// The third gateway's local cache lifetime: the contract lets it serve a
/// revoked session at most this long (the others: not at all).
const CACHE_TTL: Duration = Duration::from_secs(2);

/// One request of the load.
#[derive(Debug, Clone, Copy)]
struct Sample {
    gateway: usize,
    token: usize,
    sent: Instant,
    answered: Instant,
    /// 0: no HTTP answer (connection error, or no answer within 5 s).
    status: u16,
}

/// Clients looping on every gateway over `tokens`, until [`Load::stop`].
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
}

impl Load {
    fn start(urls: Vec<String>, tokens: Arc<Vec<String>>) -> Load {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for (gateway, url) in urls.into_iter().enumerate() {
            for lane in 0..LOOPS_PER_GATEWAY {
                let (url, tokens, stopped) = (url.clone(), tokens.clone(), stopped.clone());
                tasks.push(tokio::spawn(async move {
                    // A gateway answers within store.redis_timeout_ms plus
                    // PostgreSQL's time: 5 s means it hung.
                    let client = reqwest::Client::builder()
                        .no_proxy()
                        .timeout(Duration::from_secs(5))
                        .build()
                        .expect("client");
                    let mut samples = Vec::new();
                    let mut i = gateway * 7 + lane * 13;
                    while !*stopped.borrow() && samples.len() < 1_000_000 {
                        let token = i % tokens.len();
                        i += 1;
                        let sent = Instant::now();
                        let status = match client
                            .get(&url)
                            .header("cookie", harness::cookie(&tokens[token]))
                            .send()
                            .await
                        {
                            Ok(resp) => resp.status().as_u16(),
                            Err(_) => 0,
                        };
                        samples.push(Sample {
                            gateway,
                            token,
                            sent,
                            answered: Instant::now(),
                            status,
                        });
                    }
                    samples
                }));
            }
        }
        Load { stop, tasks }
    }

    /// Runs the load a moment: the fault then hits a gateway under way.
    async fn warm(&self) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    async fn stop(self) -> Vec<Sample> {
        let _ = self.stop.send(true);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.expect("load task"));
        }
        all.sort_by_key(|s| s.sent);
        all
    }
}

/// A revocation made through one gateway's admin API under load.
#[derive(Debug, Clone, Copy)]
struct Revoked {
    token: usize,
    via: usize,
    /// When `DELETE` answered 204. A 503 (PostgreSQL unreachable) tells
    /// the caller nothing was revoked: no instant is promised then.
    returned: Option<Instant>,
}

/// Revokes `victims` (index in the load's tokens, session id) through each
/// gateway in turn, `pause` apart.
async fn revoke_in_turn(gws: &[Gw], victims: &[(usize, String)], pause: Duration) -> Vec<Revoked> {
    let mut out = Vec::new();
    for (n, (token, id)) in victims.iter().enumerate() {
        let via = n % gws.len();
        let status = admin_delete(&gws[via], &format!("/v1/sessions/{id}"))
            .await
            .status()
            .as_u16();
        assert!(
            matches!(status, 204 | 503),
            "a revocation answered {status}: 204, or 503 when PostgreSQL is away"
        );
        out.push(Revoked {
            token: *token,
            via,
            returned: (status == 204).then(Instant::now),
        });
        tokio::time::sleep(pause).await;
    }
    out
}

/// What a fault did to the sessions that stayed valid.
struct Window {
    /// Their non-200 answers, in the order they were asked for.
    failures: Vec<Sample>,
    total: usize,
}

impl Window {
    /// Every answer to a session never revoked is 200 or 503: never a 500,
    /// never a 401, never none.
    fn of(samples: &[Sample], revoked: &[Revoked]) -> Window {
        let victims: HashSet<usize> = revoked.iter().map(|r| r.token).collect();
        let valid: Vec<&Sample> = samples
            .iter()
            .filter(|s| !victims.contains(&s.token))
            .collect();
        let failures: Vec<Sample> = valid
            .iter()
            .filter(|s| s.status != 200)
            .map(|s| **s)
            .collect();
        if let Some(bad) = failures.iter().find(|s| s.status != 503) {
            panic!(
                "a valid session got {} (only 200 or 503 may be answered): {bad:?}; {} non-200 in all",
                bad.status,
                failures.len()
            );
        }
        Window {
            failures,
            total: valid.len(),
        }
    }

    /// Prints the window, timed from `fault`.
    fn report(&self, what: &str, fault: Instant) {
        let span = match (self.failures.first(), self.failures.last()) {
            (Some(a), Some(b)) => format!(
                "from {:?} to {:?} after the fault ({:?})",
                a.sent.saturating_duration_since(fault),
                b.answered.saturating_duration_since(fault),
                b.answered.saturating_duration_since(a.sent)
            ),
            _ => "none".to_string(),
        };
        eprintln!(
            "FAILURE WINDOW [{what}]: {} of {} requests for valid sessions answered 503; non-200 {span}",
            self.failures.len(),
            self.total
        );
    }

    /// No 503 asked for after `settled`.
    fn assert_none_after(&self, settled: Instant, what: &str) {
        let late: Vec<&Sample> = self.failures.iter().filter(|s| s.sent > settled).collect();
        assert!(
            late.is_empty(),
            "{what}: {} answers 503 after the cluster was ok again plus {SETTLE:?}, the first {:?}",
            late.len(),
            late.first()
        );
    }
}

/// No revoked session served once its revocation answered: a 200 to a
/// request asked for after that, later than `grace(gateway)` (a local
/// cache's lifetime, the contract's bound for that gateway), fails.
/// Returns how many requests for revoked sessions were asked for after
/// their revocation answered (so that the check saw some), and the latest
/// 200 within a grace.
fn assert_no_grant_after_revocation(
    samples: &[Sample],
    revoked: &[Revoked],
    grace: impl Fn(usize) -> Duration,
) -> (usize, Option<Duration>) {
    let mut checked = 0;
    let mut latest_in_grace = None;
    for r in revoked {
        for s in samples.iter().filter(|s| s.token == r.token) {
            assert!(
                matches!(s.status, 200 | 401 | 503),
                "a session being revoked got {}: {s:?}",
                s.status
            );
            let Some(returned) = r.returned else { continue };
            if s.sent <= returned {
                continue;
            }
            checked += 1;
            let after = s.sent - returned;
            if s.status == 200 {
                assert!(
                    after <= grace(s.gateway),
                    "gateway {} served session {} (revoked through gateway {}) {after:?} after the revocation answered",
                    s.gateway,
                    r.token,
                    r.via,
                );
                latest_in_grace = latest_in_grace.max(Some(after));
            }
        }
    }
    (checked, latest_in_grace)
}

// ---------------------------------------------------------------------------
// The cluster as `CLUSTER NODES` tells it.
// ---------------------------------------------------------------------------

fn keyslot(cluster: &RedisCluster, port: u16, key: &str) -> u16 {
    let out = cluster.cli(port, &["CLUSTER", "KEYSLOT", key]);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT: {out}"))
}

/// The primary serving `slot`, as the node on `port` sees it.
fn owner_of(cluster: &RedisCluster, port: u16, slot: u16) -> NodeLine {
    cluster
        .nodes_seen_from(port)
        .into_iter()
        .find(|n| n.primary && n.serves(slot))
        .unwrap_or_else(|| panic!("no primary serves slot {slot}"))
}

/// Waits (bounded) until every node on `ports` (the running ones) says
/// `cluster_state:ok` and sees every slot on a primary among them that
/// has not failed: the fault is over for clients. Returns when.
async fn wait_cluster_ok(cluster: &RedisCluster, ports: &[u16], within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        let ok = ports.iter().all(|&port| {
            cluster
                .cli(port, &["CLUSTER", "INFO"])
                .contains("cluster_state:ok")
                && !cluster.nodes_seen_from(port).iter().any(|n| {
                    n.primary && !n.slots.is_empty() && (n.failed || !ports.contains(&n.port))
                })
        });
        if ok {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the cluster was not ok again within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Three gateways, one cluster, one database.
// ---------------------------------------------------------------------------

/// A cluster, a PostgreSQL database, an upstream, gateways on them, and
/// the sessions of the load, made through the gateways.
struct FaultEnv {
    cluster: RedisCluster,
    db: PgDb,
    upstream: TestUpstream,
    prefix: String,
    gateways: Vec<Gw>,
    /// Each gateway's local cache lifetime.
    caches: Vec<Option<Duration>>,
    /// The load's tokens: [`VALID`] sessions, then the [`VICTIMS`].
    tokens: Arc<Vec<String>>,
    /// (index in `tokens`, session id) of the sessions revoked under load.
    victims: Vec<(usize, String)>,
}

impl FaultEnv {
    /// Gateways with these local caches (`None`: one Redis lookup per
    /// request) and, with `load`, the load's sessions (each served by
    /// every gateway before the fault).
    async fn start(caches: &[Option<Duration>], load: bool) -> FaultEnv {
        let mut env = FaultEnv {
            cluster: RedisCluster::start().await,
            db: PgDb::create().await,
            upstream: TestUpstream::start().await,
            prefix: prefix(),
            gateways: Vec::new(),
            caches: Vec::new(),
            tokens: Arc::new(Vec::new()),
            victims: Vec::new(),
        };
        for &cache in caches {
            let gw = env.gateway(cache).await;
            env.gateways.push(gw);
        }
        if load {
            let mut tokens = Vec::new();
            for i in 0..VALID + VICTIMS {
                let via = &env.gateways[i % env.gateways.len()];
                let (token, id) = admin_create(via, &format!("user-{i}")).await;
                if i >= VALID {
                    env.victims.push((i, id));
                }
                tokens.push(token);
            }
            for gw in &env.gateways {
                for token in &tokens {
                    assert_eq!(gw.status("/", token).await, 200);
                }
            }
            env.tokens = Arc::new(tokens);
        }
        env
    }

    /// A gateway on the cluster (every node a seed) and the database,
    /// ready; not added to `gateways`.
    async fn gateway(&mut self, cache: Option<Duration>) -> Gw {
        let mut extra = "redis_retry_ms = 200\n".to_string();
        if let Some(ttl) = cache {
            extra.push_str(&format!("local_cache_ttl_ms = {}\n", ttl.as_millis()));
        }
        let gw = Gw::start(config(
            &self.upstream,
            &self.db.url(),
            &cluster_store(&self.cluster.urls(), &self.prefix, &extra),
            "",
        ))
        .await;
        gw.wait_ready(Duration::from_secs(10)).await;
        if cache.is_some() {
            wait_subscribed(&gw, true).await;
        }
        self.caches.push(cache);
        gw
    }

    fn urls(&self) -> Vec<String> {
        self.gateways.iter().map(|g| g.url("/")).collect()
    }

    /// How long after a revocation answered the contract lets `gateway`
    /// serve the session: its local cache's lifetime, else not at all.
    fn grace(&self, gateway: usize) -> Duration {
        self.caches[gateway].unwrap_or(Duration::ZERO)
    }

    /// The ports of the nodes still running.
    fn live_ports(&self) -> Vec<u16> {
        self.cluster
            .nodes
            .iter()
            .filter(|n| n.pid().is_some())
            .map(|n| n.port)
            .collect()
    }

    fn any_port(&self) -> u16 {
        self.live_ports()[0]
    }

    fn key(&self, token: &str) -> String {
        key_of(&self.prefix, token)
    }

    /// The primary holding `token`'s session key.
    fn owner_of_token(&self, token: &str) -> NodeLine {
        let any = self.any_port();
        owner_of(
            &self.cluster,
            any,
            keyslot(&self.cluster, any, &self.key(token)),
        )
    }

    fn replica_of(&self, primary_id: &str) -> NodeLine {
        self.cluster
            .nodes_seen_from(self.any_port())
            .into_iter()
            .find(|n| !n.primary && !n.failed && n.primary_id.as_deref() == Some(primary_id))
            .expect("the primary has a replica")
    }

    /// The sum over the gateways of a Prometheus counter line.
    async fn counter_sum(&self, line_prefix: &str) -> f64 {
        let mut sum = 0.0;
        for gw in &self.gateways {
            sum += counter(&gw.metrics().await, line_prefix);
        }
        sum
    }

    async fn finish(mut self) {
        for gw in self.gateways.drain(..) {
            gw.shutdown().await;
        }
        self.db.drop_db().await;
    }
}

/// After a node loss, a gateway trusts the cluster again once the
/// revocation log has been replayed into its new primaries, by one
/// instance for all; if that instance's replay fails half-way, the others
/// wait out its claim (`StoreOptions::replay_lease`, 30 s) first.
const READY_AGAIN: Duration = Duration::from_secs(45);

/// Waits (bounded by [`READY_AGAIN`]) until every gateway is ready;
/// returns how long the slowest took.
async fn wait_all_ready(gws: &[&Gw]) -> Duration {
    let start = Instant::now();
    for gw in gws {
        gw.wait_ready(READY_AGAIN.saturating_sub(start.elapsed()))
            .await;
    }
    start.elapsed()
}

/// Lookups answered by PostgreSQL: the fast tier skipped or failed.
const FALLBACKS: &str = "sessiongate_store_lookups_total{tier=\"durable\",outcome=\"hit\"} ";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_load_answers_200_or_503_and_revocations_hold() {
    let env = FaultEnv::start(&[None, None, Some(CACHE_TTL)], true).await;
    let gws = &env.gateways;
    let cluster = &env.cluster;

    // A revocation whose tombstone the cluster lost (asynchronous
    // replication): the live record put back behind the gateways' backs
    // is served again, until the replay a new fingerprint causes.
    let (lost, lost_id) = admin_create(&gws[0], "lost").await;
    let mut conn = cluster_conn(cluster).await;
    let record: Vec<u8> = conn.get(env.key(&lost)).await.unwrap();
    assert_eq!(
        admin_delete(&gws[1], &format!("/v1/sessions/{lost_id}"))
            .await
            .status(),
        204
    );
    let _: () = redis::cmd("SET")
        .arg(env.key(&lost))
        .arg(&record)
        .arg("PX")
        .arg(600_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    for gw in &gws[..2] {
        assert_eq!(gw.status("/", &lost).await, 200, "the lost tombstone");
    }

    let owner = env.owner_of_token(&lost);
    let replica = env.replica_of(&owner.id);
    let load = Load::start(env.urls(), env.tokens.clone());
    load.warm().await;
    let fallbacks = env.counter_sum(FALLBACKS).await;
    let fault = Instant::now();
    let out = cluster.cli(replica.port, &["CLUSTER", "FAILOVER"]);
    assert_eq!(out.trim(), "OK", "CLUSTER FAILOVER: {out}");
    let during = revoke_in_turn(gws, &env.victims[..VICTIMS / 2], Duration::from_millis(20)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while owner_of(
        cluster,
        replica.port,
        keyslot(cluster, replica.port, &env.key(&lost)),
    )
    .id != replica.id
    {
        assert!(Instant::now() < deadline, "the replica never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ok_at = wait_cluster_ok(cluster, &env.live_ports(), Duration::from_secs(10)).await;
    let settled = ok_at + SETTLE;
    tokio::time::sleep_until((settled + Duration::from_secs(1)).into()).await;
    let after = revoke_in_turn(gws, &env.victims[VICTIMS / 2..], Duration::from_millis(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = load.stop().await;
    let fallbacks = env.counter_sum(FALLBACKS).await - fallbacks;

    let revoked: Vec<Revoked> = during.iter().chain(&after).copied().collect();
    let window = Window::of(&samples, &revoked);
    window.report("CLUSTER FAILOVER", fault);
    eprintln!(
        "CLUSTER FAILOVER: cluster ok {:?} after the command; {fallbacks} lookups answered by \
         PostgreSQL; slowest answer {:?}",
        ok_at - fault,
        samples
            .iter()
            .map(|s| s.answered - s.sent)
            .max()
            .unwrap_or_default()
    );
    window.assert_none_after(settled, "CLUSTER FAILOVER");
    let (checked, in_grace) =
        assert_no_grant_after_revocation(&samples, &revoked, |g| env.grace(g));
    assert!(
        checked > 0,
        "the load asked for revoked sessions after their revocation"
    );
    eprintln!(
        "CLUSTER FAILOVER: {checked} requests for sessions after their revocation answered, none \
         served (but by the local cache within its lifetime: latest {in_grace:?})"
    );

    // The new primary changed the fingerprint: the gateways replayed the
    // revocation log, which removed the record put back.
    for gw in gws {
        time_to_401(gw, &lost, Duration::from_secs(5)).await;
    }
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_under_load_costs_only_its_slots_for_a_bounded_time() {
    let mut env = FaultEnv::start(&[None, None, Some(CACHE_TTL)], true).await;
    // The primary holding the most of the load's sessions dies.
    let mut by_primary: BTreeMap<String, HashSet<usize>> = BTreeMap::new();
    for (i, token) in env.tokens.iter().enumerate() {
        by_primary
            .entry(env.owner_of_token(token).id)
            .or_default()
            .insert(i);
    }
    assert_eq!(
        by_primary.len(),
        3,
        "the sessions spread over the three primaries"
    );
    let (dead_id, dead_tokens) = by_primary.into_iter().max_by_key(|(_, t)| t.len()).unwrap();
    let dead = env
        .cluster
        .nodes_seen_from(env.any_port())
        .into_iter()
        .find(|n| n.id == dead_id)
        .unwrap();
    let replica = env.replica_of(&dead_id);

    let load = Load::start(env.urls(), env.tokens.clone());
    load.warm().await;
    let fallbacks = env.counter_sum(FALLBACKS).await;
    let fault = Instant::now();
    env.cluster.kill(dead.port);
    // Revocations through every gateway while the dead primary's slots
    // have no primary (half of them on those slots, by chance).
    let during = revoke_in_turn(
        &env.gateways,
        &env.victims[..VICTIMS / 2],
        Duration::from_millis(100),
    )
    .await;
    let ok_at = wait_cluster_ok(&env.cluster, &env.live_ports(), Duration::from_secs(20)).await;
    assert!(
        env.cluster
            .nodes_seen_from(replica.port)
            .iter()
            .any(|n| n.id == replica.id && n.primary),
        "the dead primary's replica took over"
    );
    let settled = ok_at + SETTLE;
    tokio::time::sleep_until((settled + Duration::from_secs(1)).into()).await;
    let after = revoke_in_turn(
        &env.gateways,
        &env.victims[VICTIMS / 2..],
        Duration::from_millis(20),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = load.stop().await;
    let fallbacks = env.counter_sum(FALLBACKS).await - fallbacks;

    let revoked: Vec<Revoked> = during.iter().chain(&after).copied().collect();
    let window = Window::of(&samples, &revoked);
    window.report("primary SIGKILL", fault);
    eprintln!(
        "primary SIGKILL: replica promoted, cluster ok {:?} after the kill; {fallbacks} lookups \
         answered by PostgreSQL; slowest answer {:?}",
        ok_at - fault,
        samples
            .iter()
            .map(|s| s.answered - s.sent)
            .max()
            .unwrap_or_default()
    );
    let elsewhere: Vec<&Sample> = window
        .failures
        .iter()
        .filter(|s| !dead_tokens.contains(&s.token))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "{} non-200 for sessions on the primaries that stayed, the first {:?}",
        elsewhere.len(),
        elsewhere.first()
    );
    window.assert_none_after(settled, "primary SIGKILL");
    let (checked, in_grace) =
        assert_no_grant_after_revocation(&samples, &revoked, |g| env.grace(g));
    assert!(
        checked > 0,
        "the load asked for revoked sessions after their revocation"
    );
    eprintln!(
        "primary SIGKILL: {checked} requests for sessions after their revocation answered, none \
         served (but by the local cache within its lifetime: latest {in_grace:?})"
    );
    let ready = wait_all_ready(&env.gateways.iter().collect::<Vec<_>>()).await;
    eprintln!(
        "primary SIGKILL: every gateway ready (trusting the cluster) {ready:?} after the load stopped"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_reshard_under_load_answers_every_valid_session_200() {
    const SLOTS: usize = 1000;
    let env = FaultEnv::start(&[None, None, Some(CACHE_TTL)], true).await;
    let any = env.any_port();
    let primaries: Vec<NodeLine> = env
        .cluster
        .nodes_seen_from(any)
        .into_iter()
        .filter(|n| n.primary)
        .collect();
    let (from, to) = (primaries[0].clone(), primaries[1].clone());
    // redis-cli moves the source's first slots.
    let moving: HashSet<u16> = from
        .slots
        .iter()
        .flat_map(|&(a, b)| a..=b)
        .take(SLOTS)
        .collect();
    // Besides the load's sessions (a few of which move by chance), sessions
    // on the slots that move: 8 that stay valid, 4 revoked while they move.
    let mut tokens = (*env.tokens).clone();
    let mut victims: Vec<(usize, String)> = env.victims[..VICTIMS / 2].to_vec();
    let (mut movers, mut made) = (0, 0);
    while movers < 12 {
        assert!(made < 2_000, "no session key on the moving slots");
        let (token, id) = admin_create(&env.gateways[made % 3], &format!("mover-{made}")).await;
        made += 1;
        if !moving.contains(&keyslot(&env.cluster, any, &env.key(&token))) {
            continue;
        }
        if movers >= 8 {
            victims.push((tokens.len(), id));
        }
        tokens.push(token);
        movers += 1;
    }
    let owners_before: Vec<String> = tokens.iter().map(|t| env.owner_of_token(t).id).collect();

    let load = Load::start(env.urls(), Arc::new(tokens.clone()));
    load.warm().await;
    let fault = Instant::now();
    // 1,000 slots (6% of the key space) move from one primary to another
    // while revocations go through every gateway.
    let (from_id, to_id) = (from.id.clone(), to.id.clone());
    let resharding = tokio::task::spawn_blocking(move || {
        RedisCluster::reshard_by_id(any, &from_id, &to_id, SLOTS as u32)
    });
    let during = revoke_in_turn(&env.gateways, &victims, Duration::from_millis(20)).await;
    resharding.await.expect("reshard");
    let moved_in = fault.elapsed();
    let after = revoke_in_turn(
        &env.gateways,
        &env.victims[VICTIMS / 2..],
        Duration::from_millis(20),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let samples = load.stop().await;

    let moved = tokens
        .iter()
        .zip(&owners_before)
        .filter(|(t, before)| env.owner_of_token(t).id != **before)
        .count();
    let revoked: Vec<Revoked> = during.iter().chain(&after).copied().collect();
    let window = Window::of(&samples, &revoked);
    window.report("live reshard of 1000 slots", fault);
    eprintln!(
        "live reshard: {SLOTS} slots moved in {moved_in:?}, and {moved} of the load's {} sessions \
         with them",
        tokens.len()
    );
    assert!(
        moved >= movers,
        "the sessions on the moving slots moved: {moved}"
    );
    assert!(
        window.failures.is_empty(),
        "{} non-200 for valid sessions during the reshard, the first {:?}",
        window.failures.len(),
        window.failures.first()
    );
    let (checked, in_grace) =
        assert_no_grant_after_revocation(&samples, &revoked, |g| env.grace(g));
    assert!(
        checked > 0,
        "the load asked for revoked sessions after their revocation"
    );
    eprintln!(
        "live reshard: {checked} requests for sessions after their revocation answered, none \
         served (but by the local cache within its lifetime: latest {in_grace:?})"
    );
    env.finish().await;
}

/// That a revocation through `a` reaches `b`'s local cache by the
/// invalidation channel within `bound`: first that `b` answers from its
/// cache (a tombstone written behind its back does not stop it), then how
/// long until it turns away a session revoked through `a`.
async fn invalidation_reaches(env: &FaultEnv, a: &Gw, b: &Gw, bound: Duration) -> Duration {
    let (control, _) = admin_create(a, "control").await;
    // Twice: a first lookup that misses Redis restores from PostgreSQL
    // without caching.
    for _ in 0..2 {
        assert_eq!(b.status("/", &control).await, 200, "B caches the control");
    }
    let mut conn = cluster_conn(&env.cluster).await;
    let _: () = redis::cmd("SET")
        .arg(env.key(&control))
        .arg(&[0u8][..])
        .arg("PX")
        .arg(600_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        b.status("/", &control).await,
        200,
        "B answers from its cache"
    );
    let (token, id) = admin_create(a, "carol").await;
    for _ in 0..2 {
        assert_eq!(b.status("/", &token).await, 200, "B caches the session");
    }
    assert_eq!(
        admin_delete(a, &format!("/v1/sessions/{id}"))
            .await
            .status(),
        204,
        "revoked through A"
    );
    time_to_401(b, &token, bound).await
}

/// The ports of the nodes on which someone subscribes to `channel`
/// (`PUBSUB NUMSUB` counts the node's own clients only).
fn subscribed_nodes(cluster: &RedisCluster, ports: &[u16], channel: &str) -> Vec<u16> {
    ports
        .iter()
        .copied()
        .filter(|&port| {
            cluster
                .cli(port, &["PUBSUB", "NUMSUB", channel])
                .lines()
                .nth(1)
                .and_then(|n| n.trim().parse::<u32>().ok())
                .unwrap_or(0)
                > 0
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_keep_arriving_after_the_channel_slot_moves_and_its_node_is_killed() {
    let cache = Some(Duration::from_secs(600));
    let mut env = FaultEnv::start(&[], false).await;
    // B first, alone: the node it subscribes through is then known.
    let b = env.gateway(cache).await;
    let channel = format!("{}invalidate", env.prefix);
    let b_nodes = subscribed_nodes(&env.cluster, &env.live_ports(), &channel);
    assert_eq!(b_nodes.len(), 1, "B subscribes through one node");
    let a = env.gateway(cache).await;
    let bound = Duration::from_secs(1);
    let took = invalidation_reaches(&env, &a, &b, bound).await;
    eprintln!("invalidation: B turned away a session revoked on A after {took:?}");

    // The channel's slot moves to another primary. Classic pub/sub is not
    // bound to a slot (sharded pub/sub would lose its subscribers here).
    let any = env.any_port();
    let slot = keyslot(&env.cluster, any, &channel);
    let from = owner_of(&env.cluster, any, slot);
    let to = env
        .cluster
        .nodes_seen_from(any)
        .into_iter()
        .find(|n| n.primary && n.id != from.id)
        .unwrap();
    env.cluster.move_slot(slot, to.port).await;
    assert_eq!(
        owner_of(&env.cluster, any, slot).id,
        to.id,
        "the slot moved"
    );
    let took = invalidation_reaches(&env, &a, &b, bound).await;
    eprintln!("invalidation after the channel's slot {slot} moved: {took:?}");

    // The node B subscribes through is killed.
    let clears = counter(&b.metrics().await, "sessiongate_local_cache_clears_total ");
    let killed = Instant::now();
    env.cluster.kill(b_nodes[0]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&b.metrics().await, "sessiongate_local_cache_clears_total ") <= clears {
        assert!(Instant::now() < deadline, "B never dropped its cache");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_subscribed(&b, true).await;
    eprintln!(
        "invalidation: B's subscription node killed; B dropped its cache and resubscribed {:?} after",
        killed.elapsed()
    );
    let live = env.live_ports();
    wait_cluster_ok(&env.cluster, &live, Duration::from_secs(20)).await;
    assert!(!subscribed_nodes(&env.cluster, &live, &channel).is_empty());
    let ready = wait_all_ready(&[&a, &b]).await;
    eprintln!("invalidation: A and B ready again {ready:?} after the cluster was ok");
    let took = invalidation_reaches(&env, &a, &b, bound).await;
    eprintln!("invalidation after B's subscription node was killed: {took:?}");
    a.shutdown().await;
    b.shutdown().await;
    env.finish().await;
}
