//! The forwarding queue: settled windows claimed (one replica wins), aggregated, and marked sent.

use super::*;

impl Store {
    /// Groups waiting to be forwarded whose time is at or before `until_ms`.
    pub fn settled(&mut self, until_ms: i64, limit: usize) -> Result<Vec<Group>, DbError> {
        let rows = self.db.query(
            &format!(
                "SELECT metric, net, ts FROM pending WHERE ts <= ?1 ORDER BY ts, metric, net LIMIT {limit}"
            ),
            &[until_ms.into()],
        )?;
        Ok(rows.into_iter().map(group_of).collect())
    }

    /// Take `groups` for forwarding, all in one transaction (one commit,
    /// so one fsync, per round rather than per group) and a few statements
    /// (not one per group: with PostgreSQL each is a round trip): returns
    /// those this caller won, in their order (another replica may have
    /// taken some). Either way they leave `pending`.
    pub fn claim(
        &mut self,
        groups: Vec<Group>,
        owner: &str,
        now_ms: i64,
    ) -> Result<Vec<Group>, DbError> {
        let unqueue = if self.db.kind() == "postgresql" {
            &UNQUEUE_PG
        } else {
            &UNQUEUE
        };
        let won = self.transaction(|s| {
            let mut won = HashSet::new();
            let refs: Vec<&Group> = groups.iter().collect();
            for chunk in refs.chunks(GROUPS_PER_STATEMENT) {
                let (sql, params) = CLAIM.bind(vec![owner.into(), now_ms.into()], chunk);
                won.extend(s.db.query(&sql, &params)?.into_iter().map(group_of));
                let (sql, params) = unqueue.bind(Vec::new(), chunk);
                s.db.exec(&sql, &params)?;
            }
            Ok(won)
        })?;
        for g in &groups {
            self.pending_seen.remove(g);
        }
        Ok(groups.into_iter().filter(|g| won.contains(g)).collect())
    }

    /// Claimed by `owner` but not confirmed sent (a crash in between): to be
    /// emitted again.
    pub fn unsent(&mut self, owner: &str) -> Result<Vec<Group>, DbError> {
        let rows = self.db.query(
            "SELECT metric, net, ts FROM forwarded WHERE owner = ?1 AND state = 'claimed' ORDER BY ts",
            &[owner.into()],
        )?;
        Ok(rows.into_iter().map(group_of).collect())
    }

    pub fn mark_sent(&mut self, groups: &[Group]) -> Result<(), DbError> {
        self.transaction(|s| {
            let refs: Vec<&Group> = groups.iter().collect();
            for chunk in refs.chunks(GROUPS_PER_STATEMENT) {
                let (sql, params) = MARK_SENT.bind(Vec::new(), chunk);
                s.db.exec(&sql, &params)?;
            }
            Ok(())
        })
    }

    /// The network values of `groups`, as records for the upstream's
    /// sinks, in their order: a group with sketches forwards their union
    /// (and the merged sketch), else the sum of its points; a group with
    /// neither is left out. A few statements for all the groups.
    pub fn aggregates(&mut self, groups: &[Group]) -> Result<Vec<(Group, Aggregate)>, DbError> {
        let wanted: HashSet<&Group> = groups.iter().collect();
        let mut unions: HashMap<Group, (Sketch, String)> = HashMap::new();
        let mut sums: HashMap<Group, (f64, String)> = HashMap::new();
        let refs: Vec<&Group> = groups.iter().collect();
        for chunk in refs.chunks(GROUPS_PER_STATEMENT) {
            let (sql, params) = SKETCHES_OF.bind(Vec::new(), chunk);
            for r in self.db.query(&sql, &params)? {
                let [metric, net, ts, sketch, unit] = columns(r);
                let (merged, u) = unions.entry(group(metric, net, ts)).or_default();
                // Checked at ingest; one that fails now is left out.
                let _ = merged.merge_encoded(&sketch.into_blob());
                *u = unit.into_text();
            }
            // Points are read by (metric, time), the index's key: every
            // network series of that time at once, those not asked for
            // dropped here (a query per group read them all each time).
            let times: BTreeSet<(&str, i64)> =
                chunk.iter().map(|g| (g.metric.as_str(), g.ts)).collect();
            let (sql, params) = sums_sql(&times);
            for r in self.db.query(&sql, &params)? {
                let [metric, net, ts, sum, count, unit] = columns(r);
                let g = group(metric, net, ts);
                if count.int() > 0 && wanted.contains(&g) {
                    sums.insert(g, (sum.real(), unit.into_text()));
                }
            }
        }
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            let dims = Dims::decode(&g.net).unwrap_or_default();
            if let Some((merged, unit)) = unions.remove(g) {
                let point = Record::point(g.metric.clone(), dims, g.ts, merged.estimate(), unit);
                let sketch = Record {
                    kind: Kind::Sketch,
                    payload: merged.encode(),
                    ..point.clone()
                };
                out.push((
                    g.clone(),
                    Aggregate {
                        point,
                        sketch: Some(sketch),
                    },
                ));
            } else if let Some((sum, unit)) = sums.remove(g) {
                let point = Record::point(g.metric.clone(), dims, g.ts, sum, unit);
                out.push((
                    g.clone(),
                    Aggregate {
                        point,
                        sketch: None,
                    },
                ));
            }
        }
        Ok(out)
    }
}

/// Each network series' sum, count and unit at the (metric, time) pairs
/// `times` (padded with the last as [`GroupsSql`] are; read once each;
/// the times the outer loop, as in [`FORWARDED_AMONG`]).
pub(super) fn sums_sql<'t>(times: &BTreeSet<(&'t str, i64)>) -> (String, Vec<Val<'t>>) {
    let rows = padded_rows(times.len());
    let sql = format!(
        "SELECT p.metric, s.net, p.ts, SUM(p.value), COUNT(*), MIN(s.unit) FROM \
         (SELECT DISTINCT column1, column2 FROM (VALUES {}) AS v) AS g \
         CROSS JOIN points p JOIN series s ON s.id = p.series \
         WHERE p.metric = g.column1 AND p.ts = g.column2 \
         GROUP BY p.metric, s.net, p.ts",
        numbered(rows, "(?, CAST(? AS BIGINT))", ", ", 1)
    );
    let last = times.last().copied();
    let params = times
        .iter()
        .copied()
        .chain(std::iter::repeat_n(last, rows - times.len()).flatten())
        .flat_map(|(metric, ts)| [metric.into(), ts.into()])
        .collect();
    (sql, params)
}
