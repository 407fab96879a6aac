//! Live updates: a server-sent event stream (`/api/events`) that tells open
//! pages when the node's data changed, so they redraw without a reload.
//!
//! The source is the store itself: SQLite's `data_version` moves whenever
//! another connection commits (the sync daemon storing what the relay sent, a
//! CLI edit, a bundle import), and the web app reports its own commits
//! ([`super::AppState::committed`]). The daemon's connection state is watched
//! too ("relay reachable"). Events carry no document contents, only that
//! something changed; the page fetches what it shows.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::broadcast;

use super::AppState;

/// How often the store's `data_version` and the daemon's connection are looked at.
pub const POLL: Duration = Duration::from_millis(150);

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Another connection committed to the store (sync, CLI, import).
    Store,
    /// This web app committed an edit.
    Local,
    /// The daemon connected to or lost the relay.
    Relay,
}

impl Change {
    fn name(self) -> &'static str {
        match self {
            Change::Store => "store",
            Change::Local => "local",
            Change::Relay => "relay",
        }
    }
}

/// Watches the store and the daemon's connection; broadcasts each change.
pub async fn watch(state: Arc<AppState>) {
    let mut version = None;
    let mut connected = None;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = state
            .with_node(|node| node.store_mut().data_version().map_err(|e| super::ApiError::Internal(e.to_string())))
            .await;
        match now {
            Ok(now) => {
                if version.is_some_and(|v| v != now) {
                    let _ = state.changes.send(Change::Store);
                }
                version = Some(now);
            }
            Err(e) => tracing::warn!(error = %e, "the web app could not read the store's version"),
        }
        let link = state.link.connected.as_ref().map(|c| c.load(Ordering::SeqCst));
        if connected.is_some() && connected != Some(link) {
            let _ = state.changes.send(Change::Relay);
        }
        connected = Some(link);
    }
}

/// `GET /api/events`: one `change` event per change (its data says which kind).
pub async fn stream(State(state): State<Arc<AppState>>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = state.changes.subscribe();
    let events = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let name = match receiver.recv().await {
            Ok(change) => change.name(),
            // Missed some: one event says the same ("something changed").
            Err(broadcast::error::RecvError::Lagged(_)) => Change::Store.name(),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(Event::default().event("change").data(name)), receiver))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
