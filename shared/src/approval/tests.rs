use super::*;
use crate::directory::{EnrollmentDirectory, Member, MemberKind};
use crate::identity::NodeKey;
use crate::model::{DocKind, DocumentContent, EditContext};
use crate::org::Directory;
use crate::signed_bundle::{self, BundleVerifyError};
use sha2::Digest;

fn org(id: &str) -> OrgId {
    OrgId::new(id).unwrap()
}

fn time(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

struct Fixture {
    node: NodeKey,
    governor: NodeKey,
    police: NodeKey,
    directory: EnrollmentDirectory,
}

fn signer(key: &NodeKey, org_id: &str, name: &str, role: &str) -> Member {
    Member {
        key: key.node_id(),
        kind: MemberKind::Signer,
        org: org(org_id),
        name: name.into(),
        role: Some(role.into()),
        enrolled_at: time("2025-01-01T00:00:00Z"),
        revoked_at: None,
    }
}

fn fixture() -> Fixture {
    let (node, governor, police) = (NodeKey::generate(), NodeKey::generate(), NodeKey::generate());
    let mut directory = EnrollmentDirectory::default();
    directory
        .enroll(Member {
            key: node.node_id(),
            kind: MemberKind::Node,
            org: org("lansstyrelsen-sodermanland"),
            name: "Länsstyrelsen BF".into(),
            role: None,
            enrolled_at: time("2025-01-01T00:00:00Z"),
            revoked_at: None,
        })
        .unwrap();
    directory.enroll(signer(&governor, "lansstyrelsen-sodermanland", "Beatrice Ask", "Landshövding")).unwrap();
    directory.enroll(signer(&police, "polisomrade-sodermanland", "Mattias Forssten", "Polisområdeschef")).unwrap();
    Fixture { node, governor, police, directory }
}

fn ctx(key: &NodeKey, at: &str) -> EditContext {
    EditContext {
        author: key.node_id(),
        org: org("lansstyrelsen-sodermanland"),
        node_name: "Länsstyrelsen BF".into(),
        time: time(at),
    }
}

fn agreement(f: &Fixture) -> Document {
    let mut content = DocumentContent::new(DocKind::Agreement, "Länsövergripande samverkansöverenskommelse");
    content.parties = vec![org("lansstyrelsen-sodermanland"), org("polisomrade-sodermanland")];
    content.signatories = vec![
        Signatory { org: org("lansstyrelsen-sodermanland"), role: "Landshövding".into(), name: None },
        Signatory { org: org("polisomrade-sodermanland"), role: "Polisområdeschef".into(), name: None },
    ];
    content.body = "## Bakgrund\n\nVi samverkar.\n".into();
    Document::create(DocId::random(), content, &ctx(&f.node, "2025-02-01T00:00:00Z"), &Directory::sodermanland())
        .unwrap()
}

fn sign(doc: &mut Document, key: &NodeKey, org_id: &str, role: &str, at: &str) -> ApprovalRecord {
    let heads = doc.heads();
    ApprovalRecord::sign(Action::Approve, doc.id(), &heads, key, org(org_id), role, time(at)).unwrap()
}

fn store(doc: &mut Document, f: &Fixture, record: &ApprovalRecord) {
    append(doc, &ctx(&f.node, "2025-03-01T00:00:00Z"), &Directory::sodermanland(), record).unwrap();
}

fn approve_governor(doc: &mut Document, f: &Fixture, at: &str) -> ApprovalRecord {
    let record = sign(doc, &f.governor, "lansstyrelsen-sodermanland", "Landshövding", at);
    store(doc, f, &record);
    record
}

fn approve_police(doc: &mut Document, f: &Fixture, at: &str) -> ApprovalRecord {
    let record = sign(doc, &f.police, "polisomrade-sodermanland", "Polisområdeschef", at);
    store(doc, f, &record);
    record
}

#[test]
fn the_signed_message_is_canonical_and_domain_separated() {
    let f = fixture();
    let mut doc = agreement(&f);
    let record =
        sign(&mut doc, &f.governor, "lansstyrelsen-sodermanland", "Landshövding", "2025-03-01T10:00:00.123456Z");
    assert_eq!(record.signed_at, time("2025-03-01T10:00:00.123Z"), "kept to the millisecond");
    let message = record.message(doc.id());
    assert!(message.starts_with(SIGNING_CONTEXT));
    let text = String::from_utf8(message[SIGNING_CONTEXT.len()..].to_vec()).unwrap();
    let heads = doc.heads();
    assert_eq!(
        text,
        format!(
            "action=approve\ndoc={}\nheads={}\nsigner={}\norg=lansstyrelsen-sodermanland\nrole=Landshövding\ntime=2025-03-01T10:00:00.123Z\n",
            doc.id(),
            heads[0],
            f.governor.node_id()
        )
    );
    record.verify_signature(doc.id()).unwrap();
    assert_eq!(record.verify(doc.id(), &f.directory).unwrap().name, "Beatrice Ask");

    // Any field changed, or another document: the signature no longer verifies.
    let other = DocId::random();
    assert!(matches!(record.verify_signature(&other), Err(RecordProblem::BadSignature { .. })));
    let mut r = record.clone();
    r.role = "Polisområdeschef".into();
    assert!(r.verify_signature(doc.id()).is_err());
    let mut r = record.clone();
    r.signed_at += chrono::Duration::milliseconds(1);
    assert!(r.verify_signature(doc.id()).is_err());
    let mut r = record.clone();
    r.action = Action::Withdraw;
    assert!(r.verify_signature(doc.id()).is_err());
    let mut r = record.clone();
    r.signature = "00".repeat(64);
    assert!(r.verify_signature(doc.id()).is_err());
    assert!(ApprovalRecord::sign(Action::Approve, doc.id(), &heads, &f.governor, org("x"), "a\nb", Utc::now()).is_err());
    assert!(ApprovalRecord::sign(Action::Approve, doc.id(), &[], &f.governor, org("x"), "a", Utc::now()).is_err());
}

#[test]
fn verification_names_wrong_role_wrong_org_node_keys_unknown_and_revoked_signers() {
    let mut f = fixture();
    let mut doc = agreement(&f);
    let id = doc.id().clone();
    let wrong_role =
        sign(&mut doc, &f.governor, "lansstyrelsen-sodermanland", "Polisområdeschef", "2025-03-01T00:00:00Z");
    assert!(matches!(wrong_role.verify(&id, &f.directory), Err(RecordProblem::WrongRole { .. })));
    let wrong_org = sign(&mut doc, &f.governor, "polisomrade-sodermanland", "Landshövding", "2025-03-01T00:00:00Z");
    assert!(matches!(wrong_org.verify(&id, &f.directory), Err(RecordProblem::WrongOrganisation { .. })));
    let by_node = sign(&mut doc, &f.node, "lansstyrelsen-sodermanland", "Landshövding", "2025-03-01T00:00:00Z");
    assert!(matches!(by_node.verify(&id, &f.directory), Err(RecordProblem::NotASigner(_))));
    let stranger = NodeKey::generate();
    let unknown = sign(&mut doc, &stranger, "lansstyrelsen-sodermanland", "Landshövding", "2025-03-01T00:00:00Z");
    assert!(matches!(unknown.verify(&id, &f.directory), Err(RecordProblem::UnknownSigner(_))));
    let early = sign(&mut doc, &f.governor, "lansstyrelsen-sodermanland", "Landshövding", "2024-12-31T00:00:00Z");
    assert!(matches!(early.verify(&id, &f.directory), Err(RecordProblem::NotActiveAt { .. })));

    f.directory.revoke(&f.governor.node_id(), time("2025-06-01T00:00:00Z")).unwrap();
    let before = sign(&mut doc, &f.governor, "lansstyrelsen-sodermanland", "Landshövding", "2025-05-01T00:00:00Z");
    let after = sign(&mut doc, &f.governor, "lansstyrelsen-sodermanland", "Landshövding", "2025-07-01T00:00:00Z");
    before.verify(&id, &f.directory).expect("signed while enrolled: still valid");
    let problem = after.verify(&id, &f.directory).unwrap_err();
    assert!(problem.to_string().contains("Beatrice Ask was not an enrolled signer"), "{problem}");
}

#[test]
fn two_signers_offline_then_merge_is_approved_and_an_edit_is_changed_since_approval() {
    let f = fixture();
    let mut doc = agreement(&f);
    let status = approval_status(&mut doc, &f.directory).unwrap();
    assert_eq!(status.state, ApprovalState::Draft);
    assert_eq!(status.required.len(), 2);

    // Both sign the same version on separate copies, offline.
    let mut other = Document::load(doc.id().clone(), &doc.automerge_mut().save()).unwrap();
    let signed_heads = doc.heads();
    approve_governor(&mut doc, &f, "2025-03-01T10:00:00Z");
    let police_key = NodeKey::generate();
    let record = sign(&mut other, &f.police, "polisomrade-sodermanland", "Polisområdeschef", "2025-03-01T11:00:00Z");
    append(&mut other, &ctx(&police_key, "2025-03-01T11:00:00Z"), &Directory::sodermanland(), &record).unwrap();

    let status = approval_status(&mut doc, &f.directory).unwrap();
    assert_eq!(status.state, ApprovalState::AwaitingSignatures);
    let pending = status.pending.unwrap();
    assert_eq!(pending.signed[0].name, "Beatrice Ask");
    assert_eq!(pending.missing.len(), 1);
    assert_eq!(pending.missing[0].role, "Polisområdeschef");
    assert!(pending.is_current);

    doc.automerge_mut().merge(other.automerge_mut()).unwrap();
    let status = approval_status(&mut doc, &f.directory).unwrap();
    assert_eq!(status.state, ApprovalState::Approved, "{status:?}");
    let in_force = status.in_force.unwrap();
    assert_eq!(in_force.heads, canonical_heads(&signed_heads));
    assert_eq!(in_force.signed.len(), 2);
    assert!(status.flagged.is_empty());
    let signed_view = doc.at(&in_force.heads).unwrap().view().unwrap();

    // An edit: changed since approval; the signed version is still the one in force, exactly.
    doc.edit(&ctx(&f.node, "2025-04-01T00:00:00Z"), &Directory::sodermanland(), "edit", |e| {
        e.set_field("body", "## Bakgrund\n\nVi samverkar mer.\n")
    })
    .unwrap();
    let status = approval_status(&mut doc, &f.directory).unwrap();
    assert_eq!(status.state, ApprovalState::ChangedSinceApproval);
    let in_force = status.in_force.unwrap();
    assert_eq!(doc.at(&in_force.heads).unwrap().view().unwrap(), signed_view);
    assert_eq!(signed_view.body, "## Bakgrund\n\nVi samverkar.\n");
}

#[test]
fn signing_after_another_signers_record_counts_for_the_same_version() {
    let f = fixture();
    let mut doc = agreement(&f);
    approve_governor(&mut doc, &f, "2025-03-01T10:00:00Z");
    // The police chief signs later: the heads now include the governor's record.
    approve_police(&mut doc, &f, "2025-03-02T10:00:00Z");
    let status = approval_status(&mut doc, &f.directory).unwrap();
    assert_eq!(status.state, ApprovalState::Approved, "{status:?}");
    assert_eq!(status.in_force.unwrap().signed.len(), 2);
}

#[test]
fn a_withdrawal_is_a_signed_act_that_cancels_the_approval() {
    let f = fixture();
    let mut doc = agreement(&f);
    let approval = approve_governor(&mut doc, &f, "2025-03-01T10:00:00Z");
    approve_police(&mut doc, &f, "2025-03-01T11:00:00Z");
    assert_eq!(approval_status(&mut doc, &f.directory).unwrap().state, ApprovalState::Approved);
    let withdrawal = ApprovalRecord::sign(
        Action::Withdraw,
        doc.id(),
        &approval.heads,
        &f.governor,
        org("lansstyrelsen-sodermanland"),
        "Landshövding",
        time("2025-03-05T00:00:00Z"),
    )
    .unwrap();
    store(&mut doc, &f, &withdrawal);
    let status = approval_status(&mut doc, &f.directory).unwrap();
    assert_eq!(status.state, ApprovalState::AwaitingSignatures, "{status:?}");
    assert_eq!(status.withdrawn.len(), 1);
    assert_eq!(status.pending.unwrap().missing[0].role, "Landshövding");

    // An unsigned "withdrawal" (forged) does not count.
    let mut forged = withdrawal.clone();
    forged.signer = f.police.node_id();
    forged.org = org("polisomrade-sodermanland");
    forged.role = "Polisområdeschef".into();
    store(&mut doc, &f, &forged);
    let status = approval_status(&mut doc, &f.directory).unwrap();
    assert_eq!(status.flagged.len(), 1);
    assert!(status.flagged[0].problem.contains("does not verify"), "{:?}", status.flagged);
}

#[test]
fn forged_moved_and_wrong_role_records_are_flagged_with_the_reason() {
    let f = fixture();
    let mut doc = agreement(&f);
    let mut elsewhere = agreement(&f);
    let moved = sign(&mut elsewhere, &f.governor, "lansstyrelsen-sodermanland", "Landshövding", "2025-03-01T00:00:00Z");
    let mut forged = sign(&mut doc, &f.police, "polisomrade-sodermanland", "Polisområdeschef", "2025-03-01T00:00:00Z");
    forged.signed_at = time("2025-03-02T00:00:00Z");
    let wrong_role = sign(&mut doc, &f.police, "polisomrade-sodermanland", "Landshövding", "2025-03-01T00:00:00Z");
    for record in [&moved, &forged, &wrong_role] {
        store(&mut doc, &f, record);
    }
    let status = approval_status(&mut doc, &f.directory).unwrap();
    assert_eq!(status.state, ApprovalState::Draft);
    let problems: Vec<&str> = status.flagged.iter().map(|p| p.problem.as_str()).collect();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems[0].contains("does not verify"), "{problems:?}");
    assert!(problems[1].contains("does not verify"), "{problems:?}");
    assert!(problems[2].contains("enrolled as \"Polisområdeschef\""), "{problems:?}");
}

#[test]
fn the_relay_check_refuses_only_new_bad_records() {
    let mut f = fixture();
    let mut doc = agreement(&f);
    let now = time("2025-03-10T00:00:00Z");
    let before = record_keys(&doc);
    approve_governor(&mut doc, &f, "2025-03-01T00:00:00Z");
    check_new_records(&doc, &before, &f.directory, now).unwrap();

    let before = record_keys(&doc);
    let mut forged = sign(&mut doc, &f.police, "polisomrade-sodermanland", "Polisområdeschef", "2025-03-01T00:00:00Z");
    forged.role = "Landshövding".into();
    store(&mut doc, &f, &forged);
    assert!(matches!(check_new_records(&doc, &before, &f.directory, now), Err(RecordProblem::BadSignature { .. })));

    let mut doc = agreement(&f);
    let before = record_keys(&doc);
    approve_police(&mut doc, &f, "2025-03-20T00:00:00Z");
    assert!(matches!(check_new_records(&doc, &before, &f.directory, now), Err(RecordProblem::FutureTime(_))));

    let mut doc = agreement(&f);
    let before = record_keys(&doc);
    approve_police(&mut doc, &f, "2025-03-01T00:00:00Z");
    f.directory.revoke(&f.police.node_id(), time("2025-03-05T00:00:00Z")).unwrap();
    assert!(matches!(check_new_records(&doc, &before, &f.directory, now), Err(RecordProblem::RevokedNow(_))));
    // Already stored records are not judged again.
    check_new_records(&doc, &record_keys(&doc), &f.directory, now).unwrap();

    // Records are never deleted or altered.
    let mut doc = agreement(&f);
    approve_governor(&mut doc, &f, "2025-03-01T00:00:00Z");
    let before = record_keys(&doc);
    let am = doc.automerge_mut();
    let (_, list) = am.get(ROOT, APPROVALS_KEY).unwrap().unwrap();
    automerge::transaction::Transactable::delete(am, &list, 0).unwrap();
    am.commit();
    assert_eq!(check_new_records(&doc, &before, &f.directory, now), Err(RecordProblem::Removed(1)));
}

#[test]
fn a_signed_bundle_round_trips_and_any_changed_byte_fails() {
    let f = fixture();
    let relay = NodeKey::generate();
    let mut doc = agreement(&f);
    approve_governor(&mut doc, &f, "2025-03-01T10:00:00Z");
    approve_police(&mut doc, &f, "2025-03-02T10:00:00Z");
    doc.edit(&ctx(&f.node, "2025-04-01T00:00:00Z"), &Directory::sodermanland(), "edit", |e| {
        e.set_field("title", "Ändrad titel")
    })
    .unwrap();
    let status = approval_status(&mut doc, &f.directory).unwrap();
    let version = status.in_force.unwrap();
    let records = records_of(&doc, &version);
    assert_eq!(records.len(), 2);
    let files = signed_bundle::create(&mut doc, records, f.directory.sign(relay.signing_key())).unwrap();
    assert!(files.markdown.contains("Länsövergripande samverkansöverenskommelse"), "the signed version, not the edit");

    let report = signed_bundle::verify(&files, Some(&relay.node_id())).unwrap();
    assert!(report.relay_pinned);
    assert_eq!(report.signed.len(), 2);
    assert_eq!(report.heads, version.heads);
    assert!(!signed_bundle::verify(&files, None).unwrap().relay_pinned);

    let other_relay = NodeKey::generate().node_id();
    assert!(matches!(signed_bundle::verify(&files, Some(&other_relay)), Err(BundleVerifyError::Directory(_))));

    let flip = |bytes: &mut Vec<u8>, at: usize| bytes[at] ^= 0x01;
    for at in [0, files.markdown.len() / 2, files.markdown.len() - 1] {
        let mut bytes = files.markdown.clone().into_bytes();
        flip(&mut bytes, at);
        let mut tampered = files.clone();
        tampered.markdown = String::from_utf8_lossy(&bytes).into_owned();
        let err = signed_bundle::verify(&tampered, None).unwrap_err();
        assert!(err.to_string().contains("document.md"), "{err}");
    }
    for at in [0, files.history.len() / 2, files.history.len() - 1] {
        let mut tampered = files.clone();
        flip(&mut tampered.history, at);
        let err = signed_bundle::verify(&tampered, None).unwrap_err();
        assert!(err.to_string().contains("history.automerge"), "{err}");
    }
    for at in (0..files.manifest.len()).step_by(97) {
        let mut bytes = files.manifest.clone().into_bytes();
        flip(&mut bytes, at);
        let mut tampered = files.clone();
        tampered.manifest = String::from_utf8_lossy(&bytes).into_owned();
        assert!(signed_bundle::verify(&tampered, None).is_err(), "byte {at} of the manifest changed unnoticed");
    }
    // Consistent forgery: Markdown and checksum changed together is still caught.
    let mut tampered = files.clone();
    tampered.markdown = files.markdown.replace("Vi samverkar.", "Vi samverkar inte.");
    let mut manifest: signed_bundle::Manifest = serde_json::from_str(&files.manifest).unwrap();
    manifest.markdown_sha256 = hex::encode(sha2::Sha256::digest(tampered.markdown.as_bytes()));
    tampered.manifest = serde_json::to_string_pretty(&manifest).unwrap() + "\n";
    assert_eq!(signed_bundle::verify(&tampered, None), Err(BundleVerifyError::Markdown));
}
