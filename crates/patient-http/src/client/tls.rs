//! TLS: the rustls client configuration (webpki roots plus extra PEM roots,
//! client certificates, ALPN, or no certificate verification at all when
//! `danger_accept_invalid_certs` is on) and the handshake.

use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms},
    DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::TlsConnector;

use super::{
    config::{ClientConfig, HttpVersionPref},
    error::{ClientConfigError, ErrorType, Phase, TransportError},
    stream::Stream,
};

/// The TLS connectors of a client.
pub(crate) struct TlsConnectors {
    /// For target servers; ALPN as the HTTP version preference says.
    pub(crate) target: TlsConnector,
    /// For `https://` proxies; ALPN `http/1.1`.
    pub(crate) proxy: TlsConnector,
}

pub(crate) fn build(config: &ClientConfig) -> Result<TlsConnectors, ClientConfigError> {
    const FIELD_ROOTS: &str = "root_certificates_pem";
    const FIELD_IDENTITY: &str = "client_identity";

    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for (index, pem) in config.root_certificates_pem().iter().enumerate() {
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| {
                ClientConfigError::new(FIELD_ROOTS, format!("certificate {index}: {e}"))
            })?;
            roots.add(cert).map_err(|e| {
                ClientConfigError::new(FIELD_ROOTS, format!("certificate {index}: {e}"))
            })?;
            found += 1;
        }
        if found == 0 {
            return Err(ClientConfigError::new(
                FIELD_ROOTS,
                format!("entry {index} holds no PEM certificate"),
            ));
        }
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientConfigError::new(FIELD_ROOTS, e.to_string()))?;
    let builder = if config.danger_accept_invalid_certs() {
        tracing::warn!(
            "danger_accept_invalid_certs is on: server certificates are not verified, \
             any server can impersonate any host; use this only in tests"
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { algorithms }))
    } else {
        builder.with_root_certificates(roots)
    };
    let mut target = match config.client_identity() {
        None => builder.with_no_client_auth(),
        Some((chain_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    ClientConfigError::new(FIELD_IDENTITY, format!("certificate chain: {e}"))
                })?;
            if chain.is_empty() {
                return Err(ClientConfigError::new(
                    FIELD_IDENTITY,
                    "the certificate chain holds no PEM certificate",
                ));
            }
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|e| ClientConfigError::new(FIELD_IDENTITY, format!("private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientConfigError::new(FIELD_IDENTITY, e.to_string()))?
        }
    };
    let mut proxy = target.clone();
    target.alpn_protocols = match config.http_version() {
        HttpVersionPref::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        HttpVersionPref::Http1Only => vec![b"http/1.1".to_vec()],
        HttpVersionPref::Http2Only => vec![b"h2".to_vec()],
    };
    proxy.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnectors {
        target: TlsConnector::from(Arc::new(target)),
        proxy: TlsConnector::from(Arc::new(proxy)),
    })
}

/// The verifier of `danger_accept_invalid_certs`: any certificate chain is
/// accepted, whoever issued it, whatever names it holds and however expired,
/// but the handshake signature must still be made by the certificate's key
/// with one of the crypto provider's algorithms.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

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
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Performs the TLS handshake with `host` over `stream`.
pub(crate) async fn handshake(
    connector: &TlsConnector,
    stream: Stream,
    host: &str,
    authority: &str,
) -> Result<Stream, TransportError> {
    let name = ServerName::try_from(host.to_owned()).map_err(|e| {
        TransportError::new(
            ErrorType::Ssl,
            "TlsError",
            format!("invalid TLS server name {host}: {e}"),
        )
        .with_source(e)
    })?;
    let tls = connector.connect(name, stream).await.map_err(|e| {
        let mut err = TransportError::from_io(e, authority, Phase::Connect);
        if err.class_name() != "TlsError" && !err.is_timeout() {
            // A connection lost mid-handshake is still a connection error,
            // but say where it happened.
            err = TransportError::new(
                err.kind(),
                lost_class(&err),
                format!("TLS handshake failed: {}", err.message()),
            )
            .with_source(err);
        }
        err
    })?;
    Ok(Stream::Tls(Box::new(tls)))
}

fn lost_class(err: &TransportError) -> &'static str {
    match err.class_name() {
        "ConnectionReset" => "ConnectionReset",
        "ConnectionRefused" => "ConnectionRefused",
        "ConnectionAborted" => "ConnectionAborted",
        _ => "ConnectionClosed",
    }
}
