//! Plain Rust types of the collaboration documents: what a reader of a document
//! sees once it has been read out of Automerge (see [`super::Document::view`]).

use std::fmt;
use std::str::FromStr;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::ids::{DocId, ItemId};
use crate::org::OrgId;

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

/// A concrete activity (aktivitet/åtgärd) with an owner and a deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// Item id.
    pub id: ItemId,
    /// What is to be done.
    pub what: String,
    /// The organisation responsible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<OrgId>,
    /// When it is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<NaiveDate>,
    /// Where it stands.
    pub status: ActivityStatus,
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
    /// The parties, in order.
    pub parties: Vec<OrgId>,
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

impl DocumentContent {
    /// An otherwise empty document of this kind and title.
    pub fn new(kind: DocKind, title: impl Into<String>) -> Self {
        Self {
            kind,
            scope: Scope::County,
            title: title.into(),
            parties: Vec::new(),
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
    fn enums_serialise_as_their_stored_names() {
        assert_eq!(serde_json::to_string(&MeetingBody::SteeringGroup).unwrap(), "\"steering_group\"");
        let back: DocKind = serde_json::from_str("\"operations_plan\"").unwrap();
        assert_eq!(back, DocKind::OperationsPlan);
    }
}
