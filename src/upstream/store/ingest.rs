//! Exactly-once ingest: a batch's key, then its points, sketches and events, and the windows it touches queued for forwarding.

use super::*;

impl Store {
    /// Store batches in one transaction (a group commit): one answer per
    /// batch, in the order given. An error means none was stored.
    pub fn ingest(
        &mut self,
        batches: &[&wire::Batch],
        now_ms: i64,
    ) -> Result<Vec<Ingested>, DbError> {
        let mut order: Vec<usize> = (0..batches.len()).collect();
        order.sort_by(|&a, &b| {
            let key = |b: &wire::Batch| (b.agent_id.clone(), b.outbox_id.clone(), b.seq);
            key(batches[a]).cmp(&key(batches[b]))
        });
        let result = self.transaction(|s| {
            let series = s.series_of(batches)?;
            let mut out = vec![None; batches.len()];
            for i in order {
                out[i] = Some(s.ingest_one(batches[i], &series[i], now_ms)?);
            }
            Ok(out
                .into_iter()
                .map(|o| o.expect("every batch answered"))
                .collect())
        });
        let fresh = std::mem::take(&mut self.pending_uncommitted);
        let new_series = std::mem::take(&mut self.series_uncommitted);
        if result.is_ok() {
            self.remember_series(new_series);
            self.pending_seen.extend(fresh);
            if self.pending_seen.len() > PENDING_SEEN_MAX {
                let unsettled_after = now_ms - self.settle_ms - CLOCK_MARGIN_MS;
                self.pending_seen.retain(|g| g.ts > unsettled_after);
            }
            if self.pending_seen.len() > PENDING_SEEN_MAX {
                // Only costs a redundant (no-op) insert per group later.
                self.pending_seen.clear();
            }
        }
        result
    }

    /// `series`: the series id of each of `b`'s points, in record order.
    fn ingest_one(
        &mut self,
        b: &wire::Batch,
        series: &[i64],
        now_ms: i64,
    ) -> Result<Ingested, DbError> {
        let inserted = self.db.exec(
            SQL_INSERT_BATCH,
            &[
                b.agent_id.as_str().into(),
                b.outbox_id.as_str().into(),
                b.seq.into(),
                now_ms.into(),
                (b.records.len() as i64).into(),
            ],
        )?;
        if inserted == 0 {
            return Ok(Ingested {
                new: false,
                records: b.records.len(),
                late: 0,
                expired: 0,
            });
        }
        let agent = Val::from(b.agent_id.as_str());
        // Groups this batch touches, and how many of its records each has
        // (only kept when something forwards).
        let mut groups: BTreeMap<Group, usize> = BTreeMap::new();
        // Each distinct dims' network dims, by their text: a batch carries
        // a few dims on many records.
        let mut nets: foldhash::HashMap<&str, String> = foldhash::HashMap::default();
        for r in &b.records {
            if matches!(r.kind, Kind::Point | Kind::Sketch) {
                nets.entry(r.dims.encoded())
                    .or_insert_with(|| self.net_dims(&r.dims).encode());
            }
        }
        let mut point_rows: Vec<Val<'_>> =
            Vec::with_capacity(POINT_COLUMNS * POINT_ROWS_PER_INSERT);
        let mut series = series.iter();
        // Older than the retention: a window that may be deleted already
        // (see `retention.rs`), so taking it in could forward it again.
        let keep_from = self.keep_from(now_ms);
        let mut expired = 0;
        for r in &b.records {
            if r.ts_ms < keep_from && r.kind != Kind::Line {
                expired += 1;
                if r.kind == Kind::Point {
                    series.next().expect("an id for each point");
                }
                continue;
            }
            match r.kind {
                Kind::Point | Kind::Sketch => {
                    let dims = r.dims.encoded();
                    let net = &nets[dims];
                    if r.kind == Kind::Point {
                        let id = *series.next().expect("an id for each point");
                        point_rows.extend([
                            id.into(),
                            r.name.as_ref().into(),
                            r.ts_ms.into(),
                            r.value.into(),
                        ]);
                        if point_rows.len() == POINT_COLUMNS * POINT_ROWS_PER_INSERT {
                            self.insert_points(&point_rows)?;
                            point_rows.clear();
                        }
                    } else {
                        self.db.exec(
                            SQL_INSERT_SKETCH,
                            &[
                                r.name.as_ref().into(),
                                net.as_str().into(),
                                r.ts_ms.into(),
                                agent.clone(),
                                dims.into(),
                                r.unit.as_ref().into(),
                                r.value.into(),
                                Val::Blob(std::borrow::Cow::Borrowed(&r.payload)),
                            ],
                        )?;
                        self.db.exec(
                            SQL_COUNT_UNION,
                            &[
                                r.name.as_ref().into(),
                                net.as_str().into(),
                                r.ts_ms.into(),
                                r.value.into(),
                                r.unit.as_ref().into(),
                            ],
                        )?;
                        self.db.exec(
                            SQL_COUNT_EDGE_DAY,
                            &[
                                r.name.as_ref().into(),
                                net.as_str().into(),
                                agent.clone(),
                                r.ts_ms.div_euclid(DAY_MS).saturating_mul(DAY_MS).into(),
                                r.value.into(),
                                r.ts_ms.into(),
                            ],
                        )?;
                    }
                    if self.forwards {
                        *groups
                            .entry(Group {
                                metric: r.name.to_string(),
                                net: net.clone(),
                                ts: r.ts_ms,
                            })
                            .or_default() += 1;
                    }
                }
                Kind::Event => {
                    let payload = String::from_utf8_lossy(&r.payload);
                    let user = event_user(&payload).map_or(Val::Null, Val::from);
                    self.db.exec(
                        SQL_INSERT_EVENT,
                        &[
                            r.ts_ms.into(),
                            r.name.as_ref().into(),
                            user,
                            agent.clone(),
                            r.dims.encoded().into(),
                            Val::Text(payload),
                        ],
                    )?;
                }
                Kind::Line => {}
            }
        }
        if !point_rows.is_empty() {
            self.insert_points(&point_rows)?;
        }
        let unsettled_after = now_ms - self.settle_ms - CLOCK_MARGIN_MS;
        let mut queue: Vec<(Group, usize)> = groups
            .into_iter()
            .filter(|(g, _)| g.ts <= unsettled_after || !self.pending_seen.contains(g))
            .collect();
        // Only a settled group can have been forwarded already.
        let settled: Vec<&Group> = queue
            .iter()
            .map(|(g, _)| g)
            .filter(|g| g.ts <= unsettled_after)
            .collect();
        let forwarded = self.forwarded_among(&settled)?;
        let mut late = 0;
        queue.retain(|(g, n)| {
            let sent = forwarded.contains(g);
            late += if sent { *n } else { 0 };
            !sent
        });
        let queued: Vec<&Group> = queue.iter().map(|(g, _)| g).collect();
        self.queue_pending(&queued)?;
        self.pending_uncommitted.extend(
            queue
                .into_iter()
                .map(|(g, _)| g)
                .filter(|g| g.ts > unsettled_after),
        );
        Ok(Ingested {
            new: true,
            records: b.records.len() - expired,
            late,
            expired,
        })
    }

    /// The series id of every point of `batches`, in record order. Series
    /// not in memory are inserted or looked up first, in key order: two
    /// replicas' transactions then take their locks in `series` in the
    /// same order (as they do in `batches`) and cannot deadlock.
    fn series_of(&mut self, batches: &[&wire::Batch]) -> Result<Vec<Vec<i64>>, DbError> {
        let mut ids: Vec<Vec<i64>> = Vec::with_capacity(batches.len());
        /// A series not in memory: its agent, one of its points, and where
        /// its id goes (batch, point).
        struct Unknown<'a> {
            agent: &'a str,
            point: &'a Record,
            places: Vec<(usize, usize)>,
        }
        let mut unknown: BTreeMap<String, Unknown> = BTreeMap::new();
        let mut key = std::mem::take(&mut self.series_key);
        for (i, b) in batches.iter().enumerate() {
            let mut these = Vec::with_capacity(b.records.len());
            for r in b.records.iter().filter(|r| r.kind == Kind::Point) {
                let (agent, metric) = (b.agent_id.as_str(), r.name.as_ref());
                series_key(&mut key, agent, metric, r.dims.encoded(), &r.unit);
                match self.series_ids.get(key.as_str()) {
                    Some(&id) => these.push(id),
                    None => {
                        let at = (i, these.len());
                        these.push(0);
                        match unknown.get_mut(key.as_str()) {
                            Some(u) => u.places.push(at),
                            None => {
                                let places = vec![at];
                                unknown.insert(
                                    key.clone(),
                                    Unknown {
                                        agent,
                                        point: r,
                                        places,
                                    },
                                );
                            }
                        }
                    }
                }
            }
            ids.push(these);
        }
        self.series_key = key;
        for (
            key,
            Unknown {
                agent,
                point: r,
                places,
            },
        ) in unknown
        {
            let net = self.net_dims(&r.dims).encode();
            let (metric, dims, unit) = (r.name.as_ref(), r.dims.encoded(), r.unit.as_ref());
            let named = [
                metric.into(),
                net.as_str().into(),
                agent.into(),
                dims.into(),
                unit.into(),
            ];
            self.db.exec(SQL_INSERT_SERIES, &named)?;
            let id = self
                .db
                .query(SQL_SERIES_ID, &named)?
                .first()
                .map(|row| row[0].int())
                .ok_or_else(|| DbError::Statement {
                    target: format!("the {} store", self.db.kind()),
                    error: format!("series {metric} {dims} of {agent} not found after its insert"),
                })?;
            for (b, p) in places {
                ids[b][p] = id;
            }
            self.series_uncommitted.insert(key.into_boxed_str(), id);
        }
        Ok(ids)
    }

    /// Keep the ids of series a transaction committed, within the bound.
    fn remember_series(&mut self, new: foldhash::HashMap<Box<str>, i64>) {
        for (key, id) in new {
            self.series_bytes += key.len() + SERIES_ENTRY_BYTES;
            self.series_ids.insert(key, id);
        }
        if self.series_bytes > SERIES_IDS_MAX_BYTES {
            self.series_ids = Default::default();
            self.series_bytes = 0;
        }
    }

    /// Which of `groups` were forwarded already: a few statements, not one
    /// per group (with PostgreSQL each is a round trip, and a batch of old
    /// points touches a thousand groups).
    fn forwarded_among(&mut self, groups: &[&Group]) -> Result<HashSet<Group>, DbError> {
        let mut out = HashSet::new();
        for chunk in groups.chunks(GROUPS_PER_STATEMENT) {
            let (sql, params) = FORWARDED_AMONG.bind(Vec::new(), chunk);
            for row in self.db.query(&sql, &params)? {
                out.insert(group_of(row));
            }
        }
        Ok(out)
    }

    /// Queue `groups` for forwarding, a few statements for all.
    fn queue_pending(&mut self, groups: &[&Group]) -> Result<(), DbError> {
        for chunk in groups.chunks(GROUPS_PER_STATEMENT) {
            let (sql, params) = QUEUE_PENDING.bind(Vec::new(), chunk);
            self.db.exec(&sql, &params)?;
        }
        Ok(())
    }

    /// Insert whole rows of [`POINT_COLUMNS`] values with one statement.
    fn insert_points(&mut self, values: &[Val<'_>]) -> Result<(), DbError> {
        let rows = values.len() / POINT_COLUMNS;
        if self.point_sql.len() < rows {
            self.point_sql = (1..=POINT_ROWS_PER_INSERT).map(insert_points_sql).collect();
        }
        let sql = std::mem::take(&mut self.point_sql[rows - 1]);
        let result = self.db.exec(&sql, values);
        self.point_sql[rows - 1] = sql;
        result.map(drop)
    }
}
