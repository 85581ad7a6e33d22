//! Test plugin `loop-forever`: `on_access` never returns (the host's time
//! limit must interrupt it).

use std::hint::black_box;

use sessiongate_policy::{Access, Config, Hooks, Policy, RequestInfo, Session};

pub struct LoopForever;

impl Policy for LoopForever {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(LoopForever)
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_access()
    }

    fn on_access(&self, _session: &Session, _request: &RequestInfo, now: i64) -> Access {
        let mut n = now;
        loop {
            n = black_box(n.wrapping_add(1));
        }
    }
}

sessiongate_policy::export_policy!(LoopForever);
