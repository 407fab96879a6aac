//! Södermanland county played out on one machine: the County Board, the police
//! area and the nine municipalities each run a node with its own SQLite file,
//! work offline, and exchange changes as bundle files (as on a USB stick).
//!
//! `cargo run --release --example sodermanland [-- --dir DIR]`
//!
//! Ends with exit status 0 when every node holds identical documents, and fails
//! loudly otherwise. (Sync through the relay arrives with the sync issue; this
//! example then gains the QUIC path.)

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use samverkan::node::node::Node;
use samverkan::shared::bundle::Bundle;
use samverkan::shared::ids::{DocId, ItemId};
use samverkan::shared::markdown;
use samverkan::shared::model::{Activity, ActivityStatus, DocKind, DocumentContent, Period};
use samverkan::shared::org::{Directory, OrgKind};

const SEED: &str = include_str!("../../shared/seed/lansovergripande-samverkansoverenskommelse-sodermanland-2023.md");

struct Party {
    name: String,
    node: Node,
}

fn main() -> Result<()> {
    let started = Instant::now();
    let dir = match std::env::args().skip_while(|a| a != "--dir").nth(1) {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("samverkan-sodermanland-{}", std::process::id())),
    };
    if dir.exists() {
        bail!("{} already exists; give a fresh folder with --dir", dir.display());
    }
    println!("Samverkan · Södermanland, played out in {}\n", dir.display());

    // 1. Every party initialises its node.
    let directory = Directory::sodermanland();
    let mut parties: Vec<Party> = Vec::new();
    for org in directory.organisations() {
        let node = Node::init(&dir.join(org.id.as_str()), org.id.as_str(), None)?;
        println!("  node {}  {}", node.node_id().short(), org.name);
        parties.push(Party { name: org.name.clone(), node });
    }
    let stick = dir.join("usb-stick.bundle");

    // 2. The County Board imports the signed county agreement and shares it.
    let (agreement, recognised) = parties[0].node.import_markdown(SEED, None)?;
    println!("\nLänsstyrelsen imports the county agreement {}:", agreement.short());
    for r in &recognised {
        println!("  {r}");
    }
    let mut plan_content = DocumentContent::new(
        DocKind::OperationsPlan,
        "Verksamhetsplan för det länsövergripande brottsförebyggande arbetet 2025",
    );
    plan_content.parties = directory.organisations().iter().map(|o| o.id.clone()).collect();
    plan_content.period = Period {
        start: chrono::NaiveDate::from_ymd_opt(2025, 1, 1),
        end: chrono::NaiveDate::from_ymd_opt(2025, 12, 31),
    };
    plan_content.body = "## Lägesbild\n\nUnga som rekryteras till kriminella nätverk är länets mest angelägna fråga.\n\n## Åtgärder\n\n## Uppföljning och utvärdering\n".into();
    plan_content.activities.push(Activity {
        id: ItemId::random(),
        what: "Gemensam utbildning om lagen (2023:196) för kommunernas BF-samordnare".into(),
        owner: Some(parties[0].node.org().clone()),
        due: chrono::NaiveDate::from_ymd_opt(2025, 4, 30),
        status: ActivityStatus::Planned,
    });
    let plan = parties[0].node.create(plan_content)?;
    println!("Länsstyrelsen drafts the operations plan {}", plan.short());
    for i in 1..parties.len() {
        carry(&mut parties, 0, i, &stick)?;
    }
    println!("Both documents reach all {} parties by bundle.", parties.len());

    // 3. Offline work: citizen promises, the plan, and a shared paragraph.
    println!("\nOffline, every municipality works on its own:");
    let training = parties[0].node.document(&plan)?.view()?.activities[0].id.clone();
    let mut promises = Vec::new();
    for party in parties.iter_mut().skip(2) {
        let org = party.node.org().clone();
        let short = directory.get(&org).and_then(|o| o.aliases.last()).cloned().unwrap_or_else(|| party.name.clone());
        let mut promise = DocumentContent::new(DocKind::CitizenPromise, format!("Medborgarlöfte {} 2025", party.name));
        promise.parties = vec![
            org.clone(),
            directory
                .organisations()
                .iter()
                .find(|o| o.kind == OrgKind::Police)
                .map(|o| o.id.clone())
                .context("police")?,
        ];
        promise.scope = samverkan::shared::model::Scope::Local;
        promise.body = format!("## Problembild\n\nOtrygghet kring centrum i {short} kvällstid.\n\n## Vi lovar\n\nTrygghetsvandringar varje månad.\n");
        let id = party.node.create(promise)?;
        let what = format!("Trygghetsvandring med {}", party.name);
        party.node.edit(&plan, "add activity", |e| {
            e.add_activity(&Activity {
                id: ItemId::random(),
                what,
                owner: Some(org.clone()),
                due: None,
                status: ActivityStatus::Planned,
            })
        })?;
        promises.push(id);
    }
    println!("  9 citizen promises drafted, 9 activities added to the plan");
    let paragraph = "Unga som rekryteras till kriminella nätverk";
    let body = parties[2].node.document(&plan)?.view()?.body;
    let eskilstuna = body.replacen(paragraph, "Unga som rekryteras och utnyttjas av kriminella nätverk", 1);
    parties[2].node.edit(&plan, "edit lägesbild", |e| e.set_body(&eskilstuna))?;
    let nykoping = body.replacen("länets mest angelägna fråga", "länets mest angelägna fråga, särskilt i skolmiljö", 1);
    parties[6].node.edit(&plan, "edit lägesbild", |e| e.set_body(&nykoping))?;
    println!("  {} and {} edit the same paragraph of the plan", parties[2].name, parties[6].name);
    let due = format!("activities.{training}.due");
    parties[3].node.edit(&plan, "move date", |e| e.set_field(&due, "2025-05-15"))?;
    parties[4].node.edit(&plan, "move date", |e| e.set_field(&due, "2025-06-01"))?;
    println!("  {} and {} both move the training's date", parties[3].name, parties[4].name);

    // 4. Reconnect at different times: everything flows through the County Board.
    println!("\nOne by one, bundles travel to Länsstyrelsen and back:");
    for i in 1..parties.len() {
        carry(&mut parties, i, 0, &stick)?;
    }
    for i in 1..parties.len() {
        carry(&mut parties, 0, i, &stick)?;
    }
    let merged = parties[0].node.document(&plan)?.view()?.body;
    println!("  merged lägesbild: {}", merged.lines().nth(2).unwrap_or_default());
    ensure!(merged.contains("Unga som rekryteras och utnyttjas av kriminella nätverk är länets mest angelägna fråga, särskilt i skolmiljö"), "the paragraph edits did not merge");
    let conflicts = parties[0].node.document(&plan)?.conflicts()?;
    ensure!(conflicts.len() == 1, "expected one date conflict, found {conflicts:?}");
    let values: Vec<&str> = conflicts[0].values.iter().map(|v| v.value.as_str()).collect();
    println!("  conflict on {}: {}", conflicts[0].path, values.join(" vs "));
    parties[0].node.edit(&plan, "resolve date", |e| e.set_field(&due, "2025-06-01"))?;
    println!("  Länsstyrelsen resolves it to 2025-06-01");
    for i in 1..parties.len() {
        carry(&mut parties, 0, i, &stick)?;
    }

    // 5. Everyone holds identical documents.
    let reference = fingerprint(&mut parties[0].node)?;
    for p in parties.iter_mut().skip(1) {
        ensure!(fingerprint(&mut p.node)? == reference, "{} did not converge", p.name);
    }
    ensure!(
        reference.len() == 2 + promises.len(),
        "expected {} documents, found {}",
        2 + promises.len(),
        reference.len()
    );
    let bytes: u64 = parties.iter().map(|p| db_size(p.node.data_dir())).sum();
    println!(
        "\nAll {} nodes hold the same {} documents (equal heads, equal content); {} KiB on disk in total; {:.1} s.",
        parties.len(),
        reference.len(),
        bytes / 1024,
        started.elapsed().as_secs_f64()
    );
    println!("Data kept in {}", dir.display());
    Ok(())
}

/// Carries what node `to` lacks from node `from` through a bundle file.
fn carry(parties: &mut [Party], from: usize, to: usize, stick: &Path) -> Result<()> {
    let have = parties[to].node.heads_summary()?;
    let bundle = parties[from].node.export_bundle(Some(&have))?;
    std::fs::write(stick, bundle.encode())?;
    let bundle = Bundle::decode(&std::fs::read(stick)?)?;
    for report in parties[to].node.import_bundle(&bundle)? {
        if let Some(e) = report.error {
            bail!("{} refused {}: {e}", parties[to].name, report.id);
        }
    }
    Ok(())
}

/// Every document's heads and exported Markdown.
fn fingerprint(node: &mut Node) -> Result<Vec<(DocId, Vec<String>, String)>> {
    let mut out = Vec::new();
    for summary in node.list()? {
        let mut doc = node.document(&summary.id)?;
        let heads = doc.heads().iter().map(ToString::to_string).collect();
        out.push((summary.id, heads, markdown::export(&doc.view()?, node.directory())));
    }
    out.sort();
    Ok(out)
}

fn db_size(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("node.db")).map(|m| m.len()).unwrap_or(0)
}
