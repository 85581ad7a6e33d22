//! The lean upstream path's codec (`h1`) on arbitrary origin bytes: the
//! first byte picks the request method (a HEAD's response has no body) and
//! how the rest is cut into reads. Never a panic; a head it accepts is
//! within its bounds and never framed two ways; a chunked body never
//! yields more bytes than it was given, and the same bytes whatever the
//! cuts.
#![no_main]

use bytes::BytesMut;
use http::Method;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use libfuzzer_sys::fuzz_target;
use sessiongate::h1::{
    ChunkedDecoder, Decoded, Framing, MAX_HEADERS, parse_response_head,
};

fn dechunk(wire: &[u8], cut: usize) -> (Vec<u8>, bool) {
    let mut decoder = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        match decoder.decode(&mut buf) {
            Ok(Decoded::Data(d)) => out.extend_from_slice(&d),
            Ok(Decoded::Done) => return (out, true),
            Err(_) => return (out, false),
            Ok(Decoded::NeedMore) => {
                if at == wire.len() {
                    return (out, false);
                }
                let n = cut.clamp(1, wire.len() - at);
                buf.extend_from_slice(&wire[at..at + n]);
                at += n;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let method = if flags & 1 == 1 { Method::HEAD } else { Method::GET };
    if let Ok(Some((head, len))) = parse_response_head(data, &method) {
        assert!(len <= data.len());
        assert!(head.headers.len() <= MAX_HEADERS);
        let both = head.headers.contains_key(TRANSFER_ENCODING)
            && head.headers.contains_key(CONTENT_LENGTH);
        assert!(!both || head.framing == Framing::Empty);
        if head.framing == Framing::UntilClose {
            assert!(!head.keep_alive);
        }
    }
    let cut = usize::from(flags >> 1) + 1;
    let (whole, done_whole) = dechunk(data, data.len().max(1));
    let (pieces, done_pieces) = dechunk(data, cut);
    assert!(whole.len() <= data.len());
    // Where both finish, the cuts change nothing.
    if done_whole && done_pieces {
        assert_eq!(whole, pieces);
    }
});
