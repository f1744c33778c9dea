use super::*;
use crate::record::{Dims, Record};

fn batch(seq: i64, ids: &[i64], redelivered: bool) -> Batch {
    Batch {
        sink: "csv".into(),
        seq,
        outbox_id: "test".into(),
        origin: Origin::Pending,
        redelivered,
        accepted_before: 0,
        records: ids
            .iter()
            .map(|&id| {
                (
                    id,
                    Record::point(
                        "m",
                        Dims::new([("a", "1"), ("b", "x,y")]),
                        1_658_779_200_000,
                        id as f64,
                        "Count",
                    ),
                )
            })
            .collect(),
    }
}

fn temp_file(content: &str) -> (PathBuf, File) {
    let p = std::env::temp_dir().join(format!(
        "edgemeter-csv-{}-{}.csv",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::write(&p, content).expect("write");
    let f = open(&p).expect("open");
    (p, f)
}

#[test]
fn render_quotes_only_where_needed() {
    assert_eq!(
        render(&batch(7, &[3], false)),
        "7,3,2022-07-25T20:00:00.000Z,point,m,\"a=1;b=x,y\",3,Count\n"
    );
    let mut s = String::new();
    push_field(&mut s, "say \"hi\"");
    assert_eq!(s, "\"say \"\"hi\"\"\"");
}

/// Write `redelivered` batch `seq` over a file holding `before`; expect `after`.
#[track_caller]
fn check_repair(before: &str, seq: i64, after_prefix: &str) {
    let (path, mut f) = temp_file(before);
    let b = batch(seq, &[100], true);
    write_batch(&mut f, Some(seq), &render(&b)).expect("write");
    let got = std::fs::read_to_string(&path).expect("read");
    std::fs::remove_file(&path).ok();
    assert_eq!(
        got,
        format!("{after_prefix}{}", render(&b)),
        "before: {before:?}"
    );
}

#[test]
fn redelivery_repairs_the_tail() {
    let h = HEADER;
    // Nothing of the batch written yet.
    check_repair(&format!("{h}1,1,t\n"), 2, &format!("{h}1,1,t\n"));
    // The whole batch was written but not confirmed.
    check_repair(
        &format!("{h}1,1,t\n2,2,t\n2,3,t\n"),
        2,
        &format!("{h}1,1,t\n"),
    );
    // A torn write: part of a line.
    check_repair(&format!("{h}1,1,t\n2,2,t\n2,3"), 2, &format!("{h}1,1,t\n"));
    // Torn inside the first line of the batch.
    check_repair(&format!("{h}1,1,t\n2,"), 2, &format!("{h}1,1,t\n"));
    // Seq 12 must not be mistaken for seq 2.
    check_repair(&format!("{h}12,1,t\n"), 2, &format!("{h}12,1,t\n"));
    // Only the header (the first batch was torn away entirely).
    check_repair(&format!("{h}1,1"), 1, h);
    // A torn header on a new file.
    check_repair("batch,i", 1, h);
    check_repair("", 1, h);
}

#[test]
fn repair_reads_back_further_than_one_window() {
    let mut before = format!("{HEADER}1,1,t\n");
    let line = format!("2,{},{}\n", 0, "x".repeat(200));
    for _ in 0..1000 {
        before.push_str(&line); // ~200 KiB of batch 2, more than the first window
    }
    check_repair(&before, 2, &format!("{HEADER}1,1,t\n"));
}

#[test]
fn first_delivery_never_cuts() {
    let (path, mut f) = temp_file(&format!("{HEADER}5,1,t\n"));
    write_batch(&mut f, None, "5,2,t\n").expect("write");
    let got = std::fs::read_to_string(&path).expect("read");
    std::fs::remove_file(&path).ok();
    assert_eq!(got, format!("{HEADER}5,1,t\n5,2,t\n"));
}

#[test]
fn deliver_creates_missing_directories_and_reports_io_errors_as_retry() {
    let dir = std::env::temp_dir().join(format!("edgemeter-csv-dir-{}", fastrand::u64(..)));
    let mut sink = CsvSink::new(Config {
        path: dir.join("a/b/out.csv"),
        kinds: KindSet::ALL,
    });
    let b = batch(1, &[1, 2], false);
    smol::block_on(sink.deliver(&b, &crate::sinks::Progress::none())).expect("deliver");
    let text = std::fs::read_to_string(dir.join("a/b/out.csv")).expect("read");
    assert_eq!(text.lines().count(), 3);

    // A directory where the file should be: an I/O error, retried later.
    let mut bad = CsvSink::new(Config {
        path: dir.clone(),
        kinds: KindSet::ALL,
    });
    let err = smol::block_on(bad.deliver(&b, &crate::sinks::Progress::none()))
        .expect_err("cannot write a directory");
    assert!(matches!(err, DeliveryError::Retry(_)), "{err:?}");
    std::fs::remove_dir_all(&dir).ok();
}
