//! The session record and the clock it is measured by.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use uuid::Uuid;

/// Most attributes a session may carry, and their total size in bytes:
/// they travel with every lookup, so they stay small.
pub const MAX_ATTRIBUTES: usize = 64;
pub const MAX_ATTRIBUTES_BYTES: usize = 4096;
/// Longest user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;

/// A session as the stores keep it. Times are milliseconds since the Unix
/// epoch so that every tier stores them the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: Uuid,
    pub user_id: String,
    pub created_at: i64,
    pub last_seen_at: i64,
    pub expires_at: i64,
    pub attributes: BTreeMap<String, String>,
}

impl Session {
    /// A session for `user_id` starting now and living `ttl`.
    pub fn new(user_id: String, attributes: BTreeMap<String, String>, ttl: Duration) -> Session {
        let now = now_ms();
        Session {
            id: Uuid::now_v7(),
            user_id,
            created_at: now,
            last_seen_at: now,
            expires_at: now.saturating_add(ttl.as_millis() as i64),
            attributes,
        }
    }

    pub fn is_live(&self, now: i64) -> bool {
        self.expires_at > now
    }

    /// Milliseconds left at `now`, zero once expired.
    pub fn remaining_ms(&self, now: i64) -> i64 {
        (self.expires_at - now).max(0)
    }

    /// The public view: what the admin API shows (never the token).
    pub fn view(&self) -> SessionView<'_> {
        SessionView {
            id: self.id,
            user_id: &self.user_id,
            created_at: rfc3339(self.created_at),
            last_seen_at: rfc3339(self.last_seen_at),
            expires_at: rfc3339(self.expires_at),
            attributes: &self.attributes,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SessionView<'a> {
    pub id: Uuid,
    pub user_id: &'a str,
    pub created_at: String,
    pub last_seen_at: String,
    pub expires_at: String,
    pub attributes: &'a BTreeMap<String, String>,
}

/// Checks a user id: not empty, short, and sendable as a header value.
/// No commas: an upstream that joins repeated headers (or a user header
/// a client managed to add to) would read `alice, admin` as two values,
/// and a list is never one identity. No control characters of any kind
/// (C0, DEL, C1): they end or bend header lines and log lines.
pub fn validate_user_id(user_id: &str) -> Result<(), String> {
    if user_id.is_empty() {
        return Err("must not be empty".into());
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(format!("must be at most {MAX_USER_ID_BYTES} bytes"));
    }
    if user_id.chars().any(char::is_control) || user_id.trim() != user_id {
        return Err("must not contain control characters or surrounding spaces".into());
    }
    if user_id.contains(',') {
        return Err("must not contain commas".into());
    }
    Ok(())
}

/// Checks the attributes' count and size.
pub fn validate_attributes(attributes: &BTreeMap<String, String>) -> Result<(), String> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(format!("at most {MAX_ATTRIBUTES} attributes are allowed"));
    }
    let size: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_ATTRIBUTES_BYTES {
        return Err(format!(
            "attributes may hold at most {MAX_ATTRIBUTES_BYTES} bytes of keys and values"
        ));
    }
    if attributes.keys().any(|k| k.is_empty()) {
        return Err("attribute names must not be empty".into());
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with millisecond precision.
pub fn rfc3339(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_sessions_expire_after_their_ttl() {
        let s = Session::new("u".into(), BTreeMap::new(), Duration::from_secs(60));
        assert_eq!(s.expires_at - s.created_at, 60_000);
        assert!(s.is_live(s.created_at));
        assert!(!s.is_live(s.expires_at));
        assert_eq!(s.id.get_version_num(), 7);
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn user_ids_are_checked() {
        assert!(validate_user_id("alice@example.com").is_ok());
        assert!(validate_user_id("").is_err());
        assert!(validate_user_id("a\nb").is_err());
        assert!(validate_user_id("alice, admin").is_err());
        assert!(validate_user_id("alice,admin").is_err());
        assert!(validate_user_id("a\u{85}b").is_err());
        assert!(validate_user_id("a\u{7f}b").is_err());
        assert!(validate_user_id("Zoë O'Neil").is_ok());
        assert!(validate_user_id(&"x".repeat(300)).is_err());
    }

    #[test]
    fn attributes_are_bounded() {
        let mut many = BTreeMap::new();
        for i in 0..65 {
            many.insert(format!("k{i}"), "v".into());
        }
        assert!(validate_attributes(&many).is_err());
        let big = BTreeMap::from([("k".to_string(), "v".repeat(5000))]);
        assert!(validate_attributes(&big).is_err());
        let ok = BTreeMap::from([("remember_me".to_string(), "true".to_string())]);
        assert!(validate_attributes(&ok).is_ok());
    }
}
