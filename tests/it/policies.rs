//! Policy plugins through the gateway, with real components built from
//! `plugins/` (the bundled ones and the hostile ones in `plugins/testing/`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use sessiongate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{self, ADMIN_TOKEN, GatewaySpec, GatewayUnderTest, TestUpstream};

/// Builds the plugins once per test run and returns `plugins/`.
fn plugins() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let status = Command::new(root.join("scripts/build-plugins.sh"))
            .status()
            .expect("run scripts/build-plugins.sh");
        assert!(status.success(), "scripts/build-plugins.sh failed");
        root.join("plugins")
    })
}

pub(crate) fn bundled(name: &str) -> String {
    plugins().join(format!("{name}.wasm")).display().to_string()
}

pub(crate) fn testing(name: &str) -> String {
    plugins()
        .join("testing")
        .join(format!("{name}.wasm"))
        .display()
        .to_string()
}

/// One `[[policies]]` entry.
fn policy(path: &str, config: &str, extra: &str) -> String {
    format!("\n[[policies]]\nplugin = {path:?}\nconfig = {config}\n{extra}\n")
}

async fn gateway(upstream: &TestUpstream, policies: &[String], session: &str) -> GatewayUnderTest {
    let mut spec = GatewaySpec::standard(&upstream.url()).cookie_secure(false);
    spec.extra = policies.concat();
    GatewayUnderTest::start_with(spec, |text| {
        text.replacen("[session]\n", &format!("[session]\n{session}\n"), 1)
            .replacen("[store]\n", "[store]\nactivity_flush_ms = 50\n", 1)
    })
    .await
}

async fn session_of(gw: &GatewayUnderTest, user: &str) -> Vec<Value> {
    gw.admin_user_sessions(user).await
}

fn millis(rfc3339: &Value) -> i64 {
    let t = humantime::parse_rfc3339(rfc3339.as_str().expect("time string")).expect("RFC 3339");
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn max_age(resp: &reqwest::Response) -> i64 {
    harness::set_cookie(resp.headers(), harness::COOKIE)
        .expect("session cookie")
        .attributes
        .iter()
        .find_map(|a| {
            let (k, v) = a.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("max-age")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("Max-Age")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_sets_the_expiry_and_remember_me_a_longer_one() {
    let upstream = TestUpstream::start().await;
    let gw = gateway(
        &upstream,
        &[policy(
            &bundled("ttl"),
            "{ ttl_seconds = 120, remember_me_ttl_seconds = 3600 }",
            "",
        )],
        "",
    )
    .await;
    let resp = gw.login_response("alice", None, None).await;
    assert_eq!(resp.status(), 200);
    let age = max_age(&resp);
    assert!((119..=120).contains(&age), "Max-Age {age}");
    let s = &session_of(&gw, "alice").await[0];
    assert_eq!(millis(&s["expires_at"]) - millis(&s["created_at"]), 120_000);

    let resp = gw
        .login_response("bob", Some(r#"{"remember_me":"true"}"#), None)
        .await;
    let age = max_age(&resp);
    assert!((3599..=3600).contains(&age), "remember-me Max-Age {age}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_refresh_extends_only_past_its_threshold() {
    let upstream = TestUpstream::start().await;
    let gw = gateway(
        &upstream,
        &[
            policy(&bundled("ttl"), "{ ttl_seconds = 4 }", ""),
            policy(
                &bundled("activity-refresh"),
                "{ idle_timeout_seconds = 4, absolute_lifetime_seconds = 60, refresh_fraction = 0.5 }",
                "",
            ),
        ],
        "",
    )
    .await;
    let token = gw.login("alice").await;
    let before = millis(&session_of(&gw, "alice").await[0]["expires_at"]);

    // Early in the window: allowed, no extension, no write.
    assert_eq!(gw.get("/", Some(&token)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        millis(&session_of(&gw, "alice").await[0]["expires_at"]),
        before
    );

    // Past half of it: extended to now + idle.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let asked = sessiongate::session::now_ms();
    assert_eq!(gw.get("/", Some(&token)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = millis(&session_of(&gw, "alice").await[0]["expires_at"]);
    assert!(
        after >= asked + 4_000 - 50 && after > before + 2_000,
        "extended: {before} -> {after} (asked at {asked})"
    );
    // The session outlives its original expiry.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(sessiongate::session::now_ms() > before);
    assert_eq!(gw.get("/", Some(&token)).await.status(), 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_refresh_enforces_the_absolute_cap_and_the_idle_timeout() {
    let upstream = TestUpstream::start().await;
    let gw = gateway(
        &upstream,
        &[policy(
            &bundled("activity-refresh"),
            "{ idle_timeout_seconds = 60, absolute_lifetime_seconds = 1 }",
            "",
        )],
        "",
    )
    .await;
    let token = gw.login("alice").await;
    assert_eq!(gw.get("/", Some(&token)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let err = harness::expect_error(gw.get("/", Some(&token)).await, 401).await;
    assert_eq!(err["code"], "policy_denied");
    assert!(
        err["message"].as_str().unwrap().contains("absolute"),
        "{err}"
    );
    gw.shutdown().await;

    let gw = gateway(
        &upstream,
        &[policy(
            &bundled("activity-refresh"),
            "{ idle_timeout_seconds = 1, absolute_lifetime_seconds = 60 }",
            "",
        )],
        "",
    )
    .await;
    let token = gw.login("alice").await;
    assert_eq!(gw.get("/", Some(&token)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let err = harness::expect_error(gw.get("/", Some(&token)).await, 401).await;
    assert!(err["message"].as_str().unwrap().contains("idle"), "{err}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_evicts_the_least_recently_seen() {
    let upstream = TestUpstream::start().await;
    let gw = gateway(
        &upstream,
        &[policy(&bundled("max-sessions"), "{ max_sessions = 2 }", "")],
        "touch_interval_seconds = 0",
    )
    .await;
    let first = gw.login("alice").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = gw.login("alice").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The first session is used: the second is now the least recently seen.
    assert_eq!(gw.get("/", Some(&first)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other_user = gw.login("bob").await;
    let third = gw.login("alice").await;

    assert_eq!(gw.get("/", Some(&second)).await.status(), 401, "evicted");
    assert_eq!(gw.get("/", Some(&first)).await.status(), 200);
    assert_eq!(gw.get("/", Some(&third)).await.status(), 200);
    assert_eq!(gw.get("/", Some(&other_user)).await.status(), 200);
    assert_eq!(session_of(&gw, "alice").await.len(), 2);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_runs_in_order_and_the_first_denial_wins() {
    let upstream = TestUpstream::start().await;
    let gw = gateway(
        &upstream,
        &[
            policy(&testing("tag"), r#"{ key = "first", value = "a" }"#, ""),
            policy(&testing("tag"), r#"{ key = "second", value = "b" }"#, ""),
            policy(
                &testing("deny"),
                r#"{ status = 403, reason = "first denial" }"#,
                "",
            ),
            policy(
                &testing("deny"),
                r#"{ status = 429, reason = "second denial" }"#,
                "",
            ),
        ],
        "",
    )
    .await;
    let token = gw.login("alice").await;
    let s = &session_of(&gw, "alice").await[0];
    assert_eq!(s["attributes"]["chain"], "a,b", "{s}");
    assert_eq!(s["attributes"]["first"], "a");
    assert_eq!(s["attributes"]["second"], "b");
    let err = harness::expect_error(gw.get("/", Some(&token)).await, 403).await;
    assert_eq!(err["code"], "policy_denied");
    assert_eq!(err["message"], "first denial");
    // Routes without authentication run no access hook.
    assert_eq!(gw.get("/public/x", None).await.status(), 200);
    gw.shutdown().await;
}

/// A hostile plugin fails only its own requests, in its configured mode,
/// and the gateway keeps serving.
async fn contained(plugin: &str, config: &str, failure_kind: &str) {
    let upstream = TestUpstream::start().await;
    for (mode, expected) in [("deny", 503), ("allow", 200)] {
        let gw = gateway(
            &upstream,
            &[policy(
                &testing(plugin),
                config,
                &format!("on_error = {mode:?}\ntimeout_ms = 50\nmemory_limit_mb = 8"),
            )],
            "",
        )
        .await;
        let token = gw.login("alice").await;
        for _ in 0..3 {
            let started = Instant::now();
            let resp = gw.get("/", Some(&token)).await;
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{plugin}: a failing call is cut short"
            );
            if expected == 503 {
                let err = harness::expect_error(resp, 503).await;
                assert_eq!(err["code"], "policy_failed", "{plugin}");
            } else {
                assert_eq!(resp.status(), 200, "{plugin} with on_error = allow");
            }
        }
        // Other requests are served meanwhile.
        assert_eq!(gw.get("/public/hello", None).await.status(), 200);
        let health = gw
            .client
            .get(gw.admin_url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        let metrics = gw
            .client
            .get(gw.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let line = format!(
            "sessiongate_policy_failures_total{{plugin=\"{plugin}\",kind=\"{failure_kind}\",chain=\"default\"}} 3"
        );
        assert!(
            metrics.contains(&line),
            "{plugin}: no `{line}` in\n{metrics}"
        );
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_cut_off_by_the_time_limit() {
    contained("loop-forever", "{}", "timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_memory_growth_hits_the_memory_limit() {
    contained("memory-hog", "{}", "memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_recursion_traps() {
    // A Rust guest's shadow stack lives in linear memory, so unbounded
    // recursion ends in an out-of-bounds access before the wasm stack
    // limit; either way it is a trap.
    contained("deep-recursion", "{}", "trap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recursion_that_exhausts_the_wasm_stack_is_a_stack_overflow() {
    contained("deep-recursion", r#"{ exhaust = "wasm-stack" }"#, "stack").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_traps() {
    contained("panic", "{}", "trap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v020_plugin_looping_over_the_host_imports_is_cut_off_by_the_time_limit() {
    contained("import-flood", "{}", "timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v020_plugin_asking_for_a_huge_attribute_name_is_cut_off_by_the_time_limit() {
    // 2 MiB per call: the host reads it whole before it can refuse it, so
    // that reading is what the time limit must count.
    contained("import-flood", "{ name_bytes = 2097152 }", "timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v010_plugin_in_an_infinite_loop_is_cut_off_by_the_time_limit() {
    contained("legacy-v010", r#"{ mode = "loop" }"#, "timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v010_plugin_panic_traps() {
    contained("legacy-v010", r#"{ mode = "panic" }"#, "trap").await;
}

/// The session id the admin API shows for `user`'s only session.
async fn only_session_id(gw: &GatewayUnderTest, user: &str) -> String {
    let sessions = session_of(gw, user).await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    sessions[0]["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_interface_versions_see_the_same_request_and_session() {
    let upstream = TestUpstream::start().await;
    for (plugin, config, interface) in [
        ("legacy-v010", r#"{ mode = "echo" }"#, "0.1.0"),
        ("echo", "{}", "0.2.0"),
    ] {
        let gw = gateway(&upstream, &[policy(&testing(plugin), config, "")], "").await;
        let resp = gw
            .login_response("alice", Some(r#"{"echo":"e1"}"#), None)
            .await;
        assert_eq!(resp.status(), 200);
        let token = harness::set_cookie(resp.headers(), harness::COOKIE)
            .unwrap()
            .value;
        let id = only_session_id(&gw, "alice").await;
        let resp = gw
            .client
            .get(gw.url("/api/some/path?q=1"))
            .header("cookie", harness::cookie(&token))
            .header("user-agent", "probe/1")
            .send()
            .await
            .unwrap();
        let err = harness::expect_error(resp, 403).await;
        assert_eq!(
            err["message"],
            format!(
                "GET /api/some/path {} 127.0.0.1 probe/1 {id} alice e1",
                gw.addr
            ),
            "{plugin}"
        );
        let list = policies_list(&gw.client, &gw.admin_url("")).await;
        assert_eq!(list["policies"][0]["interface"], interface, "{list}");
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v020_imports_answer_from_the_current_access_call_only() {
    let upstream = TestUpstream::start().await;
    let gw = gateway(&upstream, &[policy(&testing("echo"), "{}", "")], "").await;
    let mut users = Vec::new();
    for (user, attr) in [("alice", "a"), ("bob", "b")] {
        let attrs = format!(r#"{{"echo":"{attr}"}}"#);
        let resp = gw.login_response(user, Some(&attrs), None).await;
        assert_eq!(resp.status(), 200);
        let token = harness::set_cookie(resp.headers(), harness::COOKIE)
            .unwrap()
            .value;
        let sessions = session_of(&gw, user).await;
        // In on_create (outside an access call) every import said nothing.
        assert_eq!(
            sessions[0]["attributes"]["outside"], "||||||||0",
            "{sessions:?}"
        );
        users.push((user, attr, token, only_session_id(&gw, user).await));
    }
    // Interleaved and concurrent, on pooled instances that served the
    // other user's calls just before.
    let mut calls = Vec::new();
    for i in 0..40 {
        let (user, attr, token, id) = users[i % 2].clone();
        let client = gw.client.clone();
        let url = gw.url(&format!("/api/{user}/{i}"));
        let host = gw.addr.to_string();
        calls.push(tokio::spawn(async move {
            let resp = client
                .get(url)
                .header("cookie", harness::cookie(&token))
                .header("user-agent", format!("ua-{i}"))
                .send()
                .await
                .unwrap();
            let err = harness::expect_error(resp, 403).await;
            assert_eq!(
                err["message"],
                format!("GET /api/{user}/{i} {host} 127.0.0.1 ua-{i} {id} {user} {attr}")
            );
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_outside_the_allowed_values_is_a_failure() {
    // bad-decision sets an expiry of 0 at creation and denies with status
    // 200 at access: both refused by the host.
    let upstream = TestUpstream::start().await;
    let deny = gateway(&upstream, &[policy(&testing("bad-decision"), "{}", "")], "").await;
    let err = harness::expect_error(deny.login_response("alice", None, None).await, 503).await;
    assert_eq!(
        err["code"], "policy_failed",
        "no session is created on a bad decision"
    );
    assert!(deny.admin_user_sessions("alice").await.is_empty());
    deny.shutdown().await;

    let allow = gateway(
        &upstream,
        &[policy(
            &testing("bad-decision"),
            "{}",
            "on_error = \"allow\"",
        )],
        "default_ttl_seconds = 600",
    )
    .await;
    let resp = allow.login_response("alice", None, None).await;
    assert_eq!(resp.status(), 200);
    let age = max_age(&resp);
    assert!(
        age > 0,
        "the invalid expiry was ignored, not applied: Max-Age {age}"
    );
    let token = harness::set_cookie(resp.headers(), harness::COOKIE)
        .unwrap()
        .value;
    for _ in 0..3 {
        assert_eq!(allow.get("/", Some(&token)).await.status(), 200);
    }
    let metrics = allow
        .client
        .get(allow.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"sessiongate_policy_failures_total{plugin="bad-decision",kind="invalid_decision",chain="default"} 4"#
        ),
        "{metrics}"
    );
    allow.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_fails_only_its_own_request() {
    let upstream = TestUpstream::start().await;
    let gw = gateway(&upstream, &[policy(&testing("crash-every"), "{}", "")], "").await;
    let token = gw.login("alice").await;
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..60 {
        match gw.get("/", Some(&token)).await.status().as_u16() {
            200 => ok += 1,
            503 => failed += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok > 5 && failed > 5, "ok {ok}, failed {failed}");
    gw.shutdown().await;
}

/// Writes `text` as the config file in `dir` and starts the gateway from it.
async fn gateway_from_file(dir: &Path, text: &str) -> sessiongate::server::RunningGateway {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"));
    sessiongate::server::start(config).await.expect("start")
}

fn file_config(upstream: &TestUpstream, dir: &Path, policies: &str) -> String {
    let db = format!("sqlite://{}/sg.db", dir.display());
    let mut text = GatewaySpec::standard(&upstream.url())
        .cookie_secure(false)
        .to_toml(&db, "127.0.0.1:0", "127.0.0.1:0");
    text.push_str(policies);
    text
}

async fn policies_list(client: &reqwest::Client, admin: &str) -> Value {
    client
        .get(format!("{admin}/v1/policies"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_fails_no_request_and_takes_effect_at_once() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let v1 = policy(&testing("tag"), r#"{ key = "v", value = "1" }"#, "");
    let v2 = policy(&testing("deny"), r#"{ status = 418, reason = "v2" }"#, "");
    let running = gateway_from_file(dir.path(), &file_config(&upstream, dir.path(), &v1)).await;
    let base = format!("http://{}", running.addr());
    let admin = format!("http://{}", running.admin_addr().unwrap());
    let client = harness::client();
    let resp = client
        .get(format!("{base}/public/login?user=alice"))
        .send()
        .await
        .unwrap();
    let token = harness::set_cookie(resp.headers(), harness::COOKIE)
        .unwrap()
        .value;
    let before = policies_list(&client, &admin).await;
    assert!(
        before["policies"][0]["plugin"]
            .as_str()
            .unwrap()
            .ends_with("tag.wasm")
    );

    // Two clients loop (bounded in count and time) while the chain is swapped.
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..2)
        .map(|_| {
            let (client, url, token, stop) = (
                harness::client(),
                format!("{base}/"),
                token.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(20);
                // The count bound is far above what 20 s can reach: a
                // smaller one let a fast build stop before the reload.
                while !stop.load(Ordering::Relaxed)
                    && seen.len() < 2_000_000
                    && Instant::now() < deadline
                {
                    let status = client
                        .get(&url)
                        .header("cookie", harness::cookie(&token))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    seen.push(status);
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(
        dir.path().join("gateway.toml"),
        file_config(&upstream, dir.path(), &v2),
    )
    .unwrap();
    let reload = client
        .post(format!("{admin}/v1/policies/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    let after: Value = reload.json().await.unwrap();
    assert!(
        after["policies"][0]["plugin"]
            .as_str()
            .unwrap()
            .ends_with("deny.wasm")
    );
    // Visible right after the reload answered.
    let resp = client
        .get(format!("{base}/"))
        .header("cookie", harness::cookie(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 418);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let metrics = client
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failures: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("sessiongate_policy_failures"))
        .collect();
    for handle in loops {
        let seen = handle.await.unwrap();
        assert!(seen.len() > 10, "the load ran: {} requests", seen.len());
        assert!(
            seen.iter().all(|s| *s == 200 || *s == 418),
            "failed requests during the reload: {:?} {failures:?}",
            seen.iter()
                .filter(|s| **s != 200 && **s != 418)
                .collect::<Vec<_>>()
        );
        // Once a client has seen the new chain it never sees the old one.
        let first_new = seen
            .iter()
            .position(|s| *s == 418)
            .expect("the new chain served");
        assert!(seen[first_new..].iter().all(|s| *s == 418));
        assert!(seen[..first_new].iter().all(|s| *s == 200));
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_plugin_is_rejected_by_reload_and_the_old_chain_stays() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plugin_path = dir.path().join("policy.wasm");
    std::fs::copy(testing("tag"), &plugin_path).unwrap();
    let entry = policy(
        &plugin_path.display().to_string(),
        r#"{ key = "v", value = "1" }"#,
        "",
    );
    let running = gateway_from_file(dir.path(), &file_config(&upstream, dir.path(), &entry)).await;
    let admin = format!("http://{}", running.admin_addr().unwrap());
    let client = harness::client();
    let before = policies_list(&client, &admin).await;

    for broken in [&b"not wasm at all"[..], &b"\0asm\x01\0\0\0\x01\x02"[..]] {
        std::fs::write(&plugin_path, broken).unwrap();
        let resp = client
            .post(format!("{admin}/v1/policies/reload"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let err = harness::expect_error(resp, 422).await;
        assert_eq!(err["code"], "reload_failed");
        assert!(
            err["message"].as_str().unwrap().contains("policy.wasm"),
            "{err}"
        );
        assert_eq!(
            policies_list(&client, &admin).await,
            before,
            "old chain in service"
        );
    }
    // A plugin whose init rejects its config is refused the same way.
    std::fs::copy(testing("init-fails"), &plugin_path).unwrap();
    let resp = client
        .post(format!("{admin}/v1/policies/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let err = harness::expect_error(resp, 422).await;
    assert!(err["message"].as_str().unwrap().contains("needed"), "{err}");
    let resp = client
        .get(format!("http://{}/public/login?user=a", running.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "still serving with the old chain");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_files_are_watched_when_configured() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plugin_path = dir.path().join("policy.wasm");
    std::fs::copy(testing("deny"), &plugin_path).unwrap();
    let entry = policy(&plugin_path.display().to_string(), "{}", "");
    let text = format!(
        "{}\n[plugins]\nwatch = true\nwatch_interval_ms = 100\n",
        file_config(&upstream, dir.path(), &entry)
    );
    let running = gateway_from_file(dir.path(), &text).await;
    let admin = format!("http://{}", running.admin_addr().unwrap());
    let client = harness::client();
    let before = policies_list(&client, &admin).await["policies"][0]["sha256"].clone();
    std::fs::copy(testing("crash-every"), &plugin_path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = policies_list(&client, &admin).await["policies"][0]["sha256"].clone();
        if now != before {
            break;
        }
        assert!(Instant::now() < deadline, "the watcher never reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_runs_each_plugins_init_with_its_config() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let check = |policies: &str| {
        std::fs::write(&path, file_config(&upstream, dir.path(), policies)).unwrap();
        Command::new(env!("CARGO_BIN_EXE_sessiongate"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = check(&policy(&testing("init-fails"), "{ other = 1 }", ""));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("missing required key `needed`"), "{stderr}");
    assert!(stderr.contains("init-fails.wasm"), "{stderr}");
    assert!(stderr.contains("gateway.toml"), "{stderr}");

    let out = check(&policy(&testing("init-fails"), "{ needed = 1 }", ""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    let missing = dir.path().join("nope.wasm").display().to_string();
    let out = check(&policy(&missing, "{}", ""));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.wasm"));
}

#[test]
fn plugin_try_shows_each_hooks_decision() {
    let out = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .args([
            "plugin",
            "try",
            &bundled("max-sessions"),
            "--config",
            r#"{"max_sessions": 2}"#,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["hooks"], serde_json::json!(["evict"]));
    let others = report["evict"]["others"].as_array().unwrap();
    // Three others plus the new one, two allowed: the two least recently
    // seen go.
    assert_eq!(
        report["evict"]["revoke"],
        serde_json::json!([others[2]["id"], others[1]["id"]])
    );

    let out = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .args([
            "plugin",
            "try",
            &bundled("ttl"),
            "--config",
            r#"{"ttl_seconds": 90}"#,
        ])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["create"]["expires_in_seconds"], 90);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policies_of_the_running_binary() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (harness::free_port(), harness::free_port());
    let config_for = |entry: &str| {
        let db = format!("sqlite://{}/sg.db", dir.path().display());
        let mut text = GatewaySpec::standard(&upstream.url())
            .cookie_secure(false)
            .to_toml(
                &db,
                &format!("127.0.0.1:{port}"),
                &format!("127.0.0.1:{admin_port}"),
            );
        text.push_str(entry);
        text
    };
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        config_for(&policy(
            &testing("tag"),
            r#"{ key = "v", value = "1" }"#,
            "",
        )),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let client = harness::client();
    let plugin_of = |v: &Value| {
        v["policies"][0]["plugin"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(resp) = client
            .get(format!("{admin}/v1/policies"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            && let Ok(v) = resp.json::<Value>().await
        {
            assert!(plugin_of(&v).ends_with("tag.wasm"), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "the binary never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(&path, config_for(&policy(&testing("deny"), "{}", ""))).unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = policies_list(&client, &admin).await;
        if plugin_of(&v).ends_with("deny.wasm") {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit status {exit}");
}

/// The value of the first Prometheus line starting with `prefix`.
fn metric(text: &str, prefix: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_flooding_the_log_is_held_to_its_rate() {
    // The binary, as deployed: its log is what an operator pays for.
    const RATE: u64 = 10;
    const REQUESTS: u64 = 20;
    const LINES_PER_CALL: u64 = 200_000;
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", harness::free_port())
        .parse()
        .unwrap();
    let admin = format!("127.0.0.1:{}", harness::free_port());
    let mut spec = GatewaySpec::standard(&upstream.url()).cookie_secure(false);
    spec.extra = format!(
        "[plugins]\nlog_lines_per_second = {RATE}\n{}",
        policy(&testing("log-flood"), "{}", "timeout_ms = 10000")
    );
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(
        &config_path,
        spec.to_toml(&harness::database_url(&dir), &listen.to_string(), &admin),
    )
    .unwrap();
    let mut child = harness::ServeProcess::spawn(dir.path(), &config_path);
    child.wait_listening(listen, Duration::from_secs(30)).await;
    let output = || child.output();

    let client = harness::client();
    let resp = client
        .get(format!("http://{listen}/public/login?user=alice"))
        .send()
        .await
        .unwrap();
    let token = harness::set_cookie(resp.headers(), harness::COOKIE)
        .expect("login")
        .value;
    let started = Instant::now();
    for i in 1..=REQUESTS {
        let resp = client
            .get(format!("http://{listen}/api/x"))
            .header("cookie", harness::cookie(&token))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        // Checked as it goes: without a limit one request writes ~200 MiB.
        let size = child.log_len();
        assert!(
            size < 1 << 20,
            "after {i} requests the log holds {size} bytes"
        );
    }
    let elapsed = started.elapsed().as_secs_f64();

    let metrics = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dropped = metric(
        &metrics,
        r#"sessiongate_plugin_log_dropped_total{plugin="log-flood",chain="default"}"#,
    )
    .unwrap_or_else(|| panic!("no dropped-lines counter in\n{metrics}"));
    let text = output();
    let line = "x".repeat(1024);
    let written = text.lines().filter(|l| l.contains(&line)).count() as u64;
    // A full bucket (one second's worth) at load, then the rate.
    let allowed = RATE as f64 * (elapsed + 1.0);
    assert!(
        written >= RATE && written as f64 <= allowed + 1.0,
        "{written} plugin lines in {elapsed:.1} s at {RATE}/s"
    );
    assert_eq!(
        written + dropped,
        REQUESTS * LINES_PER_CALL,
        "every line was written or counted"
    );
    // The drops are summarized, at most once a second.
    let summaries: Vec<u64> = text
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("plugin log-flood dropped ")?;
            rest.split(' ').next()?.parse().ok()
        })
        .collect();
    assert!(
        !summaries.is_empty() && summaries.len() as f64 <= elapsed + 2.0,
        "{} summaries in {elapsed:.1} s",
        summaries.len()
    );
    let summarized: u64 = summaries.iter().sum();
    assert!(
        summarized > 0 && summarized <= dropped,
        "{summarized} summarized of {dropped}"
    );
    let size = text.len();
    assert!(size < 1 << 20, "the log holds {size} bytes");
    drop(child);
}

#[tokio::test]
async fn a_call_burning_its_time_limit_does_not_stall_other_requests() {
    // A current-thread runtime, as `server.worker_threads = 1`: the gateway,
    // its upstream and these clients all share one thread. The policy chain
    // is global, so the fast requests use a route without authentication
    // (no hook runs there) and the slow one a protected route.
    const FAST: usize = 30;
    let upstream = TestUpstream::start().await;
    let gw = gateway(
        &upstream,
        // Fuel, not wall time: 5 s of budget is about 1 s of this loop.
        &[policy(&testing("loop-forever"), "{}", "timeout_ms = 5000")],
        "",
    )
    .await;
    let token = gw.login("alice").await;
    // The slow request is on the wire before the first fast one.
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "GET /api/slow HTTP/1.1\r\nHost: app.example\r\nCookie: {}\r\nConnection: close\r\n\r\n",
        harness::cookie(&token)
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let sent = Instant::now();
    let slow = tokio::spawn(async move {
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        (Instant::now(), String::from_utf8_lossy(&answer).to_string())
    });
    let mut fast_done = Vec::with_capacity(FAST);
    for i in 0..FAST {
        let resp = gw.get(&format!("/public/fast-{i}"), None).await;
        assert_eq!(resp.status(), 200, "fast request {i}");
        fast_done.push(Instant::now());
    }
    let (slow_done, answer) = tokio::time::timeout(Duration::from_secs(20), slow)
        .await
        .expect("the slow request ends")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("policy_failed"), "{answer}");
    // The slow call burned its time limit ...
    assert!(
        slow_done - sent >= Duration::from_millis(250),
        "the slow call ended after {:?}",
        slow_done - sent
    );
    // ... and fast requests kept finishing meanwhile: several before it
    // ended, and never a gap anywhere near its time limit (synchronous
    // calls froze the thread for all of it).
    let before_slow = fast_done.iter().filter(|t| **t < slow_done).count();
    assert!(
        before_slow >= 5,
        "only {before_slow} of {FAST} fast requests finished while the slow call ran"
    );
    let mut points = vec![sent];
    points.extend(fast_done.iter().copied().filter(|t| *t < slow_done));
    let longest_gap = points
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        longest_gap < Duration::from_millis(200),
        "a fast request waited {longest_gap:?} while the slow call ran"
    );
    gw.shutdown().await;
}
