//! The admin API, on its own listener: sessions by id and by user, the
//! policy list, and the unauthenticated `/healthz`, `/readyz` and
//! `/metrics`. Everything under `/v1/` needs `Authorization: Bearer
//! <admin.token>`, compared in constant time.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::body::{self, Body};
use crate::error::json_error;
use crate::proxy::Gateway;
use crate::session;
use crate::tls::EdgeTls;

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;

pub struct Admin {
    gateway: Arc<Gateway>,
    /// The HTTPS listener's certificates, with `[server.tls]`.
    tls: Option<Arc<EdgeTls>>,
    /// `/v1/config/reload`, and the current gateway after one.
    reload: Option<Arc<crate::reload::Reloader>>,
    /// SHA-256 of the admin token: comparing digests keeps the comparison
    /// constant-time whatever the presented token's length.
    token_digest: [u8; 32],
}

enum AdminError {
    Unauthorized,
    NotFound(&'static str),
    MethodNotAllowed,
    BadField {
        field: &'static str,
        message: String,
    },
    TooLarge,
    StoreUnavailable,
    Create(crate::error::ProxyError),
    ReloadFailed(String),
    TlsReloadFailed(String),
    ConfigReload(crate::reload::ReloadError),
    KeysReloadFailed(String),
}

impl AdminError {
    fn into_response(self, request_id: &str) -> Response<Body> {
        let (status, code, message) = match self {
            AdminError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid admin token is required (Authorization: Bearer <admin.token>)".to_string(),
            ),
            AdminError::NotFound(what) => (
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} not found"),
            ),
            AdminError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this method is not allowed on this path".to_string(),
            ),
            AdminError::BadField { field, message } => (
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("field `{field}`: {message}"),
            ),
            AdminError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body must be at most {MAX_BODY} bytes"),
            ),
            AdminError::StoreUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the session store is unavailable; try again shortly".to_string(),
            ),
            AdminError::Create(e) => return e.into_response(request_id),
            AdminError::ReloadFailed(reason) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "reload_failed",
                format!("{reason}; the previous policies stay in service"),
            ),
            AdminError::TlsReloadFailed(reason) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "reload_failed",
                format!("{reason}; the previous certificates stay in service"),
            ),
            AdminError::ConfigReload(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                e.code(),
                format!("{e}; the previous config stays in service"),
            ),
            AdminError::KeysReloadFailed(reason) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "reload_failed",
                format!("{reason}; the previous key stays in service"),
            ),
        };
        let mut resp = json_error(status, code, &message, request_id);
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<crate::store::StoreError> for AdminError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "admin: store failed");
        AdminError::StoreUnavailable
    }
}

#[derive(Deserialize)]
struct CreateSession {
    user_id: Option<serde_json::Value>,
    attributes: Option<serde_json::Value>,
}

impl Admin {
    pub fn new(gateway: Arc<Gateway>, token: &str) -> Admin {
        Admin {
            gateway,
            tls: None,
            reload: None,
            token_digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Serves `/v1/tls` and `/v1/tls/reload` for these certificates.
    pub(crate) fn with_tls(mut self, tls: Option<Arc<EdgeTls>>) -> Admin {
        self.tls = tls;
        self
    }

    /// Serves `/v1/config/reload`, and creates sessions with the
    /// reloaded session settings.
    pub(crate) fn with_reload(mut self, reload: Arc<crate::reload::Reloader>) -> Admin {
        self.reload = Some(reload);
        self
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let request_id = Uuid::now_v7().to_string();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let resp = match self.route(req).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(&request_id),
        };
        tracing::info!(
            target: "sessiongate::admin",
            request_id = %request_id,
            method = %method,
            path = %path,
            status = resp.status().as_u16(),
            "admin request"
        );
        resp
    }

    /// `GET /v1/keys`, `POST /v1/keys/reload`: the assertion keys
    /// ([`crate::assertion`]).
    fn keys(&self, method: &Method, rest: &[&str]) -> Result<Response<Body>, AdminError> {
        let Some(assertions) = self.gateway.forwarder().assertions() else {
            return Err(AdminError::NotFound("[session.assertion] configuration"));
        };
        match (method, rest) {
            (&Method::GET, []) => Ok(json(StatusCode::OK, assertions.info())),
            (&Method::POST, ["reload"]) => match assertions.reload() {
                Ok(changed) => {
                    let mut info = assertions.info();
                    info["changed"] = changed.into();
                    Ok(json(StatusCode::OK, info))
                }
                Err(e) => Err(AdminError::KeysReloadFailed(e.to_string())),
            },
            (_, [] | ["reload"]) => Err(AdminError::MethodNotAllowed),
            _ => Err(AdminError::NotFound("path")),
        }
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = crate::headers::bearer_token(req.headers()) else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        digest.ct_eq(&self.token_digest).into()
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<Body>, AdminError> {
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (req.method(), segments.as_slice()) {
            (&Method::GET, ["healthz"]) => {
                Ok(json(StatusCode::OK, serde_json::json!({"status": "ok"})))
            }
            (&Method::GET, ["readyz"]) => Ok(self.readyz().await),
            (&Method::GET, ["metrics"]) => {
                let mut resp = Response::new(body::full(self.gateway.metrics().render()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(resp)
            }
            (_, ["healthz" | "readyz" | "metrics"]) => Err(AdminError::MethodNotAllowed),
            (_, ["v1", ..]) if !self.authorized(&req) => Err(AdminError::Unauthorized),
            (&Method::POST, ["v1", "sessions"]) => self.create(req).await,
            (_, ["v1", "sessions"]) => Err(AdminError::MethodNotAllowed),
            (&Method::GET, ["v1", "sessions", id]) => {
                let id = parse_id(id)?;
                match self.gateway.store().get_by_id(id).await? {
                    Some(s) => Ok(json(
                        StatusCode::OK,
                        serde_json::to_value(s.view()).unwrap_or_default(),
                    )),
                    None => Err(AdminError::NotFound("session")),
                }
            }
            (&Method::DELETE, ["v1", "sessions", id]) => {
                let id = parse_id(id)?;
                if self.gateway.store().revoke_id(id).await? {
                    Ok(no_content())
                } else {
                    Err(AdminError::NotFound("session"))
                }
            }
            (_, ["v1", "sessions", _]) => Err(AdminError::MethodNotAllowed),
            (&Method::GET, ["v1", "users", user, "sessions"]) => {
                let user = parse_user(user)?;
                let sessions = self.gateway.store().list_user(&user).await?;
                let views: Vec<_> = sessions.iter().map(|s| s.view()).collect();
                Ok(json(
                    StatusCode::OK,
                    serde_json::json!({ "sessions": views }),
                ))
            }
            (&Method::DELETE, ["v1", "users", user, "sessions"]) => {
                let user = parse_user(user)?;
                let revoked = self.gateway.store().revoke_user(&user).await?;
                Ok(json(
                    StatusCode::OK,
                    serde_json::json!({ "revoked": revoked }),
                ))
            }
            (_, ["v1", "users", _, "sessions"]) => Err(AdminError::MethodNotAllowed),
            (&Method::GET, ["v1", "policies"]) => {
                let info = self.gateway.policies().info();
                Ok(json(StatusCode::OK, serde_json::json!(info)))
            }
            (&Method::POST, ["v1", "policies", "reload"]) => {
                match self.gateway.policies().reload().await {
                    Ok(info) => Ok(json(StatusCode::OK, serde_json::json!(info))),
                    Err(e) => Err(AdminError::ReloadFailed(e.to_string())),
                }
            }
            (_, ["v1", "policies"] | ["v1", "policies", "reload"]) => {
                Err(AdminError::MethodNotAllowed)
            }
            (&Method::POST, ["v1", "config", "reload"]) => {
                let Some(reload) = &self.reload else {
                    return Err(AdminError::NotFound("path"));
                };
                match reload.reload().await {
                    Ok(done) => Ok(json(
                        StatusCode::OK,
                        serde_json::json!({ "changed": done.changed }),
                    )),
                    Err(e) => Err(AdminError::ConfigReload(e)),
                }
            }
            (_, ["v1", "config", "reload"]) => Err(AdminError::MethodNotAllowed),
            (_, ["v1", "tls", ..]) if self.tls.is_none() => {
                Err(AdminError::NotFound("[server.tls] configuration"))
            }
            (&Method::GET, ["v1", "tls"]) => {
                let info = self.tls.as_ref().map(|t| t.info()).unwrap_or_default();
                Ok(json(
                    StatusCode::OK,
                    serde_json::json!({ "certificates": info }),
                ))
            }
            (&Method::POST, ["v1", "tls", "reload"]) => {
                let Some(tls) = &self.tls else {
                    return Err(AdminError::NotFound("[server.tls] configuration"));
                };
                match tls.reload().await {
                    Ok(info) => Ok(json(
                        StatusCode::OK,
                        serde_json::json!({ "certificates": info }),
                    )),
                    Err(e) => Err(AdminError::TlsReloadFailed(e.to_string())),
                }
            }
            (_, ["v1", "tls"] | ["v1", "tls", "reload"]) => Err(AdminError::MethodNotAllowed),
            (_, ["v1", "keys", ..]) => self.keys(req.method(), &segments[2..]),
            _ => Err(AdminError::NotFound("path")),
        }
    }

    async fn readyz(&self) -> Response<Body> {
        let tiers = self.gateway.store().health().await;
        let ready = tiers.iter().all(|t| t.ok);
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let down: Vec<&str> = tiers.iter().filter(|t| !t.ok).map(|t| t.kind).collect();
        json(
            status,
            serde_json::json!({
                "status": if ready { "ready" } else { "unavailable" },
                "down": down,
                "stores": tiers,
            }),
        )
    }

    async fn create(&self, req: Request<Incoming>) -> Result<Response<Body>, AdminError> {
        let bytes = read_body(req.into_body()).await?;
        let parsed: CreateSession =
            serde_json::from_slice(&bytes).map_err(|e| AdminError::BadField {
                field: "body",
                message: format!("must be a JSON object: {e}"),
            })?;
        let user_id = match parsed.user_id {
            Some(serde_json::Value::String(s)) => s,
            Some(_) => return Err(bad("user_id", "must be a string")),
            None => return Err(bad("user_id", "is required")),
        };
        session::validate_user_id(&user_id).map_err(|m| bad("user_id", &m))?;
        let attributes: BTreeMap<String, String> = match parsed.attributes {
            None | Some(serde_json::Value::Null) => BTreeMap::new(),
            Some(v) => serde_json::from_value(v)
                .map_err(|_| bad("attributes", "must be an object of strings"))?,
        };
        session::validate_attributes(&attributes).map_err(|m| bad("attributes", &m))?;
        let gateway = match &self.reload {
            Some(reload) => reload.current(),
            None => self.gateway.clone(),
        };
        let (token, session) = gateway
            .create_session(user_id, attributes, None)
            .await
            .map_err(AdminError::Create)?;
        let view = session.view();
        let mut value = serde_json::to_value(&view).unwrap_or_default();
        value["token"] = serde_json::Value::String(token);
        Ok(json(StatusCode::CREATED, value))
    }
}

fn bad(field: &'static str, message: &str) -> AdminError {
    AdminError::BadField {
        field,
        message: message.to_string(),
    }
}

fn parse_id(text: &str) -> Result<Uuid, AdminError> {
    Uuid::parse_str(text).map_err(|_| bad("id", "must be a session id (a UUID)"))
}

fn parse_user(text: &str) -> Result<String, AdminError> {
    let user =
        percent_decode(text).ok_or_else(|| bad("user_id", "is not valid percent-encoded UTF-8"))?;
    session::validate_user_id(&user).map_err(|m| bad("user_id", &m))?;
    Ok(user)
}

/// Decodes `%XX` escapes in a path segment.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

async fn read_body(body: Incoming) -> Result<Bytes, AdminError> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(AdminError::TooLarge),
        Err(_) => Err(bad("body", "could not be read")),
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(body::full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn no_content() -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_in_paths_are_percent_decoded() {
        assert_eq!(
            percent_decode("alice%40example.com").as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%4"), None);
        assert_eq!(percent_decode("bad%zz"), None);
    }
}
