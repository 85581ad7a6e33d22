//! Session policies: WebAssembly components, run by wasmtime, that decide
//! how long a session lives, how activity extends it and which sessions
//! are evicted.
//!
//! * [`engine`] — the one shared wasmtime engine and its epoch ticker.
//! * [`plugin`] — one plugin: compile, instance pool, limits, failures.
//! * [`chains`] — the named chains (`[[chains.<name>]]`) next to the
//!   default one (`[[policies]]`), loaded together as one set.
//! * this module — a chain's plugins run in order, the decisions
//!   checked against what a policy may decide, and [`Policies`], which
//!   holds the set of chains behind an atomic pointer so that a reload
//!   swaps every chain at once while requests already running finish on
//!   the old ones.
//!
//! The interface is `plugins/wit/<version>/policy.wit`: a plugin exports
//! either `sessiongate:policy@0.1.0` (every hook gets its data as
//! arguments) or `sessiongate:policy@0.2.0` (the access hook gets the
//! session's times as numbers and asks the host for any string it needs);
//! [`plugin`] finds out which at load and serves both.

pub mod chains;
pub mod engine;
mod lograte;
pub mod plugin;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::StatusCode;
use uuid::Uuid;

use crate::config::{Config, OnError, PolicyConfig};
use crate::metrics::Metrics;
use crate::session::{self, Session};
use chains::{ChainConfigs, ChainSet, ChainsInfo, DEFAULT_CHAIN};
use plugin::{Limits, LoadError, Plugin, PluginFailure};

/// The host side of `plugins/wit/<version>/policy.wit`, one module per
/// interface version.
pub mod bindings {
    /// `sessiongate:policy@0.1.0`.
    pub mod v1 {
        wasmtime::component::bindgen!({
            path: "plugins/wit/0.1.0",
            world: "policy",
            // Exports are called with `call_async`, so that a long call
            // yields to the scheduler (see `plugin`); the `log` import
            // stays sync.
            exports: { default: async },
        });
    }

    /// `sessiongate:policy@0.2.0`.
    pub mod v2 {
        wasmtime::component::bindgen!({
            path: "plugins/wit/0.2.0",
            world: "policy",
            exports: { default: async },
            // An import can trap: one that would overrun the call's
            // budget for host work ends the call as a time-out.
            imports: { default: trappable },
        });
    }
}

use bindings::v1::sessiongate::policy::types as wit;

/// The furthest in the future a policy may set an expiry.
pub const MAX_LIFETIME_MS: i64 = 400 * 24 * 3600 * 1000;
/// Longest denial reason passed on to a client.
const MAX_REASON: usize = 256;

/// What the request being authenticated looks like to a policy: the WIT
/// record itself, so that handing it to a plugin copies nothing more.
pub type RequestInfo = wit::RequestInfo;

/// A refusal by a policy, or a failed policy in `deny` mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Denied { status: StatusCode, reason: String },
    Failed { plugin: String },
}

/// The chain's verdict on an authenticated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessOutcome {
    Allow,
    /// Allow, and the session now expires at this time.
    Extend(i64),
    Refuse(Refusal),
}

struct Loaded {
    plugin: Plugin,
    on_error: OnError,
    loaded_at: SystemTime,
}

/// One chain's plugins in order, loaded.
pub struct PolicyChain {
    /// `default` or the `[chains.<name>]` name, interned (a metric label).
    name: &'static str,
    plugins: Vec<Loaded>,
    metrics: Arc<Metrics>,
}

/// What `GET /v1/policies` shows of one plugin.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginInfo {
    pub plugin: String,
    pub sha256: String,
    pub loaded_at: String,
    pub on_error: &'static str,
    pub hooks: Vec<&'static str>,
    /// The `sessiongate:policy` interface version it exports.
    pub interface: &'static str,
}

pub(crate) fn to_wit(s: &Session) -> wit::Session {
    wit::Session {
        id: s.id.to_string(),
        user_id: s.user_id.clone(),
        created_at: s.created_at,
        last_seen_at: s.last_seen_at,
        expires_at: s.expires_at,
        attributes: s
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn check_denial(d: wit::Denial) -> Result<Refusal, PluginFailure> {
    if !(400..=499).contains(&d.status) {
        return Err(PluginFailure::InvalidDecision(format!(
            "denial status {} is not a 4xx status",
            d.status
        )));
    }
    let status = StatusCode::from_u16(d.status)
        .map_err(|_| PluginFailure::InvalidDecision(format!("status {}", d.status)))?;
    let mut reason: String = d.reason.chars().filter(|c| !c.is_control()).collect();
    if reason.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    if reason.is_empty() {
        reason = "denied by policy".into();
    }
    Ok(Refusal::Denied { status, reason })
}

fn check_expiry(at: i64, now: i64) -> Result<i64, PluginFailure> {
    if at <= now || at > now + MAX_LIFETIME_MS {
        return Err(PluginFailure::InvalidDecision(format!(
            "expiry {at} is not in (now, now + 400 days]"
        )));
    }
    Ok(at)
}

impl PolicyChain {
    /// Loads every configured plugin (compiling and running `init`),
    /// each allowed `log_lines_per_second` log lines
    /// (`plugins.log_lines_per_second`). Blocking: call off the request
    /// path.
    pub fn load(
        configs: &[PolicyConfig],
        log_lines_per_second: u32,
        metrics: Arc<Metrics>,
    ) -> Result<PolicyChain, LoadError> {
        Self::load_named(DEFAULT_CHAIN, configs, log_lines_per_second, metrics)
    }

    /// Loads the chain called `name` (its plugins' metrics carry it as
    /// the `chain` label).
    pub fn load_named(
        name: &str,
        configs: &[PolicyConfig],
        log_lines_per_second: u32,
        metrics: Arc<Metrics>,
    ) -> Result<PolicyChain, LoadError> {
        let name = crate::metrics::intern(name);
        let mut plugins = Vec::with_capacity(configs.len());
        for c in configs {
            let plugin = Plugin::load(
                name,
                &c.plugin.display().to_string(),
                &c.config_json,
                Limits {
                    timeout: c.timeout,
                    memory_bytes: c.memory_bytes,
                },
                log_lines_per_second,
                &metrics,
            )?;
            plugins.push(Loaded {
                plugin,
                on_error: c.on_error,
                loaded_at: SystemTime::now(),
            });
        }
        Ok(PolicyChain {
            name,
            plugins,
            metrics,
        })
    }

    pub fn empty(metrics: Arc<Metrics>) -> PolicyChain {
        PolicyChain {
            name: DEFAULT_CHAIN,
            plugins: Vec::new(),
            metrics,
        }
    }

    /// `default` or the chain's `[chains.<name>]` name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    pub fn info(&self) -> Vec<PluginInfo> {
        self.plugins
            .iter()
            .map(|l| {
                let h = &l.plugin.hooks;
                let hooks = [
                    (h.on_create, "create"),
                    (h.on_access, "access"),
                    (h.on_evict, "evict"),
                ]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
                PluginInfo {
                    plugin: l.plugin.path.clone(),
                    sha256: l.plugin.sha256.clone(),
                    loaded_at: humantime::format_rfc3339_millis(l.loaded_at).to_string(),
                    on_error: match l.on_error {
                        OnError::Deny => "deny",
                        OnError::Allow => "allow",
                    },
                    hooks,
                    interface: l.plugin.interface.version(),
                }
            })
            .collect()
    }

    pub fn wants_access(&self) -> bool {
        self.plugins.iter().any(|l| l.plugin.hooks.on_access)
    }

    pub fn wants_evict(&self) -> bool {
        self.plugins.iter().any(|l| l.plugin.hooks.on_evict)
    }

    fn record(&self, plugin: &Plugin, hook: &'static str, outcome: &'static str) {
        plugin.count(hook, outcome);
    }

    /// A failed plugin: logged, counted, and resolved by its `on_error`.
    fn failed(&self, l: &Loaded, hook: &'static str, failure: &PluginFailure) -> Option<Refusal> {
        self.record(&l.plugin, hook, "error");
        self.metrics
            .policy_failure(l.plugin.label, self.name, failure.kind());
        tracing::warn!(
            plugin = %l.plugin.path,
            chain = self.name,
            hook,
            failure = %failure,
            on_error = ?l.on_error,
            "policy plugin failed"
        );
        match l.on_error {
            OnError::Allow => None,
            OnError::Deny => Some(Refusal::Failed {
                plugin: l.plugin.name.to_string(),
            }),
        }
    }

    /// Runs the create hooks in order; each sees the session as the ones
    /// before left it.
    pub async fn on_create(
        &self,
        session: &mut Session,
        request: Option<&RequestInfo>,
        now: i64,
    ) -> Result<(), Refusal> {
        for l in self.plugins.iter().filter(|l| l.plugin.hooks.on_create) {
            let input = to_wit(session);
            let result = l
                .plugin
                .call_on_create(&input, request, now)
                .await
                .and_then(|r| match r {
                    Ok(creation) => {
                        let expires_at = creation
                            .expires_at
                            .map(|at| check_expiry(at, now))
                            .transpose()?;
                        let mut attributes = session.attributes.clone();
                        attributes.extend(creation.attributes);
                        session::validate_attributes(&attributes)
                            .map_err(PluginFailure::InvalidDecision)?;
                        Ok(Ok((expires_at, attributes)))
                    }
                    Err(denial) => check_denial(denial).map(Err),
                });
            match result {
                Ok(Ok((expires_at, attributes))) => {
                    self.record(&l.plugin, "create", "allow");
                    if let Some(at) = expires_at {
                        session.expires_at = at;
                    }
                    session.attributes = attributes;
                }
                Ok(Err(refusal)) => {
                    self.record(&l.plugin, "create", "deny");
                    return Err(refusal);
                }
                Err(failure) => {
                    if let Some(refusal) = self.failed(l, "create", &failure) {
                        return Err(refusal);
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs the access hooks in order; the first denial wins, and each
    /// plugin sees the expiry the ones before it set. A 0.2.0 plugin
    /// reads the session and the request through the host for the length
    /// of its call, hence the shared references.
    pub async fn on_access(
        &self,
        session: &Arc<Session>,
        request: &Arc<RequestInfo>,
        now: i64,
    ) -> AccessOutcome {
        let mut expires_at = session.expires_at;
        let mut extended = false;
        // Built for 0.1.0 plugins only, and once for all of them.
        let mut view: Option<wit::Session> = None;
        for l in self.plugins.iter().filter(|l| l.plugin.hooks.on_access) {
            let call = plugin::AccessCall {
                session,
                request,
                expires_at,
                now,
            };
            let result =
                l.plugin.call_on_access(call, &mut view).await.and_then(
                    |decision| match decision {
                        wit::Access::Allow => Ok(None),
                        wit::Access::Extend(at) => check_expiry(at, now).map(|at| Some(Ok(at))),
                        wit::Access::Deny(d) => check_denial(d).map(|r| Some(Err(r))),
                    },
                );
            match result {
                Ok(None) => self.record(&l.plugin, "access", "allow"),
                Ok(Some(Ok(at))) => {
                    self.record(&l.plugin, "access", "extend");
                    expires_at = at;
                    extended = true;
                }
                Ok(Some(Err(refusal))) => {
                    self.record(&l.plugin, "access", "deny");
                    return AccessOutcome::Refuse(refusal);
                }
                Err(failure) => {
                    if let Some(refusal) = self.failed(l, "access", &failure) {
                        return AccessOutcome::Refuse(refusal);
                    }
                }
            }
        }
        if extended && expires_at != session.expires_at {
            AccessOutcome::Extend(expires_at)
        } else {
            AccessOutcome::Allow
        }
    }

    /// Runs the eviction hooks; returns the ids of `live` sessions to
    /// revoke. A failing plugin evicts nothing (whatever its `on_error`:
    /// the login itself has already succeeded).
    pub async fn on_evict(&self, created: &Session, live: &[Session], now: i64) -> Vec<Uuid> {
        let created_view = to_wit(created);
        let mut remaining: Vec<&Session> = live.iter().filter(|s| s.id != created.id).collect();
        let mut evicted = Vec::new();
        for l in self.plugins.iter().filter(|l| l.plugin.hooks.on_evict) {
            let views: Vec<wit::Session> = remaining.iter().map(|s| to_wit(s)).collect();
            match l.plugin.call_on_evict(&created_view, &views, now).await {
                Ok(ids) => {
                    self.record(&l.plugin, "evict", "allow");
                    for id in ids {
                        match Uuid::parse_str(&id) {
                            Ok(id) if remaining.iter().any(|s| s.id == id) => {
                                remaining.retain(|s| s.id != id);
                                evicted.push(id);
                            }
                            _ => tracing::warn!(
                                plugin = %l.plugin.path,
                                id,
                                "eviction named a session that is not one of the user's others; ignored"
                            ),
                        }
                    }
                }
                Err(failure) => {
                    let _ = self.failed(l, "evict", &failure);
                }
            }
        }
        evicted
    }
}

/// The running chains, swapped whole (all of them at once) on reload.
pub struct Policies {
    current: ArcSwap<ChainSet>,
    /// Bumped after every swap, so that a worker's [`ChainCache`] sees a
    /// swap with one read of a line that is written only by reloads.
    generation: AtomicU64,
    /// The config file whose chains a reload reads again.
    source: Option<std::path::PathBuf>,
    /// `plugins.log_lines_per_second`, as at start (like every other
    /// setting outside the chains).
    log_lines_per_second: u32,
    /// The chain names the running routes use: a reload of the chains
    /// alone ([`Policies::reload`]) must keep each of them, since it does
    /// not change the routes.
    in_use: Mutex<BTreeSet<String>>,
    metrics: Arc<Metrics>,
    /// Serializes reloads so two never interleave.
    reload_lock: tokio::sync::Mutex<()>,
}

/// The chain names `config`'s routes use.
fn chains_in_use(config: &Config) -> BTreeSet<String> {
    config
        .routes
        .iter()
        .filter_map(|r| r.policies.clone())
        .collect()
}

impl Policies {
    /// The policies of a gateway with the default chain alone.
    pub fn new(
        chain: PolicyChain,
        configs: Vec<PolicyConfig>,
        source: Option<std::path::PathBuf>,
        log_lines_per_second: u32,
        metrics: Arc<Metrics>,
    ) -> Policies {
        Self::from_set(
            ChainSet::only(chain, configs),
            BTreeSet::new(),
            source,
            log_lines_per_second,
            metrics,
        )
    }

    /// The policies of `config`, whose chains `chains` holds loaded
    /// ([`ChainSet::load`] of [`ChainConfigs::of`] `config`).
    pub fn with_chains(chains: ChainSet, config: &Config, metrics: Arc<Metrics>) -> Policies {
        Self::from_set(
            chains,
            chains_in_use(config),
            config.path.clone(),
            config.plugins.log_lines_per_second,
            metrics,
        )
    }

    fn from_set(
        chains: ChainSet,
        in_use: BTreeSet<String>,
        source: Option<std::path::PathBuf>,
        log_lines_per_second: u32,
        metrics: Arc<Metrics>,
    ) -> Policies {
        Policies {
            current: ArcSwap::from_pointee(chains),
            generation: AtomicU64::new(0),
            source,
            log_lines_per_second,
            in_use: Mutex::new(in_use),
            metrics,
            reload_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The default chain for one request; it stays valid however many
    /// reloads happen while the request runs.
    pub fn chain(&self) -> Arc<PolicyChain> {
        self.current.load().default_chain().clone()
    }

    /// Every chain, as running now.
    pub fn chains(&self) -> Arc<ChainSet> {
        self.current.load_full()
    }

    /// What `GET /v1/policies` shows.
    pub fn info(&self) -> ChainsInfo {
        self.current.load().info()
    }

    /// A cache of the running chains for one worker.
    pub fn cache(self: &Arc<Self>) -> ChainCache {
        ChainCache {
            policies: self.clone(),
            seen: Mutex::new(None),
        }
    }

    /// The default chain's entries.
    pub fn configs(&self) -> Vec<PolicyConfig> {
        self.current.load().configs().default.clone()
    }

    /// Reads the chains (`[[policies]]` and every `[[chains.<name>]]`) of
    /// the config file again (when the gateway was started from one) and
    /// reloads every plugin from disk, off the request path, then swaps
    /// the new chains in, all at once; on any failure, in any chain, the
    /// old chains all stay. Routes are not reloaded, so the new file must
    /// still define every chain a running route uses. Other config changes
    /// need a restart (or a config reload, which calls
    /// [`Policies::reload_from`]).
    pub async fn reload(&self) -> Result<ChainsInfo, LoadError> {
        let _guard = self.reload_lock.lock().await;
        let configs = match &self.source {
            Some(path) => match Config::load(path) {
                Ok(config) => ChainConfigs::of(&config),
                Err(e) => return Err(self.failed(LoadError::Config(e.to_string()))),
            },
            None => self.current.load().configs().as_ref().clone(),
        };
        let missing: Vec<String> = {
            let in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
            in_use
                .iter()
                .filter(|name| {
                    name.as_str() != DEFAULT_CHAIN && !configs.named.contains_key(name.as_str())
                })
                .cloned()
                .collect()
        };
        if !missing.is_empty() {
            return Err(self.failed(LoadError::Config(format!(
                "the config no longer defines the chain(s) {}, which running routes use \
                 (a policy reload does not change routes)",
                chains::names_for_message(missing.iter())
            ))));
        }
        self.load_and_swap(configs, None).await
    }

    /// Loads every chain of `config` (an already parsed and validated
    /// new config, as a config reload has it) off the request path and
    /// swaps them in, all at once; on any failure the old chains all stay.
    /// The caller swaps in `config`'s routes right after: until then, a
    /// request on a running route whose chain `config` removed is refused
    /// (503 `policy_failed`), never run on another chain.
    pub async fn reload_from(&self, config: &Config) -> Result<ChainsInfo, LoadError> {
        let _guard = self.reload_lock.lock().await;
        let prepared = self.load(ChainConfigs::of(config)).await?;
        Ok(self.swap(prepared, Some(chains_in_use(config))))
    }

    /// The first half of [`Policies::reload_from`], for a caller that
    /// swaps several things together: loads every chain of `config` off
    /// the request path and swaps nothing. A failure is counted and
    /// logged as a failed reload.
    pub async fn prepare(&self, config: &Config) -> Result<PreparedChains, LoadError> {
        let chains = self.load(ChainConfigs::of(config)).await?;
        Ok(PreparedChains {
            chains,
            in_use: chains_in_use(config),
        })
    }

    /// The second half: swaps prepared chains in (all at once).
    pub async fn install(&self, prepared: PreparedChains) -> ChainsInfo {
        let _guard = self.reload_lock.lock().await;
        self.swap(prepared.chains, Some(prepared.in_use))
    }

    /// Loads `configs` off the request path and swaps the set in.
    async fn load_and_swap(
        &self,
        configs: ChainConfigs,
        in_use: Option<BTreeSet<String>>,
    ) -> Result<ChainsInfo, LoadError> {
        let chains = self.load(configs).await?;
        Ok(self.swap(chains, in_use))
    }

    /// Loads `configs` on a blocking thread.
    async fn load(&self, configs: ChainConfigs) -> Result<ChainSet, LoadError> {
        let metrics = self.metrics.clone();
        let rate = self.log_lines_per_second;
        tokio::task::spawn_blocking(move || ChainSet::load(configs, rate, metrics))
            .await
            .unwrap_or_else(|e| {
                Err(LoadError::Compile {
                    path: "(reload)".into(),
                    reason: format!("the loader panicked: {e}"),
                })
            })
            .map_err(|e| self.failed(e))
    }

    /// Swaps `chains` in; with `in_use`, the routes' chain names change
    /// with it.
    fn swap(&self, chains: ChainSet, in_use: Option<BTreeSet<String>>) -> ChainsInfo {
        let info = chains.info();
        self.current.store(Arc::new(chains));
        if let Some(in_use) = in_use {
            *self.in_use.lock().unwrap_or_else(|e| e.into_inner()) = in_use;
        }
        self.generation.fetch_add(1, Ordering::Release);
        self.metrics.policy_reload("ok");
        tracing::info!(
            chains = info.chains.len(),
            plugins = info.chains.values().map(Vec::len).sum::<usize>(),
            "policy chains reloaded"
        );
        info
    }

    fn failed(&self, e: LoadError) -> LoadError {
        self.metrics.policy_reload("error");
        tracing::warn!(error = %e, "policy reload failed; the previous chains stay in service");
        e
    }

    /// Fingerprints (modification time and size) of every chain's plugin
    /// files and of the config file, for the file watcher.
    pub fn file_stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        let stamp = |path: &std::path::Path| {
            std::fs::metadata(path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        };
        let chains = self.current.load();
        let mut stamps: Vec<_> = chains
            .configs()
            .iter()
            .flat_map(|(_, configs)| configs.iter().map(|c| stamp(&c.plugin)))
            .collect();
        if let Some(source) = &self.source {
            stamps.push(stamp(source));
        }
        stamps
    }
}

/// Chains loaded by [`Policies::prepare`], not yet in service.
pub struct PreparedChains {
    chains: ChainSet,
    in_use: BTreeSet<String>,
}

impl PreparedChains {
    /// What they will show once installed.
    pub fn info(&self) -> ChainsInfo {
        self.chains.info()
    }
}

/// One worker's handle on the running chains. Every request needs its
/// chain for as long as it runs; taking it from the shared [`ArcSwap`]
/// would count a reference on the set's one shared reference count, a
/// cache line every worker writes on every request. The cache holds the
/// set behind a reference count of its own worker, and looks at the
/// shared state only to read the generation, which changes on reloads
/// alone: a swap still reaches every worker's next request. One cache
/// covers every chain: a route's chain is a lookup in the cached set.
pub struct ChainCache {
    policies: Arc<Policies>,
    seen: Mutex<Option<(u64, Arc<CachedChains>)>>,
}

/// The chains as one worker holds them: the worker's own reference count
/// on one shared reference to the set.
pub struct CachedChains(Arc<ChainSet>);

impl std::ops::Deref for CachedChains {
    type Target = ChainSet;
    fn deref(&self) -> &ChainSet {
        &self.0
    }
}

impl ChainCache {
    /// The chains for one request.
    pub fn get(&self) -> Arc<CachedChains> {
        let generation = self.policies.generation.load(Ordering::Acquire);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match &*seen {
            Some((g, chains)) if *g == generation => chains.clone(),
            _ => {
                let chains = Arc::new(CachedChains(self.policies.current.load_full()));
                *seen = Some((generation, chains.clone()));
                chains
            }
        }
    }
}
