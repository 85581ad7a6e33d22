//! Bounds on what one client can hold: its connections, the upstream
//! requests one connection may have in flight, and the size and pace of a
//! request body.
//!
//! Everything here runs per connection or only when a body stalls: the
//! per-request cost is a few uncontended atomic operations, no allocation,
//! no lock and no timer.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;
use crate::error::ProxyError;

// ---------------------------------------------------------------------------
// Per client address: connections held open
// ---------------------------------------------------------------------------

/// Open connections per client address, counted at accept and close only.
/// One per listener, shared by its workers (`server.worker_threads`): the
/// cap is per client, whichever worker the kernel gives a connection to,
/// and a lock taken twice per connection (never per request) costs
/// nothing next to the connection's own setup.
pub(crate) struct ClientCounts {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One accepted connection's place in [`ClientCounts`]; gives it back
/// when dropped.
pub(crate) struct ClientSlot {
    counts: Arc<ClientCounts>,
    key: IpAddr,
}

impl ClientCounts {
    pub(crate) fn new(max: usize) -> Arc<ClientCounts> {
        Arc::new(ClientCounts {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or `None` when that client
    /// already holds `max` connections.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let key = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            counts: self.clone(),
            key,
        })
    }

    #[cfg(test)]
    fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap();
        open.get(&client_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            // Forget clients with nothing open, so the map stays as small
            // as the set of connected clients.
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The address a connection is counted under. An IPv6 client gets a whole
/// /64 (one customer's network; otherwise it could take a new address per
/// connection), and an IPv4 address mapped into IPv6 counts as itself.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
    }
}

// ---------------------------------------------------------------------------
// Per client connection: requests and upstream requests in flight
// ---------------------------------------------------------------------------

/// What an accepted connection holds of its listener's budgets: a place
/// under `max_connections` and one of its client's connections (none for
/// a trusted proxy, which speaks for many clients: `forwarded.rs`).
pub(crate) struct ConnBudget {
    _listener: OwnedSemaphorePermit,
    _client: Option<ClientSlot>,
}

impl ConnBudget {
    pub(crate) fn new(listener: OwnedSemaphorePermit, client: Option<ClientSlot>) -> ConnBudget {
        ConnBudget {
            _listener: listener,
            _client: client,
        }
    }

    /// Counts the connection under the client a PROXY header named.
    pub(crate) fn with_client(mut self, client: ClientSlot) -> ConnBudget {
        self._client = Some(client);
        self
    }
}

/// What one client connection's requests share: how many are being
/// handled (for the idle watchdog), how many upstream requests they have
/// in flight (bounded by `server.max_upstream_per_connection`), and the
/// connection's budget, given back when the last holder is gone (the
/// connection, a request still running, or a WebSocket tunnel it became).
pub(crate) struct ConnState {
    /// Low 32 bits: requests being handled; high 32 bits: requests begun
    /// (wrapping), so the watchdog can tell "still idle" from "busy and
    /// idle again" between two looks without a clock read per request.
    requests: AtomicU64,
    upstream: AtomicUsize,
    max_upstream: usize,
    upstream_freed: Notify,
    /// The client socket could not take more bytes at the last write, and
    /// how many times such a wait has ended: the watchdog's view of a
    /// client that stops reading its responses.
    write_blocked: AtomicBool,
    write_unblocks: AtomicU32,
    _budget: Option<ConnBudget>,
}

/// A request being handled on a connection; ends when dropped.
pub(crate) struct RequestGuard {
    conn: Arc<ConnState>,
}

/// One of a connection's upstream request slots; given back when dropped
/// (when the upstream response body ends or is dropped).
pub(crate) struct UpstreamSlot {
    conn: Arc<ConnState>,
}

impl ConnState {
    pub(crate) fn new(max_upstream: usize, budget: Option<ConnBudget>) -> Arc<ConnState> {
        Arc::new(ConnState {
            requests: AtomicU64::new(0),
            upstream: AtomicUsize::new(0),
            max_upstream,
            upstream_freed: Notify::new(),
            write_blocked: AtomicBool::new(false),
            write_unblocks: AtomicU32::new(0),
            _budget: budget,
        })
    }

    pub(crate) fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.requests.fetch_add(1 | (1 << 32), Ordering::Relaxed);
        RequestGuard { conn: self.clone() }
    }

    /// (requests begun, whether anything is in flight): two equal
    /// snapshots with nothing in flight mean the connection was idle in
    /// between.
    pub(crate) fn activity(&self) -> (u32, bool) {
        let r = self.requests.load(Ordering::Relaxed);
        let busy = r as u32 != 0 || self.upstream.load(Ordering::Relaxed) != 0;
        ((r >> 32) as u32, busy)
    }

    /// Called by the socket when a write must wait (`true`) or, after
    /// such a wait, goes through (`false`); not on every write.
    pub(crate) fn write_waiting(&self, waiting: bool) {
        self.write_blocked.store(waiting, Ordering::Relaxed);
        if !waiting {
            self.write_unblocks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `Some(waits ended so far)` while a write is waiting for the client:
    /// two equal snapshots mean it has waited all along in between.
    pub(crate) fn write_stall(&self) -> Option<u32> {
        self.write_blocked
            .load(Ordering::Relaxed)
            .then(|| self.write_unblocks.load(Ordering::Relaxed))
    }

    fn try_upstream(&self) -> bool {
        self.upstream
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < self.max_upstream).then_some(n + 1)
            })
            .is_ok()
    }

    /// Waits for one of the connection's upstream request slots.
    pub(crate) async fn upstream_slot(self: &Arc<Self>) -> UpstreamSlot {
        loop {
            if self.try_upstream() {
                break;
            }
            let freed = self.upstream_freed.notified();
            tokio::pin!(freed);
            // Registered before looking again, so a slot freed in between
            // is not missed.
            freed.as_mut().enable();
            if self.try_upstream() {
                break;
            }
            freed.await;
        }
        UpstreamSlot { conn: self.clone() }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.conn.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for UpstreamSlot {
    fn drop(&mut self) {
        self.conn.upstream.fetch_sub(1, Ordering::Release);
        // Without a waiter this only stores a wake-up (no lock).
        self.conn.upstream_freed.notify_one();
    }
}

// ---------------------------------------------------------------------------
// A client's request body: size and pace
// ---------------------------------------------------------------------------

/// Why the gateway stopped reading a client's request body. Travels as
/// the cause of the upstream client's error, and [`body_fault`] turns it
/// back into the client's answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyFault {
    #[error("request body larger than the route's max_body_bytes")]
    TooLarge,
    #[error("request body stalled longer than body_read_timeout")]
    TimedOut,
    #[error("request body malformed or cut off: {0}")]
    Broken(BoxError),
}

/// The client error behind an upstream send failure caused by the
/// client's own body, if that is what it was.
pub(crate) fn body_fault(e: &(dyn std::error::Error + 'static)) -> Option<ProxyError> {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(fault) = e.downcast_ref::<BodyFault>() {
            return Some(match fault {
                BodyFault::TooLarge => ProxyError::BodyTooLarge,
                BodyFault::TimedOut => ProxyError::BodyTimeout,
                BodyFault::Broken(_) => ProxyError::InvalidBody,
            });
        }
        cause = e.source();
    }
    None
}

pin_project_lite::pin_project! {
    /// A client's request body on its way upstream: at most `max` bytes,
    /// and no wait longer than `timeout` for the next frame.
    ///
    /// The timer exists only once the body has had to wait: a body that
    /// arrives with its headers (or no body at all) costs no allocation.
    pub(crate) struct LimitedBody<B> {
        #[pin]
        inner: B,
        left: u64,
        timeout: Duration,
        timer: Option<Pin<Box<Sleep>>>,
        // The timer runs for the current wait.
        waiting: bool,
        failed: bool,
    }
}

impl<B> LimitedBody<B> {
    pub(crate) fn new(inner: B, max: u64, timeout: Duration) -> LimitedBody<B> {
        LimitedBody {
            inner,
            left: max,
            timeout,
            timer: None,
            waiting: false,
            failed: false,
        }
    }
}

/// `now + wait`, saturating far in the future for a huge configured wait.
pub(crate) fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

impl<B> HttpBody for LimitedBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.waiting = false;
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > *this.left {
                        *this.failed = true;
                        return Poll::Ready(Some(Err(BodyFault::TooLarge.into())));
                    }
                    *this.left -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                *this.failed = true;
                Poll::Ready(Some(Err(BodyFault::Broken(e.into()).into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if !*this.waiting {
                    *this.waiting = true;
                    let deadline = deadline_after(*this.timeout);
                    match this.timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => *this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                if let Some(timer) = this.timer
                    && timer.as_mut().poll(cx).is_ready()
                {
                    *this.failed = true;
                    return Poll::Ready(Some(Err(BodyFault::TimedOut.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One side of a WebSocket tunnel, noting when bytes last moved, so that a
/// tunnel where nothing moves either way can be closed after the idle
/// timeout like any other idle connection.
struct Tracked<T> {
    io: T,
    started: Instant,
    /// Milliseconds after `started` when bytes last moved, either way.
    last: Arc<AtomicU64>,
}

impl<T> Tracked<T> {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        poll
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Copies bytes both ways between `client` and `upstream` until either
/// side closes, or until nothing has moved either way for `idle`
/// (`server.idle_timeout_ms`): a tunnel is a connection too, and an idle
/// one must not hold its place under the caps forever. The watchdog looks
/// every quarter of `idle`; nothing is added per byte but an atomic store.
pub(crate) async fn tunnel<A, B>(client: A, upstream: B, idle: Duration)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let started = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Tracked {
        io: client,
        started,
        last: last.clone(),
    };
    let mut upstream = Tracked {
        io: upstream,
        started,
        last: last.clone(),
    };
    let idle_ms = idle.as_millis() as u64;
    let tick = (idle / 4).max(Duration::from_millis(1));
    let watchdog = async {
        loop {
            tokio::time::sleep(tick).await;
            let now = started.elapsed().as_millis() as u64;
            if now.saturating_sub(last.load(Ordering::Relaxed)) >= idle_ms {
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = watchdog => tracing::debug!("closing an idle WebSocket tunnel"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[test]
    fn clients_are_counted_by_address_and_ipv6_by_slash_64() {
        let counts = ClientCounts::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let one = counts.admit(a).unwrap();
        let two = counts.admit("::ffff:192.0.2.1".parse().unwrap()).unwrap();
        assert!(counts.admit(a).is_none(), "a third from the same address");
        assert!(counts.admit("192.0.2.2".parse().unwrap()).is_some());
        drop(one);
        assert_eq!(counts.open(a), 1);
        let three = counts.admit(a).unwrap();
        drop((two, three));
        assert_eq!(counts.open(a), 0);
        assert!(counts.open.lock().unwrap().is_empty());

        let x = counts.admit("2001:db8::1".parse().unwrap()).unwrap();
        let y = counts.admit("2001:db8::ffff:2".parse().unwrap()).unwrap();
        assert!(counts.admit("2001:db8::3".parse().unwrap()).is_none());
        assert!(counts.admit("2001:db8:0:1::1".parse().unwrap()).is_some());
        drop((x, y));
    }

    #[tokio::test]
    async fn upstream_slots_are_bounded_and_handed_on() {
        let conn = ConnState::new(2, None);
        let a = conn.upstream_slot().await;
        let _b = conn.upstream_slot().await;
        assert!(conn.activity().1);
        let waiting = tokio::spawn({
            let conn = conn.clone();
            async move { conn.upstream_slot().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a third slot while two are held");
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the freed slot is handed on")
            .unwrap();
        assert_eq!(conn.upstream.load(Ordering::SeqCst), 2);
        drop(c);
    }

    #[test]
    fn activity_tells_idle_from_busy_and_idle_again() {
        let conn = ConnState::new(1, None);
        let before = conn.activity();
        assert!(!before.1);
        let guard = conn.begin_request();
        assert!(conn.activity().1);
        drop(guard);
        let after = conn.activity();
        assert!(!after.1);
        assert_ne!(before.0, after.0, "a request came and went");
    }

    #[tokio::test]
    async fn bodies_over_the_limit_fail_with_too_large() {
        let body = LimitedBody::new(Full::new(Bytes::from_static(b"12345")), 4, Duration::MAX);
        let e = body.collect().await.expect_err("over the limit");
        assert!(matches!(body_fault(&*e), Some(ProxyError::BodyTooLarge)));
        let body = LimitedBody::new(Full::new(Bytes::from_static(b"1234")), 4, Duration::MAX);
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 4);
    }

    #[tokio::test]
    async fn a_stalled_body_times_out_and_a_broken_one_is_invalid() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut body = LimitedBody::new(
            StreamBody::new(Box::pin(stream)),
            100,
            Duration::from_millis(50),
        );
        tx.send(Ok(Frame::data(Bytes::from_static(b"ab"))))
            .await
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        let e = body.frame().await.unwrap().expect_err("stalled");
        assert!(matches!(body_fault(&*e), Some(ProxyError::BodyTimeout)));
        assert!(body.frame().await.is_none(), "nothing after the fault");

        let broken = futures_util::stream::iter([Err::<Frame<Bytes>, _>(std::io::Error::other(
            "bad chunk",
        ))]);
        let body = LimitedBody::new(StreamBody::new(broken), 100, Duration::MAX);
        let e = body.collect().await.expect_err("broken");
        assert!(matches!(body_fault(&*e), Some(ProxyError::InvalidBody)));
        drop(tx);
    }
}
