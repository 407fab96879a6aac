//! Plain Rust types of the collaboration documents: what a reader of a document
//! sees once it has been read out of Automerge (see [`super::Document::view`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::ids::{DocId, ItemId};
use crate::org::{OrgId, OrgRef};

/// Parse error for the enumerations below (kinds, statuses, …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}; expected one of: {expected}")]
pub struct UnknownValue {
    what: &'static str,
    value: String,
    expected: &'static str,
}

/// Declares a string-backed enumeration: its stored name, a Swedish label, and
/// the spellings accepted from users (English, Swedish, with or without å/ä/ö).
macro_rules! string_enum {
    (
        $(#[$meta:meta])* $name:ident, $what:literal {
            $($(#[$vmeta:meta])* $variant:ident = $stored:literal, $label:literal, [$($alias:literal),*];)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "&'static str")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name stored in documents and printed in JSON.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $stored,)+ }
            }

            /// The Swedish label shown to people.
            pub fn label(self) -> &'static str {
                match self { $($name::$variant => $label,)+ }
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let wanted = s.trim().to_lowercase().replace(['-', ' '], "_");
                $(
                    if wanted == $stored || wanted == $label.to_lowercase().replace(['-', ' '], "_") $(|| wanted == $alias)* {
                        return Ok($name::$variant);
                    }
                )+
                Err(UnknownValue { what: $what, value: s.to_string(), expected: concat!($($stored, " "),+) })
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownValue;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl From<$name> for &'static str {
            fn from(v: $name) -> Self {
                v.as_str()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// The kinds of collaboration document.
    DocKind, "document kind" {
        /// Samverkansöverenskommelse: parties, period, goals, focus areas, organisation.
        Agreement = "agreement", "Samverkansöverenskommelse", ["samverkansoverenskommelse", "overenskommelse"];
        /// Medborgarlöfte: a municipality's and the local police's public promise.
        CitizenPromise = "citizen_promise", "Medborgarlöfte", ["promise", "medborgarlofte"];
        /// Verksamhetsplan / åtgärdsplan: the annual operations or action plan.
        OperationsPlan = "operations_plan", "Verksamhetsplan", ["plan", "action_plan", "verksamhetsplan", "åtgärdsplan", "atgardsplan"];
    }
}

string_enum! {
    /// Whether a document is county-wide or local to one municipality.
    Scope, "scope" {
        /// County-wide (länsövergripande).
        County = "county", "Länsövergripande", ["lan", "regional", "lansovergripande"];
        /// Local: one municipality and the local police.
        Local = "local", "Lokal", ["lokal", "kommun", "municipal"];
    }
}

string_enum! {
    /// Where an activity stands.
    ActivityStatus, "activity status" {
        /// Not started.
        Planned = "planned", "Planerad", ["planerad"];
        /// Under way.
        Ongoing = "ongoing", "Pågående", ["pagaende", "in_progress"];
        /// Finished.
        Done = "done", "Klar", ["klar", "genomford", "genomförd"];
        /// Will not be done.
        Cancelled = "cancelled", "Inställd", ["canceled", "installd", "struken"];
    }
}

string_enum! {
    /// Which body held a meeting.
    MeetingBody, "meeting body" {
        /// Styrgrupp: the steering group (meets at least twice a year).
        SteeringGroup = "steering_group", "Styrgrupp", ["styrgrupp"];
        /// Arbetsgrupp: the working group.
        WorkingGroup = "working_group", "Arbetsgrupp", ["arbetsgrupp"];
        /// The regional crime-prevention network (four times a year).
        RegionalNetwork = "regional_network", "Regionalt BF-nätverk", ["network", "natverk", "nätverk", "bf_natverk"];
        /// Any other meeting.
        Other = "other", "Övrigt", ["ovrigt", "annat"];
    }
}

/// A validity period; either end may be open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Period {
    /// First day in force.
    pub start: Option<NaiveDate>,
    /// Last day in force.
    pub end: Option<NaiveDate>,
}

/// A signature the document requires: which organisation, through which role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signatory {
    /// The signing organisation.
    pub org: OrgId,
    /// The role title, e.g. "Landshövding" or "Polisområdeschef".
    pub role: String,
    /// The person holding the role when the document was drawn up, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A goal (mål) of an agreement or plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goal {
    /// Item id.
    pub id: ItemId,
    /// The goal's text.
    pub text: String,
}

/// Who is responsible for an activity: an organisation or a unit of one (from
/// the directory, or named freely inside an organisation), or an actor outside
/// the directory (fastighetsägare, föreningar) as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Owner {
    /// An organisation or a unit of one.
    Org(OrgRef),
    /// Someone outside the directory; never a party, never checked.
    External(String),
}

impl Owner {
    /// Prefix of the stored form of [`Owner::External`] (and of how it is written
    /// where an organisation is otherwise expected: `extern: Fastighetsägarna`).
    pub const EXTERNAL_PREFIX: &'static str = "extern:";

    /// The whole organisation.
    pub fn org(org: OrgId) -> Self {
        Owner::Org(OrgRef::org(org))
    }

    /// The stored form: `org-id`, `org-id/unit` or `extern:name`.
    pub fn encode(&self) -> String {
        match self {
            Owner::Org(r) => r.encode(),
            Owner::External(name) => format!("{}{name}", Self::EXTERNAL_PREFIX),
        }
    }

    /// Reads [`Owner::encode`]'s form.
    pub fn decode(stored: &str) -> Option<Self> {
        match stored.strip_prefix(Self::EXTERNAL_PREFIX) {
            Some(name) if !name.trim().is_empty() => Some(Owner::External(name.trim().to_string())),
            Some(_) => None,
            None => OrgRef::decode(stored).map(Owner::Org),
        }
    }

    /// The organisation, if it is one.
    pub fn org_ref(&self) -> Option<&OrgRef> {
        match self {
            Owner::Org(r) => Some(r),
            Owner::External(_) => None,
        }
    }
}

impl TryFrom<String> for Owner {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Owner::decode(&s).ok_or_else(|| format!("{s:?} is not an owner (org-id, org-id/unit or extern:name)"))
    }
}

impl From<Owner> for String {
    fn from(o: Owner) -> Self {
        o.encode()
    }
}

/// When an activity is due: a day, a quarter, "löpande" (ongoing, no end), or a
/// deadline as the document words it ("Vår 2025", "Efter sommarlovet").
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Due {
    /// By this day.
    Date(NaiveDate),
    /// Within this quarter of a year.
    Quarter {
        /// The year.
        year: i32,
        /// 1 to 4.
        quarter: u8,
    },
    /// Löpande: goes on through the period, no end date.
    Ongoing,
    /// As written, when it is none of the above.
    Text(String),
}

impl Due {
    /// The stored form: `YYYY-MM-DD`, `YYYY-Qn`, `ongoing`, or the text.
    pub fn encode(&self) -> String {
        match self {
            Due::Date(d) => d.format("%Y-%m-%d").to_string(),
            Due::Quarter { year, quarter } => format!("{year}-Q{quarter}"),
            Due::Ongoing => "ongoing".to_string(),
            Due::Text(t) => t.clone(),
        }
    }

    /// Reads [`Due::encode`]'s form (anything else is text).
    pub fn decode(stored: &str) -> Self {
        Self::parse_structured(stored, None).unwrap_or_else(|| Due::Text(stored.to_string()))
    }

    /// How people read it: "2025-05-31", "Kvartal 2 2025", "Löpande", the text.
    pub fn label(&self) -> String {
        match self {
            Due::Date(d) => d.format("%Y-%m-%d").to_string(),
            Due::Quarter { year, quarter } => format!("Kvartal {quarter} {year}"),
            Due::Ongoing => "Löpande".to_string(),
            Due::Text(t) => t.clone(),
        }
    }

    /// A date (`YYYY-MM-DD`), "löpande" (also "ongoing", "fortlöpande",
    /// "kontinuerligt"), or a quarter ("Q2 2025", "2025-Q2", "kvartal 2 2025",
    /// "kv. 2"; without a year, `year` is used). Case-insensitive; `None` for
    /// anything else.
    pub fn parse_structured(text: &str, year: Option<i32>) -> Option<Self> {
        let t = text.trim().trim_end_matches('.').trim().to_lowercase();
        if let Ok(d) = NaiveDate::parse_from_str(&t, "%Y-%m-%d") {
            return Some(Due::Date(d));
        }
        if [
            "löpande",
            "lopande",
            "ongoing",
            "fortlöpande",
            "kontinuerligt",
            "löpande under året",
            "löpande under perioden",
        ]
        .contains(&t.as_str())
        {
            return Some(Due::Ongoing);
        }
        parse_quarter(&t, year).map(|(year, quarter)| Due::Quarter { year, quarter })
    }

    /// Strict parse for typed input (CLI, `set`): [`Due::parse_structured`] or an error.
    pub fn parse_strict(text: &str) -> Result<Self, String> {
        Self::parse_structured(text, None)
            .ok_or_else(|| "use YYYY-MM-DD, löpande, or a quarter such as 2025-Q2 or \"Q2 2025\"".to_string())
    }

    /// The last day it can be done by, if it has one.
    pub fn last_day(&self) -> Option<NaiveDate> {
        match self {
            Due::Date(d) => Some(*d),
            Due::Quarter { year, quarter } => match quarter {
                4 => NaiveDate::from_ymd_opt(*year, 12, 31),
                q => NaiveDate::from_ymd_opt(*year, u32::from(*q) * 3 + 1, 1).and_then(|d| d.pred_opt()),
            },
            Due::Ongoing | Due::Text(_) => None,
        }
    }
}

/// "q2 2025", "2025-q2", "kvartal 2 2025", "kv 2", "kv. 2 2025", "q2" → (year, quarter).
fn parse_quarter(t: &str, default_year: Option<i32>) -> Option<(i32, u8)> {
    let t = t.replace(['.', ','], " ");
    let words: Vec<&str> = t.split(|c: char| c.is_whitespace() || c == '-').filter(|w| !w.is_empty()).collect();
    let mut quarter = None;
    let mut year = None;
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        let number = |s: &str| s.parse::<u8>().ok().filter(|q| (1..=4).contains(q));
        if let Some(q) = w.strip_prefix('q').and_then(number).or_else(|| w.strip_prefix("kv").and_then(number)) {
            quarter = quarter.or(Some(q));
        } else if ["kvartal", "kv", "q"].contains(&w) {
            quarter = quarter.or(words.get(i + 1).copied().and_then(number));
            i += 1;
        } else if w.len() == 4 && w.chars().all(|c| c.is_ascii_digit()) {
            year = year.or(w.parse::<i32>().ok());
        } else {
            return None;
        }
        i += 1;
    }
    Some((year.or(default_year)?, quarter?))
}

impl TryFrom<String> for Due {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Ok(Due::decode(&s))
    }
}

impl From<Due> for String {
    fn from(d: Due) -> Self {
        d.encode()
    }
}

impl fmt::Display for Due {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// A concrete activity (aktivitet/åtgärd/löfte): what, who, by when, how it is followed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// Item id.
    pub id: ItemId,
    /// What is to be done.
    pub what: String,
    /// Who is responsible, in the order the document names them ("Kommunen och polisen": two).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owners: Vec<Owner>,
    /// When it is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<Due>,
    /// How it is followed up (the table's "Uppföljning" column), e.g. "Antal genomförda vandringar".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub followup_method: Option<String>,
    /// Where it stands.
    pub status: ActivityStatus,
}

impl Activity {
    /// A planned activity with a fresh id and nothing but its description.
    pub fn new(what: impl Into<String>) -> Self {
        Self {
            id: ItemId::random(),
            what: what.into(),
            owners: Vec::new(),
            due: None,
            followup_method: None,
            status: ActivityStatus::Planned,
        }
    }
}

/// A dated follow-up (uppföljning) entry, optionally about one activity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowUp {
    /// Item id.
    pub id: ItemId,
    /// Date of the follow-up.
    pub date: NaiveDate,
    /// Who wrote it.
    pub author: String,
    /// The evaluation text.
    pub text: String,
    /// The activity it follows up, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<ItemId>,
}

/// A meeting record (steering group, network, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meeting {
    /// Item id.
    pub id: ItemId,
    /// Date held.
    pub date: NaiveDate,
    /// Which body met.
    pub body: MeetingBody,
    /// Minutes and decisions.
    pub notes: String,
}

/// Everything a document says, read out of Automerge at one version.
///
/// Two nodes whose documents have equal heads produce equal views; the JSON
/// form of a view is what "same content" means in tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentView {
    /// Document id.
    pub id: DocId,
    /// Document kind.
    pub kind: DocKind,
    /// County-wide or local.
    pub scope: Scope,
    /// Title.
    pub title: String,
    /// The parties, in order: the organisations the document reaches (access control).
    pub parties: Vec<OrgId>,
    /// The unit each party acts through, where the document names one (the police
    /// area's party is "Lokalpolisområde Katrineholm"); shown for the party and its
    /// signatories, never used for access.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub party_units: BTreeMap<OrgId, String>,
    /// Validity period.
    pub period: Period,
    /// Place of signing, e.g. "Nyköping/ Eskilstuna".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub place: Option<String>,
    /// The document's date (as printed beside the signatures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<NaiveDate>,
    /// Signatures the document requires.
    pub signatories: Vec<Signatory>,
    /// The formatted text, as Markdown.
    pub body: String,
    /// Goals.
    pub goals: Vec<Goal>,
    /// Activities.
    pub activities: Vec<Activity>,
    /// Follow-up entries.
    pub followups: Vec<FollowUp>,
    /// Meeting records.
    pub meetings: Vec<Meeting>,
}

/// Content for a new document, before it has an id (import, `new`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentContent {
    /// Document kind.
    pub kind: DocKind,
    /// County-wide or local.
    pub scope: Scope,
    /// Title.
    pub title: String,
    /// Parties.
    pub parties: Vec<OrgId>,
    /// The unit each party acts through, where one is named.
    pub party_units: BTreeMap<OrgId, String>,
    /// Validity period.
    pub period: Period,
    /// Place of signing.
    pub place: Option<String>,
    /// The document's date.
    pub date: Option<NaiveDate>,
    /// Required signatures.
    pub signatories: Vec<Signatory>,
    /// Markdown body.
    pub body: String,
    /// Goals.
    pub goals: Vec<Goal>,
    /// Activities.
    pub activities: Vec<Activity>,
    /// Follow-ups.
    pub followups: Vec<FollowUp>,
    /// Meetings.
    pub meetings: Vec<Meeting>,
}

/// The parties with the unit each acts through, in order.
pub fn party_refs(parties: &[OrgId], units: &BTreeMap<OrgId, String>) -> Vec<OrgRef> {
    parties.iter().map(|p| OrgRef { org: p.clone(), unit: units.get(p).cloned() }).collect()
}

/// Parties and party units from references: each organisation once, in order,
/// with the first unit named for it.
pub fn parties_from_refs(refs: &[OrgRef]) -> (Vec<OrgId>, BTreeMap<OrgId, String>) {
    let mut parties: Vec<OrgId> = Vec::new();
    let mut units = BTreeMap::new();
    for r in refs {
        if !parties.contains(&r.org) {
            parties.push(r.org.clone());
        }
        if let Some(unit) = &r.unit {
            units.entry(r.org.clone()).or_insert_with(|| unit.clone());
        }
    }
    (parties, units)
}

impl DocumentView {
    /// The parties with the unit each acts through, in order.
    pub fn party_refs(&self) -> Vec<OrgRef> {
        party_refs(&self.parties, &self.party_units)
    }
}

impl DocumentContent {
    /// The parties with the unit each acts through, in order.
    pub fn party_refs(&self) -> Vec<OrgRef> {
        party_refs(&self.parties, &self.party_units)
    }

    /// Sets the parties from references: each organisation once, with its unit if one is named.
    pub fn set_party_refs(&mut self, refs: &[OrgRef]) {
        (self.parties, self.party_units) = parties_from_refs(refs);
    }

    /// An otherwise empty document of this kind and title.
    pub fn new(kind: DocKind, title: impl Into<String>) -> Self {
        Self {
            kind,
            scope: Scope::County,
            title: title.into(),
            parties: Vec::new(),
            party_units: BTreeMap::new(),
            period: Period::default(),
            place: None,
            date: None,
            signatories: Vec::new(),
            body: String::new(),
            goals: Vec::new(),
            activities: Vec::new(),
            followups: Vec::new(),
            meetings: Vec::new(),
        }
    }

    /// This content as the view of a document with the given id.
    pub fn into_view(self, id: DocId) -> DocumentView {
        DocumentView {
            id,
            kind: self.kind,
            scope: self.scope,
            title: self.title,
            parties: self.parties,
            party_units: self.party_units,
            period: self.period,
            place: self.place,
            date: self.date,
            signatories: self.signatories,
            body: self.body,
            goals: self.goals,
            activities: self.activities,
            followups: self.followups,
            meetings: self.meetings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_accept_english_swedish_and_ascii_spellings() {
        assert_eq!("medborgarlöfte".parse::<DocKind>().unwrap(), DocKind::CitizenPromise);
        assert_eq!("citizen-promise".parse::<DocKind>().unwrap(), DocKind::CitizenPromise);
        assert_eq!("Åtgärdsplan".parse::<DocKind>().unwrap(), DocKind::OperationsPlan);
        assert_eq!("pågående".parse::<ActivityStatus>().unwrap(), ActivityStatus::Ongoing);
        assert_eq!("DONE".parse::<ActivityStatus>().unwrap(), ActivityStatus::Done);
        let err = "finished-ish".parse::<ActivityStatus>().unwrap_err().to_string();
        assert!(err.contains("planned ongoing done cancelled"), "{err}");
    }

    #[test]
    fn deadlines_read_dates_quarters_and_lopande_and_keep_other_wording() {
        let d = |s: &str| Due::parse_structured(s, Some(2025));
        assert_eq!(d("2025-05-31"), Some(Due::Date(NaiveDate::from_ymd_opt(2025, 5, 31).unwrap())));
        assert_eq!(d("Löpande"), Some(Due::Ongoing));
        assert_eq!(d("löpande."), Some(Due::Ongoing));
        for q in ["Q2 2025", "2025-Q2", "kvartal 2 2025", "Kv. 2", "kv2", "Kvartal 2", "q2"] {
            assert_eq!(d(q), Some(Due::Quarter { year: 2025, quarter: 2 }), "{q}");
        }
        assert_eq!(Due::parse_structured("Q2", None), None, "a quarter needs a year");
        assert_eq!(d("Q5 2025"), None);
        assert_eq!(d("Vår 2025"), None);
        for due in [
            d("2025-05-31").unwrap(),
            Due::Ongoing,
            Due::Quarter { year: 2025, quarter: 4 },
            Due::Text("Vår 2025".into()),
        ] {
            assert_eq!(Due::decode(&due.encode()), due);
            assert_eq!(Due::parse_structured(&due.label(), None).unwrap_or(Due::Text(due.label())), due);
        }
        assert_eq!(Due::Quarter { year: 2025, quarter: 1 }.last_day(), NaiveDate::from_ymd_opt(2025, 3, 31));
        assert_eq!(Due::Quarter { year: 2025, quarter: 4 }.last_day(), NaiveDate::from_ymd_opt(2025, 12, 31));
        assert!(Due::parse_strict("snart").unwrap_err().contains("löpande"));
    }

    #[test]
    fn owners_are_stored_as_ids_units_or_external_names() {
        let police = OrgId::new("polisomrade-sodermanland").unwrap();
        let owners = [
            Owner::org(police.clone()),
            Owner::Org(OrgRef::unit(police, "Lokalpolisområde Katrineholm")),
            Owner::External("Fastighetsägarna i centrum".into()),
        ];
        for o in owners {
            assert_eq!(Owner::decode(&o.encode()), Some(o.clone()));
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(serde_json::from_str::<Owner>(&json).unwrap(), o);
        }
        assert_eq!(Owner::decode("Polisen"), None);
        assert_eq!(Owner::decode("extern: "), None);
    }

    #[test]
    fn enums_serialise_as_their_stored_names() {
        assert_eq!(serde_json::to_string(&MeetingBody::SteeringGroup).unwrap(), "\"steering_group\"");
        let back: DocKind = serde_json::from_str("\"operations_plan\"").unwrap();
        assert_eq!(back, DocKind::OperationsPlan);
    }
}
