//! The fast tier's session record decoder on arbitrary bytes (what a
//! corrupted or hostile Redis could hand back): never a panic, and what
//! decodes encodes back to a record that decodes to the same session.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessiongate::store::codec::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(session) = decode(data) {
        assert_eq!(decode(&encode(&session)), Ok(session));
    }
});
