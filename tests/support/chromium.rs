//! A small driver for headless Chromium over the DevTools protocol, shared by
//! the browser tests (`tests/dashboard_browser.rs`, `node/tests/web_browser.rs`,
//! which includes this file by path). Debian's `chromium` package is what CI
//! installs (`.ci/run`); [`find_chromium`] returns `None` without one (set
//! `SAMVERKAN_CHROMIUM` to choose a binary), and tests skip with a message.
//!
//! Everything is blocking and bounded by [`LIMIT`]: nothing here can hang a test.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

/// The longest any single wait here may take.
pub const LIMIT: Duration = Duration::from_secs(60);

/// The Chromium binary to use: `$SAMVERKAN_CHROMIUM`, else the first of the
/// usual names on `PATH`.
pub fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SAMVERKAN_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Where screenshots go: `target/test-artifacts/` of the workspace (or of
/// `$CARGO_TARGET_DIR`). `workspace` is the workspace's root folder.
pub fn artifacts(workspace: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace.join("target"));
    target.join("test-artifacts")
}

/// A plain HTTP/1.0 GET on loopback; the body of the answer.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, LIMIT)?;
    stream.set_read_timeout(Some(LIMIT))?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes())?;
    // Read the head, then as many bytes as Content-Length says (the server may keep the connection open).
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok());
            if n == 0 || length.is_some_and(|len| body.len() >= len) {
                return Ok(body.to_string());
            }
        } else if n == 0 {
            return Ok(String::new());
        }
    }
}

/// A headless Chromium started by a test; killed when dropped.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    port: u16,
}

impl Browser {
    /// Starts `binary` headless with a fresh profile and a DevTools port.
    pub fn start(binary: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts");
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + LIMIT;
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file).ok().and_then(|t| t.lines().next()?.parse().ok()) {
                break port;
            }
            assert!(Instant::now() < deadline, "chromium did not open its DevTools port within {LIMIT:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        Browser { child, _profile: profile, port }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevTools protocol connection to one page.
pub struct Page {
    ws: WebSocket<TcpStream>,
    next_id: u64,
}

impl Page {
    /// Connects to the browser's first page.
    pub fn open(browser: &Browser) -> Page {
        let addr = SocketAddr::from(([127, 0, 0, 1], browser.port));
        // The first page may be listed a moment after the port opens.
        let deadline = Instant::now() + LIMIT;
        let url = loop {
            if let Ok(list) = http_get(addr, "/json/list") {
                let targets: Vec<Value> = serde_json::from_str(&list).unwrap_or_default();
                if let Some(url) =
                    targets.iter().find(|t| t["type"] == "page").and_then(|t| t["webSocketDebuggerUrl"].as_str())
                {
                    break url.to_string();
                }
            }
            assert!(Instant::now() < deadline, "no page target within {LIMIT:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        let (ws, _) = tungstenite::client(url.as_str(), stream).expect("DevTools websocket");
        Page { ws, next_id: 1 }
    }

    /// Sends a command and waits for its answer (events in between are skipped).
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        match self.try_call(method, params) {
            Ok(result) => result,
            Err(error) => panic!("{method} failed: {error}"),
        }
    }

    /// Sends a command and returns its result, or the DevTools error it got.
    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(request)).expect("send to DevTools");
        loop {
            let message = self.ws.read().expect("read from DevTools");
            let Message::Text(text) = message else { continue };
            let value: Value = serde_json::from_str(text.as_str()).unwrap();
            if value["id"] == id {
                return match value.get("error") {
                    Some(error) => Err(error.clone()),
                    None => Ok(value["result"].clone()),
                };
            }
        }
    }

    /// Opens `url` in the page.
    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
    }

    /// Evaluates a JavaScript expression and returns its (JSON) value
    /// (a promise is awaited).
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true, "awaitPromise": true}));
        assert!(result.get("exceptionDetails").is_none(), "{expression}: {result}");
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is truthy (JavaScript's sense) and returns
    /// its value; fails the test with `what` after [`LIMIT`].
    pub fn wait_for(&mut self, what: &str, expression: &str) -> Value {
        let deadline = Instant::now() + LIMIT;
        let probe = format!("(function () {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()");
        loop {
            let params = json!({"expression": probe, "returnByValue": true, "awaitPromise": true});
            let value = match self.try_call("Runtime.evaluate", params) {
                Ok(result) => result["result"]["value"].clone(),
                // The page is between two documents (a redirect, a reload):
                // its old context is gone and the new one is not there yet.
                Err(error) if navigating(&error) => Value::Null,
                Err(error) => panic!("Runtime.evaluate failed while waiting for {what}: {error}"),
            };
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            if Instant::now() > deadline {
                let shown = self.eval("document.body ? document.body.innerText.slice(0, 3000) : ''");
                panic!("{what}: not seen within {LIMIT:?}; the page shows:\n{}", shown.as_str().unwrap_or(""));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sets the viewport (CSS pixels); `mobile` emulates a phone.
    pub fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": if mobile { 2 } else { 1 }, "mobile": mobile}),
        );
    }

    /// Saves a PNG of the whole page at `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png", "captureBeyondViewport": true}));
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        println!("screenshot: {}", path.display());
    }

    /// Saves a PNG of the visible viewport only at `path`.
    pub fn screenshot_viewport(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
        println!("screenshot: {}", path.display());
    }
}

/// Whether a DevTools error means the page was navigating when asked
/// (its execution context was replaced), so asking again will do.
fn navigating(error: &Value) -> bool {
    let message = error["message"].as_str().unwrap_or("");
    ["navigated or closed", "context was destroyed", "Cannot find context"].iter().any(|m| message.contains(m))
}
