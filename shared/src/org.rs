//! Organisations (parties) and the directory that names them.
//!
//! Documents refer to parties by [`OrgId`] (a stable slug such as `eskilstuna-kommun`);
//! the [`Directory`] turns ids into display names and recognises the names and
//! aliases people write in running text ("Polisområde Södermanland", "Eskilstuna").
//! The default directory is the Södermanland county; a relay operator can extend it.

use std::fmt;

use serde::{Deserialize, Serialize};

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
}

/// One party that can appear in documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Organisation {
    /// Stable id used inside documents.
    pub id: OrgId,
    /// Official display name, e.g. "Länsstyrelsen i Södermanlands län".
    pub name: String,
    /// Kind of body.
    pub kind: OrgKind,
    /// Other names people write for it (matched case-insensitively).
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// The organisations a node knows, by id and by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    organisations: Vec<Organisation>,
}

/// The nine municipalities of Södermanland, as (slug stem, short name, official name).
const SODERMANLAND_MUNICIPALITIES: [(&str, &str, &str); 9] = [
    ("eskilstuna", "Eskilstuna", "Eskilstuna kommun"),
    ("flen", "Flen", "Flens kommun"),
    ("gnesta", "Gnesta", "Gnesta kommun"),
    ("katrineholm", "Katrineholm", "Katrineholms kommun"),
    ("nykoping", "Nyköping", "Nyköpings kommun"),
    ("oxelosund", "Oxelösund", "Oxelösunds kommun"),
    ("strangnas", "Strängnäs", "Strängnäs kommun"),
    ("trosa", "Trosa", "Trosa kommun"),
    ("vingaker", "Vingåker", "Vingåkers kommun"),
];

impl Directory {
    /// An empty directory.
    pub fn empty() -> Self {
        Self { organisations: Vec::new() }
    }

    /// The parties of Södermanland county: Länsstyrelsen, Polisområde Södermanland
    /// and the nine municipalities.
    pub fn sodermanland() -> Self {
        let mut organisations = vec![
            Organisation {
                id: OrgId("lansstyrelsen-sodermanland".into()),
                name: "Länsstyrelsen i Södermanlands län".into(),
                kind: OrgKind::CountyBoard,
                aliases: vec!["Länsstyrelsen Södermanland".into(), "Länsstyrelsen".into()],
            },
            Organisation {
                id: OrgId("polisomrade-sodermanland".into()),
                name: "Polisområde Södermanland".into(),
                kind: OrgKind::Police,
                aliases: vec!["Polisen Södermanland".into(), "Polismyndigheten".into(), "Polisen".into()],
            },
        ];
        for (stem, short, official) in SODERMANLAND_MUNICIPALITIES {
            organisations.push(Organisation {
                id: OrgId(format!("{stem}-kommun")),
                name: official.to_string(),
                kind: OrgKind::Municipality,
                aliases: vec![format!("{short} kommun"), short.to_string()],
            });
        }
        Self { organisations }
    }

    /// Every organisation, in directory order.
    pub fn organisations(&self) -> &[Organisation] {
        &self.organisations
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

    /// Resolves what a user typed (an id, the official name or an alias; case-insensitive).
    pub fn resolve(&self, text: &str) -> Option<&Organisation> {
        let wanted = text.trim().to_lowercase();
        self.organisations.iter().find(|o| {
            o.id.as_str() == wanted
                || o.name.to_lowercase() == wanted
                || o.aliases.iter().any(|a| a.to_lowercase() == wanted)
        })
    }

    /// Organisations named anywhere in a running text, in order of first mention.
    ///
    /// Longer names win over shorter ones they contain ("Polisområde Södermanland"
    /// is one party, not also "Södermanland"), and bare aliases only count as whole words.
    pub fn mentioned_in(&self, text: &str) -> Vec<OrgId> {
        let haystack = text.to_lowercase();
        let mut found: Vec<(usize, OrgId)> = Vec::new();
        for org in &self.organisations {
            let names = std::iter::once(&org.name).chain(org.aliases.iter());
            let first = names.filter_map(|name| find_word(&haystack, &name.to_lowercase())).min();
            if let Some(pos) = first {
                found.push((pos, org.id.clone()));
            }
        }
        found.sort();
        found.into_iter().map(|(_, id)| id).collect()
    }
}

impl Default for Directory {
    fn default() -> Self {
        Self::sodermanland()
    }
}

/// Byte offset of the first occurrence of `needle` in `haystack` that starts and
/// ends on a word boundary.
fn find_word(haystack: &str, needle: &str) -> Option<usize> {
    let mut start = 0;
    while let Some(rel) = haystack[start..].find(needle) {
        let pos = start + rel;
        let end = pos + needle.len();
        let before_ok = haystack[..pos].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
        let after_ok = haystack[end..].chars().next().is_none_or(|c| !c.is_alphanumeric());
        if before_ok && after_ok {
            return Some(pos);
        }
        start = pos + needle.chars().next().map_or(1, char::len_utf8);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn resolve_accepts_ids_names_and_aliases() {
        let dir = Directory::sodermanland();
        let id = dir.resolve("nyköping").unwrap().id.clone();
        assert_eq!(id.as_str(), "nykoping-kommun");
        assert_eq!(dir.resolve("POLISOMRÅDE SÖDERMANLAND").unwrap().kind, OrgKind::Police);
        assert_eq!(dir.resolve("nykoping-kommun").unwrap().id, id);
        assert!(dir.resolve("Uppsala").is_none());
    }

    #[test]
    fn mentions_are_found_in_order_and_on_word_boundaries() {
        let dir = Directory::sodermanland();
        let text = "mellan Länsstyrelsen i Södermanlands län och Polisområde Södermanland";
        let ids: Vec<String> = dir.mentioned_in(text).into_iter().map(|i| i.0).collect();
        assert_eq!(ids, ["lansstyrelsen-sodermanland", "polisomrade-sodermanland"]);
        assert!(dir.mentioned_in("Trosaborg").is_empty());
    }
}
