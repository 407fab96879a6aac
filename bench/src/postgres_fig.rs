//! Figure 9: relay instances on PostgreSQL. An edit on node A, connected to
//! instance 1, visible on node B, connected to instance 2 (the change crosses
//! the database and a `NOTIFY`), against the same with both nodes on one relay
//! on the embedded SQLite, measured in the same run; the ratio is the cost of
//! running a county or a nation on several instances.
//!
//! Needs a PostgreSQL server named by `SAMVERKAN_TEST_POSTGRES` (a throwaway
//! database is created there); without one the figure says it was skipped.
//! The 1,000-node scale comparison (figure 5 on two PostgreSQL instances) is
//! not measured yet.

use std::time::Duration;

use anyhow::{Context, Result};
use samverkan_relay::storage::postgres::{self, TestDatabase};

use crate::harness;
use crate::latency::EditToVisible;
use crate::report::{ms, percentile, Figure};

/// Document history the edits are made on.
const HISTORY: usize = 100;

pub async fn run(edits: usize) -> Result<Vec<Figure>> {
    let url = match postgres::test_database() {
        Ok(TestDatabase::Ready(url)) => url,
        Ok(TestDatabase::Skipped(why)) => {
            println!("# figure 9 (PostgreSQL): {why}");
            return Ok(Vec::new());
        }
        Err(e) => {
            println!("# figure 9 (PostgreSQL): skipped: {e}");
            return Ok(Vec::new());
        }
    };
    let sqlite = on_sqlite(edits).await.context("one relay on SQLite")?;
    let two = on_two_instances(&url, edits).await.context("two instances on PostgreSQL")?;
    let (s50, p50) = (ms(percentile(&sqlite, 50.0)), ms(percentile(&two, 50.0)));
    let (s99, p99) = (ms(percentile(&sqlite, 99.0)), ms(percentile(&two, 99.0)));
    Ok(vec![
        Figure::info("postgres.two_instances.latency.p50", p50, "ms").baseline(s50, "one relay on SQLite, p50"),
        Figure::info("postgres.two_instances.latency.p99", p99, "ms").baseline(s99, "one relay on SQLite, p99"),
    ])
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
