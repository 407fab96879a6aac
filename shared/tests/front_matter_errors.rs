//! Markdown import: an error in the TOML front matter names the line of the
//! file (counted from the opening `+++`), not of the front matter.

use samverkan_shared::markdown;
use samverkan_shared::org::Directory;

fn error_of(text: &str) -> String {
    markdown::import(text, &Directory::sodermanland(), None).expect_err("the front matter is wrong").to_string()
}

#[test]
fn a_syntax_error_in_the_front_matter_names_the_files_line_and_shows_it() {
    let text = "+++\nsamverkan = 1\nkind = \"citizen_promise\"\ntitle = \"Medborgarlöfte Flen\"\nparties = [\"Flen\", \"Polisen\"\n[period]\nstart = \"2025-01-01\"\n+++\n# Medborgarlöfte Flen\n";
    let error = error_of(text);
    // Line 5 of the file (`parties = [...` never closed; TOML notices on line 6).
    assert!(error.contains("at line 6, column 1"), "{error}");
    assert!(error.contains("6 | [period]"), "the snippet is the file's line 6: {error}");
}

#[test]
fn a_wrong_value_names_the_files_line_also_with_crlf_and_a_byte_order_mark() {
    let text = "\u{feff}+++\r\nsamverkan = 1\r\nkind = \"citizen_promise\"\r\ntitle = 7\r\n+++\r\nText\r\n";
    let error = error_of(text);
    assert!(error.contains("at line 4"), "{error}");
    assert!(error.contains("4 | title = 7"), "{error}");
}

#[test]
fn a_missing_key_points_at_the_opening_fence() {
    let error = error_of("+++\nsamverkan = 1\nkind = \"citizen_promise\"\n+++\nText\n");
    assert!(error.contains("missing field `title`"), "{error}");
    assert!(!error.contains("line 0"), "{error}");
}
