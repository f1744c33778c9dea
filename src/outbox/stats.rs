//! What `edgemeter status` shows, read in one snapshot.

use super::*;

impl Outbox {
    pub fn stats(&self) -> Result<Stats, OutboxError> {
        let e = sql_err(&self.path, "reading status");
        let c = &self.conn;
        let n = self.per_row;
        let (records, bytes, oldest) = c
            .query_row(
                &format!(
                    "SELECT COALESCE(SUM({n}), 0), COALESCE(SUM(size), 0), MIN(at) FROM records"
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(&e)?;
        let mut st = c
            .prepare(&format!(
                "SELECT s.name,
                   (SELECT COALESCE(SUM(MIN({n}, r.id - s.cursor)), 0) FROM records r
                    WHERE r.id > s.cursor AND ((1 << r.kind) & s.kinds) != 0),
                   s.delivered_records, s.delivered_batches, s.failures, s.last_delivery, s.last_failure,
                   s.last_error, (SELECT COUNT(*) FROM dead_letters d WHERE d.sink = s.name)
                 FROM sinks s ORDER BY s.name",
            ))
            .map_err(&e)?;
        let mut sinks: Vec<SinkStats> = st
            .query_map([], |r| {
                Ok(SinkStats {
                    name: r.get(0)?,
                    pending: r.get(1)?,
                    delivered_records: r.get(2)?,
                    delivered_batches: r.get(3)?,
                    failures: r.get(4)?,
                    last_delivery_ms: r.get(5)?,
                    last_failure_ms: r.get(6)?,
                    last_error: r.get(7)?,
                    dead_letters: r.get(8)?,
                    counters: Vec::new(),
                    peer_clock: None,
                })
            })
            .map_err(&e)?
            .collect::<Result<_, _>>()
            .map_err(&e)?;
        for s in &mut sinks {
            let mut st = c
                .prepare_cached("SELECT key, value FROM counters WHERE sink = ?1 ORDER BY key")
                .map_err(&e)?;
            s.counters = st
                .query_map([&s.name], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(&e)?
                .collect::<Result<_, _>>()
                .map_err(&e)?;
            let reading: Option<String> = c
                .query_row(
                    "SELECT value FROM meta WHERE key = ?1",
                    [super::deliver::peer_clock_key(&s.name)],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&e)?;
            s.peer_clock = reading.and_then(|v| {
                let (offset, at) = v.split_once(' ')?;
                Some((offset.parse().ok()?, at.parse().ok()?))
            });
        }
        let mut st = c
            .prepare("SELECT reason, sink, count FROM drops ORDER BY reason, sink")
            .map_err(&e)?;
        let drops = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(&e)?
            .collect::<Result<_, _>>()
            .map_err(&e)?;
        let dead_letter_bytes = c
            .query_row(
                "SELECT COALESCE(SUM(bytes), 0) FROM dead_letters",
                [],
                |r| r.get(0),
            )
            .map_err(&e)?;
        Ok(Stats {
            records,
            bytes,
            oldest_at_ms: oldest,
            sinks,
            drops,
            dead_letter_bytes,
        })
    }
}
