#![no_main]
//! `cargo fuzz run wire_frame`: see `tests/support/fuzz_bodies.rs`.

#[path = "../../tests/support/fuzz_bodies.rs"]
mod fuzz_bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_bodies::wire_frame(data));
