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

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{ResourceLimiter, Store, Trap};

use super::bindings::sessiongate::policy::{host, types};
use super::bindings::{Policy, PolicyPre};
use super::engine::{FUEL_PER_MS, TICK, YIELD_FUEL, engine};
use super::lograte::{Admit, LogRate};
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

struct Slot {
    store: Store<HostState>,
    bindings: Policy,
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
    config_json: String,
    limits: Limits,
    log_rate: Arc<LogRate>,
    pre: PolicyPre<HostState>,
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
        let mut linker: Linker<HostState> = Linker::new(engine);
        Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| compile_error(format!("{e:#}")))?;
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| compile_error(format!("{e:#}")))?;
        let pre = PolicyPre::new(instance_pre).map_err(|e| compile_error(format!("{e:#}")))?;
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
            config_json: config_json.to_string(),
            limits,
            log_rate,
            pre,
            idle: (0..POOL_SHARDS)
                .map(|_| Padded(Mutex::new(Vec::new())))
                .collect(),
        };
        // The first instance proves init accepts the config and tells
        // which hooks the plugin implements.
        let (slot, hooks) = block_on(plugin.instantiate()).map_err(|e| match e {
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

    async fn instantiate(&self) -> Result<(Slot, types::Hooks), InitFailure> {
        let mut store = Store::new(
            engine(),
            HostState {
                name: self.name.clone(),
                chain: self.chain,
                memory_limit: self.limits.memory_bytes,
                memory_refused: false,
                log_rate: self.log_rate.clone(),
            },
        );
        store.limiter(|state| state);
        store.epoch_deadline_trap();
        // Fails only without fuel, and the engine has it.
        let _ = store.fuel_async_yield_interval(Some(YIELD_FUEL));
        self.arm(&mut store);
        let bindings = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| InitFailure::Failed(classify(&store, e)))?;
        self.arm(&mut store);
        let hooks = match bindings.call_init(&mut store, &self.config_json).await {
            Ok(Ok(hooks)) => hooks,
            Ok(Err(reason)) => return Err(InitFailure::Rejected(reason)),
            Err(e) => return Err(InitFailure::Failed(classify(&store, e))),
        };
        Ok((Slot { store, bindings }, hooks))
    }

    /// Gives a store the budget for one call: fuel for the time limit,
    /// and an epoch deadline well past it as the wall-clock backstop.
    fn arm(&self, store: &mut Store<HostState>) {
        let ms = self.limits.timeout.as_millis().max(1) as u64;
        // Setting fuel only fails when fuel is not enabled, and it is.
        let _ = store.set_fuel(ms.saturating_mul(FUEL_PER_MS));
        let backstop = self.limits.timeout * 10 + std::time::Duration::from_millis(100);
        store.set_epoch_deadline((backstop.as_micros() / TICK.as_micros()).max(1) as u64);
        store.data_mut().memory_refused = false;
    }

    /// A pooled instance, armed for one call, or a fresh one.
    async fn checkout(&self) -> Result<Slot, PluginFailure> {
        let slot = self.pool().lock().expect("idle lock").pop();
        let mut slot = match slot {
            Some(slot) => slot,
            None => match self.instantiate().await {
                Ok((slot, _)) => slot,
                Err(InitFailure::Rejected(reason)) => {
                    return Err(PluginFailure::Instantiate(format!("init failed: {reason}")));
                }
                Err(InitFailure::Failed(f)) => return Err(f),
            },
        };
        self.arm(&mut slot.store);
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
        let mut slot = self.checkout().await?;
        let result = slot
            .bindings
            .call_on_create(&mut slot.store, session, request, now)
            .await;
        self.checkin(slot, result)
    }

    pub async fn call_on_access(
        &self,
        session: &types::Session,
        request: &types::RequestInfo,
        now: i64,
    ) -> Result<types::Access, PluginFailure> {
        let mut slot = self.checkout().await?;
        let result = slot
            .bindings
            .call_on_access(&mut slot.store, session, request, now)
            .await;
        self.checkin(slot, result)
    }

    pub async fn call_on_evict(
        &self,
        created: &types::Session,
        others: &[types::Session],
        now: i64,
    ) -> Result<Vec<String>, PluginFailure> {
        let mut slot = self.checkout().await?;
        let result = slot
            .bindings
            .call_on_evict(&mut slot.store, created, others, now)
            .await;
        self.checkin(slot, result)
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
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt | Trap::OutOfFuel) => PluginFailure::Timeout,
        Some(Trap::StackOverflow) => PluginFailure::StackOverflow,
        Some(trap) => PluginFailure::Trap(trap.to_string()),
        None => PluginFailure::Trap(format!("{e:#}")),
    }
}
