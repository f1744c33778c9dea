//! MurmurHash3 x64-128: the hash of the xx gateway's bloom filters, and the
//! fixed hash behind every sketch, so sketches from any build, any machine
//! and any architecture merge.

const C1: u64 = 0x87c3_7b91_1142_53d5;
const C2: u64 = 0x4cf5_ad43_2745_937f;

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// The standard MurmurHash3_x64_128 of `data` with `seed`, as (h1, h2).
pub fn murmur3_x64_128(data: &[u8], seed: u64) -> (u64, u64) {
    let (mut h1, mut h2) = (seed, seed);
    let mut blocks = data.chunks_exact(16);
    for b in &mut blocks {
        let k1 = u64::from_le_bytes(b[..8].try_into().expect("16-byte block"));
        let k2 = u64::from_le_bytes(b[8..].try_into().expect("16-byte block"));
        h1 ^= k1.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2);
        h1 = h1
            .rotate_left(27)
            .wrapping_add(h2)
            .wrapping_mul(5)
            .wrapping_add(0x52dc_e729);
        h2 ^= k2.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1);
        h2 = h2
            .rotate_left(31)
            .wrapping_add(h1)
            .wrapping_mul(5)
            .wrapping_add(0x3849_5ab5);
    }
    let tail = blocks.remainder();
    let (mut k1, mut k2) = (0u64, 0u64);
    for (i, &b) in tail.iter().enumerate() {
        if i < 8 {
            k1 |= u64::from(b) << (8 * i);
        } else {
            k2 |= u64::from(b) << (8 * (i - 8));
        }
    }
    if tail.len() > 8 {
        h2 ^= k2.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1);
    }
    if !tail.is_empty() {
        h1 ^= k1.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2);
    }
    let len = data.len() as u64;
    h1 ^= len;
    h2 ^= len;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    h1 = fmix64(h1);
    h2 = fmix64(h2);
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    (h1, h2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_vectors() {
        let check = |data: &[u8], seed, want: (u64, u64)| {
            assert_eq!(
                murmur3_x64_128(data, seed),
                want,
                "{:?}",
                String::from_utf8_lossy(data)
            )
        };
        // Expected values from Python's mmh3.hash128(data, 0, x64arch=True)
        // (h1 = low 64 bits), an independent implementation.
        check(b"hello", 0, (0xcbd8_a7b3_41bd_9b02, 0x5b1e_906a_48ae_1d19));
        check(b"", 0, (0, 0));
        check(
            b"The quick brown fox jumps over the lazy dog",
            0,
            (0xe34b_bc7b_bc07_1b6c, 0x7a43_3ca9_c49a_9347),
        );
        check(
            b"0123456789abcdefXYZ",
            0,
            (0x99d3_7502_6c4a_901d, 0x4e69_e256_eaf8_9cf3),
        );
        // The two inputs a bloom filter hashes for round 1.
        check(
            &1u64.to_le_bytes(),
            0,
            (0x0044_03b7_fb05_c44a, 0x3d8a_cdb4_d36d_9c06),
        );
        check(
            b"\x01\0\0\0\0\0\0\0\x01",
            0,
            (0x35a2_ca94_d0a1_72cf, 0x337d_25f6_5b51_9c76),
        );
    }
}
