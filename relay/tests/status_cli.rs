//! `samverkan-relay serve` with its admin server and `samverkan-relay status`
//! reading it, as an operator runs them: real processes on 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const BIN: &str = env!("CARGO_BIN_EXE_samverkan-relay");

/// A relay process; killed when dropped.
struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(admin: &str, extra: &[&str], token: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["status", "--admin", admin]).args(extra).env_remove("SAMVERKAN_ADMIN_TOKEN");
    if let Some(token) = token {
        cmd.env("SAMVERKAN_ADMIN_TOKEN", token);
    }
    cmd.output().expect("run samverkan-relay status")
}

#[test]
fn status_reads_the_running_relay_through_its_admin_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--admin-token", "hemligt"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("SAMVERKAN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("relay starts");
    let stdout = child.stdout.take().unwrap();
    let relay = Relay(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let admin = loop {
        let line = rx.recv_timeout(LIMIT).expect("the relay prints its admin address");
        if let Some(rest) = line.strip_prefix("admin dashboard: http://") {
            break rest.split('/').next().unwrap().to_string();
        }
    };

    let refused = status(&admin, &[], None);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"), "{refused:?}");

    let table = status(&admin, &[], Some("hemligt"));
    assert!(table.status.success(), "{table:?}");
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(text.starts_with("samverkan-relay ") && text.contains("no node has connected yet"), "{text}");

    let json = status(&admin, &["--json"], Some("hemligt"));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON status");
    assert_eq!(value["relay"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(value["nodes"], serde_json::json!([]));
    drop(relay);

    // Nothing listens any more: a clear error, not a hang.
    let gone = status(&admin, &[], Some("hemligt"));
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("cannot read the relay's status"), "{gone:?}");
}

#[test]
fn an_admin_server_beyond_loopback_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("SAMVERKAN_ADMIN_TOKEN")
        .env("SAMVERKAN_LOG", "warn")
        .output()
        .expect("run samverkan-relay");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("give an admin token"), "{out:?}");
}

#[test]
fn serve_reads_its_configuration_file_and_flags_win_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    // The file puts the admin server beyond loopback without a token: refused…
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n[admin]\nlisten = \"0.0.0.0:0\"\n",
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .args(extra)
            .env_remove("SAMVERKAN_ADMIN_TOKEN")
            .env_remove("SAMVERKAN_RELAY_DATA_DIR")
            .env("SAMVERKAN_LOG", "warn")
            .output()
            .expect("run samverkan-relay")
    };
    let out = run(&[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("give an admin token"), "{out:?}");
    assert!(dir.path().join("data").join("relay.key").exists(), "the file's data_dir was used");

    // …a flag overrides the file's admin address; an unknown key is a clear error.
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nmax_conections = 3\n").unwrap();
    let out = run(&["--admin", "127.0.0.1:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_conections"), "{out:?}");
}
