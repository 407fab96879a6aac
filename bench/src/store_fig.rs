//! Figure 6: the cost of a durably committed edit against the same edit in
//! memory, one commit per edit and with commits grouped; and the load time of a
//! long document before and after compaction.

use std::time::Instant;

use anyhow::Result;
use samverkan_shared::model::Document;
use samverkan_store::Store;

use crate::fixtures::Author;
use crate::harness;
use crate::report::{ms, us, Figure};

/// Edits grouped into one durable transaction.
pub const GROUP: usize = 32;

/// Runs figure 6 with `edits` edits and a `long`-change document for loading.
pub fn run(edits: usize, long: usize) -> Result<Vec<Figure>> {
    let root = tempfile::tempdir()?;
    let mut node = harness::offline_node(root.path(), "s", "Nyköping")?;
    let author = Author::of(&node);
    let doc = author.plan_with_history(100)?;
    let id = doc.id().clone();
    node.store_mut().insert(&mut doc.clone())?;

    let mut memory = doc.clone();
    let started = Instant::now();
    for i in 0..edits {
        author.small_edit(&mut memory, i)?;
    }
    let in_memory = us(started.elapsed()) / edits as f64;

    let started = Instant::now();
    for i in 0..edits {
        let title = format!("Åtgärdsplan, version {i}");
        node.edit(&id, "title", |e| e.set_title(&title))?;
    }
    let single = us(started.elapsed()) / edits as f64;

    let batches = edits.div_ceil(GROUP);
    let started = Instant::now();
    for b in 0..batches {
        node.store_mut().update(&id, false, |doc: &mut Document| {
            for j in 0..GROUP {
                author.small_edit(doc, edits + b * GROUP + j)?;
            }
            anyhow::Ok(())
        })?;
    }
    let grouped = us(started.elapsed()) / (batches * GROUP) as f64;

    // Loading a long history: as separate changes (what 10,000 uncompacted
    // increments amount to) and as one compacted snapshot, plus the store's load.
    let mut long_doc = author.plan_with_history(long)?;
    let changes: Vec<u8> =
        long_doc.automerge_mut().get_changes(&[]).iter().flat_map(|c| c.raw_bytes().to_vec()).collect();
    let snapshot = long_doc.automerge_mut().save();
    let started = Instant::now();
    let from_changes = Document::load(long_doc.id().clone(), &changes)?;
    let uncompacted = started.elapsed();
    let started = Instant::now();
    let from_snapshot = Document::load(long_doc.id().clone(), &snapshot)?;
    let compacted = started.elapsed();
    drop((from_changes, from_snapshot));
    node.store_mut().insert(&mut long_doc)?;
    let path = node.store_mut().path().to_path_buf();
    let fresh = Store::open(&path)?;
    let started = Instant::now();
    fresh.load(long_doc.id())?;
    let stored = started.elapsed();

    Ok(vec![
        Figure::info("store.edit.durable", single, "µs")
            .baseline(in_memory, "same edit in memory")
            .target("≤ 1.5× (one commit per edit)", single <= 1.5 * in_memory),
        Figure::info(format!("store.edit.durable_grouped{GROUP}"), grouped, "µs")
            .baseline(in_memory, "same edit in memory")
            .target("≤ 1.5× (grouped commits)", grouped <= 1.5 * in_memory),
        Figure::info(format!("store.load.h{long}.compacted"), ms(compacted), "ms")
            .baseline(ms(uncompacted), "uncompacted, as separate changes"),
        Figure::info(format!("store.load.h{long}.from_store"), ms(stored), "ms")
            .baseline(ms(compacted), "compacted snapshot in memory"),
        Figure::info(format!("store.size.h{long}"), snapshot.len() as f64, "B")
            .baseline(changes.len() as f64, "separate changes"),
    ])
}
