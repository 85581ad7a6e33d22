//! Security regression suite: sec_forwarded (see SECURITY.md), issue 10
//! item 3, "Behind a load balancer".
//!
//! Loopback is all of 127/8, so one test has a trusted load balancer and
//! untrusted clients: sockets bound to 127.0.0.2 are the balancer
//! (`server.trusted_proxies`), 127.0.0.3 and 127.0.0.1 are clients. Every
//! PROXY header is built byte by byte here; real nginx instances stand in
//! front once as an HTTP proxy and once as a TCP proxy speaking the PROXY
//! protocol.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::*;

const LB: [u8; 4] = [127, 0, 0, 2];
const CLIENT: [u8; 4] = [127, 0, 0, 3];
/// How long any "is closed / answers" condition may take.
const BOUND: Duration = Duration::from_secs(5);

/// A gateway in front of `upstream` with `server` keys added.
async fn gateway(upstream: &TestUpstream, server: &str) -> GatewayUnderTest {
    let spec = GatewaySpec::standard(&upstream.url()).cookie_secure(false);
    GatewayUnderTest::start_with(spec, |text| {
        text.replacen("[server]\n", &format!("[server]\n{server}\n"), 1)
    })
    .await
}

async fn connect_from(src: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((src, 0)))
        .expect("bind a loopback source address");
    socket.connect(addr).await.expect("connect")
}

/// Reads until the other end closes (or resets: what was read so far).
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return buf,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Writes `bytes` in one write from `src` and reads until the gateway
/// closes the connection.
async fn exchange(src: [u8; 4], addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    tokio::time::timeout(BOUND, async {
        let mut stream = connect_from(src, addr).await;
        stream.write_all(bytes).await.expect("write");
        read_until_closed(&mut stream).await
    })
    .await
    .expect("the gateway answers and closes in time")
}

/// A `GET` with `headers` (each ending in CRLF) and `Connection: close`.
fn get(path: &str, headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: gw\r\n{headers}Connection: close\r\n\r\n").into_bytes()
}

/// Status and body of one raw response.
fn response(raw: &[u8]) -> (u16, Vec<u8>) {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
    let (status, headers) = parse_response_head(&String::from_utf8_lossy(&raw[..split]));
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    (status, body)
}

/// The upstream's echo of `bytes` sent from `src`.
async fn echo_from(src: [u8; 4], addr: SocketAddr, bytes: &[u8]) -> Value {
    let raw = exchange(src, addr, bytes).await;
    let (status, body) = response(&raw);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&raw));
    serde_json::from_slice(&body).expect("echo JSON")
}

/// What the upstream saw as `X-Forwarded-For` and `X-Forwarded-Proto`.
fn forwarded(echo: &Value) -> (String, String) {
    (
        seen(echo, "x-forwarded-for").unwrap_or("").to_string(),
        seen(echo, "x-forwarded-proto").unwrap_or("").to_string(),
    )
}

fn v1(line: &str) -> Vec<u8> {
    format!("PROXY {line}\r\n").into_bytes()
}

/// A PROXY v2 header, byte by byte: signature, version 2 and `command`,
/// `family` (0x11 TCP4, 0x21 TCP6, 0x00 UNSPEC), length, addresses, TLVs.
fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
    let mut b = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    b.push(0x20 | command);
    b.push(family);
    b.extend(((addresses.len() + tlvs.len()) as u16).to_be_bytes());
    b.extend_from_slice(addresses);
    b.extend_from_slice(tlvs);
    b
}

fn tcp4(src: [u8; 4], src_port: u16) -> Vec<u8> {
    let mut b = src.to_vec();
    b.extend([127, 0, 0, 1]);
    b.extend(src_port.to_be_bytes());
    b.extend(80u16.to_be_bytes());
    b
}

fn tcp6(src: &str, src_port: u16) -> Vec<u8> {
    let mut b = src.parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec();
    b.extend(std::net::Ipv6Addr::LOCALHOST.octets());
    b.extend(src_port.to_be_bytes());
    b.extend(80u16.to_be_bytes());
    b
}

fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend((value.len() as u16).to_be_bytes());
    b.extend_from_slice(value);
    b
}

/// `sessiongate_proxy_protocol_rejections_total{reason}` from `/metrics`.
async fn rejections(gw: &GatewayUnderTest, reason: &str) -> u64 {
    let text = gw
        .client
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap();
    let prefix = format!("sessiongate_proxy_protocol_rejections_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|n| n.trim().parse().unwrap())
        .unwrap_or(0)
}

/// One request on a kept-alive connection: its status (the response is
/// read to the end of its `Content-Length` body).
async fn request_on(stream: &mut TcpStream, path: &str) -> Option<u16> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    read_one_response(stream).await
}

async fn read_one_response(stream: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(split) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let (status, headers) =
                    parse_response_head(&String::from_utf8_lossy(&buf[..split]));
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .map(|(_, v)| v.parse().unwrap())
                    .unwrap_or(0);
                if buf.len() >= split + 4 + len {
                    return Some(status);
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(BOUND, read).await.ok().flatten()
}

// ---------------------------------------------------------------------------
// X-Forwarded-For and X-Forwarded-Proto
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_forwarding_headers_from_an_untrusted_peer_are_ignored() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up, r#"trusted_proxies = ["127.0.0.2", "10.0.0.0/8"]"#).await;
    let spoof = "X-Forwarded-For: 10.0.0.5, 203.0.113.9\r\n\
                 X-Forwarded-Proto: https\r\n\
                 X-Forwarded-For: 10.0.0.6\r\n\
                 X-Real-IP: 203.0.113.9\r\n\
                 Forwarded: for=203.0.113.9;proto=https\r\n";
    for (src, addr) in [(CLIENT, "127.0.0.3"), ([127, 0, 0, 1], "127.0.0.1")] {
        let echo = echo_from(src, gw.addr, &get("/public/echo", spoof)).await;
        assert_eq!(forwarded(&echo), (addr.into(), "http".into()), "{echo}");
        assert_eq!(seen(&echo, "x-real-ip"), None);
        assert_eq!(seen(&echo, "forwarded"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_peer_chain_is_walked_from_the_right() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up, r#"trusted_proxies = ["127.0.0.2", "10.0.0.0/8"]"#).await;
    let cases: &[(&str, &str, &str)] = &[
        // The client-written left part never counts nor goes upstream.
        (
            "X-Forwarded-For: 6.6.6.6, 203.0.113.7, 10.0.0.5\r\n",
            "203.0.113.7, 10.0.0.5, 127.0.0.2",
            "http",
        ),
        // Several header lines are one list, in order.
        (
            "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For:  10.0.0.5 \r\n",
            "203.0.113.7, 10.0.0.5, 127.0.0.2",
            "http",
        ),
        // Only trusted hops: the leftmost is the client.
        (
            "X-Forwarded-For: 10.0.0.9, 10.0.0.5\r\n",
            "10.0.0.9, 10.0.0.5, 127.0.0.2",
            "http",
        ),
        // Ports and brackets.
        (
            "X-Forwarded-For: [2001:db8::7]:443, 10.0.0.5:8080\r\n",
            "2001:db8::7, 10.0.0.5, 127.0.0.2",
            "http",
        ),
        // Garbage stops the walk at the last trusted hop.
        (
            "X-Forwarded-For: 203.0.113.7, _hidden, 10.0.0.5\r\n",
            "10.0.0.5, 127.0.0.2",
            "http",
        ),
        ("X-Forwarded-For: unknown\r\n", "127.0.0.2", "http"),
        // No header: the balancer itself.
        ("", "127.0.0.2", "http"),
        // The scheme: http or https in any case, else ignored.
        ("X-Forwarded-Proto: HTTPS\r\n", "127.0.0.2", "https"),
        ("X-Forwarded-Proto: gopher\r\n", "127.0.0.2", "http"),
        ("X-Forwarded-Proto: http, https\r\n", "127.0.0.2", "https"),
    ];
    for (headers, xff, proto) in cases {
        let echo = echo_from(LB, gw.addr, &get("/public/echo", headers)).await;
        assert_eq!(
            forwarded(&echo),
            (xff.to_string(), proto.to_string()),
            "{headers:?}"
        );
    }
}

/// Requests on one cleartext HTTP/2 connection from `src` (after
/// `preamble`, e.g. a PROXY header), each with its own `X-Forwarded-For`:
/// what the upstream saw as `X-Forwarded-For` for each.
async fn h2_from(src: [u8; 4], addr: SocketAddr, preamble: &[u8], xffs: &[&str]) -> Vec<String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let mut stream = connect_from(src, addr).await;
    stream.write_all(preamble).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut seen_xff = Vec::new();
    for xff in xffs {
        let req = hyper::Request::builder()
            .uri("http://gw/public/h2")
            .header("x-forwarded-for", *xff)
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let exchange = async {
            let resp = sender.send_request(req).await.expect("h2 response");
            assert_eq!(resp.status(), 200);
            resp.into_body()
                .collect()
                .await
                .expect("h2 body")
                .to_bytes()
        };
        let body = tokio::time::timeout(BOUND, exchange)
            .await
            .expect("h2 in time");
        let echo: Value = serde_json::from_slice(&body).unwrap();
        seen_xff.push(forwarded(&echo).0);
    }
    conn.abort();
    seen_xff
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_are_resolved_one_by_one() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up, r#"trusted_proxies = ["127.0.0.2"]"#).await;
    // A balancer multiplexes many clients on one connection: each request
    // carries its own chain.
    let seen = h2_from(LB, gw.addr, b"", &["6.6.6.6, 203.0.113.7", "198.51.100.9"]).await;
    assert_eq!(seen, ["203.0.113.7, 127.0.0.2", "198.51.100.9, 127.0.0.2"]);
    let seen = h2_from(CLIENT, gw.addr, b"", &["203.0.113.7"]).await;
    assert_eq!(seen, ["127.0.0.3"]);

    let gw = gateway(
        &up,
        "trusted_proxies = [\"127.0.0.2\"]\nproxy_protocol = true",
    )
    .await;
    let header = v2(1, 0x11, &tcp4([203, 0, 113, 5], 5000), &[]);
    let seen = h2_from(LB, gw.addr, &header, &["6.6.6.6", "6.6.6.7"]).await;
    assert_eq!(seen, ["203.0.113.5", "203.0.113.5"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_see_the_resolved_client_address() {
    let up = TestUpstream::start().await;
    let mut spec = GatewaySpec::standard(&up.url()).cookie_secure(false);
    spec.extra = format!(
        "\n[[policies]]\nplugin = {:?}\nconfig = {{ value = \"t\", client_key = \"client\" }}\n",
        crate::policies::testing("tag")
    );
    let gw = GatewayUnderTest::start_with(spec, |text| {
        text.replacen(
            "[server]\n",
            "[server]\ntrusted_proxies = [\"127.0.0.2\"]\n",
            1,
        )
    })
    .await;
    let spoof = "X-Forwarded-For: 203.0.113.66\r\n";
    let login = get("/public/login?user=alice", spoof);
    let echo = echo_from(CLIENT, gw.addr, &login).await;
    assert_eq!(forwarded(&echo).0, "127.0.0.3");
    let via_lb = get(
        "/public/login?user=bob",
        "X-Forwarded-For: 6.6.6.6, 203.0.113.7\r\n",
    );
    let echo = echo_from(LB, gw.addr, &via_lb).await;
    assert_eq!(forwarded(&echo).0, "203.0.113.7, 127.0.0.2");

    let client_of = |sessions: Vec<Value>| {
        assert_eq!(sessions.len(), 1, "{sessions:?}");
        sessions[0]["attributes"]["client"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        client_of(gw.admin_user_sessions("alice").await),
        "127.0.0.3"
    );
    assert_eq!(
        client_of(gw.admin_user_sessions("bob").await),
        "203.0.113.7"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_the_resolved_client_and_the_peer() {
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let mut spec = GatewaySpec::standard(&up.url());
    spec.extra = "[log]\nformat = \"json\"\n".into();
    let text = spec
        .to_toml(&database_url(&dir), &listen.to_string(), &admin)
        .replacen(
            "[server]\n",
            "[server]\ntrusted_proxies = [\"127.0.0.2\"]\n",
            1,
        );
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, text).unwrap();
    let mut process = ServeProcess::spawn(dir.path(), &config_path);
    process
        .wait_listening(listen, Duration::from_secs(20))
        .await;

    let spoof = "X-Forwarded-For: 198.51.100.66\r\n";
    echo_from(CLIENT, listen, &get("/public/from-client", spoof)).await;
    let chain = "X-Forwarded-For: 198.51.100.66, 203.0.113.7\r\n";
    echo_from(LB, listen, &get("/public/from-lb", chain)).await;

    let line_of = |log: &str, path: &str| {
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["path"] == path)
    };
    let deadline = Instant::now() + BOUND;
    let (direct, via_lb) = loop {
        let log = process.output();
        if let (Some(a), Some(b)) = (
            line_of(&log, "/public/from-client"),
            line_of(&log, "/public/from-lb"),
        ) {
            break (a, b);
        }
        assert!(Instant::now() < deadline, "no access log lines:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let peer_ip = |v: &Value| {
        v["peer"]
            .as_str()
            .unwrap()
            .parse::<SocketAddr>()
            .unwrap()
            .ip()
    };
    assert_eq!(direct["client"], "127.0.0.3", "{direct}");
    assert_eq!(peer_ip(&direct).to_string(), "127.0.0.3", "{direct}");
    assert!(!direct.to_string().contains("198.51.100.66"), "{direct}");
    assert_eq!(via_lb["client"], "203.0.113.7", "{via_lb}");
    assert_eq!(peer_ip(&via_lb).to_string(), "127.0.0.2", "{via_lb}");
    assert!(!via_lb.to_string().contains("198.51.100.66"), "{via_lb}");
}

// ---------------------------------------------------------------------------
// The PROXY protocol
// ---------------------------------------------------------------------------

const PROXY_KEYS: &str = "trusted_proxies = [\"127.0.0.2\", \"10.0.0.0/8\"]\n\
                          proxy_protocol = true\n\
                          first_byte_timeout_ms = 600";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_headers_from_a_trusted_balancer_are_honoured() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up, PROXY_KEYS).await;
    let spoof = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n";
    let tlvs = [
        tlv(0x01, b"http/1.1"),      // ALPN
        tlv(0x02, b"example.com"),   // authority
        tlv(0xEA, b"\x01vpce-0123"), // a vendor's (AWS's VPC endpoint id)
        tlv(0x04, &[0; 5]),          // NOOP
    ]
    .concat();
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        // The source is an untrusted client: its own headers count for nothing.
        (
            "v1 TCP4",
            v1("TCP4 203.0.113.7 127.0.0.1 5000 80"),
            "203.0.113.7",
            "http",
        ),
        (
            "v1 TCP6",
            v1("TCP6 2001:db8::7 ::1 5000 80"),
            "2001:db8::7",
            "http",
        ),
        (
            "v2 TCP4 + TLVs",
            v2(1, 0x11, &tcp4([203, 0, 113, 8], 5000), &tlvs),
            "203.0.113.8",
            "http",
        ),
        (
            "v2 TCP6",
            v2(1, 0x21, &tcp6("2001:db8::8", 5000), &[]),
            "2001:db8::8",
            "http",
        ),
        // The balancer speaking for itself: its own address, and its word.
        (
            "v2 LOCAL",
            v2(0, 0x00, &[], &[]),
            "6.6.6.6, 127.0.0.2",
            "https",
        ),
        ("v1 UNKNOWN", v1("UNKNOWN"), "6.6.6.6, 127.0.0.2", "https"),
        // A trusted source (a proxy behind the balancer): its chain counts.
        (
            "v1 trusted source",
            v1("TCP4 10.0.0.5 127.0.0.1 5000 80"),
            "6.6.6.6, 10.0.0.5",
            "https",
        ),
    ];
    for (what, header, xff, proto) in cases {
        // The header and the request in one write.
        let bytes = [header, get("/public/echo", spoof)].concat();
        let echo = echo_from(LB, gw.addr, &bytes).await;
        assert_eq!(forwarded(&echo), (xff.into(), proto.into()), "{what}");
    }

    // Two pipelined requests behind one header: both from its source.
    let pipelined = [
        v1("TCP4 203.0.113.9 127.0.0.1 5000 80"),
        b"GET /public/1 HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(),
        get("/public/2", ""),
    ]
    .concat();
    let raw = exchange(LB, gw.addr, &pipelined).await;
    let text = String::from_utf8_lossy(&raw);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    assert_eq!(
        text.matches(r#""x-forwarded-for":"203.0.113.9""#).count(),
        2,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_header_from_an_untrusted_peer_is_a_bad_request() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up, PROXY_KEYS).await;
    for header in [
        v1("TCP4 203.0.113.7 127.0.0.1 5000 80"),
        v2(1, 0x11, &tcp4([203, 0, 113, 7], 5000), &[]),
    ] {
        let raw = exchange(CLIENT, gw.addr, &[header, get("/public/echo", "")].concat()).await;
        let (status, _) = response(&raw);
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&raw));
        assert!(!String::from_utf8_lossy(&raw).contains("203.0.113.7"));
    }
    assert_eq!(up.hits(), 0, "nothing reached the upstream");
    // The untrusted client is served as if the option were off, and the
    // balancer still is.
    let echo = echo_from(CLIENT, gw.addr, &get("/public/echo", "")).await;
    assert_eq!(forwarded(&echo).0, "127.0.0.3");
    let bytes = [
        v1("TCP4 203.0.113.7 127.0.0.1 5000 80"),
        get("/public/echo", ""),
    ]
    .concat();
    let echo = echo_from(LB, gw.addr, &bytes).await;
    assert_eq!(forwarded(&echo).0, "203.0.113.7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_peer_without_a_valid_header_is_closed_in_time() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up, PROXY_KEYS).await;
    let mut long = v1(&format!("TCP4 {} 127.0.0.1 5000 80", "1".repeat(120)));
    long.extend(get("/public/echo", ""));
    let mut oversized_v2 = v2(1, 0x11, &tcp4([203, 0, 113, 7], 5000), &[]);
    oversized_v2[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("no header", get("/public/echo", ""), "missing"),
        ("an oversized v1 line", long, "too_long"),
        ("an oversized v2 length", oversized_v2, "too_long"),
        (
            "a v1 line without CR",
            b"PROXY TCP4 203.0.113.7 127.0.0.1 5000 80\n".to_vec(),
            "invalid",
        ),
    ];
    for (what, bytes, reason) in cases {
        let before = rejections(&gw, reason).await;
        let started = Instant::now();
        let raw = exchange(LB, gw.addr, &bytes).await;
        assert!(raw.is_empty(), "{what}: {}", String::from_utf8_lossy(&raw));
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{what}: not at once"
        );
        assert_eq!(rejections(&gw, reason).await, before + 1, "{what}");
    }

    // Cut short: the balancer closes its side mid-header.
    let before = rejections(&gw, "truncated").await;
    let mut stream = connect_from(LB, gw.addr).await;
    stream
        .write_all(b"PROXY TCP4 203.0.113.7 127.0")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let raw = tokio::time::timeout(BOUND, read_until_closed(&mut stream))
        .await
        .unwrap();
    assert!(raw.is_empty());
    assert_eq!(rejections(&gw, "truncated").await, before + 1);

    // Stalls mid-header (v1, then v2): closed after first_byte_timeout,
    // while others are served meanwhile.
    for partial in [
        b"PROXY TCP4 203.0.113.7 127.0".to_vec(),
        v2(1, 0x11, &tcp4([203, 0, 113, 7], 5000), &[])[..20].to_vec(),
    ] {
        let before = rejections(&gw, "timeout").await;
        let mut stalled = connect_from(LB, gw.addr).await;
        stalled.write_all(&partial).await.unwrap();
        let started = Instant::now();
        let served = tokio::spawn({
            let addr = gw.addr;
            async move {
                let a = echo_from(CLIENT, addr, &get("/public/echo", "")).await;
                let bytes = [
                    v1("TCP4 203.0.113.8 127.0.0.1 5000 80"),
                    get("/public/echo", ""),
                ]
                .concat();
                let b = echo_from(LB, addr, &bytes).await;
                (forwarded(&a).0, forwarded(&b).0, Instant::now())
            }
        });
        let raw = tokio::time::timeout(BOUND, read_until_closed(&mut stalled))
            .await
            .expect("the stalled connection is closed");
        let closed = Instant::now();
        assert!(raw.is_empty());
        let waited = closed - started;
        assert!(
            waited >= Duration::from_millis(500) && waited < Duration::from_millis(3000),
            "closed after {waited:?} (first_byte_timeout_ms = 600)"
        );
        let (a, b, done) = served.await.unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("127.0.0.3", "203.0.113.8"));
        assert!(done < closed, "the others were served while it stalled");
        assert_eq!(rejections(&gw, "timeout").await, before + 1);
    }
    assert_eq!(up.hits(), 4, "only the others reached the upstream");
}

// ---------------------------------------------------------------------------
// The per-client connection cap behind a balancer
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_client_cap_counts_clients_not_the_balancer() {
    let up = TestUpstream::start().await;

    // X-Forwarded-For: the balancer is exempt, a client is capped.
    let gw = gateway(
        &up,
        "trusted_proxies = [\"127.0.0.2\"]\nmax_connections_per_client = 2",
    )
    .await;
    let mut held = Vec::new();
    for i in 0..5 {
        let mut stream = connect_from(LB, gw.addr).await;
        assert_eq!(
            request_on(&mut stream, "/public/x").await,
            Some(200),
            "balancer connection {i}"
        );
        held.push(stream);
    }
    for i in 0..2 {
        let mut stream = connect_from(CLIENT, gw.addr).await;
        assert_eq!(
            request_on(&mut stream, "/public/x").await,
            Some(200),
            "client connection {i}"
        );
        held.push(stream);
    }
    let mut third = connect_from(CLIENT, gw.addr).await;
    assert_eq!(
        request_on(&mut third, "/public/x").await,
        None,
        "the client's third connection"
    );
    drop(held);

    // The PROXY protocol: the cap is per source address.
    let gw = gateway(
        &up,
        "trusted_proxies = [\"127.0.0.2\"]\nproxy_protocol = true\nmax_connections_per_client = 2",
    )
    .await;
    let behind = |src: &str| v1(&format!("TCP4 {src} 127.0.0.1 5000 80"));
    let mut held = Vec::new();
    for i in 0..2 {
        let mut stream = connect_from(LB, gw.addr).await;
        stream.write_all(&behind("203.0.113.7")).await.unwrap();
        assert_eq!(
            request_on(&mut stream, "/public/x").await,
            Some(200),
            "203.0.113.7 #{i}"
        );
        held.push(stream);
    }
    let mut third = connect_from(LB, gw.addr).await;
    third.write_all(&behind("203.0.113.7")).await.unwrap();
    assert_eq!(
        request_on(&mut third, "/public/x").await,
        None,
        "203.0.113.7's third"
    );
    for (what, header) in [
        ("another client", behind("203.0.113.8")),
        ("the balancer's own (LOCAL)", v2(0, 0x00, &[], &[])),
        ("the balancer's own again", v2(0, 0x00, &[], &[])),
        ("the balancer's own a third time", v1("UNKNOWN")),
    ] {
        let mut stream = connect_from(LB, gw.addr).await;
        stream.write_all(&header).await.unwrap();
        assert_eq!(
            request_on(&mut stream, "/public/x").await,
            Some(200),
            "{what}"
        );
        held.push(stream);
    }
    // A slot is given back when its connection closes.
    drop(held.remove(0));
    let deadline = Instant::now() + BOUND;
    loop {
        let mut again = connect_from(LB, gw.addr).await;
        again.write_all(&behind("203.0.113.7")).await.unwrap();
        if request_on(&mut again, "/public/x").await == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// A real nginx in front
// ---------------------------------------------------------------------------

/// nginx in front of the gateway at `gw`, connecting to it from
/// 127.0.0.2 (`proxy_bind`): `http` proxies HTTP with
/// `$proxy_add_x_forwarded_for`; `stream` is a TCP proxy that sends a
/// PROXY v1 header.
struct NginxInFront {
    addr: SocketAddr,
    child: tokio::process::Child,
    dir: tempfile::TempDir,
}

impl NginxInFront {
    async fn start(gw: SocketAddr, stream: bool) -> NginxInFront {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let conf = |port: u16| {
            let front = if stream {
                format!(
                    "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                 events {{ worker_connections 64; }}\n\
                 stream {{ server {{ listen 127.0.0.1:{port}; proxy_bind 127.0.0.2; \
                 proxy_protocol on; proxy_pass {gw}; }} }}\n"
                )
            } else {
                format!(
                    "events {{ worker_connections 64; }}\n\
                 http {{\n\
                   access_log off;\n\
                   client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
                   fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
                   server {{ listen 127.0.0.1:{port};\n\
                     location / {{ proxy_pass http://{gw}; proxy_bind 127.0.0.2;\n\
                       proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
                       proxy_set_header X-Forwarded-Proto https; }} }}\n\
                 }}\n"
                )
            };
            format!("error_log {d}/error.log warn;\n{front}")
        };
        let (addr, child) = spawn_nginx(dir.path(), conf).await;
        NginxInFront { addr, child, dir }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for NginxInFront {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_proxy_add_x_forwarded_for() {
    let up = TestUpstream::start().await;
    let gw = gateway(&up, r#"trusted_proxies = ["127.0.0.2"]"#).await;
    let nginx = NginxInFront::start(gw.addr, false).await;
    let spoof = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: http\r\n";
    let raw = exchange(CLIENT, nginx.addr, &get("/public/echo", spoof)).await;
    let (status, body) = response(&raw);
    assert_eq!(
        status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&raw),
        nginx.error_log()
    );
    let echo: Value = serde_json::from_slice(&body).unwrap();
    // nginx appended the client's address to what the client sent; the
    // gateway took the rightmost untrusted one and dropped the rest.
    assert_eq!(
        forwarded(&echo),
        ("127.0.0.3, 127.0.0.2".into(), "https".into()),
        "{echo}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_stream_with_the_proxy_protocol() {
    let up = TestUpstream::start().await;
    let gw = gateway(
        &up,
        "trusted_proxies = [\"127.0.0.2\"]\nproxy_protocol = true",
    )
    .await;
    let nginx = NginxInFront::start(gw.addr, true).await;
    let spoof = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n";
    let raw = exchange(CLIENT, nginx.addr, &get("/public/echo", spoof)).await;
    let (status, body) = response(&raw);
    assert_eq!(
        status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&raw),
        nginx.error_log()
    );
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        forwarded(&echo),
        ("127.0.0.3".into(), "http".into()),
        "{echo}"
    );
    // A direct connection from the balancer's address without a header
    // is refused: only nginx's connections carry one.
    assert!(
        exchange(LB, gw.addr, &get("/public/echo", ""))
            .await
            .is_empty()
    );
}
