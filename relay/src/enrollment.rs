//! Who may connect: the relay's enrollment directory and one-time join codes.
//!
//! Kept as one metadata value in the relay's storage (so enrolling, revoking
//! and consuming a join code are each one atomic read-modify-write, also when
//! the operator's CLI and the running relay change it at the same time). Join
//! codes are stored only as SHA-256 hashes of their secrets, with an expiry.
//! The relay's own key lives in `relay.key` in its data directory.

use chrono::{DateTime, Duration, Utc};
use rand::RngCore;
use samverkan_shared::directory::{DirectoryError, EnrollmentDirectory, Member, MemberKind};
use samverkan_shared::identity::NodeId;
use samverkan_shared::org::{Directory, OrgId};
use samverkan_store::StoreError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::storage::RelayStorage;

/// File name of the relay's identity key in its data directory.
pub const KEY_FILE: &str = "relay.key";
/// Metadata key of the enrollment state.
const META_ENROLLMENT: &str = "relay.enrollment";

/// Errors of enrollment.
#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The directory refused the change.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// The stored enrollment state does not decode.
    #[error("the relay's enrollment data is damaged: {0}")]
    Corrupt(String),
    /// The data directory's `organisations.toml` cannot be read or used.
    #[error("{path}: {reason}; fix or remove the file (it adds organisations to the built-in directory)")]
    Organisations {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No pending join code matches.
    #[error("unknown join code (it was never issued here, or was used already)")]
    UnknownJoinCode,
    /// The join code expired.
    #[error("the join code expired at {0}; ask the operator for a new one")]
    ExpiredJoinCode(DateTime<Utc>),
    /// The node claims an organisation that is not a valid organisation id.
    #[error("the node names its organisation {0:?}, which is not an organisation id; nothing was enrolled")]
    InvalidOrganisation(String),
    /// The join code was issued for another organisation than the node's.
    #[error(
        "this join code was issued for {code_org_name} ({code_org}), but this node belongs to {node_org}; \
         nothing was enrolled and the code is still valid; ask the operator for a code for your organisation"
    )]
    WrongOrganisation {
        /// The organisation the code was issued for.
        code_org: OrgId,
        /// Its name, for people.
        code_org_name: String,
        /// The organisation the node says it belongs to.
        node_org: OrgId,
    },
    /// The key joining is already enrolled (and not revoked).
    #[error(
        "this node's key {key} is already enrolled at this relay as {name} ({org}); the join code was not used. \
         Sync with `samverkan-node sync --relay <address> --relay-key <relay key>`, \
         or ask the operator to revoke the key first"
    )]
    AlreadyEnrolled {
        /// The key, shortened.
        key: String,
        /// The organisation it is enrolled for.
        org: OrgId,
        /// The name it is enrolled under.
        name: String,
    },
}

/// A join code waiting to be used.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PendingJoin {
    secret_sha256: String,
    org: OrgId,
    name: String,
    expires_at: DateTime<Utc>,
}

/// Everything enrollment keeps.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct EnrollmentState {
    directory: EnrollmentDirectory,
    joins: Vec<PendingJoin>,
}

fn decode(value: Option<String>) -> Result<EnrollmentState, EnrollmentError> {
    match value {
        None => Ok(EnrollmentState::default()),
        Some(text) => serde_json::from_str(&text).map_err(|e| EnrollmentError::Corrupt(e.to_string())),
    }
}

fn encode(state: &EnrollmentState) -> Result<Option<String>, EnrollmentError> {
    serde_json::to_string(state).map(Some).map_err(|e| EnrollmentError::Corrupt(e.to_string()))
}

/// Changes the enrollment state atomically; returns `f`'s result.
fn change<S: RelayStorage, T>(
    storage: &S,
    f: impl FnOnce(&mut EnrollmentState) -> Result<T, EnrollmentError>,
) -> Result<T, EnrollmentError> {
    let mut out = None;
    storage.update_meta(META_ENROLLMENT, |value| {
        let mut state = decode(value)?;
        out = Some(f(&mut state)?);
        encode(&state)
    })?;
    out.ok_or_else(|| EnrollmentError::Corrupt("enrollment update produced nothing".into()))
}

/// The current directory.
pub fn directory<S: RelayStorage>(storage: &S) -> Result<EnrollmentDirectory, EnrollmentError> {
    Ok(decode(storage.meta(META_ENROLLMENT)?)?.directory)
}

/// Enrolls a key (node or signer).
pub fn enroll<S: RelayStorage>(storage: &S, member: Member) -> Result<(), EnrollmentError> {
    change(storage, |state| Ok(state.directory.enroll(member)?))
}

/// Enrolls several keys in one atomic change (all or none).
pub fn enroll_all<S: RelayStorage>(storage: &S, members: Vec<Member>) -> Result<(), EnrollmentError> {
    change(storage, |state| {
        for member in members {
            state.directory.enroll(member)?;
        }
        Ok(())
    })
}

/// Revokes a key; returns its entry as revoked.
pub fn revoke<S: RelayStorage>(storage: &S, key: &NodeId, at: DateTime<Utc>) -> Result<Member, EnrollmentError> {
    change(storage, |state| Ok(state.directory.revoke(key, at)?.clone()))
}

/// Issues a one-time join code secret for a node of `org` named `name`, valid for `ttl`.
pub fn issue_join<S: RelayStorage>(
    storage: &S,
    org: OrgId,
    name: &str,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Result<[u8; 16], EnrollmentError> {
    let mut secret = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    change(storage, |state| {
        state.joins.retain(|j| j.expires_at > now);
        state.joins.push(PendingJoin {
            secret_sha256: hex::encode(Sha256::digest(secret)),
            org,
            name: name.to_string(),
            expires_at: now + ttl,
        });
        Ok(())
    })?;
    Ok(secret)
}

/// Uses a join code: enrolls `key` as the node the code was issued for.
///
/// `node_org` is the organisation the joining node says it belongs to. Every
/// check comes before any change, in the same storage transaction: the code
/// exists and has not expired, it was issued for `node_org`, and `key` is not
/// enrolled already (under any organisation). On any failure nothing changes:
/// the code stays usable and no member is added.
pub fn consume_join<S: RelayStorage>(
    storage: &S,
    secret: &[u8],
    key: NodeId,
    node_org: &str,
    now: DateTime<Utc>,
) -> Result<Member, EnrollmentError> {
    let hash = hex::encode(Sha256::digest(secret));
    let node_org = OrgId::new(node_org.trim()).ok_or_else(|| EnrollmentError::InvalidOrganisation(node_org.into()))?;
    change(storage, |state| {
        let index = state.joins.iter().position(|j| j.secret_sha256 == hash).ok_or(EnrollmentError::UnknownJoinCode)?;
        let pending = &state.joins[index];
        if pending.expires_at <= now {
            return Err(EnrollmentError::ExpiredJoinCode(pending.expires_at));
        }
        if pending.org != node_org {
            return Err(EnrollmentError::WrongOrganisation {
                code_org_name: Directory::sodermanland().name_of(&pending.org).to_string(),
                code_org: pending.org.clone(),
                node_org,
            });
        }
        if let Some(member) = state.directory.active(&key) {
            return Err(EnrollmentError::AlreadyEnrolled {
                key: key.short(),
                org: member.org.clone(),
                name: member.name.clone(),
            });
        }
        let join = state.joins.remove(index);
        let member = Member {
            key,
            kind: MemberKind::Node,
            org: join.org,
            name: join.name,
            role: None,
            enrolled_at: now,
            revoked_at: None,
        };
        state.directory.enroll(member.clone())?;
        Ok(member)
    })
}

/// File in the relay's data directory that adds organisations and units (another
/// county, say) to the built-in directory, in the format of the nodes' file of
/// the same name; the relay names organisations and resolves `enroll --org`
/// with it.
pub const ORGANISATIONS_FILE: &str = "organisations.toml";

/// The relay's organisation directory: the built-in one with the data
/// directory's [`ORGANISATIONS_FILE`] on top, if there is one. A file that
/// cannot be read or used is an error naming it (never silently ignored).
pub fn organisations(data_dir: &std::path::Path) -> Result<Directory, EnrollmentError> {
    let path = data_dir.join(ORGANISATIONS_FILE);
    let corrupt = |reason: String| EnrollmentError::Organisations { path: path.clone(), reason };
    match std::fs::read_to_string(&path) {
        Ok(text) => Directory::sodermanland().with_overrides(&text).map_err(|e| corrupt(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Directory::sodermanland()),
        Err(e) => Err(corrupt(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use samverkan_shared::identity::NodeKey;

    use super::*;
    use crate::storage::SqliteStorage;

    #[test]
    fn a_join_code_works_once_and_not_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::open(&dir.path().join("relay.db"), 4).unwrap();
        let now = Utc::now();
        let flen = OrgId::new("flen-kommun").unwrap();
        let secret = issue_join(&storage, flen.clone(), "Flen", Duration::hours(1), now).unwrap();
        let key = NodeKey::generate().node_id();
        let member = consume_join(&storage, &secret, key, "flen-kommun", now).unwrap();
        assert_eq!((member.org, member.name.as_str()), (flen.clone(), "Flen"));
        assert!(directory(&storage).unwrap().active(&key).is_some());
        assert!(matches!(
            consume_join(&storage, &secret, NodeKey::generate().node_id(), "flen-kommun", now),
            Err(EnrollmentError::UnknownJoinCode)
        ));

        let secret = issue_join(&storage, flen, "Flen 2", Duration::minutes(5), now).unwrap();
        let later = now + Duration::minutes(6);
        assert!(matches!(
            consume_join(&storage, &secret, NodeKey::generate().node_id(), "flen-kommun", later),
            Err(EnrollmentError::ExpiredJoinCode(_))
        ));

        revoke(&storage, &key, now).unwrap();
        assert!(directory(&storage).unwrap().active(&key).is_none());
    }

    /// The stored enrollment state, as text (to compare before and after).
    fn state(storage: &SqliteStorage) -> String {
        storage.meta(META_ENROLLMENT).unwrap().unwrap_or_default()
    }

    #[test]
    fn a_refused_join_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::open(&dir.path().join("relay.db"), 4).unwrap();
        let now = Utc::now();
        let gnesta = OrgId::new("gnesta-kommun").unwrap();
        let secret = issue_join(&storage, gnesta.clone(), "Gnesta", Duration::hours(1), now).unwrap();
        let before = state(&storage);

        // A code for Gnesta, used by a node of Trosa.
        let trosa_key = NodeKey::generate().node_id();
        let error = consume_join(&storage, &secret, trosa_key, "trosa-kommun", now).unwrap_err();
        assert!(
            matches!(&error, EnrollmentError::WrongOrganisation { code_org, node_org, .. }
                if code_org == &gnesta && node_org.as_str() == "trosa-kommun"),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("Gnesta kommun (gnesta-kommun)") && message.contains("trosa-kommun"), "{message}");
        assert!(matches!(
            consume_join(&storage, &secret, trosa_key, "Not An Id!", now),
            Err(EnrollmentError::InvalidOrganisation(_))
        ));
        assert_eq!(state(&storage), before, "nothing changed");

        // A key enrolled already (here for Trosa) joining with a code for its own organisation.
        let trosa = OrgId::new("trosa-kommun").unwrap();
        enroll(
            &storage,
            Member {
                key: trosa_key,
                kind: MemberKind::Node,
                org: trosa.clone(),
                name: "Trosa".into(),
                role: None,
                enrolled_at: now,
                revoked_at: None,
            },
        )
        .unwrap();
        let trosa_secret = issue_join(&storage, trosa.clone(), "Trosa 2", Duration::hours(1), now).unwrap();
        let before = state(&storage);
        let error = consume_join(&storage, &trosa_secret, trosa_key, "trosa-kommun", now).unwrap_err();
        assert!(
            matches!(&error, EnrollmentError::AlreadyEnrolled { org, name, .. } if org == &trosa && name == "Trosa")
        );
        assert_eq!(state(&storage), before, "nothing changed");

        // Both codes still work for the nodes they were meant for.
        let gnesta_key = NodeKey::generate().node_id();
        assert_eq!(consume_join(&storage, &secret, gnesta_key, "gnesta-kommun", now).unwrap().org, gnesta);
        let second_trosa = NodeKey::generate().node_id();
        assert_eq!(consume_join(&storage, &trosa_secret, second_trosa, "trosa-kommun", now).unwrap().name, "Trosa 2");
        let directory = directory(&storage).unwrap();
        assert_eq!(directory.active(&trosa_key).unwrap().name, "Trosa");
        assert_eq!(directory.members.len(), 3);
    }
}
