//! Upstreams: pooled keep-alive HTTP/1.1 clients, round robin across an
//! upstream's URLs, and skipping a URL that refuses connections.
//!
//! A URL whose connection fails is benched for [`BENCH_TIME`]; requests go
//! to the others meanwhile (or to it anyway if every URL is benched, since
//! a guess beats a certain 502). A request without a body whose connection
//! fails is retried once per other URL; one with a body is not, because
//! its body has already been handed to the failed attempt.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::{PathAndQuery, Uri};
use http::{HeaderMap, Method, Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::body::{self, Body};
use crate::config::UpstreamConfig;
use crate::error::ProxyError;
use crate::session::now_ms;

/// How long a URL that refused a connection is skipped.
pub const BENCH_TIME: Duration = Duration::from_secs(5);

struct Target {
    base: Uri,
    benched_until: AtomicI64,
}

pub struct Upstream {
    pub name: String,
    targets: Vec<Target>,
    next: AtomicUsize,
    client: Client<HttpConnector, Body>,
    timeout: Duration,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Arc<Upstream> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        Arc::new(Upstream {
            name: config.name.clone(),
            targets: config
                .urls
                .iter()
                .map(|base| Target {
                    base: base.clone(),
                    benched_until: AtomicI64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            client,
            timeout: config.timeout,
        })
    }

    /// Target indices in the order to try them for one request.
    fn order(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.targets.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let now = now_ms();
        let healthy = (0..n)
            .map(move |i| (start + i) % n)
            .filter(move |&i| self.targets[i].benched_until.load(Ordering::Relaxed) <= now);
        let benched = (0..n)
            .map(move |i| (start + i) % n)
            .filter(move |&i| self.targets[i].benched_until.load(Ordering::Relaxed) > now);
        healthy.chain(benched)
    }

    fn uri_for(&self, target: usize, path: Option<&PathAndQuery>) -> Uri {
        let base = &self.targets[target].base;
        let mut parts = http::uri::Parts::default();
        parts.scheme = base.scheme().cloned();
        parts.authority = base.authority().cloned();
        parts.path_and_query = Some(
            path.cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts).unwrap_or_else(|_| base.clone())
    }

    /// Sends a request whose headers are already rewritten for upstream.
    pub async fn send(
        &self,
        method: Method,
        path: Option<PathAndQuery>,
        headers: HeaderMap,
        body: Body,
        body_is_empty: bool,
    ) -> Result<Response<Incoming>, ProxyError> {
        let order: Vec<usize> = self.order().collect();
        let attempts = if body_is_empty { order.len() } else { 1 };
        let mut body = Some(body);
        let mut headers = Some(headers);
        for (attempt, &target) in order.iter().take(attempts).enumerate() {
            let mut req = Request::new(body.take().unwrap_or_else(body::empty));
            *req.method_mut() = method.clone();
            *req.uri_mut() = self.uri_for(target, path.as_ref());
            *req.version_mut() = Version::HTTP_11;
            // Only a retry needs a copy of the headers.
            *req.headers_mut() = if attempt + 1 == attempts {
                headers.take().unwrap_or_default()
            } else {
                headers.clone().unwrap_or_default()
            };
            match tokio::time::timeout(self.timeout, self.client.request(req)).await {
                Err(_) => return Err(ProxyError::UpstreamTimeout),
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(e)) if e.is_connect() => {
                    self.targets[target]
                        .benched_until
                        .store(now_ms() + BENCH_TIME.as_millis() as i64, Ordering::Relaxed);
                    tracing::warn!(
                        upstream = %self.name,
                        url = %self.targets[target].base,
                        error = %error_chain(&e),
                        "upstream connection failed"
                    );
                }
                Ok(Err(e)) => {
                    tracing::warn!(upstream = %self.name, error = %error_chain(&e), "upstream request failed");
                    return Err(ProxyError::UpstreamUnreachable);
                }
            }
        }
        Err(ProxyError::UpstreamUnreachable)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
