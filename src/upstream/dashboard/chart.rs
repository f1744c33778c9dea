//! Line charts as inline SVG, with no IO and no script: what the dashboard
//! draws. Every data point is one vertex of its series' `<polyline>` (the
//! tests count them against the CSV of the same query), time runs left to
//! right over the requested range, and the value axis starts at 0.

use std::fmt::Write;

use crate::clock::iso8601;

/// One line: its name (legend, `<title>`), CSS class (colour, dash) and
/// points as (ms, value), in time order.
pub struct Line {
    pub name: String,
    pub class: &'static str,
    pub points: Vec<(i64, f64)>,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub start_ms: i64,
    pub end_ms: i64,
    pub lines: Vec<Line>,
}

const W: f64 = 960.0;
const H: f64 = 300.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

/// 1, 2 or 5 × 10^k: the step of about `target` ticks over `span`.
pub fn nice_step(span: f64, target: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / target;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn label(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", crate::upstream::query::number(v / 1e6))
    } else if v >= 1e4 {
        format!("{}k", crate::upstream::query::number(v / 1e3))
    } else {
        crate::upstream::query::number(v)
    }
}

impl Chart<'_> {
    /// The highest value drawn (0 when there is none).
    fn top(&self) -> f64 {
        self.lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
    }

    pub fn svg(&self) -> String {
        let span = (self.end_ms - self.start_ms).max(1) as f64;
        let step = nice_step(self.top().max(1.0), 5.0);
        let ymax = (self.top() / step).ceil().max(1.0) * step;
        let x = |t: i64| LEFT + (t - self.start_ms) as f64 / span * (W - LEFT - RIGHT);
        let y = |v: f64| TOP + (1.0 - v / ymax) * (H - TOP - BOTTOM);
        let mut s = String::from(r#"<div class="chartbox">"#);
        let _ = write!(
            s,
            r#"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{}">"#,
            crate::upstream::dashboard::html::escape(self.title)
        );
        // Value grid and labels.
        let mut v = 0.0;
        while v <= ymax + step / 2.0 {
            let _ = write!(
                s,
                r#"<line class="grid" x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}"/><text class="ylab" x="{}" y="{:.1}">{}</text>"#,
                W - RIGHT,
                LEFT - 6.0,
                y(v) + 4.0,
                label(v),
                y = y(v)
            );
            v += step;
        }
        // Time labels: about six, at whole hours or days.
        let hour = 3_600_000f64;
        let tstep = [
            1.0, 2.0, 3.0, 6.0, 12.0, 24.0, 48.0, 72.0, 168.0, 336.0, 720.0,
        ]
        .iter()
        .map(|h| h * hour)
        .find(|st| span / st <= 7.0)
        .unwrap_or(720.0 * hour) as i64;
        let mut t = self.start_ms - self.start_ms.rem_euclid(tstep) + tstep;
        while t < self.end_ms {
            let stamp = iso8601(t);
            let text = if tstep >= 86_400_000 {
                stamp[5..10].to_owned()
            } else {
                format!("{} {}", &stamp[5..10], &stamp[11..16])
            };
            let _ = write!(
                s,
                r#"<line class="grid" x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{}"/><text class="xlab" x="{x:.1}" y="{}">{text}</text>"#,
                H - BOTTOM,
                H - 8.0,
                x = x(t)
            );
            t += tstep;
        }
        for line in &self.lines {
            let _ = write!(
                s,
                r#"<polyline class="{}" data-series="{}" points=""#,
                line.class,
                crate::upstream::dashboard::html::escape(&line.name)
            );
            for (i, (t, v)) in line.points.iter().enumerate() {
                let sep = if i == 0 { "" } else { " " };
                let _ = write!(s, "{sep}{:.1},{:.1}", x(*t), y(v.max(0.0)));
            }
            let _ = write!(
                s,
                r#""><title>{}</title></polyline>"#,
                crate::upstream::dashboard::html::escape(&line.name)
            );
        }
        s.push_str("</svg></div>");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_1_2_5() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(7.0, 5.0), 2.0);
        assert_eq!(nice_step(0.0, 5.0), 1.0);
        assert_eq!(nice_step(3_000.0, 5.0), 1000.0);
    }

    #[test]
    fn every_point_is_one_vertex_inside_the_frame() {
        let c = Chart {
            title: "a <b>",
            start_ms: 0,
            end_ms: 3_600_000,
            lines: vec![Line {
                name: "net".into(),
                class: "net",
                points: vec![(0, 0.0), (1_800_000, 10.0), (3_600_000, 5.0)],
            }],
        };
        let svg = c.svg();
        assert!(svg.contains(r#"aria-label="a &lt;b&gt;""#));
        let pts = svg
            .split(r#"data-series="net" points=""#)
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap();
        let v: Vec<(f64, f64)> = pts
            .split(' ')
            .map(|p| {
                let (a, b) = p.split_once(',').unwrap();
                (a.parse().unwrap(), b.parse().unwrap())
            })
            .collect();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0], (LEFT, H - BOTTOM));
        assert_eq!(v[2].0, W - RIGHT);
        assert!(v.iter().all(|(_, y)| (TOP..=H - BOTTOM).contains(y)));
        // The highest value sits at or below the top gridline.
        assert!(v[1].1 >= TOP);
    }
}
