//! Loading TLS material for the listeners and for outbound connections.
//!
//! Both configs are built with the ring provider explicitly rather than the process default,
//! so that they work whether or not some other crate in the binary installs a default.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: malformed PEM: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}: no PEM certificate found")]
    NoCertificate(PathBuf),
    #[error("{0}: no PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) found")]
    NoPrivateKey(PathBuf),
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::NoPrivateKey(path.to_path_buf()))
}

/// A server config from a PEM certificate chain (leaf first) and a PEM private key in
/// PKCS#8, PKCS#1 (RSA) or SEC1 (EC) form. No client certificates are requested: SIP peers
/// are authenticated by digest or by source address, not by mutual TLS.
pub fn load_server_tls(cert_pem: &Path, key_pem: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(cert_pem)?;
    let key = read_key(key_pem)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// A TLS listener's certificate and key, replaceable while the listener runs: a config
/// reload renews the certificate without a restart. Each handshake asks for the current one,
/// so new connections get the new certificate and established connections keep theirs.
#[derive(Debug)]
pub struct ServerCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerCert {
    /// Serves `key` from the next handshake on.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.current.write() = key;
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read()))
    }
}

/// Reads a certificate chain and its key for [`ServerCert::replace`], refusing a key that
/// does not match the leaf certificate (a half-done renewal), so a reload fails instead of
/// every later handshake.
pub fn load_certified_key(cert_pem: &Path, key_pem: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = read_certs(cert_pem)?;
    let key = read_key(key_pem)?;
    Ok(Arc::new(CertifiedKey::from_der(certs, key, &provider())?))
}

/// As [`load_server_tls`], with the certificate behind a [`ServerCert`] the caller keeps to
/// renew it later.
pub fn load_reloadable_server_tls(
    cert_pem: &Path,
    key_pem: &Path,
) -> Result<(Arc<ServerConfig>, Arc<ServerCert>), TlsError> {
    let cert = Arc::new(ServerCert {
        current: RwLock::new(load_certified_key(cert_pem, key_pem)?),
    });
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    Ok((Arc::new(config), cert))
}

/// A client config trusting the Mozilla roots (webpki-roots) plus every certificate in the
/// given PEM files, so that private trunks signed by an operator CA verify without touching the
/// system store.
pub fn client_tls(extra_roots_pem: &[PathBuf]) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in extra_roots_pem {
        for cert in read_certs(path)? {
            roots.add(cert)?;
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
