//! The relay's content limits, as the daemon keeps them, hold for edits made
//! in the web app too, whose node handle stays open while the daemon hears
//! from the relay: an edit over them is refused as the person's input (422,
//! naming the limit), not as a failure of the node, and nothing is stored.

#[path = "support/web.rs"]
mod web;

use web::{request, Cli};

#[test]
fn an_edit_over_the_relays_limits_is_refused_in_the_web_app_with_the_limit_named() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("flen");
    let node = Cli::init(&dir, "Flen", "Flen BF-samordnare");
    let ui = node.serve(&["ui"]);
    let (addr, key) = (ui.addr, ui.secret.clone());
    let host = addr.to_string();
    let post = |path: &str, body: &str| request(addr, "POST", path, &host, &[("X-API-Key", &key)], Some(body));
    let new = r#"{"kind":"citizen_promise","title":"Medborgarlöfte Flen 2026","parties":["Flen","Polisen"]}"#;
    let created = post("/api/docs", new);
    assert_eq!(created.status, 200, "{created:?}");
    let id = serde_json::from_str::<serde_json::Value>(&created.body).unwrap()["id"].as_str().unwrap().to_string();

    // The daemon heard the relay's limits (as `Node::adopt_relay_limits` keeps them) while the web app ran.
    let mut store = samverkan_store::Store::open(&dir.join("node.db")).unwrap();
    store.set_meta(samverkan_node::node::META_RELAY_LIMITS, "2048 1048576").unwrap();
    drop(store);

    let long = "Trygghetsvandring i centrum varje torsdag. ".repeat(100);
    let set = |value: &str| {
        post(&format!("/api/docs/{id}/set"), &serde_json::json!({"field": "title", "value": value}).to_string())
    };
    let refused = set(&long);
    assert_eq!(refused.status, 422, "{refused:?}");
    assert!(refused.body.contains("2048"), "the limit is named: {}", refused.body);
    assert_eq!(node.json(&["show", &id])["document"]["title"], "Medborgarlöfte Flen 2026", "nothing was stored");
    assert_eq!(set("Medborgarlöfte Flen 2027").status, 200, "an edit within the limits is made");
}
