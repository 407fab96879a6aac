//! Every path by which changes arrive enforces the same rules: the author is an
//! enrolled node of the relay the receiver pinned, the change is signed, it and
//! its document are within the size limits, compressed data is bounded, and the
//! document is shared with the receiver. Real relay over QUIC on 127.0.0.1,
//! real nodes with SQLite files in temporary directories, hand-driven hostile
//! clients, bundles written to files; bounded timeouts everywhere.

use std::io::Write;
use std::path::Path;

use samverkan::net::endpoint::{self, Limits};
use samverkan::net::framed;
use samverkan::net::tls::TlsIdentity;
use samverkan::node::node::{AuthorStatus, Node, NodeError, META_RELAY_KEY};
use samverkan::node::sync::{self, SyncFailure};
use samverkan::relay::server::RelayHandle;
use samverkan::shared::acceptance::ContentLimits;
use samverkan::shared::authorship;
use samverkan::shared::automerge::{self, AutoCommit};
use samverkan::shared::bundle::{Bundle, BundleDoc, HeadsSummary};
use samverkan::shared::identity::NodeKey;
use samverkan::shared::ids::{DocId, ItemId};
use samverkan::shared::model::{Activity, ActivityStatus, DocKind, Document, DocumentContent, EditContext};
use samverkan::shared::org::{Directory, OrgId};
use samverkan::shared::sync::SignedChange;
use samverkan::shared::wire::{Frame, RefusalKind, PROTOCOL_VERSION};
use samverkan::store::StoreError;

#[path = "support/relay_net.rs"]
mod relay_net;
use relay_net::{bounded, enrolled, org, relay_config, spawn_relay, try_sync as sync};

#[path = "support/paper_relay.rs"]
mod paper_relay;

async fn start_relay(dir: &Path, content: ContentLimits) -> RelayHandle {
    let mut config = relay_config(dir);
    config.content = content;
    spawn_relay(config).await
}

/// A citizen promise of Katrineholm and the police, with one activity.
fn promise(node: &mut Node) -> DocId {
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Katrineholm 2026");
    content.parties = vec![org("Katrineholm"), org("Polisen")];
    content.body = "Vi lovar trygghetsvandringar i centrum.\n".into();
    let id = node.create(content).unwrap();
    node.edit(&id, "add activity", |e| e.add_activity(&activity("Trygghetsvandring"))).unwrap();
    id
}

fn activity(what: &str) -> Activity {
    Activity {
        id: ItemId::random(),
        what: what.into(),
        owners: Vec::new(),
        due: None,
        followup_method: None,
        status: ActivityStatus::Planned,
    }
}

fn body(node: &Node, id: &DocId) -> String {
    node.document(id).unwrap().view().unwrap().body
}

/// A bundle of what `to` lacks from `from`, through a file.
fn bundle_for(from: &Node, to: &Node, file: &Path) -> Bundle {
    let have = HeadsSummary::from_json(&to.heads_summary().unwrap().to_json()).unwrap();
    std::fs::write(file, from.export_bundle(Some(&have), None).unwrap().encode()).unwrap();
    Bundle::decode(&std::fs::read(file).unwrap()).unwrap()
}

/// The relay's refusal of the one document a sync offered (the sync itself goes on).
fn refusal(result: Result<sync::SyncReport, SyncFailure>) -> (&'static str, String) {
    match result {
        Ok(report) if report.refused.len() == 1 => (report.refused[0].kind, report.refused[0].reason.clone()),
        other => panic!("expected the relay to refuse one document, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_by_an_unenrolled_author_is_refused_on_every_path() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay"), ContentLimits::default()).await;
    let mut katrineholm = enrolled(root.path(), &relay, "Katrineholm BF-samordnare", "Katrineholm");
    let mut police = enrolled(root.path(), &relay, "LPO Katrineholm", "Polisen");
    let id = promise(&mut katrineholm);
    sync(&mut katrineholm, &relay).await.unwrap();
    sync(&mut police, &relay).await.unwrap();
    assert_eq!(body(&police, &id), body(&katrineholm, &id));

    // A node that never joined cannot take in a bundle: it cannot tell whose changes count.
    let file = root.path().join("stick.bundle");
    let mut impostor = Node::init(&root.path().join("impostor"), "Polisen", Some("LPO Katrineholm")).unwrap();
    let bundle = bundle_for(&katrineholm, &impostor, &file);
    assert!(matches!(impostor.import_bundle(&bundle), Err(NodeError::NotJoined)));

    // An impostor who copies the relay key and directory from a real bundle gets the
    // document, edits it under its own (unenrolled) key and hands a bundle back.
    impostor.store_mut().set_meta(META_RELAY_KEY, &relay.relay_key().to_string()).unwrap();
    impostor.store_enrollment(bundle.directory.as_deref().unwrap(), &relay.relay_key()).unwrap();
    let reports = impostor.import_bundle(&bundle).unwrap();
    assert!(reports.iter().all(|r| r.error.is_none()), "{reports:?}");
    impostor.edit(&id, "edit", |e| e.set_body("Polisen drar tillbaka löftet.\n")).unwrap();
    let forged = bundle_for(&impostor, &katrineholm, &file);
    let before = body(&katrineholm, &id);
    let reports = katrineholm.import_bundle(&forged).unwrap();
    let error = reports[0].error.clone().unwrap_or_default();
    assert!(error.contains("not enrolled at this relay"), "{reports:?}");
    assert_eq!(body(&katrineholm, &id), before, "nothing of the impostor's change was stored");

    // A bundle made under another relay is refused whole, naming both relays.
    let other = paper_relay::PaperRelay::default();
    let mut elsewhere = Node::init(&root.path().join("elsewhere"), "Katrineholm", None).unwrap();
    other.hand_to(&mut elsewhere);
    let foreign = elsewhere.export_bundle(None, Some(&org("Katrineholm"))).unwrap();
    let err = katrineholm.import_bundle(&foreign).unwrap_err();
    assert!(matches!(err, NodeError::ForeignRelay { .. }), "{err}");
    assert!(err.to_string().contains(&relay.relay_key().to_string()), "{err}");

    // At the relay: an enrolled node passing on a signed change by an unenrolled
    // key (as a node without these checks would) is refused, nothing is stored.
    let stranger = NodeKey::generate();
    let (doc_id, message, authors) = document_by(&stranger, &org("Katrineholm"), "x");
    let (kind, message) = push_raw(&relay, &enroll_raw(&relay, "Katrineholm"), doc_id.clone(), authors, message).await;
    assert_eq!(kind, RefusalKind::ChangesRefused, "{message}");
    assert!(message.contains("not enrolled"), "{message}");
    assert!(!relay_holds(&relay, &doc_id, &mut katrineholm).await);

    // Honest nodes keep syncing; history names every author by their standing.
    katrineholm.edit(&id, "edit", |e| e.set_body("Vi lovar två vandringar per månad.\n")).unwrap();
    sync(&mut katrineholm, &relay).await.unwrap();
    sync(&mut police, &relay).await.unwrap();
    assert_eq!(body(&police, &id), "Vi lovar två vandringar per månad.\n");
    relay.revoke(&katrineholm.node_id()).unwrap();
    sync(&mut police, &relay).await.unwrap();
    let actor = katrineholm.node_id().actor_id().to_hex_string();
    let author = police.author(&actor);
    assert_eq!(author.status, AuthorStatus::Revoked, "{author:?}");
    assert!(author.label.contains("återkallad"), "{author:?}");
    let unknown = police.author(&stranger.node_id().actor_id().to_hex_string());
    assert_eq!(unknown.status, AuthorStatus::NotEnrolled);
    assert!(!unknown.label.contains("Katrineholm"), "an unknown key is never shown under an organisation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_change_is_refused_before_it_is_stored_on_every_path() {
    let root = tempfile::tempdir().unwrap();
    // Small limits so the test stays fast; the defaults are 4 MiB per change and 32 MiB per document.
    let limits = ContentLimits { max_change_bytes: 64 * 1024, max_document_bytes: 256 * 1024 };
    let relay = start_relay(&root.path().join("relay"), limits).await;
    let mut katrineholm = enrolled(root.path(), &relay, "Katrineholm BF-samordnare", "Katrineholm");
    let mut police = enrolled(root.path(), &relay, "LPO Katrineholm", "Polisen");
    let id = promise(&mut katrineholm);
    // The relay announces its limits at the first sync; the node keeps them (protocol 6).
    sync(&mut katrineholm, &relay).await.unwrap();
    assert_eq!(katrineholm.store().content_limits(), limits);

    // Typed here: a change over the limit is refused with a clear error, nothing is written.
    let huge = noise(100 * 1024);
    let err = katrineholm.edit(&id, "paste", |e| e.set_body(&huge)).unwrap_err();
    assert!(matches!(err, NodeError::Store(StoreError::TooLarge(_))), "{err}");
    assert!(err.to_string().contains("per change"), "{err}");

    // A hostile node whose own store allows more: the relay refuses the change
    // (too large) and the document grown past its limit, and stores neither.
    let mut hostile = hostile_copy(root.path(), &relay, "Katrineholm 2").await;
    hostile.edit(&id, "paste", |e| e.set_body(&huge)).unwrap();
    let (kind, message) = refusal(sync(&mut hostile, &relay).await);
    assert_eq!(kind, "too_large", "{message}");
    let mut grown = hostile_copy(root.path(), &relay, "Katrineholm 3").await;
    // Appended, not replaced, so each change stays under the change limit and the diff stays cheap.
    let mut text = body(&grown, &id);
    for _ in 0..8 {
        text.push_str(&noise(40 * 1024));
        grown.edit(&id, "grow", |e| e.set_body(&text)).unwrap();
    }
    let (kind, message) = refusal(sync(&mut grown, &relay).await);
    assert_eq!(kind, "too_large", "{message}");
    assert!(message.contains("per document"), "{message}");

    // Nothing of it was stored: honest nodes keep syncing the document as it was.
    sync(&mut police, &relay).await.unwrap();
    assert_eq!(body(&police, &id), body(&katrineholm, &id));
    katrineholm.edit(&id, "edit", |e| e.set_body("Kort och gott.\n")).unwrap();
    sync(&mut katrineholm, &relay).await.unwrap();
    sync(&mut police, &relay).await.unwrap();
    assert_eq!(body(&police, &id), "Kort och gott.\n");

    // The same change on a stick is refused by the receiving node, and its database does not grow.
    assert_eq!(police.store().content_limits(), limits, "kept from the relay's announcement");
    let file = root.path().join("stick.bundle");
    let bundle = bundle_for(&hostile, &police, &file);
    let size_before = std::fs::metadata(root.path().join("LPO Katrineholm/node.db")).unwrap().len();
    let reports = police.import_bundle(&bundle).unwrap();
    let error = reports[0].error.clone().unwrap_or_default();
    assert!(error.contains("per change"), "{reports:?}");
    assert_eq!(body(&police, &id), "Kort och gott.\n");
    let size_after = std::fs::metadata(root.path().join("LPO Katrineholm/node.db")).unwrap().len();
    assert!(size_after < size_before + 64 * 1024, "node.db grew from {size_before} to {size_after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_import_bounds_decompression_and_refuses_what_is_not_automerge_or_not_ours() {
    let root = tempfile::tempdir().unwrap();
    let relay = start_relay(&root.path().join("relay"), ContentLimits::default()).await;
    let mut katrineholm = enrolled(root.path(), &relay, "Katrineholm BF-samordnare", "Katrineholm");
    let mut flen = enrolled(root.path(), &relay, "Flen BF-samordnare", "Flen");
    let mut police = enrolled(root.path(), &relay, "LPO Katrineholm", "Polisen");
    let id = promise(&mut katrineholm);
    sync(&mut katrineholm, &relay).await.unwrap();
    sync(&mut flen, &relay).await.unwrap();
    sync(&mut police, &relay).await.unwrap();
    assert!(flen.list().unwrap().is_empty(), "the relay gives Flen nothing of Katrineholm's");

    // Export for Flen carries none of Katrineholm's documents.
    let file = root.path().join("stick.bundle");
    assert!(bundle_for(&katrineholm, &flen, &file).docs.is_empty());
    // A bundle made for the police, handed to Flen anyway: refused, nothing stored.
    let for_police = katrineholm.export_bundle(None, Some(&org("Polisen"))).unwrap();
    assert_eq!(for_police.docs.len(), 1);
    let reports = flen.import_bundle(&for_police).unwrap();
    assert!(reports[0].error.as_deref().unwrap_or_default().contains("not shared with this node's organisation"));
    assert!(flen.list().unwrap().is_empty());

    // A deflate bomb (a compressed change of 64 MiB of zeros in 64 KB) and bytes that
    // are not Automerge at all are refused with a reason; nothing is stored.
    let template = katrineholm.export_bundle(None, Some(&org("Polisen"))).unwrap();
    let with = |data: Vec<u8>| Bundle {
        docs: vec![BundleDoc { id: DocId::random(), data, signatures: Vec::new() }],
        ..template.clone()
    };
    let before = police.list().unwrap().len();
    for (data, expected) in [
        (deflate_bomb(64 * 1024 * 1024), "exceeds the limit"),
        (b"not automerge at all".to_vec(), "magic bytes"),
        (Vec::new(), "no Automerge data"),
    ] {
        let reports = police.import_bundle(&Bundle::decode(&with(data).encode()).unwrap()).unwrap();
        let error = reports[0].error.clone().unwrap_or_default();
        assert!(error.contains(expected), "expected {expected:?}: {reports:?}");
    }
    assert_eq!(police.list().unwrap().len(), before);
    assert_eq!(body(&police, &id), body(&katrineholm, &id));
    assert!(police.check().unwrap().is_empty());
}

/// Random letters (they do not compress, as a pasted document would not).
fn noise(len: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..len).map(|i| if i % 80 == 79 { '\n' } else { char::from(rng.gen_range(b'a'..=b'z')) }).collect()
}

/// An Automerge compressed-change chunk whose DEFLATE data inflates to `inflated` zero bytes.
fn deflate_bomb(inflated: usize) -> Vec<u8> {
    let mut encoder = flate2_encoder();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..inflated / zeros.len() {
        encoder.write_all(&zeros).unwrap();
    }
    let deflated = encoder.finish().unwrap();
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 2];
    let mut len = deflated.len() as u64;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            chunk.push(byte);
            break;
        }
        chunk.push(byte | 0x80);
    }
    chunk.extend_from_slice(&deflated);
    chunk
}

fn flate2_encoder() -> flate2::write::DeflateEncoder<Vec<u8>> {
    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best())
}

/// A node enrolled at `relay` that takes more than the relay accepts (a hostile node).
async fn hostile_copy(root: &Path, relay: &RelayHandle, name: &str) -> Node {
    let mut node = enrolled(root, relay, name, "Katrineholm");
    sync(&mut node, relay).await.unwrap();
    // Ignoring the limits the relay announced (an honest node keeps them).
    node.store_mut().set_content_limits(ContentLimits::default());
    node
}

/// A document of `org` written entirely by `author`, as one sync message, with the author's signatures.
fn document_by(author: &NodeKey, party: &OrgId, text: &str) -> (DocId, Vec<u8>, Vec<SignedChange>) {
    let ctx =
        EditContext { author: author.node_id(), org: party.clone(), node_name: "x".into(), time: chrono::Utc::now() };
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Främmande löfte");
    content.parties = vec![party.clone()];
    content.body = text.into();
    let id = DocId::random();
    let mut doc = Document::create(id.clone(), content, &ctx, &Directory::sodermanland()).unwrap();
    let am = doc.automerge_mut();
    let changes = am.get_changes(&[]);
    let signatures = authorship::author_tips(changes.iter())
        .iter()
        .map(|(hash, _)| (*hash, authorship::sign(author, &id, hash)))
        .collect();
    (id, whole_document_message(am), signatures)
}

/// An Automerge sync message carrying a whole document, as to an empty peer.
fn whole_document_message(doc: &mut AutoCommit) -> Vec<u8> {
    use automerge::sync::{State, SyncDoc};
    let mut state = State::new();
    let first = doc.sync().generate_sync_message(&mut state).unwrap();
    let mut empty = AutoCommit::new();
    let mut theirs = State::new();
    empty.sync().receive_sync_message(&mut theirs, first).unwrap();
    let request = empty.sync().generate_sync_message(&mut theirs).unwrap();
    doc.sync().receive_sync_message(&mut state, request).unwrap();
    doc.sync().generate_sync_message(&mut state).unwrap().encode()
}

/// A fresh key enrolled as a node of `org_name` at `relay`.
fn enroll_raw(relay: &RelayHandle, org_name: &str) -> NodeKey {
    let key = NodeKey::generate();
    relay.enroll_node(key.node_id(), org(org_name), "hand-driven").unwrap();
    key
}

/// Connects as `key`, says Hello, sends the signatures and the sync message, and
/// returns the relay's error frame.
async fn push_raw(
    relay: &RelayHandle,
    key: &NodeKey,
    doc: DocId,
    entries: Vec<SignedChange>,
    message: Vec<u8>,
) -> (RefusalKind, String) {
    let identity = TlsIdentity::new(key.signing_key(), "test-client").unwrap();
    let client = endpoint::client_endpoint(relay.local_addr()).unwrap();
    let limits = Limits::default();
    let connecting = endpoint::connect(&client, relay.local_addr(), &identity, *relay.relay_key().as_bytes(), &limits);
    let conn = bounded("connect", connecting).await.unwrap();
    let (mut send, mut recv) = bounded("open", framed::open(&conn, &limits)).await.unwrap();
    let hello = Frame::Hello {
        protocol: PROTOCOL_VERSION,
        software: "raw".into(),
        node: key.node_id().to_string(),
        directory: None,
    };
    send.send(&hello).await.unwrap();
    send.send(&Frame::Authors { doc: doc.clone(), entries }).await.unwrap();
    send.send(&Frame::Sync { doc, message }).await.unwrap();
    bounded("a document refusal", async {
        loop {
            match recv.recv().await {
                Ok(Some(Frame::DocRefused { kind, reason, .. })) => return (kind, reason),
                Ok(Some(_)) => continue,
                other => panic!("the relay closed without refusing the document: {other:?}"),
            }
        }
    })
    .await
}

/// Whether the relay gives `doc` to a node of the document's parties (after a sync).
async fn relay_holds(relay: &RelayHandle, doc: &DocId, node: &mut Node) -> bool {
    sync(node, relay).await.unwrap();
    node.document(doc).is_ok()
}
