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
use samverkan_shared::org::OrgId;
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
    /// No pending join code matches.
    #[error("unknown join code (it was never issued here, or was used already)")]
    UnknownJoinCode,
    /// The join code expired.
    #[error("the join code expired at {0}; ask the operator for a new one")]
    ExpiredJoinCode(DateTime<Utc>),
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
    storage: &mut S,
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
pub fn enroll<S: RelayStorage>(storage: &mut S, member: Member) -> Result<(), EnrollmentError> {
    change(storage, |state| Ok(state.directory.enroll(member)?))
}

/// Enrolls several keys in one atomic change (all or none).
pub fn enroll_all<S: RelayStorage>(storage: &mut S, members: Vec<Member>) -> Result<(), EnrollmentError> {
    change(storage, |state| {
        for member in members {
            state.directory.enroll(member)?;
        }
        Ok(())
    })
}

/// Revokes a key; returns its entry as revoked.
pub fn revoke<S: RelayStorage>(storage: &mut S, key: &NodeId, at: DateTime<Utc>) -> Result<Member, EnrollmentError> {
    change(storage, |state| Ok(state.directory.revoke(key, at)?.clone()))
}

/// Issues a one-time join code secret for a node of `org` named `name`, valid for `ttl`.
pub fn issue_join<S: RelayStorage>(
    storage: &mut S,
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
pub fn consume_join<S: RelayStorage>(
    storage: &mut S,
    secret: &[u8],
    key: NodeId,
    now: DateTime<Utc>,
) -> Result<Member, EnrollmentError> {
    let hash = hex::encode(Sha256::digest(secret));
    change(storage, |state| {
        let index = state.joins.iter().position(|j| j.secret_sha256 == hash).ok_or(EnrollmentError::UnknownJoinCode)?;
        let join = state.joins.remove(index);
        if join.expires_at <= now {
            return Err(EnrollmentError::ExpiredJoinCode(join.expires_at));
        }
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

#[cfg(test)]
mod tests {
    use samverkan_shared::identity::NodeKey;

    use super::*;
    use crate::storage::SqliteStorage;

    #[test]
    fn a_join_code_works_once_and_not_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = SqliteStorage::open(&dir.path().join("relay.db"), 4).unwrap();
        let now = Utc::now();
        let flen = OrgId::new("flen").unwrap();
        let secret = issue_join(&mut storage, flen.clone(), "Flen", Duration::hours(1), now).unwrap();
        let key = NodeKey::generate().node_id();
        let member = consume_join(&mut storage, &secret, key, now).unwrap();
        assert_eq!((member.org, member.name.as_str()), (flen.clone(), "Flen"));
        assert!(directory(&storage).unwrap().active(&key).is_some());
        assert!(matches!(
            consume_join(&mut storage, &secret, NodeKey::generate().node_id(), now),
            Err(EnrollmentError::UnknownJoinCode)
        ));

        let secret = issue_join(&mut storage, flen, "Flen 2", Duration::minutes(5), now).unwrap();
        let later = now + Duration::minutes(6);
        assert!(matches!(
            consume_join(&mut storage, &secret, NodeKey::generate().node_id(), later),
            Err(EnrollmentError::ExpiredJoinCode(_))
        ));

        revoke(&mut storage, &key, now).unwrap();
        assert!(directory(&storage).unwrap().active(&key).is_none());
    }
}
