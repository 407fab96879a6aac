//! Paragraphs of free text, as people count them: blocks separated by a blank
//! line (Markdown's rule). Used to say *where* a text changed ("Brödtext,
//! stycke 3") and to carry a paragraph of one version to another. Pure.

use std::ops::Range;

use similar::{capture_diff_slices, Algorithm, DiffOp};

/// A paragraph's place in a text, in characters (Automerge's text positions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    /// First character.
    pub start: usize,
    /// One past the last character.
    pub end: usize,
}

/// The paragraphs of `text`: maximal stretches between separators, where a
/// separator is a run of whitespace holding at least two line breaks.
pub(crate) fn spans(text: &str) -> Vec<Span> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut start: Option<usize> = None;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            let run_start = i;
            let mut breaks = 0;
            while i < chars.len() && chars[i].is_whitespace() {
                breaks += usize::from(chars[i] == '\n');
                i += 1;
            }
            if breaks >= 2 {
                if let Some(s) = start.take() {
                    out.push(Span { start: s, end: trim_end(&chars, s, run_start) });
                }
            } else if start.is_none() {
                start = Some(run_start);
            }
            continue;
        }
        if start.is_none() {
            start = Some(i);
        }
        i += 1;
    }
    if let Some(s) = start {
        out.push(Span { start: s, end: trim_end(&chars, s, chars.len()) });
    }
    out
}

fn trim_end(chars: &[char], start: usize, mut end: usize) -> usize {
    while end > start && chars[end - 1].is_whitespace() {
        end -= 1;
    }
    end
}

/// The paragraphs of `text` as strings.
pub(crate) fn split(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    spans(text).iter().map(|s| chars[s.start..s.end].iter().collect()).collect()
}

/// The paragraph (index) holding character position `pos`; a position
/// between paragraphs counts for the nearer one, a tie for the later.
pub(crate) fn paragraph_at(spans: &[Span], pos: usize) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, s) in spans.iter().enumerate() {
        let distance = if pos < s.start {
            s.start - pos
        } else if pos > s.end {
            pos - s.end
        } else {
            return Some(i);
        };
        if best.is_none_or(|(d, _)| distance <= d) {
            best = Some((distance, i));
        }
    }
    best.map(|(_, i)| i)
}

/// Where paragraph `index` of `old` went in `new` (a range of paragraph
/// indices of `new`, empty where it was removed): equal paragraphs are
/// matched, a changed stretch maps to the stretch that replaced it.
pub(crate) fn carry(old: &[String], new: &[String], index: usize) -> Range<usize> {
    for op in capture_diff_slices(Algorithm::Myers, old, new) {
        match op {
            DiffOp::Equal { old_index, new_index, len } if (old_index..old_index + len).contains(&index) => {
                let at = new_index + index - old_index;
                return at..at + 1;
            }
            DiffOp::Delete { old_index, old_len, new_index } if (old_index..old_index + old_len).contains(&index) => {
                return new_index..new_index;
            }
            DiffOp::Replace { old_index, old_len, new_index, new_len }
                if (old_index..old_index + old_len).contains(&index) =>
            {
                // Changed in place (as many paragraphs before as after): each
                // to its counterpart. Otherwise the most similar one, or, if
                // none is much alike (a paragraph split or rewritten), all.
                if old_len == new_len {
                    let at = new_index + index - old_index;
                    return at..at + 1;
                }
                let best = (new_index..new_index + new_len)
                    .map(|i| (similarity(&old[index], &new[i]), i))
                    .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
                return match best {
                    Some((ratio, i)) if ratio >= 0.5 => i..i + 1,
                    _ => new_index..new_index + new_len,
                };
            }
            _ => {}
        }
    }
    new.len()..new.len()
}

/// How alike two paragraphs are, from 0 to 1 (by characters).
fn similarity(a: &str, b: &str) -> f32 {
    similar::TextDiff::configure().timeout(std::time::Duration::from_millis(50)).diff_chars(a, b).ratio()
}

/// The text of paragraphs `range` of `text` (with the separators between them).
pub(crate) fn text_of(text: &str, spans: &[Span], range: Range<usize>) -> String {
    if range.is_empty() || range.end > spans.len() {
        return String::new();
    }
    text.chars().skip(spans[range.start].start).take(spans[range.end - 1].end - spans[range.start].start).collect()
}

/// `text` with paragraphs `range` replaced by `with` (inserted at that place,
/// as a paragraph of its own, when the range is empty).
pub(crate) fn replace(text: &str, spans: &[Span], range: Range<usize>, with: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let piece = |r: Range<usize>| chars[r].iter().collect::<String>();
    if !range.is_empty() {
        let (s, e) = (spans[range.start].start, spans[range.end - 1].end);
        if with.is_empty() {
            // Remove the paragraphs and the separator after them (before them, at the end).
            let (s, e) = match spans.get(range.end) {
                Some(next) => (s, next.start),
                None if range.start > 0 => (spans[range.start - 1].end, e),
                None => (s, e),
            };
            return format!("{}{}", piece(0..s), piece(e..chars.len()));
        }
        return format!("{}{with}{}", piece(0..s), piece(e..chars.len()));
    }
    if with.is_empty() {
        return text.to_string();
    }
    match spans.get(range.start) {
        Some(next) => format!("{}{with}\n\n{}", piece(0..next.start), piece(next.start..chars.len())),
        None if text.trim().is_empty() => with.to_string(),
        None => {
            let last = spans.last().map_or(0, |s| s.end);
            format!("{}\n\n{with}{}", piece(0..last), piece(last..chars.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_are_blocks_between_blank_lines() {
        let text = "## Bakgrund\n\nTrygghet i centrum.\nAndra raden.\n\n  \n- punkt\n";
        assert_eq!(split(text), ["## Bakgrund", "Trygghet i centrum.\nAndra raden.", "- punkt"]);
        let s = spans(text);
        assert_eq!(paragraph_at(&s, 0), Some(0));
        assert_eq!(paragraph_at(&s, 13), Some(1));
        assert_eq!(paragraph_at(&s, 12), Some(1), "inside a separator: the nearer paragraph");
        assert!(split("").is_empty());
        assert_eq!(split("Titel"), ["Titel"]);
    }

    #[test]
    fn a_paragraph_is_carried_to_its_place_in_another_version() {
        let old = split("A\n\nB\n\nC");
        let new = split("Ny\n\nA\n\nB ändrad\n\nC");
        assert_eq!(carry(&old, &new, 0), 1..2);
        assert_eq!(carry(&old, &new, 1), 2..3);
        assert_eq!(carry(&old, &new, 2), 3..4);
        let gone = split("A\n\nC");
        assert_eq!(carry(&old, &gone, 1), 1..1);
        // Neighbours changed too: each paragraph still goes to its own counterpart.
        let both = split("A\n\nB ändrad\n\nC ändrad");
        assert_eq!(carry(&old, &both, 1), 1..2);
        assert_eq!(carry(&old, &both, 2), 2..3);
        let old = split("A\n\nStyrgruppen träffas två gånger per år.\n\nC");
        let grown = split("A\n\nStyrgruppen träffas två gånger per år, vår och höst.\n\nNytt om annat.\n\nC ändrad");
        assert_eq!(carry(&old, &grown, 1), 1..2, "the most similar of several");
    }

    #[test]
    fn replacing_a_paragraph_keeps_the_rest_byte_for_byte() {
        let text = "## Rubrik\n\nEtt stycke.\n\nSista.\n";
        let s = spans(text);
        assert_eq!(replace(text, &s, 1..2, "Nytt stycke."), "## Rubrik\n\nNytt stycke.\n\nSista.\n");
        assert_eq!(replace(text, &s, 1..2, ""), "## Rubrik\n\nSista.\n");
        assert_eq!(replace(text, &s, 1..1, "Infogat."), "## Rubrik\n\nInfogat.\n\nEtt stycke.\n\nSista.\n");
        assert_eq!(replace(text, &s, 3..3, "Sist."), "## Rubrik\n\nEtt stycke.\n\nSista.\n\nSist.\n");
        assert_eq!(text_of(text, &s, 1..3), "Ett stycke.\n\nSista.");
    }
}
