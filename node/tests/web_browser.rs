//! The node's web app in a real browser: a real relay (in process) and two
//! real `samverkan-node daemon`s (Länsstyrelsen and Flen) serving their web
//! apps on 127.0.0.1; headless Chromium (the driver in `tests/support/chromium.rs`)
//! logs in with the printed address and, through the page only: creates a
//! document, edits a field and the body (saved = committed: another process
//! reads it at once), sees Flen's change arrive live without a reload, resolves
//! a conflict with one click, approves with a passphrase-protected signer key
//! and sees the status change, and reads the history and an earlier version.
//! Screenshots at laptop and phone sizes go to `target/test-artifacts/`.
//!
//! Skips with a message when no Chromium is installed (`SAMVERKAN_CHROMIUM`
//! chooses a binary).

#[path = "../../tests/support/chromium.rs"]
mod chromium;
#[path = "support/web.rs"]
mod web;

use std::path::Path;

use chromium::{find_chromium, Browser, Page};
use chrono::Utc;
use samverkan_shared::directory::{Member, MemberKind};
use samverkan_shared::org::OrgId;
use serde_json::json;
use web::{Cli, Served};

const PASSPHRASE: &str = "Nyköpingshus 1317";

fn artifacts() -> std::path::PathBuf {
    chromium::artifacts(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// Sets a form control's value as a person typing would (with an input event).
fn type_into(page: &mut Page, id: &str, value: &str) {
    let js = format!(
        "(function () {{ var e = document.getElementById({id}); e.focus(); e.value = {value}; \
         e.dispatchEvent(new Event('input', {{bubbles: true}})); e.dispatchEvent(new Event('change', {{bubbles: true}})); return true; }})()",
        id = json!(id),
        value = json!(value)
    );
    page.eval(&js);
}

fn click(page: &mut Page, selector: &str) {
    let js =
        format!("(function () {{ var e = document.querySelector({0}); e.click(); return true; }})()", json!(selector));
    page.eval(&js);
}

fn text_of(selector: &str) -> String {
    format!("((document.querySelector({}) || {{}}).textContent || '')", json!(selector))
}

fn daemon(cli: &Cli, relay: &samverkan_relay::server::RelayHandle) -> Served {
    cli.serve(&["daemon", "--relay", &relay.local_addr().to_string(), "--relay-key", &relay.relay_key().to_string()])
}

#[test]
fn coordinators_create_edit_see_live_changes_resolve_approve_and_read_history_in_chromium() {
    let Some(chromium) = find_chromium() else {
        println!("SKIPPED coordinators_…_in_chromium: no chromium binary found (apt-get install chromium, or set SAMVERKAN_CHROMIUM)");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let relay = runtime
        .block_on(samverkan_relay::server::spawn(samverkan_relay::server::RelayConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            root.path().join("relay"),
        )))
        .expect("relay starts");

    let lst = Cli::init(&root.path().join("lst"), "Länsstyrelsen", "Länsstyrelsen BF-samordnare");
    let flen = Cli::init(&root.path().join("flen"), "Flen", "Flen BF-samordnare");
    let lst_org = OrgId::new("lansstyrelsen-sodermanland").unwrap();
    for (cli, org, name) in [
        (&lst, lst_org.clone(), "Länsstyrelsen BF-samordnare"),
        (&flen, OrgId::new("flen-kommun").unwrap(), "Flen BF-samordnare"),
    ] {
        relay.enroll_node(cli.key().parse().unwrap(), org, name).unwrap();
    }
    // The Landshövding's signer key, protected by a passphrase, enrolled by the operator.
    let (ok, out, err) = lst.run(
        &["--json", "signer", "new", "--name", "Beatrice Ask", "--role", "Landshövding", "--passphrase-stdin"],
        &format!("{PASSPHRASE}\n"),
    );
    assert!(ok, "{err}");
    let signer: serde_json::Value = serde_json::from_str(&out).unwrap();
    let key_file = std::fs::read_to_string(lst.dir.join("signers/beatrice-ask.key")).unwrap();
    assert!(key_file.starts_with("samverkan-protected-signer-key-v1"), "the key is sealed: {key_file}");
    relay
        .enroll(Member {
            key: signer["key"].as_str().unwrap().parse().unwrap(),
            kind: MemberKind::Signer,
            org: lst_org.clone(),
            name: "Beatrice Ask".into(),
            role: Some("Landshövding".into()),
            enrolled_at: Utc::now() - chrono::Duration::seconds(5),
            revoked_at: None,
        })
        .unwrap();

    let mut lst_daemon = daemon(&lst, &relay);
    let mut flen_daemon = daemon(&flen, &relay);
    assert!(lst_daemon.url.starts_with("http://127.0.0.1:") && lst_daemon.url.contains("/login#"));

    let browser = Browser::start(&chromium);
    let mut page = Page::open(&browser);
    page.navigate(&lst_daemon.url);
    page.wait_for("the app after login", "document.body.dataset.ready === '1' && location.pathname === '/'");
    assert_eq!(page.eval("location.hash"), json!(""), "the secret is gone from the address bar");
    page.wait_for("the sync bar", "document.getElementById('sync').dataset.relay === 'yes'");
    assert!(page.eval(&text_of("#sync")).as_str().unwrap().contains("relay nåbar"));

    // Create a county agreement with Flen as a party.
    type_into(&mut page, "new-kind", "agreement");
    type_into(&mut page, "new-title", "Samverkansöverenskommelse Flen 2026–2027");
    page.eval("document.getElementById('new-party-flen-kommun').checked = true");
    click(&mut page, "#new-create");
    let title = page.wait_for(
        "the new document's page",
        &format!("location.hash.startsWith('#/doc/') && {}", text_of("#doc-title")),
    );
    assert_eq!(title, json!("Samverkansöverenskommelse Flen 2026–2027"));
    let id = page.eval("location.hash.slice(6)").as_str().unwrap().to_string();
    assert!(page.eval(&text_of("#doc-status")).as_str().unwrap().contains("utkast"));

    // Edit a field: saved means committed (the CLI, another process, reads it at once).
    type_into(&mut page, "f-period-end", "2027-12-31");
    click(&mut page, "#fields-save");
    page.wait_for("the field saved", "document.getElementById('fields-saved').dataset.saved === '1'");
    let shown = lst.json(&["show", &id]);
    assert_eq!(shown["document"]["period"]["end"], "2027-12-31");

    // Edit the body in the text area: merged as a minimal diff against the version it was read from.
    let body = page.eval("document.getElementById('body-text').value").as_str().unwrap().to_string();
    assert!(body.contains("## Bakgrund"), "{body}");
    let edited = body.replace("## Bakgrund\n", "## Bakgrund\n\nLänsstyrelsen och Flens kommun samverkar mot brott.\n");
    type_into(&mut page, "body-text", &edited);
    click(&mut page, "#body-save");
    page.wait_for("the body saved", "document.getElementById('body-saved').dataset.saved === '1'");
    let stored = lst.json(&["show", &id])["document"]["body"].as_str().unwrap().to_string();
    assert!(stored.contains("Länsstyrelsen och Flens kommun samverkar mot brott."), "{stored}");
    page.wait_for(
        "the rendered body",
        "document.getElementById('doc-html').textContent.includes('samverkar mot brott')",
    );

    // An activity that is overdue, for the coordinators' overview.
    type_into(&mut page, "a-new-what", "Trygghetsvandring i Flens centrum");
    type_into(&mut page, "a-new-owners", "Flen; Länsstyrelsen");
    type_into(&mut page, "a-new-due", "2025-05-31");
    click(&mut page, "form[data-activity='new'] button[type='submit']");
    page.wait_for("the activity listed", &format!("{}.includes('Trygghetsvandring')", text_of("#doc-activities")));

    // Flen's node gets the document through the relay; Flen changes the title there.
    let deadline = std::time::Instant::now() + web::LIMIT;
    while !flen.json(&["list"]).as_array().unwrap().iter().any(|d| d["id"] == id.as_str()) {
        assert!(std::time::Instant::now() < deadline, "Flen never received the document");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    page.eval("window.__notReloaded = 'kvar'; true");
    flen.ok(&["set", &id, "title", "Samverkansöverenskommelse Flen och länet 2026–2027"]);
    page.wait_for(
        "Flen's title, live",
        &format!("{} === 'Samverkansöverenskommelse Flen och länet 2026–2027'", text_of("#doc-title")),
    );
    assert_eq!(page.eval("window.__notReloaded"), json!("kvar"), "the page changed without a reload");
    page.viewport(1280, 900, false);
    page.screenshot(&artifacts().join("web-document.png"));

    // A conflict: Flen offline sets the place, Länsstyrelsen sets it in the page; Flen reconnects.
    flen_daemon.stop();
    flen.ok(&["set", &id, "place", "Flen"]);
    type_into(&mut page, "f-place", "Nyköping");
    click(&mut page, "#fields-save");
    page.wait_for("the place saved", "document.getElementById('fields-saved').dataset.saved === '1'");
    let mut flen_daemon = daemon(&flen, &relay);
    page.wait_for(
        "the conflict, side by side",
        "document.querySelectorAll('.conflict[data-path=\"place\"] .side').length === 2",
    );
    let sides = page.eval(&text_of(".conflict[data-path='place']")).as_str().unwrap().to_string();
    assert!(
        sides.contains("Flen BF-samordnare") && sides.contains("Länsstyrelsen BF-samordnare"),
        "who wrote each: {sides}"
    );
    page.screenshot(&artifacts().join("web-conflict.png"));
    page.eval(
        "Array.from(document.querySelectorAll('.conflict[data-path=\"place\"] .side'))\
         .find(function (s) { return s.querySelector('.value').textContent === 'Nyköping'; }).querySelector('button').click(); true",
    );
    page.wait_for("the conflict resolved", "document.querySelectorAll('.conflict').length === 0");
    assert_eq!(lst.json(&["conflicts", &id]), json!([]));
    assert_eq!(lst.json(&["show", &id])["document"]["place"], "Nyköping");

    // Approval: require the Landshövding's signature, sign with the key's passphrase.
    type_into(&mut page, "sig-org", lst_org.as_str());
    type_into(&mut page, "sig-role", "Landshövding");
    click(&mut page, "#signatory-form button[type='submit']");
    page.wait_for(
        "the signatory required",
        &format!("{}.includes('Landshövding (Länsstyrelsen i Södermanlands län)')", text_of("#doc-approval")),
    );
    type_into(&mut page, "approve-signer", "Beatrice Ask");
    type_into(&mut page, "approve-passphrase", "fel lösenfras");
    click(&mut page, "#approve-button");
    let refused = page.wait_for("a wrong passphrase refused", &text_of("#flash"));
    assert!(refused.as_str().unwrap().contains("wrong passphrase"), "{refused}");
    type_into(&mut page, "approve-passphrase", PASSPHRASE);
    click(&mut page, "#approve-button");
    page.wait_for(
        "approved, after the relay's receipt",
        "document.querySelector('#doc-status .badge').dataset.state === 'approved'",
    );
    assert!(page.eval(&text_of("#doc-status")).as_str().unwrap().contains("godkänd"));
    assert!(page.eval(&text_of("#doc-approval")).as_str().unwrap().contains("Beatrice Ask"), "who signed");
    assert_eq!(
        page.eval("document.getElementById('approve-passphrase').value"),
        json!(""),
        "the passphrase is not kept"
    );
    page.wait_for("the signed version's tools", "document.getElementById('bundle-button')");
    click(&mut page, "#bundle-button");
    let bundle =
        page.wait_for("the signed bundle verified", &format!("{}.includes('verifierat')", text_of("#approval-out")));
    assert_eq!(bundle, json!(true));
    page.screenshot(&artifacts().join("web-approved.png"));

    // History: a timeline with names and what changed; an earlier version opens.
    page.eval(&format!("location.hash = '#/doc/{id}/history'; true"));
    page.wait_for("the timeline", "document.querySelectorAll('#timeline > li').length >= 8");
    let timeline = page.eval(&text_of("#timeline")).as_str().unwrap().to_string();
    for expected in ["Flen BF-samordnare", "Länsstyrelsen BF-samordnare", "Nyköping"] {
        assert!(timeline.contains(expected), "{expected}: {timeline}");
    }
    page.eval("document.querySelector('#timeline > li:last-child button').click(); true");
    let first = page.wait_for("the first version", &text_of("#version"));
    assert!(first.as_str().unwrap().contains("Samverkansöverenskommelse Flen 2026–2027"), "{first}");
    page.screenshot(&artifacts().join("web-history.png"));

    // The coordinators' overview across documents, and the start page, at laptop and phone sizes.
    page.eval("location.hash = '#/activities'; true");
    let overdue =
        page.wait_for("the overdue activity", &format!("{}.includes('Trygghetsvandring')", text_of("#act-overdue")));
    assert_eq!(overdue, json!(true));
    page.eval("location.hash = '#/'; true");
    page.wait_for("the start page", "document.querySelector('#docs tr[data-approval=\"approved\"]')");
    page.screenshot_viewport(&artifacts().join("web-start.png"));
    page.viewport(390, 844, true);
    page.screenshot(&artifacts().join("web-start-phone.png"));
    page.eval(&format!("location.hash = '#/doc/{id}'; true"));
    page.wait_for("the document on a phone", &text_of("#doc-title"));
    page.screenshot_viewport(&artifacts().join("web-document-phone.png"));
    let overflow = page.eval("document.documentElement.scrollWidth <= window.innerWidth + 1");
    assert_eq!(overflow, json!(true), "no sideways scrolling on a phone");

    // English is selectable.
    type_into(&mut page, "lang", "en");
    page.wait_for("English", &format!("{}.includes('approved')", text_of("#doc-status")));

    drop(page);
    drop(browser);
    lst_daemon.stop();
    flen_daemon.stop();
    runtime.block_on(relay.shutdown());
}
