// Included twice by `versions.rs`, with `am` naming the Automerge version to measure.

use std::time::{Duration, Instant};

use am::sync::{Message, State, SyncDoc};
use am::transaction::Transactable;
use am::{AutoCommit, ObjType, ROOT};
use anyhow::{Context, Result};

/// A document with `history` changes: a text body and a title, both edited.
fn build(history: usize) -> Result<AutoCommit> {
    let mut doc = AutoCommit::new();
    let body = doc.put_object(ROOT, "body", ObjType::Text)?;
    doc.splice_text(&body, 0, 0, &crate::fixtures::SEED[..2000.min(crate::fixtures::SEED.len())])?;
    doc.commit();
    for i in 1..history {
        if i % 2 == 0 {
            doc.put(ROOT, "title", format!("Åtgärdsplan {i}"))?;
        } else {
            doc.splice_text(&body, (i * 7) % 1500, 0, "x")?;
        }
        doc.commit();
    }
    Ok(doc)
}

/// Runs sync between two documents until neither has anything to send.
fn settle(a: &mut AutoCommit, sa: &mut State, b: &mut AutoCommit, sb: &mut State) -> Result<()> {
    for _ in 0..100 {
        let mut moved = false;
        if let Some(m) = a.sync().generate_sync_message(sa) {
            moved = true;
            b.sync().receive_sync_message(sb, Message::decode(&m.encode())?)?;
        }
        if let Some(m) = b.sync().generate_sync_message(sb) {
            moved = true;
            a.sync().receive_sync_message(sa, Message::decode(&m.encode())?)?;
        }
        if !moved {
            return Ok(());
        }
    }
    anyhow::bail!("sync did not settle")
}

/// Per remote change on a document of `history` changes: the relay path
/// (decode, apply, reply to the sender, generate for the next peer) and the
/// receive path (decode and apply at the receiving node).
pub fn measure(history: usize, iterations: usize) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut sender = build(history)?;
    let saved = sender.save();
    let mut relay = AutoCommit::load(&saved)?;
    let mut receiver = AutoCommit::load(&saved)?;
    let (mut s_r, mut r_s, mut r_b, mut b_r) = (State::new(), State::new(), State::new(), State::new());
    settle(&mut sender, &mut s_r, &mut relay, &mut r_s)?;
    settle(&mut relay, &mut r_b, &mut receiver, &mut b_r)?;
    let (mut relay_path, mut receive_path) = (Vec::new(), Vec::new());
    for i in 0..iterations {
        sender.put(ROOT, "title", format!("Ändrad {i}"))?;
        sender.commit();
        let message = sender.sync().generate_sync_message(&mut s_r).context("sender had nothing to send")?.encode();

        let started = Instant::now();
        relay.sync().receive_sync_message(&mut r_s, Message::decode(&message)?)?;
        let reply = relay.sync().generate_sync_message(&mut r_s).map(Message::encode);
        let forward = relay.sync().generate_sync_message(&mut r_b).map(Message::encode);
        relay_path.push(started.elapsed());

        let forward = forward.context("relay forwarded nothing")?;
        let started = Instant::now();
        receiver.sync().receive_sync_message(&mut b_r, Message::decode(&forward)?)?;
        receive_path.push(started.elapsed());

        if let Some(reply) = reply {
            sender.sync().receive_sync_message(&mut s_r, Message::decode(&reply)?)?;
        }
        settle(&mut sender, &mut s_r, &mut relay, &mut r_s)?;
        settle(&mut relay, &mut r_b, &mut receiver, &mut b_r)?;
    }
    if relay.get_heads() != receiver.get_heads() {
        anyhow::bail!("relay and receiver differ");
    }
    Ok((relay_path, receive_path))
}
