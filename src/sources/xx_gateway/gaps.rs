//! Ids the gateway took but has not committed yet. `id` comes from a
//! sequence when a row is INSERTed and becomes visible at COMMIT, so a
//! reader can see id 105 before 103. Every id below the watermark that a
//! read skipped is a gap; the source re-reads only its gaps (one
//! primary-key probe each) until they appear or age out, instead of
//! re-reading a fixed range below the watermark at every poll.

/// The ids in `after + 1 ..= last` that are not in `ids` (ascending, all
/// in that range), keeping only those above `floor`: a gap further below
/// the newest id than the configured distance is not watched.
pub fn holes(after: i64, ids: impl IntoIterator<Item = i64>, floor: i64) -> Vec<i64> {
    let mut out = Vec::new();
    let mut prev = after;
    for id in ids {
        out.extend((prev + 1).max(floor + 1)..id);
        prev = prev.max(id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_between_ids_above_the_floor() {
        assert_eq!(
            holes(100, [101, 102, 105, 106, 109], 0),
            vec![103, 104, 107, 108]
        );
        assert_eq!(holes(100, [101, 102, 103], 0), Vec::<i64>::new());
        assert_eq!(holes(100, [], 0), Vec::<i64>::new());
        // The first read of a table whose ids start high: nothing below
        // the floor is listed, however far the first id is.
        assert_eq!(
            holes(0, [1_000_000, 1_000_002], 999_990),
            vec![
                999_991, 999_992, 999_993, 999_994, 999_995, 999_996, 999_997, 999_998, 999_999,
                1_000_001
            ]
        );
        assert_eq!(
            holes(0, [5_000_000_000], 4_999_999_998),
            vec![4_999_999_999]
        );
    }
}
