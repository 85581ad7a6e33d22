//! The lean upstream path (issue 12: a request without a body is sent and
//! its response read by the gateway's own HTTP/1.1 codec, on the
//! request's own task) against origins that answer with scripted bytes
//! over real sockets: every framing an origin may use arrives whole, every
//! ambiguous one is refused with 502 and never reaches a later request,
//! and connections are reused only when that is safe.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::*;

/// What a scripted origin does with one request.
#[derive(Clone)]
enum Answer {
    /// Writes these bytes and keeps reading requests.
    Send(Vec<u8>),
    /// Writes these bytes and closes.
    SendAndClose(Vec<u8>),
    /// Closes without answering.
    Close,
}

/// An origin on a loopback port that answers each request with what
/// `script(connection, request_on_connection, request_head)` says, and
/// counts the connections it accepted.
struct ScriptedOrigin {
    url: String,
    accepted: Arc<AtomicUsize>,
}

impl ScriptedOrigin {
    async fn start<F>(script: F) -> ScriptedOrigin
    where
        F: Fn(usize, usize, &str) -> Answer + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let script = Arc::new(script);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let connection = count.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    for request in 0.. {
                        let end = loop {
                            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break at + 4;
                            }
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end);
                        match script(connection, request, &head) {
                            Answer::Send(bytes) => {
                                if stream.write_all(&bytes).await.is_err() {
                                    return;
                                }
                            }
                            Answer::SendAndClose(bytes) => {
                                let _ = stream.write_all(&bytes).await;
                                return;
                            }
                            Answer::Close => return,
                        }
                    }
                });
            }
        });
        ScriptedOrigin { url, accepted }
    }

    /// An origin that always answers the same.
    async fn always(bytes: &'static [u8]) -> ScriptedOrigin {
        ScriptedOrigin::start(move |_, _, _| Answer::Send(bytes.to_vec())).await
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn gateway_for(origin: &ScriptedOrigin) -> GatewayUnderTest {
    let spec = GatewaySpec::new()
        .upstream("app", &[&origin.url])
        .route("/", "app", "none");
    GatewayUnderTest::start(spec).await
}

async fn body_of(gw: &GatewayUnderTest, path: &str) -> (u16, String) {
    let resp = gw.get(path, None).await;
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_framing_arrives_whole_and_keep_alive_is_reused() {
    let chunked = ScriptedOrigin::always(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
          5;ext=\"a b\"\r\nhello\r\n1 \r\n,\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
    )
    .await;
    let gw = gateway_for(&chunked).await;
    for i in 0..5 {
        assert_eq!(
            body_of(&gw, &format!("/c/{i}")).await,
            (200, "hello, world".into())
        );
    }
    assert_eq!(
        chunked.connections(),
        1,
        "a chunked response keeps the connection"
    );

    let length = ScriptedOrigin::always(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
    let gw = gateway_for(&length).await;
    for i in 0..5 {
        assert_eq!(
            body_of(&gw, &format!("/l/{i}")).await,
            (200, "hello".into())
        );
    }
    assert_eq!(length.connections(), 1);

    // No length: the body runs to the close; the connection cannot be
    // reused, so every request gets a new one.
    let until_close = ScriptedOrigin::start(|_, _, _| {
        Answer::SendAndClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec())
    })
    .await;
    let gw = gateway_for(&until_close).await;
    for i in 0..3 {
        assert_eq!(
            body_of(&gw, &format!("/u/{i}")).await,
            (200, "until the end".into())
        );
    }
    assert_eq!(until_close.connections(), 3);

    // `Connection: close` and HTTP/1.0 are not reused either.
    let close = ScriptedOrigin::start(|_, _, _| {
        Answer::Send(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        )
    })
    .await;
    let gw = gateway_for(&close).await;
    for i in 0..3 {
        assert_eq!(body_of(&gw, &format!("/k/{i}")).await, (200, "ok".into()));
    }
    assert_eq!(close.connections(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_and_bodiless_statuses() {
    let origin = ScriptedOrigin::start(|_, _, head| {
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        Answer::Send(match path {
            "/continue" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone".to_vec(),
            "/no-content" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            "/not-modified" => b"HTTP/1.1 304 Not Modified\r\ncontent-length: 99\r\n\r\n".to_vec(),
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n".to_vec(),
        })
    })
    .await;
    let gw = gateway_for(&origin).await;
    assert_eq!(body_of(&gw, "/continue").await, (200, "done".into()));
    assert_eq!(body_of(&gw, "/no-content").await.0, 204);
    assert_eq!(body_of(&gw, "/not-modified").await.0, 304);
    // A HEAD's response has no body whatever its Content-Length says: the
    // gateway neither waits for one nor takes the next response as one.
    let head = gw.client.head(gw.url("/head")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "11");
    assert_eq!(body_of(&gw, "/continue").await, (200, "done".into()));
    assert_eq!(origin.connections(), 1, "all on one connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_malformed_responses_are_502_and_the_gateway_keeps_serving() {
    let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
    while big.len() < 70 * 1024 {
        big.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    big.extend_from_slice(b"content-length: 2\r\n\r\nok");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "length and chunked",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
        ),
        (
            "two lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 12\r\n\r\nokHTTP/1.1 2"
                .to_vec(),
        ),
        (
            "gzip coding",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nxx".to_vec(),
        ),
        (
            "folded header",
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\n content-length: 0\r\ncontent-length: 2\r\n\r\nok"
                .to_vec(),
        ),
        (
            "unasked switch",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n".to_vec(),
        ),
        ("garbage", b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()),
        ("oversized head", big),
    ];
    for (what, bytes) in cases {
        let origin = ScriptedOrigin::start(move |connection, _, _| {
            if connection == 0 {
                Answer::Send(bytes.clone())
            } else {
                Answer::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
            }
        })
        .await;
        let gw = gateway_for(&origin).await;
        let error = expect_error(gw.get("/first", None).await, 502).await;
        assert_eq!(
            error["code"], "upstream_invalid_response",
            "{what}: {error}"
        );
        // The connection that carried it is never used again: the next
        // request opens a fresh one and gets that one's answer.
        assert_eq!(body_of(&gw, "/second").await, (200, "ok".into()), "{what}");
        assert_eq!(
            origin.connections(),
            2,
            "{what}: the bad connection was dropped"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_a_response_never_reach_another_request() {
    // An origin that sends a second, unasked-for response right after the
    // first (response splitting): it must not become the next client's
    // answer.
    let origin = ScriptedOrigin::start(|connection, _, _| {
        Answer::Send(if connection == 0 {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled".to_vec()
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nclean".to_vec()
        })
    })
    .await;
    let gw = gateway_for(&origin).await;
    assert_eq!(body_of(&gw, "/a").await, (200, "ok".into()));
    for i in 0..3 {
        assert_eq!(
            body_of(&gw, &format!("/b/{i}")).await,
            (200, "clean".into())
        );
    }
    assert_eq!(origin.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_aborts_the_client_response_and_only_that() {
    let origin = ScriptedOrigin::start(|_, _, head| {
        if head.starts_with("GET /short") {
            Answer::SendAndClose(
                b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part".to_vec(),
            )
        } else if head.starts_with("GET /bad-chunk") {
            Answer::SendAndClose(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloX".to_vec(),
            )
        } else {
            Answer::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
        }
    })
    .await;
    let gw = gateway_for(&origin).await;
    for path in ["/short", "/bad-chunk"] {
        // The head may or may not have left before the body broke; either
        // way the client never sees a clean, complete response.
        match gw.client.get(gw.url(path)).send().await {
            Err(_) => {}
            Ok(resp) => assert!(
                resp.bytes().await.is_err(),
                "{path}: the client sees the body break, never a clean end"
            ),
        }
        assert_eq!(body_of(&gw, "/fine").await, (200, "ok".into()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_closed_under_a_request_is_retried_only_when_idempotent() {
    // Every connection answers its first request and closes without a
    // word at its second: what an origin's idle close looks like when it
    // races the gateway's next request.
    let origin = ScriptedOrigin::start(|_, request, _| {
        if request == 0 {
            Answer::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
        } else {
            Answer::Close
        }
    })
    .await;
    let gw = gateway_for(&origin).await;
    for i in 0..4 {
        assert_eq!(
            body_of(&gw, &format!("/get/{i}")).await,
            (200, "ok".into()),
            "GET {i}"
        );
    }
    // Each GET after the first met a closing connection and went again
    // on a new one.
    assert_eq!(origin.connections(), 4);
    // A POST (no body: still the lean path) is not sent twice.
    let resp = gw.client.post(gw.url("/post")).send().await.unwrap();
    assert_eq!(resp.status(), 502, "a POST is not retried");
    assert_eq!(origin.connections(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_origin_receives_from_the_lean_path() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = seen.clone();
    let origin = ScriptedOrigin::start(move |_, _, head| {
        record.lock().unwrap().push(head.to_string());
        Answer::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
    })
    .await;
    let gw = gateway_for(&origin).await;
    assert_eq!(body_of(&gw, "/a/b?q=1").await.0, 200);
    let resp = gw.client.post(gw.url("/p")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = seen.lock().unwrap().clone();
    // The path as routed, HTTP/1.1, a Host, no hop-by-hop headers.
    assert!(
        seen[0].starts_with("GET /a/b?q=1 HTTP/1.1\r\n"),
        "{}",
        seen[0]
    );
    let lower = seen[0].to_ascii_lowercase();
    assert!(lower.contains("\r\nhost: "), "{}", seen[0]);
    assert!(!lower.contains("\r\nconnection:"), "{}", seen[0]);
    // A POST without a body says so (RFC 9110 §8.6).
    assert!(seen[1].starts_with("POST /p HTTP/1.1\r\n"), "{}", seen[1]);
    assert!(
        seen[1]
            .to_ascii_lowercase()
            .contains("\r\ncontent-length: 0\r\n"),
        "{}",
        seen[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_streams_as_it_comes() {
    // The origin sends the head and half the body, then waits for the
    // gateway's client to have seen that half before it sends the rest:
    // nothing is held back until the end.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let rx = Arc::new(std::sync::Mutex::new(rx));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            .await
            .unwrap();
        let rx = rx.clone();
        tokio::task::spawn_blocking(move || {
            rx.lock().unwrap().recv_timeout(Duration::from_secs(10))
        })
        .await
        .unwrap()
        .expect("the client saw the first part");
        stream.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await.unwrap();
    });
    let spec = GatewaySpec::new()
        .upstream("app", &[&url])
        .route("/", "app", "none");
    let gw = GatewayUnderTest::start(spec).await;
    let mut resp = gw.get("/slow", None).await;
    let first = resp.chunk().await.unwrap().expect("a first chunk");
    assert_eq!(&first[..], b"first");
    tx.send(()).unwrap();
    let mut rest = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"second");
}
