//! The files the source reads and writes besides its store: the node id
//! file, the script-compatible CSV, and what `edgemeter check` verifies of
//! them before the service starts.

use super::config::Config;

pub fn read_node_id(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read node_id_file {}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("node_id_file {} is not JSON: {e}", path.display()))?;
    v.get("id")
        .and_then(|id| id.as_str())
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| format!("node_id_file {} has no string field `id`", path.display()))
}

pub(super) fn append_synced(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open csv_path {}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_data())
        .map_err(|e| format!("cannot write csv_path {}: {e}", path.display()))
}

/// What `edgemeter check` can find out before the service starts: the
/// settings file parses and has the keys, the node id file parses, the
/// CSV file can be appended to by this user (under the service's own
/// sandbox when `check` runs as `ExecStartPre`), the script's CSV can be
/// read. Connecting is left to `run`: a database that is down at boot is
/// not a configuration error.
pub fn check(c: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = c.db.read() {
        problems.push(e);
    }
    if let Some(p) = &c.node_id_file
        && let Err(e) = read_node_id(p)
    {
        problems.push(e);
    }
    if let Some(p) = &c.csv_path
        && let Err(e) = check_appendable(p)
    {
        problems.push(format!("csv_path {e}"));
    }
    if let Some(p) = &c.script_csv
        && let Err(e) = std::fs::File::open(p)
    {
        problems.push(format!("script_csv {}: {e}", p.display()));
    }
    problems
}

/// Whether this user can append to `path`: opened for append if it exists
/// (nothing written), else a probe file created and removed beside it.
fn check_appendable(path: &std::path::Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let hint = |e: std::io::Error| {
        let advice = match e.raw_os_error() {
            Some(30) => format!(
                " (read-only here; under the packaged unit add ReadWritePaths={} with `systemctl edit edgemeter`)",
                dir.display()
            ),
            Some(13) => " (permission denied for the service's user)".to_owned(),
            _ => String::new(),
        };
        format!("{}: {e}{advice}", path.display())
    };
    if !dir.is_dir() {
        return Err(format!(
            "{}: the directory {} does not exist",
            path.display(),
            dir.display()
        ));
    }
    if path.exists() {
        return std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(hint);
    }
    let probe = dir.join(format!(".edgemeter-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(hint)?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}
