//! Signer key files protected by a passphrase.
//!
//! A signer key (`signers/<name>.key`) signs approvals in a person's name, so
//! it is kept encrypted: the passphrase is stretched with Argon2id (a random
//! 16-byte salt, parameters stored in the file) into a 256-bit key that seals
//! the ed25519 secret with ChaCha20-Poly1305 (a random 12-byte nonce; the
//! format line is authenticated too). A wrong passphrase and a damaged file
//! both fail the tag check and are reported as such; nothing else is revealed.
//!
//! Older, unprotected key files (`NodeKey::to_file_contents`) stay readable:
//! [`load`] says [`Protection::None`] so callers can tell the user to add a
//! passphrase (`samverkan-node signer protect`). This module never stores,
//! logs or caches a passphrase.

use std::fs;
use std::io::Write;
use std::path::Path;

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use samverkan_shared::identity::NodeKey;
use serde::{Deserialize, Serialize};

use crate::store::keyfile::{self, KeyFileError};

/// The first line of a protected key file (also the AEAD's associated data).
pub const FORMAT: &str = "samverkan-protected-signer-key-v1";

/// The shortest passphrase accepted for a new key.
pub const MIN_PASSPHRASE_CHARS: usize = 8;

/// Argon2id memory cost in KiB (OWASP's 19 MiB minimum for Argon2id).
const M_COST_KIB: u32 = 19 * 1024;
/// Argon2id passes.
const T_COST: u32 = 2;

/// Whether a signer key file is protected by a passphrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protection {
    /// Sealed with a passphrase.
    Passphrase,
    /// An older file holding the key in the clear (owner-only mode).
    None,
}

/// Why a signer key could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SignerKeyError {
    /// The file could not be read or written, or others can read it.
    #[error(transparent)]
    File(#[from] KeyFileError),
    /// The key is protected and no passphrase was given.
    #[error("the signer key {0} is protected by a passphrase: give the passphrase")]
    PassphraseRequired(String),
    /// The passphrase does not open the key (or the file was altered).
    #[error("wrong passphrase for the signer key {0} (or the key file was altered)")]
    WrongPassphrase(String),
    /// A new passphrase is too short.
    #[error("a signer passphrase must have at least {MIN_PASSPHRASE_CHARS} characters")]
    PassphraseTooShort,
    /// The protected file is not in the expected format.
    #[error("{path}: not a readable protected signer key ({reason})")]
    Damaged {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Sealed {
    kdf: String,
    m_cost_kib: u32,
    t_cost: u32,
    p_cost: u32,
    salt: String,
    nonce: String,
    ciphertext: String,
}

fn derive(passphrase: &str, salt: &[u8], m: u32, t: u32, p: u32) -> Result<[u8; 32], String> {
    let params = Params::new(m, t, p, Some(32)).map_err(|e| e.to_string())?;
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), salt, &mut out)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// The text of a protected key file holding `key`, sealed with `passphrase`.
pub fn seal(key: &NodeKey, passphrase: &str) -> Result<String, SignerKeyError> {
    if passphrase.chars().count() < MIN_PASSPHRASE_CHARS {
        return Err(SignerKeyError::PassphraseTooShort);
    }
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let damaged = |reason: String| SignerKeyError::Damaged { path: "(new key)".into(), reason };
    let derived = derive(passphrase, &salt, M_COST_KIB, T_COST, 1).map_err(damaged)?;
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&derived));
    let secret = key.to_file_contents();
    let ciphertext = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: secret.as_bytes(), aad: FORMAT.as_bytes() })
        .map_err(|e| damaged(e.to_string()))?;
    let sealed = Sealed {
        kdf: "argon2id".into(),
        m_cost_kib: M_COST_KIB,
        t_cost: T_COST,
        p_cost: 1,
        salt: hex::encode(salt),
        nonce: hex::encode(nonce),
        ciphertext: hex::encode(ciphertext),
    };
    let body = serde_json::to_string(&sealed).map_err(|e| damaged(e.to_string()))?;
    Ok(format!("{FORMAT}\n{body}\n"))
}

fn open_sealed(path: &Path, name: &str, text: &str, passphrase: &str) -> Result<NodeKey, SignerKeyError> {
    let damaged = |reason: String| SignerKeyError::Damaged { path: path.display().to_string(), reason };
    let body = text.lines().nth(1).ok_or_else(|| damaged("no key line".into()))?;
    let sealed: Sealed = serde_json::from_str(body).map_err(|e| damaged(e.to_string()))?;
    if sealed.kdf != "argon2id" {
        return Err(damaged(format!("unknown key derivation {:?}", sealed.kdf)));
    }
    // Bounds on stored parameters: a crafted file must not make us allocate gigabytes.
    if sealed.m_cost_kib > 1024 * 1024 || sealed.t_cost > 64 || sealed.p_cost > 16 {
        return Err(damaged("key derivation parameters out of range".into()));
    }
    let bytes = |field: &str, text: &str| hex::decode(text).map_err(|e| damaged(format!("{field}: {e}")));
    let (salt, nonce, ciphertext) =
        (bytes("salt", &sealed.salt)?, bytes("nonce", &sealed.nonce)?, bytes("ciphertext", &sealed.ciphertext)?);
    if nonce.len() != 12 {
        return Err(damaged("nonce is not 12 bytes".into()));
    }
    let derived = derive(passphrase, &salt, sealed.m_cost_kib, sealed.t_cost, sealed.p_cost).map_err(damaged)?;
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&derived));
    let plain = cipher
        .decrypt(Nonce::from_slice(&nonce), Payload { msg: &ciphertext, aad: FORMAT.as_bytes() })
        .map_err(|_| SignerKeyError::WrongPassphrase(name.to_string()))?;
    let text = String::from_utf8(plain).map_err(|e| damaged(e.to_string()))?;
    NodeKey::from_file_contents(&text).map_err(|e| damaged(e.to_string()))
}

fn check_mode(path: &Path) -> Result<(), KeyFileError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path)
            .map_err(|source| KeyFileError::Io { path: path.to_path_buf(), source })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions { path: path.to_path_buf(), mode });
        }
    }
    Ok(())
}

/// Whether the key file at `path` is protected by a passphrase.
pub fn protection(path: &Path) -> Result<Protection, SignerKeyError> {
    let text = fs::read_to_string(path).map_err(|source| KeyFileError::Io { path: path.to_path_buf(), source })?;
    Ok(if text.lines().next().map(str::trim) == Some(FORMAT) { Protection::Passphrase } else { Protection::None })
}

/// Reads the signer key of `name` at `path`: a protected file needs
/// `passphrase`; an older unprotected file is read as it is (a passphrase
/// given for it is ignored) and reported as [`Protection::None`].
pub fn load(path: &Path, name: &str, passphrase: Option<&str>) -> Result<(NodeKey, Protection), SignerKeyError> {
    match protection(path)? {
        Protection::None => Ok((keyfile::load(path)?, Protection::None)),
        Protection::Passphrase => {
            check_mode(path)?;
            let text =
                fs::read_to_string(path).map_err(|source| KeyFileError::Io { path: path.to_path_buf(), source })?;
            let passphrase = passphrase.ok_or_else(|| SignerKeyError::PassphraseRequired(name.to_string()))?;
            Ok((open_sealed(path, name, &text, passphrase)?, Protection::Passphrase))
        }
    }
}

/// Writes `text` as a key file at `path` (mode 0600, durably): a new file, or
/// with `replace` in place of the old one through a temporary file and rename.
pub fn write(path: &Path, text: &str, replace: bool) -> Result<(), SignerKeyError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| SignerKeyError::File(KeyFileError::Io { path: p, source })
    };
    let target = if replace { path.with_extension("key.tmp") } else { path.to_path_buf() };
    let mut options = fs::OpenOptions::new();
    options.write(true);
    if replace {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&target).map_err(io(&target))?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(io(&target))?;
    if replace {
        fs::rename(&target, path).map_err(io(path))?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_with_its_passphrase_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ask.key");
        let key = NodeKey::generate();
        write(&path, &seal(&key, "rätt lösenfras").unwrap(), false).unwrap();
        assert_eq!(protection(&path).unwrap(), Protection::Passphrase);
        let (opened, how) = load(&path, "Ask", Some("rätt lösenfras")).unwrap();
        assert_eq!((opened.node_id(), how), (key.node_id(), Protection::Passphrase));
        assert!(matches!(load(&path, "Ask", Some("fel lösenfras")), Err(SignerKeyError::WrongPassphrase(_))));
        assert!(matches!(load(&path, "Ask", None), Err(SignerKeyError::PassphraseRequired(_))));
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&hex::encode(key.signing_key().to_bytes())), "the secret is not in the clear");
    }

    #[test]
    fn an_old_unprotected_key_stays_readable_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.key");
        let key = NodeKey::generate();
        keyfile::create(&path, &key).unwrap();
        let (opened, how) = load(&path, "Old", None).unwrap();
        assert_eq!((opened.node_id(), how), (key.node_id(), Protection::None));
        // Protecting it replaces the file; the key stays the same.
        write(&path, &seal(&key, "en lång fras").unwrap(), true).unwrap();
        assert_eq!(load(&path, "Old", Some("en lång fras")).unwrap().0.node_id(), key.node_id());
    }

    #[test]
    fn a_short_passphrase_and_an_altered_file_are_refused() {
        assert!(matches!(seal(&NodeKey::generate(), "kort"), Err(SignerKeyError::PassphraseTooShort)));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.key");
        let text = seal(&NodeKey::generate(), "tillräckligt lång").unwrap();
        let altered = text.replacen("\"ciphertext\":\"", "\"ciphertext\":\"00", 1);
        write(&path, &altered, false).unwrap();
        assert!(load(&path, "X", Some("tillräckligt lång")).is_err());
    }
}
