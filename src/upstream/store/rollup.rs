//! Daily rollups, recomputed whole for a day so that running one twice changes nothing.

use super::*;

impl Store {
    /// Compute the totals of one UTC day (`YYYY-MM-DD`, starting at
    /// `start_ms`) from the stored data and replace that day's rollups.
    /// Recomputed from scratch every time: running it twice, or again after
    /// a late batch, gives the right totals and never adds twice.
    pub fn rollup(
        &mut self,
        day: &str,
        start_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<RollupRow>, DbError> {
        let end_ms = start_ms + 86_400_000;
        let range = [start_ms.into(), end_ms.into()];
        let mut unions: BTreeMap<(String, String), (Sketch, BTreeSet<String>, i64)> =
            BTreeMap::new();
        for r in self.db.query(
            "SELECT metric, net, agent, sketch FROM sketches WHERE ts >= ?1 AND ts < ?2",
            &range,
        )? {
            let mut it = r.into_iter();
            let metric = it.next().expect("4 columns").into_text();
            let net = it.next().expect("4 columns").into_text();
            let agent = it.next().expect("4 columns").into_text();
            let e = unions
                .entry((metric, net))
                .or_insert_with(|| (Sketch::default(), BTreeSet::new(), 0));
            if e.0
                .merge_encoded(&it.next().expect("4 columns").into_blob())
                .is_ok()
            {
                e.1.insert(agent);
                e.2 += 1;
            }
        }
        let mut rows: BTreeMap<(String, String), RollupRow> = BTreeMap::new();
        for ((metric, net), (sketch, agents, samples)) in unions {
            rows.insert(
                (metric.clone(), net.clone()),
                RollupRow {
                    day: day.to_owned(),
                    metric,
                    dims: Dims::decode(&net).unwrap_or_default(),
                    how: "union".into(),
                    value: sketch.estimate(),
                    samples,
                    agents: agents.len() as i64,
                },
            );
        }
        for r in self.db.query(
            "SELECT p.metric, s.net, SUM(p.value), COUNT(*), COUNT(DISTINCT s.agent) \
             FROM points p JOIN series s ON s.id = p.series \
             WHERE p.ts >= ?1 AND p.ts < ?2 GROUP BY p.metric, s.net",
            &range,
        )? {
            let mut it = r.into_iter();
            let metric = it.next().expect("5 columns").into_text();
            let net = it.next().expect("5 columns").into_text();
            let (value, samples, agents) = (
                it.next().expect("5 columns").real(),
                it.next().expect("5 columns").int(),
                it.next().expect("5 columns").int(),
            );
            rows.entry((metric.clone(), net.clone()))
                .or_insert_with(|| RollupRow {
                    day: day.to_owned(),
                    metric,
                    dims: Dims::decode(&net).unwrap_or_default(),
                    how: "sum".into(),
                    value,
                    samples,
                    agents,
                });
        }
        let rows: Vec<RollupRow> = rows.into_values().collect();
        self.transaction(|s| {
            s.db.exec("DELETE FROM rollups WHERE day = ?1", &[day.into()])?;
            for r in &rows {
                s.db.exec(
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
        })?;
        Ok(rows)
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
                let mut it = r.into_iter();
                let mut next = || it.next().expect("7 columns");
                RollupRow {
                    day: next().into_text(),
                    metric: next().into_text(),
                    dims: Dims::decode(next().text()).unwrap_or_default(),
                    how: next().into_text(),
                    value: next().real(),
                    samples: next().int(),
                    agents: next().int(),
                }
            })
            .collect())
    }
}
