//! The state directory: created on first use, and owned by one agent at a
//! time through an advisory lock on `edgemeter.lock`, which holds the owner's
//! pid so a second instance can say who is in the way.

use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const LOCK_FILE: &str = "edgemeter.lock";

/// Move an unusable SQLite file out of the way, with its `-wal` and `-shm`
/// (kept together, so it can still be inspected), to
/// `<file>.corrupt-<ms>`; returns that path. `Err` names the file that
/// could not be moved.
pub fn move_aside(path: &Path) -> Result<PathBuf, (PathBuf, std::io::Error)> {
    let aside = PathBuf::from(format!(
        "{}.corrupt-{}",
        path.display(),
        crate::clock::now_ms()
    ));
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        if from.exists() {
            let to = PathBuf::from(format!("{}{suffix}", aside.display()));
            std::fs::rename(&from, &to).map_err(|e| (to, e))?;
        }
    }
    Ok(aside)
}

/// Held for the life of the agent; the lock goes with the process, however
/// it ends (the kernel releases `flock` locks of a dead process).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

#[derive(Debug)]
pub enum LockError {
    Io {
        path: PathBuf,
        action: &'static str,
        error: std::io::Error,
    },
    Held {
        dir: PathBuf,
        pid: Option<u32>,
    },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Io {
                path,
                action,
                error,
            } => {
                write!(f, "cannot {action} {}: {error}", path.display())
            }
            LockError::Held { dir, pid } => {
                let who = pid.map_or_else(|| "another process".to_owned(), |p| format!("pid {p}"));
                write!(
                    f,
                    "another edgemeter ({who}) is already using the state directory {}; \
                     stop it first, or give this one a different `state_dir`",
                    dir.display()
                )
            }
        }
    }
}

impl std::error::Error for LockError {}

/// Create `dir` if needed and take its lock. A lock held by a process that
/// is just exiting is waited for briefly (a restart by systemd, a quick
/// `status`), so `retry_for` can be short.
pub fn lock(dir: &Path, retry_for: Duration) -> Result<Lock, LockError> {
    std::fs::create_dir_all(dir).map_err(|error| LockError::Io {
        path: dir.to_owned(),
        action: "create the state directory",
        error,
    })?;
    let path = dir.join(LOCK_FILE);
    let io = |action| {
        let path = path.clone();
        move |error| LockError::Io {
            path,
            action,
            error,
        }
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io("open the lock file"))?;
    let deadline = std::time::Instant::now() + retry_for;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Held {
                    dir: dir.to_owned(),
                    pid: read_pid(&mut file),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io("lock")(e)),
        }
    }
    file.set_len(0).map_err(io("write the lock file"))?;
    file.seek(SeekFrom::Start(0))
        .map_err(io("write the lock file"))?;
    writeln!(file, "{}", std::process::id()).map_err(io("write the lock file"))?;
    Ok(Lock { _file: file })
}

/// The pid of a running agent on `dir`, or None when no agent holds it.
pub fn holder(dir: &Path) -> Option<u32> {
    let mut file = File::open(dir.join(LOCK_FILE)).ok()?;
    match file.try_lock_shared() {
        // Nobody holds it exclusively: no agent. Our shared lock goes with `file`.
        Ok(()) => None,
        Err(_) => read_pid(&mut file).or(Some(0)),
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Whether [`replace_file`] waits for the disk.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// fsync before the rename: the new content survives a power cut.
    Data,
    /// No fsync: for files rebuilt from state that is itself durable (the
    /// analytics files are all rewritten at the first dump after a start),
    /// so hundreds of them cost no disk flushes.
    No,
}

/// Replace `path` with `bytes` so a reader sees the old file or the new
/// one, never a mix: a temp file beside it, then rename.
pub fn replace_file(path: &Path, bytes: &[u8], sync: Sync) -> Result<(), String> {
    replace_file_with(path, sync, |f| f.write_all(bytes))
}

/// [`replace_file`] with what `write` writes (buffered): a file made as it
/// is written, never held whole.
pub fn replace_file_with(
    path: &Path,
    sync: Sync,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = temp_name(path);
    let result = std::fs::File::create(&tmp)
        .and_then(|f| {
            let mut out = std::io::BufWriter::new(f);
            write(&mut out)?;
            let f = out.into_inner().map_err(|e| e.into_error())?;
            if sync == Sync::Data {
                f.sync_data()?;
            }
            Ok(())
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

/// An SQLite database's WAL (`<db>-wal`), to make its commits survive a
/// power cut: one fdatasync, for a database opened with `synchronous =
/// NORMAL`, whose commits do not wait for the disk. The file is opened
/// once and kept: SQLite keeps the same file while a connection is open
/// (a checkpoint rewinds or truncates it), and a sync a second then needs
/// no descriptor of its own, so a process out of descriptors (a peer
/// holding connections) still makes its records durable. No WAL means
/// nothing was written since the last checkpoint, which synced it all.
#[derive(Debug)]
pub struct WalFile {
    path: PathBuf,
    file: Option<File>,
}

impl WalFile {
    /// The WAL of the database at `db`, opened if it is there already
    /// (a database just opened in WAL mode has one).
    pub fn of(db: &Path) -> WalFile {
        let mut path = db.as_os_str().to_owned();
        path.push("-wal");
        let path = PathBuf::from(path);
        let file = File::open(&path).ok();
        WalFile { path, file }
    }

    pub fn sync(&mut self) -> std::io::Result<()> {
        let file = match &self.file {
            Some(f) => f,
            None => match File::open(&self.path) {
                Ok(f) => self.file.insert(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            },
        };
        file.sync_data()
    }
}

/// Make every file written on the filesystem that holds `dir` survive a
/// power cut (`syncfs`): one call for thousands of files written without
/// an fsync of their own.
pub fn sync_filesystem(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir)?;
    unsafe extern "C" {
        fn syncfs(fd: std::ffi::c_int) -> std::ffi::c_int;
    }
    // SAFETY: syncfs reads no memory of ours; `d` is an open descriptor
    // for the call's duration.
    match unsafe { syncfs(d.as_raw_fd()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Bytes the agent may still write on the filesystem that holds `dir`, if
/// it can be told: what `df` calls available, or, run as root, also the
/// blocks the filesystem reserves for root.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    let blocks = if rustix::process::geteuid().is_root() {
        s.f_bfree
    } else {
        s.f_bavail
    };
    Some(blocks.saturating_mul(s.f_frsize))
}

/// Below this, a filesystem is full for the outbox: SQLite grows its files
/// a page or more at a time, and its shared-memory index by 32 KiB.
pub const FULL_BELOW_BYTES: u64 = 64 * 1024;

/// `dir/.name.tmp`: hidden, and recognised by [`remove_temp_files`].
fn temp_name(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    dir.join(format!(".{name}{TEMP_SUFFIX}"))
}

const TEMP_SUFFIX: &str = ".tmp";

/// Remove what an interrupted [`replace_file`] left in `dir` (a crash
/// between create and rename). Returns how many.
pub fn remove_temp_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with('.') && n.ends_with(TEMP_SUFFIX))
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// A directory of its own under the temp dir for a unit test
/// (`edgemeter-<tag>-<pid>-<random>`), removed when dropped, also when the
/// test fails.
#[cfg(test)]
pub(crate) struct TempDir(pub PathBuf);

#[cfg(test)]
impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "edgemeter-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).expect("create temp dir");
        TempDir(d)
    }
}

#[cfg(test)]
impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The WAL a [`WalFile`] holds is the one SQLite writes, through
    /// checkpoints that rewind it (the outbox's) and truncate it, for as
    /// long as the connection is open; and one that appears later is
    /// opened when it is first synced.
    #[test]
    fn a_wal_file_holds_the_wal_sqlite_writes_through_its_checkpoints() {
        use std::os::unix::fs::MetadataExt;
        let temp = TempDir::new("wal");
        let db = temp.0.join("x.db");
        let mut absent = WalFile::of(&db);
        assert!(absent.file.is_none());
        absent.sync().expect("no WAL: nothing to sync");
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x)")
            .expect("schema");
        let mut wal = WalFile::of(&db);
        let held = wal.file.as_ref().expect("the WAL is there").metadata();
        let held = held.expect("metadata").ino();
        for checkpoint in ["PASSIVE", "RESTART", "TRUNCATE"] {
            conn.execute("INSERT INTO t VALUES (1)", [])
                .expect("insert");
            conn.query_row(&format!("PRAGMA wal_checkpoint({checkpoint})"), [], |_| {
                Ok(())
            })
            .expect("checkpoint");
            conn.execute("INSERT INTO t VALUES (2)", [])
                .expect("insert");
            wal.sync().expect("sync");
            let now = std::fs::metadata(&wal.path).expect("the WAL").ino();
            assert_eq!(now, held, "after a {checkpoint} checkpoint");
        }
        absent.sync().expect("sync");
        assert!(absent.file.is_some(), "opened at its first sync");
    }

    #[test]
    fn second_lock_names_the_holder() {
        let temp = TempDir::new("lock");
        let dir = temp.0.clone();
        let first = lock(&dir, Duration::ZERO).expect("first lock");
        assert_eq!(holder(&dir), Some(std::process::id()));
        let err = lock(&dir, Duration::from_millis(120)).expect_err("second lock must fail");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        assert_eq!(holder(&dir), None);
        lock(&dir, Duration::ZERO).expect("lock after release");
    }
}
