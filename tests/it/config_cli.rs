//! Configuration errors that name the key, through the real binary
//! (`check`, `migrate`) and through `Config::from_toml_str`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sessiongate::config::Config;
use sqlx::Row;

const BIN: &str = env!("CARGO_BIN_EXE_sessiongate");

/// A config that `check` accepts, with its database in `dir`.
fn valid_config(dir: &Path) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
token = "test-admin-token-0123456789"

[store]
database_url = "sqlite://{}"

[[upstreams]]
name = "app"
urls = ["http://127.0.0.1:3000"]

[[routes]]
prefix = "/"
upstream = "app"
auth = "required"
"#,
        dir.join("sg.db").display()
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs the binary with `args`, with no `SESSIONGATE_*` variable from the
/// test's own environment, plus `env`.
fn run(args: &[&str], env: &[(&str, &str)], cwd: Option<&Path>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("SESSIONGATE_") {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.output().expect("run sessiongate")
}

fn check(path: &Path, env: &[(&str, &str)]) -> Output {
    run(&["check", "--config", path.to_str().unwrap()], env, None)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a failed run (exit 1) and returns its stderr.
fn failed(out: &Output) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1; stdout {:?} stderr {stderr:?}",
        text(&out.stdout)
    );
    assert_ne!(text(&out.stdout).trim(), "ok", "stderr {stderr:?}");
    stderr
}

fn assert_names(stderr: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr does not name {needle:?}:\n{stderr}"
        );
    }
}

// ---------------------------------------------------------------------------
// sessiongate check
// ---------------------------------------------------------------------------

#[test]
fn check_accepts_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "gateway.toml", &valid_config(dir.path()));
    let out = check(&path, &[]);
    assert!(
        out.status.success(),
        "exit {:?}, stderr {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "ok");
    // No network and no store: check does not create the database.
    assert!(
        !dir.path().join("sg.db").exists(),
        "check touched the store"
    );
}

#[test]
fn check_reads_gateway_toml_by_default() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "gateway.toml", &valid_config(dir.path()));
    let out = run(&["check"], &[], Some(dir.path()));
    assert!(out.status.success(), "stderr {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "ok");

    let empty = tempfile::tempdir().unwrap();
    let out = run(&["check"], &[], Some(empty.path()));
    let stderr = failed(&out);
    assert_names(&stderr, &["gateway.toml"]);
}

#[test]
fn check_reports_every_problem_naming_file_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "broken.toml",
        r#"
[server]
listen = "not-an-address"
listen_port = 8080

[admin]
listen = "127.0.0.1:9090"

[[upstreams]]
name = "app"
urls = ["http://127.0.0.1:3000"]

[[routes]]
prefix = "/"
upstream = "missing"
"#,
    );
    let stderr = failed(&check(&path, &[]));
    assert_names(
        &stderr,
        &[
            path.to_str().unwrap(),
            "listen_port",
            "server.listen",
            "not-an-address",
            "routes[0].upstream",
            "missing",
            "admin.token",
        ],
    );
}

#[test]
fn check_reports_every_validation_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "broken.toml",
        r#"
[server]
listen = "not-an-address"

[admin]
listen = "127.0.0.1:9090"

[[upstreams]]
name = "app"
urls = ["http://127.0.0.1:3000"]

[[routes]]
prefix = "/"
upstream = "missing"
"#,
    );
    let stderr = failed(&check(&path, &[]));
    let file = path.to_str().unwrap();
    assert_names(
        &stderr,
        &[
            "server.listen",
            "not-an-address",
            "routes[0].upstream",
            "admin.token",
        ],
    );
    // One line per problem, each naming the file.
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    for line in lines {
        assert!(
            line.starts_with(file),
            "line does not name the file: {line}"
        );
    }
}

#[test]
fn check_rejects_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let valid = valid_config(dir.path());

    let path = write(
        dir.path(),
        "a.toml",
        &valid.replace("[server]\n", "[server]\nlisten_port = 8080\n"),
    );
    let stderr = failed(&check(&path, &[]));
    assert_names(&stderr, &[path.to_str().unwrap(), "server", "listen_port"]);

    let path = write(
        dir.path(),
        "b.toml",
        &format!("{valid}\n[sesion]\ncookie_name = \"x\"\n"),
    );
    let stderr = failed(&check(&path, &[]));
    assert_names(&stderr, &[path.to_str().unwrap(), "sesion"]);

    let path = write(
        dir.path(),
        "c.toml",
        &format!("{valid}strip_prefix = true\n"),
    );
    let stderr = failed(&check(&path, &[]));
    assert_names(&stderr, &[path.to_str().unwrap(), "routes", "strip_prefix"]);
}

#[test]
fn check_reports_a_bad_environment_override() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "gateway.toml", &valid_config(dir.path()));
    let out = check(&path, &[("SESSIONGATE_SERVER__LISTEN", "not-an-address")]);
    let stderr = failed(&out);
    assert_names(&stderr, &["server.listen", "not-an-address"]);

    // An unknown key from the environment is an error too.
    let out = check(&path, &[("SESSIONGATE_SERVER__LISTEN_PORT", "8080")]);
    let stderr = failed(&out);
    assert_names(&stderr, &["listen_port"]);
}

#[test]
fn a_bad_environment_override_is_attributed_to_the_environment() {
    // The file is fine; the operator must be told the bad value came from
    // the environment, not sent looking for it in the file.
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "gateway.toml", &valid_config(dir.path()));
    let stderr = failed(&check(
        &path,
        &[("SESSIONGATE_SERVER__LISTEN", "not-an-address")],
    ));
    assert!(
        stderr.contains("SESSIONGATE_SERVER__LISTEN") || stderr.contains("environment"),
        "the error does not say the value came from the environment:\n{stderr}"
    );
}

#[test]
fn check_does_not_touch_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = valid_config(dir.path()).replace(
        &format!("database_url = \"sqlite://{}\"", dir.path().join("sg.db").display()),
        &format!(
            "database_url = \"postgres://nobody@127.0.0.1:{closed}/none\"\nredis_url = \"redis://127.0.0.1:{closed}\""
        ),
    );
    assert!(config.contains("postgres://"), "{config}");
    let path = write(dir.path(), "gateway.toml", &config);
    let started = std::time::Instant::now();
    let out = check(&path, &[]);
    assert!(out.status.success(), "stderr {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "ok");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // The admin token comes from the environment alone.
    let without_token =
        valid_config(dir.path()).replace("token = \"test-admin-token-0123456789\"\n", "");
    let path = write(dir.path(), "gateway.toml", &without_token);
    let stderr = failed(&check(&path, &[]));
    assert_names(&stderr, &["admin.token"]);
    let out = check(
        &path,
        &[("SESSIONGATE_ADMIN__TOKEN", "an-admin-token-from-the-env")],
    );
    assert!(out.status.success(), "stderr {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "ok");

    // A broken value in the file is replaced by a good one from the env.
    let broken = valid_config(dir.path()).replace(
        "listen = \"127.0.0.1:0\"\n\n[admin]",
        "listen = \"nowhere\"\n\n[admin]",
    );
    assert!(broken.contains("nowhere"));
    let path = write(dir.path(), "broken.toml", &broken);
    failed(&check(&path, &[]));
    let out = check(&path, &[("SESSIONGATE_SERVER__LISTEN", "127.0.0.1:8181")]);
    assert!(out.status.success(), "stderr {}", text(&out.stderr));
}

#[test]
fn a_missing_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("does-not-exist.toml");
    let stderr = failed(&check(&path, &[]));
    assert_names(&stderr, &[path.to_str().unwrap()]);
}

#[test]
fn invalid_toml_is_reported_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.toml", "[server\nlisten = ");
    let stderr = failed(&check(&path, &[]));
    assert_names(&stderr, &[path.to_str().unwrap()]);
}

// ---------------------------------------------------------------------------
// sessiongate migrate
// ---------------------------------------------------------------------------

async fn sessions_columns(db: &Path) -> Vec<String> {
    let url = format!("sqlite://{}", db.display());
    let pool = sqlx::SqlitePool::connect(&url).await.expect("open the DB");
    let rows = sqlx::query("SELECT name FROM pragma_table_info('sessions')")
        .fetch_all(&pool)
        .await
        .expect("table info");
    pool.close().await;
    rows.iter().map(|r| r.get::<String, _>("name")).collect()
}

#[tokio::test]
async fn migrate_creates_the_sessions_table() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sg.db");
    let path = write(dir.path(), "gateway.toml", &valid_config(dir.path()));
    assert!(!db.exists());

    let out = run(&["migrate", "--config", path.to_str().unwrap()], &[], None);
    assert!(
        out.status.success(),
        "exit {:?}, stderr {}",
        out.status,
        text(&out.stderr)
    );
    assert!(db.exists(), "migrate did not create {}", db.display());
    let columns = sessions_columns(&db).await;
    for column in ["token_hash", "id", "user_id", "expires_at"] {
        assert!(
            columns.iter().any(|c| c == column),
            "no {column} in {columns:?}"
        );
    }
    assert!(
        !columns.iter().any(|c| c == "token"),
        "a token column: {columns:?}"
    );

    // Applying the migrations again is harmless.
    let out = run(&["migrate", "--config", path.to_str().unwrap()], &[], None);
    assert!(out.status.success(), "stderr {}", text(&out.stderr));
    assert_eq!(sessions_columns(&db).await, columns);
}

#[tokio::test]
async fn migrate_applies_the_postgres_migrations() {
    let schema = crate::store_suite::postgres_schema().await;
    let dir = tempfile::tempdir().unwrap();
    let config = valid_config(dir.path()).replace(
        &format!("sqlite://{}", dir.path().join("sg.db").display()),
        &schema.url,
    );
    assert!(config.contains(&schema.url));
    let path = write(dir.path(), "gateway.toml", &config);
    let out = run(&["migrate", "--config", path.to_str().unwrap()], &[], None);
    assert!(
        out.status.success(),
        "exit {:?}, stderr {}",
        out.status,
        text(&out.stderr)
    );
    let pool = sqlx::PgPool::connect(&schema.url).await.expect("connect");
    let columns: Vec<String> = sqlx::query(
        "SELECT column_name::text AS c FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name = 'sessions'",
    )
    .bind(&schema.name)
    .fetch_all(&pool)
    .await
    .expect("columns")
    .iter()
    .map(|r| r.get::<String, _>("c"))
    .collect();
    pool.close().await;
    for column in ["token_hash", "id", "user_id", "expires_at"] {
        assert!(
            columns.iter().any(|c| c == column),
            "no {column} in {columns:?}"
        );
    }
    // Applying them again is harmless.
    let out = run(&["migrate", "--config", path.to_str().unwrap()], &[], None);
    assert!(out.status.success(), "stderr {}", text(&out.stderr));
}

#[test]
fn migrate_reports_an_unreachable_database() {
    let dir = tempfile::tempdir().unwrap();
    let missing_dir = dir.path().join("no-such-dir");
    let config = valid_config(dir.path()).replace(
        &dir.path().join("sg.db").display().to_string(),
        &missing_dir.join("sg.db").display().to_string(),
    );
    let path = write(dir.path(), "gateway.toml", &config);
    let out = run(&["migrate", "--config", path.to_str().unwrap()], &[], None);
    let stderr = failed(&out);
    assert_names(&stderr, &["no-such-dir"]);
}

#[test]
fn migrate_errors_never_show_the_database_password() {
    let dir = tempfile::tempdir().unwrap();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = valid_config(dir.path()).replace(
        &format!("sqlite://{}", dir.path().join("sg.db").display()),
        &format!("postgres://gateway:s3cret-pa55@127.0.0.1:{closed}/sessions"),
    );
    let path = write(dir.path(), "gateway.toml", &config);
    let out = run(
        &["migrate", "--config", path.to_str().unwrap()],
        &[("SESSIONGATE_STORE__CONNECT_TIMEOUT_MS", "1000")],
        None,
    );
    let stderr = failed(&out);
    assert_names(&stderr, &[&format!("127.0.0.1:{closed}")]);
    assert!(
        !stderr.contains("s3cret-pa55") && !text(&out.stdout).contains("s3cret-pa55"),
        "the password is shown: {stderr}"
    );
}

#[test]
fn migrate_with_a_broken_config_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = valid_config(dir.path()).replace("upstream = \"app\"", "upstream = \"nope\"");
    let path = write(dir.path(), "gateway.toml", &config);
    let out = run(&["migrate", "--config", path.to_str().unwrap()], &[], None);
    let stderr = failed(&out);
    assert_names(&stderr, &["routes[0].upstream"]);
    assert!(!dir.path().join("sg.db").exists());
}

// ---------------------------------------------------------------------------
// Config::from_toml_str
// ---------------------------------------------------------------------------

#[test]
fn a_valid_config_is_read_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_toml_str(&valid_config(dir.path())).expect("valid");
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:0");
    let admin = config.admin.as_ref().expect("admin");
    assert_eq!(admin.token, "test-admin-token-0123456789");
    assert!(
        !format!("{config:?}").contains("test-admin-token-0123456789"),
        "the admin token appears in the config's Debug output"
    );
    assert_eq!(config.upstreams[0].name, "app");
    assert_eq!(config.routes[0].prefix, "/");
}

#[test]
fn from_toml_str_reports_every_problem_at_once() {
    let text = r#"
[server]
max_connections = 0
worker_threads = 1025

[admin]
listen = "here"
token = "short"

[store]
database_url = "mysql://db/x"
memory_capacity = 0

[session]
cookie_name = "bad name"
token_secret = "too-short"

[log]
format = "xml"

[[upstreams]]
name = "app"
urls = []

[[upstreams]]
name = "app"
urls = ["http://127.0.0.1:1/path"]

[[routes]]
prefix = "/"
upstream = "app"

[[routes]]
prefix = "/"
upstream = "app"
"#;
    let err = Config::from_toml_str(text).expect_err("invalid");
    let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
    for expected in [
        "server.max_connections",
        "server.worker_threads",
        "admin.listen",
        "admin.token",
        "store.database_url",
        "store.memory_capacity",
        "session.cookie_name",
        "session.token_secret",
        "log.format",
        "upstreams[0].urls",
        "upstreams[1].name",
        "upstreams[1].urls[0]",
        "routes[1].prefix",
    ] {
        assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
    }
    let rendered = err.to_string();
    assert_eq!(rendered.lines().count(), err.problems().len(), "{rendered}");
    for line in rendered.lines() {
        assert!(line.starts_with("<inline>: key `"), "{line}");
    }
    assert!(
        !rendered.contains("too-short") && !rendered.contains("\"short\""),
        "a secret value is echoed in the error: {rendered}"
    );
}

#[test]
fn from_toml_str_rejects_unknown_keys_and_wrong_types() {
    let dir = tempfile::tempdir().unwrap();
    let valid = valid_config(dir.path());

    let err = Config::from_toml_str(&valid.replace("[store]\n", "[store]\ndatabse_url = \"x\"\n"))
        .expect_err("unknown key");
    let rendered = err.to_string();
    assert!(rendered.contains("databse_url"), "{rendered}");
    assert!(
        err.problems().iter().any(|p| p.key.starts_with("store")),
        "{:?}",
        err.problems()
    );

    let err = Config::from_toml_str(
        &valid.replace("[server]\n", "[server]\nmax_connections = \"many\"\n"),
    )
    .expect_err("wrong type");
    assert!(
        err.problems()
            .iter()
            .any(|p| p.key == "server.max_connections"),
        "{:?}",
        err.problems()
    );
}
