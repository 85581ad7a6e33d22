//! Starting and stopping the gateway: stores, listeners, the connection
//! cap, background tasks and graceful shutdown.
//!
//! [`start`] returns a [`RunningGateway`] bound to real sockets (port 0
//! works, for tests); [`RunningGateway::shutdown`] stops accepting, lets
//! in-flight requests finish within `server.shutdown_grace_ms`, and stops
//! the background tasks. The binary calls [`run`], which does the same on
//! SIGTERM or SIGINT.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::body::Body;
use crate::config::{Config, redact_url};
use crate::metrics::Metrics;
use crate::policy::{Policies, PolicyChain};
use crate::proxy::{Gateway, Peer};
use crate::store::layered::LayeredTier;
use crate::store::memory::MemoryTier;
use crate::store::postgres::{PoolSettings, PostgresTier};
use crate::store::redis::RedisTier;
use crate::store::sqlite::SqliteTier;
use crate::store::{DurableTier, FastTier, SessionStore, StoreError, StoreOptions};
use crate::token::TokenKey;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot reach the {tier} store at {address}: {reason}")]
    Store {
        tier: &'static str,
        address: String,
        reason: String,
    },
    #[error("{file}: key `policies`: {reason}")]
    Policy { file: String, reason: String },
    #[error("cannot listen on {address} ({what}): {source}")]
    Bind {
        what: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Rows deleted per statement by the expiry sweeper.
const SWEEP_BATCH: u32 = 1_000;
/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens the durable tier named by the config: SQLite or PostgreSQL.
pub async fn open_durable(config: &Config) -> Result<Arc<dyn DurableTier>, StartError> {
    let url = &config.store.database_url;
    let store = &config.store;
    if url.starts_with("postgres") {
        let settings = PoolSettings {
            max_connections: store.max_connections,
            min_connections: store.min_connections,
            acquire_timeout: store.connect_timeout,
            idle_timeout: Duration::from_secs(300),
        };
        let tier = PostgresTier::connect(url, &settings)
            .await
            .map_err(|e| store_error("durable (postgres)", config, e))?;
        Ok(Arc::new(tier))
    } else {
        let tier = SqliteTier::connect(url, store.max_connections)
            .await
            .map_err(|e| store_error("durable (sqlite)", config, e))?;
        Ok(Arc::new(tier))
    }
}

/// Opens the fast tier named by the config: Redis (optionally behind an
/// in-process cache) or the in-process tier.
pub fn open_fast(config: &Config, metrics: &Metrics) -> Result<Arc<dyn FastTier>, StartError> {
    let store = &config.store;
    let Some(url) = &store.redis_url else {
        return Ok(Arc::new(MemoryTier::new(store.memory_capacity)));
    };
    let redis = RedisTier::connect(url, &store.redis_prefix, store.redis_timeout).map_err(|e| {
        StartError::Store {
            tier: "fast (redis)",
            address: redact_url(url),
            reason: e.to_string(),
        }
    })?;
    let redis = Arc::new(redis);
    if store.local_cache_ttl.is_zero() {
        Ok(redis)
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
    let durable = open_durable(config).await?;
    if config.store.migrate {
        durable
            .migrate()
            .await
            .map_err(|e| store_error("durable", config, e))?;
    }
    let fast = open_fast(config, &metrics)?;
    let options = StoreOptions {
        negative_cache_capacity: config.store.negative_cache_capacity,
        negative_cache_ttl: config.store.negative_cache_ttl,
        fast_retry_interval: config.store.redis_retry,
        activity_flush_interval: config.store.activity_flush,
    };
    let store = SessionStore::with_options(fast, durable, metrics, options);
    if let Some(url) = &config.store.redis_url {
        // Redis may hold data from before this process: trust it only once
        // the revocation log has been replayed into it.
        store.distrust_fast();
        if !store.recover_fast().await {
            tracing::warn!(
                address = %redact_url(url),
                "Redis is unreachable at start; serving from the durable tier until it answers"
            );
        }
    }
    Ok(store)
}

/// A gateway serving on its listeners.
pub struct RunningGateway {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    gateway: Arc<Gateway>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
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

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Stops accepting, drains in-flight requests (up to the grace period)
    /// and stops the background tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let _ = self.maintenance_shutdown.send(true);
        for task in self.maintenance {
            let _ = task.await;
        }
    }
}

/// Starts the gateway described by `config`.
pub async fn start(config: Config) -> Result<RunningGateway, StartError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());

    let store = open_store(&config, metrics.clone()).await?;
    let durable = store.durable().clone();

    let secret = match &config.session.token_secret {
        Some(secret) => secret.clone(),
        None => durable
            .secret("token_mac_key", &TokenKey::generate_secret())
            .await
            .map_err(|e| store_error("durable", &config, e))?,
    };
    let token_key = TokenKey::new(&secret);

    let policies = Arc::new(load_policies(&config, metrics.clone()).await?);
    let gateway = Arc::new(Gateway::new(
        config.clone(),
        store.clone(),
        token_key,
        metrics,
        policies.clone(),
    ));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let listener = bind(config.server.listen, "server.listen").await?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        what: "server.listen",
        address: config.server.listen,
        source,
    })?;

    let mut admin_addr = None;
    if let Some(admin_config) = &config.admin {
        let admin_listener = bind(admin_config.listen, "admin.listen").await?;
        admin_addr = admin_listener.local_addr().ok();
        let admin = Arc::new(Admin::new(gateway.clone(), &admin_config.token));
        tasks.push(tokio::spawn(serve(
            admin_listener,
            admin_config.max_connections,
            config.server.shutdown_grace,
            shutdown_rx.clone(),
            move |req, _peer: &Peer| admin.clone().handle(req),
        )));
    }

    let proxy_gateway = gateway.clone();
    tasks.push(tokio::spawn(serve(
        listener,
        config.server.max_connections,
        config.server.shutdown_grace,
        shutdown_rx.clone(),
        move |req, peer: &Peer| proxy_gateway.clone().handle(req, peer.clone()),
    )));

    let (maintenance_tx, maintenance_rx) = watch::channel(false);
    let maintenance = vec![
        tokio::spawn(sweeper(
            store.clone(),
            config.store.sweep_interval,
            maintenance_rx.clone(),
        )),
        tokio::spawn(async move { store.maintain(maintenance_rx.clone()).await }),
    ];
    if config.plugins.watch && !config.policies.is_empty() {
        tasks.push(tokio::spawn(watch_plugins(
            policies,
            config.plugins.watch_interval,
            shutdown_rx.clone(),
        )));
    }

    tracing::info!(
        %addr,
        admin = ?admin_addr,
        durable = %config.redacted_database_url(),
        "sessiongate is serving"
    );
    Ok(RunningGateway {
        addr,
        admin_addr,
        gateway,
        shutdown: shutdown_tx,
        tasks,
        maintenance_shutdown: maintenance_tx,
        maintenance,
    })
}

/// Loads the configured policy chain (compiling off the async workers).
pub async fn load_policies(config: &Config, metrics: Arc<Metrics>) -> Result<Policies, StartError> {
    let configs = config.policies.clone();
    let loader_metrics = metrics.clone();
    let chain = tokio::task::spawn_blocking(move || PolicyChain::load(&configs, loader_metrics))
        .await
        .map_err(|e| StartError::Policy {
            file: config.source.clone(),
            reason: format!("the plugin loader panicked: {e}"),
        })?
        .map_err(|e| StartError::Policy {
            file: config.source.clone(),
            reason: e.to_string(),
        })?;
    Ok(Policies::new(
        chain,
        config.policies.clone(),
        config.path.clone(),
        metrics,
    ))
}

/// Runs until SIGTERM or SIGINT, then shuts down gracefully. SIGHUP
/// reloads the policy plugins.
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
                tracing::info!("SIGHUP: reloading the policy plugins");
                // The outcome is logged by reload itself.
                let _ = running.gateway().policies.reload().await;
            }
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Reloads the chain when a plugin file's modification time or size
/// changes (`plugins.watch`).
async fn watch_plugins(
    policies: Arc<Policies>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last = policies.file_stamps();
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = policies.file_stamps();
        if now != last {
            tracing::info!("a policy plugin file changed: reloading");
            let _ = policies.reload().await;
            last = now;
        }
    }
}

async fn bind(address: SocketAddr, what: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind {
            what,
            address,
            source,
        })
}

/// Accepts connections until shutdown, at most `max_connections` at once,
/// serving HTTP/1.1 (with upgrades) and cleartext HTTP/2 on each.
async fn serve<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(Request<Incoming>, &Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        // Waiting for a permit before accepting leaves excess connections
        // in the kernel's backlog instead of in our memory.
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
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
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let client = Peer::new(peer);
        let service = service_fn(move |req| {
            let fut = handler(req, &client);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "grace period over; closing remaining connections");
        }
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
