//! A user's command graph as inline SVG, as the old dashboards showed it
//! (pyvis with the analytics client's fixed node positions): a node per
//! command, an arrow per transition with its width growing with the count
//! and the count written on it, a loop for a command repeated. Pure: the
//! agent's status page and the upstream's dashboard both call it.

use std::fmt::Write;

use crate::http_server::escape_html;

use super::analytics::Graph;
use super::answers::node_position;

/// Half the drawing's side, in the positions' units (they reach ±200).
const HALF: f64 = 270.0;
const NODE_R: f64 = 20.0;
const LOOP_R: f64 = 16.0;

/// Where each node is drawn: the client's position where it has one, else
/// evenly on a circle.
fn places(g: &Graph, exp: &str) -> Vec<(f64, f64)> {
    let n = g.nodes.len().max(1) as f64;
    g.nodes
        .iter()
        .enumerate()
        .map(|(i, name)| match node_position(exp, name) {
            Some((x, y)) => (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0)),
            None => {
                let a = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
                (200.0 * a.cos(), 200.0 * a.sin())
            }
        })
        .collect()
}

/// The SVG of `g` (a `<svg>` element with a `<title>` per arrow, so a
/// pointer or a screen reader gets the exact count); `title` names it.
/// `id` makes the arrowhead's id unique on a page with several graphs.
pub fn command_graph_svg(g: &Graph, exp: &str, title: &str, id: usize) -> String {
    let at = places(g, exp);
    let index = |name: &str| g.nodes.iter().position(|n| n == name);
    let max = g.edges.values().copied().max().unwrap_or(1).max(1) as f64;
    let width = |c: u64| 1.5 + 4.0 * (c as f64 / max);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg class="graph" viewBox="{} {} {} {}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg"><title>{}</title><defs><marker id="arrow{}" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" markerWidth="16" markerHeight="16" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>"##,
        -HALF,
        -HALF,
        2.0 * HALF,
        2.0 * HALF,
        escape_html(title),
        escape_html(title),
        id
    );
    for ((from, to), &count) in &g.edges {
        let (Some(f), Some(t)) = (index(from), index(to)) else {
            continue;
        };
        let label = format!("{from} → {to}: {count}");
        let (x1, y1) = at[f];
        if f == t {
            // A loop on the side away from the centre.
            let (len, (ux, uy)) = unit(x1, y1);
            let (ux, uy) = if len == 0.0 { (0.0, -1.0) } else { (ux, uy) };
            let (cx, cy) = (
                x1 + ux * (NODE_R + LOOP_R - 6.0),
                y1 + uy * (NODE_R + LOOP_R - 6.0),
            );
            let _ = write!(
                s,
                r##"<g class="edge"><title>{}</title><circle cx="{cx:.1}" cy="{cy:.1}" r="{LOOP_R}" fill="none" stroke="#555" stroke-width="{:.1}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" dominant-baseline="middle">{count}</text></g>"##,
                escape_html(&label),
                width(count),
                cx + ux * (LOOP_R + 10.0),
                cy + uy * (LOOP_R + 10.0),
            );
            continue;
        }
        let (x2, y2) = at[t];
        let (len, (ux, uy)) = unit(x2 - x1, y2 - y1);
        if len == 0.0 {
            continue;
        }
        // Both directions of a pair are drawn side by side, not on top.
        let (ox, oy) = (-uy * 6.0, ux * 6.0);
        let (ax, ay) = (x1 + ux * NODE_R + ox, y1 + uy * NODE_R + oy);
        let (bx, by) = (x2 - ux * (NODE_R + 2.0) + ox, y2 - uy * (NODE_R + 2.0) + oy);
        let _ = write!(
            s,
            r##"<g class="edge"><title>{}</title><line x1="{ax:.1}" y1="{ay:.1}" x2="{bx:.1}" y2="{by:.1}" stroke="#555" stroke-width="{:.1}" marker-end="url(#arrow{id})"/><text x="{:.1}" y="{:.1}" text-anchor="middle" dominant-baseline="middle">{count}</text></g>"##,
            escape_html(&label),
            width(count),
            ax + (bx - ax) / 3.0 + ox * 1.8,
            ay + (by - ay) / 3.0 + oy * 1.8,
        );
    }
    for (name, (x, y)) in g.nodes.iter().zip(&at) {
        let _ = write!(
            s,
            r##"<g class="node"><title>{}</title><circle cx="{x:.1}" cy="{y:.1}" r="{NODE_R}" fill="#97c2fc" stroke="#2b7ce9"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text></g>"##,
            escape_html(name),
            y + NODE_R + 14.0,
            escape_html(name)
        );
    }
    s.push_str("</svg>");
    s
}

fn unit(x: f64, y: f64) -> (f64, (f64, f64)) {
    let len = (x * x + y * y).sqrt();
    if len == 0.0 {
        (0.0, (0.0, 0.0))
    } else {
        (len, (x / len, y / len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transition_is_one_titled_arrow_or_loop_and_names_are_escaped() {
        let mut g = Graph::new("spinner");
        g.edges
            .insert(("voltage_step".into(), "voltage_step".into()), 4);
        g.edges
            .insert(("voltage_step".into(), "position_step".into()), 2);
        g.edges
            .insert(("position_step".into(), "voltage_step".into()), 1);
        let svg = command_graph_svg(&g, "spinner", "u<1>", 0);
        assert_eq!(svg.matches(r#"<g class="edge">"#).count(), 3);
        assert_eq!(svg.matches(r#"<g class="node">"#).count(), 6);
        assert!(svg.contains("<title>voltage_step → position_step: 2</title>"));
        assert!(svg.contains("<title>voltage_step → voltage_step: 4</title>"));
        assert!(svg.contains("u&lt;1&gt;") && !svg.contains("u<1>"));
        // The busiest transition is drawn widest.
        assert!(svg.contains(r#"stroke-width="5.5""#), "{svg}");
        // Fixed positions: position_step at (200, 0).
        assert!(svg.contains(r#"<circle cx="200.0" cy="0.0" r="20""#));
    }

    #[test]
    fn commands_without_a_fixed_place_go_on_a_circle() {
        let mut g = Graph::new("turbine");
        g.nodes = vec!["a".into(), "b".into()];
        g.edges.insert(("a".into(), "b".into()), 1);
        let svg = command_graph_svg(&g, "turbine", "t", 0);
        assert!(
            svg.contains(r#"<circle cx="0.0" cy="-200.0" r="20""#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"<circle cx="-0.0" cy="200.0" r="20""#)
                || svg.contains(r#"<circle cx="0.0" cy="200.0" r="20""#),
            "{svg}"
        );
    }
}
