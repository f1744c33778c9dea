//! Taking over a data directory of the old analytics client
//! (learning-analytics-server's `client.py`), so pointing `files_dir` at
//! `/var/analytics/data` continues its history instead of replacing it.
//!
//! The old client keeps, per user×exp×course:
//! - `<user>-<exp>-<course>-adjacency.csv`: the transition counts so far;
//! - `<user>-<hardware>-<exp>-<course>.json`: raw messages not yet counted,
//!   one per line, of which the first may be the last command already
//!   counted (the client keeps it "so the next transition connects").
//!
//! Its next step would add the transitions between the raw messages, in
//! `t` order, to the matrix; [`scan`] does exactly that, and the chain goes
//! on from the last raw command. Only keys the saved state does not hold
//! are read: files edgemeter wrote itself (or adopted before) are its own
//! state's output and are never counted twice. A matrix that cannot be
//! read stops the source with the file named, rather than being replaced.
//!
//! Raw files are read line by line to learn their keys, and edgemeter's
//! own (`raw_files = true`) grow with every message: a host that ran for
//! months would read them all at each start, before its streams connect.
//! So the state keeps each raw file's [`RawMark`], its size and
//! modification time when edgemeter last appended to it or read it, and
//! the scan reads again only a file whose mark differs (the quick check of
//! make and rsync): one that something else wrote since.

use std::collections::{BTreeMap, HashSet};
use std::fs::Metadata;
use std::io::BufRead;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::analytics::{Graph, GraphKey, safe_name};
use super::answers::Feedback;
use super::envelope::envelope;

const MATRIX_SUFFIX: &str = "-adjacency.csv";
const GRAPH_SUFFIX: &str = "-graph.json";
pub const FEEDBACK_SUFFIX: &str = "-feedback.csv";
/// Raw lines longer than this are skipped (a message is at most a frame).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// A raw file as edgemeter last appended to it or read it.
#[derive(Debug, Clone, PartialEq)]
pub struct RawMark {
    /// The file's name in `files_dir`.
    pub name: String,
    pub bytes: u64,
    /// Its modification time, ns since 1970.
    pub mtime_ns: i64,
}

impl RawMark {
    pub fn of(name: &str, m: &Metadata) -> RawMark {
        RawMark {
            name: name.to_owned(),
            bytes: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        }
    }
}

/// What was found for keys the state lacks.
#[derive(Debug, Default)]
pub struct Found {
    /// Key → (its matrix, its raw commands in `t` order).
    pub graphs: BTreeMap<GraphKey, (Option<Graph>, Vec<String>)>,
    pub matrices: usize,
    pub raw_files: usize,
    /// Raw lines that were not an analytics message with a command.
    pub skipped_lines: usize,
    /// The raw files read, as they were when read: recorded once what they
    /// gave is saved, so the next start reads them only if they change.
    pub read: Vec<RawMark>,
    /// Raw files as edgemeter left them ([`RawMark`]), not read.
    pub unchanged: usize,
    /// Edgemeter's own files there: matrices and graphs of `known` keys,
    /// and the two summaries.
    pub own: OwnFiles,
}

/// How many of edgemeter's own files a directory holds.
#[derive(Debug, Default, PartialEq)]
pub struct OwnFiles {
    pub matrices: usize,
    pub graphs: usize,
    pub summaries: usize,
}

/// Read the old client's files in `dir` for keys not `known`, but not the
/// raw files `unchanged` says are as edgemeter left them. Only the names
/// of files to read are kept (sorted, to read them in order): a directory
/// of 100,000 users' own files would otherwise be 200,000 names held at
/// once.
pub fn scan(
    dir: &Path,
    known: impl Fn(&GraphKey) -> bool,
    mut unchanged: impl FnMut(&RawMark) -> bool,
) -> Result<Found, String> {
    let mut found = Found::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
    };
    let mut names: Vec<String> = Vec::new();
    for e in entries.flatten() {
        let Ok(n) = e.file_name().into_string() else {
            continue;
        };
        if n.starts_with('.') {
            continue;
        }
        let own = &mut found.own;
        let read = match n.strip_suffix(MATRIX_SUFFIX) {
            Some(stem) => match matrix_key(stem) {
                Some(k) if known(&k) => {
                    own.matrices += 1;
                    false
                }
                k => k.is_some(),
            },
            None if n == "usage.csv" || n == "activity.csv" => {
                own.summaries += 1;
                false
            }
            None if n.ends_with(GRAPH_SUFFIX) => {
                let stem = &n[..n.len() - GRAPH_SUFFIX.len()];
                own.graphs += usize::from(matrix_key(stem).is_some_and(|k| known(&k)));
                false
            }
            None if is_raw(&n) => {
                // A file that cannot be looked at is read (and fails there).
                let same =
                    std::fs::metadata(e.path()).is_ok_and(|m| unchanged(&RawMark::of(&n, &m)));
                found.unchanged += usize::from(same);
                !same
            }
            None => false,
        };
        if read {
            names.push(n);
        }
    }
    names.sort();
    // (t, command) per key, sorted once all files are read.
    let mut commands: BTreeMap<GraphKey, Vec<(f64, String)>> = BTreeMap::new();
    for name in &names {
        let path = dir.join(name);
        if let Some(stem) = name.strip_suffix(MATRIX_SUFFIX) {
            let Some(key) = matrix_key(stem) else {
                continue;
            };
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let graph = Graph::from_adjacency_csv(&text).map_err(|e| {
                format!(
                    "{} is not an adjacency matrix edgemeter can continue ({e}); it is left as it is. Fix it, or move it out of files_dir to start that user's graph afresh, then restart",
                    path.display()
                )
            })?;
            found.matrices += 1;
            found.graphs.entry(key).or_default().0 = Some(graph);
        } else if is_raw(name) {
            let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
            let file = std::fs::File::open(&path).map_err(cannot)?;
            // As it was before reading: a line written meanwhile makes the
            // next start read it again.
            found
                .read
                .push(RawMark::of(name, &file.metadata().map_err(cannot)?));
            let mut counted = false;
            for line in std::io::BufReader::new(file).split(b'\n') {
                let line = line.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                match raw_command(&line) {
                    Some((key, t, cmd)) if !known(&key) => {
                        counted = true;
                        commands.entry(key).or_default().push((t, cmd));
                    }
                    Some(_) => {}
                    None => found.skipped_lines += 1,
                }
            }
            found.raw_files += usize::from(counted);
        }
    }
    for (key, mut list) in commands {
        // Stable: equal times keep their order in the file.
        list.sort_by(|a, b| a.0.total_cmp(&b.0));
        found.graphs.entry(key).or_default().1 = list.into_iter().map(|(_, c)| c).collect();
    }
    Ok(found)
}

/// A raw message file: `<user>-<hardware>-<exp>-<course>.json`, not
/// edgemeter's own `-graph.json`.
pub fn is_raw(name: &str) -> bool {
    name.ends_with(".json") && !name.ends_with(GRAPH_SUFFIX)
}

/// The old client's `<user>-<exp>-<course>-feedback.csv` files in `dir`, for
/// keys not in `known`; a file that does not read as a feedback matrix is
/// reported and left alone (never replaced: its key is not taken).
pub fn scan_feedback(
    dir: &Path,
    known: &HashSet<GraphKey>,
) -> (Vec<(GraphKey, Feedback)>, Vec<String>) {
    let (mut found, mut problems) = (Vec::new(), Vec::new());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (found, problems);
    };
    for e in entries.flatten() {
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        let Some(key) = name.strip_suffix(FEEDBACK_SUFFIX).and_then(matrix_key) else {
            continue;
        };
        if known.contains(&key) {
            continue;
        }
        let read = std::fs::metadata(e.path())
            .map_err(|e| e.to_string())
            .and_then(|m| {
                if m.len() > MAX_LINE_BYTES as u64 {
                    Err("too large for a feedback matrix".to_owned())
                } else {
                    std::fs::read_to_string(e.path()).map_err(|e| e.to_string())
                }
            })
            .and_then(|t| Feedback::from_csv(&t));
        match read {
            Ok(f) => found.push((key, f)),
            Err(why) => problems.push(format!("{}: {why}", e.path().display())),
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    (found, problems)
}

/// `<user>-<exp>-<course>` (the user itself holds dashes: a UUID).
fn matrix_key(stem: &str) -> Option<GraphKey> {
    let (rest, course) = stem.rsplit_once('-')?;
    let (user, exp) = rest.rsplit_once('-')?;
    let key = GraphKey {
        user: user.to_owned(),
        exp: exp.to_owned(),
        course: course.to_owned(),
    };
    [&key.user, &key.exp, &key.course]
        .iter()
        .all(|n| safe_name(n))
        .then_some(key)
}

/// An `analytics` message's key, `t` and command.
fn raw_command(line: &[u8]) -> Option<(GraphKey, f64, String)> {
    if line.len() > MAX_LINE_BYTES {
        return None;
    }
    let text = std::str::from_utf8(line).ok()?.trim();
    let env = envelope(text)?;
    if env.kind != "analytics" {
        return None;
    }
    let key = GraphKey {
        user: env.user.to_string(),
        exp: env.exp?.to_string(),
        course: env.course?.to_string(),
    };
    if ![&key.user, &key.exp, &key.course]
        .iter()
        .all(|n| safe_name(n))
    {
        return None;
    }
    // The envelope's own `t` (parsed with it, not a second time).
    Some((key, env.t.unwrap_or(0.0), env.payload?.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = "53a6788c-e689-48d4-9231-c2fbd23df009";
    /// The old client's own test data (learning-analytics-server,
    /// test/data/), as it left them.
    const MATRIX: &str = include_str!(
        "../../../tests/fixtures/relay/old-client/53a6788c-e689-48d4-9231-c2fbd23df009-spinner-engdes1-adjacency.csv"
    );
    const RAW: &str = include_str!(
        "../../../tests/fixtures/relay/old-client/53a6788c-e689-48d4-9231-c2fbd23df009-spin31-spinner-engdes1.json"
    );

    fn dir(tag: &str) -> std::path::PathBuf {
        super::super::tests::scratch_dir(&format!("adopt-{tag}"))
    }

    fn key() -> GraphKey {
        GraphKey {
            user: USER.into(),
            exp: "spinner".into(),
            course: "engdes1".into(),
        }
    }

    #[test]
    fn the_old_clients_matrix_and_raw_lines_are_found_for_unknown_keys_only() {
        let d = dir("found");
        std::fs::write(
            d.join(format!("{USER}-spinner-engdes1-adjacency.csv")),
            MATRIX,
        )
        .unwrap();
        std::fs::write(d.join(format!("{USER}-spin31-spinner-engdes1.json")), RAW).unwrap();
        // edgemeter's own graph file is not a raw file.
        std::fs::write(d.join(format!("{USER}-spinner-engdes1-graph.json")), "{}").unwrap();
        let found = scan(&d, |_| false, |_| false).unwrap();
        assert_eq!(
            (found.matrices, found.raw_files, found.skipped_lines),
            (1, 1, 0)
        );
        let (matrix, commands) = &found.graphs[&key()];
        let m = matrix.as_ref().unwrap();
        assert_eq!(m.edges[&("voltage_step".into(), "voltage_step".into())], 3);
        assert_eq!(m.edges.values().sum::<u64>(), 9);
        assert_eq!(commands, &vec!["voltage_ramp".to_owned(); 10]);
        // Known keys (edgemeter's own, or adopted before) are not read again.
        let known: HashSet<GraphKey> = [key()].into();
        assert!(
            scan(&d, |k| known.contains(k), |_| false)
                .unwrap()
                .graphs
                .is_empty()
        );
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn raw_commands_of_several_rigs_are_put_in_time_order() {
        let d = dir("order");
        let line = |t: u64, log: &str| {
            format!(
                "{{\"user\":\"u1\",\"t\":{t},\"exp\":\"spinner\",\"hardware\":\"x\",\"course\":\"c\",\"type\":\"analytics\",\"payload\":{{\"log\":\"{log}\"}}}}\n"
            )
        };
        std::fs::write(
            d.join("u1-spin30-spinner-c.json"),
            line(1, "voltage") + &line(3, "speed") + "not json\n",
        )
        .unwrap();
        std::fs::write(d.join("u1-spin31-spinner-c.json"), line(2, "position")).unwrap();
        let found = scan(&d, |_| false, |_| false).unwrap();
        let k = GraphKey {
            user: "u1".into(),
            exp: "spinner".into(),
            course: "c".into(),
        };
        assert_eq!(found.graphs[&k].1, ["voltage", "position", "speed"]);
        assert_eq!(found.skipped_lines, 1);
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_matrix_that_cannot_be_read_stops_with_its_name_and_what_to_do() {
        let d = dir("bad");
        let path = d.join("u1-spinner-c-adjacency.csv");
        std::fs::write(&path, ",a,b\na,1.0,x\nb,0.0,0.0\n").unwrap();
        let e = scan(&d, |_| false, |_| false).unwrap_err();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("`x` in row `a` is not a number"), "{e}");
        assert!(e.contains("move it out of files_dir"), "{e}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn matrix_text_is_checked_cell_by_cell() {
        let ok = Graph::from_adjacency_csv(",a,b\na,0.0,2.0\nb,1.0,0.0\n").unwrap();
        assert_eq!(ok.nodes, ["a", "b"]);
        assert_eq!(ok.edges.len(), 2);
        for (bad, why) in [
            ("", "empty"),
            ("a,b\na,1\n", "empty cell"),
            (",a,b\na,0.0\n", "does not match the header"),
            (",a,b\nb,0.0,0.0\na,0.0,0.0\n", "does not match the header"),
            (",a\na,-1.0\n", "not a whole count"),
            (",a\na,1.5\n", "not a whole count"),
            (",a,b\na,0.0,0.0\n", "must be square"),
            (",../x\n../x,0.0\n", "not a command name"),
        ] {
            let e = Graph::from_adjacency_csv(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
