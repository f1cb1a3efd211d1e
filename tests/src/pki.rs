//! A throw-away certificate authority for TLS tests (rcgen), so no key material is checked in
//! and every test run gets fresh certificates.

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};

/// A CA and one server certificate it issued.
pub struct TestPki {
    /// The CA certificate (PEM): give it to clients as their trust anchor.
    pub ca_pem: String,
    /// The server certificate (PEM), issued for the names given to [`TestPki::new`].
    pub cert_pem: String,
    /// The server certificate's private key (PEM).
    pub key_pem: String,
    ca_cert: Certificate,
    ca_key: KeyPair,
}

impl TestPki {
    /// A new CA and a server certificate for `names` (DNS names; IP literals become IP SANs).
    pub fn new(names: &[&str]) -> anyhow::Result<TestPki> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "sbc-tests CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let mut pki = TestPki {
            ca_pem: ca_cert.pem(),
            cert_pem: String::new(),
            key_pem: String::new(),
            ca_cert,
            ca_key,
        };
        let (cert, key) = pki.issue(names)?;
        pki.cert_pem = cert;
        pki.key_pem = key;
        Ok(pki)
    }

    /// Issues another leaf certificate (e.g. a client certificate for mutual TLS), returning
    /// (certificate PEM, key PEM).
    pub fn issue(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}
