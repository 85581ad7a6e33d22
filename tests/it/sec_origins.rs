//! The security regression suite against real origins (issue 9): the
//! attacks of the issue replayed over real sockets against Debian's nginx
//! and Hypercorn (h2c), both installed by scripts/services.sh and started
//! here on loopback ports; and the secrets at rest (the SQLite files'
//! modes, the start-up warning).
//!
//! Every attack test has a positive control, so that it cannot pass
//! vacuously: sent straight to the origin (not through the gateway) the
//! same bytes DO reach the protected content, and through the gateway with
//! a valid session the protected content IS served.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

// ---------------------------------------------------------------------------
// Secrets at rest (finding 7)
// ---------------------------------------------------------------------------

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn the_sqlite_files_are_created_owner_only() {
    let upstream = TestUpstream::start().await;
    let gw = GatewayUnderTest::start(GatewaySpec::standard(&upstream.url())).await;
    // A write and a read, so that SQLite has made its -wal and -shm files.
    let token = gw.login("alice").await;
    assert_eq!(gw.get("/me", Some(&token)).await.status(), 200);
    for name in ["sg.db", "sg.db-wal", "sg.db-shm"] {
        let path = gw.dir.path().join(name);
        assert!(path.exists(), "{name} exists while the gateway runs");
        assert_eq!(
            mode(&path),
            0o600,
            "{name} holds the token MAC key and the sessions: owner-only"
        );
    }
}

const BIN: &str = env!("CARGO_BIN_EXE_sessiongate");

fn serve_config(db: &Path) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[store]
database_url = "sqlite://{}"

[[upstreams]]
name = "app"
urls = ["http://127.0.0.1:9"]

[[routes]]
prefix = "/"
upstream = "app"
auth = "required"
"#,
        db.display()
    )
}

/// Runs `sessiongate serve` on `config` and returns what it logged up to
/// and including "sessiongate is serving"; then stops it (by pid).
async fn startup_log(config: &Path, env: &[(&str, &str)]) -> String {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("serve").arg("--config").arg(config);
    for (name, _) in std::env::vars() {
        if name.starts_with("SESSIONGATE_") {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("RUST_LOG").env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run sessiongate serve");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let read = async {
        let mut out = tokio::io::BufReader::new(stdout).lines();
        let mut err = tokio::io::BufReader::new(stderr).lines();
        let mut log = String::new();
        loop {
            let line = tokio::select! {
                l = out.next_line() => l,
                l = err.next_line() => l,
            };
            match line {
                Ok(Some(line)) => {
                    log.push_str(&line);
                    log.push('\n');
                    if line.contains("sessiongate is serving") {
                        return log;
                    }
                }
                _ => panic!("sessiongate exited before serving:\n{log}"),
            }
        }
    };
    let log = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("sessiongate serving within 30 s");
    child.start_kill().expect("stop sessiongate");
    let _ = child.wait().await;
    log
}

const READABLE_WARNING: &str = "other users can read";

#[tokio::test]
async fn start_warns_when_the_token_key_file_is_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sg.db");
    // A database made before this release (or by a careless umask).
    std::fs::write(&db, b"").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, serve_config(&db)).unwrap();

    let log = startup_log(&config, &[]).await;
    let warning = log
        .lines()
        .find(|l| l.contains(READABLE_WARNING))
        .unwrap_or_else(|| panic!("no warning about the readable key file:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains(&db.display().to_string()),
        "names the file: {warning}"
    );
    assert!(warning.contains("0644"), "gives the mode: {warning}");
    assert!(
        warning.contains("SESSIONGATE_SESSION__TOKEN_SECRET"),
        "says what to do: {warning}"
    );
    // The existing file keeps the operator's mode: the gateway only says.
    assert_eq!(mode(&db), 0o644);

    // With the key from the environment, the file holds no key: no warning.
    let secret = "an-environment-secret-of-at-least-32-characters";
    let log = startup_log(&config, &[("SESSIONGATE_SESSION__TOKEN_SECRET", secret)]).await;
    assert!(!log.contains(READABLE_WARNING), "{log}");
}

#[tokio::test]
async fn a_new_database_gives_no_warning() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sg.db");
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, serve_config(&db)).unwrap();
    let log = startup_log(&config, &[]).await;
    assert!(!log.contains(READABLE_WARNING), "{log}");
    assert_eq!(mode(&db), 0o600);
}

// ---------------------------------------------------------------------------
// Finding 1: auth bypass by path confusion, against nginx
// ---------------------------------------------------------------------------

/// With `/public/` public and `/` required: paths nginx serves as
/// `/secret` (or below it) while their text starts with `/public/`.
const ROOT_BYPASSES: &[&str] = &[
    "/public/../secret",
    "/public/%2e%2e/secret",
    "/public/%2E%2E/secret",
    "/public/.%2e/secret",
    "/public/..%2fsecret",
    "/public/..%2Fsecret",
    "/public/x/../../secret",
    "/public//../secret",
    "/public/./../secret",
    "/public/%2e%2e%2fsecret/data.txt",
];

/// With `/app/` required and `/` public: paths nginx serves below `/app/`
/// while their text does not start with `/app/`.
const APP_BYPASSES: &[&str] = &[
    "/%61pp/secret",
    "/%61%70%70/secret",
    "/app%2fsecret",
    "/app%2Fsecret",
    "//app/secret",
    "///app/secret",
    "/./app/secret",
    "/x/../app/secret",
];

fn origin_form(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
}

fn absolute_form(addr: SocketAddr, path: &str) -> String {
    format!("GET http://{addr}{path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
}

fn with_cookie(request: &str, token: &str) -> String {
    request.replacen("\r\n", &format!("\r\nCookie: {}\r\n", cookie(token)), 1)
}

/// A GET over cleartext HTTP/2 with prior knowledge, `path` sent as is.
async fn h2_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let exchange = async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2c handshake");
        tokio::spawn(conn);
        let mut req = hyper::Request::get(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .expect("h2 response");
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("h2 body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("h2 exchange within 10 s")
}

/// The gateway's answer to a bypass attempt: 401 (the normalized path is
/// protected) or 400 `invalid_path` (it cannot be read one way only), and
/// never the origin's protected content.
fn assert_refused(what: &str, status: u16, body: &str, marker: &str) {
    assert!(
        !body.contains(marker),
        "{what}: the protected content was served without a session: {status} {body}"
    );
    match status {
        401 => {}
        400 => {
            let v: Value = serde_json::from_str(body)
                .unwrap_or_else(|e| panic!("{what}: 400 body is not JSON ({e}): {body}"));
            assert_eq!(v["error"]["code"], "invalid_path", "{what}: {body}");
        }
        other => panic!("{what}: expected 401 or 400 invalid_path, got {other}: {body}"),
    }
}

async fn replay_path_bypasses(
    gw: &GatewayUnderTest,
    nginx: &NginxOrigin,
    paths: &[&str],
    marker: &str,
) {
    for path in paths {
        // Control: the origin itself serves the protected content for it.
        let (status, _, body) = raw_http(nginx.addr, &origin_form(path)).await;
        let body = String::from_utf8_lossy(&body);
        assert!(
            status == 200 && body.contains(marker),
            "control: nginx serves {marker} for {path} directly, got {status} {body}"
        );

        let (status, _, body) = raw_http(gw.addr, &origin_form(path)).await;
        assert_refused(
            &format!("origin-form {path}"),
            status,
            &String::from_utf8_lossy(&body),
            marker,
        );

        let (status, _, body) = raw_http(gw.addr, &absolute_form(gw.addr, path)).await;
        assert_refused(
            &format!("absolute-form {path}"),
            status,
            &String::from_utf8_lossy(&body),
            marker,
        );

        let (status, body) = h2_get(gw.addr, path, &[]).await;
        assert_refused(&format!("h2c {path}"), status, &body, marker);
    }
    // nginx's log shows no protected request that came from the gateway
    // (the gateway's requests carry x-forwarded-for; nginx logs only the
    // line, so the check above on what came back is the one that counts).
}

#[tokio::test]
async fn path_confusion_never_reaches_a_protected_nginx_location() {
    let nginx = NginxOrigin::start().await;
    let gw = GatewayUnderTest::start(
        GatewaySpec::new()
            .upstream("nginx", &[&nginx.url()])
            .route("/public/", "nginx", "none")
            .route("/", "nginx", "required"),
    )
    .await;
    replay_path_bypasses(&gw, &nginx, ROOT_BYPASSES, NGINX_SECRET).await;

    // Positive controls through the gateway: the public location is
    // served, and with a session the protected one is, under its plain
    // name and under a name that normalizes to it.
    let (status, _, body) = raw_http(gw.addr, &origin_form("/public/x")).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains(NGINX_PUBLIC));
    let token = gw.login("alice").await;
    for path in ["/secret", "/public/../secret", "/public//../secret"] {
        let (status, _, body) = raw_http(gw.addr, &with_cookie(&origin_form(path), &token)).await;
        let body = String::from_utf8_lossy(&body);
        assert!(
            status == 200 && body.contains(&format!("{NGINX_SECRET} uri=/secret")),
            "{path} with a session: {status} {body}"
        );
    }
    let (status, body) = h2_get(gw.addr, "/secret", &[("cookie", &cookie(&token))]).await;
    assert!(
        status == 200 && body.contains(NGINX_SECRET),
        "{status} {body}"
    );
}

#[tokio::test]
async fn path_confusion_never_reaches_a_protected_nginx_prefix() {
    let nginx = NginxOrigin::start().await;
    let gw = GatewayUnderTest::start(
        GatewaySpec::new()
            .upstream("nginx", &[&nginx.url()])
            .route("/app/", "nginx", "required")
            .route("/", "nginx", "none"),
    )
    .await;
    replay_path_bypasses(&gw, &nginx, APP_BYPASSES, NGINX_APP_SECRET).await;

    let token = gw.login("alice").await;
    for path in ["/app/secret", "//app/secret", "/%61pp/secret"] {
        let (status, _, body) = raw_http(gw.addr, &with_cookie(&origin_form(path), &token)).await;
        let body = String::from_utf8_lossy(&body);
        assert!(
            status == 200 && body.contains(&format!("{NGINX_APP_SECRET} uri=/app/secret")),
            "{path} with a session: {status} {body}"
        );
    }
}

// ---------------------------------------------------------------------------
// Finding 2: h2c smuggling, against Hypercorn
// ---------------------------------------------------------------------------

/// The HTTP2-Settings curl sends (base64url of an empty-ish SETTINGS).
const H2_SETTINGS: &str = "AAMAAABkAARAAAAAAAIAAAAA";

/// One HTTP/2 frame header + payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK block of literal fields without indexing, no Huffman (every
/// name and value shorter than 127 bytes).
fn hpack_literals(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127);
        out.push(0x00);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

struct Smuggle {
    /// The status of the answer to the upgrade request.
    status: u16,
    /// Whether an HTTP/2 response to the smuggled request came back.
    tunnel_answered: bool,
}

/// Sends `GET via` with `Upgrade: h2c` + `HTTP2-Settings`; then, on the
/// same connection, the HTTP/2 preface and a request for `/secret` carrying
/// `x-user-id: admin` on stream 3 (stream 1 is the upgraded request).
async fn h2c_smuggle(addr: SocketAddr, via: &str, token: Option<&str>) -> Smuggle {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let cookie_line = token.map_or(String::new(), |t| format!("Cookie: {}\r\n", cookie(t)));
        let upgrade = format!(
            "GET {via} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: {H2_SETTINGS}\r\nx-user-id: admin\r\n{cookie_line}\r\n"
        );
        s.write_all(upgrade.as_bytes())
            .await
            .expect("write upgrade");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.expect("read head") == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let status: u16 = String::from_utf8_lossy(&head)
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        // Whatever came back, the smuggled request goes out: a gateway that
        // bridged without showing the 101 must not pass it on either.
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(h2_frame(0x4, 0, 0, &[]));
        let block = hpack_literals(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/secret"),
            (":authority", &addr.to_string()),
            ("x-user-id", "admin"),
        ]);
        out.extend(h2_frame(0x1, 0x4 | 0x1, 3, &block));
        let _ = s.write_all(&out).await;
        let mut tunnel_answered = false;
        if status == 101 {
            // Frames until the HEADERS of stream 3 (or the end).
            let mut header = [0u8; 9];
            while s.read_exact(&mut header).await.is_ok() {
                let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                let stream =
                    u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                if s.read_exact(&mut payload).await.is_err() {
                    break;
                }
                if header[3] == 0x1 && stream == 3 {
                    tunnel_answered = true;
                    break;
                }
            }
        } else {
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        }
        Smuggle {
            status,
            tunnel_answered,
        }
    };
    tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .expect("smuggling exchange within 15 s")
}

fn h2c_gateway_spec(origin: &H2cOrigin) -> GatewaySpec {
    GatewaySpec::new()
        .upstream("h2c", &[&origin.url()])
        .route("/public/", "h2c", "none")
        .route("/", "h2c", "required")
}

#[tokio::test]
async fn h2c_upgrade_cannot_smuggle_a_request_past_the_gateway() {
    let origin = H2cOrigin::start().await;

    // Control: straight to Hypercorn, the smuggle works (101, then the
    // tunnelled /secret reaches the app as "admin").
    let direct = h2c_smuggle(origin.addr, "/public/x", None).await;
    assert_eq!(direct.status, 101, "control: Hypercorn accepts h2c");
    assert!(direct.tunnel_answered, "control: the tunnel answers");
    let smuggled = origin
        .wait_for_path("/secret")
        .await
        .expect("control: /secret reached Hypercorn through the tunnel");
    assert_eq!(
        origin_header(&smuggled, "x-user-id").as_deref(),
        Some("admin")
    );

    // Through the gateway, anonymous and logged in as a low-privilege user.
    let origin = H2cOrigin::start().await;
    let gw = GatewayUnderTest::start(h2c_gateway_spec(&origin)).await;
    let alice = gw.login("alice").await;
    for (via, token) in [("/public/x", None), ("/me", Some(alice.as_str()))] {
        let through = h2c_smuggle(gw.addr, via, token).await;
        assert_ne!(through.status, 101, "{via}: the gateway switched protocols");
        assert!(!through.tunnel_answered, "{via}: a tunnel answered");
        let upgraded = origin
            .wait_for_path(via)
            .await
            .unwrap_or_else(|| panic!("{via} reached the origin as a plain request"));
        assert_eq!(upgraded["http_version"], "1.1", "{upgraded}");
        for name in ["upgrade", "http2-settings"] {
            assert_eq!(
                origin_header(&upgraded, name),
                None,
                "{name} forwarded: {upgraded}"
            );
        }
        let user = origin_header(&upgraded, "x-user-id");
        assert_eq!(user.as_deref(), token.map(|_| "alice"), "{upgraded}");
    }
    assert!(
        origin.seen_path("/secret").is_empty(),
        "the smuggled /secret reached the origin: {:?}",
        origin.seen()
    );
}

/// The exact command of the issue.
#[tokio::test]
async fn curl_http2_cannot_smuggle_a_request_past_the_gateway() {
    let run = |urls: Vec<String>| {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["--http2", "-s", "--noproxy", "*", "--max-time", "10"])
            .args(["-o", "/dev/null", "-o", "/dev/null"])
            .args(["-w", "%{http_code} %{http_version}\\n"])
            .args(urls)
            .args(["-H", "x-user-id: admin"])
            .kill_on_drop(true);
        async move {
            let out = cmd
                .output()
                .await
                .expect("run curl (Debian's curl has HTTP/2)");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };

    // Control: straight to Hypercorn, curl upgrades and the second request
    // goes over HTTP/2.
    let origin = H2cOrigin::start().await;
    let direct = run(vec![
        format!("{}/public/x", origin.url()),
        format!("{}/secret", origin.url()),
    ])
    .await;
    assert_eq!(
        direct.lines().collect::<Vec<_>>(),
        ["200 2", "200 2"],
        "control"
    );
    origin
        .wait_for_path("/secret")
        .await
        .expect("control: /secret reached Hypercorn");

    let origin = H2cOrigin::start().await;
    let gw = GatewayUnderTest::start(h2c_gateway_spec(&origin)).await;
    let through = run(vec![gw.url("/public/x"), gw.url("/secret")]).await;
    assert_eq!(
        through.lines().collect::<Vec<_>>(),
        ["200 1.1", "401 1.1"],
        "curl through the gateway"
    );
    let public = origin
        .wait_for_path("/public/x")
        .await
        .expect("public request");
    assert_eq!(origin_header(&public, "x-user-id"), None, "{public}");
    assert!(
        origin.seen_path("/secret").is_empty(),
        "{:?}",
        origin.seen()
    );
}

// ---------------------------------------------------------------------------
// Finding 4: identity look-alike headers, against Hypercorn
// ---------------------------------------------------------------------------

fn lookalike_request(path: &str, token: Option<&str>) -> String {
    let cookie_line = token.map_or(String::new(), |t| format!("Cookie: {}\r\n", cookie(t)));
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         X_User_Id: admin\r\nx_session_id: forged\r\nX_SessionGate_Login: admin\r\n{cookie_line}\r\n"
    )
}

#[tokio::test]
async fn lookalike_identity_headers_never_reach_the_origin() {
    let origin = H2cOrigin::start().await;

    // Control: sent straight to the origin, a CGI/WSGI app reads the
    // look-alike as X-User-Id.
    let (status, _, _) = raw_http(origin.addr, &lookalike_request("/direct", None)).await;
    assert_eq!(status, 200);
    let direct = origin.wait_for_path("/direct").await.unwrap();
    assert_eq!(
        direct["environ"]["HTTP_X_USER_ID"], "admin",
        "control: {direct}"
    );

    let gw = GatewayUnderTest::start(h2c_gateway_spec(&origin)).await;
    let alice = gw.login("alice").await;
    for (path, token, user) in [
        ("/public/anonymous", None, None),
        ("/me", Some(alice.as_str()), Some("alice")),
    ] {
        let (status, _, body) = raw_http(gw.addr, &lookalike_request(path, token)).await;
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        let seen = origin.wait_for_path(path).await.unwrap();
        let environ = &seen["environ"];
        assert_eq!(environ["HTTP_X_USER_ID"].as_str(), user, "{path}: {seen}");
        assert_eq!(
            environ["HTTP_X_SESSION_ID"].is_string(),
            user.is_some(),
            "{seen}"
        );
        assert_ne!(environ["HTTP_X_SESSION_ID"], "forged", "{seen}");
        assert!(environ["HTTP_X_SESSIONGATE_LOGIN"].is_null(), "{seen}");
    }
}

#[tokio::test]
async fn lookalike_identity_headers_can_be_rejected() {
    let origin = H2cOrigin::start().await;
    let gw = GatewayUnderTest::start_with(h2c_gateway_spec(&origin), |text| {
        text.replacen(
            "[session]\n",
            "[session]\nlookalike_headers = \"reject\"\n",
            1,
        )
    })
    .await;
    let (status, _, body) = raw_http(gw.addr, &lookalike_request("/public/rejected", None)).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["error"]["code"], "forbidden_header", "{body}");
    // The origin answers a later request, and never saw the rejected one.
    let (status, _, _) = raw_http(gw.addr, &origin_form("/public/after")).await;
    assert_eq!(status, 200);
    origin.wait_for_path("/public/after").await.unwrap();
    assert!(
        origin.seen_path("/public/rejected").is_empty(),
        "{:?}",
        origin.seen()
    );
}
