//! Line-level structure of a Markdown body: headings, tables, lists and dates,
//! enough to recognise what a written document says. Works on byte-exact lines
//! (each keeps its line ending) so that a body can be rebuilt around what was
//! recognised without changing one byte elsewhere. Inside fenced code blocks
//! nothing is recognised.

use chrono::NaiveDate;

/// One line of a body.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Line<'a> {
    /// The line without its ending.
    pub text: &'a str,
    /// The line with its ending ("\n", "\r\n" or none at the end of the text).
    pub raw: &'a str,
    /// Inside a fenced code block (or its fence).
    pub in_code: bool,
}

impl Line<'_> {
    /// The line's ending.
    pub fn ending(&self) -> &str {
        &self.raw[self.text.len()..]
    }

    /// Blank (only white space).
    pub fn is_blank(&self) -> bool {
        self.text.trim().is_empty()
    }
}

/// Splits a body into lines, marking fenced code.
pub(crate) fn lines(body: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    for raw in body.split_inclusive('\n') {
        let text = raw.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(raw);
        let trimmed = text.trim_start();
        let opens = ["```", "~~~"].into_iter().find(|f| trimmed.starts_with(f));
        let in_code = match (fence, opens) {
            (Some(f), Some(o)) if o == f => {
                fence = None;
                true
            }
            (Some(_), _) => true,
            (None, Some(o)) => {
                fence = Some(o);
                true
            }
            (None, None) => false,
        };
        out.push(Line { text, raw, in_code });
    }
    out
}

/// An ATX heading: its level and text without markers, emphasis or numbering marks at the ends.
pub(crate) fn heading(line: &str) -> Option<(usize, String)> {
    let trimmed = line.trim_start();
    if line.len() - trimmed.len() > 3 {
        return None;
    }
    let hashes = trimmed.chars().take_while(|c| *c == '#').count();
    if hashes == 0 || hashes > 6 || !(trimmed[hashes..].is_empty() || trimmed[hashes..].starts_with([' ', '\t'])) {
        return None;
    }
    let text = trimmed[hashes..].trim().trim_end_matches('#').trim();
    let text = text.trim_matches(['*', '_']).trim();
    (!text.is_empty()).then(|| (hashes, text.to_string()))
}

/// A heading's text without leading numbering ("3.", "2.1", "4)").
pub(crate) fn without_numbering(text: &str) -> &str {
    let rest = text.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.' || c == ')');
    let prefix = &text[..text.len() - rest.len()];
    let numbering = !prefix.is_empty() && (prefix.contains(['.', ')']) || prefix.len() <= 2);
    if numbering && rest.starts_with([' ', '\t']) {
        rest.trim_start()
    } else {
        text
    }
}

/// `---`, `***`, `___` (three or more, spaces allowed).
pub(crate) fn is_thematic_break(line: &str) -> bool {
    let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
    compact.len() >= 3 && ['-', '*', '_'].iter().any(|m| compact.chars().all(|c| c == *m))
}

/// Cells of a table row: outer pipes dropped, split on pipes that are not
/// escaped (`\|`) or inside code spans; cells trimmed, escapes kept.
pub(crate) fn cells(row: &str) -> Vec<String> {
    let row = row.trim();
    let row = row.strip_prefix('|').unwrap_or(row);
    let row = if row.ends_with('|') && !row.ends_with("\\|") { &row[..row.len() - 1] } else { row };
    let mut out = Vec::new();
    let mut cell = String::new();
    let (mut escaped, mut in_code) = (false, false);
    for c in row.chars() {
        match c {
            '|' if !escaped && !in_code => out.push(std::mem::take(&mut cell)),
            _ => cell.push(c),
        }
        if c == '`' && !escaped {
            in_code = !in_code;
        }
        escaped = c == '\\' && !escaped;
    }
    out.push(cell);
    out.into_iter().map(|c| c.trim().to_string()).collect()
}

/// A table's delimiter row (`| --- | :---: |`).
pub(crate) fn is_delimiter_row(line: &str) -> bool {
    let cells = cells(line);
    line.contains('-')
        && !cells.is_empty()
        && cells.iter().all(|c| {
            let c = c.trim_matches(':');
            !c.is_empty() && c.chars().all(|ch| ch == '-')
        })
}

/// A table starting at `start`: its end (exclusive), header cells and rows of cells.
pub(crate) struct Table {
    pub start: usize,
    pub end: usize,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// The table whose header row is line `start`, if there is one.
pub(crate) fn table_at(lines: &[Line<'_>], start: usize) -> Option<Table> {
    let header = lines.get(start)?;
    let delimiter = lines.get(start + 1)?;
    if header.in_code || delimiter.in_code || !header.text.contains('|') || !is_delimiter_row(delimiter.text) {
        return None;
    }
    let mut end = start + 2;
    while end < lines.len() && !lines[end].in_code && !lines[end].is_blank() && lines[end].text.contains('|') {
        end += 1;
    }
    let rows = lines[start + 2..end].iter().map(|l| cells(l.text)).collect();
    Some(Table { start, end, header: cells(header.text), rows })
}

/// Escapes text for a table cell: pipes, and line breaks as `<br>`.
pub(crate) fn escape_cell(text: &str) -> String {
    text.replace('|', "\\|").replace("\r\n", "<br>").replace('\n', "<br>")
}

/// Reads a cell back: `\|` → `|`, `<br>` → line break.
pub(crate) fn unescape_cell(text: &str) -> String {
    text.replace("\\|", "|").replace("<br />", "\n").replace("<br/>", "\n").replace("<br>", "\n")
}

/// A list item line: its indent, marker width and content.
pub(crate) struct ItemLine<'a> {
    pub indent: usize,
    pub content: &'a str,
}

/// A list item marker (`-`, `*`, `+`, `1.`, `1)`) at the start of a line.
pub(crate) fn item_line(line: &str) -> Option<ItemLine<'_>> {
    let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
    let rest = &line[indent..];
    let marker_len = if rest.starts_with(['-', '*', '+']) {
        1
    } else {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 || digits > 3 || !rest[digits..].starts_with(['.', ')']) {
            return None;
        }
        digits + 1
    };
    let after = &rest[marker_len..];
    if !after.starts_with([' ', '\t']) || is_thematic_break(line) {
        return None;
    }
    Some(ItemLine { indent, content: after.trim() })
}

/// One list item: its first line's content, continuation lines, and deeper items (flattened).
#[derive(Debug, Clone, Default)]
pub(crate) struct Item {
    pub text: String,
    pub continuation: Vec<String>,
    pub children: Vec<Item>,
}

/// A list starting at `start` (an item line): its end (exclusive, without
/// trailing blank lines) and its top-level items.
pub(crate) struct List {
    pub start: usize,
    pub end: usize,
    pub items: Vec<Item>,
}

/// The list whose first item is line `start`.
pub(crate) fn list_at(lines: &[Line<'_>], start: usize) -> Option<List> {
    let first = item_line(lines.get(start)?.text).filter(|_| !lines[start].in_code)?;
    let base = first.indent;
    let mut items: Vec<Item> = Vec::new();
    let mut end = start;
    let mut i = start;
    while i < lines.len() && !lines[i].in_code {
        let line = &lines[i];
        if line.is_blank() {
            // A blank line continues the list only if more of it follows.
            let next = (i + 1..lines.len()).find(|&j| !lines[j].is_blank());
            let continues = next.is_some_and(|j| {
                let l = lines[j].text;
                let indent = l.len() - l.trim_start().len();
                !lines[j].in_code && (item_line(l).is_some_and(|it| it.indent >= base) || indent > base + 1)
            });
            if !continues {
                break;
            }
            i += 1;
            continue;
        }
        let indent = line.text.len() - line.text.trim_start().len();
        match item_line(line.text) {
            Some(it) if it.indent < base + 2 => {
                if it.indent < base {
                    break;
                }
                items.push(Item { text: it.content.to_string(), ..Default::default() });
            }
            Some(it) => match items.last_mut() {
                Some(parent) => parent.children.push(Item { text: it.content.to_string(), ..Default::default() }),
                None => break,
            },
            None if indent > base && !items.is_empty() => {
                if let Some(p) = items.last_mut() {
                    let text = line.text.trim().to_string();
                    match p.children.last_mut() {
                        Some(child) => child.continuation.push(text),
                        None => p.continuation.push(text),
                    }
                }
            }
            None if i > start && heading(line.text).is_none() && !lines[i - 1].is_blank() && !items.is_empty() => {
                // A lazy continuation of the last item's paragraph.
                if let Some(last) = items.last_mut() {
                    last.continuation.push(line.text.trim().to_string());
                }
            }
            None => break,
        }
        end = i + 1;
        i += 1;
    }
    (!items.is_empty()).then_some(List { start, end, items })
}

const MONTHS: [&str; 12] = [
    "januari",
    "februari",
    "mars",
    "april",
    "maj",
    "juni",
    "juli",
    "augusti",
    "september",
    "oktober",
    "november",
    "december",
];

/// Every date in a line, with its byte range: `YYYY-MM-DD` and "20 januari 2025".
pub(crate) fn dates(line: &str) -> Vec<(std::ops::Range<usize>, NaiveDate)> {
    let mut found = Vec::new();
    let bytes = line.as_bytes();
    let digit_at = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_digit);
    for (pos, _) in line.char_indices() {
        if pos > 0 && digit_at(pos - 1) {
            continue;
        }
        if let Some(candidate) = line.get(pos..pos + 10) {
            if !digit_at(pos + 10) {
                if let Ok(date) = NaiveDate::parse_from_str(candidate, "%Y-%m-%d") {
                    found.push((pos..pos + 10, date));
                    continue;
                }
            }
        }
        // "20 januari 2025", "1 jan 2025" is not used in these documents.
        let day_len = (0..2).take_while(|k| digit_at(pos + k)).count();
        if day_len == 0 {
            continue;
        }
        let rest = &line[pos + day_len..];
        let Some(rest) = rest.strip_prefix(' ') else { continue };
        let month_of = |m: &&str| rest.get(..m.len()).is_some_and(|p| p.to_lowercase() == **m);
        let Some((month, name)) = MONTHS.iter().enumerate().find(|(_, m)| month_of(m)) else { continue };
        let Some(year_text) = rest[name.len()..].strip_prefix(' ') else { continue };
        let Some(year_digits) = year_text.get(..4).filter(|y| y.chars().all(|c| c.is_ascii_digit())) else {
            continue;
        };
        if year_text[4..].chars().next().is_some_and(|c| c.is_ascii_digit()) {
            continue;
        }
        let (Ok(day), Ok(year)) = (line[pos..pos + day_len].parse::<u32>(), year_digits.parse::<i32>()) else {
            continue;
        };
        if let Some(date) = NaiveDate::from_ymd_opt(year, month as u32 + 1, day) {
            let end = pos + day_len + 1 + name.len() + 1 + 4;
            found.push((pos..end, date));
        }
    }
    found
}

/// Four-digit years (1990–2099) standing alone as words in a text, in order.
pub(crate) fn years(text: &str) -> Vec<(usize, i32)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 4 <= bytes.len() {
        let window = &bytes[i..i + 4];
        let before = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        let after = i + 4 == bytes.len() || !bytes[i + 4].is_ascii_alphanumeric();
        if before && after && window.iter().all(u8::is_ascii_digit) {
            if let Ok(year) = std::str::from_utf8(window).unwrap_or("").parse::<i32>() {
                if (1990..2100).contains(&year) {
                    out.push((i, year));
                    i += 4;
                    continue;
                }
            }
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_their_endings_and_code_is_marked() {
        let body = "a\r\n```\n| x |\n```\nb";
        let l = lines(body);
        assert_eq!(l.iter().map(|l| l.raw).collect::<String>(), body);
        assert_eq!(l[0].text, "a");
        assert_eq!(l[0].ending(), "\r\n");
        assert!(l[2].in_code && !l[4].in_code);
    }

    #[test]
    fn tables_lists_and_dates_are_found() {
        let body = "| Aktivitet | Ansvar \\| roll |\n|:--|--:|\n| Vandring | Kommunen |\n\n1. Första\n   - Ansvar: polisen\n   fortsättning\n2. Andra\n\nText";
        let l = lines(body);
        let t = table_at(&l, 0).unwrap();
        assert_eq!((t.end, t.header.clone()), (3, vec!["Aktivitet".to_string(), "Ansvar \\| roll".to_string()]));
        assert_eq!(t.rows, [vec!["Vandring".to_string(), "Kommunen".to_string()]]);
        let list = list_at(&l, 4).unwrap();
        assert_eq!(list.end, 8);
        assert_eq!(list.items.len(), 2);
        assert_eq!(list.items[0].children[0].text, "Ansvar: polisen");
        assert_eq!(list.items[0].children[0].continuation, ["fortsättning"]);
        let d = dates("Katrineholm den 20 januari 2025 och 2025-02-01");
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].1, NaiveDate::from_ymd_opt(2025, 1, 20).unwrap());
        assert_eq!(&"Katrineholm den 20 januari 2025"[d[0].0.clone()], "20 januari 2025");
        assert_eq!(years("Verksamhetsplan 2025–2027, 12025"), [(16, 2025), (23, 2027)]);
        assert_eq!(heading("## 3. Våra löften ##").map(|h| h.0), Some(2));
        assert_eq!(without_numbering("3.1 Aktiviteter"), "Aktiviteter");
        assert_eq!(without_numbering("2025 års aktiviteter"), "2025 års aktiviteter");
    }
}
