//! The relay's frame splitter (one JSON object, several, or garbage), on any
//! text a session host may send.
#![no_main]

use edgemeter::sources::relay::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let split = frame::split(&text);
    let taken: usize = split.values.iter().map(|v| v.0.len()).sum();
    assert!(taken <= text.len(), "values longer than the frame");
});
