//! Figure 5: relay scale. The relay runs in a child process (so `/proc` shows
//! its memory and CPU alone); this process simulates many nodes, each with its
//! own real QUIC connection driving the sans-IO [`SyncConnection`]. Idle nodes
//! share one in-memory copy of the documents behind a lock
//! ([`SharedMemoryDocs`]; their memory is not measured); one editor node and
//! one observer node have their own copies.
//!
//! The same measurement runs on two relay instances on PostgreSQL (figure 9,
//! [`Deployment::TwoOnPostgres`]); [`Measured::figures`] prints figure 5.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use automerge::ChangeHash;
use samverkan_net::endpoint::{self, Limits};
use samverkan_net::framed::{self, FramedRecv, FramedSend};
use samverkan_net::tls::TlsIdentity;
use samverkan_node::sync::RelayTarget;
use samverkan_shared::identity::NodeKey;
use samverkan_shared::ids::DocId;
use samverkan_shared::org::Directory;
use samverkan_shared::sync::{ConnectionEvent, SharedMemoryDocs, SyncConnection};
use samverkan_shared::wire::Frame;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::fixtures::Author;
use crate::harness::{self, RelayProcess, StepCounts};
use crate::inproc::memory_docs;
use crate::report::{ms, percentile, Figure};

/// Sizes of a scale run.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Simulated nodes (connections).
    pub nodes: usize,
    /// Documents every node shares.
    pub docs: usize,
    /// Length of the steady-edit phase.
    pub seconds: u64,
    /// Edits per second during it.
    pub rate: u32,
    /// The two counts of stored documents a relay is started afresh on for
    /// the memory per idle document (on SQLite): the figure is the difference
    /// over the documents added, so what every relay costs once, stored
    /// documents or not, does not count.
    pub idle_stored: (usize, usize),
}

/// One simulated node's connection.
struct Sim {
    conn: quinn::Connection,
    send: FramedSend,
    recv: FramedRecv,
    sync: SyncConnection,
    docs: SharedMemoryDocs,
    /// Where a receiving node counts the frames it moves (`None`: not counted).
    traffic: Option<Arc<Traffic>>,
}

/// The receiving nodes' connections and the wire frames they moved, so the
/// steady phase's datagrams and frames per forwarded change can be told
/// (each node's counts are the relay's on that connection, sent and received swapped).
#[derive(Default)]
struct Traffic {
    conns: Mutex<Vec<quinn::Connection>>,
    frames_in: AtomicU64,
    frames_out: AtomicU64,
}

/// Sums of the receiving nodes' counts at one moment.
#[derive(Debug, Default, Clone, Copy)]
struct TrafficCounts {
    /// Datagrams the nodes received (the relay sent).
    datagrams_in: u64,
    /// Datagrams the nodes sent (the relay received).
    datagrams_out: u64,
    /// QUIC ACK frames the nodes received / sent.
    acks_in: u64,
    acks_out: u64,
    /// QUIC STREAM frames the nodes received / sent.
    streams_in: u64,
    streams_out: u64,
    /// Wire frames the nodes received / sent.
    frames_in: u64,
    frames_out: u64,
}

impl Traffic {
    fn counts(&self) -> TrafficCounts {
        let mut c = TrafficCounts {
            frames_in: self.frames_in.load(Ordering::Relaxed),
            frames_out: self.frames_out.load(Ordering::Relaxed),
            ..TrafficCounts::default()
        };
        for conn in self.conns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let s = conn.stats();
            c.datagrams_in += s.udp_rx.datagrams;
            c.datagrams_out += s.udp_tx.datagrams;
            c.acks_in += s.frame_rx.acks;
            c.acks_out += s.frame_tx.acks;
            c.streams_in += s.frame_rx.stream;
            c.streams_out += s.frame_tx.stream;
        }
        c
    }
}

impl TrafficCounts {
    /// What happened between `before` and `self`, per forwarded change.
    fn per(&self, before: &Self, forwarded: f64) -> PerForwarded {
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / forwarded;
        PerForwarded {
            relay_datagrams_sent: per(self.datagrams_in, before.datagrams_in),
            relay_datagrams_received: per(self.datagrams_out, before.datagrams_out),
            relay_acks_sent: per(self.acks_in, before.acks_in),
            relay_acks_received: per(self.acks_out, before.acks_out),
            relay_stream_frames_sent: per(self.streams_in, before.streams_in),
            relay_stream_frames_received: per(self.streams_out, before.streams_out),
            wire_frames_sent: per(self.frames_in, before.frames_in),
            wire_frames_received: per(self.frames_out, before.frames_out),
        }
    }
}

/// The relay's traffic with the receiving nodes in the steady phase, per
/// forwarded change (counted at the nodes: loopback loses nothing).
#[derive(Debug, Default, Clone, Copy)]
pub struct PerForwarded {
    /// UDP datagrams the relay sent.
    pub relay_datagrams_sent: f64,
    /// UDP datagrams the relay received.
    pub relay_datagrams_received: f64,
    /// QUIC ACK frames the relay sent.
    pub relay_acks_sent: f64,
    /// QUIC ACK frames the relay received.
    pub relay_acks_received: f64,
    /// QUIC STREAM frames the relay sent (a datagram without one carries only ACKs or pings).
    pub relay_stream_frames_sent: f64,
    /// QUIC STREAM frames the relay received.
    pub relay_stream_frames_received: f64,
    /// Wire frames (`Sync`, `Authors`, …) the relay sent.
    pub wire_frames_sent: f64,
    /// Wire frames the relay received.
    pub wire_frames_received: f64,
}

fn proto(e: impl Display) -> anyhow::Error {
    anyhow!("simulated node: {e}")
}

impl Sim {
    /// Connects as the enrolled node whose TLS identity is `identity`.
    async fn connect(
        client: &quinn::Endpoint,
        target: &RelayTarget,
        identity: &TlsIdentity,
        docs: SharedMemoryDocs,
    ) -> Result<Self> {
        let limits = Limits::default();
        let conn = endpoint::connect(client, target.addr, identity, *target.relay_key.as_bytes(), &limits).await?;
        let (send, recv) = framed::open(&conn, &limits).await?;
        let name = hex::encode(identity.public_key());
        Ok(Self { conn, send, recv, sync: SyncConnection::node(&name, "samverkan-bench"), docs, traffic: None })
    }

    async fn flush(&mut self) -> Result<()> {
        let frames = self.sync.take_outbox();
        self.send.send_all(&frames).await?;
        if let Some(t) = &self.traffic {
            t.frames_out.fetch_add(frames.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Handles a frame; returns the documents that changed with their heads.
    fn on_frame(&mut self, frame: Frame) -> Result<Vec<(DocId, Vec<ChangeHash>)>> {
        let mut changed = Vec::new();
        for event in self.sync.on_frame(frame, &mut self.docs).map_err(proto)? {
            match event {
                ConnectionEvent::Established { .. } => self.sync.begin(&mut self.docs).map_err(proto)?,
                ConnectionEvent::DocChanged { doc, heads } => changed.push((doc, heads)),
                ConnectionEvent::RefusedByPeer { doc, reason, .. } => {
                    anyhow::bail!("the relay refused document {doc}: {reason}")
                }
                ConnectionEvent::Directory(_) | ConnectionEvent::Receipts { .. } | ConnectionEvent::Refused { .. } => {}
            }
        }
        Ok(changed)
    }

    /// Exchanges frames until the connect-time sync is done.
    async fn settle(&mut self) -> Result<()> {
        loop {
            self.flush().await?;
            if self.sync.is_settled(&mut self.docs).map_err(proto)? {
                return Ok(());
            }
            let frame = tokio::time::timeout(Duration::from_secs(60), self.recv.recv())
                .await
                .context("settling timed out")??
                .context("relay closed")?;
            self.on_frame(frame)?;
        }
    }

    /// Stays connected: pushes documents named on `edits`, reports received changes.
    async fn live(
        mut self,
        mut edits: mpsc::UnboundedReceiver<DocId>,
        observed: Option<mpsc::UnboundedSender<(Vec<ChangeHash>, Instant)>>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        loop {
            self.flush().await?;
            tokio::select! {
                frame = self.recv.recv() => {
                    let Some(frame) = frame? else { return Ok(()) };
                    if let Some(t) = &self.traffic {
                        t.frames_in.fetch_add(1, Ordering::Relaxed);
                    }
                    for (_, heads) in self.on_frame(frame)? {
                        if let Some(o) = &observed {
                            let _ = o.send((heads, Instant::now()));
                        }
                    }
                }
                Some(doc) = edits.recv() => self.sync.on_local_change(&doc, &mut self.docs).map_err(proto)?,
                _ = stop.changed() => {
                    self.conn.close(0u32.into(), b"bye");
                    return Ok(());
                }
            }
        }
    }
}

/// What one scale run measured, on one relay or on several instances of one.
pub struct Measured {
    /// Sizes of the run.
    pub scale: Scale,
    /// Time for every simulated node to connect and settle.
    pub connect_time: Duration,
    /// Relay memory per idle connection in KB (summed over the instances).
    pub memory_per_idle_connection: f64,
    /// Relay memory per stored document that no node has asked for since the
    /// relay started, in KB (see [`memory_per_idle_document`]; measured on
    /// SQLite only).
    pub memory_per_idle_document: Option<f64>,
    /// Relay memory per document just received from the seeding node (held
    /// loaded since), in KB (summed over the instances).
    pub memory_per_loaded_document: f64,
    /// Relay CPU per forwarded change in µs (summed over the instances): CPU
    /// during the steady phase over edits made times receiving nodes, so a
    /// relay that falls behind (fewer edits `latencies` than `edits`) looks cheaper.
    pub cpu_per_forwarded_change: f64,
    /// Edits made during the steady phase.
    pub edits: usize,
    /// The relay's datagrams and frames to and from the receiving nodes in the steady phase.
    pub traffic: PerForwarded,
    /// How the relay's connections did their steps in the steady phase.
    pub steps: StepCounts,
    /// Edit-to-observed latency of each edit observed with every node connected.
    pub latencies: Vec<Duration>,
    /// The same with only the editor and the observer connected.
    pub idle: Vec<Duration>,
}

impl Measured {
    /// `n<nodes>.d<docs>`, the part of a figure's name that gives its size.
    pub fn tag(&self) -> String {
        format!("n{}.d{}", self.scale.nodes, self.scale.docs)
    }

    /// The `p`-th percentile of the loaded latency, in ms.
    pub fn latency_ms(&self, p: f64) -> f64 {
        ms(percentile(&self.latencies, p))
    }

    /// Figure 5's lines.
    pub fn figures(&self) -> Vec<Figure> {
        let tag = self.tag();
        let (per_conn, per_doc, cpu) =
            (self.memory_per_idle_connection, self.memory_per_idle_document, self.cpu_per_forwarded_change);
        let (idle99, loaded99) = (ms(percentile(&self.idle, 99.0)), self.latency_ms(99.0));
        let t = &self.traffic;
        let st = &self.steps;
        let steps = st.from_memory + st.on_storage_threads;
        let percent = |part: u64, whole: u64| if whole == 0 { 0.0 } else { part as f64 * 100.0 / whole as f64 };
        let mut figures = vec![
            Figure::info(format!("scale.{tag}.connect_time"), ms(self.connect_time), "ms"),
            Figure::info(format!("scale.{tag}.memory_per_idle_connection"), per_conn, "KB")
                .target("≤ 100 KB", per_conn <= 100.0),
        ];
        if let Some(per_doc) = per_doc {
            let (base, total) = self.scale.idle_stored;
            figures.push(
                Figure::info(format!("scale.d{base}-{total}.memory_per_idle_document"), per_doc, "KB")
                    .target("none unless loaded (≤ 1 KB)", per_doc <= 1.0),
            );
        }
        figures.extend([
            Figure::info(format!("scale.{tag}.memory_per_loaded_document"), self.memory_per_loaded_document, "KB"),
            Figure::info(format!("scale.{tag}.cpu_per_forwarded_change"), cpu, "µs").target("≤ 100 µs", cpu <= 100.0),
            Figure::info(format!("scale.{tag}.edits"), self.edits as f64, "edits"),
            Figure::info(format!("scale.{tag}.steps.from_memory"), percent(st.from_memory, steps), "%"),
            Figure::info(format!("scale.{tag}.steps.sync_copied"), percent(st.copied, st.copied + st.worked_out), "%"),
            Figure::info(
                format!("scale.{tag}.per_forwarded_change.relay_datagrams_sent"),
                t.relay_datagrams_sent,
                "datagrams",
            ),
            Figure::info(
                format!("scale.{tag}.per_forwarded_change.relay_datagrams_received"),
                t.relay_datagrams_received,
                "datagrams",
            ),
            Figure::info(
                format!("scale.{tag}.per_forwarded_change.relay_datagrams_sent_without_stream_data"),
                (t.relay_datagrams_sent - t.relay_stream_frames_sent).max(0.0),
                "datagrams",
            ),
            Figure::info(
                format!("scale.{tag}.per_forwarded_change.relay_datagrams_received_without_stream_data"),
                (t.relay_datagrams_received - t.relay_stream_frames_received).max(0.0),
                "datagrams",
            ),
            Figure::info(
                format!("scale.{tag}.per_forwarded_change.relay_ack_frames_sent"),
                t.relay_acks_sent,
                "ACK frames",
            ),
            Figure::info(
                format!("scale.{tag}.per_forwarded_change.relay_ack_frames_received"),
                t.relay_acks_received,
                "ACK frames",
            ),
            Figure::info(format!("scale.{tag}.per_forwarded_change.wire_frames_sent"), t.wire_frames_sent, "frames"),
            Figure::info(
                format!("scale.{tag}.per_forwarded_change.wire_frames_received"),
                t.wire_frames_received,
                "frames",
            ),
            Figure::info(format!("scale.{tag}.observed"), self.latencies.len() as f64, "edits"),
            Figure::info(format!("scale.{tag}.latency.p50"), self.latency_ms(50.0), "ms"),
            Figure::info(format!("scale.{tag}.latency.p99"), loaded99, "ms")
                .baseline(idle99, "the same edits with 2 nodes connected")
                .target("≤ 3× idle", loaded99 <= 3.0 * idle99),
        ]);
        figures
    }
}

/// Where the relay under measurement stores its documents.
#[derive(Debug, Clone, Copy)]
pub enum Deployment<'a> {
    /// One relay on SQLite in its data directory (figure 5).
    Sqlite,
    /// Two instances of one relay on the PostgreSQL database at this address.
    TwoOnPostgres(&'a str),
}

/// Runs figure 5 on `deployment`. On two instances the simulated nodes
/// alternate between them: the editor (node 0) is on instance 1, the
/// observer (node 1) on instance 2, so every observed change crosses the
/// database and a `NOTIFY`.
pub async fn run(s: Scale, deployment: Deployment<'_>) -> Result<Measured> {
    let root = tempfile::tempdir()?;
    // Every simulated node (and the seeder, last) is enrolled before the relay starts.
    let keys: Vec<NodeKey> = (0..=s.nodes).map(|_| NodeKey::generate()).collect();
    let org = Directory::sodermanland().resolve("Länsstyrelsen").context("Länsstyrelsen")?.id.clone();
    // The author of the seeded documents is an enrolled node too: the relay accepts no one else's changes.
    let author = Author::new("Länsstyrelsen");
    let mut members: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| harness::node_member(key.node_id(), org.clone(), &harness::sim_node_name(i)))
        .collect();
    members.push(harness::node_member(author.ctx.author, org.clone(), "bench author"));
    let mut relays = match deployment {
        Deployment::Sqlite => vec![RelayProcess::start(&root.path().join("relay"), members)?],
        Deployment::TwoOnPostgres(url) => {
            let (first, second) = RelayProcess::start_postgres_pair(root.path(), url, members)?;
            vec![first, second]
        }
    };
    let identities =
        keys.iter().map(|key| TlsIdentity::new(key.signing_key(), "samverkan-bench")).collect::<Result<Vec<_>, _>>();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_empty = match rss_bytes(&relays) {
        Ok(rss) => rss,
        Err(e) => {
            relays.into_iter().for_each(RelayProcess::stop);
            return Err(e);
        }
    };
    let result = match identities {
        Ok(identities) => measure(&mut relays, s, identities, &author, rss_empty).await,
        Err(e) => Err(e.into()),
    };
    for relay in relays {
        relay.stop();
    }
    let mut measured = result?;
    if matches!(deployment, Deployment::Sqlite) {
        let per_doc = memory_per_idle_document(&root.path().join("idle"), &org, &author, s.idle_stored).await?;
        measured.memory_per_idle_document = Some(per_doc);
    }
    Ok(measured)
}

/// Relay memory per stored document that no node has asked for since the
/// relay started, in KB: one relay's own resident memory (without its
/// program's pages) started afresh on
/// `base` stored documents and again after more were added up to `total`, the
/// difference per added document. Only documents are added between the two
/// starts (and the seeding node's sync state of each, as any author leaves),
/// so what a relay costs once (code paged in, page caches filled up to their
/// bound, connections to its database) is not spread over the documents.
async fn memory_per_idle_document(
    dir: &std::path::Path,
    org: &samverkan_shared::org::OrgId,
    author: &Author,
    (base, total): (usize, usize),
) -> Result<f64> {
    let seeder = NodeKey::generate();
    let members = vec![
        harness::node_member(seeder.node_id(), org.clone(), "idle seeder"),
        harness::node_member(author.ctx.author, org.clone(), "bench author"),
    ];
    let identity = TlsIdentity::new(seeder.signing_key(), "samverkan-bench")?;
    let mut relay = RelayProcess::start(dir, members)?;
    let mut docs = memory_docs();
    let mut rss = Vec::new();
    for count in [base, total] {
        for n in docs.ids().count()..count {
            docs.insert_document(author.plan_with_history(20 + n % 5)?);
        }
        let seeded = async {
            let client = endpoint::client_endpoint(relay.target.addr)?;
            let mut sim = Sim::connect(&client, &relay.target, &identity, docs.clone().into_shared()).await?;
            sim.settle().await?;
            sim.conn.close(0u32.into(), b"bye");
            let _ = tokio::time::timeout(Duration::from_secs(2), client.wait_idle()).await;
            anyhow::Ok(())
        };
        if let Err(e) = seeded.await {
            relay.stop();
            return Err(e.context(format!("seeding {count} documents for the memory per idle document")));
        }
        // Started afresh on what is stored: its documents idle, none loaded.
        relay = relay.restart().context("starting the relay again on the seeded documents")?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        match relay.rss_anon_bytes() {
            Ok(bytes) => rss.push(bytes as f64),
            Err(e) => {
                relay.stop();
                return Err(e);
            }
        }
    }
    relay.stop();
    Ok((rss[1] - rss[0]) / (total - base).max(1) as f64 / 1024.0)
}

/// Resident memory of all `relays`, in bytes.
fn rss_bytes(relays: &[RelayProcess]) -> Result<u64> {
    relays.iter().map(RelayProcess::rss_bytes).sum()
}

/// CPU time all `relays` have used, in seconds.
fn cpu_seconds(relays: &[RelayProcess]) -> Result<f64> {
    relays.iter().map(RelayProcess::cpu_seconds).sum()
}

/// How all `relays`' connections have done their steps so far.
fn step_counts(relays: &mut [RelayProcess]) -> Result<StepCounts> {
    relays.iter_mut().try_fold(StepCounts::default(), |sum, relay| {
        let c = relay.steps()?;
        Ok(StepCounts {
            from_memory: sum.from_memory + c.from_memory,
            on_storage_threads: sum.on_storage_threads + c.on_storage_threads,
            copied: sum.copied + c.copied,
            worked_out: sum.worked_out + c.worked_out,
        })
    })
}

/// Node `i`'s relay: the nodes alternate between the instances.
fn target_of(relays: &[RelayProcess], i: usize) -> Result<RelayTarget> {
    relays.get(i % relays.len().max(1)).map(|r| r.target.clone()).context("no relay to connect to")
}

async fn measure(
    relays: &mut [RelayProcess],
    s: Scale,
    mut identities: Vec<TlsIdentity>,
    author: &Author,
    rss_empty: u64,
) -> Result<Measured> {
    let first = target_of(relays, 0)?;
    let mut docs = memory_docs();
    for n in 0..s.docs {
        let doc = author.plan_with_history(20 + n % 5)?;
        docs.insert_document(doc);
    }
    let ids: Vec<DocId> = docs.ids().cloned().collect();
    let clients: Vec<quinn::Endpoint> =
        (0..4).map(|_| endpoint::client_endpoint(first.addr)).collect::<Result<_, _>>()?;

    // The documents reach the relay from a seeding node, which then leaves.
    let seeder_identity = identities.pop().context("the seeder's identity")?;
    let mut seeder = Sim::connect(&clients[0], &first, &seeder_identity, docs.clone().into_shared()).await?;
    seeder.settle().await?;
    seeder.conn.close(0u32.into(), b"bye");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_docs = rss_bytes(relays)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (settled_tx, mut settled_rx) = mpsc::unbounded_channel::<Result<()>>();
    let (observed_tx, mut observed_rx) = mpsc::unbounded_channel();
    let crowd = docs.clone().into_shared();
    let editor_docs = docs.clone().into_shared();
    let observer_docs = docs.into_shared();
    let limit = Arc::new(Semaphore::new(16));
    let traffic = Arc::new(Traffic::default());
    let mut tasks = tokio::task::JoinSet::new();
    let mut editor_tx = None;
    let mut rss_first = 0;
    let mut idle = Vec::new();
    let connect_started = Instant::now();
    for (i, identity) in identities.into_iter().enumerate() {
        let (docs, observed) = match i {
            0 => (editor_docs.clone(), None),
            1 => (observer_docs.clone(), Some(observed_tx.clone())),
            _ => (crowd.clone(), None),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        if i == 0 {
            editor_tx = Some(tx);
        } else {
            drop(tx);
        }
        let client = clients[i % clients.len()].clone();
        let target = target_of(relays, i)?;
        let (settled, stop, limit) = (settled_tx.clone(), stop_rx.clone(), limit.clone());
        // Every node but the editor receives the changes.
        let counted = (i > 0).then(|| traffic.clone());
        tasks.spawn(async move {
            let sim = async {
                let _permit = limit.acquire().await?;
                let mut sim = Sim::connect(&client, &target, &identity, docs).await?;
                sim.settle().await?;
                if let Some(t) = counted {
                    t.conns.lock().unwrap_or_else(|e| e.into_inner()).push(sim.conn.clone());
                    sim.traffic = Some(t);
                }
                anyhow::Ok(sim)
            }
            .await;
            match sim {
                Ok(sim) => {
                    let _ = settled.send(Ok(()));
                    sim.live(rx, observed, stop).await
                }
                Err(e) => {
                    let _ = settled.send(Err(anyhow!("{e:#}")));
                    Err(e)
                }
            }
        });
        if i == 1 {
            for _ in 0..2 {
                settled_rx.recv().await.context("settle channel")??;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            rss_first = rss_bytes(relays)?;
            // The same steady edits with only the editor and the observer connected: the idle baseline.
            let editor_tx = editor_tx.as_ref().context("no editor")?;
            let steady = Steady { editor_docs: &editor_docs, editor_tx, ids: &ids, author, rate: s.rate };
            idle = steady.run(s.seconds.min(10), 100_000, &mut observed_rx).await?.1;
        }
    }
    for _ in 2..s.nodes {
        tokio::time::timeout(Duration::from_secs(300), settled_rx.recv())
            .await
            .context("nodes took over 300 s to connect")?
            .context("settle channel")??;
    }
    let connect_time = connect_started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected = rss_bytes(relays)?;

    // Steady edits on the editor node, observed at the observer node.
    let editor_tx = editor_tx.context("no editor")?;
    let cpu_before = cpu_seconds(relays)?;
    let steps_before = step_counts(relays)?;
    let traffic_before = traffic.counts();
    let steady = Steady { editor_docs: &editor_docs, editor_tx: &editor_tx, ids: &ids, author, rate: s.rate };
    let (edits, latencies) = steady.run(s.seconds, 1000, &mut observed_rx).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = cpu_seconds(relays)? - cpu_before;
    let steps = step_counts(relays)? - steps_before;
    let per_forwarded = traffic.counts().per(&traffic_before, forwarded_count(edits, s.nodes));
    let _ = stop_tx.send(true);
    while tokio::time::timeout(Duration::from_secs(10), tasks.join_next()).await.ok().flatten().is_some() {}
    if latencies.is_empty() || idle.is_empty() {
        bail!("no edit reached the observer");
    }
    Ok(Measured {
        scale: s,
        connect_time,
        memory_per_idle_connection: (rss_connected as f64 - rss_first as f64) / (s.nodes - 2) as f64 / 1024.0,
        memory_per_idle_document: None,
        memory_per_loaded_document: (rss_docs as f64 - rss_empty as f64) / s.docs as f64 / 1024.0,
        cpu_per_forwarded_change: cpu * 1e6 / forwarded_count(edits, s.nodes),
        edits,
        traffic: per_forwarded,
        steps,
        latencies,
        idle,
    })
}

/// Every node but the editor receives each change.
fn forwarded_count(edits: usize, nodes: usize) -> f64 {
    (edits * nodes.saturating_sub(1)).max(1) as f64
}

/// Steady edits on the editor node at `rate` per second, observed at the observer node.
struct Steady<'a> {
    editor_docs: &'a SharedMemoryDocs,
    editor_tx: &'a mpsc::UnboundedSender<DocId>,
    ids: &'a [DocId],
    author: &'a Author,
    rate: u32,
}

impl Steady<'_> {
    /// Edits for `seconds` (edit numbers from `first`), then waits up to 5 s
    /// for the observer; returns how many edits were made and each one's
    /// edit-to-observed latency.
    async fn run(
        &self,
        seconds: u64,
        first: usize,
        observed_rx: &mut mpsc::UnboundedReceiver<(Vec<ChangeHash>, Instant)>,
    ) -> Result<(usize, Vec<Duration>)> {
        let mut sent: HashMap<ChangeHash, Instant> = HashMap::new();
        let interval = Duration::from_secs_f64(1.0 / f64::from(self.rate.max(1)));
        let mut tick = tokio::time::interval(interval);
        let started = Instant::now();
        let mut edits = 0usize;
        while started.elapsed() < Duration::from_secs(seconds) {
            tick.tick().await;
            let id = &self.ids[edits % self.ids.len()];
            let hash = {
                let mut docs = self.editor_docs.lock();
                let doc = docs.document_mut(id).context("editor lost a document")?;
                self.author.small_edit(doc, first + edits)?
            };
            if let Some(hash) = hash {
                sent.insert(hash, Instant::now());
                self.editor_tx.send(id.clone()).map_err(|_| anyhow!("editor node stopped"))?;
                edits += 1;
            }
        }
        let mut latencies = Vec::new();
        let drain_until = Instant::now() + Duration::from_secs(5);
        while latencies.len() < edits {
            let Ok(Some((heads, at))) = tokio::time::timeout_at(drain_until.into(), observed_rx.recv()).await else {
                break;
            };
            for h in heads {
                if let Some(t) = sent.remove(&h) {
                    latencies.push(at - t);
                }
            }
        }
        Ok((edits, latencies))
    }
}
