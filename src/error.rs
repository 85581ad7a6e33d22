//! The one place where an error becomes an HTTP response.
//!
//! Every failure on the request path is a [`ProxyError`]; its variant
//! decides the status and the `code` of the contract's JSON body. The
//! message is written for the client and never carries internal detail
//! (driver errors, addresses, tokens): those go to the log instead.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{self, Body};
use crate::headers::X_REQUEST_ID;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this path")]
    NoRoute,
    #[error("this route needs a session: log in first")]
    MissingSession,
    #[error("the session token is malformed")]
    MalformedToken,
    #[error("the session is unknown, expired or revoked")]
    InvalidSession,
    #[error("{reason}")]
    PolicyDenied { status: StatusCode, reason: String },
    #[error("a session policy failed; try again shortly")]
    PolicyFailed,
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    /// What was wrong is upstream-derived text (header values): it is
    /// logged with the request id, never sent to the client.
    #[error("the upstream sent an invalid response")]
    UpstreamProtocol(String),
    #[error("the session store is unavailable; try again shortly")]
    StoreUnavailable,
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request target cannot be read one way only (or is a CONNECT /
    /// `OPTIONS *` target). The message names no internal detail.
    #[error("the request path is not allowed")]
    InvalidPath,
    /// A request header the gateway refuses (a look-alike of a header it
    /// owns, with `session.lookalike_headers = "reject"`).
    #[error("the request carries a header that is not allowed: {0}")]
    ForbiddenHeader(String),
    /// The client's body was malformed or broke off.
    #[error("the request body is malformed or incomplete")]
    InvalidBody,
    /// The client's body is larger than the route accepts.
    #[error("the request body is too large")]
    BodyTooLarge,
    /// The client stopped sending its body.
    #[error("the request body was not sent in time")]
    BodyTimeout,
}

impl From<crate::policy::Refusal> for ProxyError {
    fn from(r: crate::policy::Refusal) -> Self {
        match r {
            crate::policy::Refusal::Denied { status, reason } => {
                ProxyError::PolicyDenied { status, reason }
            }
            crate::policy::Refusal::Failed { .. } => ProxyError::PolicyFailed,
        }
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MissingSession
            | ProxyError::MalformedToken
            | ProxyError::InvalidSession => StatusCode::UNAUTHORIZED,
            ProxyError::PolicyDenied { status, .. } => *status,
            ProxyError::PolicyFailed => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable | ProxyError::UpstreamProtocol(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadRequest(_)
            | ProxyError::InvalidPath
            | ProxyError::ForbiddenHeader(_)
            | ProxyError::InvalidBody => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::MissingSession => "session_required",
            ProxyError::MalformedToken => "malformed_token",
            ProxyError::InvalidSession => "invalid_session",
            ProxyError::PolicyDenied { .. } => "policy_denied",
            ProxyError::PolicyFailed => "policy_failed",
            ProxyError::UpstreamUnreachable => "upstream_unreachable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::UpstreamProtocol(_) => "upstream_invalid_response",
            ProxyError::StoreUnavailable => "store_unavailable",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::InvalidPath => "invalid_path",
            ProxyError::ForbiddenHeader(_) => "forbidden_header",
            ProxyError::InvalidBody => "invalid_body",
            ProxyError::BodyTooLarge => "body_too_large",
            ProxyError::BodyTimeout => "body_timeout",
        }
    }

    pub fn is_auth_failure(&self) -> bool {
        self.status() == StatusCode::UNAUTHORIZED
    }

    /// The response the client gets for this error.
    pub fn into_response(self, request_id: &str) -> Response<Body> {
        if let ProxyError::UpstreamProtocol(detail) = &self {
            // Debug-quoted: the text came from the upstream and may hold
            // anything a header value can.
            tracing::warn!(request_id, detail = ?detail, "the upstream sent an invalid response");
        }
        let status = self.status();
        let mut resp = json_error(status, self.code(), &self.to_string(), request_id);
        if self.is_auth_failure() {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// A response with the contract's error body.
pub fn json_error(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &str,
) -> Response<Body> {
    let body = serde_json::json!({
        "error": { "code": code, "message": message, "request_id": request_id }
    });
    let mut resp = Response::new(body::full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(X_REQUEST_ID, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// The error-to-status table, locked.
    #[test]
    fn each_error_has_its_status_and_code() {
        let table = [
            (ProxyError::NoRoute, 404, "no_route"),
            (ProxyError::MissingSession, 401, "session_required"),
            (ProxyError::MalformedToken, 401, "malformed_token"),
            (ProxyError::InvalidSession, 401, "invalid_session"),
            (ProxyError::UpstreamUnreachable, 502, "upstream_unreachable"),
            (ProxyError::UpstreamTimeout, 504, "upstream_timeout"),
            (ProxyError::StoreUnavailable, 503, "store_unavailable"),
            (ProxyError::PolicyFailed, 503, "policy_failed"),
            (ProxyError::InvalidPath, 400, "invalid_path"),
            (
                ProxyError::ForbiddenHeader("x".into()),
                400,
                "forbidden_header",
            ),
            (ProxyError::InvalidBody, 400, "invalid_body"),
            (ProxyError::BodyTooLarge, 413, "body_too_large"),
            (ProxyError::BodyTimeout, 408, "body_timeout"),
            (
                ProxyError::PolicyDenied {
                    status: StatusCode::FORBIDDEN,
                    reason: "no".into(),
                },
                403,
                "policy_denied",
            ),
        ];
        for (err, status, code) in table {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.code(), code);
        }
    }

    #[tokio::test]
    async fn upstream_text_stays_out_of_the_body() {
        let resp = ProxyError::UpstreamProtocol("upstream said <secret-detail>".into())
            .into_response("req-2");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("upstream_invalid_response"), "{text}");
        assert!(!text.contains("secret-detail"), "{text}");
    }

    #[tokio::test]
    async fn the_body_has_the_contract_shape() {
        let resp = ProxyError::MissingSession.into_response("req-1");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["code"], "session_required");
        assert_eq!(v["error"]["request_id"], "req-1");
        assert!(v["error"]["message"].as_str().unwrap().len() > 5);
    }
}
