//! Mergeable distinct counts: the "who is active" that can be added up
//! across machines. Summing per-gateway counts double-counts every id that
//! two gateways both saw; merging their sketches counts it once.
//!
//! A sketch holds the 64-bit hashes of ids ([`hash_i64`], [`hash_str`]:
//! MurmurHash3 x64-128 with a fixed seed). It stays an **exact** set up to
//! [`EXACT_MAX`] hashes (16 KiB, the size of the dense form) and becomes a
//! dense **HyperLogLog** with p = 14 (16,384 one-byte registers, standard
//! error 0.81 %) beyond. The estimate uses Ertl's improved estimator (2017),
//! which needs no bias tables and is unbiased from 0 to far beyond 2^40.
//!
//! # Envelope (version 1), little-endian
//! `"EMSK"` · version u8 = 1 · hash id u8 = 1 (murmur3 x64-128, low 64 bits)
//! · seed u64 · p u8 = 14 · form u8 (0 exact, 1 dense) · then for exact: n u32
//! and n sorted u64 hashes; for dense: 2^p register bytes.
//! A reader refuses any other version, hash, seed or p: sketches that do not
//! share all of them cannot be merged.

use std::fmt;

use crate::hash::murmur3_x64_128;

pub const P: u8 = 14;
const M: usize = 1 << P;
pub const EXACT_MAX: usize = 2048;
/// "edgemetr": fixed forever; changing it makes old sketches unmergeable.
pub const SEED: u64 = 0x6564_6765_6d65_7472;
const MAGIC: &[u8; 4] = b"EMSK";
const VERSION: u8 = 1;
const HASH_MURMUR3_X64_128: u8 = 1;

pub fn hash_i64(id: i64) -> u64 {
    murmur3_x64_128(&id.to_le_bytes(), SEED).0
}

// The relay source hashes user names; it lands with issue 4.
#[cfg_attr(not(test), allow(dead_code))]
pub fn hash_str(id: &str) -> u64 {
    murmur3_x64_128(id.as_bytes(), SEED).0
}

#[derive(Clone, PartialEq)]
pub enum Sketch {
    /// Sorted, without repeats: a lookup is a binary search over one
    /// contiguous block (at most 16 KiB), where a `BTreeSet` chased
    /// pointers through its nodes. The relay source inserts every
    /// message's user twice (its stream's window and all streams'), almost
    /// always a user already there.
    Exact(Vec<u64>),
    Dense(Box<[u8; M]>),
}

impl fmt::Debug for Sketch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sketch::Exact(s) => write!(f, "Sketch::Exact({} ids)", s.len()),
            Sketch::Dense(_) => write!(f, "Sketch::Dense(~{:.0})", self.estimate()),
        }
    }
}

impl Default for Sketch {
    fn default() -> Sketch {
        Sketch::Exact(Vec::new())
    }
}

// Decoding and merging are the upstream's side (issue 6); the xx_gateway
// source only encodes. Tested here so the format is fixed from the start.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    Truncated,
    NotASketch,
    Unsupported(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("the sketch is truncated"),
            DecodeError::NotASketch => f.write_str("not an edgemeter sketch (bad magic)"),
            DecodeError::Unsupported(what) => write!(f, "unsupported sketch: {what}"),
        }
    }
}

impl std::error::Error for DecodeError {}

fn register_update(regs: &mut [u8; M], h: u64) {
    let idx = (h >> (64 - P)) as usize;
    // Rank of the first 1 bit in the remaining 50 bits, 1..=51.
    let rest = (h << P) | (1 << (P - 1));
    let rank = rest.leading_zeros() as u8 + 1;
    if rank > regs[idx] {
        regs[idx] = rank;
    }
}

impl Sketch {
    pub fn insert(&mut self, h: u64) {
        match self {
            Sketch::Exact(set) => {
                if let Err(at) = set.binary_search(&h) {
                    set.insert(at, h);
                }
                if set.len() > EXACT_MAX {
                    self.densify();
                }
            }
            Sketch::Dense(regs) => register_update(regs, h),
        }
    }

    fn densify(&mut self) {
        if let Sketch::Exact(set) = self {
            let mut regs = Box::new([0u8; M]);
            for &h in set.iter() {
                register_update(&mut regs, h);
            }
            *self = Sketch::Dense(regs);
        }
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn merge(&mut self, other: &Sketch) {
        match (&mut *self, other) {
            (Sketch::Exact(ours), Sketch::Exact(theirs)) => {
                // At most 4,096 ids: one sort, not an insert (and a shift)
                // per id.
                ours.extend_from_slice(theirs);
                ours.sort_unstable();
                ours.dedup();
                if ours.len() > EXACT_MAX {
                    self.densify();
                }
            }
            (Sketch::Dense(ours), Sketch::Exact(theirs)) => {
                for &h in theirs {
                    register_update(ours, h);
                }
            }
            (_, Sketch::Dense(theirs)) => {
                self.densify();
                if let Sketch::Dense(ours) = self {
                    for (a, b) in ours.iter_mut().zip(theirs.iter()) {
                        *a = (*a).max(*b);
                    }
                }
            }
        }
    }

    /// Merge an encoded sketch without building it first: a dense one's
    /// registers are maxed straight from the bytes (what an upstream does
    /// for every agent of every window it answers for). Checks as
    /// [`Sketch::decode`] does; on an error `self` is unchanged.
    pub fn merge_encoded(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        let mut ours = [0u8; 15];
        ours[..4].copy_from_slice(MAGIC);
        ours[4] = VERSION;
        ours[5] = HASH_MURMUR3_X64_128;
        ours[6..14].copy_from_slice(&SEED.to_le_bytes());
        ours[14] = P;
        let dense = bytes.len() == 16 + M && bytes[..15] == ours && bytes[15] == 1;
        if !dense {
            let other = Sketch::decode(bytes)?;
            self.merge(&other);
            return Ok(());
        }
        let body = &bytes[16..];
        // A fold, not `any`: no early exit, so it vectorises like the max below.
        if body.iter().fold(0u8, |m, &r| m.max(r)) > 64 - P + 1 {
            return Err(DecodeError::Unsupported("a register out of range".into()));
        }
        self.densify();
        if let Sketch::Dense(regs) = self {
            for (a, b) in regs.iter_mut().zip(body) {
                *a = (*a).max(*b);
            }
        }
        Ok(())
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn is_exact(&self) -> bool {
        matches!(self, Sketch::Exact(_))
    }

    /// The distinct count: exact while exact, else the HLL estimate.
    pub fn estimate(&self) -> f64 {
        match self {
            Sketch::Exact(s) => s.len() as f64,
            Sketch::Dense(regs) => ertl_estimate(regs),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + M);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(HASH_MURMUR3_X64_128);
        out.extend_from_slice(&SEED.to_le_bytes());
        out.push(P);
        match self {
            Sketch::Exact(set) => {
                out.push(0);
                out.extend_from_slice(&(set.len() as u32).to_le_bytes());
                for h in set {
                    out.extend_from_slice(&h.to_le_bytes());
                }
            }
            Sketch::Dense(regs) => {
                out.push(1);
                out.extend_from_slice(&regs[..]);
            }
        }
        out
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub fn decode(bytes: &[u8]) -> Result<Sketch, DecodeError> {
        let header = bytes.get(..16).ok_or(DecodeError::Truncated)?;
        if &header[..4] != MAGIC {
            return Err(DecodeError::NotASketch);
        }
        let unsupported = |w: String| Err(DecodeError::Unsupported(w));
        if header[4] != VERSION {
            return unsupported(format!(
                "version {} (this edgemeter reads version {VERSION})",
                header[4]
            ));
        }
        if header[5] != HASH_MURMUR3_X64_128 {
            return unsupported(format!("hash id {}", header[5]));
        }
        let seed = u64::from_le_bytes(header[6..14].try_into().expect("8 bytes"));
        if seed != SEED {
            return unsupported(format!("hash seed {seed:#x}"));
        }
        if header[14] != P {
            return unsupported(format!(
                "precision p = {} (this edgemeter uses {P})",
                header[14]
            ));
        }
        let body = &bytes[16..];
        match header[15] {
            0 => {
                let n = u32::from_le_bytes(
                    body.get(..4)
                        .ok_or(DecodeError::Truncated)?
                        .try_into()
                        .expect("4 bytes"),
                ) as usize;
                if n > EXACT_MAX {
                    return unsupported(format!(
                        "an exact form with {n} ids (at most {EXACT_MAX})"
                    ));
                }
                let hashes = body.get(4..4 + 8 * n).ok_or(DecodeError::Truncated)?;
                if body.len() != 4 + 8 * n {
                    return unsupported("trailing bytes after the ids".into());
                }
                // Written sorted and without repeats; not trusted to be.
                let mut set: Vec<u64> = hashes
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                set.sort_unstable();
                set.dedup();
                Ok(Sketch::Exact(set))
            }
            1 => {
                if body.len() != M {
                    return Err(DecodeError::Truncated);
                }
                let mut regs = Box::new([0u8; M]);
                regs.copy_from_slice(body);
                if regs.iter().any(|&r| r > 64 - P + 1) {
                    return unsupported("a register out of range".into());
                }
                Ok(Sketch::Dense(regs))
            }
            form => unsupported(format!("form {form}")),
        }
    }
}

/// Ertl, "New cardinality estimation algorithms for HyperLogLog sketches"
/// (2017), the improved raw estimator (his Algorithm 6).
fn ertl_estimate(regs: &[u8; M]) -> f64 {
    let q = 64 - usize::from(P);
    let mut c = vec![0u32; q + 2];
    for &r in regs.iter() {
        c[usize::from(r)] += 1;
    }
    let m = M as f64;
    let mut z = m * tau(1.0 - f64::from(c[q + 1]) / m);
    for k in (1..=q).rev() {
        z = 0.5 * (z + f64::from(c[k]));
    }
    z += m * sigma(f64::from(c[0]) / m);
    let alpha_inf = 1.0 / (2.0 * std::f64::consts::LN_2);
    alpha_inf * m * m / z
}

fn sigma(mut x: f64) -> f64 {
    if x == 1.0 {
        return f64::INFINITY;
    }
    let mut y = 1.0;
    let mut z = x;
    loop {
        x *= x;
        let prev = z;
        z += x * y;
        y += y;
        if prev == z {
            return z;
        }
    }
}

fn tau(mut x: f64) -> f64 {
    if x == 0.0 || x == 1.0 {
        return 0.0;
    }
    let mut y = 1.0;
    let mut z = 1.0 - x;
    loop {
        x = x.sqrt();
        let prev = z;
        y *= 0.5;
        z -= (1.0 - x).powi(2) * y;
        if prev == z {
            return z / 3.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_encoded_equals_decoding_then_merging() {
        let of = |r: std::ops::Range<i64>| {
            let mut s = Sketch::default();
            r.for_each(|i| s.insert(hash_i64(i)));
            s
        };
        let parts = [of(0..10), of(5..3000), of(2500..9000), of(8990..9010)];
        let (mut a, mut b) = (Sketch::default(), Sketch::default());
        for p in &parts {
            a.merge(p);
            b.merge_encoded(&p.encode()).expect("ours");
        }
        assert_eq!(a, b);
        let mut bad = parts[1].encode();
        bad[20] = 60;
        let before = b.clone();
        assert!(b.merge_encoded(&bad).is_err());
        assert_eq!(b, before, "a refused sketch changes nothing");
        assert!(b.merge_encoded(&bad[..100]).is_err());
    }

    fn of(ids: impl IntoIterator<Item = i64>) -> Sketch {
        let mut s = Sketch::default();
        for id in ids {
            s.insert(hash_i64(id));
        }
        s
    }

    #[test]
    fn exact_while_small_and_merges_as_a_union() {
        let a = of(0..1000);
        let b = of(500..1500);
        assert!(a.is_exact());
        let mut u = a.clone();
        u.merge(&b);
        assert!(u.is_exact());
        assert_eq!(u.estimate(), 1500.0);
        assert_eq!(
            a.estimate() + b.estimate(),
            2000.0,
            "the sum double-counts the overlap"
        );
        // A union past the exact form's limit becomes the dense form that
        // inserting every id would have made.
        let mut big = of(0..1500);
        big.merge(&of(1000..2500));
        assert!(!big.is_exact());
        assert_eq!(big, of(0..2500));
    }

    #[test]
    fn dense_estimates_stay_within_two_percent_across_ranges() {
        // Across the switch to dense, the linear-counting range and beyond.
        for n in [2049i64, 5_000, 20_000, 50_000, 100_000, 400_000, 2_000_000] {
            let s = of(0..n);
            assert!(!s.is_exact());
            let err = (s.estimate() - n as f64).abs() / n as f64;
            assert!(
                err < 0.02,
                "n={n}: estimate {:.0}, error {:.2}%",
                s.estimate(),
                err * 100.0
            );
        }
    }

    #[test]
    fn merging_dense_and_exact_in_any_order_gives_the_same_sketch() {
        let big = of(0..100_000);
        let small = of(99_000..100_500);
        let mut x = big.clone();
        x.merge(&small);
        let mut y = small.clone();
        y.merge(&big);
        assert_eq!(x, y);
        let err = (x.estimate() - 100_500.0).abs() / 100_500.0;
        assert!(err < 0.02, "{}", x.estimate());
        // Idempotent: merging the same sketch again changes nothing.
        let mut z = x.clone();
        z.merge(&big);
        assert_eq!(z, x);
    }

    #[test]
    fn the_exact_form_is_a_set_in_any_order_of_inserts_and_of_encoded_ids() {
        // Inserted in an order of their own, each id three times.
        let ids: Vec<i64> = (0..300).map(|i| (i * 7919) % 300).collect();
        let mut s = Sketch::default();
        for _ in 0..3 {
            for &id in ids.iter().rev() {
                s.insert(hash_i64(id));
            }
        }
        let mut want: Vec<u64> = (0..300).map(hash_i64).collect();
        want.sort_unstable();
        assert_eq!(s, Sketch::Exact(want.clone()));
        assert_eq!(s.estimate(), 300.0);
        // Another writer's ids out of order and repeated: the same set.
        let mut bytes = s.encode()[..16].to_vec();
        bytes.extend_from_slice(&600u32.to_le_bytes());
        for h in want.iter().rev().chain(want.iter()) {
            bytes.extend_from_slice(&h.to_le_bytes());
        }
        assert_eq!(Sketch::decode(&bytes).expect("decode"), s);
    }

    #[test]
    fn envelope_round_trips_both_forms() {
        for s in [of([]), of(0..10), of(0..10_000)] {
            let bytes = s.encode();
            assert_eq!(&bytes[..4], b"EMSK");
            assert_eq!(Sketch::decode(&bytes).expect("decode"), s);
        }
        assert_eq!(of(0..3).encode().len(), 16 + 4 + 24);
        assert_eq!(of(0..10_000).encode().len(), 16 + M);
    }

    #[test]
    fn decode_refuses_what_it_cannot_merge() {
        let good = of(0..10).encode();
        let check = |mutate: &dyn Fn(&mut Vec<u8>), want: &str| {
            let mut b = good.clone();
            mutate(&mut b);
            let err = Sketch::decode(&b).expect_err("must refuse").to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        };
        check(&|b| b[0] = b'X', "bad magic");
        check(&|b| b[4] = 2, "version 2");
        check(&|b| b[5] = 9, "hash id 9");
        check(&|b| b[6] ^= 1, "hash seed");
        check(&|b| b[14] = 12, "p = 12");
        check(&|b| b[15] = 7, "form 7");
        check(&|b| b.truncate(30), "truncated");
        check(&|b| b.truncate(10), "truncated");
        check(&|b| b.push(0), "trailing bytes");
        check(
            &|b| b[16..20].copy_from_slice(&u32::MAX.to_le_bytes()),
            "exact form with",
        );
        let mut dense = of(0..10_000).encode();
        dense[100] = 99;
        assert!(Sketch::decode(&dense).is_err(), "register out of range");
    }

    #[test]
    fn string_and_integer_ids_hash_stably() {
        // Part of the wire format: these must never change.
        assert_eq!(hash_i64(1), murmur3_x64_128(&1i64.to_le_bytes(), SEED).0);
        assert_eq!(hash_str("alice"), murmur3_x64_128(b"alice", SEED).0);
        assert_ne!(hash_i64(1), hash_i64(2));
    }
}
