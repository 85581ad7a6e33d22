//! Path normalization on arbitrary request targets: never a panic; the
//! normal form is stable, has one spelling, and a backend that
//! percent-decodes it sees the same segments the gateway routed on (no
//! new `/`, no `.` or `..` segment).
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use sessiongate::path::normalize;

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    let Ok(out) = normalize(&path) else {
        return;
    };
    assert!(out.starts_with('/'), "{path:?} -> {out:?}");
    assert!(!out.contains("//"), "{path:?} -> {out:?}");
    assert!(!out.contains('\\'), "{path:?} -> {out:?}");
    assert!(
        !out.bytes().any(|b| b < 0x20 || b == 0x7f),
        "{path:?} -> {out:?}"
    );
    assert!(
        matches!(normalize(&out), Ok(Cow::Borrowed(again)) if again == out),
        "not stable: {path:?} -> {out:?}"
    );
    let decoded = percent_decode(out.as_bytes());
    assert_eq!(
        decoded.iter().filter(|&&b| b == b'/').count(),
        out.bytes().filter(|&b| b == b'/').count(),
        "decoding adds a segment: {path:?} -> {out:?}"
    );
    for segment in decoded[1..].split(|&b| b == b'/') {
        assert!(
            segment != b"." && segment != b"..",
            "a dot segment once decoded: {path:?} -> {out:?}"
        );
    }
});

fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}
