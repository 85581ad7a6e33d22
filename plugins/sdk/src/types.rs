//! Plain Rust versions of the WIT types, and their conversions.

use std::cell::OnceCell;
use std::collections::BTreeMap;

use crate::__private::bindings::sessiongate::policy::types as wit;

/// A string the policy may never look at: fetched from the gateway on
/// first use (in the access hook), or given up front (in the others).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Lazy(OnceCell<String>);

impl Lazy {
    fn given(value: String) -> Self {
        Lazy(OnceCell::from(value))
    }

    fn get(&self, live: bool, fetch: fn() -> String) -> &str {
        self.0
            .get_or_init(|| if live { fetch() } else { String::new() })
    }
}

/// A session as the policy sees it (never its token). Times are
/// milliseconds since the Unix epoch.
///
/// In `on_access` the times are there at once and the strings are fetched
/// from the gateway the first time the policy asks for them (each at most
/// once per call), so a policy pays only for what it reads. Build one for
/// a test with [`Session::default`] and the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Session {
    /// When the session was created.
    pub created_at: i64,
    /// When the session was last used.
    pub last_seen_at: i64,
    /// When the session expires (as set so far: by the policies before
    /// this one, or during `on_create` by the default lifetime).
    pub expires_at: i64,
    /// Fetched from the gateway when true (the access hook).
    live: bool,
    id: Lazy,
    user_id: Lazy,
    attributes: OnceCell<BTreeMap<String, String>>,
}

impl Session {
    /// The session of the access call in progress.
    pub(crate) fn live(created_at: i64, last_seen_at: i64, expires_at: i64) -> Self {
        Session {
            created_at,
            last_seen_at,
            expires_at,
            live: true,
            ..Session::default()
        }
    }

    /// The session's id: a UUID v7, as text.
    pub fn id(&self) -> &str {
        self.id.get(self.live, host::session_id)
    }

    /// The user the session belongs to.
    pub fn user_id(&self) -> &str {
        self.user_id.get(self.live, host::user_id)
    }

    /// The session's attributes (in `on_access`, all fetched at the first
    /// call of this or [`attr`](Session::attr)).
    pub fn attributes(&self) -> &BTreeMap<String, String> {
        self.attributes.get_or_init(|| {
            if self.live {
                host::session_attributes().into_iter().collect()
            } else {
                BTreeMap::new()
            }
        })
    }

    /// The attribute `key`, if the session has it.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes().get(key).map(String::as_str)
    }

    /// The attribute `key`, fetched alone: cheaper than [`attr`](Session::attr)
    /// in `on_access` for a policy that reads one attribute of sessions
    /// holding many, and the same elsewhere.
    pub fn attribute(&self, key: &str) -> Option<String> {
        match self.attributes.get() {
            Some(attributes) => attributes.get(key).cloned(),
            None if self.live => host::session_attribute(key),
            None => None,
        }
    }

    /// How long ago the session was created, in milliseconds.
    pub fn age(&self, now: i64) -> i64 {
        now.saturating_sub(self.created_at)
    }

    /// How long the session has been unused, in milliseconds.
    pub fn idle(&self, now: i64) -> i64 {
        now.saturating_sub(self.last_seen_at)
    }

    /// With this id (for tests).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Lazy::given(id.into());
        self
    }

    /// With this user (for tests).
    pub fn with_user_id(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Lazy::given(user_id.into());
        self
    }

    /// With this attribute added (for tests).
    pub fn with_attr(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let mut attributes = self.attributes.take().unwrap_or_default();
        attributes.insert(key.into(), value.into());
        self.attributes = OnceCell::from(attributes);
        self
    }

    /// With these times (for tests).
    pub fn with_times(mut self, created_at: i64, last_seen_at: i64, expires_at: i64) -> Self {
        self.created_at = created_at;
        self.last_seen_at = last_seen_at;
        self.expires_at = expires_at;
        self
    }
}

impl From<wit::Session> for Session {
    fn from(s: wit::Session) -> Self {
        Session {
            created_at: s.created_at,
            last_seen_at: s.last_seen_at,
            expires_at: s.expires_at,
            live: false,
            id: Lazy::given(s.id),
            user_id: Lazy::given(s.user_id),
            attributes: OnceCell::from(s.attributes.into_iter().collect::<BTreeMap<_, _>>()),
        }
    }
}

/// The request being authenticated (or that led to a login).
///
/// In `on_access` each string is fetched from the gateway the first time
/// the policy asks for it. Build one for a test with
/// [`RequestInfo::default`] and the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestInfo {
    live: bool,
    method: Lazy,
    path: Lazy,
    host: Lazy,
    client_addr: Lazy,
    user_agent: Lazy,
}

impl RequestInfo {
    /// The request of the access call in progress.
    pub(crate) fn live() -> Self {
        RequestInfo {
            live: true,
            ..RequestInfo::default()
        }
    }

    /// The HTTP method, e.g. `GET`.
    pub fn method(&self) -> &str {
        self.method.get(self.live, host::request_method)
    }

    /// The request's path (normalized, without the query).
    pub fn path(&self) -> &str {
        self.path.get(self.live, host::request_path)
    }

    /// The `Host` the client asked for.
    pub fn host(&self) -> &str {
        self.host.get(self.live, host::request_host)
    }

    /// The client's address.
    pub fn client_addr(&self) -> &str {
        self.client_addr.get(self.live, host::client_addr)
    }

    /// The client's `User-Agent`, or empty.
    pub fn user_agent(&self) -> &str {
        self.user_agent.get(self.live, host::user_agent)
    }

    /// With this method (for tests).
    pub fn with_method(mut self, method: impl Into<String>) -> Self {
        self.method = Lazy::given(method.into());
        self
    }

    /// With this path (for tests).
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = Lazy::given(path.into());
        self
    }

    /// With this host (for tests).
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = Lazy::given(host.into());
        self
    }

    /// With this client address (for tests).
    pub fn with_client_addr(mut self, client_addr: impl Into<String>) -> Self {
        self.client_addr = Lazy::given(client_addr.into());
        self
    }

    /// With this user agent (for tests).
    pub fn with_user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = Lazy::given(user_agent.into());
        self
    }
}

impl From<wit::RequestInfo> for RequestInfo {
    fn from(r: wit::RequestInfo) -> Self {
        RequestInfo {
            live: false,
            method: Lazy::given(r.method),
            path: Lazy::given(r.path),
            host: Lazy::given(r.host),
            client_addr: Lazy::given(r.client_addr),
            user_agent: Lazy::given(r.user_agent),
        }
    }
}

/// The gateway's answers about the access call in progress. On the host
/// target (the plugins' unit tests) nothing is live, so these are never
/// called there.
mod host {
    use crate::__private::bindings::sessiongate::policy::call;

    pub(super) fn session_id() -> String {
        call::session_id()
    }
    pub(super) fn user_id() -> String {
        call::user_id()
    }
    pub(super) fn session_attributes() -> Vec<(String, String)> {
        call::session_attributes()
    }
    pub(super) fn session_attribute(name: &str) -> Option<String> {
        call::session_attribute(name)
    }
    pub(super) fn request_method() -> String {
        call::request_method()
    }
    pub(super) fn request_path() -> String {
        call::request_path()
    }
    pub(super) fn request_host() -> String {
        call::request_host()
    }
    pub(super) fn client_addr() -> String {
        call::client_addr()
    }
    pub(super) fn user_agent() -> String {
        call::user_agent()
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
        assert_eq!(s.attribute("a").as_deref(), Some("3"));
        assert_eq!((s.id(), s.user_id()), ("id", "alice"));
        assert_eq!(s.age(11), 10);
        assert_eq!(s.idle(11), 9);
    }

    #[test]
    fn test_values_are_given_not_fetched() {
        let s = Session::default()
            .with_id("x")
            .with_user_id("bob")
            .with_attr("role", "admin")
            .with_times(1, 2, 3);
        assert_eq!(
            (s.id(), s.user_id(), s.attr("role")),
            ("x", "bob", Some("admin"))
        );
        assert_eq!(s.attribute("other"), None);
        assert_eq!((s.created_at, s.last_seen_at, s.expires_at), (1, 2, 3));
        let r = RequestInfo::default().with_path("/a").with_user_agent("ua");
        assert_eq!((r.path(), r.user_agent(), r.method()), ("/a", "ua", ""));
        // Nothing set is empty, not fetched (no host on this target).
        assert_eq!(
            (Session::default().id(), RequestInfo::default().host()),
            ("", "")
        );
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
