//! Claiming a sink's next batch (stable ids), and confirming or failing it.

use super::*;

impl Outbox {
    /// Hand the next batch to `sink` (see the module header for the order).
    pub fn next_batch(
        &mut self,
        sink: &str,
        max_records: usize,
    ) -> Result<Option<Batch>, OutboxError> {
        let e = sql_err(&self.path, "claiming a batch");
        let tx = self.conn.transaction().map_err(&e)?;
        let (kinds, cursor, next_seq) = sink_row(&tx, sink)
            .map_err(&e)?
            .ok_or_else(|| OutboxError::UnknownSink { name: sink.into() })?;

        // 1. A dead letter an operator asked to retry.
        let retry: Option<(i64, i64)> = tx
            .query_row(
                "SELECT id, seq FROM dead_letters WHERE sink = ?1 AND state = 'retry' ORDER BY id LIMIT 1",
                [sink],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(&e)?;
        if let Some((dead_id, seq)) = retry {
            // A dead letter keeps one row per record (`n` = 1).
            let records = load_records(
                &tx,
                "SELECT id, kind, ts, name, dims, value, unit, payload, 1 FROM dead_records
                 WHERE dead_id = ?1 AND id NOT IN (SELECT id FROM accepted WHERE sink = ?2 AND seq = ?3)
                 ORDER BY id",
                params![dead_id, sink, seq],
                &Span::all(),
            )
            .map_err(&e)?;
            let accepted_before = accepted_count(&tx, sink, seq).map_err(&e)?;
            tx.execute(
                "UPDATE dead_letters SET attempts = attempts + 1, updated = ?2 WHERE id = ?1",
                params![dead_id, now_ms()],
            )
            .map_err(&e)?;
            tx.commit().map_err(&e)?;
            return Ok(Some(Batch {
                sink: sink.into(),
                seq,
                outbox_id: self.id.clone(),
                origin: Origin::DeadLetter(dead_id),
                redelivered: true,
                records,
                accepted_before,
            }));
        }

        // 2. The open batch, again.
        let open: Option<(i64, i64, i64, i64)> = tx
            .query_row(
                "SELECT seq, first_id, last_id, attempts FROM batches WHERE sink = ?1",
                [sink],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(&e)?;
        let mut freed = 0;
        if let Some((seq, first, last, attempts)) = open {
            // The rows that hold a record of the batch: a row's id is its
            // last record's, and it holds at most BUNDLE_MAX.
            let span = Span {
                after: first - 1,
                until: last,
                max: usize::MAX,
                skip: accepted_ids(&tx, sink, seq).map_err(&e)?,
            };
            let records = load_records(
                &tx,
                "SELECT id, kind, ts, name, dims, value, unit, payload, n FROM records
                 WHERE id BETWEEN ?1 AND ?2 + ?3 AND id - n < ?2 AND ((1 << kind) & ?4) != 0
                 ORDER BY id",
                params![first, last, BUNDLE_MAX as i64, kinds.bits()],
                &span,
            )
            .map_err(&e)?;
            let accepted_before = accepted_count(&tx, sink, seq).map_err(&e)?;
            if !records.is_empty() {
                tx.execute(
                    "UPDATE batches SET attempts = attempts + 1 WHERE sink = ?1 AND seq = ?2",
                    params![sink, seq],
                )
                .map_err(&e)?;
                tx.commit().map_err(&e)?;
                return Ok(Some(Batch {
                    sink: sink.into(),
                    seq,
                    outbox_id: self.id.clone(),
                    origin: Origin::Pending,
                    redelivered: attempts > 0,
                    records,
                    accepted_before,
                }));
            }
            // Everything in it was accepted already, or dropped for space.
            freed += advance(&tx, sink, seq, last, accepted_before).map_err(&e)?;
        }

        // 3. A new batch after the cursor.
        let cursor = cursor.max(open.map_or(0, |o| o.2));
        // Rows are read one at a time until the batch is full; the cursor
        // may be inside a row (a batch that ended in the middle of one).
        let span = Span {
            after: cursor,
            until: i64::MAX,
            max: max_records,
            skip: Default::default(),
        };
        let records = load_records(
            &tx,
            "SELECT id, kind, ts, name, dims, value, unit, payload, n FROM records
             WHERE id > ?1 AND ((1 << kind) & ?2) != 0 ORDER BY id",
            params![cursor, kinds.bits()],
            &span,
        )
        .map_err(&e)?;
        let Some(&(last_id, _)) = records.last() else {
            // Nothing wanted: pass over what is there so it can be deleted.
            let top: i64 = tx
                .query_row("SELECT COALESCE(MAX(id), 0) FROM records", [], |r| r.get(0))
                .map_err(&e)?;
            if top > cursor {
                tx.execute(
                    "UPDATE sinks SET cursor = ?2 WHERE name = ?1",
                    params![sink, top],
                )
                .map_err(&e)?;
                freed += collect_garbage(&tx).map_err(&e)?;
            }
            tx.commit().map_err(&e)?;
            self.bytes -= freed;
            return Ok(None);
        };
        // The batch covers everything between the cursor and its last record,
        // including records of kinds this sink skips.
        tx.execute(
            "INSERT INTO batches (sink, seq, first_id, last_id, attempts, created)
             VALUES (?1, ?2, ?3, ?4, 1, ?5)",
            params![sink, next_seq, cursor + 1, last_id, now_ms()],
        )
        .map_err(&e)?;
        tx.execute(
            "UPDATE sinks SET next_seq = ?2 WHERE name = ?1",
            params![sink, next_seq + 1],
        )
        .map_err(&e)?;
        tx.commit().map_err(&e)?;
        self.bytes -= freed;
        Ok(Some(Batch {
            sink: sink.into(),
            seq: next_seq,
            outbox_id: self.id.clone(),
            origin: Origin::Pending,
            redelivered: false,
            records,
            accepted_before: 0,
        }))
    }

    /// The receiver accepted these records of batch `seq` (one request of
    /// several): kept in the transaction that records the answer, so that
    /// no later attempt, after a restart or from a dead letter, sends them
    /// again, and a dead letter holds only the rest.
    pub fn accept(&mut self, sink: &str, seq: i64, ids: &[i64]) -> Result<(), OutboxError> {
        self.write("recording accepted records", |tx| {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO accepted (sink, seq, id) VALUES (?1, ?2, ?3)",
            )?;
            for id in ids {
                st.execute(params![sink, seq, id])?;
            }
            Ok(())
        })
    }

    /// The sink confirmed `batch`.
    pub fn ack(&mut self, batch: &Batch) -> Result<(), OutboxError> {
        let n = batch.records.len() as i64 + batch.accepted_before;
        let (freed, dead_freed) = self.write("confirming a batch", |tx| {
            forget_accepted(tx, batch)?;
            match batch.origin {
                // No row: already confirmed (a duplicate ack), nothing to do.
                Origin::Pending => match open_batch_end(tx, batch)? {
                    Some(last) => Ok((advance(tx, &batch.sink, batch.seq, last, n)?, 0)),
                    None => Ok((0, 0)),
                },
                Origin::DeadLetter(id) => {
                    let dead_freed = delete_dead(tx, id)?;
                    tx.execute(
                        "UPDATE sinks SET delivered_records = delivered_records + ?2,
                         delivered_batches = delivered_batches + 1, last_delivery = ?3, last_error = NULL
                         WHERE name = ?1",
                        params![batch.sink, n, now_ms()],
                    )?;
                    Ok((0, dead_freed))
                }
            }
        })?;
        self.bytes -= freed;
        self.dead_bytes -= dead_freed;
        Ok(())
    }

    /// The sink took `batch` except `rejected` (record id, why): confirm the
    /// batch and keep those records as one dead letter, in one transaction.
    pub fn ack_with_rejects(
        &mut self,
        batch: &Batch,
        rejected: &[(i64, String)],
    ) -> Result<(), OutboxError> {
        if rejected.is_empty() || batch.origin != Origin::Pending {
            return self.ack(batch);
        }
        let now = now_ms();
        let (dead_before, budget) = (self.dead_bytes, self.max_bytes / 4);
        let ids: std::collections::HashSet<i64> = rejected.iter().map(|(id, _)| *id).collect();
        let kept: Vec<&(i64, Record)> = batch
            .records
            .iter()
            .filter(|(id, _)| ids.contains(id))
            .collect();
        let bytes: i64 = kept
            .iter()
            .map(|(_, r)| r.charged_bytes(r.dims.encoded()))
            .sum();
        // One entry per distinct reason, with how many records it covers.
        let mut reasons: Vec<(String, usize)> = Vec::new();
        for (_, why) in rejected {
            match reasons.iter_mut().find(|(w, _)| w == why) {
                Some((_, n)) => *n += 1,
                None => reasons.push((why.clone(), 1)),
            }
        }
        let error = reasons
            .iter()
            .map(|(w, n)| format!("{n} record(s): {w}"))
            .collect::<Vec<_>>()
            .join("; ");
        let done = self.write("confirming a batch with rejected records", |tx| {
            let Some(last) = open_batch_end(tx, batch)? else {
                // Already settled (a duplicate answer): nothing to do.
                return Ok(None);
            };
            forget_accepted(tx, batch)?;
            tx.execute(
                "INSERT INTO dead_letters (sink, seq, count, bytes, error, state, attempts, created, updated)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'dead', 1, ?6, ?6)",
                params![batch.sink, batch.seq, kept.len() as i64, bytes, error, now],
            )?;
            let dead_id = tx.last_insert_rowid();
            insert_dead_records(tx, dead_id, kept.iter().map(|(id, r)| (*id, r)))?;
            let delivered = (batch.records.len() - kept.len()) as i64 + batch.accepted_before;
            let freed = advance(tx, &batch.sink, batch.seq, last, delivered)?;
            let evicted = evict_dead(tx, dead_before + bytes - budget)?;
            Ok(Some((freed, evicted)))
        })?;
        if let Some((freed, evicted)) = done {
            self.bytes -= freed;
            self.dead_bytes += bytes - evicted;
        }
        Ok(())
    }

    /// A delivery attempt failed and will be retried: remember it for status.
    pub fn note_failure(&mut self, sink: &str, error: &str) -> Result<(), OutboxError> {
        self.conn
            .execute(
                "UPDATE sinks SET failures = failures + 1, last_failure = ?2, last_error = ?3 WHERE name = ?1",
                params![sink, now_ms(), error],
            )
            .map_err(sql_err(&self.path, "noting a failed delivery"))?;
        Ok(())
    }

    /// What a sink last read of its receiver's clock (the receiver's less
    /// ours, ms; [`crate::clock::peer_offset`]), kept for `status` with
    /// when it was read.
    pub fn note_peer_clock(&mut self, sink: &str, offset_ms: i64) -> Result<(), OutboxError> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![peer_clock_key(sink), format!("{offset_ms} {}", now_ms())],
            )
            .map_err(sql_err(&self.path, "noting the receiver's clock"))?;
        Ok(())
    }

    /// Add to a sink's own counters (`requests`, `bytes_sent`, ...).
    pub fn bump(&mut self, sink: &str, deltas: &[(&str, i64)]) -> Result<(), OutboxError> {
        self.write("counting", |tx| {
            for (key, n) in deltas.iter().filter(|(_, n)| *n != 0) {
                tx.execute(
                    "INSERT INTO counters (sink, key, value) VALUES (?1, ?2, ?3)
                     ON CONFLICT (sink, key) DO UPDATE SET value = value + excluded.value",
                    params![sink, key, n],
                )?;
            }
            Ok(())
        })
    }

    /// Count records given up on before they reached the outbox.
    /// Count records a sink let go of without sending (the receiver could
    /// never take them), under the sink's drops.
    pub fn count_skipped(&mut self, sink: &str, why: &str, n: i64) -> Result<(), OutboxError> {
        count_drop(&self.conn, why, sink, n)
            .map_err(sql_err(&self.path, "counting skipped records"))
    }

    pub fn count_drops(&mut self, why: &str, n: i64) -> Result<(), OutboxError> {
        count_drop(&self.conn, why, NO_SINK, n).map_err(sql_err(&self.path, "counting drops"))
    }
}

/// The `meta` key of a sink's last reading of its receiver's clock.
pub(super) fn peer_clock_key(sink: &str) -> String {
    format!("peer_clock:{sink}")
}

/// The last record id of `batch` if it is still open (not yet settled).
fn accepted_count(tx: &Transaction, sink: &str, seq: i64) -> rusqlite::Result<i64> {
    tx.query_row(
        "SELECT COUNT(*) FROM accepted WHERE sink = ?1 AND seq = ?2",
        params![sink, seq],
        |r| r.get(0),
    )
}

/// The ids of batch `seq` of `sink` the receiver accepted (in this attempt
/// or before).
pub(super) fn accepted_ids(
    tx: &Transaction,
    sink: &str,
    seq: i64,
) -> rusqlite::Result<std::collections::HashSet<i64>> {
    tx.prepare_cached("SELECT id FROM accepted WHERE sink = ?1 AND seq = ?2")?
        .query_map(params![sink, seq], |r| r.get(0))?
        .collect()
}

/// The batch is settled: what was accepted of it no longer matters.
pub(super) fn forget_accepted(tx: &Transaction, batch: &Batch) -> rusqlite::Result<usize> {
    tx.execute(
        "DELETE FROM accepted WHERE sink = ?1 AND seq = ?2",
        params![batch.sink, batch.seq],
    )
}

pub(super) fn open_batch_end(tx: &Transaction, batch: &Batch) -> rusqlite::Result<Option<i64>> {
    tx.query_row(
        "SELECT last_id FROM batches WHERE sink = ?1 AND seq = ?2",
        params![batch.sink, batch.seq],
        |r| r.get(0),
    )
    .optional()
}

pub(super) fn sink_row(
    tx: &Transaction,
    sink: &str,
) -> rusqlite::Result<Option<(KindSet, i64, i64)>> {
    tx.query_row(
        "SELECT kinds, cursor, next_seq FROM sinks WHERE name = ?1",
        [sink],
        |r| Ok((KindSet::from_bits(r.get(0)?), r.get(1)?, r.get(2)?)),
    )
    .optional()
}

/// Which records of the rows read [`load_records`] keeps: ids in
/// `after + 1 ..= until` and not in `skip`, the first `max` of them.
pub(super) struct Span {
    pub after: i64,
    pub until: i64,
    pub max: usize,
    pub skip: std::collections::HashSet<i64>,
}

impl Span {
    fn all() -> Span {
        Span {
            after: i64::MIN,
            until: i64::MAX,
            max: usize::MAX,
            skip: Default::default(),
        }
    }
}

/// The records of the rows `sql` selects (`id, kind, ts, name, dims,
/// value, unit, payload, n`, in id order) that `span` keeps. A row of
/// several records is unpacked (see the module header's "Rows").
pub(super) fn load_records(
    tx: &Transaction,
    sql: &str,
    args: impl rusqlite::Params,
    span: &Span,
) -> rusqlite::Result<Vec<(i64, Record)>> {
    let mut st = tx.prepare_cached(sql)?;
    let mut rows = st.query(args)?;
    let mut out = Vec::new();
    while out.len() < span.max {
        let Some(r) = rows.next()? else { break };
        let (last, n): (i64, i64) = (r.get(0)?, r.get(8)?);
        let kind_code: i64 = r.get(1)?;
        let dims: String = r.get(4)?;
        let record = Record {
            // Written only by `append`; an unknown code means the row was
            // tampered with, and it is still better delivered as a point.
            kind: Kind::from_code(kind_code).unwrap_or(Kind::Point),
            ts_ms: r.get(2)?,
            name: r.get(3)?,
            dims: Dims::decode(&dims).unwrap_or_default(),
            value: r.get(5)?,
            unit: r.get(6)?,
            payload: Vec::new(),
        };
        let payload = r.get_ref(7)?.as_blob_or_null()?.unwrap_or_default();
        let keep = |id: i64| id > span.after && id <= span.until && !span.skip.contains(&id);
        if n <= 1 {
            if keep(last) {
                let payload = payload.to_vec();
                out.push((last, Record { payload, ..record }));
            }
            continue;
        }
        let events = unpack(payload)
            .filter(|events| events.len() as i64 == n)
            .ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    7,
                    rusqlite::types::Type::Blob,
                    format!("row {last}: its payload is not {n} packed records").into(),
                )
            })?;
        for ((ts_ms, payload), id) in events.into_iter().zip(last - n + 1..) {
            if out.len() < span.max && keep(id) {
                out.push((
                    id,
                    Record {
                        ts_ms,
                        payload: payload.to_vec(),
                        ..record.clone()
                    },
                ));
            }
        }
    }
    Ok(out)
}

/// The (time, payload) of each event packed in a row, or None if the bytes
/// are not a packing (see the module header's "Rows").
pub(super) fn unpack(mut packed: &[u8]) -> Option<Vec<(i64, &[u8])>> {
    let mut events = Vec::new();
    while !packed.is_empty() {
        let (header, rest) = packed.split_at_checked(PACKED_HEADER)?;
        let ts = i64::from_le_bytes(header[..8].try_into().ok()?);
        let len = u32::from_le_bytes(header[8..].try_into().ok()?) as usize;
        let (payload, rest) = rest.split_at_checked(len)?;
        events.push((ts, payload));
        packed = rest;
    }
    Some(events)
}

/// Move `sink`'s cursor past batch `seq` (ending at `last`), count `n`
/// records as delivered (0 for a dead letter or an empty batch), and delete
/// what every sink has passed. Returns the bytes freed.
pub(super) fn advance(
    tx: &Transaction,
    sink: &str,
    seq: i64,
    last: i64,
    n: i64,
) -> rusqlite::Result<i64> {
    tx.execute(
        "DELETE FROM batches WHERE sink = ?1 AND seq = ?2",
        params![sink, seq],
    )?;
    if n > 0 {
        tx.execute(
            "UPDATE sinks SET cursor = MAX(cursor, ?2), delivered_records = delivered_records + ?3,
             delivered_batches = delivered_batches + 1, last_delivery = ?4, last_error = NULL
             WHERE name = ?1",
            params![sink, last, n, now_ms()],
        )?;
    } else {
        tx.execute(
            "UPDATE sinks SET cursor = MAX(cursor, ?2) WHERE name = ?1",
            params![sink, last],
        )?;
    }
    collect_garbage(tx)
}
