//! The `edgemeter` binary: everything is in the library (`src/lib.rs`, the
//! codemap); this only tunes the allocator and hands over the arguments.

fn main() -> std::process::ExitCode {
    tune_malloc();
    tune_sqlite();
    edgemeter::cli::main(std::env::args_os().skip(1))
}

/// Two glibc tunables:
/// - glibc gives each thread that allocates its own arena, and memory freed
///   in one is not reused by another: with the writer, outbox and source
///   worker threads that costs megabytes of resident memory for nothing.
///   Our threads take turns (one event loop, workers one job at a time), so
///   two arenas lose no speed (measured in the relay benchmark).
/// - A fixed mmap threshold of 64 KiB: by default glibc raises it to the
///   size of each large block freed, so the next large buffers (a relay
///   frame of 1.9 MB on each of 24 streams) come from the heap and stay
///   resident after they are freed; with it fixed they are mapped and given
///   back at once. Without it, one CI run of the relay test of large frames
///   kept 1,741 KiB per stream; locally it kept 86-254 KiB per stream in
///   six runs without it and 30-119 KiB in four with it (at 256 KiB).
///   64 KiB, not 256: an upstream request's buffers (a 1,000-point batch is
///   about 100 KiB of JSON, and its decoded records more) then stay out of
///   the arenas too. Between 64 and 256 KiB they were carved from an arena
///   around longer-lived blocks and left holes that the next ones did not
///   fit, so the arena crept. In the 10-minute upstream soak with a sink
///   (`benches/upstream_soak.rs`), growth after the first minute was +2.29 %
///   and +1.07 % at 256 KiB (+0.60 % and +4.06 % with one arena instead of
///   two), and +0.22 % and +0.09 % at 64 KiB, ending with 8.2 MiB of
///   anonymous memory instead of 8.7 to 9.0.
///
/// A third, glibc's per-thread cache, cannot be set from here (glibc reads
/// it from `GLIBC_TUNABLES` when the process starts): the upstream's unit
/// turns it off (`systemd/edgemeter-upstream.service` says why).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only sets allocator tunables; it is called before
        // any other thread exists.
        unsafe {
            mallopt(M_ARENA_MAX, 2);
            mallopt(M_MMAP_THRESHOLD, 64 * 1024);
        }
    }
}

/// SQLite keeps a statement's journal (the pages a multi-row statement
/// changed, to undo it alone) in memory in chunks as large as the spill
/// size, 64 KiB by default: just over the mmap threshold above, so every
/// such statement mapped and unmapped a chunk. The upstream's points insert
/// is one (16 rows a statement); a profile put 17 % of its store thread
/// there. At 32 KiB the chunk comes from the heap; a larger journal goes to
/// a temporary file, as past 64 KiB before.
fn tune_sqlite() {
    // SAFETY: called before any connection is opened and before any other
    // thread exists, as sqlite3_config requires; one int argument.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_STMTJRNL_SPILL, 32 * 1024)
    };
    debug_assert_eq!(
        rc,
        rusqlite::ffi::SQLITE_OK,
        "sqlite3_config before any use"
    );
}
