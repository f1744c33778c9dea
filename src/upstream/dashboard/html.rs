//! The dashboard's HTML frame: one stylesheet inline, a navigation bar, no
//! script, and the content security policy that keeps it that way.

pub use crate::http_server::escape_html as escape;

/// Nothing loads but this page's own inline style; forms post here only;
/// no page may frame it.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
                       frame-ancestors 'none'; base-uri 'none'";

const STYLE: &str = r#"
:root { --net: #1f5fbf; --sum: #b03a2e; --ink: #111; --muted: #5b5b5b; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: var(--ink); }
header { display: flex; flex-wrap: wrap; gap: .3rem 1.2rem; align-items: center; padding: .6rem 1rem; background: #1d2733; color: #fff; }
header b { font-size: 1.05rem; margin-right: .5rem; }
header a { color: #cfe0ff; text-decoration: none; padding: .15rem 0; }
header a.here { color: #fff; border-bottom: 2px solid #fff; }
header form { margin-left: auto; }
header button { background: none; border: 1px solid #8aa; color: #fff; border-radius: 3px; padding: .1rem .6rem; cursor: pointer; }
main { max-width: 72rem; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.3rem; margin: .2rem 0 .6rem; }
h2 { font-size: 1.1rem; margin: 1.2rem 0 .4rem; }
.controls { display: flex; flex-wrap: wrap; gap: .4rem .8rem; align-items: end; margin: .4rem 0 .8rem; }
.controls form { display: flex; flex-wrap: wrap; gap: .4rem .6rem; align-items: end; margin: 0; }
.controls label { display: inline-flex; flex-direction: column; font-size: .8rem; color: var(--muted); }
.controls select, .controls input, .controls button { font: inherit; padding: .2rem .4rem; }
.ranges a { padding: .15rem .5rem; border: 1px solid #bbb; border-radius: 3px; text-decoration: none; color: var(--ink); }
.ranges a.here { background: #1d2733; color: #fff; border-color: #1d2733; }
.chartbox { overflow-x: auto; }
svg.chart { width: 100%; min-width: 600px; height: auto; display: block; background: #fff; border: 1px solid #ddd; }
svg .grid { stroke: #e6e6e6; stroke-width: 1; }
svg text { font: 13px system-ui, sans-serif; fill: var(--muted); }
svg .ylab { text-anchor: end; } svg .xlab { text-anchor: middle; }
polyline { fill: none; stroke-width: 1.2; vector-effect: non-scaling-stroke; stroke-linejoin: round; }
polyline.net { stroke: var(--net); stroke-width: 2.6; }
polyline.sum { stroke: var(--sum); stroke-width: 1.8; stroke-dasharray: 6 4; }
polyline.e0 { stroke: #2a9d8f; } polyline.e1 { stroke: #e9a23b; } polyline.e2 { stroke: #8e6fbf; }
polyline.e3 { stroke: #6a994e; } polyline.e4 { stroke: #c05780; } polyline.e5 { stroke: #4f7ca8; }
polyline.e6 { stroke: #a0785a; } polyline.e7 { stroke: #7f7f7f; }
.legend { display: flex; flex-wrap: wrap; gap: .2rem 1rem; margin: .4rem 0; font-size: .85rem; }
.legend span::before { content: ""; display: inline-block; width: 1.4rem; height: 0; border-top: 3px solid; vertical-align: middle; margin-right: .3rem; }
.legend .net::before { border-color: var(--net); } .legend .sum::before { border-color: var(--sum); border-top-style: dashed; }
.legend .e0::before { border-color: #2a9d8f; } .legend .e1::before { border-color: #e9a23b; } .legend .e2::before { border-color: #8e6fbf; }
.legend .e3::before { border-color: #6a994e; } .legend .e4::before { border-color: #c05780; } .legend .e5::before { border-color: #4f7ca8; }
.legend .e6::before { border-color: #a0785a; } .legend .e7::before { border-color: #7f7f7f; }
svg.graph { width: 100%; max-width: 34rem; height: auto; display: block; background: #fff; border: 1px solid #ddd; }
svg.graph text { font-size: 13px; fill: var(--ink); }
.scroll { overflow-x: auto; }
table.heat th, table.heat td { border: 1px solid #eee; padding: .15rem .35rem; white-space: nowrap; }
table.compact { width: auto; }
table.edges td { white-space: nowrap; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; }
th, td { text-align: left; padding: .25rem .5rem; border-bottom: 1px solid #e3e3e3; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.stale td { background: #fdecea; }
.note { color: var(--muted); font-size: .85rem; }
.error { background: #fdecea; padding: .5rem .8rem; border-radius: 4px; }
.signin { max-width: 24rem; margin: 4rem auto; }
.signin input { width: 100%; font: inherit; padding: .4rem; margin: .3rem 0 .8rem; }
.signin button { font: inherit; padding: .35rem 1rem; }
@media print { header form, .controls, .noprint { display: none; } header { background: none; color: #000; } header a { color: #000; } }
"#;

/// Pages in the navigation bar: (path, label).
pub const PAGES: &[(&str, &str)] = &[
    ("/", "Active users"),
    ("/relay", "Relay"),
    ("/graphs", "Command graphs"),
    ("/edges", "Edges"),
];

/// A whole page. `here` is the current path (for the bar); `signed_in`
/// adds the bar's links and the sign-out button.
pub fn page(title: &str, here: &str, signed_in: bool, body: &str) -> String {
    let mut nav = String::new();
    if signed_in {
        for (path, label) in PAGES {
            let class = if *path == here {
                r#" class="here""#
            } else {
                ""
            };
            nav += &format!(r#"<a href="{path}"{class}>{label}</a>"#);
        }
        nav += r#"<form method="post" action="/sign-out"><button>Sign out</button></form>"#;
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{} · edgemeter</title>
<style>{STYLE}</style></head>
<body><header><b>edgemeter</b>{nav}</header>
<main>{body}</main></body></html>
"#,
        escape(title)
    )
}

/// The sign-in form; `next` is where to go after (a local path), `problem`
/// what went wrong with the last try.
pub fn sign_in(next: &str, problem: Option<&str>) -> String {
    let problem = problem
        .map(|p| format!(r#"<p class="error">{}</p>"#, escape(p)))
        .unwrap_or_default();
    page(
        "Sign in",
        "",
        false,
        &format!(
            r#"<div class="signin"><h1>Sign in</h1>{problem}
<form method="post" action="/sign-in">
<label for="token">Query token (the contents of <code>admin_token_file</code>)</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{}">
<button>Sign in</button></form>
<p class="note">The token is checked once and never kept in the browser: a signed cookie
(HttpOnly, SameSite=Strict) stands for it for 12 hours.</p></div>"#,
            escape(next)
        ),
    )
}
