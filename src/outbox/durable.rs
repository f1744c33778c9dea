//! Making commits survive a power cut: the WAL's sync once a second, and
//! the checkpoints, which the outbox takes at those syncs rather than
//! SQLite at whichever commit crosses its threshold.
//!
//! A checkpoint fsyncs the WAL before copying it into the database, and the
//! database after. SQLite's own (every 1,000 pages, 4 MB) came on top of
//! the writer's sync a second: at the relay benchmark's 20,000 messages a
//! second, 4.8 MB of WAL a second, that was 3.4 fsyncs a second from the
//! outbox. Taken at a sync, a checkpoint is that second's sync and one
//! more, and it comes every [`CHECKPOINT_PAGES`] (16 MiB) instead of 4 MB.

use std::ffi::c_int;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use rusqlite::hooks::Wal;
use rusqlite::wal::CheckpointMode;

use super::*;

/// WAL pages (4 KiB) past which the next sync is a checkpoint: 16 MiB.
pub(super) const CHECKPOINT_PAGES: u32 = 4_096;
/// WAL pages past which a commit checkpoints at once, as SQLite's own
/// does: the WAL's bound when syncs do not come (sinks deleting a backlog
/// while no records arrive, or syncs failing). 64 MiB.
pub(super) const CHECKPOINT_NOW_PAGES: u32 = 4 * CHECKPOINT_PAGES;

/// Replace SQLite's automatic checkpoints on `conn` (a writer's) with
/// the outbox's: returns the WAL's length in pages after the last commit.
pub(super) fn own_checkpoints(conn: &mut Connection) -> rusqlite::Result<Arc<AtomicU32>> {
    let pages = Arc::new(AtomicU32::new(0));
    let seen = pages.clone();
    // A hook of one's own replaces SQLite's automatic checkpoint, which
    // is itself a WAL hook.
    conn.wal_hook(Some(move |wal: &mut Wal, now: c_int| {
        let now = u32::try_from(now).unwrap_or(0);
        seen.store(now, Ordering::Relaxed);
        if now >= CHECKPOINT_NOW_PAGES {
            // Never an error from here: it would fail the statement whose
            // commit has already happened. A checkpoint that could not run
            // is tried again at the next commit.
            let _ = wal.checkpoint();
        }
        Ok(())
    }))?;
    Ok(pages)
}

impl Outbox {
    /// Make every commit so far survive a power cut: fsync the WAL (a
    /// commit does not wait for the disk, see the module header), or, once
    /// [`CHECKPOINT_PAGES`] have been written since the last checkpoint,
    /// checkpoint, which fsyncs the WAL first. Cheap when nothing was
    /// written since the last call.
    pub fn sync(&mut self) -> Result<(), String> {
        if self.wal_pages.load(Ordering::Relaxed) >= CHECKPOINT_PAGES {
            // Every frame copied: the WAL was synced before the copy (or,
            // if this call copied none, by the checkpoint that did).
            // Frames a reader still holds back are left to the fsync below.
            let done = self
                .conn
                .wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE)
                .is_ok_and(|(log, copied)| copied == log);
            if done {
                self.wal_pages.store(0, Ordering::Relaxed);
                return Ok(());
            }
        }
        let path = &self.path;
        let wal = self
            .wal
            .get_or_insert_with(|| crate::state_dir::WalFile::of(path));
        wal.sync().map_err(|e| {
            format!(
                "outbox {}: syncing the WAL failed: {e}",
                self.path.display()
            )
        })
    }
}
