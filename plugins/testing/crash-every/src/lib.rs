//! Test plugin `crash-every`: `on_access` panics when `now` is even and
//! allows when it is odd, so a test can check that a trap fails only its
//! own request.

use sessiongate_policy::{Access, Config, Hooks, Policy, RequestInfo, Session};

pub struct CrashEvery;

/// Whether the call at `now` crashes.
pub fn crashes_at(now: i64) -> bool {
    now.rem_euclid(2) == 0
}

impl Policy for CrashEvery {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(CrashEvery)
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_access()
    }

    fn on_access(&self, _session: &Session, _request: &RequestInfo, now: i64) -> Access {
        if crashes_at(now) {
            panic!("crash-every: crashing because now ({now}) is even");
        }
        Access::Allow
    }
}

sessiongate_policy::export_policy!(CrashEvery);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_crashes_odd_allows() {
        assert!(crashes_at(0) && crashes_at(1_700_000_000_000) && crashes_at(-2));
        assert!(!crashes_at(1) && !crashes_at(-1));
        let (s, r) = (Session::default(), RequestInfo::default());
        assert_eq!(CrashEvery.on_access(&s, &r, 3), Access::Allow);
    }
}
