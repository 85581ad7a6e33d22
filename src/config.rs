//! Configuration: `gateway.toml` plus `SESSIONGATE_*` environment overrides.
//!
//! figment reads both sources into [`RawConfig`], whose structs reject
//! unknown keys. [`Config::from_raw`] then converts it once into the typed,
//! validated [`Config`] that the rest of the gateway sees, collecting every
//! problem instead of stopping at the first, so that an operator fixes a
//! broken file in one pass. Nothing outside this module sees the raw form.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use http::Uri;
use http::header::HeaderName;
use serde::Deserialize;

use crate::backend_tls::{self, TlsFile, UpstreamTls, UpstreamTlsFiles};

/// Most `server.worker_threads`: each worker is an OS thread with its
/// own runtime and upstream pools.
const MAX_WORKER_THREADS: u64 = 1024;

/// Every way a configuration can be wrong, each naming where and what.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: String, reason: String },
    #[error("{}", format_problems(.file, .problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

/// One problem: the dotted key it concerns and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
    /// Where the bad value came from when not the file: an environment
    /// variable's name.
    pub origin: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.message)
    }
}

fn format_problems(file: &str, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| format!("{}: {p}", p.origin.as_deref().unwrap_or(file)))
        .collect();
    lines.join("\n")
}

impl ConfigError {
    /// The problems found, empty for an unreadable file.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            ConfigError::Read { .. } => &[],
        }
    }
}

// ---------------------------------------------------------------------------
// The raw form, exactly as written in TOML.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    #[serde(default)]
    server: RawServer,
    admin: Option<RawAdmin>,
    forward_auth: Option<RawForwardAuth>,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    session: RawSession,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    policies: Vec<RawPolicy>,
    /// `[[chains.<name>]]`: named policy chains (see `crate::policy::chains`).
    #[serde(default)]
    chains: BTreeMap<String, Vec<RawPolicy>>,
    #[serde(default)]
    plugins: RawPlugins,
}

#[derive(Debug, Default, Deserialize)]
struct RawPlugins {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    watch: Option<bool>,
    watch_interval_ms: Option<u64>,
    log_lines_per_second: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawServer {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    listen: Option<String>,
    worker_threads: Option<u64>,
    max_connections: Option<u64>,
    shutdown_grace_ms: Option<u64>,
    max_connections_per_client: Option<u64>,
    first_byte_timeout_ms: Option<u64>,
    header_read_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    body_read_timeout_ms: Option<u64>,
    http2_keepalive_interval_ms: Option<u64>,
    http2_keepalive_timeout_ms: Option<u64>,
    http2_max_concurrent_streams: Option<u64>,
    max_upstream_per_connection: Option<u64>,
    trusted_proxies: Option<Vec<String>>,
    proxy_protocol: Option<bool>,
    tls: Option<RawServerTls>,
}

#[derive(Debug, Default, Deserialize)]
struct RawServerTls {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    cert_file: Option<String>,
    key_file: Option<String>,
    #[serde(default)]
    certificates: Vec<RawTlsCertificate>,
    redirect_listen: Option<String>,
    hsts_max_age: Option<u64>,
    hsts_include_subdomains: Option<bool>,
    watch: Option<bool>,
    watch_interval_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawTlsCertificate {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    #[serde(default)]
    server_names: Vec<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawAdmin {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    listen: Option<String>,
    token: Option<String>,
    max_connections: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawForwardAuth {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    listen: Option<String>,
    caller: Option<String>,
    path_prefix: Option<String>,
    allow_from: Option<Vec<String>>,
    max_connections: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawStore {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    redis_url: Option<String>,
    redis_cluster_urls: Option<Vec<String>>,
    database_url: Option<String>,
    local_cache_ttl_ms: Option<u64>,
    migrate: Option<bool>,
    memory_capacity: Option<u64>,
    sweep_interval_seconds: Option<u64>,
    max_connections: Option<u32>,
    min_connections: Option<u32>,
    connect_timeout_ms: Option<u64>,
    redis_prefix: Option<String>,
    redis_timeout_ms: Option<u64>,
    redis_retry_ms: Option<u64>,
    activity_flush_ms: Option<u64>,
    negative_cache_capacity: Option<u64>,
    negative_cache_ttl_ms: Option<u64>,
    activity_buffer_capacity: Option<u64>,
    redis_ca_file: Option<String>,
    redis_client_cert_file: Option<String>,
    redis_client_key_file: Option<String>,
    database_ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawSession {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    cookie_name: Option<String>,
    cookie_secure: Option<bool>,
    user_header: Option<String>,
    session_header: Option<String>,
    default_ttl_seconds: Option<u64>,
    forward_token: Option<bool>,
    token_secret: Option<String>,
    touch_interval_seconds: Option<u64>,
    lookalike_headers: Option<String>,
    assertion: Option<crate::assertion::RawAssertion>,
}

#[derive(Debug, Default, Deserialize)]
struct RawLog {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    format: Option<String>,
    level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawUpstream {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    name: Option<String>,
    #[serde(default)]
    urls: Vec<String>,
    connect_timeout_ms: Option<u64>,
    timeout_ms: Option<u64>,
    ca_file: Option<String>,
    client_cert_file: Option<String>,
    client_key_file: Option<String>,
    server_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRoute {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    prefix: Option<String>,
    upstream: Option<String>,
    auth: Option<String>,
    login_redirect: Option<String>,
    case_insensitive: Option<bool>,
    max_body_bytes: Option<u64>,
    audience: Option<String>,
    forward_attributes: Option<Vec<String>>,
    policies: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawPolicy {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    plugin: Option<String>,
    config: Option<figment::value::Value>,
    on_error: Option<String>,
    timeout_ms: Option<u64>,
    memory_limit_mb: Option<u64>,
}

// ---------------------------------------------------------------------------
// The validated form.
// ---------------------------------------------------------------------------

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration came from, for messages.
    pub source: String,
    /// The file it was read from, if any: policy reloads read its
    /// `[[policies]]` again.
    pub path: Option<PathBuf>,
    pub server: ServerConfig,
    pub admin: Option<AdminConfig>,
    /// `[forward_auth]`: the auth sub-request listener (`forward_auth.rs`).
    pub forward_auth: Option<crate::forward_auth::ForwardAuthConfig>,
    pub store: StoreConfig,
    pub session: SessionConfig,
    pub log: LogConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    /// The default chain (`[[policies]]`).
    pub policies: Vec<PolicyConfig>,
    /// The named chains (`[[chains.<name>]]`), by name.
    pub chains: BTreeMap<String, Vec<PolicyConfig>>,
    pub plugins: PluginsConfig,
}

/// What to do with a request when a policy plugin fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Deny,
    Allow,
}

/// One `[[policies]]` entry.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Resolved against the config file's directory.
    pub plugin: PathBuf,
    /// The plugin's `config` table as a JSON object.
    pub config_json: String,
    pub on_error: OnError,
    pub timeout: Duration,
    pub memory_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct PluginsConfig {
    /// Reload the chain when a plugin file changes.
    pub watch: bool,
    pub watch_interval: Duration,
    /// Log lines each plugin may write per second (a bucket refilled at
    /// this rate, holding one second's worth); the excess is counted and
    /// summarized.
    pub log_lines_per_second: u32,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Connections beyond this wait in the kernel's accept queue rather
    /// than each costing memory and file descriptors here.
    pub max_connections: usize,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Per-core workers serving the proxy listener (`server.rs`); none =
    /// one per CPU core in the binary, or serving on the caller's runtime
    /// in the library (as 1 does).
    pub worker_threads: Option<usize>,
    /// Connections one client address may hold open at once.
    pub max_connections_per_client: usize,
    /// Until a new connection's first byte, and until its protocol is known.
    pub first_byte_timeout: Duration,
    /// Until a request's headers are complete (HTTP/1).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// Longest wait for the next piece of a request body.
    pub body_read_timeout: Duration,
    /// HTTP/2 PING interval, and how long a PING may go unanswered.
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// Upstream requests one client connection may have in flight (and so
    /// upstream connections it can make the gateway open).
    pub max_upstream_per_connection: usize,
    /// Peers whose `X-Forwarded-For` / `X-Forwarded-Proto` (and PROXY
    /// header) are believed; empty trusts nobody. See `forwarded.rs`.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Trusted peers start each connection with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// `[server.tls]`: when set, `listen` serves HTTPS only.
    pub tls: Option<ServerTlsConfig>,
}

/// `[server.tls]`: the HTTPS listener's certificates and options.
#[derive(Debug, Clone)]
pub struct ServerTlsConfig {
    /// `cert_file` / `key_file`: served to clients that send no server
    /// name, or one that no entry of `certificates` names.
    pub default: TlsCertFiles,
    /// `[[server.tls.certificates]]`, chosen by the client's server name.
    pub certificates: Vec<TlsCertFiles>,
    /// A plain-HTTP listener that only redirects to HTTPS.
    pub redirect_listen: Option<SocketAddr>,
    /// `Strict-Transport-Security: max-age=...`; none = not sent.
    pub hsts_max_age: Option<Duration>,
    pub hsts_include_subdomains: bool,
    /// Reload when a certificate or key file changes.
    pub watch: bool,
    pub watch_interval: Duration,
}

/// One certificate chain and its key, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCertFiles {
    /// The table the files were given in (`server.tls`,
    /// `server.tls.certificates[0]`), for messages.
    pub table: String,
    /// Lower-case DNS names, `*.example.com` for one label of wildcard;
    /// empty for the default certificate.
    pub server_names: Vec<String>,
    /// PEM, the leaf first then its intermediates. Resolved against the
    /// config file's directory.
    pub cert_file: PathBuf,
    /// PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key_file: PathBuf,
}

#[derive(Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: String,
    /// Connections the admin listener serves at once (its own budget, apart
    /// from the proxy's).
    pub max_connections: usize,
}

impl fmt::Debug for AdminConfig {
    // The token is a secret: never in a debug dump or a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub redis_url: Option<String>,
    /// The seed nodes of a Redis Cluster (instead of `redis_url`); empty
    /// when not a cluster.
    pub redis_cluster_urls: Vec<String>,
    pub database_url: String,
    pub local_cache_ttl: Duration,
    pub migrate: bool,
    /// Entries kept by the in-process fast tier before the least used go.
    pub memory_capacity: u64,
    pub sweep_interval: Duration,
    /// Durable store pool size, and connections kept open when idle.
    pub max_connections: u32,
    pub min_connections: u32,
    /// How long a request waits for a durable connection before 503.
    pub connect_timeout: Duration,
    /// Prefix of every Redis key, so several deployments can share a Redis.
    pub redis_prefix: String,
    /// Redis connect and command timeout.
    pub redis_timeout: Duration,
    /// How often an unreachable Redis is retried.
    pub redis_retry: Duration,
    /// How often coalesced activity is written to the durable tier.
    pub activity_flush: Duration,
    pub negative_cache_capacity: u64,
    pub negative_cache_ttl: Duration,
    /// Sessions whose activity may wait for the next flush; beyond this
    /// the oldest is dropped (and counted).
    pub activity_buffer_capacity: usize,
    /// TLS to Redis (`rediss://`): the CA to verify it with (else the
    /// system roots), and the client certificate for Redis's
    /// `tls-auth-clients`.
    pub redis_ca_file: Option<PathBuf>,
    pub redis_client_cert_file: Option<PathBuf>,
    pub redis_client_key_file: Option<PathBuf>,
    /// The CA PostgreSQL's certificate is verified with
    /// (`sslmode=verify-ca|verify-full`).
    pub database_ca_file: Option<PathBuf>,
}

#[derive(Clone)]
pub struct SessionConfig {
    pub cookie_name: String,
    pub cookie_secure: bool,
    pub user_header: HeaderName,
    pub session_header: HeaderName,
    /// The lifetime of a session when no policy sets one.
    pub default_ttl: Duration,
    /// Whether the session cookie and bearer token go upstream.
    pub forward_token: bool,
    /// Key for the token MAC; when absent it is kept in the durable store.
    pub token_secret: Option<Vec<u8>>,
    /// A session's `last_seen_at` is updated at most this often.
    pub touch_interval: Duration,
    /// What to do with a request header that reads as a gateway-owned
    /// header once `_` is taken for `-`.
    pub lookalike_headers: LookalikeHeaders,
    /// `[session.assertion]`, when enabled: signed identity for upstreams.
    pub assertion: Option<crate::assertion::AssertionConfig>,
}

/// `session.lookalike_headers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookalikeHeaders {
    /// Drop the header and forward the request.
    Remove,
    /// Answer 400.
    Reject,
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("cookie_name", &self.cookie_name)
            .field("cookie_secure", &self.cookie_secure)
            .field("user_header", &self.user_header)
            .field("session_header", &self.session_header)
            .field("default_ttl", &self.default_ttl)
            .field("forward_token", &self.forward_token)
            .field("lookalike_headers", &self.lookalike_headers)
            .field("assertion", &self.assertion)
            .field(
                "token_secret",
                &self.token_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    /// Base URLs: scheme and authority only (`http://host:port`).
    pub urls: Vec<Uri>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// The TLS client of the `https://` URLs; none when all are `http://`.
    pub(crate) tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Required,
    Optional,
    None,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Required => "required",
            AuthMode::Optional => "optional",
            AuthMode::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub prefix: String,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    pub auth: AuthMode,
    pub login_redirect: Option<String>,
    /// Match `prefix` without regard to ASCII case (for apps that route
    /// that way).
    pub case_insensitive: bool,
    /// Largest request body accepted on this route (413 beyond).
    pub max_body_bytes: u64,
    /// The `aud` of its assertions; the prefix when not set.
    pub audience: Option<String>,
    /// Session attributes sent upstream as `x-sessiongate-attr-<name>`.
    pub forward_attributes: Vec<crate::assertion::ForwardedAttribute>,
    /// The `[chains.<name>]` this route's requests and logins run; `None`:
    /// the default chain (`[[policies]]`).
    pub policies: Option<String>,
}

pub const DEFAULT_CONFIG_FILE: &str = "gateway.toml";
/// `routes[].max_body_bytes` when not set: 10 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 << 20;
const ENV_PREFIX: &str = "SESSIONGATE_";

impl Config {
    /// Reads `path` (which must exist) and the `SESSIONGATE_*` environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        if !path.is_file() {
            return Err(ConfigError::Read {
                file,
                reason: "no such file".into(),
            });
        }
        let figment = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed(ENV_PREFIX).split("__"));
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut config = Self::from_figment(figment, &file, &base)?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses TOML text alone, without the environment: for tests and
    /// for callers that build a config in memory.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let figment = Figment::new().merge(Toml::string(text));
        Self::from_figment(figment, "<inline>", Path::new(""))
    }

    fn from_figment(figment: Figment, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = figment.extract().map_err(|errors| {
            let problems = errors
                .into_iter()
                .map(|e| {
                    let origin = e
                        .metadata
                        .as_ref()
                        .map(|m| m.name.to_string())
                        .unwrap_or_default();
                    let key = if e.path.is_empty() {
                        "(top level)".to_string()
                    } else {
                        e.path.join(".")
                    };
                    let message = if origin.starts_with("`SESSIONGATE_") || origin.contains("env") {
                        format!("{} (from {origin})", e.kind)
                    } else {
                        e.kind.to_string()
                    };
                    Problem {
                        key,
                        message,
                        origin: None,
                    }
                })
                .collect();
            ConfigError::Invalid {
                file: file.to_string(),
                problems,
            }
        })?;
        Self::from_raw(raw, file, base).map_err(|mut e| {
            // Name the environment variable a bad value came from, so the
            // operator does not look for it in the file.
            if let ConfigError::Invalid { problems, .. } = &mut e {
                for p in problems.iter_mut() {
                    let from_env = !p.key.contains('[')
                        && figment
                            .find_metadata(&p.key)
                            .is_some_and(|m| m.name.contains("environment"));
                    if from_env {
                        let var = p.key.to_uppercase().replace('.', "__");
                        p.origin = Some(format!("environment variable {ENV_PREFIX}{var}"));
                    }
                }
            }
            e
        })
    }

    fn from_raw(mut raw: RawConfig, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut v = Validator::default();
        v.unknown("", &raw.unknown);
        v.unknown("server", &raw.server.unknown);
        if let Some(tls) = &raw.server.tls {
            v.unknown("server.tls", &tls.unknown);
            for (i, c) in tls.certificates.iter().enumerate() {
                v.unknown(&format!("server.tls.certificates[{i}]"), &c.unknown);
            }
        }
        if let Some(admin) = &raw.admin {
            v.unknown("admin", &admin.unknown);
        }
        v.unknown("store", &raw.store.unknown);
        v.unknown("session", &raw.session.unknown);
        v.unknown("log", &raw.log.unknown);
        v.unknown("plugins", &raw.plugins.unknown);
        for (i, u) in raw.upstreams.iter().enumerate() {
            v.unknown(&format!("upstreams[{i}]"), &u.unknown);
        }
        for (i, r) in raw.routes.iter().enumerate() {
            v.unknown(&format!("routes[{i}]"), &r.unknown);
        }
        for (i, p) in raw.policies.iter().enumerate() {
            v.unknown(&format!("policies[{i}]"), &p.unknown);
        }
        for (name, entries) in &raw.chains {
            for (i, p) in entries.iter().enumerate() {
                v.unknown(&format!("chains.{name}[{i}]"), &p.unknown);
            }
        }

        let listen = v.addr(
            "server.listen",
            raw.server.listen.as_deref(),
            "127.0.0.1:8080",
        );
        let tls = raw
            .server
            .tls
            .take()
            .map(|t| server_tls(&mut v, t, base, listen));
        let server = ServerConfig {
            listen,
            max_connections: v.positive(
                "server.max_connections",
                raw.server.max_connections,
                10_000,
            ) as usize,
            shutdown_grace: Duration::from_millis(raw.server.shutdown_grace_ms.unwrap_or(30_000)),
            worker_threads: raw.server.worker_threads.map(|n| {
                let n = v.positive("server.worker_threads", Some(n), 1);
                if n > MAX_WORKER_THREADS {
                    v.problem(
                        "server.worker_threads",
                        format!(
                            "must be at most {MAX_WORKER_THREADS} (each worker is a thread with its own upstream connections; one per core is the most that helps)"
                        ),
                    );
                    return 1;
                }
                n as usize
            }),
            max_connections_per_client: v.positive(
                "server.max_connections_per_client",
                raw.server.max_connections_per_client,
                1_000,
            ) as usize,
            first_byte_timeout: v.millis(
                "server.first_byte_timeout_ms",
                raw.server.first_byte_timeout_ms,
                10_000,
            ),
            header_read_timeout: v.millis(
                "server.header_read_timeout_ms",
                raw.server.header_read_timeout_ms,
                30_000,
            ),
            idle_timeout: v.millis("server.idle_timeout_ms", raw.server.idle_timeout_ms, 60_000),
            body_read_timeout: v.millis(
                "server.body_read_timeout_ms",
                raw.server.body_read_timeout_ms,
                30_000,
            ),
            http2_keepalive_interval: v.millis(
                "server.http2_keepalive_interval_ms",
                raw.server.http2_keepalive_interval_ms,
                20_000,
            ),
            http2_keepalive_timeout: v.millis(
                "server.http2_keepalive_timeout_ms",
                raw.server.http2_keepalive_timeout_ms,
                20_000,
            ),
            http2_max_concurrent_streams: v
                .positive(
                    "server.http2_max_concurrent_streams",
                    raw.server.http2_max_concurrent_streams,
                    100,
                )
                .min(u64::from(u32::MAX)) as u32,
            max_upstream_per_connection: v.positive(
                "server.max_upstream_per_connection",
                raw.server.max_upstream_per_connection,
                16,
            ) as usize,
            trusted_proxies: trusted_proxies(&mut v, raw.server.trusted_proxies.as_deref()),
            proxy_protocol: raw.server.proxy_protocol.unwrap_or(false),
            tls,
        };
        if server.proxy_protocol && server.trusted_proxies.is_empty() {
            v.problem(
                "server.proxy_protocol",
                "needs server.trusted_proxies: the PROXY header is read only from trusted peers \
                 (list your load balancers' addresses there)",
            );
        }

        let admin = raw.admin.map(|a| {
            let token = a.token.unwrap_or_default();
            if token.is_empty() {
                v.problem(
                    "admin.token",
                    "required when [admin] is present (set it here or in SESSIONGATE_ADMIN__TOKEN)",
                );
            } else if token.len() < 16 {
                v.problem("admin.token", "must be at least 16 characters long");
            }
            AdminConfig {
                listen: v.addr("admin.listen", a.listen.as_deref(), "127.0.0.1:9090"),
                token,
                max_connections: v.positive("admin.max_connections", a.max_connections, 64)
                    as usize,
            }
        });

        let forward_auth = raw.forward_auth.map(|f| {
            v.unknown("forward_auth", &f.unknown);
            let listen = v.addr("forward_auth.listen", f.listen.as_deref(), "127.0.0.1:9091");
            let max_connections =
                v.positive("forward_auth.max_connections", f.max_connections, 256) as usize;
            let default_allow = ["127.0.0.0/8".to_string(), "::1".to_string()];
            let mut allow_from = Vec::new();
            for (i, entry) in f
                .allow_from
                .as_deref()
                .unwrap_or(&default_allow)
                .iter()
                .enumerate()
            {
                match crate::forwarded::TrustedProxies::parse_entry(entry) {
                    Ok(net) => allow_from.push(net),
                    Err(message) => v.problem(format!("forward_auth.allow_from[{i}]"), message),
                }
            }
            let caller =
                crate::forward_auth::Caller::parse(f.caller.as_deref()).unwrap_or_else(|message| {
                    v.problem("forward_auth.caller", message);
                    crate::forward_auth::Caller::Nginx
                });
            let path_prefix = f.path_prefix.unwrap_or_default();
            if let Err(message) = crate::forward_auth::check_path_prefix(caller, &path_prefix) {
                v.problem("forward_auth.path_prefix", message);
            }
            crate::forward_auth::ForwardAuthConfig {
                listen,
                caller,
                path_prefix,
                allow_from,
                max_connections,
            }
        });

        let database_url = raw
            .store
            .database_url
            .clone()
            .unwrap_or_else(|| "sqlite://sessiongate.db".into());
        let known = ["sqlite:", "postgres://", "postgresql://"];
        if !known.iter().any(|k| database_url.starts_with(k)) {
            v.problem(
                "store.database_url",
                "must start with sqlite:// (embedded) or postgres://",
            );
        }
        if let Some(url) = &raw.store.redis_url
            && !url.starts_with("redis://")
            && !url.starts_with("rediss://")
        {
            v.problem("store.redis_url", "must start with redis:// or rediss://");
        }
        redis_cluster_urls(&mut v, &raw.store);
        let redis_tls = redis_tls_files(&mut v, &raw.store, base);
        let database_ca_file = database_ca_file(&mut v, &raw.store, &database_url, base);
        let local_cache_ttl_ms = raw.store.local_cache_ttl_ms.unwrap_or(0);
        if local_cache_ttl_ms > 0
            && raw.store.redis_url.is_none()
            && raw.store.redis_cluster_urls.is_none()
        {
            v.problem(
                "store.local_cache_ttl_ms",
                "only applies in front of Redis (store.redis_url or store.redis_cluster_urls); \
                 leave it 0 otherwise",
            );
        }
        let default_pool = if database_url.starts_with("postgres") {
            8
        } else {
            2
        };
        let store = StoreConfig {
            redis_url: raw.store.redis_url,
            redis_cluster_urls: raw.store.redis_cluster_urls.unwrap_or_default(),
            database_url,
            local_cache_ttl: Duration::from_millis(local_cache_ttl_ms),
            migrate: raw.store.migrate.unwrap_or(true),
            memory_capacity: v.positive(
                "store.memory_capacity",
                raw.store.memory_capacity,
                1_000_000,
            ),
            sweep_interval: Duration::from_secs(v.positive(
                "store.sweep_interval_seconds",
                raw.store.sweep_interval_seconds,
                60,
            )),
            // SQLite runs one writer at a time whatever the pool size, and
            // each connection keeps its own page cache and thread: two
            // (a writer and a reader) is what the embedded store can use.
            max_connections: v.positive(
                "store.max_connections",
                raw.store.max_connections.map(u64::from),
                default_pool,
            ) as u32,
            min_connections: raw.store.min_connections.unwrap_or(0),
            connect_timeout: Duration::from_millis(v.positive(
                "store.connect_timeout_ms",
                raw.store.connect_timeout_ms,
                2_000,
            )),
            redis_prefix: raw
                .store
                .redis_prefix
                .unwrap_or_else(|| "sessiongate:".into()),
            redis_timeout: Duration::from_millis(v.positive(
                "store.redis_timeout_ms",
                raw.store.redis_timeout_ms,
                250,
            )),
            redis_retry: Duration::from_millis(v.positive(
                "store.redis_retry_ms",
                raw.store.redis_retry_ms,
                1_000,
            )),
            activity_flush: Duration::from_millis(v.positive(
                "store.activity_flush_ms",
                raw.store.activity_flush_ms,
                1_000,
            )),
            negative_cache_capacity: v.positive(
                "store.negative_cache_capacity",
                raw.store.negative_cache_capacity,
                100_000,
            ),
            negative_cache_ttl: Duration::from_millis(v.positive(
                "store.negative_cache_ttl_ms",
                raw.store.negative_cache_ttl_ms,
                10_000,
            )),
            activity_buffer_capacity: v.positive(
                "store.activity_buffer_capacity",
                raw.store.activity_buffer_capacity,
                100_000,
            ) as usize,
            redis_ca_file: redis_tls.ca_file,
            redis_client_cert_file: redis_tls.client_cert_file,
            redis_client_key_file: redis_tls.client_key_file,
            database_ca_file,
        };
        if store.min_connections > store.max_connections {
            v.problem(
                "store.min_connections",
                "must not exceed store.max_connections",
            );
        }

        let cookie_name = raw
            .session
            .cookie_name
            .unwrap_or_else(|| "sg_session".into());
        if cookie_name.is_empty()
            || !cookie_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            v.problem(
                "session.cookie_name",
                "must be non-empty and use only letters, digits, '_', '-' and '.'",
            );
        }
        let user_header = v.header(
            "session.user_header",
            raw.session.user_header.as_deref(),
            "x-user-id",
        );
        let session_header = v.header(
            "session.session_header",
            raw.session.session_header.as_deref(),
            "x-session-id",
        );
        if user_header == session_header {
            v.problem(
                "session.session_header",
                "must differ from session.user_header",
            );
        }
        let ttl = v.positive(
            "session.default_ttl_seconds",
            raw.session.default_ttl_seconds,
            86_400,
        );
        let token_secret = match raw.session.token_secret {
            Some(s) if s.len() < 32 => {
                v.problem(
                    "session.token_secret",
                    "must be at least 32 characters (or leave it out to keep a generated key in the durable store)",
                );
                None
            }
            Some(s) => Some(s.into_bytes()),
            None => None,
        };
        let assertion =
            crate::assertion::config(raw.session.assertion, base, &mut |k, m| v.problem(k, m));
        if let Some(a) = &assertion
            && (a.header == user_header || a.header == session_header)
        {
            v.problem(
                "session.assertion.header",
                "must differ from session.user_header and session.session_header",
            );
        }
        let session = SessionConfig {
            cookie_name,
            cookie_secure: raw.session.cookie_secure.unwrap_or(true),
            user_header,
            session_header,
            default_ttl: Duration::from_secs(ttl),
            forward_token: raw.session.forward_token.unwrap_or(false),
            token_secret,
            touch_interval: Duration::from_secs(raw.session.touch_interval_seconds.unwrap_or(60)),
            lookalike_headers: match raw.session.lookalike_headers.as_deref().unwrap_or("remove") {
                "remove" => LookalikeHeaders::Remove,
                "reject" => LookalikeHeaders::Reject,
                other => {
                    v.problem(
                        "session.lookalike_headers",
                        format!("must be \"remove\" or \"reject\", not {other:?}"),
                    );
                    LookalikeHeaders::Remove
                }
            },
            assertion,
        };

        let format = match raw.log.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                v.problem(
                    "log.format",
                    format!("must be \"text\" or \"json\", not {other:?}"),
                );
                LogFormat::Text
            }
        };
        let log = LogConfig {
            format,
            level: raw.log.level.unwrap_or_else(|| "info".into()),
        };
        if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
            v.problem(
                "log.level",
                format!("{:?} is not a valid level or filter", log.level),
            );
        }

        let mut upstreams = Vec::new();
        let mut names = HashSet::new();
        for (i, u) in raw.upstreams.into_iter().enumerate() {
            let key = |field: &str| format!("upstreams[{i}].{field}");
            let name = u.name.clone().unwrap_or_default();
            if name.is_empty() {
                v.problem(key("name"), "is required");
            } else if !names.insert(name.clone()) {
                v.problem(key("name"), format!("{name:?} is defined twice"));
            }
            if u.urls.is_empty() {
                v.problem(key("urls"), "needs at least one URL");
            }
            let mut urls = Vec::new();
            for (j, raw_url) in u.urls.iter().enumerate() {
                match parse_upstream_url(raw_url) {
                    Ok(uri) => urls.push(uri),
                    Err(msg) => v.problem(format!("upstreams[{i}].urls[{j}]"), msg),
                }
            }
            let tls = upstream_tls(&mut v, i, &u, &urls, base);
            upstreams.push(UpstreamConfig {
                name,
                urls,
                connect_timeout: Duration::from_millis(v.positive(
                    &key("connect_timeout_ms"),
                    u.connect_timeout_ms,
                    1_000,
                )),
                timeout: Duration::from_millis(v.positive(
                    &key("timeout_ms"),
                    u.timeout_ms,
                    30_000,
                )),
                tls,
            });
        }

        let mut routes = Vec::new();
        let mut prefixes = HashSet::new();
        if raw.routes.is_empty() {
            v.problem("routes", "at least one [[routes]] entry is needed");
        }
        for (i, r) in raw.routes.into_iter().enumerate() {
            let key = |field: &str| format!("routes[{i}].{field}");
            let prefix = r.prefix.unwrap_or_default();
            if !prefix.starts_with('/') {
                v.problem(key("prefix"), "must start with '/'");
            } else if !crate::path::is_route_prefix(&prefix) {
                // Requests are routed on their normal form: a prefix in
                // any other would never match, or match less than meant.
                v.problem(
                    key("prefix"),
                    "must be a normalized path of letters, digits, '-', '.', '_', '~' and '/' \
                     (no \"//\", no \".\" or \"..\" segments, no percent-encoding)",
                );
            } else if !prefixes.insert(prefix.clone()) {
                v.problem(key("prefix"), format!("{prefix:?} is used by two routes"));
            }
            let upstream_name = r.upstream.unwrap_or_default();
            let upstream = upstreams.iter().position(|u| u.name == upstream_name);
            if upstream.is_none() {
                v.problem(
                    key("upstream"),
                    format!("{upstream_name:?} names no [[upstreams]] entry"),
                );
            }
            let auth = match r.auth.as_deref().unwrap_or("required") {
                "required" => AuthMode::Required,
                "optional" => AuthMode::Optional,
                "none" => AuthMode::None,
                other => {
                    v.problem(
                        key("auth"),
                        format!("must be \"required\", \"optional\" or \"none\", not {other:?}"),
                    );
                    AuthMode::Required
                }
            };
            if let Some(redirect) = &r.login_redirect
                && (redirect.is_empty() || http::HeaderValue::from_str(redirect).is_err())
            {
                v.problem(key("login_redirect"), "must be a path or URL");
            }
            let mut problem = |k, m| v.problem(k, m);
            let audience = crate::assertion::audience(r.audience, &key("audience"), &mut problem);
            let forward_attributes = crate::assertion::forward_attributes(
                r.forward_attributes,
                &key("forward_attributes"),
                &mut problem,
            );
            if let Some(name) = &r.policies
                && name != crate::policy::chains::DEFAULT_CHAIN
                && !raw.chains.contains_key(name)
            {
                v.problem(
                    key("policies"),
                    format!(
                        "route {prefix:?} names the policy chain {name:?}, but there is no \
                         [[chains.{name}]] (chains: {})",
                        crate::policy::chains::names_for_message(raw.chains.keys())
                    ),
                );
            }
            routes.push(RouteConfig {
                policies: r.policies,
                prefix,
                upstream: upstream.unwrap_or(0),
                auth,
                login_redirect: r.login_redirect,
                case_insensitive: r.case_insensitive.unwrap_or(false),
                max_body_bytes: v.positive(
                    &key("max_body_bytes"),
                    r.max_body_bytes,
                    DEFAULT_MAX_BODY_BYTES,
                ),
                audience,
                forward_attributes,
            });
        }

        let policies = raw
            .policies
            .into_iter()
            .enumerate()
            .map(|(i, p)| policy_entry(&mut v, &format!("policies[{i}]"), p, base))
            .collect();
        let mut chains = BTreeMap::new();
        for (name, entries) in raw.chains {
            if let Err(m) = crate::policy::chains::validate_name(&name) {
                v.problem("chains", m);
            }
            let entries = entries
                .into_iter()
                .enumerate()
                .map(|(i, p)| policy_entry(&mut v, &format!("chains.{name}[{i}]"), p, base))
                .collect();
            chains.insert(name, entries);
        }
        let plugins = PluginsConfig {
            watch: raw.plugins.watch.unwrap_or(false),
            watch_interval: Duration::from_millis(v.positive(
                "plugins.watch_interval_ms",
                raw.plugins.watch_interval_ms,
                1_000,
            )),
            log_lines_per_second: v
                .positive(
                    "plugins.log_lines_per_second",
                    raw.plugins.log_lines_per_second,
                    100,
                )
                .min(u64::from(u32::MAX)) as u32,
        };

        if v.problems.is_empty() {
            Ok(Config {
                chains,
                source: file.to_string(),
                path: None,
                server,
                admin,
                forward_auth,
                store,
                session,
                log,
                upstreams,
                routes,
                policies,
                plugins,
            })
        } else {
            Err(ConfigError::Invalid {
                file: file.to_string(),
                problems: v.problems,
            })
        }
    }

    /// The durable store's URL with any password replaced, for messages.
    pub fn redacted_database_url(&self) -> String {
        redact_url(&self.store.database_url)
    }
}

impl StoreConfig {
    /// The Redis of the fast tier, its password(s) replaced (the seeds of
    /// a cluster, comma-separated); none for the in-process tier.
    pub fn redacted_redis(&self) -> Option<String> {
        match &self.redis_url {
            Some(url) => Some(redact_url(url)),
            None if self.redis_cluster_urls.is_empty() => None,
            None => Some(
                self.redis_cluster_urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        }
    }
}

/// Replaces the password in `scheme://user:password@host/...`.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
        && let Some((user, _)) = userinfo.split_once(':')
    {
        return format!("{scheme}://{user}:****@{host}");
    }
    url.to_string()
}

/// One policy plugin entry (`[[policies]]` or `[[chains.<name>]]`) at
/// `at` (e.g. `policies[0]`), checked.
fn policy_entry(v: &mut Validator, at: &str, p: RawPolicy, base: &Path) -> PolicyConfig {
    let key = |field: &str| format!("{at}.{field}");
    let plugin = match p.plugin {
        Some(path) if !path.is_empty() => base.join(path),
        _ => {
            v.problem(key("plugin"), "is required (the path of a .wasm file)");
            PathBuf::new()
        }
    };
    let config_json = match p.config {
        None => "{}".to_string(),
        Some(value @ figment::value::Value::Dict(..)) => {
            serde_json::to_string(&value).unwrap_or_else(|_| "{}".into())
        }
        Some(_) => {
            v.problem(
                key("config"),
                "must be a table, e.g. { ttl_seconds = 3600 }",
            );
            "{}".into()
        }
    };
    let on_error = match p.on_error.as_deref().unwrap_or("deny") {
        "deny" => OnError::Deny,
        "allow" => OnError::Allow,
        other => {
            v.problem(
                key("on_error"),
                format!("must be \"deny\" or \"allow\", not {other:?}"),
            );
            OnError::Deny
        }
    };
    let timeout_ms = v.positive(&key("timeout_ms"), p.timeout_ms, 20);
    if timeout_ms > 10_000 {
        v.problem(key("timeout_ms"), "must be at most 10000");
    }
    let memory_mb = v.positive(&key("memory_limit_mb"), p.memory_limit_mb, 16);
    let max_mb = (crate::policy::engine::MAX_PLUGIN_MEMORY >> 20) as u64;
    if memory_mb > max_mb {
        v.problem(key("memory_limit_mb"), format!("must be at most {max_mb}"));
    }
    PolicyConfig {
        plugin,
        config_json,
        on_error,
        timeout: Duration::from_millis(timeout_ms),
        memory_bytes: (memory_mb.min(max_mb) as usize) << 20,
    }
}

/// A TLS file's path, resolved against the config file's directory.
fn tls_path(base: &Path, raw: &Option<String>) -> Option<PathBuf> {
    raw.as_deref().map(|p| base.join(p))
}

#[derive(Default)]
struct RedisTlsFiles {
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
}

/// `store.redis_cluster_urls`: not with `store.redis_url`, at least one
/// seed, every one a `redis://` or every one a `rediss://` URL.
fn redis_cluster_urls(v: &mut Validator, store: &RawStore) {
    const KEY: &str = "store.redis_cluster_urls";
    let Some(urls) = &store.redis_cluster_urls else {
        return;
    };
    if store.redis_url.is_some() {
        v.problem(
            KEY,
            "store.redis_url and store.redis_cluster_urls are mutually exclusive: set \
             store.redis_url for one Redis server, or store.redis_cluster_urls for the seed \
             nodes of a Redis Cluster",
        );
    }
    if urls.is_empty() {
        v.problem(
            KEY,
            "must name at least one seed node of the cluster, e.g. [\"redis://10.0.0.1:6379\"]",
        );
    }
    for url in urls {
        if !url.starts_with("redis://") && !url.starts_with("rediss://") {
            v.problem(
                KEY,
                format!("{} must start with redis:// or rediss://", redact_url(url)),
            );
        }
    }
    let tls = |url: &String| url.starts_with("rediss://");
    if urls.iter().any(tls) && !urls.iter().all(tls) {
        v.problem(
            KEY,
            "mixes rediss:// and redis:// seeds: every node of a cluster is reached the same way",
        );
    }
}

/// `store.redis_ca_file` and the client certificate: only with a
/// `rediss://` URL, readable, and the certificate with its key.
fn redis_tls_files(v: &mut Validator, store: &RawStore, base: &Path) -> RedisTlsFiles {
    let files = RedisTlsFiles {
        ca_file: tls_path(base, &store.redis_ca_file),
        client_cert_file: tls_path(base, &store.redis_client_cert_file),
        client_key_file: tls_path(base, &store.redis_client_key_file),
    };
    let cluster = store.redis_cluster_urls.as_deref().unwrap_or_default();
    let (url_key, urls) = match &store.redis_url {
        Some(url) => ("store.redis_url", std::slice::from_ref(url)),
        None => ("store.redis_cluster_urls", cluster),
    };
    if urls.iter().any(|url| {
        url.split_once('#')
            .is_some_and(|(_, fragment)| fragment == "insecure")
    }) {
        // The redis crate would skip verifying the server's certificate:
        // anyone on the path could then read and forge sessions.
        v.problem(
            url_key,
            "the #insecure fragment turns off certificate verification, which the gateway \
             does not allow; trust a private CA with store.redis_ca_file instead",
        );
    }
    let url = urls.first().map_or("", String::as_str);
    let any = files.ca_file.is_some()
        || files.client_cert_file.is_some()
        || files.client_key_file.is_some();
    if any && !url.starts_with("rediss://") {
        for (key, set) in [
            ("store.redis_ca_file", files.ca_file.is_some()),
            (
                "store.redis_client_cert_file",
                files.client_cert_file.is_some(),
            ),
            (
                "store.redis_client_key_file",
                files.client_key_file.is_some(),
            ),
        ] {
            if set {
                v.problem(
                    key,
                    format!("applies only to Redis over TLS: {url_key} must start with rediss://"),
                );
            }
        }
        return files;
    }
    if let Some(ca) = &files.ca_file
        && let Err(e) = backend_tls::read_certificates(ca)
    {
        v.problem("store.redis_ca_file", e);
    }
    client_identity(
        v,
        files.client_cert_file.as_deref(),
        files.client_key_file.as_deref(),
        "store.redis_client_cert_file",
        "store.redis_client_key_file",
    );
    files
}

/// A client certificate and its key: both or neither, and usable together.
fn client_identity(
    v: &mut Validator,
    cert: Option<&Path>,
    key: Option<&Path>,
    cert_key: &str,
    key_key: &str,
) {
    match (cert, key) {
        (Some(cert), Some(key)) => {
            if let Err((which, e)) = backend_tls::check_client_identity(cert, key) {
                let name = if which == TlsFile::ClientCert {
                    cert_key
                } else {
                    key_key
                };
                v.problem(name, e);
            }
        }
        (Some(_), None) => v.problem(key_key, format!("is required with {cert_key}")),
        (None, Some(_)) => v.problem(cert_key, format!("is required with {key_key}")),
        (None, None) => {}
    }
}

/// `store.database_ca_file`: only for PostgreSQL with an `sslmode` that
/// verifies the server's certificate (with `prefer` or `require` the CA
/// would be silently ignored).
fn database_ca_file(
    v: &mut Validator,
    store: &RawStore,
    database_url: &str,
    base: &Path,
) -> Option<PathBuf> {
    let path = tls_path(base, &store.database_ca_file)?;
    const KEY: &str = "store.database_ca_file";
    if !database_url.starts_with("postgres") {
        v.problem(
            KEY,
            "applies only to PostgreSQL (a postgres:// store.database_url)",
        );
        return Some(path);
    }
    use sqlx::postgres::{PgConnectOptions, PgSslMode};
    match database_url.parse::<PgConnectOptions>() {
        Ok(options) => {
            if !matches!(
                options.get_ssl_mode(),
                PgSslMode::VerifyCa | PgSslMode::VerifyFull
            ) {
                v.problem(
                    KEY,
                    "needs sslmode=verify-full (or verify-ca) in store.database_url: \
                     with any other sslmode the server's certificate is not checked",
                );
            }
        }
        Err(e) => v.problem(
            "store.database_url",
            format!("{}: {e}", redact_url(database_url)),
        ),
    }
    if let Err(e) = backend_tls::read_certificates(&path) {
        v.problem(KEY, e);
    }
    Some(path)
}

/// The TLS client of an upstream with `https://` URLs, built once here.
fn upstream_tls(
    v: &mut Validator,
    i: usize,
    u: &RawUpstream,
    urls: &[Uri],
    base: &Path,
) -> Option<UpstreamTls> {
    let key = |field: &str| format!("upstreams[{i}].{field}");
    let ca_file = tls_path(base, &u.ca_file);
    let client_cert_file = tls_path(base, &u.client_cert_file);
    let client_key_file = tls_path(base, &u.client_key_file);
    let https = urls.iter().any(|url| url.scheme_str() == Some("https"));
    if !https {
        for (field, set) in [
            ("ca_file", ca_file.is_some()),
            ("client_cert_file", client_cert_file.is_some()),
            ("client_key_file", client_key_file.is_some()),
            ("server_name", u.server_name.is_some()),
        ] {
            if set {
                v.problem(
                    key(field),
                    "applies only to https:// URLs, and this upstream has none",
                );
            }
        }
        return None;
    }
    let server_name = match u.server_name.as_deref() {
        Some(name) => match backend_tls::server_name(name) {
            Ok(name) => Some(name),
            Err(e) => {
                v.problem(key("server_name"), e);
                None
            }
        },
        None => {
            // Each https:// URL's host is then the name to verify.
            for (j, url) in urls.iter().enumerate() {
                let host = url.host().unwrap_or("");
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                if url.scheme_str() == Some("https")
                    && let Err(e) = backend_tls::server_name(bare)
                {
                    v.problem(
                        format!("upstreams[{i}].urls[{j}]"),
                        format!("{e}: set upstreams[{i}].server_name to the certificate's name"),
                    );
                }
            }
            None
        }
    };
    let problems_before = v.problems.len();
    client_identity(
        v,
        client_cert_file.as_deref(),
        client_key_file.as_deref(),
        &key("client_cert_file"),
        &key("client_key_file"),
    );
    if v.problems.len() > problems_before {
        return None;
    }
    let built = backend_tls::upstream_tls(UpstreamTlsFiles {
        ca_file: ca_file.as_deref(),
        client_cert_file: client_cert_file.as_deref(),
        client_key_file: client_key_file.as_deref(),
        server_name,
    });
    match built {
        Ok(tls) => Some(tls),
        Err((which, e)) => {
            let field = match which {
                TlsFile::Ca => "ca_file",
                TlsFile::ClientCert => "client_cert_file",
                TlsFile::ClientKey => "client_key_file",
            };
            v.problem(key(field), e);
            None
        }
    }
}

/// Validates `[server.tls]`.
fn server_tls(
    v: &mut Validator,
    raw: RawServerTls,
    base: &Path,
    listen: SocketAddr,
) -> ServerTlsConfig {
    let default = TlsCertFiles {
        table: "server.tls".into(),
        server_names: Vec::new(),
        cert_file: v.file("server.tls.cert_file", raw.cert_file, base),
        key_file: v.file("server.tls.key_file", raw.key_file, base),
    };
    let mut seen = HashSet::new();
    let mut certificates = Vec::new();
    for (i, c) in raw.certificates.into_iter().enumerate() {
        let table = format!("server.tls.certificates[{i}]");
        let names_key = format!("{table}.server_names");
        if c.server_names.is_empty() {
            v.problem(
                &names_key,
                "needs at least one name, e.g. [\"www.example.com\"]",
            );
        }
        let mut server_names = Vec::new();
        for name in c.server_names {
            let normal = name.trim_end_matches('.').to_ascii_lowercase();
            if !is_server_name(&normal) {
                v.problem(
                    &names_key,
                    format!(
                        "{name:?} is not a DNS name (letters, digits, '-' and '.', \
                         optionally starting with \"*.\" for one label)"
                    ),
                );
            } else if !seen.insert(normal.clone()) {
                v.problem(&names_key, format!("{name:?} is named by two entries"));
            } else {
                server_names.push(normal);
            }
        }
        certificates.push(TlsCertFiles {
            cert_file: v.file(&format!("{table}.cert_file"), c.cert_file, base),
            key_file: v.file(&format!("{table}.key_file"), c.key_file, base),
            server_names,
            table,
        });
    }
    let redirect_listen = raw.redirect_listen.map(|text| {
        let addr = v.addr("server.tls.redirect_listen", Some(&text), "");
        if addr == listen && addr.port() != 0 {
            v.problem(
                "server.tls.redirect_listen",
                "must differ from server.listen (which serves HTTPS)",
            );
        }
        addr
    });
    let hsts_max_age = raw.hsts_max_age.map(Duration::from_secs);
    let hsts_include_subdomains = raw.hsts_include_subdomains.unwrap_or(false);
    if hsts_include_subdomains && hsts_max_age.is_none() {
        v.problem(
            "server.tls.hsts_include_subdomains",
            "needs server.tls.hsts_max_age (the header is sent only when that is set)",
        );
    }
    ServerTlsConfig {
        default,
        certificates,
        redirect_listen,
        hsts_max_age,
        hsts_include_subdomains,
        watch: raw.watch.unwrap_or(true),
        watch_interval: v.millis("server.tls.watch_interval_ms", raw.watch_interval_ms, 1_000),
    }
}

/// A lower-case DNS name as a client sends it in SNI, or `*.` and one.
fn is_server_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.bytes().any(|b| b.is_ascii_uppercase()) && is_dns_name(name)
}

/// A DNS host name (letters of either case, digits, `-` inside labels;
/// labels of 1 to 63 bytes; 253 in all): what a server name or a `Host`
/// may be before it is used in SNI or written into a redirect.
pub(crate) fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn parse_upstream_url(raw: &str) -> Result<Uri, String> {
    let uri: Uri = raw
        .parse()
        .map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        Some(other) => {
            return Err(format!(
                "{raw:?}: scheme {other:?} is not supported (only http:// and https://)"
            ));
        }
        None => return Err(format!("{raw:?} needs a scheme, e.g. http://host:port")),
    }
    if uri.authority().is_none() {
        return Err(format!("{raw:?} needs a host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{raw:?}: give scheme, host and port only; the request path goes upstream unchanged"
        ));
    }
    Ok(uri)
}

/// `server.trusted_proxies`: every entry a CIDR or an address.
fn trusted_proxies(v: &mut Validator, entries: Option<&[String]>) -> Vec<ipnet::IpNet> {
    let mut nets = Vec::new();
    for (i, entry) in entries.unwrap_or_default().iter().enumerate() {
        match crate::forwarded::TrustedProxies::parse_entry(entry) {
            Ok(net) => nets.push(net),
            Err(message) => v.problem(format!("server.trusted_proxies[{i}]"), message),
        }
    }
    nets
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
            origin: None,
        });
    }

    fn unknown(&mut self, table: &str, keys: &BTreeMap<String, figment::value::Value>) {
        for key in keys.keys() {
            let path = if table.is_empty() {
                key.clone()
            } else {
                format!("{table}.{key}")
            };
            self.problem(path, "unknown key");
        }
    }

    fn addr(&mut self, key: &str, value: Option<&str>, default: &str) -> SocketAddr {
        let text = value.unwrap_or(default);
        match text.parse() {
            Ok(addr) => addr,
            Err(_) => {
                self.problem(
                    key,
                    format!("{text:?} is not an address like 127.0.0.1:8080"),
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }

    /// A required file path, resolved against the config file's directory.
    fn file(&mut self, key: &str, value: Option<String>, base: &Path) -> PathBuf {
        match value {
            Some(path) if !path.is_empty() => base.join(path),
            _ => {
                self.problem(key, "is required (the path of a PEM file)");
                PathBuf::new()
            }
        }
    }

    /// A positive number of milliseconds.
    fn millis(&mut self, key: &str, value: Option<u64>, default: u64) -> Duration {
        Duration::from_millis(self.positive(key, value, default))
    }

    fn positive(&mut self, key: &str, value: Option<u64>, default: u64) -> u64 {
        match value {
            Some(0) => {
                self.problem(key, "must be greater than 0");
                default
            }
            Some(n) => n,
            None => default,
        }
    }

    fn header(&mut self, key: &str, value: Option<&str>, default: &str) -> HeaderName {
        let text = value.unwrap_or(default);
        match HeaderName::from_bytes(text.as_bytes()) {
            Ok(name) if !crate::headers::is_reserved(&name) => name,
            Ok(_) => {
                self.problem(
                    key,
                    format!("{text:?} is a header the gateway sets or removes itself"),
                );
                HeaderName::from_static("x-invalid")
            }
            Err(_) => {
                self.problem(key, format!("{text:?} is not a valid header name"));
                HeaderName::from_static("x-invalid")
            }
        }
    }
}

/// The config file named by the command line, or the default.
pub fn config_path(arg: Option<PathBuf>) -> PathBuf {
    arg.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[upstreams]]
        name = "app"
        urls = ["http://127.0.0.1:3000"]

        [[routes]]
        prefix = "/"
        upstream = "app"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml_str(MINIMAL).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.session.cookie_name, "sg_session");
        assert!(c.session.cookie_secure);
        assert_eq!(c.routes[0].auth, AuthMode::Required);
        assert_eq!(c.store.database_url, "sqlite://sessiongate.db");
        assert_eq!(c.session.default_ttl, Duration::from_secs(86_400));
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err =
            Config::from_toml_str(&format!("{MINIMAL}\n[server]\nlisten_port = 1\n")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("listen_port"), "{text}");
        assert!(text.contains("server"), "{text}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [server]
            listen = "nowhere"
            [admin]
            listen = "127.0.0.1:9090"
            [session]
            user_header = "bad header"
            [[upstreams]]
            name = "app"
            urls = ["ftp://x"]
            [[routes]]
            prefix = "api"
            upstream = "missing"
            auth = "sometimes"
        "#;
        let err = Config::from_toml_str(text).unwrap_err();
        let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "server.listen",
            "admin.token",
            "session.user_header",
            "upstreams[0].urls[0]",
            "routes[0].prefix",
            "routes[0].upstream",
            "routes[0].auth",
        ] {
            assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
        }
        assert!(err.to_string().starts_with("<inline>: key `"));
    }

    #[test]
    fn trusted_proxies_are_cidrs_or_addresses() {
        let c = Config::from_toml_str(&format!(
            "{MINIMAL}\n[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"fd00::/8\"]\nproxy_protocol = true\n"
        ))
        .unwrap();
        assert_eq!(c.server.trusted_proxies.len(), 3);
        assert!(c.server.proxy_protocol);
        assert!(
            Config::from_toml_str(MINIMAL)
                .unwrap()
                .server
                .trusted_proxies
                .is_empty()
        );

        let err = Config::from_toml_str(&format!(
            "{MINIMAL}\n[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"10.0.0.300\", \"lb.internal\"]\n"
        ))
        .unwrap_err();
        let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["server.trusted_proxies[1]", "server.trusted_proxies[2]"]
        );
        let text = err.to_string();
        assert!(
            text.contains("\"10.0.0.300\"") && text.contains("\"lb.internal\""),
            "{text}"
        );

        // The PROXY header is only ever read from trusted peers.
        let err = Config::from_toml_str(&format!("{MINIMAL}\n[server]\nproxy_protocol = true\n"))
            .unwrap_err();
        assert_eq!(err.problems()[0].key, "server.proxy_protocol");
    }

    #[test]
    fn route_prefixes_must_be_in_normal_form() {
        for bad in ["/app//", "/a/../b/", "/%61pp/", "/a:b/"] {
            let text = format!(
                "[[upstreams]]\nname = \"app\"\nurls = [\"http://127.0.0.1:3000\"]\n\
                 [[routes]]\nprefix = {bad:?}\nupstream = \"app\"\n"
            );
            let err = Config::from_toml_str(&text).unwrap_err();
            assert_eq!(err.problems()[0].key, "routes[0].prefix", "{bad:?}");
        }
    }

    #[test]
    fn upstream_urls_must_be_bare_http_or_https_origins() {
        assert!(parse_upstream_url("http://127.0.0.1:3000").is_ok());
        assert!(parse_upstream_url("http://127.0.0.1:3000/").is_ok());
        assert!(parse_upstream_url("https://example.com").is_ok());
        assert!(parse_upstream_url("ftp://example.com").is_err());
        assert!(parse_upstream_url("http://a/b").is_err());
        assert!(parse_upstream_url("127.0.0.1:3000").is_err());
    }

    #[test]
    fn an_https_host_that_is_no_server_name_needs_server_name() {
        let text = |extra: &str| {
            format!(
                "[[upstreams]]\nname = \"app\"\nurls = [\"https://exa_mple..test:8443\"]\n{extra}\n\
                 [[routes]]\nprefix = \"/\"\nupstream = \"app\"\n"
            )
        };
        let err = Config::from_toml_str(&text("")).unwrap_err();
        assert_eq!(err.problems()[0].key, "upstreams[0].urls[0]", "{err}");
        assert!(err.to_string().contains("server_name"), "{err}");
        let ok = Config::from_toml_str(&text("server_name = \"app.test\""));
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@db:5432/x"),
            "postgres://u:****@db:5432/x"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn server_tls_is_read_with_its_defaults() {
        let text = format!(
            "{MINIMAL}\n[server]\nlisten = \"127.0.0.1:8443\"\n[server.tls]\n\
             cert_file = \"certs/a.pem\"\nkey_file = \"/abs/a.key\"\n\
             [[server.tls.certificates]]\nserver_names = [\"API.example.com.\", \"*.example.org\"]\n\
             cert_file = \"b.pem\"\nkey_file = \"b.key\"\n"
        );
        let figment = Figment::new().merge(Toml::string(&text));
        let c = Config::from_figment(figment, "gateway.toml", Path::new("/etc/sg")).unwrap();
        let tls = c.server.tls.unwrap();
        assert_eq!(tls.default.cert_file, Path::new("/etc/sg/certs/a.pem"));
        assert_eq!(tls.default.key_file, Path::new("/abs/a.key"));
        assert!(tls.default.server_names.is_empty());
        assert_eq!(tls.certificates[0].table, "server.tls.certificates[0]");
        assert_eq!(
            tls.certificates[0].server_names,
            ["api.example.com", "*.example.org"]
        );
        assert!(tls.watch);
        assert_eq!(tls.watch_interval, Duration::from_secs(1));
        assert_eq!(tls.hsts_max_age, None);
        assert_eq!(tls.redirect_listen, None);
        assert!(Config::from_toml_str(MINIMAL).unwrap().server.tls.is_none());
    }

    #[test]
    fn every_server_tls_problem_names_its_key() {
        let text = format!(
            "{MINIMAL}\n[server]\nlisten = \"127.0.0.1:8443\"\n[server.tls]\n\
             certfile = \"typo\"\nredirect_listen = \"127.0.0.1:8443\"\n\
             hsts_include_subdomains = true\nwatch_interval_ms = 0\n\
             [[server.tls.certificates]]\nserver_names = [\"bad name\", \"a.test\"]\n\
             cert_file = \"x\"\nkey_file = \"y\"\nextra = 1\n\
             [[server.tls.certificates]]\nserver_names = [\"A.test\", \"*\", \"-a.test\"]\n\
             [[server.tls.certificates]]\nserver_names = []\ncert_file = \"x\"\nkey_file = \"y\"\n"
        );
        let err = Config::from_toml_str(&text).unwrap_err();
        let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "server.tls.certfile",
            "server.tls.cert_file",
            "server.tls.key_file",
            "server.tls.redirect_listen",
            "server.tls.hsts_include_subdomains",
            "server.tls.watch_interval_ms",
            "server.tls.certificates[0].server_names",
            "server.tls.certificates[0].extra",
            "server.tls.certificates[1].server_names",
            "server.tls.certificates[1].cert_file",
            "server.tls.certificates[1].key_file",
            "server.tls.certificates[2].server_names",
        ] {
            assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
        }
        let text = err.to_string();
        assert!(
            text.contains("\"A.test\" is named by two entries"),
            "{text}"
        );
        assert!(text.contains("\"bad name\" is not a DNS name"), "{text}");
        assert_eq!(
            keys.iter()
                .filter(|k| **k == "server.tls.certificates[1].server_names")
                .count(),
            3,
            "{text}"
        );
    }

    #[test]
    fn identity_headers_cannot_be_gateway_headers() {
        let err = Config::from_toml_str(&format!(
            "{MINIMAL}\n[session]\nuser_header = \"x-forwarded-for\"\n"
        ))
        .unwrap_err();
        assert_eq!(err.problems()[0].key, "session.user_header");
    }
}
