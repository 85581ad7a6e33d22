//! Live config reload (`POST /v1/config/reload`, SIGHUP, the file
//! watcher) over real sockets: what reloads takes effect on the next
//! request, keep-alive connections included; what needs a restart, and a
//! broken file, are refused with 422 while the old config serves; an
//! unchanged upstream keeps its pooled connections; and a reload under
//! load fails no request.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use sessiongate::config::Config;
use sessiongate::server::RunningGateway;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{self, ADMIN_TOKEN, GatewaySpec, TestUpstream};

/// The config text of `spec` for a gateway in `dir` on port 0, with
/// `server` and `session` lines added to those tables.
fn text(dir: &Path, spec: &GatewaySpec, server: &str, session: &str) -> String {
    let db = format!("sqlite://{}/sg.db", dir.display());
    spec.to_toml(&db, "127.0.0.1:0", "127.0.0.1:0")
        .replacen("[server]\n", &format!("[server]\n{server}\n"), 1)
        .replacen("[session]\n", &format!("[session]\n{session}\n"), 1)
}

/// A gateway started from a config file that the test rewrites.
struct Live {
    dir: TempDir,
    path: PathBuf,
    running: RunningGateway,
    base: String,
    admin: String,
    client: reqwest::Client,
}

impl Live {
    async fn start(make: impl FnOnce(&Path) -> String) -> Live {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        let text = make(dir.path());
        std::fs::write(&path, &text).unwrap();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let running = sessiongate::server::start(config).await.expect("start");
        Live {
            base: format!("http://{}", running.addr()),
            admin: format!("http://{}", running.admin_addr().unwrap()),
            dir,
            path,
            running,
            client: harness::client(),
        }
    }

    fn write(&self, make: impl FnOnce(&Path) -> String) {
        std::fs::write(&self.path, make(self.dir.path())).unwrap();
    }

    async fn reload(&self) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/config/reload", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("reload request")
    }

    /// Reloads and expects 200; returns what changed.
    async fn reload_ok(&self) -> Vec<String> {
        let resp = self.reload().await;
        let status = resp.status();
        let body = resp.text().await.unwrap();
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["changed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect()
    }

    async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.header("cookie", harness::cookie(token));
        }
        req.send().await.expect("request through the gateway")
    }

    async fn login(&self, user: &str) -> String {
        let resp = self.get(&format!("/public/login?user={user}"), None).await;
        assert_eq!(resp.status(), 200);
        harness::set_cookie(resp.headers(), harness::COOKIE)
            .expect("a session cookie")
            .value
    }

    async fn metric(&self, prefix: &str) -> Option<u64> {
        let text = self
            .client
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    async fn shutdown(self) {
        self.running.shutdown().await;
    }
}

/// One HTTP/1.1 keep-alive connection, requests sent one at a time.
struct KeepAlive {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    async fn open(addr: SocketAddr) -> KeepAlive {
        KeepAlive {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// GET `path` on this connection: the status and the headers.
    async fn get(&mut self, path: &str) -> (u16, Vec<(String, String)>) {
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
        self.stream.write_all(request.as_bytes()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.read_response())
            .await
            .expect("a response within 10 s")
    }

    async fn read_response(&mut self) -> (u16, Vec<(String, String)>) {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            self.fill().await;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let (status, headers) = harness::parse_response_head(&head);
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse::<usize>().unwrap());
        match length {
            Some(n) => {
                while self.buf.len() < n {
                    self.fill().await;
                }
                self.buf.drain(..n);
            }
            None => {
                // Chunked: up to the last chunk and the empty trailer.
                let end = loop {
                    if let Some(i) = self.buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                        break i;
                    }
                    self.fill().await;
                };
                self.buf.drain(..end + 5);
            }
        }
        (status, headers)
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the gateway closed the keep-alive connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_added_by_a_reload_serves_at_once_on_an_open_connection() {
    let (a, b) = (
        TestUpstream::named("a").await,
        TestUpstream::named("b").await,
    );
    let before = GatewaySpec::new()
        .cookie_secure(false)
        .upstream("a", &[&a.url()])
        .route("/public/", "a", "none");
    let after = before
        .clone()
        .upstream("b", &[&b.url()])
        .route("/api/", "b", "none");
    let live = Live::start(|dir| text(dir, &before, "", "")).await;
    let mut conn = KeepAlive::open(live.running.addr()).await;
    let (status, _) = conn.get("/api/x").await;
    assert_eq!(status, 404, "no route yet");

    live.write(|dir| text(dir, &after, "", ""));
    let changed = live.reload_ok().await;
    assert_eq!(
        changed,
        vec![
            "upstreams: added b".to_string(),
            "routes: added /api/".to_string()
        ]
    );
    // The same connection's next request is routed by the new config.
    let (status, headers) = conn.get("/api/x").await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-upstream-name"), Some("b"));
    let (status, headers) = conn.get("/public/x").await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-upstream-name"), Some("a"));
    assert_eq!(
        live.metric("sessiongate_config_reloads_total{result=\"ok\"}")
            .await,
        Some(1)
    );

    // Removed again: 404 at once.
    live.write(|dir| text(dir, &before, "", ""));
    assert_eq!(
        live.reload_ok().await,
        vec![
            "upstreams: removed b".to_string(),
            "routes: removed /api/".to_string()
        ]
    );
    assert_eq!(conn.get("/api/x").await.0, 404);
    live.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_auth_mode_and_the_session_settings_change_live() {
    let upstream = TestUpstream::start().await;
    let spec = |auth: &str| {
        GatewaySpec::new()
            .cookie_secure(false)
            .upstream("app", &[&upstream.url()])
            .route("/public/", "app", "none")
            .route("/", "app", auth)
    };
    let live = Live::start(|dir| text(dir, &spec("none"), "", "")).await;
    let token = live.login("alice").await;
    assert_eq!(live.get("/doc", None).await.status(), 200);
    let echo = harness::echo_of(live.get("/doc", Some(&token)).await).await;
    assert_eq!(
        harness::seen(&echo, "x-user-id"),
        None,
        "auth none: no identity"
    );

    live.write(|dir| text(dir, &spec("required"), "", "user_header = \"x-who\""));
    assert_eq!(
        live.reload_ok().await,
        vec![
            "routes: changed /".to_string(),
            "session: user_header".to_string()
        ]
    );
    harness::expect_401(live.get("/doc", None).await).await;
    let echo = harness::echo_of(live.get("/doc", Some(&token)).await).await;
    assert_eq!(harness::seen(&echo, "x-who"), Some("alice"));
    assert_eq!(harness::seen(&echo, "x-user-id"), None);
    // The new name is the gateway's now: a client's copy of it is dropped.
    let resp = live
        .client
        .get(format!("{}/doc", live.base))
        .header("cookie", harness::cookie(&token))
        .header("x-who", "mallory")
        .send()
        .await
        .unwrap();
    let echo = harness::echo_of(resp).await;
    assert_eq!(harness::seen(&echo, "x-who"), Some("alice"));

    // The admin API creates sessions with the reloaded settings too.
    live.write(|dir| {
        text(
            dir,
            &spec("required"),
            "",
            "user_header = \"x-who\"\ndefault_ttl_seconds = 120",
        )
    });
    assert_eq!(
        live.reload_ok().await,
        vec!["session: default_ttl_seconds".to_string()]
    );
    let created: Value = live
        .client
        .post(format!("{}/v1/sessions", live.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({ "user_id": "bob" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let millis = |v: &Value| {
        let t = humantime::parse_rfc3339(v.as_str().expect("a time")).expect("RFC 3339");
        t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
    };
    let lifetime = millis(&created["expires_at"]) - millis(&created["created_at"]);
    assert!(
        (119_000..=121_000).contains(&lifetime),
        "lifetime {lifetime} ms: {created}"
    );
    live.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_need_a_restart_are_refused_by_name_and_the_old_config_serves() {
    let upstream = TestUpstream::start().await;
    let spec = GatewaySpec::new()
        .cookie_secure(false)
        .upstream("app", &[&upstream.url()])
        .route("/public/", "app", "none");
    let with_api = spec.clone().route("/api/", "app", "none");
    let live = Live::start(|dir| text(dir, &spec, "", "")).await;
    let port = harness::free_port();
    for (server, session, key) in [
        (
            format!("listen = \"127.0.0.1:{port}\""),
            "",
            "server.listen",
        ),
        (
            "worker_threads = 3".to_string(),
            "",
            "server.worker_threads",
        ),
        (
            "max_connections = 7".to_string(),
            "",
            "server.max_connections",
        ),
        (
            String::new(),
            "token_secret = \"0123456789abcdef0123456789abcdef\"",
            "session.token_secret",
        ),
    ] {
        // The route added alongside is not served either: all or nothing.
        live.write(|dir| {
            let text = text(dir, &with_api, "", session);
            if server.starts_with("listen") {
                text.replacen("listen = \"127.0.0.1:0\"", &server, 1)
            } else {
                text.replacen("[server]\n", &format!("[server]\n{server}\n"), 1)
            }
        });
        let err = harness::expect_error(live.reload().await, 422).await;
        assert_eq!(err["code"], "restart_required", "{err}");
        let message = err["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{key} changed: restart to apply")),
            "{message}"
        );
        assert_eq!(live.get("/api/x", None).await.status(), 404, "{key}");
        assert_eq!(live.get("/public/x", None).await.status(), 200, "{key}");
    }
    // Two at once: both named.
    live.write(|dir| {
        text(dir, &with_api, "max_connections = 7", "").replacen(
            "[store]\n",
            "[store]\nredis_prefix = \"other:\"\n",
            1,
        )
    });
    let err = harness::expect_error(live.reload().await, 422).await;
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("server.max_connections, store.redis_prefix changed"),
        "{message}"
    );
    assert_eq!(
        live.metric("sessiongate_config_reloads_total{result=\"restart_required\"}")
            .await,
        Some(5)
    );
    // Put back, the file reloads.
    live.write(|dir| text(dir, &with_api, "", ""));
    live.reload_ok().await;
    assert_eq!(live.get("/api/x", None).await.status(), 200);
    live.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_refused_with_its_error_and_the_old_config_serves() {
    let upstream = TestUpstream::start().await;
    let spec = GatewaySpec::new()
        .cookie_secure(false)
        .upstream("app", &[&upstream.url()])
        .route("/public/", "app", "none");
    let live = Live::start(|dir| text(dir, &spec, "", "")).await;
    let broken_route = spec.clone().route("/api/", "nowhere", "none");
    for (make, expect) in [
        (
            Box::new(|dir: &Path| text(dir, &broken_route, "", "")) as Box<dyn Fn(&Path) -> String>,
            "nowhere",
        ),
        (
            Box::new(|dir: &Path| text(dir, &spec, "", "no_such_key = 1")),
            "no_such_key",
        ),
        (
            Box::new(|_: &Path| "[server\nlisten = ".to_string()),
            "gateway.toml",
        ),
        (
            Box::new(|dir: &Path| text(dir, &spec, "", "user_header = \"bad header\"")),
            "session.user_header",
        ),
    ] {
        live.write(make);
        let err = harness::expect_error(live.reload().await, 422).await;
        assert_eq!(err["code"], "invalid_config", "{err}");
        let message = err["message"].as_str().unwrap();
        assert!(message.contains(expect), "{expect}: {message}");
        assert!(message.ends_with("the previous config stays in service"));
        assert_eq!(live.get("/public/x", None).await.status(), 200);
    }
    std::fs::remove_file(&live.path).unwrap();
    let err = harness::expect_error(live.reload().await, 422).await;
    assert_eq!(err["code"], "invalid_config", "{err}");
    assert_eq!(live.get("/public/x", None).await.status(), 200);
    assert_eq!(
        live.metric("sessiongate_config_reloads_total{result=\"invalid\"}")
            .await,
        Some(5)
    );
    // Only the admin token reloads.
    let resp = live
        .client
        .post(format!("{}/v1/config/reload", live.admin))
        .send()
        .await
        .unwrap();
    harness::expect_error(resp, 401).await;
    let resp = live
        .client
        .get(format!("{}/v1/config/reload", live.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    harness::expect_error(resp, 405).await;
    live.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_answers_by_the_reloaded_routes() {
    let upstream = TestUpstream::start().await;
    let spec = GatewaySpec::new()
        .cookie_secure(false)
        .upstream("app", &[&upstream.url()])
        .route("/public/", "app", "none")
        .route("/", "app", "required");
    let with_api = spec.clone().route("/api/", "app", "none");
    let fa = |listen: &str| format!("\n[forward_auth]\nlisten = {listen:?}\ncaller = \"nginx\"\n");
    let live = Live::start(|dir| text(dir, &spec, "", "") + &fa("127.0.0.1:0")).await;
    let addr = live.running.forward_auth_addr().expect("[forward_auth]");
    let ask = |path: &'static str| {
        let client = live.client.clone();
        async move {
            client
                .get(format!("http://{addr}/auth"))
                .header("x-original-uri", path)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        ask("/api/x").await,
        401,
        "the catch-all route needs a session"
    );
    live.write(|dir| text(dir, &with_api, "", "") + &fa("127.0.0.1:0"));
    assert_eq!(
        live.reload_ok().await,
        vec!["routes: added /api/".to_string()]
    );
    assert_eq!(ask("/api/x").await, 200, "the new route lets it through");
    // Its listener is set up once.
    let port = harness::free_port();
    live.write(|dir| text(dir, &spec, "", "") + &fa(&format!("127.0.0.1:{port}")));
    let err = harness::expect_error(live.reload().await, 422).await;
    assert_eq!(err["code"], "restart_required");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .starts_with("forward_auth.listen changed"),
        "{err}"
    );
    assert_eq!(ask("/api/x").await, 200, "the old config still answers");
    live.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_upstream_keeps_its_pooled_connection() {
    let (a, b, c) = (
        TestUpstream::named("a").await,
        TestUpstream::named("b").await,
        TestUpstream::named("c").await,
    );
    let spec = |b_url: &str, a_timeout: Option<u64>| {
        let mut spec = GatewaySpec::new()
            .cookie_secure(false)
            .upstream("b", &[b_url])
            .upstream("a", &[&a.url()])
            .route("/a/", "a", "none")
            .route("/b/", "b", "none");
        spec.upstreams[1].timeout_ms = a_timeout;
        spec
    };
    let live = Live::start(|dir| text(dir, &spec(&b.url(), None), "", "")).await;
    for _ in 0..3 {
        assert_eq!(live.get("/a/x", None).await.status(), 200);
    }
    assert_eq!(a.connections(), 1, "one pooled connection");

    // b changes its URL (and moves in the file); a is untouched.
    live.write(|dir| {
        let mut s = spec(&c.url(), None);
        s.upstreams.reverse();
        text(dir, &s, "", "")
    });
    assert_eq!(
        live.reload_ok().await,
        vec!["upstreams: changed b (new pool)".to_string()]
    );
    for _ in 0..3 {
        assert_eq!(live.get("/a/x", None).await.status(), 200);
    }
    assert_eq!(a.connections(), 1, "a's pool was kept");
    let resp = live.get("/b/x", None).await;
    assert_eq!(
        resp.headers()["x-upstream-name"].to_str().unwrap(),
        "c",
        "b goes to its new URL"
    );

    // a's own settings change: a new pool, so a new connection.
    live.write(|dir| text(dir, &spec(&c.url(), Some(5_000)), "", ""));
    assert_eq!(
        live.reload_ok().await,
        vec!["upstreams: changed a (new pool)".to_string()]
    );
    assert_eq!(live.get("/a/x", None).await.status(), 200);
    assert_eq!(a.connections(), 2, "a changed upstream gets a new pool");
    live.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_is_watched_with_plugins_watch() {
    let upstream = TestUpstream::start().await;
    let spec = GatewaySpec::new()
        .cookie_secure(false)
        .upstream("app", &[&upstream.url()])
        .route("/public/", "app", "none");
    let with_api = spec.clone().route("/api/", "app", "none");
    let watch = "\n[plugins]\nwatch = true\nwatch_interval_ms = 50\n";
    let live = Live::start(|dir| text(dir, &spec, "", "") + watch).await;
    assert_eq!(live.get("/api/x", None).await.status(), 404);
    live.write(|dir| text(dir, &with_api, "", "") + watch);
    let deadline = Instant::now() + Duration::from_secs(10);
    while live.get("/api/x", None).await.status() != 200 {
        assert!(Instant::now() < deadline, "the watcher never reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    live.shutdown().await;
}

/// `server.worker_threads` left unset: the binary makes it one per core,
/// and the same unset file reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_of_the_running_binary() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (harness::free_port(), harness::free_port());
    let config_for = |spec: &GatewaySpec| {
        let db = format!("sqlite://{}/sg.db", dir.path().display());
        spec.to_toml(
            &db,
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.1:{admin_port}"),
        )
    };
    let spec = GatewaySpec::new()
        .cookie_secure(false)
        .upstream("app", &[&upstream.url()])
        .route("/public/", "app", "none");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config_for(&spec)).unwrap();
    let mut serve = harness::ServeProcess::spawn(dir.path(), &path);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    serve.wait_listening(addr, Duration::from_secs(30)).await;
    let client = harness::client();
    let url = format!("http://{addr}/api/x");
    assert_eq!(client.get(&url).send().await.unwrap().status(), 404);

    std::fs::write(
        &path,
        config_for(&spec.clone().route("/api/", "app", "none")),
    )
    .unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &serve.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(&url).send().await.unwrap().status() != 200 {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload:\n{}",
            serve.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        serve.output().contains("config reloaded"),
        "{}",
        serve.output()
    );
    let _ = Command::new("kill")
        .args(["-TERM", &serve.pid().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(status) = serve.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "exit status {exit}");
}

/// Clients hammer the gateway over keep-alive connections while the
/// config is reloaded `RELOADS` times, between two configs that differ in
/// a route and in the identity header's name: every response is the old
/// config's or the new one's, whole, and none fails.
async fn reloads_under_load(workers: usize) {
    const RELOADS: usize = 20;
    const CLIENTS: usize = 4;
    let upstream = TestUpstream::start().await;
    let spec = |only: &str| {
        GatewaySpec::new()
            .cookie_secure(false)
            .upstream("app", &[&upstream.url()])
            .route("/public/", "app", "none")
            .route(only, "app", "none")
            .route("/doc", "app", "required")
    };
    let config = |dir: &Path, even: bool| {
        let (only, header) = if even {
            ("/only-a/", "x-user-a")
        } else {
            ("/only-b/", "x-user-b")
        };
        text(
            dir,
            &spec(only),
            &format!("worker_threads = {workers}"),
            &format!("user_header = {header:?}"),
        )
    };
    let live = Live::start(|dir| config(dir, true)).await;
    let token = live.login("alice").await;

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let loops: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (client, base, token, stop, served) = (
                harness::client(),
                live.base.clone(),
                token.clone(),
                stop.clone(),
                served.clone(),
            );
            tokio::spawn(async move {
                let mut bad = Vec::new();
                let mut seen = 0usize;
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && seen < 20_000 && Instant::now() < deadline {
                    // Half the clients ask for the route that comes and
                    // goes, half for the one whose identity header does.
                    let path = if i % 2 == 0 { "/doc" } else { "/only-a/doc" };
                    let outcome = match client
                        .get(format!("{base}{path}"))
                        .header("cookie", harness::cookie(&token))
                        .send()
                        .await
                    {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let body = resp.text().await.unwrap_or_default();
                            Ok((status, body))
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    seen += 1;
                    served.fetch_add(1, Ordering::Relaxed);
                    match (path, outcome) {
                        ("/doc", Ok((200, body))) => {
                            let echo: Value = serde_json::from_str(&body).unwrap();
                            let a = harness::seen(&echo, "x-user-a");
                            let b = harness::seen(&echo, "x-user-b");
                            // One config's header, never both or neither.
                            if !matches!((a, b), (Some("alice"), None) | (None, Some("alice"))) {
                                bad.push(format!("identity {a:?} {b:?}"));
                            }
                        }
                        // Config A's route, or no route in config B.
                        ("/only-a/doc", Ok((200 | 404, _))) => {}
                        (_, Ok((status, body))) => bad.push(format!("{path} {status} {body}")),
                        (_, Err(e)) => bad.push(format!("{path} {e}")),
                    }
                }
                (seen, bad)
            })
        })
        .collect();

    let wait_for_requests = |n: usize| {
        let served = served.clone();
        async move {
            let target = served.load(Ordering::Relaxed) + n;
            let deadline = Instant::now() + Duration::from_secs(10);
            while served.load(Ordering::Relaxed) < target {
                assert!(Instant::now() < deadline, "the clients stalled");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    wait_for_requests(50).await;
    for i in 1..=RELOADS {
        live.write(|dir| config(dir, i % 2 == 0));
        let changed = live.reload_ok().await;
        assert_eq!(changed.len(), 2, "{changed:?}");
        // Requests run on each config before the next swap.
        wait_for_requests(20).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for handle in loops {
        let (seen, bad) = handle.await.unwrap();
        assert!(bad.is_empty(), "failed or mixed responses: {bad:?}");
        total += seen;
    }
    assert!(total > 50 + RELOADS * 20, "{total} requests");
    // On the last config (even: /only-a/ served, x-user-a set).
    let echo = harness::echo_of(live.get("/doc", Some(&token)).await).await;
    assert_eq!(harness::seen(&echo, "x-user-a"), Some("alice"));
    assert_eq!(live.get("/only-a/doc", None).await.status(), 200);
    assert_eq!(live.get("/only-b/doc", None).await.status(), 404);
    assert_eq!(
        live.metric("sessiongate_config_reloads_total{result=\"ok\"}")
            .await,
        Some(RELOADS as u64)
    );
    // The one upstream never changed: its pools stayed warm, so the load
    // needed about one connection per client connection and worker, not
    // one per reload.
    assert!(
        upstream.connections() <= CLIENTS * workers + 2,
        "{} upstream connections",
        upstream.connections()
    );
    live.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_fails_no_request() {
    reloads_under_load(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_fails_no_request_with_two_workers() {
    reloads_under_load(2).await;
}
