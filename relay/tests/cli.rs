//! The operator's `samverkan-relay` commands as real processes: output into a
//! pipe closed early, and the enroll command a node prints for a signer.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_samverkan-relay");
const LIMIT: Duration = Duration::from_secs(60);

fn relay(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("SAMVERKAN_RELAY_DATA_DIR")
        .env("SAMVERKAN_LOG", "warn")
        .env("RUST_BACKTRACE", "1");
    cmd
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run samverkan-relay");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cmd` with standard output a pipe whose reader is gone already, as
/// when `… | head -1` has read its line: every write to it fails.
fn with_closed_stdout(cmd: &mut Command) -> Output {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    cmd.stdout(writer).output().expect("run samverkan-relay")
}

fn assert_quiet(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} into a closed pipe: {:?}\n{stderr}", out.status);
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{what}: {stderr}");
}

#[test]
fn every_command_ends_quietly_when_its_output_is_closed_early() {
    let dir = tempfile::tempdir().unwrap();
    let key = ok(&mut relay(dir.path(), &["key"])).trim().to_string();
    let node = samverkan_shared::identity::NodeKey::generate().node_id().to_string();
    let commands: Vec<Vec<&str>> = vec![
        vec!["key"],
        vec!["enroll", "--org", "Flen", "--name", "Flen BF", "--key", &node],
        vec!["enroll", "--org", "Flen", "--name", "Flen 2", "--join-code", "--address", "relay.lst.se:7878"],
        vec!["list"],
        vec!["list", "--json"],
        vec!["revoke", "--key", &node],
    ];
    for args in &commands {
        assert_quiet(&format!("{args:?}"), &with_closed_stdout(&mut relay(dir.path(), args)));
    }
    let help = with_closed_stdout(Command::new(BIN).arg("--help").env("RUST_BACKTRACE", "1"));
    assert_quiet("--help", &help);
    // Each did its work: enrolled, issued, revoked.
    let listed = ok(&mut relay(dir.path(), &["list"]));
    assert!(listed.contains("Flen BF") && listed.contains("revoked"), "{listed}");
    assert_eq!(ok(&mut relay(dir.path(), &["key"])).trim(), key);
}

#[test]
fn a_serving_relay_keeps_serving_when_its_output_is_closed_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = relay(dir.path(), &["serve", "--listen", "127.0.0.1:0", "--no-admin"]);
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child =
        cmd.env("SAMVERKAN_LOG", "info").stdout(writer).stderr(Stdio::piped()).spawn().expect("relay starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let deadline = Instant::now() + LIMIT;
    while !log.contains("relay listening") {
        assert!(Instant::now() < deadline, "the relay did not start: {log}");
        if stderr.read_line(&mut log).unwrap() == 0 {
            panic!("the relay ended: {log} {:?}", child.wait());
        }
    }
    // Its banner went nowhere; it serves on until told to stop.
    assert!(child.try_wait().unwrap().is_none(), "still serving: {log}");
    let killed = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the relay did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
    assert!(status.success(), "{status:?}: {log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// Runs `command` in a POSIX shell as an operator pastes it, with this
/// `samverkan-relay` first on the PATH.
fn paste(command: &str) -> Output {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("PATH", path)
        .env_remove("SAMVERKAN_RELAY_DATA_DIR")
        .env("SAMVERKAN_LOG", "warn")
        .output()
        .expect("run sh")
}

#[test]
fn the_enroll_command_a_node_prints_for_a_signer_works_pasted_once_the_data_directory_is_filled_in() {
    let root = tempfile::tempdir().unwrap();
    let relay_dir = root.path().join("relay data");
    ok(&mut relay(&relay_dir, &["key"]));
    let node = samverkan_node::node::Node::init(&root.path().join("lst"), "Länsstyrelsen", None).unwrap();
    let profile = node.create_signer("Beatrice Ask", "Landshövding (t.f.) \"BA\" o'Neil", None).unwrap();
    let printed = samverkan_node::approvals::enroll_command(&profile, None);
    let placeholder = samverkan_node::approvals::RELAY_DATA_DIR_PLACEHOLDER;
    assert!(printed.starts_with(&format!("samverkan-relay enroll --data-dir {placeholder} --key {} ", profile.key)));

    // Left as printed, the placeholder is refused and sets up no relay.
    let out = paste(&format!("cd {} && {printed}", root.path().display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(&format!("{placeholder} holds no relay")), "{stderr}");
    assert!(!root.path().join(placeholder).exists());

    // Filled in, it enrolls the signer with the name and role as given.
    let filled = printed.replace(placeholder, &samverkan_node::approvals::shell_word(&relay_dir.to_string_lossy()));
    let out = paste(&filled);
    assert!(out.status.success(), "{filled}: {}", String::from_utf8_lossy(&out.stderr));
    // As the node prints it when it knows the directory.
    assert_eq!(filled, samverkan_node::approvals::enroll_command(&profile, Some(&relay_dir)));
    let listed: serde_json::Value = serde_json::from_str(&ok(&mut relay(&relay_dir, &["list", "--json"]))).unwrap();
    let member = &listed["members"][0];
    assert_eq!(member["key"], profile.key.to_string());
    assert_eq!(member["kind"], "signer");
    assert_eq!(member["name"], "Beatrice Ask");
    assert_eq!(member["role"], profile.role.as_str());
    assert_eq!(member["org"], "lansstyrelsen-sodermanland");
}

#[test]
fn the_relays_organisations_file_lets_the_operator_enroll_another_countys_organisations() {
    let dir = tempfile::tempdir().unwrap();
    ok(&mut relay(dir.path(), &["key"]));
    let key = samverkan_shared::identity::NodeKey::generate().node_id().to_string();
    let enroll = |org: &str| {
        relay(dir.path(), &["enroll", "--org", org, "--name", "Västerås BF", "--key", &key]).output().unwrap()
    };
    let unknown = enroll("Västerås");
    assert!(!unknown.status.success(), "not in the built-in directory");
    std::fs::write(
        dir.path().join("organisations.toml"),
        "[[county]]\nid = \"vastmanland\"\nname = \"Västmanlands län\"\n\n[[organisation]]\nid = \"vasteras-stad\"\n\
         county = \"vastmanland\"\nkind = \"municipality\"\nname = \"Västerås stad\"\naliases = [\"Västerås\"]\n",
    )
    .unwrap();
    let enrolled = enroll("Västerås");
    assert!(enrolled.status.success(), "{}", String::from_utf8_lossy(&enrolled.stderr));
    let listed = ok(&mut relay(dir.path(), &["list"]));
    assert!(listed.contains("Västerås BF") && listed.contains("vasteras-stad"), "{listed}");
    // A broken file is named, never silently ignored.
    std::fs::write(dir.path().join("organisations.toml"), "[[organisation]]\nid = 'x'\n").unwrap();
    let broken = enroll("Flen");
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(!broken.status.success() && stderr.contains("organisations.toml"), "{stderr}");
}

#[test]
fn a_join_code_carries_every_instance_address_given_and_a_bad_address_issues_nothing() {
    let dir = tempfile::tempdir().unwrap();
    ok(&mut relay(dir.path(), &["key"]));
    let enroll = |addresses: &[&str]| {
        let mut args = vec!["enroll", "--org", "Flen", "--name", "Flen BF", "--join-code"];
        for address in addresses {
            args.extend(["--address", address]);
        }
        relay(dir.path(), &args).output().expect("run samverkan-relay")
    };
    // Repeated, or separated by commas: every address, in the order given.
    for given in [&["relay1.lst.se:7878", "relay2.lst.se:7878"][..], &["relay1.lst.se:7878,relay2.lst.se:7878"]] {
        let out = enroll(given);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let code = text.split_whitespace().find(|w| w.starts_with("svk1.")).expect("a code is printed");
        let code: samverkan_shared::directory::JoinCode = code.parse().unwrap();
        assert_eq!(code.relay_addresses, ["relay1.lst.se:7878", "relay2.lst.se:7878"]);
    }
    // The pending codes, as the relay keeps them (in its enrollment state).
    let pending = || {
        use samverkan_relay::storage::{RelayStorage, SqliteStorage};
        let storage = SqliteStorage::open(&dir.path().join("relay.db"), 1).unwrap();
        let state: serde_json::Value =
            serde_json::from_str(&storage.meta("relay.enrollment").unwrap().unwrap()).unwrap();
        state["joins"].as_array().map(Vec::len)
    };
    assert_eq!(pending(), Some(2));
    // A bad address is named, and no code is issued for it.
    let out = enroll(&["relay1.lst.se:7878", "relay2.lst.se"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("address 2 of 2") && err.contains("has no port"), "{err}");
    assert_eq!(pending(), Some(2), "nothing was issued");
}
