//! Test plugin `memory-hog`: `on_access` allocates without bound (the host's
//! memory limit must stop it).

use std::hint::black_box;

use sessiongate_policy::{Access, Config, Hooks, Policy, RequestInfo, Session};

pub struct MemoryHog;

const CHUNK: usize = 1 << 20;

impl Policy for MemoryHog {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(MemoryHog)
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_access()
    }

    fn on_access(&self, _session: &Session, _request: &RequestInfo, _now: i64) -> Access {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = vec![0u8; CHUNK];
            // Touch every page so the memory is really used, and keep the
            // optimizer from dropping the allocation.
            for i in (0..CHUNK).step_by(4096) {
                chunk[i] = 1;
            }
            hoard.push(black_box(chunk));
            black_box(&mut hoard);
        }
    }
}

sessiongate_policy::export_policy!(MemoryHog);
