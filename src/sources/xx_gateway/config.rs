//! `[[source]] type = "xx_gateway"`: where the gateway's database is, what
//! to count, and where the script-compatible CSV goes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeTable;

use crate::problems::{Problems, deserialize, int_in_range, resolve, secs};

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub db: DbSource,
    pub node_id_file: Option<PathBuf>,
    pub windows: Vec<u32>,
    pub backfill_epochs: u32,
    pub grace: Duration,
    pub poll_interval: Duration,
    pub csv_path: Option<PathBuf>,
    pub fetch_rows: u32,
    /// How far below the newest id a missing id is watched for (a gap: a
    /// transaction that took the id and has not committed yet).
    pub id_overlap: u32,
    /// How long a gap is watched before it is taken for a rolled-back
    /// transaction.
    pub gap_timeout: Duration,
    /// How many epochs back a late row still corrects emitted windows (at
    /// least the widest window).
    pub late_epochs: u32,
    /// Start after where `active-users.py` got to: `Some(true)` requires
    /// its trace, `Some(false)` ignores it, `None` uses it when found.
    pub after_script: Option<bool>,
    /// The script's CSV, read for its last epoch (default: `csv_path`).
    pub script_csv: Option<PathBuf>,
    pub connect_timeout: Duration,
}

impl Config {
    pub fn max_window(&self) -> u32 {
        *self.windows.iter().max().expect("windows is never empty")
    }
}

/// Where the connection settings come from. Secrets are read when
/// connecting (so a changed password is picked up on reconnect), never kept
/// in the config, never logged.
#[derive(Debug, Clone, PartialEq)]
pub enum DbSource {
    /// The gateway's own `gateway.yaml` (`dbName`, `dbAddress`, `dbUsername`, `dbPassword`).
    GatewayYaml(PathBuf),
    /// Keys not given come from the PostgreSQL environment (`PGHOST`,
    /// `PGPORT`, `PGDATABASE`, `PGUSER`) at connect time, then libpq's
    /// defaults.
    Explicit {
        host: Option<String>,
        port: Option<u16>,
        dbname: Option<String>,
        user: Option<String>,
        password_file: Option<PathBuf>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    gateway_config: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    dbname: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    node_id_file: Option<Spanned<String>>,
    windows: Option<Spanned<Vec<Spanned<i64>>>>,
    backfill_epochs: Option<Spanned<i64>>,
    grace_secs: Option<Spanned<f64>>,
    poll_interval_secs: Option<Spanned<f64>>,
    csv_path: Option<Spanned<String>>,
    fetch_rows: Option<Spanned<i64>>,
    id_overlap: Option<Spanned<i64>>,
    gap_timeout_secs: Option<Spanned<f64>>,
    late_epochs: Option<Spanned<i64>>,
    after_script: Option<Spanned<bool>>,
    script_csv: Option<Spanned<String>>,
    connect_timeout_secs: Option<Spanned<f64>>,
}

fn existing_file(base: &Path, v: &Spanned<String>, key: &str, p: &mut Problems) -> PathBuf {
    let path = resolve(base, v.get_ref());
    if !path.is_file() {
        p.push(
            v.span(),
            format!("{key} `{}` is not a readable file", path.display()),
        );
    }
    path
}

impl Config {
    pub fn parse(base: &Path, table: Spanned<DeTable<'_>>, p: &mut Problems) -> Option<Config> {
        let span = table.span();
        let raw: Raw = deserialize(table, p)?;
        let before = p.list().len();
        let explicit = [&raw.host, &raw.dbname, &raw.user]
            .iter()
            .any(|k| k.is_some())
            || raw.port.is_some()
            || raw.password_file.is_some();
        let db = match (&raw.gateway_config, explicit) {
            (Some(g), true) => {
                p.push(
                    g.span(),
                    "give either gateway_config or host/port/dbname/user/password_file, not both",
                );
                DbSource::GatewayYaml(PathBuf::new())
            }
            (Some(g), false) => DbSource::GatewayYaml(existing_file(base, g, "gateway_config", p)),
            (None, _) => {
                let given = |v: &Option<Spanned<String>>| {
                    v.as_ref()
                        .map(|s| s.get_ref().clone())
                        .filter(|s| !s.is_empty())
                };
                let (host, dbname, user) = (given(&raw.host), given(&raw.dbname), given(&raw.user));
                let from_env = ["PGHOST", "PGDATABASE", "PGUSER", "PGSERVICE"]
                    .iter()
                    .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
                if host.is_none() && dbname.is_none() && user.is_none() && !from_env {
                    p.push(
                        span.clone(),
                        "say where the gateway's database is: gateway_config = \"/opt/xxnetwork/config/gateway.yaml\", \
                         or host/dbname/user (or PGHOST/PGDATABASE/PGUSER in the service's environment)",
                    );
                }
                DbSource::Explicit {
                    host,
                    port: raw
                        .port
                        .as_ref()
                        .map(|v| int_in_range(v, "port", 1, 65535, p) as u16),
                    dbname,
                    user,
                    password_file: raw
                        .password_file
                        .as_ref()
                        .map(|f| existing_file(base, f, "password_file", p)),
                }
            }
        };
        let windows = match &raw.windows {
            None => vec![1, 12, 48],
            Some(list) => {
                let mut out: Vec<u32> = Vec::new();
                for w in list.get_ref() {
                    let w32 = int_in_range(w, "each window", 1, 10_000, p) as u32;
                    if out.contains(&w32) {
                        p.push(w.span(), format!("window {w32} is listed twice"));
                    }
                    out.push(w32);
                }
                if out.is_empty() {
                    p.push(
                        list.span(),
                        "windows must list at least one window (in epochs)",
                    );
                }
                out
            }
        };
        let max_w = windows.iter().copied().max().unwrap_or(1);
        let late_epochs = match &raw.late_epochs {
            None => 2 * max_w,
            Some(v) => {
                let n = int_in_range(v, "late_epochs", 1, 100_000, p) as u32;
                if n < max_w {
                    p.push(
                        v.span(),
                        format!("late_epochs must be at least the widest window ({max_w} epochs)"),
                    );
                }
                n
            }
        };
        let config = Config {
            db,
            node_id_file: raw
                .node_id_file
                .as_ref()
                .map(|f| resolve(base, f.get_ref())),
            windows,
            backfill_epochs: raw.backfill_epochs.as_ref().map_or(1008, |v| {
                int_in_range(v, "backfill_epochs", 0, 100_000, p) as u32
            }),
            grace: secs(
                raw.grace_secs.as_ref(),
                "grace_secs",
                60.0,
                0.0,
                86_400.0,
                p,
            ),
            poll_interval: secs(
                raw.poll_interval_secs.as_ref(),
                "poll_interval_secs",
                30.0,
                0.05,
                3600.0,
                p,
            ),
            csv_path: raw.csv_path.as_ref().map(|c| resolve(base, c.get_ref())),
            fetch_rows: raw.fetch_rows.as_ref().map_or(50_000, |v| {
                int_in_range(v, "fetch_rows", 100, 1_000_000, p) as u32
            }),
            id_overlap: raw.id_overlap.as_ref().map_or(10_000, |v| {
                int_in_range(v, "id_overlap", 0, 1_000_000, p) as u32
            }),
            gap_timeout: secs(
                raw.gap_timeout_secs.as_ref(),
                "gap_timeout_secs",
                120.0,
                1.0,
                86_400.0,
                p,
            ),
            late_epochs,
            after_script: raw.after_script.as_ref().map(|v| *v.get_ref()),
            script_csv: raw.script_csv.as_ref().map(|c| resolve(base, c.get_ref())),
            connect_timeout: secs(
                raw.connect_timeout_secs.as_ref(),
                "connect_timeout_secs",
                10.0,
                0.1,
                300.0,
                p,
            ),
        };
        (p.list().len() == before).then_some(config)
    }
}

/// Connection settings as read at connect time.
#[derive(Clone, PartialEq)]
pub struct DbSettings {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub password: Option<String>,
    /// Where the password came from, for messages.
    pub password_from: &'static str,
}

impl std::fmt::Debug for DbSettings {
    // Hand-written so that the password can never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}:{}/{} (password: {})",
            self.user,
            self.host,
            self.port,
            self.dbname,
            if self.password.is_some() {
                self.password_from
            } else {
                "not set"
            }
        )
    }
}

impl DbSource {
    /// Read the settings now (files may change between reconnects).
    pub fn read(&self) -> Result<DbSettings, String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mut s = match self {
            DbSource::GatewayYaml(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                parse_gateway_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))?
            }
            DbSource::Explicit {
                host,
                port,
                dbname,
                user,
                password_file,
            } => {
                let password = match password_file {
                    None => None,
                    Some(f) => Some(
                        std::fs::read_to_string(f)
                            .map_err(|e| format!("cannot read password_file {}: {e}", f.display()))?
                            .trim_end_matches(['\n', '\r'])
                            .to_owned(),
                    ),
                };
                let port = match port {
                    Some(p) => *p,
                    None => match env("PGPORT") {
                        Some(v) => v
                            .parse()
                            .map_err(|_| format!("PGPORT `{v}` is not a port"))?,
                        None => 5432,
                    },
                };
                // libpq's defaults: the local socket, the OS user, a
                // database named after the user.
                let user = user
                    .clone()
                    .or_else(|| env("PGUSER"))
                    .or_else(|| env("USER"))
                    .ok_or("no user: set `user` (or PGUSER)")?;
                DbSettings {
                    host: host.clone().or_else(|| env("PGHOST")).unwrap_or_else(|| {
                        if Path::new("/var/run/postgresql").is_dir() {
                            "/var/run/postgresql".to_owned()
                        } else {
                            "localhost".to_owned()
                        }
                    }),
                    port,
                    dbname: dbname
                        .clone()
                        .or_else(|| env("PGDATABASE"))
                        .unwrap_or_else(|| user.clone()),
                    user,
                    password,
                    password_from: "password_file",
                }
            }
        };
        if s.password.is_none() {
            if let Some(p) = env("PGPASSWORD") {
                s.password = Some(p);
                s.password_from = "PGPASSWORD";
            } else if let Some(file) = super::pgpass::location() {
                match super::pgpass::lookup(&file, &s.host, s.port, &s.dbname, &s.user) {
                    Ok(Some(p)) => {
                        s.password = Some(p);
                        s.password_from = "the password file";
                    }
                    Ok(None) => {}
                    Err(e) => log::warn!("{e}"),
                }
            }
        }
        Ok(s)
    }
}

/// The four keys edgemeter needs from `gateway.yaml`, read with a YAML
/// parser (the file is viper's YAML: quoting, escapes and comments as YAML
/// has them). Other keys are ignored.
pub fn parse_gateway_yaml(text: &str) -> Result<DbSettings, String> {
    use yaml_rust2::{Yaml, YamlLoader};
    let docs = YamlLoader::load_from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let doc = docs.into_iter().next().unwrap_or(Yaml::Null);
    if !matches!(doc, Yaml::Hash(_) | Yaml::Null) {
        return Err("not a YAML mapping of keys".to_owned());
    }
    // viper reads scalars as strings whatever their YAML type.
    let get = |key: &str| -> Result<Option<String>, String> {
        match &doc[key] {
            Yaml::BadValue | Yaml::Null => Ok(None),
            Yaml::String(s) | Yaml::Real(s) => Ok(Some(s.clone())),
            Yaml::Integer(i) => Ok(Some(i.to_string())),
            Yaml::Boolean(b) => Ok(Some(b.to_string())),
            _ => Err(format!("{key} is not a single value")),
        }
    };
    let address = get("dbAddress")?.ok_or("no dbAddress")?;
    let (host, port) = split_host_port(&address)?;
    let password = get("dbPassword")?.filter(|p| !p.is_empty());
    Ok(DbSettings {
        host,
        port,
        dbname: get("dbName")?
            .filter(|s| !s.is_empty())
            .ok_or("no dbName")?,
        user: get("dbUsername")?
            .filter(|s| !s.is_empty())
            .ok_or("no dbUsername")?,
        password,
        password_from: "dbPassword",
    })
}

/// `host:port`, `[v6]:port`; like Go's net.SplitHostPort the port is required.
/// A wildcard listen address means "this machine".
fn split_host_port(address: &str) -> Result<(String, u16), String> {
    let (host, port) = match address.strip_prefix('[') {
        Some(rest) => {
            let (h, p) = rest
                .split_once("]:")
                .ok_or(format!("dbAddress `{address}` has no port"))?;
            (h, p)
        }
        None => address
            .rsplit_once(':')
            .ok_or(format!("dbAddress `{address}` has no port"))?,
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("dbAddress `{address}` has a bad port"))?;
    let host = match host {
        "" | "0.0.0.0" => "127.0.0.1",
        "::" => "::1",
        h => h,
    };
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_yaml_as_the_sample_writes_it() {
        let s = parse_gateway_yaml(
            "# Database\ndbName: \"cmix_gateway\"\ndbAddress: \"0.0.0.0:5432\"\ndbUsername: 'cmix'\ndbPassword: \"s3cret # not a comment\"\nlog: x\n",
        )
        .expect("parse");
        assert_eq!(s.host, "127.0.0.1");
        assert_eq!(s.port, 5432);
        assert_eq!(s.dbname, "cmix_gateway");
        assert_eq!(s.user, "cmix");
        assert_eq!(s.password.as_deref(), Some("s3cret # not a comment"));
        assert!(
            !format!("{s:?}").contains("s3cret"),
            "Debug must hide the password"
        );
    }

    #[test]
    fn gateway_yaml_edge_cases() {
        let p = |t: &str| parse_gateway_yaml(t);
        assert_eq!(
            p("dbName: g\ndbAddress: db.local:6543 # remote\ndbUsername: u\ndbPassword: \"\"\n")
                .expect("ok")
                .password,
            None
        );
        assert_eq!(
            p("dbName: g\ndbAddress: \"[::1]:5432\"\ndbUsername: u\n")
                .expect("ok")
                .host,
            "::1"
        );
        assert_eq!(
            p("dbName: g\ndbAddress: \"localhost\"\ndbUsername: u\n").expect_err("no port"),
            "dbAddress `localhost` has no port"
        );
        assert_eq!(
            p("dbAddress: \"h:1\"\ndbUsername: u\n").expect_err("no name"),
            "no dbName"
        );
        assert_eq!(
            p("dbName: g\ndbUsername: u\n").expect_err("no address"),
            "no dbAddress"
        );
        // YAML's own escapes: the gateway's tools quote this way.
        assert_eq!(
            p("dbName: g\ndbAddress: h:1\ndbUsername: u\ndbPassword: \"pa\\\"ss\\\\w0rd\"\n")
                .expect("ok")
                .password
                .as_deref(),
            Some("pa\"ss\\w0rd")
        );
        assert_eq!(
            p("dbName: g\ndbAddress: h:1\ndbUsername: u\ndbPassword: 'it''s'\n")
                .expect("ok")
                .password
                .as_deref(),
            Some("it's")
        );
        assert_eq!(
            p("dbName: 12345\ndbAddress: h:1\ndbUsername: u\n")
                .expect("ok")
                .dbname,
            "12345"
        );
        assert!(
            p("dbName: [g\n")
                .expect_err("bad yaml")
                .starts_with("not valid YAML")
        );
        // Indented keys belong to another mapping, not to the top level.
        assert_eq!(
            p("x:\n  dbName: g\ndbAddress: h:1\ndbUsername: u\n").expect_err("nested"),
            "no dbName"
        );
    }
}
