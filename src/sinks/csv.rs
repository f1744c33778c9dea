//! The `csv` sink: records appended to a local CSV file, exactly once.
//!
//! Columns: `batch,id,time,kind,name,dims,value,unit` (a header line when the
//! file is new); `dims` as `k=v;k=v`. Each batch is written with one `write`
//! and `fdatasync`ed before it is confirmed. When a batch comes again
//! (`redelivered`: a crash or failure after some or all of it was written),
//! the lines of that batch at the end of the file, and any torn last line,
//! are cut off first, so the file holds each record once.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeTable;

use crate::clock::iso8601;
use crate::outbox::{Batch, Origin};
use crate::problems::{Problems, deserialize, resolve};
use crate::record::{Kind, KindSet};
use crate::runtime::{LocalBoxFuture, Worker};
use crate::sinks::{Delivered, DeliveryError, Sink};

pub const HEADER: &str = "batch,id,time,kind,name,dims,value,unit\n";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub kinds: KindSet,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    path: Spanned<String>,
    kinds: Option<Spanned<Vec<Spanned<String>>>>,
}

impl Config {
    pub fn parse(base: &Path, table: Spanned<DeTable<'_>>, p: &mut Problems) -> Option<Config> {
        let raw: Raw = deserialize(table, p)?;
        let before = p.list().len();
        if raw.path.get_ref().is_empty() {
            p.push(raw.path.span(), "path must not be empty");
        }
        let kinds = match &raw.kinds {
            None => KindSet::of(&[Kind::Point, Kind::Sketch]),
            Some(list) => {
                let mut kinds = Vec::new();
                for k in list.get_ref() {
                    match Kind::parse(k.get_ref()) {
                        Some(kind @ (Kind::Point | Kind::Sketch)) => kinds.push(kind),
                        _ => p.push(
                            k.span(),
                            format!(
                                "the csv sink takes kinds `point` and `sketch`, not `{}`",
                                k.get_ref()
                            ),
                        ),
                    }
                }
                if list.get_ref().is_empty() {
                    p.push(list.span(), "kinds must name at least one kind");
                }
                KindSet::of(&kinds)
            }
        };
        (p.list().len() == before).then(|| Config {
            path: resolve(base, raw.path.get_ref()),
            kinds,
        })
    }
}

pub struct CsvSink {
    config: Config,
    worker: Worker,
    /// Taken while a write runs off the loop; reopened if that was cancelled.
    file: Option<File>,
}

impl CsvSink {
    pub fn new(config: Config) -> CsvSink {
        let worker = Worker::new("sink-csv");
        CsvSink {
            config,
            worker,
            file: None,
        }
    }
}

impl Sink for CsvSink {
    fn accepts(&self) -> KindSet {
        self.config.kinds
    }

    fn deliver<'a>(
        &'a mut self,
        batch: &'a Batch,
        _progress: &'a crate::sinks::Progress,
    ) -> LocalBoxFuture<'a, Result<Delivered, DeliveryError>> {
        let text = render(batch);
        let path = self.config.path.clone();
        let file = self.file.take();
        // A dead letter retried is older than what the file ends with: only
        // the open batch can be the file's torn tail.
        let repair = (batch.redelivered && batch.origin == Origin::Pending).then_some(batch.seq);
        Box::pin(async move {
            let (file, result) = self
                .worker
                .run(move || {
                    let mut file = match file {
                        Some(f) => f,
                        None => match open(&path) {
                            Ok(f) => f,
                            Err(e) => return (None, Err(e)),
                        },
                    };
                    let r = write_batch(&mut file, repair, &text);
                    // After a failed write the file's end is unknown: reopen.
                    (r.is_ok().then_some(file), r)
                })
                .await;
            self.file = file;
            result
                .map(|()| Delivered::all())
                .map_err(|e| DeliveryError::Retry(format!("{}: {e}", self.config.path.display())))
        })
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
}

fn write_batch(file: &mut File, repair: Option<i64>, text: &str) -> std::io::Result<()> {
    let mut len = file.metadata()?.len();
    if let Some(seq) = repair {
        let cut = cut_point(file, len, seq)?;
        if cut < len {
            file.set_len(cut)?;
            len = cut;
        }
    }
    if len == 0 {
        file.write_all(HEADER.as_bytes())?;
    }
    file.write_all(text.as_bytes())?;
    file.sync_data()
}

/// The offset to cut the file at so that neither a torn last line nor any
/// line of batch `seq` at its end remains. Reads backwards from the end in a
/// growing window until it finds a complete line of another batch (or the
/// header, or the start of the file).
fn cut_point(file: &mut File, len: u64, seq: i64) -> std::io::Result<u64> {
    let prefix = format!("{seq},");
    let mut window: u64 = 64 * 1024;
    'grow: loop {
        let start = len.saturating_sub(window);
        let mut tail = Vec::with_capacity((len - start) as usize);
        file.seek(SeekFrom::Start(start))?;
        Read::by_ref(file)
            .take(len - start)
            .read_to_end(&mut tail)?;
        window = window.saturating_mul(2);
        let at_file_start = start == 0;
        // End of the last complete line: a torn line after it is cut.
        let mut end = match tail.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None if at_file_start => return Ok(0),
            None => continue 'grow,
        };
        loop {
            if end == 0 {
                // Every line in the window is batch `seq`'s.
                if at_file_start {
                    return Ok(0);
                }
                continue 'grow;
            }
            let line_start = match tail[..end - 1].iter().rposition(|b| *b == b'\n') {
                Some(i) => i + 1,
                None if at_file_start => 0,
                None => continue 'grow,
            };
            if !tail[line_start..end].starts_with(prefix.as_bytes()) {
                return Ok(start + end as u64);
            }
            end = line_start;
        }
    }
}

fn render(batch: &Batch) -> String {
    let mut out = String::with_capacity(batch.records.len() * 96);
    for (id, r) in &batch.records {
        let dims: Vec<String> = r
            .dims
            .pairs()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        out.push_str(&format!(
            "{},{id},{},{},",
            batch.seq,
            iso8601(r.ts_ms),
            r.kind
        ));
        push_field(&mut out, &r.name);
        out.push(',');
        push_field(&mut out, &dims.join(";"));
        out.push_str(&format!(",{},", r.value));
        push_field(&mut out, &r.unit);
        out.push('\n');
    }
    out
}

/// RFC 4180 quoting, only where needed.
fn push_field(out: &mut String, field: &str) {
    if field.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&field.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(field);
    }
}

#[cfg(test)]
mod tests;
