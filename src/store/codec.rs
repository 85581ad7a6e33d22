//! The compact binary form of a session in the fast tier.
//!
//! Layout (integers big-endian): version `1` (u8), id (16 bytes),
//! created_at, last_seen_at, expires_at (i64 each), user_id (u16 length +
//! bytes), attribute count (u16), then per attribute key and value (u16
//! length + bytes each). About 60 bytes plus the strings, against ~250 for
//! JSON, and decoding never allocates more than the input's size.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::session::Session;

const VERSION: u8 = 1;

pub fn encode(session: &Session) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        1 + 16
            + 24
            + 2
            + session.user_id.len()
            + 2
            + session
                .attributes
                .iter()
                .map(|(k, v)| 4 + k.len() + v.len())
                .sum::<usize>(),
    );
    out.push(VERSION);
    out.extend_from_slice(session.id.as_bytes());
    out.extend_from_slice(&session.created_at.to_be_bytes());
    out.extend_from_slice(&session.last_seen_at.to_be_bytes());
    out.extend_from_slice(&session.expires_at.to_be_bytes());
    put_str(&mut out, &session.user_id);
    out.extend_from_slice(&(session.attributes.len() as u16).to_be_bytes());
    for (k, v) in &session.attributes {
        put_str(&mut out, k);
        put_str(&mut out, v);
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Session limits keep every string far below 64 KiB.
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Why bytes from the fast tier are not a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt session record: {0}")]
pub struct DecodeError(&'static str);

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| DecodeError("invalid UTF-8"))
    }
}

pub fn decode(bytes: &[u8]) -> Result<Session, DecodeError> {
    let mut r = Reader { bytes };
    if r.take(1)?[0] != VERSION {
        return Err(DecodeError("unknown version"));
    }
    let id = Uuid::from_bytes(r.take(16)?.try_into().expect("16 bytes"));
    let created_at = r.i64()?;
    let last_seen_at = r.i64()?;
    let expires_at = r.i64()?;
    let user_id = r.string()?;
    let count = r.u16()?;
    let mut attributes = BTreeMap::new();
    for _ in 0..count {
        let k = r.string()?;
        let v = r.string()?;
        attributes.insert(k, v);
    }
    if !r.bytes.is_empty() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(Session {
        id,
        user_id,
        created_at,
        last_seen_at,
        expires_at,
        attributes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sample() -> Session {
        let attributes = BTreeMap::from([
            ("remember_me".to_string(), "true".to_string()),
            ("rôle".to_string(), "admin ✓".to_string()),
        ]);
        Session::new(
            "alice@example.com".into(),
            attributes,
            Duration::from_secs(60),
        )
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(decode(&encode(&s)).unwrap(), s);
        let empty = Session::new("u".into(), BTreeMap::new(), Duration::from_secs(1));
        assert_eq!(decode(&encode(&empty)).unwrap(), empty);
    }

    #[test]
    fn is_compact() {
        let s = sample();
        let json_len = serde_json::to_vec(&s.view()).unwrap().len();
        assert!(
            encode(&s).len() * 2 < json_len,
            "{} vs {json_len}",
            encode(&s).len()
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = encode(&sample());
        for cut in 0..good.len() {
            assert!(
                decode(&good[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(decode(&extra).is_err());
        let mut wrong = good;
        wrong[0] = 9;
        assert!(decode(&wrong).is_err());
        // A pseudo-random walk over byte strings.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode(&bytes);
        }
    }

    mod properties {
        //! Property tests (CI-fast: proptest's default 256 cases each). The
        //! cargo-fuzz target `codec` (fuzz/) runs the same decode for longer.
        use super::*;
        use proptest::collection::{btree_map, vec};
        use proptest::prelude::*;

        fn any_string(max: usize) -> impl Strategy<Value = String> {
            // Any Unicode scalar values, multi-byte ones included.
            proptest::string::string_regex(&format!("(?s).{{0,{max}}}")).expect("regex")
        }

        fn any_session() -> impl Strategy<Value = Session> {
            (
                any::<u128>(),
                any_string(crate::session::MAX_USER_ID_BYTES),
                any::<i64>(),
                any::<i64>(),
                any::<i64>(),
                btree_map(any_string(40), any_string(200), 0..16),
            )
                .prop_map(
                    |(id, user_id, created_at, last_seen_at, expires_at, attributes)| Session {
                        id: Uuid::from_u128(id),
                        user_id,
                        created_at,
                        last_seen_at,
                        expires_at,
                        attributes,
                    },
                )
        }

        proptest! {
            #[test]
            fn every_session_round_trips(session in any_session()) {
                prop_assert_eq!(decode(&encode(&session)), Ok(session));
            }

            #[test]
            fn arbitrary_bytes_never_panic_and_decode_canonically(
                bytes in vec(any::<u8>(), 0..512),
            ) {
                // Whatever decodes is a session that encodes back to a
                // record decoding to the same session.
                if let Ok(session) = decode(&bytes) {
                    prop_assert_eq!(decode(&encode(&session)), Ok(session));
                }
            }

            #[test]
            fn damaged_records_never_panic(
                session in any_session(),
                edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
            ) {
                let mut bytes = encode(&session);
                for (at, byte, kind) in edits {
                    match kind {
                        0 if !bytes.is_empty() => {
                            let i = at.index(bytes.len());
                            bytes[i] = byte;
                        }
                        1 => {
                            let i = at.index(bytes.len() + 1);
                            bytes.insert(i, byte);
                        }
                        _ if !bytes.is_empty() => {
                            let i = at.index(bytes.len());
                            bytes.remove(i);
                        }
                        _ => {}
                    }
                }
                if let Ok(decoded) = decode(&bytes) {
                    prop_assert_eq!(decode(&encode(&decoded)), Ok(decoded));
                }
            }
        }
    }
}
