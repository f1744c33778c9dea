//! Keeping the raw files (`raw_files = true`) within `raw_files_max_bytes`.
//!
//! They grow with every message, and nothing else empties them: on a host
//! up for months they would fill its disk. The old client emptied a user's
//! raw file once it had counted its lines, keeping the last message so the
//! next transition connects; edgemeter's state holds the counts, so it does
//! the same once the raw files it knows hold more than the bound (looked at
//! by each dump, and by the save whose appends pass it): the least
//! recently written first, until they hold three quarters of it (so a busy
//! host cuts some files now and then, not a few at every dump).
//!
//! The sizes are the state's marks ([`RawMark`]): what edgemeter last
//! appended or read, kept in `raw_files` beside the analytics. Files of at
//! most [`SMALL`] bytes are left whole: cutting them gives back little and
//! costs a write each.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use super::adopt::{MAX_LINE_BYTES, RawMark};
use super::store::Store;

/// Files this small are not cut: about 20 messages.
pub const SMALL: u64 = 4096;
/// Files looked at per query of the state, oldest first.
const PAGE: usize = 500;

/// The raw files after a look at their bound.
#[derive(Debug, Default, PartialEq)]
pub struct Raw {
    /// What they hold now, by the state's marks.
    pub bytes: u64,
    /// Set when they held more than the bound and some were cut.
    pub cut: Option<Cut>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    /// What they held before.
    pub from: u64,
    pub files: usize,
    /// The cut stopped above three quarters of the bound: what is left is
    /// in files too small to cut.
    pub short: bool,
}

/// Cut the least recently written raw files in `dir` to their last message
/// until they hold three quarters of `max` bytes, if they hold more than
/// `max`; stop early when `stop` says so. The store lock is held only to
/// read and write marks, not while files are cut.
pub fn trim(
    dir: &Path,
    store: &Mutex<Store>,
    max: u64,
    stop: impl Fn() -> bool,
) -> Result<Raw, String> {
    let lock = || store.lock().unwrap_or_else(|p| p.into_inner());
    let from = lock().raw_bytes()?;
    if from <= max {
        return Ok(Raw {
            bytes: from,
            cut: None,
        });
    }
    let target = max / 4 * 3;
    let mut now = from;
    let mut files = 0;
    let mut after: Option<(i64, String)> = None;
    let mut first_error = None;
    while now > target && !stop() {
        let page = lock().raw_oldest(SMALL, after.as_ref(), PAGE)?;
        let Some(last) = page.last() else { break };
        after = Some((last.mtime_ns, last.name.clone()));
        let mut cut = Vec::new();
        let mut gone = Vec::new();
        for mark in page {
            if now <= target || stop() {
                break;
            }
            match cut_to_last_line(&dir.join(&mark.name)) {
                Ok(None) => {}
                Ok(Some(m)) => {
                    let new = RawMark::of(&mark.name, &m);
                    now = now.saturating_sub(mark.bytes) + new.bytes;
                    files += 1;
                    cut.push(new);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    now = now.saturating_sub(mark.bytes);
                    gone.push(mark.name);
                }
                Err(e) => {
                    first_error.get_or_insert_with(|| {
                        format!("cannot cut {}: {e}", dir.join(&mark.name).display())
                    });
                }
            }
        }
        lock().mark_cut(&cut, &gone)?;
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(Raw {
        bytes: now,
        cut: Some(Cut {
            from,
            files,
            short: now > target && !stop(),
        }),
    })
}

/// Cut a raw file to its last line (kept whole if it is one line): its
/// metadata after, or None when there was nothing to cut. The file is cut
/// in place, so a reader following it (`tail -F`) sees it truncated.
fn cut_to_last_line(path: &Path) -> std::io::Result<Option<std::fs::Metadata>> {
    let mut f = OpenOptions::new().read(true).write(true).open(path)?;
    let len = f.metadata()?.len();
    let tail_len = len.min(MAX_LINE_BYTES as u64 + 1);
    f.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = Vec::with_capacity(tail_len as usize);
    (&mut f).take(tail_len).read_to_end(&mut tail)?;
    let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
    let keep = match body.iter().rposition(|&b| b == b'\n') {
        Some(i) => &tail[i + 1..],
        // One line: nothing to cut.
        None if tail_len == len => return Ok(None),
        // A last line longer than any message: nothing worth keeping.
        None => &[],
    };
    f.set_len(0)?;
    f.write_all_at(keep, 0)?;
    f.metadata().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(user: &str, n: usize) -> String {
        format!("{{\"user\": \"{user}\", \"n\": {n}}}\n")
    }

    #[test]
    fn a_file_is_cut_to_its_last_line_and_a_single_line_is_left_alone() {
        let dir = super::super::tests::scratch_dir("trim-cut");
        let path = dir.join("u-spin30-spinner-engdes1.json");
        let text: String = (0..100).map(|n| line("u", n)).collect();
        std::fs::write(&path, &text).unwrap();
        let m = cut_to_last_line(&path).unwrap().expect("cut");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), line("u", 99));
        assert_eq!(m.len(), line("u", 99).len() as u64);
        assert!(cut_to_last_line(&path).unwrap().is_none(), "one line left");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), line("u", 99));
        // A last line something else left unfinished is kept as it is.
        std::fs::write(&path, format!("{}{{\"user\": \"u\"", line("u", 1))).unwrap();
        cut_to_last_line(&path).unwrap().expect("cut");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"user\": \"u\"");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_least_recently_written_are_cut_until_three_quarters_of_the_bound() {
        let dir = super::super::tests::scratch_dir("trim-order");
        let store = Mutex::new(Store::open(&dir.join("relay.db")).unwrap());
        let files = dir.join("files");
        std::fs::create_dir_all(&files).unwrap();
        let name = |i: usize| format!("f{i}-spin30-spinner-engdes1.json");
        let read = |i: usize| std::fs::read_to_string(files.join(name(i))).unwrap();
        // Ten files of 400 lines, f0 written least recently.
        let body = |i: usize| -> String { (0..400).map(|n| line(&format!("f{i}"), n)).collect() };
        let mut marks = Vec::new();
        for i in 0..10 {
            let path = files.join(name(i));
            std::fs::write(&path, body(i)).unwrap();
            let mut mark = RawMark::of(&name(i), &std::fs::metadata(&path).unwrap());
            mark.mtime_ns = i as i64; // the order the state knows
            marks.push(mark);
        }
        store.lock().unwrap().mark_cut(&marks, &[]).unwrap();
        let size = marks[0].bytes;
        let total = size * 10;
        assert!(size > SMALL, "{size}");

        // Within the bound: nothing is cut.
        let raw = trim(&files, &store, total, || false).unwrap();
        assert_eq!(
            raw,
            Raw {
                bytes: total,
                cut: None
            }
        );

        // Over it: f0, f1, f2, until at most three quarters of it.
        let max = total - 1;
        let raw = trim(&files, &store, max, || false).unwrap();
        let cut = raw.cut.expect("cut");
        assert_eq!(
            (cut.from, cut.files, cut.short),
            (total, 3, false),
            "{raw:?}"
        );
        assert!(raw.bytes <= max / 4 * 3, "{} > {}", raw.bytes, max / 4 * 3);
        for i in 0..10 {
            let want = if i < 3 {
                line(&format!("f{i}"), 399)
            } else {
                body(i)
            };
            assert_eq!(read(i), want, "f{i}");
        }
        assert_eq!(store.lock().unwrap().raw_bytes().unwrap(), raw.bytes);

        // A file gone since its mark is forgotten, not an error; a bound
        // below what one line a file holds cuts all it can and says so.
        std::fs::remove_file(files.join(name(9))).unwrap();
        let raw = trim(&files, &store, 100, || false).unwrap();
        let cut = raw.cut.expect("cut");
        assert!(cut.short && cut.files == 6, "{cut:?}");
        let one_line_each: u64 = (0..9)
            .map(|i| line(&format!("f{i}"), 399).len() as u64)
            .sum();
        assert_eq!(raw.bytes, one_line_each);
        assert_eq!(store.lock().unwrap().raw_bytes().unwrap(), one_line_each);

        // Stopped (shutdown): nothing is cut.
        std::fs::write(files.join(name(5)), body(5)).unwrap();
        let mut mark = RawMark::of(&name(5), &std::fs::metadata(files.join(name(5))).unwrap());
        mark.mtime_ns = 0;
        store.lock().unwrap().mark_cut(&[mark], &[]).unwrap();
        let raw = trim(&files, &store, 100, || true).unwrap();
        assert_eq!(raw.cut.map(|c| (c.files, c.short)), Some((0, false)));
        assert_eq!(read(5), body(5));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
