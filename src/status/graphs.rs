//! The agent's command graphs page (`GET /graphs` of `[agent] http_listen`):
//! the transition graphs each relay source keeps in its state file, listed,
//! and one drawn when asked (`?source=&user=&exp=&course=`), read-only.

use std::fmt::Write;

use crate::http_server::{escape_html, query_pairs};
use crate::sources::relay::{draw, store};

use super::Scope;

/// Graphs listed per source at most.
pub const MAX_LISTED: usize = 2_000;

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The page for `query` (blocking: run it on a worker).
pub fn page(scope: &Scope, query: &str) -> (u16, String) {
    let mut want: [Option<String>; 4] = Default::default();
    for (k, v) in query_pairs(query) {
        let slot = match k.as_str() {
            "source" => 0,
            "user" => 1,
            "exp" => 2,
            "course" => 3,
            _ => {
                return (
                    400,
                    frame(
                        "Command graphs",
                        &format!("<p>unknown parameter <code>{}</code></p>", escape_html(&k)),
                    ),
                );
            }
        };
        want[slot] = Some(v);
    }
    let relays: Vec<&String> = scope
        .sources
        .iter()
        .filter(|(_, t)| t == "relay")
        .map(|(n, _)| n)
        .collect();
    let mut body = String::new();
    if relays.is_empty() {
        body += "<p>No relay source is configured: command graphs come from a <code>relay</code> source's analytics.</p>";
        return (200, frame("Command graphs", &body));
    }
    for name in relays {
        if want[0].as_ref().is_some_and(|s| s != name) {
            continue;
        }
        let path = scope.state_dir.join(format!("relay-{name}.db"));
        let graphs = match store::read_graphs(&path, MAX_LISTED) {
            Ok(g) => g,
            Err(e) => {
                let _ = write!(
                    body,
                    "<p class=\"bad\">source {}: {}</p>",
                    escape_html(name),
                    escape_html(&e)
                );
                continue;
            }
        };
        let picked: Vec<_> = graphs
            .iter()
            .filter(|(k, _)| {
                want[1].as_deref() == Some(k.user.as_str())
                    && want[2].as_deref().is_none_or(|e| e == k.exp)
                    && want[3].as_deref().is_none_or(|c| c == k.course)
            })
            .collect();
        if want[1].is_some() {
            if picked.is_empty() {
                let _ = write!(
                    body,
                    "<p>Source {}: no graph of this user.</p>",
                    escape_html(name)
                );
            }
            for (n, (k, g)) in picked.iter().enumerate() {
                let transitions: u64 = g.edges.values().sum();
                let _ = write!(
                    body,
                    "<h2>{} · {} · {}</h2><p>{transitions} transitions (source {}).</p>",
                    escape_html(&k.user),
                    escape_html(&k.exp),
                    escape_html(&k.course),
                    escape_html(name)
                );
                body += &draw::command_graph_svg(
                    g,
                    &k.exp,
                    &format!("{} in {} ({})", k.user, k.exp, k.course),
                    n,
                );
            }
            continue;
        }
        let _ = write!(
            body,
            "<h2>Source {}</h2><table><tr><th>user</th><th>exp</th><th>course</th><th class=\"n\">transitions</th></tr>",
            escape_html(name)
        );
        for (k, g) in &graphs {
            let transitions: u64 = g.edges.values().sum();
            let _ = write!(
                body,
                r#"<tr><td><a href="/graphs?source={}&amp;user={}&amp;exp={}&amp;course={}">{}</a></td><td>{}</td><td>{}</td><td class="n">{transitions}</td></tr>"#,
                enc(name),
                enc(&k.user),
                enc(&k.exp),
                enc(&k.course),
                escape_html(&k.user),
                escape_html(&k.exp),
                escape_html(&k.course)
            );
        }
        body += "</table>";
        if graphs.len() >= MAX_LISTED {
            let _ = write!(body, "<p>The first {MAX_LISTED} by user are listed.</p>");
        }
    }
    (200, frame("Command graphs", &body))
}

fn frame(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgemeter: {title}</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 1rem auto; max-width: 70rem; padding: 0 1rem; color: #111; }}
h1 {{ font-size: 1.3rem; margin: 0 0 .5rem; }} h2 {{ font-size: 1.05rem; margin: 1rem 0 .3rem; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: .2rem .6rem; border-bottom: 1px solid #e3e3e3; }}
td.n, th.n {{ text-align: right; }}
svg.graph {{ width: 100%; max-width: 34rem; height: auto; border: 1px solid #ddd; }}
svg.graph text {{ font: 13px system-ui, sans-serif; }}
.bad {{ background: #f8d7da; padding: .4rem .6rem; }}
</style></head>
<body><h1>{title}</h1><p><a href="/">Status</a> · <a href="/graphs">All graphs</a></p>
{body}
</body></html>
"#
    )
}
