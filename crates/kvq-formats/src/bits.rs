//! Bit packing shared by the formats: little-endian bit order inside little-endian bytes, the order
//! the CUDA kernels read (bit i of a b-bit field stream lives in byte (i*b)/8 at bit (i*b)%8).

/// Writes `vals` (each < 2^bits, bits in 1..=16) as a dense little-endian bit stream into `out`.
pub fn pack(vals: &[u32], bits: u32, out: &mut [u8]) {
    debug_assert!((1..=16).contains(&bits));
    out.iter_mut().for_each(|b| *b = 0);
    for (i, &v) in vals.iter().enumerate() {
        put_at(out, i * bits as usize, v, bits);
    }
}

/// Reads field `i` of a `bits`-wide little-endian bit stream.
pub fn get(bytes: &[u8], bits: u32, i: usize) -> u32 {
    get_at(bytes, i * bits as usize, bits)
}

/// ORs the low `bits` bits of `v` into the stream at bit `pos` (fields of mixed widths: KLT's
/// per-component codes); the target bits must be zero.
pub fn put_at(out: &mut [u8], mut pos: usize, v: u32, bits: u32) {
    let mut v = v & (((1u64 << bits) - 1) as u32);
    let mut left = bits as usize;
    while left > 0 {
        let (byte, off) = (pos / 8, pos % 8);
        let take = left.min(8 - off);
        out[byte] |= ((v & ((1 << take) - 1)) as u8) << off;
        v >>= take;
        pos += take;
        left -= take;
    }
}

/// Reads the `bits`-wide field starting at bit `pos` (0 for `bits` = 0).
pub fn get_at(bytes: &[u8], mut pos: usize, bits: u32) -> u32 {
    let mut left = bits as usize;
    let (mut v, mut shift) = (0u32, 0);
    while left > 0 {
        let (byte, off) = (pos / 8, pos % 8);
        let take = left.min(8 - off);
        v |= (((bytes[byte] >> off) as u32) & ((1 << take) - 1)) << shift;
        shift += take;
        pos += take;
        left -= take;
    }
    v
}

/// Bytes needed for `n` fields of `bits` bits.
pub fn packed_len(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(8)
}

/// Little-endian f16 at byte offset `off`.
pub fn f16_at(bytes: &[u8], off: usize) -> f32 {
    half::f16::from_le_bytes([bytes[off], bytes[off + 1]]).to_f32()
}

/// Stores `v` as a little-endian f16 at byte offset `off`.
pub fn put_f16(bytes: &mut [u8], off: usize, v: f32) {
    bytes[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_all_widths() {
        for bits in 1..=16u32 {
            let vals: Vec<u32> = (0..37u32)
                .map(|i| (i.wrapping_mul(2654435761)) & ((1 << bits) - 1))
                .collect();
            let mut out = vec![0u8; packed_len(vals.len(), bits)];
            pack(&vals, bits, &mut out);
            for (i, &v) in vals.iter().enumerate() {
                assert_eq!(get(&out, bits, i), v, "bits {bits} i {i}");
            }
        }
    }
}
