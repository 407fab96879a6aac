use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use samverkan_shared::identity::NodeKey;
use samverkan_shared::model::{DocKind, DocumentContent, EditContext};
use samverkan_shared::org::{Directory, OrgId};

use super::*;

fn ctx() -> EditContext {
    EditContext {
        author: NodeKey::generate().node_id(),
        org: OrgId::new("trosa-kommun").unwrap(),
        node_name: "Trosa".into(),
        time: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
    }
}

/// Stores a new document through `with_doc(create)`, as the relay does for a
/// document a node sends first.
fn create(store: &ConcurrentStore, ctx: &EditContext, title: &str) -> DocId {
    let content = DocumentContent::new(DocKind::CitizenPromise, title);
    let mut source = Document::create(DocId::random(), content, ctx, &Directory::sodermanland()).unwrap();
    let id = source.id().clone();
    let bytes = source.automerge_mut().save();
    let (_, outcome) = store
        .with_doc(&id, true, |d| {
            d.automerge_mut().load_incremental(&bytes).map_err(|e| StoreError::CommitFailed(e.to_string()))?;
            Ok::<_, StoreError>(((), (Vec::new(), Vec::new())))
        })
        .unwrap()
        .unwrap();
    assert!(outcome.created);
    id
}

fn set_body(store: &ConcurrentStore, ctx: &EditContext, id: &DocId, body: &str) -> UpdateOutcome {
    let directory = Directory::sodermanland();
    store
        .with_doc(id, false, |d| {
            d.edit(ctx, &directory, "body", |e| e.set_body(body)).map_err(StoreError::from)?;
            Ok::<_, StoreError>(((), (Vec::new(), Vec::new())))
        })
        .unwrap()
        .unwrap()
        .1
}

fn body_on_disk(path: &Path, id: &DocId) -> String {
    Store::open(path).unwrap().load(id).unwrap().view().unwrap().body
}

#[test]
fn updates_from_many_threads_are_all_durable_and_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let store = ConcurrentStore::open(&path, 4, ContentLimits::default()).unwrap();
    let ctx = ctx();
    let ids: Vec<DocId> = (0..8).map(|i| create(&store, &ctx, &format!("Dokument {i}"))).collect();
    std::thread::scope(|scope| {
        for (t, id) in ids.iter().enumerate() {
            let store = &store;
            let ctx = ctx.clone();
            scope.spawn(move || {
                for i in 0..40 {
                    set_body(store, &ctx, id, &format!("tråd {t} version {i}"));
                }
            });
        }
    });
    let stats = store.stats();
    assert_eq!(stats.updates, 8 + 8 * 40, "every update was written");
    assert!(stats.commits <= stats.updates);
    drop(store);
    for (t, id) in ids.iter().enumerate() {
        assert_eq!(body_on_disk(&path, id), format!("tråd {t} version 39"));
    }
}

#[test]
fn one_failing_update_in_a_group_leaves_the_others_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let ctx = ctx();
    let store = ConcurrentStore::open(&path, 4, ContentLimits::default()).unwrap();
    let id = create(&store, &ctx, "Avtal");
    drop(store);
    // An update of a document that is not stored, between two good ones.
    let mut writer = Store::open(&path).unwrap();
    let mut doc = writer.load(&id).unwrap();
    let before = doc.heads();
    doc.edit(&ctx, &Directory::sodermanland(), "body", |e| e.set_body("ny text")).unwrap();
    let good = DocWrite::prepare(
        &mut doc,
        &before,
        SizeBefore::Stored(0),
        &ContentLimits::default(),
        Vec::new(),
        Vec::new(),
        None,
    )
    .unwrap();
    let mut missing = good.clone();
    missing.id = DocId::random();
    let results = writer.write_group(&[missing, good]).unwrap();
    assert!(results[0].is_err(), "an update of a document that is not stored fails");
    assert!(results[1].is_ok());
    drop(writer);
    assert_eq!(body_on_disk(&path, &id), "ny text");
}

#[test]
fn reading_a_loaded_document_writes_nothing_and_unknown_ids_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = ConcurrentStore::open(&dir.path().join("relay.db"), 4, ContentLimits::default()).unwrap();
    let ctx = ctx();
    let id = create(&store, &ctx, "Avtal");
    let commits = store.stats().commits;
    for _ in 0..10 {
        let heads = store.with_doc(&id, false, |d| Ok::<_, StoreError>((d.heads(), (Vec::new(), Vec::new()))));
        assert!(heads.unwrap().is_some());
    }
    assert_eq!(store.stats().commits, commits, "generating from a document is a read");
    for _ in 0..100 {
        let found = store.with_doc(&DocId::random(), false, |_| Ok::<_, StoreError>(((), (Vec::new(), Vec::new()))));
        assert!(found.unwrap().is_none());
    }
    // Named with `create` (a peer's sync message for a document nobody holds):
    // still empty afterwards, or refused, nothing is stored and no slot stays.
    for i in 0..100 {
        let named = store.with_doc(&DocId::random(), true, |_| match i % 2 {
            0 => Ok::<_, StoreError>(((), (Vec::new(), Vec::new()))),
            _ => Err(StoreError::CommitFailed("refused by the caller".into())),
        });
        assert_eq!(named.is_ok(), i % 2 == 0);
    }
    assert_eq!(store.stats().commits, commits);
    assert_eq!(store.inner.slots.count(), 1, "only the stored document has a slot");
}

#[test]
fn a_failed_update_stores_nothing_and_the_document_is_reloaded_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let store = ConcurrentStore::open(&path, 4, ContentLimits::default()).unwrap();
    let ctx = ctx();
    let id = create(&store, &ctx, "Avtal");
    set_body(&store, &ctx, &id, "godkänd text");
    let directory = Directory::sodermanland();
    let failed = store.with_doc(&id, false, |d| {
        d.edit(&ctx, &directory, "body", |e| e.set_body("halvfärdig")).map_err(StoreError::from)?;
        Err::<((), Extras), _>(StoreError::CommitFailed("refused by the caller".into()))
    });
    assert!(failed.is_err());
    let body = store.with_doc(&id, false, |d| Ok::<_, StoreError>((d.view().unwrap().body, (Vec::new(), Vec::new()))));
    assert_eq!(body.unwrap().unwrap().0, "godkänd text", "the half-made change was dropped");
    drop(store);
    assert_eq!(body_on_disk(&path, &id), "godkänd text");
}

#[test]
fn increments_are_folded_in_the_background_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let store = ConcurrentStore::open(&path, 4, ContentLimits::default()).unwrap();
    let ctx = ctx();
    let id = create(&store, &ctx, "Avtal");
    for i in 0..300 {
        set_body(&store, &ctx, &id, &format!("version {i}"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.stats().compactions == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(store.stats().compactions > 0, "compaction ran");
    // A compaction request for the last increments may still be queued; what is on disk is complete anyway.
    let rows = Store::open(&path).unwrap().increment_rows(&id).unwrap();
    assert!(rows < 300, "increments were folded ({rows} left)");
    drop(store);
    let reopened = Store::open(&path).unwrap();
    let mut doc = reopened.load(&id).unwrap();
    assert_eq!(doc.view().unwrap().body, "version 299");
    assert_eq!(doc.change_count(), 301);
    assert!(reopened.check().unwrap().is_empty());
}

#[test]
fn loaded_documents_stay_within_the_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let store = ConcurrentStore::open(&dir.path().join("relay.db"), 3, ContentLimits::default()).unwrap();
    let ctx = ctx();
    let ids: Vec<DocId> = (0..10).map(|i| create(&store, &ctx, &format!("Dokument {i}"))).collect();
    for id in &ids {
        set_body(&store, &ctx, id, "text");
        assert!(store.loaded() <= 3, "{} loaded", store.loaded());
    }
    store.evict(&ids[9]);
    assert!(store.loaded() <= 2);
}

#[test]
fn the_index_and_receipts_follow_the_writes() {
    use samverkan_shared::receipt::ApprovalReceipt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let store = ConcurrentStore::open(&path, 4, ContentLimits::default()).unwrap();
    let ctx = ctx();
    let id = create(&store, &ctx, "Avtal");
    let outcome = set_body(&store, &ctx, &id, "text");
    let entry = store.entry(&id).expect("indexed");
    assert_eq!(entry.heads, outcome.heads);
    assert_eq!(entry.parties.to_vec(), Store::open(&path).unwrap().summary(&id).unwrap().unwrap().parties);
    assert!(store.entry(&DocId::random()).is_none());
    assert!(store.receipts(&id).unwrap().is_empty());
    let relay = NodeKey::generate();
    let receipt = ApprovalReceipt::issue(&relay, &id, &"ab".repeat(64), Utc::now()).unwrap();
    assert_eq!(store.add_receipts(std::slice::from_ref(&receipt)).unwrap(), 1);
    assert_eq!(
        store.receipts(&id).unwrap().as_slice(),
        std::slice::from_ref(&receipt),
        "the cached empty list was dropped"
    );
    drop(store);
    let reopened = ConcurrentStore::open(&path, 4, ContentLimits::default()).unwrap();
    assert_eq!(reopened.entry(&id).unwrap(), entry, "the index is read back at open");
}

#[test]
fn documents_with_the_same_parties_share_one_copy_of_them_after_writes_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let ctx = ctx();
    let directory = Directory::sodermanland();
    let police = directory.resolve("Polisområde Södermanland").unwrap().id.clone();
    let both = [ctx.org.clone(), police];
    let shares = |store: &ConcurrentStore, a: &DocId, b: &DocId| {
        let (a, b) = (store.entry(a).unwrap().parties, store.entry(b).unwrap().parties);
        assert_eq!(a, b);
        Arc::ptr_eq(&a, &b)
    };
    let store = ConcurrentStore::open(&path, 4, ContentLimits::default()).unwrap();
    let ids: Vec<DocId> = (0..3).map(|i| create(&store, &ctx, &format!("Löfte {i}"))).collect();
    assert!(shares(&store, &ids[0], &ids[1]) && shares(&store, &ids[1], &ids[2]));
    // A document whose parties change gets the other set; the rest keep theirs.
    for id in &ids[1..] {
        store
            .with_doc(id, false, |d| {
                d.edit(&ctx, &directory, "parties", |e| e.set_parties(&both)).map_err(StoreError::from)?;
                Ok::<_, StoreError>(((), (Vec::new(), Vec::new())))
            })
            .unwrap()
            .unwrap();
    }
    assert_eq!(store.entry(&ids[1]).unwrap().parties.to_vec(), both.to_vec());
    assert_ne!(store.entry(&ids[0]).unwrap().parties, store.entry(&ids[1]).unwrap().parties);
    assert!(shares(&store, &ids[1], &ids[2]));
    let first = store.entry(&ids[0]).unwrap().parties.to_vec();
    drop(store);
    // Read back at the next start: still one copy per set, as stored.
    let store = ConcurrentStore::open(&path, 4, ContentLimits::default()).unwrap();
    assert!(shares(&store, &ids[1], &ids[2]));
    assert_eq!(store.entry(&ids[1]).unwrap().parties.to_vec(), both.to_vec());
    assert_eq!(store.entry(&ids[0]).unwrap().parties.to_vec(), first);
}

/// Snapshots written before schema 8 have no authors' tips: a relay opening
/// such a database works them out in the background, after which those
/// documents are sent whole without loading too; until then, and for a
/// loaded document, `stored_whole` offers nothing (the caller loads).
#[test]
fn snapshots_without_tips_get_them_in_the_background_and_are_then_sent_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.db");
    let ctx = ctx();
    let ids: Vec<DocId> = {
        let store = ConcurrentStore::open(&path, 0, ContentLimits::default()).unwrap();
        let ids: Vec<DocId> = (0..5).map(|i| create(&store, &ctx, &format!("Dokument {i}"))).collect();
        set_body(&store, &ctx, &ids[0], "Ett tillägg efter ögonblicksbilden.");
        assert!(store.stored_whole(&ids[1]).unwrap().is_some(), "written with tips");
        ids
    };
    let damaged = ids[4].clone();
    {
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw.execute("UPDATE snapshots SET tips = NULL", []).unwrap();
        // What migration 8 records on a database that held snapshots.
        raw.execute("INSERT INTO meta (key, value) VALUES ('snapshot_tips', 'to work out')", []).unwrap();
        raw.execute("UPDATE snapshots SET sha256 = x'00' WHERE doc_id = ?1", [damaged.as_str()]).unwrap();
    }
    let store = ConcurrentStore::open(&path, 0, ContentLimits::default()).unwrap();
    let started = Instant::now();
    while ids[..4].iter().any(|id| !matches!(store.stored_whole(id), Ok(Some(_)))) {
        assert!(started.elapsed() < Duration::from_secs(20), "tips were not filled in");
        std::thread::sleep(Duration::from_millis(20));
    }
    let whole = store.stored_whole(&ids[0]).unwrap().unwrap();
    assert_eq!(whole.chunks.len(), 2, "the snapshot and the increment after it");
    assert_eq!(whole.heads, store.entry(&ids[0]).unwrap().heads);
    assert_eq!(store.stored_whole(&damaged).unwrap(), None, "left to loading, which reports the damage");
    assert!(store.with_doc(&damaged, false, |_| Ok::<_, StoreError>(((), (Vec::new(), Vec::new())))).is_err());
    let reader = Store::open(&path).unwrap();
    assert_eq!(reader.snapshots_without_tips().unwrap(), vec![damaged]);
    let started = Instant::now();
    while reader.snapshot_tips_pending().unwrap() {
        assert!(started.elapsed() < Duration::from_secs(20), "not recorded as done");
        std::thread::sleep(Duration::from_millis(20));
    }
}
