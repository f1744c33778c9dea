//! Daily rollups, recomputed whole for a day so that running one twice changes nothing.

use super::*;

/// One metric's sketches in a day: each network series' union is merged
/// from them.
pub(super) const SQL_DAY_SKETCHES: &str = "SELECT net, agent, sketch FROM sketches \
     WHERE metric = ?1 AND ts >= ?2 AND ts < ?3";
/// One metric's points in a day, summed per network series.
pub(super) const SQL_DAY_SUMS: &str = "SELECT s.net, SUM(p.value), COUNT(*), COUNT(DISTINCT s.agent) \
     FROM points p JOIN series s ON s.id = p.series \
     WHERE p.metric = ?1 AND p.ts >= ?2 AND p.ts < ?3 GROUP BY s.net";

impl Store {
    /// Compute the totals of one UTC day (`YYYY-MM-DD`, starting at
    /// `start_ms`) from the stored data and replace that day's rollups.
    /// Recomputed from scratch every time: running it twice, or again after
    /// a late batch, gives the right totals and never adds twice.
    /// A day older than the retention keeps the totals computed before its
    /// data was deleted: those are returned, not recomputed from nothing.
    pub fn rollup(
        &mut self,
        day: &str,
        start_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<RollupRow>, DbError> {
        if self
            .deleted_before(now_ms)
            .is_some_and(|line| start_ms < line)
        {
            return self.rollups(day, day);
        }
        let rows = self.rollup_rows(day, start_ms)?;
        self.transaction(|s| s.replace_rollups(day, &rows, now_ms))?;
        Ok(rows)
    }

    /// The totals of one UTC day from the stored data, read one metric at
    /// a time by the `(metric, ts)` indexes (a range on `ts` alone read
    /// every row of both tables).
    pub(super) fn rollup_rows(
        &mut self,
        day: &str,
        start_ms: i64,
    ) -> Result<Vec<RollupRow>, DbError> {
        let end_ms = start_ms + DAY_MS;
        let mut rows: BTreeMap<(String, String), RollupRow> = BTreeMap::new();
        let row = |metric: &str, net: String, how: &str| RollupRow {
            day: day.to_owned(),
            metric: metric.to_owned(),
            dims: Dims::decode(&net).unwrap_or_default(),
            how: how.into(),
            value: 0.0,
            samples: 0,
            agents: 0,
        };
        for metric in self.metrics("sketches")? {
            let params = [metric.as_str().into(), start_ms.into(), end_ms.into()];
            let mut unions: BTreeMap<String, (Sketch, BTreeSet<String>, i64)> = BTreeMap::new();
            for r in self.db.query(SQL_DAY_SKETCHES, &params)? {
                let [net, agent, sketch] = columns(r);
                let e = unions.entry(net.into_text()).or_default();
                if e.0.merge_encoded(&sketch.into_blob()).is_ok() {
                    e.1.insert(agent.into_text());
                    e.2 += 1;
                }
            }
            for (net, (sketch, agents, samples)) in unions {
                rows.insert(
                    (metric.clone(), net.clone()),
                    RollupRow {
                        value: sketch.estimate(),
                        samples,
                        agents: agents.len() as i64,
                        ..row(&metric, net, "union")
                    },
                );
            }
        }
        for metric in self.metrics("points")? {
            let params = [metric.as_str().into(), start_ms.into(), end_ms.into()];
            for r in self.db.query(SQL_DAY_SUMS, &params)? {
                let [net, value, samples, agents] = columns(r);
                let net = net.into_text();
                // A series with sketches is a distinct count: its union
                // is the total, not the sum of its points.
                rows.entry((metric.clone(), net.clone()))
                    .or_insert_with(|| RollupRow {
                        value: value.real(),
                        samples: samples.int(),
                        agents: agents.int(),
                        ..row(&metric, net, "sum")
                    });
            }
        }
        Ok(rows.into_values().collect())
    }

    /// Replace the stored totals of `day` with `rows` (in the caller's
    /// transaction).
    pub(super) fn replace_rollups(
        &mut self,
        day: &str,
        rows: &[RollupRow],
        now_ms: i64,
    ) -> Result<(), DbError> {
        self.db
            .exec("DELETE FROM rollups WHERE day = ?1", &[day.into()])?;
        for r in rows {
            self.db.exec(
                "INSERT INTO rollups (day, metric, net, how, value, samples, agents, computed) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (day, metric, net) DO UPDATE SET how = excluded.how, \
                 value = excluded.value, samples = excluded.samples, agents = excluded.agents, \
                 computed = excluded.computed",
                &[
                    day.into(),
                    r.metric.as_str().into(),
                    r.dims.encode().into(),
                    r.how.as_str().into(),
                    r.value.into(),
                    r.samples.into(),
                    r.agents.into(),
                    now_ms.into(),
                ],
            )?;
        }
        Ok(())
    }

    /// Stored rollups between two days (inclusive, `YYYY-MM-DD`).
    pub fn rollups(&mut self, first: &str, last: &str) -> Result<Vec<RollupRow>, DbError> {
        let rows: Rows = self.db.query(
            "SELECT day, metric, net, how, value, samples, agents FROM rollups \
             WHERE day >= ?1 AND day <= ?2 ORDER BY day, metric, net",
            &[first.into(), last.into()],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let [day, metric, net, how, value, samples, agents] = columns(r);
                RollupRow {
                    day: day.into_text(),
                    metric: metric.into_text(),
                    dims: Dims::decode(net.text()).unwrap_or_default(),
                    how: how.into_text(),
                    value: value.real(),
                    samples: samples.int(),
                    agents: agents.int(),
                }
            })
            .collect())
    }
}
