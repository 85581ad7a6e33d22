//! TLS at the edge (issue 10, items 1 and 2): the HTTPS listener, its
//! certificates (reloaded, watched, chosen by SNI), HTTP/2 over TLS, the
//! redirect listener and HSTS.
//!
//! Every certificate is made here with rcgen: a test CA, and leaves it
//! signs. Clients trust that CA only (reqwest with it as its only root,
//! tokio-rustls with it in a root store, curl with `--cacert`), so a
//! handshake that succeeds has really been verified. Where a test needs
//! to see which certificate a handshake got, it makes the handshake
//! itself with tokio-rustls and reads the leaf; requests then go over
//! hyper's client on that very connection, whose URIs reach the wire as
//! written (no client-side path normalization).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ProtocolVersion, SignatureScheme};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::harness::*;

/// How long any "is closed / answers / is served" condition may take.
const BOUND: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// A test CA, and a directory for the files the gateway reads.
struct Pki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: TempDir,
}

/// A leaf certificate and its key, in PEM and the leaf's DER.
#[derive(Clone)]
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Leaf {
    fn sha256(&self) -> String {
        hex(&Sha256::digest(self.der.as_ref()))
    }
}

impl Pki {
    fn new() -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sessiongate test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        Pki {
            ca: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A leaf for `names` (DNS names or IP addresses), signed by the CA.
    fn leaf(&self, names: &[&str]) -> Leaf {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// Writes `leaf` to `<stem>.crt` and `<stem>.key`.
    fn write(&self, stem: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        let cert = self.dir.path().join(format!("{stem}.crt"));
        let key = self.dir.path().join(format!("{stem}.key"));
        std::fs::write(&cert, &leaf.cert_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        (cert, key)
    }
}

/// A TOML basic string.
fn q(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

fn qp(path: &Path) -> String {
    q(&path.display().to_string())
}

/// `[server.tls]` keys for the default certificate at `files`, plus `extra`.
fn tls_keys(files: &(PathBuf, PathBuf), extra: &str) -> String {
    format!(
        "cert_file = {}\nkey_file = {}\n{extra}",
        qp(&files.0),
        qp(&files.1)
    )
}

/// A gateway with `[server]` keys `server` and the table `[server.tls]`
/// holding `tls` (the text after the table header: keys, then any
/// `[[server.tls.certificates]]`).
async fn tls_gateway(spec: GatewaySpec, server: &str, tls: &str) -> GatewayUnderTest {
    let server = server.to_string();
    let tls = tls.to_string();
    GatewayUnderTest::start_with(spec, move |text| {
        text.replacen("[server]\n", &format!("[server]\n{server}\n"), 1)
            .replacen(
                "\n[admin]\n",
                &format!("\n[server.tls]\n{tls}\n\n[admin]\n"),
                1,
            )
    })
    .await
}

/// The standard gateway over HTTPS with one certificate for `localhost`
/// and `127.0.0.1`, not watched.
async fn standard_tls(pki: &Pki, up: &TestUpstream, server: &str) -> (GatewayUnderTest, Leaf) {
    let leaf = pki.leaf(&["localhost", "127.0.0.1"]);
    let files = pki.write("default", &leaf);
    let gw = tls_gateway(
        GatewaySpec::standard(&up.url()),
        server,
        &tls_keys(&files, "watch = false"),
    )
    .await;
    (gw, leaf)
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client trusting the test CA only, offering `versions` and
/// `alpn`.
fn client_config(
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der()).unwrap();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn default_client_config(pki: &Pki) -> Arc<ClientConfig> {
    client_config(
        pki,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        &[b"http/1.1"],
    )
}

/// Accepts any certificate (to see what the server sends for a name no
/// certificate is for); signatures are still checked.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn accept_any_config() -> Arc<ClientConfig> {
    let provider = provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

/// A TLS connection to `addr`, sending `name` as SNI (none for an IP).
async fn connect_tls(
    addr: SocketAddr,
    name: &str,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_string()).expect("a server name");
    tokio::time::timeout(BOUND, TlsConnector::from(config).connect(server_name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// The leaf certificate a handshake got.
fn leaf_of(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("the server sent certificates")[0]
        .clone()
        .into_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    fn alpn(self) -> &'static [u8] {
        match self {
            Proto::H1 => b"http/1.1",
            Proto::H2 => b"h2",
        }
    }
}

/// What one request got.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One request on a new TLS connection (ALPN as `proto`), `target`
/// written on the wire as given. `Err` when the exchange fails (a reset
/// stream, a closed connection).
async fn send_on(
    stream: TlsStream<TcpStream>,
    proto: Proto,
    method: &str,
    target: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> Result<Answer, String> {
    let port = stream.get_ref().0.peer_addr().unwrap().port();
    let exchange = async {
        let mut req = Request::builder().method(method);
        req = match proto {
            Proto::H1 => req.uri(target).header("host", format!("localhost:{port}")),
            Proto::H2 => req.uri(format!("https://localhost:{port}{target}")),
        };
        for (name, value) in headers {
            req = req.header(*name, value.as_str());
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = match proto {
            Proto::H1 => {
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                sender.send_request(req).await.map_err(|e| e.to_string())?
            }
            Proto::H2 => {
                let (mut sender, conn) = hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(stream),
                )
                .await
                .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                sender.send_request(req).await.map_err(|e| e.to_string())?
            }
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes()
            .to_vec();
        Ok(Answer {
            status,
            headers,
            body,
        })
    };
    tokio::time::timeout(BOUND, exchange)
        .await
        .map_err(|_| "no answer in time".to_string())?
}

/// [`send_on`] a new connection to `localhost`, trusting the test CA.
async fn send(
    pki: &Pki,
    addr: SocketAddr,
    proto: Proto,
    method: &str,
    target: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> Result<Answer, String> {
    let config = client_config(
        pki,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        &[proto.alpn()],
    );
    let stream = connect_tls(addr, "localhost", config)
        .await
        .map_err(|e| e.to_string())?;
    send_on(stream, proto, method, target, headers, body).await
}

async fn get(pki: &Pki, addr: SocketAddr, proto: Proto, target: &str) -> Answer {
    send(pki, addr, proto, "GET", target, &[], Bytes::new())
        .await
        .unwrap_or_else(|e| panic!("GET {target} over {proto:?}: {e}"))
}

/// reqwest trusting the test CA only, TLS `version` only, `localhost`
/// resolving to the gateway.
fn reqwest_tls(
    pki: &Pki,
    addr: SocketAddr,
    version: Option<reqwest::tls::Version>,
    proto: Option<Proto>,
) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem().as_bytes()).unwrap())
        .resolve("localhost", addr)
        .resolve("second.test", addr)
        .tls_info(true);
    if let Some(v) = version {
        builder = builder.min_tls_version(v).max_tls_version(v);
    }
    builder = match proto {
        Some(Proto::H1) => builder.http1_only(),
        Some(Proto::H2) => builder.http2_prior_knowledge(),
        None => builder,
    };
    builder.build().unwrap()
}

fn https(addr: SocketAddr, path: &str) -> String {
    format!("https://localhost:{}{path}", addr.port())
}

async fn metrics(gw: &GatewayUnderTest) -> String {
    gw.client
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the first metric line starting with `prefix`.
fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn admin_reload(gw: &GatewayUnderTest) -> (u16, Value) {
    let resp = gw
        .client
        .post(gw.admin_url("/v1/tls/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// Reads until the peer closes; panics unless it does within `within`.
/// Returns what came and when the close came.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let reading = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, reading)
        .await
        .unwrap_or_else(|_| panic!("still open after {within:?}"));
    (got, started.elapsed())
}

// ---------------------------------------------------------------------------
// Protocols
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_over_tls_1_2_and_1_3_with_http_1_1_and_http_2() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let (gw, leaf) = standard_tls(&pki, &up, "").await;
    use reqwest::tls::Version as V;
    for (version, tls) in [
        (V::TLS_1_2, ProtocolVersion::TLSv1_2),
        (V::TLS_1_3, ProtocolVersion::TLSv1_3),
    ] {
        for (proto, http) in [
            (Proto::H1, reqwest::Version::HTTP_11),
            (Proto::H2, reqwest::Version::HTTP_2),
        ] {
            let client = reqwest_tls(&pki, gw.addr, Some(version), Some(proto));
            let resp = client
                .get(https(gw.addr, "/public/x"))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{version:?} {proto:?}: {e:?}"));
            assert_eq!(resp.version(), http, "{version:?} {proto:?}");
            let info = resp.extensions().get::<reqwest::tls::TlsInfo>().unwrap();
            assert_eq!(info.peer_certificate(), Some(leaf.der.as_ref()));
            let echo = echo_of(resp).await;
            assert_eq!(seen(&echo, "x-forwarded-proto"), Some("https"));

            // The same, read off the handshake itself.
            let rustls_version = match tls {
                ProtocolVersion::TLSv1_2 => &rustls::version::TLS12,
                _ => &rustls::version::TLS13,
            };
            let stream = connect_tls(
                gw.addr,
                "localhost",
                client_config(&pki, &[rustls_version], &[proto.alpn()]),
            )
            .await
            .unwrap();
            let conn = stream.get_ref().1;
            assert_eq!(conn.protocol_version(), Some(tls));
            assert_eq!(conn.alpn_protocol(), Some(proto.alpn()));
            let a = send_on(stream, proto, "GET", "/public/y", &[], Bytes::new())
                .await
                .unwrap();
            assert_eq!(a.status, 200, "{}", a.text());
        }
    }
    // A client offering both protocols gets HTTP/2, the server's first
    // choice; one offering no ALPN at all gets HTTP/1.1.
    let both = reqwest_tls(&pki, gw.addr, None, None);
    let resp = both.get(https(gw.addr, "/public/x")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let stream = connect_tls(
        gw.addr,
        "localhost",
        client_config(&pki, &[&rustls::version::TLS13], &[]),
    )
    .await
    .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
    let a = send_on(stream, Proto::H1, "GET", "/public/z", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(a.status, 200);
}

/// `openssl s_client` with everything after `-connect`, its stdin empty;
/// (exit success, what it printed).
async fn s_client(addr: SocketAddr, args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(
        BOUND,
        tokio::process::Command::new("openssl")
            .arg("s_client")
            .arg("-connect")
            .arg(addr.to_string())
            .args(["-servername", "localhost"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("openssl s_client within the bound")
    .expect("openssl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_protocols_and_weak_cipher_suites_are_refused() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let (gw, _) = standard_tls(&pki, &up, "").await;
    // OpenSSL's own floor is lowered so that the refusal is the server's.
    for (what, args) in [
        ("TLS 1.0", vec!["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"]),
        ("TLS 1.1", vec!["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]),
        (
            "TLS 1.2 with RSA key exchange and CBC",
            vec!["-tls1_2", "-cipher", "AES128-SHA:AES256-SHA256@SECLEVEL=0"],
        ),
    ] {
        let (ok, text) = s_client(gw.addr, &args).await;
        assert!(!ok, "{what} was accepted:\n{text}");
        assert!(
            !text.contains("BEGIN CERTIFICATE") && !text.contains("Server certificate"),
            "{what}: the server got as far as its certificate:\n{text}"
        );
    }
    // The same tool with modern settings is served.
    let (ok, text) = s_client(gw.addr, &["-tls1_2", "-alpn", "h2"]).await;
    assert!(ok, "{text}");
    assert!(text.contains("ALPN protocol: h2"), "{text}");
    let (ok, text) = s_client(gw.addr, &["-tls1_3"]).await;
    assert!(ok, "{text}");
    assert!(text.contains("TLSv1.3"), "{text}");
}

// ---------------------------------------------------------------------------
// Sessions over TLS
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_cookie_and_authenticated_requests_over_tls_tell_the_upstream_https() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let (gw, _) = standard_tls(&pki, &up, "").await;
    for proto in [Proto::H1, Proto::H2] {
        let client = reqwest_tls(&pki, gw.addr, None, Some(proto));
        let resp = client
            .get(https(gw.addr, "/public/login?user=alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let set = set_cookie(resp.headers(), COOKIE).expect("the session cookie");
        assert!(set.has("Secure") && set.has("HttpOnly"), "{}", set.raw);
        let token = set.value;
        // A client claiming plain http, or another address, is overruled.
        let resp = client
            .get(https(gw.addr, "/api/me"))
            .header("cookie", cookie(&token))
            .header("x-forwarded-proto", "http")
            .header("x-forwarded-for", "6.6.6.6")
            .send()
            .await
            .unwrap();
        let echo = echo_of(resp).await;
        assert_eq!(seen(&echo, "x-user-id"), Some("alice"), "{proto:?}");
        assert_eq!(seen(&echo, "x-forwarded-proto"), Some("https"));
        assert_eq!(seen(&echo, "x-forwarded-for"), Some("127.0.0.1"));
        assert!(
            !echo.to_string().contains(&token),
            "the token went upstream"
        );
        expect_401(client.get(https(gw.addr, "/api/me")).send().await.unwrap()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http2_logs_in_and_is_authenticated() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let (gw, _) = standard_tls(&pki, &up, "").await;
    let ca = pki.dir.path().join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let jar = pki.dir.path().join("cookies.txt");
    let port = gw.addr.port();
    let curl = |path: &str| {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["--http2", "-sS", "-i", "--max-time", "10", "--noproxy", "*"])
            .arg("--cacert")
            .arg(&ca)
            .arg("--resolve")
            .arg(format!("localhost:{port}:127.0.0.1"))
            .arg("-c")
            .arg(&jar)
            .arg("-b")
            .arg(&jar)
            .arg(format!("https://localhost:{port}{path}"))
            .stdin(std::process::Stdio::null());
        cmd
    };
    let run = |mut cmd: tokio::process::Command| async move {
        let out = tokio::time::timeout(BOUND, cmd.output())
            .await
            .expect("curl within the bound")
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let login = run(curl("/public/login?user=carol")).await;
    assert!(login.starts_with("HTTP/2 200"), "{login}");
    assert!(login.contains("set-cookie: sg_session="), "{login}");
    let me = run(curl("/api/me")).await;
    assert!(me.starts_with("HTTP/2 200"), "{me}");
    let body = &me[me.find("\r\n\r\n").expect("end of head") + 4..];
    let echo: Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen(&echo, "x-user-id"), Some("carol"));
    assert_eq!(seen(&echo, "x-forwarded-proto"), Some("https"));
    // Without the jar: 401.
    std::fs::remove_file(&jar).unwrap();
    let anonymous = run(curl("/api/me")).await;
    assert!(anonymous.starts_with("HTTP/2 401"), "{anonymous}");
}

// ---------------------------------------------------------------------------
// The edge-security regression cases, over HTTP/1.1 and HTTP/2 over TLS
// ---------------------------------------------------------------------------

/// Client headers that try to pass for the gateway's own or override the
/// path (sec_headers).
fn spoofed_headers() -> Vec<(&'static str, String)> {
    [
        ("x-user-id", "admin"),
        ("x-session-id", "00000000-0000-0000-0000-000000000000"),
        ("x_user_id", "admin"),
        ("x-user_id", "admin"),
        ("x-sessiongate-login", "mallory"),
        ("x_sessiongate_login", "mallory"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x_forwarded_for", "6.6.6.6"),
        ("x-forwarded-proto", "http"),
        ("forwarded", "for=6.6.6.6;proto=http"),
        ("x-real-ip", "6.6.6.6"),
        ("x-original-url", "/admin"),
        ("x_rewrite_url", "/admin"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_security_cases_hold_over_http1_and_http2_over_tls() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let leaf = pki.leaf(&["localhost", "127.0.0.1"]);
    let files = pki.write("default", &leaf);
    let spec = GatewaySpec::standard(&up.url()).max_body_bytes("/public/", 1024);
    let gw = tls_gateway(spec, "", &tls_keys(&files, "watch = false")).await;
    let token = gw.login_over_tls(&pki).await;
    let addr = gw.addr;

    for proto in [Proto::H1, Proto::H2] {
        let p = format!("{proto:?}");
        // Climbing out of a public route (sec_paths): the protected
        // route's business, so 401, and nothing upstream.
        for path in [
            "/public/../secret",
            "/public/x/../../secret",
            "/public/./../secret",
        ] {
            let before = up.hits();
            let a = get(&pki, addr, proto, path).await;
            assert_eq!(a.status, 401, "{p} {path}: {}", a.text());
            assert_eq!(a.json()["error"]["code"], "session_required");
            assert_eq!(up.hits(), before, "{p} {path} reached the upstream");
        }
        // Encoded slashes, dots, backslashes, NULs: 400 invalid_path, with
        // or without a session, and nothing upstream.
        for path in [
            "/public/%2e%2e/secret",
            "/public/.%2E/secret",
            "/public/..%2fsecret",
            "/public/%2e%2e%2fsecret/data.txt",
            "/app%2fsecret",
            "/app%5Csecret",
            "/public/..;/secret",
            "/public/a%00b",
            "/public/a%0d%0ab",
        ] {
            for with_token in [false, true] {
                let headers = if with_token {
                    vec![("cookie", cookie(&token))]
                } else {
                    vec![]
                };
                let before = up.hits();
                let a = send(&pki, addr, proto, "GET", path, &headers, Bytes::new())
                    .await
                    .unwrap();
                assert_eq!(a.status, 400, "{p} {path}: {}", a.text());
                assert_eq!(a.json()["error"]["code"], "invalid_path", "{p} {path}");
                assert_eq!(up.hits(), before, "{p} {path} reached the upstream");
            }
        }
        // An accepted path arrives normalized, its query untouched.
        let a = get(&pki, addr, proto, "/public/./a/../echo?x=%2e%2e%2F..&y=%61").await;
        assert_eq!(a.status, 200, "{p}: {}", a.text());
        assert_eq!(a.json()["path"], "/public/echo");
        assert_eq!(a.json()["query"], "x=%2e%2e%2F..&y=%61");

        // Identity-header spoofing and look-alikes (sec_headers): none
        // reaches the upstream, with or without a session; no header of
        // the client begins a session.
        for (path, auth) in [("/public/e", None), ("/api/e", Some(cookie(&token)))] {
            let mut headers = spoofed_headers();
            if let Some(c) = &auth {
                headers.push(("cookie", c.clone()));
            }
            let a = send(&pki, addr, proto, "GET", path, &headers, Bytes::new())
                .await
                .unwrap();
            assert_eq!(a.status, 200, "{p} {path}: {}", a.text());
            assert!(a.header("set-cookie").is_none(), "{p} {path}");
            let echo = a.json();
            let names: Vec<&String> = echo["headers"].as_object().unwrap().keys().collect();
            for name in names {
                assert!(
                    !name.contains('_'),
                    "{p} {path}: {name} reached the upstream"
                );
                assert!(
                    ![
                        "forwarded",
                        "x-real-ip",
                        "x-original-url",
                        "x-sessiongate-login"
                    ]
                    .contains(&name.as_str()),
                    "{p} {path}: {name} reached the upstream"
                );
            }
            let user = if auth.is_some() { Some("alice") } else { None };
            assert_eq!(seen(&echo, "x-user-id"), user, "{p} {path}");
            assert_eq!(seen(&echo, "x-forwarded-for"), Some("127.0.0.1"));
            assert_eq!(seen(&echo, "x-forwarded-proto"), Some("https"));
            assert!(
                !echo.to_string().contains(&token),
                "{p} {path}: the token went upstream"
            );
        }
        // Token stripping: as a bearer next to another credential, only
        // ours goes.
        let headers = [
            ("authorization", format!("Bearer {token}")),
            ("x-app", "1".to_string()),
        ];
        let a = send(&pki, addr, proto, "GET", "/api/e", &headers, Bytes::new())
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{p}: {}", a.text());
        assert!(
            !a.text().contains(&token),
            "{p}: the bearer token went upstream"
        );
        assert_eq!(seen(&a.json(), "x-user-id"), Some("alice"));

        // A body over the route's limit: 413 before the upstream is asked.
        let before = up.hits();
        let a = send(
            &pki,
            addr,
            proto,
            "POST",
            "/public/upload",
            &[("content-length", "4096".to_string())],
            Bytes::from(vec![b'x'; 4096]),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 413, "{p}: {}", a.text());
        assert_eq!(
            up.hits(),
            before,
            "{p}: an oversized body reached the upstream"
        );

        // Oversized headers: refused, nothing upstream, and the next
        // connection is served.
        let size = match proto {
            // Over hyper's HTTP/1 read buffer (~400 KiB).
            Proto::H1 => 512 * 1024,
            // Over the advertised SETTINGS_MAX_HEADER_LIST_SIZE (16 KiB).
            Proto::H2 => 64 * 1024,
        };
        let before = up.hits();
        let big = [("x-big", "a".repeat(size))];
        match send(&pki, addr, proto, "GET", "/public/big", &big, Bytes::new()).await {
            Ok(a) => assert_eq!(a.status, 431, "{p}: {}", a.text()),
            Err(e) => assert!(!e.is_empty()),
        }
        assert_eq!(
            up.hits(),
            before,
            "{p}: oversized headers reached the upstream"
        );
        assert_eq!(get(&pki, addr, proto, "/public/after").await.status, 200);
    }

    // An h2c upgrade attempt inside TLS (HTTP/1.1 only: HTTP/2 has no
    // Upgrade): forwarded as a plain request, its Upgrade dropped.
    let headers = [
        ("connection", "Upgrade, HTTP2-Settings".to_string()),
        ("upgrade", "h2c".to_string()),
        ("http2-settings", "AAMAAABkAAQAAP__".to_string()),
    ];
    let a = send(
        &pki,
        addr,
        Proto::H1,
        "GET",
        "/public/x",
        &headers,
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    let echo = a.json();
    assert_eq!(seen(&echo, "upgrade"), None);
    assert_eq!(seen(&echo, "http2-settings"), None);

    assert!(gw.admin_user_sessions("mallory").await.is_empty());
    assert!(gw.admin_user_sessions("admin").await.is_empty());
}

impl GatewayUnderTest {
    /// Logs `user` in over TLS (HTTP/1.1) and returns the token.
    async fn login_over_tls(&self, pki: &Pki) -> String {
        let a = get(pki, self.addr, Proto::H1, "/public/login?user=alice").await;
        assert_eq!(a.status, 200, "{}", a.text());
        let raw = a
            .header("set-cookie")
            .expect("a session cookie")
            .to_string();
        let value = raw.split(';').next().unwrap();
        value
            .strip_prefix(&format!("{COOKIE}="))
            .expect("the session cookie")
            .to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connections_are_closed_but_not_busy_ones() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let (gw, _) = standard_tls(
        &pki,
        &up,
        "idle_timeout_ms = 300\nhttp2_keepalive_interval_ms = 60000",
    )
    .await;
    for proto in [Proto::H1, Proto::H2] {
        let stream = connect_tls(
            gw.addr,
            "localhost",
            client_config(&pki, &[&rustls::version::TLS13], &[proto.alpn()]),
        )
        .await
        .unwrap();
        let started = Instant::now();
        let io = TokioIo::new(stream);
        // The sender is kept: a client dropping it would close the
        // connection itself.
        let (status, conn, _sender): (u16, _, Box<dyn std::any::Any + Send>) = match proto {
            Proto::H1 => {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                let conn = tokio::spawn(conn);
                // Longer than the idle timeout, but busy.
                let req = Request::get("/public/slow?ms=900")
                    .header("host", "localhost")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                let status = resp.status().as_u16();
                resp.into_body().collect().await.unwrap();
                (status, conn, Box::new(sender))
            }
            Proto::H2 => {
                let (mut sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .unwrap();
                let conn = tokio::spawn(conn);
                let req = Request::get("https://localhost/public/slow?ms=900")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                let status = resp.status().as_u16();
                resp.into_body().collect().await.unwrap();
                (status, conn, Box::new(sender))
            }
        };
        assert_eq!(
            status, 200,
            "{proto:?}: a slow request on a busy connection"
        );
        assert!(started.elapsed() >= Duration::from_millis(900));
        // Then nothing: the server ends the connection.
        let idle_from = Instant::now();
        tokio::time::timeout(BOUND, conn)
            .await
            .unwrap_or_else(|_| panic!("{proto:?}: an idle TLS connection stayed open"))
            .unwrap()
            .ok();
        assert!(
            idle_from.elapsed() >= Duration::from_millis(250),
            "{proto:?}: closed after {:?}",
            idle_from.elapsed()
        );
    }
}

// ---------------------------------------------------------------------------
// Reloads
// ---------------------------------------------------------------------------

/// What a client opening a new connection for every request saw.
#[derive(Default)]
struct LoopLog {
    /// SHA-256 of the leaf each successful request's handshake got.
    served: Vec<String>,
    failures: Vec<String>,
}

/// Opens a new TLS connection for every request (`GET /public/loop`),
/// until `stop`, at most 20 000 times or 60 s.
fn loop_new_connections(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<LoopLog>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        for _ in 0..20_000 {
            if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                return;
            }
            let outcome = async {
                let stream = connect_tls(addr, "localhost", config.clone())
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
                let leaf = hex(&Sha256::digest(leaf_of(&stream).as_ref()));
                let a =
                    send_on(stream, Proto::H1, "GET", "/public/loop", &[], Bytes::new()).await?;
                if a.status != 200 {
                    return Err(format!("status {}", a.status));
                }
                Ok(leaf)
            }
            .await;
            let mut log = log.lock().unwrap();
            match outcome {
                Ok(leaf) => log.served.push(leaf),
                Err(e) => log.failures.push(e),
            }
        }
    })
}

/// Waits until `log` satisfies `done`; panics after `within`.
async fn wait_for_log(log: &Mutex<LoopLog>, within: Duration, done: impl Fn(&LoopLog) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        {
            let log = log.lock().unwrap();
            if done(&log) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the client loop did not get there in time: {} served, failures {:?}",
                log.served.len(),
                &log.failures[..log.failures.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Swaps the certificate on disk while a client loops over new
/// connections; `trigger` makes the gateway notice. Zero failed requests,
/// the old certificate until the swap and the new one after it.
/// `sessiongate_worker_connections_total` of workers 0 and 1.
async fn worker_connections(gw: &GatewayUnderTest) -> [u64; 2] {
    let text = metrics(gw).await;
    [0, 1].map(|w| {
        metric(
            &text,
            &format!("sessiongate_worker_connections_total{{worker=\"{w}\"}}"),
        )
    })
}

async fn swap_under_load(watch: bool, workers: usize) {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let old = pki.leaf(&["localhost", "127.0.0.1"]);
    let files = pki.write("default", &old);
    let extra = if watch {
        "watch = true\nwatch_interval_ms = 50"
    } else {
        "watch = false"
    };
    let gw = tls_gateway(
        GatewaySpec::standard(&up.url()),
        &format!("worker_threads = {workers}"),
        &tls_keys(&files, extra),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(LoopLog::default()));
    // A full handshake each time (resumption is `a_reload_forgets_...`'s).
    let mut config = (*default_client_config(&pki)).clone();
    config.resumption = rustls::client::Resumption::disabled();
    let client = loop_new_connections(gw.addr, Arc::new(config), stop.clone(), log.clone());
    wait_for_log(&log, BOUND, |l| l.served.len() >= 20).await;

    let new = pki.leaf(&["localhost", "127.0.0.1"]);
    // Rewritten in place, the chain first and then the key, as an
    // operator's copy would.
    std::fs::write(&files.0, &new.cert_pem).unwrap();
    std::fs::write(&files.1, &new.key_pem).unwrap();
    if !watch {
        let (status, body) = admin_reload(&gw).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["certificates"][0]["sha256"], new.sha256());
        assert_eq!(body["certificates"][0]["default"], true);
    }
    let new_sha = new.sha256();
    let reloaded = worker_connections(&gw).await;
    wait_for_log(&log, Duration::from_secs(10), |l| {
        l.served.iter().filter(|s| **s == new_sha).count() >= 20
    })
    .await;
    if workers > 1 {
        // Both workers took connections after the reload (and every
        // handshake after the first new one is checked below).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = worker_connections(&gw).await;
            if now[0] > reloaded[0] && now[1] > reloaded[1] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "new connections reached one worker only: {reloaded:?} → {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();

    let log = std::mem::take(&mut *log.lock().unwrap());
    assert!(
        log.failures.is_empty(),
        "failed requests: {:?}",
        log.failures
    );
    let first_new = log.served.iter().position(|s| *s == new_sha).unwrap();
    assert!(first_new >= 20);
    assert!(log.served[..first_new].iter().all(|s| *s == old.sha256()));
    assert!(
        log.served[first_new..].iter().all(|s| *s == new_sha),
        "the old certificate was served after the new one"
    );
    let text = metrics(&gw).await;
    assert!(
        metric(&text, "sessiongate_tls_reloads_total{outcome=\"ok\"}") >= 1,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_and_reloaded_through_the_admin_api_fails_no_request() {
    swap_under_load(false, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_reload_reaches_every_worker_and_fails_no_request() {
    swap_under_load(false, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_on_disk_is_picked_up_by_the_watcher_and_fails_no_request() {
    swap_under_load(true, 1).await;
}

/// What a case does to the certificate files.
type Damage<'a> = Box<dyn Fn() + 'a>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_forgets_the_tls_sessions_made_under_the_old_certificate() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let (gw, old) = standard_tls(&pki, &up, "").await;
    // One client config: it keeps the session tickets it is given.
    let config = client_config(&pki, &[&rustls::version::TLS13], &[b"http/1.1"]);
    let connect = || async {
        let stream = connect_tls(gw.addr, "localhost", config.clone())
            .await
            .unwrap();
        let kind = stream.get_ref().1.handshake_kind();
        let leaf = leaf_of(&stream);
        // The tickets come after the handshake: a request reads them.
        let a = send_on(stream, Proto::H1, "GET", "/public/x", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(a.status, 200);
        (kind, leaf)
    };
    assert_eq!(
        connect().await,
        (Some(rustls::HandshakeKind::Full), old.der.clone())
    );
    assert_eq!(
        connect().await,
        (Some(rustls::HandshakeKind::Resumed), old.der.clone()),
        "the second connection resumes"
    );
    let new = pki.leaf(&["localhost", "127.0.0.1"]);
    pki.write("default", &new);
    assert_eq!(admin_reload(&gw).await.0, 200);
    assert_eq!(
        connect().await,
        (Some(rustls::HandshakeKind::Full), new.der.clone()),
        "a session of the old certificate was resumed after the reload"
    );
    assert_eq!(
        connect().await,
        (Some(rustls::HandshakeKind::Resumed), new.der)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_is_refused_and_the_old_one_stays_in_service() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let (gw, old) = standard_tls(&pki, &up, "").await;
    let files = (
        pki.dir.path().join("default.crt"),
        pki.dir.path().join("default.key"),
    );
    let served = || async {
        let stream = connect_tls(gw.addr, "localhost", default_client_config(&pki))
            .await
            .expect("still served");
        let leaf = leaf_of(&stream);
        let a = send_on(stream, Proto::H1, "GET", "/public/x", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(a.status, 200);
        leaf
    };
    assert_eq!(served().await, old.der);

    let other = pki.leaf(&["localhost"]);
    let cases: Vec<(&str, Damage<'_>, &str, &str)> = vec![
        (
            "garbage",
            Box::new(|| std::fs::write(&files.0, "this is not a certificate\n").unwrap()),
            "server.tls.cert_file",
            "no PEM certificate",
        ),
        (
            "a truncated certificate",
            Box::new(|| std::fs::write(&files.0, &old.cert_pem[..old.cert_pem.len() / 2]).unwrap()),
            "server.tls.cert_file",
            "PEM",
        ),
        (
            "a key that is not the certificate's",
            Box::new(|| {
                std::fs::write(&files.0, &old.cert_pem).unwrap();
                std::fs::write(&files.1, &other.key_pem).unwrap();
            }),
            "server.tls.key_file",
            "is not the private key",
        ),
        (
            "a missing file",
            Box::new(|| std::fs::remove_file(&files.0).unwrap()),
            "server.tls.cert_file",
            "cannot read",
        ),
    ];
    let mut failures = 0;
    for (what, damage, key, says) in &cases {
        damage();
        let (status, body) = admin_reload(&gw).await;
        assert_eq!(status, 422, "{what}: {body}");
        failures += 1;
        assert_eq!(body["error"]["code"], "reload_failed", "{what}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(key), "{what}: {message}");
        assert!(message.contains(says), "{what}: {message}");
        assert!(
            message.contains("the previous certificates stay in service"),
            "{what}: {message}"
        );
        assert_eq!(
            served().await,
            old.der,
            "{what}: the old certificate is gone"
        );
        let listed: Value = gw
            .client
            .get(gw.admin_url("/v1/tls"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(listed["certificates"][0]["sha256"], old.sha256(), "{what}");
    }
    // Fixed: the next reload serves the new pair.
    pki.write("default", &other);
    let (status, body) = admin_reload(&gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(served().await, other.der);
    let text = metrics(&gw).await;
    assert_eq!(
        metric(&text, "sessiongate_tls_reloads_total{outcome=\"error\"}"),
        failures
    );
    assert_eq!(
        metric(&text, "sessiongate_tls_reloads_total{outcome=\"ok\"}"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_at_start_is_an_error_naming_the_key_and_file() {
    let pki = Pki::new();
    let good = pki.leaf(&["localhost"]);
    let good_files = pki.write("good", &good);
    let other = pki.leaf(&["localhost"]);
    let garbage = pki.dir.path().join("garbage.crt");
    std::fs::write(&garbage, "garbage").unwrap();
    let mismatched_key = pki.dir.path().join("other.key");
    std::fs::write(&mismatched_key, &other.key_pem).unwrap();
    let db = tempfile::tempdir().unwrap();
    let cases = [
        (
            tls_keys(&(garbage.clone(), good_files.1.clone()), ""),
            "server.tls.cert_file",
            "garbage.crt",
        ),
        (
            tls_keys(&(good_files.0.clone(), mismatched_key.clone()), ""),
            "server.tls.key_file",
            "other.key",
        ),
        (
            tls_keys(
                &good_files,
                &format!(
                    "\n[[server.tls.certificates]]\nserver_names = [\"second.test\"]\n\
                     cert_file = {}\nkey_file = {}\n",
                    qp(&pki.dir.path().join("absent.crt")),
                    qp(&good_files.1)
                ),
            ),
            "server.tls.certificates[0].cert_file",
            "absent.crt",
        ),
    ];
    for (tls, key, file) in cases {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\n{tls}\n\
             [store]\ndatabase_url = {}\n\
             [[upstreams]]\nname = \"app\"\nurls = [\"http://127.0.0.1:9\"]\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"app\"\n",
            q(&database_url(&db))
        );
        let config = sessiongate::config::Config::from_toml_str(&text).unwrap();
        let err = match sessiongate::server::start(config).await {
            Ok(_) => panic!("started with a bad {key}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&format!("key `{key}`")), "{err}");
        assert!(err.contains(file), "{err}");

        // `sessiongate check` says the same, and exits 1.
        let path = db.path().join("gateway.toml");
        std::fs::write(&path, &text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sessiongate"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "check passed a bad {key}");
        assert!(stderr.contains(&format!("key `{key}`")), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificates_of_the_running_binary() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let old = pki.leaf(&["localhost", "127.0.0.1"]);
    let files = pki.write("default", &old);
    let dir = tempfile::tempdir().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let text = GatewaySpec::standard(&up.url())
        .to_toml(&database_url(&dir), &listen.to_string(), &admin)
        .replacen("[server]\n", "[server]\nworker_threads = 2\n", 1)
        .replacen(
            "\n[admin]\n",
            &format!(
                "\n[server.tls]\n{}\n\n[admin]\n",
                tls_keys(&files, "watch = false")
            ),
            1,
        );
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, text).unwrap();
    let mut process = ServeProcess::spawn(dir.path(), &config_path);
    process
        .wait_listening(listen, Duration::from_secs(15))
        .await;
    let leaf = || async {
        let stream = connect_tls(listen, "localhost", default_client_config(&pki))
            .await
            .unwrap();
        leaf_of(&stream)
    };
    assert_eq!(leaf().await, old.der);
    // A connection made before the reload, kept open across it.
    let before = connect_tls(listen, "localhost", default_client_config(&pki))
        .await
        .unwrap();

    let new = pki.leaf(&["localhost", "127.0.0.1"]);
    pki.write("default", &new);
    let kill = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(process.pid().to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + BOUND;
    while leaf().await != new.der {
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served after SIGHUP:\n{}",
            process.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every later handshake gets it, on both workers.
    let worker_counts = || async {
        let text = client()
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        [0, 1].map(|w| {
            metric(
                &text,
                &format!("sessiongate_worker_connections_total{{worker=\"{w}\"}}"),
            )
        })
    };
    let reloaded = worker_counts().await;
    for tries in 1.. {
        assert_eq!(leaf().await, new.der, "a worker served the old certificate");
        let now = worker_counts().await;
        if now[0] > reloaded[0] && now[1] > reloaded[1] {
            break;
        }
        assert!(tries < 200, "200 connections reached one worker only");
    }
    assert!(process.output().contains("TLS certificates reloaded"));
    assert!(process.try_wait().is_none(), "SIGHUP stopped the process");
    // The connection from before still works.
    let a = send_on(before, Proto::H1, "GET", "/public/x", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(a.status, 200);
}

// ---------------------------------------------------------------------------
// SNI
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_an_unknown_name_gets_the_default() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let default = pki.leaf(&["localhost", "127.0.0.1"]);
    let second = pki.leaf(&["second.test"]);
    let wild = pki.leaf(&["*.wild.test"]);
    let default_files = pki.write("default", &default);
    let second_files = pki.write("second", &second);
    let wild_files = pki.write("wild", &wild);
    let tls = tls_keys(
        &default_files,
        &format!(
            "watch = false\n\
             [[server.tls.certificates]]\nserver_names = [\"Second.Test\"]\n\
             cert_file = {}\nkey_file = {}\n\
             [[server.tls.certificates]]\nserver_names = [\"*.wild.test\"]\n\
             cert_file = {}\nkey_file = {}\n",
            qp(&second_files.0),
            qp(&second_files.1),
            qp(&wild_files.0),
            qp(&wild_files.1)
        ),
    );
    let gw = tls_gateway(GatewaySpec::standard(&up.url()), "", &tls).await;
    let verified = default_client_config(&pki);
    for (name, expected) in [
        ("localhost", &default),
        ("second.test", &second),
        ("SECOND.test", &second),
        ("a.wild.test", &wild),
        // No SNI is sent for an address: the default.
        ("127.0.0.1", &default),
    ] {
        let stream = connect_tls(gw.addr, name, verified.clone())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(leaf_of(&stream), expected.der, "{name}");
    }
    for name in ["unknown.test", "a.b.wild.test", "wild.test"] {
        let stream = connect_tls(gw.addr, name, accept_any_config())
            .await
            .unwrap();
        assert_eq!(leaf_of(&stream), default.der, "{name}");
        // And a verifying client refuses it: the default is not for it.
        assert!(
            connect_tls(gw.addr, name, verified.clone()).await.is_err(),
            "{name}"
        );
    }
    // A whole request by name, HTTP/2.
    let client = reqwest_tls(&pki, gw.addr, None, Some(Proto::H2));
    let resp = client
        .get(format!("https://second.test:{}/public/x", gw.addr.port()))
        .send()
        .await
        .unwrap();
    let info = resp.extensions().get::<reqwest::tls::TlsInfo>().unwrap();
    assert_eq!(info.peer_certificate(), Some(second.der.as_ref()));
    let echo = echo_of(resp).await;
    assert_eq!(
        seen(&echo, "host"),
        Some(format!("second.test:{}", gw.addr.port()).as_str())
    );
    let listed: Value = gw
        .client
        .get(gw.admin_url("/v1/tls"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let certs = listed["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 3);
    assert_eq!(certs[1]["server_names"][0], "second.test");
    assert_eq!(certs[2]["sha256"], wild.sha256());
}

// ---------------------------------------------------------------------------
// The redirect listener, HSTS
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redirect_listener_answers_every_request_with_308_to_https() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let leaf = pki.leaf(&["localhost", "127.0.0.1"]);
    let files = pki.write("default", &leaf);
    let gw = tls_gateway(
        GatewaySpec::standard(&up.url()),
        "",
        &tls_keys(
            &files,
            "watch = false\nredirect_listen = \"127.0.0.1:0\"\nhsts_max_age = 600",
        ),
    )
    .await;
    let redirect = gw.redirect_addr().expect("the redirect listener");
    let port = gw.addr.port();
    for (request, location) in [
        (
            "GET /api/a/b?x=1&y=%2F HTTP/1.1\r\nHost: LocalHost:8080\r\n".to_string(),
            format!("https://localhost:{port}/api/a/b?x=1&y=%2F"),
        ),
        (
            "POST /public/login?user=x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc"
                .to_string(),
            format!("https://example.com:{port}/public/login?user=x"),
        ),
        (
            "GET //evil.test/x HTTP/1.1\r\nHost: example.com\r\n".to_string(),
            format!("https://example.com:{port}//evil.test/x"),
        ),
        (
            "GET / HTTP/1.1\r\nHost: [::1]:80\r\n".to_string(),
            format!("https://[::1]:{port}/"),
        ),
        (
            "GET http://example.org/p?q HTTP/1.1\r\nHost: other.test\r\n".to_string(),
            format!("https://example.org:{port}/p?q"),
        ),
        (
            "OPTIONS * HTTP/1.1\r\nHost: example.com\r\n".to_string(),
            format!("https://example.com:{port}/"),
        ),
    ] {
        let request = if request.ends_with("abc") {
            request.replacen("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1)
        } else {
            format!("{request}Connection: close\r\n\r\n")
        };
        let (status, headers, _) = raw_http(redirect, &request).await;
        assert_eq!(status, 308, "{request}");
        let got = headers
            .iter()
            .find(|(k, _)| k == "location")
            .map(|(_, v)| v.clone());
        assert_eq!(got, Some(location), "{request}");
        // HSTS only means something over HTTPS.
        assert!(
            !headers.iter().any(|(k, _)| k == "strict-transport-security"),
            "{request}"
        );
    }
    // A Host that is not a plain name or address is never reflected.
    for host in [
        "evil.test/x",
        "user@evil.test",
        "a..b",
        "evil.test\"><script>",
        "evil.test%0d%0aSet-Cookie:x",
        "-",
        "",
    ] {
        let request = format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let (status, headers, _) = raw_http(redirect, &request).await;
        assert_eq!(status, 400, "Host: {host}");
        assert!(
            !headers.iter().any(|(k, _)| k == "location"),
            "Host: {host}"
        );
    }
    let (status, _, _) = raw_http(redirect, "GET /x HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 400, "no Host at all");
    assert_eq!(up.hits(), 0, "the redirect listener proxied something");

    // Following the redirect lands on the HTTPS listener.
    let plain = client()
        .get(format!("http://{redirect}/public/x?y=1"))
        .header("host", "localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 308);
    let location = plain.headers()["location"].to_str().unwrap().to_string();
    let resp = reqwest_tls(&pki, gw.addr, None, None)
        .get(&location)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["strict-transport-security"], "max-age=600");
    let echo = echo_of(resp).await;
    assert_eq!(echo["path"], "/public/x");
    assert_eq!(echo["query"], "y=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_is_on_every_https_response_when_configured_and_absent_otherwise() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let leaf = pki.leaf(&["localhost", "127.0.0.1"]);
    let files = pki.write("default", &leaf);
    let with = tls_gateway(
        GatewaySpec::standard(&up.url()),
        "",
        &tls_keys(
            &files,
            "watch = false\nhsts_max_age = 31536000\nhsts_include_subdomains = true",
        ),
    )
    .await;
    let (without, _) = standard_tls(&pki, &up, "").await;
    for proto in [Proto::H1, Proto::H2] {
        // A proxied 200, the gateway's own 401 and 400.
        for (path, status) in [
            ("/public/x", 200),
            ("/api/x", 401),
            ("/public/%2e%2e/x", 400),
        ] {
            let a = get(&pki, with.addr, proto, path).await;
            assert_eq!(a.status, status, "{proto:?} {path}");
            assert_eq!(
                a.header("strict-transport-security"),
                Some("max-age=31536000; includeSubDomains"),
                "{proto:?} {path}"
            );
            let a = get(&pki, without.addr, proto, path).await;
            assert_eq!(a.status, status, "{proto:?} {path}");
            assert_eq!(
                a.header("strict-transport-security"),
                None,
                "{proto:?} {path}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Clients that do not handshake
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_dropped_after_first_byte_timeout_while_others_are_served() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let (gw, _) = standard_tls(
        &pki,
        &up,
        "first_byte_timeout_ms = 300\nidle_timeout_ms = 60000",
    )
    .await;
    let opened = Instant::now();
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    // A ClientHello's record header and the start of the message, then
    // nothing: stalled mid-handshake.
    let mut stalled = TcpStream::connect(gw.addr).await.unwrap();
    stalled
        .write_all(&[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ])
        .await
        .unwrap();
    // A finished handshake and then no request: the same clock.
    let mut quiet = connect_tls(gw.addr, "localhost", default_client_config(&pki))
        .await
        .unwrap();

    // Others are served meanwhile, over both protocols.
    for proto in [Proto::H1, Proto::H2] {
        assert_eq!(get(&pki, gw.addr, proto, "/public/x").await.status, 200);
    }
    for (what, stream) in [("silent", &mut silent), ("stalled", &mut stalled)] {
        let (got, _) = closed_within(stream, BOUND).await;
        let after = opened.elapsed();
        assert!(
            after >= Duration::from_millis(250),
            "{what}: closed after {after:?}"
        );
        // At most an alert, never an HTTP answer.
        assert!(!got.starts_with(b"HTTP/"), "{what}: {got:?}");
    }
    let (got, _) = closed_within(&mut quiet, BOUND).await;
    assert!(got.is_empty(), "{got:?}");
    let text = metrics(&gw).await;
    assert!(
        metric(
            &text,
            "sessiongate_tls_handshake_failures_total{reason=\"timeout\"}"
        ) >= 2,
        "{text}"
    );
    assert_eq!(get(&pki, gw.addr, Proto::H2, "/public/y").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_or_h2c_on_the_tls_port_is_closed_and_the_next_client_is_served() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let (gw, _) = standard_tls(&pki, &up, "").await;
    for request in [
        b"GET /public/x HTTP/1.1\r\nHost: localhost\r\nx-user-id: admin\r\n\r\n".as_slice(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(),
    ] {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let (got, _) = closed_within(&mut stream, BOUND).await;
        assert!(
            !got.starts_with(b"HTTP/"),
            "answered plain HTTP: {:?}",
            String::from_utf8_lossy(&got)
        );
        // Then a TLS client right away.
        assert_eq!(get(&pki, gw.addr, Proto::H1, "/public/y").await.status, 200);
    }
    assert_eq!(up.hits(), 2, "only the TLS requests reached the upstream");
    let text = metrics(&gw).await;
    assert!(
        metric(
            &text,
            "sessiongate_tls_handshake_failures_total{reason=\"protocol\"}"
        ) >= 2,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_admin_endpoints_are_404_without_tls_and_need_the_admin_token() {
    let up = TestUpstream::start().await;
    let gw = GatewayUnderTest::start(GatewaySpec::standard(&up.url())).await;
    for (method, path) in [
        (reqwest::Method::POST, "/v1/tls/reload"),
        (reqwest::Method::GET, "/v1/tls"),
    ] {
        let resp = gw
            .client
            .request(method.clone(), gw.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let err = expect_error(resp, 404).await;
        assert_eq!(err["code"], "not_found", "{method} {path}");
        let resp = gw
            .client
            .request(method.clone(), gw.admin_url(path))
            .send()
            .await
            .unwrap();
        expect_error(resp, 401).await;
    }
    let pki = Pki::new();
    let (tls, _) = standard_tls(&pki, &up, "").await;
    let resp = tls
        .client
        .post(tls.admin_url("/v1/tls/reload"))
        .send()
        .await
        .unwrap();
    expect_error(resp, 401).await;
    let resp = tls
        .client
        .get(tls.admin_url("/v1/tls/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    expect_error(resp, 405).await;
}

// ---------------------------------------------------------------------------
// Behind a TCP balancer: the PROXY protocol, then TLS
// ---------------------------------------------------------------------------

/// A TCP connection to `addr` from the loopback address `src`.
async fn connect_from(src: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((src, 0))).unwrap();
    socket.connect(addr).await.unwrap()
}

/// The TLS handshake (SNI `localhost`) on an open connection.
async fn tls_over(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(BOUND, TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_balancer_the_proxy_header_comes_before_the_tls_handshake() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let (gw, leaf) = standard_tls(
        &pki,
        &up,
        "trusted_proxies = [\"127.0.0.2\"]\nproxy_protocol = true\nfirst_byte_timeout_ms = 2000",
    )
    .await;
    let proxy_line = format!(
        "PROXY TCP4 203.0.113.7 127.0.0.1 5555 {}\r\n",
        gw.addr.port()
    );
    for proto in [Proto::H1, Proto::H2] {
        // The balancer (127.0.0.2) passes the client's TLS through.
        let mut tcp = connect_from([127, 0, 0, 2], gw.addr).await;
        tcp.write_all(proxy_line.as_bytes()).await.unwrap();
        let config = client_config(
            &pki,
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            &[proto.alpn()],
        );
        let stream = tls_over(tcp, config).await.unwrap();
        assert_eq!(leaf_of(&stream), leaf.der);
        let a = send_on(stream, proto, "GET", "/public/x", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{proto:?}: {}", a.text());
        let echo = a.json();
        assert_eq!(
            seen(&echo, "x-forwarded-for"),
            Some("203.0.113.7"),
            "{proto:?}"
        );
        assert_eq!(seen(&echo, "x-forwarded-proto"), Some("https"), "{proto:?}");
    }
    // A client that is not the balancer is served without a PROXY header
    // and as itself; one that sends a PROXY line is no TLS client.
    let a = get(&pki, gw.addr, Proto::H2, "/public/x").await;
    assert_eq!(seen(&a.json(), "x-forwarded-for"), Some("127.0.0.1"));
    let mut tcp = connect_from([127, 0, 0, 1], gw.addr).await;
    tcp.write_all(proxy_line.as_bytes()).await.unwrap();
    assert!(
        tls_over(tcp, default_client_config(&pki)).await.is_err(),
        "a PROXY line from an untrusted client was taken"
    );
    // The balancer with its header and then plain HTTP: closed, not served.
    let before = up.hits();
    let mut tcp = connect_from([127, 0, 0, 2], gw.addr).await;
    tcp.write_all(
        format!("{proxy_line}GET /public/x HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let (got, _) = closed_within(&mut tcp, BOUND).await;
    assert!(
        !got.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(up.hits(), before);
}
