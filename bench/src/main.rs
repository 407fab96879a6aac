//! `samverkan-bench`: speed and cost of Samverkan, each figure against its
//! physical baseline measured in the same run, on loopback with real quinn and
//! real SQLite files. Prints one line per figure:
//! `name: value unit | baseline: value unit (what) | ratio: x.xx | target: … | met/missed/info`.
//!
//! Layout: [`harness`] (the one place that starts relays and creates nodes),
//! [`fixtures`] (documents), [`inproc`] (the in-process baselines), one module
//! per figure, [`report`] (lines and percentiles). Figures are printed, never
//! asserted: `--quick` is run by CI so the benchmark keeps building and running.

mod fixtures;
mod flood;
mod harness;
mod inproc;
mod latency;
mod postgres_fig;
mod report;
mod scale;
mod store_fig;
mod sync_figs;
mod versions;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::report::Figure;

/// Samverkan benchmarks (see the README's Performance section).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Which figure to measure.
    #[command(subcommand)]
    what: What,
    /// Smaller counts, so that `all --quick` finishes in under two minutes on 2 cores.
    #[arg(long, global = true)]
    quick: bool,
    /// Also print every figure as one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Every figure.
    All,
    /// 1: edit-to-visible latency through the relay, daemons on both nodes.
    Latency,
    /// 2: catch-up after offline edits.
    Catchup,
    /// 3 and 4: cold sync of a fresh node, then a reconnect with nothing new.
    Cold,
    /// 5: relay memory and CPU with many connected nodes (relay in a child process).
    Scale,
    /// 6: durable edits against edits in memory; load before and after compaction.
    Store,
    /// 7: the relay and receive paths on the pinned Automerge and on 0.6.1.
    Versions,
    /// 8: edit-to-visible latency idle and during a flood from an enrolled node.
    Flood,
    /// 9: edit-to-visible latency and figure 5's scale run on two relay instances on PostgreSQL
    /// against one relay on SQLite (needs a server in `SAMVERKAN_TEST_POSTGRES`; says so and
    /// skips without it).
    Postgres,
    /// Internal: the relay child process of `scale`.
    #[command(hide = true)]
    RelayChild {
        /// Data directory.
        #[arg(long)]
        dir: PathBuf,
        /// A PostgreSQL database (`postgres://…`) to store documents in instead of SQLite in `dir`.
        #[arg(long)]
        storage: Option<String>,
    },
}

/// Counts for one run.
struct Sizes {
    latency_histories: Vec<usize>,
    latency_edits: usize,
    catchup_docs: usize,
    catchup_edits: usize,
    cold_docs: usize,
    scale: scale::Scale,
    store_edits: usize,
    store_long: usize,
    version_histories: Vec<usize>,
    version_iterations: usize,
    flood: flood::Flood,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                latency_histories: vec![100, 10_000],
                latency_edits: 100,
                catchup_docs: 20,
                catchup_edits: 1_000,
                cold_docs: 100,
                scale: scale::Scale { nodes: 100, docs: 10, seconds: 5, rate: 10, idle_stored: (100, 600) },
                store_edits: 256,
                store_long: 10_000,
                version_histories: vec![100, 10_000],
                version_iterations: 30,
                flood: flood::Flood { edits: 100, doc_heads_entries: 1_000_000, syncs_per_connection: 20_000 },
            }
        } else {
            Self {
                latency_histories: vec![100, 10_000],
                latency_edits: 1_000,
                catchup_docs: 100,
                catchup_edits: 10_000,
                cold_docs: 1_000,
                scale: scale::Scale { nodes: 1_000, docs: 100, seconds: 20, rate: 2, idle_stored: (500, 3_000) },
                store_edits: 2_048,
                store_long: 10_000,
                version_histories: vec![100, 10_000],
                version_iterations: 200,
                flood: flood::Flood { edits: 300, doc_heads_entries: 1_000_000, syncs_per_connection: 20_000 },
            }
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    if let What::RelayChild { dir, storage } = &cli.what {
        return runtime.block_on(harness::relay_child(dir, storage.as_deref()));
    }
    let sizes = Sizes::new(cli.quick);
    let started = Instant::now();
    let print = |figures: Vec<Figure>| {
        for f in figures {
            println!("{}", f.line());
            if cli.json {
                println!("{}", serde_json::to_string(&f).unwrap_or_default());
            }
        }
    };
    let all = matches!(cli.what, What::All);
    println!("# samverkan-bench{} (numbers vary: shared machine)", if cli.quick { " --quick" } else { "" });
    if all || matches!(cli.what, What::Latency) {
        print(runtime.block_on(latency::run(&sizes.latency_histories, sizes.latency_edits))?);
    }
    if all || matches!(cli.what, What::Catchup) {
        print(runtime.block_on(sync_figs::catch_up(sizes.catchup_docs, sizes.catchup_edits))?);
    }
    if all || matches!(cli.what, What::Cold) {
        print(runtime.block_on(sync_figs::cold_and_reconnect(sizes.cold_docs))?);
    }
    // Figure 9 compares against figure 5 at the same size: measured once when both run.
    let mut sqlite_scale = None;
    if all || matches!(cli.what, What::Scale) {
        let measured = runtime.block_on(scale::run(sizes.scale, scale::Deployment::Sqlite))?;
        print(measured.figures());
        sqlite_scale = Some(measured);
    }
    if all || matches!(cli.what, What::Store) {
        print(store_fig::run(sizes.store_edits, sizes.store_long)?);
    }
    if all || matches!(cli.what, What::Versions) {
        print(versions::run(&sizes.version_histories, sizes.version_iterations)?);
    }
    if all || matches!(cli.what, What::Flood) {
        print(runtime.block_on(flood::run(sizes.flood))?);
    }
    if all || matches!(cli.what, What::Postgres) {
        print(runtime.block_on(postgres_fig::run(sizes.latency_edits.min(200), sizes.scale, sqlite_scale))?);
    }
    println!("# done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
