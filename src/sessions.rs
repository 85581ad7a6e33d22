//! The session service: where sessions begin and end. The proxy (the
//! `x-sessiongate-*` directives of upstream responses), the admin API
//! and forward-auth all create, revoke and evict through it, so that the
//! policy hooks, the no-fixation rule and the cookie are the same
//! whichever way a session comes.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};

use crate::authn::RequestContext;
use crate::config::SessionConfig;
use crate::error::ProxyError;
use crate::headers as h;
use crate::policy::{ChainCache, Refusal, RequestInfo};
use crate::session::{self, Session};
use crate::store::{SessionStore, StoreError};
use crate::token::{TokenHash, TokenKey};

pub struct SessionService {
    store: SessionStore,
    token_key: TokenKey,
    config: SessionConfig,
    /// This worker's handle on the running policy chains.
    chains: Arc<ChainCache>,
}

impl SessionService {
    pub(crate) fn new(
        store: SessionStore,
        token_key: TokenKey,
        config: SessionConfig,
        chains: Arc<ChainCache>,
    ) -> SessionService {
        SessionService {
            store,
            token_key,
            config,
            chains,
        }
    }

    /// The store behind the service (the admin API reads through it).
    pub fn store(&self) -> &SessionStore {
        &self.store
    }

    /// Creates a durable session for `user_id` through the default policy
    /// chain (create hooks, then eviction of the user's other sessions);
    /// returns its token (the only copy there will ever be) and the
    /// session. The admin API creates sessions this way.
    pub async fn create(
        &self,
        user_id: String,
        attributes: BTreeMap<String, String>,
        request: Option<&RequestInfo>,
    ) -> Result<(String, Arc<Session>), ProxyError> {
        self.create_on(None, user_id, attributes, request).await
    }

    /// Creates a session as [`SessionService::create`] does, through the
    /// chain `chain` names (a route's `policies`; `None`: the default).
    pub(crate) async fn create_on(
        &self,
        chain: Option<&str>,
        user_id: String,
        attributes: BTreeMap<String, String>,
        request: Option<&RequestInfo>,
    ) -> Result<(String, Arc<Session>), ProxyError> {
        let chains = self.chains.get();
        let Some(chain) = chains.get(chain) else {
            tracing::error!(
                chain = chain.unwrap_or_default(),
                "the route's policy chain is not loaded; login refused"
            );
            return Err(ProxyError::PolicyFailed);
        };
        let now = session::now_ms();
        let mut session = Session::new(user_id, attributes, self.config.default_ttl);
        chain
            .on_create(&mut session, request, now)
            .await
            .map_err(|r: Refusal| ProxyError::from(r))?;
        let (token, key) = self.token_key.issue();
        let session = self.store.create(&key, session).await.map_err(store_down)?;
        if chain.wants_evict() {
            match self.store.list_user(&session.user_id).await {
                Ok(live) => {
                    for id in chain.on_evict(&session, &live, now).await {
                        match self.store.revoke_id(id).await {
                            Ok(_) => {
                                tracing::info!(session_id = %id, user = %session.user_id, "session evicted by policy")
                            }
                            Err(e) => {
                                tracing::warn!(session_id = %id, error = %e, "eviction failed")
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not list sessions for eviction"),
            }
        }
        Ok((token, session))
    }

    /// Revokes the session of a presented token.
    pub(crate) async fn revoke(&self, key: &TokenHash) -> Result<(), ProxyError> {
        self.store.revoke(key).await.map(drop).map_err(store_down)
    }

    /// Revokes every session of the user of `session` (or, without one,
    /// of the presented token's session).
    pub(crate) async fn revoke_all_of(
        &self,
        session: Option<&Session>,
        key: Option<TokenHash>,
    ) -> Result<(), ProxyError> {
        let user = match (session, key) {
            (Some(s), _) => Some(s.user_id.clone()),
            (None, Some(key)) => self
                .store
                .lookup(&key)
                .await
                .map_err(store_down)?
                .map(|s| s.user_id.clone()),
            (None, None) => None,
        };
        if let Some(user) = user {
            self.store.revoke_user(&user).await.map_err(store_down)?;
        }
        Ok(())
    }

    /// Acts on `x-sessiongate-login` / `-attributes` / `-logout` in an
    /// upstream response and removes them; a new session or a logout
    /// becomes `Set-Cookie`. A login runs the create and eviction hooks of
    /// `chain`: the chain of the route the response came through.
    pub(crate) async fn apply_directives(
        &self,
        chain: Option<&str>,
        headers: &mut HeaderMap,
        presented: Option<TokenHash>,
        session: Option<&Session>,
        context: &RequestContext,
    ) -> Result<(), ProxyError> {
        // Most responses carry none: look at the names present once
        // instead of hashing all three.
        if !h::contains_any(headers, &[&h::SG_LOGIN, &h::SG_ATTRIBUTES, &h::SG_LOGOUT]) {
            return Ok(());
        }
        let login = headers.remove(h::SG_LOGIN);
        let attributes = headers.remove(h::SG_ATTRIBUTES);
        let logout = headers.remove(h::SG_LOGOUT);

        if let Some(logout) = logout {
            match logout.as_bytes() {
                b"current" => {
                    if let Some(key) = presented {
                        self.revoke(&key).await?;
                    }
                }
                b"all" => self.revoke_all_of(session, presented).await?,
                other => {
                    return Err(ProxyError::UpstreamProtocol(format!(
                        "x-sessiongate-logout must be \"current\" or \"all\", not {:?}",
                        String::from_utf8_lossy(other)
                    )));
                }
            }
            if login.is_none() {
                headers.append(header::SET_COOKIE, self.cookie(None));
            }
        }

        if let Some(login) = login {
            let user_id = login
                .to_str()
                .map_err(|_| {
                    ProxyError::UpstreamProtocol("x-sessiongate-login is not text".into())
                })?
                .to_string();
            session::validate_user_id(&user_id)
                .map_err(|m| ProxyError::UpstreamProtocol(format!("x-sessiongate-login {m}")))?;
            let attributes = match attributes {
                None => BTreeMap::new(),
                Some(v) => parse_attributes(v.as_bytes())?,
            };
            // No fixation: the session the request came with ends here.
            if let Some(key) = presented {
                self.revoke(&key).await?;
            }
            let (token, session) = self
                .create_on(chain, user_id, attributes, Some(&context.info()))
                .await?;
            headers.append(header::SET_COOKIE, self.login_cookie(&token, &session));
        }
        Ok(())
    }

    /// The `Set-Cookie` value that hands `token` of `session` to a browser.
    pub(crate) fn login_cookie(&self, token: &str, session: &Session) -> HeaderValue {
        // Rounded up: a cookie that dies a second early logs users out early.
        let max_age = (session.remaining_ms(session::now_ms()) + 999) / 1000;
        self.cookie(Some((token, max_age)))
    }

    /// A `Set-Cookie` value carrying `token` for `max_age` seconds, or
    /// clearing the cookie.
    pub(crate) fn cookie(&self, token: Option<(&str, i64)>) -> HeaderValue {
        let s = &self.config;
        let secure = if s.cookie_secure { "; Secure" } else { "" };
        let (value, max_age) = token.unwrap_or(("", 0));
        let text = format!(
            "{}={value}; Path=/; HttpOnly; SameSite=Lax{secure}; Max-Age={max_age}",
            s.cookie_name
        );
        HeaderValue::from_str(&text).expect("cookie names and tokens are header-safe")
    }
}

fn store_down(e: StoreError) -> ProxyError {
    tracing::error!(error = %e, "session store write failed");
    ProxyError::StoreUnavailable
}

fn parse_attributes(bytes: &[u8]) -> Result<BTreeMap<String, String>, ProxyError> {
    let attributes: BTreeMap<String, String> = serde_json::from_slice(bytes).map_err(|e| {
        ProxyError::UpstreamProtocol(format!(
            "x-sessiongate-attributes must be a JSON object of strings: {e}"
        ))
    })?;
    session::validate_attributes(&attributes)
        .map_err(|m| ProxyError::UpstreamProtocol(format!("x-sessiongate-attributes: {m}")))?;
    Ok(attributes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_must_be_an_object_of_strings() {
        assert!(parse_attributes(br#"{"a":"b"}"#).is_ok());
        assert!(parse_attributes(br#"{"a":1}"#).is_err());
        assert!(parse_attributes(b"[]").is_err());
        assert!(parse_attributes(b"nope").is_err());
    }
}
