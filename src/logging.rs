//! Logging to stderr (journald keeps it), one sentence per event. The level
//! comes from `EDGEMETER_LOG` if set, else from the config.

use log::LevelFilter;
use simplelog::{ConfigBuilder, WriteLogger};

pub const ENV: &str = "EDGEMETER_LOG";

/// Log targets dropped at every level: raw wire dumps with credentials.
pub const NEVER_LOGGED: [&str; 1] = ["ureq_proto"];

/// The level `EDGEMETER_LOG` asks for, if it is set and valid.
pub fn env_level() -> Option<LevelFilter> {
    std::env::var(ENV).ok().and_then(|v| parse_level(v.trim()))
}

pub fn init(level: LevelFilter) {
    let mut b = ConfigBuilder::new();
    b.set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off);
    // journald stamps every line itself; a second timestamp is noise there.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        b.set_time_level(LevelFilter::Off);
    } else {
        b.set_time_format_rfc3339();
    }
    // The HTTP client's wire dumps (ureq_proto, at trace) carry every
    // header: signatures, session tokens, the relay's rule tokens. They are
    // never logged; what each request did is logged by our own code.
    for target in NEVER_LOGGED {
        b.add_filter_ignore_str(target);
    }
    // Only fails if a logger is already set (tests): keep the first.
    let _ = WriteLogger::init(level, b.build(), std::io::stderr());
}

/// A log level as written in the config or `EDGEMETER_LOG`.
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Some(LevelFilter::Off),
        "error" => Some(LevelFilter::Error),
        "warn" | "warning" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

/// `1 source`, `2 sources`: a count in a sentence of the log.
pub fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
