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
    /// so one fsync, per round rather than per group): returns those this
    /// caller won (another replica may have taken some). Either way they
    /// leave `pending`.
    pub fn claim(
        &mut self,
        groups: Vec<Group>,
        owner: &str,
        now_ms: i64,
    ) -> Result<Vec<Group>, DbError> {
        self.transaction(|s| {
            let mut won = Vec::with_capacity(groups.len());
            for g in groups {
                let key: [Val; 3] = [g.metric.as_str().into(), g.net.as_str().into(), g.ts.into()];
                let inserted = s.db.exec(
                    "INSERT INTO forwarded (metric, net, ts, owner, state, at) \
                     VALUES (?1, ?2, ?3, ?4, 'claimed', ?5) ON CONFLICT DO NOTHING",
                    &[
                        key[0].clone(),
                        key[1].clone(),
                        key[2].clone(),
                        owner.into(),
                        now_ms.into(),
                    ],
                )? == 1;
                s.db.exec(
                    "DELETE FROM pending WHERE metric = ?1 AND net = ?2 AND ts = ?3",
                    &key,
                )?;
                s.pending_seen.remove(&g);
                if inserted {
                    won.push(g);
                }
            }
            Ok(won)
        })
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
            for g in groups {
                s.db.exec(
                    "UPDATE forwarded SET state = 'sent' WHERE metric = ?1 AND net = ?2 AND ts = ?3",
                    &[g.metric.as_str().into(), g.net.as_str().into(), g.ts.into()],
                )?;
            }
            Ok(())
        })
    }

    /// The network value of one group, as records for the upstream's sinks.
    pub fn aggregate(&mut self, g: &Group) -> Result<Option<Aggregate>, DbError> {
        let key = [g.metric.as_str().into(), g.net.as_str().into(), g.ts.into()];
        let dims = Dims::decode(&g.net).unwrap_or_default();
        let sketches = self.db.query(
            "SELECT sketch, unit FROM sketches WHERE metric = ?1 AND net = ?2 AND ts = ?3",
            &key,
        )?;
        if !sketches.is_empty() {
            let mut merged = Sketch::default();
            let mut unit = String::new();
            for r in sketches {
                let mut it = r.into_iter();
                // Checked at ingest; one that fails now is left out.
                let _ = merged.merge_encoded(&it.next().expect("2 columns").into_blob());
                unit = it.next().expect("2 columns").into_text();
            }
            let value = merged.estimate();
            let point = Record::point(g.metric.clone(), dims.clone(), g.ts, value, &unit);
            let sketch = Record {
                kind: Kind::Sketch,
                payload: merged.encode(),
                ..point.clone()
            };
            return Ok(Some(Aggregate {
                point,
                sketch: Some(sketch),
            }));
        }
        let sums = self.db.query(
            "SELECT SUM(p.value), COUNT(*), MIN(s.unit) FROM points p JOIN series s ON s.id = p.series \
             WHERE p.metric = ?1 AND s.net = ?2 AND p.ts = ?3",
            &key,
        )?;
        Ok(sums
            .into_iter()
            .next()
            .filter(|r| r[1].int() > 0)
            .map(|r| Aggregate {
                point: Record::point(g.metric.clone(), dims, g.ts, r[0].real(), r[2].text()),
                sketch: None,
            }))
    }
}
