//! Behind a load balancer (`forwarded`): the `X-Forwarded-For` walk and
//! the PROXY protocol header reader on arbitrary bytes. The first byte
//! picks which and whether the peer is trusted.
//!
//! The walk: never a panic; the verified chain starts with the client,
//! ends with the peer, holds only trusted hops after the client, and from
//! an untrusted peer is the peer alone. The reader: never a panic, never
//! asks for more than its bound, and what it accepts is exactly one
//! header as ppp reads it (nothing after it consumed).
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use sessiongate::forwarded::{
    HeaderStep, MAX_HOPS, TrustedProxies, V2_MAX_PAYLOAD, canonical, forwarded_proto,
    header_step, resolve,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        walk(mode, rest);
    } else {
        read(rest);
    }
});

fn walk(mode: u8, data: &[u8]) {
    let trusted = TrustedProxies::new(
        ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]
            .iter()
            .map(|e| TrustedProxies::parse_entry(e).unwrap()),
    );
    let peer: IpAddr = match mode >> 1 & 3 {
        0 => [10, 0, 0, 1].into(),
        1 => "::ffff:10.0.0.1".parse().unwrap(),
        2 => "fd00::1".parse().unwrap(),
        _ => [198, 51, 100, 1].into(),
    };
    // Header lines split at `\n`.
    let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let r = resolve(&trusted, peer, lines.iter().copied());
    assert_eq!(r.chain[0], r.client);
    assert_eq!(*r.chain.last().unwrap(), canonical(peer));
    assert!(r.chain.len() <= MAX_HOPS + 1);
    assert!(r.chain[1..].iter().all(|h| trusted.contains(*h)));
    if !trusted.contains(peer) {
        assert_eq!(r.chain, vec![canonical(peer)]);
    }
    let value = r.header_value();
    assert!(value.to_str().is_ok());
    if let Some(proto) = forwarded_proto(lines.iter().copied()) {
        assert!(proto == "http" || proto == "https");
    }
}

fn read(data: &[u8]) {
    let mut len = 0;
    let done = loop {
        match header_step(&data[..len]) {
            Err(_) => return,
            Ok(HeaderStep::Done(_)) => break len,
            Ok(HeaderStep::Read(n)) => {
                assert!(n > 0, "a step that reads nothing");
                if len + n > data.len() {
                    return;
                }
                len += n;
                assert!(len <= 16 + V2_MAX_PAYLOAD);
            }
        }
    };
    let consumed = match ppp::HeaderResult::parse(&data[..done]) {
        ppp::HeaderResult::V1(Ok(h)) => h.header.len(),
        ppp::HeaderResult::V2(Ok(h)) => h.len(),
        other => panic!("accepted what ppp refuses: {other:?}"),
    };
    assert_eq!(consumed, done, "read past the header");
}
