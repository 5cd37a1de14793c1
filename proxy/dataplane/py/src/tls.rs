//! TLS settings for both legs, built once at start: the listener's
//! certificate (`tls:`), how `wss://` / `https://` upstreams are verified and
//! the client certificate they are shown (`upstream_tls:`), with the
//! semantics of Python's SSL contexts where the settings name them (a CA
//! file, `verify: false`). The health check's probe goes through the same
//! connector (`probe.rs`): one verifier for the traffic and the probe.
//!
//! rustls with the ring provider. Every error here is a sentence naming the
//! setting and its file; `lib.rs` raises it as a `ValueError`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// ring's provider: TLS 1.2 and 1.3 with rustls' default suites and groups.
/// rustls 0.23.48 deprecates it for lacking post-quantum key exchange (its
/// aws-lc-rs provider has X25519MLKEM768), which would cost a C library
/// build of minutes; the classical groups are what Python's OpenSSL offers
/// by default before 3.5.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM file's error as a sentence naming the setting and the file.
fn pem_error(setting: &str, path: &str, what: &str, error: pem::Error) -> String {
    match error {
        pem::Error::Io(e) => format!("{setting}: cannot read {path:?}: {e}"),
        pem::Error::NoItemsFound => format!("{setting}: no {what} in {path:?} (PEM expected)"),
        // Said without the marker or the line: rustls-pki-types' Display
        // writes them as byte values ("[67, 69, …]", the tls probe), and in a
        // key whose line breaks were lost (a Secret pasted as one line) they
        // hold the whole key (the new7 probe).
        pem::Error::MissingSectionEnd { .. } => format!(
            "{setting}: {path:?} is not valid PEM: a BEGIN line without its END line \
(the file cut short, or its line breaks lost?)"
        ),
        pem::Error::IllegalSectionStart { .. } => {
            format!("{setting}: {path:?} is not valid PEM: a malformed BEGIN line")
        }
        pem::Error::Base64Decode(_) => {
            format!(
                "{setting}: {path:?} is not valid PEM: a line between BEGIN and END is not base64"
            )
        }
        other => format!("{setting}: {path:?} is not valid PEM: {other}"),
    }
}

/// Whether a PEM file holds an encrypted private key (PKCS #8's `ENCRYPTED
/// PRIVATE KEY`, or OpenSSL's traditional `Proc-Type: 4,ENCRYPTED`).
fn encrypted_key(pem: &[u8]) -> bool {
    let has = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    has(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || has(b"Proc-Type: 4,ENCRYPTED")
}

/// The largest PEM file read, as proxy/sections.py's `MAX_SETTING_FILE_BYTES`:
/// a CA bundle of thousands of certificates fits.
const MAX_PEM_FILE: u64 = 4 * 1024 * 1024;

/// The bytes of a file a TLS setting names: a regular file (or a link to one,
/// as Kubernetes mounts Secrets) of at most `MAX_PEM_FILE` bytes. A FIFO held
/// a reload (built on the brain's event loop) for good, SIGTERM included, and
/// /dev/zero grew memory by gigabytes a second. Opened without blocking: a
/// FIFO is then seen for what it is.
fn read_pem_file(setting: &str, path: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let cannot = |why: &dyn std::fmt::Display| format!("{setting}: cannot read {path:?}: {why}");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| cannot(&e))?;
    let meta = file.metadata().map_err(|e| cannot(&e))?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(cannot(&what));
    }
    let mut pem = Vec::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_end(&mut pem)
        .map_err(|e| cannot(&e))?;
    if pem.len() as u64 > MAX_PEM_FILE {
        return Err(cannot(&"larger than 4 MiB"));
    }
    // An editor's UTF-8 byte-order mark: the BEGIN line it starts was taken
    // for text around the PEM, and the file read as holding none (new8), or,
    // in a chain or bundle `cat` made of such files, lost that certificate
    // without a word (new9). PEM is ASCII: every mark goes.
    const BOM: &[u8] = b"\xef\xbb\xbf";
    if pem.windows(BOM.len()).any(|w| w == BOM) {
        let mut kept = Vec::with_capacity(pem.len());
        let mut rest = pem.as_slice();
        while let Some(at) = rest.windows(BOM.len()).position(|w| w == BOM) {
            kept.extend_from_slice(&rest[..at]);
            rest = &rest[at + BOM.len()..];
        }
        kept.extend_from_slice(rest);
        pem = kept;
    }
    Ok(pem)
}

/// Every certificate of a PEM file; at least one.
fn read_certificates(setting: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let what = "certificate (BEGIN CERTIFICATE)";
    let pem = read_pem_file(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(setting, path, what, e))?;
    if certs.is_empty() {
        return Err(pem_error(setting, path, what, pem::Error::NoItemsFound));
    }
    Ok(certs)
}

/// The largest certificate webpki (rustls' verifier, which also parses the
/// listener's own certificate) reads: an outer SEQUENCE whose length fits in
/// two bytes, 64 KiB of DER.
const MAX_CERTIFICATE_DER: usize = 0xFFFF + 4;

/// Why rustls refused a certificate of ours (not a peer's: rustls' own
/// wording, "invalid peer certificate", would blame one).
fn own_certificate_error(cert: &CertificateDer<'_>, error: rustls::Error) -> String {
    match error {
        rustls::Error::InvalidCertificate(_) if cert.len() > MAX_CERTIFICATE_DER => format!(
            "it is {} bytes of DER, too large for loopwatch's TLS library (rustls reads \
             certificates of 64 KiB of DER at most: fewer names or extensions)",
            cert.len()
        ),
        rustls::Error::InvalidCertificate(e) => format!("it is not a usable certificate ({e:?})"),
        other => other.to_string(),
    }
}

/// A certificate chain and its private key, as `section.cert_file` and
/// `section.key_file` name them (`tls` for the listener's, `upstream_tls` for
/// the client certificate sent to upstreams): read now, and checked (the key
/// is the certificate's, rustls can use both), every error a sentence naming
/// the setting and the file.
fn certified_key(
    section: &str,
    cert_file: &str,
    key_file: &str,
) -> Result<Arc<CertifiedKey>, String> {
    let certs = read_certificates(&format!("{section}.cert_file"), cert_file)?;
    let pem = read_pem_file(&format!("{section}.key_file"), key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        // Whatever the PEM error: PKCS #8's encrypted keys are skipped (no
        // key found), OpenSSL's traditional ones (`Proc-Type: 4,ENCRYPTED`
        // headers) fail to decode as base64.
        if encrypted_key(&pem) {
            // PEM indeed, but nothing loopwatch can use without a passphrase.
            return format!(
                "{section}.key_file: {key_file:?} is an encrypted private key, which loopwatch \
                 cannot read: decrypt it (openssl pkey -in KEY -out PLAIN_KEY) and keep the \
                 plain key's file readable by loopwatch only"
            );
        }
        pem_error(
            &format!("{section}.key_file"),
            key_file,
            "private key (BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
            e,
        )
    })?;
    let leaf = certs[0].clone();
    // CertifiedKey::from_der's two steps, so that a key of a kind rustls does
    // not take is said as such: its own words ("failed to parse private key
    // as RSA, ECDSA, or EdDSA") sent operators looking for a corrupt file.
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|_| {
            format!(
                "{section}.key_file: the key in {key_file:?} is of a kind or size loopwatch's TLS \
                 library does not take: it takes RSA keys of 2048 to 4096 bits, ECDSA P-256 or P-384, \
                 and Ed25519 (not RSA 1024 or 8192, P-521 or Ed448)"
            )
        })?;
    let certified = CertifiedKey::new(certs, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(e) => Err(match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "{section}.key_file: the key in {key_file:?} is not the key of the certificate in {cert_file:?}"
            ),
            rustls::Error::InvalidCertificate(_) => format!(
                "{section}.cert_file: the first certificate in {cert_file:?}: {}",
                own_certificate_error(&leaf, e)
            ),
            other => format!("{section}: {cert_file:?} with {key_file:?}: {other}"),
        }),
    }
}

/// The listener's TLS (`tls.cert_file`, `tls.key_file`): the certificate
/// chain and its key, read now; ALPN `http/1.1`; no client certificates.
pub fn listener_acceptor(cert_file: &str, key_file: &str) -> Result<TlsAcceptor, String> {
    let key = certified_key("tls", cert_file, key_file)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The client certificate loopwatch presents to every `wss://` and
/// `https://` upstream (`upstream_tls.cert_file`, `upstream_tls.key_file`),
/// read and checked now, for [`UpstreamTls::new`].
pub fn client_certificate(cert_file: &str, key_file: &str) -> Result<Arc<CertifiedKey>, String> {
    certified_key("upstream_tls", cert_file, key_file)
}

/// How `wss://` and `https://` upstreams are reached (`upstream_tls:`).
pub struct UpstreamTls {
    pub connector: TlsConnector,
    /// `upstream_tls.server_name`: SNI and verification name for every
    /// upstream; None: each upstream URL's host.
    server_name: Option<ServerName<'static>>,
}

impl UpstreamTls {
    /// `verify`: check the upstream's certificate chain and name against
    /// `ca_file`'s certificates, or the system's CA store without one (as
    /// `ssl.create_default_context(cafile=...)`: a `ca_file` replaces the
    /// system store). `verify: false` checks nothing (see `Checked`).
    ///
    /// `client_certificate` ([`client_certificate`]) is sent to every
    /// upstream, whether it asks for one or not (as OpenSSL and nginx's
    /// `proxy_ssl_certificate` do); without one an upstream that requires a
    /// certificate refuses loopwatch.
    pub fn new(
        verify: bool,
        ca_file: Option<&str>,
        server_name: Option<&str>,
        client_certificate: Option<Arc<CertifiedKey>>,
    ) -> Result<UpstreamTls, String> {
        let server_name = server_name
            .map(|name| {
                ServerName::try_from(name.to_owned()).map_err(|_| {
                    format!(
                        "upstream_tls.server_name: expected a DNS name or an IP address, got {name:?}"
                    )
                })
            })
            .transpose()?;
        let provider = provider();
        let algorithms = provider.signature_verification_algorithms;
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("upstream_tls: {e}"))?
            .dangerous();
        let verified = if verify {
            let (roots, own) = match ca_file {
                Some(path) => {
                    let certs = read_certificates("upstream_tls.ca_file", path)?;
                    let mut roots = RootCertStore::empty();
                    for cert in &certs {
                        roots.add(cert.clone()).map_err(|e| {
                            format!(
                                "upstream_tls.ca_file: a certificate in {path:?} cannot be a trust anchor: {}",
                                own_certificate_error(cert, e)
                            )
                        })?;
                    }
                    (roots, certs)
                }
                None => (system_roots()?, Vec::new()),
            };
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("upstream_tls: {e}"))?;
            Some(Verified { webpki, own })
        } else {
            None
        };
        let verifier = Arc::new(Checked {
            verified,
            algorithms,
        });
        let builder = builder.with_custom_certificate_verifier(verifier);
        let config = match client_certificate {
            Some(key) => builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key))),
            None => builder.with_no_client_auth(),
        };
        Ok(UpstreamTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The SNI and verification name for an upstream whose URL's host is `host`.
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, String> {
        match &self.server_name {
            Some(name) => Ok(name.clone()),
            None => ServerName::try_from(host.to_owned())
                .map_err(|_| format!("{host:?} is not a DNS name or an IP address")),
        }
    }
}

/// The system's CA store, as OpenSSL finds it (SSL_CERT_FILE and
/// SSL_CERT_DIR included). Python's default context loads it silently even
/// when it is empty; an empty store can only fail every upstream, so it is
/// an error here.
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(format!(
            "upstream_tls: no CA certificate in the system store{why}: set upstream_tls.ca_file"
        ));
    }
    Ok(roots)
}

/// webpki's verification, and one thing OpenSSL accepts that webpki does
/// not: a server certificate that is itself one of `upstream_tls.ca_file`'s
/// certificates, marked as a CA (`openssl req -x509` makes those by default).
/// OpenSSL takes it as its own trust anchor; webpki refuses a CA as an end
/// entity. Such a certificate is accepted when it is byte for byte one of
/// the file's, within its validity period and valid for the name.
#[derive(Debug)]
struct Verified {
    webpki: Arc<WebPkiServerVerifier>,
    /// The certificates of `ca_file` (none for the system store).
    own: Vec<CertificateDer<'static>>,
}

impl Verified {
    fn is_own(&self, cert: &CertificateDer<'_>) -> bool {
        self.own.iter().any(|c| c.as_ref() == cert.as_ref())
    }

    fn trusted_as_itself(
        &self,
        algorithms: &WebPkiSupportedAlgorithms,
        cert: &CertificateDer<'_>,
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<(), webpki::Error> {
        let anchor = webpki::anchor_from_trusted_cert(cert)?;
        let end_entity = webpki::EndEntityCert::try_from(cert)?;
        // Validity is checked before the CA flag: CaUsedAsEndEntity means the
        // certificate is well formed and valid now.
        match end_entity.verify_for_usage(
            algorithms.all,
            &[anchor],
            &[],
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        ) {
            Ok(_) | Err(webpki::Error::CaUsedAsEndEntity) => {}
            Err(e) => return Err(e),
        }
        end_entity.verify_is_valid_for_subject_name(server_name)
    }
}

fn ca_as_end_entity(error: &rustls::Error) -> bool {
    matches!(
        error,
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))
            if other.0.downcast_ref::<webpki::Error>() == Some(&webpki::Error::CaUsedAsEndEntity)
    )
}

/// The upstream verifier rustls calls: the certificate by `verified`; the
/// handshake's own signature always against the certificate's key, as
/// OpenSSL does.
#[derive(Debug)]
struct Checked {
    /// None: `upstream_tls.verify: false`, any certificate for any name is
    /// accepted, as Python's `CERT_NONE` without `check_hostname` (a
    /// deliberate danger, docs/configuration.md).
    verified: Option<Verified>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Checked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(verified) = &self.verified else {
            return Ok(ServerCertVerified::assertion());
        };
        match verified.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(error) if verified.is_own(end_entity) => verified
                .trusted_as_itself(&self.algorithms, end_entity, server_name, now)
                .map(|()| ServerCertVerified::assertion())
                .map_err(|_| error),
            Err(error) if ca_as_end_entity(&error) => {
                // A CA certificate presented as the server's own, not one of
                // ours: a self-signed one (`openssl req -x509` marks it a
                // CA), whose issuer nobody here trusts. webpki says
                // `CaUsedAsEndEntity` first, which sent operators looking at
                // the certificate's extensions instead of `ca_file`.
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                ))
            }
            verdict => verdict,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO, a directory and a device are refused at once, without a read
    /// that waits for a writer or never ends.
    #[test]
    fn only_regular_files_are_read() {
        let dir = std::env::temp_dir().join(format!("lw-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("cert.pem");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let started = std::time::Instant::now();
        for (path, why) in [
            (fifo.to_str().unwrap(), "not a regular file"),
            (dir.to_str().unwrap(), "a directory"),
            ("/dev/zero", "not a regular file"),
        ] {
            let e = read_certificates("tls.cert_file", path).unwrap_err();
            assert!(
                e.starts_with("tls.cert_file: cannot read") && e.ends_with(why),
                "{e}"
            );
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn server_name_is_the_setting_or_the_host() {
        let by_host = UpstreamTls::new(false, None, None, None).unwrap();
        assert_eq!(
            by_host.server_name("backend.example").unwrap(),
            ServerName::try_from("backend.example").unwrap()
        );
        assert!(matches!(
            by_host.server_name("10.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(by_host.server_name("not a name").is_err());
        let named = UpstreamTls::new(false, None, Some("backend.internal"), None).unwrap();
        assert_eq!(
            named.server_name("127.0.0.1").unwrap(),
            ServerName::try_from("backend.internal").unwrap()
        );
    }

    #[test]
    fn bad_settings_say_which_and_where() {
        let error = |r: Result<UpstreamTls, String>| r.err().expect("an error");
        let e = error(UpstreamTls::new(true, None, Some("a b"), None));
        assert!(e.starts_with("upstream_tls.server_name:"), "{e}");
        let e = error(UpstreamTls::new(
            true,
            Some("/nonexistent/ca.pem"),
            None,
            None,
        ));
        assert!(
            e.starts_with("upstream_tls.ca_file: cannot read \"/nonexistent/ca.pem\""),
            "{e}"
        );
        let e = listener_acceptor("/nonexistent/cert.pem", "/nonexistent/key.pem")
            .err()
            .expect("an error");
        assert!(
            e.starts_with("tls.cert_file: cannot read \"/nonexistent/cert.pem\""),
            "{e}"
        );
        let e = client_certificate("/nonexistent/cert.pem", "/nonexistent/key.pem")
            .expect_err("an error");
        assert!(
            e.starts_with("upstream_tls.cert_file: cannot read \"/nonexistent/cert.pem\""),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("loopwatch-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").unwrap();
        let empty = empty.to_str().unwrap();
        let e = listener_acceptor(empty, empty).err().expect("an error");
        assert!(e.starts_with("tls.cert_file: no certificate"), "{e}");
        let e = client_certificate(empty, empty).expect_err("an error");
        assert!(
            e.starts_with("upstream_tls.cert_file: no certificate"),
            "{e}"
        );
        let e = error(UpstreamTls::new(true, Some(empty), None, None));
        assert!(e.starts_with("upstream_tls.ca_file: no certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
