//! The node's local web app for coordinators and signatories (Swedish first,
//! English selectable), served by `samverkan-node daemon` and `samverkan-node ui`
//! the way Syncthing serves its GUI.
//!
//! Owns: the HTTP server on loopback, its guard ([`auth`]: per-node secret,
//! session cookie, CSRF token, Host check), the JSON API ([`api`]), live
//! updates ([`events`]: server-sent events when the store changes) and the
//! embedded page ([`assets`]; nothing is loaded from the internet).
//!
//! Never does: edits, merges or approval logic of its own. Every handler calls
//! the same [`Node`] (and `review`, `approvals`, `status`) functions the CLI
//! calls, on a [`Node`] of its own opened on the data directory, inside
//! `spawn_blocking` (SQLite is blocking). It never binds beyond loopback unless
//! told to ([`WebConfig::listen`] with `allow_remote`), and never stores a
//! signer's passphrase.

pub mod api;
pub mod assets;
pub mod auth;
pub mod events;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::{broadcast, Notify};

use crate::node::{Node, NodeError};

/// The port the web app listens on when none is given (Syncthing uses 8384).
pub const DEFAULT_PORT: u16 = 8385;

/// Where and how the web app listens.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// The address to bind (loopback by default; port 0 picks a free one).
    pub listen: SocketAddr,
    /// Allow a non-loopback `listen` address (an explicit flag); otherwise one is refused.
    pub allow_remote: bool,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)), allow_remote: false }
    }
}

/// How the web app learns of, and tells, the sync daemon running beside it.
#[derive(Debug, Clone, Default)]
pub struct SyncLink {
    /// Woken after every edit the web app commits, so the daemon pushes it at once.
    pub local_edits: Option<Arc<Notify>>,
    /// Set by the daemon while it is connected to the relay (`None`: no daemon, offline `ui`).
    pub connected: Option<Arc<AtomicBool>>,
    /// The relay's address, as configured (shown on the start page).
    pub relay_address: Option<String>,
    /// The daemon's cache of loaded documents, shared by the web app's handle
    /// on the same database: an edit made here is then in the daemon's memory
    /// already, not applied again before it is sent, and each document is held
    /// once (`None`: the web app keeps its own).
    pub doc_cache: Option<samverkan_store::DocCache>,
}

/// Why the web app could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The node's data directory could not be opened.
    #[error(transparent)]
    Node(Box<NodeError>),
    /// The secret file could not be read or made.
    #[error("the web app's secret file {path}: {reason}")]
    Secret {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A non-loopback address without the explicit flag.
    #[error("the web app binds loopback only unless told otherwise: {0} is not a loopback address (use --web-allow-remote to bind it, and protect the network path)")]
    NotLoopback(SocketAddr),
    /// The address could not be bound.
    #[error("the web app could not listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

impl From<NodeError> for WebError {
    fn from(e: NodeError) -> Self {
        WebError::Node(Box::new(e))
    }
}

/// What an API call failed with, as an HTTP answer with a JSON `{"error": …}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request was refused by the guard (403) or lacks credentials (401).
    #[error("{message}")]
    Refused {
        /// 401 or 403.
        status: StatusCode,
        /// Why, for people.
        message: String,
    },
    /// No such document, item or signer (404).
    #[error("{0}")]
    NotFound(String),
    /// The request cannot be carried out as asked (422): an invalid value, a
    /// wrong passphrase, a document changed meanwhile…
    #[error("{0}")]
    Invalid(String),
    /// Storage or another failure of this node (500).
    #[error("{0}")]
    Internal(String),
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match &e {
            NodeError::NoSuchDocument(_) | NodeError::NoSuchSigner(_) => ApiError::NotFound(e.to_string()),
            // Over the content limits: the person's input, not a failure of the node.
            NodeError::Store(samverkan_store::StoreError::TooLarge(_)) => ApiError::Invalid(e.to_string()),
            NodeError::Store(_) | NodeError::KeyFile(_) | NodeError::File { .. } => ApiError::Internal(e.to_string()),
            _ => ApiError::Invalid(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Refused { status, .. } => *status,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::warn!(error = %self, "web request failed");
        }
        (status, axum::Json(serde_json::json!({"error": self.to_string()}))).into_response()
    }
}

/// Everything the handlers share.
pub struct AppState {
    node: Arc<Mutex<Node>>,
    data_dir: PathBuf,
    guard: auth::Guard,
    changes: broadcast::Sender<events::Change>,
    link: SyncLink,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("data_dir", &self.data_dir).finish_non_exhaustive()
    }
}

impl AppState {
    /// Runs `f` on the web app's node on a blocking thread (SQLite is blocking).
    pub async fn with_node<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Node) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || {
            let mut node =
                node.lock().map_err(|_| ApiError::Internal("the node is unusable after a failure".into()))?;
            // The daemon's handle hears the relay's limits; this one reads them as kept.
            node.refresh_relay_limits().map_err(|e| ApiError::Internal(format!("reading the relay's limits: {e}")))?;
            f(&mut node)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("the request's worker failed: {e}")))?
    }

    /// Says that this web app committed a change: the daemon pushes it, pages redraw.
    pub fn committed(&self) {
        if let Some(notify) = &self.link.local_edits {
            notify.notify_one();
        }
        let _ = self.changes.send(events::Change::Local);
    }
}

/// A running web app; stops when dropped or at [`WebHandle::shutdown`].
#[derive(Debug)]
pub struct WebHandle {
    addr: SocketAddr,
    secret: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
}

impl WebHandle {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address to open in a browser: the login page with the secret in the
    /// fragment (never sent to the server or kept in its logs; the page hands
    /// it over once and gets a session cookie).
    pub fn login_url(&self) -> String {
        format!("http://{}/login#{}", self.addr, self.secret)
    }

    /// The per-node secret (for API clients: the `X-API-Key` header).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Stops serving and waits for the server to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.watcher.abort();
        // Open event streams never end by themselves: give requests a moment, then stop.
        if tokio::time::timeout(std::time::Duration::from_secs(2), &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

impl Drop for WebHandle {
    fn drop(&mut self) {
        self.task.abort();
        self.watcher.abort();
    }
}

/// Starts the web app of the node in `data_dir` (which must exist) on `config.listen`.
pub async fn spawn(data_dir: &Path, config: &WebConfig, link: SyncLink) -> Result<WebHandle, WebError> {
    if !config.listen.ip().is_loopback() && !config.allow_remote {
        return Err(WebError::NotLoopback(config.listen));
    }
    let dir = data_dir.to_path_buf();
    let doc_cache = link.doc_cache.clone();
    let (node, secret) = tokio::task::spawn_blocking(move || -> Result<_, WebError> {
        let mut node = Node::open(&dir)?;
        if let Some(cache) = doc_cache {
            node.store_mut().share_cache(cache).map_err(NodeError::from)?;
        }
        let secret = auth::load_or_create_secret(&dir)?;
        Ok((node, secret))
    })
    .await
    .map_err(|e| WebError::Secret { path: data_dir.join(auth::SECRET_FILE), reason: e.to_string() })??;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| WebError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| WebError::Bind { addr: config.listen, source })?;
    let (changes, _) = broadcast::channel(64);
    let state = Arc::new(AppState {
        node: Arc::new(Mutex::new(node)),
        data_dir: data_dir.to_path_buf(),
        guard: auth::Guard::new(secret.clone(), addr),
        changes,
        link,
    });
    let watcher = tokio::spawn(events::watch(state.clone()));
    let router = api::router(state.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, router).with_graceful_shutdown(async move {
            let _ = stopped.await;
        });
        if let Err(e) = served.await {
            tracing::warn!(error = %e, "the web app stopped");
        }
    });
    Ok(WebHandle { addr, secret, stop: Some(stop), task, watcher })
}
