//! The spanned problems every part of the config reports, and the value
//! helpers each component's config uses: deserializing a table into its raw
//! mirror, bounded numbers and durations, names, paths, and the one reader
//! of secret files. A leaf: it knows TOML and nothing of edgemeter's parts,
//! so sources, sinks and the aggregator validate their own tables with it
//! while `config` (the document) assembles them.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeTable;

pub const MAX_NAME_LEN: usize = 64;

/// One thing wrong with the file, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub span: Option<Range<usize>>,
    pub message: String,
}

/// Everything wrong with one config file.
#[derive(Debug, Default)]
pub struct Problems {
    list: Vec<Problem>,
}

impl Problems {
    pub fn push(&mut self, span: impl Into<Option<Range<usize>>>, message: impl Into<String>) {
        self.list.push(Problem {
            span: span.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn list(&self) -> &[Problem] {
        &self.list
    }

    pub fn push_toml(&mut self, err: &toml::de::Error, fallback: &Range<usize>) {
        let span = err.span().unwrap_or_else(|| fallback.clone());
        self.push(span, in_words(err.message().trim_end()));
    }
}

/// serde names the type it expected as Rust spells it ("expected i64"); an
/// operator reads "expected a whole number".
fn in_words(message: &str) -> String {
    const WORDS: &[(&str, &str)] = &[
        ("i64", "a whole number"),
        ("u64", "a whole number"),
        ("i32", "a whole number"),
        ("u32", "a whole number"),
        ("u16", "a whole number"),
        ("u8", "a whole number"),
        ("usize", "a whole number"),
        ("f64", "a number"),
        ("f32", "a number"),
    ];
    if let Some((before, rust)) = message.rsplit_once("expected ")
        && let Some((_, words)) = WORDS.iter().find(|(r, _)| *r == rust)
    {
        return format!("{before}expected {words}");
    }
    message.to_owned()
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Deserialize one table into its raw mirror struct, reporting a failure as
/// a problem at the offending key (or at the table when toml has no span).
pub fn deserialize<'i, T: Deserialize<'i>>(
    table: Spanned<DeTable<'i>>,
    p: &mut Problems,
) -> Option<T> {
    let span = table.span();
    match T::deserialize(toml::de::Deserializer::from(table)) {
        Ok(v) => Some(v),
        Err(e) => {
            p.push_toml(&e, &span);
            None
        }
    }
}

/// Take the keys in `names` out of `table` into a table of their own.
pub fn split_off<'i>(table: &mut Spanned<DeTable<'i>>, names: &[&str]) -> Spanned<DeTable<'i>> {
    let span = table.span();
    let mut taken = DeTable::new();
    let keys: Vec<_> = table
        .get_ref()
        .keys()
        .filter(|k| names.contains(&k.get_ref().as_ref()))
        .cloned()
        .collect();
    for k in keys {
        if let Some(v) = table.get_mut().remove(&k) {
            taken.insert(k, v);
        }
    }
    Spanned::new(span, taken)
}

/// Names key the outbox and appear in file names and logs: keep them plain.
pub fn check_name(what: &str, name: &Spanned<String>, p: &mut Problems) {
    let n = name.get_ref();
    let ok = !n.is_empty()
        && n.len() <= MAX_NAME_LEN
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        p.push(
            name.span(),
            format!(
                "{what} `{n}` must be 1 to {MAX_NAME_LEN} characters of letters, digits, `-`, `_` or `.`"
            ),
        );
    }
}

/// A `*_secs` value as a Duration within [min, max]; `default` when absent.
pub fn secs(
    v: Option<&Spanned<f64>>,
    key: &str,
    default: f64,
    min: f64,
    max: f64,
    p: &mut Problems,
) -> Duration {
    let Some(v) = v else {
        return Duration::from_secs_f64(default);
    };
    let x = *v.get_ref();
    if !(min..=max).contains(&x) {
        p.push(
            v.span(),
            format!("{key} = {x} is out of range; use {min} to {max} seconds"),
        );
        return Duration::from_secs_f64(default);
    }
    Duration::from_secs_f64(x)
}

/// An integer within [min, max]; on a problem, `min` (the caller stops anyway).
pub fn int_in_range(v: &Spanned<i64>, key: &str, min: u64, max: u64, p: &mut Problems) -> u64 {
    let x = *v.get_ref();
    match u64::try_from(x) {
        Ok(u) if (min..=max).contains(&u) => u,
        _ => {
            p.push(
                v.span(),
                format!("{key} = {x} is out of range; use {min} to {max}"),
            );
            min
        }
    }
}

/// Largest secret or one-line file read (a token, a key, a rule part).
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// The one reader of secret files (tokens, keys, passwords) and one-line
/// files: bounded, trimmed, empty refused. `what` names the file for the
/// error ("the token file", "secret_access_key_file"); the content never
/// appears in an error.
pub fn read_secret_file(path: &Path, what: &str) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE_BYTES).read_to_string(&mut text))
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let s = text.trim();
    if s.is_empty() {
        return Err(format!("{what} {} is empty", path.display()));
    }
    Ok(s.to_owned())
}

/// What `edgemeter check` asks of a secret file before the service needs
/// it: readable, not empty, and not readable by every user on the machine.
pub fn check_secret_file(path: &Path, what: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    read_secret_file(path, what)?;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o004 != 0 {
        return Err(format!(
            "{what} {} is readable by every user (mode {:o}); chmod o-r it (e.g. chmod 600, or 640 with the service's group)",
            path.display(),
            mode & 0o777
        ));
    }
    Ok(())
}

/// A bearer token from a file (trimmed; never logged).
pub fn read_token(path: &Path) -> Result<String, String> {
    read_secret_file(path, "the token file")
}

/// A path from the config, relative ones taken relative to the config file.
pub fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::in_words;

    #[test]
    fn rust_type_names_become_words() {
        for (serde, said) in [
            (
                "invalid type: string \"1GiB\", expected i64",
                "invalid type: string \"1GiB\", expected a whole number",
            ),
            (
                "invalid type: string \"1\", expected f64",
                "invalid type: string \"1\", expected a number",
            ),
            // Already words, or not a type at the end: left as they are.
            (
                "invalid type: integer `3`, expected a string",
                "invalid type: integer `3`, expected a string",
            ),
            ("expected i64 or more", "expected i64 or more"),
            ("unknown field `x`", "unknown field `x`"),
        ] {
            assert_eq!(in_words(serde), said);
        }
    }
}
