//! The request pipeline: the proxy's phases, in pingora's order, each
//! owned by its own module.
//!
//! 1. **route** (`route.rs`) — the path is normalized (400 if it is
//!    ambiguous, or for a CONNECT / `OPTIONS *` target) and from then on
//!    the request carries only that path; the longest matching prefix
//!    picks the route (404 if none).
//! 2. **authenticate** ([`crate::authn`]) — token, session, the policy
//!    chain's access decision; what a failure means depends on the
//!    route's `auth` mode.
//! 3. **rewrite, forward** ([`crate::forward`]) — the upstream's view of
//!    the request, the upstream call, WebSocket upgrades.
//! 4. **respond** — the upstream response made safe
//!    ([`crate::forward`]), its `x-sessiongate-*` directives applied by
//!    the session service ([`crate::sessions`]); the result is logged and
//!    counted.
//!
//! Forward-auth runs phases 1 and 2 through the same pieces.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};

use crate::assertion::{Assertions, JWKS_PATH};
use crate::authn::{Authenticator, RequestContext};
use crate::body::{self, Body};
use crate::config::Config;
use crate::error::ProxyError;
use crate::forward::{Forwarded, Forwarder};
use crate::forwarded::{self, TrustedProxies};
use crate::headers::{self as h, X_REQUEST_ID};
use crate::limits::{ConnBudget, ConnState};
use crate::metrics::{Metrics, ReasonLabels};
use crate::policy::{Policies, RequestInfo};
use crate::route::{Routes, normalized_uri};
use crate::session::Session;
use crate::sessions::SessionService;
use crate::store::SessionStore;
use crate::token::TokenKey;

/// Everything the request path needs: one per worker (its own upstream
/// pools and policy chain handle), the store, policies and metrics shared.
pub struct Gateway {
    config: Arc<Config>,
    store: SessionStore,
    metrics: Arc<Metrics>,
    policies: Arc<Policies>,
    routes: Routes,
    auth: Authenticator,
    sessions: Arc<SessionService>,
    forwarder: Forwarder,
    /// `server.trusted_proxies`.
    trusted: TrustedProxies,
}

/// What one request did, for its log line.
struct Outcome {
    route: &'static str,
    /// The route's place in `Gateway::routes`, for its metric handles.
    route_index: Option<usize>,
    session_id: Option<uuid::Uuid>,
}

impl Gateway {
    pub fn new(
        config: Arc<Config>,
        store: SessionStore,
        token_key: TokenKey,
        metrics: Arc<Metrics>,
        policies: Arc<Policies>,
    ) -> Gateway {
        Gateway::with_upstreams(config, store, token_key, metrics, policies, None)
    }

    /// [`Gateway::new`] with the upstreams given (one per
    /// `config.upstreams`, in order) rather than new ones: a config reload
    /// keeps the warm pools of the upstreams it did not change.
    pub(crate) fn with_upstreams(
        config: Arc<Config>,
        store: SessionStore,
        token_key: TokenKey,
        metrics: Arc<Metrics>,
        policies: Arc<Policies>,
        upstreams: Option<Vec<Arc<crate::upstream::Upstream>>>,
    ) -> Gateway {
        let chain = Arc::new(policies.cache());
        let routes = Routes::new(&config, &metrics);
        let trusted = TrustedProxies::new(config.server.trusted_proxies.iter().copied());
        let auth = Authenticator::new(
            store.clone(),
            token_key.clone(),
            &config.session,
            chain.clone(),
        );
        let sessions = Arc::new(SessionService::new(
            store.clone(),
            token_key.clone(),
            config.session.clone(),
            chain,
        ));
        let forwarder =
            Forwarder::with_upstreams(config.clone(), token_key, metrics.clone(), upstreams);
        Gateway {
            trusted,
            config,
            store,
            metrics,
            policies,
            routes,
            auth,
            sessions,
            forwarder,
        }
    }

    /// Signs upstream assertions with `assertions` and serves their JWKS
    /// (`[session.assertion]`; one signer shared by every worker).
    pub fn with_assertions(mut self, assertions: Option<Arc<Assertions>>) -> Gateway {
        self.forwarder.set_assertions(assertions);
        self
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn store(&self) -> &SessionStore {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn policies(&self) -> &Arc<Policies> {
        &self.policies
    }

    /// Where sessions begin and end (shared with the admin API).
    pub fn sessions(&self) -> &Arc<SessionService> {
        &self.sessions
    }

    /// The route phase's table (forward-auth routes through it too).
    pub(crate) fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The authenticate phase (forward-auth authenticates through it too).
    pub(crate) fn authenticator(&self) -> &Authenticator {
        &self.auth
    }

    /// The rewrite and forward phases (public for the benches).
    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }

    /// Creates a session as the admin API does (see
    /// [`SessionService::create`]).
    pub async fn create_session(
        &self,
        user_id: String,
        attributes: BTreeMap<String, String>,
        request: Option<&RequestInfo>,
    ) -> Result<(String, Arc<Session>), ProxyError> {
        self.sessions.create(user_id, attributes, request).await
    }

    /// Handles one request from a client at `peer`. Never fails: every
    /// error becomes its response here.
    ///
    /// Generic over the request body so that the whole path can also be
    /// driven in-process (benches), not only by hyper's server.
    pub async fn handle<B>(self: Arc<Self>, mut req: Request<B>, peer: Peer) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
        B::Error: Into<body::BoxError>,
    {
        let started = Instant::now();
        let peer = self.forwarded(peer, req.headers());
        let (client, tcp_peer) = (peer.client, peer.tcp_peer);
        let request_id = request_id(req.headers());
        let method = req.method().clone();
        // From here on the request carries only its normalized path:
        // routing, the log line, the policies and the upstream see one
        // path. A refused one is logged as it came.
        let invalid = match normalized_uri(&method, req.uri()) {
            Ok(Some(uri)) => {
                *req.uri_mut() = uri;
                None
            }
            Ok(None) => None,
            Err(e) => Some(e),
        };
        // A shared handle on the request's bytes, not a copy.
        let uri = req.uri().clone();
        let path = uri.path();
        let html = accepts_html(req.headers());
        let mut outcome = Outcome {
            route: "-",
            route_index: None,
            session_id: None,
        };
        // The gateway's own document, answered before any route: an
        // upstream must be able to fetch it whatever the routes cover.
        let jwks = self.forwarder.assertions().filter(|_| path == JWKS_PATH);
        let result = match (invalid, jwks) {
            (Some(e), _) => Err(e),
            (None, Some(assertions)) => {
                outcome.route = "jwks";
                Ok(assertions.jwks_response(&method, request_id_text(&request_id)))
            }
            (None, None) => self.proxy(req, peer, &request_id, &mut outcome).await,
        };
        let mut resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                if e.is_auth_failure() {
                    self.metrics
                        .auth_rejections
                        .get_or_create(&ReasonLabels { reason: e.code() })
                        .inc();
                }
                let redirect = self
                    .routes
                    .find(path)
                    .and_then(|r| r.login_redirect.as_deref())
                    .filter(|_| e.is_auth_failure());
                match redirect {
                    Some(location) if html => login_redirect(location),
                    _ => e.into_response(request_id_text(&request_id)),
                }
            }
        };
        resp.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        let elapsed = started.elapsed();
        let status = resp.status().as_u16();
        match outcome.route_index {
            Some(i) => self.routes[i]
                .metrics
                .observe(status, elapsed.as_secs_f64()),
            None => self
                .metrics
                .observe_request(outcome.route, status, elapsed.as_secs_f64()),
        }
        tracing::info!(
            target: "sessiongate::access",
            request_id = request_id_text(&request_id),
            client = %client,
            peer = %tcp_peer,
            method = %method,
            path = %path,
            route = %outcome.route,
            status,
            latency_us = elapsed.as_micros() as u64,
            session_id = outcome.session_id.map(|id| id.to_string()).unwrap_or_default(),
            "request"
        );
        resp
    }

    /// The phases after the path's normalization.
    async fn proxy<B>(
        &self,
        req: Request<B>,
        peer: Peer,
        request_id: &HeaderValue,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, ProxyError>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
        B::Error: Into<body::BoxError>,
    {
        let index = self
            .routes
            .index(req.uri().path())
            .ok_or(ProxyError::NoRoute)?;
        let route = &self.routes[index];
        outcome.route = route.label;
        outcome.route_index = Some(index);

        let context = RequestContext::new(req.method(), req.uri(), req.headers(), peer.client);
        let who = self
            .auth
            .identify(route.auth, req.headers(), request_id_text(request_id))
            .await?;
        outcome.session_id = who.session.as_ref().map(|s| s.id);
        self.auth.authorize(route, &who, &context).await?;

        let forwarded = self
            .forwarder
            .forward(req, route, who.session.as_deref(), &peer, request_id)
            .await?;
        match forwarded {
            Forwarded::Upgraded(resp) => Ok(resp),
            Forwarded::Response(mut resp) => {
                self.sessions
                    .apply_directives(
                        route.policies.as_deref(),
                        resp.headers_mut(),
                        who.presented.key(),
                        who.session.as_deref(),
                        &context,
                    )
                    .await?;
                Ok(resp)
            }
        }
    }

    /// `peer` with the request's client as the trusted-proxy rules have
    /// it (`forwarded.rs`): from a trusted peer, the rightmost untrusted
    /// `X-Forwarded-For` hop, the verified chain for the upstream, and
    /// `X-Forwarded-Proto`; from any other, `peer` unchanged (and no
    /// work: the common case).
    pub(crate) fn forwarded(&self, mut peer: Peer, headers: &HeaderMap) -> Peer {
        if !self.trusted.contains(peer.addr.ip()) {
            return peer;
        }
        let values =
            |name: http::HeaderName| headers.get_all(name).into_iter().map(HeaderValue::as_bytes);
        let resolved =
            forwarded::resolve(&self.trusted, peer.addr.ip(), values(h::X_FORWARDED_FOR));
        peer.client = resolved.client;
        peer.ip = resolved.header_value();
        peer.forwarded_proto = forwarded::forwarded_proto(values(h::X_FORWARDED_PROTO));
        peer
    }
}

/// The client's request id if it is a sane one (shared, not copied),
/// else a new UUID v7.
pub(crate) fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(X_REQUEST_ID) {
        let bytes = v.as_bytes();
        if !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(u8::is_ascii_graphic) {
            return v.clone();
        }
    }
    thread_local! {
        // `Uuid::now_v7` takes a lock shared by every thread, on every
        // request: each worker keeps its own context instead (ids stay
        // ordered per worker, and unique from their random bits).
        static REQUEST_IDS: uuid::ContextV7 = const { uuid::ContextV7::new() };
    }
    let id = uuid::Uuid::new_v7(REQUEST_IDS.with(|context| uuid::Timestamp::now(context)));
    let mut buffer = uuid::Uuid::encode_buffer();
    let text = id.hyphenated().encode_lower(&mut buffer);
    HeaderValue::from_str(text).expect("a UUID is header-safe")
}

/// A request id as text: every id [`request_id`] returns is ASCII.
pub(crate) fn request_id_text(id: &HeaderValue) -> &str {
    id.to_str().unwrap_or("-")
}

/// The client end of a connection, with its `X-Forwarded-For` value made
/// once per connection rather than once per request, and the state its
/// requests share (requests in flight, upstream request slots).
#[derive(Clone)]
pub struct Peer {
    /// The connection's client: the TCP peer, or the source address of
    /// a trusted proxy's PROXY protocol header.
    pub addr: SocketAddr,
    /// The `X-Forwarded-For` value for the upstream: `addr`, or a trusted
    /// peer's verified chain once the request's header has been walked.
    pub(crate) ip: HeaderValue,
    /// The request's client (logs, policies): `addr`'s address, or the
    /// one a trusted peer's `X-Forwarded-For` gives.
    pub(crate) client: IpAddr,
    /// The socket's peer (a load balancer, with the PROXY protocol), logged
    /// alongside the client.
    pub(crate) tcp_peer: SocketAddr,
    /// A trusted peer's `X-Forwarded-Proto`: `http` or `https`.
    pub(crate) forwarded_proto: Option<&'static str>,
    pub(crate) conn: Arc<ConnState>,
    /// The connection is TLS (`[server.tls]`): `x-forwarded-proto: https`.
    pub(crate) tls: bool,
}

impl Peer {
    /// A peer whose connection may have any number of upstream requests
    /// in flight (for driving the gateway in-process).
    pub fn new(addr: SocketAddr) -> Peer {
        Peer::with_upstream_limit(addr, usize::MAX)
    }

    /// A peer whose connection may have at most `max_upstream` upstream
    /// requests in flight (`server.max_upstream_per_connection`).
    pub fn with_upstream_limit(addr: SocketAddr, max_upstream: usize) -> Peer {
        Peer::for_connection(addr, max_upstream, None)
    }

    /// The peer of an accepted connection, which holds `budget` for as
    /// long as anything of it lives.
    pub(crate) fn for_connection(
        addr: SocketAddr,
        max_upstream: usize,
        budget: Option<ConnBudget>,
    ) -> Peer {
        let client = forwarded::canonical(addr.ip());
        let ip = HeaderValue::from_str(&client.to_string()).expect("an IP address is header-safe");
        Peer {
            addr,
            ip,
            client,
            tcp_peer: addr,
            forwarded_proto: None,
            conn: ConnState::new(max_upstream, budget),
            tls: false,
        }
    }

    /// The same client, reached through `tcp_peer` (a load balancer that
    /// sent a PROXY protocol header).
    pub(crate) fn via(mut self, tcp_peer: SocketAddr) -> Peer {
        self.tcp_peer = tcp_peer;
        self
    }
}

pub(crate) fn accepts_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"))
}

pub(crate) fn login_redirect(location: &str) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h), "has space");
        assert_eq!(request_id(&HeaderMap::new()).len(), 36);
        h.insert(
            X_REQUEST_ID,
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        assert_eq!(request_id_text(&request_id(&h)).len(), 36);
    }
}
