//! Reading documents out of Automerge: schema checks, the full view, conflicts.
//!
//! Tolerant where merging can legitimately produce oddities (a party listed
//! twice after two nodes added it concurrently is shown once), strict where the
//! data cannot have come from this schema (a date that does not parse).

use std::collections::BTreeMap;

use automerge::{ObjId, ObjType, ReadDoc, ScalarValue, ScalarValueRef, Value, ValueRef, ROOT};
use chrono::NaiveDate;

use super::{
    Activity, ActivityStatus, Conflict, ConflictValue, Contributor, DocKind, DocumentView, Due, FollowUp, Goal,
    Meeting, MeetingBody, ModelError, Owner, Period, Scope, Signatory, SCHEMA_VERSION,
};
use crate::ids::{DocId, ItemId};
use crate::org::OrgId;

/// Root keys and item keys of the schema.
pub(super) mod keys {
    pub const SCHEMA: &str = "schema";
    pub const ID: &str = "id";
    pub const KIND: &str = "kind";
    pub const SCOPE: &str = "scope";
    pub const TITLE: &str = "title";
    pub const BODY: &str = "body";
    pub const PARTIES: &str = "parties";
    pub const PERIOD: &str = "period";
    pub const START: &str = "start";
    pub const END: &str = "end";
    pub const PLACE: &str = "place";
    pub const DATE: &str = "date";
    pub const SIGNATORIES: &str = "signatories";
    pub const GOALS: &str = "goals";
    pub const ACTIVITIES: &str = "activities";
    pub const FOLLOWUPS: &str = "followups";
    pub const MEETINGS: &str = "meetings";
    pub const CONTRIBUTORS: &str = "contributors";
    pub const ITEM_ID: &str = "id";
    pub const ORG: &str = "org";
    pub const ROLE: &str = "role";
    pub const NAME: &str = "name";
    pub const NODE: &str = "node";
    pub const TEXT: &str = "text";
    pub const WHAT: &str = "what";
    /// Legacy single owner (an org id); read when `owners` is absent.
    pub const OWNER: &str = "owner";
    pub const OWNERS: &str = "owners";
    /// Legacy due date (`YYYY-MM-DD` only); read when `deadline` is absent.
    pub const DUE: &str = "due";
    pub const DEADLINE: &str = "deadline";
    pub const FOLLOWUP_METHOD: &str = "followup_method";
    pub const PARTY_UNITS: &str = "party_units";
    pub const STATUS: &str = "status";
    pub const AUTHOR: &str = "author";
    pub const ACTIVITY: &str = "activity";
    pub const BODY_OF_MEETING: &str = "body";
    pub const NOTES: &str = "notes";
}

fn malformed(path: impl Into<String>, reason: impl Into<String>) -> ModelError {
    ModelError::Malformed { path: path.into(), reason: reason.into() }
}

/// A scalar string at `obj[prop]`, `None` if absent.
pub(super) fn get_str<R: ReadDoc>(doc: &R, obj: &ObjId, prop: &str, path: &str) -> Result<Option<String>, ModelError> {
    match doc.get(obj, prop)? {
        None => Ok(None),
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Str(s) => Ok(Some(s.to_string())),
            ScalarValue::Null => Ok(None),
            other => Err(malformed(path, format!("expected a string, found {other}"))),
        },
        Some((Value::Object(ObjType::Text), id)) => Ok(Some(doc.text(&id)?)),
        Some((Value::Object(t), _)) => Err(malformed(path, format!("expected a string, found a {t}"))),
    }
}

/// A text (or plain string) at `obj[prop]`; empty if absent.
pub(super) fn get_text<R: ReadDoc>(doc: &R, obj: &ObjId, prop: &str, path: &str) -> Result<String, ModelError> {
    Ok(get_str(doc, obj, prop, path)?.unwrap_or_default())
}

/// The child object at `obj[prop]` if it is of type `ty`.
pub(super) fn get_obj<R: ReadDoc>(doc: &R, obj: &ObjId, prop: &str, ty: ObjType) -> Result<Option<ObjId>, ModelError> {
    match doc.get(obj, prop)? {
        Some((Value::Object(t), id)) if t == ty => Ok(Some(id)),
        Some(_) => Err(malformed(prop, format!("expected a {ty}"))),
        None => Ok(None),
    }
}

fn parse_opt<T: std::str::FromStr>(value: Option<String>, path: &str) -> Result<Option<T>, ModelError>
where
    T::Err: std::fmt::Display,
{
    value.map(|v| v.parse::<T>().map_err(|e| malformed(path, format!("{v:?}: {e}")))).transpose()
}

fn parse_required<T: std::str::FromStr>(value: Option<String>, path: &str) -> Result<T, ModelError>
where
    T::Err: std::fmt::Display,
{
    parse_opt(value, path)?.ok_or_else(|| malformed(path, "missing"))
}

fn parse_date(value: Option<String>, path: &str) -> Result<Option<NaiveDate>, ModelError> {
    value
        .map(|v| NaiveDate::parse_from_str(&v, "%Y-%m-%d").map_err(|e| malformed(path, format!("{v:?}: {e}"))))
        .transpose()
}

fn parse_org(value: Option<String>, path: &str) -> Result<Option<OrgId>, ModelError> {
    value.map(|v| OrgId::new(&v).ok_or_else(|| malformed(path, format!("{v:?} is not an organisation id")))).transpose()
}

/// Checks the document id and schema version in the header.
pub(super) fn check_header<R: ReadDoc>(doc: &R, id: &DocId) -> Result<(), ModelError> {
    if doc.length(ROOT) == 0 {
        // Nothing received yet (a document announced by sync before its first change arrives).
        return Ok(());
    }
    match doc.get(ROOT, keys::SCHEMA)? {
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Uint(v) if *v <= SCHEMA_VERSION => {}
            ScalarValue::Uint(v) => return Err(ModelError::NewerSchema { found: *v }),
            other => return Err(malformed(keys::SCHEMA, format!("expected a version number, found {other}"))),
        },
        _ => return Err(malformed(keys::SCHEMA, "missing: not a Samverkan document")),
    }
    let found = get_str(doc, &ROOT, keys::ID, keys::ID)?.unwrap_or_default();
    if found != id.as_str() {
        return Err(ModelError::WrongDocument { expected: id.clone(), found });
    }
    Ok(())
}

/// The document kind.
pub(super) fn kind<R: ReadDoc>(doc: &R) -> Result<DocKind, ModelError> {
    parse_required(get_str(doc, &ROOT, keys::KIND, keys::KIND)?, keys::KIND)
}

/// Iterates the maps in the list at root key `list`.
fn list_items<R: ReadDoc>(doc: &R, list: &str) -> Result<Vec<ObjId>, ModelError> {
    let Some(list_id) = get_obj(doc, &ROOT, list, ObjType::List)? else {
        return Ok(Vec::new());
    };
    // In one pass: `list_range` seeks once, reading item by item once per item.
    doc.list_range(&list_id, ..)
        .map(|item| match item.value {
            ValueRef::Object(ObjType::Map) => Ok(item.id()),
            _ => Err(malformed(format!("{list}[{}]", item.index), "expected a map")),
        })
        .collect()
}

/// Reads an item's id.
fn item_id<R: ReadDoc>(doc: &R, obj: &ObjId, path: &str) -> Result<ItemId, ModelError> {
    parse_required(get_str(doc, obj, keys::ITEM_ID, path)?, path)
}

/// Reads the parties, without duplicates, in document order.
pub(super) fn parties<R: ReadDoc>(doc: &R) -> Result<Vec<OrgId>, ModelError> {
    let mut parties: Vec<OrgId> = Vec::new();
    if let Some(list) = get_obj(doc, &ROOT, keys::PARTIES, ObjType::List)? {
        for (i, stored) in list_strs(doc, &list, keys::PARTIES)?.into_iter().enumerate() {
            if let Some(org) = parse_org(Some(stored), &format!("parties[{i}]"))? {
                if !parties.contains(&org) {
                    parties.push(org);
                }
            }
        }
    }
    Ok(parties)
}

/// Reads the unit each party acts through (`party_units`: org id → unit name);
/// entries of organisations that are no longer parties are left out.
pub(super) fn party_units<R: ReadDoc>(doc: &R, parties: &[OrgId]) -> Result<BTreeMap<OrgId, String>, ModelError> {
    let mut units = BTreeMap::new();
    let Some(map) = get_obj(doc, &ROOT, keys::PARTY_UNITS, ObjType::Map)? else {
        return Ok(units);
    };
    for key in doc.keys(&map) {
        let path = format!("{}.{key}", keys::PARTY_UNITS);
        let Some(org) = parse_org(Some(key.clone()), &path)? else { continue };
        if let Some(unit) = get_str(doc, &map, &key, &path)?.map(|u| u.trim().to_string()).filter(|u| !u.is_empty()) {
            if parties.contains(&org) {
                units.insert(org, unit);
            }
        }
    }
    Ok(units)
}

/// Reads the whole document.
pub(super) fn view<R: ReadDoc>(doc: &R, id: &DocId) -> Result<DocumentView, ModelError> {
    if doc.length(ROOT) == 0 {
        return Err(malformed("/", "the document is empty: its first change has not arrived yet"));
    }
    let kind = kind(doc)?;
    let scope: Scope = parse_opt(get_str(doc, &ROOT, keys::SCOPE, keys::SCOPE)?, keys::SCOPE)?.unwrap_or(Scope::County);
    let title = get_text(doc, &ROOT, keys::TITLE, keys::TITLE)?;
    let body = get_text(doc, &ROOT, keys::BODY, keys::BODY)?;

    let parties = parties(doc)?;
    let party_units = party_units(doc, &parties)?;

    let period = period(doc)?;
    let place = get_str(doc, &ROOT, keys::PLACE, keys::PLACE)?.filter(|p| !p.is_empty());
    let date = parse_date(get_str(doc, &ROOT, keys::DATE, keys::DATE)?, keys::DATE)?;

    let mut signatories = Vec::new();
    for (i, obj) in list_items(doc, keys::SIGNATORIES)?.iter().enumerate() {
        let path = format!("signatories.{}", i + 1);
        signatories.push(Signatory {
            org: parse_org(get_str(doc, obj, keys::ORG, &path)?, &path)?.ok_or_else(|| malformed(&path, "no org"))?,
            role: get_text(doc, obj, keys::ROLE, &path)?,
            name: get_str(doc, obj, keys::NAME, &path)?.filter(|n| !n.is_empty()),
        });
    }

    let mut goals = Vec::new();
    for obj in list_items(doc, keys::GOALS)? {
        let id = item_id(doc, &obj, "goals")?;
        let path = format!("goals.{id}");
        goals.push(Goal { text: get_text(doc, &obj, keys::TEXT, &path)?, id });
    }

    let activities = view_activities(doc)?;

    let mut followups = Vec::new();
    for obj in list_items(doc, keys::FOLLOWUPS)? {
        let id = item_id(doc, &obj, "followups")?;
        let path = format!("followups.{id}");
        followups.push(FollowUp {
            date: parse_date(get_str(doc, &obj, keys::DATE, &path)?, &path)?
                .ok_or_else(|| malformed(&path, "no date"))?,
            author: get_text(doc, &obj, keys::AUTHOR, &path)?,
            text: get_text(doc, &obj, keys::TEXT, &path)?,
            activity: parse_opt(get_str(doc, &obj, keys::ACTIVITY, &path)?.filter(|a| !a.is_empty()), &path)?,
            id,
        });
    }

    let mut meetings = Vec::new();
    for obj in list_items(doc, keys::MEETINGS)? {
        let id = item_id(doc, &obj, "meetings")?;
        let path = format!("meetings.{id}");
        meetings.push(Meeting {
            date: parse_date(get_str(doc, &obj, keys::DATE, &path)?, &path)?
                .ok_or_else(|| malformed(&path, "no date"))?,
            body: parse_opt::<MeetingBody>(get_str(doc, &obj, keys::BODY_OF_MEETING, &path)?, &path)?
                .unwrap_or(MeetingBody::Other),
            notes: get_text(doc, &obj, keys::NOTES, &path)?,
            id,
        });
    }

    Ok(DocumentView {
        id: id.clone(),
        kind,
        scope,
        title,
        parties,
        party_units,
        period,
        place,
        date,
        signatories,
        body,
        goals,
        activities,
        followups,
        meetings,
    })
}

/// The validity period.
pub(super) fn period<R: ReadDoc>(doc: &R) -> Result<Period, ModelError> {
    Ok(match get_obj(doc, &ROOT, keys::PERIOD, ObjType::Map)? {
        Some(p) => Period {
            start: parse_date(get_str(doc, &p, keys::START, "period.start")?, "period.start")?,
            end: parse_date(get_str(doc, &p, keys::END, "period.end")?, "period.end")?,
        },
        None => Period::default(),
    })
}

/// The activities.
pub(super) fn view_activities<R: ReadDoc>(doc: &R) -> Result<Vec<Activity>, ModelError> {
    let mut activities = Vec::new();
    for obj in list_items(doc, keys::ACTIVITIES)? {
        let id = item_id(doc, &obj, "activities")?;
        let path = format!("activities.{id}");
        activities.push(Activity {
            what: get_text(doc, &obj, keys::WHAT, &path)?,
            owners: owners(doc, &obj, &path)?,
            due: due(doc, &obj, &path)?,
            followup_method: get_str(doc, &obj, keys::FOLLOWUP_METHOD, &path)?.filter(|m| !m.trim().is_empty()),
            status: parse_opt::<ActivityStatus>(get_str(doc, &obj, keys::STATUS, &path)?, &path)?
                .unwrap_or(ActivityStatus::Planned),
            id,
        });
    }
    Ok(activities)
}

/// An activity's owners: the `owners` list (each once, in order), or for an
/// activity written before it, the single legacy `owner`.
pub(super) fn owners<R: ReadDoc>(doc: &R, obj: &ObjId, path: &str) -> Result<Vec<Owner>, ModelError> {
    let Some(list) = get_obj(doc, obj, keys::OWNERS, ObjType::List)? else {
        let legacy = parse_org(get_str(doc, obj, keys::OWNER, path)?.filter(|o| !o.is_empty()), path)?;
        return Ok(legacy.map(Owner::org).into_iter().collect());
    };
    let mut owners: Vec<Owner> = Vec::new();
    for (i, stored) in list_strs(doc, &list, &format!("{path}.owners"))?.into_iter().enumerate() {
        let item = format!("{path}.owners[{i}]");
        let owner = Owner::decode(&stored).ok_or_else(|| malformed(&item, format!("{stored:?} is not an owner")))?;
        if !owners.contains(&owner) {
            owners.push(owner);
        }
    }
    Ok(owners)
}

/// An activity's deadline: `deadline`, or for an activity written before it, the legacy date `due`.
pub(super) fn due<R: ReadDoc>(doc: &R, obj: &ObjId, path: &str) -> Result<Option<Due>, ModelError> {
    if doc.get(obj, keys::DEADLINE)?.is_some() {
        let stored = get_str(doc, obj, keys::DEADLINE, path)?;
        return Ok(stored.filter(|d| !d.trim().is_empty()).map(|d| Due::decode(&d)));
    }
    Ok(parse_date(get_str(doc, obj, keys::DUE, path)?, path)?.map(Due::Date))
}

/// Every item of a list of strings, in order, in one pass (`list_range`: one
/// seek, where reading item by item seeks once per item); `path` names the
/// list in errors.
fn list_strs<R: ReadDoc>(doc: &R, list: &ObjId, path: &str) -> Result<Vec<String>, ModelError> {
    doc.list_range(list, ..)
        .map(|item| match item.value {
            ValueRef::Scalar(ScalarValueRef::Str(s)) => Ok(s.into_owned()),
            ValueRef::Scalar(other) => {
                Err(malformed(format!("{path}[{}]", item.index), format!("expected a string, found {other}")))
            }
            ValueRef::Object(_) => Err(malformed(format!("{path}[{}]", item.index), "expected a string")),
        })
        .collect()
}

/// Renders one of several concurrent values for people.
fn describe_value<R: ReadDoc>(doc: &R, value: &Value<'_>, id: &ObjId) -> String {
    match value {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(s) => s.to_string(),
            ScalarValue::Null => "(empty)".to_string(),
            other => other.to_string(),
        },
        Value::Object(ObjType::Text) => doc.text(id).unwrap_or_default(),
        Value::Object(ObjType::List) => (0..doc.length(id))
            .filter_map(|i| match doc.get(id, i) {
                Ok(Some((Value::Scalar(s), _))) => s.as_str().map(str::to_owned),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("; "),
        Value::Object(t) => format!("({t})"),
    }
}

fn actor_of(id: &ObjId) -> String {
    match id {
        ObjId::Id(_, actor, _) => actor.to_hex_string(),
        ObjId::Root => String::new(),
    }
}

/// Collects a conflict at `obj[prop]` if it holds several values.
fn check_conflict<R: ReadDoc>(
    doc: &R,
    obj: &ObjId,
    prop: &str,
    path: String,
    out: &mut Vec<Conflict>,
) -> Result<(), ModelError> {
    let all = doc.get_all(obj, prop)?;
    if all.len() > 1 {
        // Automerge shows the value with the highest op id; list that first.
        let mut values: Vec<ConflictValue> = all
            .iter()
            .rev()
            .map(|(value, id)| ConflictValue { value: describe_value(doc, value, id), actor: actor_of(id) })
            .collect();
        values.dedup();
        out.push(Conflict { path, values });
    }
    Ok(())
}

/// Every scalar field with concurrent values, with the path `set` takes.
pub(super) fn conflicts<R: ReadDoc>(doc: &R) -> Result<Vec<Conflict>, ModelError> {
    let mut out = Vec::new();
    for key in [keys::TITLE, keys::BODY, keys::SCOPE, keys::PLACE, keys::DATE] {
        check_conflict(doc, &ROOT, key, key.to_string(), &mut out)?;
    }
    if let Some(p) = get_obj(doc, &ROOT, keys::PERIOD, ObjType::Map)? {
        for key in [keys::START, keys::END] {
            check_conflict(doc, &p, key, format!("period.{key}"), &mut out)?;
        }
    }
    for (i, obj) in list_items(doc, keys::SIGNATORIES)?.iter().enumerate() {
        for key in [keys::ORG, keys::ROLE, keys::NAME] {
            check_conflict(doc, obj, key, format!("signatories.{}.{key}", i + 1), &mut out)?;
        }
    }
    if let Some(units) = get_obj(doc, &ROOT, keys::PARTY_UNITS, ObjType::Map)? {
        for key in doc.keys(&units) {
            check_conflict(doc, &units, &key, format!("{}.{key}", keys::PARTY_UNITS), &mut out)?;
        }
    }
    // (stored key, the field as `set` names it)
    let lists: [(&str, &[(&str, &str)]); 4] = [
        (keys::GOALS, &[(keys::TEXT, "text")]),
        (
            keys::ACTIVITIES,
            &[
                (keys::WHAT, "what"),
                (keys::OWNERS, "owners"),
                (keys::OWNER, "owners"),
                (keys::DEADLINE, "due"),
                (keys::DUE, "due"),
                (keys::FOLLOWUP_METHOD, "followup_method"),
                (keys::STATUS, "status"),
            ],
        ),
        (
            keys::FOLLOWUPS,
            &[(keys::DATE, "date"), (keys::AUTHOR, "author"), (keys::TEXT, "text"), (keys::ACTIVITY, "activity")],
        ),
        (keys::MEETINGS, &[(keys::DATE, "date"), (keys::BODY_OF_MEETING, "body"), (keys::NOTES, "notes")]),
    ];
    for (list, fields) in lists {
        for obj in list_items(doc, list)? {
            let id = item_id(doc, &obj, list)?;
            for (key, field) in fields {
                // A legacy key counts only while its successor is absent.
                let superseded = match *key {
                    keys::OWNER => doc.get(&obj, keys::OWNERS)?.is_some(),
                    keys::DUE => doc.get(&obj, keys::DEADLINE)?.is_some(),
                    _ => false,
                };
                if !superseded {
                    check_conflict(doc, &obj, key, format!("{list}.{id}.{field}"), &mut out)?;
                }
            }
        }
    }
    Ok(out)
}

/// The `contributors` map.
pub(super) fn contributors<R: ReadDoc>(doc: &R) -> Result<BTreeMap<String, Contributor>, ModelError> {
    let mut out = BTreeMap::new();
    let Some(map) = get_obj(doc, &ROOT, keys::CONTRIBUTORS, ObjType::Map)? else {
        return Ok(out);
    };
    for actor in doc.keys(&map) {
        let Some(entry) = get_obj(doc, &map, &actor, ObjType::Map)? else { continue };
        let path = format!("contributors.{actor}");
        let org = parse_org(get_str(doc, &entry, keys::ORG, &path)?, &path)?;
        let node = get_str(doc, &entry, keys::NODE, &path)?.unwrap_or_default();
        if let Some(org) = org {
            out.insert(actor, Contributor { org, node });
        }
    }
    Ok(out)
}

/// Index of the item in root list `list` whose id is `id` or starts with it.
pub(super) fn find_item<R: ReadDoc>(
    doc: &R,
    list: &'static str,
    id: &str,
) -> Result<(ObjId, usize, ObjId), ModelError> {
    let list_id =
        get_obj(doc, &ROOT, list, ObjType::List)?.ok_or(ModelError::NoSuchItem { list, id: id.to_string() })?;
    let wanted = id.to_ascii_lowercase();
    let mut found = None;
    let maps = doc.list_range(&list_id, ..).filter(|item| matches!(item.value, ValueRef::Object(ObjType::Map)));
    for (i, obj) in maps.map(|item| (item.index, item.id())) {
        let item = get_str(doc, &obj, keys::ITEM_ID, list)?.unwrap_or_default();
        if item == wanted {
            return Ok((list_id, i, obj));
        }
        if item.starts_with(&wanted) {
            if found.is_some() {
                return Err(ModelError::AmbiguousItem { list, id: id.to_string() });
            }
            found = Some((i, obj));
        }
    }
    let (i, obj) = found.ok_or(ModelError::NoSuchItem { list, id: id.to_string() })?;
    Ok((list_id, i, obj))
}
