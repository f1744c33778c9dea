//! What the relay source learns from the logging envelope, as plain state
//! with no IO: per user×hardware activity and, for `analytics` messages,
//! the command-transition graph per user×exp×course; plus rendering of the
//! files the analytics server and people read.
//!
//! The graph follows the published analytics client (`process.py` of
//! learning-analytics-server): a spinner `payload.log` of `voltage`,
//! `position` or `speed` is the node `<x>_step`, the `_ramp` variants keep
//! their name; pendulum (and any other experiment's) commands are nodes as
//! they come. Consecutive commands of one user×exp×course, over all rigs,
//! add 1 to the cell (row = previous, column = next), which is what its
//! `df[next][prev] += 1` does. The last command is kept, so the next
//! message continues the chain across dumps and restarts.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Deserialize;
use serde_json::Value;

use crate::clock::iso8601;

/// The envelope fields we use, borrowed from the message text where it
/// has no escapes. A message that is not an object with `user` and `type`
/// strings (data streams, firmware lines) is counted but not analysed.
#[derive(Debug, PartialEq, Deserialize)]
pub struct Envelope<'a> {
    #[serde(borrow)]
    pub user: Cow<'a, str>,
    #[serde(borrow, rename = "type")]
    pub kind: Cow<'a, str>,
    #[serde(borrow, default)]
    pub exp: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub hardware: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub course: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "payload_log")]
    pub payload: Option<Cow<'a, str>>,
}

/// `payload.log` (the command of an `analytics` message), or nothing when
/// the payload is not an object with a string `log`.
fn payload_log<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Payload<'a> {
        #[serde(borrow, default)]
        log: Option<Cow<'a, str>>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Any<'a> {
        #[serde(borrow)]
        Payload(Payload<'a>),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Any::deserialize(d)? {
        Any::Payload(p) => p.log,
        Any::Other(_) => None,
    })
}

pub fn envelope(text: &str) -> Option<Envelope<'_>> {
    serde_json::from_str(text).ok()
}

/// Names that become parts of file names and CSV cells: plain, bounded, and
/// never a path.
pub fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

pub const SPINNER_NODES: [&str; 6] = [
    "voltage_step",
    "voltage_ramp",
    "position_step",
    "position_ramp",
    "speed_step",
    "speed_ramp",
];

pub const PENDULUM_NODES: [&str; 8] = [
    "start",
    "brake",
    "load",
    "free",
    "sampling",
    "drive_perc",
    "brake_perc",
    "measuring_tools",
];

/// The graph node for command `log` of experiment `exp`, if it is one.
pub fn node(exp: &str, log: &str) -> Option<String> {
    if exp == "spinner" {
        return match log {
            "voltage" | "position" | "speed" => Some(format!("{log}_step")),
            "voltage_ramp" | "position_ramp" | "speed_ramp" => Some(log.to_owned()),
            _ => None,
        };
    }
    safe_name(log).then(|| log.to_owned())
}

/// Fixed node positions (x, y) from the analytics server, so its graphs and
/// ours look the same.
fn position(exp: &str, node: &str) -> Option<(f64, f64)> {
    let s = 200.0 * (std::f64::consts::PI / 3.0).sin();
    let p = match (exp, node) {
        ("spinner", "voltage_step") => (100.0, -s),
        ("spinner", "voltage_ramp") => (-100.0, -s),
        ("spinner", "position_step") => (200.0, 0.0),
        ("spinner", "position_ramp") => (-200.0, 0.0),
        ("spinner", "speed_step") => (100.0, s),
        ("spinner", "speed_ramp") => (-100.0, s),
        ("pendulum", "start") => (-100.0, 200.0),
        ("pendulum", "brake") => (100.0, 200.0),
        ("pendulum", "free") => (200.0, 100.0),
        ("pendulum", "load") => (200.0, -100.0),
        ("pendulum", "sampling") => (100.0, -200.0),
        ("pendulum", "drive_perc") => (-100.0, -200.0),
        ("pendulum", "brake_perc") => (-200.0, -100.0),
        ("pendulum", "measuring_tools") => (-200.0, 100.0),
        _ => return None,
    };
    Some(p)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Activity {
    pub first_ms: i64,
    pub last_ms: i64,
    pub messages: u64,
    /// Distinct wall-clock minutes with at least one message.
    pub minutes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GraphKey {
    pub user: String,
    pub exp: String,
    pub course: String,
}

impl GraphKey {
    pub fn file_stem(&self) -> String {
        format!("{}-{}-{}", self.user, self.exp, self.course)
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Graph {
    pub nodes: Vec<String>,
    /// (from, to) → transitions.
    pub edges: BTreeMap<(String, String), u64>,
    pub last: Option<String>,
}

impl Graph {
    pub fn new(exp: &str) -> Graph {
        let nodes: &[&str] = match exp {
            "spinner" => &SPINNER_NODES,
            "pendulum" => &PENDULUM_NODES,
            _ => &[],
        };
        Graph {
            nodes: nodes.iter().map(|s| (*s).to_owned()).collect(),
            ..Graph::default()
        }
    }

    fn add_node(&mut self, node: &str) {
        if !self.nodes.iter().any(|n| n == node) {
            self.nodes.push(node.to_owned());
        }
    }

    /// Follow one command; true if it made a transition.
    pub fn step(&mut self, node: String) -> bool {
        self.add_node(&node);
        let moved = match self.last.take() {
            Some(prev) => {
                *self.edges.entry((prev, node.clone())).or_insert(0) += 1;
                true
            }
            None => false,
        };
        self.last = Some(node);
        moved
    }

    /// The matrix as pandas writes it (`DataFrame.to_csv`): node labels as
    /// header and index, counts as floats (`np.zeros` starts it as floats).
    pub fn adjacency_csv(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push(',');
            out.push_str(n);
        }
        out.push('\n');
        for from in &self.nodes {
            out.push_str(from);
            for to in &self.nodes {
                let n = self
                    .edges
                    .get(&(from.clone(), to.clone()))
                    .copied()
                    .unwrap_or(0);
                out.push_str(&format!(",{n}.0"));
            }
            out.push('\n');
        }
        out
    }

    /// `{nodes, edges}` in the shape the dashboards draw (pyvis's network
    /// data: nodes with id, label and fixed x/y; edges with from, to, weight
    /// and a label).
    pub fn to_json(&self, exp: &str) -> String {
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| {
                let mut o = serde_json::json!({"id": n, "label": n});
                if let Some((x, y)) = position(exp, n) {
                    o["x"] = x.into();
                    o["y"] = y.into();
                    o["physics"] = false.into();
                }
                o
            })
            .collect();
        let edges: Vec<Value> = self
            .edges
            .iter()
            .map(|((from, to), n)| {
                serde_json::json!({"from": from, "to": to, "weight": n, "label": n.to_string()})
            })
            .collect();
        let mut s = serde_json::json!({"nodes": nodes, "edges": edges}).to_string();
        s.push('\n');
        s
    }
}

/// What one message changed, for counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// A name (user, hardware, exp, course) was unusable, or the user is
    /// beyond `max_users`: counted, not analysed.
    pub untracked: bool,
    pub transition: bool,
}

/// The analytics state of one relay source. Bounded by `max_users`
/// distinct users; beyond that, messages of new users are counted but not
/// analysed.
pub struct Analytics {
    max_users: usize,
    users: HashSet<String>,
    pub activity: HashMap<(String, String), Activity>,
    pub graphs: HashMap<GraphKey, Graph>,
    pub dirty_activity: HashSet<(String, String)>,
    pub dirty_graphs: HashSet<GraphKey>,
}

impl Analytics {
    pub fn new(max_users: usize) -> Analytics {
        Analytics {
            max_users,
            users: HashSet::new(),
            activity: HashMap::new(),
            graphs: HashMap::new(),
            dirty_activity: HashSet::new(),
            dirty_graphs: HashSet::new(),
        }
    }

    /// Take state loaded from disk (not marked dirty).
    pub fn restore(
        &mut self,
        activity: HashMap<(String, String), Activity>,
        graphs: HashMap<GraphKey, Graph>,
    ) {
        for (user, _) in activity.keys() {
            self.users.insert(user.clone());
        }
        for k in graphs.keys() {
            self.users.insert(k.user.clone());
        }
        self.activity = activity;
        self.graphs = graphs;
    }

    /// One envelope message received at `now_ms` on a stream whose rig is
    /// `hardware`.
    pub fn observe(&mut self, now_ms: i64, hardware: &str, env: &Envelope) -> Observed {
        let mut out = Observed::default();
        let user: &str = &env.user;
        if !safe_name(user) || !safe_name(hardware) {
            out.untracked = true;
            return out;
        }
        if !self.users.contains(user) {
            if self.users.len() >= self.max_users {
                out.untracked = true;
                return out;
            }
            self.users.insert(user.to_owned());
        }
        let key = (user.to_owned(), hardware.to_owned());
        let a = self.activity.entry(key.clone()).or_insert(Activity {
            first_ms: now_ms,
            last_ms: now_ms,
            messages: 0,
            minutes: 0,
        });
        if a.messages == 0 || now_ms.div_euclid(60_000) > a.last_ms.div_euclid(60_000) {
            a.minutes += 1;
        }
        a.messages += 1;
        a.last_ms = a.last_ms.max(now_ms);
        self.dirty_activity.insert(key);

        if env.kind == "analytics" {
            let (Some(exp), Some(course), Some(log)) = (
                env.exp.as_deref(),
                env.course.as_deref(),
                env.payload.as_deref(),
            ) else {
                return out;
            };
            if !safe_name(exp) || !safe_name(course) {
                out.untracked = true;
                return out;
            }
            if let Some(node) = node(exp, log) {
                let key = GraphKey {
                    user: user.to_owned(),
                    exp: exp.to_owned(),
                    course: course.to_owned(),
                };
                let g = self
                    .graphs
                    .entry(key.clone())
                    .or_insert_with(|| Graph::new(exp));
                out.transition = g.step(node);
                self.dirty_graphs.insert(key);
            }
        }
        out
    }

    /// The user×hardware matrix of messages: one row per user, one column
    /// per rig, both sorted.
    pub fn usage_csv(&self) -> String {
        let hardware: std::collections::BTreeSet<&str> =
            self.activity.keys().map(|(_, h)| h.as_str()).collect();
        let mut rows: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
        for ((u, h), a) in &self.activity {
            rows.entry(u).or_default().insert(h, a.messages);
        }
        let mut out = String::from("user");
        for h in &hardware {
            out.push(',');
            out.push_str(h);
        }
        out.push('\n');
        for (u, cells) in rows {
            out.push_str(u);
            for h in &hardware {
                out.push_str(&format!(",{}", cells.get(h).copied().unwrap_or(0)));
            }
            out.push('\n');
        }
        out
    }

    /// Per user×hardware activity, one line each, sorted.
    pub fn activity_csv(&self) -> String {
        let mut keys: Vec<_> = self.activity.keys().collect();
        keys.sort();
        let mut out = String::from("user,hardware,first_seen,last_seen,messages,active_minutes\n");
        for k in keys {
            let a = self.activity[k];
            out.push_str(&format!(
                "{},{},{},{},{},{}\n",
                k.0,
                k.1,
                iso8601(a.first_ms),
                iso8601(a.last_ms),
                a.messages,
                a.minutes
            ));
        }
        out
    }
}
