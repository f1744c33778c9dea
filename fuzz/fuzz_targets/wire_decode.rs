//! The upstream's batch decoder (the one gate for what edges send), on any
//! bytes, raw and as a gzip body.
#![no_main]

use edgemeter::wire;
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_795_996_800_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = wire::decode(data, NOW) {
        for r in &b.records {
            assert!(r.value.is_finite(), "a decoded value is finite");
        }
    }
    if let Ok(json) = wire::gunzip(data, 1 << 20) {
        assert!(json.len() <= 1 << 20, "gunzip kept its bound");
        let _ = wire::decode(&json, NOW);
    }
});
