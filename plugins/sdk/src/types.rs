//! Plain Rust versions of the WIT types, and their conversions.

use std::collections::BTreeMap;

use crate::__private::bindings::sessiongate::policy::types as wit;

/// A session as the policy sees it (never its token). Times are
/// milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Session {
    /// UUID v7, as text.
    pub id: String,
    /// The user the session belongs to.
    pub user_id: String,
    /// When the session was created.
    pub created_at: i64,
    /// When the session was last used.
    pub last_seen_at: i64,
    /// When the session expires (as set so far, during `on_create`).
    pub expires_at: i64,
    /// The session's attributes (if the gateway sends a key twice, the
    /// last value wins).
    pub attributes: BTreeMap<String, String>,
}

impl Session {
    /// The attribute `key`, if the session has it.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// How long ago the session was created, in milliseconds.
    pub fn age(&self, now: i64) -> i64 {
        now.saturating_sub(self.created_at)
    }

    /// How long the session has been unused, in milliseconds.
    pub fn idle(&self, now: i64) -> i64 {
        now.saturating_sub(self.last_seen_at)
    }
}

impl From<wit::Session> for Session {
    fn from(s: wit::Session) -> Self {
        Session {
            id: s.id,
            user_id: s.user_id,
            created_at: s.created_at,
            last_seen_at: s.last_seen_at,
            expires_at: s.expires_at,
            attributes: s.attributes.into_iter().collect(),
        }
    }
}

/// The request being authenticated (or that led to a login).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestInfo {
    /// The HTTP method, e.g. `GET`.
    pub method: String,
    /// The request's path (without the query).
    pub path: String,
    /// The `Host` the client asked for.
    pub host: String,
    /// The client's address.
    pub client_addr: String,
    /// The client's `User-Agent`, or empty.
    pub user_agent: String,
}

impl From<wit::RequestInfo> for RequestInfo {
    fn from(r: wit::RequestInfo) -> Self {
        RequestInfo {
            method: r.method,
            path: r.path,
            host: r.host,
            client_addr: r.client_addr,
            user_agent: r.user_agent,
        }
    }
}

/// A refusal: the status the client gets (a 4xx; the gateway rejects
/// anything else as a policy error) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The HTTP status, 400-499.
    pub status: u16,
    /// Why, for the client and the log.
    pub reason: String,
}

impl Denial {
    /// A denial with this status and reason.
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        Denial {
            status,
            reason: reason.into(),
        }
    }

    /// 401 Unauthorized: the session is no good any more.
    pub fn unauthorized(reason: impl Into<String>) -> Self {
        Denial::new(401, reason)
    }

    /// 403 Forbidden: the session is fine but may not do this.
    pub fn forbidden(reason: impl Into<String>) -> Self {
        Denial::new(403, reason)
    }
}

impl From<Denial> for wit::Denial {
    fn from(d: Denial) -> Self {
        wit::Denial {
            status: d.status,
            reason: d.reason,
        }
    }
}

/// What a policy does to a session being created.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Creation {
    /// A new expiry; `None` keeps what earlier policies (or the default
    /// lifetime) set.
    pub expires_at: Option<i64>,
    /// Attributes to add or replace.
    pub attributes: BTreeMap<String, String>,
}

impl Creation {
    /// Changes nothing.
    pub fn unchanged() -> Self {
        Creation::default()
    }

    /// Sets the session's expiry.
    pub fn expire_at(mut self, expires_at: i64) -> Self {
        self.expires_at = Some(expires_at);
        self
    }

    /// Adds or replaces an attribute.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }
}

impl From<Creation> for wit::Creation {
    fn from(c: Creation) -> Self {
        wit::Creation {
            expires_at: c.expires_at,
            attributes: c.attributes.into_iter().collect(),
        }
    }
}

/// What a policy decides about an authenticated request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Access {
    /// Let it through.
    #[default]
    Allow,
    /// Let it through and move the session's expiry to this time.
    Extend(i64),
    /// Refuse it.
    Deny(Denial),
}

impl Access {
    /// Refuse with this status (4xx) and reason.
    pub fn deny(status: u16, reason: impl Into<String>) -> Self {
        Access::Deny(Denial::new(status, reason))
    }
}

impl From<Access> for wit::Access {
    fn from(a: Access) -> Self {
        match a {
            Access::Allow => wit::Access::Allow,
            Access::Extend(at) => wit::Access::Extend(at),
            Access::Deny(d) => wit::Access::Deny(d.into()),
        }
    }
}

/// Which hooks a policy implements; the gateway calls only those.
///
/// ```
/// use sessiongate_policy::Hooks;
/// let hooks = Hooks::NONE.with_create().with_access();
/// assert!(hooks.on_create && hooks.on_access && !hooks.on_evict);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hooks {
    /// `on_create` is implemented.
    pub on_create: bool,
    /// `on_access` is implemented.
    pub on_access: bool,
    /// `on_evict` is implemented.
    pub on_evict: bool,
}

impl Hooks {
    /// No hook.
    pub const NONE: Hooks = Hooks {
        on_create: false,
        on_access: false,
        on_evict: false,
    };

    /// All three hooks.
    pub const ALL: Hooks = Hooks {
        on_create: true,
        on_access: true,
        on_evict: true,
    };

    /// Also `on_create`.
    pub const fn with_create(self) -> Self {
        Hooks {
            on_create: true,
            ..self
        }
    }

    /// Also `on_access`.
    pub const fn with_access(self) -> Self {
        Hooks {
            on_access: true,
            ..self
        }
    }

    /// Also `on_evict`.
    pub const fn with_evict(self) -> Self {
        Hooks {
            on_evict: true,
            ..self
        }
    }
}

impl From<Hooks> for wit::Hooks {
    fn from(h: Hooks) -> Self {
        wit::Hooks {
            on_create: h.on_create,
            on_access: h.on_access,
            on_evict: h.on_evict,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_from_wit_collects_attributes_last_wins() {
        let s = Session::from(wit::Session {
            id: "id".into(),
            user_id: "alice".into(),
            created_at: 1,
            last_seen_at: 2,
            expires_at: 3,
            attributes: vec![
                ("a".into(), "1".into()),
                ("b".into(), "2".into()),
                ("a".into(), "3".into()),
            ],
        });
        assert_eq!(s.attr("a"), Some("3"));
        assert_eq!(s.attr("b"), Some("2"));
        assert_eq!(s.attr("c"), None);
        assert_eq!(s.age(11), 10);
        assert_eq!(s.idle(11), 9);
    }

    #[test]
    fn conversions_to_wit() {
        let c: wit::Creation = Creation::unchanged().expire_at(5).set("k", "v").into();
        assert_eq!(c.expires_at, Some(5));
        assert_eq!(c.attributes, vec![("k".to_string(), "v".to_string())]);
        match wit::Access::from(Access::deny(403, "no")) {
            wit::Access::Deny(d) => assert_eq!((d.status, d.reason.as_str()), (403, "no")),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            wit::Access::from(Access::Extend(9)),
            wit::Access::Extend(9)
        ));
        let h: wit::Hooks = Hooks::NONE.with_evict().into();
        assert!(!h.on_create && !h.on_access && h.on_evict);
    }
}
