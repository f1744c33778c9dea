//! Dead letters: batches a sink refused for good, kept with their records, listed, retried and purged; their own budget.

use super::*;

impl Outbox {
    /// The sink refused `batch` for good: keep it as a dead letter with `error`.
    pub fn dead_letter(&mut self, batch: &Batch, error: &str) -> Result<(), OutboxError> {
        let now = now_ms();
        let (dead_before, budget) = (self.dead_bytes, self.max_bytes / 4);
        let done = self.write("dead-lettering a batch", |tx| {
            let (mut freed, mut added) = (0, 0);
            // What the receiver accepted of it is delivered, not dead.
            let accepted = accepted_ids(tx, &batch.sink, batch.seq)?;
            forget_accepted(tx, batch)?;
            match batch.origin {
                Origin::DeadLetter(id) => {
                    let mut gone = tx.prepare_cached("DELETE FROM dead_records WHERE dead_id = ?1 AND id = ?2")?;
                    for a in &accepted {
                        gone.execute(params![id, a])?;
                    }
                    tx.execute(
                        "UPDATE dead_letters SET state = 'dead', error = ?2, updated = ?3,
                         count = (SELECT COUNT(*) FROM dead_records WHERE dead_id = ?1) WHERE id = ?1",
                        params![id, error, now],
                    )?;
                }
                Origin::Pending => {
                    let Some(last) = open_batch_end(tx, batch)? else {
                        // Already settled (a duplicate answer): nothing to do.
                        return Ok(None);
                    };
                    let kept: Vec<&(i64, Record)> = batch
                        .records
                        .iter()
                        .filter(|(id, _)| !accepted.contains(id))
                        .collect();
                    added = kept
                        .iter()
                        .map(|(_, r)| r.charged_bytes(r.dims.encoded()))
                        .sum();
                    tx.execute(
                        "INSERT INTO dead_letters (sink, seq, count, bytes, error, state, attempts, created, updated)
                         VALUES (?1, ?2, ?3, ?4, ?5, 'dead', 1, ?6, ?6)",
                        params![batch.sink, batch.seq, kept.len() as i64, added, error, now],
                    )?;
                    let dead_id = tx.last_insert_rowid();
                    insert_dead_records(tx, dead_id, kept.iter().map(|(id, r)| (*id, r)))?;
                    let delivered = (batch.records.len() - kept.len()) as i64 + batch.accepted_before;
                    freed = advance(tx, &batch.sink, batch.seq, last, delivered)?;
                }
            }
            tx.execute(
                "UPDATE sinks SET failures = failures + 1, last_failure = ?2, last_error = ?3 WHERE name = ?1",
                params![batch.sink, now, error],
            )?;
            let evicted = evict_dead(tx, dead_before + added - budget)?;
            Ok(Some((freed, added, evicted)))
        })?;
        // The byte counts change only once the transaction committed.
        if let Some((freed, added, evicted)) = done {
            self.bytes -= freed;
            self.dead_bytes += added - evicted;
        }
        Ok(())
    }

    pub fn dead_letters(&self, sink: Option<&str>) -> Result<Vec<DeadLetter>, OutboxError> {
        let e = sql_err(&self.path, "listing dead letters");
        let mut st = self
            .conn
            .prepare(
                "SELECT id, sink, seq, count, bytes, error, state, attempts, created FROM dead_letters
                 WHERE ?1 IS NULL OR sink = ?1 ORDER BY id",
            )
            .map_err(&e)?;
        st.query_map([sink], |r| {
            Ok(DeadLetter {
                id: r.get(0)?,
                sink: r.get(1)?,
                seq: r.get(2)?,
                count: r.get(3)?,
                bytes: r.get(4)?,
                error: r.get(5)?,
                state: r.get(6)?,
                attempts: r.get(7)?,
                created_ms: r.get(8)?,
            })
        })
        .map_err(&e)?
        .collect::<Result<_, _>>()
        .map_err(&e)
    }

    /// Mark dead letters (all, one sink's, or one by id) for redelivery.
    pub fn retry_dead(
        &mut self,
        sink: Option<&str>,
        id: Option<i64>,
    ) -> Result<usize, OutboxError> {
        self.conn
            .execute(
                "UPDATE dead_letters SET state = 'retry', updated = ?3
                 WHERE state = 'dead' AND (?1 IS NULL OR sink = ?1) AND (?2 IS NULL OR id = ?2)",
                params![sink, id, now_ms()],
            )
            .map_err(sql_err(&self.path, "marking dead letters for retry"))
    }

    /// Delete dead letters (all, one sink's, or one by id).
    pub fn purge_dead(
        &mut self,
        sink: Option<&str>,
        id: Option<i64>,
    ) -> Result<usize, OutboxError> {
        let (count, freed) = self.write("purging dead letters", |tx| {
            let ids: Vec<i64> = tx
                .prepare("SELECT id FROM dead_letters WHERE (?1 IS NULL OR sink = ?1) AND (?2 IS NULL OR id = ?2)")?
                .query_map(params![sink, id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut freed = 0;
            for id in &ids {
                freed += delete_dead(tx, *id)?;
            }
            Ok((ids.len(), freed))
        })?;
        self.dead_bytes -= freed;
        Ok(count)
    }
}

pub(super) fn insert_dead_records<'r>(
    tx: &Transaction,
    dead_id: i64,
    records: impl Iterator<Item = (i64, &'r Record)>,
) -> rusqlite::Result<()> {
    let mut st = tx.prepare_cached(
        "INSERT INTO dead_records (dead_id, id, kind, ts, name, dims, value, unit, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for (id, r) in records {
        st.execute(params![
            dead_id,
            id,
            r.kind as i64,
            r.ts_ms,
            r.name,
            r.dims.encode(),
            r.value,
            r.unit,
            r.payload
        ])?;
    }
    Ok(())
}

pub(super) fn delete_dead(tx: &Transaction, id: i64) -> rusqlite::Result<i64> {
    let bytes: i64 = tx
        .query_row("SELECT bytes FROM dead_letters WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0);
    tx.execute("DELETE FROM dead_records WHERE dead_id = ?1", [id])?;
    tx.execute("DELETE FROM dead_letters WHERE id = ?1", [id])?;
    Ok(bytes)
}

/// Evict the oldest dead letters until `over` bytes are freed, counting
/// their records as dropped. Returns the bytes freed.
pub(super) fn evict_dead(tx: &Transaction, over: i64) -> rusqlite::Result<i64> {
    let mut freed = 0;
    while freed < over {
        let Some((id, sink, count)) = tx
            .query_row(
                "SELECT id, sink, count FROM dead_letters ORDER BY id LIMIT 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .optional()?
        else {
            break;
        };
        count_drop(tx, reason::DEAD_LETTER_EVICTED, &sink, count)?;
        freed += delete_dead(tx, id)?;
    }
    Ok(freed)
}
