//! Test plugin `panic`: `on_access` panics (a trap the host must contain).

use sessiongate_policy::{Access, Config, Hooks, Policy, RequestInfo, Session};

pub struct Panic;

impl Policy for Panic {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(Panic)
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_access()
    }

    fn on_access(&self, _session: &Session, _request: &RequestInfo, _now: i64) -> Access {
        panic!("the `panic` test plugin panics in on_access");
    }
}

sessiongate_policy::export_policy!(Panic);
