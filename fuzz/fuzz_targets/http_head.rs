//! The upstream's HTTP head parser and framing rules, on any bytes a peer
//! may send before a request's body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head, body))) = edgemeter::http_server::read_head(data) {
        assert!(head <= data.len(), "a head longer than the bytes read");
        // Strict framing: a length was accepted only as digits.
        let _ = body;
    }
});
