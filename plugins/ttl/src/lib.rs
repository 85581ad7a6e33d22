//! `ttl`: sets a new session's lifetime.
//!
//! `on_create` sets `expires_at = now + ttl_seconds * 1000`; a session whose
//! attribute `remember_me_attribute` (default `remember_me`) is exactly
//! `"true"` gets `remember_me_ttl_seconds` instead, when that is configured.
//!
//! Config:
//! - `ttl_seconds` (required, ≥ 1)
//! - `remember_me_ttl_seconds` (optional, ≥ `ttl_seconds`)
//! - `remember_me_attribute` (optional, default `"remember_me"`)

use sessiongate_policy::{Config, Creation, Denial, Hooks, Policy, RequestInfo, Session};

/// Milliseconds in `seconds`, or an error naming `key` if that overflows.
fn millis(key: &str, seconds: u64) -> Result<i64, String> {
    if seconds == 0 {
        return Err(format!("config key `{key}` must be at least 1"));
    }
    i64::try_from(seconds)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .ok_or_else(|| format!("config key `{key}` is too large"))
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ttl {
    ttl_ms: i64,
    remember_me_attribute: String,
    remember_me_ttl_ms: Option<i64>,
}

impl Ttl {
    pub fn from_config(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&[
            "ttl_seconds",
            "remember_me_attribute",
            "remember_me_ttl_seconds",
        ])?;
        let ttl_seconds = config.u64("ttl_seconds")?;
        let ttl_ms = millis("ttl_seconds", ttl_seconds)?;
        let remember_me_ttl_ms = match config.u64_opt("remember_me_ttl_seconds")? {
            None => None,
            Some(s) if s < ttl_seconds => {
                return Err(format!(
                    "config key `remember_me_ttl_seconds` ({s}) must be at least `ttl_seconds` ({ttl_seconds})"
                ));
            }
            Some(s) => Some(millis("remember_me_ttl_seconds", s)?),
        };
        let remember_me_attribute = config.str_or("remember_me_attribute", "remember_me")?;
        if remember_me_attribute.is_empty() {
            return Err("config key `remember_me_attribute` must not be empty".into());
        }
        Ok(Ttl {
            ttl_ms,
            remember_me_attribute,
            remember_me_ttl_ms,
        })
    }

    /// The expiry of a session created at `now`.
    pub fn expiry(&self, session: &Session, now: i64) -> i64 {
        let lifetime = match self.remember_me_ttl_ms {
            Some(long) if session.attr(&self.remember_me_attribute) == Some("true") => long,
            _ => self.ttl_ms,
        };
        now.saturating_add(lifetime)
    }
}

impl Policy for Ttl {
    fn init(config: Config) -> Result<Self, String> {
        Ttl::from_config(&config)
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_create()
    }

    fn on_create(
        &self,
        session: &Session,
        _request: Option<&RequestInfo>,
        now: i64,
    ) -> Result<Creation, Denial> {
        Ok(Creation::unchanged().expire_at(self.expiry(session, now)))
    }
}

sessiongate_policy::export_policy!(Ttl);

#[cfg(test)]
mod tests {
    use super::*;

    fn ttl(json: &str) -> Result<Ttl, String> {
        Ttl::from_config(&Config::parse(json).unwrap())
    }

    fn session(attrs: &[(&str, &str)]) -> Session {
        attrs
            .iter()
            .fold(Session::default(), |s, (k, v)| s.with_attr(*k, *v))
    }

    const NOW: i64 = 1_700_000_000_000;

    #[test]
    fn plain_ttl() {
        let p = ttl(r#"{"ttl_seconds": 3600}"#).unwrap();
        assert_eq!(p.expiry(&session(&[]), NOW), NOW + 3_600_000);
        // Without remember_me_ttl_seconds the attribute changes nothing.
        assert_eq!(
            p.expiry(&session(&[("remember_me", "true")]), NOW),
            NOW + 3_600_000
        );
    }

    #[test]
    fn remember_me_gets_the_longer_lifetime() {
        let p = ttl(r#"{"ttl_seconds": 3600, "remember_me_ttl_seconds": 86400}"#).unwrap();
        assert_eq!(
            p.expiry(&session(&[("remember_me", "true")]), NOW),
            NOW + 86_400_000
        );
        assert_eq!(
            p.expiry(&session(&[("remember_me", "false")]), NOW),
            NOW + 3_600_000
        );
        assert_eq!(
            p.expiry(&session(&[("remember_me", "TRUE")]), NOW),
            NOW + 3_600_000
        );
        assert_eq!(p.expiry(&session(&[]), NOW), NOW + 3_600_000);
    }

    #[test]
    fn custom_attribute() {
        let p = ttl(
            r#"{"ttl_seconds": 60, "remember_me_ttl_seconds": 600, "remember_me_attribute": "keep"}"#,
        )
        .unwrap();
        assert_eq!(p.expiry(&session(&[("keep", "true")]), NOW), NOW + 600_000);
        assert_eq!(
            p.expiry(&session(&[("remember_me", "true")]), NOW),
            NOW + 60_000
        );
    }

    #[test]
    fn on_create_sets_only_the_expiry() {
        let p = ttl(r#"{"ttl_seconds": 10}"#).unwrap();
        let c = p.on_create(&session(&[]), None, NOW).unwrap();
        assert_eq!(c, Creation::unchanged().expire_at(NOW + 10_000));
        assert_eq!(p.hooks(), Hooks::NONE.with_create());
    }

    #[test]
    fn no_overflow_near_the_end_of_time() {
        let p = ttl(r#"{"ttl_seconds": 10}"#).unwrap();
        assert_eq!(p.expiry(&session(&[]), i64::MAX - 5), i64::MAX);
    }

    #[test]
    fn config_errors_name_the_key() {
        assert_eq!(ttl("{}"), Err("missing required key `ttl_seconds`".into()));
        assert_eq!(
            ttl(r#"{"ttl_seconds": 0}"#),
            Err("config key `ttl_seconds` must be at least 1".into())
        );
        assert_eq!(
            ttl(r#"{"ttl_seconds": "1h"}"#),
            Err("config key `ttl_seconds`: expected a non-negative integer, got \"1h\"".into())
        );
        assert_eq!(
            ttl(r#"{"ttl_seconds": 18446744073709551615}"#),
            Err("config key `ttl_seconds` is too large".into())
        );
        assert_eq!(
            ttl(r#"{"ttl_seconds": 60, "remember_me_ttl_seconds": 30}"#),
            Err(
                "config key `remember_me_ttl_seconds` (30) must be at least `ttl_seconds` (60)"
                    .into()
            )
        );
        assert_eq!(
            ttl(r#"{"ttl_seconds": 60, "remember_me_attribute": ""}"#),
            Err("config key `remember_me_attribute` must not be empty".into())
        );
        assert!(
            ttl(r#"{"ttl_seconds": 60, "ttl": 5}"#)
                .unwrap_err()
                .starts_with("unknown config key `ttl`")
        );
    }
}
