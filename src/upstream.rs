//! Upstreams: pooled keep-alive HTTP/1.1 connections, round robin across
//! an upstream's URLs, and skipping a URL that refuses connections.
//!
//! The pool is our own: an idle list of sockets per URL, taken last-in
//! first-out (the warmest connection); a socket goes back on it when its
//! response body has been read to the end and the response allowed
//! another request on the connection. An idle socket is driven by nobody,
//! so an origin's close is noticed when it is next taken (one read that
//! does not wait, before anything is sent) or when it ages out.
//!
//! **Two paths over that one pool.** A request without a body (the common
//! case: `GET`, `HEAD`, a `DELETE`) takes the lean path: its head is
//! written and the response read with our own HTTP/1.1 codec
//! ([`crate::h1`]) on the request's own task, and the body streams
//! straight off the socket into the client's response. No connection
//! task, no channel, no wake-up of a second task per request: hyper's
//! client dispatcher and its task were about a third of a proxied
//! request's user-space instructions (BENCHMARKS.md). A request with a
//! body, and a WebSocket handshake, go through hyper's client on a
//! borrowed socket: it streams the request body while it may already read
//! an early response, and hands an upgraded socket over; its task gives
//! the socket back when the response is done.
//!
//! A URL whose connection fails is benched for [`BENCH_TIME`]; requests go
//! to the others meanwhile (or to it anyway if every URL is benched, since
//! a guess beats a certain 502). A request is handed to a connection only
//! once that connection exists, so a request whose connection fails (body
//! or not) is retried on the next URL; one that an idle connection closed
//! under it before sending is retried on another connection.
//!
//! Each worker (`server.worker_threads`) has its own [`Upstream`]s, so
//! its own idle lists, round robin and benched URLs: a pooled socket is
//! registered with the runtime that opened it and is only ever used
//! there, the idle lists' locks are never contended, and a URL that
//! refuses is found out by each worker on its own (one failed connect
//! each, within [`BENCH_TIME`]).
//!
//! An `https://` URL gets the same pool: the connection is TLS (the
//! upstream's rustls client, built once when the config was validated)
//! under the same HTTP/1.1 paths, and is kept alive and reused exactly as
//! a plain one, so a handshake is paid per connection, not per request.
//! The TCP connect and the TLS handshake share `connect_timeout_ms`, and a
//! failed handshake (an untrusted or misnamed certificate) benches the URL
//! like a refused connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
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

/// How many interim (1xx) responses the lean path skips before it gives
/// up on the origin.
const MAX_INTERIM: usize = 16;

/// Read buffer of a lean connection: what one read asks the socket for.
const READ_CHUNK: usize = 16 * 1024;

/// An upstream socket, plain or TLS: one concrete type for both paths.
enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A connection of the lean path: the socket and what has been read off
/// it but not yet used.
struct LeanConn {
    io: UpstreamIo,
    buf: BytesMut,
}

impl LeanConn {
    /// Reads more into the buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        use tokio::io::AsyncReadExt;
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        // A `read_buf` future holds nothing between polls: a fresh one
        // per poll is the same as keeping one.
        let read = self.io.read_buf(&mut self.buf);
        std::pin::pin!(read).poll(cx)
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Whether an idle connection can take a request: nothing arrived on
    /// it while idle (an origin's close, or bytes it had no business
    /// sending). Looks without waiting.
    fn still_idle(&mut self) -> bool {
        match self.poll_fill(&mut Context::from_waker(Waker::noop())) {
            Poll::Pending => self.buf.is_empty(),
            Poll::Ready(_) => false,
        }
    }
}

struct LeanIdle {
    conn: LeanConn,
    since: Instant,
}

/// Why a lean exchange failed.
enum LeanFailure {
    /// A pooled connection ended before a byte of the response came:
    /// the origin closed it while idle, so the request can go again on
    /// another connection (if it is idempotent).
    Stale(std::io::Error),
    Io(std::io::Error),
    Protocol(String),
}

struct Target {
    base: Uri,
    host: String,
    port: u16,
    /// `Host` for a request that came without one (HTTP/1.0).
    authority: HeaderValue,
    benched_until: AtomicI64,
    /// Idle sockets, most recently used last: both paths take from it
    /// and give back to it.
    idle: Mutex<Vec<LeanIdle>>,
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
    /// The most recently used idle connection that can take a request.
    fn checkout(&self) -> Option<LeanConn> {
        loop {
            let LeanIdle { mut conn, since } = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.pop()?
            };
            if since.elapsed() < IDLE_TIMEOUT && conn.still_idle() {
                return Some(conn);
            }
        }
    }

    fn checkin(&self, conn: LeanConn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Nothing drives an idle connection, so nothing notices its
        // origin closing it: the oldest, at the bottom of the LIFO list
        // where steady traffic never reaches, are closed here once past
        // their age rather than left open.
        let expired = idle
            .iter()
            .take_while(|c| c.since.elapsed() >= IDLE_TIMEOUT)
            .count();
        idle.drain(..expired);
        if idle.len() < MAX_IDLE_PER_URL {
            idle.push(LeanIdle {
                conn,
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

    /// A new socket to `target`, TLS or plain.
    async fn connect_io(&self, target: &Target) -> Result<UpstreamIo, ConnectError> {
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
            TargetTls::Plain | TargetTls::Unusable(_) => Ok(UpstreamIo::Plain(stream)),
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
                Ok(UpstreamIo::Tls(Box::new(stream)))
            }
        }
    }

    /// Starts hyper's HTTP/1.1 client on `conn` for one request, its
    /// state machine on a task of its own (it streams the request body
    /// while it may already read the response). The socket comes back
    /// to the idle list once the response has ended and `reuse` says the
    /// response allowed it; an upgrade keeps it.
    async fn handshake(
        &self,
        conn: LeanConn,
        target: &Arc<Target>,
        upgrade: bool,
    ) -> Result<(Sender, Arc<AtomicBool>), hyper::Error> {
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(conn.io))
            .await?;
        let reuse = Arc::new(AtomicBool::new(false));
        let name = self.name.clone();
        if upgrade {
            tokio::spawn(async move {
                // A WebSocket handshake hands the socket over.
                if let Err(e) = driver.with_upgrades().await {
                    tracing::debug!(upstream = %name, error = %error_chain(&e), "upstream connection ended with an error");
                }
            });
        } else {
            let (target, reusable) = (target.clone(), reuse.clone());
            tokio::spawn(async move {
                // Ends once the sender is dropped (the response is done)
                // with the socket intact, or with the connection's error.
                match driver.without_shutdown().await {
                    Ok(parts) if reusable.load(Ordering::Acquire) && parts.read_buf.is_empty() => {
                        target.checkin(LeanConn {
                            io: parts.io.into_inner(),
                            buf: BytesMut::new(),
                        });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(upstream = %name, error = %error_chain(&e), "upstream connection ended with an error");
                    }
                }
            });
        }
        Ok((sender, reuse))
    }

    /// Benches `target` after a failed connect.
    fn bench(&self, target: &Target, e: &ConnectError) {
        target
            .benched_until
            .store(now_ms() + BENCH_TIME.as_millis() as i64, Ordering::Relaxed);
        tracing::warn!(
            upstream = %self.name,
            url = %target.base,
            error = %e,
            "upstream connection failed"
        );
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
        // Lean: no body (nor one announced), no upgrade.
        let lean = req.body().is_end_stream()
            && !req.headers().contains_key(header::UPGRADE)
            && !req.headers().contains_key(header::TRANSFER_ENCODING)
            && req
                .headers()
                .get(header::CONTENT_LENGTH)
                .is_none_or(|v| v.as_bytes() == b"0")
            && req.method() != Method::CONNECT;
        let sending = async {
            let slot = conn.upstream_slot().await;
            if lean {
                self.send_lean(req, slot).await
            } else {
                self.send_in_order(req, slot).await
            }
        };
        match tokio::time::timeout(self.timeout, sending).await {
            Err(_) => Err(ProxyError::UpstreamTimeout),
            Ok(result) => result,
        }
    }

    /// The hyper path (a request with a body, or a WebSocket handshake):
    /// the same order of URLs, pooled sockets first.
    async fn send_in_order(
        &self,
        mut req: Request<Body>,
        slot: UpstreamSlot,
    ) -> Result<Response<Body>, ProxyError> {
        // Only a WebSocket handshake keeps its `Upgrade` past the rewrite.
        let upgrade = req.headers().contains_key(header::UPGRADE);
        for index in self.order() {
            let target = &self.targets[index];
            if !req.headers().contains_key(header::HOST) {
                req.headers_mut()
                    .insert(header::HOST, target.authority.clone());
            }
            // Pooled sockets first. One the origin closed after we checked
            // it gives the request back unsent: try the next.
            while let Some(conn) = target.checkout() {
                let Ok((mut sender, reuse)) = self.handshake(conn, target, upgrade).await else {
                    continue;
                };
                match sender.try_send_request(req).await {
                    Ok(resp) => return Ok(pooled_response(resp, sender, reuse, slot)),
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => req = unsent,
                        None => return Err(self.failed(e.into_error())),
                    },
                }
            }
            let conn = match self.connect_io(target).await {
                Ok(io) => LeanConn {
                    io,
                    buf: BytesMut::new(),
                },
                Err(e) => {
                    self.bench(target, &e);
                    continue;
                }
            };
            let (mut sender, reuse) = self
                .handshake(conn, target, upgrade)
                .await
                .map_err(|e| self.failed(e))?;
            return match sender.try_send_request(req).await {
                Ok(resp) => Ok(pooled_response(resp, sender, reuse, slot)),
                Err(e) => Err(self.failed(e.into_error())),
            };
        }
        Err(ProxyError::UpstreamUnreachable)
    }

    /// The lean path: the same order of URLs, pooled connections first,
    /// a request that met a connection the origin had closed sent again
    /// on another (only when sending it twice is harmless).
    async fn send_lean(
        &self,
        req: Request<Body>,
        slot: UpstreamSlot,
    ) -> Result<Response<Body>, ProxyError> {
        let (parts, _) = req.into_parts();
        let mut head = Vec::new();
        let target_uri = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut headers = parts.headers;
        if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
            && !headers.contains_key(header::CONTENT_LENGTH)
        {
            // RFC 9110 §8.6: a request whose method expects content says
            // that it has none.
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        let retry = parts.method.is_idempotent();
        for index in self.order() {
            let target = &self.targets[index];
            let fresh_host = !headers.contains_key(header::HOST);
            if fresh_host {
                headers.insert(header::HOST, target.authority.clone());
            }
            head.clear();
            crate::h1::encode_request_head(&parts.method, target_uri, &headers, &mut head);
            if fresh_host {
                // Another URL writes its own.
                headers.remove(header::HOST);
            }
            while let Some(conn) = target.checkout() {
                match self.lean_exchange(conn, &parts.method, &head).await {
                    Ok((resp, conn)) => return Ok(lean_response(resp, conn, target, slot)),
                    Err(LeanFailure::Stale(e)) if retry => {
                        tracing::debug!(upstream = %self.name, error = %e, "pooled upstream connection was closed; sending again");
                    }
                    Err(e) => return Err(self.lean_failed(e)),
                }
            }
            let conn = match self.connect_io(target).await {
                Ok(io) => LeanConn {
                    io,
                    buf: BytesMut::new(),
                },
                Err(e) => {
                    self.bench(target, &e);
                    continue;
                }
            };
            return match self.lean_exchange(conn, &parts.method, &head).await {
                Ok((resp, conn)) => Ok(lean_response(resp, conn, target, slot)),
                Err(e) => Err(self.lean_failed(e)),
            };
        }
        Err(ProxyError::UpstreamUnreachable)
    }

    /// Writes `head` and reads the response head, skipping interim
    /// responses.
    async fn lean_exchange(
        &self,
        mut conn: LeanConn,
        method: &Method,
        head: &[u8],
    ) -> Result<(crate::h1::ResponseHead, LeanConn), LeanFailure> {
        use tokio::io::AsyncWriteExt;
        let mut got_any = false;
        let stale = |got_any: bool, e: std::io::Error| {
            if got_any {
                LeanFailure::Io(e)
            } else {
                LeanFailure::Stale(e)
            }
        };
        if let Err(e) = conn.io.write_all(head).await {
            return Err(stale(false, e));
        }
        if let Err(e) = conn.io.flush().await {
            return Err(stale(false, e));
        }
        let mut interim = 0;
        loop {
            if !conn.buf.is_empty() {
                got_any = true;
                match crate::h1::take_response_head(&mut conn.buf, method) {
                    Ok(Some(head)) => {
                        if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
                            return Err(LeanFailure::Protocol(
                                "switched protocols without being asked".into(),
                            ));
                        }
                        if !head.status.is_informational() {
                            return Ok((head, conn));
                        }
                        interim += 1;
                        if interim > MAX_INTERIM {
                            return Err(LeanFailure::Protocol("too many interim responses".into()));
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => return Err(LeanFailure::Protocol(e.to_string())),
                }
            }
            match conn.fill().await {
                Ok(0) => {
                    return Err(stale(
                        got_any,
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "connection closed before a complete response head",
                        ),
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(stale(got_any, e)),
            }
        }
    }

    fn lean_failed(&self, e: LeanFailure) -> ProxyError {
        match e {
            LeanFailure::Stale(e) | LeanFailure::Io(e) => {
                tracing::warn!(upstream = %self.name, error = %e, "upstream request failed");
                ProxyError::UpstreamUnreachable
            }
            LeanFailure::Protocol(why) => {
                tracing::warn!(upstream = %self.name, error = %why, "upstream sent an invalid response");
                ProxyError::UpstreamProtocol(why)
            }
        }
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

/// The response of the hyper path, with a body that lets its socket go
/// back to the idle list once it has been read to the end (and the
/// response allows another request on it). An upgraded connection belongs
/// to the upgrade, never to the pool.
fn pooled_response(
    resp: Response<Incoming>,
    sender: Sender,
    reuse: Arc<AtomicBool>,
    slot: UpstreamSlot,
) -> Response<Body> {
    let keep_alive = resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
        && resp.version() == Version::HTTP_11
        && !resp.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        });
    resp.map(|inner| {
        PooledBody {
            inner,
            sender: Some(sender),
            reuse: keep_alive.then_some(reuse),
            slot: Some(slot),
        }
        .boxed()
    })
}

struct PooledBody {
    inner: Incoming,
    /// Dropped when the body ends: the connection's task then finishes
    /// and gives the socket back.
    sender: Option<Sender>,
    /// Set when the body ended whole and the response allows another
    /// request on the connection.
    reuse: Option<Arc<AtomicBool>>,
    slot: Option<UpstreamSlot>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(reuse) = self.reuse.take() {
            reuse.store(true, Ordering::Release);
        }
        self.sender = None;
        // After the release, so that the request this slot goes to next
        // is more likely to find the socket idle than to open another.
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
                this.reuse = None;
                this.sender = None;
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

/// The lean path's response: its head, and a body read off the
/// connection on the task that polls it.
fn lean_response(
    head: crate::h1::ResponseHead,
    conn: LeanConn,
    target: &Arc<Target>,
    slot: UpstreamSlot,
) -> Response<Body> {
    use crate::h1::Framing;
    let state = match head.framing {
        Framing::Empty | Framing::Length(0) => LeanState::Done,
        Framing::Length(n) => LeanState::Length(n),
        Framing::Chunked => LeanState::Chunked(crate::h1::ChunkedDecoder::default()),
        Framing::UntilClose => LeanState::UntilClose,
    };
    let mut body = LeanBody {
        conn: Some(conn),
        state,
        keep_alive: head.keep_alive,
        home: Some(target.clone()),
        slot: Some(slot),
    };
    if matches!(body.state, LeanState::Done) {
        body.release();
    }
    let mut resp = Response::new(body.boxed());
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers;
    resp
}

enum LeanState {
    Length(u64),
    Chunked(crate::h1::ChunkedDecoder),
    UntilClose,
    Done,
}

/// A response body read straight off a lean connection. Its end puts the
/// connection back in the pool (when the response allows another on it
/// and nothing more arrived); dropped before its end, it closes it.
struct LeanBody {
    conn: Option<LeanConn>,
    state: LeanState,
    keep_alive: bool,
    home: Option<Arc<Target>>,
    slot: Option<UpstreamSlot>,
}

impl LeanBody {
    fn release(&mut self) {
        self.state = LeanState::Done;
        if let (Some(target), Some(conn)) = (self.home.take(), self.conn.take())
            && self.keep_alive
            && conn.buf.is_empty()
        {
            target.checkin(conn);
        }
        // After the check-in, so that the request this slot goes to next
        // finds the connection idle instead of opening another.
        self.slot = None;
    }

    fn fail(&mut self, e: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = LeanState::Done;
        self.conn = None;
        self.home = None;
        self.slot = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl HttpBody for LeanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.state {
                LeanState::Done => {
                    this.release();
                    return Poll::Ready(None);
                }
                LeanState::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = (conn.buf.len() as u64).min(*left) as usize;
                        let data = conn.buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            this.release();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                LeanState::Chunked(decoder) => match decoder.decode(&mut conn.buf) {
                    Ok(crate::h1::Decoded::Data(data)) => {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(crate::h1::Decoded::Done) => {
                        this.release();
                        return Poll::Ready(None);
                    }
                    Ok(crate::h1::Decoded::NeedMore) => {}
                    Err(e) => return this.fail(Box::new(e)),
                },
                LeanState::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if matches!(this.state, LeanState::UntilClose) => {
                    this.keep_alive = false;
                    this.release();
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    return this
                        .fail("upstream closed the connection in the middle of a body".into());
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(Box::new(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, LeanState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            LeanState::Done => SizeHint::with_exact(0),
            LeanState::Length(n) => SizeHint::with_exact(*n),
            LeanState::Chunked(d) => {
                let mut hint = SizeHint::new();
                hint.set_lower(d.pending());
                hint
            }
            LeanState::UntilClose => SizeHint::new(),
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
