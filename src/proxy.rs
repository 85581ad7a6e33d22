//! The request path: route, authenticate, forward, and act on the
//! upstream's session headers.
//!
//! Phases, in the order they run for each request:
//!
//! 1. **route** — the path is normalized ([`crate::path`]; 400 if it is
//!    ambiguous, or for a CONNECT / `OPTIONS *` target) and from then on
//!    the request carries only that path; the longest matching prefix
//!    picks the route (404 if none).
//! 2. **authenticate** — the token is taken from `Authorization: Bearer` or
//!    the session cookies, checked for shape and MAC (no store is asked for
//!    a malformed one; of several, the one that verifies counts, and two
//!    different ones that verify are refused), then looked up in the hybrid
//!    store. What a failure means depends on the route's `auth` mode.
//! 3. **rewrite** ([`crate::headers::rewrite_request`]) — hop-by-hop
//!    headers go, and every `Upgrade` but a WebSocket handshake's; client
//!    copies of identity, forwarding, `x-sessiongate-*` and path-override
//!    headers go (on every route), in any spelling a CGI-style server reads
//!    the same (or the request is refused); the session's identity, the
//!    `x-forwarded-*` headers and `x-request-id` are set; the session
//!    cookie and our tokens are kept from the upstream.
//! 4. **forward** — to the route's upstream, bodies streamed both ways;
//!    a WebSocket handshake becomes a bridged byte stream once the
//!    upstream's 101 proves it is one (RFC 6455's accept key).
//! 5. **respond** — the upstream's own `Set-Cookie` for the session cookie
//!    is dropped; the `x-sessiongate-*` headers of the response begin or
//!    end sessions and are removed; the result is logged and counted.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use crate::body::{self, Body};
use crate::config::{AuthMode, Config, LookalikeHeaders, RouteConfig};
use crate::error::ProxyError;
use crate::forwarded::{self, TrustedProxies};
use crate::headers::{self as h, X_REQUEST_ID};
use crate::limits::{ConnBudget, ConnState, LimitedBody};
use crate::metrics::{Metrics, ReasonLabels};
use crate::policy::{AccessOutcome, Policies, Refusal, RequestInfo};
use crate::session::{self, Session};
use crate::store::SessionStore;
use crate::token::{self, TokenHash, TokenKey};
use crate::upstream::Upstream;

/// Everything the request path needs: one per worker (its own upstream
/// pools and policy chain handle), the store, policies and metrics shared.
pub struct Gateway {
    pub config: Arc<Config>,
    pub store: SessionStore,
    pub token_key: TokenKey,
    pub metrics: Arc<Metrics>,
    pub policies: Arc<Policies>,
    routes: Vec<Route>,
    /// This gateway's (its worker's) handle on the running policy chain.
    chain: crate::policy::ChainCache,
    upstreams: Vec<Arc<Upstream>>,
    /// `server.trusted_proxies`.
    trusted: TrustedProxies,
}

/// A configured route with its metric label and handles.
struct Route {
    config: RouteConfig,
    label: &'static str,
    metrics: crate::metrics::RouteMetrics,
}

impl std::ops::Deref for Route {
    type Target = RouteConfig;
    fn deref(&self) -> &RouteConfig {
        &self.config
    }
}

/// The token a request presented, after the shape and MAC checks.
#[derive(Debug, Clone, Copy)]
enum Presented {
    Nothing,
    Malformed,
    Valid(TokenHash),
    /// Several different tokens that all verify. Never resolved by
    /// picking one: a browser lists a cookie with a longer `Path` first,
    /// so a page that plants a path-scoped session cookie would otherwise
    /// choose whose session the victim uses under that path.
    Ambiguous,
}

/// Most session tokens one request may present: each costs an HMAC, and
/// no browser holds more than a few cookies of one name.
const MAX_PRESENTED: usize = 8;

impl Presented {
    /// The outcome once one more candidate has been checked: a token that
    /// verifies wins over malformed ones, two different ones that verify
    /// are ambiguous.
    fn and(self, candidate: Result<TokenHash, token::MalformedToken>) -> Presented {
        match (self, candidate) {
            (Presented::Ambiguous, _) => Presented::Ambiguous,
            (Presented::Valid(a), Ok(b)) if a != b => Presented::Ambiguous,
            (Presented::Valid(a), _) => Presented::Valid(a),
            (_, Ok(b)) => Presented::Valid(b),
            (_, Err(_)) => Presented::Malformed,
        }
    }
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
        let mut routes: Vec<Route> = config
            .routes
            .iter()
            .map(|r| {
                let label = crate::metrics::intern(&r.prefix);
                Route {
                    label,
                    metrics: metrics.route(label),
                    config: r.clone(),
                }
            })
            .collect();
        // Longest prefix first, so the first match is the most specific;
        // of two of one length, the exact-case one.
        routes.sort_by_key(|r| (std::cmp::Reverse(r.prefix.len()), r.case_insensitive));
        let upstreams = config.upstreams.iter().map(Upstream::new).collect();
        let trusted = TrustedProxies::new(config.server.trusted_proxies.iter().copied());
        Gateway {
            trusted,
            config,
            store,
            token_key,
            metrics,
            chain: policies.cache(),
            policies,
            routes,
            upstreams,
        }
    }

    /// The route of a normalized path. Prefixes hold only unreserved
    /// characters and `/` (config validation), so matching the normal
    /// form is matching what the upstream decodes it to.
    fn route(&self, path: &str) -> Option<&Route> {
        self.route_index(path).map(|i| &self.routes[i])
    }

    fn route_index(&self, path: &str) -> Option<usize> {
        self.routes.iter().position(|r| {
            if r.case_insensitive {
                path.as_bytes()
                    .get(..r.prefix.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(r.prefix.as_bytes()))
            } else {
                path.starts_with(&r.prefix)
            }
        })
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
        let result = match invalid {
            Some(e) => Err(e),
            None => self.proxy(req, peer, &request_id, &mut outcome).await,
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
                    .route(path)
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

    async fn proxy<B>(
        &self,
        mut req: Request<B>,
        peer: Peer,
        request_id: &HeaderValue,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, ProxyError>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
        B::Error: Into<body::BoxError>,
    {
        let index = self
            .route_index(req.uri().path())
            .ok_or(ProxyError::NoRoute)?;
        let route = &self.routes[index];
        outcome.route = route.label;
        outcome.route_index = Some(index);

        // Authenticate.
        let presented = self.presented_token(req.headers());
        let session = match (route.auth, presented) {
            (AuthMode::None, _) => None,
            (AuthMode::Required, Presented::Nothing) => return Err(ProxyError::MissingSession),
            (AuthMode::Required, Presented::Malformed) => return Err(ProxyError::MalformedToken),
            (AuthMode::Required, Presented::Ambiguous) => return Err(ProxyError::InvalidSession),
            (
                AuthMode::Optional,
                Presented::Nothing | Presented::Malformed | Presented::Ambiguous,
            ) => None,
            (mode, Presented::Valid(key)) => match self.store.lookup(&key).await {
                Ok(Some(s)) => Some(s),
                Ok(None) if mode == AuthMode::Required => {
                    return Err(ProxyError::InvalidSession);
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(request_id = request_id_text(request_id), error = %e, "session lookup failed");
                    return Err(ProxyError::StoreUnavailable);
                }
            },
        };
        outcome.session_id = session.as_ref().map(|s| s.id);
        if route.auth == AuthMode::Required && session.is_none() {
            return Err(ProxyError::InvalidSession);
        }
        // What the policy hooks may see of the request; kept (cheaply:
        // shared buffers) for the create hooks too, should the response
        // log someone in.
        let context = RequestContext {
            method: req.method().clone(),
            uri: req.uri().clone(),
            host: req.headers().get(header::HOST).cloned(),
            user_agent: req.headers().get(header::USER_AGENT).cloned(),
            client: peer.client,
        };
        if let (Some(s), Presented::Valid(key)) = (&session, presented) {
            let chain = self.chain.get();
            let extend = if chain.wants_access() {
                match chain.on_access(s, &context.info(), session::now_ms()).await {
                    AccessOutcome::Allow => None,
                    AccessOutcome::Extend(at) => Some(at),
                    AccessOutcome::Refuse(refusal) => return Err(refusal.into()),
                }
            } else {
                None
            };
            self.note_activity(&key, s, extend).await;
        }

        // Rewrite.
        let websocket_key = h::websocket_key(req.headers()).cloned();
        let upgrade = websocket_key.is_some();
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, incoming) = req.into_parts();
        let mut headers = parts.headers;
        self.rewrite_request_headers(&mut headers, &parts.uri, &peer, request_id, upgrade)?;
        if let Some(s) = &session {
            self.set_identity(&mut headers, s);
        }

        // Forward. A body declared larger than the route accepts is
        // refused before any upstream connection; one that grows past it,
        // stalls or breaks aborts the upstream request (limits.rs).
        if http_body::Body::size_hint(&incoming).lower() > route.max_body_bytes {
            return Err(ProxyError::BodyTooLarge);
        }
        let incoming = LimitedBody::new(
            incoming,
            route.max_body_bytes,
            self.config.server.body_read_timeout,
        );
        let upstream = &self.upstreams[route.upstream];
        let mut resp = upstream
            .send(
                parts.method,
                parts.uri.path_and_query().cloned(),
                headers,
                body::boxed(incoming),
                &peer.conn,
            )
            .await
            .inspect_err(|e| {
                if e.status().is_server_error() {
                    self.metrics
                        .upstream_errors
                        .get_or_create(&ReasonLabels { reason: e.code() })
                        .inc();
                }
            })?;

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let (Some(client_upgrade), Some(key)) = (client_upgrade, &websocket_key) {
                // Only the WebSocket the client asked for is bridged: a
                // 101 to anything else would open a tunnel whose later
                // requests the gateway never sees.
                if !h::is_websocket_switch(resp.headers(), key) {
                    return Err(ProxyError::UpstreamProtocol(
                        "a 101 without Upgrade: websocket and the right Sec-WebSocket-Accept"
                            .into(),
                    ));
                }
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let request_id = request_id_text(request_id).to_string();
                // The tunnel is still the client's connection: it keeps
                // its place under the connection caps until it ends.
                let connection = peer.conn.clone();
                let idle = self.config.server.idle_timeout;
                tokio::spawn(async move {
                    match tokio::try_join!(client_upgrade, upstream_upgrade) {
                        Ok((client, upstream)) => {
                            crate::limits::tunnel(
                                TokioIo::new(client),
                                TokioIo::new(upstream),
                                idle,
                            )
                            .await;
                        }
                        Err(e) => tracing::warn!(request_id, error = %e, "upgrade failed"),
                    }
                    drop(connection);
                });
                let (mut parts, _) = resp.into_parts();
                h::strip_hop_by_hop(&mut parts.headers, true);
                h::remove_set_cookie(&mut parts.headers, &self.config.session.cookie_name);
                // Sessions begin and end on ordinary responses only; on a
                // handshake these headers are dropped, never passed on.
                parts.headers.remove(h::SG_LOGIN);
                parts.headers.remove(h::SG_ATTRIBUTES);
                parts.headers.remove(h::SG_LOGOUT);
                return Ok(Response::from_parts(parts, body::empty()));
            }
            return Err(ProxyError::UpstreamProtocol(
                "switched protocols without being asked".into(),
            ));
        }

        // Respond.
        let (mut parts, upstream_body) = resp.into_parts();
        h::strip_hop_by_hop(&mut parts.headers, false);
        // Before the gateway adds its own: only the gateway sets its cookie.
        h::remove_set_cookie(&mut parts.headers, &self.config.session.cookie_name);
        self.session_headers(&mut parts.headers, presented, session.as_deref(), &context)
            .await?;
        Ok(Response::from_parts(parts, upstream_body))
    }

    /// Keeps `last_seen_at` current to within `session.touch_interval`
    /// (so that most requests cause no write at all) and applies a
    /// policy's new expiry.
    async fn note_activity(&self, key: &TokenHash, session: &Session, extend: Option<i64>) {
        let now = session::now_ms();
        let interval = self.config.session.touch_interval.as_millis() as i64;
        if extend.is_some() || now - session.last_seen_at >= interval {
            let mut updated = session.clone();
            updated.last_seen_at = now;
            if let Some(at) = extend {
                updated.expires_at = at;
            }
            self.store.record_activity(key, updated).await;
        }
    }

    /// The token the request presents: bearer tokens of our shape if
    /// there are any, else the session cookies, else a bearer token of
    /// another shape (malformed). Among several candidates the one whose
    /// MAC verifies counts, never merely the first; several different
    /// ones that verify, or more than [`MAX_PRESENTED`], are ambiguous.
    fn presented_token(&self, headers: &HeaderMap) -> Presented {
        let mut presented = Presented::Nothing;
        let mut count = 0;
        let mut other_bearer = false;
        for bearer in h::bearer_tokens(headers) {
            if token::looks_like_token(bearer) {
                count += 1;
                if count > MAX_PRESENTED {
                    break;
                }
                presented = presented.and(self.token_key.verify(bearer));
            } else {
                other_bearer = true;
            }
        }
        if count == 0 {
            for cookie in h::cookie_values(headers, &self.config.session.cookie_name) {
                count += 1;
                if count > MAX_PRESENTED {
                    break;
                }
                presented = presented.and(self.token_key.verify(cookie));
            }
        }
        match presented {
            _ if count > MAX_PRESENTED => Presented::Ambiguous,
            Presented::Nothing if other_bearer => Presented::Malformed,
            presented => presented,
        }
    }

    /// Whether an `Authorization` value carries a token of ours: a
    /// `Bearer` credential of our shape (removed without an HMAC, as any
    /// token-shaped bearer could be ours under an older key), or a word
    /// of any other scheme or list that verifies as one.
    fn carries_our_token(&self, value: &HeaderValue) -> bool {
        if h::bearer_of(value).is_some_and(token::looks_like_token) {
            return true;
        }
        h::authorization_words(value)
            .any(|w| token::looks_like_token(w) && self.token_key.verify(w).is_ok())
    }

    /// Rewrites a client's request headers for the upstream: hop-by-hop
    /// headers and whatever the client claims about identity or
    /// forwarding go, the forwarding headers and the request id are set
    /// (the identity headers are [`Gateway::set_identity`]'s). `upgrade`
    /// keeps a WebSocket handshake's `Upgrade` (and nothing else's).
    /// Public for the benches.
    ///
    /// Fails only with `session.lookalike_headers = "reject"`, on a
    /// header that reads as a gateway-owned one once `_` is taken for `-`.
    pub fn rewrite_request_headers(
        &self,
        headers: &mut HeaderMap,
        uri: &http::Uri,
        peer: &Peer,
        request_id: &HeaderValue,
        upgrade: bool,
    ) -> Result<(), ProxyError> {
        let session = &self.config.session;
        let rewrite = h::RequestRewrite {
            user_header: &session.user_header,
            session_header: &session.session_header,
            reject_lookalikes: session.lookalike_headers == LookalikeHeaders::Reject,
            cookie_name: (!session.forward_token).then_some(session.cookie_name.as_str()),
            upgrade,
            uri,
            peer_ip: &peer.ip,
            https: peer.tls,
            request_id,
        };
        h::rewrite_request(headers, &rewrite, |v| self.carries_our_token(v))
            .map_err(|name| ProxyError::ForbiddenHeader(name.as_str().to_string()))?;
        // A trusted proxy's word on the client's scheme wins over the
        // connection's own.
        if let Some(proto) = peer.forwarded_proto {
            headers.insert(h::X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        Ok(())
    }

    /// `peer` with the request's client as the trusted-proxy rules have
    /// it (`forwarded.rs`): from a trusted peer, the rightmost untrusted
    /// `X-Forwarded-For` hop, the verified chain for the upstream, and
    /// `X-Forwarded-Proto`; from any other, `peer` unchanged (and no
    /// work: the common case).
    fn forwarded(&self, mut peer: Peer, headers: &HeaderMap) -> Peer {
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

    /// Sets the identity headers of `session` (public for the benches).
    pub fn set_identity(&self, headers: &mut HeaderMap, session: &Session) {
        let config = &self.config.session;
        if let Ok(v) = HeaderValue::from_str(&session.user_id) {
            headers.insert(config.user_header.clone(), v);
        }
        let mut id = uuid::Uuid::encode_buffer();
        let id = session.id.hyphenated().encode_lower(&mut id);
        if let Ok(v) = HeaderValue::from_str(id) {
            headers.insert(config.session_header.clone(), v);
        }
    }

    /// Acts on `x-sessiongate-login` / `-attributes` / `-logout` in an
    /// upstream response and removes them.
    async fn session_headers(
        &self,
        headers: &mut HeaderMap,
        presented: Presented,
        session: Option<&Session>,
        context: &RequestContext,
    ) -> Result<(), ProxyError> {
        // Most responses carry none: look at the names present once
        // instead of hashing all three.
        if !h::contains_any(headers, &[&h::SG_LOGIN, &h::SG_ATTRIBUTES, &h::SG_LOGOUT]) {
            return Ok(());
        }
        let login = headers.remove(h::SG_LOGIN);
        let attributes = headers.remove(h::SG_ATTRIBUTES);
        let logout = headers.remove(h::SG_LOGOUT);
        let presented_key = match presented {
            Presented::Valid(key) => Some(key),
            _ => None,
        };

        if let Some(logout) = logout {
            match logout.as_bytes() {
                b"current" => {
                    if let Some(key) = presented_key {
                        self.store.revoke(&key).await.map_err(store_down)?;
                    }
                }
                b"all" => {
                    let user = match (session, presented_key) {
                        (Some(s), _) => Some(s.user_id.clone()),
                        (None, Some(key)) => self
                            .store
                            .lookup(&key)
                            .await
                            .map_err(store_down)?
                            .map(|s| s.user_id.clone()),
                        (None, None) => None,
                    };
                    if let Some(user) = user {
                        self.store.revoke_user(&user).await.map_err(store_down)?;
                    }
                }
                other => {
                    return Err(ProxyError::UpstreamProtocol(format!(
                        "x-sessiongate-logout must be \"current\" or \"all\", not {:?}",
                        String::from_utf8_lossy(other)
                    )));
                }
            }
            if login.is_none() {
                headers.append(header::SET_COOKIE, self.cookie(None));
            }
        }

        if let Some(login) = login {
            let user_id = login
                .to_str()
                .map_err(|_| {
                    ProxyError::UpstreamProtocol("x-sessiongate-login is not text".into())
                })?
                .to_string();
            session::validate_user_id(&user_id)
                .map_err(|m| ProxyError::UpstreamProtocol(format!("x-sessiongate-login {m}")))?;
            let attributes = match attributes {
                None => BTreeMap::new(),
                Some(v) => parse_attributes(v.as_bytes())?,
            };
            // No fixation: the session the request came with ends here.
            if let Some(key) = presented_key {
                self.store.revoke(&key).await.map_err(store_down)?;
            }
            let (token, session) = self
                .create_session(user_id, attributes, Some(&context.info()))
                .await?;
            // Rounded up: a cookie that dies a second early logs users out early.
            let max_age = (session.remaining_ms(session::now_ms()) + 999) / 1000;
            headers.append(header::SET_COOKIE, self.cookie(Some((&token, max_age))));
        }
        Ok(())
    }

    /// Creates a durable session for `user_id` through the policy chain
    /// (create hooks, then eviction of the user's other sessions); returns
    /// its token (the only copy there will ever be) and the session.
    pub async fn create_session(
        &self,
        user_id: String,
        attributes: BTreeMap<String, String>,
        request: Option<&RequestInfo>,
    ) -> Result<(String, Arc<Session>), ProxyError> {
        let chain = self.chain.get();
        let now = session::now_ms();
        let mut session = Session::new(user_id, attributes, self.config.session.default_ttl);
        chain
            .on_create(&mut session, request, now)
            .await
            .map_err(|r: Refusal| ProxyError::from(r))?;
        let (token, key) = self.token_key.issue();
        let session = self.store.create(&key, session).await.map_err(store_down)?;
        if chain.wants_evict() {
            match self.store.list_user(&session.user_id).await {
                Ok(live) => {
                    for id in chain.on_evict(&session, &live, now).await {
                        match self.store.revoke_id(id).await {
                            Ok(_) => {
                                tracing::info!(session_id = %id, user = %session.user_id, "session evicted by policy")
                            }
                            Err(e) => {
                                tracing::warn!(session_id = %id, error = %e, "eviction failed")
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not list sessions for eviction"),
            }
        }
        Ok((token, session))
    }

    /// A `Set-Cookie` value carrying `token` for `max_age` seconds, or
    /// clearing the cookie.
    fn cookie(&self, token: Option<(&str, i64)>) -> HeaderValue {
        let s = &self.config.session;
        let secure = if s.cookie_secure { "; Secure" } else { "" };
        let (value, max_age) = token.unwrap_or(("", 0));
        let text = format!(
            "{}={value}; Path=/; HttpOnly; SameSite=Lax{secure}; Max-Age={max_age}",
            s.cookie_name
        );
        HeaderValue::from_str(&text).expect("cookie names and tokens are header-safe")
    }
}

/// The parts of a request a create hook may see, kept past forwarding.
struct RequestContext {
    method: http::Method,
    uri: http::Uri,
    host: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    client: IpAddr,
}

impl RequestContext {
    fn info(&self) -> RequestInfo {
        let text = |v: &Option<HeaderValue>| {
            v.as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let host = match &self.host {
            Some(_) => text(&self.host),
            None => self
                .uri
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        };
        RequestInfo {
            method: self.method.to_string(),
            path: self.uri.path().to_string(),
            host,
            client_addr: self.client.to_string(),
            user_agent: text(&self.user_agent),
        }
    }
}

/// The request's URI with its path in normal form, `None` when it
/// already is (nearly always: then nothing is copied), or
/// [`ProxyError::InvalidPath`] for an ambiguous path and for targets that
/// are not paths (CONNECT's authority form, `OPTIONS *`).
fn normalized_uri(method: &Method, uri: &Uri) -> Result<Option<Uri>, ProxyError> {
    if method == Method::CONNECT {
        return Err(ProxyError::InvalidPath);
    }
    let path = match crate::path::normalize(uri.path()) {
        Ok(Cow::Borrowed(_)) => return Ok(None),
        Ok(Cow::Owned(path)) => path,
        Err(reason) => {
            tracing::debug!(%reason, "request path refused");
            return Err(ProxyError::InvalidPath);
        }
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(path_and_query).map_err(|_| ProxyError::InvalidPath)?);
    Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| ProxyError::InvalidPath)
}

fn store_down(e: crate::store::StoreError) -> ProxyError {
    tracing::error!(error = %e, "session store write failed");
    ProxyError::StoreUnavailable
}

fn parse_attributes(bytes: &[u8]) -> Result<BTreeMap<String, String>, ProxyError> {
    let attributes: BTreeMap<String, String> = serde_json::from_slice(bytes).map_err(|e| {
        ProxyError::UpstreamProtocol(format!(
            "x-sessiongate-attributes must be a JSON object of strings: {e}"
        ))
    })?;
    session::validate_attributes(&attributes)
        .map_err(|m| ProxyError::UpstreamProtocol(format!("x-sessiongate-attributes: {m}")))?;
    Ok(attributes)
}

/// The client's request id if it is a sane one (shared, not copied),
/// else a new UUID v7.
fn request_id(headers: &HeaderMap) -> HeaderValue {
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
fn request_id_text(id: &HeaderValue) -> &str {
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
    ip: HeaderValue,
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

fn accepts_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"))
}

fn login_redirect(location: &str) -> Response<Body> {
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

    #[test]
    fn the_uri_carries_the_normalized_path_and_the_query_unchanged() {
        let get = Method::GET;
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(
            normalized_uri(&get, &uri("/public/x?a=%2e%2e")).unwrap(),
            None
        );
        let abs = normalized_uri(&get, &uri("http://h:1/public/../secret?q=/../%2f"));
        assert_eq!(
            abs.unwrap().unwrap().to_string(),
            "http://h:1/secret?q=/../%2f"
        );
        let origin = normalized_uri(&get, &uri("//%61pp/./x/"));
        assert_eq!(origin.unwrap().unwrap().to_string(), "/app/x/");
        for target in ["/app%2fx", "/a/%2e%2e/b", "*"] {
            assert!(matches!(
                normalized_uri(&get, &uri(target)),
                Err(ProxyError::InvalidPath)
            ));
        }
        assert!(matches!(
            normalized_uri(&Method::CONNECT, &uri("example.com:443")),
            Err(ProxyError::InvalidPath)
        ));
        assert!(matches!(
            normalized_uri(&Method::OPTIONS, &uri("*")),
            Err(ProxyError::InvalidPath)
        ));
    }

    #[test]
    fn attributes_must_be_an_object_of_strings() {
        assert!(parse_attributes(br#"{"a":"b"}"#).is_ok());
        assert!(parse_attributes(br#"{"a":1}"#).is_err());
        assert!(parse_attributes(b"[]").is_err());
        assert!(parse_attributes(b"nope").is_err());
    }
}
