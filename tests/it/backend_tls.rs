//! TLS to the backends, over real sockets and real handshakes: a Redis
//! with `--tls-port`, a PostgreSQL with `ssl=on` and HTTPS origins, all
//! started by the tests on loopback with certificates made here by rcgen
//! (a test CA, server certificates, a client certificate for mTLS, and a
//! second CA that signed none of them).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use sessiongate::config::Config;
use sessiongate::server::{self, RunningGateway};
use sessiongate::store::postgres::{PoolSettings, PostgresTier};
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::{self, COOKIE, GatewaySpec, TestUpstream};

fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// A test PKI in a temp dir: `ca.pem` signed everything below, and
/// `other-ca.pem` signed nothing the servers present.
struct Pki {
    dir: TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca: PathBuf,
    other_ca: PathBuf,
    /// For `localhost` and `127.0.0.1`.
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl Pki {
    fn new() -> Pki {
        install_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let ca_key = KeyPair::generate().unwrap();
        let params = ca_params("sessiongate test CA");
        let ca = write("ca.pem", params.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::new(params, ca_key);
        let other_key = KeyPair::generate().unwrap();
        let other_ca = write(
            "other-ca.pem",
            ca_params("some other CA")
                .self_signed(&other_key)
                .unwrap()
                .pem(),
        );
        let mut pki = Pki {
            issuer,
            ca,
            other_ca,
            server_cert: PathBuf::new(),
            server_key: PathBuf::new(),
            client_cert: PathBuf::new(),
            client_key: PathBuf::new(),
            dir,
        };
        (pki.server_cert, pki.server_key) = pki.leaf("server", &["localhost", "127.0.0.1"], false);
        (pki.client_cert, pki.client_key) = pki.leaf("client", &["sessiongate.test"], true);
        pki
    }

    /// A certificate signed by the test CA for `names` (DNS names or IP
    /// addresses), for a server or, with `client`, a client; its PEM
    /// certificate and key files.
    fn leaf(&self, file: &str, names: &[&str], client: bool) -> (PathBuf, PathBuf) {
        self.leaf_with(file, names, client, |_| {})
    }

    /// [`Pki::leaf`] with the parameters adjusted by `edit` first.
    fn leaf_with(
        &self,
        file: &str,
        names: &[&str],
        client: bool,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        edit(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cert_path = self.dir.path().join(format!("{file}.pem"));
        let key_path = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(|c| c.unwrap())
        .collect()
}

/// A TLS server config presenting `cert`, requiring a client certificate
/// signed by `client_ca` when given.
fn acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca) {
                roots.add(c).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs(cert), PrivateKeyDer::from_pem_file(key).unwrap())
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A TOML string.
fn q(s: impl AsRef<str>) -> String {
    serde_json::to_string(s.as_ref()).unwrap()
}

fn qp(p: &Path) -> String {
    q(p.display().to_string())
}

// ---------------------------------------------------------------------------
// The gateway, configured by text
// ---------------------------------------------------------------------------

/// The standard spec's config with keys added to `[store]` and to the
/// `app` upstream.
fn config_text(upstream_url: &str, database_url: &str, store: &str, upstream_keys: &str) -> String {
    GatewaySpec::standard(upstream_url)
        .cookie_secure(false)
        .to_toml(database_url, "127.0.0.1:0", "127.0.0.1:0")
        .replacen("[store]\n", &format!("[store]\n{store}\n"), 1)
        .replacen(
            "[[upstreams]]\nname = \"app\"\n",
            &format!("[[upstreams]]\nname = \"app\"\n{upstream_keys}\n"),
            1,
        )
}

fn parse(text: &str) -> Config {
    Config::from_toml_str(text).unwrap_or_else(|e| panic!("config rejected: {e}\n---\n{text}"))
}

struct Gw {
    running: Option<RunningGateway>,
    client: reqwest::Client,
}

impl Gw {
    async fn start(text: &str) -> Gw {
        let running = server::start(parse(text))
            .await
            .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
        Gw {
            running: Some(running),
            client: harness::client(),
        }
    }

    fn running(&self) -> &RunningGateway {
        self.running.as_ref().expect("running")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.running().addr(), path)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.running().admin_addr().unwrap(), path)
    }

    async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.client.get(self.url(path));
        if let Some(token) = token {
            req = req.header("cookie", harness::cookie(token));
        }
        req.send().await.expect("request through the gateway")
    }

    async fn login(&self, user: &str) -> String {
        let resp = self.get(&format!("/public/login?user={user}"), None).await;
        assert_eq!(resp.status(), 200, "login through the gateway");
        harness::set_cookie(resp.headers(), COOKIE)
            .expect("session cookie")
            .value
    }

    async fn status(&self, path: &str, token: &str) -> u16 {
        self.get(path, Some(token)).await.status().as_u16()
    }

    async fn readyz(&self) -> (u16, Value) {
        let resp = self
            .client
            .get(self.admin_url("/readyz"))
            .send()
            .await
            .expect("readyz");
        (resp.status().as_u16(), resp.json().await.expect("JSON"))
    }

    async fn metrics(&self) -> String {
        self.client
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap()
    }

    async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// The gateway's start error for `text` (it must fail).
async fn start_error(text: &str) -> String {
    match server::start(parse(text)).await {
        Ok(running) => {
            running.shutdown().await;
            panic!("the gateway started:\n{text}");
        }
        Err(e) => e.to_string(),
    }
}

fn sqlite_url(dir: &TempDir) -> String {
    format!("sqlite://{}/sg.db", dir.path().display())
}

// ---------------------------------------------------------------------------
// Redis with --tls-port
// ---------------------------------------------------------------------------

/// A `redis-server` of the test's own serving TLS only, stopped by pid.
struct TlsRedis {
    port: u16,
    child: Child,
    dir: TempDir,
}

impl TlsRedis {
    async fn start(pki: &Pki, require_client_cert: bool) -> TlsRedis {
        Self::start_with_cert(pki, require_client_cert, &pki.server_cert, &pki.server_key).await
    }

    /// A TLS Redis presenting `cert` (for `127.0.0.1`, so that the
    /// readiness check can connect).
    async fn start_with_cert(
        pki: &Pki,
        require_client_cert: bool,
        cert: &Path,
        key: &Path,
    ) -> TlsRedis {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = harness::free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .arg("--tls-ca-cert-file")
            .arg(&pki.ca)
            .args([
                "--tls-auth-clients",
                if require_client_cert { "yes" } else { "no" },
            ])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (scripts/services.sh installs it)");
        let mut redis = TlsRedis { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut conn) = redis.connection(pki).await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return redis;
            }
            if let Ok(Some(status)) = redis.child.try_wait() {
                panic!("redis-server exited with {status}:\n{}", redis.log());
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not come up:\n{}",
                redis.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        self.url_via("127.0.0.1")
    }

    fn url_via(&self, host: &str) -> String {
        format!("rediss://{host}:{}", self.port)
    }

    /// The test's own connection, over TLS with the client certificate.
    async fn connection(&self, pki: &Pki) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = redis::Client::build_with_tls(
            self.url(),
            redis::TlsCertificates {
                client_tls: Some(redis::ClientTlsConfig {
                    client_cert: std::fs::read(&pki.client_cert).unwrap(),
                    client_key: std::fs::read(&pki.client_key).unwrap(),
                }),
                root_cert: Some(std::fs::read(&pki.ca).unwrap()),
            },
        )?;
        tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| redis::RedisError::from(std::io::Error::other("connect timed out")))?
    }

    async fn session_keys(&self, pki: &Pki) -> Vec<String> {
        let mut conn = self.connection(pki).await.expect("test connection");
        redis::cmd("KEYS")
            .arg("sessiongate:s:*")
            .query_async(&mut conn)
            .await
            .expect("KEYS")
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_keys(redis: &TlsRedis, ca: &Path, client: Option<(&Path, &Path)>) -> String {
    let mut keys = format!(
        "redis_url = {}\nredis_ca_file = {}\nredis_timeout_ms = 2000\n",
        q(redis.url()),
        qp(ca)
    );
    if let Some((cert, key)) = client {
        keys.push_str(&format!(
            "redis_client_cert_file = {}\nredis_client_key_file = {}\n",
            qp(cert),
            qp(key)
        ));
    }
    keys
}

/// The `error` of the fast tier in a /readyz body.
fn fast_error(readyz: &Value) -> String {
    readyz["stores"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_live_in_a_redis_reached_over_tls() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, false).await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gw::start(&config_text(
        &upstream.url(),
        &sqlite_url(&dir),
        &redis_keys(&redis, &pki.ca, None),
        "",
    ))
    .await;
    let (status, body) = gw.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stores"][0]["kind"], "redis");

    let token = gw.login("alice").await;
    assert_eq!(gw.status("/api/x", &token).await, 200);
    let keys = redis.session_keys(&pki).await;
    assert_eq!(keys.len(), 1, "the session is in the TLS Redis: {keys:?}");

    // A revocation reaches it too: the key becomes a tombstone.
    assert_eq!(gw.status("/logout?scope=current", &token).await, 200);
    assert_eq!(gw.status("/api/x", &token).await, 401);
    let mut conn = redis.connection(&pki).await.unwrap();
    let value: Vec<u8> = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, vec![0u8], "a tombstone");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_whose_certificate_the_ca_did_not_sign_is_reported_unready() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, false).await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gw::start(&config_text(
        &upstream.url(),
        &sqlite_url(&dir),
        &redis_keys(&redis, &pki.other_ca, None),
        "",
    ))
    .await;
    let (status, body) = gw.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["down"], serde_json::json!(["redis"]), "{body}");
    let error = fast_error(&body);
    assert!(
        error.contains("certificate") && error.contains("rediss://127.0.0.1"),
        "the reason names the certificate and the address: {error}"
    );
    // Nothing is lost: sessions are served from the durable tier, and
    // nothing was written to the Redis the gateway does not trust.
    let token = gw.login("alice").await;
    assert_eq!(gw.status("/api/x", &token).await, 200);
    assert!(redis.session_keys(&pki).await.is_empty());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_certificate_for_another_name_is_refused() {
    let pki = Pki::new();
    // Valid, signed by the trusted CA, but for 127.0.0.1 only.
    let (cert, key) = pki.leaf("redis-ip-only", &["127.0.0.1"], false);
    let redis = TlsRedis::start_with_cert(&pki, false, &cert, &key).await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!(
        "redis_url = {}\nredis_ca_file = {}\nredis_timeout_ms = 2000\n",
        q(redis.url_via("localhost")),
        qp(&pki.ca)
    );
    let gw = Gw::start(&config_text(&upstream.url(), &sqlite_url(&dir), &store, "")).await;
    let (status, body) = gw.readyz().await;
    assert_eq!(status, 503, "{body}");
    let error = fast_error(&body);
    assert!(
        error.contains("not valid for name") && error.contains("localhost"),
        "the reason is the name: {error}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_requires_client_certificates_accepts_only_the_configured_one() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, true).await;
    let upstream = TestUpstream::start().await;

    let dir = tempfile::tempdir().unwrap();
    let without = Gw::start(&config_text(
        &upstream.url(),
        &sqlite_url(&dir),
        &redis_keys(&redis, &pki.ca, None),
        "",
    ))
    .await;
    let (status, body) = without.readyz().await;
    assert_eq!(status, 503, "no client certificate, no Redis: {body}");
    without.shutdown().await;

    // A client certificate from a CA Redis does not trust is no better.
    let stranger = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let foreign = Gw::start(&config_text(
        &upstream.url(),
        &sqlite_url(&dir),
        &redis_keys(
            &redis,
            &pki.ca,
            Some((&stranger.client_cert, &stranger.client_key)),
        ),
        "",
    ))
    .await;
    let (status, body) = foreign.readyz().await;
    assert_eq!(status, 503, "a foreign client certificate: {body}");
    foreign.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let with = Gw::start(&config_text(
        &upstream.url(),
        &sqlite_url(&dir),
        &redis_keys(&redis, &pki.ca, Some((&pki.client_cert, &pki.client_key))),
        "",
    ))
    .await;
    let (status, body) = with.readyz().await;
    assert_eq!(status, 200, "{body}");
    let token = with.login("bob").await;
    assert_eq!(with.status("/api/x", &token).await, 200);
    assert_eq!(redis.session_keys(&pki).await.len(), 1);
    with.shutdown().await;
}

/// Waits until `gw`'s local-cache invalidation subscription is up.
async fn wait_subscribed(gw: &Gw) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = gw.metrics().await;
        if metrics
            .lines()
            .any(|l| l.starts_with("sessiongate_local_cache_subscribed ") && l.ends_with(" 1"))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never subscribed over TLS:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_reach_another_gateways_local_cache_over_tls() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, true).await;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A cache lifetime far longer than the test: only the pub/sub
    // invalidation (on its own TLS connection) can turn the token away.
    let store = format!(
        "{}local_cache_ttl_ms = 600000\n",
        redis_keys(&redis, &pki.ca, Some((&pki.client_cert, &pki.client_key)))
    );
    let text = config_text(&upstream.url(), &sqlite_url(&dir), &store, "");
    let a = Gw::start(&text).await;
    let b = Gw::start(&text).await;
    wait_subscribed(&a).await;
    wait_subscribed(&b).await;

    let token = b.login("carol").await;
    assert_eq!(a.status("/api/x", &token).await, 200, "A caches it");
    assert_eq!(b.status("/logout?scope=current", &token).await, 200);
    let start = Instant::now();
    loop {
        let status = a.status("/api/x", &token).await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "A still serves a revoked session"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

// ---------------------------------------------------------------------------
// PostgreSQL with ssl=on
// ---------------------------------------------------------------------------

/// The newest PostgreSQL server binaries Debian installed (15 on the CI
/// machine), which `scripts/services.sh` installs.
fn pg_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .expect("PostgreSQL server binaries in /usr/lib/postgresql (scripts/services.sh)")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .expect("a PostgreSQL version under /usr/lib/postgresql");
    root.join(newest.to_string()).join("bin")
}

/// A PostgreSQL cluster of the test's own (trust auth) with `ssl=on`,
/// listening on 127.0.0.1 with a certificate for `127.0.0.1` only;
/// stopped with `pg_ctl stop -m immediate` on drop.
struct TlsPostgres {
    port: u16,
    dir: TempDir,
}

fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"])
        .arg(pg_bin().join(program));
    cmd
}

fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success());
}

impl TlsPostgres {
    fn start(pki: &Pki) -> TlsPostgres {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = pki.leaf("postgres", &["127.0.0.1"], false);
        let server_cert = dir.path().join("server.pem");
        let server_key = dir.path().join("server.key");
        std::fs::copy(cert, &server_cert).unwrap();
        std::fs::copy(key, &server_key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&server_key, std::fs::Permissions::from_mode(0o600)).unwrap();
        chown_postgres(dir.path());
        let data = dir.path().join("data");
        let out = as_postgres("initdb")
            .arg("-D")
            .arg(&data)
            .args(["--auth=trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("initdb (is PostgreSQL 15 installed?)");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = harness::free_port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} \
             -c ssl_key_file={} -c fsync=off",
            dir.path().display(),
            server_cert.display(),
            server_key.display()
        );
        // -w waits (at most -t seconds) until it accepts connections.
        let out = as_postgres("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("pg.log"))
            .args(["-o", &options, "-w", "-t", "30", "start"])
            .output()
            .expect("pg_ctl start");
        let pg = TlsPostgres { port, dir };
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(pg.dir.path().join("pg.log")).unwrap_or_default()
        );
        pg
    }

    /// A URL as the gateway would be given, with a password (ignored by
    /// trust auth) that must never appear in a message.
    fn url(&self, host: &str, query: &str) -> String {
        format!(
            "postgres://postgres:hunter2-secret@{host}:{}/postgres?{query}",
            self.port
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "-t", "10", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn pg_settings() -> PoolSettings {
    PoolSettings {
        max_connections: 2,
        min_connections: 0,
        acquire_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
    }
}

async fn connection_is_ssl(tier: &PostgresTier) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(tier.pool())
        .await
        .expect("pg_stat_ssl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_with_verify_full() {
    let pki = Pki::new();
    let pg = TlsPostgres::start(&pki);
    let upstream = TestUpstream::start().await;

    let url = pg.url("127.0.0.1", "sslmode=verify-full");
    let gw = Gw::start(&config_text(
        &upstream.url(),
        &url,
        &format!("database_ca_file = {}", qp(&pki.ca)),
        "",
    ))
    .await;
    let token = gw.login("dave").await;
    assert_eq!(gw.status("/api/x", &token).await, 200);
    let (status, body) = gw.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stores"][1]["kind"], "postgres");

    // What the server says of the connections: TLS, all of them.
    let tier = PostgresTier::connect_with_ca(&url, &pg_settings(), Some(&pki.ca))
        .await
        .expect("the tier connects with verify-full");
    assert!(connection_is_ssl(&tier).await, "the server sees TLS");
    let plain: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.client_addr IS NOT NULL AND NOT s.ssl",
    )
    .fetch_one(tier.pool())
    .await
    .unwrap();
    assert_eq!(plain, 0, "no connection from the gateway is in the clear");
    let sessions: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions")
        .fetch_one(tier.pool())
        .await
        .unwrap();
    assert_eq!(sessions, 1, "the session is in this PostgreSQL");
    gw.shutdown().await;

    // `sslrootcert=` in the URL does the same as store.database_ca_file.
    let in_url = pg.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", pki.ca.display()),
    );
    let tier = PostgresTier::connect(&in_url, &pg_settings())
        .await
        .expect("sslrootcert in the URL");
    assert!(connection_is_ssl(&tier).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_with_an_untrusted_or_misnamed_certificate_fails_at_start() {
    let pki = Pki::new();
    let pg = TlsPostgres::start(&pki);
    let upstream = TestUpstream::start().await;

    // A CA that did not sign the server's certificate.
    let error = start_error(&config_text(
        &upstream.url(),
        &pg.url("127.0.0.1", "sslmode=verify-full"),
        &format!("database_ca_file = {}", qp(&pki.other_ca)),
        "",
    ))
    .await;
    assert!(
        error.contains("postgres") && error.contains("certificate"),
        "names the store and the certificate: {error}"
    );
    assert!(error.contains("UnknownIssuer"), "{error}");
    assert!(
        !error.contains("hunter2"),
        "the password is redacted: {error}"
    );
    assert!(error.contains("postgres:****@"), "{error}");
    // With session.token_secret a gateway may start while PostgreSQL is
    // unreachable, but a certificate it refuses is no outage: still an error.
    let error = start_error(
        &config_text(
            &upstream.url(),
            &pg.url("127.0.0.1", "sslmode=verify-full"),
            &format!("database_ca_file = {}", qp(&pki.other_ca)),
            "",
        )
        .replacen(
            "[session]\n",
            "[session]\ntoken_secret = \"backend-tls-test-secret-0123456789abcdef\"\n",
            1,
        ),
    )
    .await;
    assert!(error.contains("UnknownIssuer"), "{error}");
    assert!(!error.contains("token MAC key"), "not an outage: {error}");

    // The right CA, but a host name the certificate does not carry.
    let error = start_error(&config_text(
        &upstream.url(),
        &pg.url("localhost", "sslmode=verify-full"),
        &format!("database_ca_file = {}", qp(&pki.ca)),
        "",
    ))
    .await;
    assert!(
        error.contains("postgres") && error.contains("not valid for name \"localhost\""),
        "names the store and the name mismatch: {error}"
    );
    assert!(!error.contains("hunter2"), "{error}");

    // verify-ca checks the chain but not the name: the same host works.
    let tier = PostgresTier::connect_with_ca(
        &pg.url("localhost", "sslmode=verify-ca"),
        &pg_settings(),
        Some(&pki.ca),
    )
    .await
    .expect("verify-ca does not check the name");
    assert!(connection_is_ssl(&tier).await);
}

// ---------------------------------------------------------------------------
// HTTPS upstreams
// ---------------------------------------------------------------------------

fn https_url(upstream: &TestUpstream) -> String {
    format!("https://{}", upstream.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_proxied_over_one_kept_alive_connection() {
    let pki = Pki::new();
    let origin = TestUpstream::start_tls(acceptor(&pki.server_cert, &pki.server_key, None)).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gw::start(&config_text(
        &https_url(&origin),
        &sqlite_url(&dir),
        "",
        &format!("ca_file = {}", qp(&pki.ca)),
    ))
    .await;
    let token = gw.login("erin").await;
    for i in 0..20 {
        let resp = gw.get(&format!("/api/item?n={i}"), Some(&token)).await;
        assert_eq!(resp.status(), 200);
        let echo: Value = resp.json().await.unwrap();
        assert_eq!(echo["query"], format!("n={i}"));
        assert_eq!(echo["headers"]["x-user-id"], "erin", "{echo}");
    }
    let body = gw
        .client
        .post(gw.url("/api/upload"))
        .header("cookie", harness::cookie(&token))
        .body(vec![7u8; 300_000])
        .send()
        .await
        .unwrap();
    assert_eq!(body.status(), 200);
    let upload: Value = body.json().await.unwrap();
    assert_eq!(upload["len"], 300_000);
    assert_eq!(origin.hits(), 22);
    assert_eq!(
        origin.connections(),
        1,
        "one TLS connection, reused: not a handshake per request"
    );
    // An IP host: no SNI is sent (RFC 6066), and the IP SAN is checked.
    assert_eq!(origin.server_names(), vec![String::new()]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_an_untrusted_certificate_is_a_502_and_benched() {
    let pki = Pki::new();
    let origin = TestUpstream::start_tls(acceptor(&pki.server_cert, &pki.server_key, None)).await;
    let plain = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&plain.url(), &sqlite_url(&dir), "", "")
        + &format!(
            "\n[[upstreams]]\nname = \"tls\"\nurls = [{}]\nca_file = {}\n\
         [[routes]]\nprefix = \"/tls/\"\nupstream = \"tls\"\nauth = \"none\"\n",
            q(https_url(&origin)),
            qp(&pki.other_ca)
        );
    let gw = Gw::start(&text).await;
    let resp = gw.get("/tls/x", None).await;
    let body = harness::expect_error(resp, 502).await;
    assert_eq!(body["code"], "upstream_unreachable", "{body}");
    assert_eq!(origin.hits(), 0, "no request went to an unverified server");
    // The gateway keeps serving everything else.
    assert_eq!(gw.get("/public/x", None).await.status(), 200);
    // Benched like a refused URL: the next request still gets its 502.
    harness::expect_error(gw.get("/tls/y", None).await, 502).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificates_and_plain_http_servers_are_refused_as_https_upstreams() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf_with("expired", &["127.0.0.1"], false, |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let expired = TestUpstream::start_tls(acceptor(&cert, &key, None)).await;
    // An https:// URL that points at a plain HTTP server: its answer to
    // the ClientHello is no TLS record.
    let plain = TestUpstream::start().await;
    let app = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&app.url(), &sqlite_url(&dir), "", "")
        + &format!(
            "\n[[upstreams]]\nname = \"expired\"\nurls = [{}]\nca_file = {}\n\
             [[upstreams]]\nname = \"plain\"\nurls = [{}]\nca_file = {}\n\
             [[routes]]\nprefix = \"/expired/\"\nupstream = \"expired\"\nauth = \"none\"\n\
             [[routes]]\nprefix = \"/plain/\"\nupstream = \"plain\"\nauth = \"none\"\n",
            q(https_url(&expired)),
            qp(&pki.ca),
            q(format!("https://{}", plain.addr)),
            qp(&pki.ca),
        );
    let gw = Gw::start(&text).await;
    harness::expect_error(gw.get("/expired/x", None).await, 502).await;
    harness::expect_error(gw.get("/plain/x", None).await, 502).await;
    assert_eq!(expired.hits(), 0);
    assert_eq!(plain.hits(), 0, "nothing was sent in the clear");
    assert_eq!(gw.get("/public/x", None).await.status(), 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_failure_is_logged_with_the_url_and_the_reason() {
    let pki = Pki::new();
    let origin = TestUpstream::start_tls(acceptor(&pki.server_cert, &pki.server_key, None)).await;
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", harness::free_port());
    let text = GatewaySpec::standard(&https_url(&origin))
        .cookie_secure(false)
        .to_toml(
            &sqlite_url(&dir),
            &listen,
            &format!("127.0.0.1:{}", harness::free_port()),
        )
        .replacen(
            "[[upstreams]]\nname = \"app\"\n",
            &format!(
                "[[upstreams]]\nname = \"app\"\nca_file = {}\n",
                qp(&pki.other_ca)
            ),
            1,
        );
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, text).unwrap();
    let mut process = harness::ServeProcess::spawn(dir.path(), &config);
    process
        .wait_listening(listen.parse().unwrap(), Duration::from_secs(20))
        .await;
    let resp = harness::client()
        .get(format!("http://{listen}/public/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = process.output();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("upstream connection failed"))
        {
            assert!(line.contains(&https_url(&origin)), "names the URL: {line}");
            assert!(
                line.contains("certificate") && line.contains("UnknownIssuer"),
                "says why: {line}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no log line:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_requiring_client_certificates_accepts_the_configured_one() {
    let pki = Pki::new();
    let origin =
        TestUpstream::start_tls(acceptor(&pki.server_cert, &pki.server_key, Some(&pki.ca))).await;
    let dir = tempfile::tempdir().unwrap();
    let without = Gw::start(&config_text(
        &https_url(&origin),
        &sqlite_url(&dir),
        "",
        &format!("ca_file = {}", qp(&pki.ca)),
    ))
    .await;
    harness::expect_error(without.get("/public/x", None).await, 502).await;
    assert_eq!(origin.hits(), 0);
    without.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let with = Gw::start(&config_text(
        &https_url(&origin),
        &sqlite_url(&dir),
        "",
        &format!(
            "ca_file = {}\nclient_cert_file = {}\nclient_key_file = {}",
            qp(&pki.ca),
            qp(&pki.client_cert),
            qp(&pki.client_key)
        ),
    ))
    .await;
    let token = with.login("frank").await;
    assert_eq!(with.status("/api/x", &token).await, 200);
    assert_eq!(origin.hits(), 2);
    with.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_sets_the_sni_and_the_name_verified() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("origin", &["origin.test"], false);
    let origin = TestUpstream::start_tls(acceptor(&cert, &key, None)).await;

    // By default the URL's host (an IP here) is what must be certified.
    let dir = tempfile::tempdir().unwrap();
    let by_ip = Gw::start(&config_text(
        &https_url(&origin),
        &sqlite_url(&dir),
        "",
        &format!("ca_file = {}", qp(&pki.ca)),
    ))
    .await;
    harness::expect_error(by_ip.get("/public/x", None).await, 502).await;
    by_ip.shutdown().await;

    // A name the certificate does not carry either: refused.
    let dir = tempfile::tempdir().unwrap();
    let wrong = Gw::start(&config_text(
        &https_url(&origin),
        &sqlite_url(&dir),
        "",
        &format!("ca_file = {}\nserver_name = \"other.test\"", qp(&pki.ca)),
    ))
    .await;
    harness::expect_error(wrong.get("/public/x", None).await, 502).await;
    wrong.shutdown().await;
    assert_eq!(origin.hits(), 0);

    let dir = tempfile::tempdir().unwrap();
    let named = Gw::start(&config_text(
        &https_url(&origin),
        &sqlite_url(&dir),
        "",
        &format!("ca_file = {}\nserver_name = \"origin.test\"", qp(&pki.ca)),
    ))
    .await;
    let resp = named.get("/public/x", None).await;
    assert_eq!(resp.status(), 200);
    let names = origin.server_names();
    assert_eq!(names.last().map(String::as_str), Some("origin.test"));
    named.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stalls_the_handshake_counts_against_connect_timeout() {
    // Accepts TCP and then says nothing: the TLS handshake never ends.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gw::start(&config_text(
        &format!("https://{addr}"),
        &sqlite_url(&dir),
        "",
        &format!(
            "ca_file = {}\nconnect_timeout_ms = 300\ntimeout_ms = 10000",
            qp(&pki.ca)
        ),
    ))
    .await;
    let start = Instant::now();
    let resp = gw.get("/public/x", None).await;
    let took = start.elapsed();
    harness::expect_error(resp, 502).await;
    assert!(
        took < Duration::from_secs(3),
        "the handshake was cut at connect_timeout_ms, not timeout_ms: {took:?}"
    );
    gw.shutdown().await;
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_pass_through_an_https_upstream() {
    let pki = Pki::new();
    let origin = TestUpstream::start_tls(acceptor(&pki.server_cert, &pki.server_key, None)).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gw::start(&config_text(
        &https_url(&origin),
        &sqlite_url(&dir),
        "",
        &format!("ca_file = {}", qp(&pki.ca)),
    ))
    .await;
    let token = gw.login("grace").await;
    let mut request = format!("ws://{}/api/ws", gw.running().addr())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("cookie", harness::cookie(&token).parse().unwrap());
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("handshake in time")
    .expect("handshake succeeds");
    assert_eq!(resp.status(), 101);
    assert_eq!(
        resp.headers().get("x-seen-user-id").map(|v| v.as_bytes()),
        Some(&b"grace"[..])
    );
    for msg in [
        Message::text("over TLS to the origin"),
        Message::binary(vec![1u8; 70_000]),
    ] {
        ws.send(msg.clone()).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .expect("open")
            .expect("frame");
        assert_eq!(echoed, msg);
    }
    ws.close(None).await.unwrap();
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------
// Bad TLS configuration: a startup error naming the key
// ---------------------------------------------------------------------------

#[test]
fn bad_tls_files_are_config_errors_naming_the_key() {
    let pki = Pki::new();
    let garbage = pki.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let missing = pki.dir.path().join("missing.pem");
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(String, String, &str)> = vec![
        (
            String::new(),
            format!("ca_file = {}", qp(&garbage)),
            "upstreams[0].ca_file",
        ),
        (
            String::new(),
            format!("ca_file = {}", qp(&missing)),
            "upstreams[0].ca_file",
        ),
        (
            String::new(),
            format!("client_cert_file = {}", qp(&pki.client_cert)),
            "upstreams[0].client_key_file",
        ),
        (
            String::new(),
            format!(
                "client_cert_file = {}\nclient_key_file = {}",
                qp(&pki.client_cert),
                qp(&pki.server_key)
            ),
            "upstreams[0].client_key_file",
        ),
        (
            String::new(),
            "server_name = \"bad name!\"".to_string(),
            "upstreams[0].server_name",
        ),
        (
            format!(
                "redis_url = \"rediss://127.0.0.1:6380\"\nredis_ca_file = {}",
                qp(&missing)
            ),
            String::new(),
            "store.redis_ca_file",
        ),
        (
            "redis_url = \"rediss://127.0.0.1:6380/#insecure\"".to_string(),
            String::new(),
            "store.redis_url",
        ),
        (
            format!(
                "redis_url = \"redis://127.0.0.1:6379\"\nredis_ca_file = {}",
                qp(&pki.ca)
            ),
            String::new(),
            "store.redis_ca_file",
        ),
        (
            format!(
                "redis_url = \"rediss://127.0.0.1:6380\"\nredis_client_key_file = {}",
                qp(&pki.client_key)
            ),
            String::new(),
            "store.redis_client_cert_file",
        ),
        (
            format!("database_ca_file = {}", qp(&pki.ca)),
            String::new(),
            "store.database_ca_file",
        ),
    ];
    for (store, upstream, key) in cases {
        let text = config_text("https://127.0.0.1:1", &sqlite_url(&dir), &store, &upstream);
        let err = Config::from_toml_str(&text).expect_err(&text);
        let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&key), "expected {key} in {err}");
    }
    // The CA file is not trusted silently with an sslmode that ignores it.
    let text = config_text(
        "https://127.0.0.1:1",
        "postgres://postgres@127.0.0.1:5432/postgres?sslmode=require",
        &format!("database_ca_file = {}", qp(&pki.ca)),
        "",
    );
    let err = Config::from_toml_str(&text).unwrap_err();
    assert_eq!(err.problems()[0].key, "store.database_ca_file", "{err}");
    assert!(err.to_string().contains("verify-full"), "{err}");
    // ... nor keys for TLS on an upstream without an https:// URL.
    let text = config_text(
        "http://127.0.0.1:1",
        &sqlite_url(&dir),
        "",
        &format!("ca_file = {}", qp(&pki.ca)),
    );
    let err = Config::from_toml_str(&text).unwrap_err();
    assert_eq!(err.problems()[0].key, "upstreams[0].ca_file", "{err}");
}
