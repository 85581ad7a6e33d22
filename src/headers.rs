//! Header names the gateway reads, sets or removes, as constants, and the
//! rewriting of headers between client and upstream.

use http::Uri;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const SG_LOGIN: HeaderName = HeaderName::from_static("x-sessiongate-login");
pub const SG_ATTRIBUTES: HeaderName = HeaderName::from_static("x-sessiongate-attributes");
pub const SG_LOGOUT: HeaderName = HeaderName::from_static("x-sessiongate-logout");
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
pub const SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
pub const SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");

/// The prefix of the headers the gateway and its upstreams talk through.
pub const SG_PREFIX: &str = "x-sessiongate-";

/// Headers some frameworks (Symfony, IIS, old Zend) read as the request's
/// real path: a client could route past the gateway's path checks with
/// them, so they never go upstream, in any spelling.
pub const PATH_OVERRIDES: [&str; 2] = ["x-original-url", "x-rewrite-url"];

/// The forwarding headers the gateway sets itself: their look-alikes
/// (`x_forwarded_for`) are the client's, never the gateway's.
pub const FORWARDING: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "x-request-id",
];

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
/// `HTTP2-Settings` belongs to an `h2c` upgrade (RFC 7540 §3.2.1), which
/// the gateway never forwards.
static HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HTTP2_SETTINGS,
];

/// Whether a header name is one the gateway owns, so it cannot be used as
/// an identity header.
pub fn is_reserved(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
        || [
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
            X_REQUEST_ID,
            SG_LOGIN,
            SG_ATTRIBUTES,
            SG_LOGOUT,
            header::HOST,
            header::COOKIE,
            header::SET_COOKIE,
            header::AUTHORIZATION,
            header::CONTENT_LENGTH,
            header::CONTENT_TYPE,
        ]
        .contains(name)
}

/// Removes hop-by-hop headers, including those a `Connection` header
/// names. With `keep_upgrade`, `Connection: upgrade` and `Upgrade` stay so
/// that a WebSocket handshake reaches the other side.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names present marks which hop-by-hop ones are
    // there: most messages carry one or none (an origin's `Connection:
    // keep-alive`), and comparing names is cheaper than hashing each of
    // the ten for a removal.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 && !keep_upgrade {
        return;
    }
    // Names listed in Connection are hop-by-hop too. The usual tokens
    // (`keep-alive`, `upgrade`, ...) name headers removed below anyway,
    // so a listed name is only collected (and allocated) otherwise.
    let mut listed: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.is_empty()
                || HOP_BY_HOP
                    .iter()
                    .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(token))
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                listed.push(name);
            }
        }
    }
    for name in listed {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) == 0
            || keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE)
        {
            continue;
        }
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Removes every header named in `names`, after one pass over the names
/// present: most messages carry none of them, and comparing names is
/// cheaper than hashing each one for a lookup.
pub fn remove_all(headers: &mut HeaderMap, names: &[&HeaderName]) {
    if !contains_any(headers, names) {
        return;
    }
    for name in names {
        headers.remove(*name);
    }
}

/// Whether any of `names` is present, by one pass over the names present.
pub fn contains_any(headers: &HeaderMap, names: &[&HeaderName]) -> bool {
    headers.keys().any(|k| names.contains(&k))
}

/// The `Sec-WebSocket-Key` of a WebSocket handshake request, the only
/// upgrade the gateway forwards: `Connection: upgrade` and an `Upgrade`
/// naming `websocket` alone. Anything else (`h2c`, a list of protocols)
/// is `None`, and the request goes on as an ordinary one with its
/// `Upgrade` removed: bridging an `h2c` upgrade would hand the client a
/// tunnel to the upstream that no later request in it is checked on.
pub fn websocket_key(headers: &HeaderMap) -> Option<&HeaderValue> {
    let mut upgrade = headers.get_all(header::UPGRADE).iter();
    let only = upgrade.next()?;
    if upgrade.next().is_some()
        || !only
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"websocket")
    {
        return None;
    }
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    let mut keys = headers.get_all(SEC_WEBSOCKET_KEY).iter();
    let key = keys.next()?;
    (asks && keys.next().is_none()).then_some(key)
}

/// The `Sec-WebSocket-Accept` an upstream must answer `key` with
/// (RFC 6455 §4.2.2): base64 of the SHA-1 of the key and a fixed GUID.
pub fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Whether an upstream's 101 completes the WebSocket handshake whose
/// request carried `key`: `Upgrade: websocket` and the matching
/// `Sec-WebSocket-Accept`, each exactly once. Anything else is not a
/// WebSocket the client asked for, so it is never bridged.
pub fn is_websocket_switch(headers: &HeaderMap, key: &HeaderValue) -> bool {
    let single = |name: HeaderName| {
        let mut values = headers.get_all(name).iter();
        values.next().filter(|_| values.next().is_none())
    };
    let upgrade = single(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
    upgrade
        && single(SEC_WEBSOCKET_ACCEPT).is_some_and(|v| {
            v.as_bytes().trim_ascii() == websocket_accept(key.as_bytes()).as_bytes()
        })
}

/// Whether header name `name` reads as `protected` once ASCII case is
/// ignored and `_` is taken for `-`, as CGI, WSGI, PHP and Rack do when
/// they turn headers into `HTTP_X_USER_ID`.
pub fn same_header_name(name: &str, protected: &str) -> bool {
    name.len() == protected.len()
        && name
            .bytes()
            .zip(protected.bytes())
            .all(|(a, b)| fold(a) == fold(b))
}

fn fold(b: u8) -> u8 {
    match b {
        b'_' => b'-',
        b => b.to_ascii_lowercase(),
    }
}

/// Whether a request header name belongs to the gateway once `_` reads
/// as `-`: one of the `identity` headers, of [`FORWARDING`], or in the
/// `x-sessiongate-*` namespace.
pub fn is_lookalike(name: &str, identity: &[&str]) -> bool {
    identity
        .iter()
        .chain(FORWARDING.iter())
        .any(|p| same_header_name(name, p))
        || name
            .get(..SG_PREFIX.len())
            .is_some_and(|head| same_header_name(head, SG_PREFIX))
}

/// Whether a header name can only be a look-alike or a path override,
/// decided without any comparison for the names most requests carry.
fn is_suspect(name: &str) -> bool {
    name.contains('_') || name.starts_with(SG_PREFIX) || PATH_OVERRIDES.contains(&name)
}

/// Removes the request headers a client may not send upstream by name:
/// `exact` (identity headers and the like), everything in the
/// `x-sessiongate-*` namespace, the path overrides in any spelling, and
/// the look-alikes ([`is_lookalike`]) of the `identity` headers and of
/// the forwarding headers. With `reject`, a look-alike is not removed but
/// returned instead, for the caller to refuse the request; exact names
/// are always removed silently (a client's `x-forwarded-for` from a proxy
/// in front is normal, an `x_forwarded_for` is not).
///
/// One pass over the names present decides whether there is anything to
/// do; most requests carry none of these.
pub fn scrub_request_names(
    headers: &mut HeaderMap,
    exact: &[&HeaderName],
    identity: &[&str],
    reject: bool,
) -> Result<(), HeaderName> {
    if !headers
        .keys()
        .any(|k| exact.contains(&k) || is_suspect(k.as_str()))
    {
        return Ok(());
    }
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let text = name.as_str();
        if exact.contains(&name) {
            doomed.push(name.clone());
            continue;
        }
        if !is_suspect(text) {
            continue;
        }
        if PATH_OVERRIDES.iter().any(|p| same_header_name(text, p)) {
            doomed.push(name.clone());
        } else if text.starts_with(SG_PREFIX) {
            // The gateway's own namespace: never the client's to send.
            doomed.push(name.clone());
        } else if is_lookalike(text, identity) {
            if reject {
                return Err(name.clone());
            }
            doomed.push(name.clone());
        }
    }
    for name in doomed {
        headers.remove(name);
    }
    Ok(())
}

/// What [`rewrite_request`] needs to know: the gateway's config and the
/// request's own facts.
pub struct RequestRewrite<'a> {
    pub user_header: &'a HeaderName,
    pub session_header: &'a HeaderName,
    /// `session.lookalike_headers = "reject"`.
    pub reject_lookalikes: bool,
    /// The session cookie to keep from the upstream, with our tokens in
    /// `Authorization`; `None` with `session.forward_token`.
    pub cookie_name: Option<&'a str>,
    /// The request is a WebSocket handshake ([`websocket_key`]): its
    /// `Upgrade` stays.
    pub upgrade: bool,
    pub uri: &'a Uri,
    /// The client's address, for `x-forwarded-for`.
    pub peer_ip: &'a HeaderValue,
    /// The client connection is TLS: `x-forwarded-proto: https`.
    pub https: bool,
    pub request_id: &'a HeaderValue,
}

/// Rewrites a client's request headers for the upstream: hop-by-hop
/// headers go; whatever the client claims about identity, forwarding or
/// the path goes, under its own name or one a CGI-style server reads the
/// same; our tokens go (unless forwarded by config; `carries_our_token`
/// says which `Authorization` values hold one); the forwarding headers
/// and the request id are set. The identity headers are the caller's to
/// set afterwards.
///
/// Fails, with the offending name, only when `reject_lookalikes` and a
/// look-alike of a gateway-owned header is present.
pub fn rewrite_request(
    headers: &mut HeaderMap,
    rewrite: &RequestRewrite<'_>,
    carries_our_token: impl Fn(&HeaderValue) -> bool,
) -> Result<(), HeaderName> {
    strip_hop_by_hop(headers, rewrite.upgrade);
    // x-forwarded-* and x-request-id are overwritten below.
    scrub_request_names(
        headers,
        &[
            rewrite.user_header,
            rewrite.session_header,
            &FORWARDED,
            &X_REAL_IP,
        ],
        &[
            rewrite.user_header.as_str(),
            rewrite.session_header.as_str(),
        ],
        rewrite.reject_lookalikes,
    )?;
    if let Some(cookie_name) = rewrite.cookie_name {
        remove_cookie(headers, cookie_name);
        remove_authorization_if(headers, carries_our_token);
    }
    let host = headers.get(header::HOST).cloned().or_else(|| {
        rewrite
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host.clone());
        // HTTP/2 requests carry the host in :authority only.
        headers.entry(header::HOST).or_insert(host);
    } else {
        headers.remove(X_FORWARDED_HOST);
    }
    headers.insert(X_FORWARDED_FOR, rewrite.peer_ip.clone());
    let proto = if rewrite.https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    headers.insert(X_REQUEST_ID, rewrite.request_id.clone());
    Ok(())
}

/// Each `name=value` pair of the request's `Cookie` headers, trimmed.
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&[u8], &[u8])> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            Some((pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii()))
        })
}

/// Every value of cookie `name` among the request's `Cookie` headers, in
/// order (a browser sends several cookies of one name when they differ in
/// path or domain, the most specific path first). Values that are not
/// text are skipped.
pub fn cookie_values<'a>(headers: &'a HeaderMap, name: &str) -> impl Iterator<Item = &'a str> {
    cookie_pairs(headers)
        .filter(move |(k, _)| *k == name.as_bytes())
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .map(|v| v.trim_matches('"'))
}

/// The first value of cookie `name` among the request's `Cookie` headers.
pub fn find_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    cookie_values(headers, name).next()
}

/// Removes every cookie `name` from the `Cookie` headers, keeping the
/// others byte for byte. Several `Cookie` fields (HTTP/2 sends one per
/// cookie) are joined with `; ` on the way, as RFC 9113 §8.2.3 asks of a
/// hop to HTTP/1.1; a single field without the cookie is left as it is.
pub fn remove_cookie(headers: &mut HeaderMap, name: &str) {
    let mut fields = headers.get_all(header::COOKIE).iter();
    match (fields.next(), fields.next()) {
        (None, _) => return,
        (Some(_), None) if cookie_pairs(headers).all(|(k, _)| k != name.as_bytes()) => return,
        _ => {}
    }
    let mut kept: Vec<u8> = Vec::new();
    let pairs = headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .map(<[u8]>::trim_ascii)
        .filter(|pair| {
            !pair.is_empty()
                && match pair.iter().position(|&b| b == b'=') {
                    Some(eq) => pair[..eq].trim_ascii() != name.as_bytes(),
                    None => true,
                }
        });
    for pair in pairs {
        if !kept.is_empty() {
            kept.extend_from_slice(b"; ");
        }
        kept.extend_from_slice(pair);
    }
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_bytes(&kept)
    {
        headers.insert(header::COOKIE, v);
    }
}

/// The cookie name a `Set-Cookie` value sets.
pub fn set_cookie_name(value: &HeaderValue) -> &[u8] {
    let bytes = value.as_bytes();
    let end = bytes
        .iter()
        .position(|&b| b == b'=' || b == b';')
        .unwrap_or(bytes.len());
    bytes[..end].trim_ascii()
}

/// Removes each `Set-Cookie` of a response that sets cookie `name` and
/// keeps the others: only the gateway sets its own session cookie, so an
/// upstream (or anything injected into its responses) cannot plant one.
pub fn remove_set_cookie(headers: &mut HeaderMap, name: &str) {
    if !headers
        .get_all(header::SET_COOKIE)
        .iter()
        .any(|v| set_cookie_name(v) == name.as_bytes())
    {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| set_cookie_name(v) != name.as_bytes())
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in kept {
        headers.append(header::SET_COOKIE, v);
    }
}

/// The credentials of an `Authorization: Bearer` value.
pub fn bearer_of(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The token of the first `Authorization: Bearer` header, if there is one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    bearer_of(headers.get(header::AUTHORIZATION)?)
}

/// The credentials of every `Authorization: Bearer` header, in order.
pub fn bearer_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(bearer_of)
}

/// The words of an `Authorization` value (split at spaces, tabs and
/// commas), where a token could hide whatever the scheme.
pub fn authorization_words(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or("")
        .split([' ', '\t', ','])
        .filter(|w| !w.is_empty())
}

/// Removes each `Authorization` header for which `carries` says yes and
/// keeps the rest, in order.
pub fn remove_authorization_if(headers: &mut HeaderMap, carries: impl Fn(&HeaderValue) -> bool) {
    if !headers.get_all(header::AUTHORIZATION).iter().any(&carries) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter(|v| !carries(v))
        .cloned()
        .collect();
    headers.remove(header::AUTHORIZATION);
    for v in kept {
        headers.append(header::AUTHORIZATION, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_go_including_those_connection_names() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn remove_all_removes_every_listed_name_and_nothing_else() {
        let mut h = map(&[("x-a", "1"), ("x-b", "2"), ("x-b", "3"), ("x-c", "4")]);
        let (a, b) = (
            HeaderName::from_static("x-a"),
            HeaderName::from_static("x-b"),
        );
        let absent = HeaderName::from_static("x-z");
        remove_all(&mut h, &[&absent]);
        assert_eq!(h.len(), 4);
        remove_all(&mut h, &[&b, &absent, &a]);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-c"));
    }

    #[test]
    fn upgrade_headers_stay_for_a_handshake() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        assert!(websocket_key(&h).is_some());
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn cookies_are_found_and_removed_one_by_one() {
        let mut h = map(&[("cookie", "a=1; sg_session=tok; b=2"), ("cookie", "c=3")]);
        assert_eq!(find_cookie(&h, "sg_session"), Some("tok"));
        assert_eq!(find_cookie(&h, "c"), Some("3"));
        remove_cookie(&mut h, "sg_session");
        assert_eq!(find_cookie(&h, "sg_session"), None);
        assert_eq!(h.get("cookie").unwrap(), "a=1; b=2; c=3");
        let mut only = map(&[("cookie", "sg_session=tok")]);
        remove_cookie(&mut only, "sg_session");
        assert!(!only.contains_key("cookie"));
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        assert_eq!(
            bearer_token(&map(&[("authorization", "Bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            bearer_token(&map(&[("authorization", "bearer abc")])),
            Some("abc")
        );
        assert_eq!(bearer_token(&map(&[("authorization", "Basic abc")])), None);
    }

    #[test]
    fn only_a_lone_websocket_upgrade_with_a_key_is_a_handshake() {
        let key = ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        let conn = ("connection", "keep-alive, Upgrade");
        assert!(websocket_key(&map(&[conn, ("upgrade", "WebSocket"), key])).is_some());
        for upgrade in ["h2c", "websocket, h2c", "h2c, websocket", ""] {
            assert!(
                websocket_key(&map(&[conn, ("upgrade", upgrade), key])).is_none(),
                "{upgrade}"
            );
        }
        let two = map(&[conn, ("upgrade", "websocket"), ("upgrade", "h2c"), key]);
        assert!(websocket_key(&two).is_none());
        assert!(websocket_key(&map(&[conn, ("upgrade", "websocket")])).is_none());
        assert!(websocket_key(&map(&[("upgrade", "websocket"), key])).is_none());
    }

    #[test]
    fn h2c_upgrade_headers_never_survive() {
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        // Not named in Connection: removed all the same.
        let mut h = map(&[("http2-settings", "AAMA"), ("x-kept", "1")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn the_websocket_accept_is_rfc_6455s() {
        // The example of RFC 6455 §1.3.
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
        let ok = map(&[
            ("upgrade", "websocket"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        ]);
        assert!(is_websocket_switch(&ok, &key));
        let wrong = map(&[
            ("upgrade", "websocket"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOx="),
        ]);
        assert!(!is_websocket_switch(&wrong, &key));
        let h2c = map(&[
            ("upgrade", "h2c"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        ]);
        assert!(!is_websocket_switch(&h2c, &key));
        assert!(!is_websocket_switch(
            &map(&[("upgrade", "websocket")]),
            &key
        ));
    }

    #[test]
    fn set_cookies_for_the_session_cookie_are_dropped() {
        let mut h = map(&[
            ("set-cookie", "sg_session=planted; Path=/app"),
            ("set-cookie", "theme=dark"),
            ("set-cookie", " sg_session =x"),
            ("set-cookie", "sg_session2=kept"),
        ]);
        remove_set_cookie(&mut h, "sg_session");
        let left: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(left, ["theme=dark", "sg_session2=kept"]);
    }

    #[test]
    fn authorization_headers_are_removed_one_by_one() {
        let mut h = map(&[
            ("authorization", "Basic a"),
            ("authorization", "Bearer ours"),
            ("authorization", "Basic b"),
        ]);
        remove_authorization_if(&mut h, |v| v.as_bytes().ends_with(b"ours"));
        let left: Vec<_> = h.get_all("authorization").iter().collect();
        assert_eq!(left, ["Basic a", "Basic b"]);
        let value = HeaderValue::from_static("Basic x,Bearer  t");
        let words: Vec<_> = authorization_words(&value).collect();
        assert_eq!(words, ["Basic", "x", "Bearer", "t"]);
    }
}

/// Property tests: the parsers and the rewrite on generated input, fast
/// enough for every CI run (a few hundred cases each).
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const SESSION: &str = "sg_session";

    fn config() -> ProptestConfig {
        ProptestConfig::with_cases(256)
    }

    /// Cookie names: ours, near misses of ours, and others.
    fn cookie_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(SESSION.to_string()),
            Just("SG_SESSION".to_string()),
            Just("sg_session2".to_string()),
            Just("sg-session".to_string()),
            "[A-Za-z0-9_.-]{1,10}",
        ]
    }

    /// Cookie values: no `;`, which ends a pair.
    fn cookie_value() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_=.\"/+-]{0,16}"
    }

    /// Pairs, and how they are laid out in `Cookie` fields (1 to 3, with
    /// odd but legal spacing).
    fn cookie_fields() -> impl Strategy<Value = (Vec<(String, String)>, Vec<String>)> {
        (
            prop::collection::vec((cookie_name(), cookie_value()), 0..8),
            1usize..4,
            prop::collection::vec("[ \t]{0,2}", 16),
        )
            .prop_map(|(pairs, fields, spaces)| {
                let mut out = vec![String::new(); fields];
                for (i, (k, v)) in pairs.iter().enumerate() {
                    let field = &mut out[i % fields];
                    if !field.is_empty() {
                        field.push(';');
                        field.push_str(&spaces[i % spaces.len()]);
                    }
                    let around_eq = &spaces[(i + 7) % spaces.len()];
                    field.push_str(&format!("{k}{around_eq}={around_eq}{v}"));
                }
                // The pairs in the order the fields list them.
                let mut ordered: Vec<(usize, (String, String))> =
                    pairs.into_iter().enumerate().collect();
                ordered.sort_by_key(|(i, _)| (i % fields, *i));
                let pairs = ordered.into_iter().map(|(_, p)| p).collect();
                (pairs, out.into_iter().filter(|f| !f.is_empty()).collect())
            })
    }

    fn with_cookies(fields: &[String]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for f in fields {
            h.append(header::COOKIE, HeaderValue::from_str(f).unwrap());
        }
        h
    }

    /// Every way to spell `name` that a CGI-style server reads as it:
    /// any case, and `_` for any `-`.
    fn spelling_of(name: &'static str) -> impl Strategy<Value = String> {
        prop::collection::vec((any::<bool>(), any::<bool>()), name.len()).prop_map(move |flips| {
            name.bytes()
                .zip(flips)
                .map(|(b, (upper, underscore))| match b {
                    b'-' if underscore => '_',
                    b if upper => b.to_ascii_uppercase() as char,
                    b => b as char,
                })
                .collect()
        })
    }

    /// Names the gateway owns, in their own spelling.
    const OWNED: [&str; 10] = [
        "x-user-id",
        "x-session-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "x-request-id",
        "x-sessiongate-login",
        "x-sessiongate-attributes",
        "x-sessiongate-anything",
    ];

    fn owned_spelling() -> impl Strategy<Value = String> {
        prop::sample::select(OWNED.to_vec()).prop_flat_map(spelling_of)
    }

    fn normalized(name: &str) -> String {
        name.to_ascii_lowercase().replace('_', "-")
    }

    fn is_owned(name: &str) -> bool {
        let n = normalized(name);
        OWNED[..7].contains(&n.as_str()) || n.starts_with(SG_PREFIX)
    }

    fn is_override(name: &str) -> bool {
        PATH_OVERRIDES.contains(&normalized(name).as_str())
    }

    /// Header names a request may carry: owned ones in any spelling, path
    /// overrides, hop-by-hop ones, and unrelated ones (some with `_`).
    fn request_name() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => owned_spelling(),
            1 => prop::sample::select(PATH_OVERRIDES.to_vec()).prop_flat_map(spelling_of),
            1 => prop::sample::select(vec!["upgrade", "http2-settings", "te", "keep-alive"])
                .prop_map(str::to_string),
            1 => prop::sample::select(vec!["cookie", "authorization", "accept", "host"])
                .prop_map(str::to_string),
            4 => "[a-z][a-z0-9_-]{0,14}",
        ]
    }

    /// A token-shaped value (ours, for the rewrite's predicate), or not.
    fn request_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[ -~]{0,20}",
            "[A-Za-z0-9_-]{64}".prop_map(|t| format!("Bearer {t}")),
            "[A-Za-z0-9_-]{64}".prop_map(|t| format!("{SESSION}={t}; a=1")),
        ]
    }

    fn is_ours(v: &HeaderValue) -> bool {
        authorization_words(v).any(|w| w.len() == 64)
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn cookie_parsing_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                let mut h = HeaderMap::new();
                h.append(header::COOKIE, v.clone());
                h.append(header::COOKIE, v);
                let _ = cookie_values(&h, SESSION).count();
                let _ = find_cookie(&h, SESSION);
                remove_cookie(&mut h, SESSION);
                prop_assert_eq!(cookie_values(&h, SESSION).count(), 0);
            }
        }

        #[test]
        fn cookies_are_found_in_order((pairs, fields) in cookie_fields()) {
            let h = with_cookies(&fields);
            let want: Vec<&str> = pairs
                .iter()
                .filter(|(k, _)| k == SESSION)
                .map(|(_, v)| v.trim_matches('"'))
                .collect();
            let got: Vec<&str> = cookie_values(&h, SESSION).collect();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(find_cookie(&h, SESSION), want.first().copied());
        }

        #[test]
        fn removing_the_session_cookie_keeps_every_other((pairs, fields) in cookie_fields()) {
            let mut h = with_cookies(&fields);
            remove_cookie(&mut h, SESSION);
            prop_assert_eq!(cookie_values(&h, SESSION).count(), 0);
            prop_assert!(h.get_all(header::COOKIE).iter().count() <= 1);
            let left: Vec<(String, String)> = cookie_pairs(&h)
                .map(|(k, v)| {
                    (
                        String::from_utf8(k.to_vec()).unwrap(),
                        String::from_utf8(v.to_vec()).unwrap(),
                    )
                })
                .collect();
            let kept: Vec<(String, String)> =
                pairs.into_iter().filter(|(k, _)| k != SESSION).collect();
            prop_assert_eq!(left, kept);
        }

        #[test]
        fn set_cookie_removal_is_exact(
            cookies in prop::collection::vec((cookie_name(), cookie_value()), 0..6)
        ) {
            let mut h = HeaderMap::new();
            for (k, v) in &cookies {
                h.append(header::SET_COOKIE, HeaderValue::from_str(&format!("{k}={v}; Path=/")).unwrap());
            }
            remove_set_cookie(&mut h, SESSION);
            let left: Vec<&[u8]> = h.get_all(header::SET_COOKIE).iter().map(set_cookie_name).collect();
            let want: Vec<&[u8]> = cookies
                .iter()
                .filter(|(k, _)| k != SESSION)
                .map(|(k, _)| k.as_bytes())
                .collect();
            prop_assert_eq!(left, want);
        }

        #[test]
        fn bearer_parsing_never_panics_and_reads_any_case(
            bytes in prop::collection::vec(any::<u8>(), 0..80),
            scheme in "[bB][eE][aA][rR][eE][rR]",
            token in "[A-Za-z0-9_-]{1,64}",
            pad in "[ ]{0,3}",
        ) {
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                let _ = bearer_of(&v);
                let _ = authorization_words(&v).count();
            }
            let v = HeaderValue::from_str(&format!("{scheme} {pad}{token}{pad}")).unwrap();
            prop_assert_eq!(bearer_of(&v), Some(token.as_str()));
            let basic = HeaderValue::from_str(&format!("Basic {token}")).unwrap();
            prop_assert_eq!(bearer_of(&basic), None);
        }

        #[test]
        fn every_spelling_of_an_owned_name_is_a_lookalike(name in owned_spelling()) {
            prop_assert!(is_lookalike(&name, &["x-user-id", "x-session-id"]), "{}", name);
            let header = HeaderName::from_bytes(name.as_bytes()).unwrap();
            let identity: [&str; 2] = ["x-user-id", "x-session-id"];
            let exact = [&HeaderName::from_static("x-user-id"), &HeaderName::from_static("x-session-id")];
            let mut h = HeaderMap::new();
            h.insert(header.clone(), HeaderValue::from_static("admin"));
            let refused = scrub_request_names(&mut h.clone(), &exact, &identity, true);
            if name.contains('_') {
                prop_assert_eq!(refused, Err(header));
            } else {
                prop_assert!(refused.is_ok());
            }
            // Removed, whatever the spelling, unless it is one the
            // gateway overwrites under its own name.
            scrub_request_names(&mut h, &exact, &identity, false).unwrap();
            let lower = name.to_ascii_lowercase();
            let overwritten = FORWARDING.contains(&lower.as_str());
            prop_assert_eq!(h.is_empty(), !overwritten, "{}", name);
        }

        #[test]
        fn unrelated_names_are_kept(name in "[a-z][a-z0-9_-]{0,20}") {
            prop_assume!(!is_owned(&name) && !is_override(&name));
            prop_assert!(!is_lookalike(&name, &["x-user-id", "x-session-id"]));
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_static("1"));
            scrub_request_names(&mut h, &[], &["x-user-id", "x-session-id"], true).unwrap();
            prop_assert_eq!(h.len(), 1);
        }

        #[test]
        fn after_the_rewrite_only_the_gateways_own_headers_remain(
            headers in prop::collection::vec((request_name(), request_value()), 0..12),
            reject in any::<bool>(),
            forward_token in any::<bool>(),
            https in any::<bool>(),
        ) {
            let mut h = HeaderMap::new();
            for (k, v) in &headers {
                h.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            let original = h.clone();
            let user = HeaderName::from_static("x-user-id");
            let session = HeaderName::from_static("x-session-id");
            let uri: Uri = "/app/x".parse().unwrap();
            let ip = HeaderValue::from_static("192.0.2.1");
            let id = HeaderValue::from_static("req-1");
            let rewrite = RequestRewrite {
                user_header: &user,
                session_header: &session,
                reject_lookalikes: reject,
                cookie_name: (!forward_token).then_some(SESSION),
                upgrade: false,
                uri: &uri,
                peer_ip: &ip,
                https,
                request_id: &id,
            };
            let lookalike = headers
                .iter()
                .any(|(k, _)| k.contains('_') && is_owned(k));
            match rewrite_request(&mut h, &rewrite, is_ours) {
                Err(name) => {
                    prop_assert!(reject && lookalike, "refused {}", name);
                    return Ok(());
                }
                Ok(()) => prop_assert!(!(reject && lookalike)),
            }
            let one = |name: &str| {
                let mut values = h.get_all(name).iter();
                (values.next().cloned(), values.next().is_none())
            };
            prop_assert_eq!(one("x-forwarded-for"), (Some(ip.clone()), true));
            let proto = HeaderValue::from_static(if https { "https" } else { "http" });
            prop_assert_eq!(one("x-forwarded-proto"), (Some(proto), true));
            prop_assert_eq!(one("x-request-id"), (Some(id.clone()), true));
            for (name, value) in h.iter() {
                let name = name.as_str();
                prop_assert!(!is_override(name), "{} survived", name);
                prop_assert!(
                    !HOP_BY_HOP.iter().any(|hop| hop == name),
                    "{} survived", name
                );
                if is_owned(name) {
                    prop_assert!(
                        ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"]
                            .contains(&name),
                        "{} survived", name
                    );
                }
                if !forward_token && name == "authorization" {
                    prop_assert!(!is_ours(value));
                }
            }
            if !forward_token {
                prop_assert_eq!(cookie_values(&h, SESSION).count(), 0);
            }
            // Unrelated headers are kept as they came, unless a
            // Connection header named them.
            if !original.contains_key(header::CONNECTION) {
                for (name, value) in original.iter() {
                    let n = name.as_str();
                    if is_owned(n) || is_override(n) || HOP_BY_HOP.contains(name)
                        || ["cookie", "authorization", "host"].contains(&n) {
                        continue;
                    }
                    prop_assert!(
                        h.get_all(name).iter().any(|v| v == value),
                        "{} lost", n
                    );
                }
            }
        }
    }
}
