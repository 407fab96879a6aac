//! `samverkan-node activity add/set` with what written documents hold: joint
//! owners, units, "löpande", quarters and a follow-up method; and the exported
//! Markdown's table following the activities. Real binary, real SQLite.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

const PROMISE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/tests/data/medborgarlofte-katrineholm-2025.md");

struct Cli {
    data_dir: PathBuf,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_samverkan-node"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .env_remove("SAMVERKAN_DATA_DIR")
            .output()
            .expect("run samverkan-node")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "samverkan-node {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

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

fn node(root: &Path) -> Cli {
    let cli = Cli { data_dir: root.join("katrineholm") };
    cli.ok(&["init", "--org", "Katrineholm"]);
    cli
}

#[test]
fn activities_take_joint_owners_units_lopande_quarters_and_a_follow_up_method() {
    let root = tempfile::tempdir().unwrap();
    let cli = node(root.path());
    let id = cli.json(&[
        "new",
        "citizen_promise",
        "--title",
        "Medborgarlöfte Katrineholm 2026",
        "--party",
        "Katrineholm",
        "--party",
        "LPO Katrineholm",
    ])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let doc = &cli.json(&["show", &id])["document"];
    assert_eq!(doc["parties"], serde_json::json!(["katrineholm-kommun", "polisomrade-sodermanland"]));
    assert_eq!(doc["party_units"]["polisomrade-sodermanland"], "Lokalpolisområde Katrineholm");

    let walks = cli.json(&[
        "activity",
        "add",
        &id,
        "Trygghetsvandringar i centrum",
        "--owner",
        "kommunen",
        "--owner",
        "polisen",
        "--due",
        "löpande",
        "--followup-method",
        "Antal vandringar",
    ])["activity"]
        .as_str()
        .unwrap()
        .to_string();
    let lights = cli.json(&[
        "activity",
        "add",
        &id,
        "Belysning i gångtunneln",
        "--owner",
        "Kommunen (tekniska förvaltningen)",
        "--due",
        "2026-Q3",
    ])["activity"]
        .as_str()
        .unwrap()
        .to_string();
    let activities = cli.json(&["show", &id])["document"]["activities"].clone();
    assert_eq!(
        activities[0]["owners"],
        serde_json::json!(["katrineholm-kommun", "polisomrade-sodermanland/Lokalpolisområde Katrineholm"])
    );
    assert_eq!(activities[0]["due"], "ongoing");
    assert_eq!(activities[0]["followup_method"], "Antal vandringar");
    assert_eq!(activities[1]["owners"], serde_json::json!(["katrineholm-kommun/tekniska förvaltningen"]));
    assert_eq!(activities[1]["due"], "2026-Q3");

    cli.ok(&[
        "activity",
        "set",
        &id,
        &lights[..6],
        "--due",
        "2026-09-30",
        "--owner",
        "Kommunen (tekniska förvaltningen)",
        "--owner",
        "extern: Fastighetsägarna",
        "--followup-method",
        "Trygghetsvandring efteråt",
    ]);
    // The exported Markdown's table follows the activities (the template holds its marker).
    let exported = cli.ok(&["export", &id]);
    assert!(
        exported.contains("| Trygghetsvandringar i centrum | Kommunen och polisen | Löpande | Antal vandringar |"),
        "{exported}"
    );
    assert!(
        exported.contains("| Belysning i gångtunneln | Kommunen (tekniska förvaltningen) och Fastighetsägarna | 2026-09-30 | Trygghetsvandring efteråt |"),
        "{exported}"
    );
    assert!(!exported.contains("Kvartal 3 2026"), "the old deadline is gone");
    let shown = cli.ok(&["show", &id]);
    assert!(!shown.contains("samverkan:aktiviteter"), "show prints the table without its markers:\n{shown}");

    cli.ok(&["activity", "set", &id, &walks[..6], "--owner", "", "--due", ""]);
    let walks_now = &cli.json(&["show", &id])["document"]["activities"][0];
    assert!(walks_now.get("owners").is_none() && walks_now.get("due").is_none(), "{walks_now}");

    assert!(cli.fails(&["activity", "add", &id, "x", "--due", "snart"]).contains("löpande"));
    assert!(cli
        .fails(&["activity", "add", &id, "x", "--owner", "Uppsala"])
        .contains("unknown organisation \"Uppsala\""));
    let err = cli.fails(&["activity", "set", &id, &walks[..6], "--owner", "Flen (LPO Katrineholm)"]);
    assert!(
        err.contains("Lokalpolisområde Katrineholm is a unit of Polisområde Södermanland, not of Flens kommun"),
        "{err}"
    );
}

#[test]
fn importing_a_written_citizen_promise_says_what_was_recognised() {
    let root = tempfile::tempdir().unwrap();
    let cli = node(root.path());
    let imported = cli.json(&["import", PROMISE]);
    let recognised: Vec<&str> =
        imported["recognised"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert!(recognised.contains(&"parties: Katrineholms kommun, Lokalpolisområde Katrineholm"), "{recognised:?}");
    assert!(recognised.contains(&"activities: 5 (from the table on line 25)"), "{recognised:?}");
    let id = imported["id"].as_str().unwrap();
    let doc = &cli.json(&["show", id])["document"];
    assert_eq!(doc["signatories"][1]["role"], "Lokalpolisområdeschef");
    assert_eq!(doc["activities"][1]["owners"][0], "katrineholm-kommun/tekniska förvaltningen");
    // The node's organisation (Katrineholms kommun) is a party, so it syncs; the
    // police area's nodes get it because the lokalpolisområde is the police area's unit.
    assert!(!cli.ok(&["list"]).contains("not a party"));
}
