//! Södermanland county played out on one machine, over the real relay: the
//! main job of `cargo run --release --example sodermanland`, and what the
//! example test checks in its quick mode.
//!
//! The County Board's relay and a node for each of the eleven parties run on
//! loopback with their own SQLite files in a fresh folder. Nodes join with
//! one-time codes, work offline (a node is offline simply by not syncing),
//! reconnect at different times, resolve a conflict, approve the county
//! agreement with signer keys, and end with the operator's status table.
//! Every step is printed; anything that does not converge is an error.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use samverkan_node::node::Node;
use samverkan_node::sync::{self, RelayTarget, SyncReport};
use samverkan_relay::admin::AdminConfig;
use samverkan_relay::monitor;
use samverkan_relay::server::{self, RelayConfig};
use samverkan_shared::approval::ApprovalState;
use samverkan_shared::directory::{Member, MemberKind};
use samverkan_shared::ids::{DocId, ItemId};
use samverkan_shared::markdown;
use samverkan_shared::model::{Activity, ActivityStatus, DocKind, DocumentContent, Due, Owner, Period, Scope};
use samverkan_shared::org::{Directory, OrgKind};

/// The signed county agreement of 2023, imported by the County Board.
pub const SEED: &str =
    include_str!("../../shared/seed/lansovergripande-samverkansoverenskommelse-sodermanland-2023.md");

/// Longest time one sync may take before the play-out fails.
const SYNC_LIMIT: Duration = Duration::from_secs(120);

/// How to play it out.
#[derive(Debug, Clone)]
pub struct Options {
    /// A fresh folder for every data directory (must not exist).
    pub dir: PathBuf,
    /// Keep the relay and its dashboard, and the daemons and web apps of two
    /// nodes (their addresses printed), running until Ctrl-C at the end.
    pub keep_running: bool,
}

/// What the play-out ended with.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Nodes that took part.
    pub nodes: usize,
    /// Documents every node holds, identical everywhere.
    pub documents: usize,
    /// Bytes on the wire, all syncs together.
    pub bytes: u64,
    /// Automerge sync messages, all syncs together.
    pub messages: u64,
    /// The county agreement's approval state at the end.
    pub agreement_state: ApprovalState,
    /// Whether the exported signed bundle verified.
    pub bundle_verified: bool,
}

struct Party {
    name: String,
    node: Node,
}

#[derive(Default)]
struct Totals {
    bytes: u64,
    messages: u64,
    syncs: u64,
    slowest: Duration,
}

impl Totals {
    fn add(&mut self, report: &SyncReport) {
        self.bytes += report.bytes_sent + report.bytes_received;
        self.messages += report.messages_sent + report.messages_received;
        self.syncs += 1;
        self.slowest = self.slowest.max(Duration::from_millis(report.millis));
    }
}

/// Plays the county out; fails loudly if any node does not converge.
pub async fn run(options: Options) -> Result<Outcome> {
    let started = Instant::now();
    let dir = &options.dir;
    ensure!(!dir.exists(), "{} already exists; give a fresh folder", dir.display());
    println!("Samverkan · Södermanland, played out in {}\n", dir.display());

    // 1. The County Board starts its relay; every party joins with a one-time code.
    let mut config = RelayConfig::new("127.0.0.1:0".parse()?, dir.join("relay"));
    config.monitoring.admin = Some(AdminConfig::new("127.0.0.1:0".parse()?));
    let relay = server::spawn(config).await.context("starting the relay")?;
    println!("Länsstyrelsen's relay listens on {} (key {})", relay.local_addr(), relay.relay_key().short());
    let directory = Directory::sodermanland();
    let mut parties: Vec<Party> = Vec::new();
    for org in directory.organisations() {
        let mut node = Node::init(&dir.join(org.id.as_str()), org.id.as_str(), None)?;
        let code =
            relay.join_code(org.id.clone(), &format!("{} BF-samordnare", org.name), chrono::Duration::hours(1))?;
        sync::join(&mut node, &code, SYNC_LIMIT).await.with_context(|| format!("{} joining", org.name))?;
        println!("  {:<36} node {} joined with a one-time code", org.name, node.node_id().short());
        parties.push(Party { name: org.name.clone(), node });
    }
    let target = RelayTarget { addr: relay.local_addr(), relay_key: relay.relay_key() };
    let mut totals = Totals::default();
    let everyone: Vec<_> = directory.organisations().iter().map(|o| o.id.clone()).collect();
    let police = parties.iter().position(|p| directory.get(p.node.org()).map(|o| o.kind) == Some(OrgKind::Police));
    let police = police.context("the police area's node")?;

    // 2. The County Board imports the real agreement, names its signatories and shares it.
    let (agreement, recognised) = parties[0].node.import_markdown(SEED, None)?;
    parties[0].node.edit(&agreement, "share with the county", |e| e.set_parties(&everyone))?;
    println!("\nLänsstyrelsen imports the county agreement {} and shares it with all parties:", agreement.short());
    for r in &recognised {
        println!("  {r}");
    }
    let plan_content = operations_plan(&parties[0], &everyone);
    let plan = parties[0].node.create(plan_content)?;
    println!("Länsstyrelsen drafts the county operations plan {}", plan.short());
    for party in parties.iter_mut() {
        sync_party(party, &target, &mut totals).await?;
    }
    println!("Both documents reach all {} parties through the relay.", parties.len());

    // 3. Offline: citizen promises, the plan, one paragraph and one date edited concurrently.
    println!("\nThe municipalities go offline and work on their own:");
    let training = parties[0].node.document(&plan)?.view()?.activities[0].id.clone();
    let police_org = parties[police].node.org().clone();
    let mut promises = Vec::new();
    for party in
        parties.iter_mut().filter(|p| directory.get(p.node.org()).map(|o| o.kind) == Some(OrgKind::Municipality))
    {
        let org = party.node.org().clone();
        let mut promise = DocumentContent::new(DocKind::CitizenPromise, format!("Medborgarlöfte {} 2025", party.name));
        promise.parties = vec![org.clone(), police_org.clone()];
        promise.scope = Scope::Local;
        promise.body = format!(
            "## Problembild\n\nOtrygghet kring centrum i {} kvällstid.\n\n## Vi lovar\n\nTrygghetsvandringar varje månad.\n",
            party.name
        );
        promises.push(party.node.create(promise)?);
        let what = format!("Trygghetsvandring med {}", party.name);
        party.node.edit(&plan, "add activity", |e| {
            e.add_activity(&Activity {
                id: ItemId::random(),
                what,
                owners: vec![Owner::org(org.clone())],
                due: None,
                followup_method: None,
                status: ActivityStatus::Planned,
            })
        })?;
    }
    println!("  {} citizen promises drafted, {} activities added to the plan", promises.len(), promises.len());
    let paragraph = "Unga som rekryteras till kriminella nätverk";
    let body = parties[2].node.document(&plan)?.view()?.body;
    let first = body.replacen(paragraph, "Unga som rekryteras och utnyttjas av kriminella nätverk", 1);
    parties[2].node.edit(&plan, "edit lägesbild", |e| e.set_body(&first))?;
    let second = body.replacen("länets mest angelägna fråga", "länets mest angelägna fråga, särskilt i skolmiljö", 1);
    parties[6].node.edit(&plan, "edit lägesbild", |e| e.set_body(&second))?;
    println!("  {} and {} edit the same paragraph of the plan", parties[2].name, parties[6].name);
    let due = format!("activities.{training}.due");
    parties[3].node.edit(&plan, "move date", |e| e.set_field(&due, "2025-05-15"))?;
    parties[4].node.edit(&plan, "move date", |e| e.set_field(&due, "2025-06-01"))?;
    println!("  {} and {} both move the training's date", parties[3].name, parties[4].name);

    // 4. They reconnect one at a time; then everyone catches up.
    println!("\nOne by one they come back online and sync through the relay:");
    for i in (1..parties.len()).rev() {
        let report = sync_party(&mut parties[i], &target, &mut totals).await?;
        println!(
            "  {:<36} sent {} doc(s), received {} doc(s), {} bytes",
            parties[i].name,
            report.docs_sent,
            report.docs_received,
            report.bytes_sent + report.bytes_received
        );
    }
    sync_everyone(&mut parties, &target, &mut totals).await?;
    let merged = parties[0].node.document(&plan)?.view()?.body;
    ensure!(
        merged.contains("Unga som rekryteras och utnyttjas av kriminella nätverk är länets mest angelägna fråga, särskilt i skolmiljö"),
        "the two paragraph edits did not merge: {merged}"
    );
    println!("  merged lägesbild: {}", merged.lines().nth(2).unwrap_or_default());
    let conflicts = parties[0].node.document(&plan)?.conflicts()?;
    ensure!(conflicts.len() == 1, "expected one date conflict, found {conflicts:?}");
    let values: Vec<&str> = conflicts[0].values.iter().map(|v| v.value.as_str()).collect();
    println!("  conflict on {}: {}", conflicts[0].path, values.join(" vs "));
    parties[0].node.edit(&plan, "resolve date", |e| e.set_field(&due, "2025-06-01"))?;
    println!("  Länsstyrelsen resolves it to 2025-06-01");
    sync_everyone(&mut parties, &target, &mut totals).await?;
    ensure!(parties[0].node.document(&plan)?.conflicts()?.is_empty(), "the conflict is still open");

    // 5. The Landshövding and the Polisområdeschef approve the agreement from their own nodes.
    println!("\nThe county agreement is approved:");
    let landshovding = parties[0].node.create_signer("Landshövding", "Landshövding", None)?;
    let chef = parties[police].node.create_signer("Polisområdeschef", "Polisområdeschef", None)?;
    for (signer, whom) in [(&landshovding, "Landshövding"), (&chef, "Polisområdeschef")] {
        relay.enroll(Member {
            key: signer.key,
            kind: MemberKind::Signer,
            org: signer.org.clone(),
            name: whom.to_string(),
            role: Some(signer.role.clone()),
            enrolled_at: chrono::Utc::now(),
            revoked_at: None,
        })?;
    }
    // The signers' nodes fetch the directory that now names them, then sign offline, concurrently.
    sync_party(&mut parties[0], &target, &mut totals).await?;
    sync_party(&mut parties[police], &target, &mut totals).await?;
    parties[0].node.approve(&agreement, &landshovding.name)?;
    parties[police].node.approve(&agreement, &chef.name)?;
    println!("  the Landshövding signs on Länsstyrelsen's node, the Polisområdeschef on the police node");
    sync_everyone(&mut parties, &target, &mut totals).await?;
    for p in &parties {
        let state = p.node.approval_status(&agreement)?.state;
        ensure!(state == ApprovalState::Approved, "{} sees the agreement as {state:?}", p.name);
    }
    println!("  every node sees it as {}", ApprovalState::Approved.label());

    // 6. Flen edits the agreement afterwards: changed since approval, the signed text intact.
    let flen = parties.iter().position(|p| p.name.contains("Flen")).context("Flen's node")?;
    let text = parties[flen].node.document(&agreement)?.view()?.body;
    let edited = text.replacen("Styrgruppen", "Styrgruppen (med kommunernas representanter)", 1);
    parties[flen].node.edit(&agreement, "edit", |e| e.set_body(&edited))?;
    sync_party(&mut parties[flen], &target, &mut totals).await?;
    sync_party(&mut parties[0], &target, &mut totals).await?;
    let status = parties[0].node.approval_status(&agreement)?;
    ensure!(status.state == ApprovalState::ChangedSinceApproval, "after Flen's edit the state is {:?}", status.state);
    let signed = samverkan_node::approvals::signed_version(&parties[0].node, &agreement)?.view()?.body;
    ensure!(signed == text, "the signed text changed");
    println!(
        "  {} edits it: {}; the signed version stays in force, unchanged",
        parties[flen].name,
        status.state.label()
    );
    let bundle_dir = dir.join("signed-agreement");
    let files = parties[0].node.export_signed(&agreement, &bundle_dir)?;
    let report = samverkan_shared::signed_bundle::verify(&files, Some(&relay.relay_key()))?;
    println!(
        "  the signed bundle in {} verifies: {} signature(s) over version {}",
        bundle_dir.display(),
        report.signed.len(),
        report.heads.first().map(|h| h.to_string()[..12].to_string()).unwrap_or_default()
    );
    sync_everyone(&mut parties, &target, &mut totals).await?;

    // 7. Everyone holds the same copy of every document it is a party to; the operator's view.
    // The police area is a party to everything (county documents and every promise).
    let reference = fingerprint(&mut parties[police].node)?;
    ensure!(
        reference.len() == 2 + promises.len(),
        "expected {} documents, found {}",
        2 + promises.len(),
        reference.len()
    );
    for p in parties.iter_mut() {
        let own = fingerprint(&mut p.node)?;
        let mine: Vec<_> = reference
            .iter()
            .filter(|r| {
                p.node
                    .document(&r.0)
                    .map(|d| d.view().map(|v| v.parties.contains(p.node.org())).unwrap_or(false))
                    .unwrap_or(false)
                    || own.iter().any(|o| o.0 == r.0)
            })
            .cloned()
            .collect();
        ensure!(own == mine, "{} did not converge", p.name);
    }
    println!("\nThe operator's view (samverkan-relay status):");
    print!("{}", monitor::format_table(&relay.status()));
    if let Some(admin) = relay.admin_addr() {
        println!("Dashboard: http://{admin}/");
    }
    let outcome = Outcome {
        nodes: parties.len(),
        documents: reference.len(),
        bytes: totals.bytes,
        messages: totals.messages,
        agreement_state: status.state,
        bundle_verified: true,
    };
    println!(
        "\nSummary: {} nodes, {} documents identical wherever shared (each municipality holds its own promise), {} syncs, {} sync messages, {} KiB on the wire, slowest sync {} ms, {:.1} s in all.",
        outcome.nodes,
        outcome.documents,
        totals.syncs,
        totals.messages,
        totals.bytes / 1024,
        totals.slowest.as_millis(),
        started.elapsed().as_secs_f64()
    );
    println!("Data kept in {}", dir.display());
    if options.keep_running {
        keep_running(&mut parties, police, &target).await?;
    }
    relay.shutdown().await;
    Ok(outcome)
}

/// Leaves the county running until Ctrl-C: the relay, and the daemons of
/// Länsstyrelsen's and the police area's nodes with their web apps open (the
/// addresses, with each node's secret, are printed).
async fn keep_running(parties: &mut [Party], police: usize, target: &RelayTarget) -> Result<()> {
    use samverkan_node::web::{self, SyncLink, WebConfig};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Länsstyrelsen's node is the first; the police area's comes after it.
    ensure!(police > 0, "the police area's node comes after Länsstyrelsen's");
    let (first, rest) = parties.split_at_mut(police);
    let (county, police_party) = (&mut first[0], &mut rest[0]);
    let mut running = Vec::new();
    for party in [&mut *county, &mut *police_party] {
        let options = sync::DaemonOptions {
            local_edits: Some(Arc::new(tokio::sync::Notify::new())),
            connected: Some(Arc::new(AtomicBool::new(false))),
            ..sync::DaemonOptions::default()
        };
        let link = SyncLink {
            local_edits: options.local_edits.clone(),
            connected: options.connected.clone(),
            relay_address: Some(target.addr.to_string()),
            doc_cache: Some(party.node.store().doc_cache()),
        };
        let config = WebConfig { listen: "127.0.0.1:0".parse()?, allow_remote: false };
        let handle = web::spawn(party.node.data_dir(), &config, link).await.context("starting a web app")?;
        println!("Web app of {}: {}", party.name, handle.login_url());
        running.push((handle, options));
    }
    println!(
        "The relay, and the daemons and web apps of these two nodes, keep running (dashboard above); Ctrl-C ends them."
    );
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };
    let (a, b, ()) = tokio::join!(
        sync::daemon(&mut county.node, target, &running[0].1, stopped(stop_rx.clone())),
        sync::daemon(&mut police_party.node, target, &running[1].1, stopped(stop_rx.clone())),
        async {
            let _ = tokio::signal::ctrl_c().await;
            let _ = stop_tx.send(true);
        }
    );
    a?;
    b?;
    for (handle, _) in running {
        handle.shutdown().await;
    }
    Ok(())
}

fn operations_plan(county: &Party, everyone: &[samverkan_shared::org::OrgId]) -> DocumentContent {
    let mut plan = DocumentContent::new(
        DocKind::OperationsPlan,
        "Verksamhetsplan för det länsövergripande brottsförebyggande arbetet 2025",
    );
    plan.parties = everyone.to_vec();
    plan.period = Period {
        start: chrono::NaiveDate::from_ymd_opt(2025, 1, 1),
        end: chrono::NaiveDate::from_ymd_opt(2025, 12, 31),
    };
    plan.body = "## Lägesbild\n\nUnga som rekryteras till kriminella nätverk är länets mest angelägna fråga.\n\n## Åtgärder\n\n## Uppföljning och utvärdering\n".into();
    plan.activities.push(Activity {
        id: ItemId::random(),
        what: "Gemensam utbildning om lagen (2023:196) för kommunernas BF-samordnare".into(),
        owners: vec![Owner::org(county.node.org().clone())],
        due: chrono::NaiveDate::from_ymd_opt(2025, 4, 30).map(Due::Date),
        followup_method: Some("Antal samordnare som deltagit".into()),
        status: ActivityStatus::Planned,
    });
    plan
}

async fn sync_party(party: &mut Party, target: &RelayTarget, totals: &mut Totals) -> Result<SyncReport> {
    let report = sync::sync_once(&mut party.node, target, SYNC_LIMIT)
        .await
        .with_context(|| format!("{} could not sync", party.name))?;
    totals.add(&report);
    Ok(report)
}

/// Two rounds: whatever one party sends in the first round reaches the others in the second.
async fn sync_everyone(parties: &mut [Party], target: &RelayTarget, totals: &mut Totals) -> Result<()> {
    for _ in 0..2 {
        for party in parties.iter_mut() {
            sync_party(party, target, totals).await?;
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

/// A fresh folder under the system's temporary directory.
pub fn fresh_dir() -> PathBuf {
    std::env::temp_dir().join(format!(
        "samverkan-sodermanland-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis()
    ))
}

/// Whether `dir` holds what the play-out leaves behind.
pub fn looks_played_out(dir: &Path) -> bool {
    dir.join("relay").join("relay.db").exists() && dir.join("signed-agreement").exists()
}
