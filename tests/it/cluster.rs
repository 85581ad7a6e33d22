//! The Redis fast tier on a real 6-node Redis Cluster (3 primaries, 3
//! replicas) of each test's own ([`RedisCluster`]): keys on every primary,
//! per-slot revocations, the fingerprint over every primary, invalidations
//! across nodes, and the configuration of `store.redis_cluster_urls`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::Value;
use sessiongate::config::Config;

use crate::harness::{self, ADMIN_TOKEN, RedisCluster, TestUpstream};
use crate::hybrid::{
    Gw, PgDb, admin_create, admin_delete, config, counter, prefix, time_to_401, token_hash,
    wait_subscribed,
};

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
    let dir = tempfile::tempdir().unwrap();
    let upstream = TestUpstream::start().await;
    let prefix = prefix();
    let gw = Gw::start(config(
        &upstream,
        &harness::database_url(&dir),
        &cluster_store(&cluster.urls()[..1], &prefix, ""),
        "",
    ))
    .await;
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
    assert!(gw.running().gateway().store.fast_trusted());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_user_with_sessions_in_many_slots_leaves_tombstones_and_401s() {
    let cluster = RedisCluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let upstream = TestUpstream::start().await;
    let prefix = prefix();
    let gw = Gw::start(config(
        &upstream,
        &harness::database_url(&dir),
        &cluster_store(&cluster.urls(), &prefix, ""),
        "",
    ))
    .await;
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
    assert!(gw.running().gateway().store.fast_trusted());
    gw.shutdown().await;
}

/// The fingerprint covers every primary: a `CLUSTER FAILOVER` (no request
/// fails, so nothing else would tell) makes the gateway replay the
/// revocation log, which removes a revoked session that the promoted
/// replica still held (as one that missed the tombstone would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_changes_the_fingerprint_and_the_log_is_replayed() {
    let cluster = RedisCluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let upstream = TestUpstream::start().await;
    let prefix = prefix();
    let gw = Gw::start(config(
        &upstream,
        &harness::database_url(&dir),
        &cluster_store(&cluster.urls(), &prefix, "redis_retry_ms = 100"),
        "",
    ))
    .await;
    let store = gw.running().gateway().store.clone();
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

    // A (no local cache, so it announces nothing) revokes; B's copy stays
    // until a message says otherwise.
    let (token, id) = admin_create(&a, "erin").await;
    assert_eq!(b.status("/", &token).await, 200, "B caches the session");
    assert_eq!(
        admin_delete(&a, &format!("/v1/sessions/{id}"))
            .await
            .status(),
        204
    );
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
    let (token, id) = admin_create(&a, "erin").await;
    assert_eq!(b.status("/", &token).await, 200);
    assert_eq!(
        admin_delete(&a, &format!("/v1/sessions/{id}"))
            .await
            .status(),
        204
    );
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
    let dir = tempfile::tempdir().unwrap();
    let upstream = TestUpstream::start().await;
    let prefix = prefix();
    let mut config = config(
        &upstream,
        &harness::database_url(&dir),
        &cluster_store(&cluster.urls(), &prefix, "local_cache_ttl_ms = 60000"),
        "",
    );
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

/// A gateway whose only seed is lost subscribes through another node the
/// cluster knows of, and its invalidations keep arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_moves_to_a_known_node_when_the_only_seed_is_lost() {
    let mut cluster = RedisCluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let upstream = TestUpstream::start().await;
    let prefix = prefix();
    let channel = format!("{prefix}invalidate");
    let primaries = cluster.primaries();
    let seed = cluster.replica_of(primaries[0]).expect("a replica");
    let gw = Gw::start(config(
        &upstream,
        &harness::database_url(&dir),
        &cluster_store(
            &[cluster.node(seed).url()],
            &prefix,
            "local_cache_ttl_ms = 600000",
        ),
        "",
    ))
    .await;
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
    let dir = tempfile::tempdir().unwrap();
    let upstream = TestUpstream::start().await;
    let prefix = prefix();
    cluster.kill_all();
    let started = Instant::now();
    let gw = Gw::start(config(
        &upstream,
        &harness::database_url(&dir),
        &cluster_store(&cluster.urls(), &prefix, "redis_retry_ms = 100"),
        "",
    ))
    .await;
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
