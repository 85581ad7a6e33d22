//! The hot path, piece by piece: token verification, each store path of a
//! session lookup, one policy hook call, and the whole authentication step.
//!
//! Run with `cargo bench --bench hot_path` (Redis and PostgreSQL from
//! `scripts/services.sh` for the shared-store cases, plugins from
//! `scripts/build-plugins.sh`). Figures are in the README.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sessiongate::config::{OnError, PolicyConfig};
use sessiongate::metrics::Metrics;
use sessiongate::policy::{PolicyChain, RequestInfo};
use sessiongate::session::{Session, now_ms};
use sessiongate::store::memory::MemoryTier;
use sessiongate::store::postgres::{PoolSettings, PostgresTier};
use sessiongate::store::redis::RedisTier;
use sessiongate::store::sqlite::SqliteTier;
use sessiongate::store::{DurableTier, FastTier, SessionStore};
use sessiongate::token::TokenKey;

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const PG_BENCH: &str = "postgres://postgres@127.0.0.1:5432/sessiongate_bench";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn session() -> Session {
    let attributes = BTreeMap::from([("remember_me".to_string(), "false".to_string())]);
    Session::new(
        "alice@example.com".into(),
        attributes,
        Duration::from_secs(3600),
    )
}

fn tokens(c: &mut Criterion) {
    let key = TokenKey::new(b"0123456789abcdef0123456789abcdef");
    let (token, _) = key.issue();
    c.bench_function("token/verify_and_hash", |b| {
        b.iter(|| key.verify(std::hint::black_box(&token)).unwrap())
    });
    let forged = TokenKey::new(b"another key").issue().0;
    c.bench_function("token/reject_forged", |b| {
        b.iter(|| key.verify(std::hint::black_box(&forged)).unwrap_err())
    });
}

async fn pg_tier() -> Option<PostgresTier> {
    let admin = sqlx::PgPool::connect(PG_ADMIN).await.ok()?;
    let _ = sqlx::query("CREATE DATABASE sessiongate_bench")
        .execute(&admin)
        .await;
    let tier = PostgresTier::connect(
        PG_BENCH,
        &PoolSettings {
            max_connections: 4,
            min_connections: 1,
            acquire_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
        },
    )
    .await
    .ok()?;
    tier.migrate().await.ok()?;
    Some(tier)
}

fn lookups(c: &mut Criterion) {
    let rt = runtime();
    let metrics = Arc::new(Metrics::new());
    let key = TokenKey::new(b"k");

    // In-process fast tier (the embedded default).
    let dir = tempfile::tempdir().unwrap();
    let sqlite = rt.block_on(async {
        let url = format!("sqlite://{}/bench.db", dir.path().display());
        let t = SqliteTier::connect(&url, 4).await.unwrap();
        t.migrate().await.unwrap();
        t
    });
    let embedded = SessionStore::new(
        Arc::new(MemoryTier::new(100_000)),
        Arc::new(sqlite),
        metrics.clone(),
    );
    let (_, hash) = key.issue();
    rt.block_on(embedded.create(&hash, session())).unwrap();
    c.bench_function("lookup/in_process_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { embedded.lookup(&hash).await.unwrap().unwrap() })
    });

    let Some(pg) = rt.block_on(pg_tier()) else {
        eprintln!("PostgreSQL not reachable: skipping the Redis and PostgreSQL lookups");
        return;
    };
    let pg: Arc<dyn DurableTier> = Arc::new(pg);
    let redis: Arc<dyn FastTier> = {
        let _guard = rt.enter();
        Arc::new(
            RedisTier::connect(
                "redis://127.0.0.1:6379",
                "sessiongate-bench:",
                Duration::from_millis(500),
            )
            .unwrap(),
        )
    };
    let shared = SessionStore::new(redis.clone(), pg, metrics.clone());
    let (_, hash) = key.issue();
    rt.block_on(shared.create(&hash, session())).unwrap();
    c.bench_function("lookup/redis_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { shared.lookup(&hash).await.unwrap().unwrap() })
    });
    c.bench_function("lookup/postgres_fallback_with_restore", |b| {
        b.to_async(&rt).iter(|| async {
            // Includes the DEL that makes each lookup miss Redis.
            redis.remove(&[hash]).await.unwrap();
            shared.lookup(&hash).await.unwrap().unwrap()
        })
    });
}

fn policies(c: &mut Criterion) {
    let plugin = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/activity-refresh.wasm");
    if !plugin.exists() {
        eprintln!("{} missing: run scripts/build-plugins.sh", plugin.display());
        return;
    }
    let chain = PolicyChain::load(
        &[PolicyConfig {
            plugin,
            config_json: r#"{"idle_timeout_seconds":1800,"absolute_lifetime_seconds":86400}"#
                .into(),
            on_error: OnError::Deny,
            timeout: Duration::from_millis(20),
            memory_bytes: 16 << 20,
        }],
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let s = session();
    let request = RequestInfo {
        method: "GET".into(),
        path: "/app/dashboard".into(),
        host: "app.example".into(),
        client_addr: "127.0.0.1".into(),
        user_agent: "bench".into(),
    };
    c.bench_function("policy/access_hook_one_plugin", |b| {
        b.iter(|| chain.on_access(&s, &request, now_ms()))
    });

    // The whole authentication step: verify the token, look it up in the
    // embedded store, run the access hook.
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = rt.block_on(async {
        let url = format!("sqlite://{}/auth.db", dir.path().display());
        let t = SqliteTier::connect(&url, 4).await.unwrap();
        t.migrate().await.unwrap();
        SessionStore::new(
            Arc::new(MemoryTier::new(100_000)),
            Arc::new(t),
            Arc::new(Metrics::new()),
        )
    });
    let key = TokenKey::new(b"0123456789abcdef0123456789abcdef");
    let (token, hash) = key.issue();
    rt.block_on(store.create(&hash, session())).unwrap();
    c.bench_function("auth/verify_lookup_policy", |b| {
        b.to_async(&rt).iter(|| async {
            let hash = key.verify(&token).unwrap();
            let s = store.lookup(&hash).await.unwrap().unwrap();
            chain.on_access(&s, &request, now_ms())
        })
    });
}

criterion_group!(benches, tokens, lookups, policies);
criterion_main!(benches);
