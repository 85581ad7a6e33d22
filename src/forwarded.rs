//! Behind a load balancer: who the client is when the connection comes
//! from a proxy the operator trusts (`server.trusted_proxies`).
//!
//! Nothing a peer says about the client is believed unless the peer is
//! trusted. From a trusted peer:
//!
//! * **`X-Forwarded-For`** is walked from the right, the *rightmost
//!   untrusted* rule (nginx's `real_ip_recursive`, Envoy's
//!   `xff_num_trusted_hops` without counting): every proxy appends the
//!   address it got the request from, so the entries right of the first
//!   untrusted one were written by trusted proxies and that one is the
//!   client. What is left of it is whatever the client sent, and is never
//!   looked at. An entry that does not parse stops the walk and the last
//!   trusted hop passed is the client: a trusted proxy always writes an
//!   address, so anything else came from further out and is not evidence
//!   of anything. A chain made only of trusted hops gives the leftmost.
//!   At most [`MAX_HOPS`] entries are walked.
//! * **`X-Forwarded-Proto`**: its last value (the one the trusted peer
//!   wrote) if it is `http` or `https` (any case); anything else is
//!   ignored.
//! * **The PROXY protocol** (v1 text, v2 binary; `server.proxy_protocol`):
//!   the header is read before anything else on the connection, exactly
//!   to its end (the bytes after it are the client's TLS or HTTP), within
//!   a size bound; its source address becomes the connection's client
//!   address. `LOCAL` / `UNKNOWN` (a balancer's own health check) keep
//!   the connection's own address. A trusted peer that sends no valid
//!   header is disconnected; an untrusted one is never asked for one.
//!
//! The upstream gets `X-Forwarded-For` = the verified chain: the client,
//! then the trusted hops its request passed, ending with the peer. The
//! unverified part left of the client never goes upstream.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use ipnet::{IpNet, Ipv4Net};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ServerConfig;
use crate::limits::{ClientCounts, ConnBudget};
use crate::metrics::{Metrics, ReasonLabels};

/// Most `X-Forwarded-For` entries walked; past it the walk stops as on an
/// unparsable entry. Real chains are a few hops; this bounds the work a
/// trusted proxy that passes a client's list on unchecked can cause.
pub const MAX_HOPS: usize = 32;

/// The longest PROXY v1 line, `\r\n` included (the spec's bound).
pub const V1_MAX: usize = 107;
/// The most bytes of addresses and TLVs accepted after a PROXY v2 header's
/// 16 fixed bytes: room for the UNIX addresses (216) and the TLVs cloud
/// balancers add (AWS, GCP, Azure: tens of bytes), far below the 64 KiB
/// the length field allows.
pub const V2_MAX_PAYLOAD: usize = 1024;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;

/// The peers allowed to speak for clients: `server.trusted_proxies`.
/// Empty trusts nobody (the default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// From networks already validated (IPv4-mapped IPv6 ones become
    /// IPv4, so that they match the way peers are compared).
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> TrustedProxies {
        TrustedProxies {
            nets: nets.into_iter().map(canonical_net).collect(),
        }
    }

    /// One `server.trusted_proxies` entry: a CIDR (`10.0.0.0/8`,
    /// `fd00::/8`) or a bare address (one host).
    pub fn parse_entry(entry: &str) -> Result<IpNet, String> {
        let text = entry.trim();
        if let Ok(net) = IpNet::from_str(text) {
            return Ok(canonical_net(net));
        }
        if let Ok(ip) = IpAddr::from_str(text) {
            return Ok(canonical_net(IpNet::from(ip)));
        }
        Err(format!(
            "{entry:?} is neither an IP address nor a CIDR (like 10.0.0.0/8, fd00::/8 or 192.0.2.7)"
        ))
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` (IPv4-mapped IPv6 compared as IPv4) is trusted.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// Whether any entry trusts every address (`0.0.0.0/0`, `::/0`).
    pub fn trusts_everyone(&self) -> bool {
        self.nets.iter().any(|net| net.prefix_len() == 0)
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:192.0.2.7`, what a dual-stack
/// socket reports for an IPv4 peer) as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
        && let Ok(mapped) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(mapped.trunc());
    }
    net.trunc()
}

/// One `X-Forwarded-For` entry: an address, `v4:port`, `[v6]` or
/// `[v6]:port`, surrounded by optional whitespace. `None` for anything
/// else (`unknown`, an obfuscated name, garbage).
pub fn parse_hop(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?;
    let text = text.trim_matches([' ', '\t']);
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return Ipv6Addr::from_str(inside)
            .ok()
            .map(|v6| canonical(v6.into()));
    }
    if let Ok(ip) = IpAddr::from_str(text) {
        return Some(canonical(ip));
    }
    let (host, port) = text.split_once(':')?;
    if !is_port(port) {
        return None;
    }
    Ipv4Addr::from_str(host).ok().map(IpAddr::V4)
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

/// Who a request comes from once its `X-Forwarded-For` has been walked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientChain {
    /// The client: the first `chain` entry.
    pub client: IpAddr,
    /// The client, then each trusted hop its request passed, ending with
    /// the peer: what the upstream gets as `X-Forwarded-For`.
    pub chain: Vec<IpAddr>,
}

impl ClientChain {
    /// The chain as an `X-Forwarded-For` value.
    pub fn header_value(&self) -> HeaderValue {
        let mut text = String::with_capacity(self.chain.len() * 17);
        for (i, ip) in self.chain.iter().enumerate() {
            if i > 0 {
                text.push_str(", ");
            }
            text.push_str(&ip.to_string());
        }
        HeaderValue::from_str(&text).expect("IP addresses are header-safe")
    }
}

/// Walks `X-Forwarded-For` (its header lines in order, `values`) for a
/// request from `peer` by the rightmost-untrusted rule. From an untrusted
/// peer the header is not read at all: the client is the peer.
pub fn resolve<'a>(
    trusted: &TrustedProxies,
    peer: IpAddr,
    values: impl DoubleEndedIterator<Item = &'a [u8]>,
) -> ClientChain {
    let peer = canonical(peer);
    let mut chain = vec![peer];
    if trusted.contains(peer) {
        let entries = values.rev().flat_map(|v| v.rsplit(|&b| b == b','));
        for entry in entries.take(MAX_HOPS) {
            let Some(hop) = parse_hop(entry) else {
                break;
            };
            chain.push(hop);
            if !trusted.contains(hop) {
                break;
            }
        }
    }
    chain.reverse();
    ClientChain {
        client: chain[0],
        chain,
    }
}

/// The scheme a trusted peer says the client used: the last
/// `X-Forwarded-Proto` value if it is `http` or `https` (any case).
pub fn forwarded_proto<'a>(
    values: impl DoubleEndedIterator<Item = &'a [u8]>,
) -> Option<&'static str> {
    let last = values.rev().find_map(|v| v.rsplit(|&b| b == b',').next())?;
    let last = last.trim_ascii();
    if last.eq_ignore_ascii_case(b"https") {
        Some("https")
    } else if last.eq_ignore_ascii_case(b"http") {
        Some("http")
    } else {
        None
    }
}

// ---------------------------------------------------------------------------
// The PROXY protocol header
// ---------------------------------------------------------------------------

/// Why a trusted peer's connection was closed before any request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    #[error("the PROXY protocol header is longer than allowed")]
    TooLong,
    #[error("malformed PROXY protocol header: {0}")]
    Invalid(String),
    #[error("the peer closed the connection inside the PROXY protocol header")]
    Truncated,
}

impl ProxyHeaderError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyHeaderError::Missing => "missing",
            ProxyHeaderError::TooLong => "too_long",
            ProxyHeaderError::Invalid(_) => "invalid",
            ProxyHeaderError::Truncated => "truncated",
        }
    }
}

/// What to do with the bytes of a PROXY header read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStep {
    /// Read exactly this many more bytes: all of them are still header.
    Read(usize),
    /// The header is complete: the client's address, or `None` for
    /// `LOCAL` / `UNKNOWN` / a family without one (the connection's own
    /// address stands).
    Done(Option<SocketAddr>),
}

/// Given the bytes of a PROXY header read so far (`head`), how many more
/// belong to it, or what it says once complete. Only ever asks for bytes
/// known to be part of the header, so that what follows it (a TLS
/// ClientHello, an HTTP request) stays in the socket for its reader: the
/// v2 length is in its fixed part; a v1 line is read a byte at a time to
/// its `\n` (at most [`V1_MAX`] bytes, once per connection).
pub fn header_step(head: &[u8]) -> Result<HeaderStep, ProxyHeaderError> {
    // 12 bytes: the v2 signature's length, shorter than any v1 line.
    if head.len() < V2_SIGNATURE.len() {
        let v1 = (head.len() <= V1_PREFIX.len() && V1_PREFIX.starts_with(head))
            || head.starts_with(V1_PREFIX);
        if !(v1 || V2_SIGNATURE.starts_with(head)) {
            return Err(ProxyHeaderError::Missing);
        }
        return Ok(HeaderStep::Read(V2_SIGNATURE.len() - head.len()));
    }
    if head.starts_with(V2_SIGNATURE) {
        if head.len() < V2_FIXED {
            return Ok(HeaderStep::Read(V2_FIXED - head.len()));
        }
        let payload = usize::from(u16::from_be_bytes([head[14], head[15]]));
        if payload > V2_MAX_PAYLOAD {
            return Err(ProxyHeaderError::TooLong);
        }
        let total = V2_FIXED + payload;
        if head.len() < total {
            return Ok(HeaderStep::Read(total - head.len()));
        }
        return parse_v2(&head[..total]).map(HeaderStep::Done);
    }
    if !head.starts_with(V1_PREFIX) {
        return Err(ProxyHeaderError::Missing);
    }
    if head.ends_with(b"\n") {
        return parse_v1(head).map(HeaderStep::Done);
    }
    if head.len() >= V1_MAX {
        return Err(ProxyHeaderError::TooLong);
    }
    Ok(HeaderStep::Read(1))
}

fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::v1::{Addresses, Header};
    if !line.ends_with(b"\r\n") {
        return Err(ProxyHeaderError::Invalid(
            "a v1 line must end in CRLF".into(),
        ));
    }
    let header = Header::try_from(line).map_err(|e| ProxyHeaderError::Invalid(e.to_string()))?;
    // ppp stops at the first CR: a line with one inside is not one line.
    if header.header.len() != line.len() {
        return Err(ProxyHeaderError::Invalid("a CR inside the v1 line".into()));
    }
    Ok(match header.addresses {
        Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unknown => None,
    })
}

fn parse_v2(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::v2::{Addresses, Command, Header};
    let header = Header::try_from(bytes).map_err(|e| ProxyHeaderError::Invalid(e.to_string()))?;
    if header.command == Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unspecified | Addresses::Unix(_) => None,
    })
}

/// Reads a PROXY header (v1 or v2) from the start of `stream`, and not
/// one byte past its end. The caller bounds the time.
pub async fn read_proxy_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut head = [0u8; V2_FIXED + V2_MAX_PAYLOAD];
    let mut len = 0;
    loop {
        match header_step(&head[..len])? {
            HeaderStep::Done(source) => return Ok(source),
            HeaderStep::Read(n) => {
                let end = len + n;
                stream
                    .read_exact(&mut head[len..end])
                    .await
                    .map_err(|_| ProxyHeaderError::Truncated)?;
                len = end;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A listener's side of it
// ---------------------------------------------------------------------------

/// What a listener does about proxies in front: the proxy listener's
/// comes from `[server]`; the admin listener's (the default) trusts
/// nobody.
#[derive(Clone, Default)]
pub(crate) struct Edge {
    trusted: Arc<TrustedProxies>,
    proxy_protocol: bool,
    rejections: Option<Family<ReasonLabels, Counter>>,
}

impl Edge {
    pub(crate) fn new(server: &ServerConfig, metrics: &Metrics) -> Edge {
        Edge {
            trusted: Arc::new(TrustedProxies::new(server.trusted_proxies.iter().copied())),
            proxy_protocol: server.proxy_protocol,
            rejections: Some(metrics.proxy_protocol_rejections.clone()),
        }
    }

    /// Whether `ip` is a trusted proxy (which the per-client connection
    /// cap does not count: it speaks for many clients).
    pub(crate) fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.contains(ip)
    }

    /// The client address of a connection from `peer`, once its PROXY
    /// header (from a trusted peer, with `server.proxy_protocol`) has
    /// been read within `within`; the connection then counts under that
    /// client's cap (unless it too is trusted). `None`: close it.
    pub(crate) async fn client_of<S: AsyncRead + Unpin>(
        &self,
        stream: &mut S,
        peer: SocketAddr,
        budget: ConnBudget,
        clients: &Arc<ClientCounts>,
        within: Duration,
    ) -> Option<(SocketAddr, ConnBudget)> {
        if !self.proxy_protocol || !self.trusts(peer.ip()) {
            return Some((peer, budget));
        }
        let source = match tokio::time::timeout(within, read_proxy_header(stream)).await {
            Ok(Ok(Some(source))) => source,
            // LOCAL / UNKNOWN: the balancer speaking for itself.
            Ok(Ok(None)) => return Some((peer, budget)),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "connection from a trusted proxy closed");
                self.reject(e.reason());
                return None;
            }
            Err(_) => {
                tracing::debug!(%peer, "connection from a trusted proxy closed: no complete PROXY header within first_byte_timeout");
                self.reject("timeout");
                return None;
            }
        };
        if self.trusts(source.ip()) {
            return Some((source, budget));
        }
        match clients.admit(source.ip()) {
            Some(slot) => Some((source, budget.with_client(slot))),
            None => {
                tracing::debug!(%peer, client = %source, "connection refused: too many from this client");
                None
            }
        }
    }

    pub(crate) fn trusts_everyone(&self) -> bool {
        self.trusted.trusts_everyone()
    }

    fn reject(&self, reason: &'static str) {
        if let Some(family) = &self.rejections {
            family.get_or_create(&ReasonLabels { reason }).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn trusted(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::new(
            entries
                .iter()
                .map(|e| TrustedProxies::parse_entry(e).unwrap()),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn walk(t: &TrustedProxies, peer: &str, lines: &[&str]) -> (String, String) {
        let r = resolve(t, ip(peer), lines.iter().map(|l| l.as_bytes()));
        (
            r.client.to_string(),
            r.header_value().to_str().unwrap().to_string(),
        )
    }

    #[test]
    fn entries_are_cidrs_or_addresses() {
        let t = trusted(&[
            "10.0.0.0/8",
            "192.0.2.7",
            " fd00::/8 ",
            "::ffff:198.51.100.0/120",
        ]);
        assert!(t.contains(ip("10.1.2.3")));
        assert!(t.contains(ip("192.0.2.7")));
        assert!(!t.contains(ip("192.0.2.8")));
        assert!(t.contains(ip("fd12::1")));
        assert!(
            t.contains(ip("198.51.100.9")),
            "a mapped CIDR is an IPv4 one"
        );
        assert!(t.contains(ip("::ffff:10.0.0.1")), "a mapped peer is IPv4");
        assert!(!t.contains(ip("::ffff:11.0.0.1")));
        assert!(!t.trusts_everyone());
        assert!(trusted(&["0.0.0.0/0"]).trusts_everyone());
        for bad in [
            "10.0.0.300",
            "10.0.0.0/33",
            "example.com",
            "",
            "10.0.0.0/8/8",
        ] {
            let e = TrustedProxies::parse_entry(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn hops_take_ports_brackets_and_whitespace() {
        assert_eq!(parse_hop(b" 192.0.2.1 "), Some(ip("192.0.2.1")));
        assert_eq!(parse_hop(b"\t192.0.2.1:8080"), Some(ip("192.0.2.1")));
        assert_eq!(parse_hop(b"[2001:db8::1]:443"), Some(ip("2001:db8::1")));
        assert_eq!(parse_hop(b"[2001:db8::1]"), Some(ip("2001:db8::1")));
        assert_eq!(parse_hop(b"2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(parse_hop(b"::ffff:192.0.2.1"), Some(ip("192.0.2.1")));
        for bad in [
            &b"unknown"[..],
            b"",
            b"_hidden",
            b"192.0.2.1:",
            b"192.0.2.1:99999999",
            b"[2001:db8::1]x",
            b"[192.0.2.1]",
            b"2001:db8::1:80:x",
            b"\xff",
        ] {
            assert_eq!(parse_hop(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let t = trusted(&["10.0.0.0/8"]);
        // An untrusted peer: its header is not read.
        assert_eq!(
            walk(&t, "198.51.100.1", &["10.0.0.9"]),
            ("198.51.100.1".into(), "198.51.100.1".into())
        );
        // A trusted peer: the client-sent left part is dropped.
        assert_eq!(
            walk(&t, "10.0.0.1", &["1.1.1.1, 203.0.113.7, 10.0.0.2"]),
            (
                "203.0.113.7".into(),
                "203.0.113.7, 10.0.0.2, 10.0.0.1".into()
            )
        );
        // Several lines are one list, in order.
        assert_eq!(
            walk(&t, "10.0.0.1", &["1.1.1.1", "203.0.113.7", " 10.0.0.2 "]),
            (
                "203.0.113.7".into(),
                "203.0.113.7, 10.0.0.2, 10.0.0.1".into()
            )
        );
        // Only trusted hops: the leftmost.
        assert_eq!(
            walk(&t, "10.0.0.1", &["10.0.0.3, 10.0.0.2"]),
            ("10.0.0.3".into(), "10.0.0.3, 10.0.0.2, 10.0.0.1".into())
        );
        // No header: the peer.
        assert_eq!(
            walk(&t, "10.0.0.1", &[]),
            ("10.0.0.1".into(), "10.0.0.1".into())
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(
            walk(&t, "10.0.0.1", &["203.0.113.7, garbage, 10.0.0.2"]),
            ("10.0.0.2".into(), "10.0.0.2, 10.0.0.1".into())
        );
        assert_eq!(
            walk(&t, "10.0.0.1", &["203.0.113.7,"]),
            ("10.0.0.1".into(), "10.0.0.1".into())
        );
        // Ports and brackets; a mapped peer.
        assert_eq!(
            walk(&t, "::ffff:10.0.0.1", &["[2001:db8::7]:5000, 10.0.0.2:80"]),
            (
                "2001:db8::7".into(),
                "2001:db8::7, 10.0.0.2, 10.0.0.1".into()
            )
        );
    }

    #[test]
    fn the_walk_is_bounded() {
        let t = trusted(&["10.0.0.0/8"]);
        let long = vec!["10.0.0.5"; MAX_HOPS * 4].join(",");
        let r = resolve(&t, ip("10.0.0.1"), std::iter::once(long.as_bytes()));
        assert_eq!(r.chain.len(), MAX_HOPS + 1);
    }

    #[test]
    fn the_scheme_is_http_or_https_only() {
        let p = |lines: &[&str]| forwarded_proto(lines.iter().map(|l| l.as_bytes()));
        assert_eq!(p(&["HTTPS"]), Some("https"));
        assert_eq!(p(&[" http "]), Some("http"));
        assert_eq!(p(&["http, https"]), Some("https"));
        assert_eq!(p(&["https", "http"]), Some("http"));
        assert_eq!(p(&["ftp"]), None);
        assert_eq!(p(&["https, javascript"]), None);
        assert_eq!(p(&[]), None);
    }

    /// Feeds `bytes` through [`header_step`] as the reader would.
    fn read_all(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, usize) {
        let mut len = 0;
        loop {
            match header_step(&bytes[..len]) {
                Err(e) => return (Err(e), len),
                Ok(HeaderStep::Done(s)) => return (Ok(s), len),
                Ok(HeaderStep::Read(n)) => {
                    if len + n > bytes.len() {
                        return (Err(ProxyHeaderError::Truncated), len);
                    }
                    len += n;
                }
            }
        }
    }

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(0x20 | command);
        b.push(family);
        b.extend(((addresses.len() + tlvs.len()) as u16).to_be_bytes());
        b.extend(addresses);
        b.extend(tlvs);
        b
    }

    #[test]
    fn v1_headers_are_read_to_their_end_only() {
        let mut bytes = b"PROXY TCP4 203.0.113.7 10.0.0.1 5000 443\r\nGET / HTTP/1.1\r\n".to_vec();
        assert_eq!(
            read_all(&bytes),
            (Ok(Some("203.0.113.7:5000".parse().unwrap())), 42)
        );
        bytes = b"PROXY TCP6 2001:db8::7 2001:db8::1 5000 443\r\n\x16\x03\x01".to_vec();
        assert_eq!(
            read_all(&bytes),
            (
                Ok(Some("[2001:db8::7]:5000".parse().unwrap())),
                bytes.len() - 3
            )
        );
        assert_eq!(read_all(b"PROXY UNKNOWN\r\nGET"), (Ok(None), 15));
        assert_eq!(
            read_all(b"PROXY UNKNOWN ff::1 ff::2 1 2\r\n"),
            (Ok(None), 31)
        );
        assert_eq!(
            read_all(b"GET / HTTP/1.1\r\n").0,
            Err(ProxyHeaderError::Missing)
        );
        assert_eq!(read_all(b"PROX").0, Err(ProxyHeaderError::Truncated));
        assert_eq!(
            read_all(b"PROXX TCP4 1.2.3.4").0,
            Err(ProxyHeaderError::Missing)
        );
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        let (r, read) = read_all(long.as_bytes());
        assert_eq!((r, read), (Err(ProxyHeaderError::TooLong), V1_MAX));
        for bad in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 5000 443\n"[..],
            b"PROXY TCP4 203.0.113.7 10.0.0.1 5000\r\n",
            b"PROXY TCP4 2001:db8::1 10.0.0.1 5000 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 05000 443\r\n",
            b"PROXY TCP5 203.0.113.7 10.0.0.1 5000 443\r\n",
            b"PROXY TCP4 203.0.113.7\r10.0.0.1 5000 443\r\n",
        ] {
            assert!(
                matches!(read_all(bad).0, Err(ProxyHeaderError::Invalid(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                read_all(bad)
            );
        }
    }

    #[test]
    fn v2_headers_are_read_to_their_end_only() {
        let tcp4 = [203, 0, 113, 7, 10, 0, 0, 1, 0x13, 0x88, 1, 187];
        let mut bytes = v2(1, 0x11, &tcp4, &[]);
        let len = bytes.len();
        bytes.extend(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            read_all(&bytes),
            (Ok(Some("203.0.113.7:5000".parse().unwrap())), len)
        );
        // TLVs (an authority and a NOOP) are skipped.
        let tlvs = [0x02, 0, 3, b'a', b'.', b'b', 0x04, 0, 1, 0];
        let bytes = v2(1, 0x11, &tcp4, &tlvs);
        assert_eq!(
            read_all(&bytes),
            (Ok(Some("203.0.113.7:5000".parse().unwrap())), bytes.len())
        );
        let mut tcp6 = Vec::new();
        tcp6.extend("2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        tcp6.extend("2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        tcp6.extend([0x13, 0x88, 1, 187]);
        let bytes = v2(1, 0x21, &tcp6, &[]);
        assert_eq!(
            read_all(&bytes).0,
            Ok(Some("[2001:db8::7]:5000".parse().unwrap()))
        );
        // LOCAL: the connection's own address.
        assert_eq!(read_all(&v2(0, 0x00, &[], &[])).0, Ok(None));
        assert_eq!(read_all(&v2(0, 0x11, &tcp4, &[])).0, Ok(None));
        // Unix sockets: no address to take.
        assert_eq!(read_all(&v2(1, 0x31, &[0; 216], &[])).0, Ok(None));
        // Too long, cut short, wrong version, wrong command.
        let huge = v2(1, 0x11, &tcp4, &vec![0; V2_MAX_PAYLOAD]);
        let (r, read) = read_all(&huge);
        assert_eq!((r, read), (Err(ProxyHeaderError::TooLong), V2_FIXED));
        assert_eq!(
            read_all(&bytes[..bytes.len() - 1]).0,
            Err(ProxyHeaderError::Truncated)
        );
        let mut wrong = v2(1, 0x11, &tcp4, &[]);
        wrong[12] = 0x11;
        assert!(matches!(
            read_all(&wrong).0,
            Err(ProxyHeaderError::Invalid(_))
        ));
        wrong[12] = 0x22;
        assert!(matches!(
            read_all(&wrong).0,
            Err(ProxyHeaderError::Invalid(_))
        ));
        // An IPv4 family with too few address bytes.
        let short = v2(1, 0x11, &tcp4[..8], &[]);
        assert!(matches!(
            read_all(&short).0,
            Err(ProxyHeaderError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn the_reader_leaves_what_follows_in_the_stream() {
        let bytes = b"PROXY TCP4 203.0.113.7 10.0.0.1 5000 443\r\nGET / HTTP/1.1\r\n";
        let mut stream = &bytes[..];
        let source = read_proxy_header(&mut stream).await.unwrap();
        assert_eq!(source, Some("203.0.113.7:5000".parse().unwrap()));
        assert_eq!(stream, b"GET / HTTP/1.1\r\n");
    }

    fn any_hop() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|b| Ipv4Addr::from(b).to_string()),
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(b, p)| format!("{}:{p}", Ipv4Addr::from(b))),
            any::<[u8; 16]>().prop_map(|b| format!("[{}]:80", Ipv6Addr::from(b))),
            any::<[u8; 16]>().prop_map(|b| Ipv6Addr::from(b).to_string()),
            Just("10.0.0.9".to_string()),
            Just("unknown".to_string()),
            "[ -~]{0,12}",
        ]
    }

    fn trusted_hop() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 3]>().prop_map(|b| IpAddr::from([10, b[0], b[1], b[2]])),
            any::<[u8; 8]>().prop_map(|b| {
                let mut o = [0u8; 16];
                o[0] = 0xfd;
                o[8..].copy_from_slice(&b);
                IpAddr::from(o)
            }),
        ]
    }

    fn untrusted_client() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>()
                .prop_filter("not 10/8", |b| b[0] != 10)
                .prop_map(IpAddr::from),
            any::<[u8; 16]>()
                .prop_filter("not fd00::/8 nor mapped", |b| {
                    b[0] != 0xfd && Ipv6Addr::from(*b).to_ipv4_mapped().is_none()
                })
                .prop_map(IpAddr::from),
        ]
    }

    fn lines_of(entries: &[String], cuts: &[usize]) -> Vec<String> {
        // The same list split into header lines at arbitrary places.
        let mut lines = vec![Vec::new()];
        for (i, e) in entries.iter().enumerate() {
            if cuts.contains(&i) && !lines.last().unwrap().is_empty() {
                lines.push(Vec::new());
            }
            lines.last_mut().unwrap().push(e.clone());
        }
        lines.into_iter().map(|l| l.join(", ")).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// No input panics; the chain always starts with the client and
        /// ends with the peer; from an untrusted peer it is the peer alone.
        #[test]
        fn any_header_is_walked_safely(
            lines in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..6),
            peer in prop_oneof![trusted_hop(), untrusted_client()],
        ) {
            let t = trusted(&["10.0.0.0/8", "fd00::/8"]);
            let r = resolve(&t, peer, lines.iter().map(|l| l.as_slice()));
            prop_assert_eq!(r.chain[0], r.client);
            prop_assert_eq!(*r.chain.last().unwrap(), canonical(peer));
            prop_assert!(r.chain.len() <= MAX_HOPS + 1);
            // Every hop between the client and the peer is trusted.
            prop_assert!(r.chain[1..].iter().all(|h| t.contains(*h)));
            if !t.contains(peer) {
                prop_assert_eq!(&r.chain, &vec![canonical(peer)]);
            }
            let _ = r.header_value();
            let _ = forwarded_proto(lines.iter().map(|l| l.as_slice()));
            for l in &lines {
                let _ = parse_hop(l);
            }
        }

        /// Whatever a client writes left of what the trusted proxies
        /// append, the resolved client is the address the first trusted
        /// proxy saw, the peer stays last, and none of the client's
        /// entries goes upstream.
        #[test]
        fn a_client_chain_cannot_choose_the_client(
            spoofed in proptest::collection::vec(any_hop(), 0..8),
            client in untrusted_client(),
            hops in proptest::collection::vec(trusted_hop(), 0..4),
            peer in trusted_hop(),
            cuts in proptest::collection::vec(0usize..14, 0..4),
        ) {
            let t = trusted(&["10.0.0.0/8", "fd00::/8"]);
            let mut entries = spoofed.clone();
            entries.push(match client {
                IpAddr::V6(v6) => format!("[{v6}]:4711"),
                v4 => v4.to_string(),
            });
            entries.extend(hops.iter().map(|h| h.to_string()));
            let lines = lines_of(&entries, &cuts);
            let r = resolve(&t, peer, lines.iter().map(|l| l.as_bytes()));
            prop_assert_eq!(r.client, client);
            prop_assert!(!t.contains(r.client));
            let mut expected = vec![client];
            expected.extend(&hops);
            expected.push(peer);
            prop_assert_eq!(r.chain, expected);
        }

        /// From an untrusted peer, no header changes anything.
        #[test]
        fn an_untrusted_peer_is_the_client(
            spoofed in proptest::collection::vec(any_hop(), 0..8),
            peer in untrusted_client(),
        ) {
            let t = trusted(&["10.0.0.0/8", "fd00::/8"]);
            let line = spoofed.join(", ");
            let r = resolve(&t, peer, std::iter::once(line.as_bytes()));
            prop_assert_eq!(r.client, peer);
            prop_assert_eq!(r.chain, vec![peer]);
        }

        /// The header reader never panics, never asks for more than the
        /// bound, and what it accepts is exactly one header as ppp reads it.
        #[test]
        fn any_bytes_are_read_safely(
            bytes in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..300),
                proptest::collection::vec(any::<u8>(), 0..120)
                    .prop_map(|b| [&b"PROXY "[..], &b].concat()),
                proptest::collection::vec(any::<u8>(), 0..300)
                    .prop_map(|b| [&V2_SIGNATURE[..], &b].concat()),
            ],
        ) {
            let (result, read) = read_all(&bytes);
            prop_assert!(read <= V2_FIXED + V2_MAX_PAYLOAD);
            if result.is_ok() {
                let parsed = ppp::HeaderResult::parse(&bytes[..read]);
                let len = match parsed {
                    ppp::HeaderResult::V1(Ok(h)) => h.header.len(),
                    ppp::HeaderResult::V2(Ok(h)) => h.len(),
                    other => return Err(TestCaseError::fail(format!("{other:?}"))),
                };
                prop_assert_eq!(len, read);
            }
        }
    }
}
