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

mod activities;
mod scan;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::ids::{DocId, ItemId};
use crate::model::{
    canonical_owner, parties_from_refs, party_refs, Activity, ActivityStatus, DocKind, DocumentContent, DocumentView,
    Due, FollowUp, Goal, Meeting, MeetingBody, ModelError, PartyContext, Period, Scope, Signatory,
};
use crate::org::{Directory, OrgId, OrgKind, OrgRef, UnitKind};

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
    /// The generated activities table of an exported file cannot be read back.
    #[error("{0}")]
    ActivitiesTable(String),
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
    /// Organisations, units ("Flens kommun (tekniska förvaltningen)",
    /// "Lokalpolisområde Katrineholm") or `extern: name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    owners: Vec<String>,
    /// One owner, as files written before `owners` have it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    /// `YYYY-MM-DD`, `löpande`, a quarter (`2025-Q2`) or words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    due: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    followup_method: Option<String>,
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

fn resolve_ref(directory: &Directory, name: &str) -> Result<OrgRef, MarkdownError> {
    directory.resolve_ref(name).ok_or_else(|| MarkdownError::Model(ModelError::UnknownOrganisation(name.to_string())))
}

/// A deadline as the front matter writes it: `YYYY-MM-DD`, `löpande`, `2025-Q2`, or the words.
fn front_matter_due(due: &Due) -> String {
    match due {
        Due::Ongoing => "löpande".to_string(),
        other => other.encode(),
    }
}

/// Reads [`front_matter_due`]'s form; a text shaped like a date must be one.
fn parse_front_matter_due(text: &str, year: Option<i32>) -> Result<Option<Due>, MarkdownError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let date_shaped = text.len() == 10
        && text.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
    if date_shaped {
        return parse_date("activities.due", text).map(|d| Some(Due::Date(d)));
    }
    Ok(Some(Due::parse_structured(text, year).unwrap_or_else(|| Due::Text(text.to_string()))))
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
        let party =
            |org: &OrgId| directory.describe(&OrgRef { org: org.clone(), unit: view.party_units.get(org).cloned() });
        let date = |d: NaiveDate| d.format("%Y-%m-%d").to_string();
        Self {
            samverkan: FORMAT_VERSION,
            id: Some(view.id.to_string()),
            kind: view.kind.as_str().to_string(),
            scope: Some(view.scope.as_str().to_string()),
            title: view.title.clone(),
            parties: view.parties.iter().map(party).collect(),
            place: view.place.clone(),
            date: view.date.map(date),
            period: PeriodFm { start: view.period.start.map(date), end: view.period.end.map(date) },
            signatories: view
                .signatories
                .iter()
                .map(|s| SignatoryFm { organisation: party(&s.org), role: s.role.clone(), name: s.name.clone() })
                .collect(),
            goals: view.goals.iter().map(|g| GoalFm { id: Some(g.id.to_string()), text: g.text.clone() }).collect(),
            activities: view
                .activities
                .iter()
                .map(|a| ActivityFm {
                    id: Some(a.id.to_string()),
                    what: a.what.clone(),
                    owners: a.owners.iter().map(|o| canonical_owner(directory, o)).collect(),
                    owner: None,
                    due: a.due.as_ref().map(front_matter_due),
                    followup_method: a.followup_method.clone(),
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
        let refs = self.parties.iter().map(|p| resolve_ref(directory, p)).collect::<Result<Vec<_>, _>>()?;
        let (parties, party_units) = parties_from_refs(&refs);
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
            .map(|s| Ok(Signatory { org: resolve_ref(directory, &s.organisation)?.org, role: s.role, name: s.name }))
            .collect::<Result<Vec<_>, MarkdownError>>()?;
        let goals = self
            .goals
            .into_iter()
            .map(|g| Ok(Goal { id: item_id("goals.id", g.id.as_deref())?, text: g.text }))
            .collect::<Result<Vec<_>, MarkdownError>>()?;
        let ctx = PartyContext::new(directory, party_refs(&parties, &party_units));
        let year = activities::year_of(period.start, &self.title);
        let mut activities = self
            .activities
            .into_iter()
            .map(|a| {
                let owners = a
                    .owner
                    .iter()
                    .chain(&a.owners)
                    .filter(|o| !o.trim().is_empty())
                    .map(|o| {
                        ctx.resolve_owner(o)
                            .ok_or_else(|| MarkdownError::Model(ModelError::UnknownOwner(o.trim().to_string())))
                    })
                    .collect::<Result<Vec<_>, MarkdownError>>()?;
                let mut unique = Vec::new();
                for o in owners {
                    if !unique.contains(&o) {
                        unique.push(o);
                    }
                }
                Ok(Activity {
                    id: item_id("activities.id", a.id.as_deref())?,
                    owners: unique,
                    due: a.due.as_deref().map(|d| parse_front_matter_due(d, year)).transpose()?.flatten(),
                    followup_method: a.followup_method.filter(|m| !m.trim().is_empty()),
                    status: match a.status.as_deref() {
                        Some(s) => parse_enum("activities.status", s)?,
                        None => ActivityStatus::Planned,
                    },
                    what: a.what,
                })
            })
            .collect::<Result<Vec<_>, MarkdownError>>()?;
        let body = activities::collapse(&body, &mut activities, &ctx, year)?;
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
            party_units,
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
///
/// The body is as stored, except that each activities marker is followed by the
/// table generated from the activities (see `activities`), which import reads
/// back into the marker.
pub fn export(view: &DocumentView, directory: &Directory) -> String {
    let front = toml::to_string(&FrontMatter::from_view(view, directory))
        .unwrap_or_else(|e| format!("# front matter could not be written: {e}\n"));
    format!("{FENCE}\n{front}{FENCE}\n{}", expanded_body(view, directory))
}

/// The body with its generated activities table, as export and `show` print it.
pub fn expanded_body(view: &DocumentView, directory: &Directory) -> String {
    let ctx = PartyContext::new(directory, view.party_refs());
    activities::expand(&view.body, &view.activities, &ctx)
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

/// Role titles of people who sign, and the kind of organisation each belongs to;
/// longer titles first where one ends another ("Lokalpolisområdeschef").
const KNOWN_ROLES: [(&str, OrgKind); 12] = [
    ("Kommunstyrelsens ordförande", OrgKind::Municipality),
    ("Lokalpolisområdeschef", OrgKind::Police),
    ("Polisområdeschef", OrgKind::Police),
    ("Regionpolischef", OrgKind::Police),
    ("Kommunpolis", OrgKind::Police),
    ("Landshövding", OrgKind::CountyBoard),
    ("Länsråd", OrgKind::CountyBoard),
    ("Kommundirektör", OrgKind::Municipality),
    ("Kommunchef", OrgKind::Municipality),
    ("Stadsdirektör", OrgKind::Municipality),
    ("Kommunalråd", OrgKind::Municipality),
    ("Socialchef", OrgKind::Municipality),
];

/// The heading text of an ATX heading line, without markers and emphasis.
fn heading_text(line: &str) -> Option<String> {
    scan::heading(line).map(|(_, text)| text)
}

/// A place-and-date line ("Nyköping/ Eskilstuna 2023-10-18", "Katrineholm den 20
/// januari 2025"): one date, a short place before it, nothing but punctuation after.
fn place_and_date(line: &str) -> Option<(Option<String>, NaiveDate)> {
    let line = line.trim();
    if line.is_empty() || line.chars().count() > 100 || line.starts_with(['#', '|']) || scan::item_line(line).is_some()
    {
        return None;
    }
    let found = scan::dates(line);
    let [(range, date)] = found.as_slice() else { return None };
    let after = line[range.end..].trim();
    if !after.chars().all(|c| c.is_ascii_punctuation()) {
        return None;
    }
    let place = line[..range.start].trim().trim_end_matches([',', ' ']).trim();
    let place = place.strip_suffix(" den").unwrap_or(place).trim().trim_end_matches(',').trim();
    if place.contains(':') || place.chars().count() > 40 || place.split_whitespace().count() > 4 {
        return None;
    }
    Some(((!place.is_empty()).then(|| place.to_string()), *date))
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

/// Recognises the structured fields of a plain Markdown document. The body is
/// kept verbatim, except that the activities it lists (tables and lists under
/// "Våra löften", "Aktiviteter", "Åtgärder", …) become structured activities and
/// one marker line where the generated table goes (see `activities`).
fn recognise(body: &str, directory: &Directory, kind: Option<DocKind>) -> Result<Imported, MarkdownError> {
    let lines: Vec<&str> = body.lines().collect();
    let code = scan::lines(body);
    let (title_line, title) = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| !code.get(*i).is_some_and(|l| l.in_code))
        .find_map(|(i, l)| heading_text(l).map(|t| (i, t)))
        .ok_or(MarkdownError::NoTitle)?;
    let kind = kind.or_else(|| recognise_kind(&title)).ok_or(MarkdownError::UnknownKind)?;
    let mut recognised = vec![format!("title: {title}"), format!("kind: {}", kind.label())];

    // Parties: named in the title, else anywhere in the text.
    let mut mentions = directory.mentions(&title);
    if mentions.is_empty() {
        mentions = directory.mentions(body);
    }
    let explicit: Vec<OrgId> = mentions.iter().filter(|m| m.explicit).map(|m| m.target.org.clone()).collect();
    let mut refs: Vec<OrgRef> = mentions.into_iter().map(|m| m.target).collect();

    // Place and date: the last short line with a date that signatures follow (else the last one).
    let date_lines: Vec<(usize, (Option<String>, NaiveDate))> =
        (0..lines.len()).filter_map(|i| place_and_date(lines[i]).map(|pd| (i, pd))).collect();
    let signed_after = |i: usize| lines[i + 1..].iter().any(|l| role_in(l).is_some());
    let date_line = date_lines.iter().rev().find(|(i, _)| signed_after(*i)).or(date_lines.last()).cloned();
    let (place, date, signature_start) = match date_line {
        Some((i, (place, date))) => (place, Some(date), i + 1),
        None => (None, None, lines.len()),
    };
    if let Some(date) = date {
        recognised.push(format!("date: {date}{}", place.as_ref().map(|p| format!(" ({p})")).unwrap_or_default()));
    }

    let mut signatories = Vec::new();
    for (signatory, target) in recognise_signatories(&lines[signature_start..], &refs, directory) {
        match refs.iter_mut().find(|r| r.org == target.org) {
            Some(party) if party.unit.is_none() => party.unit = target.unit.clone(),
            Some(_) => {}
            None => refs.push(target.clone()),
        }
        recognised.push(format!(
            "signatory: {} ({}){}",
            signatory.role,
            directory.describe(&target),
            signatory.name.as_ref().map(|n| format!(", {n}")).unwrap_or_default()
        ));
        signatories.push(signatory);
    }
    infer_local_police_area(&mut refs, &explicit, directory, &mut recognised);
    let (parties, party_units) = parties_from_refs(&refs);
    recognised.push(format!("parties: {}", refs.iter().map(|r| directory.describe(r)).collect::<Vec<_>>().join(", ")));

    let period = recognise_period(&title, &lines, kind).unwrap_or(Period { start: date, end: None });
    if period.start != date || period.end.is_some() {
        let show = |d: Option<NaiveDate>| d.map(|d| d.to_string()).unwrap_or_else(|| "…".into());
        recognised.push(format!("period: {} – {}", show(period.start), show(period.end)));
    }

    let scope = default_scope(&title, &parties, directory);
    let ctx = PartyContext::new(directory, refs);
    let found = activities::recognise(body, Some(title_line), &ctx, activities::year_of(period.start, &title));
    recognised.extend(found.notes);
    let content = DocumentContent {
        kind,
        scope,
        title,
        parties,
        party_units,
        period,
        place,
        date,
        signatories,
        body: found.body,
        goals: Vec::new(),
        activities: found.activities,
        followups: Vec::new(),
        meetings: Vec::new(),
    };
    Ok(Imported { id: None, content, recognised })
}

/// The role a signature line names: the name before it ("Anna Svensson,
/// lokalpolisområdeschef") if any, the role, its kind, and the text after it.
fn role_in(line: &str) -> Option<(Option<&str>, &'static str, OrgKind, &str)> {
    let line = line.trim().trim_matches(['*', '_']).trim();
    let lower = line.to_lowercase();
    if lower.len() != line.len() {
        return None;
    }
    for (role, kind) in KNOWN_ROLES {
        let needle = role.to_lowercase();
        if lower.starts_with(&needle) {
            return Some((None, role, kind, &line[needle.len()..]));
        }
        if let Some(pos) = lower.find(&format!(", {needle}")) {
            let name = line[..pos].trim();
            let looks_like_name = !name.is_empty() && name.split_whitespace().count() <= 5;
            if looks_like_name {
                return Some((Some(name), role, kind, &line[pos + 2 + needle.len()..]));
            }
        }
    }
    None
}

/// Signature blocks after the place and date: each an optional name line, then a
/// role title and the organisation ("Landshövding Södermanlands län",
/// "Lokalpolisområdeschef, Lokalpolisområde Katrineholm"), possibly over several
/// lines; blocks split by thematic breaks or by the next name and role.
fn recognise_signatories(lines: &[&str], parties: &[OrgRef], directory: &Directory) -> Vec<(Signatory, OrgRef)> {
    struct Open {
        name: Option<String>,
        role: &'static str,
        kind: OrgKind,
        org_text: String,
    }
    let tokens: Vec<Option<&str>> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .map(|l| (!scan::is_thematic_break(l)).then_some(l))
        .collect();
    let mut out = Vec::new();
    let finish = |open: Option<Open>, out: &mut Vec<(Signatory, OrgRef)>| {
        if let Some(o) = open {
            if let Some(target) = signatory_org(&o.org_text, o.role, o.kind, parties, directory) {
                out.push((Signatory { org: target.org.clone(), role: o.role.to_string(), name: o.name }, target));
            }
        }
    };
    let mut pending_name: Option<String> = None;
    let mut open: Option<Open> = None;
    for (k, token) in tokens.iter().enumerate() {
        let Some(text) = token else {
            finish(open.take(), &mut out);
            pending_name = None;
            continue;
        };
        if let Some((name, role, kind, rest)) = role_in(text) {
            finish(open.take(), &mut out);
            let name = name.map(str::to_owned).or_else(|| pending_name.take());
            open = Some(Open { name, role, kind, org_text: rest.to_string() });
            continue;
        }
        let next_is_role = matches!(tokens.get(k + 1), Some(Some(t)) if role_in(t).is_some());
        let is_name = text.split_whitespace().count() <= 5 && !text.chars().any(|c| c.is_ascii_digit());
        match open.as_mut() {
            Some(_) if next_is_role && is_name => {
                finish(open.take(), &mut out);
                pending_name = Some(text.to_string());
            }
            Some(o) => {
                o.org_text.push(' ');
                o.org_text.push_str(text);
            }
            None if is_name => pending_name = Some(text.to_string()),
            None => pending_name = None,
        }
    }
    finish(open.take(), &mut out);
    out
}

/// The organisation (or unit) a signature's text names for a role of `kind`.
fn signatory_org(text: &str, role: &str, kind: OrgKind, parties: &[OrgRef], directory: &Directory) -> Option<OrgRef> {
    let kind_of = |r: &OrgRef| directory.get(&r.org).map(|o| o.kind);
    let mentions = directory.mentions(text);
    if let Some(m) = mentions.iter().find(|m| kind_of(&m.target) == Some(kind)) {
        // "Polisområdeschef Polisområde Södermanland": a party's own unit is kept.
        let party = parties.iter().find(|p| p.org == m.target.org && m.target.unit.is_none() && !m.explicit);
        return Some(party.cloned().unwrap_or_else(|| m.target.clone()));
    }
    let party = parties.iter().find(|p| kind_of(p) == Some(kind)).cloned();
    let police = party
        .clone()
        .map(|p| p.org)
        .or_else(|| directory.organisations().iter().find(|o| o.kind == OrgKind::Police).map(|o| o.id.clone()));
    if kind == OrgKind::Police && role == "Lokalpolisområdeschef" {
        // "Lokalpolisområdeschef Katrineholm": the lokalpolisområde of that municipality.
        if let (Some(police), Some(m)) =
            (&police, mentions.iter().find(|m| kind_of(&m.target) == Some(OrgKind::Municipality)))
        {
            if let Some(unit) = directory.covering_unit(police, &m.target.org, UnitKind::LocalPoliceArea) {
                return Some(OrgRef::unit(police.clone(), unit.name.clone()));
            }
        }
    }
    party.or_else(|| {
        // "Landshövding Södermanlands län": the only organisation of the role's kind.
        let mut of_kind = directory.organisations().iter().filter(|o| o.kind == kind);
        match (of_kind.next(), of_kind.next()) {
            (Some(only), None) => Some(OrgRef::org(only.id.clone())),
            _ => None,
        }
    })
}

/// A local document's police party named only as "polisen" or through its chief
/// acts through the lokalpolisområde covering its municipalities (when they all
/// share one); a police area named explicitly stays the whole area.
fn infer_local_police_area(refs: &mut [OrgRef], explicit: &[OrgId], directory: &Directory, notes: &mut Vec<String>) {
    let municipalities: Vec<OrgId> = refs
        .iter()
        .filter(|r| directory.get(&r.org).is_some_and(|o| o.kind == OrgKind::Municipality))
        .map(|r| r.org.clone())
        .collect();
    if municipalities.is_empty() {
        return;
    }
    for r in refs.iter_mut() {
        let police = directory.get(&r.org).is_some_and(|o| o.kind == OrgKind::Police);
        if !police || r.unit.is_some() || explicit.contains(&r.org) {
            continue;
        }
        let units: Vec<&str> = municipalities
            .iter()
            .filter_map(|m| directory.covering_unit(&r.org, m, UnitKind::LocalPoliceArea).map(|u| u.name.as_str()))
            .collect();
        if units.len() == municipalities.len() && units.windows(2).all(|w| w[0] == w[1]) {
            r.unit = Some(units[0].to_string());
            notes.push(format!(
                "police party: {} (the lokalpolisområde of {})",
                units[0],
                municipalities.iter().map(|m| directory.name_of(m)).collect::<Vec<_>>().join(", ")
            ));
        }
    }
}

/// The validity period a document states: a line about its validity ("Löftet
/// gäller 2025-01-01 – 2025-12-31", "gäller 2025–2027", "gäller till och med
/// 2026-12-31"), else a year or years in the title (a promise or plan for 2025
/// covers 2025; an agreement from a year starts then).
fn recognise_period(title: &str, lines: &[&str], kind: DocKind) -> Option<Period> {
    const WORDS: [&str; 6] = ["gäller", "giltig", "period", "löptid", "avser", "omfattar"];
    let full_years = |from: i32, to: i32| Period {
        start: NaiveDate::from_ymd_opt(from, 1, 1),
        end: NaiveDate::from_ymd_opt(to, 12, 31),
    };
    let year_range = |text: &str| -> Option<(i32, i32)> {
        let years = scan::years(text);
        for pair in years.windows(2) {
            let between = &text[pair[0].0 + 4..pair[1].0];
            if ["–", "-", "—", " – ", " - ", " till ", " t.o.m. "].contains(&between) && pair[1].1 >= pair[0].1 {
                return Some((pair[0].1, pair[1].1));
            }
        }
        None
    };
    for line in lines.iter().filter(|l| !l.trim_start().starts_with('|')) {
        let lower = line.to_lowercase();
        if !WORDS.iter().any(|w| lower.contains(w)) {
            continue;
        }
        let found = scan::dates(line);
        match found.as_slice() {
            [(_, a), (_, b), ..] if b >= a => return Some(Period { start: Some(*a), end: Some(*b) }),
            [(range, d)] => {
                let before = lower[..range.start.min(lower.len())].trim_end();
                if ["till och med", "t.o.m.", "till", "tom"].iter().any(|w| before.ends_with(w)) {
                    return Some(Period { start: None, end: Some(*d) });
                }
                if ["från och med", "fr.o.m.", "från", "fom"].iter().any(|w| before.ends_with(w)) {
                    return Some(Period { start: Some(*d), end: None });
                }
            }
            _ => {}
        }
        if let Some((from, to)) = year_range(line) {
            return Some(full_years(from, to));
        }
    }
    if let Some((from, to)) = year_range(title) {
        return Some(full_years(from, to));
    }
    let year = scan::years(title).first().map(|(_, y)| *y)?;
    match kind {
        DocKind::Agreement => Some(Period { start: NaiveDate::from_ymd_opt(year, 1, 1), end: None }),
        DocKind::CitizenPromise | DocKind::OperationsPlan => Some(full_years(year, year)),
    }
}

// ---- rendering -------------------------------------------------------------------------------

/// The document as people read it (`samverkan-node show`): a header with the
/// structured fields, the body, then goals, activities, follow-ups and meetings.
pub fn render(view: &DocumentView, directory: &Directory) -> String {
    let mut out = String::new();
    // A known unit with its organisation: "Lokalpolisområde Katrineholm (Polisområde Södermanland)".
    let party = |org: &OrgId| {
        let r = OrgRef { org: org.clone(), unit: view.party_units.get(org).cloned() };
        match &r.unit {
            Some(unit) if directory.is_known_unit(org, unit) => {
                format!("{} ({})", directory.describe(&r), directory.name_of(org))
            }
            _ => directory.describe(&r),
        }
    };
    out.push_str(&format!("{}\n", view.title));
    out.push_str(&format!("{} · {} · {}\n", view.kind.label(), view.scope.label(), view.id));
    if !view.parties.is_empty() {
        out.push_str(&format!("Parter: {}\n", view.parties.iter().map(party).collect::<Vec<_>>().join(", ")));
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
            directory.describe(&OrgRef { org: s.org.clone(), unit: view.party_units.get(&s.org).cloned() }),
            s.name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()
        ));
    }
    out.push('\n');
    let ctx = PartyContext::new(directory, view.party_refs());
    out.push_str(activities::expand_for_reading(&view.body, &view.activities, &ctx).trim_matches('\n'));
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
            if !a.owners.is_empty() {
                let owners: Vec<String> = a.owners.iter().map(|o| canonical_owner(directory, o)).collect();
                details.push(format!("ansvarig: {}", owners.join(", ")));
            }
            match &a.due {
                Some(Due::Date(d)) => details.push(format!("klart senast: {d}")),
                Some(due) => details.push(format!("klart: {}", due.label())),
                None => {}
            }
            if let Some(method) = &a.followup_method {
                details.push(format!("uppföljning: {method}"));
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
            owners: vec![crate::model::Owner::org(OrgId::new("lansstyrelsen-sodermanland").unwrap())],
            due: NaiveDate::from_ymd_opt(2024, 3, 31).map(Due::Date),
            followup_method: Some("Antal kommuner med lägesbild".into()),
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
