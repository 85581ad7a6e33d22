//! The hybrid store on real Redis and PostgreSQL, including the failure
//! cases: Redis stopped, restarted from its append-only file, flushed;
//! PostgreSQL unreachable (behind a TCP forwarder the test can cut).
//!
//! Each test gets its own PostgreSQL database and its own Redis key prefix
//! (or its own `redis-server` on its own port), so they run in parallel.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::StreamExt;
use serde_json::Value;
use sessiongate::config::Config;
use sessiongate::metrics::Metrics;
use sessiongate::server::{self, RunningGateway};
use sessiongate::session::Session;
use sessiongate::store::postgres::{PoolSettings, PostgresTier};
use sessiongate::store::redis::RedisTier;
use sessiongate::store::{Cached, DurableTier, SessionStore};
use sessiongate::token::TokenKey;
use sqlx::Row;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::harness::{self, ADMIN_TOKEN, COOKIE, GatewaySpec, TestUpstream};

pub(crate) const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub(crate) const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

// ---------------------------------------------------------------------------
// Servers the tests control.
// ---------------------------------------------------------------------------

/// A `redis-server` of the test's own on a loopback port, stopped by pid.
pub(crate) struct RedisServer {
    pub(crate) port: u16,
    dir: TempDir,
    aof: bool,
    child: Option<Child>,
}

impl RedisServer {
    pub(crate) async fn start(aof: bool) -> RedisServer {
        let mut server = RedisServer {
            port: harness::free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            aof,
            child: None,
        };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let appendonly = if self.aof { "yes" } else { "no" };
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", appendonly])
            .args(["--appendfsync", "always", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (is it installed? scripts/services.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut conn) = self.connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    /// Everything Redis wrote to its data directory.
    fn persisted(&self) -> Vec<u8> {
        fn walk(dir: &std::path::Path, out: &mut Vec<u8>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else if let Ok(bytes) = std::fs::read(&path) {
                    out.extend(bytes);
                }
            }
        }
        let mut out = Vec::new();
        walk(self.dir.path(), &mut out);
        out
    }

    /// Kills the server at once (as a crash would).
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data directory.
    pub(crate) async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A PostgreSQL database of the test's own.
pub(crate) struct PgDb {
    pub(crate) name: String,
}

impl PgDb {
    pub(crate) async fn create() -> PgDb {
        let name = format!("sg_test_{}", uuid::Uuid::now_v7().simple());
        let admin = sqlx::PgPool::connect(PG_ADMIN_URL)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (scripts/services.sh starts it)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        PgDb { name }
    }

    pub(crate) fn url(&self) -> String {
        self.url_via("127.0.0.1:5432")
    }

    pub(crate) fn url_via(&self, addr: &str) -> String {
        format!("postgres://postgres@{addr}/{}", self.name)
    }

    pub(crate) async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.url()).await.expect("connect")
    }

    pub(crate) async fn drop_db(self) {
        if let Ok(admin) = sqlx::PgPool::connect(PG_ADMIN_URL).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&admin)
            .await;
            admin.close().await;
        }
    }
}

/// A TCP forwarder in front of PostgreSQL that the test can cut and
/// restore, and slow down.
pub(crate) struct TcpForwarder {
    pub(crate) addr: SocketAddr,
    target: SocketAddr,
    delay: Duration,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpForwarder {
    pub(crate) async fn start(target: &str, delay: Duration) -> TcpForwarder {
        Self::start_on("127.0.0.1:0", target, delay).await
    }

    /// A forwarder listening on `listen` (a port a gateway already points
    /// at, where nothing listened until now).
    pub(crate) async fn start_on(listen: &str, target: &str, delay: Duration) -> TcpForwarder {
        // A client that was connecting to this free port (a gateway
        // retrying its database) can hold it for a moment by connecting to
        // itself (TCP simultaneous open on loopback): wait until it lets go.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(listen).await {
                Ok(listener) => break listener,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 200 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(e) => panic!("bind {listen}: {e}"),
            }
        };
        let forwarder = TcpForwarder {
            addr: listener.local_addr().expect("addr"),
            target: target.parse().expect("target address"),
            delay,
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        forwarder.serve(listener);
        forwarder
    }

    fn serve(&self, listener: TcpListener) {
        let tasks = self.tasks.clone();
        let (target, delay) = (self.target, self.delay);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let up = tokio::spawn(pump(cr, sw, Duration::ZERO));
                let down = tokio::spawn(pump(sr, cw, delay));
                tasks.lock().unwrap().extend([up, down]);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Refuses new connections and drops every open one.
    pub(crate) fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Accepts again on the same address.
    pub(crate) async fn restore(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "rebind {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.serve(listener);
    }
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Gateways and stores on those servers.
// ---------------------------------------------------------------------------

pub(crate) fn prefix() -> String {
    format!("sgtest-{}:", uuid::Uuid::now_v7().simple())
}

/// The harness's standard spec with `[store]` / `[session]` keys added.
pub(crate) fn config(
    upstream: &TestUpstream,
    database_url: &str,
    store: &str,
    session: &str,
) -> Config {
    let text = GatewaySpec::standard(&upstream.url())
        .cookie_secure(false)
        .to_toml(database_url, "127.0.0.1:0", "127.0.0.1:0")
        .replacen("[store]\n", &format!("[store]\n{store}\n"), 1)
        .replacen("[session]\n", &format!("[session]\n{session}\n"), 1);
    Config::from_toml_str(&text).unwrap_or_else(|e| panic!("config rejected: {e}\n{text}"))
}

pub(crate) struct Gw {
    pub(crate) running: Option<RunningGateway>,
    pub(crate) client: reqwest::Client,
}

impl Gw {
    pub(crate) async fn start(config: Config) -> Gw {
        let running = server::start(config)
            .await
            .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
        Gw {
            running: Some(running),
            client: harness::client(),
        }
    }

    pub(crate) fn running(&self) -> &RunningGateway {
        self.running.as_ref().expect("running")
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.running().addr(), path)
    }

    pub(crate) fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{}",
            self.running().admin_addr().expect("admin"),
            path
        )
    }

    pub(crate) async fn login_response(&self, user: &str) -> reqwest::Response {
        self.client
            .get(self.url(&format!("/public/login?user={user}")))
            .send()
            .await
            .expect("login request")
    }

    pub(crate) async fn login(&self, user: &str) -> String {
        let resp = self.login_response(user).await;
        assert_eq!(resp.status(), 200, "login");
        harness::set_cookie(resp.headers(), COOKIE)
            .expect("session cookie")
            .value
    }

    pub(crate) async fn status(&self, path: &str, token: &str) -> u16 {
        self.client
            .get(self.url(path))
            .header("cookie", harness::cookie(token))
            .send()
            .await
            .expect("request")
            .status()
            .as_u16()
    }

    pub(crate) async fn logout(&self, token: &str) -> u16 {
        self.status("/logout?scope=current", token).await
    }

    pub(crate) async fn readyz(&self) -> (u16, Value) {
        let resp = self
            .client
            .get(self.admin_url("/readyz"))
            .send()
            .await
            .expect("readyz");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("readyz JSON"))
    }

    pub(crate) async fn metrics(&self) -> String {
        self.client
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    pub(crate) async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (status, body) = self.readyz().await;
            if status == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "never ready again: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// The value of a counter line in Prometheus text, 0 if absent.
pub(crate) fn counter(metrics: &str, line_prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub(crate) async fn pg_tier(url: &str) -> PostgresTier {
    let tier = PostgresTier::connect(
        url,
        &PoolSettings {
            max_connections: 8,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
        },
    )
    .await
    .expect("postgres tier");
    tier.migrate().await.expect("migrate");
    tier
}

pub(crate) fn redis_tier(url: &str, prefix: &str) -> RedisTier {
    RedisTier::connect(url, prefix, Duration::from_millis(500)).expect("redis tier")
}

/// The session records and tombstones under `prefix` (not the replay
/// marks, `<prefix>replayed:<server>`).
pub(crate) async fn session_keys(url: &str, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut keys = redis_keys(url, prefix).await;
    keys.retain(|(key, _)| key.contains(":s:"));
    keys
}

/// Every key under `prefix`, with its value.
pub(crate) async fn redis_keys(url: &str, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for key in keys {
        let value: Vec<u8> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        out.push((key, value));
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_key_expires_with_its_session() {
    let db = PgDb::create().await;
    let prefix = prefix();
    let redis = Arc::new(redis_tier(SHARED_REDIS, &prefix));
    let store = SessionStore::new(
        redis.clone(),
        Arc::new(pg_tier(&db.url()).await),
        Arc::new(Metrics::new()),
    );
    let (_, key) = TokenKey::new(b"k").issue();
    let session = Session::new("alice".into(), Default::default(), Duration::from_secs(600));
    let expires_at = session.expires_at;
    store.create(&key, session).await.unwrap();

    let mut conn = redis::Client::open(SHARED_REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let expire_ms: i64 = redis::cmd("PEXPIRETIME")
        .arg(redis.key_for(&key))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        expire_ms, expires_at,
        "the Redis key expires exactly when the session does"
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_restored_into_redis_after_flushall() {
    let redis = RedisServer::start(false).await;
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let gw = Gw::start(config(
        &upstream,
        &db.url(),
        &format!("redis_url = {:?}", redis.url()),
        "",
    ))
    .await;
    let token = gw.login("alice").await;
    assert_eq!(session_keys(&redis.url(), "").await.len(), 1);

    let mut conn = redis.connection().await.unwrap();
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert!(session_keys(&redis.url(), "").await.is_empty());

    assert_eq!(gw.status("/", &token).await, 200, "served from PostgreSQL");
    let keys = session_keys(&redis.url(), "").await;
    assert_eq!(keys.len(), 1, "restored into Redis: {keys:?}");
    let metrics = gw.metrics().await;
    assert!(
        counter(
            &metrics,
            r#"sessiongate_store_lookups_total{tier="durable",outcome="hit"}"#
        ) >= 1.0,
        "{metrics}"
    );
    gw.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_served_from_postgres_while_redis_is_stopped() {
    let mut redis = RedisServer::start(false).await;
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let gw = Gw::start(config(
        &upstream,
        &db.url(),
        &format!(
            "redis_url = {:?}\nredis_timeout_ms = 200\nredis_retry_ms = 200",
            redis.url()
        ),
        "",
    ))
    .await;
    let alice = gw.login("alice").await;
    assert_eq!(gw.status("/", &alice).await, 200);

    redis.stop();
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(
            gw.status("/", &alice).await,
            200,
            "authenticated from PostgreSQL"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "requests do not each wait out a Redis timeout ({:?} for 20)",
        started.elapsed()
    );
    let bob = gw.login("bob").await;
    assert_eq!(gw.status("/", &bob).await, 200, "logins keep working");
    assert_eq!(gw.logout(&alice).await, 200, "revocations keep working");
    assert_eq!(gw.status("/", &alice).await, 401);

    let (status, body) = gw.readyz().await;
    assert_eq!(status, 503);
    assert_eq!(body["down"], serde_json::json!(["redis"]), "{body}");
    let metrics = gw.metrics().await;
    assert!(
        counter(
            &metrics,
            r#"sessiongate_store_lookups_total{tier="fast",outcome="skipped"}"#
        ) >= 1.0,
        "fallbacks are counted: {metrics}"
    );

    redis.restart().await;
    gw.wait_ready(Duration::from_secs(10)).await;
    assert_eq!(gw.status("/", &alice).await, 401);
    assert_eq!(gw.status("/", &bob).await, 200);
    gw.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_revoked_while_redis_was_down_stays_revoked_when_redis_returns_with_old_data() {
    let mut redis = RedisServer::start(true).await;
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let redis_url = redis.url();
    let cfg = || {
        config(
            &upstream,
            &db.url(),
            &format!("redis_url = {redis_url:?}\nredis_timeout_ms = 200\nredis_retry_ms = 300"),
            "",
        )
    };
    let gw = Gw::start(cfg()).await;
    let alice = gw.login("alice").await;
    let carol = gw.login("carol").await;
    assert_eq!(session_keys(&redis.url(), "").await.len(), 2);

    // Redis dies; alice logs out meanwhile.
    redis.stop();
    assert_eq!(gw.logout(&alice).await, 200);
    assert_eq!(gw.status("/", &alice).await, 401);

    // Redis comes back from its append-only file, alice's session in it.
    let alice_key = {
        use sha2::Digest;
        let raw = URL_SAFE_NO_PAD.decode(&alice).unwrap();
        format!("s:{}", harness::hex(&sha2::Sha256::digest(&raw)))
    };
    assert!(
        contains(&redis.persisted(), alice_key.as_bytes()),
        "the append-only file holds alice's session record"
    );
    redis.restart().await;
    // Whatever the gateway's recovery is doing, the token never works.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(gw.status("/", &alice).await, 401, "revoked token accepted");
        if gw.readyz().await.0 == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "Redis never trusted again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.status("/", &alice).await, 401);
    assert_eq!(gw.status("/", &carol).await, 200, "no session is lost");
    // The replay deleted alice's old record; the revocation whose write
    // failed while Redis was down is written (a tombstone) after it.
    for (key, value) in session_keys(&redis.url(), "").await {
        if key.ends_with(&alice_key) {
            assert_eq!(value, vec![0], "alice's old record is gone");
        }
    }

    // A gateway that never saw the outage, on the same stores, agrees.
    let second = Gw::start(cfg()).await;
    assert_eq!(second.status("/", &alice).await, 401);
    assert_eq!(second.status("/", &carol).await, 200);
    second.shutdown().await;
    gw.shutdown().await;
    db.drop_db().await;
}

/// Issue 13's reproduction: Redis restarts; gateway A's next lookup gets a
/// broken connection, so A distrusts Redis (for a long `redis_retry_ms`);
/// gateway B recovers at once and trusts Redis again, where alice's
/// session still is. A revocation made through A while A distrusts Redis
/// must still reach Redis: B refuses the token as soon as the revoke call
/// has answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_made_while_redis_is_distrusted_still_reaches_it() {
    let mut redis = RedisServer::start(true).await;
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let redis_url = redis.url();
    let cfg = |retry_ms: u64| {
        config(
            &upstream,
            &db.url(),
            &format!(
                "redis_url = {redis_url:?}\nredis_timeout_ms = 500\nredis_retry_ms = {retry_ms}"
            ),
            "",
        )
    };
    let a = Gw::start(cfg(600_000)).await;
    let b = Gw::start(cfg(100)).await;
    let (alice, alice_id) = admin_create(&a, "alice").await;
    assert_eq!(a.status("/", &alice).await, 200);
    assert_eq!(b.status("/", &alice).await, 200);

    redis.restart().await;
    // A: the broken connection makes it distrust Redis, for ten minutes.
    assert_eq!(a.status("/", &alice).await, 200, "served from PostgreSQL");
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.running().gateway().store().fast_trusted() {
        assert!(Instant::now() < deadline, "A never noticed the restart");
        assert_eq!(a.status("/", &alice).await, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B: trusts the restarted Redis again after its replay.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(b.status("/", &alice).await, 200);
        if b.readyz().await.0 == 200 && b.running().gateway().store().fast_trusted() {
            break;
        }
        assert!(Instant::now() < deadline, "B never trusted Redis again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !a.running().gateway().store().fast_trusted(),
        "A still distrusts Redis"
    );

    let resp = admin_delete(&a, &format!("/v1/sessions/{alice_id}")).await;
    assert_eq!(resp.status(), 204, "revoked through A");
    assert_eq!(
        b.status("/", &alice).await,
        401,
        "B, which trusts Redis, refuses the token as soon as the revoke call has answered"
    );
    assert_eq!(a.status("/", &alice).await, 401);
    b.shutdown().await;
    a.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_reads_work_and_creates_get_503() {
    let db = PgDb::create().await;
    let forwarder = TcpForwarder::start("127.0.0.1:5432", Duration::ZERO).await;
    let upstream = TestUpstream::start().await;
    let gw = Gw::start(config(
        &upstream,
        &db.url_via(&forwarder.addr.to_string()),
        &format!(
            "redis_url = {SHARED_REDIS:?}\nredis_prefix = {:?}\nconnect_timeout_ms = 500",
            prefix()
        ),
        "",
    ))
    .await;
    let alice = gw.login("alice").await;
    let admin = gw
        .client
        .get(gw.admin_url("/v1/users/alice/sessions"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let alice_id = admin["sessions"][0]["id"].as_str().unwrap().to_string();

    forwarder.cut();
    assert_eq!(gw.status("/", &alice).await, 200, "served from Redis");
    let resp = gw.login_response("bob").await;
    let body = harness::expect_error(resp, 503).await;
    assert_eq!(body["code"], "store_unavailable");
    let resp = gw
        .client
        .post(gw.admin_url("/v1/sessions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"user_id": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        503,
        "a session that is not durable is never handed out"
    );
    let resp = gw
        .client
        .delete(gw.admin_url(&format!("/v1/sessions/{alice_id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let (status, body) = gw.readyz().await;
    assert_eq!(status, 503);
    assert_eq!(body["down"], serde_json::json!(["postgres"]), "{body}");
    assert_eq!(gw.status("/", &alice).await, 200, "still served from Redis");

    forwarder.restore().await;
    gw.wait_ready(Duration::from_secs(10)).await;
    let bob = gw.login("bob").await;
    assert_eq!(gw.status("/", &bob).await, 200, "resumes without a restart");
    gw.shutdown().await;
    drop(forwarder);
    db.drop_db().await;
}

/// Runs `sql` on the admin connection (statements a test database cannot
/// run on itself, like `ALTER DATABASE`).
pub(crate) async fn pg_admin(sql: String) {
    let admin = sqlx::PgPool::connect(PG_ADMIN_URL)
        .await
        .expect("admin connection");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&admin)
        .await
        .expect("admin statement");
    admin.close().await;
}

/// What a PostgreSQL failover looks like from a gateway: its connections
/// terminated by the server (57P01), then a server that is read-only
/// (25006, a standby or a demoted primary). Each is a 503
/// `store_unavailable`, never a 500, sessions already made keep being
/// served, and once a writable primary is back, creates work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failover_errors_are_503_not_500() {
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let gw = Gw::start(config(
        &upstream,
        &db.url(),
        "connect_timeout_ms = 2000",
        "",
    ))
    .await;
    let alice = gw.login("alice").await;
    // A tier of the test's own on the same database, to see how its errors
    // are classified (the gateway's answers alone would not show it: every
    // store failure of a create is a 503 there).
    let tier = pg_tier(&db.url()).await;

    let terminate = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{}' AND pid <> pg_backend_pid()",
        db.name
    );
    pg_admin(format!(
        "ALTER DATABASE {} SET default_transaction_read_only = on",
        db.name
    ))
    .await;
    pg_admin(terminate.clone()).await;
    for attempt in 0..3 {
        // A write: the first on a terminated connection (57P01 or a closed
        // socket), the next ones on a read-only server (25006). Not the
        // sweep: it may find the gateway's own sweep holding its lock and
        // write nothing, successfully.
        let entry = (sessiongate::token::TokenHash([attempt; 32]), i64::MAX);
        match tier.record_revocations(&[entry]).await {
            Err(sessiongate::store::StoreError::Unavailable { .. }) => {}
            other => panic!("attempt {attempt}: a failover error is unavailability, got {other:?}"),
        }
    }
    for attempt in 0..4 {
        let resp = gw.login_response(&format!("bob{attempt}")).await;
        let body = harness::expect_error(resp, 503).await;
        assert_eq!(
            body["code"], "store_unavailable",
            "attempt {attempt}: {body}"
        );
    }
    assert_eq!(
        gw.status("/", &alice).await,
        200,
        "existing sessions are served"
    );

    pg_admin(format!(
        "ALTER DATABASE {} SET default_transaction_read_only = off",
        db.name
    ))
    .await;
    pg_admin(terminate).await;
    // The pool's connections were made read-only; new ones are writable.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = gw.login_response("carol").await.status();
        assert!(
            status == 200 || status == 503,
            "a failover answer is 503 or a login, got {status}"
        );
        if status != 503 {
            break;
        }
        assert!(Instant::now() < deadline, "creates never worked again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_session_make_one_query() {
    let db = PgDb::create().await;
    // A slow link to PostgreSQL keeps the first query in flight while the
    // others arrive.
    let forwarder = TcpForwarder::start("127.0.0.1:5432", Duration::from_millis(40)).await;
    let metrics = Arc::new(Metrics::new());
    let prefix = prefix();
    let store = SessionStore::new(
        Arc::new(redis_tier(SHARED_REDIS, &prefix)),
        Arc::new(pg_tier(&db.url_via(&forwarder.addr.to_string())).await),
        metrics.clone(),
    );
    let (_, key) = TokenKey::new(b"k").issue();
    let session = Session::new("alice".into(), Default::default(), Duration::from_secs(60));
    store.create(&key, session).await.unwrap();
    store.fast().remove(&[key]).await.unwrap();
    let before = metrics.durable_queries.get();

    let lookups = (0..200).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.lookup(&key).await })
    });
    for result in futures_util::future::join_all(lookups).await {
        assert!(result.unwrap().unwrap().is_some());
    }
    assert_eq!(
        metrics.durable_queries.get() - before,
        1,
        "200 concurrent cold lookups made one PostgreSQL query"
    );
    assert!(matches!(
        store.fast().get(&key).await.unwrap(),
        Cached::Live(_)
    ));
    drop(forwarder);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_unknown_tokens_cost_a_bounded_number_of_queries() {
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let gw = Gw::start(config(
        &upstream,
        &db.url(),
        &format!(
            "redis_url = {SHARED_REDIS:?}\nredis_prefix = {:?}",
            prefix()
        ),
        "",
    ))
    .await;
    let queries = |m: &str| counter(m, "sessiongate_durable_lookup_queries_total");
    let before = queries(&gw.metrics().await);

    // Forged tokens (right shape, wrong MAC key): no query at all.
    let forger = TokenKey::new(b"not the gateway's key");
    for _ in 0..2000 {
        let (token, _) = forger.issue();
        assert_eq!(gw.status("/", &token).await, 401);
    }
    assert_eq!(
        queries(&gw.metrics().await),
        before,
        "forged tokens reach no store"
    );

    // A revoked token replayed over and over: answered by the Redis
    // tombstone, then by nothing at all.
    let alice = gw.login("alice").await;
    assert_eq!(gw.logout(&alice).await, 200);
    let before = queries(&gw.metrics().await);
    for _ in 0..1000 {
        assert_eq!(gw.status("/", &alice).await, 401);
    }
    assert!(
        queries(&gw.metrics().await) - before <= 1.0,
        "a replayed revoked token costs at most one query"
    );
    gw.shutdown().await;

    // Unknown keys at the store level: the negative cache.
    let metrics = Arc::new(Metrics::new());
    let store = SessionStore::new(
        Arc::new(redis_tier(SHARED_REDIS, &prefix())),
        Arc::new(pg_tier(&db.url()).await),
        metrics.clone(),
    );
    let keys: Vec<_> = (0..20).map(|_| TokenKey::new(b"k").issue().1).collect();
    for round in 0..100 {
        for key in &keys {
            assert!(store.lookup(key).await.unwrap().is_none(), "round {round}");
        }
    }
    assert_eq!(
        metrics.durable_queries.get(),
        20,
        "2000 lookups of 20 unknown keys made 20 queries"
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_is_written_behind_and_flushed_at_shutdown() {
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let gw = Gw::start(config(
        &upstream,
        &db.url(),
        &format!(
            "redis_url = {SHARED_REDIS:?}\nredis_prefix = {:?}\nactivity_flush_ms = 600000",
            prefix()
        ),
        "touch_interval_seconds = 0",
    ))
    .await;
    let alice = gw.login("alice").await;
    let pool = db.pool().await;
    let row = sqlx::query("SELECT created_at, last_seen_at FROM sessions")
        .fetch_one(&pool)
        .await
        .unwrap();
    let created: i64 = row.get("created_at");
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(gw.status("/", &alice).await, 200);

    let seen: i64 = sqlx::query("SELECT last_seen_at FROM sessions")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get("last_seen_at");
    assert_eq!(seen, created, "not yet written to PostgreSQL");
    let admin_view = gw
        .client
        .get(gw.admin_url("/v1/users/alice/sessions"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(admin_view["sessions"].as_array().unwrap().len(), 1);

    gw.shutdown().await;
    let seen: i64 = sqlx::query("SELECT last_seen_at FROM sessions")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get("last_seen_at");
    assert!(
        seen >= created + 30,
        "the shutdown flush wrote the activity ({seen} vs {created})"
    );
    pool.close().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_raw_token_in_any_redis_key_or_value_or_postgres_row() {
    let db = PgDb::create().await;
    let prefix = prefix();
    let upstream = TestUpstream::start().await;
    let gw = Gw::start(config(
        &upstream,
        &db.url(),
        &format!("redis_url = {SHARED_REDIS:?}\nredis_prefix = {prefix:?}"),
        "",
    ))
    .await;
    let mut tokens = Vec::new();
    for user in ["alice", "bob", "carol"] {
        tokens.push(gw.login(user).await);
    }
    assert_eq!(gw.logout(&tokens[2]).await, 200);

    assert_eq!(
        session_keys(SHARED_REDIS, &prefix).await.len(),
        3,
        "two sessions and a tombstone"
    );
    let redis = redis_keys(SHARED_REDIS, &prefix).await;
    let pool = db.pool().await;
    let mut rows = Vec::new();
    for q in [
        "SELECT encode(token_hash, 'hex') || id::text || user_id || attributes::text AS r FROM sessions",
        "SELECT encode(token_hash, 'hex') AS r FROM revocations",
    ] {
        for row in sqlx::query(q).fetch_all(&pool).await.unwrap() {
            rows.push(row.get::<String, _>("r"));
        }
    }
    assert_eq!(rows.len(), 3);
    for token in &tokens {
        let raw = URL_SAFE_NO_PAD.decode(token).unwrap();
        let raw_hex = harness::hex(&raw);
        for (key, value) in &redis {
            assert!(!key.contains(token.as_str()) && !key.contains(&raw_hex));
            assert!(!contains(value, token.as_bytes()) && !contains(value, &raw));
        }
        for row in &rows {
            assert!(!row.contains(token.as_str()) && !row.contains(&raw_hex));
        }
    }
    pool.close().await;
    gw.shutdown().await;
    db.drop_db().await;
}

/// Login, request, logout on one store pair, through the gateway.
async fn round_trip(gw: &Gw) {
    let token = gw.login("alice").await;
    assert_eq!(gw.status("/", &token).await, 200);
    assert_eq!(gw.logout(&token).await, 200);
    assert_eq!(gw.status("/", &token).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_pairs_redis_with_sqlite_and_memory_with_postgres() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gw::start(config(
        &upstream,
        &harness::database_url(&dir),
        &format!(
            "redis_url = {SHARED_REDIS:?}\nredis_prefix = {:?}",
            prefix()
        ),
        "",
    ))
    .await;
    assert_eq!(gw.readyz().await.1["stores"][0]["kind"], "redis");
    assert_eq!(gw.readyz().await.1["stores"][1]["kind"], "sqlite");
    round_trip(&gw).await;
    gw.shutdown().await;

    let db = PgDb::create().await;
    let gw = Gw::start(config(&upstream, &db.url(), "", "")).await;
    assert_eq!(gw.readyz().await.1["stores"][0]["kind"], "memory");
    assert_eq!(gw.readyz().await.1["stores"][1]["kind"], "postgres");
    round_trip(&gw).await;
    gw.shutdown().await;
    db.drop_db().await;
}

/// Instances sharing a Redis need not agree on `store.local_cache_ttl_ms`
/// (a rolling config change): one that does not cache still announces its
/// revocations, so one that caches for a minute drops its copy at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_without_a_local_cache_still_announces_its_revocations() {
    let db = PgDb::create().await;
    let prefix = prefix();
    let upstream = TestUpstream::start().await;
    let store = format!("redis_url = {SHARED_REDIS:?}\nredis_prefix = {prefix:?}");
    let a = Gw::start(config(
        &upstream,
        &db.url(),
        &format!("{store}\nlocal_cache_ttl_ms = 60000"),
        "",
    ))
    .await;
    let b = Gw::start(config(&upstream, &db.url(), &store, "")).await;
    wait_subscribed(&a, true).await;
    let token = b.login("alice").await;
    assert_eq!(a.status("/", &token).await, 200, "A caches the session");
    assert_eq!(b.logout(&token).await, 200);
    assert_eq!(b.status("/", &token).await, 401, "B: at once");
    let took = time_to_401(&a, &token, Duration::from_secs(2)).await;
    eprintln!("A dropped its copy {took:?} after B's revocation answered");
    let metrics = b.metrics().await;
    assert_eq!(
        counter(
            &metrics,
            "sessiongate_local_cache_invalidations_published_total "
        ),
        1.0,
        "B announced the one revoked session:\n{metrics}"
    );
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

// ---------------------------------------------------------------------------
// Revocations announced over Redis pub/sub to every local cache.
// ---------------------------------------------------------------------------

/// Config `[store]` keys: Redis at `url` under `prefix`, with a local cache.
pub(crate) fn cached_store(url: &str, prefix: &str, ttl_ms: u64) -> String {
    format!("redis_url = {url:?}\nredis_prefix = {prefix:?}\nlocal_cache_ttl_ms = {ttl_ms}")
}

/// A session made through the admin API: its token and id.
pub(crate) async fn admin_create(gw: &Gw, user: &str) -> (String, String) {
    let resp = gw
        .client
        .post(gw.admin_url("/v1/sessions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({ "user_id": user }))
        .send()
        .await
        .expect("POST /v1/sessions");
    assert_eq!(resp.status(), 201, "create a session");
    let body: Value = resp.json().await.expect("JSON");
    (
        body["token"].as_str().expect("token").to_string(),
        body["id"].as_str().expect("id").to_string(),
    )
}

pub(crate) async fn admin_delete(gw: &Gw, path: &str) -> reqwest::Response {
    gw.client
        .delete(gw.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("admin DELETE")
}

/// Waits (up to 10 s) until the gateway's invalidation subscription is up
/// (or down).
pub(crate) async fn wait_subscribed(gw: &Gw, up: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = gw.metrics().await;
        let subscribed = counter(&metrics, "sessiongate_local_cache_subscribed ") == 1.0;
        if subscribed == up {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "local_cache_subscribed never became {up}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long until `gw` turns `token` away, asking every 20 ms; fails if it
/// still serves it after `within`.
pub(crate) async fn time_to_401(gw: &Gw, token: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let status = gw.status("/", token).await;
        if status == 401 {
            return start.elapsed();
        }
        assert_eq!(status, 200, "only served or turned away");
        assert!(
            start.elapsed() < within,
            "still served {:?} after the revocation",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn token_hash(token: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(URL_SAFE_NO_PAD.decode(token).unwrap()).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_reach_another_instances_local_cache_at_once() {
    let db = PgDb::create().await;
    let prefix = prefix();
    let upstream = TestUpstream::start().await;
    let store = cached_store(SHARED_REDIS, &prefix, 60_000);
    let a = Gw::start(config(&upstream, &db.url(), &store, "")).await;
    let b = Gw::start(config(&upstream, &db.url(), &store, "")).await;
    wait_subscribed(&a, true).await;
    wait_subscribed(&b, true).await;

    // What goes over the channel: the hashes, never the tokens.
    let mut listener = redis::Client::open(SHARED_REDIS)
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    listener
        .subscribe(format!("{prefix}invalidate"))
        .await
        .unwrap();

    // Control: a tombstone written behind the gateways' backs (a
    // revocation whose announcement was lost) leaves B serving its copy —
    // B's answers below come from its local cache.
    let (control, _) = admin_create(&a, "erin").await;
    assert_eq!(b.status("/", &control).await, 200);
    let mut conn = redis::Client::open(SHARED_REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("SET")
        .arg(format!("{prefix}s:{}", harness::hex(&token_hash(&control))))
        .arg(&[0u8][..])
        .arg("PX")
        .arg(60_000)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert_eq!(b.status("/", &control).await, 200, "served from B's cache");

    // One session by id.
    let (token, id) = admin_create(&a, "carol").await;
    assert_eq!(b.status("/", &token).await, 200, "B caches the session");
    assert_eq!(b.status("/", &token).await, 200);
    let resp = admin_delete(&a, &format!("/v1/sessions/{id}")).await;
    assert_eq!(resp.status(), 204, "revoked through A");
    let took = time_to_401(&b, &token, Duration::from_secs(1)).await;
    eprintln!("B turned the revoked session away after {took:?}");

    let message = tokio::time::timeout(Duration::from_secs(2), listener.on_message().next())
        .await
        .expect("an invalidation message")
        .expect("the subscription is open");
    let payload = message.get_payload_bytes().to_vec();
    let mut expected = vec![1u8];
    expected.extend(token_hash(&token));
    assert_eq!(payload, expected, "version 1, then the token hash");
    assert!(!contains(&payload, token.as_bytes()));

    // Every session of a user.
    let (d1, _) = admin_create(&a, "dave").await;
    let (d2, _) = admin_create(&a, "dave").await;
    assert_eq!(b.status("/", &d1).await, 200);
    assert_eq!(b.status("/", &d2).await, 200);
    let resp = admin_delete(&a, "/v1/users/dave/sessions").await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["revoked"], 2);
    time_to_401(&b, &d1, Duration::from_secs(1)).await;
    time_to_401(&b, &d2, Duration::from_secs(1)).await;

    // And a logout on B reaches A's cache.
    let (f, _) = admin_create(&b, "frank").await;
    assert_eq!(a.status("/", &f).await, 200, "A caches the session");
    assert_eq!(b.logout(&f).await, 200);
    time_to_401(&a, &f, Duration::from_secs(1)).await;

    let (ma, mb) = (a.metrics().await, b.metrics().await);
    assert_eq!(
        counter(
            &ma,
            "sessiongate_local_cache_invalidations_published_total "
        ),
        3.0,
        "{ma}"
    );
    assert!(
        counter(&mb, "sessiongate_local_cache_invalidations_received_total ") >= 4.0,
        "{mb}"
    );
    assert_eq!(
        counter(
            &ma,
            "sessiongate_local_cache_invalidation_publish_failures_total "
        ),
        0.0
    );
    assert_eq!(
        counter(&mb, "sessiongate_local_cache_invalidation_malformed_total "),
        0.0
    );
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

/// Turns subscriptions to the private Redis away (`ACL`), or back on; when
/// turning them away, also closes the ones open. The gateways' ordinary
/// connection keeps working, so their Redis stays trusted and requests
/// keep being served from the local cache: what the tests are about.
async fn allow_subscriptions(redis: &RedisServer, allow: bool) {
    let mut conn = redis.connection().await.unwrap();
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg(if allow { "+subscribe" } else { "-subscribe" })
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    if !allow {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async::<i64>(&mut conn)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_revoked_while_unsubscribed_is_dropped_on_resubscribing() {
    let redis = RedisServer::start(false).await;
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let store = cached_store(&redis.url(), "sg:", 60_000);
    let a = Gw::start(config(&upstream, &db.url(), &store, "")).await;
    let b = Gw::start(config(&upstream, &db.url(), &store, "")).await;
    wait_subscribed(&a, true).await;
    wait_subscribed(&b, true).await;

    let (token, id) = admin_create(&a, "carol").await;
    assert_eq!(b.status("/", &token).await, 200, "B caches the session");

    allow_subscriptions(&redis, false).await;
    wait_subscribed(&b, false).await;
    let clears = counter(&b.metrics().await, "sessiongate_local_cache_clears_total ");
    let resp = admin_delete(&a, &format!("/v1/sessions/{id}")).await;
    assert_eq!(resp.status(), 204);
    // The announcement is lost to B: its copy is served (for up to the
    // cache lifetime, 60 s here).
    for _ in 0..5 {
        assert_eq!(b.status("/", &token).await, 200, "the gap");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.status("/", &token).await, 401);

    allow_subscriptions(&redis, true).await;
    wait_subscribed(&b, true).await;
    assert_eq!(
        b.status("/", &token).await,
        401,
        "resubscribing dropped the whole local cache"
    );
    let metrics = b.metrics().await;
    assert_eq!(
        counter(&metrics, "sessiongate_local_cache_clears_total "),
        clears + 1.0,
        "{metrics}"
    );

    // And revocations are immediate again.
    wait_subscribed(&a, true).await;
    let (again, id) = admin_create(&a, "carol").await;
    assert_eq!(b.status("/", &again).await, 200);
    assert_eq!(
        admin_delete(&a, &format!("/v1/sessions/{id}"))
            .await
            .status(),
        204
    );
    time_to_401(&b, &again, Duration::from_secs(1)).await;

    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_unsubscribed_staleness_is_bounded_by_the_local_cache_lifetime() {
    let redis = RedisServer::start(false).await;
    allow_subscriptions(&redis, false).await;
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let store = cached_store(&redis.url(), "sg:", 500);
    let a = Gw::start(config(&upstream, &db.url(), &store, "")).await;
    let b = Gw::start(config(&upstream, &db.url(), &store, "")).await;

    for _ in 0..3 {
        let (token, id) = admin_create(&a, "carol").await;
        assert_eq!(b.status("/", &token).await, 200, "B caches the session");
        assert_eq!(
            admin_delete(&a, &format!("/v1/sessions/{id}"))
                .await
                .status(),
            204
        );
        // The entry was cached before the revocation, so it is gone at
        // most 500 ms after it (plus slack for a loaded machine).
        let took = time_to_401(&b, &token, Duration::from_millis(500 + 500)).await;
        eprintln!("unsubscribed: B turned the revoked session away after {took:?}");
    }
    let metrics = b.metrics().await;
    assert_eq!(
        counter(&metrics, "sessiongate_local_cache_subscribed "),
        0.0,
        "never subscribed: {metrics}"
    );
    assert_eq!(
        counter(
            &metrics,
            "sessiongate_local_cache_invalidations_received_total "
        ),
        0.0
    );
    assert_eq!(
        counter(
            &a.metrics().await,
            "sessiongate_local_cache_invalidations_published_total "
        ),
        3.0,
        "published even with nobody listening"
    );
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_and_serve_on_postgres_from_the_command_line() {
    let db = PgDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let upstream = TestUpstream::start().await;
    let text = GatewaySpec::standard(&upstream.url()).to_toml(
        "sqlite://unused.db",
        "127.0.0.1:0",
        "127.0.0.1:0",
    );
    std::fs::write(&path, text).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .arg("migrate")
        .arg("--config")
        .arg(&path)
        .env("SESSIONGATE_STORE__DATABASE_URL", db.url())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pool = db.pool().await;
    let tables: Vec<String> = sqlx::query(
        "SELECT table_name::text AS t FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get("t"))
    .collect();
    for table in ["gateway_secrets", "revocations", "sessions"] {
        assert!(tables.contains(&table.to_string()), "{tables:?}");
    }
    pool.close().await;

    // An unreachable PostgreSQL: a clear error naming the store and the
    // address, without the password.
    let port = harness::free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .env(
            "SESSIONGATE_STORE__DATABASE_URL",
            format!("postgres://postgres:hunter2secret@127.0.0.1:{port}/x"),
        )
        .env("SESSIONGATE_STORE__CONNECT_TIMEOUT_MS", "500")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("postgres"), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(!stderr.contains("hunter2secret"), "{stderr}");
    db.drop_db().await;
}

/// Each user's session row in PostgreSQL: (created_at, last_seen_at).
async fn seen_by_user(pool: &sqlx::PgPool) -> std::collections::BTreeMap<String, (i64, i64)> {
    sqlx::query("SELECT user_id, created_at, last_seen_at FROM sessions")
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get("user_id"),
                (r.get("created_at"), r.get("last_seen_at")),
            )
        })
        .collect()
}

/// Waits until the clock is past `at` (milliseconds), so that activity
/// recorded afterwards is told from creation.
async fn clock_past(at: i64) {
    for _ in 0..1_000 {
        if sessiongate::session::now_ms() > at {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("the clock did not pass {at}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_activity_buffer_is_bounded_and_drops_the_longest_waiting() {
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let gw = Gw::start(config(
        &upstream,
        &db.url(),
        "activity_flush_ms = 600000\nactivity_buffer_capacity = 3",
        "touch_interval_seconds = 0",
    ))
    .await;
    let users = ["u1", "u2", "u3", "u4", "u5"];
    let mut tokens = Vec::new();
    for user in users {
        tokens.push(gw.login(user).await);
    }
    let pool = db.pool().await;
    let created = seen_by_user(&pool).await;
    clock_past(created.values().map(|(c, _)| *c).max().unwrap()).await;

    // Five sessions active in turn; three may wait.
    for token in &tokens {
        assert_eq!(gw.status("/", token).await, 200);
    }
    // More activity of one already waiting takes no new place.
    assert_eq!(gw.status("/", &tokens[4]).await, 200);
    assert_eq!(gw.status("/", &tokens[2]).await, 200);
    let metrics = gw.metrics().await;
    assert_eq!(
        counter(&metrics, "sessiongate_activity_dropped_total"),
        2.0,
        "{metrics}"
    );
    assert_eq!(gw.running().gateway().store().pending_activity(), 3);

    // The shutdown flush writes the three newest; the two dropped keep the
    // durable tier's older time (the fast tier had them meanwhile).
    gw.shutdown().await;
    let after = seen_by_user(&pool).await;
    for (user, (created_at, seen)) in &after {
        let written = *seen > *created_at;
        let expected = ["u3", "u4", "u5"].contains(&user.as_str());
        assert_eq!(written, expected, "{user}: {after:?}");
    }
    pool.close().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_activity_flush_stops_at_the_shutdown_grace() {
    let db = PgDb::create().await;
    let upstream = TestUpstream::start().await;
    let mut config = config(
        &upstream,
        &db.url(),
        "activity_flush_ms = 600000",
        "touch_interval_seconds = 0",
    );
    config.server.shutdown_grace = Duration::from_millis(300);
    let gw = Gw::start(config).await;
    let alice = gw.login("alice").await;
    let pool = db.pool().await;
    let created = seen_by_user(&pool).await["alice"].0;
    clock_past(created).await;
    assert_eq!(gw.status("/", &alice).await, 200);

    // Another client holds the table: the activity write waits on its lock
    // for as long as the lock is held.
    let mut hold = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let started = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(10), gw.shutdown()).await;
    let took = started.elapsed();
    hold.rollback().await.unwrap();
    assert!(
        stopped.is_ok(),
        "shutdown still waiting on the durable tier after {took:?}"
    );
    // The listeners' grace, then the flush's.
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    let (_, seen) = seen_by_user(&pool).await["alice"];
    assert_eq!(
        seen, created,
        "the blocked write was abandoned, not applied"
    );
    pool.close().await;
    db.drop_db().await;
}
