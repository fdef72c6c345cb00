//! GGUF container parsing on arbitrary bytes: must return an error, never
//! panic, overflow or allocate beyond what the input can hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pie_runtime::gguf::file::parse(data);
});
