//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//!
//! What every request counts (requests and their latency, store lookups,
//! policy calls) is kept per worker ([`WorkerCounter`],
//! [`WorkerHistogram`]: a cell per worker, summed when `/metrics` is
//! read), and the request path holds resolved handles rather than looking
//! a label set up in a family each time, so that two workers never write
//! the same cache line or take the same lock to count a request. Rarer
//! events use `prometheus_client`'s own types.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::worker::{self, Padded};

/// A counter with a cell per worker ([`worker::SHARDS`]); reads sum them.
#[derive(Clone, Debug)]
pub struct WorkerCounter {
    cells: Arc<[Padded<AtomicU64>]>,
}

impl Default for WorkerCounter {
    fn default() -> Self {
        WorkerCounter {
            cells: (0..worker::SHARDS)
                .map(|_| Padded(AtomicU64::new(0)))
                .collect(),
        }
    }
}

impl WorkerCounter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.cells[worker::shard(self.cells.len())].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.cells.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for WorkerCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for WorkerCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// `request_duration_seconds`' upper bounds: 100 µs to ~3.3 s (the
/// gateway's own cost sits at the bottom, slow upstreams at the top),
/// then +Inf.
const LATENCY_BOUNDS: usize = 16;

fn latency_bound(i: usize) -> f64 {
    if i < LATENCY_BOUNDS {
        0.0001 * 2f64.powi(i as i32)
    } else {
        f64::MAX
    }
}

/// One worker's share of a histogram: a count per bucket (the last is
/// +Inf), the observation count and the sum (as f64 bits).
struct HistogramCell {
    buckets: [AtomicU64; LATENCY_BOUNDS + 1],
    count: AtomicU64,
    sum: AtomicU64,
}

impl Default for HistogramCell {
    fn default() -> Self {
        HistogramCell {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }
}

/// The latency histogram with a cell per worker; reads sum them.
#[derive(Clone)]
pub struct WorkerHistogram {
    cells: Arc<[Padded<HistogramCell>]>,
}

impl Default for WorkerHistogram {
    fn default() -> Self {
        WorkerHistogram {
            cells: (0..worker::SHARDS)
                .map(|_| Padded(HistogramCell::default()))
                .collect(),
        }
    }
}

impl std::fmt::Debug for WorkerHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHistogram").finish_non_exhaustive()
    }
}

impl WorkerHistogram {
    pub fn observe(&self, seconds: f64) {
        let cell = &self.cells[worker::shard(self.cells.len())];
        let bucket = (0..LATENCY_BOUNDS)
            .find(|&i| seconds <= latency_bound(i))
            .unwrap_or(LATENCY_BOUNDS);
        cell.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        cell.count.fetch_add(1, Ordering::Relaxed);
        // A compare-and-swap that, on a worker's own cell, never retries.
        let _ = cell
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + seconds).to_bits())
            });
    }
}

impl TypedMetric for WorkerHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for WorkerHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut sum = 0.0;
        let mut count = 0;
        let mut buckets: Vec<(f64, u64)> = (0..=LATENCY_BOUNDS)
            .map(|i| (latency_bound(i), 0))
            .collect();
        for cell in self.cells.iter() {
            sum += f64::from_bits(cell.sum.load(Ordering::Relaxed));
            count += cell.count.load(Ordering::Relaxed);
            for (bucket, n) in buckets.iter_mut().zip(&cell.buckets) {
                bucket.1 += n.load(Ordering::Relaxed);
            }
        }
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The tiers and outcomes of `store_lookups`, for its resolved handles.
const LOOKUP_TIERS: [&str; 3] = ["fast", "durable", "negative_cache"];
const LOOKUP_OUTCOMES: [&str; 5] = ["hit", "miss", "revoked", "skipped", "error"];

/// A route's `requests` (by status) and `request_duration_seconds`
/// handles, resolved once: counting a request is then a few atomic adds
/// on the worker's own cells, with no family lookup.
pub struct RouteMetrics {
    route: &'static str,
    requests: Family<RequestLabels, WorkerCounter>,
    latency_family: Family<RouteLabels, WorkerHistogram>,
    /// By status - 100; made on first use, so that only statuses that
    /// occurred are exported (as before).
    by_status: Box<[OnceLock<WorkerCounter>]>,
    latency: OnceLock<WorkerHistogram>,
}

impl RouteMetrics {
    pub fn observe(&self, status: u16, seconds: f64) {
        self.latency
            .get_or_init(|| {
                self.latency_family
                    .get_or_create_owned(&RouteLabels { route: self.route })
            })
            .observe(seconds);
        let counter = match self.by_status.get(usize::from(status).wrapping_sub(100)) {
            Some(slot) => slot.get_or_init(|| {
                self.requests.get_or_create_owned(&RequestLabels {
                    route: self.route,
                    status,
                })
            }),
            None => {
                self.requests
                    .get_or_create(&RequestLabels {
                        route: self.route,
                        status,
                    })
                    .inc();
                return;
            }
        };
        counter.inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

/// A `'static` copy of a label (a route prefix, a plugin name), made once
/// per distinct text: per-request metric labels then cost no allocation.
/// Such labels are few and fixed by the config, so the set stays small.
pub fn intern(text: &str) -> &'static str {
    static INTERNED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut interned = INTERNED.lock().expect("intern lock");
    if let Some(found) = interned.iter().find(|s| **s == text) {
        return found;
    }
    let leaked: &'static str = Box::leak(text.to_string().into_boxed_str());
    interned.push(leaked);
    leaked
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// `fast` or `durable`.
    pub tier: &'static str,
    /// `hit`, `miss` or `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyCallLabels {
    pub plugin: &'static str,
    pub hook: &'static str,
    /// `allow`, `extend`, `deny` or `error`.
    pub outcome: &'static str,
    /// The plugin's chain: `default` (`[[policies]]`) or a
    /// `[chains.<name>]`, so that one plugin file in two chains counts twice.
    pub chain: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyFailureLabels {
    pub plugin: &'static str,
    /// `timeout`, `memory`, `stack`, `trap`, `invalid_decision`, `instantiate`.
    pub kind: &'static str,
    pub chain: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub plugin: &'static str,
    pub chain: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// The worker's index, `0` to `server.worker_threads - 1`.
    pub worker: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, WorkerCounter>,
    pub latency: Family<RouteLabels, WorkerHistogram>,
    pub lookups: Family<LookupLabels, WorkerCounter>,
    /// `lookups` by tier × outcome ([`LOOKUP_TIERS`], [`LOOKUP_OUTCOMES`]).
    lookup_handles: Box<[OnceLock<WorkerCounter>]>,
    pub sessions_created: Counter,
    pub sessions_revoked: Counter,
    pub auth_rejections: Family<ReasonLabels, Counter>,
    pub upstream_errors: Family<ReasonLabels, Counter>,
    pub sessions_swept: Counter,
    pub durable_queries: Counter,
    pub activity_flushed: Counter,
    pub fast_deletes_deferred: Counter,
    /// Recoveries of the fast tier by what they wrote into it: `full` (the
    /// whole revocation log), `own` (only this instance's failed writes,
    /// after a transient error), `skipped` (another instance replayed the
    /// log into the same server).
    pub fast_tier_replays: Family<KindLabels, Counter>,
    pub policy_calls: Family<PolicyCallLabels, WorkerCounter>,
    pub policy_failures: Family<PolicyFailureLabels, Counter>,
    pub policy_reloads: Family<ResultLabels, Counter>,
    /// Config reloads (`reload.rs`) by result: `ok`, `invalid`,
    /// `restart_required`, `failed`.
    pub config_reloads: Family<ResultLabels, Counter>,
    pub local_cache: LocalCacheMetrics,
    /// Plugin log lines over `plugins.log_lines_per_second`, not written.
    pub plugin_log_dropped: Family<PluginLabels, Counter>,
    /// Pending activity records dropped because the write-behind buffer
    /// was full (`store.activity_buffer_capacity`).
    pub activity_dropped: Counter,
    /// Connections from trusted proxies closed for want of a valid PROXY
    /// protocol header (`server.proxy_protocol`), by reason.
    pub proxy_protocol_rejections: Family<ReasonLabels, Counter>,
    /// TLS handshakes on the HTTPS listener that did not complete, by
    /// reason: `timeout` (not done within `server.first_byte_timeout_ms`),
    /// `closed` (the client went away), `protocol` (not TLS, or TLS we
    /// refuse).
    pub tls_handshake_failures: Family<ReasonLabels, Counter>,
    /// Certificate reloads by outcome (`ok`, `error`).
    pub tls_reloads: Family<OutcomeLabels, Counter>,
    /// Connections accepted on the proxy listener, by the worker that
    /// serves them (`server.worker_threads`).
    pub worker_connections: Family<WorkerLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sessiongate");
        let requests = Family::<RequestLabels, WorkerCounter>::default();
        let latency = Family::<RouteLabels, WorkerHistogram>::default();
        let lookups = Family::<LookupLabels, WorkerCounter>::default();
        let sessions_created = Counter::default();
        let sessions_revoked = Counter::default();
        let auth_rejections = Family::<ReasonLabels, Counter>::default();
        let upstream_errors = Family::<ReasonLabels, Counter>::default();
        let sessions_swept = Counter::default();
        let durable_queries = Counter::default();
        let activity_flushed = Counter::default();
        let fast_deletes_deferred = Counter::default();
        let policy_calls = Family::<PolicyCallLabels, WorkerCounter>::default();
        let policy_failures = Family::<PolicyFailureLabels, Counter>::default();
        let policy_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "policy_calls",
            "Policy plugin hook calls by plugin, hook and outcome",
            policy_calls.clone(),
        );
        registry.register(
            "policy_failures",
            "Policy plugin calls that trapped, timed out, ran out of memory or decided something invalid",
            policy_failures.clone(),
        );
        registry.register(
            "policy_reloads",
            "Policy chain reloads by result",
            policy_reloads.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads (admin, SIGHUP, file watch) by result (ok, invalid, restart_required, failed); on any but ok the previous config stays in service",
            config_reloads.clone(),
        );
        registry.register(
            "durable_lookup_queries",
            "Session lookups that reached the durable tier (after miss coalescing)",
            durable_queries.clone(),
        );
        registry.register(
            "activity_flushed",
            "Session activity records written to the durable tier by the background writer",
            activity_flushed.clone(),
        );
        registry.register(
            "fast_revocations_deferred",
            "Revocations the fast tier could not take at once (replayed when it recovers)",
            fast_deletes_deferred.clone(),
        );
        let fast_tier_replays = Family::<KindLabels, Counter>::default();
        registry.register(
            "fast_tier_replays",
            "Fast-tier recoveries by what they wrote into it: full (the whole revocation log), own (this instance's failed writes, after a transient error), skipped (another instance replayed the log into the same server)",
            fast_tier_replays.clone(),
        );
        registry.register(
            "requests",
            "Proxied requests by route and response status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, by route",
            latency.clone(),
        );
        registry.register(
            "store_lookups",
            "Session lookups by store tier and outcome",
            lookups.clone(),
        );
        registry.register(
            "sessions_created",
            "Sessions created",
            sessions_created.clone(),
        );
        registry.register(
            "sessions_revoked",
            "Sessions revoked by logout or the admin API",
            sessions_revoked.clone(),
        );
        registry.register(
            "auth_rejections",
            "Requests turned away for want of a valid session, by reason",
            auth_rejections.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures by kind",
            upstream_errors.clone(),
        );
        registry.register(
            "sessions_swept",
            "Expired sessions deleted from the durable tier",
            sessions_swept.clone(),
        );
        let local_cache = LocalCacheMetrics::default();
        local_cache.register(&mut registry);
        let plugin_log_dropped = Family::<PluginLabels, Counter>::default();
        registry.register(
            "plugin_log_dropped",
            "Policy plugin log lines over plugins.log_lines_per_second, counted instead of written",
            plugin_log_dropped.clone(),
        );
        let activity_dropped = Counter::default();
        registry.register(
            "activity_dropped",
            "Pending activity records dropped (oldest first) because store.activity_buffer_capacity sessions were already waiting",
            activity_dropped.clone(),
        );
        let proxy_protocol_rejections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "proxy_protocol_rejections",
            "Connections from trusted proxies closed before any request for a missing, malformed, oversized, cut-short or late PROXY protocol header, by reason",
            proxy_protocol_rejections.clone(),
        );
        let tls_handshake_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on the HTTPS listener that did not complete, by reason (timeout, closed, protocol)",
            tls_handshake_failures.clone(),
        );
        let tls_reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "tls_reloads",
            "Certificate reloads (SIGHUP, admin, file watch) by outcome; on error the previous certificates stay in service",
            tls_reloads.clone(),
        );
        let worker_connections = Family::<WorkerLabels, Counter>::default();
        registry.register(
            "worker_connections",
            "Connections accepted on the proxy listener, by the worker (0 to server.worker_threads - 1) that serves them",
            worker_connections.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            lookups,
            lookup_handles: (0..LOOKUP_TIERS.len() * LOOKUP_OUTCOMES.len())
                .map(|_| OnceLock::new())
                .collect(),
            sessions_created,
            sessions_revoked,
            auth_rejections,
            upstream_errors,
            sessions_swept,
            durable_queries,
            activity_flushed,
            fast_deletes_deferred,
            fast_tier_replays,
            policy_calls,
            policy_failures,
            policy_reloads,
            config_reloads,
            local_cache,
            plugin_log_dropped,
            activity_dropped,
            proxy_protocol_rejections,
            tls_handshake_failures,
            tls_reloads,
            worker_connections,
        }
    }

    pub fn tls_handshake_failure(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn tls_reload(&self, outcome: &'static str) {
        self.tls_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn fast_tier_replay(&self, kind: &'static str) {
        self.fast_tier_replays
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub fn lookup(&self, tier: &'static str, outcome: &'static str) {
        let t = LOOKUP_TIERS.iter().position(|x| *x == tier);
        let o = LOOKUP_OUTCOMES.iter().position(|x| *x == outcome);
        match (t, o) {
            (Some(t), Some(o)) => self.lookup_handles[t * LOOKUP_OUTCOMES.len() + o]
                .get_or_init(|| {
                    self.lookups
                        .get_or_create_owned(&LookupLabels { tier, outcome })
                })
                .inc(),
            _ => self
                .lookups
                .get_or_create(&LookupLabels { tier, outcome })
                .inc(),
        }
    }

    /// The handles a route's requests are counted with.
    pub fn route(&self, route: &'static str) -> RouteMetrics {
        RouteMetrics {
            route,
            requests: self.requests.clone(),
            latency_family: self.latency.clone(),
            by_status: (100..600).map(|_| OnceLock::new()).collect(),
            latency: OnceLock::new(),
        }
    }

    pub fn observe_request(&self, route: &'static str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
    }

    pub fn policy_failure(&self, plugin: &'static str, chain: &'static str, kind: &'static str) {
        self.policy_failures
            .get_or_create(&PolicyFailureLabels {
                plugin,
                kind,
                chain,
            })
            .inc();
    }

    pub fn config_reload(&self, result: &'static str) {
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn policy_reload(&self, result: &'static str) {
        self.policy_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The in-process cache in front of Redis (`store.local_cache_ttl_ms`)
/// and the pub/sub invalidations that keep it current.
#[derive(Clone, Debug, Default)]
pub struct LocalCacheMetrics {
    pub invalidations_published: Counter,
    pub publish_failures: Counter,
    pub invalidations_received: Counter,
    pub malformed_messages: Counter,
    pub clears: Counter,
    pub subscribed: Gauge,
}

impl LocalCacheMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "local_cache_invalidations_published",
            "Session hashes announced on the invalidation channel for every instance to drop",
            self.invalidations_published.clone(),
        );
        registry.register(
            "local_cache_invalidation_publish_failures",
            "Invalidation messages that could not be published (other instances then drop those copies within store.local_cache_ttl_ms)",
            self.publish_failures.clone(),
        );
        registry.register(
            "local_cache_invalidations_received",
            "Session hashes received on the invalidation channel (this instance's own included)",
            self.invalidations_received.clone(),
        );
        registry.register(
            "local_cache_invalidation_malformed",
            "Invalidation messages that could not be read (each drops the whole local cache)",
            self.malformed_messages.clone(),
        );
        registry.register(
            "local_cache_clears",
            "Drops of the whole local cache: on every (re)subscription and unreadable message",
            self.clears.clone(),
        );
        registry.register(
            "local_cache_subscribed",
            "1 while the invalidation channel is subscribed; while 0, another instance's revocation is seen within store.local_cache_ttl_ms",
            self.subscribed.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new();
        m.observe_request("/", 200, 0.001);
        m.lookup("fast", "hit");
        m.sessions_created.inc();
        let text = m.render();
        assert!(
            text.contains(r#"sessiongate_requests_total{route="/",status="200"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"sessiongate_store_lookups_total{tier="fast",outcome="hit"} 1"#));
        assert!(text.contains("sessiongate_sessions_created_total 1"));
        assert!(text.contains("sessiongate_request_duration_seconds_bucket"));
    }
}
