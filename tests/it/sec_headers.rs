//! Security regression suite: sec_headers (see SECURITY.md).
//!
//! Upgrades, look-alike headers, session cookies and tokens, and what an
//! upstream can put in front of a client, attacked over real sockets. Each
//! test reproduces a finding of issue 9 (2, 4, 5 and 7) that the gateway
//! at 602bbf9 let through.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::harness::*;

/// How long a test waits for bytes that must (or must not) come.
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// A scripted origin and a raw client
// ---------------------------------------------------------------------------

/// What a [`ScriptedUpstream`] received.
#[derive(Default)]
struct Seen {
    /// Each request head, as sent.
    heads: Vec<String>,
    /// Every byte that arrived after the origin answered 101.
    tunneled: Vec<u8>,
}

/// A raw HTTP/1.1 origin that answers each request head with the
/// response `script` writes for it: it can say what no well-behaved
/// origin says (a 101 nobody asked for, a wrong `Sec-WebSocket-Accept`,
/// a planted session cookie). After a 101 it records whatever comes.
struct ScriptedUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    accept: JoinHandle<()>,
}

impl ScriptedUpstream {
    async fn start(script: fn(&str) -> String) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = seen.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_scripted(stream, script, record.clone()));
            }
        });
        ScriptedUpstream { addr, seen, accept }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.seen.lock().unwrap().heads.clone()
    }

    fn tunneled(&self) -> Vec<u8> {
        self.seen.lock().unwrap().tunneled.clone()
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn serve_scripted(mut stream: TcpStream, script: fn(&str) -> String, seen: Arc<Mutex<Seen>>) {
    let mut buf = Vec::new();
    loop {
        // One request head (the gateway sends no bodies to these).
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(WAIT, stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        seen.lock().unwrap().heads.push(head.clone());
        let response = script(&head);
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
        if response.starts_with("HTTP/1.1 101") {
            seen.lock().unwrap().tunneled.extend_from_slice(&buf);
            let mut chunk = [0u8; 4096];
            while let Ok(Ok(n)) = tokio::time::timeout(WAIT, stream.read(&mut chunk)).await {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().tunneled.extend_from_slice(&chunk[..n]);
            }
            return;
        }
    }
}

/// The value of header `name` in a raw request head.
fn head_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A 200 with a small JSON body and the given extra header lines.
fn ok_with(extra: &str) -> String {
    let body = r#"{"ok":true}"#;
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
}

/// One parsed response read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A client connection that writes exact bytes and reads responses one
/// at a time (so pipelining and what follows a response can be seen).
struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &str) {
        self.stream
            .write_all(bytes.as_bytes())
            .await
            .expect("write");
    }

    /// More bytes, or false at the end of the stream (or after [`WAIT`]).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// The next response, or `None` once the server has closed.
    async fn response(&mut self) -> Option<RawResponse> {
        let end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end);
        let (status, headers) = parse_response_head(&head);
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if status == 101 || status == 304 || status == 204 {
            return Some(response);
        }
        if let Some(len) = response.header("content-length") {
            let len: usize = len.parse().expect("content-length");
            while self.buf.len() < len {
                assert!(self.fill().await, "body cut short");
            }
            response.body = self.buf.drain(..len).collect();
        } else if response
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            while !self.buf.windows(5).any(|w| w == b"0\r\n\r\n") {
                assert!(self.fill().await, "chunked body cut short");
            }
            let end = self.buf.windows(5).position(|w| w == b"0\r\n\r\n").unwrap() + 5;
            let raw: Vec<u8> = self.buf.drain(..end).collect();
            response.body = dechunk(&raw);
        }
        Some(response)
    }
}

/// The standard routes in front of an upstream at `url`.
async fn gateway(url: &str) -> GatewayUnderTest {
    GatewayUnderTest::start(GatewaySpec::standard(url)).await
}

/// The same, with `session.lookalike_headers = "reject"`.
async fn rejecting_gateway(url: &str) -> GatewayUnderTest {
    GatewayUnderTest::start_with(GatewaySpec::standard(url), |text| {
        text.replace("[session]\n", "[session]\nlookalike_headers = \"reject\"\n")
    })
    .await
}

// ---------------------------------------------------------------------------
// Finding 2: h2c smuggling and upgrades
// ---------------------------------------------------------------------------

const H2C_UPGRADE: &str = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
     HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n";

/// What a client would send down an h2c tunnel: the HTTP/2 preface, then
/// (in clear text, so the origin's record is easy to search) the request
/// it means to smuggle.
const SMUGGLED: &str = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\
     GET /secret HTTP/1.1\r\nHost: origin\r\nx-user-id: admin\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrades_are_not_forwarded_and_what_follows_is_checked() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up.url()).await;
    let host = gw.addr.to_string();
    let mut client = RawClient::connect(gw.addr).await;
    // The h2c upgrade to a public route and, pipelined right behind it,
    // an unauthenticated request claiming to be admin.
    client
        .send(&format!(
            "GET /public/x HTTP/1.1\r\nHost: {host}\r\n{H2C_UPGRADE}\r\n\
             GET /secret HTTP/1.1\r\nHost: {host}\r\nx-user-id: admin\r\nConnection: close\r\n\r\n"
        ))
        .await;
    let first = client.response().await.expect("a response to the upgrade");
    assert_eq!(first.status, 200, "{first:?}");
    let echo = first.json();
    for name in ["upgrade", "http2-settings"] {
        assert_eq!(
            seen(&echo, name),
            None,
            "{name} reached the upstream: {echo}"
        );
    }
    assert!(
        !seen(&echo, "connection")
            .unwrap_or("")
            .to_ascii_lowercase()
            .contains("upgrade"),
        "{echo}"
    );
    let second = client.response().await.expect("a response to /secret");
    assert_eq!(second.status, 401, "the pipelined request was not checked");
    assert!(client.response().await.is_none(), "nothing else comes back");
    assert_eq!(up.hits(), 1, "only the public request reached the upstream");

    // A list naming websocket among others is no WebSocket handshake
    // either: forwarded as an ordinary request, without its Upgrade.
    let request = format!(
        "GET /public/ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n\
         Upgrade: h2c, websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let mut client = RawClient::connect(gw.addr).await;
    client.send(&request).await;
    let resp = client.response().await.expect("a response");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(seen(&resp.json(), "upgrade"), None);
}

/// An h2c-capable origin (Hypercorn, for one): it switches to HTTP/2 when
/// a request asks for it, whatever route the request came through.
fn h2c_origin(head: &str) -> String {
    if head_value(head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("h2c")) {
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n".into()
    } else {
        ok_with("")
    }
}

/// An origin that answers every request with `101 Upgrade: h2c`, asked
/// or not: the gateway must never bridge it.
fn always_switches(_head: &str) -> String {
    "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n".into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_smuggled_through_an_h2c_origin() {
    for script in [h2c_origin as fn(&str) -> String, always_switches] {
        let origin = ScriptedUpstream::start(script).await;
        let gw = gateway(&origin.url()).await;
        let host = gw.addr.to_string();
        let mut client = RawClient::connect(gw.addr).await;
        client
            .send(&format!(
                "GET /public/x HTTP/1.1\r\nHost: {host}\r\n{H2C_UPGRADE}\r\n"
            ))
            .await;
        let resp = client.response().await.expect("a response");
        assert_ne!(resp.status, 101, "an h2c tunnel was opened");
        // Whatever the client sends next is HTTP/1.1 to the gateway.
        client.send(SMUGGLED).await;
        while client.response().await.is_some() {}
        let heads = origin.heads();
        for head in &heads {
            assert!(head_value(head, "upgrade").is_none(), "{head}");
            assert!(head_value(head, "http2-settings").is_none(), "{head}");
            assert!(!head.contains("/secret"), "{head}");
        }
        assert!(
            origin.tunneled().is_empty(),
            "bytes went down a tunnel: {:?}",
            String::from_utf8_lossy(&origin.tunneled())
        );
    }
}

/// A WebSocket origin that gets the handshake wrong in one way or
/// another, chosen by the request's path.
fn bad_websocket_origin(head: &str) -> String {
    let key = head_value(head, "sec-websocket-key").unwrap_or("");
    let good = derive_accept_key(key.as_bytes());
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (upgrade, accept) = match path.rsplit('/').next().unwrap_or("") {
        "good" => ("websocket", Some(good)),
        "wrong-accept" => ("websocket", Some(derive_accept_key(b"another key"))),
        "no-accept" => ("websocket", None),
        "h2c" => ("h2c", Some(good)),
        _ => ("websocket, h2c", Some(good)),
    };
    let accept = accept
        .map(|a| format!("Sec-WebSocket-Accept: {a}\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n{accept}\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_that_is_not_the_websocket_asked_for_is_not_bridged() {
    let origin = ScriptedUpstream::start(bad_websocket_origin).await;
    let gw = gateway(&origin.url()).await;
    let host = gw.addr.to_string();
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    for path in ["wrong-accept", "no-accept", "h2c", "list"] {
        let mut client = RawClient::connect(gw.addr).await;
        client
            .send(&format!(
                "GET /public/{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n\
                 Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
            ))
            .await;
        let resp = client.response().await.expect("a response");
        assert_eq!(resp.status, 502, "{path}: {resp:?}");
        assert_eq!(
            resp.json()["error"]["code"],
            "upstream_invalid_response",
            "{path}"
        );
        // The connection is still HTTP/1.1, not a tunnel to the origin.
        client.send(SMUGGLED).await;
        while client.response().await.is_some() {}
    }
    assert!(
        origin.tunneled().is_empty(),
        "bytes went down a tunnel: {:?}",
        String::from_utf8_lossy(&origin.tunneled())
    );

    // The same origin's correct handshake is bridged: the 502s above are
    // the gateway's checks, not a broken origin.
    let request = format!("ws://{host}/public/good")
        .into_client_request()
        .unwrap();
    let (mut ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
        .expect("a correct handshake is bridged");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("through")).await.unwrap();
    ws.close(None).await.ok();
    let deadline = tokio::time::Instant::now() + WAIT;
    while origin.tunneled().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !origin.tunneled().is_empty(),
        "the good handshake was bridged"
    );
}

// ---------------------------------------------------------------------------
// Finding 4 and 7: look-alike and path-override headers
// ---------------------------------------------------------------------------

/// Header lines a client uses to pass as the gateway, and the name each
/// arrives under.
const LOOKALIKES: [&str; 8] = [
    "X_User_Id: admin",
    "x_user_id: admin",
    "X-User_Id: admin",
    "X_SESSION_ID: 00000000-0000-7000-8000-000000000000",
    "X_SESSIONGATE_LOGIN: mallory",
    "x-sessiongate_logout: all",
    "X_Forwarded_For: 6.6.6.6",
    "x_request_id: forged",
];

/// Path overrides, in their own and their CGI spellings.
const OVERRIDES: [&str; 4] = [
    "X-Original-URL: /admin",
    "X-Rewrite-URL: /admin",
    "X_Original_URL: /admin",
    "x_rewrite_url: /admin",
];

fn is_owned_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase().replace('_', "-");
    [
        "x-user-id",
        "x-session-id",
        "x-forwarded-for",
        "x-request-id",
        "x-original-url",
        "x-rewrite-url",
    ]
    .contains(&name.as_str())
        || name.starts_with("x-sessiongate-")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookalike_and_path_override_headers_never_reach_the_upstream() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up.url()).await;
    let token = gw.login("alice").await;
    let host = gw.addr.to_string();
    let extra: String = LOOKALIKES
        .iter()
        .chain(OVERRIDES.iter())
        .map(|line| format!("{line}\r\n"))
        .collect();
    for (path, auth) in [
        ("/public/e", String::new()),
        ("/api/e", format!("Cookie: {}\r\n", cookie(&token))),
    ] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}{extra}Connection: close\r\n\r\n"
        );
        let (status, headers, body) = raw_http(gw.addr, &request).await;
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        assert!(
            !headers.iter().any(|(k, _)| k == "set-cookie"),
            "{path}: a client header began or ended a session"
        );
        let echo: Value = serde_json::from_slice(&body).unwrap();
        let names: Vec<&String> = echo["headers"].as_object().unwrap().keys().collect();
        for name in &names {
            assert!(!name.contains('_'), "{path}: {name} reached the upstream");
            if is_owned_name(name) {
                // Only the gateway's own, under their own names.
                assert!(
                    [
                        "x-user-id",
                        "x-session-id",
                        "x-forwarded-for",
                        "x-request-id"
                    ]
                    .contains(&name.as_str()),
                    "{path}: {name} reached the upstream"
                );
            }
        }
        let user = seen(&echo, "x-user-id");
        if path == "/api/e" {
            assert_eq!(user, Some("alice"));
        } else {
            assert_eq!(user, None);
        }
        assert_eq!(seen(&echo, "x-forwarded-for"), Some("127.0.0.1"));
        assert_ne!(seen(&echo, "x-request-id"), Some("forged"));
    }
    assert!(gw.admin_user_sessions("mallory").await.is_empty());
    assert_eq!(gw.admin_user_sessions("alice").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookalike_headers_are_refused_in_reject_mode() {
    let up = TestUpstream::start().await;
    let gw = rejecting_gateway(&up.url()).await;
    let host = gw.addr.to_string();
    for line in LOOKALIKES {
        let request = format!(
            "GET /public/e HTTP/1.1\r\nHost: {host}\r\n{line}\r\nConnection: close\r\n\r\n"
        );
        let (status, _, body) = raw_http(gw.addr, &request).await;
        assert_eq!(status, 400, "{line}: {}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "forbidden_header", "{line}");
        let name = line.split(':').next().unwrap().to_ascii_lowercase();
        assert!(
            v["error"]["message"].as_str().unwrap().contains(&name),
            "the message names {name}: {v}"
        );
    }
    assert_eq!(up.hits(), 0, "a refused request reached the upstream");
    // The exact names are still simply replaced (a proxy in front of the
    // gateway sends x-forwarded-for), and path overrides dropped.
    let resp = gw
        .client
        .get(gw.url("/public/e"))
        .header("x-user-id", "admin")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-original-url", "/admin")
        .send()
        .await
        .unwrap();
    let echo = echo_of(resp).await;
    assert_eq!(seen(&echo, "x-user-id"), None);
    assert_eq!(seen(&echo, "x-original-url"), None);
    assert_eq!(seen(&echo, "x-forwarded-for"), Some("127.0.0.1"));
}

// ---------------------------------------------------------------------------
// Finding 5 and 7: session cookies and tokens
// ---------------------------------------------------------------------------

/// An origin whose pages plant session cookies (on `/login`, alongside a
/// real login).
fn planting_origin(head: &str) -> String {
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let mut extra = String::from(
        "Set-Cookie: sg_session=planted; Path=/api/\r\n\
         Set-Cookie: theme=dark; Path=/\r\n\
         Set-Cookie:  sg_session =planted2\r\n",
    );
    if path.ends_with("/login") {
        extra.push_str("x-sessiongate-login: alice\r\n");
    }
    ok_with(&extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_cannot_plant_the_session_cookie() {
    let origin = ScriptedUpstream::start(planting_origin).await;
    let gw = gateway(&origin.url()).await;
    let resp = gw.get("/public/page", None).await;
    assert_eq!(resp.status(), 200);
    let cookies = set_cookies(resp.headers());
    assert!(
        cookies.iter().all(|c| c.name != COOKIE),
        "a planted session cookie reached the client: {cookies:?}"
    );
    assert!(
        cookies
            .iter()
            .any(|c| c.name == "theme" && c.value == "dark")
    );

    // On a login the only session cookie is the gateway's.
    let resp = gw.get("/public/login", None).await;
    assert_eq!(resp.status(), 200);
    let ours: Vec<SetCookie> = set_cookies(resp.headers())
        .into_iter()
        .filter(|c| c.name == COOKIE)
        .collect();
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert_eq!(ours[0].value.len(), 64, "{ours:?}");
    assert_eq!(gw.admin_user_sessions("alice").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_that_verifies_is_used_never_merely_the_first() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up.url()).await;
    let alice = gw.login("alice").await;
    let bob = gw.login("bob").await;
    let other_gateway_token = "A".repeat(64);
    let send = |cookies: String| {
        gw.client
            .get(gw.url("/api/who"))
            .header("cookie", cookies)
            .send()
    };
    for cookies in [
        format!("sg_session=garbage; sg_session={alice}"),
        format!("sg_session={alice}; sg_session=garbage"),
        format!("sg_session={other_gateway_token}; theme=dark; sg_session={alice}"),
        format!("sg_session={alice}; sg_session={alice}"),
    ] {
        let echo = echo_of(send(cookies.clone()).await.unwrap()).await;
        assert_eq!(seen(&echo, "x-user-id"), Some("alice"), "{cookies}");
        assert!(
            !seen(&echo, "cookie").unwrap_or("").contains("sg_session"),
            "{cookies}: {echo}"
        );
    }
    // Two different sessions: whichever a browser lists first, neither
    // is picked.
    for cookies in [
        format!("sg_session={bob}; sg_session={alice}"),
        format!("sg_session={alice}; sg_session={bob}"),
    ] {
        expect_401(send(cookies).await.unwrap()).await;
    }
    let hits = up.hits();
    // On an optional route the request goes on without an identity.
    let resp = gw
        .client
        .get(gw.url("/opt/who"))
        .header("cookie", format!("sg_session={bob}; sg_session={alice}"))
        .send()
        .await
        .unwrap();
    let echo = echo_of(resp).await;
    assert_eq!(seen(&echo, "x-user-id"), None);
    assert_eq!(up.hits(), hits + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_token_never_goes_upstream_in_any_authorization_header() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up.url()).await;
    let token = gw.login("alice").await;
    let host = gw.addr.to_string();
    // (Authorization lines, whether they present the token as a bearer)
    let cases = [
        (
            format!("Authorization: Basic dXNlcjpwYXNz\r\nAuthorization: Bearer {token}\r\n"),
            true,
        ),
        (
            format!("Authorization: Bearer {token}\r\nAuthorization: Basic dXNlcjpwYXNz\r\n"),
            true,
        ),
        (
            format!("Authorization: Basic dXNlcjpwYXNz\r\nAuthorization: Token {token}\r\n"),
            false,
        ),
        (
            format!(
                "Authorization: Basic dXNlcjpwYXNz\r\nAuthorization: Basic x, Bearer {token}\r\n"
            ),
            false,
        ),
    ];
    for path in ["/public/a", "/api/a"] {
        for (lines, bearer) in &cases {
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{lines}Connection: close\r\n\r\n");
            let (status, _, body) = raw_http(gw.addr, &request).await;
            let text = String::from_utf8_lossy(&body).into_owned();
            if path == "/api/a" && !bearer {
                // Not presented as a bearer token: no session, 401.
                assert_eq!(status, 401, "{lines}: {text}");
                continue;
            }
            assert_eq!(status, 200, "{path} {lines}: {text}");
            assert!(
                !text.contains(&token),
                "{path} {lines}: the token went upstream: {text}"
            );
            let echo: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                seen(&echo, "authorization"),
                Some("Basic dXNlcjpwYXNz"),
                "{path} {lines}"
            );
            if path == "/api/a" {
                assert_eq!(seen(&echo, "x-user-id"), Some("alice"), "{lines}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_ids_with_commas_or_controls_are_refused() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up.url()).await;
    let resp = gw.login_response("alice, admin", None, None).await;
    assert!(
        set_cookies(resp.headers()).is_empty(),
        "a session was handed out"
    );
    let err = expect_error(resp, 502).await;
    assert_eq!(err["code"], "upstream_invalid_response");
    for user in ["alice", "admin"] {
        assert!(gw.admin_user_sessions(user).await.is_empty(), "{user}");
    }
    for user in ["alice, admin", "alice,admin", "a\u{85}b", "a\u{7f}b"] {
        let resp = gw
            .client
            .post(gw.admin_url("/v1/sessions"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({ "user_id": user }))
            .send()
            .await
            .unwrap();
        let err = expect_error(resp, 400).await;
        assert_eq!(err["code"], "invalid_field", "{user:?}");
    }
}

/// The stricter user-id check (no C1 controls) still takes user ids
/// beyond ASCII, and they reach the upstream intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_id_beyond_ascii_still_reaches_the_upstream() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up.url()).await;
    let resp = gw
        .client
        .post(gw.admin_url("/v1/sessions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "user_id": "zoë" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let token = resp.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let echo = echo_of(gw.get("/api/me", Some(&token)).await).await;
    assert_eq!(seen(&echo, "x-user-id"), Some("zoë"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_502_body_carries_no_upstream_text() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up.url()).await;
    let token = gw.login("alice").await;
    let marker = "UPSTREAM-SECRET-7f3a";
    let attrs = format!(r#"{{"{marker}": 1}}"#);
    let responses = [
        gw.get(&format!("/public/logout?scope={marker}"), Some(&token))
            .await,
        gw.login_response("bob", Some(&attrs), None).await,
        gw.login_response(&format!("{marker}, admin"), None, None)
            .await,
    ];
    for resp in responses {
        let request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let err = expect_error(resp, 502).await;
        assert_eq!(err["code"], "upstream_invalid_response");
        let text = err.to_string();
        assert!(!text.contains(marker), "upstream text in the 502: {text}");
        assert!(
            !text.contains("x-sessiongate"),
            "header detail in the 502: {text}"
        );
        assert!(!request_id.is_empty());
    }
}

// ---------------------------------------------------------------------------
// What held before issue 9 and must keep holding: request smuggling by
// conflicting body framing (CL.TE, TE.CL, obfuscated Transfer-Encoding).
// ---------------------------------------------------------------------------

/// Writes `request` to the gateway at `addr` and reads whatever comes back
/// until the gateway closes or goes quiet; returns the status codes of the
/// responses in it, in order.
async fn statuses_for(addr: SocketAddr, request: &str) -> Vec<u16> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_secs(2), stream.read(&mut chunk)).await
    {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf)
        .match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| {
            let text = String::from_utf8_lossy(&buf[at + 9..]).into_owned();
            text.get(..3)?.parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_body_framing_smuggles_nothing_to_the_upstream() {
    // A real HTTP/1.1 parser behind the gateway (Hypercorn/h11), which
    // logs every request it reads: a desynchronised body would show up
    // there as a request of its own.
    let origin = H2cOrigin::start().await;
    let gw = gateway(&origin.url()).await;
    let smuggled =
        "GET /secret HTTP/1.1\r\nHost: origin\r\nx-user-id: admin\r\nConnection: close\r\n\r\n";
    let attacks = [
        // CL.TE: the gateway must not read the Content-Length while the
        // upstream reads chunks (or the other way round).
        format!(
            "POST /public/x HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
            5 + smuggled.len()
        ),
        // TE.CL: a chunk that, read by Content-Length, leaves a request behind.
        format!(
            "POST /public/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
            smuggled.len()
        ),
        // Obfuscated Transfer-Encoding values some servers read as chunked.
        format!(
            "POST /public/x HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}",
            5 + smuggled.len()
        ),
        format!(
            "POST /public/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        // Two Content-Lengths that disagree.
        format!(
            "POST /public/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        ),
    ];
    for attack in &attacks {
        let statuses = statuses_for(gw.addr, attack).await;
        // Whatever the gateway made of it, a request it read for /secret
        // was checked like any other: no session, 401.
        assert!(
            statuses.iter().all(|s| [200, 400, 401].contains(s)),
            "{statuses:?} for {attack:?}"
        );
        assert!(
            origin.seen_path("/secret").is_empty(),
            "the upstream saw a smuggled request for {attack:?}: {:?}",
            origin.seen()
        );
    }
    // The positive control: the same origin does see what the gateway
    // forwards, so an empty record is not why the test passes.
    let statuses = statuses_for(
        gw.addr,
        "GET /public/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses, vec![200]);
    assert!(origin.wait_for_path("/public/x").await.is_some());
    assert!(origin.seen_path("/secret").is_empty());
}
