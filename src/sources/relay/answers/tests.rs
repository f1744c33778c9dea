//! The analytics client's own test data and what its code answers
//! (`tests/fixtures/relay/answers/`, written by
//! `scripts/relay-answers-expected` from the client itself), and its unit
//! tests' tables.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::*;
use crate::sources::relay::analytics::{Analytics, GraphKey};
use crate::sources::relay::envelope::envelope;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/relay/answers")
}

fn comparisons() -> Comparisons {
    let (c, problems) = Comparisons::load(&fixtures().join("comparison_graphs")).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    c
}

fn client_test_matrix(name: &str) -> Matrix {
    let p = fixtures().join("client-test").join(name);
    Matrix::from_csv(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Equal as JSON values, numbers within 1e-9; the path of the first
/// difference otherwise.
fn same(a: &Value, b: &Value, path: &str) -> Result<(), String> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            if (x - y).abs() <= 1e-9 {
                Ok(())
            } else {
                Err(format!("{path}: {x} != {y}"))
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                return Err(format!("{path}: {} items != {}", x.len(), y.len()));
            }
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                same(p, q, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (Value::Object(x), Value::Object(y)) => {
            let (kx, ky): (Vec<_>, Vec<_>) = (x.keys().collect(), y.keys().collect());
            if kx != ky {
                return Err(format!("{path}: keys {kx:?} != {ky:?}"));
            }
            for (k, v) in x {
                same(v, &y[k], &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        _ if a == b => Ok(()),
        _ => Err(format!("{path}: {a} != {b}")),
    }
}

/// Every case the generator recorded: the client's test messages through
/// our analytics, then feedback and requests through [`answer`]; each
/// request's frames equal the client's.
#[test]
fn every_answer_equals_the_clients_for_its_test_data() {
    let comps = comparisons();
    let mut cases = 0;
    let mut requests = 0;
    let mut nan_cases = 0;
    let mut names: Vec<_> = std::fs::read_dir(fixtures())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    names.sort();
    for path in names {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let (user, exp, course) = (
            doc["user"].as_str().unwrap(),
            doc["exp"].as_str().unwrap(),
            doc["course"].as_str().unwrap(),
        );
        let key = GraphKey {
            user: user.into(),
            exp: exp.into(),
            course: course.into(),
        };
        let mut analytics = Analytics::new(100);
        if let Some(csv) = doc["adopted_adjacency"].as_str() {
            let g = Graph::from_adjacency_csv(csv).unwrap();
            assert!(analytics.adopt(&key, Some(&g), &[]));
        }
        let mut feedback: Option<Feedback> = None;
        for (i, step) in doc["steps"].as_array().unwrap().iter().enumerate() {
            let text = step["send"].as_str().unwrap();
            let m: Value = serde_json::from_str(text).unwrap();
            let expect = step["expect"].as_array().unwrap();
            let got: Vec<Value> = match m["type"].as_str().unwrap() {
                "analytics" => {
                    let env = envelope(text).unwrap();
                    analytics.observe(0, m["hardware"].as_str().unwrap(), &env);
                    vec![]
                }
                "feedback" => {
                    let f = feedback.get_or_insert_with(|| Feedback::new(exp, course));
                    let _ = f.add(
                        m["payload"]["state"].as_str().unwrap(),
                        m["payload"]["subject"].as_str().unwrap(),
                    );
                    vec![]
                }
                "request" => {
                    requests += 1;
                    let p = &m["payload"];
                    let req = Request {
                        user: user.into(),
                        exp: exp.into(),
                        course: course.into(),
                        content: Content::parse(p["content"].as_str().unwrap()).unwrap(),
                        graph: p["graph"].as_str().map(str::to_owned),
                        task: p["task"].as_str().map(str::to_owned),
                    };
                    let graph = analytics.graph(&key);
                    let inputs = Inputs {
                        graph: graph.as_ref(),
                        feedback: feedback.as_ref(),
                        comparisons: &comps,
                    };
                    let (frames, _) = answer(&req, &inputs);
                    frames
                        .iter()
                        .map(|f| serde_json::from_str(f).unwrap())
                        .collect()
                }
                other => panic!("{other}"),
            };
            let where_ = format!("{} step {i} ({text})", path.display());
            same(&Value::Array(got), &Value::Array(expect.clone()), "answer")
                .unwrap_or_else(|e| panic!("{where_}: {e}"));
            nan_cases += usize::from(step["client_sent_nan"].as_bool().unwrap());
        }
        match doc["feedback_csv"].as_str() {
            Some(csv) => assert_eq!(feedback.unwrap().to_csv(), csv, "{}", path.display()),
            None => assert!(feedback.is_none_or(|f| f.counts.iter().all(|c| *c == 0.0))),
        }
        cases += 1;
    }
    assert!(cases >= 11, "{cases} fixture cases");
    assert!(requests >= 150, "{requests} requests");
    assert!(nan_cases >= 3, "the NaN cases are covered: {nan_cases}");
}

/// The client's `test_analytics.py`, as a table: (student, comparison,
/// expected task distance with a = 10, b = 1).
#[test]
fn task_distance_matches_the_clients_unit_tests() {
    let ad1 = [
        [1, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 2, 1, 0, 0],
        [0, 0, 1, 3, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ];
    let mut ad2 = ad1;
    ad2[0][1] = 1;
    ad2[2][0] = 1;
    let m = |rows: [[i32; 6]; 6]| Matrix {
        columns: (0..6).map(|i| i.to_string()).collect(),
        rows: (0..6).map(|i| i.to_string()).collect(),
        cells: rows.iter().flatten().map(|v| f64::from(*v)).collect(),
    };
    let test = Matrix::from_graph(&test_user_graph());
    let td = |a: &Matrix, b: &Matrix| task_distance(a, b, 10.0, 1.0, 2.0, 2.0, -1.0).unwrap();
    let same_csv = client_test_matrix("spinner-compare-same.csv");
    for (what, got, want) in [
        ("compare_arrays", td(&m(ad1), &m(ad2)), 20.0),
        ("distance_zero", td(&test, &test), 0.0),
        ("distance_zero2", td(&same_csv, &same_csv), 0.0),
        ("distance_zero3", td(&test, &same_csv), 0.0),
        (
            "distance_missing",
            td(&test, &client_test_matrix("spinner-compare-1.csv")),
            20.0,
        ),
        (
            "distance_extra",
            td(&test, &client_test_matrix("spinner-compare-2.csv")),
            3.0,
        ),
    ] {
        assert_eq!(got, want, "{what}");
    }
    let zero = Matrix::from_graph(&Graph::new("spinner"));
    assert!(td(&zero, &test).is_nan(), "an empty graph has no distance");
    let small = Matrix::from_graph(&Graph::new("turbine"));
    assert_eq!(
        task_distance(&test, &small, 10.0, 1.0, 2.0, 2.0, -1.0),
        Err(Failed("a comparison graph smaller than the student's"))
    );
}

/// `test_total_edges_*` and `test_feedback_*_content` of the client.
#[test]
fn total_edges_and_task_feedback_match_the_clients_unit_tests() {
    let comps = comparisons();
    let test = Matrix::from_graph(&test_user_graph());
    let total = |m: &Matrix| total_edges(m, "spinner", "cie3", &comps).unwrap();
    assert_eq!(total(&test), json!(900.0 / 439.0));
    assert_eq!(
        total(&comps.graphs["spinner-cie3-1-2"]),
        json!(40300.0 / 439.0)
    );
    let fb = |m: &Matrix, task: &str| task_feedback(m, &comps.graphs[task]).unwrap();
    let lists = |v: Value| {
        ["hardware", "hardware_freq", "transition", "transition_freq"].map(|k| {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
    };
    let none: Vec<String> = vec![];
    for (task, hardware_freq) in [
        ("spinner-cie3-1-2", vec!["voltage_step"]),
        ("spinner-cie3-1-2-3", vec!["voltage_step"]),
        ("spinner-cie3-all", vec!["voltage_step", "position_step"]),
    ] {
        let [h, hf, t, tf] = lists(fb(&test, task));
        assert_eq!(
            (h, hf, t, tf),
            (
                none.clone(),
                hardware_freq.iter().map(|s| s.to_string()).collect(),
                none.clone(),
                none.clone()
            ),
            "{task}"
        );
    }
    let [h, hf, t, tf] = lists(fb(
        &client_test_matrix("spinner-compare-4.csv"),
        "spinner-cie3-3",
    ));
    assert_eq!(h, ["position_step", "position_ramp"]);
    assert_eq!(t, ["position_step to position_ramp"]);
    assert!(hf.is_empty() && tf.is_empty());
}

/// The matrix of the client's `test` user (`test-test00-spinner-engdes1.json`),
/// built by our analytics from its messages.
fn test_user_graph() -> Graph {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("test-spinner-engdes1.json")).unwrap(),
    )
    .unwrap();
    let mut a = Analytics::new(10);
    for step in doc["steps"].as_array().unwrap() {
        let text = step["send"].as_str().unwrap();
        let env = envelope(text).unwrap();
        if env.kind == "analytics" {
            a.observe(0, "test00", &env);
        }
    }
    a.graph(&GraphKey {
        user: "test".into(),
        exp: "spinner".into(),
        course: "engdes1".into(),
    })
    .unwrap()
}

#[test]
fn feedback_files_read_back_as_written_and_unknown_names_change_nothing() {
    let mut f = Feedback::new("pendulum", "engdes1");
    f.add("Curious", "pendulum-engdes1-2").unwrap();
    f.add("Curious", "pendulum-engdes1-2").unwrap();
    assert_eq!(
        f.add("Sleepy", "UI"),
        Err(Failed("an unknown feedback state"))
    );
    assert_eq!(
        f.add("Curious", "../x"),
        Err(Failed("an unknown feedback subject"))
    );
    let csv = f.to_csv();
    assert!(csv.starts_with(",Workbook,Remote work,Hardware,UI,LA,Other,pendulum-engdes1-1-core,"));
    assert!(
        csv.contains("\nCurious,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,2.0\n"),
        "{csv}"
    );
    assert_eq!(Feedback::from_csv(&csv).unwrap(), f);
    assert_eq!(enjoyment(Some(&f)).unwrap(), json!(2.0));
    assert_eq!(enjoyment(None).unwrap(), json!(0));
}

#[test]
fn a_graph_name_that_is_a_path_is_never_read() {
    let comps = comparisons();
    for name in ["../data/x", "/etc/passwd", "spinner-cie3-all/..", ".hidden"] {
        assert_eq!(
            comps.get(name).err(),
            Some(Failed("a graph name that is not a plain file name")),
            "{name}"
        );
    }
    assert!(comps.get("spinner-cie3-all").is_ok());
}
