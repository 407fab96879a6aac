//! TLS for the relay: its certificate, and the pinning verifier nodes use.
//!
//! The relay makes a self-signed ed25519 certificate at first start and keeps it
//! (`relay-cert.der`, and `relay-key.der` readable by the owner only) in its
//! data directory, so its identity survives restarts. Nodes are given the
//! certificate's SHA-256 fingerprint out of band (the relay prints it) and accept
//! exactly that certificate: no certificate authority is involved, and a relay
//! with another certificate is refused with a message naming both fingerprints.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::NetError;

/// File name of the relay certificate (DER) in its data directory.
pub const CERT_FILE: &str = "relay-cert.der";
/// File name of the relay's private key (PKCS#8 DER) in its data directory.
pub const KEY_FILE: &str = "relay-key.der";
/// The name the relay's certificate is issued for; nodes connect with it.
pub const SERVER_NAME: &str = "samverkan-relay";
/// ALPN protocol id of the Samverkan sync protocol.
pub const ALPN: &[u8] = b"samverkan/1";

/// The relay's certificate and private key.
#[derive(Debug)]
pub struct RelayCertificate {
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    key_der: Vec<u8>,
}

impl RelayCertificate {
    /// Loads the certificate from `dir`, or makes and stores a new one there.
    pub fn load_or_create(dir: &Path) -> Result<Self, NetError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let io = |what: &str, path: &Path, e: std::io::Error| NetError::Io(format!("{what} {}: {e}", path.display()));
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert_der = std::fs::read(&cert_path).map_err(|e| io("reading", &cert_path, e))?;
                let key_der = std::fs::read(&key_path).map_err(|e| io("reading", &key_path, e))?;
                let loaded = Self { cert_der, key_der };
                loaded.check()?;
                Ok(loaded)
            }
            (false, false) => {
                let made = Self::generate()?;
                write_new(&key_path, &made.key_der, 0o600).map_err(|e| io("writing", &key_path, e))?;
                write_new(&cert_path, &made.cert_der, 0o644).map_err(|e| io("writing", &cert_path, e))?;
                Ok(made)
            }
            _ => Err(NetError::Certificate(format!(
                "only one of {} and {} exists in {}: restore the missing one from a backup, or remove both to make a new certificate (nodes must then pin the new fingerprint)",
                CERT_FILE,
                KEY_FILE,
                dir.display()
            ))),
        }
    }

    /// A new self-signed ed25519 certificate, kept in memory only.
    pub fn generate() -> Result<Self, NetError> {
        let key =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| NetError::Certificate(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(|e| NetError::Certificate(e.to_string()))?;
        let cert = params.self_signed(&key).map_err(|e| NetError::Certificate(e.to_string()))?;
        Ok(Self { cert_der: cert.der().to_vec(), key_der: key.serialize_der() })
    }

    /// Checks that the stored key is a usable private key.
    fn check(&self) -> Result<(), NetError> {
        let provider = provider();
        provider
            .key_provider
            .load_private_key(self.private_key())
            .map(|_| ())
            .map_err(|e| NetError::Certificate(format!("the stored relay key is unusable: {e}")))
    }

    pub(crate) fn certificate(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// Writes a new file with the given mode, durably.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The SHA-256 fingerprint of a DER certificate, as 64 lowercase hex digits.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// The crypto provider used everywhere (ring).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly the server certificate with a given SHA-256 fingerprint.
#[derive(Debug)]
pub(crate) struct PinnedServer {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl PinnedServer {
    pub(crate) fn new(fingerprint: &str) -> Self {
        Self { fingerprint: fingerprint.trim().to_ascii_lowercase(), provider: provider() }
    }
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = fingerprint(end_entity);
        if seen == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "relay certificate fingerprint {seen} is not the pinned {}",
                self.fingerprint
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered (QUIC requires it).
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = RelayCertificate::load_or_create(dir.path()).unwrap();
        let again = RelayCertificate::load_or_create(dir.path()).unwrap();
        assert_eq!(fingerprint(&first.cert_der), fingerprint(&again.cert_der));
        assert_eq!(fingerprint(&first.cert_der).len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_missing_or_damaged_half_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        RelayCertificate::load_or_create(dir.path()).unwrap();
        std::fs::write(dir.path().join(KEY_FILE), b"not a key").unwrap();
        let err = RelayCertificate::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("unusable"), "{err}");
        std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let err = RelayCertificate::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("only one of"), "{err}");
    }
}
