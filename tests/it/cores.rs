//! `server.worker_threads = 2`: two per-core workers, each with its own
//! runtime and `SO_REUSEPORT` listener, behave as one gateway. Which
//! worker served a connection is read where an operator reads it:
//! `sessiongate_worker_connections_total{worker}` on `/metrics`. Every
//! request here opens a new connection, so that the kernel picks a worker
//! for each; loops run until both workers have served some (bounded in
//! count and time).

use std::time::{Duration, Instant};

use serde_json::Value;
use sessiongate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

const BOUND: Duration = Duration::from_secs(5);
/// Most fresh connections a "both workers" loop makes: the kernel's hash
/// sends each to either worker, so 200 all landing on one is about 2^-199.
const MAX_TRIES: usize = 200;

/// `worker_threads = 2` and `server` keys added to the spec's `[server]`.
async fn two_workers(spec: GatewaySpec, server: &str) -> GatewayUnderTest {
    let server = server.to_string();
    GatewayUnderTest::start_with(spec, move |text| {
        text.replacen(
            "[server]\n",
            &format!("[server]\nworker_threads = 2\n{server}\n"),
            1,
        )
    })
    .await
}

/// A client that opens a new connection for every request.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(BOUND)
        .build()
        .unwrap()
}

async fn metrics_text(admin: &str) -> String {
    client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// `sessiongate_worker_connections_total` of workers 0 and 1.
async fn worker_connections(admin: &str) -> [u64; 2] {
    let text = metrics_text(admin).await;
    let count = |worker: usize| {
        let prefix = format!("sessiongate_worker_connections_total{{worker=\"{worker}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let counts = [count(0), count(1)];
    assert!(
        !text.contains("sessiongate_worker_connections_total{worker=\"2\"}"),
        "a third worker: {text}"
    );
    counts
}

/// Sends `GET path` on new connections until both workers have accepted
/// at least one since the call began; `check` sees every response.
/// Returns how many requests went out.
async fn on_both_workers(
    base: &str,
    admin: &str,
    path: &str,
    token: Option<&str>,
    mut check: impl AsyncFnMut(reqwest::Response),
) -> usize {
    let fresh = fresh_client();
    let before = worker_connections(admin).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for sent in 1..=MAX_TRIES {
        let mut req = fresh.get(format!("{base}{path}"));
        if let Some(token) = token {
            req = req.header("cookie", cookie(token));
        }
        check(req.send().await.expect("request through the gateway")).await;
        if sent >= 4 {
            let now = worker_connections(admin).await;
            if now[0] > before[0] && now[1] > before[1] {
                return sent;
            }
        }
        assert!(Instant::now() < deadline, "out of time");
    }
    panic!(
        "{MAX_TRIES} new connections did not reach both workers: {:?} → {:?}",
        before,
        worker_connections(admin).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_made_on_one_worker_is_served_and_revoked_on_every_worker() {
    let up = TestUpstream::start().await;
    let gw = two_workers(GatewaySpec::standard(&up.url()), "").await;
    let base = format!("http://{}", gw.addr);
    let admin = format!("http://{}", gw.admin_addr);

    // Made through whichever worker took the login's connection.
    let token = gw.login("alice").await;
    on_both_workers(&base, &admin, "/", Some(&token), async |resp| {
        assert_eq!(resp.status(), 200);
        let echo = echo_of(resp).await;
        assert_eq!(seen(&echo, "x-user-id"), Some("alice"));
    })
    .await;

    // Revoked through the admin API (the main thread): no worker serves
    // it afterwards, not even once.
    let resp = gw
        .client
        .delete(gw.admin_url("/v1/users/alice/sessions"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["revoked"], 1);
    on_both_workers(&base, &admin, "/", Some(&token), async |resp| {
        assert_eq!(resp.status(), 401, "a revoked session was served");
    })
    .await;

    // A logout through one worker ends the session on the other too.
    let token = gw.login("bob").await;
    let resp = gw.get("/logout?scope=current", Some(&token)).await;
    assert_eq!(resp.status(), 200);
    on_both_workers(&base, &admin, "/", Some(&token), async |resp| {
        assert_eq!(resp.status(), 401, "a logged-out session was served");
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_swap_reaches_every_worker_at_once() {
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let config_text = |policy: String| {
        let db = format!("sqlite://{}/sg.db", dir.path().display());
        let text = GatewaySpec::standard(&up.url())
            .cookie_secure(false)
            .to_toml(&db, "127.0.0.1:0", "127.0.0.1:0")
            .replacen("[server]\n", "[server]\nworker_threads = 2\n", 1);
        format!("{text}\n[[policies]]\n{policy}\n")
    };
    let tag = format!(
        "plugin = {:?}\nconfig = {{ key = \"v\", value = \"1\" }}",
        crate::policies::testing("tag")
    );
    let deny = format!(
        "plugin = {:?}\nconfig = {{ status = 418, reason = \"v2\" }}",
        crate::policies::testing("deny")
    );
    std::fs::write(&path, config_text(tag)).unwrap();
    let running = sessiongate::server::start(Config::load(&path).unwrap())
        .await
        .expect("start");
    let base = format!("http://{}", running.addr());
    let admin = format!("http://{}", running.admin_addr().unwrap());
    let resp = client()
        .get(format!("{base}/public/login?user=alice"))
        .send()
        .await
        .unwrap();
    let token = set_cookie(resp.headers(), COOKIE).unwrap().value;

    // Both workers run the first chain (each on instances of its own).
    on_both_workers(&base, &admin, "/", Some(&token), async |resp| {
        assert_eq!(resp.status(), 200);
    })
    .await;

    std::fs::write(&path, config_text(deny)).unwrap();
    let reload = client()
        .post(format!("{admin}/v1/policies/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    // Every request after the reload answered, on either worker, runs the
    // new chain: none sees the old one.
    on_both_workers(&base, &admin, "/", Some(&token), async |resp| {
        assert_eq!(resp.status(), 418, "a worker ran the old chain");
    })
    .await;
    let text = metrics_text(&admin).await;
    assert!(
        text.contains(
            r#"sessiongate_policy_calls_total{plugin="deny",hook="access",outcome="deny",chain="default"}"#
        ),
        "{text}"
    );
    running.shutdown().await;
}

/// Sends a request on `stream` and returns the first bytes of the answer,
/// or `None` if nothing comes within `within`.
async fn ask(stream: &mut TcpStream, within: Duration) -> Option<String> {
    stream
        .write_all(b"GET /public/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .ok()?;
    answer(stream, within).await
}

async fn answer(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_across_workers_and_a_freed_place_serves_the_next() {
    let up = TestUpstream::start().await;
    let gw = two_workers(
        GatewaySpec::standard(&up.url()),
        "max_connections = 4\nfirst_byte_timeout_ms = 60000\nidle_timeout_ms = 60000",
    )
    .await;
    let admin = format!("http://{}", gw.admin_addr);
    let before = worker_connections(&admin).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let got = ask(&mut s, BOUND).await.expect("served within the cap");
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        held.push(s);
    }
    // Each round: a fifth connection, to whichever worker the kernel
    // picks, is not served while four are open anywhere; closing one of
    // the four (on either worker) lets it in.
    for round in 0..12 {
        let mut fifth = TcpStream::connect(gw.addr).await.unwrap();
        assert_eq!(
            ask(&mut fifth, Duration::from_millis(300)).await,
            None,
            "round {round}: a fifth connection was served with max_connections = 4"
        );
        held.remove(round % held.len());
        let got = answer(&mut fifth, BOUND).await.unwrap_or_else(|| {
            panic!("round {round}: the freed place did not serve the waiting connection")
        });
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        held.push(fifth);
    }
    let after = worker_connections(&admin).await;
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "16 connections all went to one worker: {before:?} → {after:?}"
    );
    assert_eq!(
        after[0] + after[1] - before[0] - before[1],
        16,
        "every connection counted once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_client_cap_holds_across_workers() {
    let up = TestUpstream::start().await;
    let gw = two_workers(
        GatewaySpec::standard(&up.url()),
        "max_connections_per_client = 3\nfirst_byte_timeout_ms = 60000\nidle_timeout_ms = 60000",
    )
    .await;
    let admin = format!("http://{}", gw.admin_addr);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        assert!(ask(&mut s, BOUND).await.is_some());
        held.push(s);
    }
    let before = worker_connections(&admin).await;
    // Further connections from this client are closed, whichever worker
    // takes them, until both workers have refused some.
    let deadline = Instant::now() + Duration::from_secs(30);
    for tries in 1..=MAX_TRIES {
        let mut extra = TcpStream::connect(gw.addr).await.unwrap();
        let got = ask(&mut extra, BOUND).await;
        assert_eq!(got, None, "a fourth connection from one client was served");
        let now = worker_connections(&admin).await;
        if tries >= 4 && now[0] > before[0] && now[1] > before[1] {
            break;
        }
        assert!(
            tries < MAX_TRIES && Instant::now() < deadline,
            "never reached both workers"
        );
    }
    for s in held.iter_mut() {
        assert!(
            ask(s, BOUND).await.is_some(),
            "a connection within the cap was closed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_drains_every_worker() {
    let up = TestUpstream::start().await;
    let mut gw = two_workers(
        GatewaySpec::standard(&up.url()).shutdown_grace_ms(10_000),
        "",
    )
    .await;
    let admin = format!("http://{}", gw.admin_addr);
    let base = format!("http://{}", gw.addr);
    let addr = gw.addr;
    let before = worker_connections(&admin).await;
    // Slow requests on new connections until both workers hold some.
    let mut in_flight = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let url = format!("{base}/public/slow?ms=1500");
        in_flight.push(tokio::spawn(async move {
            let resp = fresh_client().get(url).send().await;
            resp.map(|r| r.status().as_u16())
        }));
        let hits_wanted = in_flight.len();
        while up.hits() < hits_wanted {
            assert!(
                Instant::now() < deadline,
                "the upstream never saw the requests"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let now = worker_connections(&admin).await;
        if in_flight.len() >= 4 && now[0] > before[0] && now[1] > before[1] {
            break;
        }
        assert!(
            in_flight.len() < 40 && Instant::now() < deadline,
            "40 connections did not reach both workers"
        );
    }
    let started = Instant::now();
    let running = gw.take_running();
    let shutdown = tokio::spawn(running.shutdown());
    // The listeners close at once: no new connection gets in.
    let closed_by = Instant::now() + BOUND;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < closed_by,
            "still accepting after shutdown began"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for request in in_flight {
        assert_eq!(
            request
                .await
                .unwrap()
                .expect("an in-flight request was cut"),
            200
        );
    }
    tokio::time::timeout(BOUND, shutdown)
        .await
        .expect("shutdown finished")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_another_listener_holds_is_still_address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = GatewaySpec::standard(&up.url())
        .to_toml(
            &database_url(&dir),
            &format!("127.0.0.1:{port}"),
            "127.0.0.1:0",
        )
        .replacen("[server]\n", "[server]\nworker_threads = 2\n", 1);
    let config = Config::from_toml_str(&text).unwrap();
    let error = match sessiongate::server::start(config).await {
        Ok(_) => panic!("started on a port another socket listens on"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("server.listen") && error.contains(&port.to_string()),
        "{error}"
    );
}
