//! `activity-refresh`: an idle timeout and an absolute lifetime, with a
//! sliding expiry that is written only when it needs to be.
//!
//! `on_access`:
//! - denies 401 `idle timeout` when `now - last_seen_at > idle`;
//! - denies 401 `absolute lifetime exceeded` when `now - created_at > absolute`;
//! - otherwise the target expiry is `min(now + idle, created_at + absolute)`,
//!   and it answers `extend(target)` only when the session is past
//!   `refresh_fraction` of its idle window (`expires_at - now < idle * (1 -
//!   refresh_fraction)`) and the target is later than the current expiry;
//!   else `allow`, so most requests cause no write.
//!
//! Session creation is left alone (the `ttl` plugin, or the gateway's default
//! lifetime, sets the first expiry).
//!
//! Config:
//! - `idle_timeout_seconds` (required, ≥ 1)
//! - `absolute_lifetime_seconds` (required, ≥ 1)
//! - `refresh_fraction` (optional, 0 < f < 1, default 0.5)

use sessiongate_policy::{Access, Config, Denial, Hooks, Policy, RequestInfo, Session};

fn millis(config: &Config, key: &str) -> Result<i64, String> {
    let seconds = config.u64(key)?;
    if seconds == 0 {
        return Err(format!("config key `{key}` must be at least 1"));
    }
    i64::try_from(seconds)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .ok_or_else(|| format!("config key `{key}` is too large"))
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActivityRefresh {
    idle_ms: i64,
    absolute_ms: i64,
    /// Extend only when fewer than this many milliseconds are left:
    /// `idle * (1 - refresh_fraction)`.
    refresh_below_ms: i64,
}

impl ActivityRefresh {
    pub fn from_config(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&[
            "idle_timeout_seconds",
            "absolute_lifetime_seconds",
            "refresh_fraction",
        ])?;
        let idle_ms = millis(config, "idle_timeout_seconds")?;
        let absolute_ms = millis(config, "absolute_lifetime_seconds")?;
        let fraction = config.f64_or("refresh_fraction", 0.5)?;
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(format!(
                "config key `refresh_fraction` must be between 0 and 1 (exclusive), got {fraction}"
            ));
        }
        let refresh_below_ms = (idle_ms as f64 * (1.0 - fraction)).round() as i64;
        Ok(ActivityRefresh {
            idle_ms,
            absolute_ms,
            refresh_below_ms,
        })
    }

    /// The decision for a request at `now` on a session with these times.
    pub fn decide(&self, created_at: i64, last_seen_at: i64, expires_at: i64, now: i64) -> Access {
        if now.saturating_sub(last_seen_at) > self.idle_ms {
            return Access::Deny(Denial::unauthorized("idle timeout"));
        }
        if now.saturating_sub(created_at) > self.absolute_ms {
            return Access::Deny(Denial::unauthorized("absolute lifetime exceeded"));
        }
        let target = now
            .saturating_add(self.idle_ms)
            .min(created_at.saturating_add(self.absolute_ms));
        if expires_at.saturating_sub(now) < self.refresh_below_ms && target > expires_at {
            Access::Extend(target)
        } else {
            Access::Allow
        }
    }
}

impl Policy for ActivityRefresh {
    fn init(config: Config) -> Result<Self, String> {
        ActivityRefresh::from_config(&config)
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_access()
    }

    fn on_access(&self, session: &Session, _request: &RequestInfo, now: i64) -> Access {
        self.decide(
            session.created_at,
            session.last_seen_at,
            session.expires_at,
            now,
        )
    }
}

sessiongate_policy::export_policy!(ActivityRefresh);

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1000;
    const T0: i64 = 1_700_000_000_000;

    fn policy(json: &str) -> Result<ActivityRefresh, String> {
        ActivityRefresh::from_config(&Config::parse(json).unwrap())
    }

    /// idle 30 min, absolute 8 h, refresh after half the idle window.
    fn standard() -> ActivityRefresh {
        policy(r#"{"idle_timeout_seconds": 1800, "absolute_lifetime_seconds": 28800}"#).unwrap()
    }

    #[test]
    fn fresh_session_is_allowed_without_a_write() {
        let p = standard();
        // Created now, expiring in 30 min: nothing to do.
        assert_eq!(p.decide(T0, T0, T0 + 1800 * S, T0 + S), Access::Allow);
        // 14 minutes in: still more than half of the idle window left.
        let now = T0 + 14 * 60 * S;
        assert_eq!(p.decide(T0, now - S, T0 + 1800 * S, now), Access::Allow);
    }

    #[test]
    fn past_the_refresh_point_it_extends() {
        let p = standard();
        // 16 minutes in: 14 minutes left < 15: slide to now + 30 min.
        let now = T0 + 16 * 60 * S;
        assert_eq!(
            p.decide(T0, now - S, T0 + 1800 * S, now),
            Access::Extend(now + 1800 * S)
        );
    }

    #[test]
    fn exactly_at_the_refresh_point_it_does_not_extend() {
        let p = standard();
        let now = T0 + 15 * 60 * S; // 15 minutes left == idle * 0.5
        assert_eq!(p.decide(T0, now, T0 + 1800 * S, now), Access::Allow);
    }

    #[test]
    fn idle_timeout() {
        let p = standard();
        let now = T0 + 1801 * S;
        assert_eq!(
            p.decide(T0, T0, T0 + 1800 * S, now),
            Access::deny(401, "idle timeout")
        );
        // Exactly idle is still fine (strictly greater denies).
        let now = T0 + 1800 * S;
        assert!(!matches!(p.decide(T0, T0, now + S, now), Access::Deny(_)));
    }

    #[test]
    fn absolute_lifetime() {
        let p = standard();
        let now = T0 + 28800 * S + 1;
        assert_eq!(
            p.decide(T0, now - S, now + 60 * S, now),
            Access::deny(401, "absolute lifetime exceeded")
        );
    }

    #[test]
    fn target_is_capped_by_the_absolute_lifetime() {
        let p = standard();
        // 7h50 in, 1 minute left: the slide would pass created + 8 h.
        let now = T0 + (8 * 3600 - 10 * 60) * S;
        assert_eq!(
            p.decide(T0, now - S, now + 60 * S, now),
            Access::Extend(T0 + 28800 * S)
        );
        // Already expiring at the cap: no write.
        assert_eq!(p.decide(T0, now - S, T0 + 28800 * S, now), Access::Allow);
    }

    #[test]
    fn never_moves_the_expiry_earlier() {
        let p = standard();
        // A longer expiry set elsewhere (say remember-me) is above the
        // refresh threshold: no write.
        let now = T0 + 60 * S;
        assert_eq!(p.decide(T0, now, now + 7200 * S, now), Access::Allow);
        let p =
            policy(r#"{"idle_timeout_seconds": 1800, "absolute_lifetime_seconds": 600}"#).unwrap();
        // Below the threshold, but the target (created + 10 min) is before
        // the current expiry: an extend would shorten it, so allow.
        assert_eq!(p.decide(T0, now, T0 + 700 * S, now), Access::Allow);
    }

    #[test]
    fn refresh_fraction_moves_the_threshold() {
        let p = policy(
            r#"{"idle_timeout_seconds": 100, "absolute_lifetime_seconds": 10000, "refresh_fraction": 0.9}"#,
        )
        .unwrap();
        // Extend only when fewer than 10 s are left.
        assert_eq!(p.decide(T0, T0, T0 + 100 * S, T0 + 89 * S), Access::Allow);
        assert_eq!(
            p.decide(T0, T0 + 89 * S, T0 + 100 * S, T0 + 91 * S),
            Access::Extend(T0 + 191 * S)
        );
        let p = policy(
            r#"{"idle_timeout_seconds": 100, "absolute_lifetime_seconds": 10000, "refresh_fraction": 0.1}"#,
        )
        .unwrap();
        // Extend when fewer than 90 s are left.
        assert_eq!(
            p.decide(T0, T0, T0 + 100 * S, T0 + 11 * S),
            Access::Extend(T0 + 111 * S)
        );
    }

    #[test]
    fn on_access_uses_the_session_times() {
        let p = standard();
        let now = T0 + 16 * 60 * S;
        let session = Session::default().with_times(T0, now - S, T0 + 1800 * S);
        assert_eq!(
            p.on_access(&session, &RequestInfo::default(), now),
            Access::Extend(now + 1800 * S)
        );
        assert_eq!(p.hooks(), Hooks::NONE.with_access());
    }

    #[test]
    fn config_errors() {
        assert_eq!(
            policy(r#"{"absolute_lifetime_seconds": 10}"#),
            Err("missing required key `idle_timeout_seconds`".into())
        );
        assert_eq!(
            policy(r#"{"idle_timeout_seconds": 10}"#),
            Err("missing required key `absolute_lifetime_seconds`".into())
        );
        assert_eq!(
            policy(r#"{"idle_timeout_seconds": 0, "absolute_lifetime_seconds": 10}"#),
            Err("config key `idle_timeout_seconds` must be at least 1".into())
        );
        for bad in ["0", "1", "1.5", "-0.2"] {
            let json = format!(
                r#"{{"idle_timeout_seconds": 10, "absolute_lifetime_seconds": 10, "refresh_fraction": {bad}}}"#
            );
            assert!(
                policy(&json)
                    .unwrap_err()
                    .starts_with("config key `refresh_fraction` must be between 0 and 1"),
                "{bad}"
            );
        }
        assert!(
            policy(r#"{"idle_timeout_seconds": 10, "absolute_lifetime_seconds": 10, "idle": 1}"#)
                .unwrap_err()
                .starts_with("unknown config key `idle`")
        );
    }
}
