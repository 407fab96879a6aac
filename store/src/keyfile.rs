//! Secret key files of a data directory (node key, relay key): created with
//! owner-only permissions and synced before use; refused when others can read them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use samverkan_shared::identity::{IdentityError, NodeKey};

/// Errors reading or writing a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file can be read by others than its owner.
    #[error("{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a key.
    #[error("{path}: {source}")]
    Identity {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: IdentityError,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io { path: path.to_path_buf(), source }
}

/// Creates a directory (and its parents) readable by the owner only.
pub fn create_private_dir(dir: &Path) -> Result<(), KeyFileError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io(dir))
}

/// Writes a new key file (never overwriting one) with mode 0600, durably.
pub fn create(path: &Path, key: &NodeKey) -> Result<(), KeyFileError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(key.to_file_contents().as_bytes()).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Reads a key file, refusing one that others can read.
pub fn load(path: &Path) -> Result<NodeKey, KeyFileError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions { path: path.to_path_buf(), mode });
        }
    }
    let text = fs::read_to_string(path).map_err(io(path))?;
    NodeKey::from_file_contents(&text).map_err(|source| KeyFileError::Identity { path: path.to_path_buf(), source })
}

/// Reads the key file at `path`, or makes a new key there if there is none.
pub fn load_or_create(path: &Path) -> Result<NodeKey, KeyFileError> {
    if path.exists() {
        return load(path);
    }
    let key = NodeKey::generate();
    create(path, &key)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_kept_private_and_refused_when_exposed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.key");
        let first = load_or_create(&path).unwrap();
        assert_eq!(load_or_create(&path).unwrap().node_id(), first.node_id());
        assert!(create(&path, &first).is_err(), "never overwrites");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(load(&path), Err(KeyFileError::Permissions { .. })));
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        }
        fs::write(&path, "garbage").unwrap();
        assert!(matches!(load(&path), Err(KeyFileError::Identity { .. })));
    }
}
