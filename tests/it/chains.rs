//! Per-route policy chains (`[[chains.<name>]]`, `routes[].policies`)
//! with real plugins over real sockets: each route's requests and logins
//! run that route's chain, the admin API shows every chain, and a reload
//! swaps every chain or none.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use sessiongate::config::Config;

use crate::harness::{self, ADMIN_TOKEN, GatewaySpec, TestUpstream};
use crate::policies::{bundled, testing};

/// One plugin entry of a chain: `[[policies]]` for `None`, else
/// `[[chains.<name>]]`.
fn entry(chain: Option<&str>, path: &str, config: &str) -> String {
    let table = match chain {
        None => "policies".to_string(),
        Some(name) => format!("chains.{name}"),
    };
    format!("\n[[{table}]]\nplugin = {path:?}\nconfig = {config}\n")
}

/// The standard routes plus `/admin/` (required) and `/adminpub/` (no
/// auth: logins) on the `admin` chain, then `chains`.
fn config_text(upstream: &TestUpstream, dir: &Path, chains: &str) -> String {
    let db = format!("sqlite://{}/sg.db", dir.display());
    let text = GatewaySpec::new()
        .upstream("app", &[&upstream.url()])
        .route("/public/", "app", "none")
        .route("/adminpub/", "app", "none")
        .route("/admin/", "app", "required")
        .route("/", "app", "required")
        .cookie_secure(false)
        .to_toml(&db, "127.0.0.1:0", "127.0.0.1:0");
    let text = on_chain(&text, "/admin/", "admin");
    let text = on_chain(&text, "/adminpub/", "admin");
    format!("{text}\n{chains}")
}

/// `text` with the route of `prefix` on chain `chain`.
fn on_chain(text: &str, prefix: &str, chain: &str) -> String {
    let line = format!("prefix = {prefix:?}\n");
    assert!(text.contains(&line), "no route {prefix} in\n{text}");
    text.replacen(&line, &format!("{line}policies = {chain:?}\n"), 1)
}

async fn start(dir: &Path, text: &str) -> sessiongate::server::RunningGateway {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"));
    sessiongate::server::start(config).await.expect("start")
}

struct Client {
    base: String,
    admin: String,
    http: reqwest::Client,
}

impl Client {
    fn of(running: &sessiongate::server::RunningGateway) -> Client {
        Client {
            base: format!("http://{}", running.addr()),
            admin: format!("http://{}", running.admin_addr().unwrap()),
            http: harness::client(),
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.header("cookie", harness::cookie(token));
        }
        req.send().await.unwrap()
    }

    /// Logs `user` in through `route` (an `auth = "none"` prefix):
    /// the response and the session token.
    async fn login(&self, route: &str, user: &str) -> (reqwest::Response, String) {
        let resp = self.get(&format!("{route}login?user={user}"), None).await;
        assert_eq!(resp.status(), 200, "login through {route}");
        let token = harness::set_cookie(resp.headers(), harness::COOKIE)
            .expect("session cookie")
            .value;
        (resp, token)
    }

    async fn admin_get(&self, path: &str) -> Value {
        let resp = self
            .http
            .get(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "GET {path}");
        resp.json().await.unwrap()
    }

    async fn reload(&self) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/policies/reload", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
    }

    async fn sessions(&self, user: &str) -> Vec<Value> {
        self.admin_get(&format!("/v1/users/{user}/sessions"))
            .await
            .get("sessions")
            .and_then(Value::as_array)
            .cloned()
            .expect("sessions")
    }
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

fn millis(rfc3339: &Value) -> i64 {
    let t = humantime::parse_rfc3339(rfc3339.as_str().expect("time string")).expect("RFC 3339");
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn lifetime_ms(session: &Value) -> i64 {
    millis(&session["expires_at"]) - millis(&session["created_at"])
}

/// The plugin file names of a chain in a `GET /v1/policies` answer.
fn plugin_names(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("a list of plugins")
        .iter()
        .map(|p| {
            Path::new(p["plugin"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_runs_its_own_chain_for_requests_and_logins() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let chains = [
        entry(None, &bundled("ttl"), "{ ttl_seconds = 120 }"),
        entry(None, &testing("tag"), r#"{ value = "default" }"#),
        // The same ttl file in another chain, with its own config.
        entry(Some("admin"), &bundled("ttl"), "{ ttl_seconds = 600 }"),
        entry(Some("admin"), &testing("tag"), r#"{ value = "admin" }"#),
        entry(
            Some("admin"),
            &testing("deny"),
            r#"{ status = 403, reason = "admins only" }"#,
        ),
    ]
    .concat();
    let running = start(dir.path(), &config_text(&upstream, dir.path(), &chains)).await;
    let c = Client::of(&running);

    // A login through a default-chain route runs the default create hooks.
    let (resp, alice) = c.login("/public/", "alice").await;
    let age = max_age(&resp);
    assert!((119..=120).contains(&age), "default chain Max-Age {age}");
    let s = &c.sessions("alice").await[0];
    assert_eq!(lifetime_ms(s), 120_000);
    assert_eq!(s["attributes"]["chain"], "default", "{s}");

    // A login through an admin-chain route runs the admin chain's.
    let (resp, bob) = c.login("/adminpub/", "bob").await;
    let age = max_age(&resp);
    assert!((599..=600).contains(&age), "admin chain Max-Age {age}");
    let s = &c.sessions("bob").await[0];
    assert_eq!(lifetime_ms(s), 600_000);
    assert_eq!(s["attributes"]["chain"], "admin", "{s}");

    // Access: the default chain allows, the admin chain denies, whoever
    // logged the session in.
    for token in [&alice, &bob] {
        let resp = c.get("/app/x", Some(token)).await;
        assert_eq!(resp.status(), 200);
        let echo: Value = resp.json().await.unwrap();
        assert_eq!(echo["path"], "/app/x");
        let err = harness::expect_error(c.get("/admin/x", Some(token)).await, 403).await;
        assert_eq!(err["code"], "policy_denied");
        assert!(
            err["message"].as_str().unwrap().contains("admins only"),
            "{err}"
        );
    }
    // The chain follows the route of the normalized path: no spelling of
    // an admin path reaches the upstream through the default chain.
    let hits = upstream.hits();
    for path in [
        "/app/../admin/x",
        "/public/../admin/x",
        "/admin/./x",
        "//admin/x",
        "/admin//x",
        "/%61dmin/x",
    ] {
        let resp = c.get(path, Some(&alice)).await;
        assert!(
            resp.status() == 403 || resp.status() == 400,
            "{path}: {}",
            resp.status()
        );
    }
    assert_eq!(upstream.hits(), hits, "an admin path reached the upstream");

    // An admin-created session runs the default chain.
    let resp = c
        .http
        .post(format!("{}/v1/sessions", c.admin))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({ "user_id": "carol" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    assert_eq!(lifetime_ms(&created), 120_000);
    assert_eq!(created["attributes"]["chain"], "default", "{created}");

    // GET /v1/policies: the default chain as `policies` (the contract),
    // every chain under `chains`.
    let list = c.admin_get("/v1/policies").await;
    assert_eq!(plugin_names(&list["policies"]), ["ttl.wasm", "tag.wasm"]);
    assert_eq!(list["chains"]["default"], list["policies"]);
    assert_eq!(
        plugin_names(&list["chains"]["admin"]),
        ["ttl.wasm", "tag.wasm", "deny.wasm"]
    );
    assert_eq!(list["chains"].as_object().unwrap().len(), 2, "{list}");
    assert_eq!(
        list["chains"]["admin"][2]["hooks"],
        serde_json::json!(["access"])
    );

    // One plugin file in two chains counts in two series.
    let metrics = c
        .http
        .get(format!("{}/metrics", c.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (chain, n) in [("default", 2), ("admin", 1)] {
        let line = format!(
            "sessiongate_policy_calls_total{{plugin=\"ttl\",hook=\"create\",outcome=\"allow\",chain=\"{chain}\"}} {n}"
        );
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    let line = r#"sessiongate_policy_calls_total{plugin="deny",hook="access",outcome="deny",chain="admin"} "#;
    assert!(metrics.contains(line), "{line} in\n{metrics}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_runs_the_chain_of_the_original_requests_route() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let chains = format!(
        "{}\n[forward_auth]\nlisten = \"127.0.0.1:0\"\n",
        entry(
            Some("admin"),
            &testing("deny"),
            r#"{ status = 403, reason = "admins only" }"#,
        )
    );
    let running = start(dir.path(), &config_text(&upstream, dir.path(), &chains)).await;
    let c = Client::of(&running);
    let fa = running.forward_auth_addr().expect("[forward_auth]");
    let (_, token) = c.login("/public/", "alice").await;
    let ask = |uri: &'static str| {
        c.http
            .get(format!("http://{fa}/.sessiongate/auth"))
            .header("cookie", harness::cookie(&token))
            .header("x-original-uri", uri)
            .header("x-original-method", "GET")
            .send()
    };
    let resp = ask("/app/x").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-user-id"], "alice");
    for uri in ["/admin/x", "/app/../admin/x"] {
        let resp = ask(uri).await.unwrap();
        assert_eq!(resp.status(), 403, "{uri}");
        assert!(resp.headers().get("x-user-id").is_none_or(|v| v.is_empty()));
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_every_chain_or_none() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let write = |chains: &str| {
        std::fs::write(
            dir.path().join("gateway.toml"),
            config_text(&upstream, dir.path(), chains),
        )
        .unwrap();
    };
    let v1 = [
        entry(None, &testing("tag"), r#"{ value = "d1" }"#),
        entry(Some("admin"), &testing("tag"), r#"{ value = "a1" }"#),
    ]
    .concat();
    let running = start(dir.path(), &config_text(&upstream, dir.path(), &v1)).await;
    let c = Client::of(&running);
    let (_, token) = c.login("/public/", "alice").await;
    let before = c.admin_get("/v1/policies").await;
    assert_eq!(plugin_names(&before["chains"]["admin"]), ["tag.wasm"]);

    // The default chain's change is good, the admin chain's plugin is
    // broken: neither is swapped in.
    let broken = dir.path().join("broken.wasm");
    std::fs::write(&broken, b"\0asm\x01\0\0\0\x01\x02").unwrap();
    write(
        &[
            entry(None, &testing("deny"), r#"{ status = 418 }"#),
            entry(Some("admin"), &broken.display().to_string(), "{}"),
        ]
        .concat(),
    );
    let err = harness::expect_error(c.reload().await, 422).await;
    assert_eq!(err["code"], "reload_failed");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("chain \"admin\"") && message.contains("broken.wasm"),
        "{err}"
    );
    assert_eq!(c.admin_get("/v1/policies").await, before, "old chains stay");
    assert_eq!(c.get("/app/x", Some(&token)).await.status(), 200);
    assert_eq!(c.get("/admin/x", Some(&token)).await.status(), 200);

    // A reload of the chains alone cannot drop a chain a running route
    // uses: routes are not reloaded with it.
    write(&entry(None, &testing("tag"), r#"{ value = "d1" }"#));
    let err = harness::expect_error(c.reload().await, 422).await;
    assert!(
        err["message"].as_str().unwrap().contains("\"admin\""),
        "{err}"
    );
    assert_eq!(c.admin_get("/v1/policies").await, before);

    // Both good: both swap at once.
    write(
        &[
            entry(None, &testing("deny"), r#"{ status = 418, reason = "d2" }"#),
            entry(
                Some("admin"),
                &testing("deny"),
                r#"{ status = 403, reason = "a2" }"#,
            ),
        ]
        .concat(),
    );
    let resp = c.reload().await;
    assert_eq!(resp.status(), 200);
    let after: Value = resp.json().await.unwrap();
    assert_eq!(plugin_names(&after["policies"]), ["deny.wasm"]);
    assert_eq!(plugin_names(&after["chains"]["admin"]), ["deny.wasm"]);
    assert_eq!(after, c.admin_get("/v1/policies").await);
    let err = harness::expect_error(c.get("/app/x", Some(&token)).await, 418).await;
    assert!(err["message"].as_str().unwrap().contains("d2"), "{err}");
    let err = harness::expect_error(c.get("/admin/x", Some(&token)).await, 403).await;
    assert!(err["message"].as_str().unwrap().contains("a2"), "{err}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_reload_moves_routes_and_chains_together() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let v1 = entry(Some("admin"), &testing("deny"), r#"{ reason = "v1" }"#);
    let running = start(dir.path(), &config_text(&upstream, dir.path(), &v1)).await;
    let c = Client::of(&running);
    let (_, token) = c.login("/public/", "alice").await;
    assert_eq!(c.get("/admin/x", Some(&token)).await.status(), 403);
    let config_reload = || {
        c.http
            .post(format!("{}/v1/config/reload", c.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };

    // A new chain, and the default route moved onto it.
    let text = on_chain(
        &config_text(
            &upstream,
            dir.path(),
            &[
                v1.clone(),
                entry(Some("apps"), &testing("deny"), "{ status = 451 }"),
            ]
            .concat(),
        ),
        "/",
        "apps",
    );
    std::fs::write(&path, text).unwrap();
    let resp = config_reload().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let changed = body["changed"].to_string();
    assert!(
        changed.contains("chains: added apps") && changed.contains("changed /"),
        "{body}"
    );
    assert_eq!(c.get("/app/x", Some(&token)).await.status(), 451);
    assert_eq!(c.get("/admin/x", Some(&token)).await.status(), 403);

    // The admin chain removed with the routes that named it: accepted
    // (the routes go with it), and those routes now run the default chain.
    let text = on_chain(
        &config_text(
            &upstream,
            dir.path(),
            &entry(Some("apps"), &testing("deny"), "{ status = 451 }"),
        ),
        "/",
        "apps",
    )
    .replace("policies = \"admin\"\n", "");
    std::fs::write(&path, text).unwrap();
    let resp = config_reload().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    assert_eq!(c.get("/admin/x", Some(&token)).await.status(), 200);
    let list = c.admin_get("/v1/policies").await;
    assert!(list["chains"].get("admin").is_none(), "{list}");

    // A broken chain refuses the whole config: routes and chains stay.
    let broken = dir.path().join("broken.wasm");
    std::fs::write(&broken, b"not wasm").unwrap();
    let text = config_text(
        &upstream,
        dir.path(),
        &entry(Some("admin"), &broken.display().to_string(), "{}"),
    );
    std::fs::write(&path, text).unwrap();
    let err = harness::expect_error(config_reload().await.unwrap(), 422).await;
    assert!(
        err["message"].as_str().unwrap().contains("chain \"admin\""),
        "{err}"
    );
    assert_eq!(c.get("/app/x", Some(&token)).await.status(), 451);
    assert_eq!(c.admin_get("/v1/policies").await, list);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_from_swaps_in_the_chains_of_a_parsed_config() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let v1 = entry(Some("admin"), &testing("tag"), r#"{ value = "a1" }"#);
    let running = start(dir.path(), &config_text(&upstream, dir.path(), &v1)).await;
    let c = Client::of(&running);
    let (_, token) = c.login("/public/", "alice").await;
    let policies = running.gateway().policies().clone();

    let broken = dir.path().join("broken.wasm");
    std::fs::write(&broken, b"not wasm").unwrap();
    let parse = |chains: &str| {
        Config::from_toml_str(&config_text(&upstream, dir.path(), chains)).expect("config")
    };
    let bad = parse(
        &[
            entry(Some("admin"), &testing("deny"), "{}"),
            entry(Some("other"), &broken.display().to_string(), "{}"),
        ]
        .concat(),
    );
    let err = policies.reload_from(&bad).await.unwrap_err().to_string();
    assert!(
        err.contains("chain \"other\"") && err.contains("broken.wasm"),
        "{err}"
    );
    assert_eq!(c.get("/admin/x", Some(&token)).await.status(), 200);

    let good = parse(
        &[
            entry(Some("admin"), &testing("deny"), "{ status = 451 }"),
            entry(Some("other"), &testing("tag"), r#"{ value = "o" }"#),
        ]
        .concat(),
    );
    // Prepared (for a caller that swaps more with it) is not yet served.
    let prepared = policies.prepare(&good).await.expect("prepare");
    assert_eq!(prepared.info().chains.len(), 3);
    assert_eq!(c.get("/admin/x", Some(&token)).await.status(), 200);
    drop(prepared);
    let info = policies.reload_from(&good).await.expect("reload_from");
    assert_eq!(
        info.chains.keys().map(String::as_str).collect::<Vec<_>>(),
        ["admin", "default", "other"]
    );
    assert_eq!(c.get("/admin/x", Some(&token)).await.status(), 451);
    assert_eq!(c.get("/app/x", Some(&token)).await.status(), 200);
    let list = c.admin_get("/v1/policies").await;
    assert_eq!(plugin_names(&list["chains"]["other"]), ["tag.wasm"]);
    assert_eq!(list["policies"], serde_json::json!([]));

    // Chains swapped ahead of routes that still name a chain now gone (a
    // config reload's window): that route's requests and logins are
    // refused, never run on another chain.
    let text = config_text(&upstream, dir.path(), "").replace("policies = \"admin\"\n", "");
    let without = Config::from_toml_str(&text).expect("config");
    policies.reload_from(&without).await.expect("reload_from");
    let err = harness::expect_error(c.get("/admin/x", Some(&token)).await, 503).await;
    assert_eq!(err["code"], "policy_failed");
    let resp = c.get("/adminpub/login?user=bob", None).await;
    assert_eq!(resp.status(), 503);
    assert!(harness::set_cookie(resp.headers(), harness::COOKIE).is_none());
    assert_eq!(c.get("/app/x", Some(&token)).await.status(), 200);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watcher_covers_every_chains_plugins() {
    let upstream = TestUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("admin-policy.wasm");
    std::fs::copy(testing("deny"), &plugin).unwrap();
    let chains = format!(
        "{}\n[plugins]\nwatch = true\nwatch_interval_ms = 100\n",
        entry(Some("admin"), &plugin.display().to_string(), "{}")
    );
    let running = start(dir.path(), &config_text(&upstream, dir.path(), &chains)).await;
    let c = Client::of(&running);
    let sha = |v: &Value| v["chains"]["admin"][0]["sha256"].clone();
    let before = sha(&c.admin_get("/v1/policies").await);
    std::fs::copy(testing("crash-every"), &plugin).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sha(&c.admin_get("/v1/policies").await) == before {
        assert!(Instant::now() < deadline, "the watcher never reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown().await;
}

#[test]
fn check_names_the_route_and_key_of_an_unknown_chain_and_compiles_every_chain() {
    let upstream_url = "http://127.0.0.1:9";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let base = format!(
        "[store]\ndatabase_url = \"sqlite://{}/sg.db\"\n\n[[upstreams]]\nname = \"app\"\nurls = [{upstream_url:?}]\n\n[[routes]]\nprefix = \"/\"\nupstream = \"app\"\n\n[[routes]]\nprefix = \"/admin/\"\nupstream = \"app\"\n",
        dir.path().display()
    );
    let check = |extra: &str| {
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_sessiongate"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // A route naming a chain that does not exist.
    let (code, _, stderr) = check(&format!(
        "policies = \"nope\"\n{}",
        entry(Some("admin"), &testing("tag"), r#"{ value = "a" }"#)
    ));
    assert_eq!(code, Some(1), "{stderr}");
    for part in [
        "gateway.toml",
        "routes[1].policies",
        "\"/admin/\"",
        "\"nope\"",
        "\"admin\"",
    ] {
        assert!(stderr.contains(part), "{part:?} not in {stderr}");
    }

    // Names a chain may not have.
    for name in ["default", "Admin", "a.b", &"x".repeat(65)] {
        let (code, _, stderr) = check(&entry(Some(&format!("{name:?}")), &testing("deny"), "{}"));
        assert_eq!(code, Some(1), "{name}: {stderr}");
        assert!(stderr.contains("chains"), "{name}: {stderr}");
    }

    // Every chain's plugins are compiled and initialized: a bad one in a
    // named chain is reported with its chain's key.
    let (code, _, stderr) = check(&format!(
        "policies = \"admin\"\n{}",
        entry(Some("admin"), &testing("init-fails"), "{ other = 1 }")
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("chains.admin") && stderr.contains("init-fails.wasm"),
        "{stderr}"
    );

    // An unknown key in a chain entry names the entry.
    let (code, _, stderr) = check(&format!(
        "{}tiemout_ms = 5\n",
        entry(Some("admin"), &testing("deny"), "{}")
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("chains.admin[0].tiemout_ms"), "{stderr}");

    // All good, including `policies = "default"` spelled out.
    let (code, stdout, stderr) = check(&format!(
        "policies = \"admin\"\n\n[[routes]]\nprefix = \"/x/\"\nupstream = \"app\"\npolicies = \"default\"\n{}",
        entry(Some("admin"), &testing("deny"), "{}")
    ));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), "ok");
}
