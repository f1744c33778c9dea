//! `edgemeter upstream`: the aggregator many edges post to.
//!
//! It is the agent (`agent.rs`) with one more task beside the sources: the
//! server. Its own `[[sink]]`s receive the network-wide aggregates through
//! its own outbox, exactly as an edge's sinks receive what its sources
//! measured, so an upstream can post to CloudWatch or to another upstream
//! (a tree), with the same durability and retries.
//!
//! ```text
//! edges ─POST /v1/batches─► http_server.rs (bounded) ─► api.rs (token, decode: wire.rs)
//!        ─► group committer ─► store.rs (exactly once; SQLite | PostgreSQL via db.rs)
//! forwarder: settled windows ─► union / sum ─► this upstream's outbox ─► its sinks
//! queries: /v1/series, /v1/events, /v1/rollups (query.rs) · /health · /metrics
//! retention (optional): hourly, old days rolled up, then deleted (store/retention.rs)
//! ```
//!
//! Threads: the event loop serves every connection; the store runs on one
//! worker thread (`upstream-store`), where batches that arrive while a
//! commit runs are committed together in the next transaction.

pub mod api;
pub mod config;
pub mod dashboard;
pub mod db;
pub mod query;
pub mod store;

use crate::wire;

use std::cell::Cell;
use std::net::TcpListener;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use smol::Async;
use smol::channel::Receiver;

pub use config::Config;

use crate::clock::now_ms;
use crate::http_server;
use crate::logging::{Say, Spell, again, count, settled};
use crate::runtime::{Emitter, LocalBoxFuture, OnWorker, Shutdown};
use crate::sources::{Context, Source};
use api::{Api, Commit, Counters, Tokens, bump_map};
use store::{Group, Store};

pub const STORE_FILE: &str = "upstream.db";
/// Batches waiting for the committer; past this a POST is answered 503.
const COMMIT_QUEUE: usize = 4_096;
/// Batches committed in one transaction at most.
const GROUP_MAX: usize = 512;
/// Settled groups forwarded per round; more wait for the next.
const FORWARD_MAX: usize = 2_000;
/// How often the store is pruned to `retention_days` (a pass that finds
/// the line where it left it costs nothing).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Open the store `c` names. `read_only` is for `edgemeter report` beside
/// a running upstream (SQLite only; PostgreSQL reads are reads anyway).
pub fn open_store(c: &Config, state_dir: &Path, read_only: bool) -> Result<Store, String> {
    let db: Box<dyn db::Db> = match &c.store {
        config::StoreKind::Sqlite => {
            let path = state_dir.join(STORE_FILE);
            if !read_only {
                std::fs::create_dir_all(state_dir)
                    .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
            } else if !path.exists() {
                return Err(format!(
                    "{} does not exist (has `edgemeter upstream` run with this state_dir?)",
                    path.display()
                ));
            }
            Box::new(db::Sqlite::open(&path, read_only).map_err(|e| e.to_string())?)
        }
        config::StoreKind::Postgres { url, password_file } => {
            let password = match password_file {
                Some(f) => Some(crate::problems::read_token(f)?),
                None => std::env::var("PGPASSWORD").ok(),
            };
            Box::new(db::Postgres::new(url, password).map_err(|e| e.to_string())?)
        }
    };
    let mut store = Store::new(db, c.edge_dims.clone(), c.settle.as_millis() as i64);
    store.set_retention(c.retention_days);
    if !read_only {
        let started = std::time::Instant::now();
        let n = store
            .prepare_caches()
            .map_err(|e| format!("cannot prepare the store's union cache: {e}"))?;
        if n > 0 {
            log::info!(
                "counted {n} windows' sketches into the union cache (once, after an upgrade) in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(store)
}

/// Everything the server task needs, prepared before the loop starts so
/// that a port in use or an unreadable store stops `edgemeter upstream` at
/// once with a clear message.
pub struct Server {
    config: Config,
    listener: Async<TcpListener>,
    tokens: Tokens,
    store: Store,
    /// Whether this upstream has sinks to forward aggregates to.
    forwards: bool,
    tls: Option<futures_rustls::TlsAcceptor>,
}

/// The HTTPS side: rustls with ring, from PEM files.
fn tls_acceptor(cert: &Path, key: &Path) -> Result<futures_rustls::TlsAcceptor, String> {
    use futures_rustls::rustls;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect())
        .map_err(|e| format!("tls_cert_file {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls_cert_file {} holds no certificate",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("tls_key_file {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("TLS certificate and key do not fit together: {e}"))?;
    Ok(futures_rustls::TlsAcceptor::from(std::sync::Arc::new(
        config,
    )))
}

impl Server {
    pub fn prepare(config: Config, state_dir: &Path, forwards: bool) -> Result<Server, String> {
        let tokens = Tokens::load(&config.tokens_dir)?;
        if tokens.is_empty() {
            log::warn!(
                "no agent tokens in {} (one `<agent_id>.token` file per edge); every batch is refused until one is added",
                config.tokens_dir.display()
            );
        }
        let tls = match &config.tls {
            Some((cert, key)) => Some(tls_acceptor(cert, key)?),
            None => None,
        };
        let mut store = open_store(&config, state_dir, false)?;
        match store.set_forwarding(forwards) {
            Ok(0) => {}
            Ok(n) => log::info!(
                "this upstream has no [[sink]]: dropped {n} windows an earlier run had queued for forwarding"
            ),
            Err(e) => log::warn!("cannot drop the forwarding queue of an earlier run: {e}"),
        }
        let listener = Async::<TcpListener>::bind(config.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        Ok(Server {
            config,
            listener,
            tokens,
            store,
            forwards,
            tls,
        })
    }
}

impl Server {
    /// Where it listens (the port, when the config said 0).
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.get_ref().local_addr()
    }
}

impl Source for Server {
    fn run(self: Box<Self>, ctx: Context) -> LocalBoxFuture<'static, ()> {
        Box::pin(serve(*self, ctx))
    }
}

async fn serve(s: Server, ctx: Context) {
    let ex = ctx.spawner.clone();
    let c = s.config;
    let counters = Rc::new(Counters::default());
    let kind = s.store.kind();
    let scheme = if s.tls.is_some() { "https" } else { "http" };
    let listen = s
        .listener
        .get_ref()
        .local_addr()
        .map_or(c.listen.to_string(), |a| a.to_string());
    let store = OnWorker::new("upstream-store", s.store);
    match store.call(|s| s.sizes()).await {
        Ok(sizes) => log::info!(
            "upstream listening on {scheme}://{listen} ({}; {kind} store with {})",
            crate::logging::counted(s.tokens.len(), "agent token", "agent tokens"),
            crate::logging::counted(
                sizes.get("batches").map_or(0, |&n| n as usize),
                "batch",
                "batches"
            )
        ),
        Err(e) => log::error!(
            "upstream listening on {scheme}://{listen}, but the store is unavailable: {e}; answering 503 until it is back"
        ),
    }
    let (commits, queue) = smol::channel::bounded(COMMIT_QUEUE);
    let mut api = Api::new(
        s.tokens,
        c.admin_token_file.clone(),
        store.clone(),
        kind,
        commits,
        counters.clone(),
        c.limits.max_batch_bytes,
    );
    api.tls = s.tls.is_some();
    let api = Rc::new(api);
    let committer = ex.spawn(commit_loop(queue, store.clone(), counters.clone()));
    let store_spell = {
        let (api, shutdown) = (api.clone(), ctx.shutdown.clone());
        ex.spawn(async move { api.say_store_settled(&shutdown).await })
    };
    if s.forwards {
        ex.spawn(forward_loop(
            store.clone(),
            ctx.emit.clone(),
            ctx.agent_id.clone(),
            c.forward_interval,
            c.settle,
            ctx.shutdown.clone(),
            counters.clone(),
        ))
        .detach();
    }
    if let Some(days) = c.retention_days {
        ex.spawn(prune_loop(
            store.clone(),
            days,
            ctx.shutdown.clone(),
            counters.clone(),
        ))
        .detach();
    }

    let open = Rc::new(Cell::new(0usize));
    let limits = Rc::new(c.limits.clone());
    let budget = http_server::Budget::new(c.limits.max_buffered_bytes);
    counters.set_budget(budget.clone());
    let mut refusing = Spell::settling();
    let listening = format!("the upstream on {}", c.listen);
    loop {
        let Some((stream, peer)) = ctx
            .shutdown
            .accept(&s.listener, &mut refusing, &listening)
            .await
        else {
            break;
        };
        if open.get() >= limits.max_connections {
            counters
                .connections_refused
                .set(counters.connections_refused.get() + 1);
            // One write that cannot block (a fresh socket's buffer is
            // empty), then close: a full server costs nothing to refuse.
            let busy = http_server::encode_response(
                &http_server::Response::error(
                    503,
                    "too many connections (max_connections); try again shortly",
                ),
                true,
            );
            use std::io::Write;
            let _ = stream.get_ref().write(&busy);
            continue;
        }
        let _ = stream.get_ref().set_nodelay(true);
        open.set(open.get() + 1);
        counters.connections_open.set(open.get() as u64);
        let (api, open, limits, counters, budget) = (
            api.clone(),
            open.clone(),
            limits.clone(),
            counters.clone(),
            budget.clone(),
        );
        let tls = s.tls.clone();
        ex.spawn(async move {
            let how = match tls {
                None => {
                    http_server::serve_connection(stream, peer, &limits, &budget, &*api)
                        .await
                        .1
                }
                // The handshake counts against the header deadline.
                Some(acceptor) => {
                    match smol::future::or(async { Some(acceptor.accept(stream).await) }, async {
                        smol::Timer::after(limits.header_timeout).await;
                        None
                    })
                    .await
                    {
                        Some(Ok(tls)) => {
                            http_server::serve_connection(tls, peer, &limits, &budget, &*api)
                                .await
                                .1
                        }
                        Some(Err(_)) => http_server::Closed::Malformed,
                        None => http_server::Closed::HeaderTimeout,
                    }
                }
            };
            open.set(open.get() - 1);
            counters.connections_open.set(open.get() as u64);
            bump_map(&counters.connections_closed, how.as_str());
        })
        .detach();
    }
    // Let batches in flight finish, for at most a second: a body being read
    // or committed holds bytes of the budget until it is answered. Kept-alive
    // connections with no request are not waited for (an agent's pool keeps
    // them open: every stop took the whole second). An edge whose batch is
    // cut off sends it again; its key makes that harmless.
    let deadline = Instant::now() + Duration::from_secs(1);
    while budget.used() > 0 && Instant::now() < deadline {
        smol::Timer::after(Duration::from_millis(20)).await;
    }
    store_spell.await;
    drop(api);
    committer.cancel().await;
}

/// The group committer: takes every batch waiting, commits them in one
/// transaction on the store thread, answers each.
async fn commit_loop(queue: Receiver<Commit>, store: OnWorker<Store>, counters: Rc<Counters>) {
    while let Ok(first) = queue.recv().await {
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match queue.try_recv() {
                Ok(c) => group.push(c),
                Err(_) => break,
            }
        }
        let (batches, replies): (Vec<wire::Batch>, Vec<_>) = group.into_iter().unzip();
        let started = Instant::now();
        let results = store
            .call(move |s| {
                let refs: Vec<&wire::Batch> = batches.iter().collect();
                s.ingest(&refs, now_ms())
            })
            .await;
        counters
            .ingest_seconds
            .set(counters.ingest_seconds.get() + started.elapsed().as_secs_f64());
        match results {
            Ok(done) => {
                for (reply, d) in replies.into_iter().zip(done) {
                    let _ = reply.try_send(Ok(d));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.try_send(Err(e.clone()));
                }
            }
        }
    }
}

/// Forward settled windows' network-wide values through this upstream's
/// own outbox. `owner` (the upstream's agent id) names the claims of this
/// replica, so that after a crash it re-sends what it claimed but had not
/// seen committed (replicas need distinct agent ids).
async fn forward_loop(
    store: OnWorker<Store>,
    emit: Emitter,
    owner: String,
    every: Duration,
    settle: Duration,
    shutdown: Shutdown,
    counters: Rc<Counters>,
) {
    let mut recovering = true;
    // A store that is away fails every round: said once a spell, which
    // ends once no round failed for Spell::SETTLE (a store that fails now
    // and then is one spell, not two lines a flap).
    let mut failing = Spell::settling();
    loop {
        let owner2 = owner.clone();
        let until = now_ms() - settle.as_millis() as i64;
        let round = store
            .call(
                move |s| -> Result<Vec<(Group, store::Aggregate)>, db::DbError> {
                    let mut groups = if recovering {
                        s.unsent(&owner2)?
                    } else {
                        Vec::new()
                    };
                    let settled = s.settled(until, FORWARD_MAX)?;
                    groups.extend(s.claim(settled, &owner2, now_ms())?);
                    s.aggregates(&groups)
                },
            )
            .await;
        let mut full = false;
        match round {
            Err(e) => {
                if let Say::Failure { attempts } = failing.failed(Instant::now()) {
                    log::error!(
                        "{}forwarding aggregates: {e}; trying again every {} s",
                        again(attempts),
                        every.as_secs_f64()
                    );
                }
            }
            Ok(aggs) => {
                if let Say::Ended { failed, lasted } = failing.worked(Instant::now()) {
                    let failed = count(failed, "failed round", "failed rounds");
                    log::info!(
                        "forwarding aggregates works again, after {failed} {}",
                        settled(lasted)
                    );
                }
                recovering = false;
                full = aggs.len() >= FORWARD_MAX;
                let mut sent = Vec::with_capacity(aggs.len());
                for (g, a) in aggs {
                    if !emit.emit(a.point).await {
                        return;
                    }
                    if let Some(sk) = a.sketch
                        && !emit.emit(sk).await
                    {
                        return;
                    }
                    sent.push(g);
                }
                if !sent.is_empty() && emit.committed().await {
                    let n = sent.len() as u64;
                    match store.call(move |s| s.mark_sent(&sent)).await {
                        Ok(()) => counters.forwarded.set(counters.forwarded.get() + n),
                        Err(e) => log::error!(
                            "the aggregates are in the outbox, but marking them sent failed: {e}; \
                             they may be sent again after a restart"
                        ),
                    }
                }
            }
        }
        if !full && shutdown.sleep(every).await {
            return;
        }
    }
}

/// Delete raw data older than `days`, at start and every [`PRUNE_EVERY`],
/// a day per call on the store's thread so that batches are stored in
/// between.
async fn prune_loop(store: OnWorker<Store>, days: u32, shutdown: Shutdown, counters: Rc<Counters>) {
    loop {
        let started = Instant::now();
        let mut total = store::Pruned::default();
        let result = loop {
            match store.call(|s| s.prune(now_ms(), 1)).await {
                Err(e) => break Err(e),
                Ok(p) => {
                    counters
                        .records_pruned
                        .set(counters.records_pruned.get() + p.records());
                    total.absorb(p);
                    if total.finished || shutdown.is_started() {
                        break Ok(());
                    }
                }
            }
        };
        if let (Some(first), Some(last)) = (total.days.first(), total.days.last()) {
            let which = match total.days.len() {
                1 => first.clone(),
                n => format!("{n} days, {first} to {last}"),
            };
            log::info!(
                "deleted the raw data of {which} (retention_days = {days}): \
                 {} points, {} sketches, {} events, {} batch keys, in {:.1} s; \
                 their daily totals are kept (/v1/rollups)",
                total.points,
                total.sketches,
                total.events,
                total.batch_keys,
                started.elapsed().as_secs_f64()
            );
        }
        if total.unforwarded > 0 {
            log::warn!(
                "{} window(s) older than retention_days = {days} were deleted before their \
                 aggregates were forwarded: the sinks are behind by more than the retention",
                total.unforwarded
            );
        }
        if let Err(e) = result {
            log::error!(
                "pruning the store to retention_days = {days}: {e}; trying again in {} s",
                PRUNE_EVERY.as_secs()
            );
        }
        if shutdown.sleep(PRUNE_EVERY).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
