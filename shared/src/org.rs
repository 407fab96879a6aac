//! Organisations (parties), the units within them, and the directory that names them.
//!
//! Documents refer to parties by [`OrgId`] (a stable slug such as `eskilstuna-kommun`);
//! the [`Directory`] turns ids into display names and recognises the names and
//! aliases people write in running text ("Polisområde Södermanland", "Eskilstuna").
//!
//! An organisation is what a node belongs to and what access control matches. A
//! [`Unit`] is a part of one that documents name — a lokalpolisområde of the police
//! area, a förvaltning of a municipality — and never syncs on its own: an
//! [`OrgRef`] names an organisation and optionally a unit, and wherever access
//! matters only its organisation counts. Units known to the directory are
//! recognised by name and alias; any other unit may be named freely inside an
//! organisation ("Katrineholms kommun (tekniska förvaltningen)").
//!
//! The directory is data, not code: `organisations.toml` (Södermanland: Länsstyrelsen,
//! the police area with its lokalpolisområden, nine municipalities) is embedded as
//! the default, and a file in the same format can add or replace organisations
//! ([`Directory::with_overrides`]), e.g. another county.

use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// The default directory, embedded in every build.
const DEFAULT_DIRECTORY: &str = include_str!("organisations.toml");

/// Names that point at an organisation only through the document they are read
/// in ("polisen" is whichever police party the document has): a mention by one of
/// these is not an explicit choice of the whole organisation.
const GENERIC_NAMES: [&str; 6] = ["polisen", "polismyndigheten", "länsstyrelsen", "kommunen", "kommun", "polis"];

/// Longest unit name accepted (free names included).
const MAX_UNIT_NAME: usize = 200;

/// Stable identifier of an organisation: lowercase ASCII letters, digits and '-'.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrgId(String);

impl OrgId {
    /// Makes an id from a slug, or `None` if it holds anything but `[a-z0-9-]`.
    pub fn new(slug: &str) -> Option<Self> {
        let ok = !slug.is_empty()
            && slug.len() <= 64
            && slug.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        ok.then(|| Self(slug.to_string()))
    }

    /// The slug.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OrgId({})", self.0)
    }
}

/// The distinct sets of parties an index of many documents holds, each kept
/// once: documents share a few (a county-wide agreement has every
/// organisation, a municipality's promise its own and the police), so an
/// index entry holds a shared copy rather than every party's name again. A
/// set no document has any more stays until the whole is dropped; there are
/// never more sets than documents indexed.
#[derive(Debug, Default)]
pub struct PartySets(std::collections::HashSet<std::sync::Arc<[OrgId]>>);

impl PartySets {
    /// The shared copy of `parties` (in this order), made on first sight.
    pub fn share(&mut self, parties: &[OrgId]) -> std::sync::Arc<[OrgId]> {
        if let Some(set) = self.0.get(parties) {
            return set.clone();
        }
        let set: std::sync::Arc<[OrgId]> = parties.into();
        self.0.insert(set.clone());
        set
    }
}

/// What kind of public body an organisation is; decides which documents it typically signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrgKind {
    /// Länsstyrelsen: the County Administrative Board, regional coordinator; runs the relay.
    CountyBoard,
    /// Polisområde: the police area.
    Police,
    /// Kommun: a municipality.
    Municipality,
    /// Any other public body that takes part (a region, a fire and rescue association).
    Other,
}

impl OrgKind {
    /// How a document of this party's own refers to a party of this kind
    /// ("Kommunen och polisen ansvarar"), capitalised.
    pub fn generic_name(self) -> Option<&'static str> {
        match self {
            OrgKind::CountyBoard => Some("Länsstyrelsen"),
            OrgKind::Police => Some("Polisen"),
            OrgKind::Municipality => Some("Kommunen"),
            OrgKind::Other => None,
        }
    }
}

/// What kind of part of an organisation a unit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitKind {
    /// Lokalpolisområde: a local police area of a polisområde, led by a lokalpolisområdeschef.
    LocalPoliceArea,
    /// Förvaltning: an administration of a municipality.
    Administration,
    /// Anything else.
    Other,
}

/// A part of an organisation that documents name: a lokalpolisområde, a förvaltning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unit {
    /// Its name as documents print it, e.g. "Lokalpolisområde Katrineholm"; stored in documents.
    pub name: String,
    /// Kind of unit.
    pub kind: UnitKind,
    /// Other names people write for it (matched case-insensitively).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The municipalities it serves (a lokalpolisområde's area), by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub covers: Vec<OrgId>,
}

/// A county (län) of the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct County {
    /// Short id, e.g. "sodermanland".
    pub id: String,
    /// Its name, e.g. "Södermanlands län".
    pub name: String,
}

/// One party that can appear in documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Organisation {
    /// Stable id used inside documents.
    pub id: OrgId,
    /// Official display name, e.g. "Länsstyrelsen i Södermanlands län".
    pub name: String,
    /// Kind of body.
    pub kind: OrgKind,
    /// The county it belongs to (a [`County::id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub county: Option<String>,
    /// Other names people write for it (matched case-insensitively).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Its units that the directory knows by name (others may be named freely).
    #[serde(default, alias = "unit", skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<Unit>,
}

impl Organisation {
    /// The known unit with this name or alias (case-insensitive).
    pub fn unit(&self, name: &str) -> Option<&Unit> {
        let wanted = normalise(name);
        self.units.iter().find(|u| normalise(&u.name) == wanted || u.aliases.iter().any(|a| normalise(a) == wanted))
    }
}

/// An organisation, or a unit within one: a party, a signatory's body or an
/// activity's owner. Only [`OrgRef::org`] counts for access control; the unit
/// is what the document says beyond it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrgRef {
    /// The organisation.
    pub org: OrgId,
    /// The unit within it, by name: a known unit's canonical name or a free name.
    pub unit: Option<String>,
}

impl OrgRef {
    /// The whole organisation.
    pub fn org(org: OrgId) -> Self {
        Self { org, unit: None }
    }

    /// A unit of an organisation.
    pub fn unit(org: OrgId, unit: impl Into<String>) -> Self {
        Self { org, unit: Some(unit.into()) }
    }

    /// The stored form: `org-id` or `org-id/unit name` (ids never hold '/').
    pub fn encode(&self) -> String {
        match &self.unit {
            Some(unit) => format!("{}/{unit}", self.org),
            None => self.org.to_string(),
        }
    }

    /// Reads [`OrgRef::encode`]'s form; `None` if the id is not one.
    pub fn decode(stored: &str) -> Option<Self> {
        match stored.split_once('/') {
            Some((org, unit)) if !unit.trim().is_empty() => Some(Self::unit(OrgId::new(org)?, unit.trim())),
            Some(_) => None,
            None => Some(Self::org(OrgId::new(stored)?)),
        }
    }
}

/// A name found in running text by [`Directory::mentions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mention {
    /// What it names.
    pub target: OrgRef,
    /// Byte range in the lowercased text.
    pub range: std::ops::Range<usize>,
    /// Whether it names the organisation itself rather than through a generic
    /// word ("Polisområde Södermanland", not "polisen").
    pub explicit: bool,
}

/// Errors loading a directory file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryFileError {
    /// Not valid TOML, or keys the format does not have.
    #[error("organisation directory: {0}")]
    Format(String),
    /// Valid TOML that does not make a usable directory.
    #[error("organisation directory: {0}")]
    Invalid(String),
}

/// The file format of `organisations.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectoryFile {
    #[serde(default)]
    county: Vec<County>,
    #[serde(default)]
    organisation: Vec<Organisation>,
}

/// The organisations a node knows, by id and by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    #[serde(default)]
    counties: Vec<County>,
    organisations: Vec<Organisation>,
}

impl Directory {
    /// An empty directory.
    pub fn empty() -> Self {
        Self { counties: Vec::new(), organisations: Vec::new() }
    }

    /// The default directory (the embedded `organisations.toml`): the parties of
    /// Södermanland county — Länsstyrelsen, Polisområde Södermanland with its four
    /// lokalpolisområden, and the nine municipalities.
    pub fn sodermanland() -> Self {
        static DEFAULT: OnceLock<Directory> = OnceLock::new();
        DEFAULT
            .get_or_init(|| {
                // The embedded file is checked by the tests; an error here is a build defect.
                Self::from_toml(DEFAULT_DIRECTORY).unwrap_or_else(|e| panic!("the embedded organisations.toml: {e}"))
            })
            .clone()
    }

    /// Reads a directory from the TOML format of `organisations.toml`.
    pub fn from_toml(text: &str) -> Result<Self, DirectoryFileError> {
        let file: DirectoryFile = toml::from_str(text).map_err(|e| DirectoryFileError::Format(e.to_string()))?;
        let directory = Self { counties: file.county, organisations: file.organisation };
        directory.validate()?;
        Ok(directory)
    }

    /// This directory with a file's counties and organisations added; an
    /// organisation with an id already here replaces it (with its units).
    pub fn with_overrides(&self, text: &str) -> Result<Self, DirectoryFileError> {
        let file: DirectoryFile = toml::from_str(text).map_err(|e| DirectoryFileError::Format(e.to_string()))?;
        let mut directory = self.clone();
        for county in file.county {
            match directory.counties.iter_mut().find(|c| c.id == county.id) {
                Some(existing) => *existing = county,
                None => directory.counties.push(county),
            }
        }
        for org in file.organisation {
            directory.upsert(org);
        }
        directory.validate()?;
        Ok(directory)
    }

    /// Checks ids, references and that every name and alias names one thing.
    fn validate(&self) -> Result<(), DirectoryFileError> {
        let invalid = |m: String| Err(DirectoryFileError::Invalid(m));
        let mut labels: std::collections::HashMap<String, (OrgId, Option<String>)> = Default::default();
        for (i, org) in self.organisations.iter().enumerate() {
            if OrgId::new(org.id.as_str()).is_none() {
                return invalid(format!(
                    "{:?} is not an organisation id (lowercase a-z, 0-9 and '-')",
                    org.id.as_str()
                ));
            }
            if self.organisations[..i].iter().any(|o| o.id == org.id) {
                return invalid(format!("organisation {} is listed twice", org.id));
            }
            if org.name.trim().is_empty() {
                return invalid(format!("organisation {} has no name", org.id));
            }
            if let Some(county) = &org.county {
                if !self.counties.iter().any(|c| &c.id == county) {
                    return invalid(format!("organisation {} names county {county:?}, which is not listed", org.id));
                }
            }
            let org_labels = std::iter::once(&org.name).chain(&org.aliases).map(|l| (l, None));
            let unit_labels = org
                .units
                .iter()
                .flat_map(|u| std::iter::once(&u.name).chain(&u.aliases).map(move |l| (l, Some(normalise(&u.name)))));
            for (label, unit) in org_labels.chain(unit_labels) {
                let key = normalise(label);
                if key.is_empty() {
                    return invalid(format!("organisation {} has an empty name or alias", org.id));
                }
                let target = (org.id.clone(), unit);
                match labels.get(&key) {
                    Some(existing) if existing != &target => {
                        return invalid(format!("the name {label:?} is used by two organisations or units"));
                    }
                    _ => {
                        labels.insert(key, target);
                    }
                }
            }
            for unit in &org.units {
                if unit.name.trim().is_empty() || unit.name.chars().count() > MAX_UNIT_NAME || unit.name.contains('\n')
                {
                    return invalid(format!("a unit of {} has no usable name", org.id));
                }
            }
        }
        for org in &self.organisations {
            for unit in &org.units {
                if let Some(missing) = unit.covers.iter().find(|m| self.get(m).is_none()) {
                    return invalid(format!("unit {} covers {missing}, which is not listed", unit.name));
                }
            }
        }
        Ok(())
    }

    /// Every organisation, in directory order.
    pub fn organisations(&self) -> &[Organisation] {
        &self.organisations
    }

    /// Every county.
    pub fn counties(&self) -> &[County] {
        &self.counties
    }

    /// Adds or replaces an organisation (matched by id).
    pub fn upsert(&mut self, org: Organisation) {
        match self.organisations.iter_mut().find(|o| o.id == org.id) {
            Some(existing) => *existing = org,
            None => self.organisations.push(org),
        }
    }

    /// The organisation with this id.
    pub fn get(&self, id: &OrgId) -> Option<&Organisation> {
        self.organisations.iter().find(|o| &o.id == id)
    }

    /// Display name for an id; the raw id if unknown.
    pub fn name_of<'a>(&'a self, id: &'a OrgId) -> &'a str {
        self.get(id).map(|o| o.name.as_str()).unwrap_or(id.as_str())
    }

    /// Resolves what a user typed to an organisation (an id, the official name or
    /// an alias; case-insensitive). Units are not organisations: see [`Directory::resolve_ref`].
    pub fn resolve(&self, text: &str) -> Option<&Organisation> {
        let wanted = normalise(text);
        self.organisations.iter().find(|o| {
            o.id.as_str() == wanted || normalise(&o.name) == wanted || o.aliases.iter().any(|a| normalise(a) == wanted)
        })
    }

    /// The known unit with this name or alias, with its organisation.
    pub fn resolve_unit(&self, text: &str) -> Option<(&Organisation, &Unit)> {
        self.organisations.iter().find_map(|o| o.unit(text).map(|u| (o, u)))
    }

    /// Resolves an organisation or unit as written: an organisation ("Flens kommun"),
    /// a known unit ("Lokalpolisområde Katrineholm", "LPO Katrineholm"), or a unit
    /// named inside an organisation ("Flens kommun (tekniska förvaltningen)").
    /// Known units come out under their canonical name.
    pub fn resolve_ref(&self, text: &str) -> Option<OrgRef> {
        let text = text.trim();
        if let Some((base, inner)) = split_parenthesis(text) {
            let base = self.resolve_ref(base)?;
            return self.unit_ref(&base.org, inner);
        }
        if let Some(org) = self.resolve(text) {
            return Some(OrgRef::org(org.id.clone()));
        }
        self.resolve_unit(text).map(|(org, unit)| OrgRef::unit(org.id.clone(), unit.name.clone()))
    }

    /// A unit of `org` named `name`: the known unit's canonical name, or the name as
    /// written (trimmed); `None` for a name that is empty, over-long, has unbalanced
    /// parentheses or a '/', or is a known unit of another organisation.
    pub fn unit_ref(&self, org: &OrgId, name: &str) -> Option<OrgRef> {
        let name = name.trim();
        let usable = !name.is_empty()
            && name.chars().count() <= MAX_UNIT_NAME
            && !name.contains(['\n', '\r'])
            && balanced(name)
            && !name.contains('/');
        if !usable {
            return None;
        }
        let known = self.get(org).and_then(|o| o.unit(name)).map(|u| u.name.clone());
        if known.is_none() && self.resolve_unit(name).is_some() {
            // A unit the directory knows under another organisation is not this one's.
            return None;
        }
        Some(OrgRef::unit(org.clone(), known.unwrap_or_else(|| name.to_string())))
    }

    /// How a reference is shown: a known unit by its own name ("Lokalpolisområde
    /// Katrineholm"), a free unit after its organisation ("Flens kommun (tekniska
    /// förvaltningen)"), an organisation by its name. [`Directory::resolve_ref`] reads it back.
    pub fn describe(&self, r: &OrgRef) -> String {
        let org = self.name_of(&r.org);
        match &r.unit {
            None => org.to_string(),
            Some(unit) => match self.get(&r.org).and_then(|o| o.unit(unit)) {
                Some(known) => known.name.clone(),
                None => format!("{org} ({unit})"),
            },
        }
    }

    /// Whether `unit` names a unit the directory knows under `org`.
    pub fn is_known_unit(&self, org: &OrgId, unit: &str) -> bool {
        self.get(org).is_some_and(|o| o.unit(unit).is_some())
    }

    /// The unit of `org` of this kind that covers `municipality` (the lokalpolisområde
    /// of a municipality), if exactly one does.
    pub fn covering_unit(&self, org: &OrgId, municipality: &OrgId, kind: UnitKind) -> Option<&Unit> {
        let mut covering =
            self.get(org)?.units.iter().filter(|u| u.kind == kind && u.covers.iter().any(|m| m == municipality));
        match (covering.next(), covering.next()) {
            (Some(only), None) => Some(only),
            _ => None,
        }
    }

    /// Organisations and units named anywhere in a running text, in order of first
    /// mention, each organisation once.
    ///
    /// Longer names win over shorter ones they overlap ("Lokalpolisområde
    /// Katrineholm" is the police's unit, not also the municipality Katrineholm),
    /// and names only count as whole words.
    pub fn mentions(&self, text: &str) -> Vec<Mention> {
        let haystack = text.to_lowercase();
        let mut candidates: Vec<Mention> = Vec::new();
        for org in &self.organisations {
            for label in std::iter::once(&org.name).chain(&org.aliases) {
                let needle = label.to_lowercase();
                let explicit = !GENERIC_NAMES.contains(&needle.as_str());
                for start in find_words(&haystack, &needle) {
                    let range = start..start + needle.len();
                    candidates.push(Mention { target: OrgRef::org(org.id.clone()), range, explicit });
                }
            }
            for unit in &org.units {
                for label in std::iter::once(&unit.name).chain(&unit.aliases) {
                    let needle = label.to_lowercase();
                    for start in find_words(&haystack, &needle) {
                        let range = start..start + needle.len();
                        let target = OrgRef::unit(org.id.clone(), unit.name.clone());
                        candidates.push(Mention { target, range, explicit: true });
                    }
                }
            }
        }
        // Longest first at each start, then keep those that overlap nothing kept.
        candidates.sort_by(|a, b| b.range.len().cmp(&a.range.len()).then(a.range.start.cmp(&b.range.start)));
        let mut kept: Vec<Mention> = Vec::new();
        for c in candidates {
            if !kept.iter().any(|k| k.range.start < c.range.end && c.range.start < k.range.end) {
                kept.push(c);
            }
        }
        kept.sort_by_key(|m| m.range.start);
        let mut seen: Vec<OrgId> = Vec::new();
        let mut out: Vec<Mention> = Vec::new();
        for m in kept {
            match out.iter_mut().find(|o| o.target.org == m.target.org) {
                // A later, more precise mention of the same organisation (its unit, or
                // its explicit name after "polisen") refines the first.
                Some(first) => {
                    if first.target.unit.is_none() && m.target.unit.is_some() {
                        first.target.unit = m.target.unit;
                    }
                    first.explicit |= m.explicit;
                }
                None => {
                    seen.push(m.target.org.clone());
                    out.push(m);
                }
            }
        }
        out
    }

    /// Organisations named anywhere in a running text, in order of first mention
    /// (a unit counts as its organisation); see [`Directory::mentions`].
    pub fn mentioned_in(&self, text: &str) -> Vec<OrgId> {
        self.mentions(text).into_iter().map(|m| m.target.org).collect()
    }
}

impl Default for Directory {
    fn default() -> Self {
        Self::sodermanland()
    }
}

/// Lowercase with runs of white space as one space, for comparing names.
pub(crate) fn normalise(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// `Base (inner)` → (`Base`, `inner`) when the text ends with a parenthesis that
/// opens after some text.
pub(crate) fn split_parenthesis(text: &str) -> Option<(&str, &str)> {
    let inner_end = text.strip_suffix(')')?;
    // The parenthesis that the final one closes.
    let mut depth = 0usize;
    let mut open = None;
    for (i, c) in inner_end.char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' if depth == 0 => {
                open = Some(i);
                break;
            }
            '(' => depth -= 1,
            _ => {}
        }
    }
    let open = open?;
    let base = inner_end[..open].trim();
    (!base.is_empty() && balanced(base)).then(|| (base, inner_end[open + 1..].trim()))
}

/// Whether every parenthesis in a text is closed, in order.
pub(crate) fn balanced(text: &str) -> bool {
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return false,
            ')' => depth -= 1,
            _ => {}
        }
    }
    depth == 0
}

/// Byte offsets of every occurrence of `needle` in `haystack` that starts and
/// ends on a word boundary.
fn find_words(haystack: &str, needle: &str) -> Vec<usize> {
    let mut found = Vec::new();
    if needle.is_empty() {
        return found;
    }
    let mut start = 0;
    while let Some(rel) = haystack[start..].find(needle) {
        let pos = start + rel;
        let end = pos + needle.len();
        let before_ok = haystack[..pos].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
        let after_ok = haystack[end..].chars().next().is_none_or(|c| !c.is_alphanumeric());
        if before_ok && after_ok {
            found.push(pos);
        }
        start = pos + needle.chars().next().map_or(1, char::len_utf8);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> OrgId {
        OrgId::new(s).unwrap()
    }

    #[test]
    fn sodermanland_has_eleven_parties_with_exact_swedish_names() {
        let dir = Directory::sodermanland();
        assert_eq!(dir.organisations().len(), 11);
        let names: Vec<&str> = dir.organisations().iter().map(|o| o.name.as_str()).collect();
        assert!(names.contains(&"Länsstyrelsen i Södermanlands län"));
        assert!(names.contains(&"Vingåkers kommun"));
        assert!(names.contains(&"Strängnäs kommun"));
        assert!(names.contains(&"Eskilstuna kommun"));
    }

    #[test]
    fn the_ids_of_existing_documents_keep_their_meaning() {
        // Ids stored in documents and enrollment directories before the directory became
        // a data file: each must name the same organisation with the same kind.
        let dir = Directory::sodermanland();
        let expected = [
            ("lansstyrelsen-sodermanland", "Länsstyrelsen i Södermanlands län", OrgKind::CountyBoard),
            ("polisomrade-sodermanland", "Polisområde Södermanland", OrgKind::Police),
            ("eskilstuna-kommun", "Eskilstuna kommun", OrgKind::Municipality),
            ("flen-kommun", "Flens kommun", OrgKind::Municipality),
            ("gnesta-kommun", "Gnesta kommun", OrgKind::Municipality),
            ("katrineholm-kommun", "Katrineholms kommun", OrgKind::Municipality),
            ("nykoping-kommun", "Nyköpings kommun", OrgKind::Municipality),
            ("oxelosund-kommun", "Oxelösunds kommun", OrgKind::Municipality),
            ("strangnas-kommun", "Strängnäs kommun", OrgKind::Municipality),
            ("trosa-kommun", "Trosa kommun", OrgKind::Municipality),
            ("vingaker-kommun", "Vingåkers kommun", OrgKind::Municipality),
        ];
        for (slug, name, kind) in expected {
            let org = dir.get(&id(slug)).unwrap_or_else(|| panic!("{slug} is gone"));
            assert_eq!((org.name.as_str(), org.kind), (name, kind), "{slug}");
        }
        // The names people typed before still resolve to the same ids.
        for (typed, slug) in
            [("Flen", "flen-kommun"), ("Flen kommun", "flen-kommun"), ("Polisen", "polisomrade-sodermanland")]
        {
            assert_eq!(dir.resolve(typed).unwrap().id.as_str(), slug, "{typed}");
        }
    }

    #[test]
    fn resolve_accepts_ids_names_and_aliases() {
        let dir = Directory::sodermanland();
        let id = dir.resolve("nyköping").unwrap().id.clone();
        assert_eq!(id.as_str(), "nykoping-kommun");
        assert_eq!(dir.resolve("POLISOMRÅDE SÖDERMANLAND").unwrap().kind, OrgKind::Police);
        assert_eq!(dir.resolve("nykoping-kommun").unwrap().id, id);
        assert!(dir.resolve("Uppsala").is_none());
    }

    #[test]
    fn lokalpolisomraden_are_units_of_the_police_area_covering_municipalities() {
        let dir = Directory::sodermanland();
        let police = id("polisomrade-sodermanland");
        let names: Vec<&str> = dir.get(&police).unwrap().units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "Lokalpolisområde Eskilstuna",
                "Lokalpolisområde Katrineholm",
                "Lokalpolisområde Nyköping",
                "Lokalpolisområde Strängnäs"
            ]
        );
        let lpo = |m: &str| dir.covering_unit(&police, &id(m), UnitKind::LocalPoliceArea).map(|u| u.name.as_str());
        assert_eq!(lpo("flen-kommun"), Some("Lokalpolisområde Katrineholm"));
        assert_eq!(lpo("trosa-kommun"), Some("Lokalpolisområde Nyköping"));
        assert_eq!(lpo("strangnas-kommun"), Some("Lokalpolisområde Strängnäs"));
        // Every municipality has exactly one lokalpolisområde.
        for org in dir.organisations().iter().filter(|o| o.kind == OrgKind::Municipality) {
            assert!(lpo(org.id.as_str()).is_some(), "{}", org.id);
        }
    }

    #[test]
    fn references_resolve_units_known_and_free_and_read_back_from_their_description() {
        let dir = Directory::sodermanland();
        let police = id("polisomrade-sodermanland");
        let lpo = OrgRef::unit(police.clone(), "Lokalpolisområde Katrineholm");
        assert_eq!(dir.resolve_ref("LPO Katrineholm"), Some(lpo.clone()));
        assert_eq!(dir.resolve_ref("lokalpolisområde katrineholm"), Some(lpo.clone()));
        let technical = OrgRef::unit(id("katrineholm-kommun"), "tekniska förvaltningen");
        assert_eq!(dir.resolve_ref("Katrineholms kommun (tekniska förvaltningen)"), Some(technical.clone()));
        assert_eq!(dir.resolve_ref("Polisen (LPO Katrineholm)"), Some(lpo.clone()));
        assert_eq!(dir.resolve_ref("Flen"), Some(OrgRef::org(id("flen-kommun"))));
        assert_eq!(dir.resolve_ref("Uppsala (tekniska förvaltningen)"), None);
        assert_eq!(dir.resolve_ref("Flen ()"), None);
        for r in [lpo, technical, OrgRef::org(police)] {
            assert_eq!(dir.resolve_ref(&dir.describe(&r)), Some(r.clone()), "{r:?}");
            assert_eq!(OrgRef::decode(&r.encode()), Some(r));
        }
        assert_eq!(OrgRef::decode("Flen/x"), None);
    }

    #[test]
    fn mentions_are_found_in_order_and_on_word_boundaries() {
        let dir = Directory::sodermanland();
        let text = "mellan Länsstyrelsen i Södermanlands län och Polisområde Södermanland";
        let ids: Vec<String> = dir.mentioned_in(text).into_iter().map(|i| i.0).collect();
        assert_eq!(ids, ["lansstyrelsen-sodermanland", "polisomrade-sodermanland"]);
        assert!(dir.mentioned_in("Trosaborg").is_empty());
    }

    #[test]
    fn a_lokalpolisomrade_named_after_a_town_is_not_also_the_municipality() {
        let dir = Directory::sodermanland();
        let found = dir.mentions("Medborgarlöfte för Lokalpolisområde Katrineholm och polisen");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].target, OrgRef::unit(id("polisomrade-sodermanland"), "Lokalpolisområde Katrineholm"));
        let found = dir.mentions("Katrineholms kommun och polisen");
        assert_eq!(found.len(), 2);
        assert!(found[0].explicit);
        assert!(!found[1].explicit, "'polisen' is generic");
    }

    #[test]
    fn an_override_file_adds_a_county_and_replaces_by_id_and_bad_files_are_refused() {
        let dir = Directory::sodermanland();
        let other = r#"
            [[county]]
            id = "vastmanland"
            name = "Västmanlands län"

            [[organisation]]
            id = "polisomrade-vastmanland"
            county = "vastmanland"
            kind = "police"
            name = "Polisområde Västmanland"

            [[organisation.unit]]
            name = "Lokalpolisområde Västerås"
            kind = "local_police_area"
            covers = ["vasteras-kommun"]

            [[organisation]]
            id = "vasteras-kommun"
            county = "vastmanland"
            kind = "municipality"
            name = "Västerås stad"
            aliases = ["Västerås"]
        "#;
        let both = dir.with_overrides(other).unwrap();
        assert_eq!(both.organisations().len(), 13);
        assert_eq!(both.counties().len(), 2);
        assert_eq!(both.resolve_ref("Lokalpolisområde Västerås").unwrap().org.as_str(), "polisomrade-vastmanland");
        assert_eq!(both.get(&id("gnesta-kommun")).unwrap().name, "Gnesta kommun");

        let renamed = dir
            .with_overrides("[[organisation]]\nid = 'gnesta-kommun'\ncounty = 'sodermanland'\nkind = 'municipality'\nname = 'Gnesta kommun'\naliases = ['Gnesta', 'Gnestas kommun']\n")
            .unwrap();
        assert_eq!(renamed.resolve("Gnestas kommun").unwrap().id.as_str(), "gnesta-kommun");

        let clash = "[[organisation]]\nid = 'x-kommun'\nkind = 'municipality'\nname = 'X'\naliases = ['Flen']\n";
        assert!(matches!(dir.with_overrides(clash), Err(DirectoryFileError::Invalid(m)) if m.contains("\"Flen\"")));
        let typo = "[[organisation]]\nid = 'x'\nkind = 'municipality'\nname = 'X'\nalias = ['Y']\n";
        assert!(matches!(dir.with_overrides(typo), Err(DirectoryFileError::Format(_))));
        let bad_id = "[[organisation]]\nid = 'X Kommun'\nkind = 'municipality'\nname = 'X'\n";
        assert!(matches!(dir.with_overrides(bad_id), Err(DirectoryFileError::Invalid(_))));
        let unknown_cover = "[[organisation]]\nid = 'p'\nkind = 'police'\nname = 'P'\n[[organisation.unit]]\nname = 'U'\nkind = 'local_police_area'\ncovers = ['nowhere']\n";
        assert!(
            matches!(dir.with_overrides(unknown_cover), Err(DirectoryFileError::Invalid(m)) if m.contains("nowhere"))
        );
    }
}
