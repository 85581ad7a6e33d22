//! The HTTP/1.1 codec of the lean upstream path ([`crate::upstream`]): a
//! request head written out, a response head parsed (with `httparse`) and
//! its body's framing decided, and a chunked-body decoder.
//!
//! This is parser code on the edge: everything an origin sends passes
//! through it. It is strict where leniency lets one response be read two
//! ways (response smuggling, RFC 9112 §6.3 and §11.2): a response with
//! both `Transfer-Encoding` and `Content-Length`, differing
//! `Content-Length` values, a transfer coding other than `chunked`, a
//! folded header line or a chunk line without its CRLF is refused (the
//! client gets 502), never guessed at. Every buffer it asks for is bounded:
//! the head ([`MAX_HEAD`], [`MAX_HEADERS`]), a chunk-size line
//! ([`MAX_CHUNK_LINE`]) and the trailers ([`MAX_TRAILERS`]). Public for the
//! fuzz targets; property tests below, fuzz target `fuzz/fuzz_targets/h1.rs`.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{
    CONNECTION, CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue, TRANSFER_ENCODING,
};
use http::{Method, StatusCode};

/// The longest response head accepted (status line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header lines in a response head.
pub const MAX_HEADERS: usize = 128;
/// The longest chunk-size line (size, extensions, CRLF).
pub const MAX_CHUNK_LINE: usize = 4096;
/// The most bytes of trailer section after the last chunk (dropped).
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Writes a request head: `method target HTTP/1.1`, the headers, the
/// blank line. The pieces come from `http` types, which cannot hold a CR,
/// LF or NUL, so nothing here can split the head.
pub fn encode_request_head(method: &Method, target: &str, headers: &HeaderMap, out: &mut Vec<u8>) {
    let size: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + method.as_str().len()
        + target.len()
        + 13;
    out.reserve(size);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a `HEAD` request's response, 204, 304.
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Neither: the body runs to the end of the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the connection may carry another request after this
    /// response's body.
    pub keep_alive: bool,
}

/// Why a response head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("response head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("more than {MAX_HEADERS} response headers")]
    TooManyHeaders,
    #[error("malformed response head: {0}")]
    Malformed(String),
    #[error("response with both Transfer-Encoding and Content-Length")]
    LengthAndChunked,
    #[error("unsupported transfer coding")]
    TransferCoding,
    #[error("invalid Content-Length")]
    ContentLength,
}

/// Parses a response head at the start of `buf`: `Ok(None)` while it is
/// incomplete; otherwise the head and its length in bytes. Interim (1xx)
/// responses come back like any other: the caller skips them.
pub fn parse_response_head(
    buf: &[u8],
    method: &Method,
) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    let mut buf = BytesMut::from(buf);
    let before = buf.len();
    Ok(take_response_head(&mut buf, method)?.map(|head| (head, before - buf.len())))
}

/// [`parse_response_head`] on a connection's read buffer: a complete head
/// is taken off its front, and its header values share the bytes read
/// instead of a copy each.
pub fn take_response_head(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<ResponseHead>, HeadError> {
    // Where each name and value is: httparse's slices borrow `buf`, which
    // is split below. Offsets fit in u32: a head is at most MAX_HEAD bytes.
    let mut fields = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let (len, code, http11, count) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut slots,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(HeadError::TooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
            Err(e) => return Err(HeadError::Malformed(e.to_string())),
        };
        if len > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let base = buf.as_ptr() as usize;
        let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        for (field, h) in fields.iter_mut().zip(response.headers.iter()) {
            let (name, value) = (at(h.name.as_bytes()), at(h.value));
            *field = (
                name,
                name + h.name.len() as u32,
                value,
                value + h.value.len() as u32,
            );
        }
        (
            len,
            response.code.unwrap_or(0),
            response.version == Some(1),
            response.headers.len(),
        )
    };
    let bytes = buf.split_to(len).freeze();
    let raw = RawHead {
        code,
        http11,
        fields: &fields[..count],
    };
    raw.build(&bytes, method, |range| {
        HeaderValue::from_maybe_shared(bytes.slice(range)).ok()
    })
    .map(Some)
}

/// A head as `httparse` found it: the status, and where each header's
/// name and value are in the bytes it read.
struct RawHead<'a> {
    code: u16,
    http11: bool,
    fields: &'a [(u32, u32, u32, u32)],
}

impl RawHead<'_> {
    /// The head: names read from `src` (the bytes `parse` read), values
    /// made by `value` from their ranges in it.
    fn build(
        &self,
        src: &[u8],
        method: &Method,
        value: impl Fn(std::ops::Range<usize>) -> Option<HeaderValue>,
    ) -> Result<ResponseHead, HeadError> {
        let status = StatusCode::from_u16(self.code)
            .map_err(|_| HeadError::Malformed(format!("status {}", self.code)))?;
        let mut headers = HeaderMap::with_capacity(self.fields.len());
        let mut close = !self.http11;
        let mut chunked = false;
        let mut other_coding = false;
        let mut length: Option<u64> = None;
        for &(ns, ne, vs, ve) in self.fields {
            let value = value(vs as usize..ve as usize)
                .ok_or_else(|| HeadError::Malformed("header value".into()))?;
            let name = HeaderName::from_bytes(&src[ns as usize..ne as usize])
                .map_err(|_| HeadError::Malformed("header name".into()))?;
            let raw = value.as_bytes();
            if name == TRANSFER_ENCODING {
                for coding in list(raw) {
                    // Only a final `chunked` delimits; anything after it,
                    // or a coding we would pass on undecoded, is refused.
                    if chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                        other_coding = true;
                    }
                    chunked = true;
                }
            } else if name == CONTENT_LENGTH {
                if list(raw).next().is_none() {
                    return Err(HeadError::ContentLength);
                }
                for item in list(raw) {
                    let n = parse_length(item).ok_or(HeadError::ContentLength)?;
                    if length.is_some_and(|l| l != n) {
                        return Err(HeadError::ContentLength);
                    }
                    length = Some(n);
                }
            } else if name == CONNECTION && list(raw).any(|t| t.eq_ignore_ascii_case(b"close")) {
                close = true;
            }
            headers.append(name, value);
        }
        let no_body = *method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let framing = if no_body {
            Framing::Empty
        } else if chunked || other_coding {
            if length.is_some() {
                return Err(HeadError::LengthAndChunked);
            }
            if other_coding || !self.http11 {
                return Err(HeadError::TransferCoding);
            }
            Framing::Chunked
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        };
        Ok(ResponseHead {
            status,
            headers,
            framing,
            keep_alive: !close && framing != Framing::UntilClose,
        })
    }
}

/// The non-empty items of a comma-separated header value, trimmed.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|s| s.trim_ascii())
        .filter(|s| !s.is_empty())
}

/// `1*DIGIT`, no sign, no spaces inside, at most 18 digits (no overflow).
fn parse_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 18 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Why a chunked body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("malformed chunk size line")]
    SizeLine,
    #[error("chunk size line longer than {MAX_CHUNK_LINE} bytes")]
    SizeLineTooLong,
    #[error("chunk data not followed by CRLF")]
    MissingCrlf,
    #[error("trailers larger than {MAX_TRAILERS} bytes")]
    TrailersTooLarge,
    #[error("malformed trailer line")]
    Trailer,
}

/// What [`ChunkedDecoder::decode`] got out of the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// Everything given was used up; more is needed.
    NeedMore,
    /// The last chunk and the trailers are read.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// In a chunk-size line, `line` bytes into it.
    Size {
        value: u64,
        digits: usize,
        ext: bool,
    },
    /// The size line's LF after its CR.
    SizeLf {
        value: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// In the trailer section; `blank` while the current line is empty.
    Trailer {
        blank: bool,
        cr: bool,
    },
    Done,
}

/// A `Transfer-Encoding: chunked` decoder over a byte buffer: it takes
/// what it can from the front of the buffer and hands data out without
/// copying. Chunk extensions and trailers are read and dropped.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// Bytes of the current size line, or of the trailers so far.
    seen: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size {
                value: 0,
                digits: 0,
                ext: false,
            },
            seen: 0,
        }
    }
}

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Data still owed by the current chunk, for the body's size hint.
    pub fn pending(&self) -> u64 {
        match self.state {
            ChunkState::Data { left } => left,
            _ => 0,
        }
    }

    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkError> {
        loop {
            if self.state == ChunkState::Done {
                return Ok(Decoded::Done);
            }
            if let ChunkState::Data { left } = self.state {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = (buf.len() as u64).min(left) as usize;
                let left = left - n as u64;
                self.state = if left == 0 {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data { left }
                };
                return Ok(Decoded::Data(buf.split_to(n).freeze()));
            }
            let Some(&b) = buf.first() else {
                return Ok(Decoded::NeedMore);
            };
            buf.advance(1);
            self.step(b)?;
        }
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        self.state = match self.state {
            ChunkState::Size { value, digits, ext } => {
                self.seen += 1;
                if self.seen > MAX_CHUNK_LINE {
                    return Err(ChunkError::SizeLineTooLong);
                }
                match b {
                    b'\r' if digits > 0 => ChunkState::SizeLf { value },
                    _ if ext => {
                        // Extensions are visible text; a bare LF or a
                        // control byte ends nothing and is refused.
                        if b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80 {
                            ChunkState::Size { value, digits, ext }
                        } else {
                            return Err(ChunkError::SizeLine);
                        }
                    }
                    b';' if digits > 0 => ChunkState::Size {
                        value,
                        digits,
                        ext: true,
                    },
                    // Whitespace only between the size and `;`.
                    b' ' | b'\t' if digits > 0 => ChunkState::Size {
                        value,
                        digits: usize::MAX,
                        ext: false,
                    },
                    _ if digits == usize::MAX => return Err(ChunkError::SizeLine),
                    _ => {
                        let d = (b as char).to_digit(16).ok_or(ChunkError::SizeLine)?;
                        let value = value
                            .checked_mul(16)
                            .and_then(|v| v.checked_add(u64::from(d)))
                            .ok_or(ChunkError::SizeLine)?;
                        ChunkState::Size {
                            value,
                            digits: digits + 1,
                            ext: false,
                        }
                    }
                }
            }
            ChunkState::SizeLf { value } => {
                if b != b'\n' {
                    return Err(ChunkError::SizeLine);
                }
                self.seen = 0;
                if value == 0 {
                    ChunkState::Trailer {
                        blank: true,
                        cr: false,
                    }
                } else {
                    ChunkState::Data { left: value }
                }
            }
            ChunkState::DataCr if b == b'\r' => ChunkState::DataLf,
            ChunkState::DataLf if b == b'\n' => ChunkState::Size {
                value: 0,
                digits: 0,
                ext: false,
            },
            ChunkState::DataCr | ChunkState::DataLf => return Err(ChunkError::MissingCrlf),
            ChunkState::Trailer { blank, cr } => {
                self.seen += 1;
                if self.seen > MAX_TRAILERS {
                    return Err(ChunkError::TrailersTooLarge);
                }
                match (b, cr) {
                    (b'\n', true) if blank => ChunkState::Done,
                    (b'\n', true) => ChunkState::Trailer {
                        blank: true,
                        cr: false,
                    },
                    (b'\r', false) => ChunkState::Trailer { blank, cr: true },
                    (_, true) => return Err(ChunkError::Trailer),
                    (b'\n', false) => return Err(ChunkError::Trailer),
                    (b, false) if b != b'\t' && b < b' ' || b == 0x7f => {
                        return Err(ChunkError::Trailer);
                    }
                    _ => ChunkState::Trailer {
                        blank: false,
                        cr: false,
                    },
                }
            }
            ChunkState::Data { .. } | ChunkState::Done => unreachable!("handled by decode"),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head(bytes: &str) -> Result<Option<(ResponseHead, usize)>, HeadError> {
        parse_response_head(bytes.as_bytes(), &Method::GET)
    }

    fn framing(bytes: &str) -> Result<Framing, HeadError> {
        head(bytes).map(|h| h.expect("complete").0.framing)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
            Ok(Framing::Length(2))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), Ok(Framing::UntilClose));
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"),
            Ok(Framing::Empty)
        );
        assert_eq!(
            framing("HTTP/1.1 304 Not Modified\r\n\r\n"),
            Ok(Framing::Empty)
        );
        assert_eq!(framing("HTTP/1.1 100 Continue\r\n\r\n"), Ok(Framing::Empty));
        let (h, _) = parse_response_head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            &Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        // Same value repeated, in one line or several: one length.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\ncontent-length: 3\r\n\r\n"),
            Ok(Framing::Length(3))
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n",
        ] {
            assert_eq!(framing(bad), Err(HeadError::LengthAndChunked), "{bad:?}");
        }
        for bad in [
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(framing(bad), Err(HeadError::TransferCoding), "{bad:?}");
        }
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x10\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
        ] {
            assert_eq!(framing(bad), Err(HeadError::ContentLength), "{bad:?}");
        }
        // Folded header lines are how one head reads as two.
        assert!(matches!(
            framing("HTTP/1.1 200 OK\r\nx-a: 1\r\n continued\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn keep_alive_needs_http11_a_length_and_no_close() {
        let keep = |s: &str| head(s).unwrap().unwrap().0.keep_alive;
        assert!(keep("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(!keep(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(!keep("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(!keep("HTTP/1.1 200 OK\r\n\r\n"));
    }

    #[test]
    fn taking_a_head_leaves_the_body_and_a_partial_head_alone() {
        let wire = b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nok";
        let mut buf = BytesMut::from(&wire[..]);
        let head = take_response_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(head.headers["x-a"], "1");
        assert_eq!(head.framing, Framing::Length(2));
        assert_eq!(&buf[..], b"ok");
        let mut partial = BytesMut::from(&wire[..20]);
        assert!(
            take_response_head(&mut partial, &Method::GET)
                .unwrap()
                .is_none()
        );
        assert_eq!(&partial[..], &wire[..20]);
    }

    #[test]
    fn heads_are_bounded() {
        let mut big = String::from("HTTP/1.1 200 OK\r\n");
        while big.len() <= MAX_HEAD {
            big.push_str("x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(matches!(
            head(&big),
            Err(HeadError::TooLarge | HeadError::TooManyHeaders)
        ));
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(head(&many).unwrap_err(), HeadError::TooManyHeaders);
        assert!(head("HTTP/1.1 200 OK\r\ncontent-le").unwrap().is_none());
    }

    #[test]
    fn request_heads_are_written_as_sent() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("origin"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let mut out = Vec::new();
        encode_request_head(&Method::GET, "/p?q=1", &headers, &mut out);
        assert_eq!(
            out,
            b"GET /p?q=1 HTTP/1.1\r\nhost: origin\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
    }

    /// Feeds `wire` to a decoder in `cuts`-sized pieces; the data it gave
    /// and whether it finished.
    fn decode_in_pieces(wire: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, bool, usize), ChunkError> {
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut at = 0;
        let mut cut = cuts.iter().cycle();
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::Done => return Ok((out, true, buf.len() + wire.len() - at)),
                Decoded::NeedMore => {
                    if at == wire.len() {
                        return Ok((out, false, 0));
                    }
                    let n = (*cut.next().unwrap_or(&1)).clamp(1, wire.len() - at);
                    buf.extend_from_slice(&wire[at..at + n]);
                    at += n;
                }
            }
        }
    }

    fn chunked(body: &[u8], sizes: &[usize], ext: bool, trailers: bool) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut rest = body;
        let mut size = sizes.iter().cycle();
        while !rest.is_empty() {
            let n = (*size.next().unwrap_or(&1)).clamp(1, rest.len());
            wire.extend_from_slice(format!("{n:X}").as_bytes());
            if ext {
                wire.extend_from_slice(b" ;name=\"v\"");
            }
            wire.extend_from_slice(b"\r\n");
            wire.extend_from_slice(&rest[..n]);
            wire.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        wire.extend_from_slice(b"0\r\n");
        if trailers {
            wire.extend_from_slice(b"x-checksum: abc\r\n");
        }
        wire.extend_from_slice(b"\r\n");
        wire
    }

    #[test]
    fn chunked_errors() {
        for (wire, err) in [
            (&b"Z\r\n"[..], ChunkError::SizeLine),
            (b"\r\n", ChunkError::SizeLine),
            (b"1\n", ChunkError::SizeLine),
            (b"1 2\r\n", ChunkError::SizeLine),
            (b"-1\r\n", ChunkError::SizeLine),
            (b"11111111111111111\r\n", ChunkError::SizeLine),
            (b"1\r\nab", ChunkError::MissingCrlf),
            (b"1\r\na\n", ChunkError::MissingCrlf),
            (b"1;x\0\r\n", ChunkError::SizeLine),
            (b"0\r\nx: 1\n", ChunkError::Trailer),
            (b"0\r\n\n", ChunkError::Trailer),
        ] {
            assert_eq!(decode_in_pieces(wire, &[1]).unwrap_err(), err, "{wire:?}");
        }
        let long = [b"1;".as_slice(), &[b'a'; MAX_CHUNK_LINE]].concat();
        assert_eq!(
            decode_in_pieces(&long, &[64]).unwrap_err(),
            ChunkError::SizeLineTooLong
        );
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < MAX_TRAILERS + 10 {
            trailers.extend_from_slice(b"x-t: aaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(
            decode_in_pieces(&trailers, &[100]).unwrap_err(),
            ChunkError::TrailersTooLarge
        );
    }

    proptest! {
        /// Any body, chunked any way, with or without extensions and
        /// trailers, read in any pieces: the same bytes, the end found,
        /// and nothing after the end taken.
        #[test]
        fn chunked_round_trips(
            body in proptest::collection::vec(any::<u8>(), 0..3000),
            sizes in proptest::collection::vec(1usize..700, 1..8),
            cuts in proptest::collection::vec(1usize..300, 1..8),
            ext: bool,
            trailers: bool,
            tail in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let mut wire = chunked(&body, &sizes, ext, trailers);
            let end = wire.len();
            wire.extend_from_slice(&tail);
            let (out, done, left) = decode_in_pieces(&wire, &cuts).unwrap();
            prop_assert!(done);
            prop_assert_eq!(out, body);
            prop_assert_eq!(left, wire.len() - end);
        }

        /// Arbitrary bytes never panic the decoder, and it never hands out
        /// more than it was given.
        #[test]
        fn chunked_never_panics(
            wire in proptest::collection::vec(any::<u8>(), 0..600),
            cuts in proptest::collection::vec(1usize..50, 1..4),
        ) {
            if let Ok((out, _, _)) = decode_in_pieces(&wire, &cuts) {
                prop_assert!(out.len() <= wire.len());
            }
        }

        /// Arbitrary bytes never panic the head parser; a head it accepts
        /// is within its bounds, and its framing is never both kinds.
        #[test]
        fn heads_never_panic(wire in proptest::collection::vec(any::<u8>(), 0..800)) {
            if let Ok(Some((head, len))) = parse_response_head(&wire, &Method::GET) {
                prop_assert!(len <= wire.len());
                prop_assert!(head.headers.len() <= MAX_HEADERS);
                let both = head.headers.contains_key(TRANSFER_ENCODING)
                    && head.headers.contains_key(CONTENT_LENGTH);
                prop_assert!(!(both && head.framing != Framing::Empty));
            }
        }
    }
}
