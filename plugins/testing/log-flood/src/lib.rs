//! Test plugin `log-flood`: every `on_access` writes 200,000 lines of
//! 1 KiB through the host's `log` import, then allows. The host's per
//! plugin log rate must keep the gateway's log small.

use sessiongate_policy::{Access, Config, Hooks, Policy, RequestInfo, Session, log};

pub struct LogFlood {
    line: String,
}

/// Lines written per call.
pub const LINES: usize = 200_000;

impl Policy for LogFlood {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(LogFlood {
            line: "x".repeat(1024),
        })
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_access()
    }

    fn on_access(&self, _session: &Session, _request: &RequestInfo, _now: i64) -> Access {
        for _ in 0..LINES {
            log::warn(&self.line);
        }
        Access::Allow
    }
}

sessiongate_policy::export_policy!(LogFlood);
