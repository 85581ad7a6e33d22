//! TLS to the backends: reading the PEM files the configuration names, and
//! the rustls client configuration of an HTTPS upstream.
//!
//! Everything here runs while the configuration is validated, so that a
//! missing, unreadable or malformed CA, certificate or key is a startup
//! error (and a `sessiongate check` error) naming its key, never a failure
//! found at the first request. An upstream's [`ClientConfig`] is built once
//! there and shared by all its connections: building one loads the trust
//! store, which costs far more than a handshake's worth of work.
//!
//! Only the `ring` provider is used, passed explicitly, so nothing depends
//! on a process-wide default provider having been installed.
//!
//! Redis and PostgreSQL take the file paths (the `redis` and `sqlx` crates
//! build their own rustls configurations from them); this module only
//! checks the files are usable.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// The crypto provider of every TLS client of the gateway.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (a CA bundle or a chain), at least one.
pub(crate) fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| pem_error(path, e))?;
    let certs: Vec<_> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{shown}: not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{shown}: holds no PEM certificate"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, e))
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    let shown = path.display();
    match e {
        Error::Io(io) => format!("cannot read {shown}: {io}"),
        Error::NoItemsFound => format!("{shown}: holds no PEM private key"),
        other => format!("{shown}: not a valid PEM file: {other}"),
    }
}

/// The trust anchors: the certificates of `ca_file`, else the system's.
pub(crate) fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certificates(path)? {
                store
                    .add(cert)
                    .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
            }
        }
        None => {
            // Certificates the system store holds but cannot parse are
            // skipped, as every TLS client does; an empty store is not.
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                return Err(format!(
                    "no system root certificates found{why}; set a CA file"
                ));
            }
        }
    }
    Ok(store)
}

/// Which of the TLS files a problem is about, so the caller can name the
/// configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsFile {
    Ca,
    ClientCert,
    ClientKey,
}

/// Checks that a client certificate and key can be used together.
pub(crate) fn check_client_identity(cert: &Path, key: &Path) -> Result<(), (TlsFile, String)> {
    let chain = read_certificates(cert).map_err(|e| (TlsFile::ClientCert, e))?;
    let key_der = read_private_key(key).map_err(|e| (TlsFile::ClientKey, e))?;
    // Building a config with them is what checks that the key is one
    // rustls can sign with and that it belongs to the certificate.
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| (TlsFile::ClientKey, e.to_string()))?
        .with_root_certificates(RootCertStore::empty())
        .with_client_auth_cert(chain, key_der)
        .map(|_| ())
        .map_err(|e| (TlsFile::ClientKey, format!("{}: {e}", key.display())))
}

/// The TLS side of one `[[upstreams]]` entry with `https://` URLs.
#[derive(Clone)]
pub struct UpstreamTls {
    /// Shared by every connection to the upstream's HTTPS URLs.
    pub(crate) config: Arc<ClientConfig>,
    /// The name sent as SNI and verified in place of each URL's host.
    pub(crate) server_name: Option<ServerName<'static>>,
    /// For messages: where the trust anchors came from.
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) client_cert_file: Option<PathBuf>,
}

impl fmt::Debug for UpstreamTls {
    // The config holds the client key: only where things came from.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .finish_non_exhaustive()
    }
}

/// The files and name of an upstream's TLS, as configured.
pub(crate) struct UpstreamTlsFiles<'a> {
    pub ca_file: Option<&'a Path>,
    pub client_cert_file: Option<&'a Path>,
    pub client_key_file: Option<&'a Path>,
    pub server_name: Option<ServerName<'static>>,
}

/// Builds an upstream's client configuration: TLS 1.2 and 1.3, ALPN
/// `http/1.1` only (the upstream pool speaks HTTP/1.1), the CA file's
/// roots or the system's, and the client certificate when one is given.
pub(crate) fn upstream_tls(files: UpstreamTlsFiles<'_>) -> Result<UpstreamTls, (TlsFile, String)> {
    let roots = roots(files.ca_file).map_err(|e| (TlsFile::Ca, e))?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| (TlsFile::Ca, e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (files.client_cert_file, files.client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certificates(cert).map_err(|e| (TlsFile::ClientCert, e))?;
            let key_der = read_private_key(key).map_err(|e| (TlsFile::ClientKey, e))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| (TlsFile::ClientKey, format!("{}: {e}", key.display())))?
        }
        // The caller reports a lone cert or key; without both, no client
        // authentication.
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(UpstreamTls {
        config: Arc::new(config),
        server_name: files.server_name,
        ca_file: files.ca_file.map(Path::to_path_buf),
        client_cert_file: files.client_cert_file.map(Path::to_path_buf),
    })
}

/// The server name to send and verify for `host` (a URL's host, without
/// IPv6 brackets): a DNS name, or an IP address checked against the
/// certificate's IP SANs.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is not a valid DNS name or IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = read_certificates(&missing).unwrap_err();
        assert!(
            err.contains("cannot read") && err.contains("missing.pem"),
            "{err}"
        );

        let empty = write(dir.path(), "empty.pem", "");
        let err = read_certificates(&empty).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");

        let garbage = write(
            dir.path(),
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        assert!(read_certificates(&garbage).is_err());
        let err = read_private_key(&empty).unwrap_err();
        assert!(err.contains("no PEM private key"), "{err}");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        let cert = write(dir.path(), "a.pem", &a.cert.pem());
        let key_a = write(dir.path(), "a.key", &a.signing_key.serialize_pem());
        let key_b = write(dir.path(), "b.key", &b.signing_key.serialize_pem());
        assert!(check_client_identity(&cert, &key_a).is_ok());
        let (which, _) = check_client_identity(&cert, &key_b).unwrap_err();
        assert_eq!(which, TlsFile::ClientKey);
    }

    #[test]
    fn upstream_configs_offer_http1_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let ca_file = write(dir.path(), "ca.pem", &ca.cert.pem());
        let tls = upstream_tls(UpstreamTlsFiles {
            ca_file: Some(&ca_file),
            client_cert_file: None,
            client_key_file: None,
            server_name: None,
        })
        .unwrap();
        assert_eq!(tls.config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(!format!("{tls:?}").contains("BEGIN"));
    }

    #[test]
    fn ip_hosts_are_ip_server_names() {
        assert!(matches!(
            server_name("127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("::1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("origin.test").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("not a name").is_err());
    }
}
