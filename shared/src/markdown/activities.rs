//! Activities in the body: recognised from the tables and lists a written
//! document has, and shown as a table generated from the structured activities.
//!
//! **The structured activities are the source of truth.** The body never holds
//! a copy of them: where a document had its activities (the table or lists under
//! "Våra löften", "Aktiviteter", "Åtgärder", …) the stored body holds one marker
//! line, `<!-- samverkan:aktiviteter | Aktivitet | Ansvarig | Klart | Uppföljning | -->`,
//! naming the table's columns. Export replaces the marker with the table generated
//! from the activities, between the marker and an end marker carrying a hash of
//! the generated table; import of an exported file turns that region back into
//! the marker line. So the body and the activities cannot drift apart, and the
//! body outside the region round-trips byte for byte.
//!
//! A person editing the exported file may change the table instead of the front
//! matter: the hash tells which side changed. A changed table with unchanged
//! front matter is read back into the activities (rows matched to activities in
//! order, or by their text when rows were added or removed); a table and front
//! matter both changed, differently, is refused rather than guessed.

use chrono::NaiveDate;
use sha2::{Digest, Sha256};

use super::scan::{self, Line};
use super::MarkdownError;
use crate::model::{Activity, ActivityStatus, Due, Owner, PartyContext};

/// Opening of the marker line that stands for the generated table.
const START: &str = "<!-- samverkan:aktiviteter";
/// Opening of the end marker after a generated table.
const END: &str = "<!-- /samverkan:aktiviteter";

/// A column of an activities table: which field of the activities it shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Column {
    /// Row numbers (regenerated 1, 2, …).
    Number,
    /// What is to be done.
    What,
    /// Who is responsible.
    Owners,
    /// When it is due.
    Due,
    /// How it is followed up.
    FollowUp,
    /// Where it stands.
    Status,
}

impl Column {
    fn default_name(self) -> &'static str {
        match self {
            Column::Number => "Nr",
            Column::What => "Aktivitet",
            Column::Owners => "Ansvarig",
            Column::Due => "Klart",
            Column::FollowUp => "Uppföljning",
            Column::Status => "Status",
        }
    }
}

/// Columns of a table generated for a marker without column names.
const DEFAULT_COLUMNS: [Column; 5] = [Column::What, Column::Owners, Column::Due, Column::FollowUp, Column::Status];

/// Field labels people write, lowercase, longest first where one contains another.
const LABELS: [(&str, Column); 31] = [
    ("hur följs det upp", Column::FollowUp),
    ("så följer vi upp", Column::FollowUp),
    ("uppföljningsmetod", Column::FollowUp),
    ("följs upp genom", Column::FollowUp),
    ("följs upp", Column::FollowUp),
    ("uppföljning", Column::FollowUp),
    ("indikator", Column::FollowUp),
    ("mätning", Column::FollowUp),
    ("huvudansvarig", Column::Owners),
    ("ansvariga", Column::Owners),
    ("ansvarig", Column::Owners),
    ("ansvarar", Column::Owners),
    ("ansvar", Column::Owners),
    ("utförare", Column::Owners),
    ("vem", Column::Owners),
    ("klart senast", Column::Due),
    ("klart", Column::Due),
    ("klar", Column::Due),
    ("tidplan", Column::Due),
    ("tidpunkt", Column::Due),
    ("deadline", Column::Due),
    ("senast", Column::Due),
    ("kvartal", Column::Due),
    ("datum", Column::Due),
    ("när", Column::Due),
    ("tid", Column::Due),
    ("status", Column::Status),
    ("aktivitet", Column::What),
    ("åtgärd", Column::What),
    ("insats", Column::What),
    ("beskrivning", Column::What),
];

/// Words of headings over activities ("Våra löften", "Aktiviteter", "Åtgärder", "Polisen lovar").
const ACTIVITY_WORDS: [&str; 17] = [
    "aktivitet",
    "aktiviteter",
    "aktiviteterna",
    "aktivitetsplan",
    "åtgärd",
    "åtgärder",
    "åtgärderna",
    "åtgärdsplan",
    "insats",
    "insatser",
    "insatserna",
    "löfte",
    "löften",
    "löftet",
    "löftena",
    "lovar",
    "handlingsplan",
];

/// First words of headings that are about something else ("Uppföljning av aktiviteterna").
const OTHER_WORDS: [&str; 10] = [
    "uppföljning",
    "uppföljningen",
    "genomförda",
    "genomfört",
    "bakgrund",
    "problembild",
    "problembilden",
    "lägesbild",
    "lägesbilden",
    "resultat",
];

/// The column a table header names.
fn column_of(header: &str) -> Option<Column> {
    let key = crate::org::normalise(header.trim_matches(['*', '_', ':', ' ']));
    if key.is_empty() || key == "nr" || key == "#" || key == "nummer" {
        return Some(Column::Number);
    }
    if ["vad", "vi lovar", "löfte", "löften", "aktivitet/åtgärd", "aktiviteter", "åtgärder", "insatser"]
        .contains(&key.as_str())
    {
        return Some(Column::What);
    }
    LABELS.iter().find(|(label, _)| key.starts_with(label)).map(|(_, c)| *c)
}

/// How a table's header maps to activity fields.
enum TableKind {
    /// Every column is one the activities keep.
    Activities(Vec<Column>),
    /// An activities table with columns the activities do not keep (their headers).
    WithUnknown(Vec<Option<Column>>, Vec<String>),
    /// Not an activities table.
    Other,
}

fn classify(headers: &[String]) -> TableKind {
    let mut columns: Vec<Option<Column>> = Vec::new();
    for h in headers {
        let c = column_of(h).filter(|c| !columns.contains(&Some(*c)));
        columns.push(c);
    }
    if !columns.contains(&Some(Column::What)) {
        // "| Insatsområde | Ansvar | Tid |": the first column is what is to be done.
        match columns.first() {
            Some(None) | Some(Some(Column::Number)) if headers.len() > 1 && columns[0].is_none() => {
                columns[0] = Some(Column::What)
            }
            _ => {}
        }
    }
    let has_what = columns.contains(&Some(Column::What));
    let has_detail = [Column::Owners, Column::Due, Column::FollowUp].iter().any(|c| columns.contains(&Some(*c)));
    if !has_what || !has_detail {
        return TableKind::Other;
    }
    let unknown: Vec<String> =
        headers.iter().zip(&columns).filter(|(_, c)| c.is_none()).map(|(h, _)| h.clone()).collect();
    if unknown.is_empty() {
        TableKind::Activities(columns.into_iter().flatten().collect())
    } else {
        TableKind::WithUnknown(columns, unknown)
    }
}

/// Column names and fields of a marker's column list (default columns when empty or unusable).
fn marker_columns(names: &[String]) -> Vec<(String, Column)> {
    match classify(names) {
        TableKind::Activities(columns) if !names.is_empty() => names.iter().cloned().zip(columns).collect(),
        _ => DEFAULT_COLUMNS.iter().map(|c| (c.default_name().to_string(), *c)).collect(),
    }
}

/// The column names of a marker line, or `None` if the line is not one.
fn parse_start(line: &str) -> Option<Vec<String>> {
    let inner = line.trim().strip_prefix(START)?.strip_suffix("-->")?;
    if !(inner.is_empty() || inner.starts_with([' ', '|'])) {
        return None;
    }
    Some(scan::cells(inner.trim()).into_iter().filter(|c| !c.is_empty()).collect())
}

/// The hash an end marker carries, or `None` if the line is not one.
fn parse_end(line: &str) -> Option<String> {
    let inner = line.trim().strip_prefix(END)?.strip_suffix("-->")?;
    Some(inner.trim().to_string())
}

fn start_line(columns: &[(String, Column)]) -> String {
    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    format!("{START} | {} | -->", names.join(" | "))
}

/// A short hash of a table's text, ignoring line endings, trailing spaces and blank lines.
fn table_hash(text: &str) -> String {
    let normal: Vec<&str> = text.lines().map(str::trim_end).filter(|l| !l.is_empty()).collect();
    let digest = Sha256::digest(normal.join("\n").as_bytes());
    hex::encode(&digest[..6])
}

/// The table of `activities` with these columns, each line ending in `eol`.
fn render_table(activities: &[Activity], columns: &[(String, Column)], ctx: &PartyContext<'_>, eol: &str) -> String {
    let row = |cells: Vec<String>| format!("| {} |{eol}", cells.join(" | "));
    let mut out = row(columns.iter().map(|(n, _)| scan::escape_cell(n)).collect());
    out.push_str(&row(columns.iter().map(|_| "---".to_string()).collect()));
    for (i, a) in activities.iter().enumerate() {
        let cells = columns
            .iter()
            .map(|(_, c)| match c {
                Column::Number => (i + 1).to_string(),
                Column::What => scan::escape_cell(a.what.trim()),
                Column::Owners => scan::escape_cell(&ctx.labels(&a.owners)),
                Column::Due => a.due.as_ref().map(|d| scan::escape_cell(&d.label())).unwrap_or_default(),
                Column::FollowUp => a.followup_method.as_deref().map(scan::escape_cell).unwrap_or_default(),
                Column::Status => a.status.label().to_string(),
            })
            .collect();
        out.push_str(&row(cells));
    }
    out
}

/// The body as exported: every marker line followed by the generated table and
/// the end marker.
pub(crate) fn expand(body: &str, activities: &[Activity], ctx: &PartyContext<'_>) -> String {
    expand_with(body, activities, ctx, true)
}

/// The body for reading (`show`): the generated table without the marker lines.
pub(crate) fn expand_for_reading(body: &str, activities: &[Activity], ctx: &PartyContext<'_>) -> String {
    expand_with(body, activities, ctx, false)
}

fn expand_with(body: &str, activities: &[Activity], ctx: &PartyContext<'_>, markers: bool) -> String {
    if !body.contains(START) {
        return body.to_string();
    }
    let lines = scan::lines(body);
    let mut out = String::with_capacity(body.len() + 256 * activities.len());
    let mut i = 0;
    while i < lines.len() {
        let line = &lines[i];
        let Some(names) = (!line.in_code).then(|| parse_start(line.text)).flatten() else {
            out.push_str(line.raw);
            i += 1;
            continue;
        };
        let eol = if line.ending().is_empty() { "\n" } else { line.ending() };
        let columns = marker_columns(&names);
        let table = render_table(activities, &columns, ctx, eol);
        // Whatever follows stays as it is, even an old region: import removes only
        // the region that follows a marker, so every body comes back as it was.
        let ending = line.ending();
        i += 1;
        if markers {
            out.push_str(line.text);
            out.push_str(eol);
            out.push_str(eol);
            out.push_str(&table);
            out.push_str(eol);
            out.push_str(&format!("{END} {} -->", table_hash(&table)));
            out.push_str(ending);
        } else {
            out.push_str(table.strip_suffix(eol).unwrap_or(&table));
            out.push_str(ending);
        }
    }
    out
}

/// The end marker line of the region opened at `start`, if it has one before the next marker.
fn region_end(lines: &[Line<'_>], start: usize) -> Option<usize> {
    for (j, line) in lines.iter().enumerate().skip(start + 1) {
        if line.in_code {
            continue;
        }
        if parse_end(line.text).is_some() {
            return Some(j);
        }
        if parse_start(line.text).is_some() {
            return None;
        }
    }
    None
}

/// The body as stored, from an exported body: each generated region becomes its
/// marker line again. A region edited by hand is read back into `activities`
/// (see the module docs); `year` reads quarters without a year.
pub(crate) fn collapse(
    body: &str,
    activities: &mut Vec<Activity>,
    ctx: &PartyContext<'_>,
    year: Option<i32>,
) -> Result<String, MarkdownError> {
    if !body.contains(START) {
        return Ok(body.to_string());
    }
    let lines = scan::lines(body);
    let mut out = String::with_capacity(body.len());
    let mut i = 0;
    while i < lines.len() {
        let line = &lines[i];
        let names = (!line.in_code).then(|| parse_start(line.text)).flatten();
        let Some(names) = names else {
            out.push_str(line.raw);
            i += 1;
            continue;
        };
        let Some(end) = region_end(&lines, i) else {
            // A marker without a table is one a person put in; one followed by a table
            // lost its end marker, and the table would stay behind as text.
            let next = (i + 1..lines.len()).find(|&k| !lines[k].is_blank());
            if next.is_some_and(|k| scan::table_at(&lines, k).is_some()) {
                return Err(MarkdownError::ActivitiesTable(format!(
                    "the activities table after line {} has lost its end marker ({END} … -->); put it back after the table",
                    i + 1
                )));
            }
            out.push_str(line.raw);
            i += 1;
            continue;
        };
        let region: String = lines[i + 1..end].iter().map(|l| l.raw).collect();
        let recorded = parse_end(lines[end].text).unwrap_or_default();
        let columns = marker_columns(&names);
        let mut edited_columns = None;
        if table_hash(&region) != recorded {
            let regenerated = render_table(activities, &columns, ctx, "\n");
            let same = table_hash(&regenerated) == table_hash(&region);
            if !same && table_hash(&regenerated) != recorded {
                return Err(MarkdownError::ActivitiesTable(format!(
                    "the activities table (lines {}–{}) and the activities in the front matter were both changed; \
                     change one of them (the table is generated from the front matter), or delete the table's rows to keep the front matter",
                    i + 1,
                    end + 1
                )));
            }
            if !same {
                edited_columns = apply_edited_table(&lines[i + 1..end], activities, ctx, year, i + 1)?;
            }
        }
        // The marker line as it was, unless an edited table renamed its columns.
        match edited_columns.filter(|c| *c != columns) {
            Some(c) => out.push_str(&start_line(&c)),
            None => out.push_str(line.text),
        }
        out.push_str(lines[end].ending());
        i = end + 1;
    }
    Ok(out)
}

/// Reads a hand-edited generated table into `activities`; returns its columns if
/// its header still maps to activity fields. No table left (rows and header
/// deleted) keeps the activities as they are.
fn apply_edited_table(
    region: &[Line<'_>],
    activities: &mut Vec<Activity>,
    ctx: &PartyContext<'_>,
    year: Option<i32>,
    first_line: usize,
) -> Result<Option<Vec<(String, Column)>>, MarkdownError> {
    let Some(start) = (0..region.len()).find(|&k| scan::table_at(region, k).is_some()) else {
        if region.iter().all(Line::is_blank) {
            return Ok(None);
        }
        return Err(MarkdownError::ActivitiesTable(format!(
            "the text between the activities markers (from line {}) is no longer a table; \
             put the table back, or remove everything between the markers",
            first_line + 1
        )));
    };
    let Some(table) = scan::table_at(region, start) else { return Ok(None) };
    let TableKind::Activities(columns) = classify(&table.header) else {
        return Err(MarkdownError::ActivitiesTable(format!(
            "the activities table (line {}) has a header that does not name activity fields \
             (Aktivitet, Ansvarig, Klart, Uppföljning, Status)",
            first_line + start + 1
        )));
    };
    let named: Vec<(String, Column)> = table.header.iter().map(|h| scan::unescape_cell(h)).zip(columns).collect();
    let rows: Vec<Activity> = table
        .rows
        .iter()
        .filter_map(|cells| activity_from_row(cells, &named, ctx, year, &Defaults::default()))
        .collect();
    let by_position = rows.len() == activities.len();
    let mut unused: Vec<Option<Activity>> = std::mem::take(activities).into_iter().map(Some).collect();
    for (k, row) in rows.into_iter().enumerate() {
        let matched = if by_position {
            unused[k].take()
        } else {
            let key = crate::org::normalise(&row.what);
            unused
                .iter_mut()
                .find(|a| a.as_ref().is_some_and(|a| crate::org::normalise(&a.what) == key))
                .and_then(Option::take)
        };
        let mut activity = matched.unwrap_or_else(|| Activity::new(row.what.clone()));
        for (_, column) in &named {
            match column {
                Column::Number => {}
                Column::What => activity.what = row.what.clone(),
                Column::Owners => activity.owners = row.owners.clone(),
                Column::Due => activity.due = row.due.clone(),
                Column::FollowUp => activity.followup_method = row.followup_method.clone(),
                Column::Status => activity.status = row.status,
            }
        }
        activities.push(activity);
    }
    Ok(Some(named))
}

/// What a heading or lead-in says about the activities under it.
#[derive(Debug, Clone, Default)]
struct Defaults {
    owners: Vec<Owner>,
    due: Option<Due>,
}

/// An activity from a table row; `None` for a row without a description.
fn activity_from_row(
    cells: &[String],
    columns: &[(String, Column)],
    ctx: &PartyContext<'_>,
    year: Option<i32>,
    defaults: &Defaults,
) -> Option<Activity> {
    let cell = |c: Column| {
        columns
            .iter()
            .position(|(_, col)| *col == c)
            .and_then(|k| cells.get(k))
            .map(|v| scan::unescape_cell(v).trim().to_string())
            .filter(|v| !v.is_empty() && v != "-" && v != "–")
    };
    let mut activity = Activity::new(cell(Column::What)?);
    activity.owners = cell(Column::Owners).map(|o| ctx.recognise_owners(&o)).unwrap_or_else(|| defaults.owners.clone());
    activity.due = cell(Column::Due).map(|d| lenient_due(&d, year)).or_else(|| defaults.due.clone());
    activity.followup_method = cell(Column::FollowUp);
    if let Some(status) = cell(Column::Status).and_then(|s| s.parse::<ActivityStatus>().ok()) {
        activity.status = status;
    }
    Some(activity)
}

/// A deadline as written: a date, a quarter or "löpande", else the words themselves.
fn lenient_due(text: &str, year: Option<i32>) -> Due {
    Due::parse_structured(text, year).unwrap_or_else(|| Due::Text(text.trim().to_string()))
}

/// Splits "Trygghetsvandringar (Ansvar: kommunen. Klart: löpande)" into the
/// description and its labelled fields.
fn split_labelled(text: &str) -> (String, Vec<(Column, String)>) {
    let lower = text.to_lowercase();
    if lower.len() != text.len() {
        return (text.trim().to_string(), Vec::new());
    }
    // (start of the label incl. emphasis, start of the value)
    let mut hits: Vec<(usize, usize, Column)> = Vec::new();
    let mut pos = 0;
    while pos < lower.len() {
        if !lower.is_char_boundary(pos) {
            pos += 1;
            continue;
        }
        let before = lower[..pos].chars().next_back();
        let boundary = before.is_none_or(|c| " (.,;–—-|*\t".contains(c));
        if boundary {
            let rest = &lower[pos..];
            let emphasis = rest.len() - rest.trim_start_matches(['*', '_']).len();
            let rest = &rest[emphasis..];
            let found = LABELS.iter().filter(|(_, c)| *c != Column::What).find_map(|(label, c)| {
                let after = rest.strip_prefix(label)?;
                let after_trim = after.trim_start_matches(['*', '_', ' ']);
                let colon = after_trim.strip_prefix(':')?;
                let value_start = lower.len() - colon.len();
                Some((*c, value_start))
            });
            if let Some((c, value_start)) = found {
                hits.push((pos, value_start, c));
                pos = value_start;
                continue;
            }
        }
        pos += 1;
    }
    if hits.is_empty() {
        return (text.trim().to_string(), Vec::new());
    }
    let separators: &[char] = &[' ', '(', '–', '—', '-', ',', ';', '.', '*', '_', '\t', ':'];
    let what = text[..hits[0].0].trim_end_matches(separators).trim().to_string();
    let mut fields = Vec::new();
    for (k, (_, value_start, column)) in hits.iter().enumerate() {
        let value_end = hits.get(k + 1).map_or(text.len(), |next| next.0);
        let mut value = text[*value_start..value_end].trim().trim_matches(['*', '_']).trim();
        value = value.trim_end_matches([',', ';', '–', '—', ' ', '(']).trim();
        if value.ends_with(')') && value.matches(')').count() > value.matches('(').count() {
            value = value[..value.len() - 1].trim();
        }
        let value = value.strip_suffix('.').unwrap_or(value).trim();
        if !value.is_empty() {
            fields.push((*column, value.to_string()));
        }
    }
    (what, fields)
}

/// Applies labelled fields to an activity.
fn apply_fields(activity: &mut Activity, fields: &[(Column, String)], ctx: &PartyContext<'_>, year: Option<i32>) {
    for (column, value) in fields {
        match column {
            Column::Owners => {
                for o in ctx.recognise_owners(value) {
                    if !activity.owners.contains(&o) {
                        activity.owners.push(o);
                    }
                }
            }
            Column::Due => activity.due = Some(lenient_due(value, year)),
            Column::FollowUp => activity.followup_method = Some(value.clone()),
            Column::Status => {
                if let Ok(s) = value.parse() {
                    activity.status = s;
                }
            }
            Column::What | Column::Number => {}
        }
    }
}

/// An activity from a list item: its text (without a task box, with labelled fields
/// taken out), labelled continuation lines and sub-items as fields, other
/// sub-items appended to the description.
fn activity_from_item(
    item: &scan::Item,
    ctx: &PartyContext<'_>,
    year: Option<i32>,
    defaults: &Defaults,
) -> (Option<Activity>, Vec<Column>) {
    let (text, done) = match item.text.get(..4) {
        Some("[x] " | "[X] ") => (&item.text[4..], Some(true)),
        Some("[ ] ") => (&item.text[4..], Some(false)),
        _ => (item.text.as_str(), None),
    };
    let (mut what, mut fields) = split_labelled(text);
    let mut details = Vec::new();
    for line in &item.continuation {
        match split_labelled(line) {
            (w, f) if w.is_empty() && !f.is_empty() => fields.extend(f),
            _ => what = format!("{what} {}", line.trim()).trim().to_string(),
        }
    }
    for child in &item.children {
        let full = std::iter::once(child.text.as_str())
            .chain(child.continuation.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        match split_labelled(&full) {
            (w, f) if w.is_empty() && !f.is_empty() => fields.extend(f),
            _ => details.push(full.trim().to_string()),
        }
    }
    if !details.is_empty() {
        let joined = details.join("; ");
        what = if what.ends_with(':') { format!("{what} {joined}") } else { format!("{what}: {joined}") };
    }
    let what = what.trim().trim_matches(['*', '_']).trim().to_string();
    let columns: Vec<Column> = fields.iter().map(|(c, _)| *c).collect();
    if what.is_empty() {
        return (None, columns);
    }
    let mut activity = Activity::new(what);
    apply_fields(&mut activity, &fields, ctx, year);
    if activity.owners.is_empty() {
        activity.owners = defaults.owners.clone();
    }
    if activity.due.is_none() {
        activity.due = defaults.due.clone();
    }
    if done == Some(true) {
        activity.status = ActivityStatus::Done;
    }
    (Some(activity), columns)
}

/// The lowercase words of a heading.
fn words(text: &str) -> Vec<String> {
    text.to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_owned).collect()
}

/// A heading over activities ("Våra löften", "3. Aktiviteter", "Polisen lovar").
fn is_activity_heading(text: &str) -> bool {
    let words = words(scan::without_numbering(text));
    !words.first().is_some_and(|w| OTHER_WORDS.contains(&w.as_str()))
        && words.iter().any(|w| ACTIVITY_WORDS.contains(&w.as_str()))
}

/// A heading inside an activities section that is about something else.
fn is_other_heading(text: &str) -> bool {
    words(scan::without_numbering(text)).first().is_some_and(|w| OTHER_WORDS.contains(&w.as_str()))
}

/// Owners a heading or lead-in gives the activities under it: "Polisen lovar",
/// "Kommunens åtgärder", "Gemensamma aktiviteter". Only organisations count.
fn owners_of_heading(text: &str, ctx: &PartyContext<'_>) -> Vec<Owner> {
    let text = text.trim().trim_matches(['*', '_', ':']).trim();
    let lower = text.to_lowercase();
    let cut = ACTIVITY_WORDS
        .iter()
        .filter_map(|w| {
            scan_word(&lower, w).or_else(|| {
                // "aktiviteter" inside "Gemensamma aktiviteter".
                lower.find(w)
            })
        })
        .min();
    let Some(cut) = cut.filter(|c| *c > 0 && lower.len() == text.len()) else { return Vec::new() };
    let subject = text[..cut].trim();
    let lowered = subject.to_lowercase();
    if ["vi", "våra", "vår", "det här", "detta", "planerade", "övriga"].contains(&lowered.as_str()) {
        return Vec::new();
    }
    let candidates = [subject.to_string(), subject.strip_suffix('s').unwrap_or(subject).to_string()];
    let gemensam = ["gemensamma", "gemensamt", "gemensam"].contains(&lowered.as_str());
    if gemensam {
        return ctx.parties().iter().cloned().map(Owner::Org).collect();
    }
    for candidate in candidates {
        let owners = ctx.recognise_owners(&candidate);
        let organisations = !owners.is_empty() && owners.iter().all(|o| matches!(o, Owner::Org(_)));
        if organisations {
            return owners;
        }
    }
    Vec::new()
}

/// Byte offset of `word` as a whole word in `text`.
fn scan_word(text: &str, word: &str) -> Option<usize> {
    text.match_indices(word).map(|(i, _)| i).find(|&i| {
        let before = text[..i].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
        let after = text[i + word.len()..].chars().next().is_none_or(|c| !c.is_alphanumeric());
        before && after
    })
}

/// The quarter a heading stands for ("Kvartal 1 (januari–mars)", "Q2", "Andra kvartalet").
fn quarter_of(text: &str, year: Option<i32>) -> Option<Due> {
    let text = scan::without_numbering(text);
    let text = crate::org::split_parenthesis(text).map_or(text, |(base, _)| base);
    let lower = text.trim().trim_end_matches(':').to_lowercase();
    let ordinals = [("första", 1), ("andra", 2), ("tredje", 3), ("fjärde", 4)];
    for (word, q) in ordinals {
        if lower.starts_with(word) && lower.contains("kvartal") {
            let year = scan::years(&lower).first().map(|(_, y)| *y).or(year)?;
            return Some(Due::Quarter { year, quarter: q });
        }
    }
    match Due::parse_structured(&lower, year) {
        Some(q @ Due::Quarter { .. }) => Some(q),
        _ => None,
    }
}

/// A paragraph line that introduces a list of activities ("Polisen lovar att:",
/// "**Aktiviteter:**"), with the owners it names.
fn lead_in(line: &str, ctx: &PartyContext<'_>) -> Option<Vec<Owner>> {
    let t = line.trim().trim_matches(['*', '_']).trim();
    let t = t.strip_suffix(':')?.trim_matches(['*', '_']).trim();
    if t.chars().count() > 80 || !(words(t).iter().any(|w| w == "lovar") || is_activity_heading(t)) {
        return None;
    }
    Some(owners_of_heading(t, ctx))
}

/// One place in the body where activities were written.
struct Structure {
    /// Lines it spans.
    lines: std::ops::Range<usize>,
    /// A table's columns (names as written) or the fields a list's items used.
    columns: Vec<(String, Column)>,
    /// A table with columns the activities do not keep: their names.
    unknown: Vec<String>,
    /// A heading or lead-in line whose only content this was (a quarter, "Polisen lovar").
    context_lines: Vec<usize>,
    activities: Vec<Activity>,
    /// Where, for telling the user.
    label: String,
}

/// What recognition made of a body's activities.
pub(crate) struct Recognised {
    /// The body to store: the activities' tables and lists replaced by one marker line.
    pub body: String,
    /// The activities, in document order.
    pub activities: Vec<Activity>,
    /// What was found and done, for the user.
    pub notes: Vec<String>,
}

/// Recognises the activities of a written document (see the module docs).
/// `title_line` is the title heading (never a section); `year` reads quarters.
pub(crate) fn recognise(
    body: &str,
    title_line: Option<usize>,
    ctx: &PartyContext<'_>,
    year: Option<i32>,
) -> Recognised {
    let lines = scan::lines(body);
    let mut structures: Vec<Structure> = Vec::new();
    let mut section: Option<(usize, String)> = None;
    let mut other: Option<usize> = None;
    let mut quarter: Option<(Due, usize, usize)> = None;
    // Owners a heading gives, the heading's line if it may go once empty (a
    // subheading; a heading that opens the section always stays), its level.
    let mut heading_owners: Option<(Vec<Owner>, Option<usize>, usize)> = None;
    let mut pending: Option<(Vec<Owner>, usize)> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = &lines[i];
        if line.in_code || line.is_blank() || Some(i) == title_line {
            i += 1;
            continue;
        }
        if let Some((level, text)) = scan::heading(line.text) {
            if section.as_ref().is_some_and(|(l, _)| *l >= level) {
                section = None;
            }
            if other.is_some_and(|l| l >= level) {
                other = None;
            }
            if quarter.as_ref().is_some_and(|(_, _, l)| *l >= level) {
                quarter = None;
            }
            if heading_owners.as_ref().is_some_and(|(_, _, l)| *l >= level) {
                heading_owners = None;
            }
            if is_activity_heading(&text) && other.is_none() {
                let opens = section.is_none();
                if opens {
                    section = Some((level, text.clone()));
                }
                let owners = owners_of_heading(scan::without_numbering(&text), ctx);
                if !owners.is_empty() {
                    heading_owners = Some((owners, (!opens).then_some(i), level));
                }
            } else if section.is_some() && is_other_heading(&text) {
                other = Some(level);
            }
            if section.is_some() && other.is_none() {
                if let Some(due) = quarter_of(&text, year) {
                    quarter = Some((due, i, level));
                }
            }
            pending = None;
            i += 1;
            continue;
        }
        let in_section = section.is_some() && other.is_none();
        let defaults = |pending: &Option<(Vec<Owner>, usize)>| Defaults {
            owners: pending
                .as_ref()
                .map(|(o, _)| o.clone())
                .filter(|o| !o.is_empty())
                .or_else(|| heading_owners.as_ref().map(|(o, _, _)| o.clone()))
                .unwrap_or_default(),
            due: quarter.as_ref().map(|(d, _, _)| d.clone()),
        };
        let context_lines = |pending: &Option<(Vec<Owner>, usize)>| {
            let mut c: Vec<usize> = Vec::new();
            if let Some((_, line)) = pending {
                c.push(*line);
            }
            if let Some((_, line, _)) = quarter {
                c.push(line);
            }
            if let Some((_, Some(line), _)) = heading_owners {
                c.push(line);
            }
            c
        };
        if parse_start(line.text).is_some() {
            // An exported body without its front matter: the generated table is read back.
            if let Some(s) = region_structure(&lines, i, ctx, year) {
                i = s.lines.end;
                structures.push(s);
            } else {
                i += 1;
            }
            pending = None;
            continue;
        }
        if let Some(table) = scan::table_at(&lines, i) {
            let (columns, unknown) = match classify(&table.header) {
                TableKind::Activities(columns) => (columns.into_iter().map(Some).collect(), Vec::new()),
                TableKind::WithUnknown(columns, unknown) => (columns, unknown),
                TableKind::Other => {
                    i = table.end;
                    pending = None;
                    continue;
                }
            };
            let named: Vec<(String, Column)> =
                table.header.iter().zip(&columns).filter_map(|(h, c)| c.map(|c| (scan::unescape_cell(h), c))).collect();
            // Rows read with unknown columns left out of the cells.
            let keep: Vec<usize> = columns.iter().enumerate().filter(|(_, c)| c.is_some()).map(|(k, _)| k).collect();
            let d = defaults(&pending);
            let activities = table
                .rows
                .iter()
                .filter_map(|row| {
                    let cells: Vec<String> = keep.iter().map(|k| row.get(*k).cloned().unwrap_or_default()).collect();
                    activity_from_row(&cells, &named, ctx, year, &d)
                })
                .collect();
            structures.push(Structure {
                lines: table.start..table.end,
                columns: named,
                unknown,
                context_lines: context_lines(&pending),
                activities,
                label: format!("the table on line {}", table.start + 1),
            });
            pending = None;
            i = table.end;
            continue;
        }
        if scan::item_line(line.text).is_some() {
            if let Some(list) = scan::list_at(&lines, i) {
                if in_section || pending.is_some() {
                    let d = defaults(&pending);
                    let mut activities = Vec::new();
                    let mut used: Vec<Column> = vec![Column::What];
                    for item in &list.items {
                        let (activity, fields) = activity_from_item(item, ctx, year, &d);
                        used.extend(fields);
                        activities.extend(activity);
                    }
                    if !d.owners.is_empty() {
                        used.push(Column::Owners);
                    }
                    if d.due.is_some() {
                        used.push(Column::Due);
                    }
                    let columns = DEFAULT_COLUMNS
                        .iter()
                        .filter(|c| used.contains(c))
                        .map(|c| (c.default_name().to_string(), *c))
                        .collect();
                    structures.push(Structure {
                        lines: list.start..list.end,
                        columns,
                        unknown: Vec::new(),
                        context_lines: context_lines(&pending),
                        activities,
                        label: format!("the list on line {}", list.start + 1),
                    });
                }
                pending = None;
                i = list.end;
                continue;
            }
        }
        pending = lead_in(line.text, ctx).map(|owners| (owners, i));
        i += 1;
    }
    finish(body, &lines, structures)
}

/// A generated region (marker, table, end marker) in a plain text, as one structure.
fn region_structure(lines: &[Line<'_>], start: usize, ctx: &PartyContext<'_>, year: Option<i32>) -> Option<Structure> {
    let end = region_end(lines, start)?;
    let region = &lines[start + 1..end];
    let table = (0..region.len()).find_map(|k| scan::table_at(region, k))?;
    let TableKind::Activities(columns) = classify(&table.header) else { return None };
    let named: Vec<(String, Column)> = table.header.iter().map(|h| scan::unescape_cell(h)).zip(columns).collect();
    let activities =
        table.rows.iter().filter_map(|row| activity_from_row(row, &named, ctx, year, &Defaults::default())).collect();
    Some(Structure {
        lines: start..end + 1,
        columns: named,
        unknown: Vec::new(),
        context_lines: Vec::new(),
        activities,
        label: format!("the generated table on line {}", start + 1),
    })
}

/// Replaces the recognised structures by one marker line (see [`recognise`]).
fn finish(body: &str, lines: &[Line<'_>], structures: Vec<Structure>) -> Recognised {
    let activities: Vec<Activity> = structures.iter().flat_map(|s| s.activities.iter().cloned()).collect();
    let mut notes = Vec::new();
    if structures.is_empty() || activities.is_empty() {
        return Recognised { body: body.to_string(), activities, notes };
    }
    let places: Vec<&str> = structures.iter().map(|s| s.label.as_str()).collect();
    notes.push(format!("activities: {} (from {})", activities.len(), places.join(", ")));
    if let Some(s) = structures.iter().find(|s| !s.unknown.is_empty()) {
        notes.push(format!(
            "{} has columns the activities do not keep ({}): the table stays as written, so later changes to the activities do not show in it",
            s.label,
            s.unknown.join(", ")
        ));
        return Recognised { body: body.to_string(), activities, notes };
    }
    // The generated table's columns: the first table's, then any field others used.
    let mut columns: Vec<(String, Column)> = structures[0].columns.clone();
    for s in &structures[1..] {
        for (_, c) in &s.columns {
            if !columns.iter().any(|(_, have)| have == c) {
                columns.push((c.default_name().to_string(), *c));
            }
        }
    }
    let mut removed = vec![false; lines.len()];
    for s in &structures {
        removed[s.lines.clone()].iter_mut().for_each(|r| *r = true);
    }
    // A quarter heading, "Polisen lovar" heading or lead-in whose section held only
    // activities goes too: what it said is in the activities now.
    let is_heading = |k: usize| !lines[k].in_code && scan::heading(lines[k].text).is_some();
    let mut changed = true;
    while changed {
        changed = false;
        for &c in structures.iter().flat_map(|s| s.context_lines.iter()) {
            if removed[c] {
                continue;
            }
            // A heading's section runs to the next heading of its level or above; a
            // lead-in's to the next heading.
            let level = scan::heading(lines[c].text).map(|(l, _)| l);
            let end = (c + 1..lines.len())
                .find(|&k| {
                    is_heading(k) && scan::heading(lines[k].text).is_some_and(|(l, _)| level.is_none_or(|lv| l <= lv))
                })
                .unwrap_or(lines.len());
            let only_activities =
                (c + 1..end).all(|k| removed[k] || lines[k].is_blank() || (level.is_some() && is_heading(k)));
            let nested_headings_gone = (c + 1..end).filter(|&k| is_heading(k)).all(|k| removed[k]);
            if only_activities && nested_headings_gone {
                removed[c] = true;
                changed = true;
            }
        }
    }
    let first = structures[0].lines.clone();
    let mut out = String::with_capacity(body.len());
    let mut after_removal = false;
    let mut k = 0;
    while k < lines.len() {
        if k == first.start {
            out.push_str(&start_line(&columns));
            out.push_str(lines[first.end - 1].ending());
            k = first.end;
            after_removal = false;
            continue;
        }
        if removed[k] {
            after_removal = true;
            k += 1;
            continue;
        }
        if after_removal && lines[k].is_blank() && (out.is_empty() || out.ends_with("\n\n") || out.ends_with("\n\r\n"))
        {
            k += 1;
            continue;
        }
        after_removal = false;
        out.push_str(lines[k].raw);
        k += 1;
    }
    notes.push("the activities table in the text is now generated from the activities".to_string());
    Recognised { body: out, activities, notes }
}

/// The year quarters without one belong to: the period's, else the first year in the title.
pub(crate) fn year_of(start: Option<NaiveDate>, title: &str) -> Option<i32> {
    use chrono::Datelike;
    start.map(|d| d.year()).or_else(|| scan::years(title).first().map(|(_, y)| *y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::org::{Directory, OrgId, OrgRef};

    fn id(s: &str) -> OrgId {
        OrgId::new(s).unwrap()
    }

    fn ctx(dir: &Directory) -> PartyContext<'_> {
        PartyContext::new(
            dir,
            vec![
                OrgRef::org(id("flen-kommun")),
                OrgRef::unit(id("polisomrade-sodermanland"), "Lokalpolisområde Katrineholm"),
            ],
        )
    }

    #[test]
    fn labelled_fields_are_split_from_the_description() {
        let (what, fields) =
            split_labelled("Trygghetsvandringar i centrum (Ansvar: Kommunen och polisen. Klart: löpande)");
        assert_eq!(what, "Trygghetsvandringar i centrum");
        assert_eq!(fields, [(Column::Owners, "Kommunen och polisen".into()), (Column::Due, "löpande".into())]);
        let (what, fields) = split_labelled("**Ansvarig:** Polisen");
        assert_eq!((what.as_str(), fields), ("", vec![(Column::Owners, "Polisen".to_string())]));
        let (what, fields) = split_labelled("Tid för dialog med handlare");
        assert_eq!((what.as_str(), fields.len()), ("Tid för dialog med handlare", 0));
    }

    #[test]
    fn a_table_under_a_promise_heading_becomes_activities_and_a_marker() {
        let dir = Directory::sodermanland();
        let ctx = ctx(&dir);
        let body = "# Medborgarlöfte\n\n## Våra löften\n\n| Aktivitet | Ansvar | Tidplan |\n|---|---|---|\n| Vandringar | Kommunen och polisen | Löpande |\n| Belysning | Kommunen (tekniska förvaltningen) | 2025-09-30 |\n\n## Uppföljning\n\n- Vi följer upp kvartalsvis\n";
        let r = recognise(body, Some(0), &ctx, Some(2025));
        assert_eq!(r.activities.len(), 2, "{:?}", r.notes);
        assert_eq!(r.activities[0].owners.len(), 2);
        assert_eq!(r.activities[0].due, Some(Due::Ongoing));
        assert_eq!(
            r.body,
            "# Medborgarlöfte\n\n## Våra löften\n\n<!-- samverkan:aktiviteter | Aktivitet | Ansvar | Tidplan | -->\n\n## Uppföljning\n\n- Vi följer upp kvartalsvis\n"
        );
        let exported = expand(&r.body, &r.activities, &ctx);
        assert!(exported.contains("| Vandringar | Kommunen och polisen | Löpande |\n"), "{exported}");
        assert!(exported.contains("| Belysning | Kommunen (tekniska förvaltningen) | 2025-09-30 |\n"), "{exported}");
        let mut back = r.activities.clone();
        assert_eq!(collapse(&exported, &mut back, &ctx, Some(2025)).unwrap(), r.body);
        assert_eq!(back, r.activities);
    }

    #[test]
    fn an_edited_table_is_read_back_and_a_double_edit_is_refused() {
        let dir = Directory::sodermanland();
        let ctx = ctx(&dir);
        let mut activities = vec![Activity::new("Vandringar"), Activity::new("Belysning")];
        activities[1].due = Some(Due::Date(NaiveDate::from_ymd_opt(2025, 9, 30).unwrap()));
        let stored = "## Löften\n\n<!-- samverkan:aktiviteter | Aktivitet | Klart | -->\n";
        let exported = expand(stored, &activities, &ctx);
        let edited = exported.replace("| Belysning | 2025-09-30 |", "| Belysning | 2025-10-31 |");
        let mut back = activities.clone();
        assert_eq!(collapse(&edited, &mut back, &ctx, None).unwrap(), stored);
        assert_eq!(back[1].id, activities[1].id, "matched by position");
        assert_eq!(back[1].due, Some(Due::Date(NaiveDate::from_ymd_opt(2025, 10, 31).unwrap())));
        let mut changed = activities.clone();
        changed[0].what = "Nattvandringar".into();
        let err = collapse(&edited, &mut changed, &ctx, None).unwrap_err();
        assert!(err.to_string().contains("both changed"), "{err}");
        // Front matter changed, table untouched: the front matter wins silently.
        let mut fm = activities.clone();
        fm[0].what = "Nattvandringar".into();
        assert_eq!(collapse(&exported, &mut fm, &ctx, None).unwrap(), stored);
        assert_eq!(fm[0].what, "Nattvandringar");
    }

    #[test]
    fn lists_with_nested_fields_quarters_and_lead_ins_are_read() {
        let dir = Directory::sodermanland();
        let ctx = ctx(&dir);
        let body = "# Plan\n\n## Aktiviteter\n\n### Kvartal 1\n\n1. Nätverksmöte\n   - Ansvarig: Länsstyrelsen\n   - Uppföljning: Minnesanteckningar\n\n### Kvartal 2\n\n- Seminarium (ansvar: polisen)\n\nPolisen lovar att:\n\n- [x] Synas i centrum\n\n## Uppföljning\n\nSlut.\n";
        let r = recognise(body, Some(0), &ctx, Some(2025));
        let whats: Vec<&str> = r.activities.iter().map(|a| a.what.as_str()).collect();
        assert_eq!(whats, ["Nätverksmöte", "Seminarium", "Synas i centrum"]);
        assert_eq!(r.activities[0].due, Some(Due::Quarter { year: 2025, quarter: 1 }));
        assert_eq!(r.activities[1].due, Some(Due::Quarter { year: 2025, quarter: 2 }));
        assert_eq!(r.activities[0].followup_method.as_deref(), Some("Minnesanteckningar"));
        assert_eq!(r.activities[2].status, ActivityStatus::Done);
        assert_eq!(r.activities[2].owners, [Owner::Org(ctx.parties()[1].clone())]);
        assert_eq!(
            r.body,
            "# Plan\n\n## Aktiviteter\n\n<!-- samverkan:aktiviteter | Aktivitet | Ansvarig | Klart | Uppföljning | -->\n\n## Uppföljning\n\nSlut.\n"
        );
    }
}
