//! One loaded policy plugin: its compiled component, a pool of ready
//! instances, and the limits every call runs under.
//!
//! Instances are made once (instantiate + `init`) and reused across
//! requests, so a hook call costs about a microsecond rather than the
//! ~25 µs of a fresh store. Each call gets a fuel budget (its time limit,
//! with an epoch deadline as the wall-clock backstop) and runs under a
//! [`ResourceLimiter`] (its memory limit). A trap
//! — a panic, a timeout, memory refused, a stack overflow — poisons the
//! store, so that instance is dropped, never returned to the pool; the
//! next call gets a fresh one.
//!
//! Calls are async: the guest runs on its own stack and yields to the
//! tokio scheduler every [`YIELD_FUEL`] units of fuel, so a call burning
//! its whole time limit shares its worker thread with other requests
//! instead of stalling them. A call whose future is dropped (its client
//! went away) drops its instance with it.
//!
//! Except the 0.2.0 access call, the one on every request: an async call
//! costs a fiber switch in and out (~0.7 µs, most of such a call), so it
//! is first tried as a plain sync call with [`YIELD_FUEL`] of fuel (and of
//! import budget): what one async slice could hold the thread for anyway.
//! Nearly every call ends well within that. One that does not traps out
//! of fuel, its instance is dropped, and the call runs again from the
//! start, async, on another instance with its whole budget (so such a
//! call may spend its time limit plus one slice); the plugin is then
//! marked slow and its later calls go async at once. (A
//! store that may yield can no longer be called sync, so instances come in
//! two kinds: `Slot::sync` says which.) So the guarantee is unchanged: a
//! call holds its worker thread for at most [`YIELD_FUEL`] at a time.
//! A first try's log lines are held and written only when it ends for
//! good (succeeds or fails other than by running out), so a call run again
//! does not log twice; a try logging more than [`MAX_HELD_LINES`] lines
//! goes async.
//!
//! Two interface versions are served (`plugins/wit/<version>/policy.wit`):
//! the component's exports say which ([`Interface`]). A 0.2.0 access call
//! gets the session's times as arguments and reads the strings it wants
//! through the `call` imports, answered from [`HostState::call`], which
//! holds the current call's session and request for the length of that
//! call only. The host's work for a plugin's imports is charged to a
//! budget of its own, the same size as the call's fuel
//! ([`IMPORT_CALL_COST`] per call plus one unit per byte moved): fuel
//! counts guest instructions only, and a guest looping over an import with
//! a large argument would otherwise spend most of its time in the host,
//! unmetered.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, TypedFunc};
use wasmtime::{ResourceLimiter, Store, Trap};

use super::RequestInfo;
use super::bindings::v1::sessiongate::policy::{host, types};
use super::bindings::{v1, v2};
use super::engine::{FUEL_PER_MS, TICK, YIELD_FUEL, engine};
use super::lograte::{Admit, LogRate};
use crate::session::{MAX_ATTRIBUTES_BYTES, Session};
use crate::worker::Padded;

/// How a plugin's call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginFailure {
    #[error("exceeded its time limit")]
    Timeout,
    #[error("exceeded its memory limit")]
    OutOfMemory,
    #[error("overflowed its stack")]
    StackOverflow,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned an invalid decision: {0}")]
    InvalidDecision(String),
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
}

impl PluginFailure {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginFailure::Timeout => "timeout",
            PluginFailure::OutOfMemory => "memory",
            PluginFailure::StackOverflow => "stack",
            PluginFailure::Trap(_) => "trap",
            PluginFailure::InvalidDecision(_) => "invalid_decision",
            PluginFailure::Instantiate(_) => "instantiate",
        }
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} is not a policy component: {reason}")]
    Compile { path: String, reason: String },
    #[error("{path}: init failed: {reason}")]
    Init { path: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("chain \"{chain}\": {error}")]
    Chain {
        chain: String,
        error: Box<LoadError>,
    },
}

impl LoadError {
    /// The config key of the chain that failed (`policies`, or
    /// `chains.<name>`) and the failure itself, for messages that name
    /// the key.
    pub fn config_key(&self) -> (String, &LoadError) {
        match self {
            LoadError::Chain { chain, error } if chain != super::chains::DEFAULT_CHAIN => {
                (format!("chains.{chain}"), error)
            }
            LoadError::Chain { error, .. } => ("policies".into(), error),
            other => ("policies".into(), other),
        }
    }
}

/// Limits for one plugin's calls.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub memory_bytes: usize,
}

/// What the gateway keeps per store: the memory limiter, and the
/// plugin's name and log rate for its log lines.
pub struct HostState {
    name: Arc<str>,
    chain: &'static str,
    memory_limit: usize,
    memory_refused: bool,
    log_rate: Arc<LogRate>,
    /// The access call in progress (0.2.0 plugins), what the `call`
    /// imports answer from; `None` between calls and in other hooks.
    call: Option<CallData>,
    /// What is left of this call's budget for host work in imports.
    import_budget: u64,
    /// The budget ran out: the trap that follows is a time-out.
    import_budget_spent: bool,
    /// Log lines of a sync first try, written only if it succeeds: a try
    /// that is run again must not log twice.
    held: Option<Vec<(types::LogLevel, String)>>,
}

/// Log lines a sync first try may hold; one more sends the call to the
/// async path (a chatty call is not a quick one).
const MAX_HELD_LINES: usize = 16;

/// The session and request of the access call in progress.
struct CallData {
    session: Arc<Session>,
    request: Arc<RequestInfo>,
}

/// What one 0.2.0 access call is about.
pub(crate) struct AccessCall<'a> {
    pub(crate) session: &'a Arc<Session>,
    pub(crate) request: &'a Arc<RequestInfo>,
    /// The expiry as the plugins before this one left it.
    pub(crate) expires_at: i64,
    pub(crate) now: i64,
}

/// Budget units one import call costs besides its bytes: about what the
/// host spends on a call, at the fuel's rate of about one unit per
/// nanosecond.
pub(crate) const IMPORT_CALL_COST: u64 = 200;

impl HostState {
    /// Charges one import call moving `bytes` to the budget; past the
    /// budget the call traps (and is reported as a time-out).
    fn charge(&mut self, bytes: usize) -> wasmtime::Result<()> {
        self.spend(IMPORT_CALL_COST.saturating_add(bytes as u64))
    }

    fn spend(&mut self, cost: u64) -> wasmtime::Result<()> {
        match self.import_budget.checked_sub(cost) {
            Some(left) => {
                self.import_budget = left;
                Ok(())
            }
            None => {
                self.import_budget = 0;
                self.import_budget_spent = true;
                Err(wasmtime::format_err!(
                    "the plugin's calls to the host exceeded its time limit"
                ))
            }
        }
    }

    /// A string of the current access call (empty outside one), charged.
    fn text(&mut self, f: impl FnOnce(&CallData) -> String) -> wasmtime::Result<String> {
        let text = self.call.as_ref().map(f).unwrap_or_default();
        self.charge(text.len())?;
        Ok(text)
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Longest log line a plugin may write.
const MAX_LOG_LINE: usize = 1024;

impl host::Host for HostState {
    fn log(&mut self, level: types::LogLevel, message: String) {
        self.write_log(level, message);
    }
}

impl HostState {
    fn write_log(&mut self, level: types::LogLevel, message: String) {
        // A line the log filter would discard costs no credit.
        let enabled = match level {
            types::LogLevel::Debug => {
                tracing::enabled!(target: "sessiongate::plugin", tracing::Level::DEBUG)
            }
            types::LogLevel::Info => {
                tracing::enabled!(target: "sessiongate::plugin", tracing::Level::INFO)
            }
            types::LogLevel::Warn => {
                tracing::enabled!(target: "sessiongate::plugin", tracing::Level::WARN)
            }
            types::LogLevel::Error => {
                tracing::enabled!(target: "sessiongate::plugin", tracing::Level::ERROR)
            }
        };
        if !enabled {
            return;
        }
        match self.log_rate.admit(Instant::now()) {
            Admit::Write => {}
            Admit::Drop => return,
            Admit::DropAndReport(n) => {
                super::lograte::report(&self.name, n);
                return;
            }
        }
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let plugin = &*self.name;
        let chain = self.chain;
        match level {
            types::LogLevel::Debug => {
                tracing::debug!(target: "sessiongate::plugin", plugin, chain, "{message}")
            }
            types::LogLevel::Info => {
                tracing::info!(target: "sessiongate::plugin", plugin, chain, "{message}")
            }
            types::LogLevel::Warn => {
                tracing::warn!(target: "sessiongate::plugin", plugin, chain, "{message}")
            }
            types::LogLevel::Error => {
                tracing::error!(target: "sessiongate::plugin", plugin, chain, "{message}")
            }
        }
    }
}

impl types::Host for HostState {}

mod v2_host {
    use super::super::bindings::v2::sessiongate::policy::{call, host, types};
    use super::{HostState, MAX_ATTRIBUTES_BYTES, MAX_HELD_LINES};

    impl types::Host for HostState {}

    impl host::Host for HostState {
        fn log(&mut self, level: types::LogLevel, message: String) -> wasmtime::Result<()> {
            self.charge(message.len())?;
            if let Some(held) = &self.held
                && held.len() >= MAX_HELD_LINES
            {
                self.import_budget_spent = true;
                return Err(wasmtime::format_err!("too many log lines for a sync try"));
            }
            use super::types::LogLevel as V1;
            let level = match level {
                types::LogLevel::Debug => V1::Debug,
                types::LogLevel::Info => V1::Info,
                types::LogLevel::Warn => V1::Warn,
                types::LogLevel::Error => V1::Error,
            };
            match &mut self.held {
                Some(held) => held.push((level, message)),
                None => self.write_log(level, message),
            }
            Ok(())
        }
    }

    impl call::Host for HostState {
        fn request_method(&mut self) -> wasmtime::Result<String> {
            self.text(|c| c.request.method.clone())
        }

        fn request_path(&mut self) -> wasmtime::Result<String> {
            self.text(|c| c.request.path.clone())
        }

        fn request_host(&mut self) -> wasmtime::Result<String> {
            self.text(|c| c.request.host.clone())
        }

        fn client_addr(&mut self) -> wasmtime::Result<String> {
            self.text(|c| c.request.client_addr.clone())
        }

        fn user_agent(&mut self) -> wasmtime::Result<String> {
            self.text(|c| c.request.user_agent.clone())
        }

        fn session_id(&mut self) -> wasmtime::Result<String> {
            self.text(|c| c.session.id.to_string())
        }

        fn user_id(&mut self) -> wasmtime::Result<String> {
            self.text(|c| c.session.user_id.clone())
        }

        fn session_attribute(&mut self, name: String) -> wasmtime::Result<Option<String>> {
            self.charge(name.len())?;
            // No session holds a longer name: no need to look.
            if name.len() > MAX_ATTRIBUTES_BYTES {
                return Ok(None);
            }
            let value = self
                .call
                .as_ref()
                .and_then(|c| c.session.attributes.get(&name).cloned());
            self.spend(value.as_ref().map_or(0, String::len) as u64)?;
            Ok(value)
        }

        fn session_attributes(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
            let attributes: Vec<(String, String)> = self
                .call
                .as_ref()
                .map(|c| {
                    c.session
                        .attributes
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            let bytes = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
            self.charge(bytes)?;
            Ok(attributes)
        }
    }
}

/// Which `sessiongate:policy` interface a plugin exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    /// 0.1.0: every hook gets all its data as arguments.
    V1,
    /// 0.2.0: the access hook gets numbers and reads strings on demand.
    V2,
}

impl Interface {
    pub fn version(self) -> &'static str {
        match self {
            Interface::V1 => "0.1.0",
            Interface::V2 => "0.2.0",
        }
    }
}

enum Pre {
    V1(v1::PolicyPre<HostState>),
    V2(v2::PolicyPre<HostState>, v2::PolicyIndices),
}

enum Bindings {
    V1(v1::Policy),
    /// With `on-access` as a typed function for the sync call.
    V2(v2::Policy, V2Access),
}

type V2Access = TypedFunc<(i64, i64, i64, i64), (v2::sessiongate::policy::types::Access,)>;

struct Slot {
    store: Store<HostState>,
    bindings: Bindings,
    /// The store never had a fuel yield interval, so it may be called
    /// sync. Setting the interval (for an async call) cannot be undone.
    sync: bool,
}

/// Idle instances kept per plugin and worker. A worker's calls overlap
/// only when one yields (a call past [`YIELD_FUEL`] of work), so a worker
/// rarely holds more than one or two; the engine's instance budget
/// (`POOL_INSTANCES` in `engine.rs`) bounds the total either way, and an
/// instance it refuses is a failed call, not a stalled one.
const MAX_IDLE: usize = 16;

/// Instance pools per plugin: one per worker and one for every other
/// thread (the admin API, `plugin try`: [`crate::worker::SHARDS`]). A
/// worker takes and returns instances on its own pool only, so the pool's
/// lock is never contended and its cache line never moves between cores
/// on the request path.
const POOL_SHARDS: usize = crate::worker::SHARDS;

/// Hooks and outcomes, for the call counters resolved at load.
const HOOKS: [&str; 3] = ["create", "access", "evict"];
const OUTCOMES: [&str; 4] = ["allow", "extend", "deny", "error"];

pub struct Plugin {
    /// `sessiongate_policy_calls_total` for each hook × outcome, resolved
    /// once so that counting a call is one atomic add.
    calls: Vec<crate::metrics::WorkerCounter>,
    pub name: Arc<str>,
    /// The name as an interned metric label.
    pub label: &'static str,
    /// The chain it was loaded for (`default` or a `[chains.<name>]`), an
    /// interned metric label.
    pub chain: &'static str,
    pub path: String,
    pub sha256: String,
    pub hooks: types::Hooks,
    /// The interface version the component exports.
    pub interface: Interface,
    config_json: String,
    limits: Limits,
    log_rate: Arc<LogRate>,
    pre: Pre,
    /// A sync try ran out of its slice: every call goes async from now on
    /// (until the plugin is reloaded).
    slow: AtomicBool,
    /// Ready instances, per worker ([`POOL_SHARDS`]).
    idle: Box<[Padded<Mutex<Vec<Slot>>>]>,
}

/// Turns a plain `cargo build` core module into a component; components
/// pass through.
fn componentize(bytes: &[u8]) -> Result<Vec<u8>, String> {
    // A component's preamble has layer 1 in bytes 6..8; a core module's 0.
    if bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [1, 0] {
        return Ok(bytes.to_vec());
    }
    wit_component::ComponentEncoder::default()
        .module(bytes)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| format!("{e:#}"))
}

impl Plugin {
    /// Reads, compiles and initializes the plugin at `path` (blocking:
    /// compilation takes tens of milliseconds; call it off the request
    /// path).
    pub fn load(
        chain: &str,
        path: &str,
        config_json: &str,
        limits: Limits,
        log_lines_per_second: u32,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Plugin, LoadError> {
        let bytes = std::fs::read(path).map_err(|e| LoadError::Read {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(
            chain,
            path,
            &bytes,
            config_json,
            limits,
            log_lines_per_second,
            metrics,
        )
    }

    pub fn from_bytes(
        chain: &str,
        path: &str,
        bytes: &[u8],
        config_json: &str,
        limits: Limits,
        log_lines_per_second: u32,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Plugin, LoadError> {
        let compile_error = |reason: String| LoadError::Compile {
            path: path.to_string(),
            reason,
        };
        let sha256 = Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let component_bytes = componentize(bytes).map_err(compile_error)?;
        let engine = engine();
        let component = Component::new(engine, &component_bytes)
            .map_err(|e| compile_error(format!("{e:#}")))?;
        // Both versions' imports: their names differ by version, and a
        // component finds the ones it was built against.
        let mut linker: Linker<HostState> = Linker::new(engine);
        v1::Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| compile_error(format!("{e:#}")))?;
        v2::Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| compile_error(format!("{e:#}")))?;
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| compile_error(format!("{e:#}")))?;
        // The exports decide the version: each `PolicyPre` checks that
        // every export of its world is there with its exact type.
        let v2 = v2::PolicyIndices::new(&instance_pre)
            .and_then(|indices| Ok((v2::PolicyPre::new(instance_pre.clone())?, indices)));
        let (pre, interface) = match v2 {
            Ok((pre, indices)) => (Pre::V2(pre, indices), Interface::V2),
            Err(v2_error) => match v1::PolicyPre::new(instance_pre) {
                Ok(pre) => (Pre::V1(pre), Interface::V1),
                Err(v1_error) => {
                    return Err(compile_error(format!(
                        "it exports neither sessiongate:policy@0.2.0 ({v2_error:#}) \
                         nor sessiongate:policy@0.1.0 ({v1_error:#})"
                    )));
                }
            },
        };
        let name: Arc<str> = std::path::Path::new(path)
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| path.to_string())
            .into();
        let label = crate::metrics::intern(&name);
        let chain = crate::metrics::intern(chain);
        let calls = HOOKS
            .iter()
            .flat_map(|hook| OUTCOMES.iter().map(move |outcome| (*hook, *outcome)))
            .map(|(hook, outcome)| {
                metrics
                    .policy_calls
                    .get_or_create_owned(&crate::metrics::PolicyCallLabels {
                        plugin: label,
                        hook,
                        outcome,
                        chain,
                    })
            })
            .collect();
        let log_rate = Arc::new(LogRate::new(
            log_lines_per_second,
            metrics
                .plugin_log_dropped
                .get_or_create_owned(&crate::metrics::PluginLabels {
                    plugin: label,
                    chain,
                }),
            Instant::now(),
        ));
        let mut plugin = Plugin {
            calls,
            label,
            chain,
            name,
            path: path.to_string(),
            sha256,
            hooks: types::Hooks {
                on_create: false,
                on_access: false,
                on_evict: false,
            },
            interface,
            config_json: config_json.to_string(),
            limits,
            log_rate,
            pre,
            slow: AtomicBool::new(false),
            idle: (0..POOL_SHARDS)
                .map(|_| Padded(Mutex::new(Vec::new())))
                .collect(),
        };
        // The first instance proves init accepts the config and tells
        // which hooks the plugin implements.
        let (slot, hooks) = block_on(plugin.instantiate(true)).map_err(|e| match e {
            InitFailure::Rejected(reason) => LoadError::Init {
                path: path.to_string(),
                reason,
            },
            InitFailure::Failed(f) => LoadError::Init {
                path: path.to_string(),
                reason: f.to_string(),
            },
        })?;
        plugin.hooks = hooks;
        plugin.pool().lock().expect("idle lock").push(slot);
        Ok(plugin)
    }

    /// The calling worker's instance pool.
    fn pool(&self) -> &Mutex<Vec<Slot>> {
        &self.idle[crate::worker::shard(self.idle.len())]
    }

    /// Counts one call of `hook` that ended in `outcome`.
    pub fn count(&self, hook: &str, outcome: &str) {
        let h = HOOKS.iter().position(|x| *x == hook);
        let o = OUTCOMES.iter().position(|x| *x == outcome);
        if let (Some(h), Some(o)) = (h, o) {
            self.calls[h * OUTCOMES.len() + o].inc();
        }
    }

    /// A fresh instance, `init` run: one that may be called sync if
    /// `sync` (and `init` fits in one slice; else the plugin is slow).
    async fn instantiate(&self, sync: bool) -> Result<(Slot, types::Hooks), InitFailure> {
        if sync && !self.slow.load(Ordering::Relaxed) {
            match self.instantiate_kind(true).await {
                Err(InitFailure::Failed(PluginFailure::Timeout)) => {
                    self.slow.store(true, Ordering::Relaxed);
                }
                done => return done,
            }
        }
        self.instantiate_kind(false).await
    }

    async fn instantiate_kind(&self, sync: bool) -> Result<(Slot, types::Hooks), InitFailure> {
        let mut store = Store::new(
            engine(),
            HostState {
                name: self.name.clone(),
                chain: self.chain,
                memory_limit: self.limits.memory_bytes,
                memory_refused: false,
                log_rate: self.log_rate.clone(),
                call: None,
                import_budget: 0,
                import_budget_spent: false,
                held: None,
            },
        );
        store.limiter(|state| state);
        store.epoch_deadline_trap();
        if !sync {
            // Fails only without fuel, and the engine has it.
            let _ = store.fuel_async_yield_interval(Some(YIELD_FUEL));
        }
        // A store without yield points runs `init` on one slice only.
        self.arm(&mut store, sync);
        let init = match &self.pre {
            Pre::V1(pre) => match pre.instantiate_async(&mut store).await {
                Ok(bindings) => {
                    self.arm(&mut store, sync);
                    let init = bindings.call_init(&mut store, &self.config_json).await;
                    Ok((Bindings::V1(bindings), init))
                }
                Err(e) => Err(e),
            },
            Pre::V2(pre, indices) => match pre.instance_pre().instantiate_async(&mut store).await {
                Ok(instance) => {
                    let loaded = indices.load(&mut store, &instance).and_then(|b| {
                        let access = instance.get_typed_func(&mut store, "on-access")?;
                        Ok((b, access))
                    });
                    match loaded {
                        Ok((bindings, access)) => {
                            self.arm(&mut store, sync);
                            let init = bindings
                                .call_init(&mut store, &self.config_json)
                                .await
                                .map(|r| r.map(convert::hooks));
                            Ok((Bindings::V2(bindings, access), init))
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            },
        };
        let (bindings, init) = init.map_err(|e| InitFailure::Failed(classify(&store, e)))?;
        let hooks = match init {
            Ok(Ok(hooks)) => hooks,
            Ok(Err(reason)) => return Err(InitFailure::Rejected(reason)),
            Err(e) => return Err(InitFailure::Failed(classify(&store, e))),
        };
        Ok((
            Slot {
                store,
                bindings,
                sync,
            },
            hooks,
        ))
    }

    /// Gives a store the budget for one call: fuel for the time limit,
    /// and an epoch deadline well past it as the wall-clock backstop.
    /// A `slice`d budget is one yield interval's worth, for a sync call.
    fn arm(&self, store: &mut Store<HostState>, slice: bool) {
        let ms = self.limits.timeout.as_millis().max(1) as u64;
        let budget = if slice {
            YIELD_FUEL.min(ms.saturating_mul(FUEL_PER_MS))
        } else {
            ms.saturating_mul(FUEL_PER_MS)
        };
        // Setting fuel only fails when fuel is not enabled, and it is.
        let _ = store.set_fuel(budget);
        let backstop = self.limits.timeout * 10 + std::time::Duration::from_millis(100);
        store.set_epoch_deadline((backstop.as_micros() / TICK.as_micros()).max(1) as u64);
        let state = store.data_mut();
        state.memory_refused = false;
        state.import_budget = budget;
        state.import_budget_spent = false;
    }

    /// A pooled instance, armed for one call, or a fresh one: for a sync
    /// call (`sync`) one that may be called sync, else one that yields
    /// (preferably one that already does: making a store yield cannot be
    /// undone). Check `Slot::sync` for what was got.
    async fn checkout(&self, sync: bool) -> Result<Slot, PluginFailure> {
        let slot = {
            let mut idle = self.pool().lock().expect("idle lock");
            match idle.iter().rposition(|s| s.sync == sync) {
                Some(i) => Some(idle.swap_remove(i)),
                None if !sync => idle.pop(),
                None => None,
            }
        };
        let mut slot = match slot {
            Some(slot) => slot,
            None => match self.instantiate(sync).await {
                Ok((slot, _)) => slot,
                Err(InitFailure::Rejected(reason)) => {
                    return Err(PluginFailure::Instantiate(format!("init failed: {reason}")));
                }
                Err(InitFailure::Failed(f)) => return Err(f),
            },
        };
        if !sync && slot.sync {
            let _ = slot.store.fuel_async_yield_interval(Some(YIELD_FUEL));
            slot.sync = false;
        }
        self.arm(&mut slot.store, slot.sync);
        Ok(slot)
    }

    /// Ends a call: a healthy instance goes back to the pool; a trapped
    /// one is dropped here with its store.
    fn checkin<R>(&self, slot: Slot, result: wasmtime::Result<R>) -> Result<R, PluginFailure> {
        if self.log_rate.has_unreported()
            && let Some(n) = self.log_rate.due_report(Instant::now())
        {
            super::lograte::report(&self.name, n);
        }
        match result {
            Ok(result) => {
                let mut idle = self.pool().lock().expect("idle lock");
                if idle.len() < MAX_IDLE {
                    idle.push(slot);
                }
                Ok(result)
            }
            Err(e) => Err(classify(&slot.store, e)),
        }
    }

    pub async fn call_on_create(
        &self,
        session: &types::Session,
        request: Option<&types::RequestInfo>,
        now: i64,
    ) -> Result<Result<types::Creation, types::Denial>, PluginFailure> {
        let mut slot = self.checkout(false).await?;
        let result = match &slot.bindings {
            Bindings::V1(b) => {
                b.call_on_create(&mut slot.store, session, request, now)
                    .await
            }
            Bindings::V2(b, _) => {
                let request = request.map(convert::request);
                b.call_on_create(
                    &mut slot.store,
                    &convert::session(session),
                    request.as_ref(),
                    now,
                )
                .await
                .map(|r| r.map(convert::creation).map_err(convert::denial))
            }
        };
        self.checkin(slot, result)
    }

    /// Calls the access hook: a 0.1.0 plugin gets `view` (the session as
    /// a WIT record, built on first use and kept for the next plugins),
    /// a 0.2.0 plugin the times, and the rest on demand.
    pub(crate) async fn call_on_access(
        &self,
        call: AccessCall<'_>,
        view: &mut Option<types::Session>,
    ) -> Result<types::Access, PluginFailure> {
        let fast = self.interface == Interface::V2 && !self.slow.load(Ordering::Relaxed);
        let mut slot = self.checkout(fast).await?;
        if slot.sync
            && let Bindings::V2(_, access) = &slot.bindings
        {
            let access = *access;
            let state = slot.store.data_mut();
            state.call = Some(CallData {
                session: call.session.clone(),
                request: call.request.clone(),
            });
            state.held = Some(Vec::new());
            let s = &**call.session;
            let result = access.call(
                &mut slot.store,
                (s.created_at, s.last_seen_at, call.expires_at, call.now),
            );
            let state = slot.store.data_mut();
            state.call = None;
            let held = state.held.take().unwrap_or_default();
            match result {
                Ok((access,)) => {
                    for (level, line) in held {
                        slot.store.data_mut().write_log(level, line);
                    }
                    return self.checkin(slot, Ok(convert::access(access)));
                }
                Err(e) => match classify(&slot.store, e) {
                    // More than a slice: again from the start, async
                    // (this instance is dead: the trap poisoned it).
                    PluginFailure::Timeout => {
                        self.slow.store(true, Ordering::Relaxed);
                        drop(slot);
                        slot = self.checkout(false).await?;
                    }
                    // Not run again: what it logged (a panic's message,
                    // say) is written.
                    failure => {
                        for (level, line) in held {
                            slot.store.data_mut().write_log(level, line);
                        }
                        return Err(failure);
                    }
                },
            }
        }
        let result = match &slot.bindings {
            Bindings::V1(b) => {
                let view = view.get_or_insert_with(|| super::to_wit(call.session));
                view.expires_at = call.expires_at;
                b.call_on_access(&mut slot.store, view, call.request, call.now)
                    .await
            }
            Bindings::V2(b, _) => {
                slot.store.data_mut().call = Some(CallData {
                    session: call.session.clone(),
                    request: call.request.clone(),
                });
                let s = &**call.session;
                let result = b
                    .call_on_access(
                        &mut slot.store,
                        s.created_at,
                        s.last_seen_at,
                        call.expires_at,
                        call.now,
                    )
                    .await
                    .map(convert::access);
                // The instance goes back to the pool (or is dropped, on a
                // trap): it must not keep this call's data.
                slot.store.data_mut().call = None;
                result
            }
        };
        self.checkin(slot, result)
    }

    pub async fn call_on_evict(
        &self,
        created: &types::Session,
        others: &[types::Session],
        now: i64,
    ) -> Result<Vec<String>, PluginFailure> {
        let mut slot = self.checkout(false).await?;
        let result = match &slot.bindings {
            Bindings::V1(b) => b.call_on_evict(&mut slot.store, created, others, now).await,
            Bindings::V2(b, _) => {
                let others: Vec<_> = others.iter().map(convert::session).collect();
                b.call_on_evict(&mut slot.store, &convert::session(created), &others, now)
                    .await
            }
        };
        self.checkin(slot, result)
    }
}

/// Between the 0.1.0 records the chain works with and their 0.2.0 twins
/// (the same WIT types, generated twice). Only the rarer hooks (create,
/// evict, init) convert; the access call's arguments are numbers.
mod convert {
    use super::super::bindings::v2::sessiongate::policy::types as v2;
    use super::types as v1;

    pub(super) fn session(s: &v1::Session) -> v2::Session {
        v2::Session {
            id: s.id.clone(),
            user_id: s.user_id.clone(),
            created_at: s.created_at,
            last_seen_at: s.last_seen_at,
            expires_at: s.expires_at,
            attributes: s.attributes.clone(),
        }
    }

    pub(super) fn request(r: &v1::RequestInfo) -> v2::RequestInfo {
        v2::RequestInfo {
            method: r.method.clone(),
            path: r.path.clone(),
            host: r.host.clone(),
            client_addr: r.client_addr.clone(),
            user_agent: r.user_agent.clone(),
        }
    }

    pub(super) fn hooks(h: v2::Hooks) -> v1::Hooks {
        v1::Hooks {
            on_create: h.on_create,
            on_access: h.on_access,
            on_evict: h.on_evict,
        }
    }

    pub(super) fn denial(d: v2::Denial) -> v1::Denial {
        v1::Denial {
            status: d.status,
            reason: d.reason,
        }
    }

    pub(super) fn creation(c: v2::Creation) -> v1::Creation {
        v1::Creation {
            expires_at: c.expires_at,
            attributes: c.attributes,
        }
    }

    pub(super) fn access(a: v2::Access) -> v1::Access {
        match a {
            v2::Access::Allow => v1::Access::Allow,
            v2::Access::Extend(at) => v1::Access::Extend(at),
            v2::Access::Deny(d) => v1::Access::Deny(denial(d)),
        }
    }
}

/// Runs a plugin future to the end on this thread, for loading and the
/// command-line tools (no async runtime there). A plugin's future waits on
/// nothing but its own fuel yields, which are ready again at once, so
/// polling until it is done is right.
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
}

enum InitFailure {
    Rejected(String),
    Failed(PluginFailure),
}

fn classify(store: &Store<HostState>, e: wasmtime::Error) -> PluginFailure {
    if store.data().memory_refused {
        return PluginFailure::OutOfMemory;
    }
    if store.data().import_budget_spent {
        return PluginFailure::Timeout;
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt | Trap::OutOfFuel) => PluginFailure::Timeout,
        Some(Trap::StackOverflow) => PluginFailure::StackOverflow,
        Some(trap) => PluginFailure::Trap(trap.to_string()),
        None => PluginFailure::Trap(format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::bindings::v2::sessiongate::policy::call::Host as _;
    use super::*;

    fn state(budget: u64) -> HostState {
        let metrics = crate::metrics::Metrics::new();
        let dropped =
            metrics
                .plugin_log_dropped
                .get_or_create_owned(&crate::metrics::PluginLabels {
                    plugin: "t",
                    chain: "default",
                });
        HostState {
            name: "t".into(),
            chain: "default",
            memory_limit: 1 << 20,
            memory_refused: false,
            log_rate: Arc::new(LogRate::new(1, dropped, Instant::now())),
            call: None,
            import_budget: budget,
            import_budget_spent: false,
            held: None,
        }
    }

    #[test]
    fn imports_outside_an_access_call_answer_nothing_and_still_cost() {
        let mut s = state(10_000);
        assert_eq!(s.request_path().unwrap(), "");
        assert_eq!(s.session_id().unwrap(), "");
        assert_eq!(s.session_attribute("role".into()).unwrap(), None);
        assert!(s.session_attributes().unwrap().is_empty());
        assert_eq!(s.import_budget, 10_000 - 4 * IMPORT_CALL_COST - 4);
    }

    #[test]
    fn imports_answer_from_the_call_and_charge_its_bytes() {
        let mut s = state(1_000_000);
        let mut session = Session::new(
            "alice".into(),
            [("role".to_string(), "admin".to_string())].into(),
            Duration::from_secs(60),
        );
        session.user_id = "alice".into();
        s.call = Some(CallData {
            session: Arc::new(session.clone()),
            request: Arc::new(RequestInfo {
                method: "GET".into(),
                path: "/p".into(),
                host: "h".into(),
                client_addr: "c".into(),
                user_agent: "ua".into(),
            }),
        });
        assert_eq!(s.request_path().unwrap(), "/p");
        assert_eq!(s.user_id().unwrap(), "alice");
        assert_eq!(s.session_id().unwrap(), session.id.to_string());
        assert_eq!(
            s.session_attribute("role".into()).unwrap().as_deref(),
            Some("admin")
        );
        let before = s.import_budget;
        let huge = "n".repeat(MAX_ATTRIBUTES_BYTES + 1);
        assert_eq!(s.session_attribute(huge.clone()).unwrap(), None);
        assert_eq!(
            before - s.import_budget,
            IMPORT_CALL_COST + huge.len() as u64,
            "a name no session can hold is refused, but its bytes are paid"
        );
    }

    #[test]
    fn past_the_budget_an_import_traps_as_a_time_out() {
        let mut s = state(3 * IMPORT_CALL_COST + 10);
        for _ in 0..3 {
            s.user_agent().unwrap();
        }
        assert!(!s.import_budget_spent);
        assert!(s.user_agent().is_err());
        assert!(s.import_budget_spent);
        // And stays spent for the rest of the call.
        assert!(s.request_method().is_err());
    }
}
