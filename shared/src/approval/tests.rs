use super::*;
use crate::directory::{EnrollmentDirectory, Member, MemberKind};
use crate::identity::NodeKey;
use crate::model::{DocKind, DocumentContent, EditContext};
use crate::org::Directory;
use crate::receipt::{ApprovalReceipt, Receipts};
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
    /// The relay that receipts records, and the receipts it issued.
    relay: NodeKey,
    receipts: std::cell::RefCell<Receipts>,
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
    let relay = NodeKey::generate();
    let receipts = std::cell::RefCell::new(Receipts::new(relay.node_id()));
    Fixture { node, governor, police, directory, relay, receipts }
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

/// Stores the record, and the relay receipts it at its signing time.
fn store(doc: &mut Document, f: &Fixture, record: &ApprovalRecord) {
    append(doc, &ctx(&f.node, "2025-03-01T00:00:00Z"), &Directory::sodermanland(), record).unwrap();
    receipt(doc.id(), f, record, record.signed_at);
}

/// The relay's receipt of `record`, received at `at`, kept in the fixture's book.
fn receipt(doc: &DocId, f: &Fixture, record: &ApprovalRecord, at: DateTime<Utc>) -> ApprovalReceipt {
    let receipt = ApprovalReceipt::issue(&f.relay, doc, &record.signature, at).unwrap();
    f.receipts.borrow_mut().insert(receipt.clone()).unwrap();
    receipt
}

fn status_of(doc: &mut Document, f: &Fixture) -> ApprovalStatus {
    approval_status(doc, &f.directory, &f.receipts.borrow()).unwrap()
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
    let mut r = record.clone();
    r.signature = r.signature.to_uppercase();
    assert!(r.verify_signature(doc.id()).is_err(), "only the canonical lowercase hex names the record");
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
    let status = status_of(&mut doc, &f);
    assert_eq!(status.state, ApprovalState::Draft);
    assert_eq!(status.required.len(), 2);

    // Both sign the same version on separate copies, offline.
    let mut other = Document::load(doc.id().clone(), &doc.automerge_mut().save()).unwrap();
    let signed_heads = doc.heads();
    approve_governor(&mut doc, &f, "2025-03-01T10:00:00Z");
    let police_key = NodeKey::generate();
    let record = sign(&mut other, &f.police, "polisomrade-sodermanland", "Polisområdeschef", "2025-03-01T11:00:00Z");
    append(&mut other, &ctx(&police_key, "2025-03-01T11:00:00Z"), &Directory::sodermanland(), &record).unwrap();
    receipt(other.id(), &f, &record, time("2025-03-01T12:00:00Z"));

    let status = status_of(&mut doc, &f);
    assert_eq!(status.state, ApprovalState::AwaitingSignatures);
    let pending = status.pending.unwrap();
    assert_eq!(pending.signed[0].name, "Beatrice Ask");
    assert_eq!(pending.missing.len(), 1);
    assert_eq!(pending.missing[0].role, "Polisområdeschef");
    assert!(pending.is_current);

    doc.automerge_mut().merge(other.automerge_mut()).unwrap();
    let status = status_of(&mut doc, &f);
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
    let status = status_of(&mut doc, &f);
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
    let status = status_of(&mut doc, &f);
    assert_eq!(status.state, ApprovalState::Approved, "{status:?}");
    assert_eq!(status.in_force.unwrap().signed.len(), 2);
}

#[test]
fn a_withdrawal_is_a_signed_act_that_cancels_the_approval() {
    let f = fixture();
    let mut doc = agreement(&f);
    let approval = approve_governor(&mut doc, &f, "2025-03-01T10:00:00Z");
    approve_police(&mut doc, &f, "2025-03-01T11:00:00Z");
    assert_eq!(status_of(&mut doc, &f).state, ApprovalState::Approved);
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
    let status = status_of(&mut doc, &f);
    assert_eq!(status.state, ApprovalState::AwaitingSignatures, "{status:?}");
    assert_eq!(status.withdrawn.len(), 1);
    assert_eq!(status.pending.unwrap().missing[0].role, "Landshövding");

    // An unsigned "withdrawal" (forged) does not count.
    let mut forged = withdrawal.clone();
    forged.signer = f.police.node_id();
    forged.org = org("polisomrade-sodermanland");
    forged.role = "Polisområdeschef".into();
    store(&mut doc, &f, &forged);
    let status = status_of(&mut doc, &f);
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
    let status = status_of(&mut doc, &f);
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
    let relay = &f.relay;
    let mut doc = agreement(&f);
    approve_governor(&mut doc, &f, "2025-03-01T10:00:00Z");
    approve_police(&mut doc, &f, "2025-03-02T10:00:00Z");
    doc.edit(&ctx(&f.node, "2025-04-01T00:00:00Z"), &Directory::sodermanland(), "edit", |e| {
        e.set_field("title", "Ändrad titel")
    })
    .unwrap();
    let status = status_of(&mut doc, &f);
    let version = status.in_force.unwrap();
    let records = records_of(&doc, &version);
    assert_eq!(records.len(), 2);
    let receipts = records.iter().map(|r| f.receipts.borrow().get(doc.id(), &r.signature).cloned().unwrap()).collect();
    let files = signed_bundle::create(&mut doc, records, receipts, f.directory.sign(relay.signing_key())).unwrap();
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

#[test]
fn a_backdated_record_by_a_revoked_key_awaits_a_receipt_and_never_counts_with_a_late_one() {
    let mut f = fixture();
    let mut doc = agreement(&f);
    f.directory.revoke(&f.governor.node_id(), time("2025-06-01T00:00:00Z")).unwrap();
    // Signed with the stolen key after the revocation, claiming a time before it.
    let backdated = sign(&mut doc, &f.governor, "lansstyrelsen-sodermanland", "Landshövding", "2025-05-01T00:00:00Z");
    backdated.verify(doc.id(), &f.directory).expect("the claimed time alone would pass");
    append(&mut doc, &ctx(&f.node, "2025-07-01T00:00:00Z"), &Directory::sodermanland(), &backdated).unwrap();
    approve_police(&mut doc, &f, "2025-05-02T00:00:00Z");

    // No receipt: awaiting, not counted, not flagged as invalid.
    let status = status_of(&mut doc, &f);
    assert_eq!(status.state, ApprovalState::AwaitingSignatures, "{status:?}");
    assert_eq!(status.awaiting_receipt.len(), 1);
    assert_eq!(status.awaiting_receipt[0].signer, f.governor.node_id());
    assert!(status.flagged.is_empty());
    assert_eq!(
        check_receipted(&doc, &backdated, &f.directory, &f.receipts.borrow()).unwrap_err(),
        RecordProblem::AwaitingReceipt
    );

    // A receipt from the time the relay got it (after the revocation): flagged, never counted.
    receipt(doc.id(), &f, &backdated, time("2025-07-01T00:00:00Z"));
    let status = status_of(&mut doc, &f);
    assert_eq!(status.state, ApprovalState::AwaitingSignatures);
    assert!(status.awaiting_receipt.is_empty());
    assert_eq!(status.flagged.len(), 1);
    assert!(status.flagged[0].problem.contains("when the relay received the record"), "{:?}", status.flagged);

    // A receipt from another relay is not taken at all.
    let elsewhere =
        ApprovalReceipt::issue(&NodeKey::generate(), doc.id(), &backdated.signature, time("2025-05-01T00:00:00Z"))
            .unwrap();
    assert!(f.receipts.borrow_mut().insert(elsewhere.clone()).is_err());
    // And a receipt of another record proves nothing for this one.
    assert_eq!(
        backdated.verify_received(
            doc.id(),
            &f.directory,
            &ApprovalReceipt { record_signature: "00".repeat(64), ..elsewhere }
        ),
        Err(RecordProblem::ReceiptMismatch)
    );
}

#[test]
fn a_record_counts_from_its_receipt_and_a_signing_time_after_it_is_refused() {
    let mut f = fixture();
    let mut doc = agreement(&f);
    // Signed and received while enrolled: it stays valid after a later revocation.
    let approval = sign(&mut doc, &f.governor, "lansstyrelsen-sodermanland", "Landshövding", "2025-05-01T00:00:00Z");
    append(&mut doc, &ctx(&f.node, "2025-05-01T00:00:00Z"), &Directory::sodermanland(), &approval).unwrap();
    let received = receipt(doc.id(), &f, &approval, time("2025-05-01T00:00:01Z"));
    f.directory.revoke(&f.governor.node_id(), time("2025-06-01T00:00:00Z")).unwrap();
    let (member, at) = check_receipted(&doc, &approval, &f.directory, &f.receipts.borrow()).unwrap();
    assert_eq!((member.name.as_str(), at), ("Beatrice Ask", received.received_at));
    let status = status_of(&mut doc, &f);
    assert_eq!(status.pending.unwrap().signed[0].received_at, received.received_at);

    // A signing time more than the allowed skew after the relay received it.
    let mut doc = agreement(&f);
    let late = sign(&mut doc, &f.police, "polisomrade-sodermanland", "Polisområdeschef", "2025-05-01T01:00:00Z");
    append(&mut doc, &ctx(&f.node, "2025-05-01T00:00:00Z"), &Directory::sodermanland(), &late).unwrap();
    receipt(doc.id(), &f, &late, time("2025-05-01T00:00:00Z"));
    assert!(matches!(
        check_receipted(&doc, &late, &f.directory, &f.receipts.borrow()),
        Err(RecordProblem::SignedAfterReceipt { .. })
    ));
}
