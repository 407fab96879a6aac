//! Figure 9: relay instances on PostgreSQL against one relay on the embedded
//! SQLite, measured in the same run; the ratios are the cost of running a
//! county or a nation on several instances.
//!
//! - Latency: an edit on node A, connected to instance 1, visible on node B,
//!   connected to instance 2 (the change crosses the database and a `NOTIFY`),
//!   against the same with both nodes on one SQLite relay.
//! - Scale: figure 5 ([`scale`]) on two relay child processes on one
//!   PostgreSQL database, the simulated nodes alternating between them (the
//!   editor on instance 1, the observer on instance 2), against figure 5 on
//!   one SQLite relay at the same size. Latency p50 and p99 with every node
//!   connected; relay CPU per forwarded change and relay memory per idle
//!   connection are both instances' summed (the database server's own CPU
//!   and memory are not counted). `observed` says how many of the edits
//!   reached the observer within the run; CPU per forwarded change counts
//!   every edit made, so a deployment that falls behind looks cheaper than it is.
//!
//! Needs a PostgreSQL server named by `SAMVERKAN_TEST_POSTGRES` (a throwaway
//! database is created there for each part); without one the figure says it
//! was skipped.

use std::time::Duration;

use anyhow::{Context, Result};
use samverkan_relay::storage::postgres::{self, TestDatabase};

use crate::harness;
use crate::latency::EditToVisible;
use crate::report::{ms, percentile, Figure};
use crate::scale::{self, Deployment, Measured, Scale};

/// Document history the edits are made on.
const HISTORY: usize = 100;

/// Runs figure 9: latency over `edits` edits, then the scale comparison at
/// size `scale`. `sqlite_scale` is figure 5 at that size if this run measured
/// it already (`all`); otherwise it is measured here.
pub async fn run(edits: usize, scale: Scale, sqlite_scale: Option<Measured>) -> Result<Vec<Figure>> {
    let Some(url) = database()? else { return Ok(Vec::new()) };
    let sqlite = on_sqlite(edits).await.context("one relay on SQLite")?;
    let two = on_two_instances(&url, edits).await.context("two instances on PostgreSQL")?;
    let (s50, p50) = (ms(percentile(&sqlite, 50.0)), ms(percentile(&two, 50.0)));
    let (s99, p99) = (ms(percentile(&sqlite, 99.0)), ms(percentile(&two, 99.0)));
    let mut figures = vec![
        Figure::info("postgres.two_instances.latency.p50", p50, "ms").baseline(s50, "one relay on SQLite, p50"),
        Figure::info("postgres.two_instances.latency.p99", p99, "ms").baseline(s99, "one relay on SQLite, p99"),
    ];
    let sqlite = match sqlite_scale {
        Some(measured) => measured,
        None => scale::run(scale, Deployment::Sqlite).await.context("figure 5 on one relay on SQLite")?,
    };
    let Some(url) = database()? else { return Ok(figures) };
    let two =
        scale::run(scale, Deployment::TwoOnPostgres(&url)).await.context("figure 5 on two instances on PostgreSQL")?;
    figures.extend(scale_figures(&two, &sqlite));
    Ok(figures)
}

/// A throwaway database on the configured server, or `None` (saying why the figure is skipped).
fn database() -> Result<Option<String>> {
    match postgres::test_database() {
        Ok(TestDatabase::Ready(url)) => Ok(Some(url)),
        Ok(TestDatabase::Skipped(why)) => {
            println!("# figure 9 (PostgreSQL): {why}");
            Ok(None)
        }
        Err(e) => {
            println!("# figure 9 (PostgreSQL): skipped: {e}");
            Ok(None)
        }
    }
}

/// The scale comparison's lines: two instances on PostgreSQL, each against
/// one relay on SQLite at the same size.
fn scale_figures(two: &Measured, sqlite: &Measured) -> Vec<Figure> {
    let name = |what: &str| format!("postgres.two_instances.scale.{}.{what}", two.tag());
    let on_sqlite = |what: &str| format!("one relay on SQLite, {what}");
    vec![
        Figure::info(name("connect_time"), ms(two.connect_time), "ms")
            .baseline(ms(sqlite.connect_time), on_sqlite("every node connected and settled")),
        Figure::info(name("memory_per_idle_connection.both_instances"), two.memory_per_idle_connection, "KB")
            .baseline(sqlite.memory_per_idle_connection, on_sqlite("per idle connection")),
        Figure::info(name("cpu_per_forwarded_change.both_instances"), two.cpu_per_forwarded_change, "µs")
            .baseline(sqlite.cpu_per_forwarded_change, on_sqlite("relay CPU per forwarded change")),
        Figure::info(name("observed"), two.latencies.len() as f64, "edits")
            .baseline(sqlite.latencies.len() as f64, on_sqlite("edits observed")),
        Figure::info(name("latency.p50"), two.latency_ms(50.0), "ms")
            .baseline(sqlite.latency_ms(50.0), on_sqlite("p50 with every node connected")),
        Figure::info(name("latency.p99"), two.latency_ms(99.0), "ms")
            .baseline(sqlite.latency_ms(99.0), on_sqlite("p99 with every node connected")),
    ]
}

async fn on_sqlite(edits: usize) -> Result<Vec<Duration>> {
    let root = tempfile::tempdir()?;
    let relay = harness::start_relay(&root.path().join("relay")).await?;
    let a = harness::new_node(&relay, root.path(), "a", "Eskilstuna")?;
    let b = harness::new_node(&relay, root.path(), "b", "Polisen")?;
    let target = harness::target(&relay);
    let mut daemons = EditToVisible::start(&target, (a, b), HISTORY).await?;
    let measured = daemons.measure(edits).await;
    daemons.stop().await?;
    relay.shutdown().await;
    measured
}

async fn on_two_instances(url: &str, edits: usize) -> Result<Vec<Duration>> {
    let root = tempfile::tempdir()?;
    let (first, second) = harness::start_postgres_instances(root.path(), url).await?;
    let a = harness::new_node(&first, root.path(), "a", "Eskilstuna")?;
    let b = harness::new_node(&first, root.path(), "b", "Polisen")?;
    let (a_target, b_target) = (harness::target(&first), harness::target(&second));
    let mut daemons = EditToVisible::start_split((&a_target, &b_target), (a, b), HISTORY).await?;
    let measured = daemons.measure(edits).await;
    daemons.stop().await?;
    first.shutdown().await;
    second.shutdown().await;
    measured
}
