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

use std::collections::{BTreeMap, VecDeque};
use std::hash::BuildHasher;

use serde_json::Value;

use super::envelope::{Envelope, message_time};
use crate::clock::iso8601;

/// Names that become parts of file names and CSV cells: plain, bounded, and
/// never a path.
pub fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && !s.starts_with('.')
        && s.bytes().all(|b| NAME_BYTES[b as usize])
}

/// The bytes [`safe_name`] allows, by value: a table, as five names a
/// message (user, rig twice, experiment, course) checked by comparisons
/// took a tenth of the relay's per-message instructions (cachegrind of the
/// ingest).
static NAME_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = name_byte(b as u8);
        b += 1;
    }
    t
};

/// A byte [`safe_name`] allows: ASCII letters and digits, `_`, `-`, `.`.
const fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

pub const SPINNER_NODES: [&str; 6] = [
    "voltage_step",
    "voltage_ramp",
    "position_step",
    "position_ramp",
    "speed_step",
    "speed_ramp",
];

pub const PENDULUM_NODES: [&str; 9] = [
    "start",
    "brake",
    "load",
    "free",
    "sampling",
    "drive_perc",
    "brake_perc",
    "measuring_tools",
    "record",
];

/// The nodes a new graph of experiment `exp` starts with: all its commands
/// for the client's two experiments, none (they come as used) for others.
fn exp_nodes(exp: &str) -> &'static [&'static str] {
    match exp {
        "spinner" => &SPINNER_NODES,
        "pendulum" => &PENDULUM_NODES,
        _ => &[],
    }
}

/// The graph node for command `log` of experiment `exp`, if it is one.
pub fn node<'a>(exp: &str, log: &'a str) -> Option<&'a str> {
    if exp == "spinner" {
        return match log {
            "voltage" => Some("voltage_step"),
            "position" => Some("position_step"),
            "speed" => Some("speed_step"),
            "voltage_ramp" | "position_ramp" | "speed_ramp" => Some(log),
            _ => None,
        };
    }
    if exp == "pendulum" {
        // The client counts only its nine pendulum commands.
        return PENDULUM_NODES.contains(&log).then_some(log);
    }
    safe_name(log).then_some(log)
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
        Graph {
            nodes: exp_nodes(exp).iter().map(|s| (*s).to_owned()).collect(),
            ..Graph::default()
        }
    }

    /// The matrix as pandas writes it (`DataFrame.to_csv`): node labels as
    /// header and index, counts as floats (`np.zeros` starts it as floats).
    /// Written from a dense copy of the counts: a dump writes one per
    /// changed graph, and a lookup of each cell by its two names cost two
    /// string copies and a `format!` a cell.
    pub fn adjacency_csv(&self) -> String {
        use std::fmt::Write;
        let n = self.nodes.len();
        let at = |name: &str| self.nodes.iter().position(|x| x == name);
        let mut dense = vec![0u64; n * n];
        for ((from, to), c) in &self.edges {
            if let (Some(f), Some(t)) = (at(from), at(to)) {
                dense[f * n + t] = *c;
            }
        }
        let mut out = String::new();
        for name in &self.nodes {
            out.push(',');
            out.push_str(name);
        }
        out.push('\n');
        for (name, row) in self.nodes.iter().zip(dense.chunks(n.max(1))) {
            out.push_str(name);
            for c in row {
                let _ = write!(out, ",{c}.0");
            }
            out.push('\n');
        }
        out
    }

    /// Read a matrix [`Graph::adjacency_csv`] (or the old analytics client,
    /// through pandas) wrote: node labels as header and index, a
    /// non-negative whole count (written as a float) in every cell.
    pub fn from_adjacency_csv(text: &str) -> Result<Graph, String> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header = lines.next().ok_or("the file is empty")?;
        let nodes: Vec<String> = header
            .strip_prefix(',')
            .ok_or("the header does not start with an empty cell (not a pandas matrix)")?
            .split(',')
            .map(|n| n.trim().to_owned())
            .collect();
        if let Some(bad) = nodes.iter().find(|n| !safe_name(n)) {
            return Err(format!("`{bad}` in the header is not a command name"));
        }
        let mut edges = BTreeMap::new();
        let mut rows = 0;
        for (i, line) in lines.enumerate() {
            let cells: Vec<&str> = line.split(',').collect();
            let from = cells[0].trim();
            if cells.len() != nodes.len() + 1 || nodes.get(i).map(String::as_str) != Some(from) {
                return Err(format!(
                    "row {} (`{from}`) does not match the header: the matrix must be square, rows in the header's order",
                    i + 1
                ));
            }
            for (to, cell) in nodes.iter().zip(&cells[1..]) {
                let v: f64 = cell
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{cell}` in row `{from}` is not a number"))?;
                if !(v >= 0.0 && v.fract() == 0.0 && v < 1e15) {
                    return Err(format!(
                        "`{cell}` in row `{from}` is not a whole count of transitions"
                    ));
                }
                if v > 0.0 {
                    edges.insert((from.to_owned(), to.clone()), v as u64);
                }
            }
            rows += 1;
        }
        if rows != nodes.len() {
            return Err(format!(
                "{rows} rows for {} columns: the matrix must be square",
                nodes.len()
            ));
        }
        Ok(Graph {
            nodes,
            edges,
            last: None,
        })
    }

    /// `{nodes, edges}` in the shape the dashboards draw (pyvis's network
    /// data: nodes with id, label and fixed x/y; edges with from, to, weight
    /// and a label), keys in order as `serde_json::Map` sorts them. Written
    /// from borrowed fields, without building a `Value` tree first.
    pub fn to_json(&self, exp: &str) -> String {
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            edges: Vec<Edge<'a>>,
            nodes: Vec<Node<'a>>,
        }
        #[derive(serde::Serialize)]
        struct Edge<'a> {
            from: &'a str,
            #[serde(serialize_with = "as_text")]
            label: u64,
            to: &'a str,
            weight: u64,
        }
        #[derive(serde::Serialize)]
        struct Node<'a> {
            id: &'a str,
            label: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            physics: Option<bool>,
            #[serde(skip_serializing_if = "Option::is_none")]
            x: Option<Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            y: Option<Value>,
        }
        fn as_text<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(n)
        }
        let doc = Doc {
            edges: self
                .edges
                .iter()
                .map(|((from, to), &n)| Edge {
                    from,
                    label: n,
                    to,
                    weight: n,
                })
                .collect(),
            nodes: self
                .nodes
                .iter()
                .map(|n| {
                    let (x, y) = super::answers::node_position(exp, n).unzip();
                    Node {
                        id: n,
                        label: n,
                        physics: x.as_ref().map(|_| false),
                        x,
                        y,
                    }
                })
                .collect(),
        };
        let mut s = serde_json::to_string(&doc).expect("a graph serializes");
        s.push('\n');
        s
    }
}

/// What one message changed, for counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// A name (user, hardware, exp, course) was unusable, or a bound
    /// (`max_users`, distinct names) was reached: counted, not analysed.
    pub untracked: bool,
    /// The bound that kept it out, if one did: the analytics are full,
    /// which an operator must hear of (a name that is unusable is the
    /// sender's business).
    pub full: Option<Bound>,
    pub transition: bool,
    /// The user's id, where it is a tracked user (for [`Analytics::mark`]).
    pub user: Option<u32>,
}

/// The hash of the maps messages look up: foldhash, seeded per process, in
/// place of std's SipHash, which cost a fifth of the per-message analytics
/// (perf, relay benchmark). Keys are user ids anyone can send, hence a
/// seeded hash and not an unseeded one.
type Seeded = foldhash::fast::RandomState;

/// Strings seen in messages, each stored once and named by a number, so the
/// per-message path looks up by `&str` and allocates nothing for what it
/// has seen before.
///
/// The names lie end to end in one buffer, and the table holds only their
/// ids: a message compares its user, rig, experiment and course with names
/// in a few contiguous kilobytes, not each in an allocation of its own
/// somewhere in the heap (those compares, `memcmp` reaching cold strings,
/// were 9 % of the relay's main thread in `perf`).
#[derive(Default, Clone)]
struct Names {
    /// Every name, one after another.
    text: String,
    /// Where name `id` ends in `text`; it starts where `id - 1` ends.
    ends: Vec<u32>,
    /// The ids, by the hash of their names.
    ids: hashbrown::HashTable<u32>,
    hash: Seeded,
}

impl Names {
    fn get(&self, s: &str) -> Option<u32> {
        self.find(self.hash.hash_one(s), s)
    }

    /// The id of `s`, whose hash is `hash`.
    fn find(&self, hash: u64, s: &str) -> Option<u32> {
        self.ids.find(hash, |&id| self.name(id) == s).copied()
    }

    fn intern(&mut self, s: &str) -> u32 {
        let hash = self.hash.hash_one(s);
        if let Some(id) = self.find(hash, s) {
            return id;
        }
        let id = self.ends.len() as u32;
        self.text.push_str(s);
        self.ends.push(self.text.len() as u32);
        let Names {
            text,
            ends,
            ids,
            hash: state,
        } = self;
        let rehash = |&id: &u32| state.hash_one(spell(text, ends, id));
        ids.insert_unique(hash, id, rehash);
        id
    }

    fn name(&self, id: u32) -> &str {
        spell(&self.text, &self.ends, id)
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
}

/// Name `id` of [`Names`], from its parts.
fn spell<'a>(text: &'a str, ends: &[u32], id: u32) -> &'a str {
    let id = id as usize;
    let start = id.checked_sub(1).map_or(0, |before| ends[before] as usize);
    &text[start..ends[id] as usize]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cell {
    a: Activity,
    dirty: bool,
}

/// Which names are users, and where each user's last message went: a slot
/// per name id, so that asking is an index, not a hash lookup.
#[derive(Default)]
struct Users {
    slots: Vec<UserSlot>,
    count: usize,
}

/// A name's slot in [`Users`].
#[derive(Clone, Copy, Default)]
struct UserSlot {
    user: bool,
    recent: Recent,
    /// The last mark set for this user ([`Analytics::mark`]).
    mark: Option<u32>,
}

/// Where a user's last message went: the place of its activity cell and of
/// its chain. The next message from the same rig (and course) finds them
/// there by comparing the names it carries with the interned ones, without
/// a name lookup or a hash probe; any other message looks them up.
#[derive(Clone, Copy, Default)]
struct Recent {
    cell: Option<u32>,
    chain: Option<u32>,
}

impl Users {
    fn contains(&self, id: u32) -> bool {
        self.slots.get(id as usize).is_some_and(|s| s.user)
    }

    fn insert(&mut self, id: u32) {
        let i = id as usize;
        if i >= self.slots.len() {
            self.slots.resize(i + 1, UserSlot::default());
        }
        if !self.slots[i].user {
            self.slots[i].user = true;
            self.count += 1;
        }
    }

    fn len(&self) -> usize {
        self.count
    }

    /// Nothing for a name that is not a user.
    fn recent(&self, id: u32) -> Recent {
        self.slots
            .get(id as usize)
            .map_or_else(Recent::default, |s| s.recent)
    }

    /// For a user only (inserted before).
    fn recent_mut(&mut self, id: u32) -> &mut Recent {
        &mut self.slots[id as usize].recent
    }
}

/// The graphs an [`Analytics`] held, as a copy of its names and the ids of
/// each graph's key: for the scan of `files_dir` at start, on the worker,
/// which must not take what the state already holds. About 50 bytes a
/// graph; a key of three strings each took 250 (25 MiB at 100,000 users).
pub struct KnownGraphs {
    names: Names,
    /// Sorted.
    keys: Vec<(u32, u32, u32)>,
}

impl KnownGraphs {
    pub fn contains(&self, k: &GraphKey) -> bool {
        let id = |s: &str| self.names.get(s);
        match (id(&k.user), id(&k.exp), id(&k.course)) {
            (Some(u), Some(e), Some(c)) => self.keys.binary_search(&(u, e, c)).is_ok(),
            _ => false,
        }
    }
}

/// A hash map whose entries also have a place, an index that never
/// changes (nothing is removed): found by key with a hash probe, or by a
/// place remembered from before with none. `indexmap`, which `toml`
/// already builds, with the [`Seeded`] hash.
type Placed<K, V> = indexmap::IndexMap<K, V, Seeded>;

/// A [`Placed`] map's entries by place.
trait Places<K, V> {
    /// The place of `k`, its value made by `new` if it is not there.
    fn place(&mut self, k: K, new: impl FnOnce() -> V) -> u32;
    fn at(&self, place: u32) -> (&K, &V);
    fn at_mut(&mut self, place: u32) -> (&K, &mut V);
}

impl<K: std::hash::Hash + Eq, V> Places<K, V> for Placed<K, V> {
    fn place(&mut self, k: K, new: impl FnOnce() -> V) -> u32 {
        let entry = self.entry(k);
        let place = entry.index() as u32;
        entry.or_insert_with(new);
        place
    }

    fn at(&self, place: u32) -> (&K, &V) {
        self.get_index(place as usize).expect("a place given out")
    }

    fn at_mut(&mut self, place: u32) -> (&K, &mut V) {
        self.get_index_mut(place as usize)
            .expect("a place given out")
    }
}

/// A command chain as a dense matrix over its nodes (a handful per
/// experiment), so a step is two index lookups. This is the chain as saved
/// and restored, with the nodes spelled out; in memory it is a [`Matrix`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chain {
    pub nodes: Vec<Box<str>>,
    /// `counts[from * n + to]`.
    pub counts: Vec<u64>,
    /// Index of the last command.
    pub last: Option<usize>,
}

/// Most nodes a chain takes from messages. The client's experiments have
/// 6 and 9; without a bound, a sender inventing commands for another
/// experiment would grow one matrix (n² counts) without end.
pub const MAX_CHAIN_NODES: usize = 64;

impl Chain {
    /// A chain as saved; None if the parts do not fit together.
    pub fn from_parts(
        nodes: Vec<Box<str>>,
        counts: Vec<u64>,
        last: Option<usize>,
    ) -> Option<Chain> {
        let n = nodes.len();
        (counts.len() == n * n && last.is_none_or(|l| l < n)).then_some(Chain {
            nodes,
            counts,
            last,
        })
    }

    fn from_graph(g: &Graph) -> Chain {
        let mut c = Chain::default();
        for n in &g.nodes {
            c.index_of(n);
        }
        for ((from, to), n) in &g.edges {
            let (f, t) = (c.index_of(from), c.index_of(to));
            let len = c.nodes.len();
            c.counts[f * len + t] += n;
        }
        c.last = g.last.as_deref().map(|l| c.index_of(l));
        c
    }

    /// The index of `node`, added if it is not there (from saved files and
    /// the old client's: not bounded).
    fn index_of(&mut self, node: &str) -> usize {
        if let Some(i) = self.nodes.iter().position(|n| &**n == node) {
            return i;
        }
        let n = self.nodes.len();
        self.counts = grown(&self.counts, n);
        self.nodes.push(node.into());
        n
    }

    /// The command at index `i` follows the last one.
    fn step_to(&mut self, i: usize) {
        if let Some(prev) = self.last {
            self.counts[prev * self.nodes.len() + i] += 1;
        }
        self.last = Some(i);
    }

    pub fn to_graph(&self) -> Graph {
        let n = self.nodes.len();
        let mut edges = BTreeMap::new();
        for f in 0..n {
            for t in 0..n {
                let c = self.counts[f * n + t];
                if c > 0 {
                    edges.insert((self.nodes[f].to_string(), self.nodes[t].to_string()), c);
                }
            }
        }
        Graph {
            nodes: self.nodes.iter().map(|n| n.to_string()).collect(),
            edges,
            last: self.last.map(|i| self.nodes[i].to_string()),
        }
    }
}

/// The `n × n` counts of a chain with one more node: each row gains a
/// column and a row is added, all zero.
fn grown(counts: &[u64], n: usize) -> Vec<u64> {
    let mut grown = vec![0; (n + 1) * (n + 1)];
    for f in 0..n {
        grown[f * (n + 1)..f * (n + 1) + n].copy_from_slice(&counts[f * n..f * n + n]);
    }
    grown
}

/// A chain in memory: its nodes as name ids and its counts in one
/// allocation, so that a message's step reaches the cache line with its
/// nodes and then the one with its count, and no vector headers between.
/// With a nodes vector and a counts vector of their own, finding the node
/// and stepping were 11 % of the relay's main thread in `perf`, 5.5 % so;
/// cachegrind of the ingest with a 512 KiB last-level cache counts 0.64
/// fewer misses a message, for 67 more instructions.
///
/// In 64-bit words: the first holds the number of nodes `n` (low half) and
/// the last command's index plus one (high half; 0 for none); then the `n`
/// node ids, two to a word; then the `n × n` counts, row = previous.
#[derive(Debug)]
struct Matrix(Box<[u64]>);

impl Matrix {
    /// A matrix over `nodes` with `counts` (`n × n`) and `last`.
    fn new(nodes: &[u32], counts: impl IntoIterator<Item = u64>, last: Option<usize>) -> Matrix {
        let n = nodes.len();
        let mut words = Vec::with_capacity(1 + n.div_ceil(2) + n * n);
        words.push(Matrix::header(n, last));
        words.extend(
            nodes
                .chunks(2)
                .map(|p| u64::from(p[0]) | p.get(1).map_or(0, |&h| u64::from(h) << 32)),
        );
        words.extend(counts);
        words.resize(1 + n.div_ceil(2) + n * n, 0);
        Matrix(words.into_boxed_slice())
    }

    /// The first word: `n`, and `last` plus one (0 for none).
    fn header(n: usize, last: Option<usize>) -> u64 {
        n as u64 | (last.map_or(0, |l| l as u64 + 1) << 32)
    }

    /// The chain as saved, its nodes named by `id`.
    fn from_chain(c: &Chain, mut id: impl FnMut(&str) -> u32) -> Matrix {
        let nodes: Vec<u32> = c.nodes.iter().map(|n| id(n)).collect();
        Matrix::new(&nodes, c.counts.iter().copied(), c.last)
    }

    fn len(&self) -> usize {
        (self.0[0] & u64::from(u32::MAX)) as usize
    }

    fn last(&self) -> Option<usize> {
        ((self.0[0] >> 32) as usize).checked_sub(1)
    }

    fn node(&self, i: usize) -> u32 {
        (self.0[1 + i / 2] >> (32 * (i % 2))) as u32
    }

    fn nodes(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len()).map(|i| self.node(i))
    }

    fn counts_start(&self) -> usize {
        1 + self.len().div_ceil(2)
    }

    fn counts(&self) -> &[u64] {
        &self.0[self.counts_start()..]
    }

    /// The index of `node`, added if it is not there and the chain has
    /// fewer than `max` nodes.
    fn find_or_add(&mut self, node: u32, max: usize) -> Option<usize> {
        let n = self.len();
        match (0..n).find(|&i| self.node(i) == node) {
            Some(i) => Some(i),
            None if n < max => {
                let mut nodes: Vec<u32> = self.nodes().collect();
                nodes.push(node);
                *self = Matrix::new(&nodes, grown(self.counts(), n), self.last());
                Some(n)
            }
            None => None,
        }
    }

    /// The command at index `i` follows the last one; whether it made a
    /// transition (false for the first command of a chain).
    fn step_to(&mut self, i: usize) -> bool {
        let (n, prev) = (self.len(), self.last());
        if let Some(prev) = prev {
            let at = self.counts_start() + prev * n + i;
            self.0[at] += 1;
        }
        self.0[0] = Matrix::header(n, Some(i));
        prev.is_some()
    }

    /// The chain as saved, with the nodes spelled out.
    fn spelled(&self, names: &Names) -> Chain {
        Chain {
            nodes: self.nodes().map(|n| names.name(n).into()).collect(),
            counts: self.counts().to_vec(),
            last: self.last(),
        }
    }
}

/// A chain in memory, whether it changed since it was last saved, and
/// whether its files are yet to be rewritten (a change saved since the
/// last dump, or restored at start).
struct Tracked {
    chain: Matrix,
    dirty: bool,
    undumped: bool,
}

/// Which of the analytics' bounds kept a message out ([`Analytics`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// `max_users` users are tracked, and this one is new.
    Users,
    /// `4 × max_users + 1000` distinct names are known, and this one is new.
    Names,
}

/// The analytics state of one relay source. Bounded: at most `max_users`
/// users, at most `4 × max_users + 1000` distinct names in all (exp,
/// course and command values come from the messages too), and at most
/// [`MAX_CHAIN_NODES`] commands in a chain; beyond that, messages are
/// counted but not analysed.
pub struct Analytics {
    max_users: usize,
    max_names: usize,
    names: Names,
    users: Users,
    activity: Placed<(u32, u32), Cell>,
    dirty_activity: Vec<(u32, u32)>,
    graphs: Placed<(u32, u32, u32), Tracked>,
    dirty_graphs: Vec<(u32, u32, u32)>,
    /// The graphs whose `undumped` is set, oldest first. Kept here by id,
    /// not spelled into a set of keys at every save (7,200 strings every
    /// 2 s in the relay benchmark), since a dump comes only once a minute.
    undumped: VecDeque<(u32, u32, u32)>,
}

/// A chain as its row in the saved state holds it (see `store`): nodes and
/// counts as JSON arrays, encoded from the chain in memory, with no spelled
/// copy of it between (eleven allocations per graph and save, for the two
/// the row needs anyway).
#[derive(Debug, Clone, PartialEq)]
pub struct SavedChain {
    pub nodes: String,
    pub counts: String,
    pub last: Option<usize>,
}

/// Dirty state taken for saving, with names spelled out.
pub type Changes = (
    Vec<((String, String), Activity)>,
    Vec<(GraphKey, SavedChain)>,
);

impl Analytics {
    pub fn new(max_users: usize) -> Analytics {
        Analytics {
            max_users,
            max_names: max_users.saturating_mul(4).saturating_add(1000),
            names: Names::default(),
            users: Default::default(),
            activity: Placed::default(),
            dirty_activity: Vec::new(),
            graphs: Placed::default(),
            dirty_graphs: Vec::new(),
            undumped: VecDeque::new(),
        }
    }

    /// One user×hardware row of the saved state, as a restart reads it.
    pub fn restore_activity(&mut self, user: &str, hardware: &str, a: Activity) {
        let (u, h) = (self.names.intern(user), self.names.intern(hardware));
        self.users.insert(u);
        self.activity.insert((u, h), Cell { a, dirty: false });
    }

    /// One saved chain, as a restart reads it: due for the first dump (the
    /// files may be older than the state), not for the next save.
    pub fn restore_graph(&mut self, user: &str, exp: &str, course: &str, chain: &Chain) {
        let key = (
            self.names.intern(user),
            self.names.intern(exp),
            self.names.intern(course),
        );
        self.users.insert(key.0);
        let tracked = Tracked {
            chain: Matrix::from_chain(chain, |n| self.names.intern(n)),
            dirty: false,
            undumped: true,
        };
        if self.graphs.insert(key, tracked).is_none() {
            self.undumped.push_back(key);
        }
    }

    /// The id of `s`, interning it if the bound allows.
    fn id(&mut self, s: &str) -> Option<u32> {
        match self.names.get(s) {
            Some(id) => Some(id),
            None if self.names.len() < self.max_names => Some(self.names.intern(s)),
            None => None,
        }
    }

    /// One envelope message received at `arrival_ms` on a stream whose rig
    /// is `hardware`. First and last seen use the message's own `t` where
    /// it is usable ([`message_time`]), as the old client did.
    pub fn observe(&mut self, arrival_ms: i64, hardware: &str, env: &Envelope) -> Observed {
        let now_ms = message_time(env.t, arrival_ms);
        let mut out = Observed::default();
        let user: &str = &env.user;
        if !safe_name(user) || !safe_name(hardware) {
            out.untracked = true;
            return out;
        }
        let seen = self.names.get(user);
        let known = seen.is_some_and(|u| self.users.contains(u));
        if !known && self.users.len() >= self.max_users {
            out.untracked = true;
            out.full = Some(Bound::Users);
            return out;
        }
        let recent = seen.map_or_else(Recent::default, |u| self.users.recent(u));
        let same_rig = recent
            .cell
            .filter(|&p| self.names.name(self.activity.at(p).0.1) == hardware);
        let (u, place) = match (seen, same_rig) {
            (Some(u), Some(place)) => (u, place),
            _ => {
                let (Some(u), Some(h)) = (seen.or_else(|| self.id(user)), self.id(hardware)) else {
                    out.untracked = true;
                    out.full = Some(Bound::Names);
                    return out;
                };
                if !known {
                    self.users.insert(u);
                }
                let place = self.activity.place((u, h), || Cell {
                    a: Activity {
                        first_ms: now_ms,
                        last_ms: now_ms,
                        messages: 0,
                        minutes: 0,
                    },
                    dirty: false,
                });
                self.users.recent_mut(u).cell = Some(place);
                (u, place)
            }
        };
        out.user = Some(u);
        let (key, cell) = self.activity.at_mut(place);
        let a = &mut cell.a;
        if a.messages == 0 || now_ms.div_euclid(60_000) > a.last_ms.div_euclid(60_000) {
            a.minutes += 1;
        }
        a.messages += 1;
        a.first_ms = a.first_ms.min(now_ms);
        a.last_ms = a.last_ms.max(now_ms);
        if !cell.dirty {
            cell.dirty = true;
            self.dirty_activity.push(*key);
        }

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
                let same_course = recent.chain.filter(|&p| {
                    let &(_, e, c) = self.graphs.at(p).0;
                    self.names.name(e) == exp && self.names.name(c) == course
                });
                let (place, n) = match same_course {
                    Some(place) => {
                        let Some(n) = self.id(node) else {
                            out.untracked = true;
                            out.full = Some(Bound::Names);
                            return out;
                        };
                        (place, n)
                    }
                    None => {
                        let (Some(e), Some(c), Some(n)) =
                            (self.id(exp), self.id(course), self.id(node))
                        else {
                            out.untracked = true;
                            out.full = Some(Bound::Names);
                            return out;
                        };
                        let names = &mut self.names;
                        let place = self.graphs.place((u, e, c), || {
                            let nodes: Vec<u32> =
                                exp_nodes(exp).iter().map(|n| names.intern(n)).collect();
                            Tracked {
                                chain: Matrix::new(&nodes, [], None),
                                dirty: false,
                                undumped: false,
                            }
                        });
                        self.users.recent_mut(u).chain = Some(place);
                        (place, n)
                    }
                };
                let (key, t) = self.graphs.at_mut(place);
                let Some(i) = t.chain.find_or_add(n, MAX_CHAIN_NODES) else {
                    out.untracked = true;
                    return out;
                };
                if !t.dirty {
                    t.dirty = true;
                    self.dirty_graphs.push(*key);
                }
                out.transition = t.chain.step_to(i);
            }
        }
        out
    }

    /// Set `user`'s mark to `mark`; false if it was set already. The
    /// caller's meaning: the relay marks a user once its id is in a
    /// window's sketch of a stream, so that its next messages there skip
    /// the sketch (a binary search each, twice a message).
    pub fn mark(&mut self, user: u32, mark: u32) -> bool {
        let slot = &mut self.users.slots[user as usize];
        let fresh = slot.mark != Some(mark);
        slot.mark = Some(mark);
        fresh
    }

    fn key(&self, (u, e, c): (u32, u32, u32)) -> GraphKey {
        GraphKey {
            user: self.names.name(u).to_owned(),
            exp: self.names.name(e).to_owned(),
            course: self.names.name(c).to_owned(),
        }
    }

    /// Take a graph the old analytics client left (its matrix, then its raw
    /// commands in time order, the first of which only starts the chain),
    /// for a key this state does not have. Marked changed, so it is saved
    /// and its files rewritten. False if the key exists or a bound is hit.
    pub fn adopt(&mut self, key: &GraphKey, matrix: Option<&Graph>, commands: &[String]) -> bool {
        let known = self
            .names
            .get(&key.user)
            .is_some_and(|u| self.users.contains(u));
        if !known && self.users.len() >= self.max_users {
            return false;
        }
        let (Some(u), Some(e), Some(c)) =
            (self.id(&key.user), self.id(&key.exp), self.id(&key.course))
        else {
            return false;
        };
        if self.graphs.contains_key(&(u, e, c)) {
            return false;
        }
        let mut chain = Chain::from_graph(matrix.unwrap_or(&Graph::new(&key.exp)));
        chain.last = None;
        for cmd in commands {
            if let Some(n) = node(&key.exp, cmd) {
                let i = chain.index_of(n);
                chain.step_to(i);
            }
        }
        let chain = Matrix::from_chain(&chain, |n| self.names.intern(n));
        self.users.insert(u);
        let tracked = Tracked {
            chain,
            dirty: true,
            undumped: false,
        };
        self.graphs.insert((u, e, c), tracked);
        self.dirty_graphs.push((u, e, c));
        true
    }

    /// What changed since the last call, for saving; clears the marks. The
    /// graphs among them are undumped from now on ([`Self::take_undumped`]).
    pub fn take_changes(&mut self) -> Changes {
        let mut activity = Vec::with_capacity(self.dirty_activity.len());
        for (u, h) in std::mem::take(&mut self.dirty_activity) {
            if let Some(cell) = self.activity.get_mut(&(u, h)) {
                cell.dirty = false;
                let a = cell.a;
                activity.push((
                    (self.names.name(u).to_owned(), self.names.name(h).to_owned()),
                    a,
                ));
            }
        }
        let mut graphs = Vec::with_capacity(self.dirty_graphs.len());
        let mut nodes: Vec<&str> = Vec::new();
        for k in std::mem::take(&mut self.dirty_graphs) {
            if let Some(t) = self.graphs.get_mut(&k) {
                t.dirty = false;
                if !t.undumped {
                    t.undumped = true;
                    self.undumped.push_back(k);
                }
                nodes.clear();
                nodes.extend(t.chain.nodes().map(|n| self.names.name(n)));
                let saved = SavedChain {
                    nodes: serde_json::to_string(&nodes).expect("strings serialize"),
                    counts: serde_json::to_string(t.chain.counts()).expect("numbers serialize"),
                    last: t.chain.last(),
                };
                graphs.push((self.key(k), saved));
            }
        }
        (activity, graphs)
    }

    /// Mark these as changed again (their save failed).
    pub fn unsave(&mut self, changes: &Changes) {
        for ((u, h), _) in &changes.0 {
            if let (Some(u), Some(h)) = (self.names.get(u), self.names.get(h))
                && let Some(cell) = self.activity.get_mut(&(u, h)).filter(|c| !c.dirty)
            {
                cell.dirty = true;
                self.dirty_activity.push((u, h));
            }
        }
        for (k, _) in &changes.1 {
            let ids = (
                self.names.get(&k.user),
                self.names.get(&k.exp),
                self.names.get(&k.course),
            );
            if let (Some(u), Some(e), Some(c)) = ids
                && let Some(t) = self.graphs.get_mut(&(u, e, c)).filter(|t| !t.dirty)
            {
                t.dirty = true;
                self.dirty_graphs.push((u, e, c));
            }
        }
    }

    /// Users tracked, and how many may be (`max_users`).
    pub fn users(&self) -> (usize, usize) {
        (self.users.len(), self.max_users)
    }

    /// Distinct names known, and how many may be.
    pub fn names(&self) -> (usize, usize) {
        (self.names.len(), self.max_names)
    }

    /// Whether some graph's files are yet to be rewritten.
    pub fn has_undumped(&self) -> bool {
        !self.undumped.is_empty()
    }

    /// How many graphs' files are yet to be rewritten.
    pub fn undumped(&self) -> usize {
        self.undumped.len()
    }

    /// At most `most` of the graphs whose files are yet to be rewritten,
    /// the longest waiting first, spelled out as they are written; they
    /// count as dumped from now on.
    pub fn take_undumped(&mut self, most: usize) -> Vec<(GraphKey, Graph)> {
        let n = most.min(self.undumped.len());
        let mut out = Vec::with_capacity(n);
        let keys: Vec<(u32, u32, u32)> = self.undumped.drain(..n).collect();
        for k in keys {
            if let Some(t) = self.graphs.get_mut(&k) {
                t.undumped = false;
                let graph = t.chain.spelled(&self.names).to_graph();
                out.push((self.key(k), graph));
            }
        }
        out
    }

    /// The files of every graph are as written (at a start, when the last
    /// run wrote them all): none is due until it changes.
    pub fn all_dumped(&mut self) {
        for k in std::mem::take(&mut self.undumped) {
            if let Some(t) = self.graphs.get_mut(&k) {
                t.undumped = false;
            }
        }
    }

    /// Which graphs these analytics hold, to be asked on another thread.
    pub fn known_graphs(&self) -> KnownGraphs {
        let mut keys: Vec<_> = self.graphs.keys().copied().collect();
        keys.sort_unstable();
        KnownGraphs {
            names: self.names.clone(),
            keys,
        }
    }

    pub fn graph_keys(&self) -> Vec<GraphKey> {
        self.graphs.keys().map(|k| self.key(*k)).collect()
    }

    pub fn graph(&self, k: &GraphKey) -> Option<Graph> {
        let ids = (
            self.names.get(&k.user)?,
            self.names.get(&k.exp)?,
            self.names.get(&k.course)?,
        );
        self.graphs
            .get(&ids)
            .map(|t| t.chain.spelled(&self.names).to_graph())
    }

    #[cfg(test)]
    pub fn activity(&self, user: &str, hardware: &str) -> Option<Activity> {
        let ids = (self.names.get(user)?, self.names.get(hardware)?);
        self.activity.get(&ids).map(|c| c.a)
    }

    /// Everything, with names spelled out (sorted by user, hardware).
    #[cfg(test)]
    pub fn all_activity(&self) -> Vec<((&str, &str), Activity)> {
        let mut v: Vec<_> = self
            .activity
            .iter()
            .map(|((u, h), c)| ((self.names.name(*u), self.names.name(*h)), c.a))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[cfg(test)]
    pub fn all_graphs(&self) -> std::collections::HashMap<GraphKey, Chain> {
        self.graphs
            .iter()
            .map(|(k, t)| (self.key(*k), t.chain.spelled(&self.names)))
            .collect()
    }

    /// What `usage.csv` and `activity.csv` say now, to be written on
    /// another thread: a copy of the names and each cell by its ids (about
    /// 40 bytes a row and the names' text), not the files' text (about 140
    /// bytes a row, 14 MB at 100,000 users, spelled on this thread).
    pub fn summaries(&self) -> Summaries {
        Summaries {
            names: self.names.clone(),
            cells: self.activity.iter().map(|(&k, c)| (k, c.a)).collect(),
        }
    }
}

/// The rows of both summaries, taken by [`Analytics::summaries`].
pub struct Summaries {
    names: Names,
    /// (user, hardware) → activity.
    cells: Vec<((u32, u32), Activity)>,
}

impl Summaries {
    /// Sort the cells by user, then hardware: the order of both files.
    pub fn sort(&mut self) {
        let names = &self.names;
        self.cells
            .sort_unstable_by_key(|&((u, h), _)| (names.name(u), names.name(h)));
    }

    /// `usage.csv`: the user×hardware matrix of messages, one row per user,
    /// one column per rig, both sorted. Of sorted cells ([`Summaries::sort`]).
    pub fn write_usage(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let name = |id: u32| self.names.name(id);
        let mut rigs: Vec<u32> = self.cells.iter().map(|&((_, h), _)| h).collect();
        rigs.sort_unstable_by_key(|&h| name(h));
        rigs.dedup();
        out.write_all(b"user")?;
        for &h in &rigs {
            write!(out, ",{}", name(h))?;
        }
        out.write_all(b"\n")?;
        let mut row = vec![0u64; rigs.len()];
        for (i, &((u, h), a)) in self.cells.iter().enumerate() {
            let column = rigs.iter().position(|&r| r == h).expect("a rig seen");
            row[column] = a.messages;
            if self.cells.get(i + 1).map(|&((next, _), _)| next) != Some(u) {
                out.write_all(name(u).as_bytes())?;
                for m in &mut row {
                    write!(out, ",{m}")?;
                    *m = 0;
                }
                out.write_all(b"\n")?;
            }
        }
        Ok(())
    }

    /// `activity.csv`: per user×hardware activity, one line each. Of sorted
    /// cells ([`Summaries::sort`]).
    pub fn write_activity(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        out.write_all(b"user,hardware,first_seen,last_seen,messages,active_minutes\n")?;
        for &((u, h), a) in &self.cells {
            writeln!(
                out,
                "{},{},{},{},{},{}",
                self.names.name(u),
                self.names.name(h),
                iso8601(a.first_ms),
                iso8601(a.last_ms),
                a.messages,
                a.minutes
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Chain, MAX_CHAIN_NODES, Matrix, Names, safe_name};

    /// A matrix in memory steps, grows and is spelled out as the plain
    /// chain does: from no nodes, through odd and even counts of nodes (two
    /// ids share a word), to the bound, with its last command kept across
    /// growth and a restore.
    #[test]
    fn a_chain_in_one_allocation_counts_as_the_plain_chain() {
        let mut names = Names::default();
        let mut plain = Chain::default();
        let mut packed = Matrix::new(&[], [], None);
        // A command sequence over 70 distinct commands, revisiting old
        // ones: the first MAX_CHAIN_NODES are taken, the rest refused.
        let commands: Vec<String> = (0..400u32)
            .map(|k| format!("cmd{}", (k * 7 + k / 3) % 70))
            .collect();
        let mut transitions = 0;
        for cmd in &commands {
            let id = names.intern(cmd);
            match packed.find_or_add(id, MAX_CHAIN_NODES) {
                Some(i) => {
                    assert_eq!(plain.index_of(cmd), i, "{cmd} has one index in both");
                    let moved = plain.last.is_some();
                    plain.step_to(i);
                    assert_eq!(packed.step_to(i), moved, "a transition after {cmd}");
                    transitions += usize::from(moved);
                }
                None => {
                    assert_eq!(
                        packed.len(),
                        MAX_CHAIN_NODES,
                        "{cmd} refused at the bound only"
                    );
                    assert!(!plain.nodes.iter().any(|n| **n == **cmd));
                }
            }
            assert_eq!(packed.spelled(&names), plain, "after {cmd}");
        }
        assert_eq!(packed.len(), MAX_CHAIN_NODES);
        assert_eq!(packed.counts().iter().sum::<u64>(), transitions as u64);
        assert!(transitions > 300, "{transitions} transitions");
        // Restored from the spelled chain: the same, and it continues.
        let mut restored = Matrix::from_chain(&plain, |n| names.intern(n));
        assert_eq!(restored.spelled(&names), plain);
        let last = plain.last.expect("a last command");
        assert!(
            restored.step_to(last),
            "the chain continues after a restore"
        );
        plain.step_to(last);
        assert_eq!(restored.spelled(&names), plain);
        for n in 0..5 {
            let nodes: Vec<u32> = (0..n).collect();
            let m = Matrix::new(&nodes, [], None);
            assert_eq!((m.len(), m.last()), (n as usize, None));
            assert!(m.nodes().eq(0..n), "{n} nodes read back");
            assert_eq!(m.counts(), vec![0; (n * n) as usize], "{n} nodes");
        }
    }

    /// The byte test allows exactly the bytes its plain definition does,
    /// all 256 of them; names of each kind are judged as before.
    #[test]
    fn a_safe_name_is_letters_digits_and_three_marks_and_never_a_path() {
        for b in 0..=255u8 {
            let plain = b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.');
            assert_eq!(super::NAME_BYTES[b as usize], plain, "byte {b:#04x}");
            let name = [b'a', b, b'z'];
            if let Ok(name) = std::str::from_utf8(&name) {
                assert_eq!(safe_name(name), plain, "{name:?}");
            }
        }
        let long = "u".repeat(100);
        for ok in [
            "spin30",
            "53a6788c-0000-4000-8000-000000000001",
            "a.b_c-D",
            &long,
        ] {
            assert!(safe_name(ok), "{ok:?}");
        }
        let too_long = "u".repeat(101);
        let late = format!("{}/", "u".repeat(40));
        for bad in [
            "", ".", "..", ".hidden", "a/b", "a\\b", "a b", "é", "a\0", &too_long, &late,
        ] {
            assert!(!safe_name(bad), "{bad:?}");
        }
    }

    /// Names end to end in one buffer: each spelled back exactly (prefixes
    /// of each other, the empty one, multi-byte ones), found again by its
    /// spelling after the table has grown many times, and never two ids
    /// for one name.
    #[test]
    fn names_in_one_buffer_are_spelled_and_found_as_given() {
        let mut spellings: Vec<String> = vec![String::new(), "a".into(), "ab".into(), "abc".into()];
        spellings.extend((0..5_000).map(|i| format!("user-{i}")));
        spellings.extend((0..100).map(|i| format!("rig-é-{i}-{}", "x".repeat(i))));
        let mut names = Names::default();
        let ids: Vec<u32> = spellings.iter().map(|s| names.intern(s)).collect();
        assert_eq!(names.len(), spellings.len(), "one id per distinct name");
        for (s, &id) in spellings.iter().zip(&ids) {
            assert_eq!(names.name(id), s, "id {id} spells its name back");
            assert_eq!(names.get(s), Some(id), "{s:?} is found by its spelling");
            assert_eq!(names.intern(s), id, "interning {s:?} again gives its id");
        }
        assert_eq!(
            names.len(),
            spellings.len(),
            "interning again added nothing"
        );
        for unknown in ["abcd", "user-5000", "user-", "b"] {
            assert_eq!(names.get(unknown), None, "{unknown:?} was never interned");
        }
    }
}
