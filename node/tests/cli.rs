//! The `samverkan-node` binary as a coordinator uses it: real processes, real
//! SQLite files in temporary directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const SEED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/seed/lansovergripande-samverkansoverenskommelse-sodermanland-2023.md"
);

struct Cli {
    data_dir: PathBuf,
}

impl Cli {
    fn new(root: &Path, name: &str) -> Self {
        Self { data_dir: root.join(name) }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_samverkan-node"));
        cmd.arg("--data-dir").arg(&self.data_dir).args(args).env_remove("SAMVERKAN_DATA_DIR");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run samverkan-node")
    }

    /// Runs and expects success; returns standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "samverkan-node {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs and expects failure; returns standard error.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "samverkan-node {args:?} should have failed");
        String::from_utf8(out.stderr).expect("utf-8 output")
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("valid JSON")
    }
}

/// Enrolls these nodes at a relay on paper: a relay key and its signed
/// directory, as `join` and a first sync leave them, so that their bundles are
/// accepted by each other without a network.
fn enroll_on_paper(nodes: &[&Cli]) {
    use samverkan_node::node::{Node, META_RELAY_KEY};
    use samverkan_shared::directory::{EnrollmentDirectory, Member, MemberKind};
    let relay = samverkan_shared::identity::NodeKey::generate();
    let mut directory = EnrollmentDirectory::default();
    let mut opened = Vec::new();
    for cli in nodes {
        let node = Node::open(&cli.data_dir).expect("open node");
        let member = Member {
            key: node.node_id(),
            kind: MemberKind::Node,
            org: node.org().clone(),
            name: node.name().to_string(),
            role: None,
            enrolled_at: chrono::Utc::now(),
            revoked_at: None,
        };
        directory.enroll(member).expect("enroll");
        opened.push(node);
    }
    let signed = directory.sign(relay.signing_key()).encode();
    for mut node in opened {
        node.store_mut().set_meta(META_RELAY_KEY, &relay.node_id().to_string()).expect("pin");
        node.store_enrollment(&signed, &relay.node_id()).expect("directory verifies");
    }
}

#[test]
fn a_coordinator_works_offline_and_hands_changes_over_on_a_stick() {
    let root = tempfile::tempdir().unwrap();
    let county = Cli::new(root.path(), "county");
    let flen = Cli::new(root.path(), "flen");
    county.ok(&["init", "--org", "Länsstyrelsen", "--name", "BF-samordnare Länsstyrelsen"]);
    flen.ok(&["init", "--org", "Flen"]);
    assert!(county.fails(&["init", "--org", "Flen"]).contains("already holds"));

    let imported = county.json(&["import", SEED]);
    let id = imported["id"].as_str().unwrap().to_string();
    let short = &id[..6];
    let shown = county.ok(&["show", short]);
    assert!(shown.contains("Undertecknas av: Landshövding, Länsstyrelsen i Södermanlands län (Beatrice Ask)"));
    assert!(shown.contains("Giltighet: 2023-10-18"));

    // Structured edits through the CLI.
    let added = county.json(&[
        "activity",
        "add",
        short,
        "Regional lägesbild för alla kommuner",
        "--owner",
        "Länsstyrelsen",
        "--due",
        "2024-06-30",
    ]);
    let activity = added["activity"].as_str().unwrap().to_string();
    county.ok(&["activity", "set", short, &activity[..4], "--status", "ongoing"]);
    county.ok(&[
        "followup",
        "add",
        short,
        "Lägesbilden klar för sju av nio kommuner",
        "--date",
        "2024-09-01",
        "--activity",
        &activity,
    ]);
    county.ok(&[
        "meeting",
        "add",
        short,
        "--body",
        "styrgrupp",
        "--date",
        "2024-03-12",
        "--notes",
        "Verksamhetsplanen beslutad.",
    ]);
    county.ok(&["goal", "add", short, "Fler aktörer bidrar till att förebygga brott"]);
    county.ok(&["set", short, "period.end", "2026-12-31"]);
    let view = county.json(&["show", short]);
    let doc = &view["document"];
    assert_eq!(doc["activities"][0]["status"], "ongoing");
    assert_eq!(doc["period"]["end"], "2026-12-31");
    assert_eq!(doc["followups"][0]["activity"], activity.as_str());
    assert_eq!(doc["meetings"][0]["body"], "steering_group");

    // Clear errors, and nothing saved by a refused edit.
    assert!(county
        .fails(&["set", short, "period.end", "2020-01-01"])
        .contains("ends (2020-01-01) before it starts (2023-10-18)"));
    assert!(county.fails(&["set", short, "title", ""]).contains("title is empty"));
    assert!(county
        .fails(&["activity", "add", short, "x", "--owner", "Uppsala"])
        .contains("unknown organisation \"Uppsala\""));
    assert!(county.fails(&["show", "ffff"]).contains("no document matches"));
    assert_eq!(county.json(&["show", short])["document"], *doc);

    // Flen joins the work: a bundle carries only documents the receiver's organisation is a party to.
    county.ok(&["set", short, "parties", "Länsstyrelsen, Polisen, Flen"]);
    enroll_on_paper(&[&county, &flen]);

    // Hand everything to Flen on a stick; Flen edits offline and hands back only what is new.
    let stick = root.path().join("stick.bundle");
    let heads = root.path().join("flen.heads");
    flen.ok(&["bundle", "heads", heads.to_str().unwrap()]);
    county.ok(&["bundle", "export", stick.to_str().unwrap(), "--have", heads.to_str().unwrap()]);
    let report = flen.json(&["bundle", "import", stick.to_str().unwrap()]);
    assert_eq!(report["documents"][0]["created"], true);
    let what = format!("activities.{activity}.what");
    flen.ok(&["set", short, &what, "Regional lägesbild för länets nio kommuner"]);
    let county_heads = root.path().join("county.heads");
    county.ok(&["bundle", "heads", county_heads.to_str().unwrap()]);
    flen.ok(&["bundle", "export", stick.to_str().unwrap(), "--have", county_heads.to_str().unwrap()]);
    let report = county.json(&["bundle", "import", stick.to_str().unwrap()]);
    assert_eq!(report["documents"][0]["changed"], true);
    assert_eq!(county.json(&["show", short])["document"], flen.json(&["show", short])["document"]);

    // History names organisations and nodes, never raw keys.
    let history = county.ok(&["history", short]);
    assert!(
        history.contains("Länsstyrelsen i Södermanlands län (BF-samordnare Länsstyrelsen): add activity"),
        "{history}"
    );
    assert!(history.contains("Flens kommun (Flens kommun): set activities."), "{history}");

    // A damaged bundle is refused with a clear message.
    let mut bytes = std::fs::read(&stick).unwrap();
    let last = bytes.len() - 40;
    bytes[last] ^= 1;
    std::fs::write(&stick, bytes).unwrap();
    assert!(county.fails(&["bundle", "import", stick.to_str().unwrap()]).contains("damaged"));
    assert!(county.ok(&["check"]).contains("intact"));
}

#[test]
fn edit_opens_the_editor_and_applies_the_changes() {
    let root = tempfile::tempdir().unwrap();
    let node = Cli::new(root.path(), "node");
    node.ok(&["init", "--org", "Eskilstuna"]);
    let id = node.json(&[
        "new",
        "citizen_promise",
        "--title",
        "Medborgarlöfte Eskilstuna 2025",
        "--party",
        "Eskilstuna",
        "--party",
        "Polisen",
    ])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // An "editor" that rewrites one heading and adds a paragraph, as a person would.
    let script = root.path().join("editor.sh");
    std::fs::write(&script, "#!/bin/sh\nsed -i 's/^## Vi lovar$/## Vi lovar invånarna/' \"$1\"\nprintf '\\nTrygghetsvandringar varje månad.\\n' >> \"$1\"\n").unwrap();
    std::process::Command::new("chmod").arg("+x").arg(&script).status().unwrap();
    let out = node.command(&["edit", &id]).env("EDITOR", &script).env_remove("VISUAL").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let body = node.json(&["show", &id])["document"]["body"].as_str().unwrap().to_string();
    assert!(body.contains("## Vi lovar invånarna\n"), "{body}");
    assert!(body.ends_with("Trygghetsvandringar varje månad.\n"), "{body}");
    assert_eq!(node.json(&["show", &id])["document"]["scope"], "local");

    // An editor that breaks the front matter: a clear error and the user's text kept.
    std::fs::write(&script, "#!/bin/sh\nsed -i 's/^kind = .*/kind = \"nonsense\"/' \"$1\"\n").unwrap();
    let out = node.command(&["edit", &id]).env("EDITOR", &script).env_remove("VISUAL").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("your text is kept in") && err.contains("unknown document kind \"nonsense\""), "{err}");
}

#[test]
fn damaged_and_foreign_files_give_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let node = Cli::new(root.path(), "node");
    assert!(node.fails(&["list"]).contains("run `samverkan-node init"));
    node.ok(&["init", "--org", "Trosa"]);
    std::fs::write(node.data_dir.join("node.db"), vec![0x42u8; 8192]).unwrap();
    let err = node.fails(&["list"]);
    assert!(err.contains("is not a Samverkan database"), "{err}");
    assert!(!err.contains("panicked"));

    let other = Cli::new(root.path(), "other");
    other.ok(&["init", "--org", "Gnesta"]);
    std::fs::write(other.data_dir.join("node.key"), "garbage").unwrap();
    assert!(other.fails(&["list"]).contains("not a Samverkan key file"));
}

#[test]
fn every_command_has_help() {
    let root = tempfile::tempdir().unwrap();
    let node = Cli::new(root.path(), "node");
    for cmd in [
        vec!["--help"],
        vec!["init", "--help"],
        vec!["new", "--help"],
        vec!["import", "--help"],
        vec!["export", "--help"],
        vec!["list", "--help"],
        vec!["show", "--help"],
        vec!["set", "--help"],
        vec!["edit", "--help"],
        vec!["activity", "add", "--help"],
        vec!["activity", "set", "--help"],
        vec!["followup", "add", "--help"],
        vec!["history", "--help"],
        vec!["conflicts", "--help"],
        vec!["bundle", "export", "--help"],
        vec!["bundle", "import", "--help"],
        vec!["signer", "new", "--help"],
        vec!["approve", "--help"],
        vec!["withdraw", "--help"],
        vec!["verify", "--help"],
        vec!["diff", "--help"],
        vec!["verify-bundle", "--help"],
        vec!["recover", "--help"],
        vec!["relay", "list", "--help"],
        vec!["relay", "add-address", "--help"],
        vec!["relay", "remove-address", "--help"],
    ] {
        let out = node.ok(&cmd);
        assert!(out.contains("Usage:"), "{cmd:?}: {out}");
    }
}

#[test]
fn status_without_a_relay_shows_waiting_changes_and_counts_a_look() {
    let root = tempfile::tempdir().unwrap();
    let flen = Cli::new(root.path(), "flen");
    flen.ok(&["init", "--org", "Flen"]);
    flen.ok(&["new", "citizen_promise", "--title", "Medborgarlöfte Flen 2026"]);
    let text = flen.ok(&["status"]);
    assert!(text.contains("relay: none configured yet"), "{text}");
    assert!(text.contains("last successful sync: never"), "{text}");
    assert!(text.contains("1 local change(s) waiting to be sent"), "{text}");
    let status = flen.json(&["status", "--offline", "--peek"]);
    assert_eq!(status["docs"][0]["local_changes_waiting"], 1);
    assert_eq!(status["docs"][0]["remote_changes_since_last_look"], 0);
    assert_eq!(status["last_success"], Value::Null);
}

#[test]
fn recover_shows_the_plan_then_recovers_a_refused_document_with_a_backup() {
    use samverkan_node::store::{DocRefusal, Store};
    let root = tempfile::tempdir().unwrap();
    let flen = Cli::new(root.path(), "flen");
    flen.ok(&["init", "--org", "Flen"]);
    let id = flen.json(&["new", "operations_plan", "--title", "Verksamhetsplan Flen 2026"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let err = flen.fails(&["recover", &id]);
    assert!(err.contains("nothing to recover: the relay has not refused"), "{err}");
    flen.ok(&["set", &id, "place", "Flen"]);
    let accepted: Vec<automerge::ChangeHash> = flen.json(&["show", &id])["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().parse().unwrap())
        .collect();
    flen.ok(&["set", &id, "body", "## Lägesbild\n\nInbrotten ökar nattetid.\n"]);
    // The sync client records the relay's refusal: Flen's changes up to number 2 are held.
    let mut store = Store::open(&flen.data_dir.join("node.db")).unwrap();
    let doc = id.parse().unwrap();
    store
        .set_refusal(&DocRefusal {
            doc,
            kind: samverkan_shared::wire::RefusalKind::TooLarge,
            reason: "a change is larger than the relay allows".into(),
            local_heads: Vec::new(),
            peer_heads: accepted,
            your_seq: 2,
            refused_at: chrono::Utc::now(),
        })
        .unwrap();
    drop(store);
    let text = flen.ok(&["recover", &id[..8]]);
    assert!(text.contains("a change is larger than the relay allows"), "{text}");
    assert!(text.contains("set body") && text.contains("re-apply"), "{text}");
    let plan = flen.json(&["recover", &id]);
    assert_eq!(plan["changes"][0]["action"], "reapply");
    let report = flen.json(&["recover", &id, "--apply"]);
    assert_eq!(report["changes"][0]["outcome"], "reapplied");
    assert_eq!(report["changes"][0]["new_seq"], 3);
    let backup = PathBuf::from(report["backup"].as_str().unwrap());
    assert!(backup.starts_with(flen.data_dir.join("recovered")) && backup.exists());
    assert!(std::fs::read_to_string(report["backup_markdown"].as_str().unwrap()).unwrap().contains("nattetid"));
    assert!(flen.ok(&["show", &id]).contains("Inbrotten ökar nattetid."));
    assert!(flen.ok(&["history", &id]).contains("set body (återställd)"));
    assert!(flen.fails(&["recover", &id, "--apply"]).contains("nothing to recover"));
    flen.ok(&["check"]);
}

/// Gives the node in `data_dir` a relay-signed enrollment directory naming
/// `signers` (as a sync would), signed by `relay`.
fn give_directory(
    data_dir: &Path,
    relay: &samverkan_shared::identity::NodeKey,
    signers: &[(String, &str, &str, &str)],
) {
    use samverkan_shared::directory::{EnrollmentDirectory, Member, MemberKind};
    let mut directory = EnrollmentDirectory::default();
    for (key, org, name, role) in signers {
        directory
            .enroll(Member {
                key: key.parse().unwrap(),
                kind: MemberKind::Signer,
                org: samverkan_shared::org::OrgId::new(org).unwrap(),
                name: name.to_string(),
                role: Some(role.to_string()),
                enrolled_at: chrono::Utc::now() - chrono::Duration::minutes(1),
                revoked_at: None,
            })
            .unwrap();
    }
    let mut node = samverkan_node::node::Node::open(data_dir).unwrap();
    node.store_mut().set_meta(samverkan_node::node::META_RELAY_KEY, &relay.node_id().to_string()).unwrap();
    node.store_enrollment(&directory.sign(relay.signing_key()).encode(), &relay.node_id()).unwrap();
}

/// Gives the node in `data_dir` the relay's receipts of every approval record
/// it holds, received now (as a sync would after the relay accepted them).
fn give_receipts(data_dir: &Path, relay: &samverkan_shared::identity::NodeKey) {
    use samverkan_shared::receipt::ApprovalReceipt;
    let mut node = samverkan_node::node::Node::open(data_dir).unwrap();
    let mut receipts = Vec::new();
    for summary in node.list().unwrap() {
        let doc = node.document(&summary.id).unwrap();
        for (_, record) in samverkan_shared::approval::records(&doc) {
            let record = record.unwrap();
            receipts.push(ApprovalReceipt::issue(relay, &summary.id, &record.signature, chrono::Utc::now()).unwrap());
        }
    }
    let (_, refused) = node.store_receipts(receipts, &relay.node_id()).unwrap();
    assert!(refused.is_empty(), "{refused:?}");
}

#[test]
fn signers_approve_the_seed_and_the_bundle_verifies_without_a_database() {
    let root = tempfile::tempdir().unwrap();
    let lst = Cli::new(root.path(), "lst");
    lst.ok(&["init", "--org", "Länsstyrelsen"]);
    let id = lst.json(&["import", SEED])["id"].as_str().unwrap().to_string();
    let governor = lst.json(&["signer", "new", "--name", "Beatrice Ask", "--role", "Landshövding"]);
    let chief = lst.json(&[
        "signer",
        "new",
        "--name",
        "Mattias Forssten",
        "--role",
        "Polisområdeschef",
        "--org",
        "Polisområde Södermanland",
    ]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(lst.data_dir.join("signers/beatrice-ask.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let err = lst.fails(&["verify", &id]);
    assert!(err.contains("no enrollment directory"), "{err}");
    let err = lst.fails(&["approve", &id, "--as", "Beatrice Ask"]);
    assert!(err.contains("no enrollment directory"), "{err}");

    let relay = samverkan_shared::identity::NodeKey::generate();
    give_directory(
        &lst.data_dir,
        &relay,
        &[
            (
                governor["key"].as_str().unwrap().to_string(),
                "lansstyrelsen-sodermanland",
                "Beatrice Ask",
                "Landshövding",
            ),
            (
                chief["key"].as_str().unwrap().to_string(),
                "polisomrade-sodermanland",
                "Mattias Forssten",
                "Polisområdeschef",
            ),
        ],
    );
    let text = lst.ok(&["approve", &id, "--as", "Beatrice Ask"]);
    assert!(text.contains("Signed version"), "{text}");
    // Not counted until the relay has received it.
    let text = lst.ok(&["status", &id]);
    assert!(text.contains("draft") && text.contains("AWAITING RELAY RECEIPT (not counted yet)"), "{text}");
    let err = lst.fails(&["verify", &id]);
    assert!(err.contains("no receipt from the relay yet"), "{err}");
    give_receipts(&lst.data_dir, &relay);
    let text = lst.ok(&["status", &id]);
    assert!(text.contains("awaiting signatures"), "{text}");
    assert!(text.contains("missing: Polisområdeschef"), "{text}");
    lst.ok(&["approve", &id, "--as", "Mattias Forssten"]);
    give_receipts(&lst.data_dir, &relay);
    let status = lst.json(&["status", &id]);
    assert_eq!(status["approval"]["state"], "approved", "{status}");
    assert!(lst.ok(&["verify", &id]).contains("2 record(s), 0 invalid, 0 awaiting the relay's receipt"));
    assert!(
        lst.ok(&["status", "--offline", "--peek"]).contains("1 document(s)"),
        "status without a document is unchanged"
    );

    lst.ok(&["set", &id, "place", "Eskilstuna"]);
    let text = lst.ok(&["status", &id]);
    assert!(text.contains("changed since approval"), "{text}");
    assert!(lst.ok(&["show", &id, "--version", "signed"]).contains("Nyköping/ Eskilstuna"));
    let diff = lst.ok(&["diff", &id]);
    assert!(diff.contains("-place = \"Nyköping/ Eskilstuna\"") && diff.contains("+place = \"Eskilstuna\""), "{diff}");

    let bundle = root.path().join("bundle");
    lst.ok(&["export", &id, "--signed", bundle.to_str().unwrap()]);
    let nowhere = Cli::new(root.path(), "no-database-here");
    let relay_key = relay.node_id().to_string();
    let text = nowhere.ok(&["verify-bundle", bundle.to_str().unwrap(), "--relay-key", &relay_key]);
    assert!(text.starts_with("VALID"), "{text}");
    assert!(text.contains("Beatrice Ask") && text.contains("Mattias Forssten"), "{text}");
    assert!(!nowhere.data_dir.exists(), "verify-bundle needs no data directory");

    for file in ["manifest.json", "document.md", "history.automerge"] {
        let path = bundle.join(file);
        let original = std::fs::read(&path).unwrap();
        let mut bytes = original.clone();
        let at = bytes.len() / 3;
        bytes[at] ^= 0x02;
        std::fs::write(&path, &bytes).unwrap();
        let err = nowhere.fails(&["verify-bundle", bundle.to_str().unwrap(), "--relay-key", &relay_key]);
        assert!(err.contains("does NOT verify") && err.contains(file), "{file}: {err}");
        std::fs::write(&path, &original).unwrap();
    }
    let other = samverkan_shared::identity::NodeKey::generate().node_id().to_string();
    let err = nowhere.fails(&["verify-bundle", bundle.to_str().unwrap(), "--relay-key", &other]);
    assert!(err.contains("does NOT verify"), "{err}");

    lst.ok(&["withdraw", &id, "--as", "Beatrice Ask"]);
    give_receipts(&lst.data_dir, &relay);
    let status = lst.json(&["status", &id]);
    assert_eq!(status["approval"]["withdrawn"].as_array().unwrap().len(), 1, "{status}");
    assert_ne!(status["approval"]["state"], "approved");
}

#[test]
fn a_garbled_join_code_says_what_is_wrong_with_it() {
    let root = tempfile::tempdir().unwrap();
    let flen = Cli::new(root.path(), "flen");
    flen.ok(&["init", "--org", "Flen"]);
    let secret = "0".repeat(32);
    let key = samverkan_shared::identity::NodeKey::generate().node_id().to_string();
    for (code, expected) in [
        ("svk1".to_string(), "it has 1 of the 4 parts"),
        (format!("svk1.{secret}.{key}"), "it has 3 of the 4 parts"),
        (format!("svk1.{}.{key}.relay.lst.se:7878", &secret[1..]), "secret (its second part) has 31 hex digits"),
        (format!("svk1.{secret}.{}.relay.lst.se:7878", &key[..60]), "relay key (its third part) has 60 hex digits"),
        (format!("svk1.{secret}.{key}.relay.lst.se"), "relay address (its fourth part) \"relay.lst.se\" has no port"),
        (format!("join.{secret}.{key}.relay.lst.se:7878"), "it starts with \"join.0000000\""),
    ] {
        let err = flen.fails(&["join", &code]);
        assert!(err.contains(expected), "{code}: {err}");
        assert!(err.contains("ask the operator for a new one"), "says what to do: {err}");
        assert!(!err.contains("signed directory"), "{err}");
    }
    // Nothing was pinned by a failed join.
    assert!(flen.ok(&["status", "--offline"]).contains("relay: none configured yet"));
}

#[test]
fn importing_the_same_file_twice_is_refused_unless_a_new_copy_is_asked_for() {
    let root = tempfile::tempdir().unwrap();
    let county = Cli::new(root.path(), "county");
    county.ok(&["init", "--org", "Länsstyrelsen"]);
    let id = county.json(&["import", SEED])["id"].as_str().unwrap().to_string();
    let short = &id[..8];

    let refused = county.fails(&["import", SEED]);
    assert!(refused.contains(&format!("document {short} has this content already")), "{refused}");
    assert!(refused.contains("--new-copy") && refused.contains("nothing was imported"), "{refused}");
    assert_eq!(county.json(&["list"]).as_array().unwrap().len(), 1);

    // Sharing it with more parties since does not hide it.
    county.ok(&["set", short, "parties", "Länsstyrelsen, Polisen, Flen"]);
    assert!(county.fails(&["import", SEED]).contains(short));

    // A file exported from it is applied to it, as before.
    let exported = root.path().join("avtal.md");
    county.ok(&["export", short, "--output", exported.to_str().unwrap()]);
    let text = std::fs::read_to_string(&exported).unwrap().replace("Samverkan", "Samverkan (reviderad)");
    std::fs::write(&exported, text).unwrap();
    let updated = county.json(&["import", exported.to_str().unwrap()]);
    assert_eq!(updated["id"], id.as_str());
    assert_eq!(county.json(&["list"]).as_array().unwrap().len(), 1);

    // --new-copy makes a second document: of the seed, and of an exported file.
    let copy = county.json(&["import", "--new-copy", SEED])["id"].as_str().unwrap().to_string();
    assert_ne!(copy, id);
    let template =
        county.json(&["import", "--new-copy", exported.to_str().unwrap()])["id"].as_str().unwrap().to_string();
    assert!(template != id && template != copy);
    assert_eq!(county.json(&["list"]).as_array().unwrap().len(), 3);
}

#[test]
fn a_front_matter_error_names_the_file_and_its_line() {
    let root = tempfile::tempdir().unwrap();
    let flen = Cli::new(root.path(), "flen");
    flen.ok(&["init", "--org", "Flen"]);
    let file = root.path().join("löfte.md");
    std::fs::write(
        &file,
        "+++\nsamverkan = 1\nkind = \"citizen_promise\"\ntitle = \"Medborgarlöfte Flen\"\nparties = [\"Flen\"]\n\n[period]\nstart = 2025-01-01x\n+++\n## Vi lovar\n",
    )
    .unwrap();
    let err = flen.fails(&["import", file.to_str().unwrap()]);
    assert!(err.contains("löfte.md was not imported"), "{err}");
    assert!(err.contains("line 8") && err.contains("8 | start = 2025-01-01x"), "the file's line 8: {err}");
}

/// Runs `cmd` with standard output a pipe whose reader is gone already, as
/// when `… | head -1` has read its line: every write to it fails.
fn with_closed_stdout(cmd: &mut Command) -> Output {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    cmd.stdout(writer).output().expect("run samverkan-node")
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let root = tempfile::tempdir().unwrap();
    let county = Cli::new(root.path(), "county");
    county.ok(&["init", "--org", "Länsstyrelsen"]);
    let id = county.json(&["import", SEED])["id"].as_str().unwrap().to_string();
    let short = &id[..8];
    let commands: Vec<Vec<&str>> = vec![
        vec!["--help"],
        vec!["list"],
        vec!["--json", "list"],
        vec!["show", short],
        vec!["show", short, "--markdown"],
        vec!["export", short],
        vec!["history", short],
        vec!["conflicts", short],
        vec!["orgs"],
        vec!["whoami"],
        vec!["status", "--offline"],
        vec!["status", short],
        vec!["signer", "list"],
        vec!["check"],
        vec!["new", "operations_plan", "--title", "Verksamhetsplan 2026"],
    ];
    for args in &commands {
        let out = with_closed_stdout(county.command(args).env("RUST_BACKTRACE", "1"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "samverkan-node {args:?} into a closed pipe: {:?}\n{stderr}", out.status);
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{args:?}: {stderr}");
        assert!(stderr.trim().is_empty(), "{args:?} says nothing more: {stderr}");
    }
    // The command did its work before it found nobody reading.
    assert_eq!(county.json(&["list"]).as_array().unwrap().len(), 2);

    // With standard error closed too, a failing command still fails with its
    // own exit status, not a panic's (101).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = with_closed_stdout(county.command(&["show", "0000"]).stderr(writer));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn signer_new_prints_an_enroll_command_with_the_relays_data_directory_or_a_marked_placeholder() {
    let root = tempfile::tempdir().unwrap();
    let lst = Cli::new(root.path(), "lst");
    lst.ok(&["init", "--org", "Länsstyrelsen"]);
    let text = lst.ok(&["signer", "new", "--name", "Beatrice Ask", "--role", "Landshövding"]);
    let key = lst.json(&["signer", "list"])[0]["key"].as_str().unwrap().to_string();
    let command = text.lines().find(|l| l.trim_start().starts_with("samverkan-relay ")).expect("a command").trim();
    assert_eq!(
        command,
        format!(
            "samverkan-relay enroll --data-dir RELAY_DATA_DIR --key {key} --org lansstyrelsen-sodermanland \
             --name 'Beatrice Ask' --signer-role Landshövding"
        )
    );
    assert!(text.contains("replace RELAY_DATA_DIR with the relay's data directory"), "{text}");

    // Where the relay's data directory is known here, it is filled in (quoted for the shell).
    let out = lst
        .command(&["--json", "signer", "new", "--name", "Anna Berg", "--role", "Polisområdeschef", "--org", "Polisen"])
        .env("SAMVERKAN_RELAY_DATA_DIR", "/srv/samverkan relay")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    let command = value["enroll_command"].as_str().unwrap();
    assert!(command.starts_with("samverkan-relay enroll --data-dir '/srv/samverkan relay' --key "), "{command}");
    assert!(
        command.ends_with("--org polisomrade-sodermanland --name 'Anna Berg' --signer-role Polisområdeschef"),
        "{command}"
    );
}

/// Makes `cli`'s node remember a relay at `address` with `relay_key`, as a join does.
fn remember_relay(cli: &Cli, address: &str, relay_key: &samverkan_shared::identity::NodeId) {
    use samverkan_node::node::{Node, META_RELAY_ADDRESS, META_RELAY_KEY};
    let mut node = Node::open(&cli.data_dir).expect("open node");
    node.store_mut().set_meta(META_RELAY_ADDRESS, address).unwrap();
    node.store_mut().set_meta(META_RELAY_KEY, &relay_key.to_string()).unwrap();
}

#[test]
fn relay_addresses_are_added_listed_and_removed_in_the_order_they_are_tried() {
    let root = tempfile::tempdir().unwrap();
    let flen = Cli::new(root.path(), "flen");
    flen.ok(&["init", "--org", "Flen"]);
    let refused = flen.fails(&["relay", "add-address", "relay2.example.se:4433"]);
    assert!(refused.contains("samverkan-node join"), "{refused}");
    let key = samverkan_shared::identity::NodeKey::generate().node_id();
    remember_relay(&flen, "relay1.example.se:4433", &key);

    flen.ok(&["relay", "add-address", "relay2.example.se:4433"]);
    flen.ok(&["relay", "add-address", " 127.0.0.1:5000 "]);
    let refused = flen.fails(&["relay", "add-address", "relay2.example.se:4433"]);
    assert!(refused.contains("already"), "{refused}");
    for bad in ["relay3.example.se", ":4433", "a,b:1", "relay3:99999"] {
        let refused = flen.fails(&["relay", "add-address", bad]);
        assert!(refused.contains("host:port"), "{bad}: {refused}");
    }
    let text = flen.ok(&["relay", "list"]);
    assert!(
        text.contains("1. relay1.example.se:4433")
            && text.contains("2. relay2.example.se:4433")
            && text.contains("3. 127.0.0.1:5000"),
        "{text}"
    );
    assert!(text.contains(&key.to_string()), "{text}");

    // Removing the first makes the next one first; the last cannot be removed.
    flen.ok(&["relay", "remove-address", "relay1.example.se:4433"]);
    let refused = flen.fails(&["relay", "remove-address", "relay1.example.se:4433"]);
    assert!(refused.contains("not one of"), "{refused}");
    let listed = flen.json(&["relay", "list"]);
    assert_eq!(listed["addresses"], serde_json::json!(["relay2.example.se:4433", "127.0.0.1:5000"]));
    flen.ok(&["relay", "remove-address", "127.0.0.1:5000"]);
    let refused = flen.fails(&["relay", "remove-address", "relay2.example.se:4433"]);
    assert!(refused.contains("only address"), "{refused}");

    // What the daemon and sync use: the remembered addresses, first one first.
    use samverkan_node::node::{Node, META_RELAY_ADDRESS, META_RELAY_ALTERNATIVES};
    flen.ok(&["relay", "add-address", "127.0.0.1:5001"]);
    let node = Node::open(&flen.data_dir).unwrap();
    assert_eq!(node.store().meta(META_RELAY_ADDRESS).unwrap().as_deref(), Some("relay2.example.se:4433"));
    assert_eq!(node.store().meta(META_RELAY_ALTERNATIVES).unwrap().as_deref(), Some("127.0.0.1:5001"));
}

#[test]
fn status_exits_3_when_the_relay_is_not_reachable_and_0_when_it_answers_or_is_not_asked() {
    let root = tempfile::tempdir().unwrap();
    let flen = Cli::new(root.path(), "flen");
    flen.ok(&["init", "--org", "Flen"]);
    // A UDP port where nothing answers: the relay is down.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let down = silent.local_addr().unwrap().to_string();
    remember_relay(&flen, &down, &samverkan_shared::identity::NodeKey::generate().node_id());

    let out = flen.run(&["status", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains(&format!("relay: {down} NOT reachable")), "the status is printed all the same: {stdout}");
    assert!(
        stderr.contains(&format!("the relay at {down} is not reachable")) && stderr.contains("--offline"),
        "{stderr}"
    );
    let out = flen.run(&["--json", "status", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(3));
    let value: Value = serde_json::from_slice(&out.stdout).expect("JSON status");
    assert_eq!(value["relay"]["reachable"], false);

    // --offline does not try, and exits 0.
    let text = flen.ok(&["status", "--offline"]);
    assert!(text.contains(&format!("relay: {down} (not checked: --offline)")), "{text}");
    let help = flen.ok(&["status", "--help"]).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(help.contains("3 when it is not reachable"), "{help}");

    // A relay that answers: exit 0.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let relay = runtime
        .block_on(samverkan_relay::server::spawn(samverkan_relay::server::RelayConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            root.path().join("relay"),
        )))
        .expect("relay starts");
    remember_relay(&flen, &relay.local_addr().to_string(), &relay.relay_key());
    let text = flen.ok(&["status"]);
    assert!(text.contains(&format!("relay: {} reachable", relay.local_addr())), "{text}");
    runtime.block_on(relay.shutdown());
}

#[test]
fn the_default_data_directory_is_the_one_the_readme_names() {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("home");
    let run = |xdg: Option<&Path>, args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_samverkan-node"));
        cmd.args(args).env_remove("SAMVERKAN_DATA_DIR").env_remove("XDG_DATA_HOME").env("HOME", &home);
        if let Some(xdg) = xdg {
            cmd.env("XDG_DATA_HOME", xdg);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let made = run(None, &["--json", "init", "--org", "Flen"]);
    assert_eq!(made["data_dir"], home.join(".local/share/samverkan").to_str().unwrap());
    let xdg = root.path().join("xdg");
    let made = run(Some(&xdg), &["--json", "init", "--org", "Flen"]);
    assert_eq!(made["data_dir"], xdg.join("samverkan").to_str().unwrap());
    assert_eq!(run(Some(&xdg), &["--json", "whoami"])["data_dir"], xdg.join("samverkan").to_str().unwrap());
}

/// Hands `from`'s changes to `to` on a stick (bundle export with `to`'s heads, import).
fn hand_over(from: &Cli, to: &Cli, dir: &Path) {
    let heads = dir.join("heads.json");
    let stick = dir.join("stick.bundle");
    to.ok(&["bundle", "heads", heads.to_str().unwrap()]);
    from.ok(&["bundle", "export", stick.to_str().unwrap(), "--have", heads.to_str().unwrap()]);
    to.ok(&["bundle", "import", stick.to_str().unwrap()]);
}

#[test]
fn overlapping_edits_and_field_conflicts_are_flagged_reviewed_and_described() {
    let root = tempfile::tempdir().unwrap();
    let flen = Cli::new(root.path(), "flen");
    let police = Cli::new(root.path(), "polisen");
    flen.ok(&["init", "--org", "Flen", "--name", "Flen BF-samordnare"]);
    police.ok(&["init", "--org", "Polisen", "--name", "Kommunpolis Flen"]);
    enroll_on_paper(&[&flen, &police]);
    let created = flen.json(&[
        "new",
        "citizen_promise",
        "--title",
        "Medborgarlöfte Flen 2026",
        "--party",
        "Flen",
        "--party",
        "Polisen",
    ]);
    let id = created["id"].as_str().unwrap().to_string();
    let short = &id[..8];
    let body = "## Vi lovar\n\nVi genomför trygghetsvandringar **två gånger per år**.\n\n## Så följer vi upp\n\nPolisen och kommunen följer upp varje kvartal.\n";
    flen.ok(&["set", short, "body", body]);
    let activity =
        flen.json(&["activity", "add", short, "Trygghetsvandring", "--owner", "Flen", "--due", "2026-05-01"])
            ["activity"]
            .as_str()
            .unwrap()
            .to_string();
    hand_over(&flen, &police, root.path());

    // Offline, both change the same phrase, and the same activity's date.
    flen.ok(&["set", short, "body", &body.replace("två gånger per år", "två gånger per månad")]);
    police.ok(&["set", short, "body", &body.replace("två gånger per år", "två gånger per vecka")]);
    flen.ok(&["activity", "set", short, &activity, "--due", "2026-06-01"]);
    police.ok(&["activity", "set", short, &activity, "--due", "2026-09-01"]);
    hand_over(&flen, &police, root.path());
    hand_over(&police, &flen, root.path());
    assert_eq!(flen.json(&["show", short])["document"], police.json(&["show", short])["document"]);

    // Every view of the document says there is something to review, and how.
    let note = format!(
        "1 overlapping edit, 1 field conflict to review: samverkan-node review {short} and samverkan-node conflicts {short}"
    );
    for cli in [&flen, &police] {
        assert!(cli.ok(&["list"]).contains(&format!("[{note}]")), "{}", cli.ok(&["list"]));
        assert!(cli.ok(&["show", short]).starts_with(&format!("OBS: {note}")));
        assert!(cli.ok(&["status", "--offline", "--peek"]).contains(&note));
        assert!(cli.ok(&["conflicts", short]).contains(&format!("samverkan-node review {short}")));
    }
    assert_eq!(flen.json(&["list"])[0]["review"], serde_json::json!({"overlaps": 1, "conflicts": 1}));
    assert_eq!(flen.json(&["show", short])["review"]["overlaps"], 1);
    let status = flen.json(&["status", "--offline", "--peek"]);
    assert_eq!(
        (status["docs"][0]["open_overlaps"].clone(), status["docs"][0]["open_conflicts"].clone()),
        (1.into(), 1.into())
    );
    let exported = flen.ok(&["export", short]);
    assert!(exported.starts_with(&format!("+++\n# OBS: {note}\n")), "{exported}");
    let body_now = flen.json(&["show", short])["document"]["body"].as_str().unwrap().to_string();
    assert!(exported.ends_with(&body_now), "the note never touches the body");

    // `review` shows the paragraph before, both versions with their verified authors, and the merge.
    let listed = flen.ok(&["review", short]);
    assert!(listed.contains("1. Brödtext, stycke 2"), "{listed}");
    assert!(listed.contains("Vi genomför trygghetsvandringar **två gånger per år**."), "{listed}");
    assert!(listed.contains("Flens kommun (Flen BF-samordnare)"), "{listed}");
    assert!(listed.contains("Polisområde Södermanland (Kommunpolis Flen)"), "{listed}");
    let items = flen.json(&["review", short]);
    let police_side = items[0]["sides"].as_array().unwrap().iter().find(|s| s["ours"] == false).unwrap().clone();
    assert_eq!(police_side["author_status"], "enrolled");
    assert!(police_side["text"].as_str().unwrap().contains("två gånger per vecka"));
    assert_eq!(items[0]["key"], police.json(&["review", short])[0]["key"], "the same overlap on both nodes");

    // Flen keeps the police's version; once handed over, it is reviewed on both nodes.
    assert!(flen.fails(&["review", short, "--resolve", "2", "--take", "ours"]).contains("no open overlap 2"));
    assert!(flen.ok(&["review", short, "--resolve", "1", "--take", "theirs"]).contains("Reviewed overlap 1"));
    let body_after = flen.json(&["show", short])["document"]["body"].as_str().unwrap().to_string();
    assert!(body_after.contains("Vi genomför trygghetsvandringar **två gånger per vecka**."), "{body_after}");
    assert!(flen.ok(&["review", short]).starts_with("No overlapping edits to review"));
    hand_over(&flen, &police, root.path());
    assert!(police.ok(&["review", short]).starts_with("No overlapping edits to review"));
    let one_conflict = format!("1 field conflict to review: samverkan-node conflicts {short}");
    assert!(police.ok(&["list"]).contains(&one_conflict), "{}", police.ok(&["list"]));
    police.ok(&["conflicts", short, "--resolve", &format!("activities.{activity}.due"), "--value", "2026-09-01"]);
    assert!(!police.ok(&["list"]).contains("to review"));
    assert!(!police.ok(&["show", short]).starts_with("OBS"));

    // History says what each change did, and who did it.
    let history = police.ok(&["history", short]);
    for line in [
        "Flens kommun (Flen BF-samordnare): set body",
        "    Brödtext, stycke 2: 'Vi genomför trygghetsvandringar **två gånger per år**.' → 'Vi genomför trygghetsvandringar **två gånger per vecka**.'",
        "    Aktivitet 'Trygghetsvandring': förfallodag 2026-05-01 → 2026-09-01",
        "    Aktivitet 'Trygghetsvandring': förfallodag 2026-05-01 → 2026-06-01",
        "Polisområde Södermanland (Kommunpolis Flen): resolve conflict on activities.",
    ] {
        assert!(history.contains(line), "{line:?} not in\n{history}");
    }
    let entries = police.json(&["history", short]);
    let last = entries.as_array().unwrap().last().unwrap();
    assert_eq!(last["author_status"], "this_node");
    assert_eq!(last["changes"][0]["field"], format!("activities.{activity}.due"));
}
