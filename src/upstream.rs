//! Upstreams: pooled keep-alive HTTP/1.1 connections, round robin across
//! an upstream's URLs, and skipping a URL that refuses connections.
//!
//! The pool is our own, on hyper's connection-level client: an idle list
//! per URL, taken last-in first-out (the warmest connection), and a
//! connection goes back on it when its response body has been read to the
//! end. A general-purpose client spawns a task per response to wait for
//! the connection to become idle again and keys its pool by a hashed
//! authority; this one does neither, which on a loopback origin is a
//! measurable share of a request's cost (see BENCHMARKS.md).
//!
//! A URL whose connection fails is benched for [`BENCH_TIME`]; requests go
//! to the others meanwhile (or to it anyway if every URL is benched, since
//! a guess beats a certain 502). A request is handed to a connection only
//! once that connection exists, so a request whose connection fails (body
//! or not) is retried on the next URL; one that an idle connection closed
//! under it before sending is retried on another connection.
//!
//! Each worker (`server.worker_threads`) has its own [`Upstream`]s, so
//! its own idle lists, round robin and benched URLs: a pooled connection
//! is driven by a task on the runtime that opened it and is only ever
//! used there, the idle lists' locks are never contended, and a URL that
//! refuses is found out by each worker on its own (one failed connect
//! each, within [`BENCH_TIME`]).
//!
//! An `https://` URL gets the same pool: the connection is TLS (the
//! upstream's rustls client, built once when the config was validated)
//! under the same HTTP/1.1 client, and is kept alive and reused exactly as
//! a plain one, so a handshake is paid per connection, not per request.
//! The TCP connect and the TLS handshake share `connect_timeout_ms`, and a
//! failed handshake (an untrusted or misnamed certificate) benches the URL
//! like a refused connection.

use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{HeaderMap, Method, Request, Response, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::body::{Body, BoxError};
use crate::config::UpstreamConfig;
use crate::error::ProxyError;
use crate::limits::{self, ConnState, UpstreamSlot};
use crate::session::now_ms;

/// How long a URL that refused a connection is skipped.
pub const BENCH_TIME: Duration = Duration::from_secs(5);

/// Idle connections kept per URL; more are closed when they come back.
const MAX_IDLE_PER_URL: usize = 256;

/// An idle connection older than this is closed rather than reused:
/// origins drop idle keep-alive connections after a while, and a request
/// sent on one that the origin is closing would have to be retried.
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// TCP keep-alive probes on upstream connections, so a dead peer behind a
/// silent network is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

type Sender = http1::SendRequest<Body>;

struct Idle {
    sender: Sender,
    since: Instant,
}

struct Target {
    base: Uri,
    host: String,
    port: u16,
    /// `Host` for a request that came without one (HTTP/1.0).
    authority: HeaderValue,
    benched_until: AtomicI64,
    idle: Mutex<Vec<Idle>>,
    tls: TargetTls,
}

/// How a target's connections are made.
enum TargetTls {
    /// `http://`.
    Plain,
    /// `https://`: the upstream's TLS client and the name the
    /// certificate must carry.
    Tls(TlsConnector, ServerName<'static>),
    /// `https://` without a usable TLS client (the config's validation
    /// rules this out): every connection fails rather than going out in
    /// the clear.
    Unusable(&'static str),
}

impl Target {
    /// The most recently used connection that can take a request now.
    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = idle.pop() {
            if conn.sender.is_ready() && conn.since.elapsed() < IDLE_TIMEOUT {
                return Some(conn.sender);
            }
            // Closed, closing, or stale: dropping the sender lets the
            // connection task finish.
        }
        None
    }

    fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_PER_URL {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

pub struct Upstream {
    pub name: String,
    targets: Vec<Arc<Target>>,
    next: AtomicUsize,
    connect_timeout: Duration,
    timeout: Duration,
}

/// Why a request could not be handed to a connection.
enum ConnectError {
    Io(std::io::Error),
    TimedOut,
    Tls {
        server_name: String,
        error: std::io::Error,
    },
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Io(e) => write!(f, "{e}"),
            ConnectError::TimedOut => f.write_str("connect timed out"),
            ConnectError::Tls { server_name, error } => {
                write!(
                    f,
                    "TLS handshake as {server_name:?} failed: {}",
                    error_chain(error)
                )
            }
            ConnectError::Handshake(e) => write!(f, "{}", error_chain(e)),
        }
    }
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Arc<Upstream> {
        Arc::new(Upstream {
            name: config.name.clone(),
            targets: config
                .urls
                .iter()
                .map(|base| {
                    let host = base.host().unwrap_or("127.0.0.1");
                    // `[::1]` is how a URL writes an IPv6 host; a socket
                    // address and a server name want it bare.
                    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
                    let https = base.scheme_str() == Some("https");
                    let port = base.port_u16().unwrap_or(if https { 443 } else { 80 });
                    let tls = match (&config.tls, https) {
                        (_, false) => TargetTls::Plain,
                        (None, true) => TargetTls::Unusable("no TLS client for an https:// URL"),
                        (Some(tls), true) => {
                            let name = tls
                                .server_name
                                .clone()
                                .or_else(|| crate::backend_tls::server_name(bare_host).ok());
                            match name {
                                Some(name) => {
                                    TargetTls::Tls(TlsConnector::from(tls.config.clone()), name)
                                }
                                None => TargetTls::Unusable(
                                    "the URL's host is not a valid TLS server name",
                                ),
                            }
                        }
                    };
                    let authority = base
                        .authority()
                        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                        .unwrap_or_else(|| HeaderValue::from_static("localhost"));
                    Arc::new(Target {
                        base: base.clone(),
                        host: bare_host.to_string(),
                        port,
                        authority,
                        benched_until: AtomicI64::new(0),
                        idle: Mutex::new(Vec::new()),
                        tls,
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
            connect_timeout: config.connect_timeout,
            timeout: config.timeout,
        })
    }

    /// Target indices in the order to try them for one request: healthy
    /// ones round robin, then benched ones. Lazy: nothing is allocated.
    fn order(&self) -> impl Iterator<Item = usize> + Send + '_ {
        let n = self.targets.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let now = now_ms();
        let healthy =
            move |i: &usize| self.targets[*i].benched_until.load(Ordering::Relaxed) <= now;
        let rotated = (0..n).map(move |i| (start + i) % n);
        rotated
            .clone()
            .filter(healthy)
            .chain(rotated.filter(move |i| !healthy(i)))
    }

    async fn connect(&self, target: &Target) -> Result<Sender, ConnectError> {
        if let TargetTls::Unusable(why) = &target.tls {
            return Err(ConnectError::Io(std::io::Error::other(*why)));
        }
        // One deadline for the TCP connect and the TLS handshake: a
        // server that accepts and then stalls the handshake is as
        // unreachable as one that never accepts.
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let connecting = TcpStream::connect((target.host.as_str(), target.port));
        let stream = tokio::time::timeout_at(deadline, connecting)
            .await
            .map_err(|_| ConnectError::TimedOut)?
            .map_err(ConnectError::Io)?;
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        match &target.tls {
            TargetTls::Plain | TargetTls::Unusable(_) => self.handshake(stream).await,
            TargetTls::Tls(connector, server_name) => {
                let stream = tokio::time::timeout_at(
                    deadline,
                    connector.connect(server_name.clone(), stream),
                )
                .await
                .map_err(|_| ConnectError::TimedOut)?
                .map_err(|error| ConnectError::Tls {
                    server_name: server_name.to_str().into_owned(),
                    error,
                })?;
                self.handshake(stream).await
            }
        }
    }

    /// Starts HTTP/1.1 on a connected stream, plain or TLS: the sender
    /// does not depend on which.
    async fn handshake<S>(&self, stream: S) -> Result<Sender, ConnectError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        let name = self.name.clone();
        tokio::spawn(async move {
            // Upgrades: a WebSocket handshake hands the socket over.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream = %name, error = %error_chain(&e), "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends a request whose headers are already rewritten for upstream,
    /// in one of the client connection's upstream slots (`conn`): waiting
    /// for a slot counts against the upstream's timeout, and the slot is
    /// held until the response body ends or is dropped.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: Option<PathAndQuery>,
        headers: HeaderMap,
        body: Body,
        conn: &Arc<ConnState>,
    ) -> Result<Response<Body>, ProxyError> {
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = Uri::from(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        let sending = async {
            let slot = conn.upstream_slot().await;
            self.send_in_order(req, slot).await
        };
        match tokio::time::timeout(self.timeout, sending).await {
            Err(_) => Err(ProxyError::UpstreamTimeout),
            Ok(result) => result,
        }
    }

    async fn send_in_order(
        &self,
        mut req: Request<Body>,
        slot: UpstreamSlot,
    ) -> Result<Response<Body>, ProxyError> {
        for index in self.order() {
            let target = &self.targets[index];
            if !req.headers().contains_key(header::HOST) {
                req.headers_mut()
                    .insert(header::HOST, target.authority.clone());
            }
            // Pooled connections first. One the origin closed after we
            // checked it gives the request back unsent: try the next.
            while let Some(mut sender) = target.checkout() {
                match sender.try_send_request(req).await {
                    Ok(resp) => return Ok(pooled_response(resp, target, sender, slot)),
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => req = unsent,
                        None => return Err(self.failed(e.into_error())),
                    },
                }
            }
            let mut sender = match self.connect(target).await {
                Ok(sender) => sender,
                Err(e) => {
                    target
                        .benched_until
                        .store(now_ms() + BENCH_TIME.as_millis() as i64, Ordering::Relaxed);
                    tracing::warn!(
                        upstream = %self.name,
                        url = %target.base,
                        error = %e,
                        "upstream connection failed"
                    );
                    continue;
                }
            };
            return match sender.try_send_request(req).await {
                Ok(resp) => Ok(pooled_response(resp, target, sender, slot)),
                Err(e) => Err(self.failed(e.into_error())),
            };
        }
        Err(ProxyError::UpstreamUnreachable)
    }

    fn failed(&self, e: hyper::Error) -> ProxyError {
        // The client's own body broke the request (too large, too slow,
        // malformed): the client's fault, not the upstream's.
        if let Some(client_error) = limits::body_fault(&e) {
            tracing::debug!(upstream = %self.name, error = %error_chain(&e), "request body refused");
            return client_error;
        }
        tracing::warn!(upstream = %self.name, error = %error_chain(&e), "upstream request failed");
        ProxyError::UpstreamUnreachable
    }
}

/// The response, with a body that puts its connection back in the pool
/// once it has been read to the end. An upgraded connection belongs to
/// the upgrade, never to the pool.
fn pooled_response(
    resp: Response<Incoming>,
    target: &Arc<Target>,
    sender: Sender,
    slot: UpstreamSlot,
) -> Response<Body> {
    let upgraded = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    resp.map(|inner| {
        PooledBody {
            inner,
            home: (!upgraded).then(|| (target.clone(), sender)),
            slot: Some(slot),
        }
        .boxed()
    })
}

struct PooledBody {
    inner: Incoming,
    home: Option<(Arc<Target>, Sender)>,
    slot: Option<UpstreamSlot>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((target, sender)) = self.home.take() {
            target.checkin(sender);
        }
        // After the check-in, so that the request this slot goes to next
        // finds the connection idle instead of opening another.
        self.slot = None;
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.release();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    this.release();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // The connection is in an unknown state: never reuse it.
                this.home = None;
                this.slot = None;
                Poll::Ready(Some(Err(e.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body dropped half-read leaves its connection mid-response;
        // dropping the sender closes it instead.
        if self.inner.is_end_stream() {
            self.release();
        }
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
