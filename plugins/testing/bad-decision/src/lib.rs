//! Test plugin `bad-decision`: answers values the host must reject:
//! `on_access` denies with status 200, `on_create` sets `expires_at` to 0.

use sessiongate_policy::{Access, Config, Creation, Denial, Hooks, Policy, RequestInfo, Session};

pub struct BadDecision;

impl Policy for BadDecision {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(BadDecision)
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_create().with_access()
    }

    fn on_create(
        &self,
        _session: &Session,
        _request: Option<&RequestInfo>,
        _now: i64,
    ) -> Result<Creation, Denial> {
        Ok(Creation::unchanged().expire_at(0))
    }

    fn on_access(&self, _session: &Session, _request: &RequestInfo, _now: i64) -> Access {
        Access::deny(200, "a denial with a success status")
    }
}

sessiongate_policy::export_policy!(BadDecision);
