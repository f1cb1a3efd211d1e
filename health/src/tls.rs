//! TLS client configurations for probes, witnesses and webhooks.
//!
//! Built with the ring provider explicitly (as the SBC's transports do), so
//! they work whether or not another crate installs a process default. Each
//! trusts the Mozilla roots (webpki-roots) plus, for a node, its `tls_ca`
//! file, so a PBX with a certificate from the operator's own CA verifies
//! without touching the system store.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use crate::error::ProbeError;

/// A client config, or why it could not be built; a bad CA file must not
/// stop the monitor, only fail the probes that need it (and say why).
#[derive(Debug, Clone)]
pub(crate) struct Tls(Result<Arc<ClientConfig>, String>);

impl Tls {
    /// Webpki roots plus the certificates of `extra_ca` (PEM), if any.
    pub(crate) fn new(extra_ca: Option<&Path>) -> Tls {
        Tls(build(extra_ca))
    }

    pub(crate) fn get(&self) -> Result<&Arc<ClientConfig>, ProbeError> {
        self.0.as_ref().map_err(|e| ProbeError::Tls(e.clone()))
    }

    pub(crate) fn error(&self) -> Option<&str> {
        self.0.as_ref().err().map(String::as_str)
    }
}

fn build(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: malformed PEM: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no PEM certificate found", path.display()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration rejected: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Classifies an I/O error of a TLS handshake: rustls reports its own
/// failures (untrusted certificate, wrong name, alerts) as `InvalidData`;
/// anything else is the connection itself failing.
pub(crate) fn handshake_error(e: std::io::Error) -> ProbeError {
    if e.kind() == std::io::ErrorKind::InvalidData {
        ProbeError::Tls(e.to_string())
    } else {
        ProbeError::transport(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webpki_roots_alone_build() {
        assert!(Tls::new(None).get().is_ok());
    }

    #[test]
    fn bad_ca_files_are_reported_not_fatal() {
        let dir = std::env::temp_dir().join(format!("sbc-health-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").expect("write");
        let tls = Tls::new(Some(&empty));
        assert!(tls
            .error()
            .is_some_and(|e| e.contains("no PEM certificate")));
        assert!(matches!(tls.get(), Err(ProbeError::Tls(_))));
        let missing = Tls::new(Some(&dir.join("missing.pem")));
        assert!(missing.error().is_some_and(|e| e.contains("cannot read")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
