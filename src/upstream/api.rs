//! The upstream's HTTP API: routes, bearer-token checks and its own
//! counters (`/metrics`). Requests arrive from `http.rs` already bounded;
//! answers are JSON errors `{"error": ...}` that say what to fix.
//!
//! | route | token | what |
//! |---|---|---|
//! | `POST /v1/batches` | the agent's | store a batch exactly once; `200` only after commit |
//! | `GET /v1/series` | admin | network-wide or per-agent series |
//! | `GET /v1/events` | admin | stored relay events |
//! | `GET /v1/rollups` | admin | stored daily totals |
//! | `DELETE /v1/users/{user}` | admin | delete one user's events |
//! | `GET /health` | none | store reachable, and taking batches? |
//! | `GET /metrics` | none | Prometheus text of the counters below |
//! | `GET /`, `/relay`, `/edges` | session cookie | the dashboard ([`crate::upstream::dashboard`]) |
//! | `GET`/`POST /sign-in`, `POST /sign-out` | none | the dashboard's session |
//!
//! Admin routes take the query token as a bearer token, or the dashboard's
//! session cookie (so a chart's CSV link works in the browser).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use smol::channel::Sender;

use crate::clock::{
    ClockSay, PEER_CLOCK_OFF_MS, PeerClock, now_ms, off_by, shared_offset, stamped_off,
};
use crate::http_server::{Budget, Full, Handler, Request, Response, query_pairs};
use crate::logging::{Losses, Lost, Say, Spell, again, settled, since_began};
use crate::problems::read_token;
use crate::runtime::{Doorbell, OnWorker, Shutdown, Wakeup, doorbell};
use crate::upstream::dashboard;
use crate::upstream::db::DbError;
use crate::upstream::query::{self, Params};
use crate::upstream::store::{Ingested, Store};
use crate::wire;

/// How often something a peer can cause on every request (a 401, expired
/// records) may produce a log line; the others are counted in it.
const PEER_LOG_EVERY: Duration = Duration::from_secs(10);

/// Something a peer can make happen on every request, logged at most once
/// per [`PEER_LOG_EVERY`] with how many times it happened since.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    since: u64,
}

impl Throttled {
    /// Count `n` more; the count to log now, if a line is due.
    fn note(&mut self, n: u64) -> Option<u64> {
        self.since += n;
        if self.last.is_some_and(|t| t.elapsed() < PEER_LOG_EVERY) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.since))
    }
}
/// A token that matches nothing makes us re-read `tokens_dir` (a new agent
/// was added), at most this often.
const TOKENS_RELOAD_EVERY: Duration = Duration::from_secs(5);

/// `a == b` in time that depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The agents' tokens, from `<tokens_dir>/<agent_id>.token`.
pub struct Tokens {
    dir: PathBuf,
    by_agent: Vec<(String, String)>,
    loaded: Instant,
}

impl Tokens {
    pub fn load(dir: &Path) -> Result<Tokens, String> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot read tokens_dir {}: {e}", dir.display()))?;
        let mut by_agent = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(agent) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".token"))
            else {
                continue;
            };
            match read_token(&path) {
                Ok(t) => by_agent.push((agent.to_owned(), t)),
                Err(e) => log::warn!("agent `{agent}` cannot post until this is fixed: {e}"),
            }
        }
        by_agent.sort();
        Ok(Tokens {
            dir: dir.to_owned(),
            by_agent,
            loaded: Instant::now(),
        })
    }

    /// The agents that have a token.
    pub fn agents(&self) -> Vec<String> {
        self.by_agent.iter().map(|(a, _)| a.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.by_agent.len()
    }

    /// The agent whose token this is. Every token is compared, in constant
    /// time each, whether or not one matched already.
    pub fn agent_of(&self, token: &str) -> Option<&str> {
        let mut found = None;
        for (agent, t) in &self.by_agent {
            if constant_time_eq(t.as_bytes(), token.as_bytes()) {
                found = Some(agent.as_str());
            }
        }
        found
    }
}

/// The upstream's own counters, exported at `/metrics`.
#[derive(Default)]
pub struct Counters {
    /// (route, status) → requests
    pub requests: RefCell<BTreeMap<(&'static str, u16), u64>>,
    pub batches_stored: Cell<u64>,
    pub batches_duplicate: Cell<u64>,
    /// reason → batches refused for their content
    pub batches_invalid: RefCell<BTreeMap<&'static str, u64>>,
    pub records_stored: Cell<u64>,
    pub records_late: Cell<u64>,
    pub records_expired: Cell<u64>,
    /// Deleted by `retention_days`.
    pub records_pruned: Cell<u64>,
    pub auth_failures: Cell<u64>,
    pub store_errors: Cell<u64>,
    pub connections_open: Cell<u64>,
    pub connections_refused: Cell<u64>,
    /// how a connection ended → count
    pub connections_closed: RefCell<BTreeMap<&'static str, u64>>,
    pub forwarded: Cell<u64>,
    pub ingest_seconds: Cell<f64>,
    /// The request-body budget, for its gauges.
    pub budget: RefCell<Option<Rc<Budget>>>,
    /// agent → what the `Date` of its latest batch said of its clock. At
    /// most one entry per agent with a token.
    pub agent_clocks: RefCell<BTreeMap<String, AgentClock>>,
}

/// An agent's clock as its latest batch showed it: this upstream's clock
/// less the agent's (its request's `Date`, the second it sent in), and
/// what was said of it.
#[derive(Default)]
pub struct AgentClock {
    pub offset_ms: i64,
    said: PeerClock,
}

/// A Prometheus label value: `\`, `"` and newlines escaped (an agent's
/// id is the name of its token's file).
fn label_value(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

pub fn bump_map<K: Ord>(m: &RefCell<BTreeMap<K, u64>>, k: K) {
    *m.borrow_mut().entry(k).or_default() += 1;
}

impl Counters {
    pub fn set_budget(&self, b: Rc<Budget>) {
        *self.budget.borrow_mut() = Some(b);
    }

    pub fn prometheus(&self, store_kind: &str) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, help: &str, kind: &str, lines: Vec<(String, String)>| {
            out.push_str(&format!("# HELP edgemeter_upstream_{name} {help}\n"));
            out.push_str(&format!("# TYPE edgemeter_upstream_{name} {kind}\n"));
            for (labels, v) in lines {
                out.push_str(&format!("edgemeter_upstream_{name}{labels} {v}\n"));
            }
        };
        let one = |v: u64| vec![(String::new(), v.to_string())];
        metric(
            "requests_total",
            "HTTP requests answered, by route and status.",
            "counter",
            self.requests
                .borrow()
                .iter()
                .map(|((r, s), v)| (format!("{{route=\"{r}\",status=\"{s}\"}}"), v.to_string()))
                .collect(),
        );
        // The plain counters, one number each.
        for (name, help, value) in [
            (
                "batches_stored_total",
                "Batches committed to the store.",
                self.batches_stored.get(),
            ),
            (
                "batches_duplicate_total",
                "Batches received again (a resend) and acknowledged without storing.",
                self.batches_duplicate.get(),
            ),
            (
                "records_stored_total",
                "Points, sketches and events stored.",
                self.records_stored.get(),
            ),
            (
                "records_late_total",
                "Records for windows whose aggregate had already been forwarded.",
                self.records_late.get(),
            ),
            (
                "records_expired_total",
                "Records older than retention_days, dropped at ingest.",
                self.records_expired.get(),
            ),
            (
                "records_pruned_total",
                "Points, sketches and events deleted as older than retention_days.",
                self.records_pruned.get(),
            ),
            (
                "auth_failures_total",
                "Requests with a missing or wrong token.",
                self.auth_failures.get(),
            ),
            (
                "store_errors_total",
                "Store operations that failed (answered 503).",
                self.store_errors.get(),
            ),
        ] {
            metric(name, help, "counter", one(value));
        }
        metric(
            "batches_invalid_total",
            "Batches refused for their content, by reason.",
            "counter",
            self.batches_invalid
                .borrow()
                .iter()
                .map(|(r, v)| (format!("{{reason=\"{r}\"}}"), v.to_string()))
                .collect(),
        );
        metric(
            "connections_open",
            "Connections being served.",
            "gauge",
            one(self.connections_open.get()),
        );
        metric(
            "connections_refused_total",
            "Connections closed at once because max_connections were open.",
            "counter",
            one(self.connections_refused.get()),
        );
        metric(
            "connections_closed_total",
            "Connections ended, by how.",
            "counter",
            self.connections_closed
                .borrow()
                .iter()
                .map(|(r, v)| (format!("{{how=\"{r}\"}}"), v.to_string()))
                .collect(),
        );
        metric(
            "agent_clock_offset_seconds",
            "This upstream's clock less each agent's, from the Date of its latest batch (over 10 s: the agent's clock is off).",
            "gauge",
            self.agent_clocks
                .borrow()
                .iter()
                .map(|(a, c)| {
                    (
                        format!("{{agent=\"{}\"}}", label_value(a)),
                        (c.offset_ms as f64 / 1000.0).to_string(),
                    )
                })
                .collect(),
        );
        if let Some(b) = self.budget.borrow().as_ref() {
            metric(
                "buffered_bytes",
                "Request bodies and unpacked batches held in memory now.",
                "gauge",
                one(b.used() as u64),
            );
            metric(
                "buffered_bytes_limit",
                "What they may hold at most (max_buffered_bytes).",
                "gauge",
                one(b.total() as u64),
            );
        }
        // SQLite's own heap (page caches of every connection, schemas,
        // statements), so a growing resident set can be told apart from
        // ours. Bounded by each connection's cache_size.
        // SAFETY: a plain read of SQLite's global counter, thread-safe.
        let sqlite_bytes = unsafe { rusqlite::ffi::sqlite3_memory_used() };
        metric(
            "sqlite_memory_bytes",
            "Memory SQLite holds now (page caches, schemas, statements).",
            "gauge",
            one(sqlite_bytes.max(0) as u64),
        );
        metric(
            "aggregates_forwarded_total",
            "Network-wide aggregates handed to this upstream's sinks.",
            "counter",
            one(self.forwarded.get()),
        );
        metric(
            "ingest_seconds_total",
            "Time spent committing batches.",
            "counter",
            vec![(String::new(), format!("{:.6}", self.ingest_seconds.get()))],
        );
        metric(
            "info",
            "This upstream's version and store.",
            "gauge",
            vec![(
                format!(
                    "{{version=\"{}\",store=\"{store_kind}\"}}",
                    env!("CARGO_PKG_VERSION")
                ),
                "1".into(),
            )],
        );
        out
    }
}

/// A batch on its way to the group committer, with where to answer.
pub type Commit = (wire::Batch, Sender<Result<Ingested, DbError>>);

pub struct Api {
    pub tokens: RefCell<Tokens>,
    pub admin_token_file: Option<PathBuf>,
    pub store: OnWorker<Store>,
    pub store_kind: &'static str,
    pub commits: Sender<Commit>,
    pub counters: Rc<Counters>,
    pub max_batch_bytes: usize,
    /// Served over TLS: the session cookie is `Secure`.
    pub tls: bool,
    auth_log: RefCell<Throttled>,
    expired_log: RefCell<Throttled>,
    /// Batches the store could not take, said a spell at a time: while a
    /// database is away every agent's every retry fails. The spell ends
    /// once none failed for [`Spell::SETTLE`] (a store that fails now and
    /// then is one spell), said by [`Api::say_store_settled`].
    store_failures: RefCell<Losses>,
    /// Rung when a batch is stored or a query answered after a failed
    /// one: the spell's end is then due ([`Api::ring_if_settling`]).
    store_worked: (Doorbell, Wakeup),
    /// Queries the store could not answer, said a spell at a time: while
    /// a database is away every dashboard's every refresh fails. Ends as
    /// `store_failures` does.
    query_failures: RefCell<Spell>,
    /// Why the store refused the last batch it was given, if it did (a
    /// SQLite store on a full disk reads and cannot write): `/health`
    /// says so.
    store_refusing: RefCell<Option<String>>,
    /// The offset every agent's clock read alike from this upstream's, as
    /// last said: then this upstream's clock is the suspect.
    own_clock_said: Cell<Option<i64>>,
}

/// The end of a spell of refused batches, if `lost` is one; `how_long`
/// says its length.
fn say_store_back(lost: Lost, how_long: impl Fn(Duration) -> String) {
    if let Lost::Ended { lost, lasted } = lost {
        log::info!(
            "the store takes batches again: {lost} were refused {}, and their agents send them again",
            how_long(lasted)
        );
    }
}

/// The end of a spell of failed queries, if `say` is one.
fn say_queries_back(say: Say, how_long: impl Fn(Duration) -> String) {
    if let Say::Ended { failed, lasted } = say {
        log::info!(
            "queries are answered again, after {failed} failed {}",
            how_long(lasted)
        );
    }
}

/// Who a request comes from, decided from its head.
pub enum Caller {
    Agent(String),
    Admin,
    /// Routes that need no token (`/health`, `/metrics`).
    Anyone,
}

/// The routes, each with what it needs.
#[derive(Clone, Copy)]
pub enum Route {
    Batch,
    Query(&'static str),
    DeleteUser,
    Health,
    Metrics,
    /// A dashboard page (its path).
    Page(&'static str),
    SignIn,
    SignOut,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Batch => "/v1/batches",
            Route::Query(r) => r,
            Route::DeleteUser => "/v1/users",
            Route::Health => "/health",
            Route::Metrics => "/metrics",
            Route::Page(p) => p,
            Route::SignIn => "/sign-in",
            Route::SignOut => "/sign-out",
        }
    }
}

impl Handler for Api {
    type Caller = (Route, Caller);

    /// The route, the method and the token, from the head alone: a request
    /// without a valid token is answered before a byte of its body is read.
    /// Only batches have a body.
    fn admit(&self, req: &Request) -> Result<(Self::Caller, usize), Response> {
        let admitted = self.route(req).and_then(|route| {
            let caller = match route {
                Route::Batch => {
                    let caller = self.authenticate(req, false)?;
                    // Read as the head arrives, not after a body that a
                    // slow link takes seconds to bring.
                    if let (Caller::Agent(agent), Some(date)) = (
                        &caller,
                        req.header("date").and_then(crate::clock::parse_http_date),
                    ) {
                        self.note_clock(agent, date);
                    }
                    caller
                }
                Route::Query(_) | Route::DeleteUser => self.authenticate(req, true)?,
                Route::Page(_) => self.session(req)?,
                Route::Health | Route::Metrics | Route::SignIn | Route::SignOut => Caller::Anyone,
            };
            let max_body = match route {
                Route::Batch => usize::MAX,
                Route::SignIn => dashboard::SIGN_IN_MAX_BYTES,
                _ => 0,
            };
            Ok(((route, caller), max_body))
        });
        if let Err(r) = &admitted {
            bump_map(&self.counters.requests, (route_name(req), r.status));
        }
        admitted
    }

    async fn handle(&self, req: Request, (route, caller): Self::Caller) -> Response {
        let resp = match (route, caller) {
            (Route::Batch, Caller::Agent(agent)) => self.post_batch(req, agent).await,
            (Route::Query(r), _) => self.query(r, &req).await,
            (Route::DeleteUser, _) => self.delete_user(&req).await,
            (Route::Health, _) => self.health().await,
            (Route::Metrics, _) => Response::new(
                200,
                "text/plain; version=0.0.4",
                self.counters.prometheus(self.store_kind),
            ),
            (Route::Page("/edges"), _) => {
                let agents = self.tokens.borrow().agents();
                let clocks = self
                    .counters
                    .agent_clocks
                    .borrow()
                    .iter()
                    .map(|(a, c)| (a.clone(), c.offset_ms))
                    .collect();
                dashboard::pages::edges(&self.store, agents, clocks, now_ms()).await
            }
            (Route::Page("/relay"), _) => {
                dashboard::pages::relay(&self.store, &req.query, now_ms()).await
            }
            (Route::Page("/graphs"), _) => {
                dashboard::pages::command_graphs(&self.store, &req.query, now_ms()).await
            }
            (Route::Page(_), _) => {
                dashboard::pages::active_users(&self.store, &req.query, now_ms()).await
            }
            (Route::SignIn, _) => self.sign_in(&req),
            (Route::SignOut, _) => {
                let mut r = dashboard::redirect("/sign-in");
                r.headers
                    .push(("set-cookie", dashboard::set_cookie(None, self.tls)));
                r
            }
            (Route::Batch, _) => unreachable!("admit lets batches in only with an agent's token"),
        };
        bump_map(&self.counters.requests, (route.name(), resp.status));
        resp
    }
}

impl Api {
    pub fn new(
        tokens: Tokens,
        admin_token_file: Option<PathBuf>,
        store: OnWorker<Store>,
        store_kind: &'static str,
        commits: Sender<Commit>,
        counters: Rc<Counters>,
        max_batch_bytes: usize,
    ) -> Api {
        Api {
            tokens: RefCell::new(tokens),
            admin_token_file,
            store,
            store_kind,
            commits,
            counters,
            max_batch_bytes,
            tls: false,
            auth_log: RefCell::default(),
            expired_log: RefCell::default(),
            store_failures: RefCell::new(Losses::settling()),
            store_worked: doorbell(),
            query_failures: RefCell::new(Spell::settling()),
            store_refusing: RefCell::default(),
            own_clock_said: Cell::default(),
        }
    }

    /// Say that the store takes batches (or answers queries) again once
    /// its spell of failures settled, though none comes then (agents with
    /// nothing to send post nothing, dashboards close), and at shutdown
    /// after one that worked: the log's last word is then not a failure
    /// that is over. Runs until shutdown.
    pub async fn say_store_settled(&self, shutdown: &Shutdown) {
        loop {
            let ends_at = [
                self.store_failures.borrow().ends_at(),
                self.query_failures.borrow().ends_at(),
            ];
            let wait = ends_at
                .into_iter()
                .flatten()
                .min()
                .map_or(Duration::from_secs(86_400), |at| {
                    at.saturating_duration_since(Instant::now())
                });
            let stop = smol::future::or(
                async {
                    shutdown.wait().await;
                    true
                },
                async {
                    self.store_worked.1.wait(wait).await;
                    false
                },
            )
            .await;
            let now = Instant::now();
            let (mut batches, mut queries) = (
                self.store_failures.borrow_mut(),
                self.query_failures.borrow_mut(),
            );
            if stop {
                let over = |lasted: Duration| format!("over {:.0} s", lasted.as_secs_f64());
                say_store_back(batches.stopped(now), over);
                say_queries_back(queries.stopped(now), over);
                return;
            }
            say_store_back(batches.quiet(now), settled);
            say_queries_back(queries.quiet(now), settled);
        }
    }

    /// Wake [`Api::say_store_settled`] when a spell's end became due: at
    /// the first batch or query that worked after a failure, not at each
    /// one after it (thousands a second while the spell settles).
    fn ring_if_settling(&self, was: Option<Instant>, now: Option<Instant>) {
        if was.is_none() && now.is_some() {
            self.store_worked.0.ring();
        }
    }

    /// What a request may be, decided from its route and method alone.
    fn route(&self, req: &Request) -> Result<Route, Response> {
        let method = req.method.as_str();
        Ok(match (route_name(req), method) {
            ("/v1/batches", "POST") => Route::Batch,
            (r @ ("/v1/series" | "/v1/events" | "/v1/rollups"), "GET") => Route::Query(r),
            ("/v1/users", "DELETE") => Route::DeleteUser,
            ("/health", "GET") => Route::Health,
            ("/metrics", "GET") => Route::Metrics,
            ("/", "GET") => Route::Page("/"),
            ("/edges", "GET") => Route::Page("/edges"),
            ("/relay", "GET") => Route::Page("/relay"),
            ("/graphs", "GET") => Route::Page("/graphs"),
            ("/sign-in", "GET" | "POST") => Route::SignIn,
            ("/sign-out", "POST") => Route::SignOut,
            ("other", _) => {
                return Err(Response::error(404, format!("no such path: {}", req.path)));
            }
            (_, m) => {
                return Err(Response::error(
                    405,
                    format!("{m} is not allowed on {}", req.path),
                ));
            }
        })
    }
    /// Who sent this, or the 401 to answer.
    fn authenticate(&self, req: &Request, want_admin: bool) -> Result<Caller, Response> {
        let token = req
            .header("authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        if want_admin && token.is_empty() && matches!(self.session(req), Ok(Caller::Admin)) {
            return Ok(Caller::Admin);
        }
        if !token.is_empty() {
            if want_admin {
                let Some(file) = &self.admin_token_file else {
                    return Err(Response::error(
                        403,
                        "queries are disabled: set [upstream] admin_token_file on the upstream",
                    ));
                };
                match read_token(file) {
                    Ok(admin) if constant_time_eq(admin.as_bytes(), token.as_bytes()) => {
                        return Ok(Caller::Admin);
                    }
                    Ok(_) => {}
                    Err(e) => log::error!("{e}; answering 401 to every query until it is fixed"),
                }
            } else {
                if let Some(agent) = self.tokens.borrow().agent_of(token) {
                    return Ok(Caller::Agent(agent.to_owned()));
                }
                let stale = self.tokens.borrow().loaded.elapsed() >= TOKENS_RELOAD_EVERY;
                if stale {
                    let dir = self.tokens.borrow().dir.clone();
                    match Tokens::load(&dir) {
                        Ok(t) => *self.tokens.borrow_mut() = t,
                        Err(e) => log::error!("{e}; keeping the tokens read before"),
                    }
                    if let Some(agent) = self.tokens.borrow().agent_of(token) {
                        return Ok(Caller::Agent(agent.to_owned()));
                    }
                }
            }
        }
        bump(&self.counters.auth_failures, 1);
        self.log_auth_failure(req, token.is_empty());
        let mut r = Response::error(401, "a valid bearer token is required");
        r.headers.push(("www-authenticate", "Bearer".into()));
        Err(r)
    }

    /// The query token, if queries are enabled and it can be read.
    fn admin_token(&self) -> Result<String, Response> {
        let Some(file) = &self.admin_token_file else {
            return Err(dashboard::html(
                403,
                dashboard::html::page(
                    "Disabled",
                    "",
                    false,
                    r#"<p class="error">The dashboard and queries are disabled: set <code>[upstream] admin_token_file</code> on the upstream.</p>"#,
                ),
            ));
        };
        read_token(file).map_err(|e| {
            log::error!("{e}; the dashboard refuses every sign-in until it is fixed");
            Response::error(
                503,
                "the query token cannot be read; see the upstream's log",
            )
        })
    }

    /// A dashboard page's caller: a valid session cookie, or a redirect to
    /// the sign-in form, which then leads back here.
    fn session(&self, req: &Request) -> Result<Caller, Response> {
        let token = self.admin_token()?;
        if dashboard::cookie(req).is_some_and(|c| dashboard::session_valid(&token, c, now_ms())) {
            return Ok(Caller::Admin);
        }
        let next = if req.query.is_empty() {
            req.path.clone()
        } else {
            format!("{}?{}", req.path, req.query)
        };
        let to: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("next", dashboard::local_path(&next))
            .finish();
        Err(dashboard::redirect(&format!("/sign-in?{to}")))
    }

    /// `GET`: the form. `POST`: check the token; a session cookie and back
    /// to where the form came from, or the form again saying why.
    fn sign_in(&self, req: &Request) -> Response {
        let pairs = if req.method == "POST" {
            query_pairs(&String::from_utf8_lossy(&req.body))
        } else {
            query_pairs(&req.query)
        };
        let field = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .unwrap_or("")
        };
        let next = dashboard::local_path(field("next")).to_owned();
        if req.method != "POST" {
            return dashboard::html(200, dashboard::html::sign_in(&next, None));
        }
        let admin = match self.admin_token() {
            Ok(t) => t,
            Err(r) => return r,
        };
        let given = field("token").trim();
        if !given.is_empty() && constant_time_eq(admin.as_bytes(), given.as_bytes()) {
            let expires = now_ms() + dashboard::SESSION_SECS * 1000;
            let mut r = dashboard::redirect(&next);
            r.headers.push((
                "set-cookie",
                dashboard::set_cookie(Some(&dashboard::session(&admin, expires)), self.tls),
            ));
            log::info!("dashboard: signed in from {}", req.peer);
            return r;
        }
        bump(&self.counters.auth_failures, 1);
        self.log_auth_failure(req, given.is_empty());
        dashboard::html(
            401,
            dashboard::html::sign_in(&next, Some("That is not the query token.")),
        )
    }

    /// At most one line per [`PEER_LOG_EVERY`]; the rest are counted into it.
    fn log_auth_failure(&self, req: &Request, missing: bool) {
        let Some(failures) = self.auth_log.borrow_mut().note(1) else {
            return;
        };
        log::warn!(
            "refused {} request(s) with a missing or wrong token in the last {} s (latest: {} {} from {}, token {}); \
             see edgemeter_upstream_auth_failures_total",
            failures,
            PEER_LOG_EVERY.as_secs(),
            req.method,
            req.path,
            req.peer,
            if missing { "missing" } else { "not recognised" }
        );
    }

    /// Keep what an agent's batch says of its clock (the request's `Date`,
    /// which agents send), and say when it is off and when it agrees again:
    /// a wrong clock stamps all that agent sends.
    fn note_clock(&self, agent: &str, date: i64) {
        let now = now_ms();
        let offset = now - (date + 500);
        let mut clocks = self.counters.agent_clocks.borrow_mut();
        if !clocks.contains_key(agent) {
            // Agents whose token was taken away go: one entry per token.
            let agents = self.tokens.borrow().agents();
            clocks.retain(|a, _| agents.contains(a));
        }
        let c = clocks.entry(agent.to_owned()).or_default();
        c.offset_ms = offset;
        match c.said.reading(offset) {
            ClockSay::Off(o) => log::warn!(
                "agent `{agent}`: its clock is {} this upstream's (the Date of its batches): what it records is stamped {} than it happened. Set its clock right: network time (`timedatectl set-ntp true`). Said again only if it changes; /edges and /metrics show it",
                off_by(o),
                stamped_off(o)
            ),
            ClockSay::Agrees { was } => log::info!(
                "agent `{agent}`: its clock agrees with this upstream's again (it was {} it)",
                off_by(was)
            ),
            ClockSay::Nothing => {}
        }
        let offsets: Vec<i64> = clocks.values().map(|c| c.offset_ms).collect();
        let shared = shared_offset(&offsets);
        match (shared, self.own_clock_said.get()) {
            (Some(o), said) if said.is_none_or(|s| (o - s).abs() > PEER_CLOCK_OFF_MS) => {
                log::warn!(
                    "all {} agents that posted since this upstream started read its clock as {} theirs: this upstream's own clock is more likely the wrong one; check it (`timedatectl`). What it stores is stamped by the agents, but its windows' settling and retention_days go by its clock",
                    offsets.len(),
                    off_by(-o)
                );
                self.own_clock_said.set(Some(o));
            }
            (None, Some(_)) => {
                log::info!("the agents' clocks no longer all disagree alike with this upstream's");
                self.own_clock_said.set(None);
            }
            _ => {}
        }
    }

    async fn post_batch(&self, mut req: Request, agent: String) -> Response {
        let json = match req.header("content-encoding").map(str::to_ascii_lowercase) {
            Some(e) if e == "gzip" => match wire::gunzip(&req.body, self.max_batch_bytes) {
                Ok(j) => j,
                Err(e) => return self.invalid(&e),
            },
            None => {
                if req.body.len() > self.max_batch_bytes {
                    return self.invalid(&wire::Invalid::TooLarge(self.max_batch_bytes));
                }
                std::mem::take(&mut req.body)
            }
            Some(other) => {
                return Response::error(
                    415,
                    format!("content-encoding `{other}` is not supported; send gzip"),
                );
            }
        };
        // What the batch costs until it is committed: its JSON now, and the
        // decoded records (of the same order) while it waits for the
        // committer; counted as twice the JSON against max_buffered_bytes.
        match req.permit.grow(json.len().saturating_mul(2)) {
            Ok(()) => {}
            Err(Full::Busy) => {
                let mut r = Response::error(
                    503,
                    "the upstream holds as many batches as it may (max_buffered_bytes); try again shortly",
                );
                r.headers.push(("retry-after", "1".into()));
                return r;
            }
            Err(Full::TooLarge) => {
                bump_map(&self.counters.batches_invalid, "too_large");
                return Response::error(
                    413,
                    format!(
                        "the batch unpacks to {} bytes, more than this upstream can hold at once (max_buffered_bytes); send smaller batches",
                        json.len()
                    ),
                );
            }
        }
        let batch = match wire::decode(&json, now_ms()) {
            Ok(b) => b,
            Err(e) => return self.invalid(&e),
        };
        drop(json);
        if batch.agent_id != agent {
            bump_map(&self.counters.batches_invalid, "agent_mismatch");
            return Response::error(
                403,
                format!(
                    "this token belongs to agent `{agent}`, but the batch says `{}`",
                    batch.agent_id
                ),
            );
        }
        let (tx, rx) = smol::channel::bounded(1);
        if self.commits.try_send((batch, tx)).is_err() {
            return Response::error(503, "the upstream is busy; try again shortly");
        }
        let result = rx.recv().await;
        // A batch stored or refused by the store; not one cut off by
        // shutdown, which says nothing of the store.
        let (failed, lost) = match &result {
            Ok(Ok(_)) => (None, Some(0)),
            Ok(Err(e)) => (Some(e), Some(1)),
            Err(_) => (None, None),
        };
        let lost = lost.map_or(Lost::Nothing, |n| {
            let mut failures = self.store_failures.borrow_mut();
            let was = failures.ends_at();
            let lost = failures.lost(n, Instant::now());
            self.ring_if_settling(was, failures.ends_at());
            lost
        });
        if result.is_ok() {
            *self.store_refusing.borrow_mut() = failed.map(|e| e.to_string());
        }
        match (failed, lost) {
            (Some(e), Lost::Began(_)) => log::error!(
                "could not store a batch from agent `{agent}`: {e}; answering 503 to batches until the store takes them again (their agents send them again)"
            ),
            (Some(e), Lost::Still { lost, since }) => log::error!(
                "the store still fails: batches refused: {}; the latest, from agent `{agent}`: {e}",
                since_began(lost, since)
            ),
            (_, lost) => say_store_back(lost, settled),
        }
        match result {
            Ok(Ok(done)) => {
                if done.new {
                    bump(&self.counters.batches_stored, 1);
                    bump(&self.counters.records_stored, done.records as u64);
                    bump(&self.counters.records_late, done.late as u64);
                    bump(&self.counters.records_expired, done.expired as u64);
                    if done.expired > 0
                        && let Some(n) = self.expired_log.borrow_mut().note(done.expired as u64)
                    {
                        log::warn!(
                            "dropped {n} record(s) older than retention_days in the last {} s \
                             (latest from agent `{agent}`): their days are deleted from the store; \
                             see edgemeter_upstream_records_expired_total",
                            PEER_LOG_EVERY.as_secs()
                        );
                    }
                } else {
                    bump(&self.counters.batches_duplicate, 1);
                }
                Response::json(
                    200,
                    &serde_json::json!({
                        "stored": if done.new { done.records } else { 0 },
                        "duplicate": !done.new,
                        "late": done.late,
                        "expired": done.expired,
                    }),
                )
            }
            Ok(Err(_)) => {
                bump(&self.counters.store_errors, 1);
                Response::error(503, "the store is unavailable; the batch was not stored")
            }
            Err(_) => Response::error(503, "the upstream is shutting down"),
        }
    }

    fn invalid(&self, e: &wire::Invalid) -> Response {
        let (reason, status) = match e {
            wire::Invalid::Gzip(_) => ("gzip", 400),
            wire::Invalid::TooLarge(_) => ("too_large", 413),
            wire::Invalid::Shape(_) => ("shape", 400),
            wire::Invalid::Version(_) => ("version", 400),
            wire::Invalid::Value(_) => ("value", 422),
            wire::Invalid::Sketch(_) => ("sketch", 422),
        };
        bump_map(&self.counters.batches_invalid, reason);
        Response::error(status, e.to_string())
    }

    async fn query(&self, route: &'static str, req: &Request) -> Response {
        let params = match Params::from_pairs(query_pairs(&req.query)) {
            Ok(p) => p,
            Err(e) => return Response::error(400, e),
        };
        let answered = answer(&self.store, route, params).await;
        let mut failures = self.query_failures.borrow_mut();
        match answered {
            Ok((content_type, body)) => {
                let was = failures.ends_at();
                say_queries_back(failures.worked(Instant::now()), settled);
                self.ring_if_settling(was, failures.ends_at());
                Response::new(200, content_type, body)
            }
            Err(QueryError::Invalid(e)) => Response::error(400, e),
            Err(QueryError::Store(e)) => {
                bump(&self.counters.store_errors, 1);
                if let Say::Failure { attempts } = failures.failed(Instant::now()) {
                    log::error!(
                        "{}a query failed: {e}; answering 503 to queries until the store answers again",
                        again(attempts)
                    );
                }
                Response::error(503, "the store is unavailable")
            }
        }
    }

    async fn delete_user(&self, req: &Request) -> Response {
        let user =
            crate::http_server::percent_decode(req.path.strip_prefix("/v1/users/").unwrap_or(""));
        if user.is_empty() || user.len() > 256 {
            return Response::error(400, "name the user: DELETE /v1/users/<user>");
        }
        let u = user.clone();
        match self.store.call(move |s| s.delete_user(&u)).await {
            Ok(n) => {
                log::info!("deleted {n} stored events of one user on request");
                Response::json(
                    200,
                    &serde_json::json!({ "user": user, "deleted_events": n }),
                )
            }
            Err(e) => {
                bump(&self.counters.store_errors, 1);
                log::error!("deleting a user's events failed: {e}");
                Response::error(503, "the store is unavailable; nothing was deleted")
            }
        }
    }

    async fn health(&self) -> Response {
        if let Some(e) = self.store_refusing.borrow().clone() {
            return Response::json(
                503,
                &serde_json::json!({ "status": "store refuses batches", "error": e, "store": self.store_kind }),
            );
        }
        let agents = self.tokens.borrow().len();
        let now = now_ms();
        match self
            .store
            .call(move |s| s.sizes().map(|sizes| (sizes, s.deleted_before(now))))
            .await
        {
            Ok((sizes, deleted_before)) => Response::json(
                200,
                &serde_json::json!({
                    "status": "ok", "store": self.store_kind, "agents_with_tokens": agents,
                    "rows": sizes,
                    // null: kept forever; else the first day not deleted by retention_days.
                    "raw_data_from": deleted_before.map(crate::clock::day),
                }),
            ),
            Err(e) => Response::json(
                503,
                &serde_json::json!({ "status": "store unavailable", "error": e.to_string(), "store": self.store_kind }),
            ),
        }
    }
}

fn route_name(req: &Request) -> &'static str {
    match req.path.as_str() {
        "/v1/batches" => "/v1/batches",
        "/v1/series" => "/v1/series",
        "/v1/events" => "/v1/events",
        "/v1/rollups" => "/v1/rollups",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/" => "/",
        "/edges" => "/edges",
        "/relay" => "/relay",
        "/graphs" => "/graphs",
        "/sign-in" => "/sign-in",
        "/sign-out" => "/sign-out",
        p if p.starts_with("/v1/users/") => "/v1/users",
        _ => "other",
    }
}

/// Why a query got no answer: the question (400) or the store (503).
#[derive(Debug, Clone, PartialEq)]
pub enum QueryError {
    /// The question is wrong: what to fix.
    Invalid(String),
    /// The store failed; the question may be asked again.
    Store(DbError),
}

/// Answer a query from the store: `(content type, body)`. Shared by the
/// HTTP API and `edgemeter report` on a local store.
pub async fn answer(
    store: &OnWorker<Store>,
    route: &str,
    params: Params,
) -> Result<(&'static str, String), QueryError> {
    let now = now_ms();
    let format = params.format().map_err(QueryError::Invalid)?;
    match route {
        "/v1/series" => {
            let q = params.series(now).map_err(QueryError::Invalid)?;
            let q2 = q.clone();
            let rows = store
                .call(move |s| s.series(&q2))
                .await
                .map_err(QueryError::Store)?;
            Ok((
                format.content_type(),
                query::render_series(&q, &rows, format),
            ))
        }
        "/v1/rollups" => {
            let (first, last) = params.days(now).map_err(QueryError::Invalid)?;
            let metric = params.metric.clone();
            let rows = store
                .call(move |s| s.rollups(&first, &last))
                .await
                .map_err(QueryError::Store)?
                .into_iter()
                .filter(|r| metric.as_ref().is_none_or(|m| *m == r.metric))
                .collect::<Vec<_>>();
            Ok((format.content_type(), query::render_rollups(&rows, format)))
        }
        _ => {
            if format != query::Format::Json {
                return Err(QueryError::Invalid(
                    "events come as JSON only (format=json)".into(),
                ));
            }
            let q = params.events(now).map_err(QueryError::Invalid)?;
            let rows = store
                .call(move |s| s.events(&q))
                .await
                .map_err(QueryError::Store)?;
            // Each payload goes out as the JSON text it was stored as,
            // never re-parsed (a stored non-JSON payload as a JSON string).
            #[derive(serde::Serialize)]
            struct Out {
                time: String,
                ts: i64,
                #[serde(rename = "type")]
                etype: String,
                user: Option<String>,
                agent: String,
                dims: serde_json::Value,
                payload: Box<serde_json::value::RawValue>,
            }
            #[derive(serde::Serialize)]
            struct Events {
                events: Vec<Out>,
            }
            let events: Vec<Out> = rows
                .into_iter()
                .map(|e| Out {
                    time: crate::clock::iso8601(e.ts),
                    ts: e.ts,
                    dims: serde_json::from_str(&e.dims).unwrap_or(serde_json::Value::Null),
                    payload: serde_json::value::RawValue::from_string(e.payload.clone())
                        .unwrap_or_else(|_| {
                            serde_json::value::to_raw_value(&e.payload)
                                .expect("a string serializes")
                        }),
                    etype: e.etype,
                    user: e.user,
                    agent: e.agent,
                })
                .collect();
            Ok((
                "application/json",
                serde_json::to_string(&Events { events }).expect("events serialize") + "\n",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn tokens_come_from_one_file_per_agent() {
        let dir = std::env::temp_dir().join(format!("edgemeter-tokens-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("gw-1.token"), "t-one\n").expect("write");
        std::fs::write(dir.join("gw-2.token"), "t-two").expect("write");
        std::fs::write(dir.join("README"), "not a token").expect("write");
        std::fs::write(dir.join("empty.token"), "").expect("write");
        let t = Tokens::load(&dir).expect("load");
        assert_eq!(t.len(), 2);
        assert_eq!(t.agent_of("t-one"), Some("gw-1"));
        assert_eq!(t.agent_of("t-two"), Some("gw-2"));
        assert_eq!(t.agent_of("not a token"), None);
        assert_eq!(t.agent_of(""), None);
        std::fs::remove_dir_all(&dir).ok();
        assert!(Tokens::load(&dir).is_err());
    }
}
