#![no_main]
//! `cargo fuzz run chunked`: see src/assemble/fuzz.rs.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    llm_slo_agent::assemble::fuzz::chunked(data);
});
