//! # edgemeter: codemap
//!
//! One small binary that runs on edge machines and answers *who is active,
//! where, and how much*. Sources observe, the SQLite outbox keeps every
//! observation durably, sinks forward batches.
//!
//! ```text
//!   sources ──emit──► record channel ──► outbox writer ──► SQLite outbox (WAL)
//!   (tasks)           (bounded)          (group commit)        │
//!                                                              ├─► delivery loop ─► sink (csv, …)
//!                                                              └─► delivery loop ─► sink
//! ```
//!
//! ## Entry points
//! - `src/main.rs` (the binary, nothing else) → [`cli::main`]: parse
//!   arguments, load the config, run a command. Tests and benchmarks use
//!   this library (`use edgemeter::wire`).
//! - `edgemeter run` → [`agent::run`]: the event loop.
//! - `edgemeter upstream` → [`upstream::Server`], run by [`agent::run`] as
//!   one more task beside the sources: the aggregator is the agent plus a
//!   server, and its `[[sink]]`s take the network-wide values.
//!
//! ## Modules, in layers
//! Each module uses only modules of lower layers (`tests/layers.rs` holds
//! the table and fails on any other `use crate::` edge); a source or sink
//! uses its registry (`sources`, `sinks`) but never another source or sink.
//!
//! 0. Leaves:
//!    - [`record`]: the data model (points, sketches, events, lines).
//!    - [`clock`]: time formats, and what a receiver's `Date` says of this machine's clock.
//!    - [`hash`]: the fixed-seed hash of ids.
//!    - [`backoff`]: retry schedules with full jitter.
//!    - [`problems`]: spanned config problems, bounded values, the secret-file reader.
//!    - [`logging`]: stderr logging, and failures said as a spell (when one
//!      begins, every 10 minutes while it lasts, when it ends).
//!    - [`systemd`]: READY, WATCHDOG (from the event loop) and STOPPING for
//!      `Type=notify` units; nothing without `$NOTIFY_SOCKET`.
//!    - [`http_client`]: the policy of every outgoing HTTP request (roots, timeout, gzip, the proxy the environment names).
//!    - [`http_server`]: a bounded HTTP/1.1 server core (the upstream's API, an agent's `http_listen`).
//! 1. On leaves:
//!    - [`sketch`]: mergeable distinct counts (exact set, then HyperLogLog p = 14).
//!    - [`state_dir`]: the state directory and its one-agent lock.
//! 2. Formats and storage:
//!    - [`wire`]: the upstream batch format, which the sink and the aggregator share.
//!    - [`outbox`]: the durable SQLite buffer and its delivery bookkeeping.
//! 3. What components share:
//!    - [`runtime`]: shutdown signal, record channel, off-loop outbox calls.
//!    - [`aws`]: what the CloudWatch sinks share: settings, credentials, SigV4
//!      ([`aws::sign`], the aws-sigv4 crate), the skew-corrected clock, one signed POST.
//! 4. Components:
//!    - [`sources`]: the source contract and registry; [`sources::synthetic`],
//!      [`sources::xx_gateway`] (an xx gateway's bloom-filter table),
//!      [`sources::relay`] (practable session-host websocket streams).
//!    - [`sinks`]: the sink contract and registry; [`sinks::delivery`] (the shared
//!      retry/dead-letter loop) and [`sinks::delivery::outage`] (what it says of tries
//!      that fail, however often they flap); [`sinks::csv`], the CloudWatch sinks and
//!      [`sinks::upstream`] (batches to an upstream edgemeter).
//! 5. The aggregator:
//!    - [`upstream`]: `edgemeter upstream`: [`upstream::api`] (routes, tokens, `/metrics`),
//!      [`upstream::store`] over [`upstream::db`] (SQLite or PostgreSQL),
//!      [`upstream::query`] (ranges and output formats).
//! 6. The document:
//!    - [`config`]: the TOML file, parsed raw then validated; every problem with its line.
//! 7. What the agent says about itself:
//!    - [`status`]: one snapshot (outbox, sinks, sources' status files) as
//!      `status` text, `status --json` and Prometheus `/metrics`; the
//!      `[agent] http_listen` server ([`status::serve`]).
//! 8. The program:
//!    - [`agent`]: the event loop of `run`: spawns everything, group commits, shutdown.
//! 9. The command line:
//!    - [`cli`]: arguments, commands, exit codes, `status` and `outbox` output;
//!      [`cli::demo`]: `edgemeter demo`.
//!
//! ## Invariants
//! - Sources never touch the outbox or sinks directly: they emit records;
//!   the outbox writer alone appends. (A source may keep its own state file.)
//! - Nothing is deleted from the outbox before every sink that wants it has
//!   confirmed it, and the deletion is in the transaction that records the
//!   confirmation.
//! - A batch's id `(sink, seq)` never changes once handed out; retries and
//!   restarts resend the same id with the same records (less any dropped for
//!   space, which are counted).
//! - Everything that grows has a bound: the record channel
//!   ([`runtime::RECORD_CHANNEL_CAPACITY`] items, and
//!   [`runtime::RECORDS_IN_GROUPS_MAX`] records in items of several), the
//!   outbox (`buffer_max_bytes`),
//!   dead letters (a quarter of it), uncommitted records while the disk is
//!   full, batch sizes (`batch_max_records`), the config file (1 MiB).
//! - One agent per state directory (an `flock` on `edgemeter.lock`).
//! - The upstream acknowledges a batch only after its transaction committed,
//!   and stores a key `(agent, outbox, seq)` at most once, whichever replica
//!   gets it and however often.
//!
//! ## Cross-cutting concerns
//! - **Errors**: one enum per boundary ([`config::ConfigError`],
//!   [`outbox::OutboxError`], [`state_dir::LockError`],
//!   [`agent::AgentError`], [`sinks::DeliveryError`]). Fatal: an invalid
//!   config (exit 2), a locked or unusable state dir (exit 3). Everything
//!   else (a failed commit, a failed delivery) is logged, counted and
//!   retried with backoff; it never stops the loop.
//! - **Threads**: one `LocalExecutor` on the main thread runs every task
//!   (a source spawns its own, the aggregator its connections, through
//!   [`sources::Context::spawner`]);
//!   never `smol::spawn`, never `smol::unblock` (the `blocking` pool behind
//!   it never shrinks). Blocking work goes to a [`runtime::Worker`]: one named
//!   thread per role (`outbox`, and one per sink, e.g. `sink-csv`), started
//!   when a job comes and gone after 1 s without one. So the process has at
//!   most 2 + 1 + (number of sinks) threads; at idle, the main thread and
//!   async-io's reactor thread (`async-io`), plus the `outbox` worker for a
//!   moment every 5 s when the sinks look for retried dead letters.
//! - **Logs**: a line is a sentence for an operator, said when something
//!   changes, not at every attempt. A failure that repeats is a
//!   [`logging::Spell`]; what many parts meet in one moment is one line
//!   (a relay's streams: [`sources::relay::news`]); a sink's failed tries
//!   are one spell however often they flap ([`sinks::delivery::outage`]).
//!   Counts and sizes read as words: [`logging::count`] ("1 batch"),
//!   [`logging::human_bytes`] ("256.0 MiB").
//! - **Disk**: everything the agent keeps is bounded: the outbox by
//!   `buffer_max_bytes` (its dead letters by a quarter of it), the relay's
//!   analytics by `max_users`, its raw files by `raw_files_max_bytes`
//!   ([`sources::relay::trim`]); the upstream's store by `retention_days`
//!   when set (by default it keeps everything).
//! - **Secrets** come from files or the environment, never argv, and never
//!   appear in a log line or an error stored in the outbox.
//! - **Tests**: unit tests beside the code (`mod tests`, data-driven
//!   `check` helpers); integration tests in `tests/` run the real binary;
//!   benchmarks in `benches/`. `scripts/test` runs everything CI runs.

pub mod agent;
pub mod aws;
pub mod backoff;
pub mod cli;
pub mod clock;
pub mod config;
pub mod hash;
pub mod http_client;
pub mod http_server;
pub mod logging;
pub mod outbox;
pub mod problems;
pub mod record;
pub mod runtime;
pub mod sinks;
pub mod sketch;
pub mod sources;
pub mod state_dir;
pub mod status;
pub mod systemd;
pub mod upstream;
pub mod wire;
