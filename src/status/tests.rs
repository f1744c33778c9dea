use super::*;

fn snapshot() -> Snapshot {
    Snapshot {
        schema: SCHEMA,
        at_ms: 1_800_000_000_000,
        agent: AgentInfo {
            id: "gw-1".into(),
            version: "0.1.0".into(),
            running: true,
            pid: Some(42),
            state_dir: "/var/lib/edgemeter".into(),
        },
        outbox: OutboxInfo {
            path: "/var/lib/edgemeter/outbox.db".into(),
            records: 12,
            bytes: 3400,
            max_bytes: 1 << 20,
            oldest_ms: Some(1_800_000_000_000 - 90_000),
            dead_letter_bytes: 0,
            disk_free_bytes: Some(5 << 30),
        },
        drops: vec![Drop {
            reason: "buffer_full".into(),
            sink: "cw".into(),
            records: 5,
        }],
        sinks: vec![SinkInfo {
            name: "cw".into(),
            pending: 12,
            delivered_records: 1000,
            delivered_batches: 10,
            failures: 2,
            last_delivery_ms: Some(1_800_000_000_000 - 1_000),
            last_failure_ms: None,
            last_error: Some("HTTP 500: \"oops\"".into()),
            dead_letters: 0,
            counters: [("points_rejected".to_owned(), 3)].into_iter().collect(),
            peer_clock_offset_ms: Some(-350),
            peer_clock_read_ms: Some(1_800_000_000_000 - 1_000),
        }],
        sources: vec![
            SourceInfo {
                name: "relay".into(),
                kind: "relay".into(),
                written_ms: Some(1_800_000_000_000 - 2_000),
                text: "stream  state\nrig-1   live\n".into(),
                samples: vec![
                    Sample::new("relay_messages_total", &[("stream", "rig-1")], 77.0),
                    Sample::new("relay_stream_up", &[("stream", "rig \"1\"\n")], 1.0),
                    Sample::new("not_a_metric_we_know", &[], 1.0),
                ],
            },
            SourceInfo {
                name: "load".into(),
                kind: "synthetic".into(),
                written_ms: None,
                text: String::new(),
                samples: Vec::new(),
            },
        ],
    }
}

#[test]
fn text_is_what_status_always_printed() {
    let text = text::render(&snapshot());
    let want = "agent        gw-1 (running, pid 42)
outbox       /var/lib/edgemeter/outbox.db
buffered     12 records, 3.32 KiB of 1.00 MiB (0.3%)
oldest       1m 30s old
drops        5 buffer_full (sink cw)
dead letters 0 B kept
sink cw
  pending 12 records; delivered 1000 records in 10 batches; last delivery 1s ago
  failures 2; last failure never; dead letters 0
  points_rejected 3
  last error: HTTP 500: \"oops\"
source relay (written 2s ago)
  stream  state
  rig-1   live
";
    assert_eq!(text, want);
}

/// A full disk is a line of its own, said where an operator looks first.
#[test]
fn text_says_when_the_disk_is_full() {
    let mut s = snapshot();
    s.outbox.disk_free_bytes = Some(4096);
    let text = text::render(&s);
    assert!(
        text.contains("\ndisk         FULL: 4.00 KiB free in /var/lib/edgemeter: commits fail, and records wait in memory (see the log)\n"),
        "{text}"
    );
    s.outbox.disk_free_bytes = Some(1 << 20);
    assert!(!text::render(&s).contains("disk "), "room enough: no line");
}

/// A clock off is said under its sink, and only then: a clock within the
/// reading's error says nothing.
#[test]
fn text_says_when_the_clock_is_off() {
    let mut s = snapshot();
    s.sinks[0].peer_clock_offset_ms = Some(3 * 86_400_000 + 7_500_000);
    let text = text::render(&s);
    assert!(
        text.contains("\n  CLOCK OFF: this machine's clock is 3d 2h behind the receiver's (read 1s ago): what is sent is stamped wrong; enable network time\n"),
        "{text}"
    );
    s.sinks[0].peer_clock_offset_ms = Some(-crate::clock::PEER_CLOCK_OFF_MS);
    assert!(
        !text::render(&s).contains("CLOCK"),
        "within the bound: no line"
    );
}

#[test]
fn metrics_group_families_and_escape_labels() {
    let m = prometheus::render(&snapshot());
    assert!(m.contains(
        "# HELP edgemeter_relay_messages_total Messages received (frames may carry several lines)\n\
         # TYPE edgemeter_relay_messages_total counter\n\
         edgemeter_relay_messages_total{source=\"relay\",stream=\"rig-1\"} 77\n"
    ), "{m}");
    assert!(
        m.contains("edgemeter_relay_stream_up{source=\"relay\",stream=\"rig \\\"1\\\"\\n\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("edgemeter_outbox_oldest_age_seconds 90\n"),
        "{m}"
    );
    assert!(
        m.contains("edgemeter_sink_last_delivery_seconds{sink=\"cw\"} 1799999999\n"),
        "{m}"
    );
    assert!(
        !m.contains("edgemeter_sink_last_failure_seconds"),
        "never failed: no sample\n{m}"
    );
    assert!(
        m.contains("edgemeter_dropped_records_total{reason=\"buffer_full\",sink=\"cw\"} 5\n"),
        "{m}"
    );
    assert!(
        m.contains("edgemeter_sink_events_total{event=\"points_rejected\",sink=\"cw\"} 3\n"),
        "{m}"
    );
    assert!(
        m.contains("edgemeter_sink_peer_clock_offset_seconds{sink=\"cw\"} -0.35\n"),
        "{m}"
    );
    assert!(!m.contains("not_a_metric_we_know"), "{m}");
    // Each family's HELP and TYPE once, before its samples.
    let types = m.lines().filter(|l| l.starts_with("# TYPE ")).count();
    let helps = m.lines().filter(|l| l.starts_with("# HELP ")).count();
    let names: std::collections::BTreeSet<&str> = m
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    assert_eq!((types, helps), (names.len(), names.len()), "{m}");
}

#[test]
fn json_round_trips_and_names_its_schema() {
    let s = snapshot();
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v["schema"], 1);
    assert_eq!(v["sources"][0]["type"], "relay");
    assert_eq!(v["sources"][0]["samples"][0]["labels"]["stream"], "rig-1");
    assert_eq!(v["sources"][1]["written_ms"], serde_json::Value::Null);
    let back: Snapshot = serde_json::from_value(v).unwrap();
    assert_eq!(back, s);
}

#[test]
fn the_page_escapes_what_it_shows() {
    let mut s = snapshot();
    s.sources[0].text = "<script>alert(1)</script>\n".into();
    let page = serve::page(&s);
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!page.contains("<script>"));
    assert!(page.contains("working; 5 records were dropped"));
}

#[test]
fn the_verdict_names_what_is_wrong_first() {
    let mut s = snapshot();
    assert_eq!(serve::verdict(&s).0, "warn");
    s.drops.clear();
    assert_eq!(serve::verdict(&s).0, "ok");
    s.sources[0].samples[1].value = 0.0;
    s.sinks[0].last_failure_ms = Some(s.at_ms);
    assert_eq!(
        serve::verdict(&s),
        (
            "bad",
            "sink cw failing; stream rig \"1\"\n of source relay not live".to_owned()
        )
    );
}

#[test]
fn health_points_carry_the_snapshots_figures() {
    let s = snapshot();
    let got: Vec<(String, String, f64)> = health::points(&s, s.at_ms)
        .into_iter()
        .map(|r| {
            assert_eq!(r.ts_ms, s.at_ms);
            (r.name.into_owned(), r.dims.encode(), r.value)
        })
        .collect();
    let sink = crate::record::Dims::new([("sink", "cw")]).encode();
    let want = [
        ("agent_buffered_records", "{}", 12.0),
        ("agent_buffered_bytes", "{}", 3400.0),
        ("agent_oldest_record_age_seconds", "{}", 90.0),
        ("agent_dropped_records", "{}", 5.0),
        ("agent_sink_pending_records", sink.as_str(), 12.0),
        ("agent_sink_failures", sink.as_str(), 2.0),
    ];
    let want: Vec<(String, String, f64)> = want
        .iter()
        .map(|(n, d, v)| ((*n).to_owned(), (*d).to_owned(), *v))
        .collect();
    assert_eq!(got, want);
}
