//! Security regression suite: sec_limits (see SECURITY.md).
//!
//! Issue 9, finding 3 (connection exhaustion) and the body items of
//! finding 7: no client can hold the gateway's connections, upstream
//! connections or request bodies open without bound. Every test runs
//! over real sockets with small timeouts (hundreds of milliseconds) and
//! waits on a condition ("the read returns EOF within N s"), never on a
//! fixed sleep.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// How long any "is closed / answers" condition may take here: far above
/// the configured timeouts, far below the defaults the old code had.
const BOUND: Duration = Duration::from_secs(4);

/// `[server]` keys shared by these tests: every timeout 300 ms except the
/// one a test sets itself.
fn server_keys(extra: &str) -> String {
    let mut keys = String::from(
        "first_byte_timeout_ms = 300\nidle_timeout_ms = 300\nbody_read_timeout_ms = 300\n",
    );
    for line in extra.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        if !key.is_empty() {
            keys = keys
                .lines()
                .filter(|l| !l.starts_with(&format!("{key} ")))
                .map(|l| format!("{l}\n"))
                .collect();
        }
        keys.push_str(line);
        keys.push('\n');
    }
    keys
}

/// The standard gateway with `[server]` keys added (and `[admin]` ones).
async fn gateway(spec: GatewaySpec, server: &str, admin: &str) -> GatewayUnderTest {
    let server = server_keys(server);
    let admin = admin.to_string();
    GatewayUnderTest::start_with(spec, move |text| {
        text.replacen("[server]\n", &format!("[server]\n{server}"), 1)
            .replacen("[admin]\n", &format!("[admin]\n{admin}\n"), 1)
    })
    .await
}

/// Reads until the peer closes (EOF or reset); panics unless that happens
/// within `within`. Returns what was read and when the close came.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let reading = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    if tokio::time::timeout(within, reading).await.is_err() {
        panic!(
            "the gateway kept the connection open for {within:?} (read {} bytes)",
            got.len()
        );
    }
    (got, started.elapsed())
}

/// Whether the peer has closed the connection within `within`.
async fn is_closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let reading = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, reading).await.is_ok()
}

/// One HTTP/1.1 response read off a kept-alive connection: status and
/// body (`Content-Length` bodies only, which is what the gateway sends
/// for these).
async fn read_response(stream: &mut TcpStream) -> (u16, Vec<u8>) {
    let reading = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .expect("status line");
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().expect("content-length"))
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return (status, buf[end + 4..end + 4 + len].to_vec());
                }
            }
            let n = stream.read(&mut chunk).await.expect("read response");
            assert!(n > 0, "connection closed mid-response: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(BOUND, reading)
        .await
        .expect("a response in time")
}

/// Writes `request` on a new connection and reads the response.
async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let (status, body) = read_response(&mut stream).await;
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, v)
}

/// `GET /public/x` on a new connection; `None` when the connection is
/// refused, reset or closed without an answer.
async fn try_get(addr: SocketAddr) -> Option<u16> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /public/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.ok()?;
        let head = String::from_utf8_lossy(&buf).into_owned();
        head.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(BOUND, attempt).await.ok().flatten()
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

// --- HTTP/2 frames, by hand ------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// An HPACK block for `GET /public/x` (static-table entries plus a literal
/// `:path` and `:authority`).
fn get_public_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x86]; // :method GET, :scheme http
    b.push(0x44); // :path, literal with indexing, name index 4
    b.push(9);
    b.extend_from_slice(b"/public/x");
    b.push(0x41); // :authority, name index 1
    b.push(9);
    b.extend_from_slice(b"localhost");
    b
}

/// The (type, stream) of each whole frame in `bytes`.
fn frames(mut bytes: &[u8]) -> Vec<(u8, u32)> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len =
            (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2]);
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
        out.push((bytes[3], stream));
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    out
}

/// An h2c (prior knowledge) connection, preface and SETTINGS sent.
async fn h2_connection(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(PREFACE).await.unwrap();
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    stream
}

// ---------------------------------------------------------------------------
// First byte, idle connections
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_after_first_byte_timeout() {
    let up = TestUpstream::start().await;
    // A long idle timeout: only the first-byte timeout can close these.
    let gw = gateway(
        GatewaySpec::standard(&up.url()),
        "idle_timeout_ms = 60000",
        "",
    )
    .await;

    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let (_, after) = closed_within(&mut silent, BOUND).await;
    assert!(
        after >= Duration::from_millis(250),
        "closed after {after:?}, before the 300 ms timeout"
    );

    // Part of the HTTP/2 preface, then nothing: the protocol is never
    // known, and the same timeout covers it.
    let mut partial = TcpStream::connect(gw.addr).await.unwrap();
    partial.write_all(&PREFACE[..10]).await.unwrap();
    closed_within(&mut partial, BOUND).await;

    // A client that does speak gets served.
    let resp = gw.get("/public/x", None).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_filling_max_connections_do_not_stop_service() {
    let up = TestUpstream::start().await;
    let gw = gateway(
        GatewaySpec::standard(&up.url()),
        "max_connections = 8\nidle_timeout_ms = 60000",
        "",
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    // Every slot is taken by a socket that sends nothing; a real client
    // is served once they time out.
    let started = Instant::now();
    let resp = tokio::time::timeout(BOUND, client().get(gw.url("/public/x")).send())
        .await
        .expect("served while 8 silent sockets held max_connections = 8")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() < BOUND);
    for mut s in silent {
        assert!(is_closed_within(&mut s, BOUND).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_keep_alive_connection_is_closed_but_not_a_busy_one() {
    let up = TestUpstream::start().await;
    // The header-read timeout is long: only the idle timeout can act.
    let gw = gateway(
        GatewaySpec::standard(&up.url()),
        "header_read_timeout_ms = 60000",
        "",
    )
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    // A request that takes longer than the idle timeout is not cut off:
    // the connection is busy, not idle.
    stream
        .write_all(b"GET /public/slow?ms=900 HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let (status, _) = read_response(&mut stream).await;
    assert_eq!(status, 200, "a slow request on a busy connection");
    // And the connection stays usable right after.
    stream
        .write_all(b"GET /public/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let (status, _) = read_response(&mut stream).await;
    assert_eq!(status, 200);
    // Then nothing: closed once idle for 300 ms.
    let (rest, after) = closed_within(&mut stream, BOUND).await;
    assert!(rest.is_empty(), "nothing more was asked for: {rest:?}");
    assert!(
        after >= Duration::from_millis(250),
        "closed after {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed() {
    let up = TestUpstream::start().await;
    let gw = gateway(
        GatewaySpec::standard(&up.url()),
        "http2_keepalive_interval_ms = 60000",
        "",
    )
    .await;
    let mut stream = h2_connection(gw.addr).await;
    stream
        .write_all(&frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            1,
            &get_public_block(),
        ))
        .await
        .unwrap();
    let (got, _) = closed_within(&mut stream, BOUND).await;
    let frames = frames(&got);
    assert!(
        frames.contains(&(HEADERS, 1)),
        "the request was answered first: {frames:?}"
    );
    assert!(
        frames.iter().any(|(kind, _)| *kind == GOAWAY),
        "closed with a GOAWAY: {frames:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_headers_without_end_headers_get_the_connection_closed() {
    let up = TestUpstream::start().await;
    let gw = gateway(
        GatewaySpec::standard(&up.url()),
        "http2_keepalive_interval_ms = 60000",
        "",
    )
    .await;
    let mut stream = h2_connection(gw.addr).await;
    // A header block that never ends (no END_HEADERS, no CONTINUATION).
    let block = get_public_block();
    stream
        .write_all(&frame(HEADERS, END_STREAM, 1, &block[..4]))
        .await
        .unwrap();
    let (got, _) = closed_within(&mut stream, BOUND).await;
    assert!(
        !frames(&got).contains(&(HEADERS, 1)),
        "an unfinished header block was answered"
    );
    assert_eq!(up.hits(), 0);
}

// ---------------------------------------------------------------------------
// Request bodies
// ---------------------------------------------------------------------------

/// Routes with a 1 KiB body limit on `/public/`.
async fn small_bodies(up: &TestUpstream) -> GatewayUnderTest {
    let spec = GatewaySpec::standard(&up.url()).max_body_bytes("/public/", 1024);
    gateway(spec, "", "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_coming_gets_408() {
    let up = TestUpstream::start().await;
    let gw = small_bodies(&up).await;
    let started = Instant::now();
    let (status, v) = exchange(
        gw.addr,
        b"POST /public/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await;
    assert_eq!(status, 408, "{v}");
    assert_eq!(code(&v), "body_timeout");
    assert!(started.elapsed() >= Duration::from_millis(250));

    // The same over HTTP/2: one frame, then the stream stalls.
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(BOUND)
        .build()
        .unwrap();
    let stalled = futures_util::stream::unfold(0, |sent| async move {
        if sent == 0 {
            Some((
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"abc")),
                1,
            ))
        } else {
            std::future::pending().await
        }
    });
    let resp = h2
        .post(gw.url("/public/upload"))
        .body(reqwest::Body::wrap_stream(stalled))
        .send()
        .await
        .expect("an answer before the client gives up");
    let err = expect_error(resp, 408).await;
    assert_eq!(err["code"], "body_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_body_over_the_route_limit_gets_413_before_the_upstream_is_asked() {
    let up = TestUpstream::start().await;
    let gw = small_bodies(&up).await;
    let (status, v) = exchange(
        gw.addr,
        b"POST /public/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n",
    )
    .await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(code(&v), "body_too_large");
    assert_eq!(up.connections(), 0, "the upstream was contacted");

    // At the limit exactly, it goes through.
    let resp = gw
        .client
        .post(gw.url("/public/upload"))
        .body(vec![7u8; 1024])
        .send()
        .await
        .unwrap();
    let v = echo_len(resp).await;
    assert_eq!(v, 1024);
}

async fn echo_len(resp: reqwest::Response) -> u64 {
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    v["len"].as_u64().expect("upload length")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_crossing_the_route_limit_gets_413_and_the_upstream_request_is_aborted() {
    let up = TestUpstream::start().await;
    let gw = small_bodies(&up).await;
    // Chunked, 4 KiB in one chunk, and no end: the gateway must not wait
    // for the rest to refuse it.
    let mut request =
        b"POST /public/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n"
            .to_vec();
    request.extend_from_slice(&[b'x'; 4096]);
    request.extend_from_slice(b"\r\n");
    let (status, v) = exchange(gw.addr, &request).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(code(&v), "body_too_large");
    assert!(
        up.uploaded() <= 1024,
        "the upstream received {} bytes",
        up.uploaded()
    );

    // Over HTTP/2, as a stream of 1 KiB frames without a length.
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(BOUND)
        .build()
        .unwrap();
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 1024]))),
    );
    let resp = h2
        .post(gw.url("/public/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let err = expect_error(resp, 413).await;
    assert_eq!(err["code"], "body_too_large");
    assert!(
        up.uploaded() <= 2 * 1024,
        "the upstream received {}",
        up.uploaded()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_gets_400_invalid_body() {
    let up = TestUpstream::start().await;
    let gw = gateway(GatewaySpec::standard(&up.url()), "", "").await;
    let (status, v) = exchange(
        gw.addr,
        b"POST /public/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(code(&v), "invalid_body");
    let message = v["error"]["message"].as_str().unwrap_or("");
    assert!(
        !message.contains("chunk") && !message.contains("hyper"),
        "internal detail in {message:?}"
    );
}

// ---------------------------------------------------------------------------
// Per client, per connection, the admin listener
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_hold_more_than_max_connections_per_client() {
    let up = TestUpstream::start().await;
    // Long timeouts: only the cap closes anything here.
    let gw = gateway(
        GatewaySpec::standard(&up.url()),
        "max_connections_per_client = 3\nfirst_byte_timeout_ms = 60000\nidle_timeout_ms = 60000",
        "",
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    let mut fourth = TcpStream::connect(gw.addr).await.unwrap();
    assert!(
        is_closed_within(&mut fourth, BOUND).await,
        "a fourth connection from the same client was kept"
    );
    for s in held.iter_mut() {
        assert!(
            !is_closed_within(s, Duration::from_millis(100)).await,
            "a connection within the cap was closed"
        );
    }
    // A slot given back is usable again (the count is per open connection).
    drop(held.pop());
    let deadline = Instant::now() + BOUND;
    loop {
        // Refused (reset or closed) until the gateway has seen the close.
        if try_get(gw.addr).await == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot never came back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http2_connection_opens_at_most_max_upstream_per_connection() {
    let up = TestUpstream::start().await;
    let gw = gateway(
        GatewaySpec::standard(&up.url()),
        "max_upstream_per_connection = 4\nhttp2_max_concurrent_streams = 200\nidle_timeout_ms = 60000",
        "",
    )
    .await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    // One connection first, then 150 streams on it at once.
    let resp = h2.get(gw.url("/public/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let requests = (0..150).map(|_| {
        let h2 = h2.clone();
        let url = gw.url("/public/slow?ms=50");
        // Each body read to its end: a stream the client cancels leaves
        // its upstream connection mid-response, and that one is closed.
        tokio::spawn(async move {
            let resp = h2.get(url).send().await?;
            let status = resp.status().as_u16();
            resp.bytes().await.map(|_| status)
        })
    });
    for r in futures_util::future::join_all(requests).await {
        assert_eq!(r.unwrap().unwrap(), 200);
    }
    assert_eq!(up.hits(), 151);
    assert!(
        up.connections() <= 4,
        "one client connection made the gateway open {} upstream connections",
        up.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_do_not_starve_the_admin_listener() {
    let up = TestUpstream::start().await;
    let gw = gateway(
        GatewaySpec::standard(&up.url()),
        "idle_timeout_ms = 60000",
        "",
    )
    .await;
    // More idle sockets than the admin listener's budget (64), on both
    // listeners.
    let mut idle = Vec::new();
    for _ in 0..70 {
        idle.push(TcpStream::connect(gw.admin_addr).await.unwrap());
        idle.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    let resp = tokio::time::timeout(BOUND, client().get(gw.admin_url("/healthz")).send())
        .await
        .expect("/healthz answered while 70 idle sockets were open to it")
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tunnels_keep_their_place_under_the_connection_caps() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let up = TestUpstream::start().await;
    let gw = gateway(
        GatewaySpec::standard(&up.url()),
        "max_connections_per_client = 2\nfirst_byte_timeout_ms = 60000\nidle_timeout_ms = 60000",
        "",
    )
    .await;
    let mut tunnels = Vec::new();
    for _ in 0..2 {
        let request = format!("ws://{}/public/ws", gw.addr)
            .into_client_request()
            .unwrap();
        let (ws, resp) = tokio::time::timeout(BOUND, tokio_tungstenite::connect_async(request))
            .await
            .expect("handshake in time")
            .expect("handshake succeeds");
        assert_eq!(resp.status(), 101);
        tunnels.push(ws);
    }
    // Two tunnels are two connections: a third is refused at once.
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    assert!(
        is_closed_within(&mut third, BOUND).await,
        "upgraded connections stopped counting against the cap"
    );
    // A tunnel that ends gives its place back.
    drop(tunnels.pop());
    let deadline = Instant::now() + BOUND;
    while try_get(gw.addr).await != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the closed tunnel's place never came back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_answering_pings_is_closed_even_while_busy() {
    let up = TestUpstream::start().await;
    let gw = gateway(
        GatewaySpec::standard(&up.url()),
        "http2_keepalive_interval_ms = 200\nhttp2_keepalive_timeout_ms = 200\nidle_timeout_ms = 60000",
        "",
    )
    .await;
    let mut stream = h2_connection(gw.addr).await;
    // A request still in flight, so the idle timeout cannot be what
    // closes the connection; then no PING is ever answered.
    let mut block = vec![0x82, 0x86, 0x44, 22];
    block.extend_from_slice(b"/public/slow?ms=30000&");
    block.extend_from_slice(&[0x41, 9]);
    block.extend_from_slice(b"localhost");
    stream
        .write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block))
        .await
        .unwrap();
    let (got, _) = closed_within(&mut stream, BOUND).await;
    let frames = frames(&got);
    assert!(
        frames.iter().any(|(kind, _)| *kind == PING),
        "the gateway pinged: {frames:?}"
    );
    assert!(
        !frames.contains(&(HEADERS, 1)),
        "the slow request was answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_response_is_dropped() {
    let up = TestUpstream::start().await;
    let gw = gateway(
        GatewaySpec::standard(&up.url()),
        "max_connections = 1\nfirst_byte_timeout_ms = 60000",
        "",
    )
    .await;
    // 64 MiB asked for, none read: the gateway's writes stop once the
    // socket buffers are full, with the request still "in flight".
    let mut reader = TcpStream::connect(gw.addr).await.unwrap();
    reader
        .write_all(b"GET /public/download?bytes=67108864 HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    // It holds the only connection there is, until it is dropped.
    let deadline = Instant::now() + BOUND;
    while try_get(gw.addr).await != Some(200) {
        assert!(
            Instant::now() < deadline,
            "a client that reads nothing kept max_connections = 1"
        );
    }
    let (got, _) = closed_within(&mut reader, BOUND).await;
    assert!(got.len() < 64 << 20, "the whole response went out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_tunnel_is_closed_but_not_a_talking_one() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let up = TestUpstream::start().await;
    let gw = gateway(
        GatewaySpec::standard(&up.url()),
        "idle_timeout_ms = 400",
        "",
    )
    .await;
    let connect = || async {
        let request = format!("ws://{}/public/ws", gw.addr)
            .into_client_request()
            .unwrap();
        let (ws, resp) = tokio::time::timeout(BOUND, tokio_tungstenite::connect_async(request))
            .await
            .expect("handshake in time")
            .expect("handshake succeeds");
        assert_eq!(resp.status(), 101);
        ws
    };

    // A tunnel that keeps talking (every 100 ms, for 4 idle timeouts)
    // stays open: only silence closes it.
    let mut talking = connect().await;
    for i in 0..16 {
        let text = format!("ping {i}");
        talking.send(Message::text(text.clone())).await.unwrap();
        let echo = tokio::time::timeout(BOUND, talking.next())
            .await
            .expect("echo in time")
            .expect("tunnel still open")
            .expect("a message");
        assert_eq!(echo.into_text().unwrap().as_str(), text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A silent one is closed: the client sees the end of the stream
    // within a bounded time, after at least the idle timeout.
    let mut silent = connect().await;
    let opened = Instant::now();
    let ended = tokio::time::timeout(BOUND, async {
        loop {
            match silent.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "an idle WebSocket tunnel was never closed");
    assert!(
        opened.elapsed() >= Duration::from_millis(300),
        "closed before the idle timeout: {:?}",
        opened.elapsed()
    );
}
