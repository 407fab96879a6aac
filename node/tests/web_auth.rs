//! The web app's guard, through the real binary (`samverkan-node ui` on
//! 127.0.0.1 port 0) and plain HTTP: every request needs the node's secret or
//! a session made with it, every change through a session needs its CSRF
//! token, a foreign `Host` is refused (DNS rebinding), the secret file is
//! private and made once, and a non-loopback address needs an explicit flag.

#[path = "support/web.rs"]
mod web;

use web::{request, Cli};

#[test]
fn every_request_needs_the_secret_and_changes_need_a_csrf_token_from_a_loopback_host() {
    let root = tempfile::tempdir().unwrap();
    let node = Cli::init(&root.path().join("flen"), "Flen", "Flen BF-samordnare");
    let mut ui = node.serve(&["ui"]);
    let (addr, key) = (ui.addr, ui.secret.clone());
    let host = addr.to_string();
    let get = |path: &str, headers: &[(&str, &str)]| request(addr, "GET", path, &host, headers, None);

    // No secret: refused, the page itself sends people to the login page.
    let none = get("/api/docs", &[]);
    assert_eq!(none.status, 401, "{none:?}");
    assert!(none.body.contains("not logged in"), "{}", none.body);
    assert_eq!(get("/", &[]).status, 303);
    assert_eq!(get("/", &[]).header("location"), Some("/login"));
    assert_eq!(get("/app.js", &[]).status, 401, "the app's script is not served without a session");
    assert_eq!(get("/api/events", &[]).status, 401, "nor the live updates");

    // A wrong secret: refused.
    let wrong = "0".repeat(key.len());
    let refused = get("/api/docs", &[("X-API-Key", &wrong)]);
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("wrong key"), "{}", refused.body);
    let login = request(addr, "POST", "/api/login", &host, &[("X-API-Key", &wrong)], None);
    assert_eq!(login.status, 401, "{login:?}");
    assert!(login.header("set-cookie").is_none());

    // The right secret: served.
    let listed = get("/api/docs", &[("X-API-Key", &key)]);
    assert_eq!(listed.status, 200, "{listed:?}");
    let value: serde_json::Value = serde_json::from_str(&listed.body).unwrap();
    assert_eq!(value["docs"], serde_json::json!([]));
    assert!(listed.header("content-security-policy").is_some_and(|c| c.contains("default-src 'self'")));

    // A foreign Host, even with the secret: refused (DNS rebinding).
    for foreign in ["evil.example", &format!("evil.example:{}", addr.port()), "127.0.0.1.evil.example"] {
        let answer = request(addr, "GET", "/api/docs", foreign, &[("X-API-Key", &key)], None);
        assert_eq!(answer.status, 403, "{foreign}: {answer:?}");
        assert!(answer.body.contains("Host"), "{}", answer.body);
    }
    assert_eq!(
        request(addr, "GET", "/api/docs", &format!("localhost:{}", addr.port()), &[("X-API-Key", &key)], None).status,
        200
    );

    // Logging in: an HttpOnly, SameSite=Strict session cookie and a CSRF token.
    let login = request(addr, "POST", "/api/login", &host, &[("X-API-Key", &key)], None);
    assert_eq!(login.status, 200, "{login:?}");
    let cookie = login.header("set-cookie").expect("a session cookie").to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_string();
    assert!(pair.starts_with(&format!("samverkan_session_{}=", addr.port())), "{pair}");
    let csrf = serde_json::from_str::<serde_json::Value>(&login.body).unwrap()["csrf"].as_str().unwrap().to_string();
    assert_eq!(get("/api/docs", &[("Cookie", &pair)]).status, 200, "reading with the cookie works");
    assert!(get("/api/session", &[("Cookie", &pair)]).body.contains(&csrf), "the page reads its CSRF token");

    // A change with the cookie but without (or with a wrong) CSRF token: 403, nothing made.
    let new = r#"{"kind":"citizen_promise","title":"Medborgarlöfte Flen 2026","parties":["Flen","Polisen"]}"#;
    let post = |headers: &[(&str, &str)]| request(addr, "POST", "/api/docs", &host, headers, Some(new));
    let missing = post(&[("Cookie", &pair)]);
    assert_eq!(missing.status, 403, "{missing:?}");
    assert!(missing.body.contains("CSRF"), "{}", missing.body);
    assert_eq!(post(&[("Cookie", &pair), ("X-CSRF-Token", &"1".repeat(64))]).status, 403);
    assert_eq!(
        post(&[("Cookie", "samverkan_session_1=abc"), ("X-CSRF-Token", &csrf)]).status,
        401,
        "a made-up session"
    );
    assert_eq!(node.json(&["list"]), serde_json::json!([]), "nothing was made by a refused request");

    // With the token: made, and durable before the answer (another process reads it).
    let made = post(&[("Cookie", &pair), ("X-CSRF-Token", &csrf)]);
    assert_eq!(made.status, 200, "{made:?}");
    let id = serde_json::from_str::<serde_json::Value>(&made.body).unwrap()["id"].as_str().unwrap().to_string();
    let listed = node.json(&["list"]);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["title"], "Medborgarlöfte Flen 2026");
    ui.stop();

    // The secret file: owner-only, made once (the same secret after a restart).
    let secret_file = node.dir.join("web.secret");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&secret_file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let mut again = node.serve(&["ui"]);
    assert_eq!(again.secret, key, "the secret is made once");
    assert!(again.url.starts_with("http://127.0.0.1:"), "{}", again.url);
    again.stop();

    // Binding beyond loopback needs the explicit flag.
    let (ok, _, err) = node.run(&["ui", "--web-listen", "0.0.0.0", "--web-port", "0"], "");
    assert!(!ok);
    assert!(err.contains("loopback") && err.contains("--web-allow-remote"), "{err}");
}
