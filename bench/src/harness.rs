//! The one place where the benchmark starts relays and creates nodes.
//!
//! Keep every relay start and node creation here: when nodes must be enrolled
//! at the relay before they may connect, this module is what changes. Figure 5
//! runs the relay in a child process (this same binary, `relay-child`) so that
//! its memory and CPU can be read from `/proc` apart from the simulated nodes.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use samverkan_node::node::Node;
use samverkan_node::sync::RelayTarget;
use samverkan_relay::server::{self, RelayConfig, RelayHandle};

/// Starts a relay in this process on a free loopback port with data in `dir`.
pub async fn start_relay(dir: &Path) -> Result<RelayHandle> {
    let listen: SocketAddr = "127.0.0.1:0".parse().context("loopback address")?;
    server::spawn(RelayConfig::new(listen, dir.to_path_buf())).await.context("starting the relay")
}

/// Where nodes reach a relay started in this process.
pub fn target(relay: &RelayHandle) -> RelayTarget {
    RelayTarget { addr: relay.local_addr(), fingerprint: relay.fingerprint().to_string() }
}

/// Creates a node in `root/name` for organisation `org`, allowed to sync with the relay.
pub fn new_node(root: &Path, name: &str, org: &str) -> Result<Node> {
    Node::init(&root.join(name), org, Some(name)).with_context(|| format!("creating node {name}"))
}

/// Opens a second handle on an existing node's data directory (as another process would).
pub fn open_node(dir: &Path) -> Result<Node> {
    Node::open(dir).with_context(|| format!("opening node {}", dir.display()))
}

/// Name of a simulated node (figure 5) as it introduces itself to the relay.
pub fn sim_node_name(i: usize) -> String {
    format!("sim-{i:05}")
}

/// A relay running in a child process.
pub struct RelayProcess {
    child: Child,
    /// Where it listens and its certificate fingerprint.
    pub target: RelayTarget,
}

impl RelayProcess {
    /// Starts `samverkan-bench relay-child --dir <dir>` and waits for its address.
    pub fn start(dir: &Path) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the benchmark binary")?;
        let mut child = Command::new(exe)
            .arg("relay-child")
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the relay child process")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).context("reading the relay's address")?;
        let mut parts = line.split_whitespace();
        let (Some(addr), Some(fingerprint)) = (parts.next(), parts.next()) else {
            let _ = child.kill();
            bail!("the relay child printed {line:?}");
        };
        let target = RelayTarget { addr: addr.parse().context("relay address")?, fingerprint: fingerprint.into() };
        Ok(Self { child, target })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the child in bytes (`VmRSS`).
    pub fn rss_bytes(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .context("no VmRSS in /proc/<pid>/status")?;
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

/// Body of the `relay-child` subcommand: start a relay, print `ADDR FINGERPRINT`,
/// run until standard input closes.
pub async fn relay_child(dir: &Path) -> Result<()> {
    let relay = start_relay(dir).await?;
    println!("{} {}", relay.local_addr(), relay.fingerprint());
    let stop = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {}
    });
    let _ = stop.await;
    // Persisting a thousand peers' sync states is not what is measured: do not wait long.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), relay.shutdown()).await;
    Ok(())
}
