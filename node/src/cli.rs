//! The `samverkan-node` command line: argument parsing and output.
//!
//! Each command opens the node, does one thing through [`crate::node::Node`],
//! and prints either readable text or, with `--json`, one JSON value.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use chrono::{NaiveDate, Utc};
use clap::{Args, Parser, Subcommand};
use samverkan_shared::bundle::{Bundle, HeadsSummary};
use samverkan_shared::ids::{DocId, ItemId};
use samverkan_shared::markdown;
use samverkan_shared::model::{
    Activity, ActivityStatus, DocKind, Due, FollowUp, Meeting, MeetingBody, Period, Scope, Signatory,
};
use serde_json::json;

use crate::node::Node;

/// Samverkan node: your organisation's offline copy of the county's crime-prevention
/// collaboration documents (samverkansöverenskommelser, medborgarlöften, verksamhetsplaner).
#[derive(Debug, Parser)]
#[command(name = "samverkan-node", version, about, long_about = None)]
pub struct Cli {
    /// The node's data directory [default: $XDG_DATA_HOME/samverkan, else ~/.local/share/samverkan].
    #[arg(long, global = true, env = "SAMVERKAN_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a node in the data directory for your organisation.
    Init {
        /// Your organisation: id, name or short name (e.g. "Flen", "Polisområde Södermanland").
        #[arg(long)]
        org: String,
        /// A name for this node (e.g. "Flen BF-samordnare"); defaults to the organisation's name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Show this node's identity.
    Whoami,
    /// List the organisations this node knows.
    Orgs,
    /// Create a new document.
    New(NewArgs),
    /// Import a Markdown file as a document (or update the one here it was exported from).
    /// A file whose content a document here has already is refused (see --new-copy).
    Import {
        /// The Markdown file ('-' for standard input).
        file: PathBuf,
        /// The document kind, if it cannot be recognised from the title.
        #[arg(long)]
        kind: Option<DocKind>,
        /// Make a new document even if one here has this content already (the
        /// same file imported before), or the file was exported from one here.
        #[arg(long)]
        new_copy: bool,
    },
    /// Export a document as Markdown with front matter; with `--signed DIR`, the
    /// approved version as a self-contained bundle verifiable with `verify-bundle`.
    Export {
        /// Document id or unique prefix.
        doc: String,
        /// Write to this file instead of standard output.
        #[arg(long, short, conflicts_with = "signed")]
        output: Option<PathBuf>,
        /// Write the signed bundle of the version in force into this directory.
        #[arg(long, value_name = "DIR")]
        signed: Option<PathBuf>,
    },
    /// List the documents.
    List,
    /// Show a document.
    Show {
        /// Document id or unique prefix.
        doc: String,
        /// Print the exportable Markdown instead of the readable rendering.
        #[arg(long)]
        markdown: bool,
        /// Which version: `current` (default) or `signed` (the approved version in force).
        #[arg(long, value_name = "VERSION", default_value = "current")]
        version: String,
    },
    /// Set one field, e.g. `set <doc> period.end 2026-12-31` or `set <doc> activities.<id>.status done`.
    Set {
        /// Document id or unique prefix.
        doc: String,
        /// Field path: title, body, scope, parties, period.start, period.end, place, date,
        /// activities.<id>.(what|owners|due|followup_method|status), goals.<id>.text,
        /// followups.<id>.(date|author|text|activity), meetings.<id>.(date|body|notes),
        /// signatories.<n>.(org|role|name).
        field: String,
        /// The new value ('' clears an optional field; '-' reads standard input).
        value: String,
    },
    /// Edit a document as Markdown in $VISUAL or $EDITOR.
    Edit {
        /// Document id or unique prefix.
        doc: String,
    },
    /// Activities: add, change or remove.
    #[command(subcommand)]
    Activity(ActivityCommand),
    /// Goals: add or remove.
    #[command(subcommand)]
    Goal(GoalCommand),
    /// Follow-up entries (uppföljning).
    #[command(subcommand)]
    Followup(FollowupCommand),
    /// Meeting records (styrgrupp, nätverk, …).
    #[command(subcommand)]
    Meeting(MeetingCommand),
    /// Required signatories.
    #[command(subcommand)]
    Signatory(SignatoryCommand),
    /// Who changed a document, what and when.
    History {
        /// Document id or unique prefix.
        doc: String,
    },
    /// Overlapping concurrent edits of one text (both sides changed the same words;
    /// the merge mixed them): list them, or settle one with `--resolve <n>`.
    Review {
        /// Document id or unique prefix.
        doc: String,
        /// Settle overlap <n> (as listed) and mark it reviewed for every party.
        #[arg(long, value_name = "N")]
        resolve: Option<usize>,
        /// Which version of the paragraph to keep.
        #[arg(long, requires = "resolve", conflicts_with = "text")]
        take: Option<crate::review::TakeArg>,
        /// Write the paragraph instead ('-' reads standard input).
        #[arg(long, requires = "resolve")]
        text: Option<String>,
    },
    /// Fields where concurrent edits left more than one value.
    Conflicts {
        /// Document id or unique prefix.
        doc: String,
        /// Resolve: the field path to settle.
        #[arg(long, requires = "value")]
        resolve: Option<String>,
        /// Resolve: the value to keep.
        #[arg(long)]
        value: Option<String>,
    },
    /// Offline exchange through files (USB stick, e-mail).
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Check the database and every document for damage.
    Check,
    /// Enroll this node at the relay with a one-time join code from its operator.
    Join {
        /// The code (`svk1.…`), as `samverkan-relay enroll --join-code` printed it.
        code: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// The relay's addresses this node tries, in order (its instances: same key, one database).
    #[command(subcommand)]
    Relay(RelayCommand),
    /// Sync every document with the relay once, then exit with a summary.
    Sync(RelayArgs),
    /// Stay connected to the relay: push local edits, receive remote ones, reconnect when cut off.
    /// Also serves the web app on 127.0.0.1 (see `ui`; --no-web to leave it out) and prints its address.
    Daemon {
        /// The relay.
        #[command(flatten)]
        relay: RelayArgs,
        /// The web app.
        #[command(flatten)]
        web: WebArgs,
        /// Do not serve the web app.
        #[arg(long)]
        no_web: bool,
    },
    /// Serve the web app only (no sync), until interrupted: open the printed
    /// address in a browser on this computer.
    Ui(WebArgs),
    /// Signer keys of the people who approve documents on this machine.
    #[command(subcommand)]
    Signer(SignerCommand),
    /// Sign the document's current version as a signer (stored in the document; syncs like an edit).
    Approve {
        /// Document id or unique prefix.
        doc: String,
        /// The signer (as named at `signer new`).
        #[arg(long = "as", value_name = "SIGNER")]
        signer: String,
        /// Read the signer key's passphrase from standard input (else from
        /// $SAMVERKAN_SIGNER_PASSPHRASE).
        #[arg(long)]
        passphrase_stdin: bool,
    },
    /// Withdraw a signer's approval of a document (itself a signed act).
    Withdraw {
        /// Document id or unique prefix.
        doc: String,
        /// The signer (as named at `signer new`).
        #[arg(long = "as", value_name = "SIGNER")]
        signer: String,
        /// Read the signer key's passphrase from standard input (else from
        /// $SAMVERKAN_SIGNER_PASSPHRASE).
        #[arg(long)]
        passphrase_stdin: bool,
    },
    /// Check a document's approvals offline: every signature, that each signer was an
    /// enrolled signer with that role at signing time, and that the signed versions exist.
    Verify {
        /// Document id or unique prefix.
        doc: String,
    },
    /// What changed since the approved version (a diff of the Markdown).
    Diff {
        /// Document id or unique prefix.
        doc: String,
    },
    /// Verify a signed bundle (`export --signed`) with no database.
    VerifyBundle {
        /// The bundle directory.
        dir: PathBuf,
        /// The relay's public key to trust (64 hex); without it, the key in the manifest is used.
        #[arg(long)]
        relay_key: Option<String>,
    },
    /// Sync status: relay reachable, last successful sync, local changes waiting,
    /// remote changes received since the last look. With a document: its approval state.
    ///
    /// Exit status: 0 when the relay answered (or was not tried: --offline, or
    /// no relay configured yet), 3 when it is not reachable (the status is
    /// printed all the same), 1 on other errors.
    Status {
        /// A document: show its approval state instead.
        doc: Option<String>,
        /// Do not try to reach the relay (exit status 0 whatever its state).
        #[arg(long)]
        offline: bool,
        /// Give the relay this many seconds to answer.
        #[arg(long, value_name = "SECONDS", default_value_t = 5)]
        timeout: u64,
        /// Do not count this as a look (the "since last look" counts stay).
        #[arg(long)]
        peek: bool,
    },
    /// A document the relay refused: list the local changes it does not hold and what
    /// recovery does with each; with `--apply`, save the whole document under
    /// `recovered/` in the data directory, then rebuild it on what the relay holds
    /// (this node's edits made again, approvals not) so it syncs again.
    Recover {
        /// Document id or unique prefix.
        doc: String,
        /// Do it (without: only show what would be done; nothing changes).
        #[arg(long)]
        apply: bool,
    },
}

/// Which relay to use; remembered after the first use.
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The relay's address (host:port), or several relay instances sharing one
    /// relay key, comma-separated (tried in order; on loss the next); defaults
    /// to the ones used last.
    #[arg(long)]
    pub relay: Option<String>,
    /// The relay's public key (64 hex digits, as `samverkan-relay key` prints it);
    /// defaults to the one pinned at join or last use.
    #[arg(long)]
    pub relay_key: Option<String>,
    /// Give up a one-shot sync after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Offer again the documents whose changes the relay refused earlier (e.g.
    /// after the operator raised a limit or enrolled a key); by default they
    /// are held back until recovered (`samverkan-node recover`).
    #[arg(long)]
    pub retry_refused: bool,
}

/// Where the web app listens (`daemon`, `ui`).
#[derive(Debug, Args)]
pub struct WebArgs {
    /// The web app's port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = crate::web::DEFAULT_PORT)]
    pub web_port: u16,
    /// Bind the web app to this address instead of 127.0.0.1 (needs --web-allow-remote
    /// unless it is a loopback address).
    #[arg(long, value_name = "IP")]
    pub web_listen: Option<std::net::IpAddr>,
    /// Allow a non-loopback --web-listen address (the app is then reachable from the network:
    /// protect that path; the secret and CSRF checks still apply).
    #[arg(long)]
    pub web_allow_remote: bool,
}

impl WebArgs {
    fn config(&self) -> crate::web::WebConfig {
        let ip = self.web_listen.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
        crate::web::WebConfig {
            listen: std::net::SocketAddr::new(ip, self.web_port),
            allow_remote: self.web_allow_remote,
        }
    }
}

/// Starts the web app and prints its address (with the secret) on standard output.
async fn start_web(dir: &Path, args: &WebArgs, link: crate::web::SyncLink) -> Result<crate::web::WebHandle> {
    let handle = crate::web::spawn(dir, &args.config(), link)
        .await
        .context("the web app did not start (choose another --web-port)")?;
    crate::output::stdout_line(&format!("web app: {}", handle.login_url()))?;
    crate::output::stderr(
        "open the web app's address in a browser on this computer; the part after '#' is this node's secret (keep it to yourself)",
    );
    Ok(handle)
}

/// Arguments of `new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// Kind: agreement (samverkansöverenskommelse), citizen_promise (medborgarlöfte), operations_plan (verksamhetsplan).
    pub kind: DocKind,
    /// Title.
    #[arg(long)]
    pub title: String,
    /// A party (repeat for each); defaults to this node's organisation.
    #[arg(long = "party")]
    pub parties: Vec<String>,
    /// County-wide or local; by default local when a municipality is a party.
    #[arg(long)]
    pub scope: Option<Scope>,
    /// First day in force (YYYY-MM-DD).
    #[arg(long)]
    pub start: Option<NaiveDate>,
    /// Last day in force (YYYY-MM-DD).
    #[arg(long)]
    pub end: Option<NaiveDate>,
}

/// `relay …`
#[derive(Debug, Subcommand)]
pub enum RelayCommand {
    /// List the relay's addresses in the order they are tried, and its pinned key.
    List,
    /// Add an address of another instance of the same relay, tried after the others.
    AddAddress {
        /// The instance's address (host:port).
        address: String,
    },
    /// Stop trying an address (the first left becomes the one tried first).
    RemoveAddress {
        /// The address, as `relay list` shows it.
        address: String,
    },
}

/// `activity …`
#[derive(Debug, Subcommand)]
pub enum ActivityCommand {
    /// Add an activity.
    Add {
        /// Document id or unique prefix.
        doc: String,
        /// What is to be done.
        what: String,
        /// Who is responsible (repeat for joint owners): an organisation, a unit
        /// ("LPO Katrineholm", "Kommunen (tekniska förvaltningen)"), "kommunen" or
        /// "polisen" for the document's party, or "extern: Fastighetsägarna".
        #[arg(long = "owner")]
        owners: Vec<String>,
        /// Due: YYYY-MM-DD, löpande (ongoing), or a quarter (2025-Q2, "Q2 2025").
        #[arg(long)]
        due: Option<String>,
        /// How the activity is followed up, e.g. "Antal genomförda vandringar".
        #[arg(long)]
        followup_method: Option<String>,
        /// Status (planned, ongoing, done, cancelled).
        #[arg(long, default_value = "planned")]
        status: ActivityStatus,
    },
    /// Change an activity.
    Set {
        /// Document id or unique prefix.
        doc: String,
        /// Activity id or unique prefix.
        activity: String,
        /// New description.
        #[arg(long)]
        what: Option<String>,
        /// New owners, replacing the old (repeat for joint owners; '' clears).
        #[arg(long = "owner")]
        owners: Vec<String>,
        /// New due: YYYY-MM-DD, löpande, or a quarter such as 2025-Q2 ('' clears).
        #[arg(long)]
        due: Option<String>,
        /// New follow-up method ('' clears).
        #[arg(long)]
        followup_method: Option<String>,
        /// New status.
        #[arg(long)]
        status: Option<ActivityStatus>,
    },
    /// Remove an activity.
    Remove {
        /// Document id or unique prefix.
        doc: String,
        /// Activity id or unique prefix.
        activity: String,
    },
}

/// `goal …`
#[derive(Debug, Subcommand)]
pub enum GoalCommand {
    /// Add a goal.
    Add {
        /// Document id or unique prefix.
        doc: String,
        /// The goal.
        text: String,
    },
    /// Remove a goal.
    Remove {
        /// Document id or unique prefix.
        doc: String,
        /// Goal id or unique prefix.
        goal: String,
    },
}

/// `followup …`
#[derive(Debug, Subcommand)]
pub enum FollowupCommand {
    /// Add a follow-up entry.
    Add {
        /// Document id or unique prefix.
        doc: String,
        /// The evaluation text.
        text: String,
        /// Date (default today).
        #[arg(long)]
        date: Option<NaiveDate>,
        /// Author (default this node's name).
        #[arg(long)]
        author: Option<String>,
        /// The activity it follows up.
        #[arg(long)]
        activity: Option<String>,
    },
}

/// `meeting …`
#[derive(Debug, Subcommand)]
pub enum MeetingCommand {
    /// Record a meeting.
    Add {
        /// Document id or unique prefix.
        doc: String,
        /// Which body met (steering_group, working_group, regional_network, other).
        #[arg(long)]
        body: MeetingBody,
        /// Date (default today).
        #[arg(long)]
        date: Option<NaiveDate>,
        /// Minutes and decisions.
        #[arg(long, default_value = "")]
        notes: String,
    },
}

/// `signatory …`
#[derive(Debug, Subcommand)]
pub enum SignatoryCommand {
    /// Require a signature.
    Add {
        /// Document id or unique prefix.
        doc: String,
        /// Signing organisation.
        #[arg(long)]
        org: String,
        /// Role title, e.g. Landshövding.
        #[arg(long)]
        role: String,
        /// Person's name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove the n-th required signature (as listed by `show`).
    Remove {
        /// Document id or unique prefix.
        doc: String,
        /// Position, from 1.
        n: usize,
    },
}

/// `signer …`
#[derive(Debug, Subcommand)]
pub enum SignerCommand {
    /// Create a signer key (kept in the data directory, mode 0600) and print its public key
    /// for the relay operator to enroll.
    New {
        /// The person's name, e.g. "Beatrice Ask".
        #[arg(long)]
        name: String,
        /// The role title signed as, e.g. "Landshövding".
        #[arg(long)]
        role: String,
        /// The organisation signed for (default: this node's).
        #[arg(long)]
        org: Option<String>,
        /// Read the passphrase protecting the key from standard input (else from
        /// $SAMVERKAN_SIGNER_PASSPHRASE; without either the key is unprotected).
        #[arg(long)]
        passphrase_stdin: bool,
    },
    /// List the signers on this node.
    List,
    /// Protect an older signer key with a passphrase (the key, and so its
    /// enrollment, stays the same). A protected key gets a new passphrase; its
    /// current one is read from $SAMVERKAN_SIGNER_OLD_PASSPHRASE.
    Protect {
        /// The signer (as named at `signer new`).
        #[arg(long)]
        name: String,
        /// Read the new passphrase from standard input (else from $SAMVERKAN_SIGNER_PASSPHRASE).
        #[arg(long)]
        passphrase_stdin: bool,
    },
}

/// `bundle …`
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Write the changes of the documents the receiver's organisation is a party to.
    Export {
        /// The bundle file to write.
        file: PathBuf,
        /// A heads file from the receiving node (`bundle heads`): include only what it
        /// lacks, of the documents its organisation is a party to.
        #[arg(long)]
        have: Option<PathBuf>,
        /// The receiving organisation (id, name or alias), when there is no heads file:
        /// every document it is a party to, whole.
        #[arg(long = "for", value_name = "ORGANISATION")]
        receiver: Option<String>,
    },
    /// Merge a bundle file into this node.
    Import {
        /// The bundle file.
        file: PathBuf,
    },
    /// Write what this node has (for the sender's `bundle export --have`).
    Heads {
        /// The heads file to write.
        file: PathBuf,
    },
}

/// Exit status of `samverkan-node status` when the relay is not reachable.
pub const EXIT_RELAY_UNREACHABLE: u8 = 3;

/// A command's failure with its own exit status (instead of 1), said on
/// standard error like any error.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    /// The process's exit status.
    pub code: u8,
    /// What to tell the user.
    pub message: String,
}

/// The exit status for a command's error: [`Exit::code`] if it is (or was
/// caused by) an [`Exit`], else 1.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    error.chain().find_map(|cause| cause.downcast_ref::<Exit>()).map_or(1, |exit| exit.code)
}

/// The data directory: the flag, `$SAMVERKAN_DATA_DIR`, or `$XDG_DATA_HOME/samverkan`
/// (`~/.local/share/samverkan`).
fn data_dir(cli: &Cli) -> Result<PathBuf> {
    if let Some(dir) = &cli.data_dir {
        return Ok(dir.clone());
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .context("no --data-dir given and neither XDG_DATA_HOME nor HOME is set")?;
    Ok(base.join("samverkan"))
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    let dir = data_dir(&cli)?;
    let json = cli.json;
    if let Command::Init { org, name } = &cli.command {
        let node = Node::init(&dir, org, name.as_deref())?;
        return print(
            json,
            json!({"data_dir": dir, "node": node.node_id().to_string(), "short": node.node_id().short(), "org": node.org(), "name": node.name()}),
            || {
                format!(
                    "Initialised node {} for {} in {}",
                    node.node_id().short(),
                    node.directory().name_of(node.org()),
                    dir.display()
                )
            },
        );
    }
    if let Command::VerifyBundle { dir: bundle, relay_key } = &cli.command {
        return crate::approvals::verify_bundle(bundle, relay_key.as_deref(), json);
    }
    let mut node = Node::open(&dir)?;
    match cli.command {
        Command::Init { .. } | Command::VerifyBundle { .. } => unreachable!("handled above"),
        Command::Signer(cmd) => crate::approvals::signer(&node, cmd, json),
        Command::Approve { doc, signer, passphrase_stdin } => {
            crate::approvals::approve(&mut node, &doc, &signer, false, passphrase_stdin, json)
        }
        Command::Withdraw { doc, signer, passphrase_stdin } => {
            crate::approvals::approve(&mut node, &doc, &signer, true, passphrase_stdin, json)
        }
        Command::Verify { doc } => crate::approvals::verify(&node, &doc, json),
        Command::Diff { doc } => crate::approvals::diff(&node, &doc, json),
        Command::Status { doc: Some(doc), .. } => crate::approvals::status(&node, &doc, json),
        Command::Export { doc, signed: Some(bundle), .. } => {
            crate::approvals::export_signed(&node, &doc, &bundle, json)
        }
        Command::Whoami => {
            let id = node.node_id();
            print(
                json,
                json!({"node": id.to_string(), "short": id.short(), "org": node.org(), "name": node.name(), "data_dir": dir}),
                || {
                    format!(
                        "node {} ({})\norganisation: {}\nname: {}\ndata dir: {}",
                        id.short(),
                        id,
                        node.directory().name_of(node.org()),
                        node.name(),
                        dir.display()
                    )
                },
            )
        }
        Command::Orgs => {
            let orgs = node.directory().organisations();
            print(json, json!(orgs), || {
                orgs.iter().map(|o| format!("{:<28} {}", o.id.as_str(), o.name)).collect::<Vec<_>>().join("\n")
            })
        }
        Command::New(args) => cmd_new(&mut node, args, json),
        Command::Import { file, kind, new_copy } => {
            let text = read_input(&file)?;
            let (id, recognised) =
                node.import_markdown_with(&text, kind, new_copy).with_context(|| match file.to_str() {
                    Some("-") => "standard input was not imported".to_string(),
                    _ => format!("{} was not imported", file.display()),
                })?;
            note_sync_problem(&node, &id);
            print(json, json!({"id": id, "recognised": recognised}), || {
                let mut out = format!("Imported {id}");
                for r in &recognised {
                    out.push_str(&format!("\n  {r}"));
                }
                out
            })
        }
        Command::Export { doc, output, signed: None } => {
            let id = node.resolve(&doc)?;
            let mut document = node.document(&id)?;
            let flags = crate::review::ReviewFlags::of(&mut document)?;
            let text = markdown::export(&document.view()?, node.directory());
            let text = crate::review::annotate_export(&text, &id, &flags);
            if let Some(note) = flags.note(&id) {
                crate::output::stderr(&format!("note: {note}"));
            }
            match output {
                Some(path) => {
                    write_file_atomically(&path, text.as_bytes())?;
                    print(json, json!({"id": id, "file": path}), || format!("Exported {id} to {}", path.display()))
                }
                None => crate::output::stdout(&text),
            }
        }
        Command::List => {
            let docs = node.list()?;
            let problems = docs
                .iter()
                .map(|d| node.sync_problem(&d.id).map(|p| p.map(|p| p.short())))
                .collect::<Result<Vec<_>, _>>()?;
            // A document that cannot be read is listed anyway (`check` says why).
            let review: Vec<_> = docs
                .iter()
                .map(|d| {
                    crate::review::flags(&node, &d.id).unwrap_or_else(|e| {
                        tracing::warn!(doc = %d.id, error = %e, "could not count what needs review");
                        Default::default()
                    })
                })
                .collect();
            let listed: Vec<_> = docs
                .iter()
                .zip(&problems)
                .zip(&review)
                .map(|((d, problem), review)| {
                    let mut entry = json!(d);
                    entry["not_synced"] = json!(problem);
                    entry["review"] = json!(review);
                    entry
                })
                .collect();
            print(json, json!(listed), || {
                if docs.is_empty() {
                    return "No documents yet: `samverkan-node new` or `samverkan-node import`.".to_string();
                }
                docs.iter()
                    .zip(&problems)
                    .zip(&review)
                    .map(|((d, problem), review)| {
                        let mut line = format!(
                            "{}  {:<26} {}  {}",
                            d.id.short(),
                            d.kind.label(),
                            d.updated_at.format("%Y-%m-%d %H:%M"),
                            d.title
                        );
                        if let Some(problem) = problem {
                            line.push_str(&format!("  [{problem}]"));
                        }
                        if let Some(note) = review.note(&d.id) {
                            line.push_str(&format!("  [{note}]"));
                        }
                        line
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        Command::Show { doc, markdown: as_markdown, version } => {
            let id = node.resolve(&doc)?;
            let mut document = match version.as_str() {
                "current" => node.document(&id)?,
                "signed" => crate::approvals::signed_version(&node, &id)?,
                other => bail!("unknown version {other:?}: use `current` or `signed`"),
            };
            let view = document.view()?;
            let heads: Vec<String> = document.heads().iter().map(ToString::to_string).collect();
            let review = match version.as_str() {
                "current" => crate::review::ReviewFlags::of(&mut document)?,
                _ => Default::default(),
            };
            if json {
                return print(true, json!({"document": view, "heads": heads, "review": review}), String::new);
            }
            if as_markdown {
                if let Some(note) = review.note(&id) {
                    crate::output::stderr(&format!("note: {note}"));
                }
                crate::output::stdout(&markdown::export(&view, node.directory()))
            } else {
                if let Some(note) = review.note(&id) {
                    crate::output::stdout(&format!("OBS: {note}\n\n"))?;
                }
                crate::output::stdout(&markdown::render(&view, node.directory()))
            }
        }
        Command::Set { doc, field, value } => {
            let id = node.resolve(&doc)?;
            let value = if value == "-" { read_input(Path::new("-"))? } else { value };
            let (_, hash) = node.edit(&id, &format!("set {field}"), |e| e.set_field(&field, &value))?;
            report_edit(&node, json, &id, hash, &format!("set {field}"))
        }
        Command::Edit { doc } => cmd_edit(&mut node, &doc, json),
        Command::Activity(cmd) => cmd_activity(&mut node, cmd, json),
        Command::Goal(GoalCommand::Add { doc, text }) => {
            let id = node.resolve(&doc)?;
            let (goal, hash) = node.edit(&id, "add goal", |e| e.add_goal(&text))?;
            print(json, json!({"id": id, "goal": goal, "change": hash.map(|h| h.to_string())}), || {
                format!("Added goal {goal}")
            })
        }
        Command::Goal(GoalCommand::Remove { doc, goal }) => {
            let id = node.resolve(&doc)?;
            let (_, hash) = node.edit(&id, "remove goal", |e| e.remove_item("goals", &goal))?;
            report_edit(&node, json, &id, hash, "removed goal")
        }
        Command::Followup(FollowupCommand::Add { doc, text, date, author, activity }) => {
            let id = node.resolve(&doc)?;
            let author = author.unwrap_or_else(|| node.name().to_string());
            let date = date.unwrap_or_else(|| Utc::now().date_naive());
            let activity = match activity {
                Some(a) => Some(resolve_item(&node, &id, "activities", &a)?),
                None => None,
            };
            let entry = FollowUp { id: ItemId::random(), date, author, text, activity };
            let (item, hash) = node.edit(&id, "add follow-up", |e| e.add_followup(&entry))?;
            print(json, json!({"id": id, "followup": item, "change": hash.map(|h| h.to_string())}), || {
                format!("Added follow-up {item}")
            })
        }
        Command::Meeting(MeetingCommand::Add { doc, body, date, notes }) => {
            let id = node.resolve(&doc)?;
            let meeting =
                Meeting { id: ItemId::random(), date: date.unwrap_or_else(|| Utc::now().date_naive()), body, notes };
            let (item, hash) = node.edit(&id, "record meeting", |e| e.add_meeting(&meeting))?;
            print(json, json!({"id": id, "meeting": item, "change": hash.map(|h| h.to_string())}), || {
                format!("Recorded meeting {item}")
            })
        }
        Command::Signatory(SignatoryCommand::Add { doc, org, role, name }) => {
            let id = node.resolve(&doc)?;
            let (_, hash) = node.edit(&id, "add signatory", |e| {
                let org = e.resolve_org(&org)?;
                e.add_signatory(&Signatory { org, role, name })
            })?;
            report_edit(&node, json, &id, hash, "added signatory")
        }
        Command::Signatory(SignatoryCommand::Remove { doc, n }) => {
            let id = node.resolve(&doc)?;
            let (_, hash) = node.edit(&id, "remove signatory", |e| e.remove_signatory(n))?;
            report_edit(&node, json, &id, hash, "removed signatory")
        }
        Command::History { doc } => {
            let id = node.resolve(&doc)?;
            let lines = crate::review::history(&node, &id)?;
            print(json, json!(lines), || crate::review::format_history(&lines))
        }
        Command::Review { doc, resolve, take, text } => {
            let id = node.resolve(&doc)?;
            let Some(n) = resolve else {
                let items = crate::review::open(&node, &id)?;
                return print(json, json!(items), || crate::review::format_open(&id, &items));
            };
            let text = match text {
                Some(t) if t == "-" => Some(read_input(Path::new("-"))?),
                other => other,
            };
            let done = crate::review::resolve(&mut node, &id, n, take, text)?;
            note_sync_problem(&node, &id);
            print(json, json!(done), || {
                format!(
                    "Reviewed overlap {n} ({}, stycke {}): kept {}{}",
                    done.overlap.label,
                    done.overlap.paragraph,
                    match done.kept.as_str() {
                        "first" => format!("the version by {}", done.overlap.sides[0].by),
                        "second" => format!("the version by {}", done.overlap.sides[1].by),
                        "merged" => "the merged text".to_string(),
                        _ => "your text".to_string(),
                    },
                    done.change.as_deref().map(|c| format!(" ({})", &c[..8])).unwrap_or_default()
                )
            })
        }
        Command::Conflicts { doc, resolve, value } => {
            let id = node.resolve(&doc)?;
            if let (Some(path), Some(value)) = (resolve, value) {
                let (_, hash) =
                    node.edit(&id, &format!("resolve conflict on {path}"), |e| e.set_field(&path, &value))?;
                return report_edit(&node, json, &id, hash, &format!("resolved {path}"));
            }
            let document = node.document(&id)?;
            let conflicts = document.conflicts()?;
            let described: Vec<_> = conflicts
                .iter()
                .map(|c| {
                    json!({"path": c.path, "values": c.values.iter().map(|v| json!({"value": v.value, "by": node.describe_actor(&v.actor)})).collect::<Vec<_>>()})
                })
                .collect();
            let overlaps = crate::review::flags(&node, &id)?.overlaps;
            let overlap_note = match overlaps {
                0 => String::new(),
                n => format!(
                    "\n{n} overlapping text edit(s) to review (concurrent edits of the same words, merged per character): samverkan-node review {}",
                    id.short()
                ),
            };
            print(json, json!(described), || {
                if conflicts.is_empty() {
                    return format!("No field conflicts.{overlap_note}");
                }
                let mut out = String::new();
                for c in &conflicts {
                    out.push_str(&format!("{}:\n", c.path));
                    for v in &c.values {
                        out.push_str(&format!("  {:?}  by {}\n", v.value, node.describe_actor(&v.actor)));
                    }
                }
                out.push_str(&format!(
                    "Resolve with: samverkan-node conflicts {} --resolve <field> --value <value>",
                    id.short()
                ));
                out.push_str(&overlap_note);
                out
            })
        }
        Command::Bundle(cmd) => cmd_bundle(&mut node, cmd, json),
        Command::Join { code, timeout } => {
            let code: samverkan_shared::directory::JoinCode = code.parse()?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let member = runtime
                .block_on(crate::sync::join(&mut node, &code, std::time::Duration::from_secs(timeout)))
                .with_context(|| format!("joining the relay at {} failed", code.relay_addresses.join(", ")))?;
            let relay = code.relay_addresses.join(", ");
            print(
                json,
                json!({"relay": code.relay_addresses.first(), "relay_addresses": code.relay_addresses, "relay_key": code.relay_key.to_string(), "org": member.org, "name": member.name}),
                || {
                    format!(
                        "Joined the relay at {relay} as {} ({}); relay key {} pinned. Run `samverkan-node sync` or `samverkan-node daemon`.",
                        member.name,
                        node.directory().name_of(&member.org),
                        code.relay_key.short()
                    )
                },
            )
        }
        Command::Sync(args) => {
            let targets = relay_targets(&mut node, &args)?;
            if args.retry_refused {
                let retried = node.retry_refused()?;
                crate::output::stderr(&format!("offering {retried} refused document(s) again"));
            }
            let runtime = sync_runtime()?;
            let mut display = crate::progress::ProgressDisplay::stderr();
            let result = runtime.block_on(crate::sync::sync_once_with_failover(
                &mut node,
                &targets,
                std::time::Duration::from_secs(args.timeout),
                &mut |p| display.update(p),
            ));
            display.finish();
            let addresses = targets.addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            let (report, target) = result.with_context(|| format!("sync with {addresses} failed"))?;
            // Documents left out of the sync, and why (not a party; refused now or earlier).
            let mut left_out = Vec::new();
            for summary in node.list()? {
                if let Some(note) = node.sharing_note(&summary.id)? {
                    left_out.push((summary.id, summary.title, note));
                }
            }
            let listed: Vec<_> =
                left_out.iter().map(|(id, title, note)| json!({"id": id, "title": title, "why": note})).collect();
            let mut value = json!(report);
            value["not_synced"] = json!(listed);
            print(json, value, || {
                let mut out = format!(
                    "Synced with {} in {} ms: sent changes of {} document(s), received changes of {} document(s); {} sync messages out, {} in; {} bytes out, {} bytes in.",
                    target.addr,
                    report.millis,
                    report.docs_sent,
                    report.docs_received,
                    report.messages_sent,
                    report.messages_received,
                    report.bytes_sent,
                    report.bytes_received
                );
                if !left_out.is_empty() {
                    out.push_str(&format!("\n{} document(s) not synced:", left_out.len()));
                    for (id, title, note) in &left_out {
                        out.push_str(&format!("\n  {}  {title}: {note}", id.short()));
                    }
                }
                out
            })?;
            if !report.refused.is_empty() {
                bail!(
                    "the relay refused {} document(s) during this sync (the others synced): {}",
                    report.refused.len(),
                    report
                        .refused
                        .iter()
                        .map(|r| format!("{} ({})", r.doc.short(), r.reason))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            Ok(())
        }
        Command::Daemon { relay: args, web, no_web } => {
            let targets = relay_targets(&mut node, &args)?;
            if args.retry_refused {
                let retried = node.retry_refused()?;
                crate::output::stderr(&format!("offering {retried} refused document(s) again"));
            }
            // Two workers: the web app and QUIC's connection driver run there, while the sync
            // loop does its storage work on this thread (`block_on`); see `sync_runtime`.
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let local_edits = std::sync::Arc::new(tokio::sync::Notify::new());
            let connected = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let options = crate::sync::DaemonOptions {
                local_edits: Some(local_edits.clone()),
                connected: Some(connected.clone()),
                ..crate::sync::DaemonOptions::default()
            };
            let address = node.store().meta(crate::node::META_RELAY_ADDRESS)?;
            runtime.block_on(async {
                let handle = match no_web {
                    true => None,
                    false => {
                        let link = crate::web::SyncLink {
                            local_edits: Some(local_edits),
                            connected: Some(connected),
                            relay_address: address,
                            doc_cache: Some(node.store().doc_cache()),
                        };
                        Some(start_web(&dir, &web, link).await?)
                    }
                };
                let addresses = targets.addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                crate::output::stderr(&format!("syncing with {addresses} until interrupted (Ctrl-C)"));
                let result = crate::sync::daemon_with_failover(&mut node, &targets, &options, async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await;
                if let Some(handle) = handle {
                    handle.shutdown().await;
                }
                result.map_err(anyhow::Error::from)
            })
        }
        Command::Ui(web) => {
            drop(node);
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(async {
                let handle = start_web(&dir, &web, crate::web::SyncLink::default()).await?;
                crate::output::stderr(
                    "serving the web app (no sync: `samverkan-node daemon` also syncs) until interrupted (Ctrl-C)",
                );
                let _ = tokio::signal::ctrl_c().await;
                handle.shutdown().await;
                Ok(())
            })
        }
        Command::Status { doc: None, offline, peek, timeout } => {
            let relay = match crate::status::remembered_relay(&node)? {
                None => None,
                Some((address, relay_key)) => {
                    let resolved = std::net::ToSocketAddrs::to_socket_addrs(&address).ok().and_then(|mut a| a.next());
                    let outcome = match (offline, resolved) {
                        (true, _) => Err("not tried (--offline)".to_string()),
                        (false, None) => Err(format!("cannot resolve {address:?}")),
                        (false, Some(addr)) => {
                            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                            let target = crate::sync::RelayTarget { addr, relay_key };
                            let identity =
                                samverkan_net::tls::TlsIdentity::new(node.key().signing_key(), "samverkan-node")?;
                            runtime.block_on(crate::status::probe(
                                &target,
                                &identity,
                                std::time::Duration::from_secs(timeout),
                            ))
                        }
                    };
                    Some(crate::status::Reachability {
                        address,
                        checked: !offline,
                        reachable: outcome.is_ok(),
                        error: outcome.err(),
                    })
                }
            };
            let status = crate::status::node_status(&mut node, relay, !peek)?;
            print(json, json!(status), || crate::status::format_status(&status).trim_end().to_string())?;
            match &status.relay {
                Some(relay) if relay.checked && !relay.reachable => Err(Exit {
                    code: EXIT_RELAY_UNREACHABLE,
                    message: format!(
                        "the relay at {} is not reachable ({}); work here is kept and syncs once it answers \
                         (`samverkan-node status --offline` skips this check)",
                        relay.address,
                        relay.error.as_deref().unwrap_or("no answer")
                    ),
                }
                .into()),
                _ => Ok(()),
            }
        }
        Command::Recover { doc, apply } => {
            let id = node.resolve(&doc)?;
            if apply {
                let report = crate::recover::recover(&mut node, &id)?;
                print(json, json!(report), || crate::recover::format_report(&report))
            } else {
                let plan = crate::recover::plan(&node, &id)?;
                print(json, json!(plan), || crate::recover::format_plan(&plan))
            }
        }
        Command::Relay(cmd) => cmd_relay(&mut node, cmd, json),
        Command::Check => {
            let problems = node.check()?;
            print(json, json!({"ok": problems.is_empty(), "problems": problems}), || {
                if problems.is_empty() {
                    "ok: database and all documents are intact".to_string()
                } else {
                    problems.join("\n")
                }
            })?;
            if !problems.is_empty() {
                bail!("{} problem(s) found", problems.len());
            }
            Ok(())
        }
    }
}

/// The relay to use: from the flags (remembered for next time) or as
/// remembered: its first address, then the other instances' (`--relay a,b`).
fn relay_targets(node: &mut Node, args: &RelayArgs) -> Result<crate::sync::RelayTargets> {
    use crate::node::{META_RELAY_ADDRESS, META_RELAY_ALTERNATIVES, META_RELAY_KEY};
    let store = node.store_mut();
    let (address, alternatives) = match &args.relay {
        Some(list) => {
            let mut all = list.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string);
            let first = all.next().context("--relay names no address")?;
            (first, all.collect::<Vec<_>>())
        }
        None => (
            store
                .meta(META_RELAY_ADDRESS)?
                .context("no relay known yet: run `samverkan-node join <code>`, or give --relay host:port")?,
            store
                .meta(META_RELAY_ALTERNATIVES)?
                .unwrap_or_default()
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect(),
        ),
    };
    let relay_key = match &args.relay_key {
        Some(k) => k.trim().to_ascii_lowercase(),
        None => store.meta(META_RELAY_KEY)?.context(
            "no relay key pinned yet: run `samverkan-node join <code>`, or give --relay-key (`samverkan-relay key` prints it)",
        )?,
    };
    let relay_key: samverkan_shared::identity::NodeId =
        relay_key.parse().with_context(|| format!("the relay key must be 64 hex digits, got {relay_key:?}"))?;
    // An instance whose name does not resolve now is left out of this run (the
    // others may be up); only when none resolves is that the error.
    let mut addrs = Vec::new();
    let mut unresolved = Vec::new();
    for address in std::iter::once(&address).chain(&alternatives) {
        match std::net::ToSocketAddrs::to_socket_addrs(address).map(|mut found| found.next()) {
            Ok(Some(addr)) => addrs.push(addr),
            Ok(None) => unresolved.push(format!("relay address {address:?} resolves to nothing")),
            Err(e) => unresolved.push(format!("cannot resolve relay address {address:?}: {e}")),
        }
    }
    if addrs.is_empty() {
        bail!("{}", unresolved.join("; "));
    }
    for problem in &unresolved {
        tracing::warn!("{problem}; trying the relay's other addresses");
    }
    store.set_meta(META_RELAY_ADDRESS, &address)?;
    store.set_meta(META_RELAY_ALTERNATIVES, &alternatives.join(","))?;
    store.set_meta(META_RELAY_KEY, &relay_key.to_string())?;
    Ok(crate::sync::RelayTargets { addrs, relay_key })
}

/// The relay addresses remembered: the first, then the other instances'.
fn relay_addresses(node: &Node) -> Result<Vec<String>> {
    use crate::node::{META_RELAY_ADDRESS, META_RELAY_ALTERNATIVES};
    let store = node.store();
    let mut all: Vec<String> = store.meta(META_RELAY_ADDRESS)?.into_iter().collect();
    let alternatives = store.meta(META_RELAY_ALTERNATIVES)?.unwrap_or_default();
    all.extend(alternatives.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string));
    Ok(all)
}

/// `host:port` with a host and a port number (resolved only when used: the
/// node may be offline now).
fn check_relay_address(address: &str) -> Result<String> {
    let address = address.trim();
    let valid = address.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(',') && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
    });
    if !valid {
        bail!("{address:?} is not a relay address: give host:port (e.g. relay2.example.se:4433)");
    }
    Ok(address.to_string())
}

fn cmd_relay(node: &mut Node, cmd: RelayCommand, json: bool) -> Result<()> {
    use crate::node::{META_RELAY_ADDRESS, META_RELAY_ALTERNATIVES, META_RELAY_KEY};
    let mut addresses = relay_addresses(node)?;
    let not_joined =
        "no relay known yet: run `samverkan-node join <code>` (or sync once with --relay and --relay-key) first";
    match cmd {
        RelayCommand::List => {}
        RelayCommand::AddAddress { address } => {
            let address = check_relay_address(&address)?;
            if addresses.is_empty() {
                bail!("{not_joined}");
            }
            if addresses.contains(&address) {
                bail!("{address} is already one of the relay's addresses");
            }
            addresses.push(address);
        }
        RelayCommand::RemoveAddress { address } => {
            let address = address.trim();
            let Some(at) = addresses.iter().position(|a| a == address) else {
                bail!("{address} is not one of the relay's addresses (see `samverkan-node relay list`)");
            };
            if addresses.len() == 1 {
                bail!("{address} is the relay's only address: add another first");
            }
            addresses.remove(at);
        }
    }
    if let Some((first, rest)) = addresses.split_first() {
        let store = node.store_mut();
        store.set_meta(META_RELAY_ADDRESS, first)?;
        store.set_meta(META_RELAY_ALTERNATIVES, &rest.join(","))?;
    }
    let relay_key = node.store().meta(META_RELAY_KEY)?;
    print(json, json!({"addresses": addresses, "relay_key": relay_key}), || {
        if addresses.is_empty() {
            return not_joined.to_string();
        }
        let mut text = String::from("relay addresses, tried in this order:\n");
        for (i, address) in addresses.iter().enumerate() {
            text.push_str(&format!("  {}. {address}\n", i + 1));
        }
        text.push_str(&format!("relay key: {}", relay_key.as_deref().unwrap_or("(none pinned)")));
        text
    })
}

fn cmd_new(node: &mut Node, args: NewArgs, json: bool) -> Result<()> {
    let mut content = node.new_content(args.kind, &args.title, &args.parties)?;
    if let Some(scope) = args.scope {
        content.scope = scope;
    }
    content.period = Period { start: args.start, end: args.end };
    let id = node.create(content)?;
    note_sync_problem(node, &id);
    print(json, json!({"id": id}), || format!("Created {id}"))
}

fn cmd_activity(node: &mut Node, cmd: ActivityCommand, json: bool) -> Result<()> {
    match cmd {
        ActivityCommand::Add { doc, what, owners, due, followup_method, status } => {
            let id = node.resolve(&doc)?;
            let due = due.as_deref().map(Due::parse_strict).transpose().map_err(|e| anyhow::anyhow!("--due: {e}"))?;
            let (item, hash) = node.edit(&id, "add activity", |e| {
                let mut activity = Activity::new(what);
                for o in owners.iter().filter(|o| !o.trim().is_empty()) {
                    activity.owners.extend(e.resolve_owners(o)?);
                }
                activity.due = due;
                activity.followup_method = followup_method;
                activity.status = status;
                e.add_activity(&activity)
            })?;
            print(json, json!({"id": id, "activity": item, "change": hash.map(|h| h.to_string())}), || {
                format!("Added activity {item}")
            })
        }
        ActivityCommand::Set { doc, activity, what, owners, due, followup_method, status } => {
            let id = node.resolve(&doc)?;
            let item = resolve_item(node, &id, "activities", &activity)?;
            let mut fields: Vec<(&str, String)> = Vec::new();
            if let Some(v) = what {
                fields.push(("what", v));
            }
            if !owners.is_empty() {
                fields.push((
                    "owners",
                    owners.iter().map(|o| o.trim()).filter(|o| !o.is_empty()).collect::<Vec<_>>().join("; "),
                ));
            }
            if let Some(v) = due {
                fields.push(("due", v));
            }
            if let Some(v) = followup_method {
                fields.push(("followup_method", v));
            }
            if let Some(v) = status {
                fields.push(("status", v.as_str().to_string()));
            }
            if fields.is_empty() {
                bail!("nothing to change: give --what, --owner, --due, --followup-method or --status");
            }
            let (_, hash) = node.edit(&id, "change activity", |e| {
                for (field, value) in &fields {
                    e.set_field(&format!("activities.{item}.{field}"), value)?;
                }
                Ok(())
            })?;
            report_edit(node, json, &id, hash, &format!("changed activity {item}"))
        }
        ActivityCommand::Remove { doc, activity } => {
            let id = node.resolve(&doc)?;
            let (_, hash) = node.edit(&id, "remove activity", |e| e.remove_item("activities", &activity))?;
            report_edit(node, json, &id, hash, "removed activity")
        }
    }
}

fn resolve_item(node: &Node, id: &DocId, list: &str, prefix: &str) -> Result<ItemId> {
    let view = node.document(id)?.view()?;
    let ids: Vec<&ItemId> = match list {
        "activities" => view.activities.iter().map(|a| &a.id).collect(),
        _ => Vec::new(),
    };
    let wanted = prefix.to_ascii_lowercase();
    let matches: Vec<&&ItemId> = ids.iter().filter(|i| i.as_str().starts_with(&wanted)).collect();
    match matches.as_slice() {
        [one] => Ok((**one).clone()),
        [] => bail!("no item {prefix:?} in {list} of {}", id.short()),
        _ => bail!("{prefix:?} matches several items in {list}; give more of the id"),
    }
}

fn cmd_edit(node: &mut Node, doc: &str, json: bool) -> Result<()> {
    let id = node.resolve(doc)?;
    let mut document = node.document(&id)?;
    let base = document.heads();
    let original = markdown::export(&document.view()?, node.directory());
    let path = node.data_dir().join(format!("edit-{}.md", id.short()));
    write_file_atomically(&path, original.as_bytes())?;
    let editor = std::env::var("VISUAL").or_else(|_| std::env::var("EDITOR")).unwrap_or_else(|_| "vi".to_string());
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(&path)
        .status()
        .with_context(|| format!("could not start the editor {editor:?} (set $EDITOR)"))?;
    if !status.success() {
        bail!("the editor {editor:?} failed ({status}); nothing was changed; your text is in {}", path.display());
    }
    let edited = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if edited == original {
        let _ = std::fs::remove_file(&path);
        return print(json, json!({"id": id, "changed": false}), || "No changes.".to_string());
    }
    match node.apply_edited_markdown(&id, &base, &edited, &path) {
        Ok(hash) => {
            let _ = std::fs::remove_file(&path);
            report_edit(node, json, &id, hash, "edited")
        }
        Err(e) => Err(anyhow::Error::new(e)
            .context(format!("your edit was not applied; your text is kept in {}", path.display()))),
    }
}

fn cmd_bundle(node: &mut Node, cmd: BundleCommand, json: bool) -> Result<()> {
    match cmd {
        BundleCommand::Export { file, have, receiver } => {
            let have = match have {
                Some(path) => Some(HeadsSummary::from_json(&read_input(&path)?)?),
                None => None,
            };
            let receiver = match receiver {
                Some(org) => Some(
                    node.directory()
                        .resolve(&org)
                        .map(|o| o.id.clone())
                        .ok_or_else(|| anyhow::anyhow!("unknown organisation {org:?}"))?,
                ),
                None => None,
            };
            let bundle = node.export_bundle(have.as_ref(), receiver.as_ref())?;
            let bytes = bundle.encode();
            write_file_atomically(&file, &bytes)?;
            print(json, json!({"file": file, "documents": bundle.docs.len(), "bytes": bytes.len()}), || {
                format!("Wrote {} document(s), {} bytes, to {}", bundle.docs.len(), bytes.len(), file.display())
            })
        }
        BundleCommand::Import { file } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let bundle = Bundle::decode(&bytes).with_context(|| format!("{} cannot be imported", file.display()))?;
            let reports = node.import_bundle(&bundle)?;
            let failed = reports.iter().filter(|r| r.error.is_some()).count();
            print(json, json!({"from": bundle.origin, "documents": reports}), || {
                let mut out = format!(
                    "From {} ({}), made {}:",
                    bundle.origin.name,
                    bundle.origin.org,
                    bundle.origin.created.format("%Y-%m-%d %H:%M UTC")
                );
                for r in &reports {
                    let what = match (&r.error, r.created, r.changed) {
                        (Some(e), _, _) => format!("REFUSED: {e}"),
                        (None, true, _) => format!("new, {} bytes", r.new_bytes),
                        (None, false, true) => format!("updated, {} bytes", r.new_bytes),
                        (None, false, false) => "already up to date".to_string(),
                    };
                    let waiting = if r.missing_deps > 0 {
                        format!(" ({} earlier change(s) still missing)", r.missing_deps)
                    } else {
                        String::new()
                    };
                    out.push_str(&format!("\n  {}  {}  {what}{waiting}", r.id.short(), r.title));
                }
                out
            })?;
            if failed > 0 {
                bail!("{failed} document(s) in the bundle were refused");
            }
            Ok(())
        }
        BundleCommand::Heads { file } => {
            let summary = node.heads_summary()?;
            write_file_atomically(&file, summary.to_json().as_bytes())?;
            print(json, json!({"file": file, "documents": summary.docs.len()}), || {
                format!("Wrote the heads of {} document(s) to {}", summary.docs.len(), file.display())
            })
        }
    }
}

fn report_edit(node: &Node, json: bool, id: &DocId, hash: Option<automerge::ChangeHash>, what: &str) -> Result<()> {
    note_sync_problem(node, id);
    print(json, json!({"id": id, "changed": hash.is_some(), "change": hash.map(|h| h.to_string())}), || match hash {
        Some(h) => format!("Saved: {what} ({})", &h.to_string()[..8]),
        None => "No change: the document already says that.".to_string(),
    })
}

/// Says at once, on stderr, when a document just created or edited will not
/// sync through the relay from this node (and why).
fn note_sync_problem(node: &Node, id: &DocId) {
    match node.sharing_note(id) {
        Ok(Some(note)) => crate::output::stderr(&format!("note: {note}")),
        Ok(None) => {}
        Err(e) => crate::output::stderr(&format!("note: could not check whether document {} syncs: {e}", id.short())),
    }
}

pub(crate) fn print(json: bool, value: serde_json::Value, text: impl FnOnce() -> String) -> Result<()> {
    if json {
        crate::output::stdout_line(&serde_json::to_string_pretty(&value)?)?;
    } else {
        let text = text();
        if !text.is_empty() {
            crate::output::stdout_line(&text)?;
        }
    }
    Ok(())
}

fn read_input(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading standard input")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes a file via a temporary file and rename, so a crash never leaves half a file.
pub(crate) fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("samverkan")));
    let mut file = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(bytes).and_then(|_| file.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The runtime of `sync` and `daemon`: the sync loop runs on the calling
/// thread (`block_on`) and does the storage work there, while QUIC's
/// connection driver runs on the one worker thread, so keep-alives and
/// acknowledgements go on while a write waits for the database.
fn sync_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()
}
