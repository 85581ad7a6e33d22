//! Live config: the config file read again (`POST /v1/config/reload`,
//! SIGHUP, the `plugins.watch` file watcher) and swapped in whole.
//!
//! What a reload may change is what the request path is built from:
//! routes, upstreams, the session settings, `server.body_read_timeout_ms`
//! and the policy chain. A new [`Gateway`] is built per worker from the
//! new config and stored into that worker's slot ([`ArcSwap`]); the
//! proxy loads its worker's slot once per request, so a request runs
//! against one gateway from start to end (old or new, never a mix), and
//! a keep-alive connection's next request already sees the new one.
//!
//! What is fixed at start (the listeners and their connection limits, the
//! stores, the token key, the worker count, logging, the plugin watcher's
//! own settings) is compared with the running config
//! ([`restart_required`]): a change to any of it refuses the whole reload,
//! naming the keys, and the running config stays. So does a file that
//! fails validation, or a policy chain that fails to load.
//!
//! An upstream whose name and settings (URLs, timeouts, TLS keys and the
//! TLS files' contents) are unchanged is carried over into the new
//! gateway as it is, with its warm connection pool; a changed one starts
//! with a new pool, and the old pool goes once the last request that
//! holds the old gateway ends.

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::config::{Config, UpstreamConfig};
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::proxy::Gateway;
use crate::store::SessionStore;
use crate::token::TokenKey;
use crate::upstream::Upstream;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the gateway was not started from a config file: nothing to reload")]
    NoFile,
    #[error("{0}")]
    Invalid(String),
    #[error("{} changed: restart to apply", .0.join(", "))]
    RestartRequired(Vec<&'static str>),
    #[error("the policy chain did not load: {0}")]
    Policies(String),
}

impl ReloadError {
    /// The error code of the admin API's 422, and the metric's `result`.
    pub fn code(&self) -> &'static str {
        match self {
            ReloadError::NoFile | ReloadError::Policies(_) => "reload_failed",
            ReloadError::Invalid(_) => "invalid_config",
            ReloadError::RestartRequired(_) => "restart_required",
        }
    }

    fn result(&self) -> &'static str {
        match self {
            ReloadError::NoFile | ReloadError::Policies(_) => "failed",
            ReloadError::Invalid(_) => "invalid",
            ReloadError::RestartRequired(_) => "restart_required",
        }
    }
}

/// What a reload changed, one line per part (`routes: added /api/`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reloaded {
    pub changed: Vec<String>,
}

/// The running config and what a reload swaps: one slot per gateway
/// (the admin API's, and each worker's).
pub struct Reloader {
    path: Option<PathBuf>,
    /// Held for a whole reload, so two never interleave.
    state: tokio::sync::Mutex<Running>,
    slots: Vec<Arc<ArcSwap<Gateway>>>,
    store: SessionStore,
    token_key: TokenKey,
    metrics: Arc<Metrics>,
    policies: Arc<Policies>,
}

struct Running {
    config: Arc<Config>,
    /// One per `config.upstreams`, as read when that config was loaded.
    upstreams: Vec<UpstreamPrint>,
}

impl Reloader {
    /// `slots[0]` is the gateway the admin API uses (in the one-worker
    /// case the one that serves too).
    pub(crate) fn new(
        config: Arc<Config>,
        slots: Vec<Arc<ArcSwap<Gateway>>>,
        token_key: TokenKey,
    ) -> Reloader {
        let first = slots[0].load();
        let (store, metrics, policies) = (
            first.store().clone(),
            first.metrics().clone(),
            first.policies().clone(),
        );
        drop(first);
        Reloader {
            path: config.path.clone(),
            state: tokio::sync::Mutex::new(Running {
                upstreams: config.upstreams.iter().map(UpstreamPrint::of).collect(),
                config,
            }),
            slots,
            store,
            token_key,
            metrics,
            policies,
        }
    }

    /// The gateway the admin API creates sessions with: the current one.
    pub fn current(&self) -> Arc<Gateway> {
        self.slots[0].load_full()
    }

    /// Whether there is a file to reload.
    pub(crate) fn has_file(&self) -> bool {
        self.path.is_some()
    }

    /// Reads the config file again and, if it is valid and changes
    /// nothing that needs a restart, swaps every gateway for one built
    /// from it (the policy chain reloaded first). On any error nothing
    /// changes. The outcome is logged and counted.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let result = self.try_reload().await;
        match &result {
            Ok(done) => {
                self.metrics.config_reload("ok");
                tracing::info!(changed = ?done.changed, "config reloaded");
            }
            Err(e) => {
                self.metrics.config_reload(e.result());
                tracing::warn!(error = %e, result = e.result(),
                    "config reload refused; the previous config stays in service");
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<Reloaded, ReloadError> {
        let mut running = self.state.lock().await;
        let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
        let new = Config::load(path).map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let keys = restart_required(&running.config, &new);
        if !keys.is_empty() {
            return Err(ReloadError::RestartRequired(keys));
        }
        let new = Arc::new(new);
        let prints: Vec<UpstreamPrint> = new.upstreams.iter().map(UpstreamPrint::of).collect();
        let changed = live_changes(&running.config, &new, &running.upstreams, &prints);
        // Built before the chain is touched: building cannot fail, so
        // once the chain has loaded, the swap below always happens.
        let gateways: Vec<Gateway> = self
            .slots
            .iter()
            .map(|slot| {
                let old = slot.load();
                let upstreams = carried_over(&running, &old, &new, &prints);
                Gateway::with_upstreams(
                    new.clone(),
                    self.store.clone(),
                    self.token_key.clone(),
                    self.metrics.clone(),
                    self.policies.clone(),
                    Some(upstreams),
                )
                // One signer across reloads: its key is not in the config.
                .with_assertions(old.forwarder().assertions().cloned())
            })
            .collect();
        // Every chain of the new config, loaded and swapped at once; the
        // routes that name them follow right below.
        self.policies
            .reload_from(&new)
            .await
            .map_err(|e| ReloadError::Policies(e.to_string()))?;
        for (slot, gateway) in self.slots.iter().zip(gateways) {
            slot.store(Arc::new(gateway));
        }
        running.config = new;
        running.upstreams = prints;
        Ok(Reloaded { changed })
    }
}

/// The upstreams of a gateway for `new`: the old gateway's own where the
/// upstream is unchanged (its pool stays warm), new ones elsewhere.
fn carried_over(
    running: &Running,
    old: &Gateway,
    new: &Config,
    prints: &[UpstreamPrint],
) -> Vec<Arc<Upstream>> {
    let old_upstreams = old.forwarder().upstreams();
    new.upstreams
        .iter()
        .zip(prints)
        .map(|(config, print)| {
            running
                .upstreams
                .iter()
                .position(|p| p == print)
                .and_then(|i| old_upstreams.get(i))
                .cloned()
                .unwrap_or_else(|| Upstream::new(config))
        })
        .collect()
}

/// What makes two upstream configs the same upstream: everything
/// configured (name, URLs, timeouts, TLS keys) and the contents of its TLS
/// files (a rotated CA or client certificate under the same path is a
/// change).
#[derive(Debug, Clone, PartialEq, Eq)]
struct UpstreamPrint {
    name: String,
    settings: String,
    files: [u8; 32],
}

impl UpstreamPrint {
    fn of(config: &UpstreamConfig) -> UpstreamPrint {
        let mut files = Sha256::new();
        if let Some(tls) = &config.tls {
            for path in [&tls.ca_file, &tls.client_cert_file].into_iter().flatten() {
                // An unreadable file hashes as empty: the config was just
                // validated with it, so this is a race with its removal,
                // and the next reload sees it.
                let bytes = std::fs::read(path).unwrap_or_default();
                files.update((bytes.len() as u64).to_le_bytes());
                files.update(&bytes);
            }
        }
        UpstreamPrint {
            name: config.name.clone(),
            // The key's Debug is redacted: where the files are, not them.
            settings: format!("{config:?}"),
            files: files.finalize().into(),
        }
    }
}

/// Whether two values read the same (for the settings without
/// `PartialEq`, all of which have a plain `Debug`).
fn same<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// The keys, as written in the file, whose change needs a restart: what
/// the listeners, the stores, the token key, the workers, logging and the
/// file watcher were built from at start.
pub(crate) fn restart_required(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |key: &'static str, unchanged: bool| {
        if !unchanged {
            keys.push(key);
        }
    };
    let (o, n) = (&old.server, &new.server);
    check("server.listen", o.listen == n.listen);
    // Unset, it is whatever the start made of it (the binary: one per
    // core; the library: one), so only a number that differs is a change.
    check(
        "server.worker_threads",
        n.worker_threads
            .is_none_or(|n| Some(n) == o.worker_threads.or(Some(1))),
    );
    check(
        "server.max_connections",
        o.max_connections == n.max_connections,
    );
    check(
        "server.max_connections_per_client",
        o.max_connections_per_client == n.max_connections_per_client,
    );
    check(
        "server.shutdown_grace_ms",
        o.shutdown_grace == n.shutdown_grace,
    );
    check(
        "server.first_byte_timeout_ms",
        o.first_byte_timeout == n.first_byte_timeout,
    );
    check(
        "server.header_read_timeout_ms",
        o.header_read_timeout == n.header_read_timeout,
    );
    check("server.idle_timeout_ms", o.idle_timeout == n.idle_timeout);
    check(
        "server.http2_keepalive_interval_ms",
        o.http2_keepalive_interval == n.http2_keepalive_interval,
    );
    check(
        "server.http2_keepalive_timeout_ms",
        o.http2_keepalive_timeout == n.http2_keepalive_timeout,
    );
    check(
        "server.http2_max_concurrent_streams",
        o.http2_max_concurrent_streams == n.http2_max_concurrent_streams,
    );
    check(
        "server.max_upstream_per_connection",
        o.max_upstream_per_connection == n.max_upstream_per_connection,
    );
    // The listener's edge (the PROXY header, the per-client cap's
    // exemption) is built from these at start, not only the gateway.
    check(
        "server.trusted_proxies",
        o.trusted_proxies == n.trusted_proxies,
    );
    check(
        "server.proxy_protocol",
        o.proxy_protocol == n.proxy_protocol,
    );
    match (&o.tls, &n.tls) {
        (None, None) => {}
        (Some(o), Some(n)) => {
            check(
                "server.tls.cert_file",
                o.default.cert_file == n.default.cert_file,
            );
            check(
                "server.tls.key_file",
                o.default.key_file == n.default.key_file,
            );
            check("server.tls.certificates", o.certificates == n.certificates);
            check(
                "server.tls.redirect_listen",
                o.redirect_listen == n.redirect_listen,
            );
            check("server.tls.hsts_max_age", o.hsts_max_age == n.hsts_max_age);
            check(
                "server.tls.hsts_include_subdomains",
                o.hsts_include_subdomains == n.hsts_include_subdomains,
            );
            check("server.tls.watch", o.watch == n.watch);
            check(
                "server.tls.watch_interval_ms",
                o.watch_interval == n.watch_interval,
            );
        }
        _ => check("server.tls", false),
    }
    match (&old.admin, &new.admin) {
        (None, None) => {}
        (Some(o), Some(n)) => {
            check("admin.listen", o.listen == n.listen);
            check("admin.token", o.token == n.token);
            check(
                "admin.max_connections",
                o.max_connections == n.max_connections,
            );
        }
        _ => check("admin", false),
    }
    match (&old.forward_auth, &new.forward_auth) {
        (None, None) => {}
        // Its listener, and the callers it answers as, are set up once.
        (Some(o), Some(n)) => {
            check("forward_auth.listen", o.listen == n.listen);
            check("forward_auth.caller", o.caller == n.caller);
            check("forward_auth.path_prefix", o.path_prefix == n.path_prefix);
            check("forward_auth.allow_from", o.allow_from == n.allow_from);
            check(
                "forward_auth.max_connections",
                o.max_connections == n.max_connections,
            );
        }
        _ => check("forward_auth", false),
    }
    let (o, n) = (&old.store, &new.store);
    check("store.redis_url", o.redis_url == n.redis_url);
    check(
        "store.redis_cluster_urls",
        o.redis_cluster_urls == n.redis_cluster_urls,
    );
    check("store.database_url", o.database_url == n.database_url);
    check(
        "store.local_cache_ttl_ms",
        o.local_cache_ttl == n.local_cache_ttl,
    );
    check("store.migrate", o.migrate == n.migrate);
    check(
        "store.memory_capacity",
        o.memory_capacity == n.memory_capacity,
    );
    check(
        "store.sweep_interval_seconds",
        o.sweep_interval == n.sweep_interval,
    );
    check(
        "store.max_connections",
        o.max_connections == n.max_connections,
    );
    check(
        "store.min_connections",
        o.min_connections == n.min_connections,
    );
    check(
        "store.connect_timeout_ms",
        o.connect_timeout == n.connect_timeout,
    );
    check("store.redis_prefix", o.redis_prefix == n.redis_prefix);
    check("store.redis_timeout_ms", o.redis_timeout == n.redis_timeout);
    check("store.redis_retry_ms", o.redis_retry == n.redis_retry);
    check(
        "store.activity_flush_ms",
        o.activity_flush == n.activity_flush,
    );
    check(
        "store.negative_cache_capacity",
        o.negative_cache_capacity == n.negative_cache_capacity,
    );
    check(
        "store.negative_cache_ttl_ms",
        o.negative_cache_ttl == n.negative_cache_ttl,
    );
    check(
        "store.activity_buffer_capacity",
        o.activity_buffer_capacity == n.activity_buffer_capacity,
    );
    check("store.redis_ca_file", o.redis_ca_file == n.redis_ca_file);
    check(
        "store.redis_client_cert_file",
        o.redis_client_cert_file == n.redis_client_cert_file,
    );
    check(
        "store.redis_client_key_file",
        o.redis_client_key_file == n.redis_client_key_file,
    );
    check(
        "store.database_ca_file",
        o.database_ca_file == n.database_ca_file,
    );
    check(
        "session.token_secret",
        old.session.token_secret == new.session.token_secret,
    );
    // The signer (its key, lifetime, claims) is built once at start and
    // shared by every gateway; its key rotates by POST /v1/keys/reload.
    check(
        "session.assertion",
        same(&old.session.assertion, &new.session.assertion),
    );
    check("log.format", old.log.format == new.log.format);
    check("log.level", old.log.level == new.log.level);
    let (o, n) = (&old.plugins, &new.plugins);
    check("plugins.watch", o.watch == n.watch);
    check(
        "plugins.watch_interval_ms",
        o.watch_interval == n.watch_interval,
    );
    check(
        "plugins.log_lines_per_second",
        o.log_lines_per_second == n.log_lines_per_second,
    );
    keys
}

/// What a reload from `old` to `new` changes of what reloads, for the
/// log and the admin API's answer.
fn live_changes(
    old: &Config,
    new: &Config,
    old_prints: &[UpstreamPrint],
    new_prints: &[UpstreamPrint],
) -> Vec<String> {
    let mut changed = Vec::new();
    let mut part = |what: &str, items: Vec<String>| {
        if !items.is_empty() {
            changed.push(format!("{what}: {}", items.join(", ")));
        }
    };

    let mut upstreams = Vec::new();
    for p in new_prints {
        match old_prints.iter().find(|o| o.name == p.name) {
            None => upstreams.push(format!("added {}", p.name)),
            Some(o) if o != p => upstreams.push(format!("changed {} (new pool)", p.name)),
            Some(_) => {}
        }
    }
    for o in old_prints {
        if !new_prints.iter().any(|p| p.name == o.name) {
            upstreams.push(format!("removed {}", o.name));
        }
    }
    part("upstreams", upstreams);

    // A route is its prefix and case rule; the rest of it is its settings.
    let key = |r: &crate::config::RouteConfig| (r.prefix.clone(), r.case_insensitive);
    let settings = |c: &Config, r: &crate::config::RouteConfig| {
        let upstream = c.upstreams.get(r.upstream).map(|u| u.name.as_str());
        format!(
            "{upstream:?} {:?} {:?} {} {:?} {:?} {:?}",
            r.auth,
            r.login_redirect,
            r.max_body_bytes,
            r.audience,
            r.forward_attributes,
            r.policies
        )
    };
    let mut routes = Vec::new();
    for r in &new.routes {
        match old.routes.iter().find(|o| key(o) == key(r)) {
            None => routes.push(format!("added {}", r.prefix)),
            Some(o) if settings(old, o) != settings(new, r) => {
                routes.push(format!("changed {}", r.prefix));
            }
            Some(_) => {}
        }
    }
    for o in &old.routes {
        if !new.routes.iter().any(|r| key(r) == key(o)) {
            routes.push(format!("removed {}", o.prefix));
        }
    }
    part("routes", routes);

    let (o, n) = (&old.session, &new.session);
    let mut session = Vec::new();
    for (key, unchanged) in [
        ("cookie_name", o.cookie_name == n.cookie_name),
        ("cookie_secure", o.cookie_secure == n.cookie_secure),
        ("user_header", o.user_header == n.user_header),
        ("session_header", o.session_header == n.session_header),
        ("default_ttl_seconds", o.default_ttl == n.default_ttl),
        ("forward_token", o.forward_token == n.forward_token),
        (
            "touch_interval_seconds",
            o.touch_interval == n.touch_interval,
        ),
        (
            "lookalike_headers",
            o.lookalike_headers == n.lookalike_headers,
        ),
    ] {
        if !unchanged {
            session.push(key.to_string());
        }
    }
    part("session", session);
    if old.server.body_read_timeout != new.server.body_read_timeout {
        part("server", vec!["body_read_timeout_ms".into()]);
    }
    if !same(&old.policies, &new.policies) {
        part("policies", vec!["[[policies]]".into()]);
    }
    let mut chains = Vec::new();
    for (name, c) in &new.chains {
        match old.chains.get(name) {
            None => chains.push(format!("added {name}")),
            Some(o) if !same(o, c) => chains.push(format!("changed {name}")),
            Some(_) => {}
        }
    }
    for name in old.chains.keys() {
        if !new.chains.contains_key(name) {
            chains.push(format!("removed {name}"));
        }
    }
    part("chains", chains);
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"

[admin]
listen = "127.0.0.1:9090"
token = "0123456789abcdef0123"

[store]
database_url = "sqlite://x.db"

[[upstreams]]
name = "app"
urls = ["http://127.0.0.1:3000"]

[[upstreams]]
name = "other"
urls = ["http://127.0.0.1:3001"]

[[routes]]
prefix = "/"
upstream = "app"
"#;

    fn config(text: &str) -> Config {
        Config::from_toml_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// BASE with `from` replaced by `to` (which must be there).
    fn edited(from: &str, to: &str) -> Config {
        assert!(BASE.contains(from), "{from}");
        config(&BASE.replacen(from, to, 1))
    }

    fn prints(c: &Config) -> Vec<UpstreamPrint> {
        c.upstreams.iter().map(UpstreamPrint::of).collect()
    }

    fn changes(old: &Config, new: &Config) -> Vec<String> {
        live_changes(old, new, &prints(old), &prints(new))
    }

    #[test]
    fn the_same_config_needs_nothing_and_changes_nothing() {
        let (a, b) = (config(BASE), config(BASE));
        assert!(restart_required(&a, &b).is_empty());
        assert!(changes(&a, &b).is_empty());
    }

    #[test]
    fn listeners_stores_and_the_token_key_need_a_restart() {
        let old = config(BASE);
        for (from, to, key) in [
            ("127.0.0.1:8080", "127.0.0.1:8081", "server.listen"),
            ("127.0.0.1:9090", "127.0.0.1:9091", "admin.listen"),
            (
                "0123456789abcdef0123",
                "0123456789abcdef9999",
                "admin.token",
            ),
            ("sqlite://x.db", "sqlite://y.db", "store.database_url"),
            (
                "[store]\n",
                "[forward_auth]\nlisten = \"127.0.0.1:9091\"\n[store]\n",
                "forward_auth",
            ),
            (
                "[server]\n",
                "[server]\nmax_connections = 5\n",
                "server.max_connections",
            ),
            (
                "[server]\n",
                "[server]\ntrusted_proxies = [\"10.0.0.0/8\"]\n",
                "server.trusted_proxies",
            ),
            (
                "[store]\n",
                "[store]\nredis_url = \"redis://127.0.0.1:6379\"\n",
                "store.redis_url",
            ),
            (
                "[store]\n",
                "[session]\ntoken_secret = \"0123456789abcdef0123456789abcdef\"\n[store]\n",
                "session.token_secret",
            ),
            (
                "[store]\n",
                "[log]\nlevel = \"debug\"\n[store]\n",
                "log.level",
            ),
            (
                "[store]\n",
                "[plugins]\nwatch = true\n[store]\n",
                "plugins.watch",
            ),
        ] {
            let new = edited(from, to);
            assert_eq!(restart_required(&old, &new), vec![key], "{to}");
            // Both ways: a key removed is as much a change as one added.
            assert_eq!(restart_required(&new, &old), vec![key], "{to}");
        }
    }

    #[test]
    fn worker_threads_unset_is_what_the_start_made_of_it() {
        let workers = |n: Option<usize>| {
            let mut c = config(BASE);
            c.server.worker_threads = n;
            c
        };
        // The binary resolves unset to the cores; the library to one.
        assert!(restart_required(&workers(Some(8)), &workers(None)).is_empty());
        assert!(restart_required(&workers(None), &workers(Some(1))).is_empty());
        assert!(restart_required(&workers(Some(8)), &workers(Some(8))).is_empty());
        for (old, new) in [(Some(8), Some(2)), (None, Some(2)), (Some(2), Some(1))] {
            assert_eq!(
                restart_required(&workers(old), &workers(new)),
                vec!["server.worker_threads"],
                "{old:?} → {new:?}"
            );
        }
    }

    #[test]
    fn every_changed_key_is_named() {
        let old = config(BASE);
        let new = config(&BASE.replacen("127.0.0.1:8080", "127.0.0.1:1", 1).replacen(
            "127.0.0.1:9090",
            "127.0.0.1:2",
            1,
        ));
        let keys = restart_required(&old, &new);
        assert_eq!(keys, vec!["server.listen", "admin.listen"]);
        let message = ReloadError::RestartRequired(keys).to_string();
        assert_eq!(
            message,
            "server.listen, admin.listen changed: restart to apply"
        );
    }

    #[test]
    fn an_admin_listener_added_or_removed_needs_a_restart() {
        let without = config(&BASE.replacen(
            "[admin]\nlisten = \"127.0.0.1:9090\"\ntoken = \"0123456789abcdef0123\"\n",
            "",
            1,
        ));
        assert_eq!(restart_required(&config(BASE), &without), vec!["admin"]);
    }

    #[test]
    fn routes_upstreams_and_session_settings_reload_live() {
        let old = config(BASE);
        let new = config(&format!(
            "{}\n[[routes]]\nprefix = \"/api/\"\nupstream = \"other\"\nauth = \"none\"\n",
            BASE.replacen(
                "[store]\n",
                "[session]\nuser_header = \"x-who\"\n[store]\n",
                1
            )
            .replacen("127.0.0.1:3001", "127.0.0.1:3002", 1)
            .replacen(
                "prefix = \"/\"\nupstream = \"app\"",
                "prefix = \"/\"\nupstream = \"app\"\nauth = \"optional\"",
                1
            )
        ));
        assert!(restart_required(&old, &new).is_empty());
        assert_eq!(
            changes(&old, &new),
            vec![
                "upstreams: changed other (new pool)".to_string(),
                "routes: changed /, added /api/".to_string(),
                "session: user_header".to_string(),
            ]
        );
    }

    #[test]
    fn an_upstream_is_the_same_by_name_and_settings_not_by_place() {
        let old = config(BASE);
        // The two swapped in the file: both kept.
        let swapped = config(
            r#"
[server]
listen = "127.0.0.1:8080"
[admin]
listen = "127.0.0.1:9090"
token = "0123456789abcdef0123"
[store]
database_url = "sqlite://x.db"
[[upstreams]]
name = "other"
urls = ["http://127.0.0.1:3001"]
[[upstreams]]
name = "app"
urls = ["http://127.0.0.1:3000"]
[[routes]]
prefix = "/"
upstream = "app"
"#,
        );
        let (o, n) = (prints(&old), prints(&swapped));
        assert_eq!(n[0], o[1]);
        assert_eq!(n[1], o[0]);
        assert!(changes(&old, &swapped).is_empty());
        // A timeout is part of it.
        let slower = edited(
            "urls = [\"http://127.0.0.1:3000\"]\n",
            "urls = [\"http://127.0.0.1:3000\"]\ntimeout_ms = 5\n",
        );
        assert_ne!(prints(&slower)[0], o[0]);
        assert_eq!(prints(&slower)[1], o[1]);
        // So is the name: the same URL under another name is another
        // upstream.
        let renamed = edited("name = \"other\"", "name = \"third\"");
        assert_ne!(prints(&renamed)[1], o[1]);
        assert_eq!(
            changes(&old, &renamed),
            vec!["upstreams: added third, removed other".to_string()]
        );
    }

    #[test]
    fn an_upstreams_tls_file_rewritten_in_place_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let pem = || {
            rcgen::generate_simple_self_signed(vec!["localhost".into()])
                .unwrap()
                .cert
                .pem()
        };
        std::fs::write(&ca, pem()).unwrap();
        let text = BASE.replacen(
            "urls = [\"http://127.0.0.1:3000\"]\n",
            &format!(
                "urls = [\"https://localhost:3000\"]\nca_file = {:?}\n",
                ca.display().to_string()
            ),
            1,
        );
        let before = prints(&config(&text));
        assert_eq!(before, prints(&config(&text)));
        std::fs::write(&ca, pem()).unwrap();
        let after = prints(&config(&text));
        assert_ne!(after[0], before[0]);
        assert_eq!(after[1], before[1]);
    }

    #[test]
    fn a_routes_assertion_settings_are_route_changes() {
        let old = config(BASE);
        let new = edited(
            "prefix = \"/\"\nupstream = \"app\"",
            "prefix = \"/\"\nupstream = \"app\"\naudience = \"app\"",
        );
        assert!(restart_required(&old, &new).is_empty());
        assert_eq!(changes(&old, &new), vec!["routes: changed /".to_string()]);
    }

    #[test]
    fn policies_and_the_body_timeout_are_live_changes() {
        let old = config(BASE);
        let new = edited("[server]\n", "[server]\nbody_read_timeout_ms = 5\n");
        assert!(restart_required(&old, &new).is_empty());
        assert_eq!(
            changes(&old, &new),
            vec!["server: body_read_timeout_ms".to_string()]
        );
    }

    #[test]
    fn refusals_have_their_codes() {
        assert_eq!(
            ReloadError::RestartRequired(vec!["server.listen"]).code(),
            "restart_required"
        );
        assert_eq!(ReloadError::Invalid("x".into()).code(), "invalid_config");
        assert_eq!(ReloadError::Policies("x".into()).code(), "reload_failed");
        assert_eq!(ReloadError::NoFile.code(), "reload_failed");
    }
}
