//! Header names the gateway reads, sets or removes, as constants, and the
//! rewriting of headers between client and upstream.

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
    // Most messages carry none of them: one pass over the names present
    // is cheaper than hashing each of the nine (a name Connection lists
    // implies Connection itself is present).
    if !keep_upgrade && !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    // Names listed in Connection are hop-by-hop too.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(keep_upgrade && name == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP.iter() {
        if keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
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
}
