//! Starting and stopping the gateway: stores, listeners, the connection
//! cap, background tasks and graceful shutdown.
//!
//! With `server.worker_threads = N` (N ≥ 2) the proxy listener is served
//! by N per-core workers: each an OS thread with its own current-thread
//! runtime, its own socket of a `SO_REUSEPORT` group, its own
//! [`Gateway`] (upstream pools, policy chain handle) and, in the plugins,
//! its own instance pool. Shared, because they are the process's: the
//! session store, the policy chain and certificates (each swapped whole,
//! so a reload reaches every worker at once), the connection caps and the
//! metrics registry. The admin API, the redirect listener, file watchers
//! and store maintenance run once, on the runtime that called [`start`].
//! With one worker (or `worker_threads` unset, in the library) the proxy
//! listener is served on that runtime too.
//!
//! [`start`] returns a [`RunningGateway`] bound to real sockets (port 0
//! works, for tests); [`RunningGateway::shutdown`] stops accepting, lets
//! in-flight requests finish within `server.shutdown_grace_ms`, and stops
//! the background tasks. The binary calls [`run`], which does the same on
//! SIGTERM or SIGINT.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::admin::Admin;
use crate::body::Body;
use crate::config::{Config, ServerConfig};
use crate::forwarded::Edge;
use crate::limits::{ClientCounts, ConnBudget, ConnState};
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::policy::chains::{ChainConfigs, ChainSet};
use crate::proxy::{Gateway, Peer};
use crate::reload::Reloader;
use crate::store::layered::{Announcing, LayeredTier};
use crate::store::memory::MemoryTier;
use crate::store::postgres::{PoolSettings, PostgresTier};
use crate::store::redis::{RedisTier, RedisTls};
use crate::store::sqlite::SqliteTier;
use crate::store::{DurableTier, FastTier, SessionStore, StoreError, StoreOptions};
use crate::tls::EdgeTls;
use crate::token::TokenKey;
use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot reach the {tier} store at {address}: {reason}")]
    Store {
        tier: &'static str,
        address: String,
        reason: String,
    },
    #[error("{file}: key `{key}`: {reason}")]
    Policy {
        file: String,
        key: String,
        reason: String,
    },
    #[error("{file}: {reason}")]
    Tls { file: String, reason: String },
    #[error("{file}: key `session.assertion`: {reason}")]
    Assertion { file: String, reason: String },
    #[error("cannot listen on {address} ({what}): {source}")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Rows deleted per statement by the expiry sweeper.
const SWEEP_BATCH: u32 = 1_000;
/// How long an idle connection told to close may take to do so before it
/// is dropped (capped at `server.idle_timeout_ms`).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The HTTP/2 client connection preface: the bytes that tell HTTP/2
/// (prior knowledge) from HTTP/1.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Opens the durable tier named by the config: SQLite or PostgreSQL.
pub async fn open_durable(config: &Config) -> Result<Arc<dyn DurableTier>, StartError> {
    match open_durable_or_defer(config).await? {
        (tier, None) => Ok(tier),
        (_, Some(e)) => Err(store_error("durable (postgres)", config, e)),
    }
}

/// [`open_durable`], except that a PostgreSQL nothing answers for comes
/// back as a tier that connects when it does, with the error.
async fn open_durable_or_defer(
    config: &Config,
) -> Result<(Arc<dyn DurableTier>, Option<StoreError>), StartError> {
    let url = &config.store.database_url;
    let store = &config.store;
    if url.starts_with("postgres") {
        let settings = PoolSettings {
            max_connections: store.max_connections,
            min_connections: store.min_connections,
            acquire_timeout: store.connect_timeout,
            idle_timeout: Duration::from_secs(300),
        };
        let (tier, unreachable) =
            PostgresTier::connect_or_defer(url, &settings, store.database_ca_file.as_deref())
                .await
                .map_err(|e| store_error("durable (postgres)", config, e))?;
        Ok((Arc::new(tier), unreachable))
    } else {
        let tier = SqliteTier::connect(url, store.max_connections)
            .await
            .map_err(|e| store_error("durable (sqlite)", config, e))?;
        Ok((Arc::new(tier), None))
    }
}

/// Opens the fast tier named by the config: Redis (optionally behind an
/// in-process cache) or the in-process tier.
pub fn open_fast(config: &Config, metrics: &Metrics) -> Result<Arc<dyn FastTier>, StartError> {
    let store = &config.store;
    let Some(address) = store.redacted_redis() else {
        return Ok(Arc::new(MemoryTier::new(store.memory_capacity)));
    };
    let tls = RedisTls {
        ca_file: store.redis_ca_file.clone(),
        client_cert_file: store.redis_client_cert_file.clone(),
        client_key_file: store.redis_client_key_file.clone(),
    };
    let (prefix, timeout) = (&store.redis_prefix, store.redis_timeout);
    let redis = match &store.redis_url {
        Some(url) => RedisTier::connect_tls(url, prefix, timeout, &tls),
        None => RedisTier::connect_cluster(&store.redis_cluster_urls, prefix, timeout, &tls),
    }
    .map_err(|e| StartError::Store {
        tier: "fast (redis)",
        address,
        reason: e.to_string(),
    })?;
    let redis = Arc::new(redis);
    if store.local_cache_ttl.is_zero() {
        // Other instances on this Redis may cache: they hear of this
        // one's revocations too.
        Ok(Arc::new(Announcing::new(
            redis.clone(),
            redis,
            metrics.local_cache.clone(),
        )))
    } else {
        Ok(Arc::new(LayeredTier::with_invalidations(
            redis.clone(),
            redis,
            store.local_cache_ttl,
            store.memory_capacity,
            metrics.local_cache.clone(),
        )))
    }
}

fn store_error(tier: &'static str, config: &Config, e: StoreError) -> StartError {
    StartError::Store {
        tier,
        address: config.redacted_database_url(),
        reason: e.to_string(),
    }
}

/// Applies the durable store's migrations (`sessiongate migrate`).
pub async fn migrate(config: &Config) -> Result<(), StartError> {
    let durable = open_durable(config).await?;
    durable
        .migrate()
        .await
        .map_err(|e| store_error("durable", config, e))
}

/// Builds the hybrid store from the config (migrating if configured).
pub async fn open_store(
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<SessionStore, StartError> {
    let durable = match open_durable_or_defer(config).await? {
        (durable, None) => {
            if config.store.migrate {
                durable
                    .migrate()
                    .await
                    .map_err(|e| store_error("durable", config, e))?;
            }
            durable
        }
        (_, Some(e)) if config.session.token_secret.is_none() => {
            return Err(StartError::Store {
                tier: "durable (postgres)",
                address: config.redacted_database_url(),
                reason: format!(
                    "{e}; the token MAC key is kept in the database, so the gateway cannot \
                     start without it: set session.token_secret (for example from \
                     SESSIONGATE_SESSION__TOKEN_SECRET, the same on every instance) to start \
                     while PostgreSQL is unreachable"
                ),
            });
        }
        (durable, Some(e)) => {
            // The degraded mode of a PostgreSQL lost while running:
            // sessions in the fast tier are served, creates and
            // revocations get 503, and the pool connects once it answers.
            tracing::warn!(error = %e,
                "PostgreSQL is unreachable at start; serving sessions from the fast tier, \
                 creates and revocations get 503 until it answers");
            if config.store.migrate {
                Arc::new(crate::store::deferred::MigrateFirst::new(durable))
            } else {
                durable
            }
        }
    };
    let fast = open_fast(config, &metrics)?;
    let options = StoreOptions {
        negative_cache_capacity: config.store.negative_cache_capacity,
        negative_cache_ttl: config.store.negative_cache_ttl,
        fast_retry_interval: config.store.redis_retry,
        activity_flush_interval: config.store.activity_flush,
        activity_buffer_capacity: config.store.activity_buffer_capacity,
        final_flush_timeout: config.server.shutdown_grace,
        ..StoreOptions::default()
    };
    let store = SessionStore::with_options(fast, durable, metrics, options);
    if let Some(address) = config.store.redacted_redis() {
        // Redis may hold data from before this process: trust it only once
        // the revocation log has been replayed into it.
        store.distrust_fast();
        if !store.recover_fast().await {
            tracing::warn!(
                address = %address,
                "Redis is not trusted yet (unreachable, or the revocation log could not be \
                 replayed into it); serving from the durable tier until it is"
            );
        }
    }
    Ok(store)
}

/// A gateway serving on its listeners.
pub struct RunningGateway {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    forward_auth_addr: Option<SocketAddr>,
    redirect_addr: Option<SocketAddr>,
    tls: Option<Arc<EdgeTls>>,
    gateway: Arc<Gateway>,
    reloader: Arc<Reloader>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The per-core workers (`server.worker_threads` ≥ 2), none otherwise.
    workers: Vec<Worker>,
    /// Stopped after the listeners have drained, so the final activity
    /// flush sees the last requests' activity.
    maintenance_shutdown: watch::Sender<bool>,
    maintenance: Vec<JoinHandle<()>>,
}

impl RunningGateway {
    /// The proxy listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The forward-auth listener's address, when `[forward_auth]` is
    /// configured.
    pub fn forward_auth_addr(&self) -> Option<SocketAddr> {
        self.forward_auth_addr
    }

    /// The plain-HTTP listener that redirects to HTTPS, when
    /// `server.tls.redirect_listen` is configured.
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect_addr
    }

    /// The gateway as started (its store, metrics and policies are the
    /// running ones; its routes are the start's: see
    /// [`RunningGateway::reloader`] for the current one).
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Reloads the config file (`POST /v1/config/reload`, SIGHUP).
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// Stops accepting, drains in-flight requests (up to the grace period)
    /// and stops the background tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let mut workers = self.workers;
        for worker in &mut workers {
            // An error is a worker that panicked: nothing left to drain.
            let _ = (&mut worker.drained).await;
        }
        let _ = self.maintenance_shutdown.send(true);
        for task in self.maintenance {
            let _ = task.await;
        }
        // Only now: store connections a worker opened are driven by its
        // runtime, and the final activity flush above may use them.
        for worker in workers {
            let Worker {
                thread, release, ..
            } = worker;
            drop(release);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Starts the gateway described by `config`.
pub async fn start(config: Config) -> Result<RunningGateway, StartError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());

    let store = open_store(&config, metrics.clone()).await?;
    let durable = store.durable().clone();

    if config.session.token_secret.is_none()
        && let Some((file, mode)) =
            crate::store::sqlite::key_file_readable_by_others(&config.store.database_url)
    {
        tracing::warn!(
            file = %file.display(),
            mode = %format_args!("{mode:04o}"),
            "the token MAC key is kept in a file other users can read: chmod 600 it (and its -wal, -shm), \
             or set session.token_secret from the environment (SESSIONGATE_SESSION__TOKEN_SECRET)"
        );
    }
    let secret = match &config.session.token_secret {
        Some(secret) => secret.clone(),
        None => durable
            .secret("token_mac_key", &TokenKey::generate_secret())
            .await
            .map_err(|e| store_error("durable", &config, e))?,
    };
    let token_key = TokenKey::new(&secret);

    // One signer for every worker: a key reload reaches them all.
    let assertions = match &config.session.assertion {
        Some(a) => Some(Arc::new(
            crate::assertion::Assertions::start(a, durable.as_ref())
                .await
                .map_err(|reason| StartError::Assertion {
                    file: config.source.clone(),
                    reason,
                })?,
        )),
        None => None,
    };

    let policies = Arc::new(load_policies(&config, metrics.clone()).await?);
    let gateway = Arc::new(
        Gateway::new(
            config.clone(),
            store.clone(),
            token_key.clone(),
            metrics,
            policies.clone(),
        )
        .with_assertions(assertions.clone()),
    );
    let tls = match &config.server.tls {
        Some(tls_config) => Some(Arc::new(
            EdgeTls::load(tls_config, gateway.metrics().clone()).map_err(|e| StartError::Tls {
                file: config.source.clone(),
                reason: e.to_string(),
            })?,
        )),
        None => None,
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    // One proxy listener per worker (SO_REUSEPORT: the kernel spreads new
    // connections over them), or the one of today on the caller's runtime.
    let worker_count = config.server.worker_threads.unwrap_or(1);
    let listeners = bind_listeners(config.server.listen, worker_count, "server.listen")?;
    let addr = listeners[0]
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "server.listen",
            address: config.server.listen,
            source,
        })?;

    // One slot per gateway: the first is the admin API's (and, with one
    // worker, the one that serves), then one per worker; a config reload
    // (reload.rs) swaps them all, and a request loads its slot once.
    let primary = Arc::new(ArcSwap::new(gateway.clone()));
    let worker_slots: Vec<Arc<ArcSwap<Gateway>>> = (0..worker_count)
        .filter(|_| worker_count > 1)
        .map(|_| {
            // Its own gateway: its own upstream pools and round robin.
            // The store, the policy chain (one swap reaches every worker),
            // the token key and the metrics registry are shared.
            Arc::new(ArcSwap::from_pointee(
                Gateway::new(
                    config.clone(),
                    store.clone(),
                    token_key.clone(),
                    gateway.metrics().clone(),
                    policies.clone(),
                )
                .with_assertions(assertions.clone()),
            ))
        })
        .collect();
    let reloader = Arc::new(Reloader::new(
        config.clone(),
        std::iter::once(primary.clone())
            .chain(worker_slots.iter().cloned())
            .collect(),
        token_key.clone(),
    ));

    let mut admin_addr = None;
    if let Some(admin_config) = &config.admin {
        let admin_listener = bind(admin_config.listen, "admin.listen")
            .and_then(|l| registered(l, admin_config.listen, "admin.listen"))?;
        admin_addr = admin_listener.local_addr().ok();
        let admin = Arc::new(
            Admin::new(gateway.clone(), &admin_config.token)
                .with_tls(tls.clone())
                .with_reload(reloader.clone()),
        );
        // Its own connection budget, so that proxy clients cannot take it.
        let limits = ConnLimits {
            max_connections: admin_config.max_connections,
            ..ConnLimits::from(&config.server)
        };
        tasks.push(tokio::spawn(serve(
            admin_listener,
            limits,
            Caps::new(&limits),
            None,
            Edge::default(),
            http_builder(&config.server),
            shutdown_rx.clone(),
            None,
            move |req, _peer: &Peer| admin.clone().handle(req),
        )));
    }

    let mut forward_auth_addr = None;
    if let Some(fa_config) = &config.forward_auth {
        let fa_listener = bind(fa_config.listen, "forward_auth.listen")
            .and_then(|l| registered(l, fa_config.listen, "forward_auth.listen"))?;
        forward_auth_addr = fa_listener.local_addr().ok();
        let forward_auth = Arc::new(crate::forward_auth::ForwardAuth::new(
            primary.clone(),
            fa_config.clone(),
        ));
        // Its own connection budget, so that proxy clients cannot take it.
        // The callers are few and allow-listed, each with many clients
        // behind it: no per-client cap below the listener's own.
        let limits = ConnLimits {
            max_connections: fa_config.max_connections,
            per_client: fa_config.max_connections,
            ..ConnLimits::from(&config.server)
        };
        tasks.push(tokio::spawn(serve(
            fa_listener,
            limits,
            Caps::new(&limits),
            None,
            Edge::default(),
            http_builder(&config.server),
            shutdown_rx.clone(),
            None,
            move |req, peer: &Peer| forward_auth.clone().handle(req, peer.clone()),
        )));
    }

    let edge = Edge::new(&config.server, gateway.metrics());
    if !config.server.trusted_proxies.is_empty() {
        let trusted: Vec<String> = config
            .server
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        if edge.trusts_everyone() {
            tracing::warn!(
                ?trusted,
                "server.trusted_proxies trusts every address: any client can choose the address the gateway logs and forwards"
            );
        } else {
            tracing::info!(
                ?trusted,
                proxy_protocol = config.server.proxy_protocol,
                "believing X-Forwarded-For from trusted proxies"
            );
        }
    }
    let hsts = config.server.tls.as_ref().and_then(hsts_value);
    // `server.max_connections` and `server.max_connections_per_client`
    // hold across all workers: one semaphore and one per-client table,
    // touched once per connection (never per request).
    let caps = Caps::new(&ConnLimits::from(&config.server));
    let mut workers = Vec::new();
    if worker_count == 1 {
        let listener = listeners.into_iter().next().expect("one listener");
        tasks.push(tokio::spawn(serve(
            register(listener).map_err(|source| StartError::Bind {
                what: "server.listen",
                address: addr,
                source,
            })?,
            ConnLimits::from(&config.server),
            caps,
            Some(worker_connections(gateway.metrics(), 0)),
            edge.clone(),
            http_builder(&config.server),
            shutdown_rx.clone(),
            listener_tls(&tls, gateway.metrics()),
            proxy_handler(primary.clone(), hsts),
        )));
    } else {
        for ((index, listener), worker_gateway) in
            listeners.into_iter().enumerate().zip(worker_slots)
        {
            workers.push(spawn_worker(
                index,
                listener,
                WorkerSetup {
                    limits: ConnLimits::from(&config.server),
                    caps: caps.clone(),
                    connections: worker_connections(gateway.metrics(), index),
                    edge: edge.clone(),
                    builder: http_builder(&config.server),
                    shutdown: shutdown_rx.clone(),
                    tls: listener_tls(&tls, gateway.metrics()),
                    gateway: worker_gateway,
                    hsts: hsts.clone(),
                },
            )?);
        }
    }

    let mut redirect_addr = None;
    if let Some(redirect) = config.server.tls.as_ref().and_then(|t| t.redirect_listen) {
        let redirect_listener = bind(redirect, "server.tls.redirect_listen")
            .and_then(|l| registered(l, redirect, "server.tls.redirect_listen"))?;
        redirect_addr = redirect_listener.local_addr().ok();
        let https_port = addr.port();
        tasks.push(tokio::spawn(serve(
            redirect_listener,
            ConnLimits::from(&config.server),
            Caps::new(&ConnLimits::from(&config.server)),
            None,
            // Client-facing like `listen`: the same balancers in front.
            edge,
            http_builder(&config.server),
            shutdown_rx.clone(),
            None,
            move |req, _peer: &Peer| std::future::ready(redirect_to_https(&req, https_port)),
        )));
    }
    if let (Some(tls), Some(tls_config)) = (&tls, &config.server.tls)
        && tls_config.watch
    {
        let (stamps, reload) = (tls.clone(), tls.clone());
        tasks.push(tokio::spawn(watch_files(
            "a TLS certificate or key file",
            // A chain and its key are rewritten one after the other: read
            // them as a pair, not as a mismatch in between.
            Settle::TwoLooks,
            tls_config.watch_interval,
            shutdown_rx.clone(),
            move || stamps.file_stamps(),
            move || {
                let tls = reload.clone();
                // The outcome is logged by reload itself.
                async move {
                    let _ = tls.reload().await;
                }
            },
        )));
    }

    let (maintenance_tx, maintenance_rx) = watch::channel(false);
    let maintenance = vec![
        tokio::spawn(sweeper(
            store.clone(),
            config.store.sweep_interval,
            maintenance_rx.clone(),
        )),
        tokio::spawn(async move { store.maintain(maintenance_rx.clone()).await }),
    ];
    // With a config file, its change (or a plugin file's) reloads the
    // whole config, every chain included (reload.rs); without one, the
    // plugin files' reload the chains.
    if config.plugins.watch && (reloader.has_file() || ChainConfigs::of(&config).has_plugins()) {
        let stamps = policies.clone();
        let reload = reloader.clone();
        tasks.push(tokio::spawn(watch_files(
            "the config file or a policy plugin file",
            Settle::No,
            config.plugins.watch_interval,
            shutdown_rx.clone(),
            move || stamps.file_stamps(),
            move || {
                let (policies, reload) = (policies.clone(), reload.clone());
                // The outcomes are logged by the reloads themselves.
                async move {
                    if reload.has_file() {
                        let _ = reload.reload().await;
                    } else {
                        let _ = policies.reload().await;
                    }
                }
            },
        )));
    }

    tracing::info!(
        %addr,
        workers = worker_count,
        https = tls.is_some(),
        redirect = ?redirect_addr,
        admin = ?admin_addr,
        forward_auth = ?forward_auth_addr,
        durable = %config.redacted_database_url(),
        "sessiongate is serving"
    );
    Ok(RunningGateway {
        addr,
        admin_addr,
        forward_auth_addr,
        redirect_addr,
        tls,
        gateway,
        reloader,
        shutdown: shutdown_tx,
        tasks,
        workers,
        maintenance_shutdown: maintenance_tx,
        maintenance,
    })
}

/// Loads the configured policy chains, the default and every named one
/// (compiling off the async workers).
pub async fn load_policies(config: &Config, metrics: Arc<Metrics>) -> Result<Policies, StartError> {
    let configs = ChainConfigs::of(config);
    let loader_metrics = metrics.clone();
    let rate = config.plugins.log_lines_per_second;
    let chains = tokio::task::spawn_blocking(move || ChainSet::load(configs, rate, loader_metrics))
        .await
        .map_err(|e| StartError::Policy {
            file: config.source.clone(),
            key: "policies".into(),
            reason: format!("the plugin loader panicked: {e}"),
        })?
        .map_err(|e| {
            let (key, error) = e.config_key();
            StartError::Policy {
                file: config.source.clone(),
                key,
                reason: error.to_string(),
            }
        })?;
    Ok(Policies::with_chains(chains, config, metrics))
}

/// Checks `[server.tls]`'s certificates and keys as a start would
/// (`sessiongate check`): the number of certificates, 0 without TLS.
pub fn check_tls(config: &Config) -> Result<usize, StartError> {
    let Some(tls) = &config.server.tls else {
        return Ok(0);
    };
    EdgeTls::check(tls)
        .map(|certs| certs.len())
        .map_err(|e| StartError::Tls {
            file: config.source.clone(),
            reason: e.to_string(),
        })
}

/// Runs until SIGTERM or SIGINT, then shuts down gracefully. SIGHUP
/// reloads the config (routes, upstreams, session settings, the policy
/// plugins: reload.rs) and the TLS certificates.
pub async fn run(config: Config) -> Result<(), StartError> {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers first: a signal that arrives while starting is not lost.
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let running = start(config).await?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config, the policy plugins and the TLS certificates");
                // The outcomes are logged by the reloads themselves.
                if running.reloader.has_file() {
                    let _ = running.reloader.reload().await;
                } else {
                    let _ = running.gateway().policies().reload().await;
                }
                if let Some(tls) = &running.tls {
                    let _ = tls.reload().await;
                }
            }
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// When a watched set of files counts as changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// At the first look that differs from the last reload's.
    No,
    /// Once two looks in a row agree on the new state, so that files
    /// written one after the other are read together.
    TwoLooks,
}

/// Calls `reload` when the files behind `stamps` (their modification
/// times and sizes: `plugins.watch`, `server.tls.watch`) change, looking
/// every `every`. A failed reload is tried again only once the files
/// change again: the same bad file would fail the same way.
async fn watch_files<S, R, Fut>(
    what: &'static str,
    settle: Settle,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
    stamps: impl Fn() -> S,
    reload: R,
) where
    S: PartialEq,
    R: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut last = stamps();
    let mut pending: Option<S> = None;
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = stamps();
        if now == last {
            pending = None;
            continue;
        }
        if settle == Settle::TwoLooks && pending.as_ref() != Some(&now) {
            pending = Some(now);
            continue;
        }
        tracing::info!("{what} changed: reloading");
        reload().await;
        last = now;
        pending = None;
    }
}

/// `Strict-Transport-Security` for the HTTPS listener's responses.
fn hsts_value(tls: &crate::config::ServerTlsConfig) -> Option<http::HeaderValue> {
    let max_age = tls.hsts_max_age?;
    let mut value = format!("max-age={}", max_age.as_secs());
    if tls.hsts_include_subdomains {
        value.push_str("; includeSubDomains");
    }
    http::HeaderValue::from_str(&value).ok()
}

/// The redirect listener's one answer: 308 to the same host, path and
/// query on the HTTPS listener. The host comes from the request (its
/// absolute-form authority, else `Host`) and is used only if it is a
/// plain DNS name or IP address: anything else gets 400, so nothing a
/// client sends is reflected into `Location` unchecked.
fn redirect_to_https(req: &Request<Incoming>, https_port: u16) -> Response<Body> {
    let given = match req.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => req
            .headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok()),
    };
    let Some(host) = given.and_then(redirect_host) else {
        let id = uuid::Uuid::now_v7().to_string();
        return crate::error::json_error(
            http::StatusCode::BAD_REQUEST,
            "invalid_host",
            "the request needs a Host header naming this server (a DNS name or an IP address)",
            &id,
        );
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let location = if https_port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{https_port}{path}")
    };
    let mut resp = Response::new(crate::body::empty());
    *resp.status_mut() = http::StatusCode::PERMANENT_REDIRECT;
    match http::HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(http::header::LOCATION, v);
        }
        // The host and the path are both header-safe: not reached.
        Err(_) => *resp.status_mut() = http::StatusCode::BAD_REQUEST,
    }
    resp
}

/// The host of an authority (`host[:port]`) if it is a DNS name, an IPv4
/// address or a bracketed IPv6 address, lower-cased and without the port.
fn redirect_host(authority: &str) -> Option<String> {
    let authority: http::uri::Authority = authority.parse().ok()?;
    if authority.as_str().contains('@') {
        return None;
    }
    let host = authority.host();
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let ip: std::net::Ipv6Addr = inner.parse().ok()?;
        return Some(format!("[{ip}]"));
    }
    crate::config::is_dns_name(host).then(|| host.to_ascii_lowercase())
}

/// A listening socket on `address` (not yet registered with a runtime).
fn bind(address: SocketAddr, what: &'static str) -> Result<std::net::TcpListener, StartError> {
    listen_socket(address, false).map_err(|source| StartError::Bind {
        what,
        address,
        source,
    })
}

/// `count` listening sockets on one address: one plain socket for one, or
/// a `SO_REUSEPORT` group, one socket per worker, for more (the kernel
/// hashes each new connection to one of them, and a worker accepts from
/// its own socket only: no shared accept queue, no thundering herd).
///
/// A fixed port is first bound once without `SO_REUSEPORT`, so that a
/// port another process listens on is still "address in use" rather than
/// a group silently shared with that process; port 0 takes the port the
/// first socket is given.
fn bind_listeners(
    address: SocketAddr,
    count: usize,
    what: &'static str,
) -> Result<Vec<std::net::TcpListener>, StartError> {
    if count <= 1 {
        return Ok(vec![bind(address, what)?]);
    }
    let error = |source| StartError::Bind {
        what,
        address,
        source,
    };
    if address.port() != 0 {
        let probe = socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(error)?;
        probe.set_reuse_address(true).map_err(error)?;
        probe.bind(&address.into()).map_err(error)?;
    }
    let first = listen_socket(address, true).map_err(error)?;
    let bound = first.local_addr().map_err(error)?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(listen_socket(bound, true).map_err(error)?);
    }
    Ok(listeners)
}

/// What Tokio's `TcpListener::bind` does (`SO_REUSEADDR`, a backlog of
/// 1024, non-blocking), plus `SO_REUSEPORT` when asked.
fn listen_socket(address: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// [`register`], its failure a start error.
fn registered(
    listener: std::net::TcpListener,
    address: SocketAddr,
    what: &'static str,
) -> Result<TcpListener, StartError> {
    register(listener).map_err(|source| StartError::Bind {
        what,
        address,
        source,
    })
}

/// Registers a listening socket with the current runtime.
fn register(listener: std::net::TcpListener) -> std::io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// The caps a listener's connections count against; shared by the
/// workers of one listener.
#[derive(Clone)]
struct Caps {
    connections: Arc<Semaphore>,
    clients: Arc<ClientCounts>,
}

impl Caps {
    fn new(limits: &ConnLimits) -> Caps {
        Caps {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            clients: ClientCounts::new(limits.per_client),
        }
    }
}

/// `sessiongate_worker_connections_total{worker}`, resolved once.
fn worker_connections(metrics: &Metrics, index: usize) -> Counter {
    metrics
        .worker_connections
        .get_or_create_owned(&crate::metrics::WorkerLabels {
            worker: index as u32,
        })
}

/// What the HTTPS listener's connections need (none without TLS).
fn listener_tls(tls: &Option<Arc<EdgeTls>>, metrics: &Arc<Metrics>) -> Option<Arc<ListenerTls>> {
    tls.as_ref().map(|t| {
        Arc::new(ListenerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(t.server_config()),
            metrics: metrics.clone(),
        })
    })
}

/// The proxy listener's handler: the gateway, and HSTS on HTTPS.
///
/// The gateway is loaded once per request, not per connection: a
/// keep-alive connection's next request sees a reloaded config, and a
/// request holds the one it started with to its end. The load costs what
/// the `Arc` clone it replaces did plus a thread-local slot (no shared
/// write: each worker's slot and gateway are its own).
fn proxy_handler(
    gateway: Arc<ArcSwap<Gateway>>,
    hsts: Option<http::HeaderValue>,
) -> impl Fn(Request<Incoming>, &Peer) -> ProxyResponse + Clone + Send + Sync + 'static {
    move |req, peer: &Peer| ProxyResponse {
        response: Box::pin(gateway.load_full().handle(req, peer.clone())),
        hsts: hsts.clone(),
    }
}

/// The gateway's response with `Strict-Transport-Security` added when
/// configured.
struct ProxyResponse {
    response: Pin<Box<dyn Future<Output = Response<Body>> + Send>>,
    hsts: Option<http::HeaderValue>,
}

impl Future for ProxyResponse {
    type Output = Response<Body>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        let mut resp = std::task::ready!(self.response.as_mut().poll(cx));
        if let Some(hsts) = self.hsts.take() {
            resp.headers_mut()
                .insert(http::header::STRICT_TRANSPORT_SECURITY, hsts);
        }
        Poll::Ready(resp)
    }
}

/// Everything a per-core worker serves its listener with.
struct WorkerSetup {
    limits: ConnLimits,
    caps: Caps,
    connections: Counter,
    edge: Edge,
    builder: auto::Builder<TokioExecutor>,
    shutdown: watch::Receiver<bool>,
    tls: Option<Arc<ListenerTls>>,
    gateway: Arc<ArcSwap<Gateway>>,
    hsts: Option<http::HeaderValue>,
}

/// A per-core worker: an OS thread running its own current-thread
/// runtime, which serves one listener of the `SO_REUSEPORT` group.
struct Worker {
    thread: std::thread::JoinHandle<()>,
    /// Resolves once the worker's listener is closed and its connections
    /// are done (or cut at the grace period).
    drained: tokio::sync::oneshot::Receiver<()>,
    /// Dropped to let the worker's runtime end, after the final activity
    /// flush (store connections the worker opened are driven by it).
    release: tokio::sync::oneshot::Sender<()>,
}

/// Starts worker `index` on `listener`. The runtime is built and the
/// socket registered here, so that any failure is a start error.
fn spawn_worker(
    index: usize,
    listener: std::net::TcpListener,
    setup: WorkerSetup,
) -> Result<Worker, StartError> {
    let address = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let bind_error = |source| StartError::Bind {
        what: "server.listen",
        address,
        source,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(bind_error)?;
    let listener = {
        let _entered = runtime.enter();
        register(listener).map_err(bind_error)?
    };
    let (drained_tx, drained) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("sessiongate-worker-{index}"))
        .spawn(move || {
            crate::worker::set_index(index);
            let WorkerSetup {
                limits,
                caps,
                connections,
                edge,
                builder,
                shutdown,
                tls,
                gateway,
                hsts,
            } = setup;
            runtime.block_on(async move {
                serve(
                    listener,
                    limits,
                    caps,
                    Some(connections),
                    edge,
                    builder,
                    shutdown,
                    tls,
                    proxy_handler(gateway, hsts),
                )
                .await;
                let _ = drained_tx.send(());
                let _ = released.await;
            });
        })
        .map_err(bind_error)?;
    Ok(Worker {
        thread,
        drained,
        release,
    })
}

/// What bounds a listener's connections.
#[derive(Debug, Clone, Copy)]
struct ConnLimits {
    max_connections: usize,
    per_client: usize,
    first_byte: Duration,
    idle: Duration,
    max_upstream: usize,
    shutdown_grace: Duration,
}

impl From<&ServerConfig> for ConnLimits {
    fn from(server: &ServerConfig) -> ConnLimits {
        ConnLimits {
            max_connections: server.max_connections,
            per_client: server.max_connections_per_client,
            first_byte: server.first_byte_timeout,
            idle: server.idle_timeout,
            max_upstream: server.max_upstream_per_connection,
            shutdown_grace: server.shutdown_grace,
        }
    }
}

/// HTTP/1.1 (with upgrades) and cleartext HTTP/2, with the configured
/// header timeout, PINGs and stream cap.
fn http_builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(server.http2_keepalive_interval)
        .keep_alive_timeout(server.http2_keepalive_timeout)
        .max_concurrent_streams(server.http2_max_concurrent_streams);
    builder
}

/// What a listener asks of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Finish what is in flight, take nothing new.
    Draining,
    /// The grace period is over: close now.
    Closing,
}

/// Accepts connections until shutdown, at most `limits.max_connections`
/// at once and `limits.per_client` per client address (trusted proxies
/// exempt; behind the PROXY protocol, per the address it gives), serving
/// HTTP/1.1 (with upgrades) and cleartext HTTP/2 on each.
#[allow(clippy::too_many_arguments)]
async fn serve<F, Fut>(
    listener: TcpListener,
    limits: ConnLimits,
    caps: Caps,
    connections: Option<Counter>,
    edge: Edge,
    builder: auto::Builder<TokioExecutor>,
    mut shutdown: watch::Receiver<bool>,
    tls: Option<Arc<ListenerTls>>,
    handler: F,
) where
    F: Fn(Request<Incoming>, &Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let Caps {
        connections: limit,
        clients,
    } = caps;
    let builder = Arc::new(builder);
    // Every connection task holds a receiver: `closed()` is "all gone".
    let (phase, _) = watch::channel(Phase::Serving);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // Accepted first, then given a place under the cap: excess
        // connections wait in the kernel's backlog (this one, the only
        // one a listener holds beyond the cap, waits here), and a place
        // freed anywhere goes to a listener that has a connection for it,
        // never to one idle in `accept` while another's queue waits (the
        // workers of one listener share the cap).
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        if let Some(connections) = &connections {
            connections.inc();
        }
        let client_slot = if edge.trusts(peer.ip()) {
            None
        } else {
            let Some(slot) = clients.admit(peer.ip()) else {
                tracing::debug!(%peer, max = limits.per_client, "connection refused: too many from this client");
                continue;
            };
            Some(slot)
        };
        let mut stream = stream;
        let _ = stream.set_nodelay(true);
        let (edge, clients, builder, handler) = (
            edge.clone(),
            clients.clone(),
            builder.clone(),
            handler.clone(),
        );
        let (phase, tls) = (phase.subscribe(), tls.clone());
        let budget = ConnBudget::new(permit, client_slot);
        tokio::spawn(async move {
            // Before anything else on the connection (TLS included): a
            // trusted balancer's PROXY header.
            let Some((client, budget)) = edge
                .client_of(&mut stream, peer, budget, &clients, limits.first_byte)
                .await
            else {
                return;
            };
            let peer = Accepted {
                client,
                tcp_peer: peer,
            };
            connection(stream, peer, builder, handler, limits, phase, budget, tls).await;
        });
    }
    drop(listener);
    phase.send_replace(Phase::Draining);
    tokio::select! {
        _ = phase.closed() => {}
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(grace_ms = limits.shutdown_grace.as_millis() as u64, "grace period over; closing remaining connections");
            phase.send_replace(Phase::Closing);
            let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, phase.closed()).await;
        }
    }
}

/// What a TLS listener's connections need: the acceptor (its rustls
/// configuration resolves each handshake's certificate from the current
/// set) and where to count failed handshakes.
struct ListenerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    metrics: Arc<Metrics>,
}

/// Serves one connection. Everything before its first request, the TLS
/// handshake included, must be done within `limits.first_byte` of the
/// accept; then a watchdog closes it once it has had no request in flight
/// for `limits.idle` (HTTP/1 keep-alive, HTTP/2, or an HTTP/2 header block
/// that never ends). `budget` (its place under the listener's caps) is
/// given back once nothing of the connection is left, a WebSocket tunnel
/// it became included.
#[allow(clippy::too_many_arguments)]
async fn connection<F, Fut>(
    stream: TcpStream,
    peer: Accepted,
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: F,
    limits: ConnLimits,
    mut phase: watch::Receiver<Phase>,
    budget: ConnBudget,
    tls: Option<Arc<ListenerTls>>,
) where
    F: Fn(Request<Incoming>, &Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let deadline = Instant::now() + limits.first_byte;
    let Some(tls) = tls else {
        if let Some(io) = first_bytes(stream, peer, deadline, &mut phase).await {
            serve_connection(io, peer, builder, handler, limits, phase, budget, false).await;
        }
        return;
    };
    let handshake = tokio::select! {
        handshake = tokio::time::timeout_at(deadline, tls.acceptor.accept(stream)) => handshake,
        _ = phase.changed() => return,
    };
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            let reason = handshake_failure(&e);
            tls.metrics.tls_handshake_failure(reason);
            tracing::debug!(%peer, error = %e, reason, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tls.metrics.tls_handshake_failure("timeout");
            tracing::debug!(%peer, "connection closed: TLS handshake not done within first_byte_timeout");
            return;
        }
    };
    if let Some(io) = first_bytes(stream, peer, deadline, &mut phase).await {
        serve_connection(io, peer, builder, handler, limits, phase, budget, true).await;
    }
}

/// Why a handshake failed, as the metric's `reason`.
fn handshake_failure(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => "closed",
        _ => "protocol",
    }
}

/// Reads a connection's first bytes by `deadline` (see [`Detected`]);
/// `None` when it closed, failed or said nothing in time.
async fn first_bytes<S>(
    stream: S,
    peer: Accepted,
    deadline: Instant,
    phase: &mut watch::Receiver<Phase>,
) -> Option<Detected<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        detected = tokio::time::timeout_at(deadline, Detected::read(stream)) => match detected {
            Ok(Ok(Some(io))) => Some(io),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "connection failed before its first request");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "connection closed: no request within first_byte_timeout");
                None
            }
        },
        _ = phase.changed() => None,
    }
}

/// Serves HTTP/1.1 and HTTP/2 on a connection whose first bytes are in.
#[allow(clippy::too_many_arguments)]
async fn serve_connection<S, F, Fut>(
    mut io: Detected<S>,
    peer: Accepted,
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: F,
    limits: ConnLimits,
    mut phase: watch::Receiver<Phase>,
    budget: ConnBudget,
    tls: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>, &Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let mut client =
        Peer::for_connection(peer.client, limits.max_upstream, Some(budget)).via(peer.tcp_peer);
    client.tls = tls;
    let state = client.conn.clone();
    io.watch_writes(state.clone());
    let service = service_fn(move |req| {
        let request = client.conn.begin_request();
        let fut = handler(req, &client);
        async move {
            let resp = fut.await;
            drop(request);
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);

    // The watchdog looks every quarter of the idle timeout; a connection
    // is idle once two looks find nothing in flight and no request begun
    // in between, so it closes between 1 and 1.25 idle timeouts after its
    // last request, with no timer per request.
    let tick = (limits.idle / 4).max(Duration::from_millis(1));
    let close_grace = IDLE_CLOSE_GRACE.min(limits.idle);
    let watchdog = tokio::time::sleep(tick);
    tokio::pin!(watchdog);
    let (mut seen, _) = state.activity();
    let mut idle_since = Some(Instant::now());
    let mut closing_since: Option<Instant> = None;
    let mut write_stall: Option<(Instant, u32)> = None;
    let mut draining = false;
    let mut listening = true;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                return;
            }
            changed = phase.changed(), if listening => match changed.map(|()| *phase.borrow_and_update()) {
                Ok(Phase::Serving) => {}
                Ok(Phase::Draining) => {
                    if !draining {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
                Ok(Phase::Closing) => return,
                Err(_) => listening = false,
            },
            _ = &mut watchdog => {
                let now = Instant::now();
                // A client that stops reading (its responses, a stream's
                // data) is not idle but holds everything behind it: after
                // the idle timeout without a byte taken, it is dropped.
                match (state.write_stall(), write_stall) {
                    (Some(unblocks), Some((since, seen))) if unblocks == seen => {
                        if now.duration_since(since) >= limits.idle {
                            tracing::debug!(%peer, "dropping a connection whose client stopped reading");
                            return;
                        }
                    }
                    (Some(unblocks), _) => write_stall = Some((now, unblocks)),
                    (None, _) => write_stall = None,
                }
                let (begun, busy) = state.activity();
                if busy || begun != seen {
                    seen = begun;
                    idle_since = (!busy).then_some(now);
                } else if idle_since.is_none() {
                    idle_since = Some(now);
                }
                if let Some(since) = idle_since
                    && now.duration_since(since) >= limits.idle
                {
                    match closing_since {
                        None => {
                            tracing::debug!(%peer, "closing an idle connection");
                            closing_since = Some(now);
                            if !draining {
                                draining = true;
                                conn.as_mut().graceful_shutdown();
                            }
                        }
                        // Asked to close and still holding on with nothing
                        // in flight (an HTTP/2 client ignoring GOAWAY, a
                        // header block that never ends): drop it.
                        Some(at) if now.duration_since(at) >= close_grace => return,
                        Some(_) => {}
                    }
                }
                watchdog.as_mut().reset(now + tick);
            }
        }
    }
}

/// Who an accepted connection is from: the client (the PROXY header's
/// source, or the socket's peer) and the socket's peer.
#[derive(Debug, Clone, Copy)]
struct Accepted {
    client: SocketAddr,
    tcp_peer: SocketAddr,
}

impl std::fmt::Display for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.client == self.tcp_peer {
            write!(f, "{}", self.client)
        } else {
            write!(f, "{} via {}", self.client, self.tcp_peer)
        }
    }
}

/// A client connection whose first bytes have been read to tell HTTP/1
/// from the HTTP/2 preface (so that a connection sending nothing is closed
/// on our clock, not left to hyper's); hyper reads those bytes again
/// before the socket's.
struct Detected<S> {
    head: [u8; 24],
    start: usize,
    end: usize,
    stream: S,
    /// Told when a write has to wait for the client, and when it no
    /// longer does (`write_waiting` mirrors what it was last told).
    writes: Option<Arc<ConnState>>,
    write_waiting: bool,
}

impl<S: AsyncRead + Unpin> Detected<S> {
    /// Reads until the bytes are not a prefix of the HTTP/2 preface, or are
    /// all of it. `None` when the client closes first.
    async fn read(mut stream: S) -> std::io::Result<Option<Detected<S>>> {
        let mut head = [0u8; 24];
        let mut end = 0;
        while end < head.len() {
            let n = stream.read(&mut head[end..]).await?;
            if n == 0 {
                return Ok(None);
            }
            end += n;
            if head[..end] != H2_PREFACE[..end] {
                break;
            }
        }
        Ok(Some(Detected {
            head,
            start: 0,
            end,
            stream,
            writes: None,
            write_waiting: false,
        }))
    }
}

impl<S> Detected<S> {
    fn watch_writes(&mut self, state: Arc<ConnState>) {
        self.writes = Some(state);
    }

    /// Reports a write that waits, or the first that goes through after
    /// one did: nothing per write otherwise.
    fn note_write<T>(&mut self, poll: Poll<T>) -> Poll<T> {
        let waiting = poll.is_pending();
        if waiting != self.write_waiting {
            self.write_waiting = waiting;
            if let Some(state) = &self.writes {
                state.write_waiting(waiting);
            }
        }
        poll
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Detected<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.start < this.end {
            let n = (this.end - this.start).min(buf.remaining());
            buf.put_slice(&this.head[this.start..this.start + n]);
            this.start += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Detected<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.note_write(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.note_write(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_flush(cx);
        self.note_write(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

async fn sweeper(store: SessionStore, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        match store.sweep(SWEEP_BATCH).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(swept = n, "deleted expired sessions"),
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn redirect_hosts_are_plain_names_or_addresses() {
        for (given, host) in [
            ("Example.COM:8080", Some("example.com")),
            ("example.com", Some("example.com")),
            ("127.0.0.1:80", Some("127.0.0.1")),
            ("[::1]:8080", Some("[::1]")),
            ("[0:0::1]", Some("[::1]")),
            ("xn--bcher-kva.example", Some("xn--bcher-kva.example")),
            ("", None),
            ("-", None),
            ("a..b", None),
            ("-a.example", None),
            ("user@example.com", None),
            ("example.com/x", None),
            ("example.com\"><x", None),
            ("exa%6dple.com", None),
            ("[not-v6]", None),
            ("a_b.example", None),
        ] {
            assert_eq!(redirect_host(given).as_deref(), host, "{given:?}");
        }
    }

    proptest! {
        #[test]
        fn a_redirect_host_never_carries_anything_but_name_characters(text in "\\PC{0,40}") {
            if let Some(host) = redirect_host(&text) {
                prop_assert!(!host.is_empty());
                prop_assert!(host.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'-' | b'[' | b']' | b':')), "{:?}", host);
                let location = format!("https://{host}/");
                prop_assert!(http::HeaderValue::from_str(&location).is_ok());
            }
        }
    }
}
