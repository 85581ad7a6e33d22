//! The authenticate phase: request → token → session → policy decision.
//!
//! The token is taken from `Authorization: Bearer` or the session
//! cookies, checked for shape and MAC (no store is asked for a malformed
//! one; of several, the one that verifies counts, and two different ones
//! that verify are refused), then looked up in the hybrid store; the
//! route's policy chain (`routes[].policies`, else the default chain)
//! runs its access hooks, which allow, extend or refuse. What a failure
//! means depends on the route's `auth` mode. The proxy and
//! forward-auth authenticate through the same [`Authenticator`].

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};

use crate::config::{AuthMode, RouteConfig};
use crate::error::ProxyError;
use crate::headers as h;
use crate::policy::{AccessOutcome, ChainCache, RequestInfo};
use crate::session::{self, Session};
use crate::store::SessionStore;
use crate::token::{self, TokenHash, TokenKey};

/// The token a request presented, after the shape and MAC checks.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Presented {
    Nothing,
    Malformed,
    Valid(TokenHash),
    /// Several different tokens that all verify. Never resolved by
    /// picking one: a browser lists a cookie with a longer `Path` first,
    /// so a page that plants a path-scoped session cookie would otherwise
    /// choose whose session the victim uses under that path.
    Ambiguous,
}

/// Most session tokens one request may present: each costs an HMAC, and
/// no browser holds more than a few cookies of one name.
const MAX_PRESENTED: usize = 8;

impl Presented {
    /// The outcome once one more candidate has been checked: a token that
    /// verifies wins over malformed ones, two different ones that verify
    /// are ambiguous.
    fn and(self, candidate: Result<TokenHash, token::MalformedToken>) -> Presented {
        match (self, candidate) {
            (Presented::Ambiguous, _) => Presented::Ambiguous,
            (Presented::Valid(a), Ok(b)) if a != b => Presented::Ambiguous,
            (Presented::Valid(a), _) => Presented::Valid(a),
            (_, Ok(b)) => Presented::Valid(b),
            (_, Err(_)) => Presented::Malformed,
        }
    }

    /// The stored key of a token that verified.
    pub(crate) fn key(self) -> Option<TokenHash> {
        match self {
            Presented::Valid(key) => Some(key),
            _ => None,
        }
    }
}

/// Who a request is, once authenticated.
pub(crate) struct Authenticated {
    pub(crate) presented: Presented,
    /// The live session the policies allowed; `None` on a route that
    /// does not require one.
    pub(crate) session: Option<Arc<Session>>,
}

/// The parts of a request a policy hook may see, kept (cheaply: shared
/// buffers) past forwarding for the create hooks, should the response
/// log someone in.
pub(crate) struct RequestContext {
    pub(crate) method: http::Method,
    pub(crate) uri: http::Uri,
    pub(crate) host: Option<HeaderValue>,
    pub(crate) user_agent: Option<HeaderValue>,
    pub(crate) client: IpAddr,
}

impl RequestContext {
    pub(crate) fn new(
        method: &http::Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> RequestContext {
        RequestContext {
            method: method.clone(),
            uri: uri.clone(),
            host: headers.get(header::HOST).cloned(),
            user_agent: headers.get(header::USER_AGENT).cloned(),
            client,
        }
    }

    pub(crate) fn info(&self) -> RequestInfo {
        let text = |v: &Option<HeaderValue>| {
            v.as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let host = match &self.host {
            Some(_) => text(&self.host),
            None => self
                .uri
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        };
        RequestInfo {
            method: self.method.to_string(),
            path: self.uri.path().to_string(),
            host,
            client_addr: self.client.to_string(),
            user_agent: text(&self.user_agent),
        }
    }
}

/// Settles who a request is, for the proxy and forward-auth alike.
pub struct Authenticator {
    store: SessionStore,
    token_key: TokenKey,
    cookie_name: String,
    /// `session.touch_interval`, in ms.
    touch_interval_ms: i64,
    /// This worker's handle on the running policy chains.
    chains: Arc<ChainCache>,
}

impl Authenticator {
    pub(crate) fn new(
        store: SessionStore,
        token_key: TokenKey,
        session: &crate::config::SessionConfig,
        chains: Arc<ChainCache>,
    ) -> Authenticator {
        Authenticator {
            store,
            token_key,
            cookie_name: session.cookie_name.clone(),
            touch_interval_ms: session.touch_interval.as_millis() as i64,
            chains,
        }
    }

    /// The request's token and live session, or the refusal the route's
    /// `auth` mode makes of their absence. Authentication is this, then
    /// [`Authenticator::authorize`] (the proxy and forward-auth alike).
    pub(crate) async fn identify(
        &self,
        auth: AuthMode,
        headers: &HeaderMap,
        request_id: &str,
    ) -> Result<Authenticated, ProxyError> {
        let presented = self.presented_token(headers);
        let session = match (auth, presented) {
            (AuthMode::None, _) => None,
            (AuthMode::Required, Presented::Nothing) => return Err(ProxyError::MissingSession),
            (AuthMode::Required, Presented::Malformed) => return Err(ProxyError::MalformedToken),
            (AuthMode::Required, Presented::Ambiguous) => return Err(ProxyError::InvalidSession),
            (
                AuthMode::Optional,
                Presented::Nothing | Presented::Malformed | Presented::Ambiguous,
            ) => None,
            (mode, Presented::Valid(key)) => match self.store.lookup(&key).await {
                Ok(Some(s)) => Some(s),
                Ok(None) if mode == AuthMode::Required => {
                    return Err(ProxyError::InvalidSession);
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(request_id, error = %e, "session lookup failed");
                    return Err(ProxyError::StoreUnavailable);
                }
            },
        };
        // Every arm above already refuses this; kept so that a new arm
        // can never let a required route through without a session.
        if auth == AuthMode::Required && session.is_none() {
            return Err(ProxyError::InvalidSession);
        }
        Ok(Authenticated { presented, session })
    }

    /// The access decision of `route`'s policy chain (`routes[].policies`,
    /// else the default chain) on an identified request (a policy's new
    /// expiry is written, and `last_seen_at` kept current). Separate from
    /// [`Authenticator::identify`] so that a refused request's log line
    /// still names its session.
    pub(crate) async fn authorize(
        &self,
        route: &RouteConfig,
        who: &Authenticated,
        context: &RequestContext,
    ) -> Result<(), ProxyError> {
        if let (Some(s), Presented::Valid(key)) = (&who.session, who.presented) {
            let chains = self.chains.get();
            let Some(chain) = chains.get(route.policies.as_deref()) else {
                // Only between a config reload's swap of the chains and
                // its swap of the routes: refused, never run on another
                // chain.
                tracing::error!(
                    route = %route.prefix,
                    chain = route.policies.as_deref().unwrap_or_default(),
                    "the route's policy chain is not loaded; request refused"
                );
                return Err(ProxyError::PolicyFailed);
            };
            let extend = if chain.wants_access() {
                match chain
                    .on_access(s, &Arc::new(context.info()), session::now_ms())
                    .await
                {
                    AccessOutcome::Allow => None,
                    AccessOutcome::Extend(at) => Some(at),
                    AccessOutcome::Refuse(refusal) => return Err(refusal.into()),
                }
            } else {
                None
            };
            self.note_activity(&key, s, extend).await;
        }
        Ok(())
    }

    /// Keeps `last_seen_at` current to within `session.touch_interval`
    /// (so that most requests cause no write at all) and applies a
    /// policy's new expiry.
    async fn note_activity(&self, key: &TokenHash, session: &Session, extend: Option<i64>) {
        let now = session::now_ms();
        if extend.is_some() || now - session.last_seen_at >= self.touch_interval_ms {
            let mut updated = session.clone();
            updated.last_seen_at = now;
            if let Some(at) = extend {
                updated.expires_at = at;
            }
            self.store.record_activity(key, updated).await;
        }
    }

    /// The token the request presents: bearer tokens of our shape if
    /// there are any, else the session cookies, else a bearer token of
    /// another shape (malformed). Among several candidates the one whose
    /// MAC verifies counts, never merely the first; several different
    /// ones that verify, or more than [`MAX_PRESENTED`], are ambiguous.
    pub(crate) fn presented_token(&self, headers: &HeaderMap) -> Presented {
        let mut presented = Presented::Nothing;
        let mut count = 0;
        let mut other_bearer = false;
        for bearer in h::bearer_tokens(headers) {
            if token::looks_like_token(bearer) {
                count += 1;
                if count > MAX_PRESENTED {
                    break;
                }
                presented = presented.and(self.token_key.verify(bearer));
            } else {
                other_bearer = true;
            }
        }
        if count == 0 {
            for cookie in h::cookie_values(headers, &self.cookie_name) {
                count += 1;
                if count > MAX_PRESENTED {
                    break;
                }
                presented = presented.and(self.token_key.verify(cookie));
            }
        }
        match presented {
            _ if count > MAX_PRESENTED => Presented::Ambiguous,
            Presented::Nothing if other_bearer => Presented::Malformed,
            presented => presented,
        }
    }
}
