//! The approval commands of `samverkan-node`: `signer new|list`, `approve`,
//! `withdraw`, `status <doc>`, `verify`, `diff`, `show --version signed`,
//! `export --signed` and `verify-bundle`. The logic is in
//! [`samverkan_shared::approval`] and [`samverkan_shared::signed_bundle`];
//! this module reads files, calls [`Node`] and prints.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use samverkan_shared::approval::{self, ApprovalStatus, SignedBy, SignedVersion};
use samverkan_shared::ids::DocId;
use samverkan_shared::markdown;
use samverkan_shared::model::{Document, Signatory};
use samverkan_shared::org::Directory;
use samverkan_shared::signed_bundle::{self, BundleFiles};
use serde_json::json;

use crate::cli::{print, SignerCommand};
use crate::node::{Node, SignerProfile};

fn when(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn short_heads(heads: &[automerge::ChangeHash]) -> String {
    heads.iter().map(|h| h.to_string()[..8].to_string()).collect::<Vec<_>>().join(",")
}

/// The variable naming the relay's data directory, as `samverkan-relay` reads it.
pub const RELAY_DATA_DIR_ENV: &str = "SAMVERKAN_RELAY_DATA_DIR";

/// Stands for the relay's data directory in [`enroll_command`] when this node
/// does not know it; the operator replaces it. (A relay refuses a data
/// directory that holds no relay, so one left in place fails clearly.)
pub const RELAY_DATA_DIR_PLACEHOLDER: &str = "RELAY_DATA_DIR";

/// `text` as one word of a POSIX shell: as is when it is only letters,
/// digits and `-_.,:/@%+=`; else in single quotes.
pub fn shell_word(text: &str) -> String {
    let plain = |c: char| c.is_alphanumeric() || "-_.,:/@%+=".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The command the relay operator runs to enroll a signer, ready for a shell:
/// with the relay's data directory when known (`$SAMVERKAN_RELAY_DATA_DIR`
/// here), else with [`RELAY_DATA_DIR_PLACEHOLDER`] in its place.
pub fn enroll_command(profile: &SignerProfile, relay_data_dir: Option<&Path>) -> String {
    let data_dir = match relay_data_dir {
        Some(dir) => shell_word(&dir.to_string_lossy()),
        None => RELAY_DATA_DIR_PLACEHOLDER.to_string(),
    };
    format!(
        "samverkan-relay enroll --data-dir {data_dir} --key {} --org {} --name {} --signer-role {}",
        profile.key,
        shell_word(profile.org.as_str()),
        shell_word(&profile.name),
        shell_word(&profile.role)
    )
}

/// The variable a signer's passphrase can be given in (for scripts; a person
/// types it at `--passphrase-stdin` or in the web app).
pub const PASSPHRASE_ENV: &str = "SAMVERKAN_SIGNER_PASSPHRASE";

/// The signer passphrase: one line of standard input with `stdin`, else
/// [`PASSPHRASE_ENV`] if set, else none.
pub fn passphrase(stdin: bool) -> Result<Option<String>> {
    if stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).context("reading the passphrase from standard input")?;
        let line = line.trim_end_matches(['\n', '\r']).to_string();
        if line.is_empty() {
            bail!("no passphrase on standard input");
        }
        return Ok(Some(line));
    }
    Ok(std::env::var(PASSPHRASE_ENV).ok().filter(|p| !p.is_empty()))
}

/// Says on standard error when a signer's key is an older one without a passphrase.
fn note_unprotected(node: &Node, signer: &str) {
    if let Ok(crate::signer_key::Protection::None) = node.signer_protection(signer) {
        crate::output::stderr(&format!(
            "note: the key of {signer} is not protected by a passphrase (made before passphrases); \
             protect it with `samverkan-node signer protect --name {}`",
            shell_word(signer)
        ));
    }
}

/// `signer new | list | protect`.
pub fn signer(node: &Node, cmd: SignerCommand, json: bool) -> Result<()> {
    match cmd {
        SignerCommand::Protect { name, passphrase_stdin } => {
            let old = match node.signer_protection(&name)? {
                crate::signer_key::Protection::Passphrase => std::env::var("SAMVERKAN_SIGNER_OLD_PASSPHRASE").ok(),
                crate::signer_key::Protection::None => None,
            };
            let Some(new) = passphrase(passphrase_stdin)? else {
                bail!("give the new passphrase on standard input (--passphrase-stdin) or in ${PASSPHRASE_ENV}");
            };
            node.protect_signer(&name, old.as_deref(), &new)?;
            print(json, json!({"name": name, "protected": true}), || {
                format!("The key of {name} is now protected by the passphrase given.")
            })
        }
        SignerCommand::New { name, role, org, passphrase_stdin } => {
            let secret = passphrase(passphrase_stdin)?;
            if secret.is_none() {
                crate::output::stderr(&format!(
                    "note: no passphrase given (--passphrase-stdin or ${PASSPHRASE_ENV}): the key is kept unprotected"
                ));
            }
            let profile = node.create_signer_with(&name, &role, org.as_deref(), secret.as_deref())?;
            let relay_data_dir = std::env::var_os(RELAY_DATA_DIR_ENV).filter(|d| !d.is_empty()).map(PathBuf::from);
            let command = enroll_command(&profile, relay_data_dir.as_deref());
            let mut value = json!(profile);
            value["enroll_command"] = json!(command);
            print(json, value, || {
                let fill_in = if relay_data_dir.is_none() {
                    format!(
                        " (replace {RELAY_DATA_DIR_PLACEHOLDER} with the relay's data directory, the one \
                         `samverkan-relay serve --data-dir` uses)"
                    )
                } else {
                    String::new()
                };
                format!(
                    "Created signer {} ({}, {}).\npublic key: {}\nGive it to the relay operator, who runs{fill_in}:\n  {command}\n\
                     Once it has run, `samverkan-node sync` brings the enrollment here; then `samverkan-node approve <doc> --as {}`.",
                    profile.name,
                    profile.role,
                    node.directory().name_of(&profile.org),
                    profile.key,
                    shell_word(&profile.name)
                )
            })
        }
        SignerCommand::List => {
            let signers = node.signers()?;
            print(json, json!(signers), || {
                if signers.is_empty() {
                    return "No signers on this node: `samverkan-node signer new --name <name> --role <role>`."
                        .to_string();
                }
                signers
                    .iter()
                    .map(|s| format!("{:<24} {:<20} {:<28} {}", s.name, s.role, s.org.as_str(), s.key.short()))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
    }
}

/// `approve` (or, with `withdraw`, `withdraw`).
pub fn approve(
    node: &mut Node,
    doc: &str,
    signer: &str,
    withdraw: bool,
    passphrase_stdin: bool,
    json: bool,
) -> Result<()> {
    let id = node.resolve(doc)?;
    let secret = passphrase(passphrase_stdin)?;
    note_unprotected(node, signer);
    let record = if withdraw {
        node.withdraw_with(&id, signer, secret.as_deref())?
    } else {
        node.approve_with(&id, signer, secret.as_deref())?
    };
    let status = node.approval_status(&id)?;
    print(json, json!({"id": id, "record": record, "status": status}), || {
        let what = if withdraw { "Withdrew the approval of" } else { "Signed" };
        format!(
            "{what} version {} of {} as {} ({}).\n{}",
            short_heads(&record.heads),
            id.short(),
            record.role,
            node.directory().name_of(&record.org),
            format_status(node, &id, &status, node.enrollment().ok().flatten().is_some()).trim_end()
        )
    })
}

fn signer_line(node: &Node, s: &SignedBy) -> String {
    format!(
        "{}, {} ({}), signed {}, received by the relay {}",
        s.name,
        s.role,
        node.directory().name_of(&s.org),
        when(&s.signed_at),
        when(&s.received_at)
    )
}

fn missing_line(node: &Node, s: &Signatory) -> String {
    format!(
        "{} ({}){}",
        s.role,
        node.directory().name_of(&s.org),
        s.name.as_ref().map(|n| format!(", {n}")).unwrap_or_default()
    )
}

fn version_lines(node: &Node, out: &mut String, v: &SignedVersion) {
    for s in &v.signed {
        out.push_str(&format!("    signed: {}\n", signer_line(node, s)));
    }
    for m in &v.missing {
        out.push_str(&format!("    missing: {}\n", missing_line(node, m)));
    }
}

/// The approval state for people.
pub fn format_status(node: &Node, id: &DocId, status: &ApprovalStatus, has_directory: bool) -> String {
    let mut out = format!("approval of {}: {}\n", id.short(), status.state.label());
    if !has_directory {
        out.push_str(
            "  (no enrollment directory from the relay yet: signatures cannot be checked; run `samverkan-node sync`)\n",
        );
    }
    if status.required.is_empty() {
        out.push_str("  the document names no required signatories (`samverkan-node signatory add`)\n");
    } else {
        let required: Vec<String> = status.required.iter().map(|s| missing_line(node, s)).collect();
        out.push_str(&format!("  required: {}\n", required.join("; ")));
    }
    if let Some(v) = &status.in_force {
        out.push_str(&format!("  in force: version {}\n", short_heads(&v.heads)));
        version_lines(node, &mut out, v);
        if status.state == approval::ApprovalState::ChangedSinceApproval {
            out.push_str(&format!(
                "  changed since approval: the signed version stays in force (`samverkan-node show {0} --version signed`, `samverkan-node diff {0}`)\n",
                id.short()
            ));
        }
    }
    if let Some(v) = &status.pending {
        out.push_str(&format!("  awaiting signatures on version {}\n", short_heads(&v.heads)));
        if !v.is_current {
            out.push_str(
                "    (the document has changed since these signatures: `approve` now signs the current version)\n",
            );
        }
        version_lines(node, &mut out, v);
    }
    for w in &status.withdrawn {
        out.push_str(&format!("  withdrawn: {}\n", signer_line(node, w)));
    }
    for a in &status.awaiting_receipt {
        out.push_str(&format!(
            "  AWAITING RELAY RECEIPT (not counted yet): record {} ({}) by {} ({}), signed {}: sync so that the relay receives it\n",
            a.index,
            a.action.as_str(),
            a.signer.short(),
            a.role,
            when(&a.signed_at)
        ));
    }
    for f in &status.flagged {
        out.push_str(&format!(
            "  NOT VALID: record {} by {} ({}): {}\n",
            f.index,
            f.signer.map(|s| s.short()).unwrap_or_else(|| "?".into()),
            f.role.as_deref().unwrap_or("?"),
            f.problem
        ));
    }
    out
}

/// `status <doc>`.
pub fn status(node: &Node, doc: &str, json: bool) -> Result<()> {
    let id = node.resolve(doc)?;
    let status = node.approval_status(&id)?;
    let has_directory = node.enrollment()?.is_some();
    print(json, json!({"id": id, "approval": status, "directory": has_directory}), || {
        format_status(node, &id, &status, has_directory).trim_end().to_string()
    })
}

/// The approved version in force, as a document (`show --version signed`).
pub fn signed_version(node: &Node, id: &DocId) -> Result<Document> {
    let status = node.approval_status(id)?;
    let Some(version) = status.in_force else {
        bail!("document {} has no approved version ({})", id.short(), status.state.label());
    };
    Ok(node.document(id)?.at(&version.heads)?)
}

/// `verify <doc>`: every record checked; fails if any does not verify.
pub fn verify(node: &Node, doc: &str, json: bool) -> Result<()> {
    let id = node.resolve(doc)?;
    let Some(directory) = node.enrollment()? else {
        bail!("this node has no enrollment directory from the relay yet, so signers cannot be checked; run `samverkan-node sync` first");
    };
    let document = node.document(&id)?;
    let receipts = node.receipts(&id)?;
    let mut results = Vec::new();
    for (index, record) in approval::records(&document) {
        let outcome = record.clone().and_then(|r| {
            approval::check_receipted(&document, &r, &directory, &receipts).map(|(m, at)| (m.name.clone(), at))
        });
        results.push((index, record.ok(), outcome));
    }
    let awaiting =
        results.iter().filter(|(_, _, o)| matches!(o, Err(approval::RecordProblem::AwaitingReceipt))).count();
    let bad = results.iter().filter(|(_, _, o)| o.is_err()).count() - awaiting;
    print(
        json,
        json!({"id": id, "ok": bad == 0, "records": results.iter().map(|(i, r, o)| json!({
            "index": i,
            "record": r,
            "signer_name": o.as_ref().ok().map(|(name, _)| name),
            "received_at": o.as_ref().ok().map(|(_, at)| at),
            "awaiting_receipt": matches!(o, Err(approval::RecordProblem::AwaitingReceipt)),
            "problem": o.as_ref().err().map(ToString::to_string),
        })).collect::<Vec<_>>()}),
        || {
            if results.is_empty() {
                return format!("{}: no approvals to verify", id.short());
            }
            let mut out = String::new();
            for (i, r, o) in &results {
                let what = r
                    .as_ref()
                    .map(|r| {
                        format!("{} by {} ({}) at {}", r.action.as_str(), r.signer.short(), r.role, when(&r.signed_at))
                    })
                    .unwrap_or_else(|| "unreadable record".into());
                match o {
                    Ok((name, at)) => out.push_str(&format!(
                        "ok      #{i} {what}: {name}, enrolled signer with that role when the relay received it {}\n",
                        when(at)
                    )),
                    Err(approval::RecordProblem::AwaitingReceipt) => out.push_str(&format!(
                        "AWAITING RELAY RECEIPT #{i} {what}: not counted until the relay has received it (sync)\n"
                    )),
                    Err(p) => out.push_str(&format!("INVALID #{i} {what}: {p}\n")),
                }
            }
            out.push_str(&format!(
                "{} record(s), {} invalid, {} awaiting the relay's receipt",
                results.len(),
                bad,
                awaiting
            ));
            out
        },
    )?;
    if bad > 0 {
        bail!("{bad} approval record(s) of {} do not verify", id.short());
    }
    if awaiting > 0 {
        bail!(
            "{awaiting} approval record(s) of {} have no receipt from the relay yet and do not count; run `samverkan-node sync`",
            id.short()
        );
    }
    Ok(())
}

/// Whether the document changed since its approved version, and the unified
/// diff of the Markdown (signed → current), as `diff` prints it.
pub fn signed_diff(node: &Node, id: &DocId) -> Result<(bool, String)> {
    let signed = signed_version(node, id)?.view()?;
    let current = node.document(id)?.view()?;
    let (old, new) = (markdown::export(&signed, node.directory()), markdown::export(&current, node.directory()));
    let text = similar::TextDiff::from_lines(&old, &new).unified_diff().header("signed", "current").to_string();
    Ok((old != new, text))
}

/// `diff <doc>`: the Markdown of the signed version against the current one.
pub fn diff(node: &Node, doc: &str, json: bool) -> Result<()> {
    let id = node.resolve(doc)?;
    let (changed, text) = signed_diff(node, &id)?;
    print(json, json!({"id": id, "changed": changed, "diff": text}), || {
        if !changed {
            "No changes since the approved version.".to_string()
        } else {
            text.trim_end().to_string()
        }
    })
}

/// `export <doc> --signed <dir>`.
pub fn export_signed(node: &Node, doc: &str, dir: &Path, json: bool) -> Result<()> {
    let id = node.resolve(doc)?;
    let files = node.export_signed(&id, dir)?;
    let report = signed_bundle::verify(&files, node.pinned_relay()?.as_ref())
        .context("the bundle just written does not verify")?;
    print(json, json!({"id": id, "dir": dir, "report": report}), || {
        format!(
            "Wrote the approved version of {} ({} signature(s)) to {}; check it with `samverkan-node verify-bundle {}`",
            id.short(),
            report.signed.len(),
            dir.display(),
            dir.display()
        )
    })
}

/// `verify-bundle <dir>`: needs no data directory.
pub fn verify_bundle(dir: &Path, relay_key: Option<&str>, json: bool) -> Result<()> {
    let read =
        |name: &str| std::fs::read(dir.join(name)).with_context(|| format!("reading {}", dir.join(name).display()));
    let text = |name: &str| -> Result<String> {
        String::from_utf8(read(name)?).with_context(|| format!("{name} was altered: it is not UTF-8 text"))
    };
    let files = BundleFiles {
        manifest: text(signed_bundle::MANIFEST_FILE)?,
        markdown: text(signed_bundle::MARKDOWN_FILE)?,
        history: read(signed_bundle::HISTORY_FILE)?,
    };
    let pinned = relay_key
        .map(|k| k.trim().parse().with_context(|| format!("the relay key must be 64 hex digits, got {k:?}")))
        .transpose()?;
    let report = signed_bundle::verify(&files, pinned.as_ref())
        .with_context(|| format!("the signed bundle in {} does NOT verify", dir.display()))?;
    let orgs = Directory::sodermanland();
    print(json, json!(report), || {
        let mut out = format!("VALID: {} ({})\nversion {}\n", report.title, report.doc, short_heads(&report.heads));
        for s in &report.signed {
            out.push_str(&format!(
                "  signed by {}, {} ({}), {}; received by the relay {}\n",
                s.name,
                s.role,
                orgs.name_of(&s.org),
                when(&s.signed_at),
                when(&s.received_at)
            ));
        }
        if report.relay_pinned {
            out.push_str(&format!(
                "enrollment and the relay's receipts verified with the pinned relay key {}",
                report.relay_key.short()
            ));
        } else {
            out.push_str(&format!(
                "enrollment verified with relay key {} from the manifest (not pinned: pass --relay-key to be sure)",
                report.relay_key
            ));
        }
        out
    })
}
