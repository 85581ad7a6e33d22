//! HTTPS for clients: the server-side rustls configuration and the
//! certificates it serves.
//!
//! The configuration is built once ([`EdgeTls::server_config`]): the ring
//! provider only, TLS 1.3 and 1.2 only (ring's suites are all AEAD with
//! forward secrecy: no CBC, no RSA key exchange), ALPN `h2` then
//! `http/1.1`. The certificates are not in it: each handshake asks
//! [`SniResolver`], which reads the current [`CertSet`] through an
//! [`ArcSwap`]. A reload ([`EdgeTls::reload`]) reads and checks every file
//! into a new set and swaps it in whole only when all of it is good, so a
//! handshake sees either the old set or the new one, never a mix, and a
//! bad file leaves the old set serving. Connections already open keep the
//! certificate they were made with: a reload touches no connection. It
//! does forget the TLS session cache ([`SessionCache`]), so that a client
//! resuming a session made under the old certificate gets a full
//! handshake, and the new certificate, on its next connection (a
//! resumption under way at that very moment still completes, and the
//! tickets it is given are stored in the new cache: a client on that
//! chain keeps resuming until it makes a full handshake).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions,
};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{ServerTlsConfig, TlsCertFiles};
use crate::metrics::Metrics;

/// A PEM file larger than this is not a certificate chain or a key: it is
/// refused before it is read whole.
const MAX_PEM_BYTES: u64 = 1 << 20;
/// TLS sessions remembered for resumption (each a few hundred bytes).
const SESSION_CACHE_ENTRIES: usize = 4096;

/// A certificate or key that cannot be served, naming the config key and
/// the file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("key `{key}` ({file}): {reason}")]
pub(crate) struct TlsError {
    pub key: String,
    pub file: String,
    pub reason: String,
}

impl TlsError {
    fn new(key: String, file: &Path, reason: impl Into<String>) -> TlsError {
        TlsError {
            key,
            file: file.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// What one loaded certificate is, for the admin API and the logs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct CertInfo {
    /// The names it is chosen for; empty for the default certificate.
    pub server_names: Vec<String>,
    pub default: bool,
    pub cert_file: String,
    pub key_file: String,
    /// SHA-256 of the leaf certificate (DER), lower-case hex: what
    /// `openssl x509 -fingerprint -sha256` shows, without the colons.
    pub sha256: String,
    /// Certificates in the chain, the leaf included.
    pub chain_length: usize,
}

/// One generation of certificates: what a handshake picks from.
struct CertSet {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` under `example.com`: one label, as browsers match.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    info: Vec<CertInfo>,
}

impl CertSet {
    /// Reads and checks every file: the first failure is the answer.
    fn load(files: &[TlsCertFiles], provider: &CryptoProvider) -> Result<CertSet, TlsError> {
        let mut set: Option<CertSet> = None;
        for f in files {
            let (key, info) = load_pair(f, provider)?;
            let key = Arc::new(key);
            match &mut set {
                None => {
                    set = Some(CertSet {
                        default: key,
                        exact: HashMap::new(),
                        wildcard: HashMap::new(),
                        info: vec![info],
                    })
                }
                Some(set) => {
                    for name in &f.server_names {
                        match name.strip_prefix("*.") {
                            Some(parent) => set.wildcard.insert(parent.to_string(), key.clone()),
                            None => set.exact.insert(name.clone(), key.clone()),
                        };
                    }
                    set.info.push(info);
                }
            }
        }
        Ok(set.expect("the default certificate is always configured"))
    }

    fn pick(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = server_name else {
            return &self.default;
        };
        let name = name.trim_end_matches('.');
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if let Some(key) = self.exact.get(name) {
            return key;
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(key) = self.wildcard.get(parent)
        {
            return key;
        }
        &self.default
    }
}

/// Reads one chain and its key and checks that they belong together.
fn load_pair(
    files: &TlsCertFiles,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, CertInfo), TlsError> {
    let cert_key = format!("{}.cert_file", files.table);
    let key_key = format!("{}.key_file", files.table);
    let cert_pem = read_pem(&files.cert_file, &cert_key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(cert_key.clone(), &files.cert_file, pem_problem(&e)))?;
    if chain.is_empty() {
        return Err(TlsError::new(
            cert_key,
            &files.cert_file,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    let key_pem = read_pem(&files.key_file, &key_key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        let reason = match e {
            pem::Error::NoItemsFound => {
                "holds no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)"
                    .to_string()
            }
            other => pem_problem(&other),
        };
        TlsError::new(key_key.clone(), &files.key_file, reason)
    })?;
    let signing = provider.key_provider.load_private_key(key).map_err(|e| {
        TlsError::new(
            key_key.clone(),
            &files.key_file,
            format!("not a usable private key (RSA, ECDSA P-256/P-384 or Ed25519): {e}"),
        )
    })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::new(
                key_key,
                &files.key_file,
                format!(
                    "is not the private key of the certificate in {} (key `{cert_key}`)",
                    files.cert_file.display()
                ),
            ));
        }
        // ring's keys all know their public half, so this is the leaf
        // certificate failing to parse.
        Err(e) => {
            return Err(TlsError::new(
                cert_key,
                &files.cert_file,
                format!("the first certificate cannot be read: {e}"),
            ));
        }
    }
    let leaf = &certified.cert[0];
    let info = CertInfo {
        server_names: files.server_names.clone(),
        default: files.server_names.is_empty(),
        cert_file: files.cert_file.display().to_string(),
        key_file: files.key_file.display().to_string(),
        sha256: hex(&Sha256::digest(leaf.as_ref())),
        chain_length: certified.cert.len(),
    };
    Ok((certified, info))
}

fn read_pem(path: &Path, key: &str) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| TlsError::new(key.to_string(), path, format!("cannot read: {e}")))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| TlsError::new(key.to_string(), path, format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::new(
            key.to_string(),
            path,
            format!("larger than {MAX_PEM_BYTES} bytes: not a PEM certificate or key"),
        ));
    }
    Ok(bytes)
}

fn pem_problem(e: &pem::Error) -> String {
    format!("not valid PEM: {e}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Chooses each handshake's certificate from the current set by the
/// client's server name (SNI); no name, or one no entry names, gets the
/// default certificate.
pub(crate) struct SniResolver {
    current: Arc<ArcSwap<CertSet>>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().pick(hello.server_name()).clone())
    }
}

/// The server's TLS session cache (for TLS 1.3 and 1.2 resumption),
/// emptied whole when the certificates are reloaded.
pub(crate) struct SessionCache {
    current: ArcSwap<ServerSessionMemoryCache>,
}

impl SessionCache {
    fn new() -> SessionCache {
        SessionCache {
            current: ArcSwap::new(ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES)),
        }
    }

    fn clear(&self) {
        self.current
            .store(ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES));
    }
}

impl fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCache").finish_non_exhaustive()
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.current.load().put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.current.load().get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.current.load().take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// The HTTPS listener's certificates: loaded at start, reloaded on
/// SIGHUP, `POST /v1/tls/reload` and (with `server.tls.watch`) when a file
/// changes.
pub(crate) struct EdgeTls {
    /// The default certificate first, then `certificates` in order.
    files: Vec<TlsCertFiles>,
    current: Arc<ArcSwap<CertSet>>,
    sessions: Arc<SessionCache>,
    provider: Arc<CryptoProvider>,
    /// One reload at a time: two racing could otherwise swap in the older
    /// read last.
    reload_lock: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for EdgeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EdgeTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl EdgeTls {
    /// Loads every configured certificate; any failure fails the start.
    pub(crate) fn load(
        config: &ServerTlsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<EdgeTls, TlsError> {
        let mut files = vec![config.default.clone()];
        files.extend(config.certificates.iter().cloned());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let set = CertSet::load(&files, &provider)?;
        Ok(EdgeTls {
            files,
            current: Arc::new(ArcSwap::from_pointee(set)),
            sessions: Arc::new(SessionCache::new()),
            provider,
            reload_lock: tokio::sync::Mutex::new(()),
            metrics,
        })
    }

    /// Checks the configured files without serving them
    /// (`sessiongate check`).
    pub(crate) fn check(config: &ServerTlsConfig) -> Result<Vec<CertInfo>, TlsError> {
        Ok(Self::load(config, Arc::new(Metrics::new()))?.info())
    }

    /// The rustls configuration of the HTTPS listener. It holds the
    /// resolver, not the certificates, so it never changes.
    pub(crate) fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let resolver = Arc::new(SniResolver {
            current: self.current.clone(),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.session_storage = self.sessions.clone();
        Arc::new(config)
    }

    /// What is being served now.
    pub(crate) fn info(&self) -> Vec<CertInfo> {
        self.current.load().info.clone()
    }

    /// Reads every file again and, only if all of them are good, serves
    /// the new set; otherwise logs why and keeps the old one.
    pub(crate) async fn reload(&self) -> Result<Vec<CertInfo>, TlsError> {
        let _guard = self.reload_lock.lock().await;
        let files = self.files.clone();
        let provider = self.provider.clone();
        let loaded = tokio::task::spawn_blocking(move || CertSet::load(&files, &provider))
            .await
            .unwrap_or_else(|e| {
                Err(TlsError {
                    key: "server.tls".into(),
                    file: "(reload)".into(),
                    reason: format!("the loader panicked: {e}"),
                })
            });
        match loaded {
            Ok(set) => {
                let info = set.info.clone();
                self.current.store(Arc::new(set));
                self.sessions.clear();
                self.metrics.tls_reload("ok");
                tracing::info!(
                    certificates = info.len(),
                    sha256 = %info.iter().map(|i| i.sha256.as_str()).collect::<Vec<_>>().join(","),
                    "TLS certificates reloaded"
                );
                Ok(info)
            }
            Err(e) => {
                self.metrics.tls_reload("error");
                tracing::error!(error = %e, "TLS certificate reload failed; the previous certificates stay in service");
                Err(e)
            }
        }
    }

    /// Each certificate and key file's modification time and size, for
    /// the watcher (`None` for a file that cannot be read).
    pub(crate) fn file_stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        let stamp = |path: &Path| {
            std::fs::metadata(path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        };
        self.files
            .iter()
            .flat_map(|f| [stamp(&f.cert_file), stamp(&f.key_file)])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct Pair {
        cert: String,
        key: String,
    }

    fn issue(names: &[&str]) -> Pair {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap()
                .self_signed(&key)
                .unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn files(dir: &Path, table: &str, names: &[&str], pair: &Pair) -> TlsCertFiles {
        let stem = table.replace(['[', ']', '.'], "_");
        TlsCertFiles {
            table: table.into(),
            server_names: names.iter().map(|n| n.to_string()).collect(),
            cert_file: write(dir, &format!("{stem}.crt"), &pair.cert),
            key_file: write(dir, &format!("{stem}.key"), &pair.key),
        }
    }

    fn provider() -> CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    #[test]
    fn names_pick_their_certificate_and_everything_else_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let all = [
            files(dir.path(), "server.tls", &[], &issue(&["localhost"])),
            files(
                dir.path(),
                "server.tls.certificates[0]",
                &["api.example.com"],
                &issue(&["api.example.com"]),
            ),
            files(
                dir.path(),
                "server.tls.certificates[1]",
                &["*.example.org"],
                &issue(&["*.example.org"]),
            ),
        ];
        let set = CertSet::load(&all, &provider()).unwrap();
        let leaf = |k: &Arc<CertifiedKey>| k.cert[0].clone();
        let default = leaf(&set.default);
        assert_eq!(leaf(set.pick(None)), default);
        assert_eq!(leaf(set.pick(Some("unknown.test"))), default);
        let api = leaf(set.pick(Some("api.example.com")));
        assert_ne!(api, default);
        assert_eq!(leaf(set.pick(Some("API.Example.COM."))), api);
        let wild = leaf(set.pick(Some("a.example.org")));
        assert_ne!(wild, default);
        assert_ne!(wild, api);
        // One label only, and not the parent itself.
        assert_eq!(leaf(set.pick(Some("a.b.example.org"))), default);
        assert_eq!(leaf(set.pick(Some("example.org"))), default);
        assert_eq!(set.info.len(), 3);
        assert!(set.info[0].default && !set.info[1].default);
        assert_eq!(set.info[0].sha256.len(), 64);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let mine = issue(&["localhost"]);
        let other = issue(&["localhost"]);
        let mut f = files(dir.path(), "server.tls", &[], &mine);
        f.key_file = write(dir.path(), "other.key", &other.key);
        let err = CertSet::load(&[f], &provider()).err().unwrap();
        assert_eq!(err.key, "server.tls.key_file");
        assert!(err.file.ends_with("other.key"), "{err}");
        assert!(err.reason.contains("is not the private key"), "{err}");
    }

    #[test]
    fn unreadable_or_garbage_files_are_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let good = issue(&["localhost"]);
        let base = files(dir.path(), "server.tls", &[], &good);
        let cases: Vec<(TlsCertFiles, &str, &str)> = vec![
            (
                TlsCertFiles {
                    cert_file: dir.path().join("missing.crt"),
                    ..base.clone()
                },
                "server.tls.cert_file",
                "cannot read",
            ),
            (
                TlsCertFiles {
                    cert_file: write(dir.path(), "garbage.crt", "hello\n"),
                    ..base.clone()
                },
                "server.tls.cert_file",
                "no PEM certificate",
            ),
            (
                TlsCertFiles {
                    cert_file: write(
                        dir.path(),
                        "broken.crt",
                        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                    ),
                    ..base.clone()
                },
                "server.tls.cert_file",
                "cannot be read",
            ),
            (
                TlsCertFiles {
                    key_file: write(dir.path(), "garbage.key", &good.cert),
                    ..base.clone()
                },
                "server.tls.key_file",
                "no PEM private key",
            ),
            (
                TlsCertFiles {
                    key_file: write(
                        dir.path(),
                        "broken.key",
                        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                    ),
                    ..base.clone()
                },
                "server.tls.key_file",
                "not a usable private key",
            ),
            (
                TlsCertFiles {
                    cert_file: write(
                        dir.path(),
                        "huge.crt",
                        &"x".repeat(MAX_PEM_BYTES as usize + 1),
                    ),
                    ..base.clone()
                },
                "server.tls.cert_file",
                "larger than",
            ),
        ];
        for (f, key, says) in cases {
            let err = CertSet::load(std::slice::from_ref(&f), &provider())
                .err()
                .unwrap();
            assert_eq!(err.key, key, "{err}");
            assert!(err.reason.contains(says), "{err} (wanted {says:?})");
            assert!(err.to_string().contains(&key.to_string()), "{err}");
        }
    }

    #[test]
    fn one_file_may_hold_both_the_chain_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let pair = issue(&["localhost"]);
        let both = write(
            dir.path(),
            "both.pem",
            &format!("{}{}", pair.key, pair.cert),
        );
        let f = TlsCertFiles {
            table: "server.tls".into(),
            server_names: vec![],
            cert_file: both.clone(),
            key_file: both,
        };
        assert!(CertSet::load(&[f], &provider()).is_ok());
    }

    #[tokio::test]
    async fn a_failed_reload_keeps_the_old_set_and_a_good_one_swaps_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = issue(&["localhost"]);
        let f = files(dir.path(), "server.tls", &[], &first);
        let config = ServerTlsConfig {
            default: f.clone(),
            certificates: vec![],
            redirect_listen: None,
            hsts_max_age: None,
            hsts_include_subdomains: false,
            watch: false,
            watch_interval: std::time::Duration::from_secs(1),
        };
        let metrics = Arc::new(Metrics::new());
        let tls = EdgeTls::load(&config, metrics.clone()).unwrap();
        let before = tls.info();
        std::fs::write(&f.cert_file, "garbage").unwrap();
        assert!(tls.reload().await.is_err());
        assert_eq!(tls.info(), before);
        let second = issue(&["localhost"]);
        std::fs::write(&f.cert_file, &second.cert).unwrap();
        std::fs::write(&f.key_file, &second.key).unwrap();
        let after = tls.reload().await.unwrap();
        assert_ne!(after[0].sha256, before[0].sha256);
        let text = metrics.render();
        assert!(
            text.contains(r#"sessiongate_tls_reloads_total{outcome="error"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sessiongate_tls_reloads_total{outcome="ok"} 1"#),
            "{text}"
        );
    }
}
