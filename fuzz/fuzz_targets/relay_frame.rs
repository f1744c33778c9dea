//! The relay's frame splitter (one JSON object, several, or garbage), on any
//! text a session host may send: as the relay runs it, reading envelopes in
//! the splitting pass, and as plain JSON values.
#![no_main]

use edgemeter::sources::relay::envelope::Envelope;
use edgemeter::sources::relay::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let split = frame::split_as::<Envelope>(&text);
    let taken: usize = split.values.iter().map(|v| v.0.len()).sum();
    assert!(taken <= text.len(), "values longer than the frame");
    // Reading envelopes must not change where the values are.
    let plain = frame::split(&text);
    let texts: Vec<&str> = plain.values.iter().map(|v| v.0).collect();
    let typed: Vec<&str> = split.values.iter().map(|v| v.0).collect();
    assert_eq!(texts, typed, "the two passes split differently");
    assert_eq!(plain.garbage, split.garbage);
});
