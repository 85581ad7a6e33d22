//! The rewrite, forward and respond phases: what the upstream sees of a
//! request, the upstream call, WebSocket upgrades, and the upstream
//! response made safe to return.
//!
//! - **rewrite** ([`crate::headers::rewrite_request`]) — hop-by-hop
//!   headers go, and every `Upgrade` but a WebSocket handshake's; client
//!   copies of identity, forwarding, `x-sessiongate-*` and path-override
//!   headers go (on every route), in any spelling a CGI-style server reads
//!   the same (or the request is refused); the session's identity, the
//!   `x-forwarded-*` headers and `x-request-id` are set; the session
//!   cookie and our tokens are kept from the upstream.
//! - **forward** — to the route's upstream, bodies streamed both ways;
//!   a WebSocket handshake becomes a bridged byte stream once the
//!   upstream's 101 proves it is one (RFC 6455's accept key).
//! - **respond** — hop-by-hop headers and the upstream's own `Set-Cookie`
//!   for the session cookie are dropped (the session directives are the
//!   session service's).

use std::sync::Arc;

use http::header::{HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::assertion::Assertions;
use crate::body::{self, Body};
use crate::config::{Config, LookalikeHeaders, RouteConfig};
use crate::error::ProxyError;
use crate::headers as h;
use crate::limits::LimitedBody;
use crate::metrics::{Metrics, ReasonLabels};
use crate::proxy::Peer;
use crate::route::Route;
use crate::session::Session;
use crate::token::{self, TokenKey};
use crate::upstream::Upstream;

/// What the upstream answered.
pub(crate) enum Forwarded {
    /// An ordinary response, its hop-by-hop headers and the upstream's
    /// session cookie gone; its session directives are still to be
    /// applied.
    Response(Response<Body>),
    /// A WebSocket handshake, bridged and final: sessions never begin or
    /// end on one, so its directives are dropped.
    Upgraded(Response<Body>),
}

pub struct Forwarder {
    config: Arc<Config>,
    token_key: TokenKey,
    upstreams: Vec<Arc<Upstream>>,
    metrics: Arc<Metrics>,
    /// `[session.assertion]`'s signer, shared by every worker.
    assertions: Option<Arc<Assertions>>,
}

impl Forwarder {
    /// The forwarder of `config`, with `upstreams` (one per
    /// `config.upstreams`, in order: a reload's kept and new ones), or new
    /// ones.
    pub(crate) fn with_upstreams(
        config: Arc<Config>,
        token_key: TokenKey,
        metrics: Arc<Metrics>,
        upstreams: Option<Vec<Arc<Upstream>>>,
    ) -> Forwarder {
        let upstreams = upstreams
            .filter(|u| u.len() == config.upstreams.len())
            .unwrap_or_else(|| config.upstreams.iter().map(Upstream::new).collect());
        Forwarder {
            config,
            token_key,
            upstreams,
            metrics,
            assertions: None,
        }
    }

    /// The upstreams, one per `config.upstreams` (a reload reuses them).
    pub(crate) fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// Signs assertions with `assertions` (`[session.assertion]`).
    pub(crate) fn set_assertions(&mut self, assertions: Option<Arc<Assertions>>) {
        self.assertions = assertions;
    }

    /// The assertion signer, when `[session.assertion]` is enabled.
    pub fn assertions(&self) -> Option<&Arc<Assertions>> {
        self.assertions.as_ref()
    }

    /// Rewrites the request for the upstream and sends it; `session`'s
    /// identity goes with it.
    pub(crate) async fn forward<B>(
        &self,
        mut req: Request<B>,
        route: &Route,
        session: Option<&Session>,
        peer: &Peer,
        request_id: &HeaderValue,
    ) -> Result<Forwarded, ProxyError>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
        B::Error: Into<body::BoxError>,
    {
        // Rewrite.
        let websocket_key = h::websocket_key(req.headers()).cloned();
        let upgrade = websocket_key.is_some();
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, incoming) = req.into_parts();
        let mut headers = parts.headers;
        self.rewrite_request_headers(&mut headers, &parts.uri, peer, request_id, upgrade)?;
        if let Some(s) = session {
            self.set_identity(&mut headers, route, s);
        }

        // Forward. A body declared larger than the route accepts is
        // refused before any upstream connection; one that grows past it,
        // stalls or breaks aborts the upstream request (limits.rs).
        if http_body::Body::size_hint(&incoming).lower() > route.max_body_bytes {
            return Err(ProxyError::BodyTooLarge);
        }
        // Most requests have no body: nothing to bound, nothing to box.
        let outgoing = if http_body::Body::is_end_stream(&incoming) {
            body::empty()
        } else {
            body::boxed(LimitedBody::new(
                incoming,
                route.max_body_bytes,
                self.config.server.body_read_timeout,
            ))
        };
        let upstream = &self.upstreams[route.upstream];
        let mut resp = upstream
            .send(
                parts.method,
                parts.uri.path_and_query().cloned(),
                headers,
                outgoing,
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

        let cookie_name = &self.config.session.cookie_name;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let (Some(client_upgrade), Some(key)) = (client_upgrade, &websocket_key) else {
                return Err(ProxyError::UpstreamProtocol(
                    "switched protocols without being asked".into(),
                ));
            };
            // Only the WebSocket the client asked for is bridged: a 101 to
            // anything else would open a tunnel whose later requests the
            // gateway never sees.
            if !h::is_websocket_switch(resp.headers(), key) {
                return Err(ProxyError::UpstreamProtocol(
                    "a 101 without Upgrade: websocket and the right Sec-WebSocket-Accept".into(),
                ));
            }
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let request_id = request_id.to_str().unwrap_or("-").to_string();
            // The tunnel is still the client's connection: it keeps its
            // place under the connection caps until it ends.
            let connection = peer.conn.clone();
            let idle = self.config.server.idle_timeout;
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        crate::limits::tunnel(TokioIo::new(client), TokioIo::new(upstream), idle)
                            .await;
                    }
                    Err(e) => tracing::warn!(request_id, error = %e, "upgrade failed"),
                }
                drop(connection);
            });
            let (mut parts, _) = resp.into_parts();
            h::strip_hop_by_hop(&mut parts.headers, true);
            h::remove_set_cookie(&mut parts.headers, cookie_name);
            parts.headers.remove(h::SG_LOGIN);
            parts.headers.remove(h::SG_ATTRIBUTES);
            parts.headers.remove(h::SG_LOGOUT);
            return Ok(Forwarded::Upgraded(Response::from_parts(
                parts,
                body::empty(),
            )));
        }

        let (mut parts, upstream_body) = resp.into_parts();
        h::strip_hop_by_hop(&mut parts.headers, false);
        // Before the gateway adds its own: only the gateway sets its cookie.
        h::remove_set_cookie(&mut parts.headers, cookie_name);
        Ok(Forwarded::Response(Response::from_parts(
            parts,
            upstream_body,
        )))
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
    /// (the identity headers are [`Forwarder::set_identity`]'s). `upgrade`
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

    /// Sets the identity headers of `session` for `route` (public for the
    /// benches).
    pub fn set_identity(&self, headers: &mut HeaderMap, route: &RouteConfig, session: &Session) {
        set_identity(
            &self.config.session,
            self.assertions.as_deref(),
            route,
            headers,
            session,
        );
    }
}

/// `session`'s identity in the headers `session.user_header` and
/// `session.session_header` name, plus `route`'s forwarded attributes and
/// the signed assertion when enabled ([`crate::assertion`]): for the
/// upstream, and in a forward-auth answer.
pub(crate) fn set_identity(
    config: &crate::config::SessionConfig,
    assertions: Option<&Assertions>,
    route: &RouteConfig,
    headers: &mut HeaderMap,
    session: &Session,
) {
    crate::assertion::set_headers(assertions, route, headers, session);
    if let Ok(v) = HeaderValue::from_str(&session.user_id) {
        headers.insert(config.user_header.clone(), v);
    }
    let mut id = uuid::Uuid::encode_buffer();
    let id = session.id.hyphenated().encode_lower(&mut id);
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert(config.session_header.clone(), v);
    }
}
