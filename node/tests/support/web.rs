//! Helpers of the web app's tests: a node driven through the real
//! `samverkan-node` binary in a temporary data directory, and its daemon or
//! `ui` with the web app on 127.0.0.1 port 0, whose printed address is read
//! back. Every wait is bounded.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The longest a command or a wait may take.
pub const LIMIT: Duration = Duration::from_secs(60);

/// A node's data directory, driven through the binary.
pub struct Cli {
    /// The data directory.
    pub dir: PathBuf,
}

impl Cli {
    /// `samverkan-node init --org <org> --name <name>` in `dir`.
    pub fn init(dir: &Path, org: &str, name: &str) -> Cli {
        let cli = Cli { dir: dir.to_path_buf() };
        cli.ok(&["init", "--org", org, "--name", name]);
        cli
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_samverkan-node"));
        cmd.arg("--data-dir").arg(&self.dir).args(args).env_remove("SAMVERKAN_SIGNER_PASSPHRASE");
        cmd
    }

    /// Runs a command with `input` on standard input; its exit status and output, within [`LIMIT`].
    pub fn run(&self, args: &[&str], input: &str) -> (bool, String, String) {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("samverkan-node starts");
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let deadline = Instant::now() + LIMIT;
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("samverkan-node {args:?} did not finish within {LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    /// Runs a command that must succeed; its standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args, "");
        assert!(ok, "samverkan-node {args:?} failed: {err}");
        out
    }

    /// Runs a command with `--json`; its value.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("JSON output")
    }

    /// The node's key (hex).
    pub fn key(&self) -> String {
        self.json(&["whoami"])["node"].as_str().unwrap().to_string()
    }

    /// Starts `samverkan-node <args…> --web-port 0` and waits for the web app's address.
    pub fn serve(&self, args: &[&str]) -> Served {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--web-port", "0"]);
        let mut child = self
            .command(&all)
            .env("SAMVERKAN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("samverkan-node starts");
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("web app: ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let err = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let Ok(url) = rx.recv_timeout(LIMIT) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("samverkan-node {all:?} printed no web address: {}", err.join().unwrap_or_default());
        };
        let rest = url.strip_prefix("http://").expect("an http address");
        let (host, secret) = rest.split_once("/login#").expect("a login address with the secret");
        Served { child: Some(child), url: url.clone(), addr: host.parse().expect("host:port"), secret: secret.into() }
    }
}

/// A running `daemon` or `ui`; interrupted (Ctrl-C) when stopped or dropped.
pub struct Served {
    child: Option<Child>,
    /// The printed login address.
    pub url: String,
    /// Where the web app listens.
    pub addr: SocketAddr,
    /// The node's web secret.
    pub secret: String,
}

impl Served {
    /// Interrupts it as Ctrl-C does and waits for it to end (killed after [`LIMIT`]).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").arg("-INT").arg(child.id().to_string()).status();
        let deadline = Instant::now() + LIMIT;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Answer {
    /// The first header of that (lowercase) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request (`Connection: close`) to `addr` with the `Host` header
/// `host` and the other headers given.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Answer {
    let mut stream = TcpStream::connect_timeout(&addr, LIMIT).expect("connect");
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        text.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    text.push_str(body);
    stream.write_all(text.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer { status, headers, body: body.to_string() }
}
