//! Cookie and bearer-token parsing on arbitrary header bytes: each line of
//! the input is one `Cookie` or `Authorization` field (by its first byte),
//! as a client can send them. Never a panic; after `remove_cookie` the
//! session cookie is gone and every other cookie is still there.
#![no_main]

use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use sessiongate::headers::{
    bearer_token, bearer_tokens, cookie_values, find_cookie, remove_cookie,
};

const NAME: &str = "sg_session";

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some((&kind, value)) = line.split_first() else {
            continue;
        };
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let name = if kind & 1 == 0 { COOKIE } else { AUTHORIZATION };
        headers.append(name, value);
    }

    let first = find_cookie(&headers, NAME).map(str::to_owned);
    let all: Vec<String> = cookie_values(&headers, NAME).map(str::to_owned).collect();
    assert_eq!(first.as_ref(), all.first());
    let _ = bearer_token(&headers);
    let _ = bearer_tokens(&headers).count();

    let others_before: Vec<String> = other_cookies(&headers);
    remove_cookie(&mut headers, NAME);
    assert_eq!(find_cookie(&headers, NAME), None, "{headers:?}");
    assert_eq!(cookie_values(&headers, NAME).count(), 0);
    assert_eq!(other_cookies(&headers), others_before, "{headers:?}");
});

/// Every `name=value` pair (not the session cookie) of the Cookie fields,
/// trimmed, in order: what must survive the removal.
fn other_cookies(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty())
        .filter(|pair| match pair.iter().position(|&b| b == b'=') {
            Some(eq) => pair[..eq].trim_ascii() != NAME.as_bytes(),
            None => true,
        })
        .map(|pair| String::from_utf8_lossy(pair).into_owned())
        .collect()
}
