//! The hot path, piece by piece: token verification, each store path of a
//! session lookup, one policy hook call, the whole authentication step,
//! the header rewriting, a whole request through the gateway's
//! service in-process (to an upstream on loopback), and path
//! normalization.
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
        100,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let s = Arc::new(session());
    let request = Arc::new(RequestInfo {
        method: "GET".into(),
        path: "/app/dashboard".into(),
        host: "app.example".into(),
        client_addr: "127.0.0.1".into(),
        user_agent: "bench".into(),
    });
    // The hook is async (it yields to the scheduler every
    // `engine::YIELD_FUEL` units of fuel): measured as the gateway runs it,
    // awaited on a tokio worker. The bundled plugin is built with the SDK
    // (interface 0.2.0: the times as arguments, no string read);
    // `legacy-v010` makes the same decision through interface 0.1.0 (every
    // string copied in), as every plugin did before 0.2.0.
    let rt = runtime();
    c.bench_function("policy/access_hook_one_plugin", |b| {
        b.to_async(&rt)
            .iter(|| chain.on_access(&s, &request, now_ms()))
    });
    let legacy = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/testing/legacy-v010.wasm");
    if legacy.exists() {
        let chain = PolicyChain::load(
            &[PolicyConfig {
                plugin: legacy,
                config_json: r#"{"idle_timeout_seconds":1800,"absolute_lifetime_seconds":86400}"#
                    .into(),
                on_error: OnError::Deny,
                timeout: Duration::from_millis(20),
                memory_bytes: 16 << 20,
            }],
            100,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        c.bench_function("policy/access_hook_one_plugin_v010", |b| {
            b.to_async(&rt)
                .iter(|| chain.on_access(&s, &request, now_ms()))
        });
    }

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
            chain.on_access(&s, &request, now_ms()).await
        })
    });

    // A plugin over its log rate: one call writes 200,000 lines of 1 KiB,
    // all but the first second's worth dropped. Divide by 200,000 for the
    // cost of a dropped line.
    let flood = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/testing/log-flood.wasm");
    if flood.exists() {
        let chain = PolicyChain::load(
            &[PolicyConfig {
                plugin: flood,
                config_json: "{}".into(),
                on_error: OnError::Deny,
                timeout: Duration::from_secs(10),
                memory_bytes: 16 << 20,
            }],
            1,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let mut group = c.benchmark_group("policy");
        group.sample_size(10);
        group.bench_function("log_flood_call_200k_lines_dropped", |b| {
            b.to_async(&rt)
                .iter(|| chain.on_access(&s, &request, now_ms()))
        });
        group.finish();
    }
}

/// What the engine's settings cost one access call, measured on wasmtime
/// directly (one reused instance; no pool, chain or tokio): fuel metering
/// on or off, a sync `call` or `call_async` (on a fiber), and the
/// gateway's combination (fuel, async, a fuel yield interval). The plugin
/// is the bundled 0.2.0 `activity-refresh`.
fn call_overhead(c: &mut Criterion) {
    use futures_util::FutureExt;
    use sessiongate::policy::bindings::v2::sessiongate::policy::{call, host, types};
    use wasmtime::component::{Component, HasSelf, Linker};

    struct Host;
    impl types::Host for Host {}
    impl host::Host for Host {
        fn log(&mut self, _: types::LogLevel, _: String) -> wasmtime::Result<()> {
            Ok(())
        }
    }
    impl call::Host for Host {
        fn request_method(&mut self) -> wasmtime::Result<String> {
            Ok(String::new())
        }
        fn request_path(&mut self) -> wasmtime::Result<String> {
            Ok(String::new())
        }
        fn request_host(&mut self) -> wasmtime::Result<String> {
            Ok(String::new())
        }
        fn client_addr(&mut self) -> wasmtime::Result<String> {
            Ok(String::new())
        }
        fn user_agent(&mut self) -> wasmtime::Result<String> {
            Ok(String::new())
        }
        fn session_id(&mut self) -> wasmtime::Result<String> {
            Ok(String::new())
        }
        fn user_id(&mut self) -> wasmtime::Result<String> {
            Ok(String::new())
        }
        fn session_attribute(&mut self, _: String) -> wasmtime::Result<Option<String>> {
            Ok(None)
        }
        fn session_attributes(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
            Ok(Vec::new())
        }
    }

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/activity-refresh.wasm");
    let Ok(module) = std::fs::read(&path) else {
        eprintln!("{} missing: run scripts/build-plugins.sh", path.display());
        return;
    };
    let bytes = wit_component::ComponentEncoder::default()
        .module(&module)
        .unwrap()
        .validate(true)
        .encode()
        .unwrap();
    let config_json = r#"{"idle_timeout_seconds":1800,"absolute_lifetime_seconds":86400}"#;
    let now = now_ms();
    let args = (now - 60_000, now - 1_000, now + 1_700_000, now);
    for (name, fuel, sync, yield_interval) in [
        ("sync_no_fuel", false, true, false),
        ("sync_fuel", true, true, false),
        ("async_no_fuel", false, false, false),
        ("async_fuel", true, false, false),
        ("async_fuel_yield_interval", true, false, true),
    ] {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        config.consume_fuel(fuel);
        config.concurrency_support(false);
        let engine = wasmtime::Engine::new(&config).unwrap();
        let component = Component::new(&engine, &bytes).unwrap();
        let mut linker: Linker<Host> = Linker::new(&engine);
        sessiongate::policy::bindings::v2::Policy::add_to_linker::<_, HasSelf<_>>(
            &mut linker,
            |h| h,
        )
        .unwrap();
        let mut store = wasmtime::Store::new(&engine, Host);
        store.set_epoch_deadline(1 << 40);
        if fuel {
            store.set_fuel(1 << 40).unwrap();
        }
        if yield_interval {
            store.fuel_async_yield_interval(Some(100_000)).unwrap();
        }
        let instance = linker
            .instantiate_async(&mut store, &component)
            .now_or_never()
            .unwrap()
            .unwrap();
        let init = instance
            .get_typed_func::<(&str,), (Result<types::Hooks, String>,)>(&mut store, "init")
            .unwrap();
        init.call_async(&mut store, (config_json,))
            .now_or_never()
            .unwrap()
            .unwrap()
            .0
            .unwrap();
        let on_access = instance
            .get_typed_func::<(i64, i64, i64, i64), (types::Access,)>(&mut store, "on-access")
            .unwrap();
        let id = format!("policy/raw_access_call_{name}");
        if sync {
            c.bench_function(&id, |b| {
                b.iter(|| on_access.call(&mut store, args).unwrap())
            });
        } else {
            c.bench_function(&id, |b| {
                b.iter(|| {
                    // As the gateway arms each call: a fresh slice, so an
                    // ordinary call never reaches a yield point.
                    if fuel {
                        store.set_fuel(1 << 40).unwrap();
                    }
                    let mut call = std::pin::pin!(on_access.call_async(&mut store, args));
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    loop {
                        if let std::task::Poll::Ready(r) = call.as_mut().poll(&mut cx) {
                            break r.unwrap();
                        }
                    }
                })
            });
        }
    }
}

/// Headers a browser sends to an app behind the gateway.
fn browser_headers(token: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in [
        ("host", "app.example"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("accept-language", "en-GB,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("connection", "keep-alive"),
        ("upgrade-insecure-requests", "1"),
    ] {
        h.insert(k, http::HeaderValue::from_static(v));
    }
    h.insert(
        http::header::COOKIE,
        http::HeaderValue::from_str(&format!("theme=dark; sg_session={token}; lang=en")).unwrap(),
    );
    h
}

/// An origin answering `ok` on a loopback port, served by `rt`.
fn origin(rt: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(http1::Builder::new().serve_connection(
                TokioIo::new(stream),
                service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                }),
            ));
        }
    });
    addr
}

fn gateway(c: &mut Criterion) {
    use http_body_util::{BodyExt, Empty};
    use sessiongate::config::Config;
    use sessiongate::policy::Policies;
    use sessiongate::proxy::{Gateway, Peer};

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root.join("plugins/activity-refresh.wasm").exists() {
        eprintln!("plugins missing: run scripts/build-plugins.sh");
        return;
    }
    // Current-thread, as `server.worker_threads = 1` runs the gateway.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let upstream = origin(&rt);
    let dir = tempfile::tempdir().unwrap();
    // gateway.toml's policy chain, as bundled.
    let reference = std::fs::read_to_string(root.join("gateway.toml")).unwrap();
    let policies = reference
        .split("\n[[")
        .filter(|section| section.starts_with("policies]]"))
        .map(|section| format!("\n[[{section}"))
        .collect::<String>()
        .replace(
            "plugin = \"plugins/",
            &format!("plugin = \"{}/plugins/", root.display()),
        );
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[store]
database_url = "sqlite://{}/gateway.db"
[session]
cookie_secure = false
[[upstreams]]
name = "origin"
urls = ["http://{upstream}"]
[[routes]]
prefix = "/"
upstream = "origin"
auth = "required"
{policies}"#,
        dir.path().display()
    );
    let config = Arc::new(Config::from_toml_str(&text).unwrap());
    let metrics = Arc::new(Metrics::new());
    let store = rt.block_on(async {
        let sqlite = SqliteTier::connect(&config.store.database_url, 2)
            .await
            .unwrap();
        sqlite.migrate().await.unwrap();
        SessionStore::new(
            Arc::new(MemoryTier::new(100_000)),
            Arc::new(sqlite),
            metrics.clone(),
        )
    });
    let chain = PolicyChain::load(
        &config.policies,
        config.plugins.log_lines_per_second,
        metrics.clone(),
    )
    .unwrap();
    let policies = Arc::new(Policies::new(
        chain,
        config.policies.clone(),
        None,
        config.plugins.log_lines_per_second,
        metrics.clone(),
    ));
    let gateway = Arc::new(Gateway::new(
        config,
        store,
        TokenKey::new(b"0123456789abcdef0123456789abcdef"),
        metrics,
        policies,
    ));
    let (token, _) = rt
        .block_on(gateway.create_session("alice@example.com".into(), BTreeMap::new(), None))
        .unwrap();
    let peer = Peer::new("192.0.2.7:50123".parse().unwrap());
    let headers = browser_headers(&token);

    c.bench_function("headers/rewrite_request", |b| {
        let uri: http::Uri = "/app/dashboard?tab=1".parse().unwrap();
        let id = http::HeaderValue::from_static("0190f5a6-7c1e-7a2b-9c3d-4e5f6a7b8c9d");
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                gateway
                    .forwarder()
                    .rewrite_request_headers(&mut h, &uri, &peer, &id, false)
                    .expect("no look-alike headers");
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });

    c.bench_function(
        "request/in_process_through_gateway_to_loopback_origin",
        |b| {
            b.to_async(&rt).iter(|| async {
                let mut req = http::Request::new(Empty::<bytes::Bytes>::new());
                *req.uri_mut() = "/app/dashboard".parse().unwrap();
                *req.headers_mut() = headers.clone();
                let resp = gateway.clone().handle(req, peer.clone()).await;
                assert_eq!(resp.status(), 200);
                // Reading the body to its end returns the upstream connection
                // to the pool, as hyper's server does.
                resp.into_body().collect().await.unwrap().to_bytes()
            })
        },
    );
}

/// Path normalization, on every request: the common clean path (one pass,
/// borrowed) and a dirty one (decoded, dot segments resolved, copied).
fn paths(c: &mut Criterion) {
    use sessiongate::path::normalize;
    let clean = "/app/dashboard/projects/1234/settings";
    c.bench_function("normalize/clean", |b| {
        b.iter(|| normalize(std::hint::black_box(clean)).unwrap())
    });
    let dirty = "/public/./x/..//%61pp/dashboard/%7euser/caf%c3%a9/../settings";
    c.bench_function("normalize/dirty", |b| {
        b.iter(|| normalize(std::hint::black_box(dirty)).unwrap())
    });
}

criterion_group!(
    benches,
    tokens,
    lookups,
    policies,
    call_overhead,
    gateway,
    paths
);
criterion_main!(benches);
