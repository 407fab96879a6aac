//! What a change did, in words: the difference between two typed views of a
//! document ("Titel: 'X' → 'Y'", "Brödtext, stycke 3: '…' → '…'",
//! "Aktivitet 'Trygghetsvandring': förfallodag 2026-05-01 → 2026-06-01",
//! "Parter: + Polisområde Södermanland").
//!
//! The comparison walks the views' JSON form, so every field of
//! [`DocumentView`] is described without being named here: lists of items
//! with an `id` are matched by id, lists of plain values as sets, other lists
//! by position, long text by paragraph. Names below only make the words
//! Swedish and the order readable; a field they do not know is described
//! under its own name. Pure, no I/O.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde_json::Value;
use similar::{capture_diff_slices, Algorithm, DiffOp};

use super::paragraphs;
use super::{ActivityStatus, DocumentView, MeetingBody, Scope};
use crate::org::{Directory, OrgId};

/// One thing a change did to one field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    /// The field's path, as `samverkan-node set` names it where it can
    /// (`title`, `body`, `parties`, `period.end`, `activities.<id>.due`).
    pub field: String,
    /// The paragraph (from 1) of a long text, where one changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paragraph: Option<usize>,
    /// The value before (an excerpt around the change, for long text); `None` when added.
    pub from: Option<String>,
    /// The value after; `None` when removed.
    pub to: Option<String>,
    /// The whole description, as printed.
    pub text: String,
}

impl fmt::Display for FieldChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Root fields in the order people read a document; others follow by name.
const ROOT_ORDER: &[&str] = &[
    "kind",
    "title",
    "scope",
    "parties",
    "period",
    "place",
    "date",
    "signatories",
    "body",
    "goals",
    "activities",
    "followups",
    "meetings",
];

/// Item fields that name an item, in order of preference.
const NAME_FIELDS: &[&str] = &["what", "text", "notes", "role", "date"];

/// Item fields in the order people read them; others follow by name.
const ITEM_ORDER: &[&str] =
    &["what", "text", "notes", "org", "role", "name", "date", "body", "author", "owner", "owners", "due", "status"];

/// Fields whose values are free text (quoted, compared by paragraph).
const TEXT_FIELDS: &[&str] = &["title", "body", "what", "text", "notes", "role", "name", "place", "author"];

fn root_label(key: &str) -> String {
    match key {
        "kind" => "Typ",
        "title" => "Titel",
        "scope" => "Omfattning",
        "parties" => "Parter",
        "period" => "Giltighet",
        "place" => "Ort",
        "date" => "Datum",
        "signatories" => "Undertecknare",
        "body" => "Brödtext",
        "goals" => "Mål",
        "activities" => "Aktivitet",
        "followups" => "Uppföljning",
        "meetings" => "Möte",
        other => return other.replace('_', " "),
    }
    .to_string()
}

fn field_label(parent: &str, key: &str) -> String {
    match (parent, key) {
        ("period", "start") => "Giltig från",
        ("period", "end") => "Giltig till",
        ("meetings", "body") => "organ",
        (_, "what") => "beskrivning",
        (_, "owner") => "ansvarig",
        (_, "owners") => "ansvariga",
        (_, "due") => "förfallodag",
        (_, "status") => "status",
        (_, "text") => "text",
        (_, "date") => "datum",
        (_, "author") => "författare",
        (_, "activity") => "aktivitet",
        (_, "notes") => "anteckningar",
        (_, "org") => "organisation",
        (_, "role") => "roll",
        (_, "name") => "namn",
        (_, "followup" | "follow_up" | "followup_method" | "follow_up_method") => "uppföljning",
        (_, other) => return other.replace('_', " "),
    }
    .to_string()
}

/// Describes what changed from `before` to `after`. Without `before` the
/// change created the document; without `after` it could not be read.
pub fn describe(
    before: Option<&DocumentView>,
    after: Option<&DocumentView>,
    directory: &Directory,
) -> Vec<FieldChange> {
    let (Some(before), Some(after)) = (before, after) else {
        return match after {
            Some(view) => vec![FieldChange {
                field: "document".into(),
                paragraph: None,
                from: None,
                to: Some(view.title.clone()),
                text: format!("skapade {} '{}'", view.kind.label(), view.title),
            }],
            None => Vec::new(),
        };
    };
    let b = serde_json::to_value(before).unwrap_or(Value::Null);
    let a = serde_json::to_value(after).unwrap_or(Value::Null);
    let names = ItemNames::of(&[&b, &a]);
    let describer = Describer { directory, names };
    let mut out = Vec::new();
    let empty = serde_json::Map::new();
    let (bm, am) = (b.as_object().unwrap_or(&empty), a.as_object().unwrap_or(&empty));
    for key in ordered_keys(bm, am, ROOT_ORDER) {
        if key == "id" {
            continue;
        }
        let label = root_label(&key);
        describer.value(&key, &key, &Label::Root(label), bm.get(&key), am.get(&key), &mut out);
    }
    out
}

/// Conflicts a change settled: fields with several values before it and one
/// after ("Aktivitet 'X': förfallodag: konflikt 2026-06-01 / 2026-09-01 löst → 2026-09-01").
/// A change that settles a conflict by writing the value already shown
/// changes no view, so this is how its description says what it did.
pub fn describe_settled(
    before: &[super::Conflict],
    after: &[super::Conflict],
    view: &DocumentView,
    directory: &Directory,
) -> Vec<FieldChange> {
    let json = serde_json::to_value(view).unwrap_or(Value::Null);
    let describer = Describer { directory, names: ItemNames::of(&[&json]) };
    before
        .iter()
        .filter(|c| !after.iter().any(|a| a.path == c.path))
        .map(|c| {
            let key = c.path.rsplit('.').next().unwrap_or(&c.path);
            let shown = |v: &str| describer.display(key, &Value::String(v.to_string()), false);
            let values: Vec<String> = c.values.iter().map(|v| shown(&v.value)).collect();
            let now =
                value_at(&json, &c.path).map(|v| describer.display(key, v, false)).unwrap_or_else(|| "(ingen)".into());
            FieldChange {
                field: c.path.clone(),
                paragraph: None,
                from: Some(values.join(" / ")),
                to: Some(now.clone()),
                text: format!("{}: konflikt {} löst → {now}", field_name(&c.path, Some(view)), values.join(" / ")),
            }
        })
        .collect()
}

/// The value at a field path (`period.end`, `activities.<id>.due`, `signatories.<n>.role`) of a view's JSON.
fn value_at<'a>(json: &'a Value, path: &str) -> Option<&'a Value> {
    let mut at = json;
    for part in path.split('.') {
        at = match at {
            Value::Object(map) => map.get(part)?,
            Value::Array(items) => match items.iter().find(|i| i.get("id").and_then(Value::as_str) == Some(part)) {
                Some(item) => item,
                None => items.get(part.parse::<usize>().ok()?.checked_sub(1)?)?,
            },
            _ => return None,
        };
    }
    Some(at)
}

/// What descriptions call the field at `path` ("Brödtext", "Titel",
/// "Aktivitet 'Trygghetsvandring': beskrivning"); items are named from `view`.
pub fn field_name(path: &str, view: Option<&DocumentView>) -> String {
    let parts: Vec<&str> = path.splitn(3, '.').collect();
    match parts.as_slice() {
        [root] => root_label(root),
        [root, key] => field_label(root, key),
        [list, id, field] => {
            let value = view.and_then(|v| serde_json::to_value(v).ok());
            let name = value
                .as_ref()
                .and_then(|v| v.get(*list))
                .and_then(Value::as_array)
                .and_then(|items| items.iter().find(|i| i.get("id").and_then(Value::as_str) == Some(*id)))
                .and_then(Value::as_object)
                .and_then(item_name)
                .map(|n| format!("'{n}'"))
                .unwrap_or_else(|| id.chars().take(8).collect());
            format!("{} {name}: {}", root_label(list), field_label(list, field))
        }
        _ => path.to_string(),
    }
}

/// How a field is introduced in a description.
enum Label {
    /// A document field: "Titel: 'X' → 'Y'".
    Root(String),
    /// A field of an item: "Aktivitet 'X': förfallodag A → B".
    Item { item: String, field: String },
}

impl Label {
    fn with_paragraph(&self, paragraph: usize, added: bool) -> String {
        let what = if added { format!("nytt stycke {paragraph}") } else { format!("stycke {paragraph}") };
        match self {
            Label::Root(l) => format!("{l}, {what}"),
            Label::Item { item, field } => format!("{item}: {field}, {what}"),
        }
    }

    fn change(&self, from: &str, to: &str) -> String {
        match self {
            Label::Root(l) => format!("{l}: {from} → {to}"),
            Label::Item { item, field } => format!("{item}: {field} {from} → {to}"),
        }
    }

    fn plus_minus(&self, sign: char, value: &str) -> String {
        match self {
            Label::Root(l) => format!("{l}: {sign} {value}"),
            Label::Item { item, field } => format!("{item}: {field} {sign} {value}"),
        }
    }
}

/// The names of list items by id, for "Aktivitet 'Trygghetsvandring'" and for
/// fields that refer to an item (a follow-up's activity).
struct ItemNames(BTreeMap<String, String>);

impl ItemNames {
    fn of(views: &[&Value]) -> Self {
        let mut names = BTreeMap::new();
        for view in views {
            let Some(map) = view.as_object() else { continue };
            for list in map.values().filter_map(Value::as_array) {
                for item in list.iter().filter_map(Value::as_object) {
                    let Some(id) = item.get("id").and_then(Value::as_str) else { continue };
                    if let Some(name) = item_name(item) {
                        names.insert(id.to_string(), name);
                    }
                }
            }
        }
        Self(names)
    }
}

fn item_name(item: &serde_json::Map<String, Value>) -> Option<String> {
    NAME_FIELDS.iter().find_map(|k| item.get(*k).and_then(Value::as_str).filter(|s| !s.trim().is_empty())).map(short)
}

/// A short, one-line form of a text.
fn short(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= 50 {
        return line;
    }
    let cut: String = line.chars().take(47).collect();
    let cut = cut.rsplit_once(' ').map_or(cut.as_str(), |(head, _)| head).to_string();
    format!("{cut}…")
}

fn ordered_keys(
    a: &serde_json::Map<String, Value>,
    b: &serde_json::Map<String, Value>,
    preferred: &[&str],
) -> Vec<String> {
    let mut keys: Vec<String> =
        preferred.iter().map(|k| k.to_string()).filter(|k| a.contains_key(k) || b.contains_key(k)).collect();
    let mut rest: Vec<&String> = a.keys().chain(b.keys()).filter(|k| !preferred.contains(&k.as_str())).collect();
    rest.sort();
    rest.dedup();
    keys.extend(rest.into_iter().cloned());
    keys
}

struct Describer<'a> {
    directory: &'a Directory,
    names: ItemNames,
}

impl Describer<'_> {
    /// Describes one field at `path` (root key `root`).
    fn value(
        &self,
        root: &str,
        path: &str,
        label: &Label,
        before: Option<&Value>,
        after: Option<&Value>,
        out: &mut Vec<FieldChange>,
    ) {
        let null = Value::Null;
        let (b, a) = (before.unwrap_or(&null), after.unwrap_or(&null));
        if b == a {
            return;
        }
        match (b, a) {
            (Value::Object(bm), Value::Object(am)) => {
                for key in ordered_keys(bm, am, &[]) {
                    let sub = Label::Root(match label {
                        Label::Root(_) => field_label(root, &key),
                        Label::Item { item, .. } => format!("{item}: {}", field_label(root, &key)),
                    });
                    self.value(root, &format!("{path}.{key}"), &sub, bm.get(&key), am.get(&key), out);
                }
            }
            (Value::Array(_), _) | (_, Value::Array(_)) => {
                let empty = Vec::new();
                let (bl, al) = (b.as_array().unwrap_or(&empty), a.as_array().unwrap_or(&empty));
                let keyed = bl.iter().chain(al).all(|v| v.get("id").and_then(Value::as_str).is_some());
                let plain = bl.iter().chain(al).all(|v| !v.is_object() && !v.is_array());
                if keyed && !(bl.is_empty() && al.is_empty()) {
                    self.items(root, path, bl, al, out);
                } else if plain {
                    self.set(path, label, bl, al, out);
                } else {
                    self.positional(root, path, bl, al, out);
                }
            }
            _ => self.scalar(root, path, label, b, a, out),
        }
    }

    /// Items matched by id: added, removed, or changed field by field.
    fn items(&self, root: &str, path: &str, before: &[Value], after: &[Value], out: &mut Vec<FieldChange>) {
        let id_of = |v: &Value| v.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
        let list = root_label(root);
        for item in after {
            let id = id_of(item);
            let name = self.item_title(&id, item);
            match before.iter().find(|b| id_of(b) == id) {
                None => out.push(FieldChange {
                    field: format!("{path}.{id}"),
                    paragraph: None,
                    from: None,
                    to: Some(name.clone()),
                    text: format!("{list} tillagd: {name}{}", self.details(root, item)),
                }),
                Some(old) => {
                    let empty = serde_json::Map::new();
                    let (om, nm) = (old.as_object().unwrap_or(&empty), item.as_object().unwrap_or(&empty));
                    for key in ordered_keys(om, nm, ITEM_ORDER) {
                        if key == "id" {
                            continue;
                        }
                        let label = Label::Item { item: format!("{list} {name}"), field: field_label(root, &key) };
                        self.value(root, &format!("{path}.{id}.{key}"), &label, om.get(&key), nm.get(&key), out);
                    }
                }
            }
        }
        for item in before {
            let id = id_of(item);
            if !after.iter().any(|a| id_of(a) == id) {
                let name = self.item_title(&id, item);
                out.push(FieldChange {
                    field: format!("{path}.{id}"),
                    paragraph: None,
                    from: Some(name.clone()),
                    to: None,
                    text: format!("{list} borttagen: {name}"),
                });
            }
        }
    }

    /// "'Trygghetsvandring'" or, without a name, the item's short id.
    fn item_title(&self, id: &str, item: &Value) -> String {
        match item.as_object().and_then(item_name) {
            Some(name) => format!("'{name}'"),
            None => id.chars().take(8).collect(),
        }
    }

    /// " (ansvariga: Flens kommun, förfallodag: 2025-05-31)" for a new item.
    fn details(&self, root: &str, item: &Value) -> String {
        let Some(map) = item.as_object() else { return String::new() };
        let name_key =
            NAME_FIELDS.iter().find(|k| map.get(**k).and_then(Value::as_str).is_some_and(|s| !s.trim().is_empty()));
        let mut parts = Vec::new();
        for key in ordered_keys(map, map, ITEM_ORDER) {
            if key == "id" || Some(&key.as_str()) == name_key {
                continue;
            }
            let value = &map[&key];
            if value.is_null() || value.as_array().is_some_and(Vec::is_empty) {
                continue;
            }
            parts.push(format!("{}: {}", field_label(root, &key), self.display(&key, value, false)));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(", "))
        }
    }

    /// Plain values as a set: "Parter: + Polisområde Södermanland".
    fn set(&self, path: &str, label: &Label, before: &[Value], after: &[Value], out: &mut Vec<FieldChange>) {
        let key = path.rsplit('.').next().unwrap_or(path);
        for v in before.iter().filter(|v| !after.contains(v)) {
            let shown = self.display(key, v, false);
            out.push(FieldChange {
                field: path.to_string(),
                paragraph: None,
                from: Some(shown.clone()),
                to: None,
                text: label.plus_minus('−', &shown),
            });
        }
        for v in after.iter().filter(|v| !before.contains(v)) {
            let shown = self.display(key, v, false);
            out.push(FieldChange {
                field: path.to_string(),
                paragraph: None,
                from: None,
                to: Some(shown.clone()),
                text: label.plus_minus('+', &shown),
            });
        }
    }

    /// Lists of maps without ids (signatories), by position from 1.
    fn positional(&self, root: &str, path: &str, before: &[Value], after: &[Value], out: &mut Vec<FieldChange>) {
        let list = root_label(root);
        for i in 0..before.len().max(after.len()) {
            let n = i + 1;
            match (before.get(i), after.get(i)) {
                (Some(b), Some(a)) => {
                    let item = Label::Item { item: format!("{list} {n}"), field: String::new() };
                    let empty = serde_json::Map::new();
                    let (bm, am) = (b.as_object().unwrap_or(&empty), a.as_object().unwrap_or(&empty));
                    if bm.is_empty() && am.is_empty() {
                        self.scalar(root, &format!("{path}.{n}"), &item, b, a, out);
                        continue;
                    }
                    for key in ordered_keys(bm, am, ITEM_ORDER) {
                        let label = Label::Item { item: format!("{list} {n}"), field: field_label(root, &key) };
                        self.value(root, &format!("{path}.{n}.{key}"), &label, bm.get(&key), am.get(&key), out);
                    }
                }
                (None, Some(a)) => out.push(FieldChange {
                    field: format!("{path}.{n}"),
                    paragraph: None,
                    from: None,
                    to: Some(self.summary(root, a)),
                    text: format!("{list} tillagd: {}", self.summary(root, a)),
                }),
                (Some(b), None) => out.push(FieldChange {
                    field: format!("{path}.{n}"),
                    paragraph: None,
                    from: Some(self.summary(root, b)),
                    to: None,
                    text: format!("{list} borttagen: {}", self.summary(root, b)),
                }),
                (None, None) => {}
            }
        }
    }

    /// A map's values on one line ("Landshövding, Länsstyrelsen i Södermanlands län").
    fn summary(&self, _root: &str, value: &Value) -> String {
        match value.as_object() {
            Some(map) => map
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| self.display(k, v, false))
                .collect::<Vec<_>>()
                .join(", "),
            None => self.display("", value, false),
        }
    }

    fn scalar(
        &self,
        _root: &str,
        path: &str,
        label: &Label,
        before: &Value,
        after: &Value,
        out: &mut Vec<FieldChange>,
    ) {
        let key = path.rsplit('.').next().unwrap_or(path);
        let text_like = TEXT_FIELDS.contains(&key) && (before.is_string() || after.is_string());
        if text_like {
            let (b, a) = (before.as_str().unwrap_or_default(), after.as_str().unwrap_or_default());
            if paragraphs::split(b).len() > 1 || paragraphs::split(a).len() > 1 {
                return self.paragraphs(path, label, b, a, out);
            }
        }
        let (from, to) = (self.display(key, before, text_like), self.display(key, after, text_like));
        let (from, to) = if text_like { excerpt(&from, &to) } else { (from, to) };
        out.push(FieldChange {
            field: path.to_string(),
            paragraph: None,
            text: label.change(&from, &to),
            from: (!before.is_null()).then_some(from),
            to: (!after.is_null()).then_some(to),
        });
    }

    /// Long text, paragraph by paragraph: the changed ones, numbered as before
    /// the change (new ones as after it).
    fn paragraphs(&self, path: &str, label: &Label, before: &str, after: &str, out: &mut Vec<FieldChange>) {
        let (old, new) = (paragraphs::split(before), paragraphs::split(after));
        let mut push = |paragraph: usize, added: bool, from: Option<&str>, to: Option<&str>| {
            let (f, t) = match (from, to) {
                (Some(f), Some(t)) => {
                    let (f, t) = excerpt(&quote(f), &quote(t));
                    (Some(f), Some(t))
                }
                (f, t) => (f.map(|f| clip(&quote(f))), t.map(|t| clip(&quote(t)))),
            };
            let head = label.with_paragraph(paragraph, added);
            let text = match (&f, &t) {
                (Some(f), Some(t)) => format!("{head}: {f} → {t}"),
                (Some(f), None) => format!("{head} borttaget: {f}"),
                (None, Some(t)) => format!("{head}: {t}"),
                (None, None) => head,
            };
            out.push(FieldChange { field: path.to_string(), paragraph: Some(paragraph), from: f, to: t, text });
        };
        for op in capture_diff_slices(Algorithm::Myers, &old, &new) {
            match op {
                DiffOp::Equal { .. } => {}
                DiffOp::Delete { old_index, old_len, .. } => {
                    for (i, paragraph) in old.iter().enumerate().skip(old_index).take(old_len) {
                        push(i + 1, false, Some(paragraph), None);
                    }
                }
                DiffOp::Insert { new_index, new_len, .. } => {
                    for (i, paragraph) in new.iter().enumerate().skip(new_index).take(new_len) {
                        push(i + 1, true, None, Some(paragraph));
                    }
                }
                DiffOp::Replace { old_index, old_len, new_index, new_len } => {
                    let common = old_len.min(new_len);
                    for k in 0..common {
                        push(old_index + k + 1, false, Some(&old[old_index + k]), Some(&new[new_index + k]));
                    }
                    for k in common..old_len {
                        push(old_index + k + 1, false, Some(&old[old_index + k]), None);
                    }
                    for k in common..new_len {
                        push(new_index + k + 1, true, None, Some(&new[new_index + k]));
                    }
                }
            }
        }
    }

    /// A value as people read it: organisations by name, statuses by their
    /// Swedish label, referred items by name, text quoted.
    fn display(&self, key: &str, value: &Value, quoted: bool) -> String {
        match value {
            Value::Null => "(ingen)".to_string(),
            Value::String(s) if quoted => quote(s),
            Value::String(s) => {
                let label = match key {
                    "status" => s.parse::<ActivityStatus>().ok().map(|v| v.label().to_string()),
                    "scope" => s.parse::<Scope>().ok().map(|v| v.label().to_string()),
                    "body" => s.parse::<MeetingBody>().ok().map(|v| v.label().to_string()),
                    _ => None,
                };
                if let Some(label) = label {
                    return label;
                }
                if let Some(org) = OrgId::new(s).and_then(|id| self.directory.get(&id)) {
                    return org.name.clone();
                }
                if let Some(name) = self.names.0.get(s) {
                    return format!("'{name}'");
                }
                if TEXT_FIELDS.contains(&key) {
                    return quote(s);
                }
                s.clone()
            }
            Value::Array(items) => items.iter().map(|v| self.display(key, v, quoted)).collect::<Vec<_>>().join(", "),
            Value::Object(_) => self.summary(key, value),
            other => other.to_string(),
        }
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// At most about 160 characters of a quoted text.
fn clip(s: &str) -> String {
    if s.chars().count() <= 160 {
        return s.to_string();
    }
    let head: String = s.chars().take(150).collect();
    format!("{head}…'")
}

/// The parts of two texts around where they differ, with a few words of
/// context, so a one-word change in a long paragraph reads as one.
pub(crate) fn excerpt(before: &str, after: &str) -> (String, String) {
    const CONTEXT: usize = 30;
    let (b, a): (Vec<char>, Vec<char>) = (before.chars().collect(), after.chars().collect());
    if b.len() <= 120 && a.len() <= 120 {
        return (before.to_string(), after.to_string());
    }
    let prefix = b.iter().zip(&a).take_while(|(x, y)| x == y).count();
    let max_suffix = b.len().min(a.len()) - prefix;
    let suffix = b.iter().rev().zip(a.iter().rev()).take(max_suffix).take_while(|(x, y)| x == y).count();
    // Start and end of the window on word boundaries.
    let mut start = prefix.saturating_sub(CONTEXT);
    while start > 0 && !b[start - 1].is_whitespace() {
        start -= 1;
    }
    let cut = |text: &[char], changed_end: usize| -> String {
        let mut end = (changed_end + CONTEXT).min(text.len());
        while end < text.len() && !text[end].is_whitespace() {
            end += 1;
        }
        let middle: String = if changed_end - start > 200 {
            let head: String = text[start..start + 100].iter().collect();
            let tail: String = text[changed_end - 60..end].iter().collect();
            format!("{head} … {tail}")
        } else {
            text[start..end].iter().collect()
        };
        let lead = if start > 0 { "…" } else { "" };
        let trail = if end < text.len() { "…" } else { "" };
        format!("{lead}{}{trail}", middle.trim())
    };
    (cut(&b, b.len() - suffix), cut(&a, a.len() - suffix))
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;

    use super::*;
    use crate::ids::{DocId, ItemId};
    use crate::model::{Activity, DocKind, DocumentContent};

    fn view() -> DocumentView {
        let mut c = DocumentContent::new(DocKind::CitizenPromise, "Medborgarlöfte Flen 2025");
        c.parties = vec![OrgId::new("flen-kommun").unwrap()];
        c.body =
            "## Problembild\n\nOtrygghet i centrum på kvällarna.\n\n## Vi lovar\n\nVi promenerar två gånger per år.\n"
                .into();
        c.activities = vec![Activity {
            id: ItemId::random(),
            what: "Trygghetsvandring".into(),
            owners: vec![crate::model::Owner::Org(crate::org::OrgRef::org(OrgId::new("flen-kommun").unwrap()))],
            due: NaiveDate::from_ymd_opt(2026, 5, 1).map(crate::model::Due::Date),
            followup_method: None,
            status: ActivityStatus::Planned,
        }];
        c.into_view(DocId::random())
    }

    fn texts(before: &DocumentView, after: &DocumentView) -> Vec<String> {
        describe(Some(before), Some(after), &Directory::sodermanland()).into_iter().map(|c| c.text).collect()
    }

    #[test]
    fn title_body_paragraph_activity_and_party_changes_are_described_in_words() {
        let before = view();
        let mut after = before.clone();
        after.title = "Medborgarlöfte Flen 2026".into();
        after.body = after.body.replace("två gånger per år", "fyra gånger per år");
        after.activities[0].due = NaiveDate::from_ymd_opt(2026, 6, 1).map(crate::model::Due::Date);
        after.activities[0].status = ActivityStatus::Ongoing;
        after.parties.push(OrgId::new("polisomrade-sodermanland").unwrap());
        assert_eq!(
            texts(&before, &after),
            [
                "Titel: 'Medborgarlöfte Flen 2025' → 'Medborgarlöfte Flen 2026'",
                "Parter: + Polisområde Södermanland",
                "Brödtext, stycke 4: 'Vi promenerar två gånger per år.' → 'Vi promenerar fyra gånger per år.'",
                "Aktivitet 'Trygghetsvandring': förfallodag 2026-05-01 → 2026-06-01",
                "Aktivitet 'Trygghetsvandring': status Planerad → Pågående",
            ]
        );
    }

    #[test]
    fn added_and_removed_items_paragraphs_and_parties_are_named() {
        let before = view();
        let mut after = before.clone();
        after.activities.clear();
        after.parties.clear();
        after.body.push_str("\nNytt stycke om uppföljning.\n");
        let listed = texts(&before, &after);
        assert!(listed.contains(&"Parter: − Flens kommun".to_string()), "{listed:?}");
        assert!(listed.contains(&"Aktivitet borttagen: 'Trygghetsvandring'".to_string()), "{listed:?}");
        assert!(listed.contains(&"Brödtext, nytt stycke 5: 'Nytt stycke om uppföljning.'".to_string()), "{listed:?}");
        let back = texts(&after, &before);
        assert!(
            back.iter().any(|t| t.starts_with(
                "Aktivitet tillagd: 'Trygghetsvandring' (ansvariga: Flens kommun, förfallodag: 2026-05-01"
            )),
            "{back:?}"
        );
    }

    #[test]
    fn a_word_changed_in_a_long_paragraph_is_shown_with_a_little_context() {
        let long = "Styrgruppen består av representanter för samtliga parter och ska träffas minst två gånger per år för att följa upp arbetet och besluta om inriktningen för kommande år.";
        let (f, t) = excerpt(long, &long.replace("två gånger", "fyra gånger"));
        assert!(f.starts_with('…') && f.contains("två gånger") && f.len() < long.len(), "{f}");
        assert!(t.contains("fyra gånger"), "{t}");
    }
}
