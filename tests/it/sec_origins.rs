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

use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

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
