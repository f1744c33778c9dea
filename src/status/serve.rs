//! `[agent] http_listen`: a read-only window on the running agent.
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | [`super::prometheus`] |
//! | `GET /health` | `200 ok` while the event loop answers, the outbox is readable and its disk has room, else `503` with the reason |
//! | `GET /status.json` | the [`Snapshot`] (as `edgemeter status --json`) |
//! | `GET /` | a status page: the text of `edgemeter status`, refreshed every 10 s |
//! | `GET /graphs` | the relay sources' command graphs ([`super::graphs`]) |
//!
//! No token: nothing here changes anything, and the listener binds
//! 127.0.0.1 unless configured otherwise. Every request's snapshot is taken
//! on the `status` worker thread (started on demand, gone after a second
//! idle), so a scrape never blocks the event loop; requests take no body,
//! and at most [`MAX_CONNECTIONS`] are served at once.

use std::cell::Cell;
use std::net::TcpListener;
use std::rc::Rc;
use std::time::Duration;

use smol::Async;

use crate::clock::now_ms;
use crate::http_server::{self, Budget, Handler, Limits, Request, Response, escape_html};
use crate::logging::Spell;
use crate::runtime::{Shutdown, Spawner, Worker};

use super::{Holder, Scope, Snapshot};

/// Connections served at once; more are answered `503` and closed.
pub const MAX_CONNECTIONS: usize = 16;

fn limits() -> Limits {
    Limits {
        max_connections: MAX_CONNECTIONS,
        max_header_bytes: 8 * 1024,
        max_body_bytes: 0,
        max_batch_bytes: 0,
        max_buffered_bytes: 0,
        header_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Route {
    Metrics,
    Health,
    Json,
    Page,
    Graphs,
}

pub struct Local {
    scope: Scope,
    worker: Worker,
}

impl Local {
    pub fn new(scope: Scope) -> Local {
        Local {
            scope,
            worker: Worker::new("status"),
        }
    }

    async fn snapshot(&self) -> Result<Snapshot, String> {
        let scope = self.scope.clone();
        self.worker
            .run(move || super::collect(&scope, Holder::Me, now_ms()))
            .await
    }
}

impl Handler for Local {
    type Caller = Route;

    fn admit(&self, req: &Request) -> Result<(Route, usize), Response> {
        let route = match req.path.as_str() {
            "/metrics" => Route::Metrics,
            "/health" => Route::Health,
            "/status.json" => Route::Json,
            "/" => Route::Page,
            "/graphs" => Route::Graphs,
            _ => {
                return Err(Response::error(
                    404,
                    "no such page; try /, /graphs, /metrics, /health or /status.json",
                ));
            }
        };
        if req.method != "GET" {
            let mut r = Response::error(405, "read-only: only GET is served here");
            r.headers.push(("allow", "GET".to_owned()));
            return Err(r);
        }
        Ok((route, 0))
    }

    async fn handle(&self, req: Request, route: Route) -> Response {
        if let Route::Graphs = route {
            let scope = self.scope.clone();
            let query = req.query.clone();
            let (status, body) = self
                .worker
                .run(move || super::graphs::page(&scope, &query))
                .await;
            return page_response(status, body);
        }
        let snapshot = match self.snapshot().await {
            Ok(s) => s,
            Err(e) => {
                return Response::error(503, format!("cannot read the outbox: {e}"));
            }
        };
        let mut r = match route {
            Route::Metrics => Response::new(
                200,
                super::prometheus::CONTENT_TYPE,
                super::prometheus::render(&snapshot),
            ),
            Route::Health => match snapshot.outbox.disk_full() {
                None => Response::new(
                    200,
                    "text/plain; charset=utf-8",
                    format!(
                        "ok: agent {}, {} records buffered\n",
                        snapshot.agent.id, snapshot.outbox.records
                    ),
                ),
                Some(free) => Response::error(
                    503,
                    format!(
                        "the disk of {} is full ({free} bytes free): commits fail, and records wait in memory",
                        snapshot.agent.state_dir.display()
                    ),
                ),
            },
            Route::Json => {
                let mut body = serde_json::to_vec_pretty(&snapshot).expect("a snapshot serializes");
                body.push(b'\n');
                Response::new(200, "application/json", body)
            }
            Route::Page => return page_response(200, page(&snapshot)),
            Route::Graphs => unreachable!("answered above"),
        };
        r.headers.push(("cache-control", "no-store".to_owned()));
        r.headers
            .push(("x-content-type-options", "nosniff".to_owned()));
        r
    }
}

/// An HTML page: nothing but its own inline style may load or run.
fn page_response(status: u16, body: String) -> Response {
    let mut r = Response::new(status, "text/html; charset=utf-8", body);
    r.headers.push((
        "content-security-policy",
        "default-src 'none'; style-src 'unsafe-inline'".to_owned(),
    ));
    r.headers.push(("cache-control", "no-store".to_owned()));
    r.headers
        .push(("x-content-type-options", "nosniff".to_owned()));
    r
}

/// The page's one line: what is wrong first, else that all is well.
/// ("bad", …) for what loses or delays data now, ("warn", …) for what did.
pub fn verdict(s: &Snapshot) -> (&'static str, String) {
    let mut bad = Vec::new();
    for k in s
        .sinks
        .iter()
        .filter(|k| k.last_failure_ms > k.last_delivery_ms)
    {
        bad.push(format!("sink {} failing", k.name));
    }
    for src in &s.sources {
        for x in &src.samples {
            let broken = match x.name.as_str() {
                "xx_failing" | "xx_csv_failing" => x.value == 1.0,
                "relay_stream_up" => x.value == 0.0,
                _ => false,
            };
            if broken {
                let what = match x.labels.get("stream") {
                    Some(stream) => format!("stream {stream} of source {} not live", src.name),
                    None if x.name == "xx_csv_failing" => {
                        format!("source {}: csv_path failing", src.name)
                    }
                    None => {
                        let why = src
                            .samples
                            .iter()
                            .find(|e| e.name == "xx_error_info")
                            .and_then(|e| e.labels.get("error"));
                        match why {
                            Some(why) => format!("source {} failing: {why}", src.name),
                            None => format!("source {} failing", src.name),
                        }
                    }
                };
                bad.push(what);
            }
        }
    }
    if !bad.is_empty() {
        return ("bad", bad.join("; "));
    }
    let dropped: i64 = s.drops.iter().map(|d| d.records).sum();
    if dropped > 0 {
        return (
            "warn",
            format!("working; {dropped} records were dropped (see drops)"),
        );
    }
    (
        "ok",
        "working: sources and sinks are fine, nothing dropped".to_owned(),
    )
}

/// The status page: the same text as `edgemeter status`, a headline a
/// tired operator reads first, and links to the machine forms.
pub fn page(s: &Snapshot) -> String {
    let (class, headline) = verdict(s);
    let id = escape_html(&s.agent.id);
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="10">
<title>edgemeter {id}</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 1rem auto; max-width: 70rem; padding: 0 1rem; color: #111; }}
h1 {{ font-size: 1.3rem; margin: 0 0 .5rem; }}
.state {{ padding: .5rem .8rem; border-radius: 4px; font-weight: 600; }}
.ok {{ background: #e3f4e1; }} .warn {{ background: #fff3cd; }} .bad {{ background: #f8d7da; }}
pre {{ font: 13px/1.35 ui-monospace, monospace; background: #f6f6f6; padding: .8rem; overflow-x: auto; }}
footer {{ color: #555; font-size: .85rem; }}
@media print {{ footer {{ display: none; }} }}
</style></head>
<body>
<h1>edgemeter agent <code>{id}</code></h1>
<p class="state {class}">{headline}</p>
<pre>{text}</pre>
<footer>As <code>edgemeter status</code>, taken {at}; refreshes every 10 s.
Command graphs: <a href="/graphs">/graphs</a>. Machine-readable: <a href="/metrics">/metrics</a> (Prometheus), <a href="/status.json">/status.json</a>, <a href="/health">/health</a>.</footer>
</body></html>
"#,
        headline = escape_html(&headline),
        text = escape_html(&super::text::render(s)),
        at = crate::clock::iso8601(s.at_ms),
    )
}

/// Serve `listener` until shutdown.
pub async fn serve(
    listener: Async<TcpListener>,
    scope: Scope,
    spawner: Spawner,
    shutdown: Shutdown,
) {
    let handler = Rc::new(Local::new(scope));
    let limits = Rc::new(limits());
    let budget = Budget::new(0);
    let open = Rc::new(Cell::new(0usize));
    let mut refusing = Spell::settling();
    let listening = match listener.get_ref().local_addr() {
        Ok(a) => format!("http_listen on {a}"),
        Err(_) => "http_listen".to_owned(),
    };
    loop {
        let Some((stream, peer)) = shutdown.accept(&listener, &mut refusing, &listening).await
        else {
            return;
        };
        if open.get() >= MAX_CONNECTIONS {
            let busy = http_server::encode_response(
                &Response::error(503, "too many connections; try again shortly"),
                true,
            );
            use std::io::Write;
            let _ = stream.get_ref().write(&busy);
            continue;
        }
        open.set(open.get() + 1);
        let (handler, limits, budget, open) = (
            handler.clone(),
            limits.clone(),
            budget.clone(),
            open.clone(),
        );
        spawner
            .spawn(async move {
                http_server::serve_connection(stream, peer, &limits, &budget, &*handler).await;
                open.set(open.get() - 1);
            })
            .detach();
    }
}
