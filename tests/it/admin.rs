//! The admin API, `/healthz`, `/readyz` and `/metrics`, against a gateway
//! started in-process on real sockets with a real SQLite file, and a tiny
//! upstream that echoes the identity it was given.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sessiongate::config::Config;
use sessiongate::server::RunningGateway;
use tokio::net::TcpListener;
use uuid::Uuid;

const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// An upstream answering every request with 200 and `user=<x-user-id>`.
async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let user = req
                        .headers()
                        .get("x-user-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "user={user}"
                    )))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

struct TestGateway {
    running: RunningGateway,
    admin: String,
    proxy: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
    /// Redis prefixes and PostgreSQL schemas to clean up afterwards.
    _guards: Vec<Box<dyn Send>>,
}

impl TestGateway {
    async fn start() -> TestGateway {
        Self::start_with("").await
    }

    /// Starts a gateway on SQLite; `session_extra` is added to its
    /// `[session]` table.
    async fn start_with(session_extra: &str) -> TestGateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = format!(
            "database_url = \"sqlite://{}\"",
            dir.path().join("sg.db").display()
        );
        Self::start_custom(dir, &store, session_extra, Vec::new()).await
    }

    /// Starts a gateway whose `[store]` table holds `store`.
    async fn start_custom(
        dir: tempfile::TempDir,
        store: &str,
        session_extra: &str,
        guards: Vec<Box<dyn Send>>,
    ) -> TestGateway {
        let upstream = echo_upstream().await;
        let text = format!(
            r#"
            [server]
            listen = "127.0.0.1:0"
            shutdown_grace_ms = 1000

            [admin]
            listen = "127.0.0.1:0"
            token = "{ADMIN_TOKEN}"

            [store]
            {store}

            [session]
            cookie_secure = false
            {session_extra}

            [[upstreams]]
            name = "app"
            urls = ["http://{upstream}"]

            [[routes]]
            prefix = "/"
            upstream = "app"
            auth = "required"
            "#,
        );
        let config = Config::from_toml_str(&text).expect("valid test config");
        let running = sessiongate::server::start(config)
            .await
            .expect("gateway starts");
        let admin = format!(
            "http://{}",
            running.admin_addr().expect("admin listener configured")
        );
        let proxy = format!("http://{}", running.addr());
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        TestGateway {
            running,
            admin,
            proxy,
            client,
            _dir: dir,
            _guards: guards,
        }
    }

    async fn stop(self) {
        drop(self.client);
        tokio::time::timeout(Duration::from_secs(10), self.running.shutdown())
            .await
            .expect("gateway shuts down");
    }

    /// An authenticated admin request.
    fn admin(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// An admin request without credentials.
    fn anonymous(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.admin))
    }

    async fn create_session(&self, user: &str, attributes: Value) -> Value {
        let resp = self
            .admin(Method::POST, "/v1/sessions")
            .json(&json!({"user_id": user, "attributes": attributes}))
            .send()
            .await
            .expect("POST /v1/sessions");
        assert_eq!(resp.status(), StatusCode::CREATED);
        resp.json().await.expect("JSON session")
    }

    /// Status and body of a proxied GET carrying `token` as a bearer token.
    async fn proxy_get(&self, token: Option<&str>) -> (StatusCode, String) {
        let mut req = self.client.get(format!("{}/account", self.proxy));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.expect("proxied request");
        let status = resp.status();
        (status, resp.text().await.expect("proxied body"))
    }

    async fn list_user(&self, encoded_user: &str) -> Vec<Value> {
        let resp = self
            .admin(Method::GET, &format!("/v1/users/{encoded_user}/sessions"))
            .send()
            .await
            .expect("GET user sessions");
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.expect("JSON");
        body["sessions"]
            .as_array()
            .unwrap_or_else(|| panic!("no sessions array in {body}"))
            .clone()
    }
}

/// Checks the contract's error body and returns its message.
async fn error_body(resp: reqwest::Response, status: StatusCode, code: &str) -> String {
    assert_eq!(resp.status(), status);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(
        content_type.starts_with("application/json"),
        "error content-type {content_type:?}"
    );
    let body: Value = resp.json().await.expect("JSON error body");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["request_id"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{body}"
    );
    body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {body}"))
        .to_string()
}

/// Asserts a 400 whose message names `field`.
async fn assert_bad_field(resp: reqwest::Response, field: &str) {
    let message = error_body(resp, StatusCode::BAD_REQUEST, "invalid_field").await;
    assert!(
        message.contains(&format!("`{field}`")),
        "400 message does not name `{field}`: {message}"
    );
}

fn rfc3339_utc(value: &Value) -> std::time::SystemTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("time is not a string: {value}"));
    assert!(text.ends_with('Z'), "not UTC: {text}");
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("not RFC 3339: {text}: {e}"))
}

fn ids(sessions: &[Value]) -> Vec<String> {
    sessions
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// POST /v1/sessions
// ---------------------------------------------------------------------------

#[tokio::test]
async fn create_session_returns_the_session_and_its_token() {
    let gw = TestGateway::start().await;
    let resp = gw
        .admin(Method::POST, "/v1/sessions")
        .json(&json!({"user_id": "alice", "attributes": {"plan": "pro"}}))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: Value = resp.json().await.expect("JSON");

    let id = Uuid::parse_str(body["id"].as_str().expect("id")).expect("id is a UUID");
    assert_eq!(id.get_version_num(), 7, "id is a UUID v7");
    let token = body["token"].as_str().expect("token");
    assert!(token.len() >= 43, "a token of at least 256 bits: {token}");
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "base64url without padding: {token}"
    );
    assert_eq!(body["user_id"], "alice");
    assert_eq!(body["attributes"], json!({"plan": "pro"}));
    let created = rfc3339_utc(&body["created_at"]);
    let last_seen = rfc3339_utc(&body["last_seen_at"]);
    let expires = rfc3339_utc(&body["expires_at"]);
    assert_eq!(created, last_seen);
    let age = std::time::SystemTime::now()
        .duration_since(created)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(60), "created_at is now: {age:?}");
    assert_eq!(
        expires.duration_since(created).expect("expires after"),
        Duration::from_secs(86_400),
        "default TTL"
    );

    // The token authenticates on the proxy listener, as the user.
    assert_eq!(
        gw.proxy_get(Some(token)).await,
        (StatusCode::OK, "user=alice".to_string())
    );
    // And as the session cookie.
    let resp = gw
        .client
        .get(format!("{}/account", gw.proxy))
        .header("cookie", format!("sg_session={token}"))
        .send()
        .await
        .expect("cookie request");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "user=alice");

    // Without a token the proxy says 401.
    let resp = gw
        .client
        .get(format!("{}/account", gw.proxy))
        .send()
        .await
        .expect("anonymous request");
    assert_eq!(
        resp.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap()),
        Some("Bearer")
    );
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    gw.stop().await;
}

#[tokio::test]
async fn create_session_without_attributes_has_empty_attributes() {
    let gw = TestGateway::start().await;
    let resp = gw
        .admin(Method::POST, "/v1/sessions")
        .json(&json!({"user_id": "bob"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["attributes"], json!({}));
    assert_eq!(body["user_id"], "bob");
    gw.stop().await;
}

#[tokio::test]
async fn create_session_rejects_bad_bodies_naming_the_field() {
    let gw = TestGateway::start().await;
    let cases = [
        (r#"{"attributes": {}}"#, "user_id"),
        (r#"{"user_id": 42}"#, "user_id"),
        (r#"{"user_id": null}"#, "user_id"),
        (r#"{"user_id": ""}"#, "user_id"),
        (
            r#"{"user_id": "victim", "attributes": {"a": 1}}"#,
            "attributes",
        ),
        (r#"{"user_id": "victim", "attributes": "x"}"#, "attributes"),
        (
            r#"{"user_id": "victim", "attributes": ["a"]}"#,
            "attributes",
        ),
        (r#"{"user_id": "a\nb"}"#, "user_id"),
        (r#"{"user_id": " padded "}"#, "user_id"),
        (r#"{"user_id": "#, "body"),
        ("not json at all", "body"),
        ("[]", "body"),
        ("null", "body"),
        ("", "body"),
    ];
    for (body, field) in cases {
        let resp = gw
            .admin(Method::POST, "/v1/sessions")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "body {body}");
        assert_bad_field(resp, field).await;
    }
    // A user id over 256 bytes.
    let resp = gw
        .admin(Method::POST, "/v1/sessions")
        .json(&json!({"user_id": "u".repeat(257)}))
        .send()
        .await
        .expect("POST");
    assert_bad_field(resp, "user_id").await;
    // Too many attributes.
    let many: serde_json::Map<String, Value> = (0..65)
        .map(|i| (format!("k{i}"), Value::String("v".into())))
        .collect();
    let resp = gw
        .admin(Method::POST, "/v1/sessions")
        .json(&json!({"user_id": "victim", "attributes": many}))
        .send()
        .await
        .expect("POST");
    assert_bad_field(resp, "attributes").await;

    // None of the rejected requests created a session.
    assert!(gw.list_user("victim").await.is_empty());
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// Admin authentication
// ---------------------------------------------------------------------------

#[tokio::test]
async fn admin_api_needs_the_admin_token() {
    let gw = TestGateway::start().await;
    let session = gw.create_session("alice", json!({})).await;
    let id = session["id"].as_str().unwrap().to_string();
    let session_token = session["token"].as_str().unwrap().to_string();

    let endpoints: Vec<(Method, String)> = vec![
        (Method::POST, "/v1/sessions".into()),
        (Method::GET, format!("/v1/sessions/{id}")),
        (Method::DELETE, format!("/v1/sessions/{id}")),
        (Method::GET, "/v1/users/alice/sessions".into()),
        (Method::DELETE, "/v1/users/alice/sessions".into()),
        (Method::GET, "/v1/policies".into()),
        (Method::POST, "/v1/policies/reload".into()),
    ];
    let wrong: [Option<String>; 5] = [
        None,
        Some("Bearer wrong-admin-token-0123456789".into()),
        Some(format!("Bearer {ADMIN_TOKEN}x")),
        Some(format!("Basic {ADMIN_TOKEN}")),
        // A user's session token is not an admin token.
        Some(format!("Bearer {session_token}")),
    ];
    for (method, path) in &endpoints {
        for auth in &wrong {
            let mut req = gw.anonymous(method.clone(), path);
            if let Some(auth) = auth {
                req = req.header("authorization", auth);
            }
            if *method == Method::POST {
                req = req.json(&json!({"user_id": "intruder"}));
            }
            let resp = req.send().await.expect("request");
            assert_eq!(
                resp.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {auth:?}"
            );
            assert_eq!(
                resp.headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap()),
                Some("Bearer"),
                "{method} {path}"
            );
            error_body(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
        }
    }
    // Nothing changed: alice's session is alive, no intruder session exists.
    assert_eq!(gw.list_user("alice").await.len(), 1);
    assert!(gw.list_user("intruder").await.is_empty());
    assert_eq!(gw.proxy_get(Some(&session_token)).await.0, StatusCode::OK);
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// GET / DELETE /v1/sessions/{id}
// ---------------------------------------------------------------------------

#[tokio::test]
async fn get_session_by_id_never_shows_the_token() {
    let gw = TestGateway::start().await;
    let created = gw.create_session("alice", json!({"k": "v"})).await;
    let id = created["id"].as_str().unwrap();

    let resp = gw
        .admin(Method::GET, &format!("/v1/sessions/{id}"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert!(body.get("token").is_none(), "token leaked: {body}");
    let text = body.to_string();
    assert!(
        !text.contains(created["token"].as_str().unwrap()),
        "token leaked: {text}"
    );
    let mut expected = created.clone();
    expected.as_object_mut().unwrap().remove("token");
    assert_eq!(body, expected);

    let unknown = Uuid::now_v7();
    let resp = gw
        .admin(Method::GET, &format!("/v1/sessions/{unknown}"))
        .send()
        .await
        .expect("GET unknown");
    error_body(resp, StatusCode::NOT_FOUND, "not_found").await;

    let resp = gw
        .admin(Method::GET, "/v1/sessions/not-a-uuid")
        .send()
        .await
        .expect("GET bad id");
    assert_bad_field(resp, "id").await;
    gw.stop().await;
}

#[tokio::test]
async fn delete_session_revokes_it_at_once() {
    let gw = TestGateway::start().await;
    let created = gw.create_session("alice", json!({})).await;
    let other = gw.create_session("alice", json!({})).await;
    let id = created["id"].as_str().unwrap();
    let token = created["token"].as_str().unwrap();
    assert_eq!(gw.proxy_get(Some(token)).await.0, StatusCode::OK);

    let resp = gw
        .admin(Method::DELETE, &format!("/v1/sessions/{id}"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.bytes().await.unwrap().is_empty());

    // The proxy rejects the token from now on.
    let resp = gw
        .client
        .get(format!("{}/account", gw.proxy))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap()),
        Some("Bearer")
    );
    error_body(resp, StatusCode::UNAUTHORIZED, "invalid_session").await;

    let resp = gw
        .admin(Method::DELETE, &format!("/v1/sessions/{id}"))
        .send()
        .await
        .expect("DELETE again");
    error_body(resp, StatusCode::NOT_FOUND, "not_found").await;
    let resp = gw
        .admin(Method::GET, &format!("/v1/sessions/{id}"))
        .send()
        .await
        .expect("GET deleted");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    let resp = gw
        .admin(Method::DELETE, "/v1/sessions/12345")
        .send()
        .await
        .expect("DELETE bad id");
    assert_bad_field(resp, "id").await;

    // The user's other session is untouched.
    assert_eq!(
        gw.proxy_get(other["token"].as_str()).await,
        (StatusCode::OK, "user=alice".into())
    );
    gw.stop().await;
}

#[tokio::test]
async fn expired_sessions_disappear_from_the_admin_api() {
    let gw = TestGateway::start_with("default_ttl_seconds = 1").await;
    let created = gw.create_session("short", json!({})).await;
    let id = created["id"].as_str().unwrap();
    let token = created["token"].as_str().unwrap();
    assert_eq!(gw.proxy_get(Some(token)).await.0, StatusCode::OK);

    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(gw.proxy_get(Some(token)).await.0, StatusCode::UNAUTHORIZED);
    let resp = gw
        .admin(Method::GET, &format!("/v1/sessions/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(gw.list_user("short").await.is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn expired_sessions_are_not_revoked_again() {
    // GET says an expired session does not exist; DELETE must agree, and
    // a user's revocation counts only the sessions that were live.
    let gw = TestGateway::start_with("default_ttl_seconds = 1").await;
    let expired = gw.create_session("uma", json!({})).await;
    // A second expired session, left for the user-wide revocation.
    gw.create_session("uma", json!({})).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let live = gw.create_session("uma", json!({})).await;
    assert_eq!(ids(&gw.list_user("uma").await), ids(&[live]));

    let resp = gw
        .admin(
            Method::DELETE,
            &format!("/v1/sessions/{}", expired["id"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::NOT_FOUND,
        "DELETE of an expired session, which GET reports as not found"
    );
    let resp = gw
        .admin(Method::DELETE, "/v1/users/uma/sessions")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"revoked": 1}),
        "only the one live session was revoked"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// /v1/users/{user_id}/sessions
// ---------------------------------------------------------------------------

#[tokio::test]
async fn list_user_sessions_newest_first() {
    let gw = TestGateway::start().await;
    let mut created = Vec::new();
    for i in 0..3 {
        created.push(
            gw.create_session("carol@example.com", json!({"n": i.to_string()}))
                .await,
        );
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    gw.create_session("dan", json!({})).await;

    let listed = gw.list_user("carol%40example.com").await;
    let mut expected: Vec<String> = ids(&created);
    expected.reverse();
    assert_eq!(ids(&listed), expected, "newest first");
    for s in &listed {
        assert!(s.get("token").is_none(), "token leaked: {s}");
        assert_eq!(s["user_id"], "carol@example.com");
        rfc3339_utc(&s["created_at"]);
        rfc3339_utc(&s["last_seen_at"]);
        rfc3339_utc(&s["expires_at"]);
    }
    assert_eq!(listed[0]["attributes"], json!({"n": "2"}));

    assert!(gw.list_user("nobody").await.is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn delete_user_sessions_revokes_all_of_them() {
    let gw = TestGateway::start().await;
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let s = gw.create_session("erin@example.com", json!({})).await;
        tokens.push(s["token"].as_str().unwrap().to_string());
    }
    let other = gw.create_session("frank", json!({})).await;
    for token in &tokens {
        assert_eq!(gw.proxy_get(Some(token)).await.0, StatusCode::OK);
    }

    let resp = gw
        .admin(Method::DELETE, "/v1/users/erin%40example.com/sessions")
        .send()
        .await
        .expect("DELETE user sessions");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"revoked": 3}));

    for token in &tokens {
        assert_eq!(gw.proxy_get(Some(token)).await.0, StatusCode::UNAUTHORIZED);
    }
    assert!(gw.list_user("erin%40example.com").await.is_empty());
    assert_eq!(
        gw.proxy_get(other["token"].as_str()).await,
        (StatusCode::OK, "user=frank".into())
    );

    let resp = gw
        .admin(Method::DELETE, "/v1/users/erin%40example.com/sessions")
        .send()
        .await
        .expect("DELETE again");
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"revoked": 0}));

    let resp = gw
        .admin(Method::DELETE, "/v1/users/bad%zzuser/sessions")
        .send()
        .await
        .expect("DELETE bad user");
    assert_bad_field(resp, "user_id").await;
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// Policies, health, readiness, metrics
// ---------------------------------------------------------------------------

#[tokio::test]
async fn policies_are_listed_and_reloaded() {
    let gw = TestGateway::start().await;
    let resp = gw.admin(Method::GET, "/v1/policies").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // `policies` is the default chain (the contract); `chains` every chain.
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"policies": [], "chains": {"default": []}})
    );

    let resp = gw
        .admin(Method::POST, "/v1/policies/reload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert!(body["policies"].is_array(), "{body}");
    gw.stop().await;
}

#[tokio::test]
async fn health_and_readiness_need_no_auth() {
    let gw = TestGateway::start().await;
    let resp = gw.anonymous(Method::GET, "/healthz").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let resp = gw.anonymous(Method::GET, "/readyz").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.expect("readyz is JSON");
    let stores = body["stores"]
        .as_array()
        .unwrap_or_else(|| panic!("no stores in {body}"));
    let tiers: Vec<(&str, &str, bool)> = stores
        .iter()
        .map(|s| {
            (
                s["tier"].as_str().unwrap_or(""),
                s["kind"].as_str().unwrap_or(""),
                s["ok"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert!(tiers.contains(&("fast", "memory", true)), "{body}");
    assert!(tiers.contains(&("durable", "sqlite", true)), "{body}");
    gw.stop().await;
}

#[tokio::test]
async fn metrics_count_traffic() {
    let gw = TestGateway::start().await;
    let session = gw.create_session("mia", json!({})).await;
    let token = session["token"].as_str().unwrap();
    assert_eq!(gw.proxy_get(Some(token)).await.0, StatusCode::OK);
    assert_eq!(gw.proxy_get(None).await.0, StatusCode::UNAUTHORIZED);
    let resp = gw
        .admin(
            Method::DELETE,
            &format!("/v1/sessions/{}", session["id"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    let resp = gw.anonymous(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = resp.text().await.unwrap();
    for line in [
        r#"sessiongate_requests_total{route="/",status="200"} 1"#,
        r#"sessiongate_requests_total{route="/",status="401"} 1"#,
        r#"sessiongate_request_duration_seconds_count{route="/"} 2"#,
        r#"sessiongate_store_lookups_total{tier="fast",outcome="hit"} 1"#,
        "sessiongate_sessions_created_total 1",
        "sessiongate_sessions_revoked_total 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    assert!(
        text.contains("# TYPE sessiongate_request_duration_seconds histogram"),
        "{text}"
    );
    assert!(!text.contains(token), "a session token appears in /metrics");
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// Body limits, methods, paths
// ---------------------------------------------------------------------------

#[tokio::test]
async fn bodies_over_64_kib_are_refused() {
    let gw = TestGateway::start().await;
    // Exactly 64 KiB is accepted …
    let mut body = r#"{"user_id": "big"}"#.to_string();
    body.push_str(&" ".repeat(64 * 1024 - body.len()));
    assert_eq!(body.len(), 64 * 1024);
    let resp = gw
        .admin(Method::POST, "/v1/sessions")
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .expect("POST 64 KiB");
    assert_eq!(resp.status(), StatusCode::CREATED);

    // … one byte more is not.
    body.push(' ');
    let resp = gw
        .admin(Method::POST, "/v1/sessions")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST 64 KiB + 1");
    error_body(resp, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large").await;
    assert_eq!(gw.list_user("big").await.len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn wrong_methods_get_405_and_unknown_paths_404() {
    let gw = TestGateway::start().await;
    let id = Uuid::now_v7();
    let cases: Vec<(Method, String)> = vec![
        (Method::GET, "/v1/sessions".into()),
        (Method::DELETE, "/v1/sessions".into()),
        (Method::PUT, format!("/v1/sessions/{id}")),
        (Method::POST, format!("/v1/sessions/{id}")),
        (Method::POST, "/v1/users/alice/sessions".into()),
        (Method::PATCH, "/v1/users/alice/sessions".into()),
        (Method::DELETE, "/v1/policies".into()),
        (Method::GET, "/v1/policies/reload".into()),
    ];
    for (method, path) in cases {
        let resp = gw.admin(method.clone(), &path).send().await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        error_body(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    }
    let resp = gw
        .admin(Method::GET, "/v1/nothing-here")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = gw
        .anonymous(Method::GET, "/nothing-here")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// Shared stores
// ---------------------------------------------------------------------------

#[tokio::test]
async fn admin_api_on_redis_and_postgres() {
    let schema = crate::store_suite::postgres_schema().await;
    let (prefix, redis_guard) = crate::store_suite::redis_prefix();
    let store = format!(
        "database_url = \"{}\"\nredis_url = \"{}\"\nredis_prefix = \"{prefix}\"",
        schema.url,
        crate::store_suite::redis_url()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let gw = TestGateway::start_custom(
        dir,
        &store,
        "",
        vec![Box::new(schema), Box::new(redis_guard)],
    )
    .await;

    let resp = gw.anonymous(Method::GET, "/readyz").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    let kinds: Vec<(&str, &str, bool)> = body["stores"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|s| {
            (
                s["tier"].as_str().unwrap_or(""),
                s["kind"].as_str().unwrap_or(""),
                s["ok"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert!(kinds.contains(&("fast", "redis", true)), "{body}");
    assert!(kinds.contains(&("durable", "postgres", true)), "{body}");

    let created = gw
        .create_session("zoe@example.com", json!({"a": "b"}))
        .await;
    let token = created["token"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();
    assert_eq!(
        gw.proxy_get(Some(token)).await,
        (StatusCode::OK, "user=zoe@example.com".into())
    );
    let listed = gw.list_user("zoe%40example.com").await;
    assert_eq!(ids(&listed), vec![id.to_string()]);
    assert_eq!(listed[0]["attributes"], json!({"a": "b"}));

    let resp = gw
        .admin(Method::DELETE, &format!("/v1/sessions/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(gw.proxy_get(Some(token)).await.0, StatusCode::UNAUTHORIZED);
    gw.stop().await;
}

#[tokio::test]
async fn readyz_names_the_store_that_is_down() {
    // Nothing listens on this port: Redis is "down" from the start.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!(
        "database_url = \"sqlite://{}\"\nredis_url = \"redis://127.0.0.1:{closed}\"\nredis_timeout_ms = 300",
        dir.path().join("sg.db").display()
    );
    let gw = TestGateway::start_custom(dir, &store, "", Vec::new()).await;

    let resp = gw.anonymous(Method::GET, "/healthz").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "the process still serves");
    let resp = gw.anonymous(Method::GET, "/readyz").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = resp.json().await.unwrap();
    let text = body.to_string();
    assert!(
        body["down"]
            .as_array()
            .is_some_and(|d| d.iter().any(|k| k == "redis")),
        "readyz does not say Redis is down: {text}"
    );
    let stores = body["stores"]
        .as_array()
        .unwrap_or_else(|| panic!("{text}"));
    let fast = stores
        .iter()
        .find(|s| s["tier"] == "fast")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(fast["ok"], false, "{text}");
    assert!(fast["error"].is_string(), "{text}");
    let durable = stores
        .iter()
        .find(|s| s["tier"] == "durable")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(durable["ok"], true, "{text}");

    // Sessions still work from the durable tier.
    let created = gw.create_session("yuri", json!({})).await;
    assert_eq!(
        gw.proxy_get(created["token"].as_str()).await,
        (StatusCode::OK, "user=yuri".into())
    );
    gw.stop().await;
}

#[tokio::test]
async fn wrong_methods_on_health_endpoints_get_405() {
    let gw = TestGateway::start().await;
    for (method, path) in [
        (Method::POST, "/healthz"),
        (Method::DELETE, "/readyz"),
        (Method::POST, "/metrics"),
    ] {
        let resp = gw.anonymous(method.clone(), path).send().await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn chunked_bodies_over_64_kib_are_refused() {
    let gw = TestGateway::start().await;
    // No Content-Length: the limit must hold on the bytes as they arrive.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(br#"{"user_id": "chunky", "attributes": {"k": ""#.to_vec()),
        Ok(vec![b'x'; 40 * 1024]),
        Ok(vec![b'x'; 40 * 1024]),
        Ok(br#""}}"#.to_vec()),
    ];
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let resp = gw
        .admin(Method::POST, "/v1/sessions")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST chunked");
    error_body(resp, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large").await;
    assert!(gw.list_user("chunky").await.is_empty());
    gw.stop().await;
}
