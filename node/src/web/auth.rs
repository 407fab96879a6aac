//! The web app's guard, as Syncthing guards its GUI.
//!
//! - **Per-node secret**: `web.secret` in the data directory (0600, created
//!   once, refused when others can read it). The printed address carries it in
//!   the URL fragment (`/login#…`), which browsers never send to a server; the
//!   login page posts it once in the `X-API-Key` header and gets a session.
//! - **Session cookie**: random, HttpOnly, `SameSite=Strict`, `Path=/`, named
//!   after the port (two nodes on one machine do not overwrite each other's).
//! - **CSRF**: every request that changes something and is authenticated by
//!   the cookie must carry the session's token in `X-CSRF-Token` (the page
//!   reads it from `/api/session`); without it: 403. Requests authenticated by
//!   the `X-API-Key` header need no token (another site cannot set that header).
//! - **Host check** (DNS rebinding): the `Host` header must name loopback
//!   (`127.0.0.1`, `localhost`, `[::1]`) or the address explicitly bound.
//!
//! Every request passes [`guard`] except the login page and its script.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;

use super::{ApiError, AppState, WebError};

/// File name of the web app's secret in the data directory.
pub const SECRET_FILE: &str = "web.secret";
/// The header carrying the per-node secret.
pub const KEY_HEADER: &str = "x-api-key";
/// The header carrying the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Paths served without a session (they carry nothing of the node).
pub const OPEN_PATHS: [&str; 3] = ["/login", "/login.js", "/app.css"];
/// Most sessions kept at once (the oldest go first).
const MAX_SESSIONS: usize = 64;

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

/// The node's web secret: read from [`SECRET_FILE`], or made there (0600) once.
pub fn load_or_create_secret(data_dir: &Path) -> Result<String, WebError> {
    let path = data_dir.join(SECRET_FILE);
    let error = |reason: String| WebError::Secret { path: path.clone(), reason };
    if path.exists() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).map_err(|e| error(e.to_string()))?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(error(format!("readable by others (mode {mode:o}); run `chmod 600` on it")));
            }
        }
        let text = std::fs::read_to_string(&path).map_err(|e| error(e.to_string()))?;
        let secret = text.trim().to_string();
        if secret.len() < 32 || !secret.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(error("not a web secret (remove it to make a new one)".into()));
        }
        return Ok(secret);
    }
    let secret = random_hex(32);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(|e| error(e.to_string()))?;
    std::io::Write::write_all(&mut file, format!("{secret}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| error(e.to_string()))?;
    Ok(secret)
}

/// Compares two secrets in time independent of where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The secret, the sessions (cookie → CSRF token) and the hosts allowed.
#[derive(Debug)]
pub struct Guard {
    secret: String,
    cookie: String,
    sessions: Mutex<Vec<(String, String)>>,
    hosts: Vec<String>,
}

/// How a request proved itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// The per-node secret in the `X-API-Key` header.
    Key,
    /// A session cookie, with its CSRF token.
    Session {
        /// The session's CSRF token.
        csrf: String,
    },
}

impl Guard {
    /// A guard for a server bound to `addr` with `secret`.
    pub fn new(secret: String, addr: SocketAddr) -> Self {
        let mut hosts = vec!["127.0.0.1".to_string(), "localhost".to_string(), "[::1]".to_string()];
        if !addr.ip().is_loopback() {
            hosts.push(match addr {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            });
        }
        Self { secret, cookie: format!("samverkan_session_{}", addr.port()), sessions: Mutex::new(Vec::new()), hosts }
    }

    /// Whether the `Host` header names this server on loopback (or the address explicitly bound).
    pub fn host_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else { return false };
        let name = match host.rfind(':') {
            // "[::1]:8385" or "127.0.0.1:8385": strip a port after the last colon, unless inside brackets.
            Some(i) if !host[i..].contains(']') => &host[..i],
            _ => host,
        };
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    /// The credential a request carries, if it carries a valid one.
    pub fn credential(&self, headers: &HeaderMap) -> Option<Credential> {
        if let Some(key) = headers.get(KEY_HEADER).and_then(|v| v.to_str().ok()) {
            return same(key.trim(), &self.secret).then_some(Credential::Key);
        }
        let session = cookie_value(headers, &self.cookie)?;
        let sessions = self.sessions.lock().ok()?;
        sessions.iter().find(|(s, _)| same(s, &session)).map(|(_, csrf)| Credential::Session { csrf: csrf.clone() })
    }

    /// A new session: the `Set-Cookie` value and the session's CSRF token.
    pub fn new_session(&self) -> Result<(HeaderValue, String), ApiError> {
        let (session, csrf) = (random_hex(32), random_hex(32));
        let mut sessions = self.sessions.lock().map_err(|_| ApiError::Internal("sessions unusable".into()))?;
        if sessions.len() >= MAX_SESSIONS {
            sessions.remove(0);
        }
        sessions.push((session.clone(), csrf.clone()));
        let cookie = format!("{}={session}; HttpOnly; SameSite=Strict; Path=/", self.cookie);
        let value = HeaderValue::from_str(&cookie).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok((value, csrf))
    }

    /// Whether `key` is the node's secret.
    pub fn is_secret(&self, key: &str) -> bool {
        same(key.trim(), &self.secret)
    }
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn refuse(status: StatusCode, message: &str) -> Response {
    ApiError::Refused { status, message: message.to_string() }.into_response()
}

/// Whether a method changes something (and so needs the CSRF token).
fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The middleware in front of every route: Host check, credential, CSRF token;
/// and headers that keep the pages from being framed or sniffed.
pub async fn guard(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let guard = &state.guard;
    if !guard.host_allowed(request.headers()) {
        return refuse(
            StatusCode::FORBIDDEN,
            "refused: the Host header does not name this computer (127.0.0.1 or localhost); \
             the web app answers only its own address (protection against DNS rebinding)",
        );
    }
    let path = request.uri().path();
    let open = OPEN_PATHS.contains(&path) || (path == "/api/login" && request.method() == Method::POST);
    if !open {
        match guard.credential(request.headers()) {
            None if path == "/" && request.method() == Method::GET => {
                return super::api::to_login().into_response();
            }
            None => {
                let message = if request.headers().contains_key(KEY_HEADER) {
                    "refused: wrong key in X-API-Key"
                } else {
                    "not logged in: open the address `samverkan-node daemon` (or `ui`) printed, with its secret after '#'"
                };
                return refuse(StatusCode::UNAUTHORIZED, message);
            }
            Some(Credential::Session { csrf }) if changes_state(request.method()) => {
                let sent = request.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
                if !same(sent, &csrf) {
                    return refuse(
                        StatusCode::FORBIDDEN,
                        "refused: this change carries no valid CSRF token (X-CSRF-Token); reload the page and try again",
                    );
                }
            }
            Some(_) => {}
        }
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

/// A map of the headers a test sends (`Host` and, if given, a key), for [`Guard`]'s unit tests.
#[cfg(test)]
fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(*k, HeaderValue::from_str(v).unwrap());
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_pass_the_host_check() {
        let guard = Guard::new("ab".repeat(32), "127.0.0.1:8385".parse().unwrap());
        for ok in ["127.0.0.1:8385", "localhost:8385", "LOCALHOST", "[::1]:8385", "127.0.0.1"] {
            assert!(guard.host_allowed(&headers(&[("host", ok)])), "{ok}");
        }
        for bad in ["evil.example:8385", "127.0.0.1.evil.example", "localhost.evil", "[::2]:8385", ""] {
            assert!(!guard.host_allowed(&headers(&[("host", bad)])), "{bad}");
        }
        assert!(!guard.host_allowed(&HeaderMap::new()), "no Host header");
    }

    #[test]
    fn a_session_cookie_or_the_key_is_a_credential_and_nothing_else() {
        let guard = Guard::new("cd".repeat(32), "127.0.0.1:9000".parse().unwrap());
        assert_eq!(guard.credential(&headers(&[("x-api-key", &"cd".repeat(32))])), Some(Credential::Key));
        assert_eq!(guard.credential(&headers(&[("x-api-key", &"ce".repeat(32))])), None);
        let (cookie, csrf) = guard.new_session().unwrap();
        let pair = cookie.to_str().unwrap().split(';').next().unwrap().to_string();
        assert!(cookie.to_str().unwrap().contains("HttpOnly") && cookie.to_str().unwrap().contains("SameSite=Strict"));
        assert_eq!(
            guard.credential(&headers(&[("cookie", &format!("other=1; {pair}"))])),
            Some(Credential::Session { csrf })
        );
        assert_eq!(guard.credential(&headers(&[("cookie", "samverkan_session_9000=00")])), None);
        assert_eq!(guard.credential(&HeaderMap::new()), None);
    }
}
