//! Disk full and a read-only data directory, on a real filesystem: a small
//! tmpfs mounted for the test (the test needs root and `mount`; without them
//! it says so and skips). The real `samverkan-node` binary must fail with a
//! clear message, leave the database intact (`check` passes, every saved edit
//! is still there) and work again once space returns or the directory is
//! writable again.

use std::path::{Path, PathBuf};
use std::process::Command;

use samverkan_node::node::Node;
use samverkan_shared::ids::DocId;
use samverkan_shared::model::{DocKind, DocumentContent};

const BIN: &str = env!("CARGO_BIN_EXE_samverkan-node");

/// A tmpfs of `size`, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!("SKIPPED: cannot mount a tmpfs here (needs root and mount); disk-full behaviour not tested");
            return None;
        }
        Some(Self { path, _dir: dir })
    }

    fn remount(&self, options: &str) {
        let status =
            Command::new("mount").args(["-o", &format!("remount,{options}")]).arg(&self.path).status().unwrap();
        assert!(status.success(), "remount {options}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Runs one CLI edit; returns (success, stdout + stderr).
fn cli_edit(dir: &Path, id: &DocId, what: &str) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(["activity", "add", id.as_str(), what])
        .output()
        .expect("run samverkan-node");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn activities(dir: &Path, id: &DocId) -> Vec<String> {
    let node = Node::open(dir).expect("open");
    let problems = node.check().expect("check runs");
    assert!(problems.is_empty(), "database damaged: {problems:?}");
    node.document(id).unwrap().view().unwrap().activities.into_iter().map(|a| a.what).collect()
}

fn setup(root: &Path) -> (PathBuf, DocId) {
    let dir = root.join("node");
    let mut node = Node::init(&dir, "Flen", Some("flen")).unwrap();
    let mut content = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Flen 2026");
    content.parties = vec![node.org().clone()];
    content.body = "Text. ".repeat(200);
    let id = node.create(content).unwrap();
    (dir, id)
}

#[test]
fn a_full_disk_gives_a_clear_error_keeps_everything_and_recovers() {
    let Some(fs) = Tmpfs::mount("4m") else { return };
    let (dir, id) = setup(&fs.path);
    let (ok, out) = cli_edit(&dir, &id, "before the disk filled");
    assert!(ok, "{out}");

    // Fill the disk to the last byte.
    let filler = fs.path.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0u8; 1]);
        let _ = f.sync_all();
    }
    // Edits now fail, clearly, every time; nothing is damaged.
    let mut failures = 0;
    let mut saved = vec!["before the disk filled".to_string()];
    for i in 0..20 {
        let what = format!("while full {i}");
        let (ok, out) = cli_edit(&dir, &id, &what);
        if ok {
            // SQLite may still find room in free pages: then the edit is saved.
            saved.push(what);
            continue;
        }
        failures += 1;
        assert!(out.contains("disk is full"), "unclear error on a full disk: {out}");
    }
    assert!(failures > 0, "no edit failed on a full disk");

    // Space returns: nothing was damaged or lost, and the node works again.
    // (While the disk is full even opening fails — with the same clear error —
    // because WAL mode must create its `-wal` and `-shm` files.)
    std::fs::remove_file(&filler).unwrap();
    let present = activities(&dir, &id);
    for s in &saved {
        assert!(present.contains(s), "{s} lost on a full disk");
    }
    let (ok, out) = cli_edit(&dir, &id, "after space returned");
    assert!(ok, "no recovery after space returned: {out}");
    saved.push("after space returned".into());
    let present = activities(&dir, &id);
    for s in &saved {
        assert!(present.contains(s), "{s} lost after recovery");
    }
    println!("disk full: {failures} of 20 edits refused with a clear error; {} saved edits all present", saved.len());
}

#[test]
fn a_read_only_data_directory_gives_a_clear_error_and_recovers() {
    let Some(fs) = Tmpfs::mount("16m") else { return };
    let (dir, id) = setup(&fs.path);
    let (ok, out) = cli_edit(&dir, &id, "before read-only");
    assert!(ok, "{out}");

    fs.remount("ro");
    let (ok, out) = cli_edit(&dir, &id, "while read-only");
    println!("read-only error: {}", out.trim());
    assert!(!ok, "an edit succeeded on a read-only filesystem");
    assert!(
        out.to_lowercase().contains("read-only") || out.to_lowercase().contains("readonly"),
        "unclear error: {out}"
    );

    fs.remount("rw");
    let (ok, out) = cli_edit(&dir, &id, "after read-write");
    assert!(ok, "no recovery: {out}");
    let present = activities(&dir, &id);
    assert!(present.contains(&"before read-only".to_string()));
    assert!(present.contains(&"after read-write".to_string()));
    assert!(!present.contains(&"while read-only".to_string()));
}
