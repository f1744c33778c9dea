//! The `edgemeter` binary: everything is in the library (`src/lib.rs`, the
//! codemap); this only tunes the allocator and hands over the arguments.

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    edgemeter::cli::main(std::env::args_os().skip(1))
}

/// glibc gives each thread that allocates its own arena, and memory freed
/// in one is not reused by another: with the writer, outbox and source
/// worker threads that costs megabytes of resident memory for nothing. Our
/// threads take turns (one event loop, workers one job at a time), so two
/// arenas lose no speed (measured in the relay benchmark).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_ARENA_MAX: i32 = -8;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only sets an allocator tunable; it is called
        // before any other thread exists.
        unsafe {
            mallopt(M_ARENA_MAX, 2);
        }
    }
}
