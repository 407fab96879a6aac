//! One storage test suite for every [`RelayStorage`]: each test runs against
//! the embedded SQLite storage always, and against PostgreSQL when
//! `SAMVERKAN_TEST_POSTGRES` names a server (a throwaway database per test;
//! `.ci/run` starts one and sets `SAMVERKAN_REQUIRE_POSTGRES`, so CI never
//! skips them). "Another instance" is a second storage opened on the same
//! database: a second process on SQLite, a second relay instance on PostgreSQL.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use automerge::ChangeHash;
use chrono::{TimeZone, Utc};
use samverkan_relay::enrollment::{self, EnrollmentError};
use samverkan_relay::storage::postgres::{self, PostgresStorage, TestDatabase};
use samverkan_relay::storage::{RelayStorage, RemoteEvent, SqliteStorage};
use samverkan_shared::acceptance::ContentLimits;
use samverkan_shared::identity::NodeKey;
use samverkan_shared::ids::DocId;
use samverkan_shared::model::{DocKind, Document, DocumentContent, EditContext};
use samverkan_shared::org::{Directory, OrgId};
use samverkan_shared::receipt::ApprovalReceipt;
use samverkan_store::StoreError;

/// Opens storages on one shared database.
trait Backend {
    type S: RelayStorage;
    fn open(&self) -> Self::S;
}

struct Sqlite(tempfile::TempDir);

impl Backend for Sqlite {
    type S = SqliteStorage;
    fn open(&self) -> SqliteStorage {
        SqliteStorage::open(&self.0.path().join("relay.db"), 8).unwrap()
    }
}

struct Postgres(String);

impl Backend for Postgres {
    type S = PostgresStorage;
    fn open(&self) -> PostgresStorage {
        PostgresStorage::open(&self.0, 8).unwrap()
    }
}

fn sqlite() -> Sqlite {
    Sqlite(tempfile::tempdir().unwrap())
}

/// A fresh PostgreSQL database, or `None` (having said why) when no server is configured.
fn postgres(test: &str) -> Option<Postgres> {
    match postgres::test_database().unwrap_or_else(|e| panic!("{test}: {e}")) {
        TestDatabase::Ready(url) => Some(Postgres(url)),
        TestDatabase::Skipped(why) => {
            let _ = writeln!(std::io::stderr(), "{test} on PostgreSQL: {why}");
            None
        }
    }
}

/// Each test, once per backend.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[test] fn $name() { super::$name(&super::sqlite()) })*
        }
        mod on_postgres {
            $(#[test] fn $name() {
                if let Some(backend) = super::postgres(stringify!($name)) { super::$name(&backend) }
            })*
        }
    };
}

suite!(
    a_stored_document_survives_reopening_with_its_index_entry,
    a_document_not_loaded_is_offered_whole_from_its_stored_bytes,
    a_failed_closure_stores_nothing_and_discards_the_copy,
    a_missing_document_is_none_unless_created,
    signatures_and_receipts_are_stored_with_the_change_and_the_first_receipt_kept,
    saving_sync_states_replaces_the_peers_and_leaves_other_peers_alone,
    node_records_are_kept_per_peer,
    update_meta_is_atomic_across_instances,
    a_refused_meta_update_changes_nothing,
    another_instances_meta_commit_changes_external_changes,
    over_the_content_limits_nothing_is_written,
    a_join_code_is_used_once_across_instances,
    an_open_document_blocks_neither_reads_nor_other_documents,
    with_doc_on_one_document_runs_one_closure_at_a_time,
);

fn org() -> OrgId {
    OrgId::new("trosa-kommun").unwrap()
}

fn ctx() -> EditContext {
    EditContext {
        author: NodeKey::generate().node_id(),
        org: org(),
        node_name: "Trosa".into(),
        time: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
    }
}

/// A new document's bytes (one change), naming Trosa among its parties.
fn new_document() -> (DocId, Vec<u8>) {
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Trosa 2025");
    content.parties = vec![org()];
    let mut doc = Document::create(DocId::random(), content, &ctx(), &Directory::sodermanland()).unwrap();
    (doc.id().clone(), doc.automerge_mut().save())
}

/// Stores a new document through `with_doc(create)`; returns its id and heads.
fn store_new<S: RelayStorage>(storage: &mut S) -> (DocId, Vec<ChangeHash>) {
    let (id, bytes) = new_document();
    let heads = storage
        .with_doc(&id, true, |d| {
            d.automerge_mut().load_incremental(&bytes).map_err(|e| StoreError::Model(e.into()))?;
            Ok::<_, StoreError>((d.heads(), Vec::new(), Vec::new()))
        })
        .unwrap()
        .unwrap();
    (id, heads)
}

/// One edit of the body; returns the heads after it.
fn edit<S: RelayStorage>(storage: &mut S, id: &DocId, body: &str) -> Vec<ChangeHash> {
    let (ctx, directory) = (ctx(), Directory::sodermanland());
    storage
        .with_doc(id, false, |d| {
            d.edit(&ctx, &directory, "body", |e| e.set_body(body)).map_err(StoreError::from)?;
            Ok::<_, StoreError>((d.heads(), Vec::new(), Vec::new()))
        })
        .unwrap()
        .unwrap()
}

fn body<S: RelayStorage>(storage: &mut S, id: &DocId) -> String {
    storage.with_doc(id, false, |d| Ok::<_, StoreError>((d.view()?.body, Vec::new(), Vec::new()))).unwrap().unwrap()
}

/// A document this instance does not hold loaded is offered whole from its
/// stored bytes (snapshot and increments, heads, the authors' tips covering
/// them), which load into the document as stored; one held loaded is not
/// (it is sent from memory).
fn a_document_not_loaded_is_offered_whole_from_its_stored_bytes<B: Backend>(backend: &B) {
    let mut storage = backend.open();
    let (id, _) = store_new(&mut storage);
    let mut heads = Vec::new();
    for n in 0..3 {
        heads = edit(&mut storage, &id, &format!("Text {n}"));
    }
    assert_eq!(storage.stored_whole(&id).unwrap(), None, "loaded here: sent from memory");
    let other = backend.open();
    let whole = other.stored_whole(&id).unwrap().expect("offered whole");
    assert_eq!(whole.heads, heads);
    assert!(whole.chunks.len() > 1, "the snapshot and the increments after it");
    let mut read = automerge::AutoCommit::load(&whole.chunks.concat()).unwrap();
    assert_eq!(read.get_heads(), heads);
    for tip in samverkan_shared::sync::document_tips(&mut read) {
        assert!(whole.tips.contains(&tip), "{tip:?} is not covered");
    }
    assert_eq!(other.stored_whole(&DocId::random()).unwrap(), None);
}

fn a_stored_document_survives_reopening_with_its_index_entry<B: Backend>(backend: &B) {
    let (id, heads) = {
        let mut storage = backend.open();
        let (id, _) = store_new(&mut storage);
        let heads = edit(&mut storage, &id, "Första stycket åäö");
        (id, heads)
    };
    let mut storage = backend.open();
    let entry = storage.entry(&id).unwrap().expect("stored");
    assert_eq!((entry.heads.clone(), entry.parties.to_vec()), (heads, vec![org()]));
    assert_eq!(storage.index().unwrap(), vec![entry]);
    assert_eq!(body(&mut storage, &id), "Första stycket åäö");
}

fn a_failed_closure_stores_nothing_and_discards_the_copy<B: Backend>(backend: &B) {
    let mut storage = backend.open();
    let (id, heads) = store_new(&mut storage);
    let (ctx, directory) = (ctx(), Directory::sodermanland());
    let failed: Result<Option<()>, StoreError> = storage.with_doc(&id, false, |d| {
        d.edit(&ctx, &directory, "body", |e| e.set_body("never stored"))?;
        Err(StoreError::NotFound(DocId::random()))
    });
    assert!(failed.is_err());
    assert_eq!(storage.entry(&id).unwrap().unwrap().heads, heads);
    assert_eq!(body(&mut storage, &id), "", "the edited in-memory copy was discarded");
    assert_eq!(backend.open().entry(&id).unwrap().unwrap().heads, heads);

    // A new document whose closure fails is not stored at all.
    let (new_id, bytes) = new_document();
    let failed: Result<Option<()>, StoreError> = storage.with_doc(&new_id, true, |d| {
        d.automerge_mut().load_incremental(&bytes).map_err(|e| StoreError::Model(e.into()))?;
        Err(StoreError::NotFound(new_id.clone()))
    });
    assert!(failed.is_err());
    assert!(storage.entry(&new_id).unwrap().is_none());
}

fn a_missing_document_is_none_unless_created<B: Backend>(backend: &B) {
    let storage = backend.open();
    let missing = DocId::random();
    let ran = storage.with_doc(&missing, false, |_| Ok::<_, StoreError>(((), Vec::new(), Vec::new()))).unwrap();
    assert!(ran.is_none());
    // Created but left empty: nothing is stored.
    let ran = storage.with_doc(&missing, true, |_| Ok::<_, StoreError>(((), Vec::new(), Vec::new()))).unwrap();
    assert!(ran.is_some());
    assert!(storage.entry(&missing).unwrap().is_none());
    assert!(storage.index().unwrap().is_empty());
}

fn signatures_and_receipts_are_stored_with_the_change_and_the_first_receipt_kept<B: Backend>(backend: &B) {
    let mut storage = backend.open();
    let (id, _) = store_new(&mut storage);
    let relay = NodeKey::generate();
    let (ctx, directory) = (ctx(), Directory::sodermanland());
    let first = ApprovalReceipt::issue(&relay, &id, &hex::encode([0xa1u8; 64]), Utc::now()).unwrap();
    let heads = storage
        .with_doc(&id, false, |d| {
            d.edit(&ctx, &directory, "body", |e| e.set_body("signerad")).map_err(StoreError::from)?;
            let heads = d.heads();
            Ok::<_, StoreError>((heads.clone(), vec![(heads[0], [7u8; 64])], vec![first.clone()]))
        })
        .unwrap()
        .unwrap();
    let unknown = ChangeHash([9u8; 32]);
    assert_eq!(storage.signatures(&[unknown, heads[0]]).unwrap(), vec![(heads[0], [7u8; 64])]);
    assert_eq!(storage.receipts(&id).unwrap(), vec![first.clone()]);

    let later =
        ApprovalReceipt::issue(&relay, &id, &hex::encode([0xa1u8; 64]), Utc::now() + chrono::Duration::seconds(5))
            .unwrap();
    let other = ApprovalReceipt::issue(&relay, &id, &hex::encode([0xb2u8; 64]), Utc::now()).unwrap();
    assert_eq!(storage.add_receipts(&[later, other.clone()]).unwrap(), 1, "only record-b is new");
    let receipts = backend.open().receipts(&id).unwrap();
    assert_eq!(receipts, vec![first, other]);
    for receipt in &receipts {
        receipt.verify(&relay.node_id()).unwrap();
    }
}

fn saving_sync_states_replaces_the_peers_and_leaves_other_peers_alone<B: Backend>(backend: &B) {
    let storage = backend.open();
    let (a, b, c) = (DocId::random(), DocId::random(), DocId::random());
    storage.save_sync_states("p", vec![(a.clone(), vec![1]), (b.clone(), vec![2])]).unwrap();
    storage.save_sync_states("q", vec![(a.clone(), vec![3])]).unwrap();
    storage.save_sync_states("p", vec![(c.clone(), vec![4]), (a.clone(), vec![5])]).unwrap();
    let mut p = backend.open().sync_states("p").unwrap();
    p.sort();
    let mut want = vec![(a.clone(), vec![5]), (c, vec![4])];
    want.sort();
    assert_eq!(p, want);
    assert_eq!(storage.sync_states("q").unwrap(), vec![(a, vec![3])]);
    assert_eq!(storage.peers().unwrap(), vec!["p".to_string(), "q".to_string()]);
    storage.save_sync_states("p", Vec::new()).unwrap();
    assert!(storage.sync_states("p").unwrap().is_empty());
}

fn node_records_are_kept_per_peer<B: Backend>(backend: &B) {
    let storage = backend.open();
    storage.save_node_record("a", "{\"seen\":1}").unwrap();
    storage.save_node_record("b", "{\"seen\":2}").unwrap();
    storage.save_node_record("a", "{\"seen\":3}").unwrap();
    let records = backend.open().node_records().unwrap();
    assert_eq!(records, vec![("a".into(), "{\"seen\":3}".into()), ("b".into(), "{\"seen\":2}".into())]);
}

fn update_meta_is_atomic_across_instances<B: Backend + Sync>(backend: &B) {
    const PER_THREAD: usize = 25;
    let barrier = Barrier::new(3);
    // Opened one after another: a storage that failed to open inside a thread
    // would leave the others at the barrier for ever.
    let storages: Vec<B::S> = (0..3).map(|_| backend.open()).collect();
    std::thread::scope(|s| {
        for storage in &storages {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                for _ in 0..PER_THREAD {
                    storage
                        .update_meta("counter", |v| {
                            let n: usize = v.map(|v| v.parse().unwrap()).unwrap_or(0);
                            Ok::<_, StoreError>(Some((n + 1).to_string()))
                        })
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(backend.open().meta("counter").unwrap(), Some((3 * PER_THREAD).to_string()), "no update was lost");
}

fn a_refused_meta_update_changes_nothing<B: Backend>(backend: &B) {
    let storage = backend.open();
    assert_eq!(storage.update_meta("k", |_| Ok::<_, StoreError>(Some("1".into()))).unwrap(), Some("1".into()));
    let refused = storage.update_meta("k", |_| Err::<Option<String>, _>(StoreError::NotFound(DocId::random())));
    assert!(refused.is_err());
    assert_eq!(storage.update_meta("k", |_| Ok::<_, StoreError>(None)).unwrap(), None);
    assert_eq!(backend.open().meta("k").unwrap(), Some("1".into()));
}

fn another_instances_meta_commit_changes_external_changes<B: Backend>(backend: &B) {
    let ours = backend.open();
    let before = ours.external_changes().unwrap();
    assert!(before.is_some(), "both backends can tell");
    let theirs = backend.open();
    theirs.update_meta("relay.enrollment", |_| Ok::<_, StoreError>(Some("{}".into()))).unwrap();
    assert_ne!(ours.external_changes().unwrap(), before);
}

fn a_cached_copy_sees_what_another_instance_wrote_and_compacted<B: Backend>(backend: &B) {
    let mut ours = backend.open();
    let (id, _) = store_new(&mut ours);
    assert_eq!(body(&mut ours, &id), "");
    assert_eq!(ours.loaded(), 1);
    let mut theirs = backend.open();
    edit(&mut theirs, &id, "one edit");
    assert_eq!(body(&mut ours, &id), "one edit");
    // Enough edits to fold the increments into a new snapshot, twice.
    let mut heads = Vec::new();
    for i in 0..150 {
        heads = edit(&mut theirs, &id, &format!("edit {i}"));
    }
    assert_eq!(body(&mut ours, &id), "edit 149");
    assert_eq!(ours.entry(&id).unwrap().unwrap().heads, heads);
    // And the other way round, on top of what the cache holds.
    let ours_heads = edit(&mut ours, &id, "ours again");
    assert_eq!(body(&mut theirs, &id), "ours again");
    assert_eq!(theirs.entry(&id).unwrap().unwrap().heads, ours_heads);
    ours.evict(&id);
    assert_eq!(ours.loaded(), 0);
}

fn over_the_content_limits_nothing_is_written<B: Backend>(backend: &B) {
    let mut storage = backend.open();
    let (id, heads) = store_new(&mut storage);
    storage.set_content_limits(ContentLimits { max_change_bytes: 2_000, max_document_bytes: 100_000 });
    let (ctx, directory) = (ctx(), Directory::sodermanland());
    let big: String = (0..4_000).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
    let refused = storage.with_doc(&id, false, |d| {
        d.edit(&ctx, &directory, "body", |e| e.set_body(&big)).map_err(StoreError::from)?;
        Ok::<_, StoreError>(((), Vec::new(), Vec::new()))
    });
    assert!(matches!(refused, Err(StoreError::TooLarge(_))), "{refused:?}");
    assert_eq!(storage.entry(&id).unwrap().unwrap().heads, heads);
    assert_eq!(body(&mut storage, &id), "");
}

fn a_join_code_is_used_once_across_instances<B: Backend + Sync>(backend: &B) {
    let now = Utc::now();
    let flen = OrgId::new("flen-kommun").unwrap();
    let secret = enrollment::issue_join(&backend.open(), flen, "Flen", chrono::Duration::hours(1), now).unwrap();
    let barrier = Barrier::new(4);
    let outcomes = Mutex::new(Vec::new());
    let storages: Vec<B::S> = (0..4).map(|_| backend.open()).collect();
    std::thread::scope(|s| {
        for storage in &storages {
            let (barrier, outcomes, secret) = (&barrier, &outcomes, &secret);
            s.spawn(move || {
                let key = NodeKey::generate().node_id();
                barrier.wait();
                let outcome = enrollment::consume_join(storage, secret, key, "flen-kommun", Utc::now());
                outcomes.lock().unwrap().push(outcome);
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap();
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{outcomes:?}");
    assert!(outcomes.iter().filter(|o| o.is_err()).all(|o| matches!(o, Err(EnrollmentError::UnknownJoinCode))));
    assert_eq!(enrollment::directory(&backend.open()).unwrap().members.len(), 1);
}

/// How long a test waits for another thread before it fails (a bound, never a measurement).
const LIMIT: Duration = Duration::from_secs(20);

fn an_open_document_blocks_neither_reads_nor_other_documents<B: Backend + Sync>(backend: &B) {
    let mut storage = backend.open();
    let (held, held_heads) = store_new(&mut storage);
    let (other, _) = store_new(&mut storage);
    storage.update_meta("k", |_| Ok::<_, StoreError>(Some("v".into()))).unwrap();
    let storage = storage;
    let (ctx, directory) = (ctx(), Directory::sodermanland());
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::scope(|s| {
        let (storage, held_id, other, ctx, directory) = (&storage, &held, &other, &ctx, &directory);
        let holder = s.spawn(move || {
            storage.with_doc(held_id, false, |d| {
                entered_tx.send(()).unwrap();
                // Blocked until the test has seen the other thread through (bounded).
                let released = release_rx.recv_timeout(LIMIT).is_ok();
                d.edit(ctx, directory, "body", |e| e.set_body("held")).map_err(StoreError::from)?;
                Ok::<_, StoreError>((released, Vec::new(), Vec::new()))
            })
        });
        entered_rx.recv_timeout(LIMIT).expect("the first closure runs");
        s.spawn(move || {
            let answers = (|| -> Result<_, StoreError> {
                let edited = storage.with_doc(other, false, |d| {
                    d.edit(ctx, directory, "body", |e| e.set_body("other")).map_err(StoreError::from)?;
                    Ok::<_, StoreError>((d.heads(), Vec::new(), Vec::new()))
                })?;
                let index = storage.index()?.len();
                let held_entry = storage.entry(held_id)?.map(|e| e.heads);
                let other_entry = storage.entry(other)?.map(|e| e.heads);
                Ok((edited, index, held_entry, other_entry, storage.meta("k")?))
            })();
            let _ = done_tx.send(answers);
        });
        let answers = done_rx.recv_timeout(LIMIT);
        // Released whatever happened, so every thread ends.
        let _ = release_tx.send(());
        let held_result = holder.join().unwrap();
        let (edited, index, held_entry, other_entry, meta) =
            answers.expect("the other document and the reads finished while the first closure was held").unwrap();
        assert_eq!(edited.clone(), other_entry, "the other document's edit was stored");
        assert!(edited.is_some());
        assert_eq!(index, 2);
        assert_eq!(held_entry, Some(held_heads.clone()), "the held document's entry is as before its open transaction");
        assert_eq!(meta, Some("v".into()));
        assert_eq!(held_result.unwrap(), Some(true), "the held closure was released, not timed out");
    });
    assert_ne!(storage.entry(&held).unwrap().unwrap().heads, held_heads, "the held document's edit was stored");
    assert_eq!(backend.open().index().unwrap().len(), 2);
}

fn with_doc_on_one_document_runs_one_closure_at_a_time<B: Backend + Sync>(backend: &B) {
    const THREADS: usize = 4;
    const EDITS: usize = 8;
    let mut storage = backend.open();
    let (id, _) = store_new(&mut storage);
    let storage = storage;
    let inside = AtomicBool::new(false);
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (storage, inside, barrier, id) = (&storage, &inside, &barrier, &id);
            s.spawn(move || {
                let (ctx, directory) = (ctx(), Directory::sodermanland());
                barrier.wait();
                for i in 0..EDITS {
                    storage
                        .with_doc(id, false, |d| {
                            assert!(!inside.swap(true, Ordering::SeqCst), "two closures ran on one document at once");
                            let edited = d.edit(&ctx, &directory, "body", |e| e.set_body(&format!("{t}.{i}")));
                            inside.store(false, Ordering::SeqCst);
                            edited.map_err(StoreError::from)?;
                            Ok::<_, StoreError>(((), Vec::new(), Vec::new()))
                        })
                        .unwrap()
                        .unwrap();
                }
            });
        }
    });
    // Every edit was stored on top of the one before: one head, every change kept.
    let changes = backend
        .open()
        .with_doc(&id, false, |d| {
            Ok::<_, StoreError>(((d.heads().len(), d.automerge_mut().get_changes(&[]).len()), Vec::new(), Vec::new()))
        })
        .unwrap()
        .unwrap();
    assert_eq!(changes.0, 1, "edits made one after another leave one head");
    assert_eq!(changes.1, 1 + THREADS * EDITS);
}

// PostgreSQL only: what several instances tell each other.

/// Waits (bounded) until `events` holds one matching `want`.
fn wait_for(events: &Mutex<Vec<RemoteEvent>>, want: impl Fn(&RemoteEvent) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if events.lock().unwrap().iter().any(&want) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn postgres_instances_hear_each_others_document_and_directory_commits() {
    let Some(backend) = postgres("postgres_instances_hear_each_others_document_and_directory_commits") else {
        return;
    };
    let mut ours = backend.open();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    assert!(ours.watch_remote(Arc::new(move |e| sink.lock().unwrap().push(e))).unwrap());
    let mut theirs = backend.open();
    let (id, _) = store_new(&mut theirs);
    assert!(wait_for(&events, |e| *e == RemoteEvent::DocChanged(id.clone())), "{:?}", events.lock().unwrap());
    enrollment::issue_join(&theirs, org(), "Trosa", chrono::Duration::hours(1), Utc::now()).unwrap();
    assert!(wait_for(&events, |e| *e == RemoteEvent::MetaChanged));
    // Its own commits are not news to an instance.
    events.lock().unwrap().clear();
    edit(&mut ours, &id, "ours");
    std::thread::sleep(Duration::from_millis(300));
    assert!(events.lock().unwrap().is_empty(), "{:?}", events.lock().unwrap());
}

/// Several instances writing one document's history share PostgreSQL only: an
/// embedded SQLite file has one relay process (`serve` holds the data
/// directory's lock; the operator's `enroll`/`revoke` write metadata only), so
/// its documents stay loaded without a look at the database per message.
#[test]
fn postgres_a_cached_copy_sees_what_another_instance_wrote_and_compacted() {
    let Some(backend) = postgres("postgres_a_cached_copy_sees_what_another_instance_wrote_and_compacted") else {
        return;
    };
    a_cached_copy_sees_what_another_instance_wrote_and_compacted(&backend);
}

#[test]
fn postgres_the_per_key_limit_holds_across_instances() {
    let Some(backend) = postgres("postgres_the_per_key_limit_holds_across_instances") else { return };
    let first = backend.open();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    first.watch_remote(Arc::new(move |e| sink.lock().unwrap().push(e))).unwrap();
    let second = backend.open();
    second.watch_remote(Arc::new(|_| {})).unwrap();
    assert_eq!(first.connection_opened("node-a", 1, 2).unwrap(), Some(vec![]));
    assert_eq!(second.connection_opened("node-b", 1, 2).unwrap(), Some(vec![]));
    assert_eq!(second.connection_opened("node-a", 7, 2).unwrap(), Some(vec![]));
    // A third connection of node-a: the oldest, on the first instance, is asked to close.
    assert_eq!(second.connection_opened("node-a", 8, 2).unwrap(), Some(vec![]));
    assert!(wait_for(&events, |e| matches!(e, RemoteEvent::Close { conn: 1, .. })), "{:?}", events.lock().unwrap());
    // A fourth, now on the first instance: the second's oldest (7) goes.
    second.connection_closed(8).unwrap();
    assert_eq!(first.connection_opened("node-a", 2, 1).unwrap(), Some(vec![]));
    // Local ones beyond the limit are returned to close here.
    assert_eq!(first.connection_opened("node-a", 3, 1).unwrap(), Some(vec![2]));
}

#[test]
fn postgres_a_newer_schema_is_refused_and_migrating_twice_is_harmless() {
    let Some(backend) = postgres("postgres_a_newer_schema_is_refused_and_migrating_twice_is_harmless") else {
        return;
    };
    let storage = backend.open();
    assert_eq!(storage.schema_version().unwrap(), postgres::SCHEMA_VERSION);
    drop(backend.open());
    // Pretend a newer relay migrated the database.
    let url = backend.0.clone();
    std::thread::spawn(move || {
        let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        client.execute("UPDATE samverkan_schema SET version = version + 1", &[]).unwrap();
    })
    .join()
    .unwrap();
    let refused = PostgresStorage::open(&backend.0, 8).unwrap_err();
    assert!(refused.to_string().contains("upgrade samverkan-relay"), "{refused}");
}

/// Opens an instance that listens for the others' commits; returns it and what it heard.
fn listening(backend: &Postgres) -> (PostgresStorage, Arc<Mutex<Vec<RemoteEvent>>>) {
    let storage = backend.open();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    assert!(storage.watch_remote(Arc::new(move |e| sink.lock().unwrap().push(e))).unwrap());
    (storage, events)
}

/// A listening instance serves read-only steps from its loaded copy and its
/// index in memory, without a database round trip; once another instance's
/// change was notified, its next read-only step and its index see that change,
/// never the copy it held before.
#[test]
fn postgres_after_another_instances_notification_the_next_read_only_step_sees_its_change() {
    let Some(backend) =
        postgres("postgres_after_another_instances_notification_the_next_read_only_step_sees_its_change")
    else {
        return;
    };
    let (mut ours, events) = listening(&backend);
    let mut theirs = backend.open();
    let (id, _) = store_new(&mut theirs);
    assert!(wait_for(&events, |e| *e == RemoteEvent::DocChanged(id.clone())));
    assert_eq!(body(&mut ours, &id), "");
    assert_eq!(ours.loaded(), 1);
    for i in 0..3 {
        events.lock().unwrap().clear();
        let heads = edit(&mut theirs, &id, &format!("theirs {i}"));
        assert!(wait_for(&events, |e| *e == RemoteEvent::DocChanged(id.clone())), "{:?}", events.lock().unwrap());
        assert_eq!(body(&mut ours, &id), format!("theirs {i}"), "the loaded copy was brought up to date");
        assert_eq!(ours.entry(&id).unwrap().unwrap().heads, heads);
        assert_eq!(ours.index().unwrap().iter().find(|e| e.id == id).unwrap().heads, heads);
    }
    // Its own writes are current in its caches at once.
    let heads = edit(&mut ours, &id, "ours");
    assert_eq!(ours.entry(&id).unwrap().unwrap().heads, heads);
    assert_eq!(body(&mut theirs, &id), "ours");
    // While nothing changes, read-only steps and the index, receipts and
    // signatures a step reads cost no database round trip.
    ours.receipts(&id).unwrap();
    let calls = ours.database_calls();
    for _ in 0..10 {
        assert_eq!(body(&mut ours, &id), "ours");
        assert_eq!(ours.entry(&id).unwrap().unwrap().heads, heads);
        assert_eq!(ours.index().unwrap().len(), 1);
        assert!(ours.receipts(&id).unwrap().is_empty());
        assert!(ours.signatures(&[]).unwrap().is_empty());
        assert_eq!(ours.entry(&DocId::random()).unwrap(), None, "a document not stored is known not to be");
    }
    assert_eq!(ours.database_calls(), calls);
}

/// A change another instance commits while this one's closure runs (this
/// instance holds only its own slot then, not the database lock) is applied
/// under the lock before this one's change is written: both survive, also
/// when the other instance compacted the document meanwhile.
#[test]
fn postgres_changes_written_meanwhile_by_another_instance_are_merged_not_lost() {
    let Some(backend) = postgres("postgres_changes_written_meanwhile_by_another_instance_are_merged_not_lost") else {
        return;
    };
    let (ours, events) = listening(&backend);
    let mut theirs = backend.open();
    let (id, _) = store_new(&mut theirs);
    // A document another instance created is known here once its notification is in.
    assert!(wait_for(&events, |e| *e == RemoteEvent::DocChanged(id.clone())));
    let (ctx, directory) = (ctx(), Directory::sodermanland());
    for meanwhile in [1, 70] {
        let heads = ours
            .with_doc(&id, false, |d| {
                for i in 0..meanwhile {
                    edit(&mut theirs, &id, &format!("theirs {i}"));
                }
                d.edit(&ctx, &directory, "title", |e| e.set_title(&format!("ours after {meanwhile}")))
                    .map_err(StoreError::from)?;
                Ok::<_, StoreError>((d.heads(), Vec::new(), Vec::new()))
            })
            .unwrap()
            .unwrap();
        let (view, stored_heads) = backend
            .open()
            .with_doc(&id, false, |d| Ok::<_, StoreError>(((d.view()?, d.heads()), Vec::new(), Vec::new())))
            .unwrap()
            .unwrap();
        assert_eq!(view.body, format!("theirs {}", meanwhile - 1), "the other instance's edits survive");
        assert_eq!(view.title, format!("ours after {meanwhile}"), "this instance's edit survives");
        assert_eq!(ours.entry(&id).unwrap().unwrap().heads, stored_heads);
        assert_ne!(heads, stored_heads, "the closure ran on the copy from before the other's edits");
    }
}

/// The parties another instance added while this one edited the body from
/// its older copy are the stored parties afterwards (what access control
/// reads), though the body edit alone would not have them read again.
#[test]
fn postgres_parties_changed_meanwhile_by_another_instance_are_the_stored_parties() {
    let Some(backend) = postgres("postgres_parties_changed_meanwhile_by_another_instance_are_the_stored_parties")
    else {
        return;
    };
    let (mut ours, events) = listening(&backend);
    let mut theirs = backend.open();
    let (id, _) = store_new(&mut theirs);
    assert!(wait_for(&events, |e| *e == RemoteEvent::DocChanged(id.clone())));
    let (ctx, directory) = (ctx(), Directory::sodermanland());
    let (county, other) = (OrgId::new("lansstyrelsen-sodermanland").unwrap(), self::ctx());
    // Written here first: this instance's copy has its stored fields read.
    edit(&mut ours, &id, "ours, first");
    ours.with_doc(&id, false, |d| {
        theirs
            .with_doc(&id, false, |t| {
                let mut parties = t.parties()?;
                parties.push(county.clone());
                t.edit(&other, &directory, "parties", |e| e.set_parties(&parties)).map_err(StoreError::from)?;
                Ok::<_, StoreError>(((), Vec::new(), Vec::new()))
            })
            .unwrap();
        d.edit(&ctx, &directory, "body", |e| e.set_body("ours, second")).map_err(StoreError::from)?;
        Ok::<_, StoreError>(((), Vec::new(), Vec::new()))
    })
    .unwrap()
    .unwrap();
    assert!(ours.entry(&id).unwrap().unwrap().parties.contains(&county), "the other instance's party is stored");
    assert!(ours.is_party(&id, &county).unwrap().unwrap());
}

/// Two listening instances writing one document at once: every change of
/// both is stored, and both end with the same heads.
#[test]
fn postgres_concurrent_writes_on_two_instances_to_one_document_all_survive() {
    const EDITS: usize = 20;
    let Some(backend) = postgres("postgres_concurrent_writes_on_two_instances_to_one_document_all_survive") else {
        return;
    };
    let (mut first, _) = listening(&backend);
    let (second, events) = listening(&backend);
    let (id, _) = store_new(&mut first);
    assert!(wait_for(&events, |e| *e == RemoteEvent::DocChanged(id.clone())));
    let barrier = Barrier::new(2);
    // The change each edit made (a merge of concurrent text edits can leave a
    // later edit with nothing to change, so changes are followed, not counted).
    let made = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for (n, storage) in [&first, &second].into_iter().enumerate() {
            let (barrier, id, made) = (&barrier, &id, &made);
            s.spawn(move || {
                let (ctx, directory) = (ctx(), Directory::sodermanland());
                barrier.wait();
                for i in 0..EDITS {
                    let new = storage
                        .with_doc(id, false, |d| {
                            let before = d.heads();
                            d.edit(&ctx, &directory, "body", |e| e.set_body(&format!("{n}.{i}")))
                                .map_err(StoreError::from)?;
                            let new: Vec<ChangeHash> = d.heads().into_iter().filter(|h| !before.contains(h)).collect();
                            Ok::<_, StoreError>((new, Vec::new(), Vec::new()))
                        })
                        .unwrap()
                        .unwrap();
                    made.lock().unwrap().extend(new);
                }
            });
        }
    });
    let made = made.into_inner().unwrap();
    assert!(made.len() > EDITS, "both instances made changes: {}", made.len());
    let count = |storage: &PostgresStorage| {
        storage
            .with_doc(&id, false, |d| {
                Ok::<_, StoreError>(((d.heads(), d.automerge_mut().get_changes(&[]).len()), Vec::new(), Vec::new()))
            })
            .unwrap()
            .unwrap()
    };
    let (stored_heads, stored) = count(&backend.open());
    assert_eq!(stored, 1 + made.len(), "every change of both instances is stored");
    let missing = backend
        .open()
        .with_doc(&id, false, |d| {
            let missing = made.iter().filter(|h| d.automerge_mut().get_change_by_hash(h).is_none()).count();
            Ok::<_, StoreError>((missing, Vec::new(), Vec::new()))
        })
        .unwrap()
        .unwrap();
    assert_eq!(missing, 0, "every change of both instances is stored");
    // Each instance's copy reaches what is stored once the other's last notification is in (bounded wait).
    for storage in [&first, &second] {
        let deadline = Instant::now() + LIMIT;
        while count(storage) != (stored_heads.clone(), stored) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(count(storage), (stored_heads.clone(), stored));
        assert_eq!(storage.entry(&id).unwrap().unwrap().heads, stored_heads);
    }
}

// The reads from memory a connection makes on the async runtime's thread
// (`cached_is_party`, `try_with_loaded`, `cached_receipts`,
// `cached_signatures`): never a wait, never a stale or unwritten answer.

/// An edit storing a signature of its change and a receipt; returns the heads and the receipt.
fn signed_edit<S: RelayStorage>(storage: &S, id: &DocId, body: &str) -> (Vec<ChangeHash>, ApprovalReceipt) {
    let (ctx, directory) = (ctx(), Directory::sodermanland());
    let record = hex::encode([rand::random::<[u8; 32]>(), rand::random::<[u8; 32]>()].concat());
    let receipt = ApprovalReceipt::issue(&NodeKey::generate(), id, &record, Utc::now()).unwrap();
    let heads = storage
        .with_doc(id, false, |d| {
            d.edit(&ctx, &directory, "body", |e| e.set_body(body)).map_err(StoreError::from)?;
            let heads = d.heads();
            Ok::<_, StoreError>((heads.clone(), vec![(heads[0], [7u8; 64])], vec![receipt.clone()]))
        })
        .unwrap()
        .unwrap();
    (heads, receipt)
}

/// Reads through the full path what the memory path answers from (the
/// loaded copy, the index entry, the receipts): as a connection's storage step does.
fn read_fully<S: RelayStorage>(storage: &S, id: &DocId) {
    storage.with_doc(id, false, |_| Ok::<_, StoreError>(((), Vec::new(), Vec::new()))).unwrap().unwrap();
    storage.is_party(id, &org()).unwrap().unwrap();
    storage.receipts(id).unwrap();
}

/// A closure run from memory that would change the document (it may only
/// generate a message or take an acknowledgement) gets `None`; the copy it
/// changed is dropped, so nothing unwritten is served, and the document is
/// read again as stored.
fn a_closure_from_memory_that_would_change_the_document_leaves_nothing_unwritten<S: RelayStorage>(storage: &mut S) {
    let (id, heads) = store_new(storage);
    read_fully(storage, &id);
    assert_eq!(storage.try_with_loaded(&id, |d| d.heads()), Some(heads.clone()), "loaded and free");
    let (ctx, directory) = (ctx(), Directory::sodermanland());
    let changed = storage.try_with_loaded(&id, |d| {
        d.edit(&ctx, &directory, "body", |e| e.set_body("never stored")).unwrap();
        d.heads()
    });
    assert_eq!(changed, None, "a change made from memory is not answered");
    assert_eq!(storage.try_with_loaded(&id, |d| d.heads()), None, "and the changed copy is gone");
    assert_eq!(body(storage, &id), "", "the document as stored");
    assert_eq!(storage.entry(&id).unwrap().unwrap().heads, heads);
    assert_eq!(storage.try_with_loaded(&id, |d| d.heads()), Some(heads));
}

/// While another thread holds a document (its slot), the memory path says
/// `None` at once instead of waiting; the other reads still answer.
fn a_busy_document_is_none_from_memory_without_waiting<S: RelayStorage + Sync>(storage: &mut S) {
    let (id, heads) = store_new(storage);
    read_fully(storage, &id);
    let storage = &*storage;
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let id = &id;
        let holder = s.spawn(move || {
            storage.with_doc(id, false, |_| {
                entered_tx.send(()).unwrap();
                let released = release_rx.recv_timeout(LIMIT).is_ok();
                Ok::<_, StoreError>((released, Vec::new(), Vec::new()))
            })
        });
        entered_rx.recv_timeout(LIMIT).expect("the holder runs");
        let asked = Instant::now();
        let busy = storage.try_with_loaded(id, |d| d.heads());
        let waited = asked.elapsed();
        let party = storage.cached_is_party(id, &org());
        let _ = release_tx.send(());
        assert_eq!(holder.join().unwrap().unwrap(), Some(true), "the holder was released, not timed out");
        assert_eq!(busy, None, "a busy document is not waited for");
        assert!(waited < Duration::from_secs(1), "answered at once, not after the holder: {waited:?}");
        assert_eq!(party, Some(Some(true)), "the index in memory does not wait for the document");
    });
    assert_eq!(storage.try_with_loaded(&id, |d| d.heads()), Some(heads), "free again");
}

#[test]
fn sqlite_a_closure_from_memory_that_would_change_the_document_leaves_nothing_unwritten() {
    a_closure_from_memory_that_would_change_the_document_leaves_nothing_unwritten(&mut sqlite().open());
}

#[test]
fn postgres_a_closure_from_memory_that_would_change_the_document_leaves_nothing_unwritten() {
    let test = "postgres_a_closure_from_memory_that_would_change_the_document_leaves_nothing_unwritten";
    let Some(backend) = postgres(test) else { return };
    a_closure_from_memory_that_would_change_the_document_leaves_nothing_unwritten(&mut listening(&backend).0);
}

#[test]
fn sqlite_a_busy_document_is_none_from_memory_without_waiting() {
    a_busy_document_is_none_from_memory_without_waiting(&mut sqlite().open());
}

#[test]
fn postgres_a_busy_document_is_none_from_memory_without_waiting() {
    let Some(backend) = postgres("postgres_a_busy_document_is_none_from_memory_without_waiting") else { return };
    a_busy_document_is_none_from_memory_without_waiting(&mut listening(&backend).0);
}

/// What a listening instance answers from memory, each at no database call:
/// the party check, the loaded copy's heads, the receipts and the signatures of `id`.
#[allow(clippy::type_complexity)]
fn from_memory(
    storage: &PostgresStorage,
    id: &DocId,
    signed: ChangeHash,
) -> (Option<Option<bool>>, Option<Vec<ChangeHash>>, Option<Vec<ApprovalReceipt>>, Option<usize>) {
    let calls = storage.database_calls();
    let answers = (
        storage.cached_is_party(id, &org()),
        storage.try_with_loaded(id, |d| d.heads()),
        storage.cached_receipts(id).map(|r| r.as_ref().clone()),
        storage.cached_signatures(&[signed]).map(|s| s.len()),
    );
    assert_eq!(storage.database_calls(), calls, "the memory path never goes to the database");
    answers
}

/// While nothing changes, a listening instance answers the memory path for
/// every document it has read, without a database call. Once another
/// instance's change of a document is notified, that document's answers are
/// `None` (the full path runs) until it is read again, then the new version;
/// other documents keep theirs.
#[test]
fn postgres_reads_from_memory_are_free_while_current_and_none_after_another_instances_change() {
    let test = "postgres_reads_from_memory_are_free_while_current_and_none_after_another_instances_change";
    let Some(backend) = postgres(test) else { return };
    let (mut ours, events) = listening(&backend);
    let mut theirs = backend.open();
    let (id, _) = store_new(&mut ours);
    let (heads, first) = signed_edit(&ours, &id, "ours");
    let (other, other_heads) = store_new(&mut ours);
    read_fully(&ours, &id);
    read_fully(&ours, &other);
    let calls = ours.database_calls();
    for _ in 0..10 {
        let answers = from_memory(&ours, &id, heads[0]);
        assert_eq!(answers, (Some(Some(true)), Some(heads.clone()), Some(vec![first.clone()]), Some(1)));
        assert_eq!(ours.cached_is_party(&id, &OrgId::new("flens-kommun").unwrap()), Some(Some(false)));
        assert_eq!(ours.cached_is_party(&DocId::random(), &org()), Some(None), "known not to be stored");
        assert_eq!(ours.cached_signatures(&[ChangeHash([9u8; 32])]), None, "a signature not held is not guessed");
    }
    assert_eq!(ours.database_calls(), calls, "nothing read from the database while nothing changed");

    // Another instance changes the document (a change and a receipt).
    events.lock().unwrap().clear();
    let (new_heads, second) = signed_edit(&theirs, &id, "theirs");
    assert!(wait_for(&events, |e| *e == RemoteEvent::DocChanged(id.clone())));
    let (party, loaded, receipts, signatures) = from_memory(&ours, &id, heads[0]);
    assert_eq!((party, loaded, receipts), (None, None, None), "stale: the full path runs");
    assert_eq!(signatures, Some(1), "a stored signature never changes");
    assert_eq!(from_memory(&ours, &other, other_heads[0]).1, Some(other_heads.clone()), "other documents stay");
    // Read again by the full path: the new version, from memory again.
    read_fully(&ours, &id);
    let mut both = vec![first, second];
    both.sort_by(|a, b| a.record_signature.cmp(&b.record_signature));
    let (party, loaded, receipts, _) = from_memory(&ours, &id, new_heads[0]);
    assert_eq!((party, loaded, receipts), (Some(Some(true)), Some(new_heads.clone()), Some(both.clone())));

    // A change that adds no receipt: the document is read again, its receipts are not.
    events.lock().unwrap().clear();
    let plain = edit(&mut theirs, &id, "theirs, no approval");
    assert!(wait_for(&events, |e| *e == RemoteEvent::DocChanged(id.clone())));
    let (_, loaded, receipts, _) = from_memory(&ours, &id, new_heads[0]);
    assert_eq!((loaded, receipts), (None, Some(both.clone())), "the receipts stay trusted");
    read_fully(&ours, &id);
    assert_eq!(from_memory(&ours, &id, new_heads[0]).1, Some(plain));
}

/// Without a connected listener (this instance would not hear the others'
/// commits) the memory path answers `None`, and keeps doing so after the
/// listener reconnected until each document is read again.
#[test]
fn postgres_reads_from_memory_are_none_while_the_listener_is_gone() {
    let Some(backend) = postgres("postgres_reads_from_memory_are_none_while_the_listener_is_gone") else { return };
    let (mut ours, events) = listening(&backend);
    let (id, _) = store_new(&mut ours);
    let (heads, receipt) = signed_edit(&ours, &id, "ours");
    read_fully(&ours, &id);
    assert_eq!(
        from_memory(&ours, &id, heads[0]),
        (Some(Some(true)), Some(heads.clone()), Some(vec![receipt]), Some(1))
    );
    // The listener's connection is cut, and no new connection to the database is allowed.
    let name: String = ::postgres::Client::connect(&backend.0, ::postgres::NoTls)
        .unwrap()
        .query_one("SELECT current_database()", &[])
        .unwrap()
        .get(0);
    // From the server's own database: a database cannot refuse connections to itself from inside.
    let server = std::env::var(postgres::TEST_SERVER_ENV).unwrap();
    let mut admin = ::postgres::Client::connect(server.trim(), ::postgres::NoTls).unwrap();
    let allow = |admin: &mut ::postgres::Client, allow: bool| {
        admin.batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {allow}")).unwrap();
    };
    allow(&mut admin, false);
    let cut: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = $1 AND query LIKE '%heartbeat_at = now()%'",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(cut, 1, "the listener's connection (the one that beats) was found");
    let deadline = Instant::now() + LIMIT;
    while ours.cached_is_party(&id, &org()).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (party, loaded, receipts, _) = from_memory(&ours, &id, heads[0]);
    assert_eq!((party, loaded, receipts), (None, None, None), "nothing is trusted without the listener");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(from_memory(&ours, &id, heads[0]).0, None, "nor while it cannot reconnect");
    // Back: what was kept from before is still not trusted, until read again.
    events.lock().unwrap().clear();
    allow(&mut admin, true);
    assert!(wait_for(&events, |e| *e == RemoteEvent::Missed), "the listener reconnected");
    let (party, loaded, receipts, _) = from_memory(&ours, &id, heads[0]);
    assert_eq!((party, loaded, receipts), (None, None, None), "read before the listener reconnected");
    read_fully(&ours, &id);
    assert_eq!(from_memory(&ours, &id, heads[0]).1, Some(heads));
}
