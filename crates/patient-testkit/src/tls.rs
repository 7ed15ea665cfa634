//! Test certificates: a throw-away CA and a server certificate signed by it.

use std::{io, sync::Arc};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

/// A certificate authority and a server certificate it signed, all PEM.
///
/// A client that trusts [`ca_pem`](Self::ca_pem) accepts the server; one that
/// uses only the public web roots gets a certificate error.
#[derive(Debug, Clone)]
pub struct TestCert {
    /// The CA certificate (PEM) to add to a client's trusted roots.
    pub ca_pem: String,
    /// The server certificate (PEM), valid for the names given to
    /// [`generate`](Self::generate).
    pub cert_pem: String,
    /// The server's private key (PKCS#8 PEM).
    pub key_pem: String,
}

impl TestCert {
    /// Generates a fresh CA and a server certificate for `names`.
    ///
    /// Each name that parses as an IP address becomes an IP subject
    /// alternative name, every other one a DNS name; the usual choice is
    /// `&["localhost", "127.0.0.1"]`.
    ///
    /// # Panics
    ///
    /// If a name is not a valid DNS name or key generation fails; both are
    /// programming errors in a test.
    pub fn generate(names: &[&str]) -> TestCert {
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params.distinguished_name = DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "patient-testkit CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");

        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let server_key = KeyPair::generate().expect("generate server key");
        let mut params = CertificateParams::new(names.clone()).expect("valid server names");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_else(|| "localhost".into()),
        );
        let cert = params
            .signed_by(&server_key, &ca_cert, &ca_key)
            .expect("sign server certificate");

        TestCert {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: server_key.serialize_pem(),
        }
    }

    /// A rustls server configuration presenting this certificate and
    /// offering `alpn` (for example `[b"h2", b"http/1.1"]`).
    pub fn server_config(&self, alpn: &[&[u8]]) -> io::Result<ServerConfig> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(invalid)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(invalid)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(invalid)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// A rustls client configuration that trusts only this CA, without
    /// ALPN (set `alpn_protocols` on the result to negotiate HTTP/2).
    pub fn client_config(&self) -> io::Result<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.map_err(invalid)?).map_err(invalid)?;
        }
        Ok(ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(invalid)?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }
}

/// The ring provider, chosen explicitly so that another crate enabling a
/// second provider in the same build cannot make rustls ambiguous.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}
