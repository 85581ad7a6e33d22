//! `max-sessions`: caps how many live sessions a user has.
//!
//! `on_evict`: when the user's other live sessions plus the new one exceed
//! `max_sessions`, it revokes the least recently seen of the others
//! (`last_seen_at` ascending, then `created_at`, then id), as many as
//! needed. The new session is never revoked.
//!
//! Config:
//! - `max_sessions` (required, ≥ 1)

use sessiongate_policy::{Config, Hooks, Policy, Session};

#[derive(Debug, Clone, PartialEq)]
pub struct MaxSessions {
    max: usize,
}

impl MaxSessions {
    pub fn from_config(config: &Config) -> Result<Self, String> {
        config.reject_unknown(&["max_sessions"])?;
        let max = config.u64("max_sessions")?;
        if max == 0 {
            return Err("config key `max_sessions` must be at least 1".into());
        }
        Ok(MaxSessions {
            max: usize::try_from(max).unwrap_or(usize::MAX),
        })
    }

    /// The ids of the sessions in `live` to revoke so that they plus the
    /// session `created` number at most `max`.
    pub fn to_revoke(&self, created: &Session, live: &[Session]) -> Vec<String> {
        // `live` should not hold the new session; never count or revoke it.
        let mut others: Vec<&Session> = live.iter().filter(|s| s.id() != created.id()).collect();
        let excess = (others.len() + 1).saturating_sub(self.max);
        if excess == 0 {
            return Vec::new();
        }
        others.sort_by(|a, b| {
            (a.last_seen_at, a.created_at, a.id()).cmp(&(b.last_seen_at, b.created_at, b.id()))
        });
        others
            .into_iter()
            .take(excess)
            .map(|s| s.id().to_string())
            .collect()
    }
}

impl Policy for MaxSessions {
    fn init(config: Config) -> Result<Self, String> {
        MaxSessions::from_config(&config)
    }

    fn hooks(&self) -> Hooks {
        Hooks::NONE.with_evict()
    }

    fn on_evict(&self, created: &Session, live: &[Session], _now: i64) -> Vec<String> {
        self.to_revoke(created, live)
    }
}

sessiongate_policy::export_policy!(MaxSessions);

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: u64) -> MaxSessions {
        MaxSessions::from_config(&Config::parse(&format!(r#"{{"max_sessions": {max}}}"#)).unwrap())
            .unwrap()
    }

    fn s(id: &str, created_at: i64, last_seen_at: i64) -> Session {
        Session::default()
            .with_id(id)
            .with_user_id("alice")
            .with_times(created_at, last_seen_at, created_at + 1_000_000)
    }

    #[test]
    fn under_the_cap_revokes_nothing() {
        let p = policy(3);
        let new = s("new", 100, 100);
        assert!(p.to_revoke(&new, &[]).is_empty());
        assert!(
            p.to_revoke(&new, &[s("a", 1, 50), s("b", 2, 60)])
                .is_empty()
        );
    }

    #[test]
    fn revokes_the_least_recently_seen() {
        let p = policy(2);
        let new = s("new", 100, 100);
        // newest first, as the gateway sends them
        let live = [s("c", 30, 40), s("b", 20, 90), s("a", 10, 35)];
        assert_eq!(p.on_evict(&new, &live, 100), vec!["a", "c"]);
    }

    #[test]
    fn ties_on_last_seen_break_by_created_then_id() {
        let p = policy(1);
        let new = s("new", 100, 100);
        let live = [s("y", 20, 50), s("x", 20, 50), s("z", 10, 50)];
        assert_eq!(p.to_revoke(&new, &live), vec!["z", "x", "y"]);
        let p = policy(3);
        assert_eq!(p.to_revoke(&new, &live), vec!["z"]);
    }

    #[test]
    fn max_one_keeps_only_the_new_session() {
        let p = policy(1);
        let new = s("new", 100, 100);
        assert_eq!(p.to_revoke(&new, &[s("a", 1, 2)]), vec!["a"]);
    }

    #[test]
    fn the_new_session_is_never_revoked_or_counted_twice() {
        let p = policy(2);
        let new = s("new", 100, 100);
        let live = [s("new", 100, 100), s("a", 1, 2)];
        assert!(p.to_revoke(&new, &live).is_empty());
        let p = policy(1);
        assert_eq!(p.to_revoke(&new, &live), vec!["a"]);
    }

    #[test]
    fn config() {
        let parse = |j: &str| MaxSessions::from_config(&Config::parse(j).unwrap());
        assert_eq!(
            parse("{}"),
            Err("missing required key `max_sessions`".into())
        );
        assert_eq!(
            parse(r#"{"max_sessions": 0}"#),
            Err("config key `max_sessions` must be at least 1".into())
        );
        assert_eq!(
            parse(r#"{"max_sessions": -1}"#),
            Err("config key `max_sessions`: expected a non-negative integer, got -1".into())
        );
        assert_eq!(
            parse(r#"{"max_sessions": 5}"#).unwrap().hooks(),
            Hooks::NONE.with_evict()
        );
    }
}
