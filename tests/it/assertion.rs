//! Signed identity for upstreams (`[session.assertion]`): a real upstream
//! receives the assertion, and the test verifies it as an upstream would,
//! with the `jsonwebtoken` crate against the JWKS document fetched from
//! the gateway's proxy listener over a socket: not with the gateway's
//! own code. Forged client copies, key reloads reaching every worker, a
//! generated key surviving a restart, and the config checks.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sessiongate::config::Config;

use crate::harness::*;

const ISSUER: &str = "https://gw.test";
const TTL: i64 = 45;

/// `[session.assertion]` plus two routes of their own: `/app/` forwards
/// attributes, `/aud/` has a configured audience.
fn assertion_toml(key_file: Option<&Path>) -> String {
    let key = key_file
        .map(|p| {
            format!(
                "key_file = {}\n",
                serde_json::to_string(&p.display().to_string()).unwrap()
            )
        })
        .unwrap_or_default();
    format!(
        r#"[session.assertion]
enabled = true
issuer = "{ISSUER}"
ttl_seconds = {TTL}
claims = ["role"]
{key}
[[routes]]
prefix = "/app/"
upstream = "app"
auth = "required"
forward_attributes = ["role", "tenant-id"]

[[routes]]
prefix = "/aud/"
upstream = "app"
auth = "required"
audience = "https://api.example"
"#
    )
}

fn spec(upstream: &TestUpstream, key_file: Option<&Path>) -> GatewaySpec {
    let mut spec = GatewaySpec::standard(&upstream.url()).cookie_secure(false);
    spec.extra = assertion_toml(key_file);
    spec
}

/// A P-256 PKCS#8 PEM key file only its owner can read.
fn write_key(dir: &Path, name: &str) -> PathBuf {
    let key = rcgen::KeyPair::generate().expect("a P-256 key");
    let path = dir.join(name);
    std::fs::write(&path, key.serialize_pem()).unwrap();
    chmod(&path, 0o600);
    path
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

async fn login_with(gw: &GatewayUnderTest, user: &str, attrs: &str) -> String {
    let resp = gw.login_response(user, Some(attrs), None).await;
    assert_eq!(resp.status(), 200, "login through the gateway");
    set_cookie(resp.headers(), COOKIE)
        .expect("login sets the session cookie")
        .value
}

async fn fetch_jwks(gw: &GatewayUnderTest) -> JwkSet {
    let resp = gw
        .client
        .get(gw.url("/.well-known/sessiongate/jwks.json"))
        .send()
        .await
        .expect("JWKS request");
    assert_eq!(resp.status(), 200);
    let cache = resp.headers()["cache-control"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(cache.contains("max-age=30"), "{cache}");
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    resp.json().await.expect("a JWKS document")
}

/// Verifies `token` as an upstream would: the key by the header's `kid`
/// from the JWKS, ES256 only, the audience, the issuer and the expiry.
fn verify(token: &str, jwks: &JwkSet, audience: &str) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("no kid")?;
    let jwk = jwks
        .find(&kid)
        .ok_or(format!("kid {kid} not in the JWKS"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[ISSUER]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss", "sub"]);
    validation.leeway = 0;
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map(|data| data.claims)
        .map_err(|e| e.to_string())
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

#[tokio::test]
async fn an_upstream_verifies_the_assertion_against_the_gateways_jwks() {
    let upstream = TestUpstream::start().await;
    let gw = GatewayUnderTest::start(spec(&upstream, None)).await;
    let token = login_with(
        &gw,
        "alice",
        r#"{"role":"editor","tenant-id":"t-7","other":"x"}"#,
    )
    .await;
    let session_id = gw.admin_user_sessions("alice").await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let echo = echo_of(gw.get("/app/echo", Some(&token)).await).await;
    let assertion = seen(&echo, "x-sessiongate-assertion")
        .expect("the upstream got an assertion")
        .to_string();
    let jwks = fetch_jwks(&gw).await;
    assert_eq!(jwks.keys.len(), 1);
    let claims = verify(&assertion, &jwks, "/app/").expect("the assertion verifies");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["sid"], session_id.as_str());
    assert_eq!(claims["aud"], "/app/");
    assert_eq!(claims["iss"], ISSUER);
    assert_eq!(claims["role"], "editor", "a listed attribute is a claim");
    assert!(claims.get("other").is_none(), "an unlisted one is not");
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, TTL);
    let now = sessiongate::session::now_ms() / 1000;
    assert!((iat - now).abs() <= 5, "iat {iat} is now ({now})");
    // The identity headers still go along, and the route's attributes.
    assert_eq!(seen(&echo, "x-user-id"), Some("alice"));
    assert_eq!(seen(&echo, "x-session-id"), Some(session_id.as_str()));
    assert_eq!(seen(&echo, "x-sessiongate-attr-role"), Some("editor"));
    assert_eq!(seen(&echo, "x-sessiongate-attr-tenant-id"), Some("t-7"));

    // Another route's audience does not verify here, and vice versa.
    assert!(verify(&assertion, &jwks, "/aud/").is_err());
    let echo = echo_of(gw.get("/aud/echo", Some(&token)).await).await;
    let aud = seen(&echo, "x-sessiongate-assertion").unwrap();
    assert_eq!(
        verify(aud, &jwks, "https://api.example").unwrap()["aud"],
        "https://api.example"
    );
    assert!(verify(aud, &jwks, "/aud/").is_err());
    assert!(
        seen(&echo, "x-sessiongate-attr-role").is_none(),
        "attributes go only where a route lists them"
    );

    // Tampered: a changed claim, a changed signature, another alg.
    let parts: Vec<&str> = assertion.split('.').collect();
    assert_eq!(parts.len(), 3);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let mut forged: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    forged["sub"] = "mallory".into();
    let forged_token = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(forged.to_string()),
        parts[2]
    );
    assert!(verify(&forged_token, &jwks, "/app/").is_err());
    let mut signature = b64.decode(parts[2]).unwrap();
    signature[10] ^= 1;
    let bad_signature = format!("{}.{}.{}", parts[0], parts[1], b64.encode(&signature));
    assert!(verify(&bad_signature, &jwks, "/app/").is_err());
    let none_alg = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(forged.to_string())
    );
    assert!(verify(&none_alg, &jwks, "/app/").is_err());

    // No session, no assertion: an optional route without one, a route
    // without authentication (even with a session).
    let echo = echo_of(gw.get("/opt/echo", None).await).await;
    assert!(seen(&echo, "x-sessiongate-assertion").is_none());
    let echo = echo_of(gw.get("/public/echo", Some(&token)).await).await;
    assert!(seen(&echo, "x-sessiongate-assertion").is_none());
    // An optional route with a session gets one, for its own audience.
    let echo = echo_of(gw.get("/opt/echo", Some(&token)).await).await;
    let opt = seen(&echo, "x-sessiongate-assertion").unwrap();
    assert_eq!(verify(opt, &jwks, "/opt/").unwrap()["sub"], "alice");

    // The JWKS answers GET and HEAD, and nothing else; it is the
    // gateway's, never the upstream's.
    let hits = upstream.hits();
    let head = gw
        .client
        .head(gw.url("/.well-known/sessiongate/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    let post = gw
        .client
        .post(gw.url("/.well-known/sessiongate/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.headers()["allow"], "GET, HEAD");
    expect_error(post, 405).await;
    assert_eq!(upstream.hits(), hits, "the upstream never saw those");
    gw.shutdown().await;
}

#[tokio::test]
async fn client_forged_assertions_and_attribute_headers_never_reach_the_upstream() {
    let upstream = TestUpstream::start().await;
    let gw = GatewayUnderTest::start(spec(&upstream, None)).await;
    let token = login_with(&gw, "bob", r#"{"role":"viewer"}"#).await;
    let jwks = fetch_jwks(&gw).await;
    // A genuine assertion from another route, replayed by the client,
    // and made-up ones, in every spelling and more than once.
    let echo = echo_of(gw.get("/aud/echo", Some(&token)).await).await;
    let replayed = seen(&echo, "x-sessiongate-assertion").unwrap().to_string();
    let forged_headers = format!(
        "x-sessiongate-assertion: {replayed}\r\n\
         X-Sessiongate-Assertion: forged.forged.forged\r\n\
         X_Sessiongate_Assertion: forged\r\n\
         x-sessiongate-attr-role: admin\r\n\
         X-SESSIONGATE-ATTR-ROLE: admin\r\n\
         X_Sessiongate_Attr_Role: admin\r\n\
         x-sessiongate-attr-tenant-id: t-evil\r\n\
         x-sessiongate-attr-other: x\r\n"
    );
    let request = |path: &str, cookie: Option<&str>| {
        let cookie = cookie
            .map(|t| format!("cookie: {}\r\n", crate::harness::cookie(t)))
            .unwrap_or_default();
        format!(
            "GET {path} HTTP/1.1\r\nhost: gw\r\n{cookie}{forged_headers}connection: close\r\n\r\n"
        )
    };

    let (status, _, body) = raw_http(gw.addr, &request("/app/echo", Some(&token))).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let echo: Value = serde_json::from_slice(&body).unwrap();
    let headers = echo["headers"].as_object().unwrap();
    let ours: Vec<&String> = headers
        .keys()
        .filter(|k| k.replace('_', "-").starts_with("x-sessiongate-"))
        .collect();
    assert_eq!(
        ours,
        vec!["x-sessiongate-assertion", "x-sessiongate-attr-role"],
        "only the gateway's own: {headers:?}"
    );
    assert_eq!(seen(&echo, "x-sessiongate-attr-role"), Some("viewer"));
    let assertion = seen(&echo, "x-sessiongate-assertion").unwrap();
    assert_ne!(assertion, replayed);
    let claims = verify(assertion, &jwks, "/app/").expect("the gateway's own assertion");
    assert_eq!(claims["sub"], "bob");
    assert_eq!(claims["role"], "viewer");

    // Without a session, or on a route without authentication, nothing
    // of the client's gets through either.
    for (path, cookie) in [("/opt/echo", None), ("/public/echo", Some(token.as_str()))] {
        let (status, _, body) = raw_http(gw.addr, &request(path, cookie)).await;
        assert_eq!(status, 200);
        let echo: Value = serde_json::from_slice(&body).unwrap();
        let leaked: Vec<&String> = echo["headers"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| k.replace('_', "-").starts_with("x-sessiongate-"))
            .collect();
        assert!(leaked.is_empty(), "{path}: {leaked:?}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_reloaded_key_signs_in_every_worker_while_the_old_one_still_verifies() {
    let upstream = TestUpstream::start().await;
    let keys = tempfile::tempdir().unwrap();
    let key_file = write_key(keys.path(), "assertion.pem");
    let gw = GatewayUnderTest::start_with(spec(&upstream, Some(&key_file)), |text| {
        text.replacen("[server]\n", "[server]\nworker_threads = 2\n", 1)
    })
    .await;
    let token = login_with(&gw, "carol", r#"{"role":"ops"}"#).await;
    let echo = echo_of(gw.get("/app/echo", Some(&token)).await).await;
    let before = seen(&echo, "x-sessiongate-assertion").unwrap().to_string();
    let old_kid = kid_of(&before);
    let jwks = fetch_jwks(&gw).await;
    assert_eq!(jwks.keys.len(), 1);
    assert!(verify(&before, &jwks, "/app/").is_ok());

    let admin = |path: &str| {
        gw.client
            .post(gw.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };
    // The same file again changes nothing.
    let resp = admin("/v1/keys/reload").await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["changed"], false);
    assert_eq!(body["signing_kid"], old_kid.as_str());

    // A new key in the file, then a reload.
    let new_key = write_key(keys.path(), "next.pem");
    std::fs::rename(&new_key, &key_file).unwrap();
    let resp = admin("/v1/keys/reload").await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["changed"], true);
    let new_kid = body["signing_kid"].as_str().unwrap().to_string();
    assert_ne!(new_kid, old_kid);

    // Every worker signs with the new key: requests on fresh connections
    // (spread over the workers' listeners by the kernel).
    let jwks = fetch_jwks(&gw).await;
    let kids: Vec<String> = jwks
        .keys
        .iter()
        .filter_map(|k| k.common.key_id.clone())
        .collect();
    assert_eq!(kids, vec![new_kid.clone(), old_kid.clone()]);
    for _ in 0..12 {
        let request = format!(
            "GET /app/echo HTTP/1.1\r\nhost: gw\r\ncookie: {}\r\nconnection: close\r\n\r\n",
            cookie(&token)
        );
        let (status, _, body) = raw_http(gw.addr, &request).await;
        assert_eq!(status, 200);
        let echo: Value = serde_json::from_slice(&body).unwrap();
        let assertion = seen(&echo, "x-sessiongate-assertion").unwrap();
        assert_eq!(kid_of(assertion), new_kid);
        assert_eq!(verify(assertion, &jwks, "/app/").unwrap()["sub"], "carol");
    }
    // The assertion signed before the reload still verifies.
    assert_eq!(verify(&before, &jwks, "/app/").unwrap()["sub"], "carol");

    // A broken file: 422, and the key in service stays.
    std::fs::write(&key_file, "not a key").unwrap();
    let resp = admin("/v1/keys/reload").await.unwrap();
    let error = expect_error(resp, 422).await;
    assert!(
        error["message"].as_str().unwrap().contains("key_file"),
        "{error}"
    );
    let resp = gw
        .client
        .get(gw.admin_url("/v1/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["signing_kid"], new_kid.as_str());
    // The admin token is needed.
    let resp = gw
        .client
        .post(gw.admin_url("/v1/keys/reload"))
        .send()
        .await
        .unwrap();
    expect_error(resp, 401).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_generated_key_is_kept_in_the_store_across_restarts() {
    let upstream = TestUpstream::start().await;
    let gw = GatewayUnderTest::start(spec(&upstream, None)).await;
    let token = login_with(&gw, "dave", "{}").await;
    let echo = echo_of(gw.get("/app/echo", Some(&token)).await).await;
    let before = seen(&echo, "x-sessiongate-assertion").unwrap().to_string();
    // A generated key cannot be reloaded: there is no file.
    let resp = gw
        .client
        .post(gw.admin_url("/v1/keys/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    expect_error(resp, 422).await;

    let gw = gw.restart().await;
    let jwks = fetch_jwks(&gw).await;
    assert_eq!(verify(&before, &jwks, "/app/").unwrap()["sub"], "dave");
    let echo = echo_of(gw.get("/app/echo", Some(&token)).await).await;
    let after = seen(&echo, "x-sessiongate-assertion").unwrap();
    assert_eq!(kid_of(after), kid_of(&before));
    gw.shutdown().await;
}

#[tokio::test]
async fn without_the_assertion_table_nothing_changes() {
    let upstream = TestUpstream::start().await;
    let gw =
        GatewayUnderTest::start(GatewaySpec::standard(&upstream.url()).cookie_secure(false)).await;
    let token = gw.login("erin").await;
    let echo = echo_of(gw.get("/echo", Some(&token)).await).await;
    assert!(seen(&echo, "x-sessiongate-assertion").is_none());
    // The path is an ordinary one, routed (here to the upstream's echo).
    let hits = upstream.hits();
    let resp = gw
        .get("/.well-known/sessiongate/jwks.json", Some(&token))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.hits(), hits + 1);
    let resp = gw
        .client
        .get(gw.admin_url("/v1/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    expect_error(resp, 404).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn forward_auth_answers_carry_the_same_assertion_and_attributes() {
    let upstream = TestUpstream::start().await;
    let mut spec = spec(&upstream, None);
    spec.extra
        .push_str("\n[forward_auth]\nlisten = \"127.0.0.1:0\"\n");
    let gw = GatewayUnderTest::start(spec).await;
    let fa = gw
        .forward_auth_addr()
        .expect("[forward_auth] is configured");
    let token = login_with(&gw, "frank", r#"{"role":"auditor"}"#).await;
    let jwks = fetch_jwks(&gw).await;
    let sub_request = |uri: &str, cookie_header: Option<String>| {
        let cookie_header = cookie_header
            .map(|c| format!("cookie: {c}\r\n"))
            .unwrap_or_default();
        format!(
            "GET /.sessiongate/auth HTTP/1.1\r\nhost: app.example\r\n\
             x-original-uri: {uri}\r\nx-original-method: GET\r\n{cookie_header}\
             x-sessiongate-assertion: forged\r\nconnection: close\r\n\r\n"
        )
    };
    let value = |headers: &[(String, String)], name: &str| {
        headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };

    let (status, headers, _) = raw_http(fa, &sub_request("/app/x", Some(cookie(&token)))).await;
    assert_eq!(status, 200);
    let assertion = value(&headers, "x-sessiongate-assertion");
    assert_eq!(assertion.len(), 1, "{headers:?}");
    let claims = verify(&assertion[0], &jwks, "/app/").expect("verifies");
    assert_eq!(claims["sub"], "frank");
    assert_eq!(value(&headers, "x-sessiongate-attr-role"), ["auditor"]);
    // Present and empty when the session lacks it: copied, it overwrites
    // a client's own.
    assert_eq!(value(&headers, "x-sessiongate-attr-tenant-id"), [""]);

    // No session on an optional route: the assertion header is there,
    // empty.
    let (status, headers, _) = raw_http(fa, &sub_request("/opt/x", None)).await;
    assert_eq!(status, 200);
    assert_eq!(value(&headers, "x-sessiongate-assertion"), [""]);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_config_reload_keeps_the_signer_and_refuses_assertion_changes() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let db = format!("sqlite://{}/sg.db", dir.path().display());
    let make = |audience: &str, ttl: i64| {
        spec(&upstream, None)
            .to_toml(&db, "127.0.0.1:0", "127.0.0.1:0")
            .replacen("[server]\n", "[server]\nworker_threads = 2\n", 1)
            .replace("https://api.example", audience)
            .replace(
                &format!("ttl_seconds = {TTL}"),
                &format!("ttl_seconds = {ttl}"),
            )
    };
    std::fs::write(&path, make("https://api.example", TTL)).unwrap();
    let running = sessiongate::server::start(Config::load(&path).unwrap())
        .await
        .expect("start");
    let base = format!("http://{}", running.addr());
    let admin = format!("http://{}", running.admin_addr().unwrap());
    let client = client();
    let resp = client
        .get(format!("{base}/public/login?user=gina"))
        .send()
        .await
        .unwrap();
    let token = set_cookie(resp.headers(), COOKIE).unwrap().value;
    let assertion_at = |path: &'static str| {
        let req = client
            .get(format!("{base}{path}"))
            .header("cookie", cookie(&token));
        async move {
            let echo = echo_of(req.send().await.unwrap()).await;
            seen(&echo, "x-sessiongate-assertion").unwrap().to_string()
        }
    };
    let before = assertion_at("/aud/echo").await;
    let reload = || {
        client
            .post(format!("{admin}/v1/config/reload"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };

    // A route's audience reloads; the signer and its key stay.
    std::fs::write(&path, make("https://api2.example", TTL)).unwrap();
    let resp = reload().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let jwks: JwkSet = client
        .get(format!("{base}/.well-known/sessiongate/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for _ in 0..6 {
        let after = assertion_at("/aud/echo").await;
        assert_eq!(kid_of(&after), kid_of(&before));
        assert_eq!(
            verify(&after, &jwks, "https://api2.example").unwrap()["sub"],
            "gina"
        );
    }
    assert!(verify(&before, &jwks, "https://api.example").is_ok());

    // The assertion settings themselves need a restart.
    std::fs::write(&path, make("https://api2.example", TTL + 1)).unwrap();
    let resp = reload().await.unwrap();
    let error = expect_error(resp, 422).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("session.assertion"),
        "{error}"
    );
    let still = assertion_at("/app/echo").await;
    let claims = verify(&still, &jwks, "/app/").unwrap();
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        TTL
    );
    running.shutdown().await;
}

fn config_problems(extra: &str) -> String {
    let text = format!(
        "[store]\ndatabase_url = \"sqlite://x.db\"\n\
         [[upstreams]]\nname = \"app\"\nurls = [\"http://127.0.0.1:1\"]\n\
         [[routes]]\nprefix = \"/\"\nupstream = \"app\"\n{extra}"
    );
    match Config::from_toml_str(&text) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_assertion_settings_are_refused_naming_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let open = write_key(dir.path(), "open.pem");
    chmod(&open, 0o644);
    let good = write_key(dir.path(), "good.pem");
    let table = |body: &str| format!("[session.assertion]\nenabled = true\n{body}\n");
    let path = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap();

    assert_eq!(
        config_problems(&table(&format!("key_file = {}", path(&good)))),
        ""
    );
    let cases = [
        (
            table(&format!("key_file = {}", path(&open))),
            "session.assertion.key_file",
            "chmod 600",
        ),
        (
            table(&format!(
                "key_file = {}",
                path(&dir.path().join("none.pem"))
            )),
            "session.assertion.key_file",
            "cannot read",
        ),
        (
            table("header = \"x-assertion\""),
            "session.assertion.header",
            "x-sessiongate-",
        ),
        (
            table("header = \"x-sessiongate-attr-x\""),
            "session.assertion.header",
            "x-sessiongate-",
        ),
        (
            table("ttl_seconds = 0"),
            "session.assertion.ttl_seconds",
            "between",
        ),
        (
            table("claims = [\"sub\"]"),
            "session.assertion.claims[0]",
            "sets itself",
        ),
        (
            table("claims = [\"a b\"]"),
            "session.assertion.claims[0]",
            "letters",
        ),
        (
            table("colour = 1"),
            "session.assertion.colour",
            "unknown key",
        ),
    ];
    for (extra, key, message) in cases {
        let problems = config_problems(&extra);
        assert!(
            problems.contains(key) && problems.contains(message),
            "{extra}: {problems}"
        );
    }
    // Route keys: the list must make lowercase header names.
    let route = |body: &str| format!("[[routes]]\nprefix = \"/x/\"\nupstream = \"app\"\n{body}\n");
    assert_eq!(
        config_problems(&route(
            "forward_attributes = [\"role\", \"tenant-id\"]\naudience = \"api\""
        )),
        ""
    );
    for bad in ["\"Role\"", "\"a_b\"", "\"\"", "\"a:b\""] {
        let problems = config_problems(&route(&format!("forward_attributes = [{bad}]")));
        assert!(
            problems.contains("routes[1].forward_attributes[0]"),
            "{bad}: {problems}"
        );
    }
    let problems = config_problems(&route("forward_attributes = [\"a\", \"a\"]"));
    assert!(problems.contains("twice"), "{problems}");
    let problems = config_problems(&route("audience = \"\""));
    assert!(problems.contains("routes[1].audience"), "{problems}");
    // Off unless enabled, and then its key file is not read.
    assert_eq!(
        config_problems("[session.assertion]\nkey_file = \"/nonexistent.pem\"\n"),
        ""
    );
}
