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
                    "SELECT p.ts, s.dims, p.value, s.unit, s.agent \
                     FROM points p JOIN series s ON s.id = p.series \
                     WHERE p.metric = ?1 AND p.ts >= ?2 AND p.ts < ?3 \
                     ORDER BY p.ts, s.agent, s.dims",
                    range.to_vec(),
                )
            } else {
                let mut p = range.to_vec();
                p.push(agent.as_str().into());
                (
                    "SELECT p.ts, s.dims, p.value, s.unit, s.agent \
                     FROM points p JOIN series s ON s.id = p.series \
                     WHERE p.metric = ?1 AND p.ts >= ?2 AND p.ts < ?3 AND s.agent = ?4 \
                     ORDER BY p.ts, s.dims",
                    p,
                )
            };
            for r in self.db.query(sql, &params)? {
                let dims = Dims::decode(r[1].text()).unwrap_or_default();
                if !keep(&dims) {
                    continue;
                }
                let [ts, _, value, unit, agent] = columns(r);
                rows.push(SeriesRow {
                    ts: ts.int(),
                    dims,
                    value: value.real(),
                    unit: unit.into_text(),
                    agents: 1,
                    how: How::Agent(agent.into_text()),
                });
                if rows.len() >= q.limit {
                    break;
                }
            }
            return Ok(rows);
        }
        // Unions first: a group with sketches is a distinct count. Each
        // window's union is cached in `unions`, valid while it merged as
        // many sketches as the window has (ingest counts them).
        let mut all: BTreeMap<(i64, String), SeriesRow> = BTreeMap::new();
        let cached = self.db.query(
            "SELECT net, ts, sketches, merged, estimate, agents, unit FROM unions \
             WHERE metric = ?1 AND ts >= ?2 AND ts < ?3",
            &range,
        )?;
        let any_sketch = !cached.is_empty();
        for r in cached {
            let [net, ts, sketches, merged, estimate, agents, unit] = columns(r);
            let (net, ts, sketches) = (net.into_text(), ts.int(), sketches.int());
            let (mut estimate, mut agents, mut unit) =
                (estimate.real(), agents.int(), unit.into_text());
            let dims = Dims::decode(&net).unwrap_or_default();
            if !keep(&dims) {
                continue;
            }
            if merged.int() != sketches {
                (estimate, agents, unit) = self.union_of(&q.metric, &net, ts, sketches)?;
            }
            all.insert(
                (ts, net),
                SeriesRow {
                    ts,
                    dims,
                    value: estimate,
                    unit,
                    agents,
                    how: How::Union,
                },
            );
        }
        if any_sketch {
            // A distinct count: its points are the edges' own estimates,
            // already in `summed`; there is nothing to add up.
            return Ok(all.into_values().take(q.limit).collect());
        }
        let sums = self.db.query(
            "SELECT p.ts, s.net, SUM(p.value), COUNT(DISTINCT s.agent), MIN(s.unit) \
             FROM points p JOIN series s ON s.id = p.series \
             WHERE p.metric = ?1 AND p.ts >= ?2 AND p.ts < ?3 GROUP BY p.ts, s.net",
            &range,
        )?;
        for r in sums {
            let [ts, net, value, agents, unit] = columns(r);
            let (ts, net) = (ts.int(), net.into_text());
            all.entry((ts, net.clone())).or_insert_with(|| SeriesRow {
                ts,
                dims: Dims::decode(&net).unwrap_or_default(),
                value: value.real(),
                unit: unit.into_text(),
                agents: agents.int(),
                how: How::Sum,
            });
        }
        Ok(all
            .into_values()
            .filter(|r| keep(&r.dims))
            .take(q.limit)
            .collect())
    }

    /// The union of one window's sketches: (estimate, agents, unit), and
    /// the cache updated unless the window gained a sketch meanwhile (or
    /// the store is read-only: then it is only computed).
    fn union_of(
        &mut self,
        metric: &str,
        net: &str,
        ts: i64,
        counted: i64,
    ) -> Result<(f64, i64, String), DbError> {
        let rows = self.db.query(
            "SELECT agent, unit, sketch FROM sketches WHERE metric = ?1 AND ts = ?2 AND net = ?3",
            &[metric.into(), ts.into(), net.into()],
        )?;
        let merged = rows.len() as i64;
        let mut sketch = Sketch::default();
        let mut agents = BTreeSet::new();
        let mut unit = String::new();
        for r in rows {
            let [agent, its_unit, encoded] = columns(r);
            unit = its_unit.into_text();
            // Stored sketches were checked at ingest; one that no longer
            // decodes (a newer edgemeter's, read by an older) is skipped.
            if sketch.merge_encoded(&encoded.into_blob()).is_ok() {
                agents.insert(agent.into_text());
            }
        }
        let estimate = sketch.estimate();
        if merged == counted {
            let _ = self.db.exec(
                "UPDATE unions SET merged = ?1, estimate = ?2, agents = ?3, unit = ?4 \
                 WHERE metric = ?5 AND net = ?6 AND ts = ?7 AND sketches = ?1",
                &[
                    merged.into(),
                    estimate.into(),
                    (agents.len() as i64).into(),
                    unit.as_str().into(),
                    metric.into(),
                    net.into(),
                    ts.into(),
                ],
            );
        }
        Ok((estimate, agents.len() as i64, unit))
    }

    /// Per window and network dims, the sum of the edges' own estimates of
    /// a distinct count (the dashboard's naive sum): (net, ts) → sum.
    pub fn naive_sums(
        &mut self,
        metric: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<BTreeMap<(String, i64), f64>, DbError> {
        let rows = self.db.query(
            "SELECT net, ts, summed FROM unions WHERE metric = ?1 AND ts >= ?2 AND ts < ?3",
            &[metric.into(), start_ms.into(), end_ms.into()],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let [net, ts, summed] = columns(r);
                ((net.into_text(), ts.int()), summed.real())
            })
            .collect())
    }

    /// Each edge's peak, windows and latest value of a distinct count in
    /// `[start, end)`: whole days from `edge_days`, the partial days at
    /// either end from the sketches themselves.
    pub fn edge_summaries(
        &mut self,
        metric: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<EdgeSummary>, DbError> {
        let first_day = start_ms.div_euclid(DAY_MS) * DAY_MS;
        let first_full = if first_day == start_ms {
            start_ms
        } else {
            first_day + DAY_MS
        };
        let last_full = end_ms.div_euclid(DAY_MS) * DAY_MS;
        let mut by: BTreeMap<(String, String), EdgeSummary> = BTreeMap::new();
        let mut add = |agent: String, net: String, peak: f64, windows: i64, ts: i64, v: f64| {
            let e = by
                .entry((agent.clone(), net.clone()))
                .or_insert(EdgeSummary {
                    agent,
                    net: Dims::decode(&net).unwrap_or_default(),
                    peak,
                    windows: 0,
                    last_ts: ts,
                    last_value: v,
                });
            e.peak = e.peak.max(peak);
            e.windows += windows;
            if ts >= e.last_ts {
                e.last_ts = ts;
                e.last_value = v;
            }
        };
        let mut partial = vec![(start_ms, end_ms)];
        if first_full < last_full {
            let rows = self.db.query(
                "SELECT agent, net, peak, windows, last_ts, last_value FROM edge_days \
                 WHERE metric = ?1 AND day >= ?2 AND day < ?3",
                &[metric.into(), first_full.into(), last_full.into()],
            )?;
            for r in rows {
                let [agent, net, peak, windows, ts, v] = columns(r);
                let (agent, net) = (agent.into_text(), net.into_text());
                add(agent, net, peak.real(), windows.int(), ts.int(), v.real());
            }
            partial = vec![(start_ms, first_full), (last_full, end_ms)];
        }
        for (from, to) in partial.into_iter().filter(|(a, b)| a < b) {
            let rows = self.db.query(
                "SELECT agent, net, ts, estimate FROM sketches WHERE metric = ?1 AND ts >= ?2 AND ts < ?3",
                &[metric.into(), from.into(), to.into()],
            )?;
            for r in rows {
                let [agent, net, ts, v] = columns(r);
                let v = v.real();
                add(agent.into_text(), net.into_text(), v, 1, ts.int(), v);
            }
        }
        Ok(by.into_values().collect())
    }

    /// One edge's own estimates of a distinct count in `[start, end)`, in
    /// time order, with their network dims.
    pub fn edge_estimates(
        &mut self,
        metric: &str,
        agent: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<(i64, Dims, f64)>, DbError> {
        let rows = self.db.query(
            // `+ts`: the time bounds must not steer the planner to the
            // by-time index (a scan of every edge's rows) instead of the
            // by-agent one.
            "SELECT ts, net, estimate FROM sketches \
             WHERE metric = ?1 AND agent = ?2 AND +ts >= ?3 AND +ts < ?4 ORDER BY ts",
            &[metric.into(), agent.into(), start_ms.into(), end_ms.into()],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let [ts, net, estimate] = columns(r);
                let net = Dims::decode(net.text()).unwrap_or_default();
                (ts.int(), net, estimate.real())
            })
            .collect())
    }

    /// Fill `unions` and `edge_days` from the sketches an earlier version
    /// stored without them (once: when `unions` is empty and sketches are
    /// not). How many windows were counted.
    pub fn prepare_caches(&mut self) -> Result<u64, DbError> {
        let has = |s: &mut Store, table: &str| -> Result<bool, DbError> {
            Ok(!s
                .db
                .query(&format!("SELECT 1 FROM {table} LIMIT 1"), &[])?
                .is_empty())
        };
        if has(self, "unions")? || !has(self, "sketches")? {
            return Ok(0);
        }
        self.transaction(|s| {
            let n = s.db.exec(
                "INSERT INTO unions (metric, net, ts, sketches, summed, merged, estimate, agents, unit) \
                 SELECT metric, net, ts, COUNT(*), SUM(estimate), -1, 0, 0, MIN(unit) FROM sketches \
                 WHERE 1 = 1 GROUP BY metric, net, ts ON CONFLICT DO NOTHING",
                &[],
            )?;
            s.db.exec(
                "INSERT INTO edge_days (metric, net, agent, day, peak, windows, last_ts, last_value) \
                 SELECT metric, net, agent, (ts / 86400000) * 86400000, MAX(estimate), COUNT(*), MAX(ts), 0 \
                 FROM sketches WHERE 1 = 1 GROUP BY metric, net, agent, (ts / 86400000) * 86400000 \
                 ON CONFLICT DO NOTHING",
                &[],
            )?;
            s.db.exec(
                "UPDATE edge_days SET last_value = (SELECT MAX(s.estimate) FROM sketches s \
                 WHERE s.metric = edge_days.metric AND s.agent = edge_days.agent \
                 AND s.ts = edge_days.last_ts AND s.net = edge_days.net)",
                &[],
            )?;
            Ok(n)
        })
    }

    /// Each (metric, network dimensions) with a sketch since `since_ms`:
    /// the distinct counts the dashboard offers.
    pub fn sketch_nets(&mut self, since_ms: i64) -> Result<Vec<(String, Dims)>, DbError> {
        let rows = self.db.query(
            "SELECT metric, net FROM unions WHERE ts >= ?1 GROUP BY metric, net ORDER BY metric, net",
            &[since_ms.into()],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let [metric, net] = columns(r);
                let net = Dims::decode(net.text()).unwrap_or_default();
                (metric.into_text(), net)
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
                let [agent, batches, records, last_received] = columns(r);
                EdgeRow {
                    agent: agent.into_text(),
                    batches: batches.int(),
                    records: records.int(),
                    last_received_ms: last_received.int(),
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
                let [ts, etype, user, agent, dims, payload] = columns(r);
                EventRow {
                    ts: ts.int(),
                    etype: etype.into_text(),
                    user: match user {
                        Val::Text(s) => Some(s.into_owned()),
                        _ => None,
                    },
                    agent: agent.into_text(),
                    dims: dims.into_text(),
                    payload: payload.into_text(),
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
                let [user, events, last] = columns(r);
                UserRow {
                    user: user.into_text(),
                    events: events.int(),
                    last_ms: last.int(),
                }
            })
            .collect())
    }

    /// Each agent's latest health points (`agent_*`, see
    /// `sources::AGENT_HEALTH_METRICS`) since `since_ms`: agent → (metric, dims) → (ts, value).
    pub fn agent_health(&mut self, since_ms: i64) -> Result<AgentHealth, DbError> {
        let mut out = AgentHealth::new();
        for metric in crate::sources::AGENT_HEALTH_METRICS {
            let rows = self.db.query(
                "SELECT s.agent, s.dims, p.ts, p.value FROM points p JOIN series s ON s.id = p.series \
                 WHERE p.metric = ?1 AND p.ts >= ?2",
                &[metric.into(), since_ms.into()],
            )?;
            for r in rows {
                let [agent, dims, ts, v] = columns(r);
                let (ts, v) = (ts.int(), v.real());
                let e = out
                    .entry(agent.into_text())
                    .or_default()
                    .entry((metric.to_owned(), dims.into_text()))
                    .or_insert((ts, v));
                if ts >= e.0 {
                    *e = (ts, v);
                }
            }
        }
        Ok(out)
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
                let [user, dims, events] = columns(r);
                UsageRow {
                    user: user.into_text(),
                    dims: Dims::decode(dims.text()).unwrap_or_default(),
                    events: events.int(),
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
