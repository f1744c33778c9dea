//! Appending records within the byte budget: the oldest dropped and counted when it is full.

use std::collections::HashMap;
use std::sync::LazyLock;

use super::*;

impl Outbox {
    /// [`Outbox::append`] of as many of `records`, from the first, as the
    /// disk takes: all of them, or on a full disk the longest of their
    /// first half, quarter, eighth, … that fits, and how many that is. A
    /// disk with a little room back then holds what it can, instead of
    /// failing the whole group until there is room for all of it. The
    /// error of the whole when not one fits.
    pub fn append_what_fits(
        &mut self,
        records: &[Record],
    ) -> Result<(usize, Appended), OutboxError> {
        let whole = match self.append(records) {
            Ok(a) => return Ok((records.len(), a)),
            Err(e) if e.is_disk_full() => e,
            Err(e) => return Err(e),
        };
        let mut n = records.len() / 2;
        while n > 0 {
            match self.append(&records[..n]) {
                Ok(a) => return Ok((n, a)),
                Err(e) if e.is_disk_full() => n /= 2,
                Err(e) => return Err(e),
            }
        }
        Err(whole)
    }

    /// Append records in one transaction, dropping the oldest first if the
    /// bound requires it. Each series' events are stored together (the
    /// module header's "Rows"), and their ids follow that order.
    pub fn append(&mut self, records: &[Record]) -> Result<Appended, OutboxError> {
        let now = now_ms();
        let encoded: Vec<&str> = records.iter().map(|r| r.dims.encoded()).collect();
        let sizes: Vec<i64> = records
            .iter()
            .zip(&encoded)
            .map(|(r, d)| r.charged_bytes(d))
            .collect();
        // A group larger than the whole buffer keeps its newest part.
        let mut skip = 0;
        let mut incoming: i64 = sizes.iter().sum();
        while incoming > self.max_bytes && skip < records.len() {
            incoming -= sizes[skip];
            skip += 1;
        }
        let over = self.bytes + incoming - self.max_bytes;
        let (dropped, freed, first, last) = self.write("appending records", |tx| {
            let mut dropped = skip as i64;
            if skip > 0 {
                count_drop(tx, reason::BUFFER_FULL, NO_SINK, skip as i64)?;
            }
            let mut freed = 0;
            if over > 0 {
                let (n, f) = drop_oldest(tx, over)?;
                dropped += n;
                freed = f;
            }
            let (rows, place) = by_series(
                records
                    .iter()
                    .zip(&encoded)
                    .zip(&sizes)
                    .skip(skip)
                    .collect(),
            );
            let (first, last) = insert_records(tx, &rows, &place, now)?;
            Ok((dropped, freed, first, last))
        })?;
        self.bytes += incoming - freed;
        Ok(Appended {
            ids: first.unwrap_or(1)..=if first.is_some() { last } else { 0 },
            dropped,
        })
    }
}

/// Rows per INSERT statement. A statement per row spends more time starting
/// and finishing the statement (and, for AUTOINCREMENT, updating
/// `sqlite_sequence`) than storing the row: with 32 to a statement an append
/// takes about half the CPU per record (`benches/outbox.rs`: 0.92-1.13
/// against 1.83-2.21 µs); 8 did about as well, 128 worse.
pub(super) const ROWS_PER_INSERT: usize = 32;

/// Events in one row at most (see the module header's "Rows").
pub(super) const BUNDLE_MAX: usize = 64;
/// A row's packed payload at most, in bytes, so that the row fits its 4 KiB
/// page (longer ones spill into overflow pages, and copying them was 18 % of
/// the outbox thread in `perf`); a larger event is a row of its own.
const BUNDLE_MAX_BYTES: usize = 3_800;
/// Bytes in front of each event in a row of several: its time (i64) and
/// its payload's length (u32), little-endian.
pub(super) const PACKED_HEADER: usize = 12;

/// A record as inserted: its encoded dims and its charged size beside it.
type Row<'a> = ((&'a Record, &'a &'a str), &'a i64);

/// What makes events one series, and so able to share a row.
type Series<'a> = (&'a str, &'a str, &'a str, u64);

/// `rows` in the order they are stored, each with its series' place: each
/// series' events together, at the place of the series' first event and in
/// the order they arrived; any other record where it arrived, at a place of
/// its own. A relay source hands over a stream's messages a read at a time,
/// a dozen or so, and the dozen streams' reads interleave: gathered, a
/// stream's messages of one commit fill rows of up to [`BUNDLE_MAX_BYTES`]
/// instead of a read's worth each, and so fill their pages
/// (`benches/outbox.rs`).
fn by_series(rows: Vec<Row>) -> (Vec<Row>, Vec<u32>) {
    let mut first: HashMap<Series, u32> = HashMap::new();
    let mut places = 0u32;
    let mut last: Option<(Series, u32)> = None;
    let place: Vec<u32> = rows
        .iter()
        .map(|((r, dims), _)| {
            let mut new_place = || {
                places += 1;
                places - 1
            };
            if r.kind != Kind::Event {
                last = None;
                return new_place();
            }
            let series = (&*r.name, **dims, &*r.unit, r.value.to_bits());
            let at = match last {
                Some((s, at)) if s == series => at,
                _ => *first.entry(series).or_insert_with(new_place),
            };
            last = Some((series, at));
            at
        })
        .collect();
    if place.is_sorted() {
        return (rows, place);
    }
    // A counting sort by place, stable.
    let mut next = vec![0usize; places as usize + 1];
    for &p in &place {
        next[p as usize + 1] += 1;
    }
    for i in 1..next.len() {
        next[i] += next[i - 1];
    }
    let (mut sorted, mut sorted_place) = (rows.clone(), place.clone());
    for (row, &p) in rows.iter().zip(&place) {
        let at = &mut next[p as usize];
        (sorted[*at], sorted_place[*at]) = (*row, p);
        *at += 1;
    }
    (sorted, sorted_place)
}

/// How many of `rows`, from the first, go into one stored row: a run of
/// events of one series (one `place` from [`by_series`]) within a row's
/// bounds, or one record.
fn run_length(rows: &[Row], place: &[u32]) -> usize {
    let Some((((first, _), _), rest)) = rows.split_first() else {
        return 0;
    };
    let mut bytes = first.payload.len() + PACKED_HEADER;
    if first.kind != Kind::Event || bytes > BUNDLE_MAX_BYTES {
        return 1;
    }
    let mut n = 1;
    for (((r, _), _), &p) in rest.iter().zip(&place[1..]).take(BUNDLE_MAX - 1) {
        bytes += r.payload.len() + PACKED_HEADER;
        if p != place[0] || bytes > BUNDLE_MAX_BYTES {
            break;
        }
        n += 1;
    }
    n
}

/// Insert rows: a record alone in its row [`ROWS_PER_INSERT`] to a
/// statement, with the id SQLite gives (the next after the highest ever
/// given); a run of events as one row, with the id of its last record.
/// `place` is each row's series place ([`by_series`]). Returns the first
/// and last id given (None and 0 for none).
fn insert_records(
    tx: &Transaction,
    rows: &[Row],
    place: &[u32],
    now: i64,
) -> rusqlite::Result<(Option<i64>, i64)> {
    if rows.is_empty() {
        return Ok((None, 0));
    }
    let top: i64 = tx
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'records'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    let mut last = top;
    // Rows of one record not inserted yet, fewer than a statement's.
    let mut singles: Vec<&Row> = Vec::with_capacity(ROWS_PER_INSERT);
    let mut packed = Vec::new();
    let mut at = 0;
    while at < rows.len() {
        let n = run_length(&rows[at..], &place[at..]);
        if n == 1 {
            singles.push(&rows[at]);
            if singles.len() == ROWS_PER_INSERT {
                insert_singles(tx, &singles, now)?;
                singles.clear();
            }
        } else {
            insert_singles(tx, &singles, now)?;
            singles.clear();
            insert_run(tx, &rows[at..at + n], last + n as i64, now, &mut packed)?;
        }
        last += n as i64;
        at += n;
    }
    insert_singles(tx, &singles, now)?;
    Ok((Some(top + 1), last))
}

/// Rows of one record each, in order: a full statement's worth in one, else
/// one at a time (a statement of every other length would be prepared anew).
fn insert_singles(tx: &Transaction, rows: &[&Row], now: i64) -> rusqlite::Result<()> {
    static MANY: LazyLock<String> = LazyLock::new(|| insert_sql(ROWS_PER_INSERT));
    static ONE: LazyLock<String> = LazyLock::new(|| insert_sql(1));
    let insert = |sql: &str, rows: &[&Row]| -> rusqlite::Result<()> {
        let mut st = tx.prepare_cached(sql)?;
        for (k, ((r, dims), size)) in rows.iter().enumerate() {
            let at = |column: usize| k * COLUMNS + column;
            st.raw_bind_parameter(at(1), r.kind as i64)?;
            st.raw_bind_parameter(at(2), r.ts_ms)?;
            st.raw_bind_parameter(at(3), &r.name)?;
            st.raw_bind_parameter(at(4), **dims)?;
            st.raw_bind_parameter(at(5), r.value)?;
            st.raw_bind_parameter(at(6), &r.unit)?;
            st.raw_bind_parameter(at(7), &r.payload)?;
            st.raw_bind_parameter(at(8), **size)?;
            st.raw_bind_parameter(at(9), now)?;
        }
        st.raw_execute()?;
        Ok(())
    };
    if rows.len() == ROWS_PER_INSERT {
        return insert(&MANY, rows);
    }
    rows.iter()
        .try_for_each(|row| insert(&ONE, std::slice::from_ref(row)))
}

/// A run of events as one row with id `last` (see the module header's
/// "Rows"); `packed` is a buffer to reuse.
fn insert_run(
    tx: &Transaction,
    run: &[Row],
    last: i64,
    now: i64,
    packed: &mut Vec<u8>,
) -> rusqlite::Result<()> {
    let ((r, dims), _) = run[0];
    packed.clear();
    for ((r, _), _) in run {
        packed.extend_from_slice(&r.ts_ms.to_le_bytes());
        packed.extend_from_slice(&(r.payload.len() as u32).to_le_bytes());
        packed.extend_from_slice(&r.payload);
    }
    let size: i64 = run.iter().map(|(_, size)| **size).sum();
    let mut st = tx.prepare_cached(
        "INSERT INTO records (id, kind, ts, name, dims, value, unit, payload, size, at, n)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    st.execute(params![
        last,
        r.kind as i64,
        r.ts_ms,
        r.name,
        *dims,
        r.value,
        r.unit,
        &packed[..],
        size,
        now,
        run.len() as i64
    ])?;
    Ok(())
}

const COLUMNS: usize = 9;

/// `INSERT INTO records (…) VALUES (?, …), …` for `rows` rows of one
/// record each (`n` is 1, its default).
fn insert_sql(rows: usize) -> String {
    let row = format!("({})", ["?"; COLUMNS].join(", "));
    format!(
        "INSERT INTO records (kind, ts, name, dims, value, unit, payload, size, at) VALUES {}",
        vec![row; rows].join(", ")
    )
}

/// Delete records every sink has passed. With no sinks, nothing is passed:
/// the records stay, bounded by the buffer size.
pub(super) fn collect_garbage(tx: &Transaction) -> rusqlite::Result<i64> {
    let min: Option<i64> = tx.query_row("SELECT MIN(cursor) FROM sinks", [], |r| r.get(0))?;
    let Some(min) = min else { return Ok(0) };
    let freed: i64 = tx.query_row(
        "SELECT COALESCE(SUM(size), 0) FROM records WHERE id <= ?1",
        [min],
        |r| r.get(0),
    )?;
    if freed > 0 {
        tx.execute("DELETE FROM records WHERE id <= ?1", [min])?;
    }
    Ok(freed)
}

/// Drop the oldest records until at least `need` bytes are freed; count the
/// drops against every sink that had not passed them. Returns (records, bytes).
pub(super) fn drop_oldest(tx: &Transaction, need: i64) -> rusqlite::Result<(i64, i64)> {
    let (mut cutoff, mut freed, mut n) = (0i64, 0i64, 0i64);
    {
        let mut st = tx.prepare_cached("SELECT id, size, n FROM records ORDER BY id")?;
        let mut rows = st.query([])?;
        while freed < need {
            let Some(row) = rows.next()? else { break };
            cutoff = row.get(0)?;
            freed += row.get::<_, i64>(1)?;
            n += row.get::<_, i64>(2)?;
        }
    }
    if n == 0 {
        return Ok((0, 0));
    }
    let sinks: Vec<(String, i64, i64)> = {
        let mut st = tx.prepare_cached("SELECT name, cursor, kinds FROM sinks")?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?
    };
    if sinks.is_empty() {
        count_drop(tx, reason::BUFFER_FULL, NO_SINK, n)?;
    }
    for (name, cursor, kinds) in sinks {
        let missed: i64 = tx.query_row(
            // A sink's cursor may be inside a row: only its records after
            // the cursor were missed.
            "SELECT COALESCE(SUM(MIN(n, id - ?1)), 0) FROM records
             WHERE id > ?1 AND id <= ?2 AND ((1 << kind) & ?3) != 0",
            params![cursor, cutoff, kinds],
            |r| r.get(0),
        )?;
        if missed > 0 {
            count_drop(tx, reason::BUFFER_FULL, &name, missed)?;
        }
    }
    tx.execute("DELETE FROM records WHERE id <= ?1", [cutoff])?;
    Ok((n, freed))
}

pub(super) fn count_drop(c: &Connection, why: &str, sink: &str, n: i64) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO drops (reason, sink, count) VALUES (?1, ?2, ?3)
         ON CONFLICT (reason, sink) DO UPDATE SET count = count + excluded.count",
        params![why, sink, n],
    )?;
    Ok(())
}
