//! Prometheus metrics, served as text on the admin listener's `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyFailureLabels {
    pub plugin: &'static str,
    /// `timeout`, `memory`, `stack`, `trap`, `invalid_decision`, `instantiate`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub plugin: &'static str,
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
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

type HistogramCtor = fn() -> Histogram;

fn latency_histogram() -> Histogram {
    // 100 µs to ~3.3 s: the gateway's own cost sits at the bottom,
    // slow upstreams at the top.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram, HistogramCtor>,
    pub lookups: Family<LookupLabels, Counter>,
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
    pub policy_calls: Family<PolicyCallLabels, Counter>,
    pub policy_failures: Family<PolicyFailureLabels, Counter>,
    pub policy_reloads: Family<ResultLabels, Counter>,
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
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sessiongate");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram, HistogramCtor>::new_with_constructor(
            latency_histogram,
        );
        let lookups = Family::<LookupLabels, Counter>::default();
        let sessions_created = Counter::default();
        let sessions_revoked = Counter::default();
        let auth_rejections = Family::<ReasonLabels, Counter>::default();
        let upstream_errors = Family::<ReasonLabels, Counter>::default();
        let sessions_swept = Counter::default();
        let durable_queries = Counter::default();
        let activity_flushed = Counter::default();
        let fast_deletes_deferred = Counter::default();
        let policy_calls = Family::<PolicyCallLabels, Counter>::default();
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
        Metrics {
            registry,
            requests,
            latency,
            lookups,
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
            local_cache,
            plugin_log_dropped,
            activity_dropped,
            proxy_protocol_rejections,
            tls_handshake_failures,
            tls_reloads,
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
        self.lookups
            .get_or_create(&LookupLabels { tier, outcome })
            .inc();
    }

    pub fn observe_request(&self, route: &'static str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
    }

    pub fn policy_failure(&self, plugin: &'static str, kind: &'static str) {
        self.policy_failures
            .get_or_create(&PolicyFailureLabels { plugin, kind })
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
