//! Markdown import, export and rendering of documents.
//!
//! The exchange format is Markdown with a TOML front matter between `+++` lines:
//! the front matter holds the structured fields (kind, parties by name, period,
//! signatories, goals, activities, follow-ups, meetings) and everything after it
//! is the body, kept byte for byte. Exporting and importing again is lossless;
//! `samverkan-node edit` works on this format.
//!
//! A plain Markdown file without front matter (such as the signed county
//! agreement in `../shared/seed/`) is imported as body verbatim, and its
//! structured fields are recognised from the text: the title from the first
//! heading, the parties named in it, the place and date above the signatures,
//! and each signatory (name, role title, organisation) between thematic breaks.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::ids::{DocId, ItemId};
use crate::model::{
    Activity, ActivityStatus, DocKind, DocumentContent, DocumentView, FollowUp, Goal, Meeting, MeetingBody, ModelError,
    Period, Scope, Signatory,
};
use crate::org::{Directory, OrgId, OrgKind};

/// Version written in the `samverkan` key of the front matter.
pub const FORMAT_VERSION: u32 = 1;

const FENCE: &str = "+++";

/// Errors importing Markdown.
#[derive(Debug, thiserror::Error)]
pub enum MarkdownError {
    /// The front matter opens with `+++` but never closes.
    #[error("the front matter starting on line 1 is not closed by a line with +++")]
    UnterminatedFrontMatter,
    /// The front matter is not valid TOML or lacks a required key.
    #[error("front matter: {0}")]
    FrontMatter(String),
    /// Written by a newer format version.
    #[error("front matter format version {0} is newer than this program understands ({FORMAT_VERSION})")]
    NewerFormat(u32),
    /// No kind given and none recognised.
    #[error("could not tell what kind of document this is from its title; give the kind explicitly (agreement, citizen_promise, operations_plan)")]
    UnknownKind,
    /// No title: no front matter title and no heading.
    #[error("the document has no title: start it with a heading (# Title)")]
    NoTitle,
    /// A field failed validation.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The result of importing Markdown.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The document id named in the front matter, if any (an exported document).
    pub id: Option<DocId>,
    /// The content.
    pub content: DocumentContent,
    /// What was recognised from plain text, for telling the user.
    pub recognised: Vec<String>,
}

// ---- front matter --------------------------------------------------------------------------

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FrontMatter {
    samverkan: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    title: String,
    #[serde(default)]
    parties: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    place: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    date: Option<String>,
    #[serde(default)]
    period: PeriodFm,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    signatories: Vec<SignatoryFm>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    goals: Vec<GoalFm>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    activities: Vec<ActivityFm>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    followups: Vec<FollowUpFm>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    meetings: Vec<MeetingFm>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeriodFm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    end: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatoryFm {
    organisation: String,
    role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GoalFm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    text: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivityFm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    what: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    due: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FollowUpFm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    date: String,
    author: String,
    text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    activity: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeetingFm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    date: String,
    body: String,
    #[serde(default)]
    notes: String,
}

fn field_error(field: &str, value: &str, reason: impl std::fmt::Display) -> MarkdownError {
    MarkdownError::Model(ModelError::InvalidValue {
        field: field.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    })
}

fn parse_date(field: &str, value: &str) -> Result<NaiveDate, MarkdownError> {
    Ok(crate::model::parse_date(field, value)?)
}

fn parse_opt_date(field: &str, value: Option<&str>) -> Result<Option<NaiveDate>, MarkdownError> {
    value.filter(|v| !v.trim().is_empty()).map(|v| parse_date(field, v)).transpose()
}

fn resolve(directory: &Directory, name: &str) -> Result<OrgId, MarkdownError> {
    directory
        .resolve(name)
        .map(|o| o.id.clone())
        .ok_or_else(|| MarkdownError::Model(ModelError::UnknownOrganisation(name.to_string())))
}

fn item_id(field: &str, id: Option<&str>) -> Result<ItemId, MarkdownError> {
    match id {
        Some(id) => id.parse().map_err(|e| field_error(field, id, e)),
        None => Ok(ItemId::random()),
    }
}

fn parse_enum<T: std::str::FromStr>(field: &str, value: &str) -> Result<T, MarkdownError>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e| field_error(field, value, e))
}

impl FrontMatter {
    fn from_view(view: &DocumentView, directory: &Directory) -> Self {
        let name = |org: &OrgId| directory.name_of(org).to_string();
        let date = |d: NaiveDate| d.format("%Y-%m-%d").to_string();
        Self {
            samverkan: FORMAT_VERSION,
            id: Some(view.id.to_string()),
            kind: view.kind.as_str().to_string(),
            scope: Some(view.scope.as_str().to_string()),
            title: view.title.clone(),
            parties: view.parties.iter().map(name).collect(),
            place: view.place.clone(),
            date: view.date.map(date),
            period: PeriodFm { start: view.period.start.map(date), end: view.period.end.map(date) },
            signatories: view
                .signatories
                .iter()
                .map(|s| SignatoryFm { organisation: name(&s.org), role: s.role.clone(), name: s.name.clone() })
                .collect(),
            goals: view.goals.iter().map(|g| GoalFm { id: Some(g.id.to_string()), text: g.text.clone() }).collect(),
            activities: view
                .activities
                .iter()
                .map(|a| ActivityFm {
                    id: Some(a.id.to_string()),
                    what: a.what.clone(),
                    owner: a.owner.as_ref().map(name),
                    due: a.due.map(date),
                    status: Some(a.status.as_str().to_string()),
                })
                .collect(),
            followups: view
                .followups
                .iter()
                .map(|f| FollowUpFm {
                    id: Some(f.id.to_string()),
                    date: date(f.date),
                    author: f.author.clone(),
                    text: f.text.clone(),
                    activity: f.activity.as_ref().map(ToString::to_string),
                })
                .collect(),
            meetings: view
                .meetings
                .iter()
                .map(|m| MeetingFm {
                    id: Some(m.id.to_string()),
                    date: date(m.date),
                    body: m.body.as_str().to_string(),
                    notes: m.notes.clone(),
                })
                .collect(),
        }
    }

    fn into_content(
        self,
        body: String,
        directory: &Directory,
    ) -> Result<(Option<DocId>, DocumentContent), MarkdownError> {
        if self.samverkan > FORMAT_VERSION {
            return Err(MarkdownError::NewerFormat(self.samverkan));
        }
        let id = self.id.as_deref().map(|id| id.parse::<DocId>().map_err(|e| field_error("id", id, e))).transpose()?;
        let kind: DocKind = parse_enum("kind", &self.kind)?;
        if self.title.trim().is_empty() {
            return Err(ModelError::EmptyTitle.into());
        }
        let parties = self.parties.iter().map(|p| resolve(directory, p)).collect::<Result<Vec<_>, _>>()?;
        let scope = match self.scope.as_deref() {
            Some(s) => parse_enum("scope", s)?,
            None => default_scope(&self.title, &parties, directory),
        };
        let period = Period {
            start: parse_opt_date("period.start", self.period.start.as_deref())?,
            end: parse_opt_date("period.end", self.period.end.as_deref())?,
        };
        if let (Some(start), Some(end)) = (period.start, period.end) {
            if end < start {
                return Err(ModelError::PeriodEndsBeforeStart { start, end }.into());
            }
        }
        let signatories = self
            .signatories
            .into_iter()
            .map(|s| Ok(Signatory { org: resolve(directory, &s.organisation)?, role: s.role, name: s.name }))
            .collect::<Result<Vec<_>, MarkdownError>>()?;
        let goals = self
            .goals
            .into_iter()
            .map(|g| Ok(Goal { id: item_id("goals.id", g.id.as_deref())?, text: g.text }))
            .collect::<Result<Vec<_>, MarkdownError>>()?;
        let activities = self
            .activities
            .into_iter()
            .map(|a| {
                Ok(Activity {
                    id: item_id("activities.id", a.id.as_deref())?,
                    owner: a
                        .owner
                        .as_deref()
                        .filter(|o| !o.trim().is_empty())
                        .map(|o| resolve(directory, o))
                        .transpose()?,
                    due: parse_opt_date("activities.due", a.due.as_deref())?,
                    status: match a.status.as_deref() {
                        Some(s) => parse_enum("activities.status", s)?,
                        None => ActivityStatus::Planned,
                    },
                    what: a.what,
                })
            })
            .collect::<Result<Vec<_>, MarkdownError>>()?;
        let followups = self
            .followups
            .into_iter()
            .map(|f| {
                Ok(FollowUp {
                    id: item_id("followups.id", f.id.as_deref())?,
                    date: parse_date("followups.date", &f.date)?,
                    activity: f
                        .activity
                        .as_deref()
                        .filter(|a| !a.is_empty())
                        .map(|a| item_id("followups.activity", Some(a)))
                        .transpose()?,
                    author: f.author,
                    text: f.text,
                })
            })
            .collect::<Result<Vec<_>, MarkdownError>>()?;
        let meetings = self
            .meetings
            .into_iter()
            .map(|m| {
                Ok(Meeting {
                    id: item_id("meetings.id", m.id.as_deref())?,
                    date: parse_date("meetings.date", &m.date)?,
                    body: parse_enum::<MeetingBody>("meetings.body", &m.body)?,
                    notes: m.notes,
                })
            })
            .collect::<Result<Vec<_>, MarkdownError>>()?;
        let content = DocumentContent {
            kind,
            scope,
            title: self.title,
            parties,
            period,
            place: self.place.filter(|p| !p.trim().is_empty()),
            date: parse_opt_date("date", self.date.as_deref())?,
            signatories,
            body,
            goals,
            activities,
            followups,
            meetings,
        };
        Ok((id, content))
    }
}

// ---- export ----------------------------------------------------------------------------------

/// The document as Markdown with front matter: lossless, re-importable, what `edit` opens.
pub fn export(view: &DocumentView, directory: &Directory) -> String {
    let front = toml::to_string(&FrontMatter::from_view(view, directory))
        .unwrap_or_else(|e| format!("# front matter could not be written: {e}\n"));
    format!("{FENCE}\n{front}{FENCE}\n{}", view.body)
}

/// Splits a text into front matter (if it starts with `+++`) and body.
fn split_front_matter(text: &str) -> Result<(Option<&str>, &str), MarkdownError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let Some(rest) = text.strip_prefix("+++\n").or_else(|| text.strip_prefix("+++\r\n")) else {
        return Ok((None, text));
    };
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        if line.trim_end_matches(['\n', '\r']) == FENCE {
            return Ok((Some(&rest[..offset]), &rest[offset + line.len()..]));
        }
        offset += line.len();
    }
    Err(MarkdownError::UnterminatedFrontMatter)
}

// ---- import ----------------------------------------------------------------------------------

/// Parses the front matter `front` of `text` with errors located by the
/// file's line numbers: the opening `+++` line is parsed as blanks of the
/// same length, so TOML's lines and offsets are the file's.
fn parse_front_matter(text: &str, front: &str) -> Result<FrontMatter, MarkdownError> {
    let opening = if text.trim_start_matches('\u{feff}').starts_with("+++\r\n") { "+++\r\n" } else { "+++\n" };
    toml::from_str(&format!("{}{front}", opening.replace('+', " "))).map_err(|mut e| {
        e.set_input(Some(&format!("{opening}{front}")));
        MarkdownError::FrontMatter(e.to_string())
    })
}

/// Imports Markdown: with front matter exactly, without it by recognising the
/// fields from the text. `kind` overrides the recognised kind of a plain file.
pub fn import(text: &str, directory: &Directory, kind: Option<DocKind>) -> Result<Imported, MarkdownError> {
    match split_front_matter(text)? {
        (Some(front), body) => {
            let front = parse_front_matter(text, front)?;
            let (id, content) = front.into_content(body.to_string(), directory)?;
            Ok(Imported { id, content, recognised: Vec::new() })
        }
        (None, body) => recognise(body, directory, kind),
    }
}

/// Role titles of people who sign, and the kind of organisation each belongs to.
const KNOWN_ROLES: [(&str, OrgKind); 9] = [
    ("Landshövding", OrgKind::CountyBoard),
    ("Lokalpolisområdeschef", OrgKind::Police),
    ("Polisområdeschef", OrgKind::Police),
    ("Regionpolischef", OrgKind::Police),
    ("Kommunpolis", OrgKind::Police),
    ("Kommunstyrelsens ordförande", OrgKind::Municipality),
    ("Kommundirektör", OrgKind::Municipality),
    ("Kommunchef", OrgKind::Municipality),
    ("Stadsdirektör", OrgKind::Municipality),
];

/// The heading text of an ATX heading line, without markers and emphasis.
fn heading_text(line: &str) -> Option<String> {
    let trimmed = line.trim_start();
    let hashes = trimmed.chars().take_while(|c| *c == '#').count();
    if hashes == 0 || hashes > 6 || !trimmed[hashes..].starts_with([' ', '\t']) {
        return None;
    }
    let text = trimmed[hashes..].trim().trim_end_matches('#').trim();
    let text = text.trim_matches(['*', '_']).trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn is_thematic_break(line: &str) -> bool {
    let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
    compact.len() >= 3 && ["-", "*", "_"].iter().any(|m| compact.chars().all(|c| c.to_string() == *m))
}

/// Finds a `YYYY-MM-DD` date in a short line, with the text before it (the place).
fn place_and_date(line: &str) -> Option<(Option<String>, NaiveDate)> {
    let line = line.trim();
    if line.is_empty() || line.chars().count() > 100 || line.starts_with('#') {
        return None;
    }
    for (pos, _) in line.char_indices() {
        let Some(candidate) = line.get(pos..pos + 10) else { continue };
        let boundary_before = line[..pos].chars().next_back().is_none_or(|c| !c.is_ascii_digit());
        let boundary_after = line[pos + 10..].chars().next().is_none_or(|c| !c.is_ascii_digit());
        if !(boundary_before && boundary_after) {
            continue;
        }
        if let Ok(date) = NaiveDate::parse_from_str(candidate, "%Y-%m-%d") {
            let place = line[..pos].trim().trim_end_matches([',', ' ']).trim().to_string();
            return Some(((!place.is_empty()).then_some(place), date));
        }
    }
    None
}

fn default_scope(title: &str, parties: &[OrgId], directory: &Directory) -> Scope {
    let lower = title.to_lowercase();
    if lower.contains("länsövergripande") || lower.contains("regional") {
        return Scope::County;
    }
    let has_municipality = parties.iter().any(|p| directory.get(p).is_some_and(|o| o.kind == OrgKind::Municipality));
    if has_municipality {
        Scope::Local
    } else {
        Scope::County
    }
}

fn recognise_kind(title: &str) -> Option<DocKind> {
    let lower = title.to_lowercase();
    if lower.contains("överenskommelse") {
        Some(DocKind::Agreement)
    } else if lower.contains("medborgarlöfte") {
        Some(DocKind::CitizenPromise)
    } else if ["verksamhetsplan", "åtgärdsplan", "handlingsplan"].iter().any(|k| lower.contains(k)) {
        Some(DocKind::OperationsPlan)
    } else {
        None
    }
}

/// Recognises the structured fields of a plain Markdown document; the body is kept verbatim.
fn recognise(body: &str, directory: &Directory, kind: Option<DocKind>) -> Result<Imported, MarkdownError> {
    let lines: Vec<&str> = body.lines().collect();
    let title = lines.iter().find_map(|l| heading_text(l)).ok_or(MarkdownError::NoTitle)?;
    let kind = kind.or_else(|| recognise_kind(&title)).ok_or(MarkdownError::UnknownKind)?;
    let mut recognised = vec![format!("title: {title}"), format!("kind: {}", kind.label())];

    let mut parties = directory.mentioned_in(&title);
    if parties.is_empty() {
        parties = directory.mentioned_in(body);
    }

    // Place and date: the last short line with a date, before the signature blocks.
    let date_line = (0..lines.len()).rev().find_map(|i| place_and_date(lines[i]).map(|pd| (i, pd)));
    let (place, date, signature_start) = match date_line {
        Some((i, (place, date))) => (place, Some(date), i + 1),
        None => (None, None, lines.len()),
    };
    if let Some(date) = date {
        recognised.push(format!("date: {date}{}", place.as_ref().map(|p| format!(" ({p})")).unwrap_or_default()));
    }

    // Signature blocks: groups of lines after the date, split by thematic breaks.
    let mut signatories = Vec::new();
    let mut blocks: Vec<Vec<&str>> = vec![Vec::new()];
    for line in &lines[signature_start..] {
        if is_thematic_break(line) {
            blocks.push(Vec::new());
        } else if !line.trim().is_empty() {
            if let Some(block) = blocks.last_mut() {
                block.push(line.trim());
            }
        }
    }
    for block in blocks.into_iter().filter(|b| !b.is_empty()) {
        if let Some(s) = recognise_signatory(&block, &parties, directory) {
            recognised.push(format!(
                "signatory: {} ({}){}",
                s.role,
                directory.name_of(&s.org),
                s.name.as_ref().map(|n| format!(", {n}")).unwrap_or_default()
            ));
            if !parties.contains(&s.org) {
                parties.push(s.org.clone());
            }
            signatories.push(s);
        }
    }
    recognised
        .push(format!("parties: {}", parties.iter().map(|p| directory.name_of(p)).collect::<Vec<_>>().join(", ")));

    let scope = default_scope(&title, &parties, directory);
    let content = DocumentContent {
        kind,
        scope,
        title,
        parties,
        period: Period { start: date, end: None },
        place,
        date,
        signatories,
        body: body.to_string(),
        goals: Vec::new(),
        activities: Vec::new(),
        followups: Vec::new(),
        meetings: Vec::new(),
    };
    Ok(Imported { id: None, content, recognised })
}

/// A signature block: an optional name line, then the role title and organisation.
fn recognise_signatory(block: &[&str], parties: &[OrgId], directory: &Directory) -> Option<Signatory> {
    let starts_with_role =
        |line: &str| KNOWN_ROLES.iter().find(|(role, _)| line.to_lowercase().starts_with(&role.to_lowercase()));
    let (name, rest) = match starts_with_role(block[0]) {
        Some(_) => (None, block),
        None => (Some(block[0].to_string()), &block[1..]),
    };
    let role_text = rest.join(" ");
    let (role, kind) = starts_with_role(&role_text)?;
    let after_role = role_text[role.len()..].trim();
    let org = directory
        .mentioned_in(after_role)
        .into_iter()
        .next()
        .or_else(|| {
            // "Landshövding Södermanlands län": the party of the role's kind.
            parties.iter().find(|p| directory.get(p).is_some_and(|o| o.kind == *kind)).cloned()
        })
        .or_else(|| {
            let mut of_kind = directory.organisations().iter().filter(|o| o.kind == *kind);
            match (of_kind.next(), of_kind.next()) {
                (Some(only), None) => Some(only.id.clone()),
                _ => None,
            }
        })?;
    Some(Signatory { org, role: role.to_string(), name })
}

// ---- rendering -------------------------------------------------------------------------------

/// The document as people read it (`samverkan-node show`): a header with the
/// structured fields, the body, then goals, activities, follow-ups and meetings.
pub fn render(view: &DocumentView, directory: &Directory) -> String {
    let mut out = String::new();
    let names = |orgs: &[OrgId]| orgs.iter().map(|o| directory.name_of(o)).collect::<Vec<_>>().join(", ");
    out.push_str(&format!("{}\n", view.title));
    out.push_str(&format!("{} · {} · {}\n", view.kind.label(), view.scope.label(), view.id));
    if !view.parties.is_empty() {
        out.push_str(&format!("Parter: {}\n", names(&view.parties)));
    }
    if view.period.start.is_some() || view.period.end.is_some() {
        let show = |d: Option<NaiveDate>, open: &str| d.map(|d| d.to_string()).unwrap_or_else(|| open.to_string());
        out.push_str(&format!(
            "Giltighet: {} – {}\n",
            show(view.period.start, "…"),
            show(view.period.end, "tills vidare")
        ));
    }
    if view.place.is_some() || view.date.is_some() {
        let parts: Vec<String> = [view.place.clone(), view.date.map(|d| d.to_string())].into_iter().flatten().collect();
        out.push_str(&format!("Ort och datum: {}\n", parts.join(" ")));
    }
    for s in &view.signatories {
        out.push_str(&format!(
            "Undertecknas av: {}, {}{}\n",
            s.role,
            directory.name_of(&s.org),
            s.name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()
        ));
    }
    out.push('\n');
    out.push_str(view.body.trim_matches('\n'));
    out.push('\n');
    if !view.goals.is_empty() {
        out.push_str("\n## Mål\n\n");
        for g in &view.goals {
            out.push_str(&format!("- {} [{}]\n", g.text, g.id));
        }
    }
    if !view.activities.is_empty() {
        out.push_str("\n## Aktiviteter\n\n");
        for a in &view.activities {
            let mut details = vec![format!("status: {}", a.status.label())];
            if let Some(owner) = &a.owner {
                details.push(format!("ansvarig: {}", directory.name_of(owner)));
            }
            if let Some(due) = a.due {
                details.push(format!("klart senast: {due}"));
            }
            out.push_str(&format!("- {} [{}] ({})\n", a.what, a.id, details.join("; ")));
        }
    }
    if !view.followups.is_empty() {
        out.push_str("\n## Uppföljning\n\n");
        for f in &view.followups {
            let about = f.activity.as_ref().map(|a| format!(" (aktivitet {a})")).unwrap_or_default();
            out.push_str(&format!("- {} {}{}: {} [{}]\n", f.date, f.author, about, f.text, f.id));
        }
    }
    if !view.meetings.is_empty() {
        out.push_str("\n## Möten\n\n");
        for m in &view.meetings {
            out.push_str(&format!("- {} {}: {} [{}]\n", m.date, m.body.label(), m.notes, m.id));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str =
        include_str!("../../../shared/seed/lansovergripande-samverkansoverenskommelse-sodermanland-2023.md");

    #[test]
    fn seed_agreement_is_recognised() {
        let dir = Directory::sodermanland();
        let imported = import(SEED, &dir, None).unwrap();
        let c = &imported.content;
        assert_eq!(c.kind, DocKind::Agreement);
        assert_eq!(c.scope, Scope::County);
        assert!(c.title.starts_with("Länsövergripande samverkansöverenskommelse i det brottsförebyggande arbetet"));
        let parties: Vec<&str> = c.parties.iter().map(OrgId::as_str).collect();
        assert_eq!(parties, ["lansstyrelsen-sodermanland", "polisomrade-sodermanland"]);
        assert_eq!(c.date, NaiveDate::from_ymd_opt(2023, 10, 18));
        assert_eq!(c.period.start, c.date);
        assert_eq!(c.place.as_deref(), Some("Nyköping/ Eskilstuna"));
        let sigs: Vec<(&str, &str, Option<&str>)> =
            c.signatories.iter().map(|s| (s.org.as_str(), s.role.as_str(), s.name.as_deref())).collect();
        assert_eq!(
            sigs,
            [
                ("lansstyrelsen-sodermanland", "Landshövding", Some("Beatrice Ask")),
                ("polisomrade-sodermanland", "Polisområdeschef", Some("Mattias Forssten")),
            ]
        );
        assert_eq!(c.body, SEED, "the body is kept byte for byte");
    }

    #[test]
    fn export_then_import_is_lossless() {
        let dir = Directory::sodermanland();
        let mut content = import(SEED, &dir, None).unwrap().content;
        content.activities.push(Activity {
            id: ItemId::random(),
            what: "Utbildning i lägesbild för kommunernas BF-samordnare".into(),
            owner: Some(OrgId::new("lansstyrelsen-sodermanland").unwrap()),
            due: NaiveDate::from_ymd_opt(2024, 3, 31),
            status: ActivityStatus::Ongoing,
        });
        let view = content.clone().into_view(DocId::random());
        let text = export(&view, &dir);
        assert!(text.ends_with(SEED));
        let back = import(&text, &dir, None).unwrap();
        assert_eq!(back.id.as_ref(), Some(&view.id));
        assert_eq!(back.content, content);
    }

    #[test]
    fn broken_front_matter_gives_clear_errors() {
        let dir = Directory::sodermanland();
        assert!(matches!(import("+++\nkind = 'agreement'\n", &dir, None), Err(MarkdownError::UnterminatedFrontMatter)));
        let err =
            import("+++\nsamverkan = 1\nkind = 'agreement'\ntitle = 'x'\nparties = ['Uppsala']\n+++\n", &dir, None)
                .unwrap_err()
                .to_string();
        assert!(err.contains("unknown organisation \"Uppsala\""), "{err}");
        let err = import("+++\nsamverkan = 1\nkind = 'agreement'\ntitle = ''\n+++\n", &dir, None).unwrap_err();
        assert!(matches!(err, MarkdownError::Model(ModelError::EmptyTitle)));
        let err = import(
            "+++\nsamverkan = 1\nkind = 'agreement'\ntitle = 'x'\n[period]\nstart = '2024-01-01'\nend = '2023-01-01'\n+++\n",
            &dir,
            None,
        )
        .unwrap_err();
        assert!(matches!(err, MarkdownError::Model(ModelError::PeriodEndsBeforeStart { .. })));
        assert!(matches!(import("no heading here", &dir, None), Err(MarkdownError::NoTitle)));
        assert!(matches!(import("# Anteckningar", &dir, None), Err(MarkdownError::UnknownKind)));
    }

    #[test]
    fn plain_citizen_promise_is_recognised_as_local() {
        let dir = Directory::sodermanland();
        let text = "# Medborgarlöfte för Flens kommun och Polisområde Södermanland 2025\n\nVi lovar trygga torg.\n\nFlen 2025-02-01\n\n---\n\nAnna Andersson\n\nKommundirektör Flens kommun\n\n---\n\nLokalpolisområdeschef Polisområde Södermanland\n";
        let c = import(text, &dir, None).unwrap().content;
        assert_eq!(c.kind, DocKind::CitizenPromise);
        assert_eq!(c.scope, Scope::Local);
        assert_eq!(c.signatories.len(), 2);
        assert_eq!(c.signatories[0].org.as_str(), "flen-kommun");
        assert_eq!(c.signatories[0].name.as_deref(), Some("Anna Andersson"));
        assert_eq!(c.signatories[1].role, "Lokalpolisområdeschef");
        assert_eq!(c.signatories[1].name, None);
    }

    #[test]
    fn render_shows_fields_and_body() {
        let dir = Directory::sodermanland();
        let content = import(SEED, &dir, None).unwrap().content;
        let text = render(&content.into_view(DocId::random()), &dir);
        assert!(text.contains("Parter: Länsstyrelsen i Södermanlands län, Polisområde Södermanland"));
        assert!(text.contains("Undertecknas av: Landshövding, Länsstyrelsen i Södermanlands län (Beatrice Ask)"));
        assert!(text.contains("***Målsättningarna för det brottsförebyggande arbetet"));
    }
}
