//! Shared fixtures for the integration suite: a real upstream server and a
//! gateway under test, both on loopback sockets bound to port 0.
//!
//! * [`TestUpstream`] is a small hyper 1 server. Requests are dispatched on
//!   the **last path segment**, so the same endpoint is reachable below any
//!   route prefix (`/public/login`, `/slow`, `/api/slow` ...):
//!   - `login?user=U[&attrs=<urlencoded JSON>]` → echo + `x-sessiongate-login: U`
//!     (+ `x-sessiongate-attributes`)
//!   - `logout?scope=current|all` → echo + `x-sessiongate-logout: <scope>`
//!   - `slow?ms=N` → waits N ms, then echo
//!   - `upload` → streams the body through SHA-256: `{"len", "sha256"}`
//!   - `download?bytes=N[&pause_ms=M][&fail_after=K]` → N bytes of
//!     [`PseudoRandom`] in 64 KiB chunks (pausing M ms after the first
//!     chunk; breaking the connection after K chunks)
//!   - `hop-response` → echo, with hop-by-hop headers in the response
//!   - `ws[?login=U]` (upgrade requests only) → WebSocket echo; the 101
//!     carries `x-seen-user-id` (the `x-user-id` it got) and, with `login`,
//!     `x-sessiongate-login: U`
//!   - anything else → 200 `{"method","path","query","headers","body"}`
//!
//!   Every response carries `x-upstream-name` when the upstream has a name.
//! * [`GatewayUnderTest`] runs `sessiongate::server::start` on a config
//!   built from a [`GatewaySpec`], with its SQLite file in a temp dir.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sessiongate::config::Config;
use sessiongate::server::{self, RunningGateway};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// The admin token every test gateway uses.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// The session cookie's (default) name.
pub const COOKIE: &str = "sg_session";
/// Chunk size of `/download`.
pub const DOWNLOAD_CHUNK: usize = 64 * 1024;

// ---------------------------------------------------------------------------
// Deterministic bytes, hex, URL encoding
// ---------------------------------------------------------------------------

/// xorshift64 seeded with 1; the byte stream does not depend on how it is
/// cut into chunks, so both ends can compute the same SHA-256.
pub struct PseudoRandom {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Default for PseudoRandom {
    fn default() -> Self {
        Self::new()
    }
}

impl PseudoRandom {
    pub fn new() -> PseudoRandom {
        PseudoRandom {
            state: 1,
            word: [0; 8],
            used: 8,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf.iter_mut() {
            if self.used == 8 {
                let mut x = self.state;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.state = x;
                self.word = x.to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }

    /// The next `len` bytes.
    pub fn chunk(&mut self, len: usize) -> Bytes {
        let mut buf = vec![0u8; len];
        self.fill(&mut buf);
        Bytes::from(buf)
    }

    /// (length, hex SHA-256) of the first `n` bytes of the stream.
    pub fn digest_of_first(n: usize) -> (usize, String) {
        let mut rng = PseudoRandom::new();
        let mut hasher = Sha256::new();
        let mut left = n;
        let mut buf = vec![0u8; DOWNLOAD_CHUNK];
        while left > 0 {
            let len = left.min(buf.len());
            rng.fill(&mut buf[..len]);
            hasher.update(&buf[..len]);
            left -= len;
        }
        (n, hex(&hasher.finalize()))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (url_decode(k), url_decode(v)),
            None => (url_decode(pair), String::new()),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The upstream test server
// ---------------------------------------------------------------------------

type UpBody = UnsyncBoxBody<Bytes, std::io::Error>;

struct UpstreamState {
    name: Option<String>,
    hits: AtomicUsize,
    connections: AtomicUsize,
    /// Bytes `/upload` has received so far, over all requests.
    uploaded: AtomicUsize,
    /// TLS: the SNI of each completed handshake ("" when none was sent).
    server_names: std::sync::Mutex<Vec<String>>,
}

/// A real HTTP/1.1 upstream on 127.0.0.1:<random port>.
pub struct TestUpstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    accept: JoinHandle<()>,
}

impl TestUpstream {
    pub async fn start() -> TestUpstream {
        Self::spawn(None).await
    }

    /// An upstream that answers with `x-upstream-name: <name>`.
    pub async fn named(name: &str) -> TestUpstream {
        Self::spawn(Some(name.to_string())).await
    }

    /// The same upstream over TLS (HTTPS), with `acceptor`'s certificate
    /// and client-certificate rules; [`TestUpstream::connections`] counts
    /// TCP connections, handshakes that fail included.
    pub async fn start_tls(acceptor: tokio_rustls::TlsAcceptor) -> TestUpstream {
        Self::spawn_with(None, Some(acceptor)).await
    }

    async fn spawn(name: Option<String>) -> TestUpstream {
        Self::spawn_with(name, None).await
    }

    async fn spawn_with(
        name: Option<String>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            name,
            hits: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            uploaded: AtomicUsize::new(0),
            server_names: std::sync::Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn({
                        let st = st.clone();
                        move |req| upstream_handle(req, st.clone())
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http
                                .serve_connection(TokioIo::new(stream), svc)
                                .with_upgrades()
                                .await;
                        }
                        Some(acceptor) => {
                            let handshake = tokio::time::timeout(
                                Duration::from_secs(10),
                                acceptor.accept(stream),
                            );
                            let Ok(Ok(stream)) = handshake.await else {
                                return;
                            };
                            let sni = stream.get_ref().1.server_name().unwrap_or("").to_string();
                            st.server_names.lock().unwrap().push(sni);
                            let _ = http
                                .serve_connection(TokioIo::new(stream), svc)
                                .with_upgrades()
                                .await;
                        }
                    }
                });
            }
        });
        TestUpstream {
            addr,
            state,
            accept,
        }
    }

    /// `http://127.0.0.1:<port>`, for `upstreams[].urls`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Body bytes `/upload` has received so far (updated as they arrive).
    pub fn uploaded(&self) -> usize {
        self.state.uploaded.load(Ordering::SeqCst)
    }

    /// TLS: the server name (SNI) of every completed handshake so far.
    pub fn server_names(&self) -> Vec<String> {
        self.state.server_names.lock().unwrap().clone()
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A URL on loopback where nothing listens (a bound-then-dropped port).
pub fn closed_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().unwrap().port()
}

fn full(body: impl Into<Bytes>) -> UpBody {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn json_response(status: StatusCode, value: &Value) -> Response<UpBody> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(hyper::header::UPGRADE)
}

async fn upstream_handle(
    req: Request<Incoming>,
    st: Arc<UpstreamState>,
) -> Result<Response<UpBody>, Infallible> {
    st.hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    let params = parse_query(req.uri().query().unwrap_or(""));
    let endpoint = path.rsplit('/').next().unwrap_or("").to_string();
    let mut resp = match endpoint.as_str() {
        "upload" => upload(req.into_body(), &st).await,
        "download" => {
            let n = params
                .get("bytes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let pause = params
                .get("pause_ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let fail_after = params.get("fail_after").and_then(|v| v.parse().ok());
            download(n, pause, fail_after)
        }
        "ws" if is_upgrade(&req) => {
            let mut resp = websocket(req);
            if let Some(user) = params.get("login")
                && let Ok(v) = HeaderValue::from_str(user)
            {
                resp.headers_mut().insert("x-sessiongate-login", v);
            }
            resp
        }
        "slow" => {
            let ms = params.get("ms").and_then(|v| v.parse().ok()).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            echo(req).await
        }
        "login" => {
            let mut resp = echo(req).await;
            if let Some(user) = params.get("user")
                && let Ok(v) = HeaderValue::from_str(user)
            {
                resp.headers_mut().insert("x-sessiongate-login", v);
            }
            if let Some(attrs) = params.get("attrs")
                && let Ok(v) = HeaderValue::from_str(attrs)
            {
                resp.headers_mut().insert("x-sessiongate-attributes", v);
            }
            resp
        }
        "logout" => {
            let mut resp = echo(req).await;
            let scope = params
                .get("scope")
                .cloned()
                .unwrap_or_else(|| "current".into());
            if let Ok(v) = HeaderValue::from_str(&scope) {
                resp.headers_mut().insert("x-sessiongate-logout", v);
            }
            resp
        }
        "hop-response" => {
            let mut resp = echo(req).await;
            let h = resp.headers_mut();
            h.insert("connection", HeaderValue::from_static("x-upstream-hop"));
            h.insert("x-upstream-hop", HeaderValue::from_static("1"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert("x-upstream-kept", HeaderValue::from_static("1"));
            resp
        }
        _ => echo(req).await,
    };
    if let Some(name) = &st.name
        && let Ok(v) = HeaderValue::from_str(name)
    {
        resp.headers_mut().insert("x-upstream-name", v);
    }
    Ok(resp)
}

/// 200 `{"method","path","query","headers":{name: value},"body"}`;
/// repeated headers are joined with ", ".
async fn echo(req: Request<Incoming>) -> Response<UpBody> {
    let (parts, body) = req.into_parts();
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in parts.headers.iter() {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_string())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert(v);
    }
    let body = match body.collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(e) => format!("<body error: {e}>"),
    };
    json_response(
        StatusCode::OK,
        &json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query().unwrap_or(""),
            "headers": headers,
            "body": body,
        }),
    )
}

async fn upload(mut body: Incoming, st: &UpstreamState) -> Response<UpBody> {
    let mut hasher = Sha256::new();
    let mut len: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    len += data.len() as u64;
                    st.uploaded.fetch_add(data.len(), Ordering::SeqCst);
                }
            }
            Err(e) => {
                return json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({ "error": e.to_string(), "len": len }),
                );
            }
        }
    }
    json_response(
        StatusCode::OK,
        &json!({ "len": len, "sha256": hex(&hasher.finalize()) }),
    )
}

fn download(n: usize, pause_ms: u64, fail_after: Option<usize>) -> Response<UpBody> {
    struct St {
        rng: PseudoRandom,
        left: usize,
        sent: usize,
    }
    let start = St {
        rng: PseudoRandom::new(),
        left: n,
        sent: 0,
    };
    let stream = futures_util::stream::unfold(start, move |mut st| async move {
        if st.left == 0 {
            return None;
        }
        if fail_after == Some(st.sent) {
            // The stream breaks: hyper aborts the connection mid-body.
            st.left = 0;
            return Some((Err(std::io::Error::other("upstream broke off")), st));
        }
        if st.sent == 1 && pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        }
        let len = st.left.min(DOWNLOAD_CHUNK);
        let chunk = st.rng.chunk(len);
        st.left -= len;
        st.sent += 1;
        Some((Ok::<_, std::io::Error>(Frame::data(chunk)), st))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

fn websocket(mut req: Request<Incoming>) -> Response<UpBody> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return json_response(StatusCode::BAD_REQUEST, &json!({"error": "no key"}));
    };
    let seen_user = req.headers().get("x-user-id").cloned();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        hyper::header::UPGRADE,
        HeaderValue::from_static("websocket"),
    );
    h.insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&derive_accept_key(key.as_bytes())).unwrap(),
    );
    if let Some(user) = seen_user {
        h.insert(HeaderName::from_static("x-seen-user-id"), user);
    }
    resp
}

// ---------------------------------------------------------------------------
// The gateway under test
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct UpstreamSpec {
    pub name: String,
    pub urls: Vec<String>,
    pub timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub prefix: String,
    pub upstream: String,
    pub auth: String,
    pub login_redirect: Option<String>,
    /// `max_body_bytes` when set.
    pub max_body_bytes: Option<u64>,
}

/// What goes into the gateway's TOML (besides listeners and the store,
/// which the harness fills in).
#[derive(Debug, Clone)]
pub struct GatewaySpec {
    pub upstreams: Vec<UpstreamSpec>,
    pub routes: Vec<RouteSpec>,
    pub cookie_secure: bool,
    pub default_ttl_seconds: Option<u64>,
    pub token_secret: Option<String>,
    pub shutdown_grace_ms: Option<u64>,
    /// Raw TOML appended at the end.
    pub extra: String,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewaySpec {
    /// No upstreams or routes yet; `cookie_secure = true`.
    pub fn new() -> GatewaySpec {
        GatewaySpec {
            upstreams: Vec::new(),
            routes: Vec::new(),
            cookie_secure: true,
            default_ttl_seconds: None,
            token_secret: None,
            shutdown_grace_ms: None,
            extra: String::new(),
        }
    }

    /// Upstream `app` at `url` and the routes
    /// `/public/` (none), `/opt/` (optional), `/web/` (required, browsers
    /// redirected to `/login`) and `/` (required).
    pub fn standard(url: &str) -> GatewaySpec {
        GatewaySpec::new()
            .upstream("app", &[url])
            .route("/public/", "app", "none")
            .route("/opt/", "app", "optional")
            .route_with_redirect("/web/", "app", "/login")
            .route("/", "app", "required")
    }

    pub fn upstream(mut self, name: &str, urls: &[&str]) -> Self {
        self.upstreams.push(UpstreamSpec {
            name: name.into(),
            urls: urls.iter().map(|u| u.to_string()).collect(),
            timeout_ms: None,
            connect_timeout_ms: None,
        });
        self
    }

    pub fn upstream_with_timeout(mut self, name: &str, urls: &[&str], timeout_ms: u64) -> Self {
        self = self.upstream(name, urls);
        self.upstreams.last_mut().unwrap().timeout_ms = Some(timeout_ms);
        self
    }

    pub fn route(mut self, prefix: &str, upstream: &str, auth: &str) -> Self {
        self.routes.push(RouteSpec {
            prefix: prefix.into(),
            upstream: upstream.into(),
            auth: auth.into(),
            login_redirect: None,
            max_body_bytes: None,
        });
        self
    }

    /// A required route whose browsers are redirected to `location`.
    pub fn route_with_redirect(mut self, prefix: &str, upstream: &str, location: &str) -> Self {
        self.routes.push(RouteSpec {
            prefix: prefix.into(),
            upstream: upstream.into(),
            auth: "required".into(),
            login_redirect: Some(location.into()),
            max_body_bytes: None,
        });
        self
    }

    pub fn cookie_secure(mut self, secure: bool) -> Self {
        self.cookie_secure = secure;
        self
    }

    pub fn ttl_seconds(mut self, ttl: u64) -> Self {
        self.default_ttl_seconds = Some(ttl);
        self
    }

    pub fn token_secret(mut self, secret: &str) -> Self {
        self.token_secret = Some(secret.into());
        self
    }

    pub fn shutdown_grace_ms(mut self, ms: u64) -> Self {
        self.shutdown_grace_ms = Some(ms);
        self
    }

    /// The whole config file.
    pub fn to_toml(&self, database_url: &str, listen: &str, admin_listen: &str) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap(); // a valid TOML basic string
        let mut t = String::new();
        t.push_str(&format!("[server]\nlisten = {}\n", q(listen)));
        if let Some(ms) = self.shutdown_grace_ms {
            t.push_str(&format!("shutdown_grace_ms = {ms}\n"));
        }
        t.push_str(&format!(
            "\n[admin]\nlisten = {}\ntoken = {}\n",
            q(admin_listen),
            q(ADMIN_TOKEN)
        ));
        t.push_str(&format!("\n[store]\ndatabase_url = {}\n", q(database_url)));
        t.push_str(&format!(
            "\n[session]\ncookie_secure = {}\n",
            self.cookie_secure
        ));
        if let Some(ttl) = self.default_ttl_seconds {
            t.push_str(&format!("default_ttl_seconds = {ttl}\n"));
        }
        if let Some(secret) = &self.token_secret {
            t.push_str(&format!("token_secret = {}\n", q(secret)));
        }
        for u in &self.upstreams {
            let urls: Vec<String> = u.urls.iter().map(|s| q(s)).collect();
            t.push_str(&format!(
                "\n[[upstreams]]\nname = {}\nurls = [{}]\n",
                q(&u.name),
                urls.join(", ")
            ));
            if let Some(ms) = u.timeout_ms {
                t.push_str(&format!("timeout_ms = {ms}\n"));
            }
            if let Some(ms) = u.connect_timeout_ms {
                t.push_str(&format!("connect_timeout_ms = {ms}\n"));
            }
        }
        for r in &self.routes {
            t.push_str(&format!(
                "\n[[routes]]\nprefix = {}\nupstream = {}\nauth = {}\n",
                q(&r.prefix),
                q(&r.upstream),
                q(&r.auth)
            ));
            if let Some(loc) = &r.login_redirect {
                t.push_str(&format!("login_redirect = {}\n", q(loc)));
            }
            if let Some(max) = r.max_body_bytes {
                t.push_str(&format!("max_body_bytes = {max}\n"));
            }
        }
        if !self.extra.is_empty() {
            t.push('\n');
            t.push_str(&self.extra);
            t.push('\n');
        }
        t
    }
}

/// The SQLite URL of `sg.db` in `dir`.
pub fn database_url(dir: &TempDir) -> String {
    format!("sqlite://{}/sg.db", dir.path().display())
}

/// A reqwest client for tests: no proxy, no redirects, bounded time.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// A gateway started in-process on 127.0.0.1:0 with its own SQLite file.
pub struct GatewayUnderTest {
    running: Option<RunningGateway>,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub spec: GatewaySpec,
    pub dir: TempDir,
    pub client: reqwest::Client,
}

impl GatewayUnderTest {
    pub async fn start(spec: GatewaySpec) -> GatewayUnderTest {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(spec, dir).await
    }

    /// Starts with the config text passed through `edit` first (to add
    /// keys to tables the spec writes).
    pub async fn start_with(
        spec: GatewaySpec,
        edit: impl FnOnce(String) -> String,
    ) -> GatewayUnderTest {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_edited(spec, dir, edit).await
    }

    /// Starts on the SQLite file already in `dir` (or a new one).
    pub async fn start_in(spec: GatewaySpec, dir: TempDir) -> GatewayUnderTest {
        Self::start_edited(spec, dir, |text| text).await
    }

    async fn start_edited(
        spec: GatewaySpec,
        dir: TempDir,
        edit: impl FnOnce(String) -> String,
    ) -> GatewayUnderTest {
        let text = edit(spec.to_toml(&database_url(&dir), "127.0.0.1:0", "127.0.0.1:0"));
        let config = Config::from_toml_str(&text)
            .unwrap_or_else(|e| panic!("test config rejected: {e}\n---\n{text}"));
        let running = server::start(config)
            .await
            .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
        let addr = running.addr();
        let admin_addr = running.admin_addr().expect("[admin] is configured");
        GatewayUnderTest {
            running: Some(running),
            addr,
            admin_addr,
            spec,
            dir,
            client: client(),
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    /// Shuts down gracefully; returns the directory holding the SQLite file.
    pub async fn shutdown(mut self) -> TempDir {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        self.dir
    }

    /// The forward-auth listener (`[forward_auth]`).
    pub fn forward_auth_addr(&self) -> Option<SocketAddr> {
        self.running.as_ref().and_then(|r| r.forward_auth_addr())
    }

    /// The plain-HTTP redirect listener (`server.tls.redirect_listen`).
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.running.as_ref().and_then(|r| r.redirect_addr())
    }

    /// The running gateway itself (for shutdown tests).
    pub fn take_running(&mut self) -> RunningGateway {
        self.running.take().expect("gateway is running")
    }

    /// Shuts down and starts again on the same SQLite file and spec.
    pub async fn restart(self) -> GatewayUnderTest {
        let spec = self.spec.clone();
        let dir = self.shutdown().await;
        Self::start_in(spec, dir).await
    }

    /// `GET /public/login?user=..[&attrs=..]`, optionally presenting a token.
    pub async fn login_response(
        &self,
        user: &str,
        attrs: Option<&str>,
        presenting: Option<&str>,
    ) -> reqwest::Response {
        let mut path = format!("/public/login?user={}", url_encode(user));
        if let Some(attrs) = attrs {
            path.push_str(&format!("&attrs={}", url_encode(attrs)));
        }
        let mut req = self.client.get(self.url(&path));
        if let Some(token) = presenting {
            req = req.header("cookie", cookie(token));
        }
        req.send().await.expect("login request")
    }

    /// Logs `user` in through the upstream and returns the session token.
    pub async fn login(&self, user: &str) -> String {
        let resp = self.login_response(user, None, None).await;
        assert_eq!(resp.status(), 200, "login through the gateway");
        set_cookie(resp.headers(), COOKIE)
            .expect("login response sets the session cookie")
            .value
    }

    /// GET with the session cookie (when given).
    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.client.get(self.url(path));
        if let Some(token) = token {
            req = req.header("cookie", cookie(token));
        }
        req.send().await.expect("request through the gateway")
    }

    /// The admin API's sessions of `user` (`GET /v1/users/{user}/sessions`).
    pub async fn admin_user_sessions(&self, user: &str) -> Vec<Value> {
        let resp = self
            .client
            .get(self.admin_url(&format!("/v1/users/{}/sessions", url_encode(user))))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin request");
        assert_eq!(resp.status(), 200, "admin list sessions");
        let v: Value = resp.json().await.expect("admin JSON");
        v["sessions"].as_array().cloned().unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------
// Client-side helpers
// ---------------------------------------------------------------------------

/// `sg_session=<token>`.
pub fn cookie(token: &str) -> String {
    format!("{COOKIE}={token}")
}

/// One parsed `Set-Cookie` header.
#[derive(Debug, Clone)]
pub struct SetCookie {
    pub raw: String,
    pub name: String,
    pub value: String,
    /// The attributes after the first `;`, trimmed, in order.
    pub attributes: Vec<String>,
}

impl SetCookie {
    pub fn has(&self, attribute: &str) -> bool {
        self.attributes
            .iter()
            .any(|a| a.eq_ignore_ascii_case(attribute))
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attributes.iter().find_map(|a| {
            let (k, v) = a.split_once('=')?;
            k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// Every `Set-Cookie` header, parsed.
pub fn set_cookies(headers: &reqwest::header::HeaderMap) -> Vec<SetCookie> {
    headers
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|raw| {
            let mut parts = raw.split(';');
            let (name, value) = parts.next()?.split_once('=')?;
            Some(SetCookie {
                raw: raw.to_string(),
                name: name.trim().to_string(),
                value: value.trim().to_string(),
                attributes: parts.map(|a| a.trim().to_string()).collect(),
            })
        })
        .collect()
}

/// The first `Set-Cookie` for cookie `name`.
pub fn set_cookie(headers: &reqwest::header::HeaderMap, name: &str) -> Option<SetCookie> {
    set_cookies(headers).into_iter().find(|c| c.name == name)
}

/// The upstream's echo of a request that went through.
pub async fn echo_of(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let text = resp.text().await.expect("response body");
    assert_eq!(status, 200, "expected the upstream's echo, got: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("echo is not JSON ({e}): {text}"))
}

/// A header as the upstream saw it.
pub fn seen<'a>(echo: &'a Value, name: &str) -> Option<&'a str> {
    echo["headers"][name].as_str()
}

/// Checks the contract's error response and returns its `error` object:
/// the status, a JSON content type, `{"error":{"code","message","request_id"}}`
/// with a snake_case code, a message, and the request id of the response.
pub async fn expect_error(resp: reqwest::Response, status: u16) -> Value {
    let got = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let header_id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.text().await.expect("error body");
    assert_eq!(got, status, "status; body: {text}");
    assert!(
        ctype.starts_with("application/json"),
        "error content-type is {ctype:?}; body: {text}"
    );
    let v: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("error body not JSON ({e}): {text}"));
    let err = v["error"].clone();
    let code = err["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no code: {text}"));
    assert!(
        !code.is_empty()
            && code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "code {code:?} is not snake_case"
    );
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message: {text}"
    );
    let id = err["request_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no request_id: {text}"));
    assert!(!id.is_empty(), "empty request_id");
    if let Some(header_id) = header_id {
        assert_eq!(id, header_id, "body request_id vs x-request-id header");
    }
    err
}

/// Like [`expect_error`] for a 401, also checking `WWW-Authenticate: Bearer`.
pub async fn expect_401(resp: reqwest::Response) -> Value {
    let www = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let err = expect_error(resp, 401).await;
    assert!(
        www.split_whitespace()
            .next()
            .is_some_and(|s| s.eq_ignore_ascii_case("bearer")),
        "WWW-Authenticate is {www:?}"
    );
    err
}

/// A raw HTTP/1.1 exchange: writes `request` as is and reads until the
/// server closes (send `Connection: close`). Returns status, headers
/// (lower-case names) and the (de-chunked) body.
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.expect("read");
        buf
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("raw exchange within 10 s");
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of response headers");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut body = buf[split + 4..].to_vec();
    let (status, headers) = parse_response_head(&head);
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    (status, headers, body)
}

/// The status and the headers (lower-case names) of a raw response head.
pub fn parse_response_head(head: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers)
}

/// The payload of a chunked body (chunk extensions ignored).
pub fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]).into_owned();
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

// ---------------------------------------------------------------------------
// Limits (sec_limits)
// ---------------------------------------------------------------------------

impl GatewaySpec {
    /// Sets `max_body_bytes` on the route with `prefix`.
    pub fn max_body_bytes(mut self, prefix: &str, max: u64) -> Self {
        let route = self
            .routes
            .iter_mut()
            .find(|r| r.prefix == prefix)
            .unwrap_or_else(|| panic!("no route {prefix}"));
        route.max_body_bytes = Some(max);
        self
    }
}

// ---------------------------------------------------------------------------
// Real origins for the security suite (installed by scripts/services.sh)
// ---------------------------------------------------------------------------

/// What nginx answers on `/secret` and `/secret/...`.
pub const NGINX_SECRET: &str = "NGINX-SECRET";
/// What nginx answers on everything under `/app/`.
pub const NGINX_APP_SECRET: &str = "NGINX-APP-SECRET";
/// What nginx answers under `/public/`.
pub const NGINX_PUBLIC: &str = "NGINX-PUBLIC";

/// A real nginx (Debian's package) on 127.0.0.1:<free port>, with a
/// generated config in a temp dir and otherwise shipped defaults
/// (`merge_slashes on`, its own URI decoding). Locations:
/// `= /secret` and `/secret/` → `NGINX-SECRET uri=<uri>`,
/// `/app/` → `NGINX-APP-SECRET uri=<uri>`,
/// `= /public/login?user=U` → `x-sessiongate-login: U`,
/// `/public/` → `NGINX-PUBLIC uri=<uri>`, `/` → `NGINX-HOME uri=<uri>`.
/// One process (`master_process off`), killed by pid on drop.
pub struct NginxOrigin {
    pub addr: SocketAddr,
    child: tokio::process::Child,
    dir: TempDir,
}

pub fn nginx_binary() -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("nginx"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([std::path::PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file())
        .expect("nginx is not installed: run scripts/services.sh")
}

fn nginx_config(dir: &std::path::Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"worker_processes 1;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port};
        location = /secret {{ return 200 "{NGINX_SECRET} uri=$uri\n"; }}
        location /secret/ {{ return 200 "{NGINX_SECRET} uri=$uri\n"; }}
        location /app/ {{ return 200 "{NGINX_APP_SECRET} uri=$uri\n"; }}
        location = /public/login {{
            add_header x-sessiongate-login $arg_user;
            return 200 "NGINX-LOGIN\n";
        }}
        location /public/ {{ return 200 "{NGINX_PUBLIC} uri=$uri\n"; }}
        location / {{ return 200 "NGINX-HOME uri=$uri\n"; }}
    }}
}}
"#
    )
}

/// Starts nginx (one process, no daemon) in `dir` with the config
/// `conf(port)` on a free loopback port, killed when the child is dropped.
/// The port is picked free and then bound by nginx: another test may take
/// it in between, so a bind failure is retried on a new port. Panics with
/// nginx's error log if it never listens.
pub async fn spawn_nginx(
    dir: &std::path::Path,
    conf: impl Fn(u16) -> String,
) -> (SocketAddr, tokio::process::Child) {
    let binary = nginx_binary();
    let global = format!(
        "daemon off; master_process off; pid {}/nginx.pid;",
        dir.display()
    );
    for _ in 0..5 {
        let port = free_port();
        let file = dir.join("nginx.conf");
        std::fs::write(&file, conf(port)).expect("write nginx.conf");
        let mut child = tokio::process::Command::new(&binary)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&file)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-g")
            .arg(&global)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nginx");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        if wait_listening(addr, &mut child).await {
            return (addr, child);
        }
    }
    let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
    panic!("nginx did not start (its modules installed? scripts/services.sh); error.log:\n{log}");
}

impl NginxOrigin {
    pub async fn start() -> NginxOrigin {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, child) = spawn_nginx(dir.path(), |port| nginx_config(dir.path(), port)).await;
        NginxOrigin { addr, child, dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// nginx's access log so far (for assertion messages).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for NginxOrigin {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Waits (up to 10 s) until `addr` accepts connections; false when the
/// child exited first (e.g. its port was taken).
pub async fn wait_listening(addr: SocketAddr, child: &mut tokio::process::Child) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.start_kill();
    false
}

/// Hypercorn serving `tests/origins/echo_asgi.py` on 127.0.0.1:<port it
/// picked>: HTTP/1.1, `Upgrade: h2c` and HTTP/2 with prior knowledge. Each
/// request is answered with, and logged as, a JSON echo of what the ASGI
/// server decoded (`method`, `path`, `raw_path`, `http_version`,
/// `headers` as `[name, value]` pairs, `environ` as CGI/WSGI would name
/// them); `/public/login?user=U` also answers `x-sessiongate-login: U`.
/// Killed by pid on drop.
pub struct H2cOrigin {
    pub addr: SocketAddr,
    child: tokio::process::Child,
    log: std::path::PathBuf,
    _dir: TempDir,
}

/// The Python with Hypercorn: scripts/services.sh's venv, else `python3`.
fn origin_python() -> std::path::PathBuf {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python");
    if venv.is_file() {
        venv
    } else {
        "python3".into()
    }
}

impl H2cOrigin {
    pub async fn start() -> H2cOrigin {
        use tokio::io::AsyncBufReadExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("seen.jsonl");
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/origins/echo_asgi.py");
        let mut child = tokio::process::Command::new(origin_python())
            .arg(&script)
            .arg("--log")
            .arg(&log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the Hypercorn origin (run scripts/services.sh)");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("Hypercorn origin printed its port within 20 s")
            .expect("read the origin's stdout")
            .expect("Hypercorn origin exited before listening (is hypercorn installed? run scripts/services.sh)");
        let port: u16 = first
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the origin: {first:?}"));
        H2cOrigin {
            addr: ([127, 0, 0, 1], port).into(),
            child,
            log,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request the origin has received so far, in order.
    pub fn seen(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The requests the origin received for exactly `path`.
    pub fn seen_path(&self, path: &str) -> Vec<Value> {
        self.seen()
            .into_iter()
            .filter(|r| r["path"] == path)
            .collect()
    }

    /// Waits (up to 10 s) until the origin has logged a request for `path`.
    pub async fn wait_for_path(&self, path: &str) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.seen_path(path).pop() {
                return Some(r);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for H2cOrigin {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The value of header `name` (case-insensitive) in an [`H2cOrigin`] echo's
/// `[name, value]` pairs, joined with ", " when repeated.
pub fn origin_header(seen: &Value, name: &str) -> Option<String> {
    let values: Vec<&str> = seen["headers"]
        .as_array()?
        .iter()
        .filter(|pair| {
            pair[0]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .filter_map(|pair| pair[1].as_str())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

// ---------------------------------------------------------------------------
// The gateway binary as a process of its own
// ---------------------------------------------------------------------------

/// `sessiongate serve --config CONFIG` run from `dir`, its stdout and
/// stderr in `dir/out.log`; killed on drop if still running (a failing
/// test must not leave it behind).
pub struct ServeProcess {
    child: std::process::Child,
    log_path: std::path::PathBuf,
}

impl ServeProcess {
    pub fn spawn(dir: &std::path::Path, config_path: &std::path::Path) -> ServeProcess {
        let log_path = dir.join("out.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_sessiongate"))
            .arg("serve")
            .arg("--config")
            .arg(config_path)
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn the sessiongate binary");
        ServeProcess { child, log_path }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process has logged so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The size of its log so far, without reading it.
    pub fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits until `addr` accepts connections; panics (with the log) if
    /// the process exits first or `within` passes.
    pub async fn wait_listening(&mut self, addr: SocketAddr, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while TcpStream::connect(addr).await.is_err() {
            if let Some(status) = self.try_wait() {
                panic!("sessiongate exited early with {status}:\n{}", self.output());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "sessiongate did not listen on {addr}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// A Redis Cluster of the test's own
// ---------------------------------------------------------------------------

/// One `redis-server` of a [`RedisCluster`].
pub struct ClusterNode {
    /// The client port; the cluster bus has a port of its own.
    pub port: u16,
    pub bus_port: u16,
    dir: TempDir,
    child: Option<std::process::Child>,
}

impl ClusterNode {
    fn launch(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-port", &self.bus_port.to_string()])
            .args([
                "--cluster-node-timeout",
                &CLUSTER_NODE_TIMEOUT_MS.to_string(),
            ])
            .arg("--cluster-config-file")
            .arg(self.dir.path().join("nodes.conf"))
            .args(["--appendonly", "yes", "--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts (scripts/services.sh installs it)");
        self.child = Some(child);
    }

    /// The process id while the node runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The node's own log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A node on fresh ports: a port that was free a moment ago may be
    /// taken meanwhile (by another test), so a few tries.
    async fn start_fresh() -> ClusterNode {
        let mut last_error = String::new();
        for _attempt in 0..5 {
            let mut node = ClusterNode {
                port: free_port(),
                bus_port: free_port(),
                dir: tempfile::tempdir().expect("tempdir"),
                child: None,
            };
            node.launch();
            match node.wait_up().await {
                Ok(()) => return node,
                Err(e) => {
                    node.kill();
                    last_error = e;
                }
            }
        }
        panic!("could not start a cluster node: {last_error}");
    }

    /// Waits (up to 10 s) until this very process answers on its port
    /// (`INFO server` names its pid: not another test's server that took
    /// the port); an error with its log if it exited (a port taken) or
    /// never answered.
    async fn wait_up(&mut self) -> Result<(), String> {
        let pid = self.pid().ok_or("not launched")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let info = redis_cli(self.port, &["INFO", "server"]);
            if info.contains(&format!("process_id:{pid}\r"))
                || info.contains(&format!("process_id:{pid}\n"))
            {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited with {status}:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "redis-server on port {} did not answer:\n{}",
                    self.port,
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `redis-cli -p PORT ARGS...`: its output (errors included, as the text
/// redis-cli prints).
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("redis-cli runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `cluster-node-timeout` of the test clusters: a killed primary's
/// replica takes over within a few seconds.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 2_000;

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeLine {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    /// A replica's primary.
    pub primary_id: Option<String>,
    pub failed: bool,
    /// Slot ranges served (a migration's `[a->-id]` marks left out).
    pub slots: Vec<(u16, u16)>,
}

impl NodeLine {
    /// `<id> <ip:port@bus> <flags> <primary> <ping> <pong> <epoch> <link> <slot>...`
    fn parse(line: &str) -> Option<NodeLine> {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            return None;
        }
        let flags: Vec<&str> = f[2].split(',').collect();
        let slots = f[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|n| (n, n)),
            })
            .collect();
        Some(NodeLine {
            id: f[0].to_string(),
            port: f[1].split(['@', ':']).nth(1)?.parse().ok()?,
            primary: flags.contains(&"master"),
            primary_id: (f[3] != "-").then(|| f[3].to_string()),
            failed: flags.contains(&"fail") || flags.contains(&"fail?"),
            slots,
        })
    }

    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }
}

/// A 6-node Redis Cluster (3 primaries, 3 replicas) on loopback ports,
/// each node with its own data directory (append-only file, nodes.conf);
/// every node is stopped by pid on drop.
pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until every node
    /// says `cluster_state:ok`.
    pub async fn start() -> RedisCluster {
        let mut cluster = RedisCluster { nodes: Vec::new() };
        for _ in 0..6 {
            cluster.nodes.push(ClusterNode::start_fresh().await);
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok(Duration::from_secs(30)).await;
        cluster
    }

    /// Waits until every running node says `cluster_state:ok` and knows
    /// every node, the running primaries serve all 16384 slots, and every
    /// running replica's link to its primary is up (a replica still in its
    /// first sync refuses a `CLUSTER FAILOVER`).
    pub async fn wait_ok(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let running: Vec<&ClusterNode> =
                self.nodes.iter().filter(|n| n.child.is_some()).collect();
            let ok = running.iter().all(|n| {
                let info = self.cli(n.port, &["CLUSTER", "INFO"]);
                let replication = self.cli(n.port, &["INFO", "replication"]);
                info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    && info.contains(&format!("cluster_known_nodes:{}", self.nodes.len()))
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            });
            if ok {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cluster is not ok after {within:?}: {}",
                running
                    .iter()
                    .map(|n| format!("\n{}: {}", n.port, self.cli(n.port, &["CLUSTER", "INFO"])))
                    .collect::<String>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `redis-cli -p PORT ARGS...`: its output (errors included, as the
    /// text redis-cli prints).
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        redis_cli(port, args)
    }

    /// The seed URLs (every node's).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(ClusterNode::url).collect()
    }

    /// `redis_cluster_urls = [...]` with every node as a seed.
    pub fn config_line(&self) -> String {
        let urls: Vec<String> = self.urls().iter().map(|u| format!("{u:?}")).collect();
        format!("redis_cluster_urls = [{}]", urls.join(", "))
    }

    /// The cluster as the node on `port` sees it (failed nodes included).
    pub fn nodes_seen_from(&self, port: u16) -> Vec<NodeLine> {
        self.cli(port, &["CLUSTER", "NODES"])
            .lines()
            .filter_map(NodeLine::parse)
            .collect()
    }

    /// The nodes that have not failed, as one running node sees them.
    fn topology(&self) -> Vec<NodeLine> {
        let Some(node) = self.nodes.iter().find(|n| n.child.is_some()) else {
            return Vec::new();
        };
        let mut nodes = self.nodes_seen_from(node.port);
        nodes.retain(|n| !n.failed);
        nodes
    }

    /// The ports of the primaries (that have not failed), ascending.
    pub fn primaries(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .topology()
            .into_iter()
            .filter(|n| n.primary)
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The port of a replica of the primary on `primary`.
    pub fn replica_of(&self, primary: u16) -> Option<u16> {
        let topology = self.topology();
        let id = &topology.iter().find(|n| n.port == primary)?.id;
        topology
            .iter()
            .find(|n| n.primary_id.as_ref() == Some(id))
            .map(|n| n.port)
    }

    /// `DBSIZE` on each primary, by port.
    pub fn keys_per_primary(&self) -> Vec<(u16, u64)> {
        self.primaries()
            .into_iter()
            .map(|port| {
                let n = self.cli(port, &["DBSIZE"]);
                let n = n
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("DBSIZE on {port}: {n}"));
                (port, n)
            })
            .collect()
    }

    /// Every key under `pattern` on every primary (`KEYS` acts on one node).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.primaries()
            .into_iter()
            .flat_map(|port| {
                self.cli(port, &["--scan", "--pattern", pattern])
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn node(&self, port: u16) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// Kills the node on `port` with SIGKILL (by its pid), as a crash would.
    pub fn kill(&mut self, port: u16) {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
            .kill();
    }

    /// The cluster node id of the node on `port`.
    pub fn node_id(&self, port: u16) -> String {
        self.cli(port, &["CLUSTER", "MYID"]).trim().to_string()
    }

    /// The hash slot of `key` (or of a channel name).
    pub fn slot_of(&self, key: &str) -> u16 {
        let port = self.primaries()[0];
        let out = self.cli(port, &["CLUSTER", "KEYSLOT", key]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key}: {out}"))
    }

    /// The port of the primary serving `slot`, per `CLUSTER NODES`.
    pub fn owner_of(&self, slot: u16) -> u16 {
        let port = self.primaries()[0];
        self.nodes_seen_from(port)
            .into_iter()
            .find(|n| n.primary && n.serves(slot))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no owner of slot {slot} seen from {port}"))
    }

    /// Moves one slot, with its keys, to the primary on `to` (the steps of
    /// a live reshard: IMPORTING/MIGRATING, `MIGRATE` in batches, then
    /// `SETSLOT NODE` on every primary). Returns how many keys moved.
    pub async fn move_slot(&self, slot: u16, to: u16) -> usize {
        let from = self.owner_of(slot);
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let slot_arg = slot.to_string();
        let ok = |port: u16, args: &[&str]| {
            let out = self.cli(port, args);
            assert_eq!(out.trim(), "OK", "{args:?} on {port}: {out}");
        };
        ok(
            to,
            &["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from_id],
        );
        ok(
            from,
            &["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to_id],
        );
        let mut moved = 0;
        for _ in 0..10_000 {
            let out = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100"]);
            let keys: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let to_port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(&keys);
            ok(from, &args);
            moved += keys.len();
        }
        for port in self.primaries() {
            ok(port, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id]);
        }
        self.wait_ok(Duration::from_secs(10)).await;
        moved
    }

    /// `redis-cli --cluster reshard`: moves `slots` slots from the primary
    /// on `from` to the one on `to`, keys included.
    pub async fn reshard(&self, from: u16, to: u16, slots: u32) {
        Self::reshard_by_id(from, &self.node_id(from), &self.node_id(to), slots);
        self.wait_ok(Duration::from_secs(10)).await;
    }

    /// `redis-cli --cluster reshard` through the node on `port`, from and to
    /// primaries named by node id, as an operator would run it: blocking,
    /// for `spawn_blocking` while a load runs.
    pub fn reshard_by_id(port: u16, from: &str, to: &str, slots: u32) {
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{port}")])
            .args(["--cluster-from", from, "--cluster-to", to])
            .args(["--cluster-slots", &slots.to_string()])
            .arg("--cluster-yes")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster reshard failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Kills every node (SIGKILL, by pid): the whole cluster is down.
    pub fn kill_all(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }

    /// Starts every node that is not running again, on its data directory
    /// and nodes.conf, and waits until the cluster is ok.
    pub async fn restart_all(&mut self) {
        for node in &mut self.nodes {
            if node.child.is_none() {
                node.launch();
            }
        }
        for node in &mut self.nodes {
            node.wait_up().await.unwrap_or_else(|e| panic!("{e}"));
        }
        self.wait_ok(Duration::from_secs(30)).await;
    }

    /// Freezes the node on `port` (SIGSTOP, by its pid): its connections
    /// stay open and silent, as behind a partition.
    pub fn pause(&self, port: u16) {
        self.signal(port, "-STOP");
    }

    /// Thaws a node [`RedisCluster::pause`] froze (SIGCONT).
    pub fn resume(&self, port: u16) {
        self.signal(port, "-CONT");
    }

    fn signal(&self, port: u16, signal: &str) {
        let pid = self.node(port).pid().expect("the node runs");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts the node on `port` again, on its data directory and
    /// nodes.conf (it rejoins; as a replica if it was failed over).
    pub async fn restart(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"));
        node.kill();
        node.launch();
        node.wait_up().await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// `CLUSTER FAILOVER` on the replica on `replica`, then waits until it
    /// says it is a primary (the other nodes learn it over the cluster bus
    /// right after: [`RedisCluster::wait_ok`] waits for that).
    pub async fn failover(&self, replica: u16) {
        let out = self.cli(replica, &["CLUSTER", "FAILOVER"]);
        assert_eq!(out.trim(), "OK", "CLUSTER FAILOVER on {replica}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.cli(replica, &["ROLE"]).starts_with("master") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{replica} was not promoted: {}",
                self.cli(replica, &["ROLE"])
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}
