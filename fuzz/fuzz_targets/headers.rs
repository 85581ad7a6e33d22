//! Request header rewriting on arbitrary header maps: each input line
//! `name:value` that is a valid field becomes one header. Runs what the
//! proxy does to a client's headers (hop-by-hop removal, the identity and
//! look-alike scrub, the session cookie's removal) and checks that nothing
//! the gateway owns survives. Never a panic.
#![no_main]

use http::header::{CONNECTION, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use sessiongate::headers::{
    HTTP2_SETTINGS, KEEP_ALIVE, PATH_OVERRIDES, PROXY_CONNECTION, SG_PREFIX, find_cookie,
    is_lookalike, remove_cookie, same_header_name, scrub_request_names, strip_hop_by_hop,
};

const IDENTITY: [&str; 2] = ["x-user-id", "x-session-id"];

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
    let keep_upgrade = flags & 1 == 1;
    let reject = flags & 2 == 2;

    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    strip_hop_by_hop(&mut headers, keep_upgrade);
    for name in [
        TRANSFER_ENCODING,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        HTTP2_SETTINGS,
    ] {
        assert!(!headers.contains_key(&name), "{name} kept: {headers:?}");
    }
    if !keep_upgrade {
        assert!(!headers.contains_key(CONNECTION) && !headers.contains_key(UPGRADE));
        for name in &listed {
            assert!(
                !headers.contains_key(name),
                "{name} named in Connection kept"
            );
        }
    }

    let exact: Vec<HeaderName> = IDENTITY
        .iter()
        .map(|n| HeaderName::from_static(n))
        .collect();
    let exact_refs: Vec<&HeaderName> = exact.iter().collect();
    match scrub_request_names(&mut headers, &exact_refs, &IDENTITY, reject) {
        Err(name) => {
            assert!(reject, "only reject mode refuses");
            assert!(is_lookalike(name.as_str(), &IDENTITY), "{name} refused");
        }
        Ok(()) => {
            for name in headers.keys() {
                let text = name.as_str();
                assert!(!IDENTITY.contains(&text), "{text} kept");
                assert!(!text.starts_with(SG_PREFIX), "{text} kept");
                assert!(
                    !PATH_OVERRIDES.iter().any(|p| same_header_name(text, p)),
                    "{text} kept"
                );
                // Exact forwarding names (x-forwarded-for from a proxy in
                // front) stay: the proxy overwrites them. Spelled with `_`
                // they are look-alikes and must go.
                assert!(
                    !(text.contains('_') && is_lookalike(text, &IDENTITY)),
                    "look-alike {text} kept"
                );
            }
        }
    }

    remove_cookie(&mut headers, "sg_session");
    assert_eq!(find_cookie(&headers, "sg_session"), None);
});
