//! The web app's routes and JSON API. Each handler calls the functions the
//! CLI calls (`Node::edit` with the same `Editor` calls, `apply_edited_markdown`,
//! `review::open`/`resolve`/`history`, `Node::approve_with`, `status::node_status`),
//! on a blocking thread, and answers JSON; an edit is committed (durable)
//! before the answer says saved.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use automerge::ChangeHash;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{NaiveDate, Utc};
use samverkan_shared::approval::ApprovalState;
use samverkan_shared::ids::{DocId, ItemId};
use samverkan_shared::markdown;
use samverkan_shared::model::{
    Activity, ActivityStatus, DocKind, DocumentView, Due, FollowUp, PartyContext, Signatory,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{assets, auth, events, ApiError, AppState};
use crate::node::Node;

/// Every route, behind [`auth::guard`].
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/app.js", get(assets::app_js))
        .route("/app.css", get(assets::app_css))
        .route("/login", get(assets::login_html))
        .route("/login.js", get(assets::login_js))
        .route("/api/login", post(login))
        .route("/api/session", get(session))
        .route("/api/events", get(events::stream))
        .route("/api/docs", get(list).post(create))
        .route("/api/activities", get(activities))
        .route("/api/signers", get(signers))
        .route("/api/docs/{id}", get(document))
        .route("/api/docs/{id}/set", post(set_field))
        .route("/api/docs/{id}/body", post(set_body))
        .route("/api/docs/{id}/goals", post(add_goal))
        .route("/api/docs/{id}/activities", post(add_activity))
        .route("/api/docs/{id}/activities/{item}", post(change_activity))
        .route("/api/docs/{id}/followups", post(add_followup))
        .route("/api/docs/{id}/signatories", post(add_signatory))
        .route("/api/docs/{id}/remove", post(remove_item))
        .route("/api/docs/{id}/conflicts", post(resolve_conflict))
        .route("/api/docs/{id}/review", post(resolve_overlap))
        .route("/api/docs/{id}/history", get(history))
        .route("/api/docs/{id}/version", get(version))
        .route("/api/docs/{id}/diff", get(diff))
        .route("/api/docs/{id}/approve", post(approve))
        .route("/api/docs/{id}/signed-bundle", post(signed_bundle))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::guard))
        .with_state(state)
}

type ApiResult = Result<Json<Value>, ApiError>;

fn invalid(e: impl std::fmt::Display) -> ApiError {
    ApiError::Invalid(e.to_string())
}

/// `POST /api/login` with the secret in `X-API-Key`: a session cookie and its CSRF token.
async fn login(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let key = headers.get(auth::KEY_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !state.guard.is_secret(key) {
        return Err(ApiError::Refused {
            status: axum::http::StatusCode::UNAUTHORIZED,
            message: "wrong secret: open the address `samverkan-node daemon` (or `ui`) printed".into(),
        });
    }
    let (cookie, csrf) = state.guard.new_session()?;
    Ok(([(header::SET_COOKIE, cookie)], Json(json!({"csrf": csrf}))).into_response())
}

/// `GET /api/session`: who this node is, the CSRF token, the organisations.
async fn session(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult {
    let csrf = match state.guard.credential(&headers) {
        Some(auth::Credential::Session { csrf }) => Some(csrf),
        _ => None,
    };
    let daemon = state.link.connected.is_some();
    state
        .with_node(move |node| {
            let orgs: Vec<Value> = node
                .directory()
                .organisations()
                .iter()
                .map(|o| json!({"id": o.id, "name": o.name}))
                .collect();
            Ok(Json(json!({
                "csrf": csrf,
                "node": {"id": node.node_id().to_string(), "short": node.node_id().short(), "name": node.name(),
                         "org": node.org(), "org_name": node.directory().name_of(node.org())},
                "orgs": orgs,
                "kinds": DocKind::ALL.iter().map(|k| json!({"id": k.as_str(), "label": k.label()})).collect::<Vec<_>>(),
                "statuses": ActivityStatus::ALL.iter().map(|k| json!({"id": k.as_str(), "label": k.label()})).collect::<Vec<_>>(),
                "daemon": daemon,
            })))
        })
        .await
}

fn state_name(state: ApprovalState) -> &'static str {
    match state {
        ApprovalState::Draft => "draft",
        ApprovalState::AwaitingSignatures => "awaiting_signatures",
        ApprovalState::Approved => "approved",
        ApprovalState::ChangedSinceApproval => "changed_since_approval",
    }
}

fn party_names(node: &Node, view: &DocumentView) -> Vec<String> {
    view.party_refs().iter().map(|r| node.directory().describe(r)).collect()
}

/// `GET /api/docs`: every document with kind, parties, approval state, open
/// conflicts and sync state; and the node's sync state.
async fn list(State(state): State<Arc<AppState>>) -> ApiResult {
    let connected = state.link.connected.as_ref().map(|c| c.load(Ordering::SeqCst));
    let relay_address = state.link.relay_address.clone();
    state
        .with_node(move |node| {
            let status = crate::status::node_status(node, None, false)?;
            let mut docs = Vec::new();
            for (summary, sync) in node.list()?.into_iter().zip(&status.docs) {
                let approval = node.approval_status(&summary.id).map(|s| state_name(s.state));
                let parties: Vec<String> =
                    summary.parties.iter().map(|p| node.directory().name_of(p).to_string()).collect();
                docs.push(json!({
                    "id": summary.id,
                    "short": summary.id.short(),
                    "title": summary.title,
                    "kind": summary.kind.as_str(),
                    "kind_label": summary.kind.label(),
                    "parties": parties,
                    "updated_at": summary.updated_at,
                    "approval": approval.ok(),
                    "conflicts": sync.open_conflicts,
                    "overlaps": sync.open_overlaps,
                    "waiting": sync.local_changes_waiting,
                    "not_synced": sync.not_synced,
                }));
            }
            let waiting: u64 = status.docs.iter().map(|d| d.local_changes_waiting).sum();
            Ok(Json(json!({
                "docs": docs,
                "sync": {
                    "daemon": connected.is_some(),
                    "relay_reachable": connected,
                    "relay_address": relay_address,
                    "last_success": status.last_success,
                    "last_failure": status.last_failure.as_ref().map(|(t, e)| json!({"at": t, "error": e})),
                    "waiting": waiting,
                },
            })))
        })
        .await
}

#[derive(Debug, Deserialize)]
struct NewDoc {
    kind: String,
    title: String,
    #[serde(default)]
    parties: Vec<String>,
}

/// `POST /api/docs`: a new document, as `samverkan-node new` makes it.
async fn create(State(state): State<Arc<AppState>>, Json(new): Json<NewDoc>) -> ApiResult {
    let kind: DocKind = new.kind.parse().map_err(invalid)?;
    if new.title.trim().is_empty() {
        return Err(ApiError::Invalid("a document needs a title".into()));
    }
    let done = state
        .with_node(move |node| {
            let content = node.new_content(kind, new.title.trim(), &new.parties)?;
            let id = node.create(content)?;
            let note = node.sharing_note(&id)?;
            Ok(Json(json!({"id": id, "note": note})))
        })
        .await?;
    state.committed();
    Ok(done)
}

fn resolve(node: &Node, id: &str) -> Result<DocId, ApiError> {
    Ok(node.resolve(id)?)
}

fn heads_of(text: &str) -> Result<Vec<ChangeHash>, ApiError> {
    text.split(',')
        .filter(|h| !h.is_empty())
        .map(|h| h.parse::<ChangeHash>().map_err(|e| ApiError::Invalid(format!("bad change hash {h:?}: {e}"))))
        .collect()
}

/// The document's body as HTML: Markdown rendered with raw HTML escaped and
/// the generated-table markers left out.
pub fn body_html(body: &str) -> String {
    use pulldown_cmark::{Event, Options, Parser};
    let parser =
        Parser::new_ext(body, Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH).filter_map(|event| match event {
            Event::Html(text) | Event::InlineHtml(text) => {
                if text.trim_start().starts_with("<!--") {
                    None
                } else {
                    Some(Event::Text(text))
                }
            }
            other => Some(other),
        });
    let mut out = String::new();
    pulldown_cmark::html::push_html(&mut out, parser);
    out
}

fn view_json(node: &Node, view: &DocumentView) -> Value {
    let ctx = PartyContext::new(node.directory(), view.party_refs());
    let activities: Vec<Value> = view
        .activities
        .iter()
        .map(|a| {
            json!({
                "id": a.id, "what": a.what, "owners": ctx.labels(&a.owners),
                "due": a.due.as_ref().map(|d| d.encode()), "due_label": a.due.as_ref().map(|d| d.label()),
                "followup_method": a.followup_method, "status": a.status.as_str(), "status_label": a.status.label(),
            })
        })
        .collect();
    let signatories: Vec<Value> = view
        .signatories
        .iter()
        .map(|s| json!({"org": s.org, "org_name": node.directory().name_of(&s.org), "role": s.role, "name": s.name}))
        .collect();
    let body = markdown::expanded_body(view, node.directory());
    json!({
        "view": view,
        "kind_label": view.kind.label(),
        "scope_label": view.scope.label(),
        "parties": party_names(node, view),
        "activities": activities,
        "signatories": signatories,
        "body": body,
        "html": body_html(&body),
    })
}

/// `GET /api/docs/{id}`: the document for its page.
async fn document(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    state
        .with_node(move |node| {
            let id = resolve(node, &id)?;
            let mut doc = node.document(&id)?;
            let view = doc.view().map_err(invalid)?;
            let heads: Vec<String> = doc.heads().iter().map(ToString::to_string).collect();
            let conflicts: Vec<Value> = doc
                .conflicts()
                .map_err(invalid)?
                .iter()
                .map(|c| {
                    json!({"path": c.path, "values": c.values.iter().map(|v| json!({"value": v.value, "by": node.describe_actor(&v.actor)})).collect::<Vec<_>>()})
                })
                .collect();
            let overlaps = crate::review::open(node, &id)?;
            let approval = node.approval_status(&id)?;
            let enrolled = node.enrollment()?;
            let name_of = |key: &samverkan_shared::identity::NodeId| {
                enrolled.as_ref().and_then(|d| d.latest(key)).map(|m| m.name.clone()).unwrap_or_else(|| key.short())
            };
            let awaiting: Vec<Value> = approval
                .awaiting_receipt
                .iter()
                .map(|a| json!({"action": a.action.as_str(), "signer": name_of(&a.signer), "role": a.role, "signed_at": a.signed_at}))
                .collect();
            let mut value = view_json(node, &view);
            value["id"] = json!(id);
            value["heads"] = json!(heads);
            value["conflicts"] = json!(conflicts);
            value["overlaps"] = json!(overlaps);
            value["approval"] = json!({
                "state": state_name(approval.state),
                "status": approval,
                "awaiting": awaiting,
                "has_directory": enrolled.is_some(),
            });
            value["sync_problem"] = json!(node.sharing_note(&id)?);
            value["writable"] = json!(node.writable(&id).is_ok());
            Ok(Json(value))
        })
        .await
}

/// Makes one edit through [`Node::edit`] (as the CLI does) and answers with the change.
async fn edit(
    state: Arc<AppState>,
    id: String,
    message: String,
    f: impl FnOnce(&mut samverkan_shared::model::Editor<'_>) -> Result<(), samverkan_shared::model::ModelError>
        + Send
        + 'static,
) -> ApiResult {
    let done = state
        .with_node(move |node| {
            let id = resolve(node, &id)?;
            let (_, hash) = node.edit(&id, &message, f)?;
            Ok(Json(json!({"id": id, "saved": true, "changed": hash.is_some(), "change": hash.map(|h| h.to_string())})))
        })
        .await?;
    state.committed();
    Ok(done)
}

#[derive(Debug, Deserialize)]
struct SetField {
    field: String,
    value: String,
}

/// `POST /api/docs/{id}/set`: one field, as `samverkan-node set`.
async fn set_field(State(state): State<Arc<AppState>>, Path(id): Path<String>, Json(set): Json<SetField>) -> ApiResult {
    let message = format!("set {}", set.field);
    edit(state, id, message, move |e| e.set_field(&set.field, &set.value)).await
}

#[derive(Debug, Deserialize)]
struct SetBody {
    /// The heads the text area was filled from.
    base: Vec<String>,
    /// The body as edited (with the generated activities table, as shown).
    body: String,
}

/// `POST /api/docs/{id}/body`: the body as edited in the text area, made
/// against the version it was read from and merged (minimal diff), exactly as
/// `samverkan-node edit` applies an edited file.
async fn set_body(State(state): State<Arc<AppState>>, Path(id): Path<String>, Json(set): Json<SetBody>) -> ApiResult {
    let data_dir = state.data_dir.clone();
    let done = state
        .with_node(move |node| {
            let id = resolve(node, &id)?;
            let base = heads_of(&set.base.join(","))?;
            let edited_body = set.body.replace("\r\n", "\n");
            let keep = data_dir.join(format!("web-edit-{}.md", id.short()));
            // The whole document as Markdown at `heads`, with `body` in place of its body.
            let with_body = |node: &Node, heads: &[ChangeHash], body: &str| -> Result<(String, String), ApiError> {
                let then = node.document(&id)?.at(heads).map_err(invalid)?.view().map_err(invalid)?;
                let full = markdown::export(&then, node.directory());
                let old_body = markdown::expanded_body(&then, node.directory());
                let front = full.len() - old_body.len();
                Ok((format!("{}{body}", &full[..front]), old_body))
            };
            let (edited, base_body) = with_body(node, &base, &edited_body)?;
            crate::cli::write_file_atomically(&keep, edited.as_bytes())
                .map_err(|e| ApiError::Internal(format!("{e:#}")))?;
            let hash = match node.apply_edited_markdown(&id, &base, &edited, &keep) {
                // This node changed the document since the text area was filled (a
                // field saved in a form meanwhile): the text's change is merged
                // into the body as it is now, three ways, and applied on top.
                Err(crate::node::NodeError::ChangedDuringEdit(..)) => {
                    let now = node.document(&id)?.heads();
                    let (_, current_body) = with_body(node, &now, "")?;
                    let merged = samverkan_shared::recovery::merge::merge_text(&base_body, &edited_body, &current_body);
                    let (edited, _) = with_body(node, &now, &merged)?;
                    node.apply_edited_markdown(&id, &now, &edited, &keep)?
                }
                other => other?,
            };
            let _ = std::fs::remove_file(&keep);
            Ok(Json(json!({"id": id, "saved": true, "changed": hash.is_some(), "change": hash.map(|h| h.to_string())})))
        })
        .await?;
    state.committed();
    Ok(done)
}

#[derive(Debug, Deserialize)]
struct Text {
    text: String,
}

/// `POST /api/docs/{id}/goals`: `samverkan-node goal add`.
async fn add_goal(State(state): State<Arc<AppState>>, Path(id): Path<String>, Json(goal): Json<Text>) -> ApiResult {
    edit(state, id, "add goal".into(), move |e| e.add_goal(&goal.text).map(|_| ())).await
}

#[derive(Debug, Deserialize)]
struct ActivityForm {
    what: Option<String>,
    /// Owners separated by ';' (as `activity set --owner`, joined).
    owners: Option<String>,
    due: Option<String>,
    followup_method: Option<String>,
    status: Option<String>,
}

/// `POST /api/docs/{id}/activities`: `samverkan-node activity add`.
async fn add_activity(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(form): Json<ActivityForm>,
) -> ApiResult {
    let what = form.what.clone().unwrap_or_default();
    if what.trim().is_empty() {
        return Err(ApiError::Invalid("an activity needs a description".into()));
    }
    let due = form
        .due
        .as_deref()
        .filter(|d| !d.trim().is_empty())
        .map(Due::parse_strict)
        .transpose()
        .map_err(|e| ApiError::Invalid(format!("due: {e}")))?;
    let status: ActivityStatus = form.status.as_deref().unwrap_or("planned").parse().map_err(invalid)?;
    let owners = form.owners.unwrap_or_default();
    let method = form.followup_method.filter(|m| !m.trim().is_empty());
    edit(state, id, "add activity".into(), move |e| {
        let mut activity = Activity::new(what);
        for o in owners.split(';').filter(|o| !o.trim().is_empty()) {
            activity.owners.extend(e.resolve_owners(o.trim())?);
        }
        activity.due = due;
        activity.followup_method = method;
        activity.status = status;
        e.add_activity(&activity).map(|_| ())
    })
    .await
}

/// `POST /api/docs/{id}/activities/{item}`: `samverkan-node activity set`
/// (each field given is set; '' clears an optional one).
async fn change_activity(
    State(state): State<Arc<AppState>>,
    Path((id, item)): Path<(String, String)>,
    Json(form): Json<ActivityForm>,
) -> ApiResult {
    let item = item.parse::<ItemId>().map_err(invalid)?;
    let fields: Vec<(&str, String)> = [
        ("what", form.what),
        ("owners", form.owners),
        ("due", form.due),
        ("followup_method", form.followup_method),
        ("status", form.status),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v.trim().to_string())))
    .collect();
    edit(state, id, "change activity".into(), move |e| {
        for (field, value) in &fields {
            e.set_field(&format!("activities.{item}.{field}"), value)?;
        }
        Ok(())
    })
    .await
}

#[derive(Debug, Deserialize)]
struct FollowUpForm {
    text: String,
    date: Option<NaiveDate>,
    activity: Option<String>,
}

/// `POST /api/docs/{id}/followups`: `samverkan-node followup add` (author: this node's name).
async fn add_followup(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(form): Json<FollowUpForm>,
) -> ApiResult {
    let activity = form.activity.filter(|a| !a.is_empty()).map(|a| a.parse::<ItemId>()).transpose().map_err(invalid)?;
    let author = state.with_node(|node| Ok(node.name().to_string())).await?;
    let entry = FollowUp {
        id: ItemId::random(),
        date: form.date.unwrap_or_else(|| Utc::now().date_naive()),
        author,
        text: form.text,
        activity,
    };
    edit(state, id, "add follow-up".into(), move |e| e.add_followup(&entry).map(|_| ())).await
}

#[derive(Debug, Deserialize)]
struct SignatoryForm {
    org: String,
    role: String,
    name: Option<String>,
}

/// `POST /api/docs/{id}/signatories`: `samverkan-node signatory add`.
async fn add_signatory(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(form): Json<SignatoryForm>,
) -> ApiResult {
    edit(state, id, "add signatory".into(), move |e| {
        let org = e.resolve_org(&form.org)?;
        e.add_signatory(&Signatory { org, role: form.role, name: form.name.filter(|n| !n.trim().is_empty()) })
    })
    .await
}

#[derive(Debug, Deserialize)]
struct RemoveForm {
    /// `goals`, `activities`, `followups` or `signatories`.
    list: String,
    /// The item's id (for signatories: the position, from 1).
    item: String,
}

/// `POST /api/docs/{id}/remove`: `goal remove`, `activity remove`, `signatory remove`.
async fn remove_item(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(form): Json<RemoveForm>,
) -> ApiResult {
    let message = format!("remove from {}", form.list);
    edit(state, id, message, move |e| match form.list.as_str() {
        "signatories" => {
            let n = form.item.parse().map_err(|_| samverkan_shared::model::ModelError::InvalidValue {
                field: "signatories".into(),
                value: form.item.clone(),
                reason: format!("not a position: {:?}", form.item),
            })?;
            e.remove_signatory(n)
        }
        list => e.remove_item(list, &form.item),
    })
    .await
}

#[derive(Debug, Deserialize)]
struct Resolve {
    path: String,
    value: String,
}

/// `POST /api/docs/{id}/conflicts`: keep one value (`conflicts --resolve`).
async fn resolve_conflict(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(form): Json<Resolve>,
) -> ApiResult {
    let message = format!("resolve conflict on {}", form.path);
    edit(state, id, message, move |e| e.set_field(&form.path, &form.value)).await
}

#[derive(Debug, Deserialize)]
struct ReviewForm {
    n: usize,
    take: Option<String>,
    text: Option<String>,
}

/// `POST /api/docs/{id}/review`: settle an overlap (`review --resolve n --take …`).
async fn resolve_overlap(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(form): Json<ReviewForm>,
) -> ApiResult {
    use clap::ValueEnum;
    let take = form
        .take
        .as_deref()
        .map(|t| crate::review::TakeArg::from_str(t, true).map_err(ApiError::Invalid))
        .transpose()?;
    let done = state
        .with_node(move |node| {
            let id = resolve(node, &id)?;
            let done = crate::review::resolve(node, &id, form.n, take, form.text).map_err(invalid)?;
            Ok(Json(json!(done)))
        })
        .await?;
    state.committed();
    Ok(done)
}

/// `GET /api/docs/{id}/history`: every change with its author and what it did.
async fn history(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    state
        .with_node(move |node| {
            let id = resolve(node, &id)?;
            Ok(Json(json!(crate::review::history(node, &id)?)))
        })
        .await
}

#[derive(Debug, Deserialize)]
struct VersionQuery {
    heads: String,
}

/// `GET /api/docs/{id}/version?heads=…`: the document as it was at those heads.
async fn version(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(query): Query<VersionQuery>,
) -> ApiResult {
    state
        .with_node(move |node| {
            let id = resolve(node, &id)?;
            let heads = heads_of(&query.heads)?;
            let view = node.document(&id)?.at(&heads).map_err(invalid)?.view().map_err(invalid)?;
            let mut value = view_json(node, &view);
            value["heads"] = json!(query.heads.split(',').collect::<Vec<_>>());
            Ok(Json(value))
        })
        .await
}

/// `GET /api/docs/{id}/diff`: the signed version against the current one (`samverkan-node diff`).
async fn diff(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    state
        .with_node(move |node| {
            let id = resolve(node, &id)?;
            let (changed, text) = crate::approvals::signed_diff(node, &id).map_err(|e| invalid(format!("{e:#}")))?;
            Ok(Json(json!({"id": id, "changed": changed, "diff": text})))
        })
        .await
}

/// `GET /api/signers`: the signers on this node, and whether each key has a passphrase.
async fn signers(State(state): State<Arc<AppState>>) -> ApiResult {
    state
        .with_node(|node| {
            let list: Vec<Value> = node
                .signers()?
                .into_iter()
                .map(|s| {
                    let protection = node.signer_protection(&s.name).ok();
                    json!({"name": s.name, "role": s.role, "org": s.org, "org_name": node.directory().name_of(&s.org),
                           "key": s.key.to_string(), "protection": protection})
                })
                .collect();
            Ok(Json(json!(list)))
        })
        .await
}

#[derive(Debug, Deserialize)]
struct ApproveForm {
    signer: String,
    /// The signer key's passphrase: used to open the key for this request, never kept.
    #[serde(default)]
    passphrase: String,
    #[serde(default)]
    withdraw: bool,
}

/// `POST /api/docs/{id}/approve`: sign the current version (or withdraw), as
/// `samverkan-node approve --as` / `withdraw --as`.
async fn approve(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(form): Json<ApproveForm>,
) -> ApiResult {
    let done = state
        .with_node(move |node| {
            let id = resolve(node, &id)?;
            let passphrase = Some(form.passphrase.as_str()).filter(|p| !p.is_empty());
            let protection = node.signer_protection(&form.signer).ok();
            let record = if form.withdraw {
                node.withdraw_with(&id, &form.signer, passphrase)?
            } else {
                node.approve_with(&id, &form.signer, passphrase)?
            };
            let status = node.approval_status(&id)?;
            Ok(Json(json!({
                "id": id, "saved": true, "action": record.action.as_str(), "state": state_name(status.state),
                "unprotected_key": protection == Some(crate::signer_key::Protection::None),
            })))
        })
        .await?;
    state.committed();
    Ok(done)
}

/// `POST /api/docs/{id}/signed-bundle`: writes the signed bundle of the version
/// in force under `signed/` in the data directory (`export --signed`) and verifies it.
async fn signed_bundle(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    let data_dir = state.data_dir.clone();
    state
        .with_node(move |node| {
            let id = resolve(node, &id)?;
            let dir = data_dir.join("signed").join(format!("{}-{}", id.short(), Utc::now().format("%Y%m%dT%H%M%SZ")));
            let files = node.export_signed(&id, &dir)?;
            let report = samverkan_shared::signed_bundle::verify(&files, node.pinned_relay()?.as_ref())
                .map_err(|e| invalid(format!("the bundle just written does not verify: {e}")))?;
            Ok(Json(json!({"id": id, "dir": dir, "report": report})))
        })
        .await
}

/// `GET /api/activities`: every activity of every document, with its document.
async fn activities(State(state): State<Arc<AppState>>) -> ApiResult {
    state
        .with_node(|node| {
            let today = Utc::now().date_naive();
            let mut out = Vec::new();
            for summary in node.list()? {
                let Ok(view) = node.document(&summary.id).and_then(|d| Ok(d.view()?)) else { continue };
                let ctx = PartyContext::new(node.directory(), view.party_refs());
                for a in &view.activities {
                    let last_day = a.due.as_ref().and_then(Due::last_day);
                    out.push(json!({
                        "doc": summary.id, "doc_title": summary.title, "doc_kind": summary.kind.label(),
                        "id": a.id, "what": a.what,
                        "owners": a.owners.iter().map(|o| ctx.label(o)).collect::<Vec<_>>(),
                        "due_label": a.due.as_ref().map(|d| d.label()),
                        "last_day": last_day,
                        "days_left": last_day.map(|d| (d - today).num_days()),
                        "status": a.status.as_str(), "status_label": a.status.label(),
                    }));
                }
            }
            Ok(Json(json!({"today": today, "activities": out})))
        })
        .await
}

/// Where `GET /` goes without a session: the login page, which explains.
pub fn to_login() -> Redirect {
    Redirect::to("/login")
}
