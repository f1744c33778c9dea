//! AWS credentials: from files named in the config, from the standard
//! environment variables, or from a profile of the shared credentials file.
//! Never from the command line; `Debug` never prints a secret.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials({}, secret redacted{})",
            self.access_key_id,
            if self.session_token.is_some() {
                ", session token redacted"
            } else {
                ""
            }
        )
    }
}

/// Where credentials come from; read at each use, so rotated files and
/// refreshed session tokens are picked up without a restart.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Files {
        access_key_id: String,
        secret_access_key_file: PathBuf,
        session_token_file: Option<PathBuf>,
    },
    Profile {
        profile: String,
        file: Option<PathBuf>,
    },
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, else
    /// the `AWS_PROFILE` (or `default`) profile of the shared file.
    Default,
}

fn shared_file(explicit: Option<&Path>) -> Option<PathBuf> {
    explicit
        .map(Path::to_owned)
        .or_else(|| std::env::var_os("AWS_SHARED_CREDENTIALS_FILE").map(PathBuf::from))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")))
}

impl Source {
    pub fn load(&self) -> Result<Credentials, String> {
        match self {
            Source::Files {
                access_key_id,
                secret_access_key_file,
                session_token_file,
            } => Ok(Credentials {
                access_key_id: access_key_id.clone(),
                secret_access_key: crate::problems::read_secret_file(
                    secret_access_key_file,
                    "secret_access_key_file",
                )?,
                session_token: session_token_file
                    .as_deref()
                    .map(|p| crate::problems::read_secret_file(p, "session_token_file"))
                    .transpose()?,
            }),
            Source::Profile { profile, file } => {
                let path = shared_file(file.as_deref())
                    .ok_or("no shared credentials file (HOME is not set)")?;
                profile_from_file(&path, profile)
            }
            Source::Default => {
                let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
                if let (Some(id), Some(secret)) =
                    (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
                {
                    return Ok(Credentials {
                        access_key_id: id,
                        secret_access_key: secret,
                        session_token: env("AWS_SESSION_TOKEN"),
                    });
                }
                let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".to_owned());
                match shared_file(None) {
                    Some(path) if path.exists() => profile_from_file(&path, &profile),
                    _ => Err("no AWS credentials: set access_key_id with secret_access_key_file, or \
                              AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials"
                        .to_owned()),
                }
            }
        }
    }
}

fn profile_from_file(path: &Path, profile: &str) -> Result<Credentials, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_profile(&text, profile).map_err(|e| format!("{}: {e}", path.display()))
}

/// The INI format of `~/.aws/credentials`: `[profile]` sections of
/// `key = value` lines; `#` and `;` start comments.
pub fn parse_profile(text: &str, profile: &str) -> Result<Credentials, String> {
    let mut in_section = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = name.trim() == profile;
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_owned();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    match (id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
            access_key_id,
            secret_access_key,
            session_token: token,
        }),
        _ => Err(format!(
            "profile `{profile}` has no aws_access_key_id and aws_secret_access_key"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_read_and_secrets_never_printed() {
        let text = "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = s1\n\n\
                    ; comment\n[edge]\naws_access_key_id=AKIAEDGE\naws_secret_access_key=s2-SECRET\naws_session_token = TOKEN-SECRET\n";
        let d = parse_profile(text, "default").expect("default");
        assert_eq!(
            (
                d.access_key_id.as_str(),
                d.secret_access_key.as_str(),
                d.session_token
            ),
            ("AKIADEFAULT", "s1", None)
        );
        let e = parse_profile(text, "edge").expect("edge");
        assert_eq!(e.session_token.as_deref(), Some("TOKEN-SECRET"));
        let shown = format!("{e:?}");
        assert!(
            shown.contains("AKIAEDGE") && !shown.contains("SECRET"),
            "{shown}"
        );
        assert_eq!(
            parse_profile(text, "nope").expect_err("missing"),
            "profile `nope` has no aws_access_key_id and aws_secret_access_key"
        );
    }

    #[test]
    fn files_are_read_trimmed_and_empty_ones_refused() {
        let dir = std::env::temp_dir().join(format!("edgemeter-creds-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("secret"), "abc\n").expect("write");
        std::fs::write(dir.join("empty"), "\n").expect("write");
        let ok = Source::Files {
            access_key_id: "AKIA1".into(),
            secret_access_key_file: dir.join("secret"),
            session_token_file: None,
        };
        assert_eq!(ok.load().expect("load").secret_access_key, "abc");
        let bad = Source::Files {
            access_key_id: "AKIA1".into(),
            secret_access_key_file: dir.join("empty"),
            session_token_file: None,
        };
        assert!(bad.load().expect_err("empty").ends_with("empty is empty"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
