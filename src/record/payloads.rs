//! Payload buffers of committed records, kept to be filled again.
//!
//! The relay makes a record for every message, its payload a copy of the
//! message: a malloc, and once the outbox has committed the record, a
//! free. Freed two thousand at a time (a commit's worth), glibc takes
//! these 200-byte chunks back through its bins rather than its per-thread
//! cache, and `malloc`, `_int_malloc`, `_int_free` and `unlink_chunk` were
//! 8 to 15 % of the relay's main thread in `perf`. The writer gives the
//! buffers back here ([`recycle`]) and the relay copies its next messages
//! into them ([`copy_of`]).
//!
//! Per thread: the writer and the relay source run on the agent's main
//! thread; on any other thread the pool is simply not used. Bounded: at
//! most [`POOL_MAX_BYTES`] kept, no buffer larger than
//! [`BUFFER_MAX_BYTES`]; [`release`] empties it once records stop (the
//! writer's first wake-up with none since its last commit, within a
//! second).

use std::cell::RefCell;

use super::Record;

/// The most the pool keeps, in buffer capacity: more than a commit's
/// worth of relay messages at 20,000 a second (2,000 to 3,000 in buffers
/// of 256 bytes: a commit takes its 100 ms, and the next group fills
/// meanwhile).
pub const POOL_MAX_BYTES: usize = 1024 * 1024;
/// Larger buffers are freed, not kept.
pub const BUFFER_MAX_BYTES: usize = 1024;

#[derive(Default)]
struct Pool {
    buffers: Vec<Vec<u8>>,
    /// The buffers' capacities, summed.
    bytes: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::default();
}

/// Buffers are made a power of two: messages differ by a few bytes (a
/// longer command, another digit), and a kept buffer a byte too short for
/// the next would be grown, the pool's bytes then holding fewer of them.
/// A power of two holds every length down to half of it.
fn capacity_for(len: usize) -> usize {
    len.next_power_of_two().max(64)
}

/// A copy of `bytes`, in a kept buffer where one is.
pub fn copy_of(bytes: &[u8]) -> Vec<u8> {
    if bytes.len() > BUFFER_MAX_BYTES {
        return bytes.to_vec();
    }
    let kept = POOL.with_borrow_mut(|p| {
        let buf = p.buffers.pop()?;
        p.bytes -= buf.capacity();
        Some(buf)
    });
    let mut buf = kept.unwrap_or_default();
    buf.clear();
    if buf.capacity() < bytes.len() {
        buf.reserve_exact(capacity_for(bytes.len()));
    }
    buf.extend_from_slice(bytes);
    buf
}

/// Keep the payload buffers of records that are done with (committed),
/// within the bounds; empties `records`, keeping its capacity.
pub fn recycle(records: &mut Vec<Record>) {
    POOL.with_borrow_mut(|p| {
        for r in records.drain(..) {
            let cap = r.payload.capacity();
            if cap > 0 && cap <= BUFFER_MAX_BYTES && p.bytes + cap <= POOL_MAX_BYTES {
                p.bytes += cap;
                p.buffers.push(r.payload);
            }
        }
    });
}

/// Free every kept buffer.
pub fn release() {
    POOL.with_borrow_mut(|p| *p = Pool::default());
}

/// What the pool keeps now: buffers and their bytes.
pub fn kept() -> (usize, usize) {
    POOL.with_borrow(|p| (p.buffers.len(), p.bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Dims, Kind};

    fn event(payload: Vec<u8>) -> Record {
        Record {
            kind: Kind::Event,
            ts_ms: 0,
            name: "log".into(),
            dims: Dims::default(),
            value: 0.0,
            unit: "None".into(),
            payload,
        }
    }

    /// Each test runs on its own thread, so its pool starts empty.
    #[test]
    fn a_recycled_buffer_holds_the_next_copy() {
        let first = copy_of(b"first message");
        let at = first.as_ptr();
        let mut done = vec![event(first)];
        recycle(&mut done);
        assert!(done.is_empty());
        assert_eq!(kept().0, 1);
        let next = copy_of(b"the next");
        assert_eq!(next, b"the next");
        assert_eq!(next.as_ptr(), at, "the same buffer, filled again");
        assert_eq!(kept(), (0, 0));
        assert_eq!(copy_of(b"none kept"), b"none kept");
    }

    /// Messages of slightly different lengths, copied in another order the
    /// second time (the pool gives the last buffer kept first): every copy
    /// of the second round is in a buffer of the first, none grown.
    #[test]
    fn buffers_fit_messages_a_few_bytes_longer() {
        let lengths: Vec<usize> = (0..500).map(|i| 170 + (i * 7) % 31).collect();
        let mut done: Vec<Record> = lengths
            .iter()
            .map(|&n| event(copy_of(&vec![1u8; n])))
            .collect();
        let first: std::collections::HashSet<usize> =
            done.iter().map(|r| r.payload.as_ptr() as usize).collect();
        recycle(&mut done);
        for &n in &lengths {
            let copy = copy_of(&vec![2u8; n]);
            assert_eq!(copy.len(), n);
            assert!(first.contains(&(copy.as_ptr() as usize)), "a kept buffer");
            assert!(copy.capacity() <= 256, "not grown: {}", copy.capacity());
        }
        assert_eq!(kept(), (0, 0));
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_bounds() {
        let mut done: Vec<Record> = (0..2 * POOL_MAX_BYTES / 200)
            .map(|_| event(vec![7u8; 200]))
            .collect();
        done.push(event(vec![0u8; BUFFER_MAX_BYTES + 1]));
        done.push(event(Vec::new()));
        recycle(&mut done);
        let (buffers, bytes) = kept();
        assert!(bytes <= POOL_MAX_BYTES, "{bytes}");
        assert_eq!(bytes, buffers * 200);
        assert_eq!(buffers, POOL_MAX_BYTES / 200, "only 200-byte buffers");
        // A message larger than any kept buffer may take is copied anew.
        let big = vec![1u8; BUFFER_MAX_BYTES + 1];
        assert_eq!(copy_of(&big), big);
        assert_eq!(kept().0, buffers);
        release();
        assert_eq!(kept(), (0, 0));
    }
}
