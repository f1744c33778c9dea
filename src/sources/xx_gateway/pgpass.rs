//! The PostgreSQL password file (`PGPASSFILE`, else `~/.pgpass`), looked up
//! the way libpq does (`passwordFromFile` in `fe-connect.c`): lines of
//! `hostname:port:database:username:password`, `*` matching anything, `\`
//! escaping the next character, `#` starting a comment line, the first
//! matching line winning, and the file ignored when group or others can
//! read it. A Unix-socket host matches the entries for `localhost`.
//!
//! Written here rather than taken from a crate: the one crate for it
//! (`postgres_secrets` 1.0.0, one release) documents that it refuses lines
//! libpq accepts (extra fields, unknown escapes) and skips the permission
//! check, so a file that works with `psql` could fail with edgemeter.

use std::path::{Path, PathBuf};

/// Where libpq would look: `PGPASSFILE`, else `$HOME/.pgpass`.
pub fn location() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PGPASSFILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| Path::new(&h).join(".pgpass"))
}

/// The password for this connection from the file at `path`, if the file
/// exists, is private, and has a matching line. `Err` says why a file that
/// exists was not used (for the log; it never holds a password).
pub fn lookup(
    path: &Path,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Result<Option<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(None);
    };
    if !meta.is_file() {
        return Err(format!(
            "password file {} is not a plain file; not used",
            path.display()
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "password file {} has group or world access; not used (as libpq: chmod 0600 it)",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read password file {}: {e}", path.display()))?;
    let host = if host.starts_with('/') || host.is_empty() {
        "localhost"
    } else {
        host
    };
    Ok(find(&text, host, &port.to_string(), dbname, user))
}

/// The first line matching all four fields, its password unescaped.
pub fn find(text: &str, host: &str, port: &str, dbname: &str, user: &str) -> Option<String> {
    let wanted = [host, port, dbname, user];
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find_map(|line| {
            let mut rest = line;
            for want in wanted {
                rest = matches_field(rest, want)?;
            }
            Some(unescape(rest))
        })
}

/// If the field at the start of `line` matches `want` (or is `*`), what
/// follows its `:`.
fn matches_field<'a>(line: &'a str, want: &str) -> Option<&'a str> {
    if let Some(rest) = line.strip_prefix("*:") {
        return Some(rest);
    }
    let mut want = want.chars();
    let mut chars = line.char_indices();
    while let Some((i, c)) = chars.next() {
        let c = match c {
            ':' => return want.next().is_none().then(|| &line[i + 1..]),
            '\\' => chars.next()?.1,
            c => c,
        };
        if want.next() != Some(c) {
            return None;
        }
    }
    None
}

/// libpq keeps everything after the fourth `:` as the password, with `\`
/// escapes removed and an unescaped `:` ending it.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            ':' => break,
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_match_as_libpq_matches_them() {
        let file = "# comment\n\
                    db.example:5432:other:cmix:wrong\n\
                    db.example:5432:cmix_gateway:cmix:p\\:w\\\\d\n\
                    *:*:*:cmix:fallback\n";
        let f = |h, p, d, u| find(file, h, p, d, u);
        assert_eq!(
            f("db.example", "5432", "cmix_gateway", "cmix").as_deref(),
            Some("p:w\\d")
        );
        assert_eq!(
            f("db.example", "5432", "other", "cmix").as_deref(),
            Some("wrong")
        );
        assert_eq!(
            f("elsewhere", "1", "x", "cmix").as_deref(),
            Some("fallback")
        );
        assert_eq!(f("elsewhere", "1", "x", "ro"), None);
        // Extra fields after the password end it, as in libpq.
        assert_eq!(
            find("h:1:d:u:pw:extra\n", "h", "1", "d", "u").as_deref(),
            Some("pw")
        );
        // An escaped colon inside a field, and a short line, skipped.
        assert_eq!(
            find("h\\:x:1:d:u:pw\n", "h:x", "1", "d", "u").as_deref(),
            Some("pw")
        );
        assert_eq!(
            find("h:1:d\n*:*:*:*:last\n", "h", "1", "d", "u").as_deref(),
            Some("last")
        );
        assert_eq!(
            find("h:1:d:u:\r\n", "h", "1", "d", "u").as_deref(),
            Some("")
        );
    }

    #[test]
    fn a_file_others_can_read_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("edgemeter-pgpass-{}", fastrand::u64(..)));
        std::fs::write(&path, "localhost:5432:g:u:secret\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = lookup(&path, "/var/run/postgresql", 5432, "g", "u").expect_err("refused");
        assert!(
            e.contains("group or world access") && !e.contains("secret"),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            lookup(&path, "/var/run/postgresql", 5432, "g", "u")
                .expect("used")
                .as_deref(),
            Some("secret"),
            "a socket connection matches localhost"
        );
        std::fs::remove_file(&path).ok();
        assert_eq!(
            lookup(&path, "h", 1, "g", "u"),
            Ok(None),
            "no file, no password"
        );
    }
}
