//! The relay's admin HTTP server: the operator's dashboard page, the JSON
//! status API, Prometheus metrics and a health check. Also the small HTTP
//! client `samverkan-relay status` uses to read a running relay.
//!
//! Routes:
//! - `GET /` — the dashboard (one self-contained HTML page, no external assets),
//!   which polls `/api/status` and redraws live.
//! - `GET /api/status` — [`RelayStatus`] as JSON (`?docs=behind` lists only the
//!   documents each node is behind on; the counts stay complete).
//! - `GET /metrics` — Prometheus/OpenMetrics text exposition.
//! - `GET /healthz` — `ok` while the relay runs.
//!
//! Bound to loopback by default. On any other address an admin token is
//! required ([`AdminConfig::validate`]); the API and metrics then demand
//! `Authorization: Bearer <token>` (the dashboard page takes the token from
//! its URL fragment, `/#token=…`, which browsers never send to servers).
//! Neither the page nor the API ever carries document contents.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{info, info_span, warn, Instrument};

use crate::monitor::{Monitor, RelayStatus};

/// The dashboard page.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Default admin address: loopback only.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:7879";

/// Environment variable holding the admin token (for `serve` and `status`).
pub const TOKEN_ENV: &str = "SAMVERKAN_ADMIN_TOKEN";

/// Where and how the admin server listens.
#[derive(Clone)]
pub struct AdminConfig {
    /// Address to bind (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Token required by the API and metrics; mandatory unless `listen` is loopback.
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig").field("listen", &self.listen).field("token", &self.token.is_some()).finish()
    }
}

impl AdminConfig {
    /// An admin server on `listen` without a token (loopback only).
    pub fn new(listen: SocketAddr) -> Self {
        Self { listen, token: None }
    }

    /// Refuses a non-loopback address without a token, and an empty token.
    pub fn validate(&self) -> Result<(), AdminError> {
        match &self.token {
            Some(t) if t.trim().is_empty() => Err(AdminError::EmptyToken),
            None if !self.listen.ip().is_loopback() => Err(AdminError::TokenRequired(self.listen)),
            _ => Ok(()),
        }
    }
}

/// Errors of the admin server and client.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A non-loopback address needs a token.
    #[error(
        "the admin server on {0} is reachable from other machines: give an admin token (--admin-token or {TOKEN_ENV})"
    )]
    TokenRequired(SocketAddr),
    /// The token is empty.
    #[error("the admin token must not be empty")]
    EmptyToken,
    /// Binding or connecting failed.
    #[error("admin server {addr}: {source}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The server answered with an error status.
    #[error("admin server answered {status}: {body}")]
    Status {
        /// HTTP status code.
        status: u16,
        /// The body (trimmed).
        body: String,
    },
    /// The answer was not understood.
    #[error("admin server sent a malformed answer: {0}")]
    Malformed(String),
    /// The server did not answer in time.
    #[error("admin server {0} did not answer in time")]
    Timeout(SocketAddr),
}

/// Produces a status snapshot (may block on storage: called on a blocking thread).
pub type StatusSource = Arc<dyn Fn() -> RelayStatus + Send + Sync>;

#[derive(Clone)]
struct AppState {
    monitor: Arc<Monitor>,
    status: StatusSource,
    token: Option<Arc<str>>,
}

/// Starts the admin server if `config` asks for one; it stops when `stop` turns
/// `true` (or its sender goes). Returns the bound address.
pub async fn start(
    config: Option<&AdminConfig>,
    monitor: Arc<Monitor>,
    status: StatusSource,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<SocketAddr>, AdminError> {
    let Some(config) = config else { return Ok(None) };
    let listener = bind(config).await?;
    let addr = listener.local_addr().map_err(|source| AdminError::Io { addr: config.listen, source })?;
    serve(listener, config.token.clone(), monitor, status, async move {
        let _ = stop.wait_for(|stop| *stop).await;
    });
    Ok(Some(addr))
}

/// Binds the admin listener (after validating the config).
pub async fn bind(config: &AdminConfig) -> Result<TcpListener, AdminError> {
    config.validate()?;
    TcpListener::bind(config.listen).await.map_err(|source| AdminError::Io { addr: config.listen, source })
}

/// Serves the admin routes on `listener` until `shutdown` completes.
pub fn serve(
    listener: TcpListener,
    token: Option<String>,
    monitor: Arc<Monitor>,
    status: StatusSource,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let state = AppState { monitor, status, token: token.map(Arc::from) };
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/api/status", get(api_status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state);
    let addr = listener.local_addr().ok();
    tokio::spawn(
        async move {
            info!("admin server listening");
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                warn!(error = %e, "admin server failed");
            }
        }
        .instrument(info_span!("admin", ?addr)),
    )
}

async fn dashboard() -> Response {
    let mut response = DASHBOARD.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
        ),
    );
    response
}

fn authorised(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(token) = &state.token else { return true };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer ")).unwrap_or_default();
    constant_time_eq(given, token.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorised() -> Response {
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "admin token required\n").into_response()
}

async fn snapshot(state: &AppState) -> Result<RelayStatus, Response> {
    let status = state.status.clone();
    tokio::task::spawn_blocking(move || status())
        .await
        .map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "status snapshot failed\n").into_response())
}

/// Query of `/api/status`.
#[derive(Debug, serde::Deserialize)]
struct StatusQuery {
    /// `behind`: list only the documents a node is behind on (the dashboard's
    /// choice, to stay small with many documents); anything else: all.
    docs: Option<String>,
}

async fn api_status(State(state): State<AppState>, Query(query): Query<StatusQuery>, headers: HeaderMap) -> Response {
    if !authorised(&state, &headers) {
        return unauthorised();
    }
    match snapshot(&state).await {
        Ok(mut status) => {
            if query.docs.as_deref() == Some("behind") {
                for node in &mut status.nodes {
                    node.docs.retain(|d| !d.in_sync);
                }
            }
            ([(header::CACHE_CONTROL, "no-store")], Json(status)).into_response()
        }
        Err(response) => response,
    }
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !authorised(&state, &headers) {
        return unauthorised();
    }
    match snapshot(&state).await {
        Ok(status) => (
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            state.monitor.render_metrics(&status),
        )
            .into_response(),
        Err(response) => response,
    }
}

/// Reads `path` from an admin server (HTTP/1.1 GET, `Connection: close`);
/// returns the body of a 200 answer.
pub async fn get_path(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<String, AdminError> {
    const MAX_ANSWER: u64 = 64 << 20;
    let io = |source| AdminError::Io { addr, source };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Accept: */*\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        // Read to the end of the body: Content-Length when given (some servers keep
        // the connection open regardless), else until the server closes.
        let mut answer = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(total) = complete_length(&answer) {
                if answer.len() >= total {
                    break;
                }
            }
            let n = stream.read(&mut buf).await.map_err(io)?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.len() as u64 > MAX_ANSWER {
                return Err(AdminError::Malformed("answer too large".into()));
            }
        }
        Ok::<_, AdminError>(answer)
    };
    let answer = tokio::time::timeout(timeout, exchange).await.map_err(|_| AdminError::Timeout(addr))??;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| AdminError::Malformed("no end of headers".into()))?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let mut body = answer[split + 4..].to_vec();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| AdminError::Malformed("no status line".into()))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    let body = String::from_utf8(body).map_err(|_| AdminError::Malformed("body is not UTF-8".into()))?;
    if status != 200 {
        return Err(AdminError::Status { status, body: body.trim().chars().take(500).collect() });
    }
    Ok(body)
}

/// The full length of an answer (headers + body) once its headers are in and
/// give a Content-Length.
fn complete_length(answer: &[u8]) -> Option<usize> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..split]).ok()?;
    let length = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
    })?;
    Some(split + 4 + length)
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, AdminError> {
    let bad = || AdminError::Malformed("bad chunked body".into());
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_text = std::str::from_utf8(&data[..line_end]).map_err(|_| bad())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).map_err(|_| bad())?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).ok_or_else(bad)?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).ok_or_else(bad)?;
    }
}

/// Reads the status of the relay whose admin server is at `addr`.
pub async fn fetch_status(addr: SocketAddr, token: Option<&str>) -> Result<RelayStatus, AdminError> {
    let body = get_path(addr, "/api/status", token, Duration::from_secs(10)).await?;
    serde_json::from_str(&body).map_err(|e| AdminError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_loopback_admin_address_needs_a_token() {
        let open = AdminConfig::new("0.0.0.0:7879".parse().unwrap());
        assert!(matches!(open.validate(), Err(AdminError::TokenRequired(_))));
        let with_token = AdminConfig { token: Some("s3cret".into()), ..open.clone() };
        assert!(with_token.validate().is_ok());
        assert!(AdminConfig::new(DEFAULT_ADMIN.parse().unwrap()).validate().is_ok());
        let empty = AdminConfig { token: Some(" ".into()), ..open };
        assert!(matches!(empty.validate(), Err(AdminError::EmptyToken)));
    }

    #[test]
    fn chunked_bodies_are_reassembled() {
        assert_eq!(dechunk(b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n").unwrap(), b"abcdefg");
        assert!(dechunk(b"zz\r\n").is_err());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
