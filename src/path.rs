//! The one path a request has: normalization of the request target.
//!
//! Routing on one spelling of a path while the upstream serves another is
//! how gateways are walked around (`/public/../secret`, `/%61pp/x`,
//! `/app%2fx`, `//app/x`). So before anything looks at a path it goes
//! through [`normalize`], and the result is what the gateway routes on,
//! logs, shows to policies and forwards upstream:
//!
//! * percent-encoded unreserved characters (`ALPHA DIGIT - . _ ~`) are
//!   decoded; every other escape stays encoded, with upper-case hex, so
//!   that there is one spelling;
//! * runs of `/` are merged; `.` and `..` segments are removed (RFC 3986
//!   §5.2.4), keeping a trailing `/` where the last segment was one;
//! * a path that a backend could read another way is refused
//!   ([`InvalidPath`]): an encoded `/` or `\`, a raw `\`, a NUL or control
//!   byte raw or encoded, a segment that is `.` or `..` only once decoded,
//!   a `.`/`..` segment with a `;` parameter (Tomcat and Spring read
//!   `..;x` as `..`), `..` above the root, malformed percent-encoding.
//!
//! After this, a backend that fully percent-decodes the path and resolves
//! dot segments itself sees the same segments the gateway routed on: no
//! decoding can add a segment boundary or a dot segment (the property
//! tests below check exactly that).
//!
//! Raw non-ASCII bytes are kept as they came: route prefixes hold only
//! unreserved characters and `/` ([`is_route_prefix`]), so whether such a
//! byte arrives raw or encoded cannot change which route matches.

use std::borrow::Cow;

/// Why a path was refused. For logs and tests only: the client's error
/// says no more than "not allowed" (`ProxyError::InvalidPath`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPath {
    #[error("not an origin-form path (it does not start with '/')")]
    NotOriginForm,
    #[error("malformed percent-encoding")]
    Malformed,
    #[error("an encoded '/' or '\\'")]
    EncodedSeparator,
    #[error("a backslash")]
    Backslash,
    #[error("a NUL or control byte")]
    ControlByte,
    #[error("a '.' or '..' segment spelled with escapes")]
    EncodedDotSegment,
    #[error("a '.' or '..' segment with a ';' parameter")]
    DotSegmentParameter,
    #[error("'..' above the root")]
    AboveRoot,
}

/// The normal form of `path` (the path part of an origin-form or
/// absolute-form target), or why it has none.
///
/// A path already in normal form — nearly every real request — is
/// returned borrowed after one pass over its bytes, without allocating:
/// this runs on every request.
///
/// Public (not `pub(crate)`) because the fuzz target, a separate crate,
/// calls it on arbitrary input.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, InvalidPath> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(InvalidPath::NotOriginForm);
    }
    if is_normal(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    normalize_slow(bytes).map(Cow::Owned)
}

/// Whether `prefix` can be a route prefix: in normal form and made of
/// unreserved characters and `/` only. A reserved character would be a
/// bypass: with a route `/a:b/`, the path `/a%3Ab/x` stays encoded here,
/// misses that route, and is decoded to `/a:b/x` by the backend.
pub(crate) fn is_route_prefix(prefix: &str) -> bool {
    prefix.bytes().all(|c| c == b'/' || is_unreserved(c))
        && matches!(normalize(prefix), Ok(Cow::Borrowed(_)))
}

/// One pass: true when `normalize` would return `b` unchanged.
fn is_normal(b: &[u8]) -> bool {
    let n = b.len();
    let mut segment = 1;
    let mut i = 1;
    while i < n {
        // Most bytes need no attention: skip them with one table lookup.
        if PLAIN[usize::from(b[i])] {
            i += 1;
            continue;
        }
        match b[i] {
            b'/' => {
                if i == segment || is_dot_like(&b[segment..i]) {
                    return false;
                }
                segment = i + 1;
            }
            b'%' => match escape(b, i) {
                Some(v) if b[i + 1..i + 3] == hex_pair(v) && is_kept_escape(v) => {
                    i += 3;
                    continue;
                }
                _ => return false,
            },
            b'\\' => return false,
            c if is_control(c) => return false,
            _ => {}
        }
        i += 1;
    }
    !is_dot_like(&b[segment..])
}

/// Bytes [`is_normal`] can pass over: all but `/`, `%`, `\\` and controls.
const PLAIN: [bool; 256] = {
    let mut t = [true; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = !matches!(c as u8, b'/' | b'%' | b'\\' | 0..0x20 | 0x7F);
        c += 1;
    }
    t
};

fn normalize_slow(b: &[u8]) -> Result<String, InvalidPath> {
    // Decoding and dot removal only ever shorten the path.
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    out.push(b'/');
    let mut rest = &b[1..];
    loop {
        let (raw, more) = match rest.iter().position(|&c| c == b'/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        // `out` ends with '/' here: each segment is appended after it.
        let start = out.len();
        let escaped = decode_segment(raw, &mut out)?;
        let segment = &out[start..];
        if segment.is_empty() {
            // A run of '/' (merged) or the trailing '/' (kept).
        } else if is_dot_like(segment) {
            match (segment, escaped) {
                (b"." | b"..", true) => return Err(InvalidPath::EncodedDotSegment),
                (b".", false) => out.truncate(start),
                (b"..", false) => {
                    if start == 1 {
                        return Err(InvalidPath::AboveRoot);
                    }
                    let parent = out[..start - 1]
                        .iter()
                        .rposition(|&c| c == b'/')
                        .unwrap_or(0);
                    out.truncate(parent + 1);
                }
                _ => return Err(InvalidPath::DotSegmentParameter),
            }
        } else if more.is_some() {
            out.push(b'/');
        }
        match more {
            Some(m) => rest = m,
            None => break,
        }
    }
    // Only ASCII replaced escapes; other bytes were copied in order.
    String::from_utf8(out).map_err(|_| InvalidPath::Malformed)
}

/// Appends the normal form of one segment to `out`; true when it had an
/// escape.
fn decode_segment(raw: &[u8], out: &mut Vec<u8>) -> Result<bool, InvalidPath> {
    let mut escaped = false;
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'%' => {
                let v = escape(raw, i).ok_or(InvalidPath::Malformed)?;
                if v == b'/' || v == b'\\' {
                    return Err(InvalidPath::EncodedSeparator);
                }
                if is_control(v) {
                    return Err(InvalidPath::ControlByte);
                }
                if is_unreserved(v) {
                    out.push(v);
                } else {
                    out.push(b'%');
                    out.extend_from_slice(&hex_pair(v));
                }
                escaped = true;
                i += 3;
            }
            b'\\' => return Err(InvalidPath::Backslash),
            c if is_control(c) => return Err(InvalidPath::ControlByte),
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(escaped)
}

/// A segment that is `.` or `..`, alone or before a `;` parameter.
fn is_dot_like(segment: &[u8]) -> bool {
    let rest = match segment {
        [b'.', b'.', rest @ ..] | [b'.', rest @ ..] => rest,
        _ => return false,
    };
    rest.is_empty()
        || rest[0] == b';'
        || rest
            .get(..3)
            .is_some_and(|r| r.eq_ignore_ascii_case(b"%3B"))
}

/// The byte `%XX` at `b[i]` stands for, if `XX` is hex.
fn escape(b: &[u8], i: usize) -> Option<u8> {
    let hi = hex_value(*b.get(i + 1)?)?;
    let lo = hex_value(*b.get(i + 2)?)?;
    Some((hi << 4) | lo)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex_pair(v: u8) -> [u8; 2] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    [HEX[usize::from(v >> 4)], HEX[usize::from(v & 15)]]
}

/// RFC 3986 unreserved: decoding these changes nothing a server sees.
fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn is_control(c: u8) -> bool {
    c < 0x20 || c == 0x7F
}

/// An escape that stays in the normal form (in upper-case hex).
fn is_kept_escape(v: u8) -> bool {
    !is_unreserved(v) && !is_control(v) && v != b'/' && v != b'\\'
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(path: &str) -> String {
        normalize(path)
            .unwrap_or_else(|e| panic!("{path:?} refused: {e}"))
            .into_owned()
    }

    #[test]
    fn clean_paths_are_borrowed() {
        for path in [
            "/",
            "/a",
            "/a/",
            "/public/login",
            "/a.b/c..d/...",
            "/.well-known/x",
            "/a/%3A%C3%A9",
            "/caf\u{e9}/\"{}\"",
        ] {
            assert!(
                matches!(normalize(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path:?}"
            );
        }
    }

    #[test]
    fn dots_slashes_and_unreserved_escapes_are_resolved() {
        let cases = [
            ("/public/../secret", "/secret"),
            ("/public/x/../../secret", "/secret"),
            ("/a/./b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/..", "/"),
            ("//app/secret", "/app/secret"),
            ("/a///b//", "/a/b/"),
            ("/%61pp/secret", "/app/secret"),
            ("/%7e%2D%5f%2E%41", "/~-_.A"),
            ("/a/%2e%2e%2e", "/a/..."),
            ("/x/.%2Ex", "/x/..x"),
            ("/a/%3a%c3%a9", "/a/%3A%C3%A9"),
            ("/a/%3F", "/a/%3F"),
        ];
        for (input, expected) in cases {
            assert_eq!(ok(input), expected, "{input:?}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        use InvalidPath::*;
        let cases = [
            ("", NotOriginForm),
            ("*", NotOriginForm),
            ("example.com:443", NotOriginForm),
            ("/app%2fsecret", EncodedSeparator),
            ("/app%2Fsecret", EncodedSeparator),
            ("/public/..%2fsecret", EncodedSeparator),
            ("/a%5cb", EncodedSeparator),
            ("/a%5Cb", EncodedSeparator),
            ("/a\\b", Backslash),
            ("/public/%2e%2e/secret", EncodedDotSegment),
            ("/public/.%2E/secret", EncodedDotSegment),
            ("/public/%2e/secret", EncodedDotSegment),
            ("/public/..;/secret", DotSegmentParameter),
            ("/public/.;x/secret", DotSegmentParameter),
            ("/public/..%3b/secret", DotSegmentParameter),
            ("/a%00", ControlByte),
            ("/a%1f", ControlByte),
            ("/a%7F", ControlByte),
            ("/a\u{0}b", ControlByte),
            ("/a\tb", ControlByte),
            ("/a\u{7f}", ControlByte),
            ("/..", AboveRoot),
            ("/a/../..", AboveRoot),
            ("/a/../../b", AboveRoot),
            ("/%zz", Malformed),
            ("/a%", Malformed),
            ("/a%4", Malformed),
            ("/a%\u{e9}", Malformed),
        ];
        for (input, expected) in cases {
            assert_eq!(normalize(input), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn route_prefixes_must_be_plain_and_normal() {
        for good in ["/", "/app/", "/api", "/a.b/c-d_e~f/"] {
            assert!(is_route_prefix(good), "{good:?}");
        }
        for bad in [
            "/app//",
            "/app/./",
            "/app/..",
            "/a/../b/",
            "/%61pp/",
            "/a:b/",
            "/a%3A/",
            "/caf\u{e9}/",
        ] {
            assert!(!is_route_prefix(bad), "{bad:?}");
        }
    }

    // -- properties ------------------------------------------------------

    /// Full percent-decoding, as a backend does (malformed escapes kept).
    fn decode(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match (b[i], escape(b, i)) {
                (b'%', Some(v)) => {
                    out.push(v);
                    i += 3;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        out
    }

    /// What a backend serves after decoding: runs of '/' merged, dot
    /// segments resolved (clamped at the root, as most servers do).
    fn resolve(b: &[u8]) -> Vec<u8> {
        let mut kept: Vec<&[u8]> = Vec::new();
        let segments: Vec<&[u8]> = b[1..].split(|&c| c == b'/').collect();
        let mut trailing = false;
        for (i, s) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            match *s {
                b"" | b"." => trailing = last,
                b".." => {
                    kept.pop();
                    trailing = last;
                }
                s => {
                    kept.push(s);
                    trailing = false;
                }
            }
        }
        let mut out = b"/".to_vec();
        out.extend(kept.join(&b'/'));
        if trailing && !kept.is_empty() {
            out.push(b'/');
        }
        out
    }

    /// Pieces that can appear in an accepted path.
    const BENIGN: &[&str] = &[
        "a", "B", "app", "/", "/", "//", "/a/", ".", "..", "./", "../", "%2e", "%2E", "%41", "%61",
        "%7e", "%7E", "%3a", "%3A", "%3b", ";", "%c3%a9", "\u{e9}", "~", "-", "_", "%25", "%20",
    ];
    /// Pieces that never can.
    const HOSTILE: &[&str] = &[
        "%2f", "%2F", "%5c", "%5C", "\\", "%00", "%0a", "%7f", "\u{1}", "%", "%z", "%4",
    ];

    fn path_of(pieces: Vec<&'static str>) -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(pieces), 0..14)
            .prop_map(|pieces| format!("/{}", pieces.concat()))
    }

    /// Paths built from the pieces attacks are made of: mostly accepted
    /// ones (so the properties of the normal form get exercised), and
    /// some with hostile pieces mixed in.
    fn any_path() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => path_of(BENIGN.to_vec()),
            1 => path_of([BENIGN, HOSTILE].concat()),
        ]
    }

    fn config() -> ProptestConfig {
        ProptestConfig {
            // About 70% of these are accepted; CI-fast (well under 2 s).
            cases: 1000,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn normal_form_is_stable_and_borrowed(path in any_path()) {
            if let Ok(once) = normalize(&path) {
                prop_assert!(matches!(normalize(&once), Ok(Cow::Borrowed(_))), "{once:?}");
            }
        }

        #[test]
        fn normal_form_has_one_spelling(path in any_path()) {
            if let Ok(out) = normalize(&path) {
                let b = out.as_bytes();
                prop_assert_eq!(b[0], b'/');
                prop_assert!(!out.contains("//"), "{out:?}");
                prop_assert!(!out.contains('\\'), "{out:?}");
                prop_assert!(!b.iter().any(|&c| is_control(c)), "{out:?}");
                for segment in out[1..].split('/') {
                    prop_assert!(!is_dot_like(segment.as_bytes()), "{out:?}");
                }
                for (i, _) in out.match_indices('%') {
                    let hex = &b[i + 1..i + 3];
                    prop_assert!(hex.iter().all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()), "{out:?}");
                    let v = escape(b, i).unwrap();
                    prop_assert!(is_kept_escape(v), "{out:?}");
                }
            }
        }

        /// The key property: a backend that decodes, then resolves dot
        /// segments, sees the path we routed on, segment for segment.
        #[test]
        fn decoding_adds_no_segment_or_dot(path in any_path()) {
            if let Ok(out) = normalize(&path) {
                let decoded = decode(out.as_bytes());
                prop_assert_eq!(resolve(&decoded), decoded.clone(), "{:?} -> {:?}", path, out);
                prop_assert_eq!(
                    decoded.split(|&c| c == b'/').count(),
                    out.split('/').count()
                );
                for segment in decoded[1..].split(|&c| c == b'/') {
                    prop_assert!(!is_dot_like(segment));
                }
                prop_assert_eq!(resolve(&decode(path.as_bytes())), decoded);
            }
        }

        #[test]
        fn separators_and_controls_are_always_refused(path in any_path()) {
            let lower = path.to_ascii_lowercase();
            let forbidden = ["%2f", "%5c", "\\", "%00", "%0a", "%7f", "\u{1}"];
            if forbidden.iter().any(|f| lower.contains(f)) {
                prop_assert!(normalize(&path).is_err(), "{path:?} accepted");
            }
        }

        #[test]
        fn arbitrary_input_never_panics(path in "/\\PC{0,40}", ascii in "/[\\x00-\\x7F]{0,40}") {
            let _ = normalize(&path);
            let _ = normalize(&ascii);
        }
    }
}
