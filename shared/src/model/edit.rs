//! Writing documents: every edit a user can make, validated, as Automerge operations.
//!
//! Edits are targeted so that they merge well: text is changed by a minimal
//! character diff (never replaced wholesale), list items are inserted and
//! deleted by id (never rewritten), and a scalar is only written when its value
//! actually changes, so an unchanged field never creates a spurious conflict.

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};
use chrono::NaiveDate;

use super::read::{find_item, get_obj, get_str, keys};
use super::{
    Activity, ActivityStatus, DocumentView, EditContext, FollowUp, Goal, Meeting, MeetingBody, ModelError, Period,
    Scope, Signatory, SCHEMA_VERSION,
};
use crate::ids::ItemId;
use crate::org::{Directory, OrgId};

/// Makes the edits of one change; obtained from [`super::Document::edit`].
pub struct Editor<'a> {
    doc: &'a mut AutoCommit,
    directory: &'a Directory,
}

fn invalid(field: &str, value: &str, reason: impl Into<String>) -> ModelError {
    ModelError::InvalidValue { field: field.to_string(), value: value.to_string(), reason: reason.into() }
}

/// Parses a `YYYY-MM-DD` date for `field`.
pub fn parse_date(field: &str, value: &str) -> Result<NaiveDate, ModelError> {
    NaiveDate::parse_from_str(value.trim(), "%Y-%m-%d")
        .map_err(|e| invalid(field, value, format!("{e} (use YYYY-MM-DD)")))
}

/// Parses an optional date: empty means none.
fn parse_opt_date(field: &str, value: &str) -> Result<Option<NaiveDate>, ModelError> {
    if value.trim().is_empty() {
        Ok(None)
    } else {
        parse_date(field, value).map(Some)
    }
}

fn date_string(d: Option<NaiveDate>) -> Option<String> {
    d.map(|d| d.format("%Y-%m-%d").to_string())
}

/// Records the editing node in the document's `contributors` map if it is not there yet.
pub(super) fn declare_contributor(doc: &mut AutoCommit, ctx: &EditContext) -> Result<(), ModelError> {
    let actor = ctx.author.actor_id().to_hex_string();
    let map = match get_obj(doc, &ROOT, keys::CONTRIBUTORS, ObjType::Map)? {
        Some(m) => m,
        None => doc.put_object(ROOT, keys::CONTRIBUTORS, ObjType::Map)?,
    };
    if let Some(entry) = get_obj(doc, &map, &actor, ObjType::Map)? {
        let org = get_str(doc, &entry, keys::ORG, "contributors")?;
        let node = get_str(doc, &entry, keys::NODE, "contributors")?;
        if org.as_deref() == Some(ctx.org.as_str()) && node.as_deref() == Some(ctx.node_name.as_str()) {
            return Ok(());
        }
    }
    let entry = doc.put_object(&map, actor.as_str(), ObjType::Map)?;
    doc.put(&entry, keys::ORG, ctx.org.as_str())?;
    doc.put(&entry, keys::NODE, ctx.node_name.as_str())?;
    Ok(())
}

impl<'a> Editor<'a> {
    pub(super) fn new(doc: &'a mut AutoCommit, directory: &'a Directory) -> Self {
        Self { doc, directory }
    }

    // ---- low-level writers -------------------------------------------------------------

    /// Sets a text field by minimal diff; with `force`, also settles a conflict
    /// between several text objects by writing a fresh one.
    fn put_text(&mut self, obj: &ObjId, prop: &str, value: &str, force: bool) -> Result<(), ModelError> {
        let all = self.doc.get_all(obj, prop)?;
        if let [(Value::Object(ObjType::Text), id)] = all.as_slice() {
            let id = id.clone();
            if self.doc.text(&id)? != value {
                self.doc.update_text(&id, value)?;
            }
            return Ok(());
        }
        if !force && !all.is_empty() {
            // Concurrent text objects (or a legacy string): edit the one shown.
            if let Some((Value::Object(ObjType::Text), id)) = all.last() {
                let id = id.clone();
                if self.doc.text(&id)? != value {
                    self.doc.update_text(&id, value)?;
                }
                return Ok(());
            }
        }
        let id = self.doc.put_object(obj, prop, ObjType::Text)?;
        self.doc.splice_text(&id, 0, 0, value)?;
        Ok(())
    }

    /// Sets or removes a scalar string; without `force` it writes only if the value differs.
    fn put_scalar(&mut self, obj: &ObjId, prop: &str, value: Option<&str>, force: bool) -> Result<(), ModelError> {
        let all = self.doc.get_all(obj, prop)?;
        let current = match all.as_slice() {
            [(Value::Scalar(s), _)] => match s.as_ref() {
                ScalarValue::Str(s) => Some(s.to_string()),
                _ => None,
            },
            _ => None,
        };
        let unchanged = all.len() <= 1 && current.as_deref() == value;
        if unchanged && !(force && value.is_some() && all.len() > 1) {
            return Ok(());
        }
        match value {
            Some(v) => self.doc.put(obj, prop, v)?,
            None if !all.is_empty() => self.doc.delete(obj, prop)?,
            None => {}
        }
        Ok(())
    }

    fn child(&mut self, obj: &ObjId, prop: &str, ty: ObjType) -> Result<ObjId, ModelError> {
        match get_obj(self.doc, obj, prop, ty)? {
            Some(id) => Ok(id),
            None => Ok(self.doc.put_object(obj, prop, ty)?),
        }
    }

    fn check_org(&self, org: &OrgId) -> Result<(), ModelError> {
        self.directory.get(org).map(|_| ()).ok_or_else(|| ModelError::UnknownOrganisation(org.to_string()))
    }

    /// Resolves an organisation a user typed (id, name or alias).
    pub fn resolve_org(&self, text: &str) -> Result<OrgId, ModelError> {
        self.directory
            .resolve(text)
            .map(|o| o.id.clone())
            .ok_or_else(|| ModelError::UnknownOrganisation(text.trim().to_string()))
    }

    // ---- whole-document ------------------------------------------------------------------

    /// Writes the header and all content of a new document.
    pub(super) fn initialise(&mut self, view: &DocumentView) -> Result<(), ModelError> {
        self.doc.put(ROOT, keys::SCHEMA, ScalarValue::Uint(SCHEMA_VERSION))?;
        self.doc.put(ROOT, keys::ID, view.id.as_str())?;
        self.doc.put(ROOT, keys::KIND, view.kind.as_str())?;
        for list in [keys::PARTIES, keys::SIGNATORIES, keys::GOALS, keys::ACTIVITIES, keys::FOLLOWUPS, keys::MEETINGS] {
            self.doc.put_object(ROOT, list, ObjType::List)?;
        }
        self.doc.put_object(ROOT, keys::PERIOD, ObjType::Map)?;
        self.apply(view)
    }

    /// Makes the document say what `view` says, with the fewest operations:
    /// used by `edit` (the user changed the exported Markdown) and import.
    pub fn apply(&mut self, view: &DocumentView) -> Result<(), ModelError> {
        let current_kind = super::read::kind(self.doc)?;
        if current_kind != view.kind {
            return Err(invalid(
                "kind",
                view.kind.as_str(),
                format!("the kind of a document cannot change (it is {current_kind})"),
            ));
        }
        self.set_title(&view.title)?;
        self.set_body(&view.body)?;
        self.set_scope(view.scope)?;
        self.set_parties(&view.parties)?;
        self.set_period(view.period)?;
        self.set_place(view.place.as_deref())?;
        self.set_date(view.date)?;
        self.set_signatories(&view.signatories)?;
        self.sync_list(keys::GOALS, &view.goals, |e, obj, g: &Goal| e.write_goal(obj, g))?;
        for a in &view.activities {
            self.validate_activity(a)?;
        }
        self.sync_list(keys::ACTIVITIES, &view.activities, |e, obj, a: &Activity| e.write_activity(obj, a))?;
        for f in &view.followups {
            self.validate_followup(f, &view.activities)?;
        }
        self.sync_list(keys::FOLLOWUPS, &view.followups, |e, obj, f: &FollowUp| e.write_followup(obj, f))?;
        self.sync_list(keys::MEETINGS, &view.meetings, |e, obj, m: &Meeting| e.write_meeting(obj, m))?;
        Ok(())
    }

    /// Appends an immutable record (a map of string fields) to the root list
    /// `list`, creating the list if needed. Used for approval records, which
    /// are written once and never edited.
    pub(crate) fn append_record(&mut self, list: &str, fields: &[(&'static str, String)]) -> Result<(), ModelError> {
        let list_id = self.child(&ROOT, list, ObjType::List)?;
        let end = self.doc.length(&list_id);
        let obj = self.doc.insert_object(&list_id, end, ObjType::Map)?;
        for (key, value) in fields {
            self.doc.put(&obj, *key, value.as_str())?;
        }
        Ok(())
    }

    /// Brings root list `list` in line with `items` by id: deletes items that are
    /// gone, updates the ones that stay, inserts new ones where they stand.
    fn sync_list<T: ListItem>(
        &mut self,
        list: &'static str,
        items: &[T],
        write: impl Fn(&mut Self, &ObjId, &T) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        let list_id = self.child(&ROOT, list, ObjType::List)?;
        let wanted: Vec<&str> = items.iter().map(|i| i.item_id().as_str()).collect();
        let mut i = self.doc.length(&list_id);
        while i > 0 {
            i -= 1;
            let id = match self.doc.get(&list_id, i)? {
                Some((Value::Object(ObjType::Map), obj)) => get_str(self.doc, &obj, keys::ITEM_ID, list)?,
                _ => None,
            };
            if !id.as_deref().is_some_and(|id| wanted.contains(&id)) {
                self.doc.delete(&list_id, i)?;
            }
        }
        for (pos, item) in items.iter().enumerate() {
            let obj = match find_item(self.doc, list, item.item_id().as_str()) {
                Ok((_, _, obj))
                    if get_str(self.doc, &obj, keys::ITEM_ID, list)?.as_deref() == Some(item.item_id().as_str()) =>
                {
                    obj
                }
                _ => {
                    let at = pos.min(self.doc.length(&list_id));
                    let obj = self.doc.insert_object(&list_id, at, ObjType::Map)?;
                    self.doc.put(&obj, keys::ITEM_ID, item.item_id().as_str())?;
                    obj
                }
            };
            write(self, &obj, item)?;
        }
        Ok(())
    }

    // ---- header fields ---------------------------------------------------------------------

    /// Sets the title (must not be empty).
    pub fn set_title(&mut self, title: &str) -> Result<(), ModelError> {
        if title.trim().is_empty() {
            return Err(ModelError::EmptyTitle);
        }
        self.put_text(&ROOT, keys::TITLE, title, false)
    }

    /// Sets the Markdown body.
    pub fn set_body(&mut self, body: &str) -> Result<(), ModelError> {
        self.put_text(&ROOT, keys::BODY, body, false)
    }

    /// Sets county-wide or local.
    pub fn set_scope(&mut self, scope: Scope) -> Result<(), ModelError> {
        self.put_scalar(&ROOT, keys::SCOPE, Some(scope.as_str()), false)
    }

    /// Sets the parties: removes those not listed, appends new ones; every party must be known.
    pub fn set_parties(&mut self, parties: &[OrgId]) -> Result<(), ModelError> {
        for p in parties {
            self.check_org(p)?;
        }
        let list = self.child(&ROOT, keys::PARTIES, ObjType::List)?;
        let mut present = Vec::new();
        let mut i = self.doc.length(&list);
        while i > 0 {
            i -= 1;
            let value = match self.doc.get(&list, i)? {
                Some((Value::Scalar(s), _)) => s.as_str().map(str::to_owned),
                _ => None,
            };
            match value {
                Some(v) if parties.iter().any(|p| p.as_str() == v) && !present.contains(&v) => present.push(v),
                _ => self.doc.delete(&list, i)?,
            }
        }
        for p in parties {
            if !present.iter().any(|v| v == p.as_str()) {
                let end = self.doc.length(&list);
                self.doc.insert(&list, end, p.as_str())?;
                present.push(p.to_string());
            }
        }
        Ok(())
    }

    /// Sets the validity period; the end may not come before the start.
    pub fn set_period(&mut self, period: Period) -> Result<(), ModelError> {
        self.write_period(period, false)
    }

    fn write_period(&mut self, period: Period, force: bool) -> Result<(), ModelError> {
        if let (Some(start), Some(end)) = (period.start, period.end) {
            if end < start {
                return Err(ModelError::PeriodEndsBeforeStart { start, end });
            }
        }
        let p = self.child(&ROOT, keys::PERIOD, ObjType::Map)?;
        self.put_scalar(&p, keys::START, date_string(period.start).as_deref(), force)?;
        self.put_scalar(&p, keys::END, date_string(period.end).as_deref(), force)
    }

    /// Sets or clears the place of signing.
    pub fn set_place(&mut self, place: Option<&str>) -> Result<(), ModelError> {
        self.put_scalar(&ROOT, keys::PLACE, place.map(str::trim).filter(|p| !p.is_empty()), false)
    }

    /// Sets or clears the document's date.
    pub fn set_date(&mut self, date: Option<NaiveDate>) -> Result<(), ModelError> {
        self.put_scalar(&ROOT, keys::DATE, date_string(date).as_deref(), false)
    }

    /// Replaces the required signatories (position by position).
    pub fn set_signatories(&mut self, signatories: &[Signatory]) -> Result<(), ModelError> {
        for s in signatories {
            self.validate_signatory(s)?;
        }
        let list = self.child(&ROOT, keys::SIGNATORIES, ObjType::List)?;
        while self.doc.length(&list) > signatories.len() {
            let last = self.doc.length(&list) - 1;
            self.doc.delete(&list, last)?;
        }
        for (i, s) in signatories.iter().enumerate() {
            let obj = match self.doc.get(&list, i)? {
                Some((Value::Object(ObjType::Map), obj)) => obj,
                _ => self.doc.insert_object(&list, i, ObjType::Map)?,
            };
            self.write_signatory(&obj, s, false)?;
        }
        Ok(())
    }

    /// Adds a required signatory at the end.
    pub fn add_signatory(&mut self, signatory: &Signatory) -> Result<(), ModelError> {
        self.validate_signatory(signatory)?;
        let list = self.child(&ROOT, keys::SIGNATORIES, ObjType::List)?;
        let end = self.doc.length(&list);
        let obj = self.doc.insert_object(&list, end, ObjType::Map)?;
        self.write_signatory(&obj, signatory, false)
    }

    /// Removes the `n`th signatory (1-based, as listed).
    pub fn remove_signatory(&mut self, n: usize) -> Result<(), ModelError> {
        let list = self.child(&ROOT, keys::SIGNATORIES, ObjType::List)?;
        if n == 0 || n > self.doc.length(&list) {
            return Err(ModelError::NoSuchItem { list: keys::SIGNATORIES, id: n.to_string() });
        }
        self.doc.delete(&list, n - 1)?;
        Ok(())
    }

    fn validate_signatory(&self, s: &Signatory) -> Result<(), ModelError> {
        self.check_org(&s.org)?;
        if s.role.trim().is_empty() {
            return Err(invalid("signatory role", &s.role, "a signatory needs a role title"));
        }
        Ok(())
    }

    fn write_signatory(&mut self, obj: &ObjId, s: &Signatory, force: bool) -> Result<(), ModelError> {
        self.put_scalar(obj, keys::ORG, Some(s.org.as_str()), force)?;
        self.put_scalar(obj, keys::ROLE, Some(s.role.trim()), force)?;
        self.put_scalar(obj, keys::NAME, s.name.as_deref().map(str::trim).filter(|n| !n.is_empty()), force)
    }

    // ---- structured parts --------------------------------------------------------------------

    /// Adds a goal; returns its id.
    pub fn add_goal(&mut self, text: &str) -> Result<ItemId, ModelError> {
        if text.trim().is_empty() {
            return Err(invalid("goal", text, "a goal needs a text"));
        }
        let goal = Goal { id: ItemId::random(), text: text.to_string() };
        let obj = self.append_item(keys::GOALS, &goal.id)?;
        self.write_goal(&obj, &goal)?;
        Ok(goal.id)
    }

    /// Adds an activity (its `id` is used as given); returns its id.
    pub fn add_activity(&mut self, activity: &Activity) -> Result<ItemId, ModelError> {
        self.validate_activity(activity)?;
        let obj = self.append_item(keys::ACTIVITIES, &activity.id)?;
        self.write_activity(&obj, activity)?;
        Ok(activity.id.clone())
    }

    /// Adds a follow-up entry; returns its id.
    pub fn add_followup(&mut self, followup: &FollowUp) -> Result<ItemId, ModelError> {
        let activities = super::read::view_activities(self.doc)?;
        self.validate_followup(followup, &activities)?;
        let obj = self.append_item(keys::FOLLOWUPS, &followup.id)?;
        self.write_followup(&obj, followup)?;
        Ok(followup.id.clone())
    }

    /// Adds a meeting record; returns its id.
    pub fn add_meeting(&mut self, meeting: &Meeting) -> Result<ItemId, ModelError> {
        let obj = self.append_item(keys::MEETINGS, &meeting.id)?;
        self.write_meeting(&obj, meeting)?;
        Ok(meeting.id.clone())
    }

    /// Removes an item from `goals`, `activities`, `followups` or `meetings` by id (or unique prefix).
    pub fn remove_item(&mut self, list: &str, id: &str) -> Result<(), ModelError> {
        let list = item_list(list)?;
        let (list_id, index, _) = find_item(self.doc, list, id)?;
        self.doc.delete(&list_id, index)?;
        Ok(())
    }

    fn append_item(&mut self, list: &'static str, id: &ItemId) -> Result<ObjId, ModelError> {
        let list_id = self.child(&ROOT, list, ObjType::List)?;
        let end = self.doc.length(&list_id);
        let obj = self.doc.insert_object(&list_id, end, ObjType::Map)?;
        self.doc.put(&obj, keys::ITEM_ID, id.as_str())?;
        Ok(obj)
    }

    fn validate_activity(&self, a: &Activity) -> Result<(), ModelError> {
        if a.what.trim().is_empty() {
            return Err(invalid("activity", &a.what, "an activity needs a description of what is to be done"));
        }
        if let Some(owner) = &a.owner {
            self.check_org(owner)?;
        }
        Ok(())
    }

    fn validate_followup(&self, f: &FollowUp, activities: &[Activity]) -> Result<(), ModelError> {
        if f.text.trim().is_empty() {
            return Err(invalid("follow-up", &f.text, "a follow-up needs a text"));
        }
        if f.author.trim().is_empty() {
            return Err(invalid("follow-up author", &f.author, "a follow-up needs an author"));
        }
        if let Some(a) = &f.activity {
            if !activities.iter().any(|x| &x.id == a) {
                return Err(ModelError::NoSuchItem { list: keys::ACTIVITIES, id: a.to_string() });
            }
        }
        Ok(())
    }

    fn write_goal(&mut self, obj: &ObjId, g: &Goal) -> Result<(), ModelError> {
        self.put_text(obj, keys::TEXT, &g.text, false)
    }

    fn write_activity(&mut self, obj: &ObjId, a: &Activity) -> Result<(), ModelError> {
        self.put_text(obj, keys::WHAT, &a.what, false)?;
        self.put_scalar(obj, keys::OWNER, a.owner.as_ref().map(OrgId::as_str), false)?;
        self.put_scalar(obj, keys::DUE, date_string(a.due).as_deref(), false)?;
        self.put_scalar(obj, keys::STATUS, Some(a.status.as_str()), false)
    }

    fn write_followup(&mut self, obj: &ObjId, f: &FollowUp) -> Result<(), ModelError> {
        self.put_scalar(obj, keys::DATE, date_string(Some(f.date)).as_deref(), false)?;
        self.put_scalar(obj, keys::AUTHOR, Some(f.author.trim()), false)?;
        self.put_text(obj, keys::TEXT, &f.text, false)?;
        self.put_scalar(obj, keys::ACTIVITY, f.activity.as_ref().map(ItemId::as_str), false)
    }

    fn write_meeting(&mut self, obj: &ObjId, m: &Meeting) -> Result<(), ModelError> {
        self.put_scalar(obj, keys::DATE, date_string(Some(m.date)).as_deref(), false)?;
        self.put_scalar(obj, keys::BODY_OF_MEETING, Some(m.body.as_str()), false)?;
        self.put_text(obj, keys::NOTES, &m.notes, false)
    }

    // ---- field paths -------------------------------------------------------------------------

    /// Sets one field by path (as `samverkan-node set` and conflict resolution take it).
    /// Always writes, so setting a field that is in conflict resolves the conflict.
    /// An empty value clears optional fields.
    pub fn set_field(&mut self, path: &str, value: &str) -> Result<(), ModelError> {
        let parts: Vec<&str> = path.split('.').collect();
        match parts.as_slice() {
            ["title"] => {
                if value.trim().is_empty() {
                    return Err(ModelError::EmptyTitle);
                }
                self.put_text(&ROOT, keys::TITLE, value, true)
            }
            ["body"] => self.put_text(&ROOT, keys::BODY, value, true),
            ["scope"] => {
                let scope: Scope =
                    value.parse().map_err(|e: super::UnknownValue| invalid(path, value, e.to_string()))?;
                self.put_scalar(&ROOT, keys::SCOPE, Some(scope.as_str()), true)
            }
            ["parties"] => {
                let parties = value
                    .split(',')
                    .filter(|p| !p.trim().is_empty())
                    .map(|p| self.resolve_org(p))
                    .collect::<Result<Vec<_>, _>>()?;
                self.set_parties(&parties)
            }
            ["place"] => self.put_scalar(&ROOT, keys::PLACE, Some(value.trim()).filter(|v| !v.is_empty()), true),
            ["date"] => {
                let date = parse_opt_date(path, value)?;
                self.put_scalar(&ROOT, keys::DATE, date_string(date).as_deref(), true)
            }
            ["period", which @ ("start" | "end")] | [which @ ("start" | "end")] => {
                let current = super::read::period(self.doc)?;
                let date = parse_opt_date(path, value)?;
                let period =
                    if *which == "start" { Period { start: date, ..current } } else { Period { end: date, ..current } };
                self.write_period(period, true)
            }
            ["signatories", n, field] => {
                let list = self.child(&ROOT, keys::SIGNATORIES, ObjType::List)?;
                let index: usize = n
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| ModelError::NoSuchItem { list: keys::SIGNATORIES, id: n.to_string() })?;
                let Some((Value::Object(ObjType::Map), obj)) = self.doc.get(&list, index - 1)? else {
                    return Err(ModelError::NoSuchItem { list: keys::SIGNATORIES, id: n.to_string() });
                };
                match *field {
                    "org" => {
                        let org = self.resolve_org(value)?;
                        self.put_scalar(&obj, keys::ORG, Some(org.as_str()), true)
                    }
                    "role" if !value.trim().is_empty() => self.put_scalar(&obj, keys::ROLE, Some(value.trim()), true),
                    "name" => self.put_scalar(&obj, keys::NAME, Some(value.trim()).filter(|v| !v.is_empty()), true),
                    _ => Err(ModelError::UnknownField(path.to_string())),
                }
            }
            [list, id, field] => self.set_item_field(path, item_list(list)?, id, field, value),
            _ => Err(ModelError::UnknownField(path.to_string())),
        }
    }

    fn set_item_field(
        &mut self,
        path: &str,
        list: &'static str,
        id: &str,
        field: &str,
        value: &str,
    ) -> Result<(), ModelError> {
        let (_, _, obj) = find_item(self.doc, list, id)?;
        match (list, field) {
            (keys::GOALS, "text") | (keys::FOLLOWUPS, "text") | (keys::ACTIVITIES, "what") => {
                if value.trim().is_empty() {
                    return Err(invalid(path, value, "may not be empty"));
                }
                self.put_text(&obj, field, value, true)
            }
            (keys::MEETINGS, "notes") => self.put_text(&obj, field, value, true),
            (keys::ACTIVITIES, "owner") => {
                let owner = if value.trim().is_empty() { None } else { Some(self.resolve_org(value)?) };
                self.put_scalar(&obj, keys::OWNER, owner.as_ref().map(OrgId::as_str), true)
            }
            (keys::ACTIVITIES, "due") => {
                let due = parse_opt_date(path, value)?;
                self.put_scalar(&obj, keys::DUE, date_string(due).as_deref(), true)
            }
            (keys::ACTIVITIES, "status") => {
                let status: ActivityStatus =
                    value.parse().map_err(|e: super::UnknownValue| invalid(path, value, e.to_string()))?;
                self.put_scalar(&obj, keys::STATUS, Some(status.as_str()), true)
            }
            (keys::FOLLOWUPS | keys::MEETINGS, "date") => {
                let date = parse_date(path, value)?;
                self.put_scalar(&obj, keys::DATE, date_string(Some(date)).as_deref(), true)
            }
            (keys::FOLLOWUPS, "author") if !value.trim().is_empty() => {
                self.put_scalar(&obj, keys::AUTHOR, Some(value.trim()), true)
            }
            (keys::FOLLOWUPS, "activity") => {
                let activity = if value.trim().is_empty() {
                    None
                } else {
                    let (_, _, a) = find_item(self.doc, keys::ACTIVITIES, value.trim())?;
                    get_str(self.doc, &a, keys::ITEM_ID, path)?
                };
                self.put_scalar(&obj, keys::ACTIVITY, activity.as_deref(), true)
            }
            (keys::MEETINGS, "body") => {
                let body: MeetingBody =
                    value.parse().map_err(|e: super::UnknownValue| invalid(path, value, e.to_string()))?;
                self.put_scalar(&obj, keys::BODY_OF_MEETING, Some(body.as_str()), true)
            }
            _ => Err(ModelError::UnknownField(path.to_string())),
        }
    }
}

/// The list key for a user-typed list name.
fn item_list(name: &str) -> Result<&'static str, ModelError> {
    match name {
        "goals" | "goal" => Ok(keys::GOALS),
        "activities" | "activity" => Ok(keys::ACTIVITIES),
        "followups" | "followup" => Ok(keys::FOLLOWUPS),
        "meetings" | "meeting" => Ok(keys::MEETINGS),
        other => Err(ModelError::UnknownField(other.to_string())),
    }
}

/// Items of the structured lists, which are matched by id.
trait ListItem {
    fn item_id(&self) -> &ItemId;
}

macro_rules! list_item {
    ($($t:ty),*) => {$(impl ListItem for $t { fn item_id(&self) -> &ItemId { &self.id } })*};
}
list_item!(Goal, Activity, FollowUp, Meeting);
