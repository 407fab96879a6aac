#![no_main]
//! `cargo fuzz run markdown_import`: see `tests/support/fuzz_bodies.rs`.

#[path = "../../tests/support/fuzz_bodies.rs"]
mod fuzz_bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_bodies::markdown_import(data));
