//! The one place where the benchmark starts relays and creates nodes.
//!
//! Keep every relay start and node creation here: when nodes must be enrolled
//! at the relay before they may connect, this module is what changes. Figure 5
//! runs the relay in a child process (this same binary, `relay-child`) so that
//! its memory and CPU can be read from `/proc` apart from the simulated nodes;
//! figure 9 runs two such children as instances of one relay on PostgreSQL.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use samverkan_node::node::Node;
use samverkan_node::sync::RelayTarget;
use samverkan_relay::config::StorageLocation;
use samverkan_relay::enrollment;
use samverkan_relay::server::{self, RelayConfig, RelayHandle};
use samverkan_relay::storage::postgres::PostgresStorage;
use samverkan_relay::storage::SqliteStorage;
use samverkan_shared::directory::{Member, MemberKind};
use samverkan_shared::identity::NodeId;
use samverkan_shared::org::OrgId;

/// A relay's configuration: a free loopback port, data (and key file) in
/// `dir`, documents in the PostgreSQL database at `postgres` or, without one,
/// in SQLite in `dir`.
fn relay_config(dir: &Path, postgres: Option<&str>) -> Result<RelayConfig> {
    let mut config = RelayConfig::new("127.0.0.1:0".parse().context("loopback address")?, dir.to_path_buf());
    if let Some(url) = postgres {
        config.storage = StorageLocation::Postgres(url.to_string());
    }
    Ok(config)
}

/// Starts a relay in this process on a free loopback port with data in `dir`.
pub async fn start_relay(dir: &Path) -> Result<RelayHandle> {
    server::spawn(relay_config(dir, None)?).await.context("starting the relay")
}

/// Gives the relay whose data directory is `to` the key of the one in `from`,
/// so that instances on one database prove one relay key.
fn share_relay_key(from: &Path, to: &Path) -> Result<()> {
    samverkan_store::keyfile::create_private_dir(to)?;
    std::fs::copy(from.join(enrollment::KEY_FILE), to.join(enrollment::KEY_FILE)).context("copying the relay key")?;
    Ok(())
}

/// Starts two relay instances in this process on the PostgreSQL database at
/// `url` (data directories `root/relay1` and `root/relay2`, one relay key).
pub async fn start_postgres_instances(root: &Path, url: &str) -> Result<(RelayHandle, RelayHandle)> {
    let (dir1, dir2) = (root.join("relay1"), root.join("relay2"));
    let first = server::spawn(relay_config(&dir1, Some(url))?).await.context("starting instance 1 on PostgreSQL")?;
    share_relay_key(&dir1, &dir2)?;
    let second = server::spawn(relay_config(&dir2, Some(url))?).await.context("starting instance 2 on PostgreSQL")?;
    Ok((first, second))
}

/// Where nodes reach a relay started in this process.
pub fn target(relay: &RelayHandle) -> RelayTarget {
    RelayTarget { addr: relay.local_addr(), relay_key: relay.relay_key() }
}

/// Creates a node in `root/name` for organisation `org`, enrolled at the relay
/// started in this process.
pub fn new_node(relay: &RelayHandle, root: &Path, name: &str, org: &str) -> Result<Node> {
    let node = Node::init(&root.join(name), org, Some(name)).with_context(|| format!("creating node {name}"))?;
    relay.enroll_node(node.node_id(), node.org().clone(), name).context("enrolling the node")?;
    crate::fixtures::register_key(node.key());
    Ok(node)
}

/// Creates a node that never syncs (the store figures).
pub fn offline_node(root: &Path, name: &str, org: &str) -> Result<Node> {
    let node = Node::init(&root.join(name), org, Some(name)).with_context(|| format!("creating node {name}"))?;
    crate::fixtures::register_key(node.key());
    Ok(node)
}

/// A node entry of the enrollment directory.
pub fn node_member(key: NodeId, org: OrgId, name: &str) -> Member {
    Member {
        key,
        kind: MemberKind::Node,
        org,
        name: name.to_string(),
        role: None,
        enrolled_at: chrono::Utc::now(),
        revoked_at: None,
    }
}

/// Opens a second handle on an existing node's data directory (as another process would).
pub fn open_node(dir: &Path) -> Result<Node> {
    Node::open(dir).with_context(|| format!("opening node {}", dir.display()))
}

/// Name of a simulated node (figure 5) as it introduces itself to the relay.
pub fn sim_node_name(i: usize) -> String {
    format!("sim-{i:05}")
}

/// How a relay's connections did their steps (its metrics of the same names).
#[derive(Debug, Clone, Copy, Default)]
pub struct StepCounts {
    /// Steps done from memory on the async runtime (`steps_from_memory`).
    pub from_memory: u64,
    /// Steps run on a storage thread (`steps_on_storage_threads`).
    pub on_storage_threads: u64,
    /// Sync steps from memory copied from an identical one (`sync_steps_copied`).
    pub copied: u64,
    /// Sync steps from memory worked out by Automerge (`sync_steps_worked_out`).
    pub worked_out: u64,
}

impl std::ops::Sub for StepCounts {
    type Output = StepCounts;
    fn sub(self, before: StepCounts) -> StepCounts {
        StepCounts {
            from_memory: self.from_memory.saturating_sub(before.from_memory),
            on_storage_threads: self.on_storage_threads.saturating_sub(before.on_storage_threads),
            copied: self.copied.saturating_sub(before.copied),
            worked_out: self.worked_out.saturating_sub(before.worked_out),
        }
    }
}

/// A relay running in a child process.
pub struct RelayProcess {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
    /// Where it listens and its key.
    pub target: RelayTarget,
    /// Its data directory and PostgreSQL database, to start it again.
    dir: PathBuf,
    postgres: Option<String>,
}

impl RelayProcess {
    /// Enrolls `members` in the relay's database at `dir`, then starts
    /// `samverkan-bench relay-child --dir <dir>` and waits for its address.
    pub fn start(dir: &Path, members: Vec<Member>) -> Result<Self> {
        std::fs::create_dir_all(dir).context("creating the relay's directory")?;
        let storage = SqliteStorage::open(&dir.join(server::DB_FILE), 4).context("opening the relay's database")?;
        enrollment::enroll_all(&storage, members).context("enrolling the simulated nodes")?;
        drop(storage);
        Self::spawn(dir, None)
    }

    /// Enrolls `members` in the PostgreSQL database at `url`, then starts two
    /// relay children on it (`relay-child --dir root/relay<n> --storage <url>`),
    /// the second with a copy of the first's key file: two instances of one relay.
    pub fn start_postgres_pair(root: &Path, url: &str, members: Vec<Member>) -> Result<(Self, Self)> {
        // Opened as the relay opens it: the schema is migrated here, before either instance starts.
        let storage = PostgresStorage::open(url, 4).context("opening the relay's PostgreSQL database")?;
        enrollment::enroll_all(&storage, members).context("enrolling the simulated nodes")?;
        drop(storage);
        let (dir1, dir2) = (root.join("relay1"), root.join("relay2"));
        let first = Self::spawn(&dir1, Some(url)).context("instance 1 on PostgreSQL")?;
        let second = share_relay_key(&dir1, &dir2).and_then(|()| Self::spawn(&dir2, Some(url)));
        match second {
            Ok(second) => Ok((first, second)),
            Err(e) => {
                first.stop();
                Err(e.context("instance 2 on PostgreSQL"))
            }
        }
    }

    /// Starts `samverkan-bench relay-child --dir <dir> [--storage <postgres>]`
    /// and waits for the address and key it prints.
    fn spawn(dir: &Path, postgres: Option<&str>) -> Result<Self> {
        std::fs::create_dir_all(dir).context("creating the relay's directory")?;
        let exe = std::env::current_exe().context("locating the benchmark binary")?;
        let mut command = Command::new(exe);
        command.arg("relay-child").arg("--dir").arg(dir);
        if let Some(url) = postgres {
            command.arg("--storage").arg(url);
        }
        let mut child =
            command.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().context("starting the relay child process")?;
        let mut stdout = BufReader::new(child.stdout.take().context("child stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line).context("reading the relay's address")?;
        let mut parts = line.split_whitespace();
        let (Some(addr), Some(key)) = (parts.next(), parts.next()) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the relay child printed {line:?}");
        };
        let target =
            RelayTarget { addr: addr.parse().context("relay address")?, relay_key: key.parse().context("relay key")? };
        Ok(Self { child, stdout, target, dir: dir.to_path_buf(), postgres: postgres.map(str::to_owned) })
    }

    /// Stops the child and starts it again on the same data: a fresh process
    /// with everything stored before, nothing loaded yet.
    pub fn restart(self) -> Result<Self> {
        let (dir, postgres) = (self.dir.clone(), self.postgres.clone());
        self.stop();
        Self::spawn(&dir, postgres.as_deref())
    }

    /// Creates a node in `root/name` for `org` and enrolls it at the child relay.
    pub fn new_node(&mut self, root: &Path, name: &str, org: &str) -> Result<Node> {
        use std::io::Write;
        let node = Node::init(&root.join(name), org, Some(name)).with_context(|| format!("creating node {name}"))?;
        let stdin = self.child.stdin.as_mut().context("child stdin")?;
        writeln!(stdin, "enroll {} {} {name}", node.node_id(), node.org()).context("asking the relay to enroll")?;
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).context("reading the relay's answer")?;
        if answer.trim() != "enrolled" {
            bail!("the relay child answered {answer:?}");
        }
        crate::fixtures::register_key(node.key());
        Ok(node)
    }

    /// How the child's connections have done their steps so far.
    pub fn steps(&mut self) -> Result<StepCounts> {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().context("child stdin")?;
        writeln!(stdin, "steps").context("asking the relay for its step counts")?;
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).context("reading the relay's step counts")?;
        let counts: Vec<u64> = answer.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        let [from_memory, on_storage_threads, copied, worked_out] = counts[..] else {
            bail!("the relay child answered {answer:?} to `steps`");
        };
        Ok(StepCounts { from_memory, on_storage_threads, copied, worked_out })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the child in bytes (`VmRSS`).
    pub fn rss_bytes(&self) -> Result<u64> {
        self.status_bytes("VmRSS")
    }

    /// The child's resident memory of its own (`RssAnon`): without the pages
    /// of its program file, which vary with the code paths run so far.
    pub fn rss_anon_bytes(&self) -> Result<u64> {
        self.status_bytes("RssAnon")
    }

    /// A size in `/proc/<pid>/status`, in bytes.
    fn status_bytes(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix(field).and_then(|rest| rest.strip_prefix(':')))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("no {field} in /proc/<pid>/status"))?;
        Ok(kb * 1024)
    }

    /// CPU time (user + system) the child has used, in seconds (clock ticks of 1/100 s).
    pub fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the command name (which is in parentheses and may hold spaces).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc/<pid>/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).context("malformed /proc/<pid>/stat");
        // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
        Ok((tick(11)? + tick(12)?) as f64 / 100.0)
    }

    /// Stops the child (closing its stdin asks it to shut down; it is killed if it lingers).
    pub fn stop(mut self) {
        drop(self.child.stdin.take());
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Body of the `relay-child` subcommand: start a relay with data in `dir` (on
/// the PostgreSQL database at `postgres`, if given), print `ADDR RELAY_KEY`,
/// enroll nodes named on standard input (`enroll KEY ORG NAME`, answered
/// `enrolled`), answer `steps` with its [`StepCounts`], and run until
/// standard input closes.
pub async fn relay_child(dir: &Path, postgres: Option<&str>) -> Result<()> {
    let relay = server::spawn(relay_config(dir, postgres)?).await.context("starting the relay")?;
    let relay = std::sync::Arc::new(relay);
    println!("{} {}", relay.local_addr(), relay.relay_key());
    let commands = relay.clone();
    let stop = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            let mut parts = line.trim().splitn(4, ' ');
            if line.trim() == "steps" {
                let m = commands.metrics();
                println!(
                    "{} {} {} {}",
                    m.steps_from_memory.get(),
                    m.steps_on_storage_threads.get(),
                    m.sync_memo.hits(),
                    m.sync_memo.misses()
                );
            } else if let (Some("enroll"), Some(key), Some(org), Some(name)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            {
                let enrolled = key
                    .parse()
                    .ok()
                    .zip(OrgId::new(org))
                    .map(|(key, org)| commands.enroll_node(key, org, name).is_ok())
                    .unwrap_or(false);
                println!("{}", if enrolled { "enrolled" } else { "refused" });
            }
            line.clear();
        }
    });
    let _ = stop.await;
    let Ok(relay) = std::sync::Arc::try_unwrap(relay) else { return Ok(()) };
    // Persisting a thousand peers' sync states is not what is measured: do not wait long.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), relay.shutdown()).await;
    Ok(())
}
