//! Switching over from `active-users.py`: where the script got to, read
//! (read-only) from its key in the gateway's `states` table and from the
//! last line of its CSV, and the first epoch a first start emits.

use super::XxError;
use super::config::Config;
use super::db::Gateway;

/// The epoch of the last complete line of the script's CSV
/// (`epoch,numEpochs,endTimestamp,numUnique`); a torn last line is skipped.
pub fn last_csv_epoch(text: &str) -> Option<i64> {
    text.lines().rev().find_map(|line| {
        let f: Vec<&str> = line.trim_end_matches('\r').split(',').collect();
        match f.as_slice() {
            [e, w, _, n] if w.parse::<u32>().is_ok() && n.parse::<u64>().is_ok() => e.parse().ok(),
            _ => None,
        }
    })
}

/// The last 64 KiB of a file: enough for its last lines.
pub(super) fn read_tail(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Where `active-users.py` got to: its key in `states`, or its CSV's last
/// line, whichever is further (the script appends the lines, then writes
/// the key, so a crash between leaves the CSV one epoch ahead).
pub(super) fn script_trace(c: &Config, gw: &mut Gateway) -> Result<Option<(i64, String)>, XxError> {
    let mut found = gw
        .script_epoch()
        .map_err(XxError::Gateway)?
        .map(|(e, key)| (e, format!("states.{key}")));
    if let Some(path) = c.script_csv.as_ref().or(c.csv_path.as_ref()) {
        match read_tail(path) {
            Ok(text) => {
                if let Some(e) = last_csv_epoch(&text)
                    && found.as_ref().is_none_or(|(f, _)| e > *f)
                {
                    found = Some((e, format!("the last line of {}", path.display())));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(XxError::Csv(format!(
                    "cannot read {} for the script's last epoch: {e}",
                    path.display()
                )));
            }
        }
    }
    Ok(found)
}

/// The first start: the epoch before the first to emit, and a note saying
/// why (for the log and `status`).
pub(super) fn first_start(
    c: &Config,
    gw: &mut Gateway,
    newest: i64,
    name: &str,
) -> Result<(i64, Option<String>), XxError> {
    let backfill_start = newest - i64::from(c.backfill_epochs);
    let trace = match c.after_script {
        Some(false) => None,
        _ => script_trace(c, gw)?,
    };
    match (c.after_script, trace) {
        (Some(true), None) => Err(XxError::Settings(format!(
            "after_script = true, but active-users.py left no trace: no ActiveUsersMonitoringScript in states{}. \
             Remove after_script to backfill {} epochs instead",
            c.script_csv
                .as_ref()
                .or(c.csv_path.as_ref())
                .map(|p| format!(" and no complete line in {}", p.display()))
                .unwrap_or_default(),
            c.backfill_epochs
        ))),
        (_, Some((e, from))) => {
            let start = e.max(backfill_start);
            let mut note = format!(
                "after active-users.py: it completed epoch {e} ({from}); starting at epoch {}, so nothing it wrote or sent is repeated",
                start + 1
            );
            if start > e {
                note += &format!(
                    " (epochs {}..={start} are older than backfill_epochs and are not counted)",
                    e + 1
                );
            }
            log::info!("source `{name}`: {note}");
            if e >= newest - 1 {
                log::warn!(
                    "source `{name}`: active-users.py completed epoch {e} within the last epoch; if it still runs, \
                     stop it now (systemctl disable --now active-users), or both will append to the CSV and send to CloudWatch"
                );
            }
            Ok((start, Some(note)))
        }
        (_, None) => {
            if c.after_script == Some(false)
                && let Some(path) = &c.csv_path
                && let Some(e) = read_tail(path).ok().as_deref().and_then(last_csv_epoch)
            {
                log::warn!(
                    "source `{name}`: {} already has lines up to epoch {e}; after_script = false, so the backfill of {} epochs is appended after them (windows may appear twice)",
                    path.display(),
                    c.backfill_epochs
                );
            }
            Ok((backfill_start, None))
        }
    }
}
