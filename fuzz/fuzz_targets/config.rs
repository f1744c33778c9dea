//! The config loader (TOML, then every source's, sink's and the upstream's
//! validation), on any text a user may write.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > 64 * 1024 {
        return;
    }
    let text = String::from_utf8_lossy(data);
    // Paths in it are resolved against this directory, never read here
    // unless the text names files that exist.
    let _ = edgemeter::config::parse(std::path::Path::new("/nonexistent/edgemeter.toml"), &text);
});
