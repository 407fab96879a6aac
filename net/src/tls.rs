//! TLS identities on QUIC: every peer is its ed25519 key.
//!
//! Node and relay each present a self-signed certificate made from their
//! ed25519 identity key (the certificate is a throwaway wrapper, made at every
//! start; the key is the identity). TLS 1.3's CertificateVerify proves that the
//! peer holds the private key of the certificate's public key, so after the
//! handshake each side knows the other's key for certain:
//! - a node accepts only the relay key it pinned at enrollment
//!   ([`PinnedRelay`]); any other relay is refused with both keys named;
//! - the relay requires a client certificate, accepts any well-formed ed25519
//!   one ([`AnyNodeKey`]), and decides after the handshake whether that key is
//!   enrolled (the driver reads it with [`peer_key`]).
//!
//! No certificate authority is involved anywhere.

use std::sync::Arc;

use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::SigningKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::NetError;

/// The name relay certificates are issued for; nodes connect with it.
pub const SERVER_NAME: &str = "samverkan-relay";
/// ALPN protocol id of the Samverkan sync protocol.
pub const ALPN: &[u8] = b"samverkan/1";
/// Object identifier of Ed25519 keys (RFC 8410).
const ED25519_OID: &str = "1.3.101.112";

/// A peer's TLS credentials, made from its ed25519 identity key.
#[derive(Debug)]
pub struct TlsIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    public: [u8; 32],
}

impl TlsIdentity {
    /// A self-signed certificate for `key`, named `name`.
    pub fn new(key: &SigningKey, name: &str) -> Result<Self, NetError> {
        let fail = |e: &dyn std::fmt::Display| NetError::Certificate(e.to_string());
        let pkcs8 = key.to_pkcs8_der().map_err(|e| fail(&e))?;
        let key_der = PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec());
        let pair =
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key_der, &rcgen::PKCS_ED25519).map_err(|e| fail(&e))?;
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| fail(&e))?;
        let cert = params.self_signed(&pair).map_err(|e| fail(&e))?;
        Ok(Self { cert: cert.der().clone(), key: key_der, public: key.verifying_key().to_bytes() })
    }

    /// The public key this identity proves.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    pub(crate) fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone()]
    }

    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// The ed25519 public key a certificate carries, or why it carries none.
pub fn certificate_key(der: &[u8]) -> Result<[u8; 32], String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    let spki = cert.public_key();
    if spki.algorithm.algorithm.to_id_string() != ED25519_OID {
        return Err(format!("the certificate's key is not ed25519 (algorithm {})", spki.algorithm.algorithm));
    }
    <[u8; 32]>::try_from(spki.subject_public_key.data.as_ref())
        .map_err(|_| "the certificate's ed25519 key is not 32 bytes".to_string())
}

/// The key the peer of an established connection proved it holds.
pub fn peer_key(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certificate_key(chain.first()?.as_ref()).ok()
}

/// The crypto provider used everywhere (ring).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls13_only(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme));
    }
    verify_tls13_signature(message, cert, dss, &provider.signature_verification_algorithms)
}

/// Node side: accepts exactly the relay whose ed25519 key was pinned.
#[derive(Debug)]
pub(crate) struct PinnedRelay {
    expected: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedRelay {
    pub(crate) fn new(expected: [u8; 32]) -> Self {
        Self { expected, provider: provider() }
    }
}

impl ServerCertVerifier for PinnedRelay {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = certificate_key(end_entity).map_err(rustls::Error::General)?;
        if seen == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the relay's key {} is not the pinned relay key {}",
                hex::encode(seen),
                hex::encode(self.expected)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_only(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Relay side: requires a client certificate with an ed25519 key; whether the
/// key is enrolled is decided after the handshake, where a clear answer can be sent.
#[derive(Debug)]
pub(crate) struct AnyNodeKey {
    provider: Arc<CryptoProvider>,
}

impl AnyNodeKey {
    pub(crate) fn new() -> Self {
        Self { provider: provider() }
    }
}

impl ClientCertVerifier for AnyNodeKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        certificate_key(end_entity).map_err(rustls::Error::General)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_only(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_carries_exactly_its_key() {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let identity = TlsIdentity::new(&key, SERVER_NAME).unwrap();
        assert_eq!(certificate_key(identity.cert.as_ref()).unwrap(), key.verifying_key().to_bytes());
        assert_eq!(identity.public_key(), key.verifying_key().to_bytes());
    }

    #[test]
    fn garbage_and_non_ed25519_certificates_are_refused() {
        assert!(certificate_key(b"not a certificate").is_err());
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap().self_signed(&p256).unwrap();
        let err = certificate_key(cert.der().as_ref()).unwrap_err();
        assert!(err.contains("not ed25519"), "{err}");
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let mut der = TlsIdentity::new(&key, "x").unwrap().cert.to_vec();
        der.push(0);
        assert!(certificate_key(&der).is_err());
    }
}
