//! Writing documents: every edit a user can make, validated, as Automerge operations.
//!
//! Edits are targeted so that they merge well: text is changed by a minimal
//! character diff (never replaced wholesale), list items are inserted and
//! deleted by id (never rewritten), and a scalar is only written when its value
//! actually changes, so an unchanged field never creates a spurious conflict.

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};
use chrono::NaiveDate;

use std::collections::BTreeMap;

use super::owners::{split_top_level, PartyContext};
use super::read::{find_item, get_obj, get_str, keys};
use super::{
    Activity, ActivityStatus, DocumentView, Due, EditContext, FollowUp, Goal, Meeting, MeetingBody, ModelError, Owner,
    Period, Scope, Signatory, SCHEMA_VERSION,
};
use crate::ids::ItemId;
use crate::org::{Directory, OrgId, OrgRef};

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

    /// The document's parties with their units, for reading owners in its words.
    fn party_context(&self) -> Result<PartyContext<'a>, ModelError> {
        let parties = super::read::parties(self.doc)?;
        let units = super::read::party_units(self.doc, &parties)?;
        Ok(PartyContext::new(self.directory, super::party_refs(&parties, &units)))
    }

    /// Resolves an owner a user typed, in this document's words: an organisation
    /// or unit ("Lokalpolisområde Katrineholm", "Flen (tekniska förvaltningen)"),
    /// a generic word for one of its parties ("kommunen", "polisen"), or
    /// `extern: name` for someone outside the directory.
    pub fn resolve_owner(&self, text: &str) -> Result<Owner, ModelError> {
        let context = self.party_context()?;
        if let Some(owner) = context.resolve_owner(text) {
            return Ok(owner);
        }
        // "Flen (Lokalpolisområde Nyköping)": say whose unit it is.
        if let Some((base, unit)) = crate::org::split_parenthesis(text.trim()) {
            if let Some(base) = context.resolve_ref(base) {
                self.validate_unit(&base.org, unit)?;
            }
        }
        Err(ModelError::UnknownOwner(text.trim().to_string()))
    }

    /// Resolves owners a user typed in one text ("Kommunen och polisen",
    /// "Flen (tekniska förvaltningen); extern: Fastighetsägarna"), each as
    /// [`Editor::resolve_owner`] takes it.
    pub fn resolve_owners(&self, text: &str) -> Result<Vec<Owner>, ModelError> {
        split_top_level(text).into_iter().map(|o| self.resolve_owner(o)).collect()
    }

    /// Resolves a party a user typed: an organisation or a unit of one (the unit is
    /// kept beside the party; the organisation is what access control matches).
    pub fn resolve_party(&self, text: &str) -> Result<OrgRef, ModelError> {
        self.directory.resolve_ref(text).ok_or_else(|| ModelError::UnknownOrganisation(text.trim().to_string()))
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
        self.set_party_units(&view.party_units)?;
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

    /// Sets the unit each party acts through (organisation id → unit name); a party
    /// not in the map has none. Only entries that change are written.
    pub fn set_party_units(&mut self, units: &BTreeMap<OrgId, String>) -> Result<(), ModelError> {
        let parties = super::read::parties(self.doc)?;
        for (org, unit) in units {
            if !parties.contains(org) {
                return Err(invalid("party_units", org.as_str(), "a unit can only be given for a party"));
            }
            self.validate_unit(org, unit)?;
        }
        let current = super::read::party_units(self.doc, &parties)?;
        if current == *units
            && get_obj(self.doc, &ROOT, keys::PARTY_UNITS, ObjType::Map)?
                .is_none_or(|m| self.doc.keys(&m).count() == units.len())
        {
            return Ok(());
        }
        let map = self.child(&ROOT, keys::PARTY_UNITS, ObjType::Map)?;
        let present: Vec<String> = self.doc.keys(&map).collect();
        for key in present {
            if !units.keys().any(|o| o.as_str() == key) {
                self.doc.delete(&map, key.as_str())?;
            }
        }
        for (org, unit) in units {
            let unit =
                self.directory.unit_ref(org, unit).and_then(|r| r.unit).unwrap_or_else(|| unit.trim().to_string());
            self.put_scalar(&map, org.as_str(), Some(&unit), false)?;
        }
        Ok(())
    }

    /// A unit name must be usable, and a unit the directory knows must be under its own organisation.
    fn validate_unit(&self, org: &OrgId, unit: &str) -> Result<(), ModelError> {
        if let Some((owner, known)) = self.directory.resolve_unit(unit) {
            if &owner.id != org {
                return Err(invalid(
                    "unit",
                    unit,
                    format!("{} is a unit of {}, not of {}", known.name, owner.name, self.directory.name_of(org)),
                ));
            }
        }
        if self.directory.unit_ref(org, unit).is_none() {
            return Err(invalid(
                "unit",
                unit,
                "a unit needs a name of one line (at most 200 characters, parentheses closed, no '/')",
            ));
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
        self.validate_owners(&a.owners)?;
        if let Some(Due::Text(text)) = &a.due {
            if text.trim().is_empty() || text.chars().count() > 200 || text.contains(['\n', '\r']) {
                return Err(invalid("activity due", text, "a deadline in words must be one line"));
            }
        }
        if let Some(Due::Quarter { quarter, .. }) = &a.due {
            if !(1..=4).contains(quarter) {
                return Err(invalid("activity due", &quarter.to_string(), "a quarter is 1 to 4"));
            }
        }
        Ok(())
    }

    fn validate_owners(&self, owners: &[Owner]) -> Result<(), ModelError> {
        for owner in owners {
            match owner {
                Owner::Org(r) => {
                    self.check_org(&r.org)?;
                    if let Some(unit) = &r.unit {
                        self.validate_unit(&r.org, unit)?;
                    }
                }
                Owner::External(name) => {
                    if name.trim().is_empty() || name.chars().count() > 200 || name.contains(['\n', '\r']) {
                        return Err(invalid(
                            "activity owner",
                            name,
                            "someone outside the directory needs a name of one line",
                        ));
                    }
                }
            }
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
        // A new activity (nothing but its id yet) gets its owners list at once, so
        // that owners added later on two nodes go into one list.
        let fresh = self.doc.keys(obj).collect::<Vec<_>>() == [keys::ITEM_ID];
        if fresh {
            self.doc.put_object(obj, keys::OWNERS, ObjType::List)?;
        }
        self.put_text(obj, keys::WHAT, &a.what, false)?;
        self.write_owners(obj, &a.owners, false)?;
        self.write_due(obj, a.due.as_ref(), false)?;
        self.write_followup_method(obj, a.followup_method.as_deref(), false)?;
        self.put_scalar(obj, keys::STATUS, Some(a.status.as_str()), false)
    }

    /// Brings an activity's `owners` list in line with `owners` (in order) with the
    /// fewest list operations; an activity written before the list keeps its legacy
    /// `owner` until its owners change, then the list replaces it. With `force`, a
    /// conflict between two concurrently created lists is settled with a fresh list.
    fn write_owners(&mut self, obj: &ObjId, owners: &[Owner], force: bool) -> Result<(), ModelError> {
        let all = self.doc.get_all(obj, keys::OWNERS)?;
        let lists: Vec<ObjId> =
            all.iter().filter(|(v, _)| matches!(v, Value::Object(ObjType::List))).map(|(_, id)| id.clone()).collect();
        let wanted: Vec<String> = owners.iter().map(Owner::encode).collect();
        let list = match lists.as_slice() {
            [one] if all.len() == 1 => one.clone(),
            [.., shown] if !force && all.len() > 1 => shown.clone(),
            _ => {
                let legacy = super::read::owners(self.doc, obj, "activity")?;
                if all.is_empty() && legacy == owners && !force {
                    return Ok(());
                }
                let list = self.doc.put_object(obj, keys::OWNERS, ObjType::List)?;
                for (i, w) in wanted.iter().enumerate() {
                    self.doc.insert(&list, i, w.as_str())?;
                }
                if self.doc.get(obj, keys::OWNER)?.is_some() {
                    self.doc.delete(obj, keys::OWNER)?;
                }
                return Ok(());
            }
        };
        // Drop what is not wanted (and repeats), then put each wanted owner in its place.
        let read = |doc: &AutoCommit| -> Result<Vec<Option<String>>, ModelError> {
            (0..doc.length(&list))
                .map(|i| {
                    Ok(match doc.get(&list, i)? {
                        Some((Value::Scalar(s), _)) => s.as_str().map(str::to_owned),
                        _ => None,
                    })
                })
                .collect()
        };
        let current = read(self.doc)?;
        let mut seen: Vec<&str> = Vec::new();
        for i in (0..current.len()).rev() {
            let keep = current[i].as_deref().filter(|c| wanted.iter().any(|w| w == c));
            let first = keep.is_some_and(|c| current[..i].iter().all(|o| o.as_deref() != Some(c)));
            match keep {
                Some(c) if first && !seen.contains(&c) => seen.push(c),
                _ => self.doc.delete(&list, i)?,
            }
        }
        for (i, w) in wanted.iter().enumerate() {
            let current = read(self.doc)?;
            if current.get(i).and_then(|c| c.as_deref()) == Some(w.as_str()) {
                continue;
            }
            if let Some(at) = current.iter().position(|c| c.as_deref() == Some(w.as_str())) {
                self.doc.delete(&list, at)?;
            }
            self.doc.insert(&list, i, w.as_str())?;
        }
        Ok(())
    }

    /// Writes an activity's deadline to `deadline` when it changes; a legacy `due`
    /// date is removed once `deadline` holds the deadline.
    fn write_due(&mut self, obj: &ObjId, due: Option<&Due>, force: bool) -> Result<(), ModelError> {
        let has_deadline = self.doc.get(obj, keys::DEADLINE)?.is_some();
        let has_legacy = self.doc.get(obj, keys::DUE)?.is_some();
        if !has_deadline && !force {
            let legacy = super::read::due(self.doc, obj, "activity")?;
            if legacy.as_ref() == due {
                return Ok(());
            }
        }
        let stored = due.map(Due::encode);
        if has_deadline || stored.is_some() {
            self.put_scalar(obj, keys::DEADLINE, stored.as_deref(), force)?;
        }
        if has_legacy {
            self.doc.delete(obj, keys::DUE)?;
        }
        Ok(())
    }

    fn write_followup_method(&mut self, obj: &ObjId, method: Option<&str>, force: bool) -> Result<(), ModelError> {
        let method = method.map(str::trim).filter(|m| !m.is_empty());
        match method {
            Some(m) => self.put_text(obj, keys::FOLLOWUP_METHOD, m, force),
            None if self.doc.get(obj, keys::FOLLOWUP_METHOD)?.is_some() => {
                self.put_text(obj, keys::FOLLOWUP_METHOD, "", force)
            }
            None => Ok(()),
        }
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
                let refs =
                    split_top_level(value).into_iter().map(|p| self.resolve_party(p)).collect::<Result<Vec<_>, _>>()?;
                let (parties, units) = super::parties_from_refs(&refs);
                self.set_parties(&parties)?;
                self.set_party_units(&units)
            }
            ["party_units", org] => {
                let org = self.resolve_org(org)?;
                let parties = super::read::parties(self.doc)?;
                let mut units = super::read::party_units(self.doc, &parties)?;
                match value.trim() {
                    "" => units.remove(&org),
                    unit => units.insert(org.clone(), unit.to_string()),
                };
                if !parties.contains(&org) {
                    return Err(invalid(path, value, "a unit can only be given for a party"));
                }
                if let Some(unit) = units.get(&org) {
                    self.validate_unit(&org, unit)?;
                }
                let map = self.child(&ROOT, keys::PARTY_UNITS, ObjType::Map)?;
                let unit = units
                    .get(&org)
                    .map(|u| self.directory.unit_ref(&org, u).and_then(|r| r.unit).unwrap_or_else(|| u.clone()));
                self.put_scalar(&map, org.as_str(), unit.as_deref(), true)
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
            (keys::ACTIVITIES, "owner" | "owners") => {
                let owners = self.resolve_owners(value)?;
                self.validate_owners(&owners)?;
                self.write_owners(&obj, &owners, true)
            }
            (keys::ACTIVITIES, "due") => {
                let due = match value.trim() {
                    "" => None,
                    v => Some(Due::parse_strict(v).map_err(|reason| invalid(path, value, reason))?),
                };
                self.write_due(&obj, due.as_ref(), true)
            }
            (keys::ACTIVITIES, "followup_method") => self.write_followup_method(&obj, Some(value), true),
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
