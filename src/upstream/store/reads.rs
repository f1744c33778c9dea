//! The questions asked of the store: series (per agent, and network-wide: union of sketches or sum of points), events, and deleting one user's events.

use super::*;

impl Store {
    pub fn series(&mut self, q: &SeriesQuery) -> Result<Vec<SeriesRow>, DbError> {
        let range = [q.metric.as_str().into(), q.start_ms.into(), q.end_ms.into()];
        let keep = |d: &Dims| {
            q.dims
                .iter()
                .all(|(k, v)| d.pairs().iter().any(|(dk, dv)| dk == k && dv == v))
        };
        let mut rows = Vec::new();
        if let Some(agent) = &q.agent {
            let (sql, params): (&str, Vec<Val>) = if agent == "*" {
                (
                    "SELECT ts, dims, value, unit, agent FROM points \
                     WHERE metric = ?1 AND ts >= ?2 AND ts < ?3 ORDER BY ts, agent, dims",
                    range.to_vec(),
                )
            } else {
                let mut p = range.to_vec();
                p.push(agent.as_str().into());
                (
                    "SELECT ts, dims, value, unit, agent FROM points \
                     WHERE metric = ?1 AND ts >= ?2 AND ts < ?3 AND agent = ?4 ORDER BY ts, dims",
                    p,
                )
            };
            for r in self.db.query(sql, &params)? {
                let dims = Dims::decode(r[1].text()).unwrap_or_default();
                if !keep(&dims) {
                    continue;
                }
                let mut it = r.into_iter();
                let ts = it.next().expect("5 columns").int();
                let _ = it.next();
                let value = it.next().expect("5 columns").real();
                let unit = it.next().expect("5 columns").into_text();
                let agent = it.next().expect("5 columns").into_text();
                rows.push(SeriesRow {
                    ts,
                    dims,
                    value,
                    unit,
                    agents: 1,
                    how: How::Agent(agent),
                });
                if rows.len() >= q.limit {
                    break;
                }
            }
            return Ok(rows);
        }
        // Unions first: a group with sketches is a distinct count.
        let mut unions: BTreeMap<(i64, String), (Sketch, BTreeSet<String>, String)> =
            BTreeMap::new();
        let sketches = self.db.query(
            "SELECT ts, net, agent, unit, sketch FROM sketches \
             WHERE metric = ?1 AND ts >= ?2 AND ts < ?3",
            &range,
        )?;
        for r in sketches {
            let mut it = r.into_iter();
            let ts = it.next().expect("5 columns").int();
            let net = it.next().expect("5 columns").into_text();
            let agent = it.next().expect("5 columns").into_text();
            let unit = it.next().expect("5 columns").into_text();
            let blob = it.next().expect("5 columns").into_blob();
            let e = unions
                .entry((ts, net))
                .or_insert_with(|| (Sketch::default(), BTreeSet::new(), unit));
            // Stored sketches were checked at ingest; one that no longer
            // decodes (a newer edgemeter's, read by an older) is skipped.
            if e.0.merge_encoded(&blob).is_ok() {
                e.1.insert(agent);
            }
        }
        let sums = self.db.query(
            "SELECT ts, net, SUM(value), COUNT(DISTINCT agent), MIN(unit) FROM points \
             WHERE metric = ?1 AND ts >= ?2 AND ts < ?3 GROUP BY ts, net",
            &range,
        )?;
        let mut all: BTreeMap<(i64, String), SeriesRow> = BTreeMap::new();
        for ((ts, net), (sketch, agents, unit)) in unions {
            let dims = Dims::decode(&net).unwrap_or_default();
            all.insert(
                (ts, net),
                SeriesRow {
                    ts,
                    dims,
                    value: sketch.estimate(),
                    unit,
                    agents: agents.len() as i64,
                    how: How::Union,
                },
            );
        }
        for r in sums {
            let mut it = r.into_iter();
            let ts = it.next().expect("5 columns").int();
            let net = it.next().expect("5 columns").into_text();
            let value = it.next().expect("5 columns").real();
            let agents = it.next().expect("5 columns").int();
            let unit = it.next().expect("5 columns").into_text();
            all.entry((ts, net.clone())).or_insert_with(|| SeriesRow {
                ts,
                dims: Dims::decode(&net).unwrap_or_default(),
                value,
                unit,
                agents,
                how: How::Sum,
            });
        }
        Ok(all
            .into_values()
            .filter(|r| keep(&r.dims))
            .take(q.limit)
            .collect())
    }

    /// Each (metric, network dimensions) with a sketch since `since_ms`:
    /// the distinct counts the dashboard offers.
    pub fn sketch_nets(&mut self, since_ms: i64) -> Result<Vec<(String, Dims)>, DbError> {
        let rows = self.db.query(
            "SELECT metric, net FROM sketches WHERE ts >= ?1 GROUP BY metric, net ORDER BY metric, net",
            &[since_ms.into()],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let mut it = r.into_iter();
                let metric = it.next().expect("2 columns").into_text();
                let net = Dims::decode(it.next().expect("2 columns").text()).unwrap_or_default();
                (metric, net)
            })
            .collect())
    }

    /// Every agent that posted: batches, records, the last one's arrival.
    pub fn edges(&mut self) -> Result<Vec<EdgeRow>, DbError> {
        let rows = self.db.query(
            "SELECT agent, COUNT(*), CAST(SUM(records) AS BIGINT), MAX(received) FROM batches GROUP BY agent ORDER BY agent",
            &[],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let mut it = r.into_iter();
                EdgeRow {
                    agent: it.next().expect("4 columns").into_text(),
                    batches: it.next().expect("4 columns").int(),
                    records: it.next().expect("4 columns").int(),
                    last_received_ms: it.next().expect("4 columns").int(),
                }
            })
            .collect())
    }

    pub fn events(&mut self, q: &EventQuery) -> Result<Vec<EventRow>, DbError> {
        let mut sql = String::from(
            "SELECT ts, etype, user_id, agent, dims, payload FROM events WHERE ts >= ?1 AND ts < ?2",
        );
        let mut params: Vec<Val> = vec![q.start_ms.into(), q.end_ms.into()];
        for (col, v) in [
            ("user_id", &q.user),
            ("etype", &q.etype),
            ("agent", &q.agent),
        ] {
            if let Some(v) = v {
                params.push(v.as_str().into());
                sql.push_str(&format!(" AND {col} = ?{}", params.len()));
            }
        }
        sql.push_str(&format!(" ORDER BY ts LIMIT {}", q.limit));
        Ok(self
            .db
            .query(&sql, &params)?
            .into_iter()
            .map(|r| {
                let mut it = r.into_iter();
                let mut next = || it.next().expect("6 columns");
                EventRow {
                    ts: next().int(),
                    etype: next().into_text(),
                    user: match next() {
                        Val::Text(s) => Some(s.into_owned()),
                        _ => None,
                    },
                    agent: next().into_text(),
                    dims: next().into_text(),
                    payload: next().into_text(),
                }
            })
            .collect())
    }

    /// Users with `analytics` events in `[start, end)`, the latest first.
    pub fn command_users(
        &mut self,
        start_ms: i64,
        end_ms: i64,
        limit: usize,
    ) -> Result<Vec<UserRow>, DbError> {
        let rows = self.db.query(
            &format!(
                "SELECT user_id, COUNT(*), MAX(ts) FROM events \
                 WHERE ts >= ?1 AND ts < ?2 AND etype = 'analytics' AND user_id IS NOT NULL \
                 GROUP BY user_id ORDER BY MAX(ts) DESC, user_id LIMIT {limit}"
            ),
            &[start_ms.into(), end_ms.into()],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let mut it = r.into_iter();
                UserRow {
                    user: it.next().expect("3 columns").into_text(),
                    events: it.next().expect("3 columns").int(),
                    last_ms: it.next().expect("3 columns").int(),
                }
            })
            .collect())
    }

    /// Events per user and stream in `[start, end)`, the most first.
    pub fn usage(
        &mut self,
        start_ms: i64,
        end_ms: i64,
        limit: usize,
    ) -> Result<Vec<UsageRow>, DbError> {
        let rows = self.db.query(
            &format!(
                "SELECT user_id, dims, COUNT(*) FROM events \
                 WHERE ts >= ?1 AND ts < ?2 AND user_id IS NOT NULL \
                 GROUP BY user_id, dims ORDER BY COUNT(*) DESC, user_id LIMIT {limit}"
            ),
            &[start_ms.into(), end_ms.into()],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let mut it = r.into_iter();
                UsageRow {
                    user: it.next().expect("3 columns").into_text(),
                    dims: Dims::decode(it.next().expect("3 columns").text()).unwrap_or_default(),
                    events: it.next().expect("3 columns").int(),
                }
            })
            .collect())
    }

    /// Delete every stored event of `user`; how many there were.
    pub fn delete_user(&mut self, user: &str) -> Result<u64, DbError> {
        self.transaction(|s| {
            s.db.exec("DELETE FROM events WHERE user_id = ?1", &[user.into()])
        })
    }
}
