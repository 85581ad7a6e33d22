//! The request header rewrite (`headers::rewrite_request`, what the proxy
//! does to a client's headers) on arbitrary header maps: each input line
//! `name:value` that is a valid field becomes one header; the first byte
//! picks the options. Never a panic, and nothing the gateway owns
//! survives: no hop-by-hop header, no identity header or look-alike of
//! one, nothing in `x-sessiongate-*`, no path override, no session cookie,
//! none of our tokens; the forwarding headers are the gateway's.
#![no_main]

use http::header::{AUTHORIZATION, CONNECTION, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use sessiongate::headers::{
    FORWARDED, HTTP2_SETTINGS, KEEP_ALIVE, PATH_OVERRIDES, PROXY_CONNECTION, RequestRewrite,
    SG_PREFIX, X_FORWARDED_FOR, X_REAL_IP, X_REQUEST_ID, bearer_of, find_cookie, is_lookalike,
    rewrite_request, same_header_name,
};
use sessiongate::token::looks_like_token;

const USER: HeaderName = HeaderName::from_static("x-user-id");
const SESSION: HeaderName = HeaderName::from_static("x-session-id");

fn carries_our_token(value: &HeaderValue) -> bool {
    bearer_of(value).is_some_and(looks_like_token)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let upgrade = flags & 1 == 1;
    let reject = flags & 2 == 2;
    let forward_token = flags & 4 == 4;
    let uri: Uri = if flags & 8 == 8 {
        Uri::from_static("http://example.test/x")
    } else {
        Uri::from_static("/x")
    };
    let peer = HeaderValue::from_static("192.0.2.1");
    let request_id = HeaderValue::from_static("fuzz-request");
    let rewrite = RequestRewrite {
        user_header: &USER,
        session_header: &SESSION,
        reject_lookalikes: reject,
        cookie_name: (!forward_token).then_some("sg_session"),
        upgrade,
        uri: &uri,
        peer_ip: &peer,
        request_id: &request_id,
    };
    let identity = ["x-user-id", "x-session-id"];
    if let Err(name) = rewrite_request(&mut headers, &rewrite, carries_our_token) {
        assert!(reject, "only reject mode refuses: {name}");
        assert!(is_lookalike(name.as_str(), &identity), "{name} refused");
        return;
    }

    for name in [
        TRANSFER_ENCODING,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        HTTP2_SETTINGS,
    ] {
        assert!(!headers.contains_key(&name), "{name} kept: {headers:?}");
    }
    if !upgrade {
        assert!(!headers.contains_key(UPGRADE), "{headers:?}");
    }
    for name in [&USER, &SESSION, &FORWARDED, &X_REAL_IP] {
        assert!(!headers.contains_key(name), "{name} kept: {headers:?}");
    }
    for name in headers.keys() {
        let text = name.as_str();
        assert!(!text.starts_with(SG_PREFIX), "{text} kept");
        assert!(
            !PATH_OVERRIDES.iter().any(|p| same_header_name(text, p)),
            "{text} kept"
        );
        assert!(
            !(text.contains('_') && is_lookalike(text, &identity)),
            "look-alike {text} kept"
        );
    }
    if !upgrade {
        assert!(!headers.contains_key(CONNECTION), "{headers:?}");
    }
    assert_eq!(
        headers.get_all(X_FORWARDED_FOR).iter().collect::<Vec<_>>(),
        [&peer]
    );
    assert_eq!(
        headers.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(),
        [&request_id]
    );
    if !forward_token {
        assert_eq!(find_cookie(&headers, "sg_session"), None, "{headers:?}");
        assert!(
            !headers.get_all(AUTHORIZATION).iter().any(carries_our_token),
            "{headers:?}"
        );
    }
});
