//! Signed identity for upstreams: a short-lived ES256 JWT per request
//! (`session.assertion`), the JWKS document that verifies it, key reloads
//! without a restart, and the per-route session attributes forwarded as
//! `x-sessiongate-attr-<name>` headers.
//!
//! An upstream behind the gateway can trust the identity headers only as
//! far as it trusts the network path; an assertion it verifies against
//! the gateway's public keys holds wherever it came from. It is minted
//! per request (no cache: a session's attributes and expiry may change
//! between requests) and lives `session.assertion.ttl_seconds`, never
//! past the session's own expiry.
//!
//! The key is one P-256 key: from `session.assertion.key_file` (PKCS#8
//! PEM, checked while the configuration is validated), or generated once
//! and kept in the durable store like the token MAC key, so that every
//! instance sharing the store signs with the same key. `POST
//! /v1/keys/reload` (admin API) re-reads the key file: the new key signs
//! from then on, in every worker (one [`Assertions`] behind an `Arc`,
//! the key set behind an [`ArcSwap`]), and the old public key stays in
//! the JWKS for the assertion lifetime plus a minute, so that assertions
//! already on their way still verify.
//!
//! Compact JWS (RFC 7515) is made here rather than by a JWT crate: the
//! gateway only signs, with one algorithm, and `ring` (already the TLS
//! provider) does the cryptography.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::body::{self, Body};
use crate::config::RouteConfig;
use crate::session::Session;

/// `session.assertion.header` when not set.
pub const DEFAULT_HEADER: &str = "x-sessiongate-assertion";
/// Where the proxy listener serves the public keys.
pub const JWKS_PATH: &str = "/.well-known/sessiongate/jwks.json";
/// `routes[].forward_attributes` become headers named this plus the
/// attribute's name.
pub const ATTRIBUTE_HEADER_PREFIX: &str = "x-sessiongate-attr-";
/// The durable store's name for a generated signing key.
const STORE_SECRET: &str = "assertion_signing_key";
/// How long past the assertion lifetime a replaced key stays published:
/// clock skew and upstreams that fetched the JWKS just before a reload.
const RETIRED_MARGIN_SECS: i64 = 60;
/// Replaced keys still published, at most (older ones go first).
const MAX_RETIRED: usize = 8;
/// How long clients may cache the JWKS: short, so that a new key is seen
/// soon (verifiers should also refetch on an unknown `kid`).
const JWKS_MAX_AGE_SECS: u64 = 30;
/// Bounds on the configured lists and names.
const MAX_NAMES: usize = 16;
const MAX_NAME_BYTES: usize = 64;
const MAX_TTL_SECS: u64 = 3_600;
/// Claims the gateway sets itself: no attribute may take their place.
const REGISTERED_CLAIMS: &[&str] = &["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "sid"];

/// `[session.assertion]` as written.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawAssertion {
    /// Keys we do not know: reported, all of them, as problems.
    #[serde(flatten)]
    unknown: BTreeMap<String, figment::value::Value>,
    enabled: Option<bool>,
    header: Option<String>,
    ttl_seconds: Option<u64>,
    issuer: Option<String>,
    key_file: Option<String>,
    claims: Option<Vec<String>>,
}

/// `[session.assertion]`, validated; present only when enabled.
#[derive(Debug, Clone)]
pub struct AssertionConfig {
    /// The request header the assertion goes in.
    pub header: HeaderName,
    /// The assertion's lifetime (`exp - iat`).
    pub ttl: Duration,
    /// The `iss` claim, when set.
    pub issuer: Option<String>,
    /// The signing key's PEM file; without one, a generated key kept in
    /// the durable store.
    pub key_file: Option<PathBuf>,
    /// Session attributes copied into the assertion as claims.
    pub claims: Vec<String>,
}

/// One `routes[].forward_attributes` entry: the session attribute and its
/// header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedAttribute {
    pub name: String,
    pub header: HeaderName,
}

/// Validates `[session.assertion]`; `None` when it is absent or not
/// enabled. Problems go to `problem` (key, message).
pub(crate) fn config(
    raw: Option<RawAssertion>,
    base: &Path,
    problem: &mut dyn FnMut(String, String),
) -> Option<AssertionConfig> {
    let raw = raw?;
    for key in raw.unknown.keys() {
        problem(format!("session.assertion.{key}"), "unknown key".into());
    }
    let text = raw.header.as_deref().unwrap_or(DEFAULT_HEADER);
    let header = match HeaderName::from_bytes(text.as_bytes()) {
        // Only a name in the gateway's namespace is sure to be removed
        // from every client request (look-alikes included) before the
        // gateway sets it.
        Ok(name)
            if name.as_str().starts_with(crate::headers::SG_PREFIX)
                && !name.as_str().starts_with(ATTRIBUTE_HEADER_PREFIX)
                && !crate::headers::is_reserved(&name) =>
        {
            Some(name)
        }
        _ => {
            problem(
                "session.assertion.header".into(),
                format!(
                    "{text:?} must be a header name starting with \"x-sessiongate-\" \
                     (which the gateway removes from every client request), \
                     not an x-sessiongate-attr-* or directive header"
                ),
            );
            None
        }
    };
    let ttl = raw.ttl_seconds.unwrap_or(60);
    if ttl == 0 || ttl > MAX_TTL_SECS {
        problem(
            "session.assertion.ttl_seconds".into(),
            format!("must be between 1 and {MAX_TTL_SECS}"),
        );
    }
    if let Some(issuer) = &raw.issuer
        && (issuer.is_empty() || issuer.len() > 256 || issuer.chars().any(char::is_control))
    {
        problem(
            "session.assertion.issuer".into(),
            "must be 1 to 256 characters, without control characters".into(),
        );
    }
    let claims = raw.claims.unwrap_or_default();
    if claims.len() > MAX_NAMES {
        problem(
            "session.assertion.claims".into(),
            format!("at most {MAX_NAMES} attributes"),
        );
    }
    for (i, name) in claims.iter().enumerate() {
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME_BYTES
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
        if !valid {
            problem(
                format!("session.assertion.claims[{i}]"),
                format!(
                    "{name:?} must be 1 to {MAX_NAME_BYTES} letters, digits, '_', '-', '.' or ':'"
                ),
            );
        } else if REGISTERED_CLAIMS.contains(&name.as_str()) {
            problem(
                format!("session.assertion.claims[{i}]"),
                format!("{name:?} is a claim the gateway sets itself"),
            );
        } else if claims[..i].contains(name) {
            problem(
                format!("session.assertion.claims[{i}]"),
                format!("{name:?} is listed twice"),
            );
        }
    }
    let key_file = match raw.key_file {
        Some(f) if f.is_empty() => {
            problem(
                "session.assertion.key_file".into(),
                "must be a path (or left out for a generated key)".into(),
            );
            None
        }
        Some(f) => Some(base.join(f)),
        None => None,
    };
    // The file is read here so that a bad one is a startup (and
    // `sessiongate check`) error naming its key, not a failure later.
    if raw.enabled == Some(true)
        && let Some(path) = &key_file
        && let Err(e) = read_key_file(path).and_then(|k| SigningKey::new(&k))
    {
        problem("session.assertion.key_file".into(), e);
    }
    if raw.enabled != Some(true) {
        return None;
    }
    Some(AssertionConfig {
        header: header?,
        ttl: Duration::from_secs(ttl.clamp(1, MAX_TTL_SECS)),
        issuer: raw.issuer,
        key_file,
        claims,
    })
}

/// Validates `routes[i].forward_attributes`.
pub(crate) fn forward_attributes(
    names: Option<Vec<String>>,
    key: &str,
    problem: &mut dyn FnMut(String, String),
) -> Vec<ForwardedAttribute> {
    let names = names.unwrap_or_default();
    if names.len() > MAX_NAMES {
        problem(key.to_string(), format!("at most {MAX_NAMES} attributes"));
    }
    let mut out: Vec<ForwardedAttribute> = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        // Lowercase, and no '_': a header name that reads one way to
        // HTTP and another to a CGI-style server is not one we send.
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME_BYTES
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let header = valid
            .then(|| HeaderName::from_bytes(format!("{ATTRIBUTE_HEADER_PREFIX}{name}").as_bytes()))
            .and_then(Result::ok);
        match header {
            None => problem(
                format!("{key}[{i}]"),
                format!(
                    "{name:?} must be 1 to {MAX_NAME_BYTES} lowercase letters, digits or '-' \
                     (it becomes the header {ATTRIBUTE_HEADER_PREFIX}<name>)"
                ),
            ),
            Some(_) if out.iter().any(|a| a.name == name) => {
                problem(format!("{key}[{i}]"), format!("{name:?} is listed twice"));
            }
            Some(header) => out.push(ForwardedAttribute { name, header }),
        }
    }
    out
}

/// Validates `routes[i].audience`.
pub(crate) fn audience(
    value: Option<String>,
    key: &str,
    problem: &mut dyn FnMut(String, String),
) -> Option<String> {
    let value = value?;
    if value.is_empty() || value.len() > 256 || value.chars().any(char::is_control) {
        problem(
            key.to_string(),
            "must be 1 to 256 characters, without control characters".into(),
        );
    }
    Some(value)
}

/// The PKCS#8 DER of a PEM key file that only its owner (and group) can
/// read and only its owner can write.
fn read_key_file(path: &Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o026 != 0 {
            return Err(format!(
                "{shown}: a private key other users can read or write (mode {mode:04o}): chmod 600 it"
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    match PrivateKeyDer::from_pem_file(path) {
        Ok(PrivateKeyDer::Pkcs8(der)) => Ok(der.secret_pkcs8_der().to_vec()),
        Ok(_) => Err(format!(
            "{shown}: not a PKCS#8 P-256 key (\"BEGIN PRIVATE KEY\"); make one with \
             `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`, or convert \
             with `openssl pkcs8 -topk8 -nocrypt`"
        )),
        Err(rustls::pki_types::pem::Error::Io(e)) => Err(format!("cannot read {shown}: {e}")),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            Err(format!("{shown}: holds no PEM private key"))
        }
        Err(e) => Err(format!("{shown}: not a valid PEM file: {e}")),
    }
}

/// A signing key with what never changes for it: its `kid`, the encoded
/// JWS header and its public JWK.
struct SigningKey {
    pair: EcdsaKeyPair,
    kid: String,
    /// `base64url({"alg":"ES256","kid":…,"typ":"JWT"})`.
    header: String,
    jwk: serde_json::Value,
}

impl SigningKey {
    fn new(pkcs8: &[u8]) -> Result<SigningKey, String> {
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|e| format!("not a P-256 (prime256v1) key usable for ES256: {e}"))?;
        // The uncompressed point: 0x04, x, y.
        let point = pair.public_key().as_ref();
        if point.len() != 65 || point[0] != 4 {
            return Err("the public key is not an uncompressed P-256 point".into());
        }
        let x = B64.encode(&point[1..33]);
        let y = B64.encode(&point[33..]);
        let kid = thumbprint(&x, &y);
        let header = B64.encode(
            serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"})
                .to_string()
                .as_bytes(),
        );
        let jwk = serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": x,
            "y": y,
            "kid": kid,
            "alg": "ES256",
            "use": "sig",
        });
        Ok(SigningKey {
            pair,
            kid,
            header,
            jwk,
        })
    }
}

/// The RFC 7638 thumbprint of a P-256 public key: SHA-256 of its
/// required members, in lexicographic order, without whitespace.
fn thumbprint(x: &str, y: &str) -> String {
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    B64.encode(Sha256::digest(canonical.as_bytes()))
}

/// A replaced key, published until `until` (Unix seconds).
#[derive(Clone)]
struct Retired {
    kid: String,
    jwk: serde_json::Value,
    until: i64,
}

struct KeySet {
    current: SigningKey,
    retired: Vec<Retired>,
}

/// The signer, its key set and the JWKS: one per gateway process, shared
/// by every worker.
pub struct Assertions {
    config: AssertionConfig,
    keys: ArcSwap<KeySet>,
    /// One reload at a time: two at once could each retire the same key
    /// and lose the other's.
    reload: Mutex<()>,
    rng: SystemRandom,
}

/// Why a key reload failed; the old key stays in service.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "session.assertion.key_file is not set: the generated key is not reloaded (set a key file to rotate keys)"
    )]
    NoKeyFile,
    #[error("session.assertion.key_file: {0}")]
    Key(String),
}

impl Assertions {
    /// The signer of `config`: its key file's key, else the one kept in
    /// `durable` (generated and stored there on the first start).
    pub async fn start(
        config: &AssertionConfig,
        durable: &dyn crate::store::DurableTier,
    ) -> Result<Assertions, String> {
        let pkcs8 = match &config.key_file {
            Some(path) => read_key_file(path)?,
            None => {
                let fresh = EcdsaKeyPair::generate_pkcs8(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    &SystemRandom::new(),
                )
                .map_err(|_| "cannot generate a P-256 key".to_string())?;
                durable
                    .secret(STORE_SECRET, fresh.as_ref())
                    .await
                    .map_err(|e| format!("cannot keep the assertion key in the store: {e}"))?
            }
        };
        Assertions::with_key(config.clone(), &pkcs8)
    }

    /// The signer of `config` with the PKCS#8 key `pkcs8`.
    pub fn with_key(config: AssertionConfig, pkcs8: &[u8]) -> Result<Assertions, String> {
        let current = SigningKey::new(pkcs8)?;
        Ok(Assertions {
            config,
            keys: ArcSwap::from_pointee(KeySet {
                current,
                retired: Vec::new(),
            }),
            reload: Mutex::new(()),
            rng: SystemRandom::new(),
        })
    }

    pub fn config(&self) -> &AssertionConfig {
        &self.config
    }

    /// The `kid` of the key that signs now.
    pub fn signing_kid(&self) -> String {
        self.keys.load().current.kid.clone()
    }

    /// An assertion of `session` for `audience`, issued at `now_ms`.
    /// `None` only if signing fails (never expected of `ring`).
    pub fn sign(&self, session: &Session, audience: &str, now_ms: i64) -> Option<HeaderValue> {
        let iat = now_ms.div_euclid(1000);
        let exp = (iat + self.config.ttl.as_secs() as i64).min(session.expires_at.div_euclid(1000));
        let mut claims = serde_json::Map::new();
        for name in &self.config.claims {
            if let Some(value) = session.attributes.get(name) {
                claims.insert(name.clone(), value.clone().into());
            }
        }
        claims.insert("sub".into(), session.user_id.clone().into());
        claims.insert("sid".into(), session.id.hyphenated().to_string().into());
        claims.insert("aud".into(), audience.into());
        claims.insert("iat".into(), iat.into());
        claims.insert("exp".into(), exp.into());
        if let Some(issuer) = &self.config.issuer {
            claims.insert("iss".into(), issuer.clone().into());
        }
        let payload = serde_json::to_vec(&claims).ok()?;

        let keys = self.keys.load();
        let key = &keys.current;
        let mut token = String::with_capacity(key.header.len() + payload.len() * 4 / 3 + 96);
        token.push_str(&key.header);
        token.push('.');
        B64.encode_string(&payload, &mut token);
        let signature = key.pair.sign(&self.rng, token.as_bytes()).ok()?;
        token.push('.');
        B64.encode_string(signature.as_ref(), &mut token);
        HeaderValue::from_maybe_shared(bytes::Bytes::from(token)).ok()
    }

    /// The JWKS document at `now_ms`: the signing key first, then the
    /// replaced keys still published.
    pub fn jwks(&self, now_ms: i64) -> serde_json::Value {
        let now = now_ms.div_euclid(1000);
        let keys = self.keys.load();
        let mut list = vec![keys.current.jwk.clone()];
        list.extend(
            keys.retired
                .iter()
                .filter(|r| r.until > now)
                .map(|r| r.jwk.clone()),
        );
        serde_json::json!({ "keys": list })
    }

    /// The answer at [`JWKS_PATH`] on the proxy listener.
    pub(crate) fn jwks_response(&self, method: &Method, request_id: &str) -> Response<Body> {
        if method != Method::GET && method != Method::HEAD {
            let mut resp = crate::error::json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "the JWKS document answers GET and HEAD only",
                request_id,
            );
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        let text = self.jwks(crate::session::now_ms()).to_string();
        let len = text.len();
        let mut resp = Response::new(if method == Method::HEAD {
            body::empty()
        } else {
            body::full(text)
        });
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_str(&format!("public, max-age={JWKS_MAX_AGE_SECS}"))
                .expect("a header-safe value"),
        );
        resp
    }

    /// Re-reads the key file: a new key signs from now on, the one it
    /// replaces stays published for the assertion lifetime plus a
    /// margin. The same key again changes nothing. Returns whether the
    /// key changed.
    pub fn reload(&self) -> Result<bool, ReloadError> {
        let path = self
            .config
            .key_file
            .as_ref()
            .ok_or(ReloadError::NoKeyFile)?;
        let _one = self.reload.lock().unwrap_or_else(|p| p.into_inner());
        let key = read_key_file(path)
            .and_then(|k| SigningKey::new(&k))
            .map_err(ReloadError::Key)?;
        let old = self.keys.load_full();
        if key.kid == old.current.kid {
            return Ok(false);
        }
        let now = crate::session::now_ms().div_euclid(1000);
        let until = now + self.config.ttl.as_secs() as i64 + RETIRED_MARGIN_SECS;
        let mut retired = vec![Retired {
            kid: old.current.kid.clone(),
            jwk: old.current.jwk.clone(),
            until,
        }];
        retired.extend(
            old.retired
                .iter()
                .filter(|r| r.until > now && r.kid != key.kid && r.kid != old.current.kid)
                .cloned(),
        );
        retired.truncate(MAX_RETIRED);
        tracing::info!(kid = %key.kid, retired = %old.current.kid, "assertion signing key replaced");
        self.keys.store(Arc::new(KeySet {
            current: key,
            retired,
        }));
        Ok(true)
    }

    /// For `GET /v1/keys`: the signing `kid` and the published keys.
    pub fn info(&self) -> serde_json::Value {
        let now = crate::session::now_ms();
        serde_json::json!({
            "signing_kid": self.signing_kid(),
            "keys": self.jwks(now)["keys"],
        })
    }
}

impl std::fmt::Debug for Assertions {
    // Never the key itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assertions")
            .field("config", &self.config)
            .field("signing_kid", &self.signing_kid())
            .finish()
    }
}

/// The audience of `route`'s assertions: `routes[].audience`, else its
/// prefix.
pub(crate) fn route_audience(route: &RouteConfig) -> &str {
    route.audience.as_deref().unwrap_or(&route.prefix)
}

/// Sets `route`'s forwarded attributes of `session` and, when enabled,
/// its assertion. An attribute the session lacks (or whose value cannot
/// be a header value) sends no header.
pub(crate) fn set_headers(
    assertions: Option<&Assertions>,
    route: &RouteConfig,
    headers: &mut HeaderMap,
    session: &Session,
) {
    for attribute in &route.forward_attributes {
        if let Some(value) = session.attributes.get(&attribute.name)
            && let Ok(value) = HeaderValue::from_str(value)
        {
            headers.insert(attribute.header.clone(), value);
        }
    }
    if let Some(assertions) = assertions
        && let Some(token) =
            assertions.sign(session, route_audience(route), crate::session::now_ms())
    {
        headers.insert(assertions.config.header.clone(), token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_config() -> AssertionConfig {
        AssertionConfig {
            header: HeaderName::from_static(DEFAULT_HEADER),
            ttl: Duration::from_secs(60),
            issuer: Some("https://gw.example".into()),
            key_file: None,
            claims: vec!["role".into(), "tenant".into()],
        }
    }

    fn fresh_key() -> Vec<u8> {
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn session() -> Session {
        let mut attributes = BTreeMap::new();
        attributes.insert("role".to_string(), "admin".to_string());
        attributes.insert("secret".to_string(), "not-a-claim".to_string());
        Session::new("alice".into(), attributes, Duration::from_secs(3_600))
    }

    /// Splits a compact JWS and checks its signature with `ring`'s
    /// verifier against the public key of the JWK (not the signer's).
    fn verify(
        token: &str,
        jwk: &serde_json::Value,
    ) -> Option<(serde_json::Value, serde_json::Value)> {
        let mut parts = token.split('.');
        let (h, p, s) = (parts.next()?, parts.next()?, parts.next()?);
        assert!(parts.next().is_none());
        let x = B64.decode(jwk["x"].as_str()?).ok()?;
        let y = B64.decode(jwk["y"].as_str()?).ok()?;
        let mut point = vec![4u8];
        point.extend(x);
        point.extend(y);
        let key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            point,
        );
        key.verify(format!("{h}.{p}").as_bytes(), &B64.decode(s).ok()?)
            .ok()?;
        let header = serde_json::from_slice(&B64.decode(h).ok()?).ok()?;
        let claims = serde_json::from_slice(&B64.decode(p).ok()?).ok()?;
        Some((header, claims))
    }

    #[test]
    fn claims_hold_the_session_the_audience_and_a_short_life() {
        let a = Assertions::with_key(test_config(), &fresh_key()).unwrap();
        let mut s = session();
        let now = 1_800_000_000_123;
        s.expires_at = now + 3_600_000;
        let token = a.sign(&s, "/app/", now).unwrap();
        let jwks = a.jwks(now);
        let (header, claims) = verify(token.to_str().unwrap(), &jwks["keys"][0]).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], jwks["keys"][0]["kid"]);
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["sid"], s.id.to_string());
        assert_eq!(claims["aud"], "/app/");
        assert_eq!(claims["iss"], "https://gw.example");
        assert_eq!(claims["iat"], 1_800_000_000);
        assert_eq!(claims["exp"], 1_800_000_060);
        assert_eq!(claims["role"], "admin");
        assert!(
            claims.get("tenant").is_none(),
            "an absent attribute is no claim"
        );
        assert!(claims.get("secret").is_none(), "only listed attributes");
    }

    #[test]
    fn an_assertion_never_outlives_its_session() {
        let a = Assertions::with_key(test_config(), &fresh_key()).unwrap();
        let mut s = session();
        let now = 1_800_000_000_000;
        s.expires_at = now + 10_000;
        let token = a.sign(&s, "/", now).unwrap();
        let (_, claims) = verify(token.to_str().unwrap(), &a.jwks(now)["keys"][0]).unwrap();
        assert_eq!(claims["exp"], 1_800_000_010);
    }

    #[test]
    fn a_tampered_assertion_does_not_verify() {
        let a = Assertions::with_key(test_config(), &fresh_key()).unwrap();
        let now = crate::session::now_ms();
        let token = a.sign(&session(), "/", now).unwrap();
        let token = token.to_str().unwrap();
        let jwk = &a.jwks(now)["keys"][0];
        assert!(verify(token, jwk).is_some());
        let (h, rest) = token.split_once('.').unwrap();
        let (p, s) = rest.split_once('.').unwrap();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&B64.decode(p).unwrap()).unwrap();
        claims["sub"] = "mallory".into();
        let forged = format!("{h}.{}.{s}", B64.encode(claims.to_string()));
        assert!(verify(&forged, jwk).is_none());
        let other = Assertions::with_key(test_config(), &fresh_key()).unwrap();
        assert!(verify(token, &other.jwks(now)["keys"][0]).is_none());
    }

    #[test]
    fn the_kid_is_the_rfc_7638_thumbprint() {
        // RFC 7638 section 3.1 shows an RSA key; this is the same
        // construction over a P-256 key, checked by hand.
        let a = Assertions::with_key(test_config(), &fresh_key()).unwrap();
        let jwk = &a.jwks(0)["keys"][0];
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            jwk["x"].as_str().unwrap(),
            jwk["y"].as_str().unwrap()
        );
        let expected = B64.encode(Sha256::digest(canonical.as_bytes()));
        assert_eq!(jwk["kid"], expected.as_str());
        assert_eq!(a.signing_kid(), expected);
        assert_eq!(expected.len(), 43);
        let b = Assertions::with_key(test_config(), &fresh_key()).unwrap();
        assert_ne!(a.signing_kid(), b.signing_kid());
    }

    fn write_key(dir: &Path, name: &str, pkcs8: &[u8], mode: u32) -> PathBuf {
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(pkcs8)
        );
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        path
    }

    #[test]
    fn a_reload_signs_with_the_new_key_and_keeps_the_old_one_published() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_key(dir.path(), "k.pem", &fresh_key(), 0o600);
        let config = AssertionConfig {
            key_file: Some(path.clone()),
            ..test_config()
        };
        let a = Assertions::with_key(config, &read_key_file(&path).unwrap()).unwrap();
        let first = a.signing_kid();
        assert!(!a.reload().unwrap(), "the same key changes nothing");
        write_key(dir.path(), "k.pem", &fresh_key(), 0o600);
        assert!(a.reload().unwrap());
        let second = a.signing_kid();
        assert_ne!(first, second);
        let now = crate::session::now_ms();
        let kids: Vec<_> = a.jwks(now)["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(kids, vec![second.clone(), first.clone()]);
        // Past the lifetime and the margin, the old key is gone.
        let later = now + (60 + RETIRED_MARGIN_SECS + 1) * 1000;
        assert_eq!(a.jwks(later)["keys"].as_array().unwrap().len(), 1);
        // A broken file keeps the key in service.
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(a.reload(), Err(ReloadError::Key(_))));
        assert_eq!(a.signing_kid(), second);
    }

    #[test]
    fn key_files_others_can_read_or_that_are_no_p256_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        #[cfg(unix)]
        {
            let open = write_key(dir.path(), "open.pem", &fresh_key(), 0o644);
            let e = read_key_file(&open).unwrap_err();
            assert!(e.contains("chmod 600"), "{e}");
        }
        let ok = write_key(dir.path(), "ok.pem", &fresh_key(), 0o640);
        assert!(read_key_file(&ok).is_ok());
        let garbage = write_key(dir.path(), "g.pem", b"not a key", 0o600);
        let e = read_key_file(&garbage)
            .and_then(|k| SigningKey::new(&k).map(|_| ()).map(|_| k))
            .unwrap_err();
        assert!(e.contains("P-256"), "{e}");
        let missing = read_key_file(&dir.path().join("missing.pem")).unwrap_err();
        assert!(missing.contains("cannot read"), "{missing}");
    }

    #[test]
    fn forwarded_attribute_names_make_lowercase_headers_or_are_refused() {
        let mut problems = Vec::new();
        let mut p = |k: String, m: String| problems.push((k, m));
        let ok = forward_attributes(Some(vec!["role".into(), "tenant-id".into()]), "r", &mut p);
        assert_eq!(ok[0].header.as_str(), "x-sessiongate-attr-role");
        assert_eq!(ok[1].header.as_str(), "x-sessiongate-attr-tenant-id");
        let bad = [
            "Role",
            "a_b",
            "",
            "a b",
            "a\nb",
            "é",
            &"x".repeat(MAX_NAME_BYTES + 1),
        ];
        for name in bad {
            let mut problems = Vec::new();
            let mut p = |k: String, m: String| problems.push((k, m));
            let got = forward_attributes(Some(vec![name.to_string()]), "r", &mut p);
            assert!(got.is_empty() && problems.len() == 1, "{name:?}");
        }
        let mut problems = Vec::new();
        let mut p = |k: String, m: String| problems.push((k, m));
        forward_attributes(Some(vec!["a".into(), "a".into()]), "r", &mut p);
        assert_eq!(problems.len(), 1);
        let mut problems = Vec::new();
        let mut p = |k: String, m: String| problems.push((k, m));
        let many: Vec<String> = (0..=MAX_NAMES).map(|i| format!("a{i}")).collect();
        forward_attributes(Some(many), "r", &mut p);
        assert_eq!(problems.len(), 1);
    }
}
