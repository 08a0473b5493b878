//! HTTPS for both APIs and for the command line, on rustls with the ring provider (the one
//! async-nats already uses for NATS over TLS, so no second crypto library is built).
//!
//! - A service given a certificate chain and its private key (PEM files) answers HTTPS only:
//!   [`ServerTls::load`]; the handshake must end within the server's header timeout.
//! - The command line trusts the system's certificate authorities, plus the one named by
//!   `--ca` / `CRMSYNC_CA` (a company's own, or the one a test makes): [`client_config`].

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What a service needs to answer HTTPS: its certificate and key, loaded and checked.
#[derive(Clone)]
pub struct ServerTls(pub(super) tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

/// Makes ring the process's default TLS provider, which HTTP clients built without a TLS
/// configuration of their own use. Call it once at start; calling it again does nothing.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTls {
    /// Reads the certificate chain (`cert`, PEM, the server's certificate first) and its
    /// private key (`key`, PEM: PKCS#8, PKCS#1 or SEC1), and checks that they belong together.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, String> {
        let chain = certificates(cert)?;
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            format!("cannot read a private key from {} ({e}): give the server's key as a PEM file", key.display())
        })?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| {
                format!(
                    "the certificate {} and the key {} do not make a server identity: {e}",
                    cert.display(),
                    key.display()
                )
            })?;
        let mut config = config;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }
}

/// The certificates of a PEM file, at least one.
fn certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let read = |e: &dyn std::fmt::Display| format!("cannot read certificates from {}: {e}", file.display());
    let chain = CertificateDer::pem_file_iter(file)
        .map_err(|e| read(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read(&e))?;
    if chain.is_empty() {
        return Err(read(&"it holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(chain)
}

/// The TLS settings of an HTTPS client: the system's certificate authorities, and `ca` (a PEM
/// file) if given.
pub fn client_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    // The system's store may be missing or partly unreadable; a given CA is enough.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(ca) = ca {
        for cert in certificates(ca)? {
            roots.add(cert).map_err(|e| format!("the certificate authority {} is not usable: {e}", ca.display()))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
