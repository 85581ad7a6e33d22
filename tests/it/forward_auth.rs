//! Forward-auth mode (`[forward_auth]`) against proxy mode: one suite of
//! behaviour assertions, written once over a "front", run against
//! sessiongate as the proxy and against a real nginx (Debian's package,
//! installed by scripts/services.sh) using `auth_request` with sessiongate
//! in forward-auth mode, both in front of the same real echo origin. Then
//! the forward-auth listener alone, with the inputs an attacker (or a
//! misconfigured caller) would send it, for each kind of caller.

use std::net::SocketAddr;

use serde_json::Value;
use tempfile::TempDir;

use crate::harness::*;
use crate::policies::{bundled, testing};

/// The nginx side of the README's "Forward-auth mode" section, verbatim
/// apart from the addresses and the temp paths.
fn nginx_forward_auth_config(
    dir: &std::path::Path,
    port: u16,
    app: SocketAddr,
    sg: SocketAddr,
) -> String {
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

    upstream app {{ server {app}; }}
    upstream sessiongate {{
        server {sg};
        keepalive 16;
        keepalive_timeout 30s;
    }}

    server {{
        listen 127.0.0.1:{port};
        absolute_redirect off;

        location / {{
            auth_request /.sessiongate/auth;
            auth_request_set $sg_user $upstream_http_x_user_id;
            auth_request_set $sg_session $upstream_http_x_session_id;
            auth_request_set $sg_redirect $upstream_http_x_sessiongate_redirect;
            error_page 401 = @sessiongate_login;
            # Always set, so a client's own copies never reach the app
            # (an empty value: no header at all).
            proxy_set_header x-user-id $sg_user;
            proxy_set_header x-session-id $sg_session;
            proxy_pass http://app;
        }}

        location = /.sessiongate/auth {{
            internal;
            proxy_pass http://sessiongate;
            proxy_method GET;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}

        # Browsers on a route with login_redirect: sessiongate's 401 names
        # the location, nginx redirects.
        location @sessiongate_login {{
            if ($sg_redirect = "") {{ return 401; }}
            return 302 $sg_redirect;
        }}
    }}
}}
"#
    )
}

struct NginxFront {
    addr: SocketAddr,
    _child: tokio::process::Child,
    dir: TempDir,
}

impl NginxFront {
    async fn start(app: SocketAddr, sg: SocketAddr) -> NginxFront {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, child) = spawn_nginx(dir.path(), |port| {
            nginx_forward_auth_config(dir.path(), port, app, sg)
        })
        .await;
        NginxFront {
            addr,
            _child: child,
            dir,
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Proxy,
    Nginx,
}

/// What the client talks to: sessiongate itself, or nginx asking
/// sessiongate (in forward-auth mode) about each request.
struct Front {
    mode: Mode,
    gw: GatewayUnderTest,
    nginx: Option<NginxFront>,
}

impl Front {
    /// `policies`: `[[policies]]` TOML for the gateway.
    async fn start(mode: Mode, origin: &TestUpstream, policies: &str) -> Front {
        let mut spec = GatewaySpec::standard(&origin.url()).cookie_secure(false);
        spec.extra = policies.to_string();
        if mode == Mode::Nginx {
            spec.extra
                .push_str("\n[forward_auth]\nlisten = \"127.0.0.1:0\"\ncaller = \"nginx\"\n");
        }
        let gw = GatewayUnderTest::start(spec).await;
        let nginx = match mode {
            Mode::Proxy => None,
            Mode::Nginx => {
                let fa = gw
                    .forward_auth_addr()
                    .expect("[forward_auth] is configured");
                Some(NginxFront::start(origin.addr, fa).await)
            }
        };
        Front { mode, gw, nginx }
    }

    fn addr(&self) -> SocketAddr {
        match &self.nginx {
            Some(n) => n.addr,
            None => self.gw.addr,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    /// A session for `user`: in proxy mode the app's `x-sessiongate-login`
    /// through the gateway; behind nginx the documented admin-API flow
    /// (the app's backend creates the session and sets the cookie).
    async fn login(&self, user: &str) -> String {
        match self.mode {
            Mode::Proxy => self.gw.login(user).await,
            Mode::Nginx => admin_login(&self.gw, user).await,
        }
    }

    async fn get(
        &self,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self.gw.client.get(self.url(path));
        if let Some(token) = token {
            req = req.header("cookie", cookie(token));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("request through the front")
    }

    /// What the origin saw of a request the front let through.
    async fn seen(&self, path: &str, token: Option<&str>, headers: &[(&str, &str)]) -> Value {
        let resp = self.get(path, token, headers).await;
        assert_eq!(resp.status(), 200, "{:?} {path}: let through", self.mode);
        resp.json().await.expect("the origin's echo")
    }

    async fn shutdown(self) {
        if let Some(n) = &self.nginx {
            let log = n.error_log();
            assert!(!log.contains("[emerg]"), "nginx error.log: {log}");
        }
        drop(self.nginx);
        self.gw.shutdown().await;
    }
}

/// The admin API's `POST /v1/sessions`: the token, which the app's backend
/// sets as the session cookie itself.
async fn admin_login(gw: &GatewayUnderTest, user: &str) -> String {
    let resp = gw
        .client
        .post(gw.admin_url("/v1/sessions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({ "user_id": user }))
        .send()
        .await
        .expect("admin request");
    assert_eq!(resp.status(), 201, "admin create session");
    let v: Value = resp.json().await.expect("admin JSON");
    v["token"].as_str().expect("token").to_string()
}

/// The admin API's logout: `DELETE /v1/sessions/{id}`.
async fn admin_logout(gw: &GatewayUnderTest, id: &str) {
    let resp = gw
        .client
        .delete(gw.admin_url(&format!("/v1/sessions/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("admin request");
    assert_eq!(resp.status(), 204, "admin revoke session");
}

fn header<'a>(seen: &'a Value, name: &str) -> Option<&'a str> {
    seen["headers"][name].as_str()
}

/// The behaviour both modes must share, written once.
async fn behaviour(front: &Front) {
    let mode = front.mode;
    // No session, a malformed one, a well-formed one nobody issued.
    assert_eq!(
        front.get("/secret", None, &[]).await.status(),
        401,
        "{mode:?}"
    );
    assert_eq!(
        front
            .get("/secret", Some("not-a-token"), &[])
            .await
            .status(),
        401,
        "{mode:?}"
    );
    let bearer = [(
        "authorization",
        "Bearer sg_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    )];
    assert_eq!(
        front.get("/secret", None, &bearer).await.status(),
        401,
        "{mode:?}"
    );

    // The same identity reaches the origin, from a cookie or a bearer.
    let token = front.login("alice").await;
    let sessions = front.gw.admin_user_sessions("alice").await;
    assert_eq!(sessions.len(), 1, "{mode:?}");
    let id = sessions[0]["id"].as_str().expect("session id").to_string();
    let seen = front.seen("/secret?q=1", Some(&token), &[]).await;
    assert_eq!(header(&seen, "x-user-id"), Some("alice"), "{mode:?} {seen}");
    assert_eq!(
        header(&seen, "x-session-id"),
        Some(id.as_str()),
        "{mode:?} {seen}"
    );
    assert_eq!(seen["path"], "/secret", "{mode:?}");
    assert_eq!(seen["query"], "q=1", "{mode:?}");
    let auth = format!("Bearer {token}");
    let seen = front
        .seen("/secret", None, &[("authorization", &auth)])
        .await;
    assert_eq!(header(&seen, "x-user-id"), Some("alice"), "{mode:?} {seen}");

    // A client cannot forge the identity: not without a session...
    let forged = [
        ("x-user-id", "mallory"),
        ("x-session-id", "00000000-0000-0000-0000-000000000000"),
        // A look-alike that CGI-style servers read as x-user-id.
        ("x_user_id", "mallory"),
    ];
    for path in ["/public/x", "/opt/x"] {
        let seen = front.seen(path, None, &forged).await;
        assert_eq!(header(&seen, "x-user-id"), None, "{mode:?} {path} {seen}");
        assert_eq!(header(&seen, "x_user_id"), None, "{mode:?} {path} {seen}");
        assert_eq!(
            header(&seen, "x-session-id"),
            None,
            "{mode:?} {path} {seen}"
        );
    }
    // ...nor with one (its own copy is replaced, not added to).
    let seen = front.seen("/secret", Some(&token), &forged).await;
    assert_eq!(header(&seen, "x-user-id"), Some("alice"), "{mode:?} {seen}");
    assert_eq!(
        header(&seen, "x-session-id"),
        Some(id.as_str()),
        "{mode:?} {seen}"
    );
    // Nor point the check at another path: the caller's description of
    // the request is the caller's, never the client's.
    let spoofed = [
        ("x-original-uri", "/public/x"),
        ("x-forwarded-uri", "/public/x"),
        ("x-original-method", "GET"),
    ];
    assert_eq!(
        front.get("/secret", None, &spoofed).await.status(),
        401,
        "{mode:?}"
    );
    // Other methods and their bodies go through as they came.
    let resp = front
        .gw
        .client
        .post(front.url("/secret"))
        .header("cookie", cookie(&token))
        .body("hello")
        .send()
        .await
        .expect("POST through the front");
    assert_eq!(resp.status(), 200, "{mode:?}");
    let seen: Value = resp.json().await.expect("echo");
    assert_eq!(
        (&seen["method"], &seen["body"]),
        (&"POST".into(), &"hello".into()),
        "{mode:?}"
    );
    assert_eq!(header(&seen, "x-user-id"), Some("alice"), "{mode:?} {seen}");
    // An optional route: the identity when there is one.
    let seen = front.seen("/opt/x", Some(&token), &[]).await;
    assert_eq!(header(&seen, "x-user-id"), Some("alice"), "{mode:?} {seen}");

    // Browsers on a route with login_redirect go to the login page; other
    // clients get the 401.
    let html = [("accept", "text/html,application/xhtml+xml")];
    let resp = front.get("/web/page", None, &html).await;
    assert_eq!(resp.status(), 302, "{mode:?}");
    assert_eq!(resp.headers()["location"], "/login", "{mode:?}");
    assert_eq!(
        front.get("/web/page", None, &[]).await.status(),
        401,
        "{mode:?}"
    );
    // On a route without one, browsers get the 401 too.
    assert_eq!(
        front.get("/secret", None, &html).await.status(),
        401,
        "{mode:?}"
    );
    let seen = front.seen("/web/page", Some(&token), &html).await;
    assert_eq!(header(&seen, "x-user-id"), Some("alice"), "{mode:?} {seen}");

    // Logout (the admin API here, in both modes): the token stops at once.
    admin_logout(&front.gw, &id).await;
    assert_eq!(
        front.get("/secret", Some(&token), &[]).await.status(),
        401,
        "{mode:?}"
    );
    let resp = front.get("/web/page", Some(&token), &html).await;
    assert_eq!(resp.status(), 302, "{mode:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_modes_give_the_origin_the_same_identity_and_refusals() {
    let origin = TestUpstream::start().await;
    for mode in [Mode::Proxy, Mode::Nginx] {
        let front = Front::start(mode, &origin, "").await;
        behaviour(&front).await;
        front.shutdown().await;
    }
}

/// Raw request targets whose text starts with `/public/` (a route without
/// authentication) but which a server may read as `/secret`.
const BYPASSES: &[&str] = &[
    "/public/../secret",
    "/public/%2e%2e/secret",
    "/public/%2E%2E/secret",
    "/public/.%2e/secret",
    "/public/..%2fsecret",
    "/public/..%2Fsecret",
    "/public/x/../../secret",
    "/public//../secret",
    "/public/./../secret",
    "/public/%2e%2e%2fsecret",
    "/public%2f..%2fsecret",
    "/public/..;/secret",
    "/%70ublic/../secret",
];

fn raw_get(path: &str, token: Option<&str>) -> String {
    let cookie_line = token
        .map(|t| format!("Cookie: {}\r\n", cookie(t)))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{cookie_line}Connection: close\r\n\r\n")
}

async fn bypasses(front: &Front) {
    let mode = front.mode;
    let token = front.login("alice").await;
    for path in BYPASSES {
        let (status, _, body) = raw_http(front.addr(), &raw_get(path, None)).await;
        let body = String::from_utf8_lossy(&body);
        // Whatever the front answers, the origin never serves a protected
        // path to a request without a session.
        if status == 200 {
            let seen: Value = serde_json::from_str(&body).expect("the origin's echo");
            let seen_path = seen["path"].as_str().unwrap_or("");
            assert!(
                seen_path.starts_with("/public/") && !seen_path.contains(".."),
                "{mode:?} {path}: the origin served {seen_path}"
            );
            assert_eq!(header(&seen, "x-user-id"), None, "{mode:?} {path}");
        } else {
            assert!(
                [400, 401, 403, 404].contains(&status),
                "{mode:?} {path}: {status} {body}"
            );
        }
        // Control: with a session, the plain dot segments are resolved to
        // the protected path and served (so the refusal above is the
        // authentication's, not an unreachable origin's).
        if *path == "/public/../secret" {
            assert_eq!(status, 401, "{mode:?} {path}");
            let (status, _, body) = raw_http(front.addr(), &raw_get(path, Some(&token))).await;
            assert_eq!(status, 200, "{mode:?} {path}");
            let seen: Value = serde_json::from_slice(&body).expect("echo");
            assert_eq!(header(&seen, "x-user-id"), Some("alice"), "{mode:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_confusion_reaches_no_protected_route_in_either_mode() {
    let origin = TestUpstream::start().await;
    for mode in [Mode::Proxy, Mode::Nginx] {
        let front = Front::start(mode, &origin, "").await;
        bypasses(&front).await;
        front.shutdown().await;
    }
}

fn policy(path: &str, config: &str) -> String {
    format!("\n[[policies]]\nplugin = {path:?}\nconfig = {config}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_the_same_in_both_modes() {
    let origin = TestUpstream::start().await;
    for mode in [Mode::Proxy, Mode::Nginx] {
        // A policy that refuses every authenticated request.
        let deny = policy(&testing("deny"), r#"{ status = 403, reason = "no" }"#);
        let front = Front::start(mode, &origin, &deny).await;
        let token = front.login("alice").await;
        assert_eq!(
            front.get("/secret", Some(&token), &[]).await.status(),
            403,
            "{mode:?}"
        );
        assert_eq!(
            front.get("/opt/x", Some(&token), &[]).await.status(),
            403,
            "{mode:?}"
        );
        // Routes without authentication run no access hook.
        assert_eq!(
            front.get("/public/x", Some(&token), &[]).await.status(),
            200,
            "{mode:?}"
        );
        front.shutdown().await;

        // A denial with another status: the proxy passes it on; nginx's
        // auth_request takes only 401 and 403, so it gets a 403.
        let slow_down = policy(&testing("deny"), r#"{ status = 429, reason = "slow" }"#);
        let front = Front::start(mode, &origin, &slow_down).await;
        let token = front.login("alice").await;
        let expected = match mode {
            Mode::Proxy => 429,
            Mode::Nginx => 403,
        };
        assert_eq!(
            front.get("/secret", Some(&token), &[]).await.status(),
            expected,
            "{mode:?}"
        );
        front.shutdown().await;

        // The bundled max-sessions: the third login evicts the first.
        let max = policy(&bundled("max-sessions"), "{ max_sessions = 2 }");
        let front = Front::start(mode, &origin, &max).await;
        let first = front.login("alice").await;
        let second = front.login("alice").await;
        assert_eq!(
            front.get("/secret", Some(&first), &[]).await.status(),
            200,
            "{mode:?}"
        );
        let third = front.login("alice").await;
        assert_eq!(
            front.get("/secret", Some(&first), &[]).await.status(),
            401,
            "{mode:?}"
        );
        for token in [&second, &third] {
            let seen = front.seen("/secret", Some(token), &[]).await;
            assert_eq!(header(&seen, "x-user-id"), Some("alice"), "{mode:?}");
        }
        front.shutdown().await;
    }
}

// ---------------------------------------------------------------------------
// The forward-auth listener alone
// ---------------------------------------------------------------------------

async fn forward_auth_gateway(
    origin: &TestUpstream,
    table: &str,
) -> (GatewayUnderTest, SocketAddr) {
    let mut spec = GatewaySpec::standard(&origin.url()).cookie_secure(false);
    spec.extra = format!("[forward_auth]\nlisten = \"127.0.0.1:0\"\n{table}\n");
    let gw = GatewayUnderTest::start(spec).await;
    let addr = gw
        .forward_auth_addr()
        .expect("[forward_auth] is configured");
    (gw, addr)
}

fn sub_request(target: &str, headers: &[(&str, &str)]) -> String {
    let mut text = format!("GET {target} HTTP/1.1\r\nHost: app.example\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("Connection: close\r\n\r\n");
    text
}

fn value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// An nginx-style sub-request with the session cookie and `extra`.
async fn send(
    fa: SocketAddr,
    token: &str,
    extra: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let cookie_header = cookie(token);
    let mut headers = vec![("cookie", cookie_header.as_str())];
    headers.extend_from_slice(extra);
    raw_http(fa, &sub_request("/.sessiongate/auth", &headers)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_sub_requests_that_read_two_ways_are_refused() {
    let origin = TestUpstream::start().await;
    let (gw, fa) = forward_auth_gateway(&origin, "").await;
    let token = admin_login(&gw, "alice").await;
    // Control: a well-formed sub-request with the session is allowed.
    let (status, headers, _) = send(fa, &token, &[("x-original-uri", "/secret")]).await;
    assert_eq!(status, 200);
    assert_eq!(value(&headers, "x-user-id"), Some("alice"));
    let (status, headers, _) = send(fa, &token, &[("x-original-uri", "/public/x")]).await;
    assert_eq!(status, 200);
    assert_eq!(
        value(&headers, "x-user-id"),
        Some(""),
        "present and empty: overwrites"
    );

    let refused: &[&[(&str, &str)]] = &[
        // No description at all: the sub-request's own path is not it.
        &[],
        // Two, whichever way nginx or the client would read them.
        &[
            ("x-original-uri", "/public/x"),
            ("x-original-uri", "/secret"),
        ],
        &[("x-original-uri", "/secret"), ("x-original-uri", "/secret")],
        &[
            ("x-original-uri", "/secret"),
            ("x-original-method", "GET"),
            ("x-original-method", "POST"),
        ],
        // Not a path.
        &[("x-original-uri", "http://evil.example/public/x")],
        &[("x-original-uri", "evil.example:443")],
        &[("x-original-uri", "*")],
        &[("x-original-uri", "public/x")],
        &[("x-original-uri", "/public/x#/../../secret")],
        // Paths the proxy refuses too.
        &[("x-original-uri", "/public/%2e%2e/secret")],
        &[("x-original-uri", "/public%2fsecret")],
        &[
            ("x-original-uri", "/secret"),
            ("x-original-method", "CONNECT"),
        ],
        &[
            ("x-original-uri", "/secret"),
            ("x-original-method", "G\"ET"),
        ],
    ];
    for extra in refused {
        let (status, headers, body) = send(fa, &token, extra).await;
        assert_eq!(status, 403, "{extra:?}: {}", String::from_utf8_lossy(&body));
        assert_eq!(value(&headers, "x-user-id"), None, "{extra:?}");
    }
    // Control bytes never get as far as a decision (hyper's 400).
    for bad in ["/secret\u{1}", "/se\u{7f}cret"] {
        let (status, _, _) = send(fa, &token, &[("x-original-uri", bad)]).await;
        assert!(status == 400 || status == 403, "{bad:?}: {status}");
    }
    // The 302 a browser gets from the proxy is a 401 naming the location.
    let (status, headers, _) = raw_http(
        fa,
        &sub_request(
            "/.sessiongate/auth",
            &[("x-original-uri", "/web/a"), ("accept", "text/html")],
        ),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(value(&headers, "x-sessiongate-redirect"), Some("/login"));

    // Counted and logged as the proxy's requests are.
    let metrics = gw
        .client
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"sessiongate_requests_total{route="/",status="200"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sessiongate_auth_rejections_total{reason="session_required"}"#),
        "{metrics}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_callers_are_answered() {
    let origin = TestUpstream::start().await;
    let (gw, fa) = forward_auth_gateway(&origin, "allow_from = [\"192.0.2.1\"]").await;
    let token = admin_login(&gw, "alice").await;
    let cookie_header = format!("sg_session={token}");
    let (status, headers, body) = raw_http(
        fa,
        &sub_request(
            "/auth",
            &[("x-original-uri", "/secret"), ("cookie", &cookie_header)],
        ),
    )
    .await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert_eq!(value(&headers, "x-user-id"), None);
    assert!(String::from_utf8_lossy(&body).contains("forbidden_caller"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_callers_get_the_proxys_answers() {
    let origin = TestUpstream::start().await;
    let (gw, fa) = forward_auth_gateway(&origin, "caller = \"traefik\"").await;
    let token = admin_login(&gw, "alice").await;
    let cookie_header = format!("sg_session={token}");
    let traefik = |uri: &'static str, extra: &[(&'static str, &'static str)]| {
        let mut h = vec![
            ("x-forwarded-method", "GET"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "app.example"),
            ("x-forwarded-uri", uri),
        ];
        h.extend_from_slice(extra);
        sub_request("/", &h)
    };
    let (status, headers, _) = raw_http(
        fa,
        &traefik("/secret", &[]).replacen("\r\n", &format!("\r\nCookie: {cookie_header}\r\n"), 1),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(value(&headers, "x-user-id"), Some("alice"));
    // Traefik passes refusals on as they are: the 302 and the proxy's codes.
    let (status, headers, _) = raw_http(fa, &traefik("/web/a", &[("accept", "text/html")])).await;
    assert_eq!(status, 302);
    assert_eq!(value(&headers, "location"), Some("/login"));
    let (status, _, body) = raw_http(fa, &traefik("/secret", &[])).await;
    assert_eq!(status, 401);
    assert!(String::from_utf8_lossy(&body).contains("session_required"));
    let (status, _, body) = raw_http(fa, &traefik("/public/%2e%2e/secret", &[])).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("invalid_path"));
    // nginx's header means nothing here; a missing or doubled one of its
    // own is refused.
    let (status, _, _) = raw_http(fa, &sub_request("/", &[("x-original-uri", "/public/x")])).await;
    assert_eq!(status, 400);
    let (status, _, _) =
        raw_http(fa, &traefik("/public/x", &[("x-forwarded-uri", "/secret")])).await;
    assert_eq!(status, 400);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_callers_describe_the_request_in_its_own_line() {
    let origin = TestUpstream::start().await;
    let (gw, fa) =
        forward_auth_gateway(&origin, "caller = \"envoy\"\npath_prefix = \"/ext-authz\"").await;
    let token = admin_login(&gw, "alice").await;
    let cookie_header = format!("sg_session={token}");
    let (status, headers, _) = raw_http(
        fa,
        &sub_request("/ext-authz/secret?x=1", &[("cookie", &cookie_header)]),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(value(&headers, "x-user-id"), Some("alice"));
    let (status, headers, _) = raw_http(fa, &sub_request("/ext-authz/public/x", &[])).await;
    assert_eq!(status, 200);
    assert_eq!(value(&headers, "x-user-id"), Some(""));
    for (target, expected) in [
        ("/ext-authz/secret", 401),
        // Not under the prefix, or the prefix only as a name's start.
        ("/secret", 400),
        ("/ext-authzsecret", 400),
        ("/ext-authz/public/%2e%2e/secret", 400),
    ] {
        let (status, _, _) = raw_http(fa, &sub_request(target, &[])).await;
        assert_eq!(status, expected, "{target}");
    }
    // A header another caller uses does not move the check elsewhere.
    let (status, _, _) = raw_http(
        fa,
        &sub_request("/ext-authz/secret", &[("x-original-uri", "/public/x")]),
    )
    .await;
    assert_eq!(status, 401);
    gw.shutdown().await;
}

#[tokio::test]
async fn forward_auth_config_is_checked() {
    use sessiongate::config::Config;
    let base = "[store]\ndatabase_url = \"sqlite://x.db\"\n[[upstreams]]\nname = \"a\"\nurls = [\"http://127.0.0.1:1\"]\n[[routes]]\nprefix = \"/\"\nupstream = \"a\"\n";
    let problems = |table: &str| -> Vec<String> {
        match Config::from_toml_str(&format!("{base}[forward_auth]\n{table}\n")) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems().iter().map(|p| p.key.clone()).collect(),
        }
    };
    assert!(problems("").is_empty());
    assert_eq!(problems("caller = \"haproxy\""), ["forward_auth.caller"]);
    assert_eq!(
        problems("path_prefix = \"/x\""),
        ["forward_auth.path_prefix"]
    );
    assert_eq!(
        problems("caller = \"envoy\"\npath_prefix = \"x/\""),
        ["forward_auth.path_prefix"]
    );
    assert_eq!(
        problems("allow_from = [\"nginx.internal\"]"),
        ["forward_auth.allow_from[0]"]
    );
    assert_eq!(problems("listen = \"nowhere\""), ["forward_auth.listen"]);
    assert_eq!(problems("lisen = \"127.0.0.1:1\""), ["forward_auth.lisen"]);
    let c = Config::from_toml_str(base).unwrap();
    assert!(c.forward_auth.is_none(), "absent = off");
}
