//! Figure 1: an edit on node A visible on node B through the relay, both
//! running the real daemon, against the same three-party exchange in process
//! and a bare quinn round trip on the same loopback.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use samverkan_net::endpoint::{self, Limits};
use samverkan_net::tls::TlsIdentity;
use samverkan_node::node::Node;
use samverkan_node::sync::{self, DaemonOptions, RelayTarget};
use samverkan_shared::identity::NodeKey;
use samverkan_shared::ids::DocId;
use tokio::sync::{mpsc, watch, Notify};

use crate::fixtures::Author;
use crate::harness;
use crate::inproc::{memory_docs, Network};
use crate::report::{ms, percentile, Figure};

/// Runs figure 1 for each history length.
pub async fn run(histories: &[usize], edits: usize) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    let rtt = quinn_round_trips(edits.max(200)).await?;
    let rtt50 = ms(percentile(&rtt, 50.0));
    out.push(Figure::info("quinn.rtt.p50", rtt50, "ms"));
    out.push(Figure::info("quinn.rtt.p99", ms(percentile(&rtt, 99.0)), "ms"));
    let commits = sqlite_commits(edits.max(200))?;
    let commit50 = ms(percentile(&commits, 50.0));
    out.push(Figure::info("sqlite.durable_commit.p50", commit50, "ms"));
    for &history in histories {
        let inproc = in_process(history, edits)?;
        let real = through_daemons(history, edits).await?;
        let (i50, i99) = (ms(percentile(&inproc, 50.0)), ms(percentile(&inproc, 99.0)));
        let (r50, r99) = (ms(percentile(&real, 50.0)), ms(percentile(&real, 99.0)));
        // The floor: the same exchange in process, two QUIC round trips (A→relay, relay→B)
        // and the three durable commits on the path (A's edit, the relay's, B's).
        let floor = i50 + 2.0 * rtt50 + 3.0 * commit50;
        out.push(
            Figure::info(format!("latency.h{history}.p50"), r50, "ms")
                .baseline(floor, "floor: in-process + 2 round trips + 3 durable commits")
                .target("≤ 1.2× floor", r50 <= 1.2 * floor),
        );
        out.push(
            Figure::info(format!("latency.h{history}.p99"), r99, "ms")
                .baseline(r50, "p50")
                .target("≤ 2.5× p50", r99 <= 2.5 * r50),
        );
        out.push(
            Figure::info(format!("latency.h{history}.p50.vs_in_process"), r50, "ms")
                .baseline(i50, "in-process A→relay→B"),
        );
        out.push(
            Figure::info(format!("latency.h{history}.p99.vs_in_process"), r99, "ms")
                .baseline(i99, "in-process A→relay→B"),
        );
    }
    Ok(out)
}

/// Request/response round trips of 300 bytes on one open quinn stream.
async fn quinn_round_trips(samples: usize) -> Result<Vec<Duration>> {
    let (server_key, client_key) = (NodeKey::generate(), NodeKey::generate());
    let server_identity = TlsIdentity::new(server_key.signing_key(), samverkan_net::tls::SERVER_NAME)?;
    let client_identity = TlsIdentity::new(client_key.signing_key(), "bench")?;
    let limits = Limits::default();
    let server = endpoint::server_endpoint("127.0.0.1:0".parse()?, &server_identity, &limits)?;
    let addr = server.local_addr()?;
    let echo = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        endpoint::admit(&conn, &Limits::default());
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut buf = [0u8; 300];
        while recv.read_exact(&mut buf).await.is_ok() {
            send.write_all(&buf).await?;
        }
        anyhow::Ok(())
    });
    let client = endpoint::client_endpoint(addr)?;
    let relay_key = server_identity.public_key();
    let conn = endpoint::connect(&client, addr, &client_identity, relay_key, &limits).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut buf = [7u8; 300];
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples + 20 {
        let started = Instant::now();
        send.write_all(&buf).await?;
        recv.read_exact(&mut buf).await?;
        if i >= 20 {
            out.push(started.elapsed());
        }
    }
    conn.close(0u32.into(), b"done");
    echo.abort();
    Ok(out)
}

/// Durable commits of one small row (WAL, `synchronous=FULL`, as the store
/// runs): what each of the three durable writes on the path costs at least.
fn sqlite_commits(samples: usize) -> Result<Vec<Duration>> {
    let dir = tempfile::tempdir()?;
    let conn = rusqlite::Connection::open(dir.path().join("commit.db"))?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")?;
    let row = [0u8; 200];
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        conn.execute("INSERT INTO t (data) VALUES (?1)", [&row[..]])?;
        out.push(started.elapsed());
    }
    Ok(out)
}

/// The same exchange with sans-IO connections and documents in memory.
fn in_process(history: usize, edits: usize) -> Result<Vec<Duration>> {
    let author = Author::new("Eskilstuna");
    let doc = author.plan_with_history(history)?;
    let id = doc.id().clone();
    let mut net = Network::default();
    let mut a_docs = memory_docs();
    a_docs.insert_document(doc);
    let a = net.connect("a", a_docs, None);
    let b = net.connect("b", memory_docs(), None);
    net.pump(None)?;
    let mut out = Vec::with_capacity(edits);
    for i in 0..edits + 5 {
        let started = Instant::now();
        let doc = net.links[a].docs.document_mut(&id).context("A lost its document")?;
        author.small_edit(doc, history + i)?;
        net.local_change(a, &id)?;
        let seen = net.pump(Some(b))?.context("B never received the edit")?;
        if i >= 5 {
            out.push(seen - started);
        }
    }
    if net.links[a].docs.heads_of(&id) != net.links[b].docs.heads_of(&id) {
        bail!("in-process A and B differ after the run");
    }
    Ok(out)
}

/// Real relay and two daemons; edits made through a second handle on A's data
/// directory, which notifies A's daemon; B's daemon reports what it stored.
async fn through_daemons(history: usize, edits: usize) -> Result<Vec<Duration>> {
    let root = tempfile::tempdir()?;
    // The relay runs in its own process, as in production: its blocking SQLite
    // commits then do not hold up the nodes' runtime threads.
    let mut relay = harness::RelayProcess::start(&root.path().join("relay"), Vec::new())?;
    let a = relay.new_node(root.path(), "a", "Eskilstuna")?;
    let b = relay.new_node(root.path(), "b", "Polisen")?;
    let result = with_relay(root.path(), &relay.target, (a, b), history, edits).await;
    relay.stop();
    result
}

async fn with_relay(
    _root: &Path,
    target: &RelayTarget,
    nodes: (Node, Node),
    history: usize,
    edits: usize,
) -> Result<Vec<Duration>> {
    let mut daemons = EditToVisible::start(target, nodes, history).await?;
    let measured = daemons.measure(edits).await;
    daemons.stop().await?;
    measured
}

/// Two nodes running the real daemon on one shared document: edits are made
/// through a second handle on A's data directory, which notifies A's daemon;
/// B's daemon reports what it stored. Shared by figures 1 and 8.
pub struct EditToVisible {
    editor: Node,
    id: DocId,
    history: usize,
    next: usize,
    notify: Arc<Notify>,
    seen: mpsc::UnboundedReceiver<DocId>,
    stop: watch::Sender<bool>,
    daemons: Vec<tokio::task::JoinHandle<Result<(), samverkan_node::sync::SyncFailure>>>,
}

impl EditToVisible {
    /// Gives A a document with `history` changes, syncs both nodes once, starts
    /// both daemons and makes five edits (not counted) while they connect.
    pub async fn start(target: &RelayTarget, nodes: (Node, Node), history: usize) -> Result<Self> {
        Self::start_split((target, target), nodes, history).await
    }

    /// [`Self::start`] with A and B on different relay instances (one database).
    pub async fn start_split(
        (a_target, b_target): (&RelayTarget, &RelayTarget),
        (mut a, mut b): (Node, Node),
        history: usize,
    ) -> Result<Self> {
        let a_dir = a.data_dir().to_path_buf();
        // The editor shares A's daemon's loaded documents, as the web app beside the daemon does.
        let a_cache = a.store().doc_cache();
        let author = Author::of(&a);
        let mut doc = author.plan_with_history(history)?;
        let id = doc.id().clone();
        a.store_mut().insert(&mut doc)?;
        let limit = Duration::from_secs(120);
        sync::sync_once(&mut a, a_target, limit).await?;
        sync::sync_once(&mut b, b_target, limit).await?;

        let notify = Arc::new(Notify::new());
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let a_options = DaemonOptions { local_edits: Some(notify.clone()), ..DaemonOptions::default() };
        let b_options = DaemonOptions { received: Some(seen_tx), ..DaemonOptions::default() };
        let mut daemons = Vec::new();
        for (mut node, options, target) in [(a, a_options, a_target), (b, b_options, b_target)] {
            let target = target.clone();
            let mut stop = stop_rx.clone();
            daemons.push(tokio::spawn(async move {
                sync::daemon(&mut node, &target, &options, async move {
                    let _ = stop.changed().await;
                })
                .await
            }));
        }
        // The first edits (not counted) also wait for both daemons to connect.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut editor = harness::open_node(&a_dir)?;
        editor.store_mut().share_cache(a_cache)?;
        let mut this = Self { editor, id, history, next: 0, notify, seen, stop, daemons };
        this.measure(5).await?;
        Ok(this)
    }

    /// Makes `edits` edits on A, one at a time, each timed until B stored it.
    pub async fn measure(&mut self, edits: usize) -> Result<Vec<Duration>> {
        let mut out = Vec::with_capacity(edits);
        for _ in 0..edits {
            while self.seen.try_recv().is_ok() {}
            let i = self.next;
            self.next += 1;
            let title = format!("Åtgärdsplan, version {}", self.history + i);
            let started = Instant::now();
            self.editor.edit(&self.id, "title", |e| e.set_title(&title))?;
            self.notify.notify_one();
            loop {
                match tokio::time::timeout(Duration::from_secs(30), self.seen.recv()).await {
                    Ok(Some(doc)) if doc == self.id => break,
                    Ok(Some(_)) => {}
                    Ok(None) => bail!("B's daemon stopped"),
                    Err(_) => bail!("edit {i} did not reach B within 30 s"),
                }
            }
            out.push(started.elapsed());
        }
        Ok(out)
    }

    /// Stops both daemons.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        for d in self.daemons {
            d.await??;
        }
        Ok(())
    }
}
