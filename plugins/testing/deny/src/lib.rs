//! Test plugin `deny`: `on_access` denies every request with `status`
//! (default 403) and `reason` (default "denied by policy") from its config.

use sessiongate_policy::{Access, Config, Hooks, Policy, RequestInfo, Session};

#[derive(Debug, PartialEq)]
pub struct Deny {
    status: u16,
    reason: String,
}

impl Policy for Deny {
    fn init(config: Config) -> Result<Self, String> {
        config.reject_unknown(&["status", "reason"])?;
        let status = config.u64_or("status", 403)?;
        let status = u16::try_from(status)
            .map_err(|_| format!("config key `status`: {status} is not an HTTP status"))?;
        let reason = config.str_or("reason", "denied by policy")?;
        Ok(Deny { status, reason })
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_access()
    }

    fn on_access(&self, _session: &Session, _request: &RequestInfo, _now: i64) -> Access {
        Access::deny(self.status, self.reason.clone())
    }
}

sessiongate_policy::export_policy!(Deny);

#[cfg(test)]
mod tests {
    use super::*;

    fn deny(json: &str) -> Result<Deny, String> {
        Deny::init(Config::parse(json).unwrap())
    }

    #[test]
    fn defaults_and_config() {
        let d = deny("{}").unwrap();
        let (s, r) = (Session::default(), RequestInfo::default());
        assert_eq!(
            d.on_access(&s, &r, 0),
            Access::deny(403, "denied by policy")
        );
        let d = deny(r#"{"status": 429, "reason": "slow down"}"#).unwrap();
        assert_eq!(d.on_access(&s, &r, 0), Access::deny(429, "slow down"));
        assert_eq!(
            deny(r#"{"status": 70000}"#),
            Err("config key `status`: 70000 is not an HTTP status".into())
        );
    }
}
