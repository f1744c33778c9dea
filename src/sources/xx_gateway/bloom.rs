//! The xx gateway's per-recipient bloom filters (`client_bloom_filters.filter`):
//! decode the 99-byte rows and test whether a filter claims a round.
//!
//! Layout (elixxir's fork of tannerryan/ring): a 17-byte header (version
//! byte 0x01, bit count u64 BE = 648, hash count u64 BE = 10), then 82 bytes
//! of bits, LSB first. A round id is inserted as its 8 little-endian bytes;
//! hashes: `h1,h2 = murmur3(data)`, `h3,h4 = murmur3(data || 0x01)`, and the
//! n-th bit index is `(h[n%2] + n*h[2 + ((n + n%2) % 4)/2]) mod 2^64 mod 648`.

use std::fmt;

use crate::hash::murmur3_x64_128;

pub const ROW_BYTES: usize = 99;
const BITS: u64 = 648;
const HASHES: u64 = 10;
const HEADER: usize = 17;

#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    bits: [u8; ROW_BYTES - HEADER],
}

#[derive(Debug, Clone, PartialEq)]
pub enum BloomError {
    Length(usize),
    Version(u8),
    Parameters { bits: u64, hashes: u64 },
}

impl fmt::Display for BloomError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BloomError::Length(n) => write!(f, "a filter row is {ROW_BYTES} bytes, this one {n}"),
            BloomError::Version(v) => write!(f, "unknown filter version {v:#04x} (expected 0x01)"),
            BloomError::Parameters { bits, hashes } => {
                write!(
                    f,
                    "unexpected filter parameters: {bits} bits, {hashes} hashes (expected {BITS}, {HASHES})"
                )
            }
        }
    }
}

impl std::error::Error for BloomError {}

/// The 10 bit positions round `round` sets.
pub fn indexes(round: u64) -> [u64; HASHES as usize] {
    let data = round.to_le_bytes();
    let (h1, h2) = murmur3_x64_128(&data, 0);
    let mut extended = [0u8; 9];
    extended[..8].copy_from_slice(&data);
    extended[8] = 1;
    let (h3, h4) = murmur3_x64_128(&extended, 0);
    let h = [h1, h2, h3, h4];
    let mut out = [0u64; HASHES as usize];
    for (n, slot) in out.iter_mut().enumerate() {
        let n64 = n as u64;
        let base = h[n % 2];
        let step = h[2 + ((n + n % 2) % 4) / 2];
        *slot = base.wrapping_add(n64.wrapping_mul(step)) % BITS;
    }
    out
}

impl Filter {
    pub fn decode(row: &[u8]) -> Result<Filter, BloomError> {
        if row.len() != ROW_BYTES {
            return Err(BloomError::Length(row.len()));
        }
        if row[0] != 1 {
            return Err(BloomError::Version(row[0]));
        }
        let bits = u64::from_be_bytes(row[1..9].try_into().expect("8 bytes"));
        let hashes = u64::from_be_bytes(row[9..17].try_into().expect("8 bytes"));
        if bits != BITS || hashes != HASHES {
            return Err(BloomError::Parameters { bits, hashes });
        }
        let mut f = Filter {
            bits: [0; ROW_BYTES - HEADER],
        };
        f.bits.copy_from_slice(&row[HEADER..]);
        Ok(f)
    }

    /// Does the filter claim `round`? (False positives possible, ~1 % for a
    /// full row of 64 rounds; no false negatives.)
    pub fn contains(&self, round: u64) -> bool {
        indexes(round)
            .iter()
            .all(|&i| self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0)
    }

    #[cfg(test)]
    pub fn with_rounds(rounds: &[u64]) -> Filter {
        let mut f = Filter {
            bits: [0; ROW_BYTES - HEADER],
        };
        for &r in rounds {
            for i in indexes(r) {
                f.bits[(i / 8) as usize] |= 1 << (i % 8);
            }
        }
        f
    }

    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let mut row = vec![1u8];
        row.extend_from_slice(&BITS.to_be_bytes());
        row.extend_from_slice(&HASHES.to_be_bytes());
        row.extend_from_slice(&self.bits);
        row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's test vector: a filter holding only round 1.
    const ROUND_1_HEX: &str = concat!(
        "010000000000000288000000000000000a",
        "00000000000000000000000000000000004000000000000000400000000000000000000800040000",
        "000000000000000000000000000000000000000000000000100000000000000410000080004000001000"
    );

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn round_1_sets_the_reference_bits() {
        assert_eq!(
            indexes(1),
            [570, 516, 142, 283, 622, 580, 206, 607, 298, 644]
        );
    }

    #[test]
    fn decodes_the_reference_row() {
        let row = unhex(ROUND_1_HEX);
        assert_eq!(row.len(), ROW_BYTES);
        let f = Filter::decode(&row).expect("decode");
        assert!(f.contains(1));
        assert_eq!(f, Filter::with_rounds(&[1]));
        assert_eq!(f.encode(), row);
        // Other rounds are (almost surely) absent from a one-round filter.
        assert_eq!((2..1000).filter(|&r| f.contains(r)).count(), 0);
    }

    #[test]
    fn a_full_row_claims_all_its_rounds() {
        let rounds: Vec<u64> = (1_000_000..1_000_064).collect();
        let f = Filter::with_rounds(&rounds);
        assert!(rounds.iter().all(|&r| f.contains(r)), "no false negatives");
        let fp = (2_000_000..2_010_000).filter(|&r| f.contains(r)).count();
        // ~0.95 % expected for 64 rounds; allow generous noise.
        assert!(fp < 300, "{fp} false positives in 10,000");
    }

    #[test]
    fn malformed_rows_are_errors() {
        let good = unhex(ROUND_1_HEX);
        let check = |row: Vec<u8>, want: &str| {
            let err = Filter::decode(&row).expect_err("must fail").to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        };
        check(good[..98].to_vec(), "this one 98");
        check(vec![], "this one 0");
        let mut v = good.clone();
        v[0] = 2;
        check(v, "version 0x02");
        let mut v = good.clone();
        v[8] = 0x89;
        check(v, "649 bits");
    }
}
