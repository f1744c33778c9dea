//! Answers to the students' dashboards, as the practable analytics client
//! (learning-analytics-server: `client.py`, `response.py`, `analytics.py`,
//! `TaskDistance.py`, `process.py`) computes them: pure functions of a
//! user's transition matrix, their feedback counts and the comparison
//! graphs. No IO here; [`Comparisons::load`] reads the directory once and
//! the relay source routes messages.
//!
//! Where the client's code and its documentation disagree, this follows the
//! code, because the dashboards see what the code computes:
//! - `Exploration()` calls `DistanceBetweenGraphs(user, comp, a, b, p, u, l)`
//!   without the `algorithm` argument, so every parameter lands one place
//!   off: the model is `TaskDistance(a = 10, b = 2, loop = 2, upper = -1,
//!   lower = -1)`, not the docstring's `a = 0, b = 10`.
//! - Matrices are compared by position (`iloc`), not by node name.
//! - Anything the client would fail on (a missing comparison graph, a
//!   matrix of the wrong shape, an unknown experiment for `indicators`)
//!   sends nothing; in `all_feedback` the frames before the failure are
//!   still sent, as the client's are.
//!
//! Where the client would send something no dashboard can read, this sends
//! what it meant: `null` for its bare `NaN` (a graph with no transitions),
//! and a graph name that is not a plain file name (`../x`) is never read.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value, json};

use super::analytics::{Graph, safe_name};

/// A comparison file larger than this is not read (the client's are 300
/// bytes; 64 nodes of large counts fit easily).
pub const MAX_COMPARISON_BYTES: u64 = 256 * 1024;
/// Comparison files read from the directory at most.
pub const MAX_COMPARISONS: usize = 1_000;
/// A matrix with more nodes than this is refused (the experiments have 6
/// and 9), which bounds every answer's size.
pub const MAX_NODES: usize = 64;

/// The affective states and general subjects of the client's feedback
/// matrix, in its order.
pub const FEEDBACK_STATES: [&str; 8] = [
    "Engaged",
    "Curious",
    "Delighted",
    "Bored",
    "Confused",
    "Frustrated",
    "Surprised",
    "Anxious",
];
const FEEDBACK_SUBJECTS: [&str; 6] = ["Workbook", "Remote work", "Hardware", "UI", "LA", "Other"];

/// What a dashboard may ask for (`payload.content`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Content {
    StudentGraph,
    ComparisonGraph,
    TaskIdentification,
    Indicators,
    Centroids,
    TaskFeedback,
    AllFeedback,
}

impl Content {
    /// In this order: the first five are what `all_feedback` sends.
    pub const ALL: [Content; 7] = [
        Content::StudentGraph,
        Content::ComparisonGraph,
        Content::TaskIdentification,
        Content::Indicators,
        Content::Centroids,
        Content::TaskFeedback,
        Content::AllFeedback,
    ];

    pub fn parse(s: &str) -> Option<Content> {
        Content::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Content::StudentGraph => "student_graph",
            Content::ComparisonGraph => "comparison_graph",
            Content::TaskIdentification => "task_identification",
            Content::Indicators => "indicators",
            Content::Centroids => "centroids",
            Content::TaskFeedback => "task_feedback",
            Content::AllFeedback => "all_feedback",
        }
    }
}

/// A labelled square matrix as pandas reads a CSV with `index_col=0`:
/// column labels from the header, row labels from the first column.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub columns: Vec<String>,
    pub rows: Vec<String>,
    /// Row-major, `rows.len() × columns.len()`.
    pub cells: Vec<f64>,
}

impl Matrix {
    pub fn from_graph(g: &Graph) -> Matrix {
        let n = g.nodes.len();
        let mut cells = vec![0.0; n * n];
        for ((from, to), count) in &g.edges {
            let f = g.nodes.iter().position(|x| x == from);
            let t = g.nodes.iter().position(|x| x == to);
            if let (Some(f), Some(t)) = (f, t) {
                cells[f * n + t] = *count as f64;
            }
        }
        Matrix {
            columns: g.nodes.clone(),
            rows: g.nodes.clone(),
            cells,
        }
    }

    /// Parse a pandas-written matrix. Cells are numbers (`1`, `2.0`).
    pub fn from_csv(text: &str) -> Result<Matrix, String> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header = lines.next().ok_or("the file is empty")?;
        let columns: Vec<String> = header
            .split(',')
            .skip(1)
            .map(|s| s.trim().to_owned())
            .collect();
        if columns.len() > MAX_NODES {
            return Err(format!("more than {MAX_NODES} columns"));
        }
        let mut rows = Vec::new();
        let mut cells = Vec::new();
        for line in lines {
            let mut it = line.split(',');
            rows.push(it.next().unwrap_or("").trim().to_owned());
            let row: Vec<&str> = it.collect();
            if row.len() != columns.len() {
                return Err(format!(
                    "row `{}` has {} cells for {} columns",
                    rows.last().map(String::as_str).unwrap_or(""),
                    row.len(),
                    columns.len()
                ));
            }
            for c in row {
                let v: f64 = c
                    .trim()
                    .parse()
                    .map_err(|_| format!("`{c}` is not a number"))?;
                cells.push(v);
            }
            if rows.len() > MAX_NODES {
                return Err(format!("more than {MAX_NODES} rows"));
            }
        }
        Ok(Matrix {
            columns,
            rows,
            cells,
        })
    }

    fn n_cols(&self) -> usize {
        self.columns.len()
    }

    /// `iloc[i, j]`.
    fn at(&self, i: usize, j: usize) -> Result<f64, Failed> {
        if i < self.rows.len() && j < self.n_cols() {
            Ok(self.cells[i * self.n_cols() + j])
        } else {
            Err(Failed("a comparison graph smaller than the student's"))
        }
    }

    fn sum(&self) -> f64 {
        // numpy sums whole counts exactly; so does this, in any order.
        self.cells.iter().sum()
    }

    /// `A[column].sum()`.
    fn column_sum(&self, name: &str) -> Result<f64, Failed> {
        let j = self
            .columns
            .iter()
            .position(|c| c == name)
            .ok_or(Failed("a node missing from the student's graph"))?;
        Ok((0..self.rows.len())
            .map(|i| self.cells[i * self.n_cols() + j])
            .sum())
    }
}

/// Why the client would have sent nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failed(pub &'static str);

/// The comparison graphs of a `comparison_dir`, by file stem.
#[derive(Debug, Default, Clone)]
pub struct Comparisons {
    pub graphs: BTreeMap<String, Matrix>,
}

impl Comparisons {
    /// Read every `*.csv` of `dir`; files that cannot be read are returned
    /// as problems (the client would fail on them at each request).
    pub fn load(dir: &Path) -> Result<(Comparisons, Vec<String>), String> {
        let entries =
            std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let mut graphs = BTreeMap::new();
        let mut problems = Vec::new();
        for e in entries.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let Some(stem) = name.strip_suffix(".csv") else {
                continue;
            };
            if graphs.len() >= MAX_COMPARISONS {
                problems.push(format!(
                    "more than {MAX_COMPARISONS} comparison graphs; the rest are not read"
                ));
                break;
            }
            let path = e.path();
            let read = std::fs::metadata(&path)
                .map_err(|e| e.to_string())
                .and_then(|m| {
                    if m.len() > MAX_COMPARISON_BYTES {
                        Err(format!("larger than {MAX_COMPARISON_BYTES} bytes"))
                    } else {
                        std::fs::read_to_string(&path).map_err(|e| e.to_string())
                    }
                })
                .and_then(|t| Matrix::from_csv(&t));
            match read {
                Ok(m) => {
                    graphs.insert(stem.to_owned(), m);
                }
                Err(e) => problems.push(format!("{}: {e}", path.display())),
            }
        }
        Ok((Comparisons { graphs }, problems))
    }

    /// The graph a request names, never a path outside the directory.
    fn get(&self, name: &str) -> Result<&Matrix, Failed> {
        if !safe_name(name) {
            return Err(Failed("a graph name that is not a plain file name"));
        }
        self.graphs
            .get(name)
            .ok_or(Failed("no such comparison graph"))
    }
}

/// `checkDifferenceWeight` of `TaskDistance.py`.
fn difference_weight(aij: f64, bij: f64, a: f64, b: f64, upper: f64, lower: f64) -> f64 {
    let d = (aij - bij) / bij;
    if d >= 0.0 && d <= upper {
        b * d / upper
    } else if d > upper {
        b
    } else if d < 0.0 && d >= lower {
        a * d.abs() / lower.abs()
    } else {
        a
    }
}

/// `TaskDistance(A, B, a, b, loopFactor, upperMax, lowerMax)`: NaN for a
/// student graph with no transitions.
pub fn task_distance(
    user: &Matrix,
    comp: &Matrix,
    a: f64,
    b: f64,
    loop_factor: f64,
    upper: f64,
    lower: f64,
) -> Result<f64, Failed> {
    if user.sum() == 0.0 {
        return Ok(f64::NAN);
    }
    let mut d = 0.0;
    let (mut diff, mut count) = (0.0, 0u32);
    for i in 0..user.rows.len() {
        for j in 0..user.n_cols() {
            let (x, y) = (user.at(i, j)?, comp.at(i, j)?);
            if x == 0.0 && y != 0.0 {
                d += if i == j { loop_factor * a } else { a };
            } else if x != 0.0 && y == 0.0 {
                d += if i == j { loop_factor * b } else { b };
            } else if x != y {
                count += 1;
                diff += difference_weight(x, y, a, b, upper, lower);
            }
        }
    }
    if count > 0 {
        d += diff / f64::from(count);
    }
    Ok(d)
}

/// `TaskIdentification`: distance to each comparison graph whose file name
/// starts with `<exp>-<course>`, with the default model.
fn task_identification(
    user: &Matrix,
    exp: &str,
    course: &str,
    comps: &Comparisons,
) -> Result<Value, Failed> {
    if exp != "spinner" && exp != "pendulum" {
        // `TaskCompletionResponse` sets its result only for these two.
        return Err(Failed(
            "an experiment the client does not identify tasks for",
        ));
    }
    let prefix = format!("{exp}-{course}");
    let mut tasks = Map::new();
    for (name, m) in comps.graphs.iter().filter(|(n, _)| n.starts_with(&prefix)) {
        let d = task_distance(user, m, 10.0, 1.0, 2.0, 2.0, -1.0)?;
        tasks.insert(name.clone(), number(d));
    }
    Ok(Value::Object(tasks))
}

/// `TaskFeedback`: what the student missed or did less often than the task.
fn task_feedback(user: &Matrix, comp: &Matrix) -> Result<Value, Failed> {
    let (mut hardware, mut hardware_freq, mut transition, mut transition_freq) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..user.rows.len() {
        for j in 0..user.n_cols() {
            let (x, y) = (user.at(i, j)?, comp.at(i, j)?);
            let (col, row) = (&user.columns[j], &user.rows[i]);
            if x == 0.0 && y != 0.0 {
                if i == j {
                    hardware.push(col.clone());
                } else {
                    transition.push(format!("{row} to {col}"));
                }
            } else if x - y < 0.0 {
                if i == j {
                    hardware_freq.push(col.clone());
                } else {
                    transition_freq.push(format!("{row} to {col}"));
                }
            }
        }
    }
    Ok(json!({
        "hardware": hardware,
        "hardware_freq": hardware_freq,
        "transition": transition,
        "transition_freq": transition_freq,
    }))
}

/// `Exploration`, with the client's shifted parameters (see the module
/// header); 0 when there is no `-all` graph or it does not fit.
fn exploration(user: &Matrix, exp: &str, course: &str, comps: &Comparisons) -> Value {
    match comps.graphs.get(&format!("{exp}-{course}-all")) {
        Some(all) => match task_distance(user, all, 10.0, 2.0, 2.0, -1.0, -1.0) {
            Ok(d) => number(d),
            Err(_) => json!(0),
        },
        None => json!(0),
    }
}

/// `Enjoyment`: positive minus negative feedback; 0 without feedback.
fn enjoyment(feedback: Option<&Feedback>) -> Result<Value, Failed> {
    let Some(f) = feedback else {
        return Ok(json!(0));
    };
    let row = |state: &str| -> Result<f64, Failed> {
        let i = f
            .states
            .iter()
            .position(|s| s == state)
            .ok_or(Failed("a feedback file without the client's states"))?;
        Ok(f.counts[i * f.subjects.len()..(i + 1) * f.subjects.len()]
            .iter()
            .sum())
    };
    let mut positive = 0.0;
    for s in &FEEDBACK_STATES[..3] {
        positive += row(s)?;
    }
    let mut negative = 0.0;
    for s in &FEEDBACK_STATES[3..] {
        negative += row(s)?;
    }
    Ok(number(positive - negative))
}

/// `TotalEdges`: the student's transitions as a percentage of the full
/// procedure's; only for the three graphs the client names.
fn total_edges(
    user: &Matrix,
    exp: &str,
    course: &str,
    comps: &Comparisons,
) -> Result<Value, Failed> {
    let name = match (exp, course) {
        ("spinner", "cie3") => "spinner-cie3-all",
        ("spinner", "engdes1") => "spinner-engdes1-all",
        ("pendulum", "engdes1") => "pendulum-engdes1-all",
        _ => return Err(Failed("an experiment and course without a full procedure")),
    };
    let expected = comps.get(name)?.sum();
    Ok(number(user.sum() * 100.0 / expected))
}

/// The vertices `Centroid` places nodes at, on the unit circle.
fn vertices(exp: &str) -> Vec<(&'static str, Value, Value)> {
    let s = (std::f64::consts::PI / 3.0).sin();
    match exp {
        "spinner" => vec![
            ("voltage_step", json!(0.5), json!(s)),
            ("voltage_ramp", json!(-0.5), json!(s)),
            ("position_step", json!(1), json!(0)),
            ("position_ramp", json!(-1), json!(0)),
            ("speed_step", json!(0.5), json!(-s)),
            ("speed_ramp", json!(-0.5), json!(-s)),
        ],
        _ => [
            ("start", 0.0, 1.0),
            ("brake", 0.64, 0.77),
            ("free", 0.98, 0.17),
            ("load", 0.87, -0.5),
            ("sampling", 0.34, -0.94),
            ("drive_perc", -0.34, -0.94),
            ("brake_perc", -0.87, -0.5),
            ("measuring_tools", -0.98, 0.17),
            ("record", -0.64, 0.77),
        ]
        .into_iter()
        .map(|(n, x, y): (&'static str, f64, f64)| {
            let int = |v: f64| {
                if v == v.trunc() {
                    json!(v as i64)
                } else {
                    json!(v)
                }
            };
            (n, int(x), int(y))
        })
        .collect(),
    }
}

/// `graphCentroid`: the centre of mass of the vertices, each weighted by
/// the transitions into it; NaN for a graph without any.
fn centroid(m: &Matrix, vertices: &[(&str, Value, Value)]) -> Result<Value, Failed> {
    let (mut total, mut rx, mut ry) = (0.0, 0.0, 0.0);
    for (name, x, y) in vertices {
        let mass = m.column_sum(name)?;
        total += mass;
        rx += mass * x.as_f64().unwrap_or(0.0);
        ry += mass * y.as_f64().unwrap_or(0.0);
    }
    Ok(if total > 0.0 {
        json!([number(rx / total), number(ry / total)])
    } else {
        json!([null, null])
    })
}

/// `Centroid`: the student's and the course's tasks' centroids.
fn centroids(user: &Matrix, exp: &str, course: &str, comps: &Comparisons) -> Result<Value, Failed> {
    let tasks: &[(&str, &str)] = match (exp, course) {
        ("spinner", "cie3") => &[
            ("task1", "spinner-cie3-1-2"),
            ("task3", "spinner-cie3-3"),
            ("task4", "spinner-cie3-4"),
            ("all", "spinner-cie3-all"),
        ],
        ("spinner", "engdes1") | ("pendulum", "engdes1") => &[
            ("task1core", "-engdes1-1-core"),
            ("task1ext", "-engdes1-1-ext"),
            ("task2", "-engdes1-2"),
            ("all", "-engdes1-all"),
        ],
        _ => {
            return Ok(json!({"student": [0, 0], "task1": [0, 0], "task3": [0, 0],
                             "task4": [0, 0], "all": [0, 0]}));
        }
    };
    let v = vertices(exp);
    let mut out = Map::new();
    out.insert("student".into(), centroid(user, &v)?);
    for (key, file) in tasks {
        let name = if file.starts_with('-') {
            format!("{exp}{file}")
        } else {
            (*file).to_owned()
        };
        out.insert((*key).into(), centroid(comps.get(&name)?, &v)?);
    }
    let listed: Vec<Value> = v
        .into_iter()
        .map(|(n, x, y)| json!({"name": n, "x": x, "y": y}))
        .collect();
    out.insert("vertices".into(), Value::Array(listed));
    Ok(Value::Object(out))
}

/// Fixed node positions of the dashboards' graphs (`SetGraphProperties`),
/// as the client writes them (whole numbers as integers).
pub fn node_position(exp: &str, node: &str) -> Option<(Value, Value)> {
    let s = 200.0 * (std::f64::consts::PI / 3.0).sin();
    let (x, y): (i64, Value) = match (exp, node) {
        ("spinner", "voltage_step") => (100, json!(-s)),
        ("spinner", "voltage_ramp") => (-100, json!(-s)),
        ("spinner", "position_step") => (200, json!(0)),
        ("spinner", "position_ramp") => (-200, json!(0)),
        ("spinner", "speed_step") => (100, json!(s)),
        ("spinner", "speed_ramp") => (-100, json!(s)),
        ("pendulum", "start") => (0, json!(200)),
        ("pendulum", "brake") => (128, json!(154)),
        ("pendulum", "free") => (196, json!(34)),
        ("pendulum", "load") => (174, json!(-100)),
        ("pendulum", "sampling") => (68, json!(-188)),
        ("pendulum", "drive_perc") => (-68, json!(-188)),
        ("pendulum", "brake_perc") => (-174, json!(-100)),
        ("pendulum", "measuring_tools") => (-196, json!(34)),
        ("pendulum", "record") => (-128, json!(-154)),
        _ => return None,
    };
    Some((json!(x), y))
}

/// `GetGraphComponents`: the graph as networkx builds it from the matrix
/// and pyvis hands it to vis.js (`Network.from_nx().get_network_data()`),
/// with `nx.in_degree_centrality`. Node order is pyvis's: as the edges
/// (row-major over the matrix) first meet them, then the isolated ones.
pub fn graph_components(m: &Matrix, exp: &str) -> (Value, Value, Value) {
    let n = m.columns.len().min(m.rows.len());
    let fixed = exp == "spinner" || exp == "pendulum";
    let mut order: Vec<usize> = Vec::with_capacity(n);
    let mut edges = Vec::new();
    let mut in_degree = vec![0u32; n];
    let mut degree = vec![0u32; n];
    for i in 0..n {
        for j in 0..n {
            let w = m.cells[i * m.n_cols() + j];
            if w == 0.0 {
                continue;
            }
            for k in [i, j] {
                if !order.contains(&k) {
                    order.push(k);
                }
            }
            in_degree[j] += 1;
            degree[i] += 1;
            degree[j] += 1;
            let mut e = Map::new();
            if fixed {
                e.insert("label".into(), json!((w as i64).to_string()));
            }
            e.insert("width".into(), json!(w));
            e.insert("from".into(), json!(m.columns[i]));
            e.insert("to".into(), json!(m.columns[j]));
            e.insert("arrows".into(), json!("to"));
            edges.push(Value::Object(e));
        }
    }
    order.extend((0..n).filter(|k| degree[*k] == 0));
    let nodes: Vec<Value> = order
        .iter()
        .map(|&k| {
            let name = &m.columns[k];
            let mut o = Map::new();
            o.insert("color".into(), json!("#97c2fc"));
            if fixed {
                if let Some((x, y)) = node_position(exp, name) {
                    o.insert("x".into(), x);
                    o.insert("y".into(), y);
                }
                o.insert("physics".into(), json!(false));
            }
            o.insert("size".into(), json!(10));
            o.insert("id".into(), json!(name));
            o.insert("label".into(), json!(name));
            o.insert("shape".into(), json!("dot"));
            Value::Object(o)
        })
        .collect();
    let mut centrality = Map::new();
    if n == 1 {
        centrality.insert(m.columns[0].clone(), json!(1));
    } else if n > 1 {
        let s = 1.0 / (n as f64 - 1.0);
        for (name, d) in m.columns.iter().zip(&in_degree) {
            centrality.insert(name.clone(), json!(f64::from(*d) * s));
        }
    }
    (
        Value::Array(nodes),
        Value::Array(edges),
        json!({ "in_centrality": centrality }),
    )
}

/// A number as JSON: NaN (and infinities) as null, where the client would
/// have sent something no JSON parser takes.
fn number(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// A user's feedback counts, states × subjects, as the client's
/// `<user>-<exp>-<course>-feedback.csv` holds them.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    pub states: Vec<String>,
    pub subjects: Vec<String>,
    /// Row-major, states × subjects.
    pub counts: Vec<f64>,
}

impl Feedback {
    /// A new matrix, with the course's task subjects as the client adds them.
    pub fn new(exp: &str, course: &str) -> Feedback {
        let mut subjects: Vec<String> = FEEDBACK_SUBJECTS.iter().map(|s| (*s).to_owned()).collect();
        let tasks: &[&str] = match (course, exp) {
            ("cie3", _) => &["spinner-cie3-1-2", "spinner-cie3-3", "spinner-cie3-4"],
            ("engdes1", "pendulum") => &[
                "pendulum-engdes1-1-core",
                "pendulum-engdes1-1-ext",
                "pendulum-engdes1-2",
            ],
            ("engdes1", "spinner") => &[
                "spinner-engdes1-1-core",
                "spinner-engdes1-1-ext",
                "spinner-engdes1-2",
            ],
            _ => &[],
        };
        subjects.extend(tasks.iter().map(|s| (*s).to_owned()));
        Feedback {
            states: FEEDBACK_STATES.iter().map(|s| (*s).to_owned()).collect(),
            counts: vec![0.0; FEEDBACK_STATES.len() * subjects.len()],
            subjects,
        }
    }

    /// Count one `{state, subject}`; an unknown one changes nothing, as the
    /// client's `df[subject][state] += 1` fails on it.
    pub fn add(&mut self, state: &str, subject: &str) -> Result<(), Failed> {
        let i = self
            .states
            .iter()
            .position(|s| s == state)
            .ok_or(Failed("an unknown feedback state"))?;
        let j = self
            .subjects
            .iter()
            .position(|s| s == subject)
            .ok_or(Failed("an unknown feedback subject"))?;
        self.counts[i * self.subjects.len() + j] += 1.0;
        Ok(())
    }

    /// The file as pandas writes it (`to_csv`: floats as `1.0`).
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        for s in &self.subjects {
            out.push(',');
            out.push_str(s);
        }
        out.push('\n');
        for (i, state) in self.states.iter().enumerate() {
            out.push_str(state);
            for j in 0..self.subjects.len() {
                out.push(',');
                out.push_str(&pandas_float(self.counts[i * self.subjects.len() + j]));
            }
            out.push('\n');
        }
        out
    }

    pub fn from_csv(text: &str) -> Result<Feedback, String> {
        let m = Matrix::from_csv(text)?;
        Ok(Feedback {
            states: m.rows,
            subjects: m.columns,
            counts: m.cells,
        })
    }
}

/// A count as pandas writes a float column: `2.0`.
fn pandas_float(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// One request from a dashboard, as the client reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub user: String,
    pub exp: String,
    pub course: String,
    pub content: Content,
    pub graph: Option<String>,
    pub task: Option<String>,
}

/// What a request is answered from.
pub struct Inputs<'a> {
    /// The user's transitions; None before their first command (the client
    /// starts them at zero over the experiment's nodes).
    pub graph: Option<&'a Graph>,
    pub feedback: Option<&'a Feedback>,
    pub comparisons: &'a Comparisons,
}

/// The frames the client would send for `req`, in order; and, if it would
/// have stopped early, why.
pub fn answer(req: &Request, inputs: &Inputs) -> (Vec<String>, Option<Failed>) {
    let fresh;
    let graph = match inputs.graph {
        Some(g) => g,
        None => {
            fresh = Graph::new(&req.exp);
            &fresh
        }
    };
    let user = Matrix::from_graph(graph);
    // `all_feedback` is the first five answers in a row.
    let steps: &[Content] = match req.content {
        Content::AllFeedback => &Content::ALL[..5],
        _ => std::slice::from_ref(&req.content),
    };
    let mut frames = Vec::new();
    for step in steps {
        match one(req, *step, &user, inputs) {
            Ok(v) => frames.push(v.to_string()),
            Err(f) => return (frames, Some(f)),
        }
    }
    (frames, None)
}

fn one(req: &Request, content: Content, user: &Matrix, inputs: &Inputs) -> Result<Value, Failed> {
    let comps = inputs.comparisons;
    let (exp, course) = (req.exp.as_str(), req.course.as_str());
    let mut v = json!({
        "user": req.user,
        "type": "response",
        "exp": exp,
        "course": course,
        "content": content.as_str(),
    });
    let o = v.as_object_mut().expect("an object");
    match content {
        Content::StudentGraph => {
            let (nodes, edges, info) = graph_components(user, exp);
            o.insert("nodes".into(), nodes);
            o.insert("edges".into(), edges);
            o.insert("node_info".into(), info);
        }
        Content::ComparisonGraph => {
            let name = req.graph.as_deref().ok_or(Failed("no graph named"))?;
            let (nodes, edges, info) = graph_components(comps.get(name)?, exp);
            // The client's comparison answer carries no course.
            o.remove("course");
            o.insert("nodes".into(), nodes);
            o.insert("edges".into(), edges);
            o.insert("node_info".into(), info);
        }
        Content::TaskIdentification => {
            o.insert(
                "tasks".into(),
                task_identification(user, exp, course, comps)?,
            );
        }
        Content::Indicators => {
            let exploration = exploration(user, exp, course, comps);
            let enjoyment = enjoyment(inputs.feedback)?;
            let edges = total_edges(user, exp, course, comps)?;
            o.insert(
                "indicators".into(),
                json!({"exploration": exploration, "enjoyment": enjoyment, "edges": edges}),
            );
        }
        Content::Centroids => {
            o.insert("centroids".into(), centroids(user, exp, course, comps)?);
        }
        Content::TaskFeedback => {
            let name = req.task.as_deref().ok_or(Failed("no task named"))?;
            o.insert("feedback".into(), task_feedback(user, comps.get(name)?)?);
        }
        Content::AllFeedback => unreachable!("expanded by answer()"),
    }
    Ok(v)
}

#[cfg(test)]
mod tests;
