//! Owners and parties as people write them, read in the context of one document.
//!
//! A citizen promise between Katrineholms kommun and Lokalpolisområde Katrineholm
//! says "Kommunen och polisen", "Kommunen (tekniska förvaltningen)" or
//! "Kommunpolisen"; [`PartyContext`] turns such words into [`Owner`]s using the
//! document's parties, and turns owners back into words that read the same way
//! ([`PartyContext::labels`]), checked to parse back to the very same owners.
//! Pure functions over the [`Directory`]; no I/O.

use crate::org::{normalise, split_parenthesis, Directory, OrgKind, OrgRef};

use super::Owner;

/// Words that mean every party of the document ("gemensamt", "båda parter").
const ALL_PARTIES: [&str; 8] =
    ["gemensamt", "gemensam", "båda", "båda parter", "alla parter", "samtliga parter", "parterna", "samtliga"];

/// Generic words for the document's only party of a kind.
const GENERIC: [(&str, OrgKind); 9] = [
    ("kommunen", OrgKind::Municipality),
    ("kommun", OrgKind::Municipality),
    ("polisen", OrgKind::Police),
    ("polismyndigheten", OrgKind::Police),
    ("lokalpolisområdet", OrgKind::Police),
    ("lokalpolisen", OrgKind::Police),
    ("lpo", OrgKind::Police),
    ("länsstyrelsen", OrgKind::CountyBoard),
    ("polis", OrgKind::Police),
];

/// Word stems of a municipality's units ("tekniska förvaltningen", "socialtjänsten",
/// "fältgruppen"): with one municipality party, such an owner is its unit.
const MUNICIPAL_UNIT_STEMS: [&str; 11] = [
    "förvaltning",
    "nämnd",
    "kontor",
    "enhet",
    "avdelning",
    "socialtjänst",
    "fältgrupp",
    "fältassistent",
    "fritidsgård",
    "kommunstyrelse",
    "samhällsbyggnad",
];

/// Separators between owners outside parentheses, lowercase ("Kommunen och polisen").
const SEPARATORS: [&str; 9] = [";", ",", "/", "&", "+", " och ", " samt ", "<br>", "\n"];

/// A document's parties, for reading and writing owners in its words.
#[derive(Debug, Clone)]
pub struct PartyContext<'a> {
    directory: &'a Directory,
    parties: Vec<OrgRef>,
}

impl<'a> PartyContext<'a> {
    /// The context of a document with these parties (each with its unit, if any).
    pub fn new(directory: &'a Directory, parties: Vec<OrgRef>) -> Self {
        Self { directory, parties }
    }

    /// The directory.
    pub fn directory(&self) -> &'a Directory {
        self.directory
    }

    /// The parties.
    pub fn parties(&self) -> &[OrgRef] {
        &self.parties
    }

    /// The document's only party of this kind.
    fn only_party(&self, kind: OrgKind) -> Option<&OrgRef> {
        let mut of_kind = self.parties.iter().filter(|p| self.directory.get(&p.org).is_some_and(|o| o.kind == kind));
        match (of_kind.next(), of_kind.next()) {
            (Some(only), None) => Some(only),
            _ => None,
        }
    }

    fn parties_of(&self, kind: OrgKind) -> Vec<OrgRef> {
        self.parties.iter().filter(|p| self.directory.get(&p.org).is_some_and(|o| o.kind == kind)).cloned().collect()
    }

    /// An organisation or unit as written, strictly: a generic word for one of the
    /// document's parties ("polisen"), a directory name or alias, or either
    /// followed by a unit in parentheses.
    pub fn resolve_ref(&self, text: &str) -> Option<OrgRef> {
        let text = clean(text);
        if let Some((base, inner)) = split_parenthesis(&text) {
            let base = self.resolve_ref(base)?;
            return self.directory.unit_ref(&base.org, inner);
        }
        let key = normalise(&text);
        if let Some((_, kind)) = GENERIC.iter().find(|(word, _)| *word == key) {
            if let Some(party) = self.only_party(*kind) {
                return Some(party.clone());
            }
        }
        self.directory.resolve_ref(&text)
    }

    /// One owner as typed (CLI, `set`, front matter): [`PartyContext::resolve_ref`],
    /// or `extern: name` for someone outside the directory. `None` if unknown.
    pub fn resolve_owner(&self, text: &str) -> Option<Owner> {
        let text = clean(text);
        if let Some(name) = strip_external(&text) {
            return (!name.is_empty()).then(|| Owner::External(name.to_string()));
        }
        self.resolve_ref(&text).map(Owner::Org)
    }

    /// One owner as a written document names it: [`PartyContext::resolve_owner`],
    /// else a police word ("Kommunpolisen") as a unit of the only police party, a
    /// municipal unit ("Socialtjänsten") of the only municipality party, and
    /// anyone else as written ([`Owner::External`]).
    pub fn recognise_owner(&self, text: &str) -> Option<Owner> {
        let text = clean(text);
        if text.is_empty() {
            return None;
        }
        if let Some(owner) = self.resolve_owner(&text) {
            return Some(owner);
        }
        let key = normalise(&text);
        let police_word = key.split(' ').next_back().is_some_and(|w| w.ends_with("polisen") || w.ends_with("poliser"));
        let party = if police_word {
            self.only_party(OrgKind::Police)
        } else if looks_like_unit(&key) {
            self.only_party(OrgKind::Municipality)
        } else {
            None
        };
        if let Some(unit) = party.and_then(|p| self.directory.unit_ref(&p.org, &text)) {
            return Some(Owner::Org(unit));
        }
        Some(Owner::External(text))
    }

    /// The owners a written cell or field names: "Kommunen och polisen",
    /// "Kommunen (tekniska förvaltningen och socialförvaltningen)", "Gemensamt",
    /// "Kommunerna". Each owner once, in order.
    pub fn recognise_owners(&self, text: &str) -> Vec<Owner> {
        let mut owners: Vec<Owner> = Vec::new();
        let push = |o: Owner, owners: &mut Vec<Owner>| {
            if !owners.contains(&o) {
                owners.push(o);
            }
        };
        for part in split_top_level(text) {
            let key = normalise(&clean(part));
            if ALL_PARTIES.contains(&key.as_str()) {
                for p in &self.parties {
                    push(Owner::Org(p.clone()), &mut owners);
                }
                continue;
            }
            if key == "kommunerna" && !self.parties_of(OrgKind::Municipality).is_empty() {
                for p in self.parties_of(OrgKind::Municipality) {
                    push(Owner::Org(p), &mut owners);
                }
                continue;
            }
            let cleaned = clean(part);
            if let Some((base, inner)) = split_parenthesis(&cleaned) {
                let units = split_top_level(inner);
                let several_units = units.len() > 1
                    && units.iter().all(|u| looks_like_unit(u) || self.directory.resolve_unit(u).is_some());
                if several_units {
                    if let Some(base) = self.resolve_ref(base) {
                        for unit in units {
                            if let Some(r) = self.directory.unit_ref(&base.org, &clean(unit)) {
                                push(Owner::Org(r), &mut owners);
                            }
                        }
                        continue;
                    }
                }
            }
            if let Some(owner) = self.recognise_owner(part) {
                push(owner, &mut owners);
            }
        }
        owners
    }

    /// How an owner reads in this document: "Kommunen", "Polisen", "Kommunen
    /// (tekniska förvaltningen)", "Lokalpolisområde Nyköping", "Fastighetsägare".
    /// Always a text [`PartyContext::recognise_owners`] reads back as this one owner.
    pub fn label(&self, owner: &Owner) -> String {
        let mut candidates: Vec<String> = Vec::new();
        match owner {
            Owner::Org(r) => {
                let kind = self.directory.get(&r.org).map(|o| o.kind);
                let generic = kind.and_then(|k| self.only_party(k).filter(|p| p.org == r.org).and(k.generic_name()));
                match (&r.unit, generic) {
                    (None, Some(g)) => candidates.push(g.to_string()),
                    (Some(unit), g) if !self.directory.is_known_unit(&r.org, unit) => {
                        if let Some(g) = g {
                            candidates.push(format!("{g} ({unit})"));
                        }
                        candidates.push(unit.clone());
                    }
                    (Some(_), Some(g)) => {
                        candidates.push(g.to_string());
                    }
                    _ => {}
                }
                candidates.push(self.directory.describe(r));
            }
            Owner::External(name) => candidates.push(name.clone()),
        }
        candidates.push(canonical_owner(self.directory, owner));
        candidates
            .into_iter()
            .find(|c| self.recognise_owners(c) == std::slice::from_ref(owner))
            .unwrap_or_else(|| canonical_owner(self.directory, owner))
    }

    /// Owners as a document writes them: "Kommunen och polisen", "A, B och C".
    /// Generic words after the first are lowercase, as in running text.
    pub fn labels(&self, owners: &[Owner]) -> String {
        let labels: Vec<String> = owners
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let label = self.label(o);
                let generic = GENERIC.iter().any(|(w, _)| *w == normalise(&label));
                if i > 0 && generic {
                    label.to_lowercase()
                } else {
                    label
                }
            })
            .collect();
        let prose = match labels.as_slice() {
            [] => String::new(),
            [one] => one.clone(),
            [init @ .., last] => format!("{} och {last}", init.join(", ")),
        };
        // Names that hold "och" or commas themselves ("extern: Föreningar och
        // trossamfund") are listed with semicolons instead.
        if self.recognise_owners(&prose) == owners {
            prose
        } else {
            labels.join("; ")
        }
    }
}

/// An owner named without any document's context (front matter): the directory's
/// description ([`Directory::describe`]) or `extern: name`. [`PartyContext::resolve_owner`]
/// reads it back in any document.
pub fn canonical_owner(directory: &Directory, owner: &Owner) -> String {
    match owner {
        Owner::Org(r) => directory.describe(r),
        Owner::External(name) => format!("{} {name}", Owner::EXTERNAL_PREFIX),
    }
}

/// `extern: name` → `name` (case-insensitive prefix).
fn strip_external(text: &str) -> Option<&str> {
    let prefix = Owner::EXTERNAL_PREFIX;
    text.get(..prefix.len()).filter(|p| p.eq_ignore_ascii_case(prefix)).map(|_| text[prefix.len()..].trim())
}

/// Trims white space, emphasis markers and a final full stop.
fn clean(text: &str) -> String {
    let t = text.trim().trim_matches(['*', '_']).trim();
    let t = t.strip_suffix('.').unwrap_or(t).trim();
    t.to_string()
}

/// Splits at [`SEPARATORS`] outside parentheses; empty parts are dropped. A
/// separator right after a hyphen belongs to a compound ("Barn- och
/// utbildningsförvaltningen"), and a part that starts with `extern:` ends only
/// at ';' or a line break.
pub(crate) fn split_top_level(text: &str) -> Vec<&str> {
    let lower = text.to_lowercase();
    // Lowercasing keeps byte offsets for the letters Swedish uses; otherwise do not split.
    if lower.len() != text.len() {
        return [text.trim()].into_iter().filter(|p| !p.is_empty()).collect();
    }
    let mut parts = Vec::new();
    let (mut depth, mut start, mut i) = (0usize, 0usize, 0usize);
    let bytes = lower.as_bytes();
    while i < bytes.len() {
        if !lower.is_char_boundary(i) {
            i += 1;
            continue;
        }
        match bytes[i] {
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            _ if depth == 0 => {
                let external = lower[start..].trim_start().starts_with(Owner::EXTERNAL_PREFIX);
                let after_hyphen = lower[..i].ends_with('-');
                let found = SEPARATORS.iter().find(|s| lower[i..].starts_with(*s)).filter(|s| {
                    if external {
                        [";", "\n", "<br>"].contains(s)
                    } else {
                        !(after_hyphen && [" och ", " samt ", ","].contains(s))
                    }
                });
                if let Some(sep) = found {
                    parts.push(&text[start..i]);
                    i += sep.len();
                    start = i;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&text[start..]);
    parts.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect()
}

/// Whether a text names a municipal unit by its wording.
fn looks_like_unit(text: &str) -> bool {
    let key = normalise(text);
    MUNICIPAL_UNIT_STEMS.iter().any(|stem| key.contains(stem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::org::OrgId;

    fn id(s: &str) -> OrgId {
        OrgId::new(s).unwrap()
    }

    fn promise(dir: &Directory) -> PartyContext<'_> {
        PartyContext::new(
            dir,
            vec![
                OrgRef::org(id("katrineholm-kommun")),
                OrgRef::unit(id("polisomrade-sodermanland"), "Lokalpolisområde Katrineholm"),
            ],
        )
    }

    #[test]
    fn joint_owners_units_and_outsiders_are_read_in_the_documents_words() {
        let dir = Directory::sodermanland();
        let ctx = promise(&dir);
        let kommun = Owner::org(id("katrineholm-kommun"));
        let lpo = Owner::Org(OrgRef::unit(id("polisomrade-sodermanland"), "Lokalpolisområde Katrineholm"));
        let technical = Owner::Org(OrgRef::unit(id("katrineholm-kommun"), "tekniska förvaltningen"));
        assert_eq!(ctx.recognise_owners("Kommunen och polisen"), [kommun.clone(), lpo.clone()]);
        assert_eq!(ctx.recognise_owners("**Polisen**, kommunen."), [lpo.clone(), kommun.clone()]);
        assert_eq!(ctx.recognise_owners("Kommunen (tekniska förvaltningen)"), std::slice::from_ref(&technical));
        assert_eq!(ctx.recognise_owners("Gemensamt"), [kommun.clone(), lpo.clone()]);
        assert_eq!(
            ctx.recognise_owners("Kommunen (tekniska förvaltningen och socialförvaltningen)"),
            [technical.clone(), Owner::Org(OrgRef::unit(id("katrineholm-kommun"), "socialförvaltningen"))]
        );
        assert_eq!(
            ctx.recognise_owners("Kommunpolisen, Socialtjänsten och Fastighetsägare"),
            [
                Owner::Org(OrgRef::unit(id("polisomrade-sodermanland"), "Kommunpolisen")),
                Owner::Org(OrgRef::unit(id("katrineholm-kommun"), "Socialtjänsten")),
                Owner::External("Fastighetsägare".into()),
            ]
        );
        assert_eq!(ctx.recognise_owners("Länsstyrelsen"), [Owner::org(id("lansstyrelsen-sodermanland"))]);
        assert_eq!(
            ctx.recognise_owners("LPO Nyköping"),
            [Owner::Org(OrgRef::unit(id("polisomrade-sodermanland"), "Lokalpolisområde Nyköping"))]
        );
        assert_eq!(ctx.resolve_owner("Fastighetsägare"), None, "typed input is strict");
        assert_eq!(ctx.resolve_owner("extern: Fastighetsägare"), Some(Owner::External("Fastighetsägare".into())));
        assert_eq!(ctx.labels(&[kommun, lpo]), "Kommunen och polisen");
        assert_eq!(ctx.labels(&[technical]), "Kommunen (tekniska förvaltningen)");
    }

    #[test]
    fn every_label_reads_back_as_the_same_owner() {
        let dir = Directory::sodermanland();
        let police = id("polisomrade-sodermanland");
        let owners = [
            Owner::org(id("katrineholm-kommun")),
            Owner::org(police.clone()),
            Owner::Org(OrgRef::unit(police.clone(), "Lokalpolisområde Katrineholm")),
            Owner::Org(OrgRef::unit(police.clone(), "Lokalpolisområde Nyköping")),
            Owner::Org(OrgRef::unit(police.clone(), "kommunpolisen")),
            Owner::Org(OrgRef::unit(id("katrineholm-kommun"), "Kultur och fritid")),
            Owner::Org(OrgRef::unit(id("flen-kommun"), "tekniska förvaltningen")),
            Owner::org(id("lansstyrelsen-sodermanland")),
            Owner::External("Fastighetsägare".into()),
            Owner::External("Polisen".into()),
            Owner::External("Föreningar och trossamfund".into()),
            Owner::Org(OrgRef::unit(id("katrineholm-kommun"), "Barn- och utbildningsförvaltningen")),
        ];
        let contexts = [promise(&dir), PartyContext::new(&dir, Vec::new())];
        for ctx in &contexts {
            for o in &owners {
                let label = ctx.label(o);
                assert_eq!(ctx.recognise_owners(&label), std::slice::from_ref(o), "{label:?}");
                let canonical = canonical_owner(&dir, o);
                assert_eq!(ctx.resolve_owner(&canonical).as_ref(), Some(o), "{canonical:?}");
            }
            let all = ctx.labels(&owners);
            assert_eq!(ctx.recognise_owners(&all), owners, "{all:?}");
        }
    }
}
