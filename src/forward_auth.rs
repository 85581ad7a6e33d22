//! Forward-auth: sessiongate as the auth service of a proxy already in
//! place (nginx `auth_request`, Traefik `forwardAuth`, Envoy `ext_authz`
//! over HTTP), on a listener of its own (`[forward_auth]`).
//!
//! Every request on that listener is an auth sub-request: it describes
//! an original request (method, URI, host) in the caller's conventional
//! headers, or, for Envoy, in its own request line. That original request
//! is routed and authenticated exactly as the proxy does it, through the
//! same pieces: [`crate::route::normalized_uri`] and the gateway's
//! [`crate::route::Routes`], then [`crate::authn::Authenticator`] (token,
//! session, then the policy chain). The answer is 200 with the identity in the
//! headers `session.user_header` and `session.session_header` (set by
//! [`crate::forward::set_identity`]) for the caller to copy onto the
//! request it forwards, or a refusal.
//!
//! Which caller it is comes from configuration (`forward_auth.caller`),
//! never from the headers a request happens to carry: the caller passes
//! the client's own headers along, so a client could otherwise add an
//! `X-Original-URI` that the caller never set and have its path checked
//! in place of the real one.
//!
//! nginx accepts only 2xx, 401 and 403 from an auth sub-request (it turns
//! anything else into a 500), so for nginx a refusal is 401 when the
//! proxy would say 401, the 5xx it would say when the gateway cannot
//! decide (nginx: 500), and 403 for every other refusal (no route, an
//! invalid path, a policy's 429). Where the proxy would redirect a browser
//! to `login_redirect`, nginx gets a 401 carrying the location in
//! `x-sessiongate-redirect`, for its `error_page 401` to redirect to.
//! Traefik and Envoy pass a refusal to the client as it is: they get
//! exactly the proxy's answer, the 302 included.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri};

use crate::authn::RequestContext;
use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::forwarded::TrustedProxies;
use crate::metrics::ReasonLabels;
use crate::proxy::{self, Gateway, Peer};
use crate::route::normalized_uri;
use crate::session::Session;

/// nginx: the original request's target and method (`$request_uri`,
/// `$request_method`).
const X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
const X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
/// Traefik: the original request's target, method and host.
const X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
const X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// On nginx's 401 for a browser: where the proxy would have redirected it.
pub(crate) const X_SESSIONGATE_REDIRECT: HeaderName =
    HeaderName::from_static("x-sessiongate-redirect");

/// Longest original URI taken (nginx's default `large_client_header_buffers`
/// is 8 KiB per line).
const MAX_ORIGINAL_URI: usize = 8 * 1024;

/// Who sends the sub-requests: how the original request is described, and
/// which statuses the caller can pass on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// `X-Original-URI` (required), `X-Original-Method`, the sub-request's
    /// `Host`; answers 200, 401, 403 or 5xx.
    Nginx,
    /// `X-Forwarded-Uri` (required), `X-Forwarded-Method`,
    /// `X-Forwarded-Host`; answers as the proxy would.
    Traefik,
    /// The sub-request's own method, `Host` and path (after
    /// `forward_auth.path_prefix`); answers as the proxy would.
    Envoy,
}

impl Caller {
    /// `forward_auth.caller`; absent is `nginx`.
    pub(crate) fn parse(text: Option<&str>) -> Result<Caller, String> {
        match text.unwrap_or("nginx") {
            "nginx" => Ok(Caller::Nginx),
            "traefik" => Ok(Caller::Traefik),
            "envoy" => Ok(Caller::Envoy),
            other => Err(format!(
                "must be \"nginx\", \"traefik\" or \"envoy\", not {other:?}"
            )),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Caller::Nginx => "nginx",
            Caller::Traefik => "traefik",
            Caller::Envoy => "envoy",
        }
    }
}

/// `forward_auth.path_prefix`: for Envoy only (its `path_prefix`), empty
/// or `/` followed by unreserved characters and `/`, not ending in `/`
/// (Envoy prepends it to the original path, which starts with one).
pub(crate) fn check_path_prefix(caller: Caller, prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Ok(());
    }
    if caller != Caller::Envoy {
        return Err("only for forward_auth.caller = \"envoy\"".into());
    }
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~/".contains(&b);
    if !prefix.starts_with('/')
        || prefix.ends_with('/')
        || !prefix.bytes().all(unreserved)
        || prefix.split('/').any(|s| s == "." || s == "..")
    {
        return Err(format!(
            "{prefix:?} must be a path like \"/ext-authz\": starting with /, not ending with /, \
             letters, digits, -._~ and / only"
        ));
    }
    Ok(())
}

/// `[forward_auth]`.
#[derive(Debug, Clone)]
pub struct ForwardAuthConfig {
    pub listen: SocketAddr,
    pub caller: Caller,
    /// Envoy's `path_prefix`, stripped from the sub-request's path.
    pub path_prefix: String,
    /// The TCP peers allowed to ask (the callers' addresses).
    pub allow_from: Vec<ipnet::IpNet>,
    /// Connections the listener serves at once (its own budget).
    pub max_connections: usize,
}

/// The original request as the caller describes it, its path normalized.
#[derive(Debug)]
pub(crate) struct Original {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) host: Option<HeaderValue>,
}

/// Why a sub-request's description of the original request was refused:
/// the header (or part) at fault and what is wrong with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unreadable {
    pub(crate) what: &'static str,
    pub(crate) problem: &'static str,
}

impl Unreadable {
    fn new(what: &'static str, problem: &'static str) -> Unreadable {
        Unreadable { what, problem }
    }
}

/// At most one value of `name`: a second one means something between the
/// client and the caller, or the client itself, added it, and which one
/// the caller meant cannot be told.
fn one<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
    what: &'static str,
) -> Result<Option<&'a HeaderValue>, Unreadable> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(Unreadable::new(what, "is duplicated"));
    }
    Ok(first)
}

/// An original request target: origin form only (`/path?query`), printable
/// ASCII without spaces or a fragment, at most [`MAX_ORIGINAL_URI`] bytes.
/// Returns it as a URI with its path not yet normalized.
pub(crate) fn parse_original_uri(value: &[u8]) -> Result<Uri, &'static str> {
    if value.is_empty() {
        return Err("is empty");
    }
    if value.len() > MAX_ORIGINAL_URI {
        return Err("is too long");
    }
    if !value.iter().all(u8::is_ascii_graphic) {
        return Err("holds control bytes, spaces or non-ASCII bytes");
    }
    if value[0] != b'/' {
        return Err("is not a path (absolute form, authority form or `*`)");
    }
    if value.contains(&b'#') {
        return Err("holds a fragment");
    }
    let path_and_query =
        PathAndQuery::try_from(value).map_err(|_| "is not a valid request target")?;
    // A path alone: `//host/x` stays a path here (and normalizes as one).
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).map_err(|_| "is not a valid request target")
}

fn parse_method(
    value: Option<&HeaderValue>,
    what: &'static str,
) -> Result<Option<Method>, Unreadable> {
    let Some(value) = value else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 32 {
        return Err(Unreadable::new(what, "is not a method"));
    }
    Method::from_bytes(bytes)
        .map(Some)
        .map_err(|_| Unreadable::new(what, "is not a method"))
}

/// The original request a sub-request describes, for `caller`, its path
/// normalized as the proxy normalizes a request's (an ambiguous one is
/// [`ProxyError::InvalidPath`], as on the proxy).
pub(crate) fn original<B>(
    caller: Caller,
    path_prefix: &str,
    req: &Request<B>,
) -> Result<Result<Original, ProxyError>, Unreadable> {
    let headers = req.headers();
    let (method, uri, host) = match caller {
        Caller::Nginx | Caller::Traefik => {
            let (uri_header, uri_what, method_header, method_what) = match caller {
                Caller::Nginx => (
                    X_ORIGINAL_URI,
                    "X-Original-URI",
                    X_ORIGINAL_METHOD,
                    "X-Original-Method",
                ),
                _ => (
                    X_FORWARDED_URI,
                    "X-Forwarded-Uri",
                    X_FORWARDED_METHOD,
                    "X-Forwarded-Method",
                ),
            };
            let value = one(headers, &uri_header, uri_what)?
                .ok_or(Unreadable::new(uri_what, "is missing"))?;
            let uri = parse_original_uri(value.as_bytes())
                .map_err(|problem| Unreadable::new(uri_what, problem))?;
            let method = parse_method(one(headers, &method_header, method_what)?, method_what)?
                .unwrap_or_else(|| req.method().clone());
            let host = match caller {
                Caller::Traefik => one(headers, &X_FORWARDED_HOST, "X-Forwarded-Host")?,
                _ => one(headers, &header::HOST, "Host")?,
            };
            (method, uri, host.cloned())
        }
        Caller::Envoy => {
            let target = req.uri();
            // Over HTTP/2 the target always carries `:scheme` and
            // `:authority`; over HTTP/1.1 Envoy sends the origin form.
            if req.version() < http::Version::HTTP_2
                && (target.scheme().is_some() || target.authority().is_some())
            {
                return Err(Unreadable::new(
                    "the request target",
                    "is not a path (absolute form)",
                ));
            }
            let path_and_query = target.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let rest = path_and_query
                .strip_prefix(path_prefix)
                .filter(|rest| rest.starts_with('/'))
                .ok_or(Unreadable::new(
                    "the request target",
                    "is not under forward_auth.path_prefix",
                ))?;
            let uri = parse_original_uri(rest.as_bytes())
                .map_err(|problem| Unreadable::new("the request target", problem))?;
            let host = one(headers, &header::HOST, "Host")?.cloned().or_else(|| {
                let authority = target.authority()?;
                HeaderValue::from_str(authority.as_str()).ok()
            });
            (req.method().clone(), uri, host)
        }
    };
    Ok(match normalized_uri(&method, &uri) {
        Ok(normal) => Ok(Original {
            uri: normal.unwrap_or(uri),
            method,
            host,
        }),
        Err(e) => Err(e),
    })
}

/// What one sub-request did, for its log line and metrics.
struct Outcome {
    route: &'static str,
    route_index: Option<usize>,
    session_id: Option<uuid::Uuid>,
}

impl Gateway {
    /// Routes and authenticates an original request exactly as the proxy
    /// does (phases 1 and 2): its session, if the route has one for it.
    async fn check(
        &self,
        original: &Original,
        headers: &HeaderMap,
        peer: &Peer,
        request_id: &str,
        outcome: &mut Outcome,
    ) -> Result<Option<Arc<Session>>, ProxyError> {
        let routes = self.routes();
        let index = routes
            .index(original.uri.path())
            .ok_or(ProxyError::NoRoute)?;
        let route = &routes[index];
        outcome.route = route.label;
        outcome.route_index = Some(index);
        let mut context =
            RequestContext::new(&original.method, &original.uri, headers, peer.client);
        context.host = original.host.clone();
        let auth = self.authenticator();
        let who = auth.identify(route.auth, headers, request_id).await?;
        outcome.session_id = who.session.as_ref().map(|s| s.id);
        auth.authorize(route, &who, &context).await?;
        Ok(who.session)
    }
}

/// The forward-auth listener's handler.
pub(crate) struct ForwardAuth {
    /// Loaded once per sub-request, as the proxy does: a config reload
    /// (`reload.rs`) reaches forward-auth's routes at once.
    gateway: Arc<arc_swap::ArcSwap<Gateway>>,
    config: ForwardAuthConfig,
    allow_from: TrustedProxies,
}

impl ForwardAuth {
    pub(crate) fn new(
        gateway: Arc<arc_swap::ArcSwap<Gateway>>,
        config: ForwardAuthConfig,
    ) -> ForwardAuth {
        let allow_from = TrustedProxies::new(config.allow_from.iter().copied());
        ForwardAuth {
            gateway,
            config,
            allow_from,
        }
    }

    /// Answers one sub-request from `peer`. Never fails: every refusal
    /// becomes its response here, and is logged and counted as the proxy's
    /// are.
    pub(crate) async fn handle<B>(self: Arc<Self>, req: Request<B>, peer: Peer) -> Response<Body> {
        let started = Instant::now();
        let gateway = &self.gateway.load_full();
        let caller = self.config.caller;
        let request_id = proxy::request_id(req.headers());
        let id = proxy::request_id_text(&request_id);
        let tcp_peer = peer.tcp_peer;
        let mut outcome = Outcome {
            route: "-",
            route_index: None,
            session_id: None,
        };
        let html = proxy::accepts_html(req.headers());
        // What is logged as the path: the original one once read, else
        // the sub-request's own.
        let mut logged = (req.method().clone(), req.uri().clone());
        let mut client = peer.client;
        let result = if !self.allow_from.contains(tcp_peer.ip()) {
            tracing::warn!(
                request_id = id,
                peer = %tcp_peer,
                "forward-auth sub-request refused: the peer is not in forward_auth.allow_from"
            );
            Err(Refused::Caller)
        } else {
            let peer = gateway.forwarded(peer, req.headers());
            client = peer.client;
            match original(caller, &self.config.path_prefix, &req) {
                Err(unreadable) => {
                    tracing::warn!(
                        request_id = id,
                        peer = %tcp_peer,
                        caller = caller.as_str(),
                        "forward-auth sub-request refused: {} {}",
                        unreadable.what,
                        unreadable.problem
                    );
                    Err(Refused::Unreadable(unreadable))
                }
                Ok(Err(e)) => Err(Refused::Gateway(e)),
                Ok(Ok(original)) => {
                    logged = (original.method.clone(), original.uri.clone());
                    gateway
                        .check(&original, req.headers(), &peer, id, &mut outcome)
                        .await
                        .map_err(Refused::Gateway)
                }
            }
        };
        let path = logged.1.path();
        let mut resp = match result {
            Ok(session) => self.allowed(gateway, session.as_deref(), outcome.route_index),
            Err(refused) => self.refused(gateway, refused, path, html, id),
        };
        resp.headers_mut()
            .insert(crate::headers::X_REQUEST_ID, request_id.clone());
        let elapsed = started.elapsed();
        let status = resp.status().as_u16();
        match outcome.route_index {
            Some(i) => gateway.routes()[i]
                .metrics
                .observe(status, elapsed.as_secs_f64()),
            None => gateway
                .metrics()
                .observe_request(outcome.route, status, elapsed.as_secs_f64()),
        }
        tracing::info!(
            target: "sessiongate::access",
            request_id = id,
            client = %client,
            peer = %tcp_peer,
            forward_auth = caller.as_str(),
            method = %logged.0,
            path = %path,
            route = %outcome.route,
            status,
            latency_us = elapsed.as_micros() as u64,
            session_id = outcome.session_id.map(|id| id.to_string()).unwrap_or_default(),
            "request"
        );
        resp
    }

    /// 200 with the identity headers, for the caller to copy onto the
    /// request it forwards. Without a session (a route that lets one
    /// through without) they are there and empty: copied, they overwrite
    /// a client's own (Envoy's `allowed_upstream_headers` replaces only
    /// headers the answer has; nginx sends no empty header at all).
    /// The same holds for the route's forwarded attributes and the
    /// assertion header.
    fn allowed(
        &self,
        gateway: &Gateway,
        session: Option<&Session>,
        route_index: Option<usize>,
    ) -> Response<Body> {
        let mut resp = Response::new(body::empty());
        let headers = resp.headers_mut();
        let config = &gateway.config().session;
        let assertions = gateway.forwarder().assertions().map(|a| &**a);
        let route = route_index.map(|i| &gateway.routes()[i]);
        headers.insert(config.user_header.clone(), HeaderValue::from_static(""));
        headers.insert(config.session_header.clone(), HeaderValue::from_static(""));
        if let Some(a) = assertions {
            headers.insert(a.config().header.clone(), HeaderValue::from_static(""));
        }
        for attribute in route.iter().flat_map(|r| &r.forward_attributes) {
            headers.insert(attribute.header.clone(), HeaderValue::from_static(""));
        }
        if let Some(session) = session
            && let Some(route) = route
        {
            crate::forward::set_identity(config, assertions, route, headers, session);
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }

    /// The proxy's answer to a refused request, made one the caller can
    /// pass on.
    fn refused(
        &self,
        gateway: &Gateway,
        refused: Refused,
        path: &str,
        html: bool,
        id: &str,
    ) -> Response<Body> {
        let caller = self.config.caller;
        let error = match refused {
            Refused::Caller => {
                return crate::error::json_error(
                    StatusCode::FORBIDDEN,
                    "forbidden_caller",
                    "this address may not ask for forward-auth decisions",
                    id,
                );
            }
            Refused::Unreadable(u) => ProxyError::BadRequest(format!("{} {}", u.what, u.problem)),
            Refused::Gateway(e) => e,
        };
        if error.is_auth_failure() {
            gateway
                .metrics()
                .auth_rejections
                .get_or_create(&ReasonLabels {
                    reason: error.code(),
                })
                .inc();
        }
        let redirect = gateway
            .routes()
            .find(path)
            .and_then(|r| r.login_redirect.as_deref())
            .filter(|_| html && error.is_auth_failure());
        if let Some(location) = redirect {
            if caller != Caller::Nginx {
                return proxy::login_redirect(location);
            }
            let mut resp = error.into_response(id);
            if let Ok(v) = HeaderValue::from_str(location) {
                resp.headers_mut().insert(X_SESSIONGATE_REDIRECT, v);
            }
            return resp;
        }
        let mut resp = error.into_response(id);
        if caller == Caller::Nginx {
            *resp.status_mut() = nginx_status(resp.status());
        }
        resp
    }
}

/// Why a sub-request got no 200.
enum Refused {
    /// A peer outside `forward_auth.allow_from`.
    Caller,
    /// The original request could not be read one way only.
    Unreadable(Unreadable),
    /// What the proxy would refuse the original request with.
    Gateway(ProxyError),
}

/// The status nginx's `auth_request` gets for a refusal the proxy would
/// answer with `status`: 401 and 403 as they are, 5xx as it is (nginx
/// makes it a 500: the gateway could not decide), any other 4xx as 403.
pub(crate) fn nginx_status(status: StatusCode) -> StatusCode {
    match status {
        StatusCode::UNAUTHORIZED => StatusCode::UNAUTHORIZED,
        s if s.is_server_error() => s,
        _ => StatusCode::FORBIDDEN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sub_request(caller_headers: &[(&str, &[u8])]) -> Request<()> {
        let mut req = Request::builder().uri("/auth").body(()).unwrap();
        for (name, value) in caller_headers {
            req.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        req
    }

    fn nginx(headers: &[(&str, &[u8])]) -> Result<Result<Original, ProxyError>, Unreadable> {
        original(Caller::Nginx, "", &sub_request(headers))
    }

    #[test]
    fn the_original_request_is_read_from_the_callers_headers() {
        let o = nginx(&[
            ("x-original-uri", b"/public/../secret?a=%2e%2e"),
            ("x-original-method", b"DELETE"),
            ("host", b"app.example"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(o.uri.to_string(), "/secret?a=%2e%2e");
        assert_eq!(o.method, Method::DELETE);
        assert_eq!(o.host.unwrap(), "app.example");

        let req = sub_request(&[
            ("x-forwarded-uri", b"/x"),
            ("x-forwarded-method", b"POST"),
            ("x-forwarded-host", b"h"),
            // Another caller's header is not read.
            ("x-original-uri", b"/public/"),
        ]);
        let o = original(Caller::Traefik, "", &req).unwrap().unwrap();
        assert_eq!(
            (o.uri.path(), o.method, o.host.unwrap()),
            ("/x", Method::POST, "h".parse().unwrap())
        );

        let req = Request::builder()
            .method("PUT")
            .uri("/ext-authz/web/a?q=1")
            .header("x-original-uri", "/public/")
            .body(())
            .unwrap();
        let o = original(Caller::Envoy, "/ext-authz", &req)
            .unwrap()
            .unwrap();
        assert_eq!(
            (o.uri.to_string(), o.method),
            ("/web/a?q=1".into(), Method::PUT)
        );
        // Only under the prefix, and a whole segment of it.
        for target in ["/web/a", "/ext-authzweb/a", "/ext-authz"] {
            let req = Request::builder().uri(target).body(()).unwrap();
            assert!(
                original(Caller::Envoy, "/ext-authz", &req).is_err(),
                "{target}"
            );
        }
        let req = Request::builder()
            .uri("http://h/ext-authz/x")
            .body(())
            .unwrap();
        assert!(original(Caller::Envoy, "/ext-authz", &req).is_err());
        // Over HTTP/2 the target always has an authority: the host.
        let req = Request::builder()
            .version(http::Version::HTTP_2)
            .uri("http://app.example/ext-authz/x")
            .body(())
            .unwrap();
        let o = original(Caller::Envoy, "/ext-authz", &req)
            .unwrap()
            .unwrap();
        assert_eq!(
            (o.uri.path(), o.host.unwrap()),
            ("/x", HeaderValue::from_static("app.example"))
        );
    }

    #[test]
    fn ambiguous_descriptions_are_refused() {
        let refused = |headers: &[(&str, &[u8])]| nginx(headers).unwrap_err();
        assert_eq!(refused(&[]).problem, "is missing");
        assert_eq!(
            refused(&[("x-original-uri", b"/a"), ("x-original-uri", b"/b")]).problem,
            "is duplicated"
        );
        assert_eq!(
            refused(&[
                ("x-original-uri", b"/a"),
                ("x-original-method", b"GET"),
                ("x-original-method", b"POST")
            ])
            .what,
            "X-Original-Method"
        );
        for bad in [
            &b"http://evil/secret"[..],
            b"evil.example:443",
            b"*",
            b"",
            b"/a b",
            b"/a\tb",
            b"/caf\xc3\xa9",
            b"/a#frag",
            b"secret",
        ] {
            let headers: &[(&str, &[u8])] = &[("x-original-uri", bad)];
            assert!(
                nginx(headers).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("/{}", "a".repeat(MAX_ORIGINAL_URI));
        assert!(nginx(&[("x-original-uri", long.as_bytes())]).is_err());
        assert!(nginx(&[("x-original-uri", b"/a"), ("x-original-method", b"G(T")]).is_err());
        // Read, but refused as the proxy refuses it.
        for path in [&b"/a/%2e%2e/secret"[..], b"/public%2fsecret"] {
            assert!(matches!(
                nginx(&[("x-original-uri", path)]),
                Ok(Err(ProxyError::InvalidPath))
            ));
        }
        assert!(matches!(
            nginx(&[("x-original-uri", b"/"), ("x-original-method", b"CONNECT")]),
            Ok(Err(ProxyError::InvalidPath))
        ));
    }

    #[test]
    fn nginx_gets_only_what_auth_request_accepts() {
        for (proxy, nginx) in [
            (401, 401),
            (403, 403),
            (404, 403),
            (400, 403),
            (429, 403),
            (418, 403),
            (503, 503),
        ] {
            assert_eq!(
                nginx_status(StatusCode::from_u16(proxy).unwrap()).as_u16(),
                nginx
            );
        }
    }

    #[test]
    fn path_prefixes_are_checked() {
        assert!(check_path_prefix(Caller::Nginx, "").is_ok());
        assert!(check_path_prefix(Caller::Envoy, "/ext-authz").is_ok());
        assert!(check_path_prefix(Caller::Nginx, "/ext-authz").is_err());
        for bad in ["ext", "/ext/", "/e%2f", "/a/../b", "/a b"] {
            assert!(check_path_prefix(Caller::Envoy, bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        /// Whatever bytes an `X-Original-URI` holds, what is accepted is an
        /// origin-form target of printable ASCII, and routing sees the path
        /// the proxy would see for the same request line.
        #[test]
        fn accepted_uris_are_paths_the_proxy_reads_the_same(
            bytes in proptest::collection::vec(
                prop_oneof![
                    Just(b'/'), Just(b'.'), Just(b'%'), Just(b'?'), Just(b'#'),
                    Just(b'2'), Just(b'e'), Just(b'f'), Just(b'F'), Just(b'a'),
                    Just(b' '), Just(b'\t'), Just(0u8), Just(0x7f), Just(0xc3),
                    Just(b':'), Just(b'\\'), Just(b';'), Just(b'*'),
                    any::<u8>(),
                ],
                0..40,
            )
        ) {
            if let Ok(uri) = parse_original_uri(&bytes) {
                prop_assert_eq!(bytes[0], b'/');
                prop_assert!(bytes.iter().all(u8::is_ascii_graphic));
                prop_assert!(!bytes.contains(&b'#'));
                prop_assert!(uri.scheme().is_none() && uri.authority().is_none());
                prop_assert_eq!(uri.path_and_query().map(|p| p.as_str().as_bytes()), Some(&bytes[..]));
                // The same target as a proxy request line, parsed by http.
                let proxied: Result<Uri, _> = Uri::try_from(&bytes[..]);
                if let Ok(proxied) = proxied {
                    let a = normalized_uri(&Method::GET, &uri).map(|n| n.unwrap_or(uri.clone()).to_string());
                    let b = normalized_uri(&Method::GET, &proxied).map(|n| n.unwrap_or(proxied.clone()).to_string());
                    prop_assert_eq!(a.ok(), b.ok());
                }
            }
            let value = HeaderValue::from_bytes(&bytes);
            if let Ok(value) = value {
                let mut req = Request::builder().uri("/auth").body(()).unwrap();
                req.headers_mut().insert(X_ORIGINAL_URI, value);
                if let Ok(Ok(o)) = original(Caller::Nginx, "", &req) {
                    // A normalized path: no dot segments, no encoded slash.
                    let path = o.uri.path();
                    prop_assert!(path.starts_with('/'));
                    prop_assert!(!path.split('/').any(|s| s == "." || s == ".."));
                    prop_assert!(!path.to_ascii_lowercase().contains("%2f"));
                    prop_assert!(!path.contains("//"));
                }
            }
        }
    }
}
