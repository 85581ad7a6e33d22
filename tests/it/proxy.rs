//! The proxy path over real sockets: authentication outcomes, session
//! begin/end through upstream headers, header hygiene, streaming,
//! WebSockets, HTTP/2, round robin, restarts and shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::harness::*;

/// An upstream and a gateway with [`GatewaySpec::standard`] routes.
async fn standard() -> (TestUpstream, GatewayUnderTest) {
    let up = TestUpstream::start().await;
    let gw = GatewayUnderTest::start(GatewaySpec::standard(&up.url())).await;
    (up, gw)
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn is_token_shaped(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The id of `user`'s only live session, from the admin API.
async fn only_session_id(gw: &GatewayUnderTest, user: &str) -> String {
    let sessions = gw.admin_user_sessions(user).await;
    assert_eq!(sessions.len(), 1, "{user} has one session: {sessions:?}");
    sessions[0]["id"].as_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------
// What a protected request gets
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_session_is_forwarded_with_identity_and_forwarding_headers() {
    let (_up, gw) = standard().await;
    let token = gw.login("alice").await;
    assert!(is_token_shaped(&token), "token {token:?}");
    let session_id = only_session_id(&gw, "alice").await;

    // A client-supplied request id is kept, both ways.
    let resp = gw
        .client
        .get(gw.url("/api/things?x=1&y=two"))
        .header("cookie", cookie(&token))
        .header("x-request-id", "client-req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "client-req-42");
    let echo = echo_of(resp).await;
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/api/things");
    assert_eq!(echo["query"], "x=1&y=two");
    assert_eq!(seen(&echo, "x-user-id"), Some("alice"));
    assert_eq!(seen(&echo, "x-session-id"), Some(session_id.as_str()));
    assert!(
        is_uuid(&session_id) && session_id.as_bytes()[14] == b'7',
        "UUID v7: {session_id}"
    );
    assert_eq!(seen(&echo, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen(&echo, "x-forwarded-proto"), Some("http"));
    assert_eq!(
        seen(&echo, "x-forwarded-host"),
        Some(gw.addr.to_string().as_str())
    );
    assert_eq!(seen(&echo, "x-request-id"), Some("client-req-42"));

    // Without one, a fresh id is generated per request and returned.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let resp = gw.get("/api/things", Some(&token)).await;
        let returned = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        let echo = echo_of(resp).await;
        let upstream_id = seen(&echo, "x-request-id").expect("x-request-id upstream");
        assert!(!upstream_id.is_empty());
        assert_eq!(upstream_id, returned, "the id upstream is the one returned");
        ids.push(returned);
    }
    assert_ne!(ids[0], ids[1], "each request gets its own id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_gets_401_and_never_reaches_the_upstream() {
    let (up, gw) = standard().await;
    let before = up.hits();
    let resp = gw.get("/api/things", None).await;
    let err = expect_401(resp).await;
    assert!(!err["request_id"].as_str().unwrap().is_empty());

    // A client request id shows up in the error body.
    let resp = gw
        .client
        .get(gw.url("/api/things"))
        .header("x-request-id", "req-no-token-1")
        .send()
        .await
        .unwrap();
    let err = expect_401(resp).await;
    assert_eq!(err["request_id"], "req-no-token-1");
    // Other cookies are not a session.
    let resp = gw
        .client
        .get(gw.url("/api/things"))
        .header("cookie", "theme=dark")
        .send()
        .await
        .unwrap();
    expect_401(resp).await;
    assert_eq!(
        up.hits(),
        before,
        "rejected requests must not reach upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tokens_get_401_and_never_reach_the_upstream() {
    let (up, gw) = standard().await;
    let token = gw.login("alice").await;
    // The same token with one character changed (keeping base64url).
    let mut tampered: Vec<u8> = token.clone().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let before = up.hits();

    let cookies = [
        "sg_session=short".to_string(),
        format!("sg_session={}", "!".repeat(64)),
        format!("sg_session={}", "A".repeat(64)),
        format!("sg_session={token}x"),
        format!("sg_session={tampered}"),
        "sg_session=".to_string(),
    ];
    for c in &cookies {
        let resp = gw
            .client
            .get(gw.url("/api/x"))
            .header("cookie", c)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "cookie {c:?}");
        expect_401(resp).await;
    }
    for bearer in ["garbage", "A".repeat(64).as_str(), tampered.as_str()] {
        let resp = gw
            .client
            .get(gw.url("/api/x"))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "bearer {bearer:?}");
        expect_401(resp).await;
    }
    assert_eq!(up.hits(), before);
    // The original still works: the 401s were about the tokens.
    assert_eq!(gw.get("/api/x", Some(&token)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_issued_elsewhere_get_401() {
    let up = TestUpstream::start().await;
    let secret = "shared-token-secret-0123456789-abcdef";
    let a = GatewayUnderTest::start(GatewaySpec::standard(&up.url()).token_secret(secret)).await;
    // Same MAC key, different database: the token is well-formed and
    // correctly tagged, but no session behind it exists in `a`'s stores.
    let b = GatewayUnderTest::start(GatewaySpec::standard(&up.url()).token_secret(secret)).await;
    // A different key and a different database.
    let c = GatewayUnderTest::start(GatewaySpec::standard(&up.url())).await;

    let token_b = b.login("bob").await;
    let token_c = c.login("carol").await;
    assert_eq!(b.get("/api/x", Some(&token_b)).await.status(), 200);
    assert_eq!(c.get("/api/x", Some(&token_c)).await.status(), 200);

    let before = up.hits();
    expect_401(a.get("/api/x", Some(&token_b)).await).await;
    expect_401(a.get("/api/x", Some(&token_c)).await).await;
    let resp = a
        .client
        .get(a.url("/api/x"))
        .bearer_auth(&token_b)
        .send()
        .await
        .unwrap();
    expect_401(resp).await;
    assert_eq!(up.hits(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_sessions_get_401() {
    let up = TestUpstream::start().await;
    let gw = GatewayUnderTest::start(GatewaySpec::standard(&up.url()).ttl_seconds(2)).await;
    let token = gw.login("alice").await;
    assert_eq!(gw.get("/api/x", Some(&token)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let before = up.hits();
    expect_401(gw.get("/api/x", Some(&token)).await).await;
    assert_eq!(up.hits(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_sessions_get_401() {
    let (up, gw) = standard().await;
    let token = gw.login("alice").await;
    assert_eq!(gw.get("/api/x", Some(&token)).await.status(), 200);
    let id = only_session_id(&gw, "alice").await;
    let resp = gw
        .client
        .delete(gw.admin_url(&format!("/v1/sessions/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let before = up.hits();
    expect_401(gw.get("/api/x", Some(&token)).await).await;
    assert_eq!(up.hits(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_get_302_to_login_redirect() {
    let (up, gw) = standard().await;
    let before = up.hits();
    let html = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    let resp = gw
        .client
        .get(gw.url("/web/dashboard"))
        .header("accept", html)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(resp.headers()["location"], "/login");

    // Not a browser: a 401 on the same route.
    let resp = gw
        .client
        .get(gw.url("/web/dashboard"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    expect_401(resp).await;
    // A browser on a route without login_redirect: a 401 too.
    let resp = gw
        .client
        .get(gw.url("/api/dashboard"))
        .header("accept", html)
        .send()
        .await
        .unwrap();
    expect_401(resp).await;
    assert_eq!(up.hits(), before);

    // With a session the browser gets the page.
    let token = gw.login("alice").await;
    let resp = gw
        .client
        .get(gw.url("/web/dashboard"))
        .header("accept", html)
        .header("cookie", cookie(&token))
        .send()
        .await
        .unwrap();
    let echo = echo_of(resp).await;
    assert_eq!(seen(&echo, "x-user-id"), Some("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_gets_502() {
    let up = TestUpstream::start().await;
    let spec = GatewaySpec::new()
        .upstream("app", &[&up.url()])
        .upstream("dead", &[&closed_url()])
        .route("/public/", "app", "none")
        .route("/dead-open/", "dead", "none")
        .route("/dead/", "dead", "required")
        .route("/", "app", "required");
    let gw = GatewayUnderTest::start(spec).await;
    let token = gw.login("alice").await;
    expect_error(gw.get("/dead/x", Some(&token)).await, 502).await;
    expect_error(gw.get("/dead-open/x", None).await, 502).await;
    // A POST with a body too.
    let resp = gw
        .client
        .post(gw.url("/dead/x"))
        .header("cookie", cookie(&token))
        .body("payload")
        .send()
        .await
        .unwrap();
    expect_error(resp, 502).await;
    // The gateway itself is fine.
    assert_eq!(gw.get("/api/x", Some(&token)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_gets_504() {
    let up = TestUpstream::start().await;
    let spec = GatewaySpec::new()
        .upstream("app", &[&up.url()])
        .upstream_with_timeout("tight", &[&up.url()], 300)
        .route("/public/", "app", "none")
        .route("/tight/", "tight", "required")
        .route("/", "app", "required");
    let gw = GatewayUnderTest::start(spec).await;
    let token = gw.login("alice").await;
    let started = Instant::now();
    expect_error(gw.get("/tight/slow?ms=2000", Some(&token)).await, 504).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "504 after {took:?}, expected about 300 ms"
    );
    assert!(
        took >= Duration::from_millis(250),
        "504 after only {took:?}"
    );
    // Fast enough answers on the same upstream are fine.
    assert_eq!(
        gw.get("/tight/slow?ms=10", Some(&token)).await.status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_paths_get_404() {
    let up = TestUpstream::start().await;
    let spec = GatewaySpec::new()
        .upstream("app", &[&up.url()])
        .route("/api/", "app", "required")
        .route("/public/", "app", "none");
    let gw = GatewayUnderTest::start(spec).await;
    let before = up.hits();
    expect_error(gw.get("/other", None).await, 404).await;
    expect_error(gw.get("/", None).await, 404).await;
    expect_error(gw.get("/ap", None).await, 404).await;
    assert_eq!(up.hits(), before);
    // Routed paths are unaffected.
    expect_401(gw.get("/api/x", None).await).await;
    assert_eq!(gw.get("/public/x", None).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_prefix_wins_and_path_and_query_go_upstream_unchanged() {
    let (_up, gw) = standard().await;
    // "/public/" (none) beats "/" (required).
    let echo = echo_of(gw.get("/public/a/b%20c/?x=1&y=%2F&z", None).await).await;
    assert_eq!(echo["path"], "/public/a/b%20c/");
    assert_eq!(echo["query"], "x=1&y=%2F&z");
    // "/publicity" and "/public" do not match "/public/": they fall to "/".
    expect_401(gw.get("/publicity", None).await).await;
    expect_401(gw.get("/public", None).await).await;
    // Method and body go through.
    let resp = gw
        .client
        .put(gw.url("/public/items/7"))
        .body("hello body")
        .send()
        .await
        .unwrap();
    let echo = echo_of(resp).await;
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["path"], "/public/items/7");
    assert_eq!(echo["body"], "hello body");
}

// ---------------------------------------------------------------------------
// How sessions begin and end
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_sets_a_secure_session_cookie_and_hides_the_login_headers() {
    let (_up, gw) = standard().await;
    let resp = gw
        .login_response("alice", Some(r#"{"role":"admin","team":"blue"}"#), None)
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-sessiongate-login").is_none());
    assert!(resp.headers().get("x-sessiongate-attributes").is_none());
    let all = set_cookies(resp.headers());
    assert_eq!(all.len(), 1, "one Set-Cookie: {all:?}");
    let c = &all[0];
    assert_eq!(c.name, "sg_session");
    assert!(is_token_shaped(&c.value), "token {:?}", c.value);
    let max_age: i64 = c.attr("Max-Age").expect("Max-Age").parse().unwrap();
    assert!(
        (86_390..=86_400).contains(&max_age),
        "Max-Age {max_age} for the default 24 h TTL"
    );
    assert_eq!(
        c.raw,
        format!(
            "sg_session={}; Path=/; HttpOnly; SameSite=Lax; Secure; Max-Age={max_age}",
            c.value
        )
    );

    // The session is alice's, with the attributes, and the token works.
    let sessions = gw.admin_user_sessions("alice").await;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["user_id"], "alice");
    assert_eq!(sessions[0]["attributes"]["role"], "admin");
    assert_eq!(sessions[0]["attributes"]["team"], "blue");
    let echo = echo_of(gw.get("/api/me", Some(&c.value)).await).await;
    assert_eq!(seen(&echo, "x-user-id"), Some("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_secure_false_leaves_out_secure() {
    let up = TestUpstream::start().await;
    let gw = GatewayUnderTest::start(GatewaySpec::standard(&up.url()).cookie_secure(false)).await;
    let resp = gw.login_response("alice", None, None).await;
    let c = set_cookie(resp.headers(), COOKIE).expect("Set-Cookie");
    assert!(!c.has("Secure"), "{}", c.raw);
    let max_age = c.attr("Max-Age").expect("Max-Age");
    assert_eq!(
        c.raw,
        format!(
            "sg_session={}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}",
            c.value
        )
    );
    // And the logout cookie is not Secure either.
    let resp = gw.get("/logout?scope=current", Some(&c.value)).await;
    let cleared = set_cookie(resp.headers(), COOKIE).expect("clearing Set-Cookie");
    assert!(!cleared.has("Secure"), "{}", cleared.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_work_like_the_cookie() {
    let (_up, gw) = standard().await;
    let token = gw.login("alice").await;
    for scheme in ["Bearer", "bearer"] {
        let resp = gw
            .client
            .get(gw.url("/api/me"))
            .header("authorization", format!("{scheme} {token}"))
            .send()
            .await
            .unwrap();
        let echo = echo_of(resp).await;
        assert_eq!(seen(&echo, "x-user-id"), Some("alice"), "{scheme}");
        assert_eq!(seen(&echo, "authorization"), None, "token forwarded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_current_clears_the_cookie_and_revokes_only_that_session() {
    let (_up, gw) = standard().await;
    let t1 = gw.login("alice").await;
    let t2 = gw.login("alice").await;
    assert_ne!(t1, t2);

    let resp = gw.get("/logout?scope=current", Some(&t1)).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-sessiongate-logout").is_none());
    let cleared = set_cookie(resp.headers(), COOKIE).expect("the cookie is cleared");
    assert_eq!(cleared.value, "");
    assert_eq!(cleared.attr("Max-Age"), Some("0"));
    assert_eq!(cleared.attr("Path"), Some("/"));
    assert!(cleared.has("HttpOnly") && cleared.has("Secure"));

    expect_401(gw.get("/api/x", Some(&t1)).await).await;
    assert_eq!(gw.get("/api/x", Some(&t2)).await.status(), 200);

    // Through a public route, with the bearer token.
    let resp = gw
        .client
        .get(gw.url("/public/logout?scope=current"))
        .bearer_auth(&t2)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    expect_401(gw.get("/api/x", Some(&t2)).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_all_revokes_every_session_of_the_user_only() {
    let (_up, gw) = standard().await;
    let a1 = gw.login("alice").await;
    let a2 = gw.login("alice").await;
    let b1 = gw.login("bob").await;
    for t in [&a1, &a2, &b1] {
        assert_eq!(gw.get("/api/x", Some(t)).await.status(), 200);
    }

    let resp = gw.get("/logout?scope=all", Some(&a1)).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-sessiongate-logout").is_none());
    let cleared = set_cookie(resp.headers(), COOKIE).expect("the cookie is cleared");
    assert_eq!(cleared.attr("Max-Age"), Some("0"));

    expect_401(gw.get("/api/x", Some(&a1)).await).await;
    expect_401(gw.get("/api/x", Some(&a2)).await).await;
    assert_eq!(gw.get("/api/x", Some(&b1)).await.status(), 200);
    assert!(gw.admin_user_sessions("alice").await.is_empty());

    // The same through a public (auth = "none") route.
    let b2 = gw.login("bob").await;
    let resp = gw.get("/public/logout?scope=all", Some(&b2)).await;
    assert_eq!(resp.status(), 200);
    expect_401(gw.get("/api/x", Some(&b1)).await).await;
    expect_401(gw.get("/api/x", Some(&b2)).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_revokes_the_session_the_request_carried() {
    let (_up, gw) = standard().await;
    let first = gw.login("alice").await;
    assert_eq!(gw.get("/api/x", Some(&first)).await.status(), 200);
    let resp = gw.login_response("alice", None, Some(&first)).await;
    assert_eq!(resp.status(), 200);
    let second = set_cookie(resp.headers(), COOKIE)
        .expect("a new session cookie")
        .value;
    assert_ne!(first, second);
    expect_401(gw.get("/api/x", Some(&first)).await).await;
    assert_eq!(gw.get("/api/x", Some(&second)).await.status(), 200);
    assert_eq!(gw.admin_user_sessions("alice").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_session_headers_from_the_upstream_get_502() {
    let (_up, gw) = standard().await;
    let token = gw.login("alice").await;
    let resp = gw
        .get("/public/logout?scope=everything", Some(&token))
        .await;
    expect_error(resp, 502).await;
    let resp = gw.get("/public/login?user=", None).await;
    let status = resp.status();
    let cookies = set_cookies(resp.headers());
    assert!(
        status == 502 && cookies.is_empty(),
        "empty user id: status {status}, cookies {cookies:?}"
    );
    let resp = gw
        .login_response("mallory", Some(r#"{"n": 1}"#), None)
        .await;
    assert!(set_cookies(resp.headers()).is_empty());
    expect_error(resp, 502).await;
    assert!(gw.admin_user_sessions("mallory").await.is_empty());
}

// ---------------------------------------------------------------------------
// Header hygiene
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_never_reach_the_upstream() {
    let (_up, gw) = standard().await;
    let token = gw.login("alice").await;
    let real_id = only_session_id(&gw, "alice").await;
    let fake_id = "00000000-0000-7000-8000-000000000000";

    // (path, token, the identity the upstream must see)
    let cases: [(&str, Option<&str>, Option<&str>); 5] = [
        ("/api/e", Some(&token), Some("alice")),
        ("/opt/e", Some(&token), Some("alice")),
        ("/opt/e", None, None),
        ("/public/e", Some(&token), None),
        ("/public/e", None, None),
    ];
    for (path, tok, want_user) in cases {
        let mut req = gw
            .client
            .get(gw.url(path))
            .header("x-user-id", "mallory")
            .header("x-session-id", fake_id)
            .header("x-sessiongate-login", "mallory")
            .header("x-sessiongate-attributes", r#"{"role":"root"}"#)
            .header("x-sessiongate-logout", "all")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-host", "evil.example")
            .header("x-forwarded-proto", "https");
        if let Some(t) = tok {
            req = req.header("cookie", cookie(t));
        }
        let resp = req.send().await.unwrap();
        assert!(
            set_cookies(resp.headers()).is_empty(),
            "{path}: a client header started or ended a session"
        );
        let echo = echo_of(resp).await;
        let ctx = format!("{path} with token {}", tok.is_some());
        let user = seen(&echo, "x-user-id");
        let sid = seen(&echo, "x-session-id");
        match (want_user, path.starts_with("/public/")) {
            (Some(u), _) => {
                assert_eq!(user, Some(u), "{ctx}");
                assert_eq!(sid, Some(real_id.as_str()), "{ctx}");
            }
            // auth = "none" with a token: no identity is promised, but a
            // client-supplied one must not pass.
            (None, true) if tok.is_some() => {
                assert!(user.is_none() || user == Some("alice"), "{ctx}: {user:?}");
                assert!(sid.is_none() || sid == Some(real_id.as_str()), "{ctx}");
            }
            (None, _) => {
                assert_eq!(user, None, "{ctx}");
                assert_eq!(sid, None, "{ctx}");
            }
        }
        for h in [
            "x-sessiongate-login",
            "x-sessiongate-attributes",
            "x-sessiongate-logout",
        ] {
            assert_eq!(seen(&echo, h), None, "{ctx}: {h} went upstream");
        }
        assert_eq!(seen(&echo, "x-forwarded-for"), Some("127.0.0.1"), "{ctx}");
        assert_eq!(
            seen(&echo, "x-forwarded-host"),
            Some(gw.addr.to_string().as_str()),
            "{ctx}"
        );
        assert_eq!(seen(&echo, "x-forwarded-proto"), Some("http"), "{ctx}");
    }
    // The client's x-sessiongate-* headers did nothing.
    assert!(gw.admin_user_sessions("mallory").await.is_empty());
    assert_eq!(gw.admin_user_sessions("alice").await.len(), 1);
    assert_eq!(gw.get("/api/x", Some(&token)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cookie_and_bearer_stay_at_the_gateway_other_credentials_pass() {
    let (_up, gw) = standard().await;
    let token = gw.login("alice").await;
    for path in ["/api/c", "/opt/c", "/public/c"] {
        let resp = gw
            .client
            .get(gw.url(path))
            .header("cookie", format!("theme=dark; sg_session={token}; lang=en"))
            .send()
            .await
            .unwrap();
        let echo = echo_of(resp).await;
        let cookies = seen(&echo, "cookie").unwrap_or("");
        assert!(cookies.contains("theme=dark"), "{path}: {cookies:?}");
        assert!(cookies.contains("lang=en"), "{path}: {cookies:?}");
        assert!(!cookies.contains("sg_session"), "{path}: {cookies:?}");
        assert!(
            !echo["headers"].to_string().contains(&token),
            "{path}: the token went upstream"
        );

        let resp = gw
            .client
            .get(gw.url(path))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let echo = echo_of(resp).await;
        assert_eq!(seen(&echo, "authorization"), None, "{path}");
        assert!(!echo["headers"].to_string().contains(&token), "{path}");
    }
    // Credentials that are not our token are the app's business.
    let resp = gw
        .client
        .get(gw.url("/public/c"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    let echo = echo_of(resp).await;
    assert_eq!(seen(&echo, "authorization"), Some("Basic dXNlcjpwYXNz"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let (_up, gw) = standard().await;
    let host = gw.addr.to_string();
    let request = format!(
        "GET /public/hop HTTP/1.1\r\nHost: {host}\r\nConnection: close, x-custom\r\n\
         x-custom: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\
         TE: trailers\r\nx-end-to-end: yes\r\n\r\n"
    );
    let (status, _headers, body) = raw_http(gw.addr, &request).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen(&echo, "x-end-to-end"), Some("yes"));
    for h in ["x-custom", "keep-alive", "proxy-connection", "te"] {
        assert_eq!(seen(&echo, h), None, "{h} reached the upstream");
    }
    if let Some(conn) = seen(&echo, "connection") {
        let conn = conn.to_ascii_lowercase();
        assert!(
            !conn.contains("x-custom") && !conn.contains("close"),
            "connection upstream: {conn}"
        );
    }

    // The upstream's hop-by-hop response headers stop at the gateway too.
    let request =
        format!("GET /public/hop-response HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let (status, headers, _) = raw_http(gw.addr, &request).await;
    assert_eq!(status, 200);
    let has = |name: &str| headers.iter().any(|(k, _)| k == name);
    assert!(has("x-upstream-kept"), "{headers:?}");
    assert!(!has("x-upstream-hop"), "{headers:?}");
    assert!(!has("keep-alive"), "{headers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive() {
    let (up, gw) = standard().await;
    assert_eq!(gw.get("/public/warm", None).await.status(), 200);
    let before = up.connections();
    for i in 0..5 {
        // A new client connection each time, which asks to close: the
        // gateway's connection to the upstream is another hop and stays.
        let resp = client()
            .get(gw.url(&format!("/public/n{i}")))
            .header("connection", "close")
            .send()
            .await
            .unwrap();
        echo_of(resp).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        up.connections(),
        before,
        "the upstream got new connections instead of reused ones"
    );
}

// ---------------------------------------------------------------------------
// auth = "optional"
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_routes_forward_with_identity_only_for_a_valid_session() {
    let (_up, gw) = standard().await;
    let echo = echo_of(gw.get("/opt/page", None).await).await;
    assert_eq!(seen(&echo, "x-user-id"), None);
    assert_eq!(seen(&echo, "x-session-id"), None);

    let token = gw.login("alice").await;
    let echo = echo_of(gw.get("/opt/page", Some(&token)).await).await;
    assert_eq!(seen(&echo, "x-user-id"), Some("alice"));
    assert!(seen(&echo, "x-session-id").is_some_and(is_uuid));

    // Malformed or dead tokens count as no session here.
    let echo = echo_of(gw.get("/opt/page", Some("not-a-token")).await).await;
    assert_eq!(seen(&echo, "x-user-id"), None);
    let resp = gw.get("/logout?scope=current", Some(&token)).await;
    assert_eq!(resp.status(), 200);
    let echo = echo_of(gw.get("/opt/page", Some(&token)).await).await;
    assert_eq!(seen(&echo, "x-user-id"), None);
    assert_eq!(seen(&echo, "x-session-id"), None);
}

// ---------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------

/// More than 16 MiB, and not a multiple of any chunk size.
const BIG: usize = 16 * 1024 * 1024 + 1024 * 1024 + 12_345;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_intact() {
    let up = TestUpstream::start().await;
    let spec = GatewaySpec::standard(&up.url()).max_body_bytes("/", 2 * BIG as u64);
    let gw = GatewayUnderTest::start(spec).await;
    let token = gw.login("alice").await;
    let (want_len, want_sha) = PseudoRandom::digest_of_first(BIG);

    // Upload, as a stream of uneven chunks of unknown total length.
    let chunks =
        futures_util::stream::unfold((PseudoRandom::new(), BIG), |(mut rng, left)| async move {
            if left == 0 {
                return None;
            }
            let len = left.min(100_003);
            let chunk = rng.chunk(len);
            Some((Ok::<_, std::io::Error>(chunk), (rng, left - len)))
        });
    let resp = gw
        .client
        .post(gw.url("/api/upload"))
        .header("cookie", cookie(&token))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["len"].as_u64(), Some(want_len as u64));
    assert_eq!(v["sha256"].as_str(), Some(want_sha.as_str()));

    // Download, hashed as it arrives.
    let resp = gw
        .get(&format!("/api/download?bytes={BIG}"), Some(&token))
        .await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut hasher = Sha256::new();
    let mut len = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("download chunk");
        len += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(len, want_len);
    assert_eq!(hex(&hasher.finalize()), want_sha);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_stream_before_the_upstream_has_finished() {
    let (_up, gw) = standard().await;
    let token = gw.login("alice").await;
    let started = Instant::now();
    let resp = gw
        .get("/api/download?bytes=200000&pause_ms=1500", Some(&token))
        .await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.expect("a first chunk").unwrap();
    let first_at = started.elapsed();
    assert!(!first.is_empty());
    assert!(
        first_at < Duration::from_millis(1000),
        "the first bytes took {first_at:?}: the response was buffered"
    );
    let mut len = first.len();
    while let Some(chunk) = stream.next().await {
        len += chunk.unwrap().len();
    }
    assert_eq!(len, 200_000);
    assert!(started.elapsed() >= Duration::from_millis(1400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_stream_before_the_client_has_finished() {
    let (up, gw) = standard().await;
    let token = gw.login("alice").await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let request = gw
        .client
        .post(gw.url("/api/upload"))
        .header("cookie", cookie(&token))
        .body(reqwest::Body::wrap_stream(body))
        .send();
    let pending = tokio::spawn(request);
    let first = vec![7u8; 64 * 1024];
    tx.send(Ok(first.into())).await.unwrap();
    // The upstream must see the first chunk while the client still holds
    // the rest back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.uploaded() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let arrived_early = up.uploaded() > 0;
    tx.send(Ok(vec![8u8; 1000].into())).await.unwrap();
    drop(tx);
    let resp = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("upload completes")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["len"].as_u64(), Some(64 * 1024 + 1000));
    assert!(
        arrived_early,
        "the upstream got nothing until the client finished: the request was buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_uploads_work() {
    // What curl does for bodies over 1 MiB: send the head, wait for
    // "100 Continue", then send the body.
    let (_up, gw) = standard().await;
    let token = gw.login("alice").await;
    let body = vec![b'z'; 200_000];
    let exchange = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST /api/upload HTTP/1.1\r\nHost: {}\r\nCookie: {}\r\n\
             Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            gw.addr,
            cookie(&token),
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut interim = vec![0u8; 25];
        let continued =
            tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut interim)).await;
        let continued = matches!(continued, Ok(Ok(_)));
        stream.write_all(&body).await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        (continued, interim, rest)
    };
    let (continued, interim, rest) = tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .expect("exchange in time");
    let interim = String::from_utf8_lossy(&interim).into_owned();
    assert!(
        continued && interim.starts_with("HTTP/1.1 100"),
        "no 100 Continue within 3 s: {interim:?}"
    );
    let rest = String::from_utf8_lossy(&rest).into_owned();
    let final_status = rest
        .split("\r\n")
        .find(|l| l.starts_with("HTTP/1.1 ") && !l.starts_with("HTTP/1.1 100"))
        .unwrap_or("");
    assert!(final_status.starts_with("HTTP/1.1 200"), "{rest}");
    assert!(rest.contains("\"len\":200000"), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_keep_their_own_identity() {
    let (_up, gw) = standard().await;
    let users = ["ann", "ben", "cat", "dan"];
    let mut tokens = Vec::new();
    for u in users {
        tokens.push((u, gw.login(u).await));
    }
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for round in 0..10 {
        for (user, token) in &tokens {
            // Alternate between pooled HTTP/1.1 and one multiplexed h2 connection.
            let client = if round % 2 == 0 {
                gw.client.clone()
            } else {
                h2.clone()
            };
            let url = gw.url(&format!("/api/who?round={round}"));
            let (user, token) = (user.to_string(), token.clone());
            tasks.push(tokio::spawn(async move {
                let resp = client
                    .get(url)
                    .header("cookie", cookie(&token))
                    .send()
                    .await
                    .unwrap();
                let echo = echo_of(resp).await;
                (user, seen(&echo, "x-user-id").map(str::to_string))
            }));
        }
    }
    assert_eq!(tasks.len(), 40);
    for task in tasks {
        let (user, seen_user) = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("request in time")
            .unwrap();
        assert_eq!(seen_user.as_deref(), Some(user.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_upstream_body_is_not_passed_off_as_complete() {
    let (_up, gw) = standard().await;
    let token = gw.login("alice").await;
    let resp = gw
        .get(
            "/api/download?bytes=1000000&pause_ms=200&fail_after=3",
            Some(&token),
        )
        .await;
    // The headers were already sent when the body broke off.
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut len = 0usize;
    let mut failed = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => len += c.len(),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(len < 1_000_000, "got all {len} bytes of a broken body");
    assert!(
        failed,
        "a body cut off after {len} bytes ended like a complete one"
    );
    // The gateway is still fine.
    assert_eq!(gw.get("/api/x", Some(&token)).await.status(), 200);
}

// ---------------------------------------------------------------------------
// WebSockets
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_pass_through_authenticated_routes() {
    let (_up, gw) = standard().await;
    let token = gw.login("alice").await;

    let mut request = format!("ws://{}/api/ws", gw.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("cookie", cookie(&token).parse().unwrap());
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
        Some(&b"alice"[..]),
        "the upstream saw the identity on the handshake"
    );

    let messages = [
        Message::text("hello through the gateway"),
        Message::binary(vec![0u8, 1, 2, 254, 255]),
        Message::text("x".repeat(100_000)),
    ];
    for msg in messages {
        ws.send(msg.clone()).await.expect("send");
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .expect("stream open")
            .expect("echo frame");
        assert_eq!(echoed, msg);
    }
    ws.close(None).await.expect("close");

    // Without a session: the handshake is refused with a 401.
    let request = format!("ws://{}/api/ws", gw.addr)
        .into_client_request()
        .unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("answer in time");
    match result {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            assert!(resp.headers().contains_key("www-authenticate"));
        }
        Err(e) => panic!("expected an HTTP 401, got {e}"),
        Ok(_) => panic!("a WebSocket opened without a session"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_handshakes_do_not_leak_session_headers_to_the_client() {
    let (_up, gw) = standard().await;
    let token = gw.login("alice").await;
    let mut request = format!("ws://{}/api/ws?login=mallory", gw.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("cookie", cookie(&token).parse().unwrap());
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("handshake in time")
    .expect("handshake succeeds");
    assert_eq!(resp.status(), 101);
    // The contract: the gateway acts on these headers and removes them;
    // a client never sees them.
    assert!(
        resp.headers().get("x-sessiongate-login").is_none(),
        "x-sessiongate-login reached the client: {:?}",
        resp.headers()
    );
    ws.close(None).await.ok();
}

// ---------------------------------------------------------------------------
// Protocols and upstream choice
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_works_on_authenticated_routes() {
    let (_up, gw) = standard().await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    // Log in over h2 as well.
    let resp = h2
        .get(gw.url("/public/login?user=alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let token = set_cookie(resp.headers(), COOKIE)
        .expect("Set-Cookie over h2")
        .value;

    let resp = h2
        .get(gw.url("/api/h2?q=1"))
        // Browsers send each cookie in its own field over HTTP/2.
        .header("cookie", "a=1")
        .header("cookie", cookie(&token))
        .header("cookie", "b=2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let echo = echo_of(resp).await;
    assert_eq!(seen(&echo, "x-user-id"), Some("alice"));
    assert_eq!(echo["path"], "/api/h2");
    assert_eq!(echo["query"], "q=1");
    assert_eq!(
        seen(&echo, "x-forwarded-host"),
        Some(gw.addr.to_string().as_str())
    );
    let cookies = seen(&echo, "cookie").unwrap_or("");
    assert!(!cookies.contains("sg_session"), "{cookies}");
    assert!(
        cookies.contains("a=1") && cookies.contains("b=2"),
        "{cookies}"
    );
    // Without a session: still a 401 over h2.
    expect_401(h2.get(gw.url("/api/h2")).send().await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_uses_every_live_url() {
    let a = TestUpstream::named("a").await;
    let b = TestUpstream::named("b").await;
    let spec = GatewaySpec::new()
        .upstream("pool", &[&a.url(), &b.url()])
        .route("/", "pool", "none");
    let gw = GatewayUnderTest::start(spec).await;
    let mut names = Vec::new();
    for i in 0..10 {
        let resp = gw.get(&format!("/rr/{i}"), None).await;
        assert_eq!(resp.status(), 200);
        names.push(
            resp.headers()["x-upstream-name"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(a.hits() + b.hits(), 10);
    assert_eq!((a.hits(), b.hits()), (5, 5), "order: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_urls_are_skipped() {
    let live = TestUpstream::named("live").await;
    for urls in [
        vec![closed_url(), live.url()],
        vec![live.url(), closed_url()],
    ] {
        let url_refs: Vec<&str> = urls.iter().map(String::as_str).collect();
        let spec = GatewaySpec::new()
            .upstream("pool", &url_refs)
            .route("/public/", "pool", "none")
            .route("/", "pool", "required");
        let gw = GatewayUnderTest::start(spec).await;
        let token = gw.login("alice").await;
        for i in 0..10 {
            let resp = gw.get(&format!("/api/{i}"), Some(&token)).await;
            assert_eq!(resp.status(), 200, "request {i} with urls {urls:?}");
            assert_eq!(resp.headers()["x-upstream-name"], "live");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_is_retried_on_the_next_url_when_a_connect_fails() {
    // The request is handed to a connection only once one exists, so its
    // body is still whole when the first URL refuses.
    let live = TestUpstream::named("live").await;
    let dead = closed_url();
    let spec = GatewaySpec::new()
        .upstream("pool", &[&dead, &live.url()])
        .route("/", "pool", "none");
    let gw = GatewayUnderTest::start(spec).await;
    let body = vec![b'x'; 100_000];
    for i in 0..4 {
        let resp = client()
            .post(gw.url(&format!("/r{i}/upload")))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "upload {i}");
        assert_eq!(resp.headers()["x-upstream-name"], "live");
        let echo: Value = resp.json().await.unwrap();
        assert_eq!(echo["len"], 100_000, "upload {i} arrived whole");
    }
    assert_eq!(live.uploaded(), 400_000);
}

/// An origin that answers every request `200 ok` with keep-alive, then
/// closes the connection 20 ms later, as an origin's idle timeout does.
async fn origin_closing_idle_connections() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_the_origin_closed_while_idle_are_not_reused() {
    let (addr, accepted) = origin_closing_idle_connections().await;
    let spec = GatewaySpec::new()
        .upstream("app", &[&format!("http://{addr}")])
        .route("/", "app", "none");
    let gw = GatewayUnderTest::start(spec).await;
    for i in 0..8 {
        let resp = gw.get(&format!("/idle/{i}"), None).await;
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.text().await.unwrap(), "ok");
        // Past the origin's idle close: the pooled connection is dead.
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        8,
        "one fresh connection per request"
    );
}

// ---------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_restart() {
    let (_up, gw) = standard().await;
    let token = gw.login("alice").await;
    let echo = echo_of(gw.get("/api/x", Some(&token)).await).await;
    let sid = seen(&echo, "x-session-id").unwrap().to_string();

    let gw = gw.restart().await;
    let echo = echo_of(gw.get("/api/x", Some(&token)).await).await;
    assert_eq!(seen(&echo, "x-user-id"), Some("alice"));
    assert_eq!(seen(&echo, "x-session-id"), Some(sid.as_str()));
    // And a revocation before a restart stays revoked after it.
    let resp = gw.get("/logout?scope=current", Some(&token)).await;
    assert_eq!(resp.status(), 200);
    let gw = gw.restart().await;
    expect_401(gw.get("/api/x", Some(&token)).await).await;
}

async fn connect_refused(addr: std::net::SocketAddr) -> bool {
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let up = TestUpstream::start().await;
    let mut gw = GatewayUnderTest::start(GatewaySpec::standard(&up.url())).await;
    let token = gw.login("alice").await;
    let addr = gw.addr;
    let before = up.hits();

    let slow_url = gw.url("/api/slow?ms=1000");
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let resp = client()
            .get(slow_url)
            .header("cookie", cookie(&token))
            .send()
            .await;
        let resp = resp.expect("the in-flight request gets an answer");
        let status = resp.status();
        let body = resp.text().await.expect("its whole body");
        (status, body, started.elapsed())
    });
    // Wait (bounded) until the request is at the upstream.
    for _ in 0..200 {
        if up.hits() > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        up.hits() > before,
        "the slow request never reached upstream"
    );

    let running = gw.take_running();
    let shutdown_started = Instant::now();
    let shutdown = tokio::spawn(running.shutdown());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!slow.is_finished(), "the slow request ended too early");
    assert!(
        !shutdown.is_finished(),
        "shutdown returned while a request was still in flight"
    );
    assert!(
        connect_refused(addr).await,
        "new connections are accepted while draining"
    );

    let (status, body, took) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("in-flight request finishes")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("/api/slow"), "{body}");
    assert!(took >= Duration::from_millis(1000));
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown completes after the drain")
        .unwrap();
    assert!(shutdown_started.elapsed() < Duration::from_secs(5));
    assert!(
        connect_refused(addr).await,
        "still accepting after shutdown"
    );
    assert!(
        connect_refused(gw.admin_addr).await,
        "the admin listener is still accepting after shutdown"
    );
    let _dir = gw.dir;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_and_exits_0_on_sigterm() {
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin_port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let text = GatewaySpec::standard(&up.url()).to_toml(
        &database_url(&dir),
        &listen,
        &format!("127.0.0.1:{admin_port}"),
    );
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, text).unwrap();
    let mut process = ServeProcess::spawn(dir.path(), &config_path);
    let pid = process.pid();
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    process.wait_listening(addr, Duration::from_secs(15)).await;

    // It is a working gateway. (The client stays alive, so idle keep-alive
    // connections are open during the shutdown.)
    let http = client();
    let resp = http
        .get(format!("http://{addr}/public/login?user=alice"))
        .send()
        .await
        .unwrap();
    let token = set_cookie(resp.headers(), COOKIE)
        .expect("login through the binary")
        .value;
    let resp = http
        .get(format!("http://{addr}/api/x"))
        .header("cookie", cookie(&token))
        .send()
        .await
        .unwrap();
    let echo = echo_of(resp).await;
    assert_eq!(seen(&echo, "x-user-id"), Some("alice"));
    expect_401(
        http.get(format!("http://{addr}/api/x"))
            .send()
            .await
            .unwrap(),
    )
    .await;

    // SIGTERM while a request is in flight: it still gets its answer.
    let before = up.hits();
    let slow = {
        let http = http.clone();
        let url = format!("http://{addr}/api/slow?ms=1000");
        let token = token.clone();
        tokio::spawn(async move {
            let resp = http.get(url).header("cookie", cookie(&token)).send().await;
            let resp = resp.expect("the in-flight request gets an answer");
            (resp.status(), resp.text().await.expect("its whole body"))
        })
    };
    for _ in 0..200 {
        if up.hits() > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        up.hits() > before,
        "the slow request never reached upstream"
    );

    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let (slow_status, slow_body) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the in-flight request finishes")
        .unwrap();
    assert_eq!(slow_status, 200, "{slow_body}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = process.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "sessiongate still running 5 s after SIGTERM:\n{}",
            process.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}:\n{}",
        process.output()
    );
    assert!(connect_refused(addr).await);
    drop(http);
}
