// Packed integer codes to f16 MMA fragments, shared by the formats that store b-bit codes (KIVI,
// DecoQuant): a pair of codes becomes {1024 + a, 1024 + b} by masking into 0x6400 half2 words, then
// exact small integers by one subtract.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>
#include "kvq_decode.cuh"

namespace kvq {

constexpr uint32_t MAGIC = 0x64006400u;  // half2 {1024, 1024}
constexpr uint32_t ONE2 = 0x3C003C00u;   // half2 {1, 1}

// (x & mask) | base as one LOP3 (base: MAGIC or ONE2): written plainly, the compiler splits the two
// constants over two LOP3s (one immediate each), a tenth of a KIVI-2 page's instructions.
__device__ __forceinline__ uint32_t mask_or(uint32_t x, uint32_t mask, uint32_t base) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(x), "r"(mask), "r"(base));
    return d;
}
__device__ __forceinline__ uint32_t unbias(uint32_t h) {
    const __half2 x = *reinterpret_cast<const __half2*>(&h), m = __float2half2_rn(1024.f);
    return h2_bits(__hsub2(x, m));
}
__device__ __forceinline__ uint32_t halves(uint32_t a, uint32_t b) {
    return h2_bits(__halves2half2(__uint2half_rn(a), __uint2half_rn(b)));
}

// Key codes of one token for k-step kb: b0 = {c(2q), c(2q+8)}, b1 = {c(2q+1), c(2q+9)} (channels of the
// k-step), exact in f16. `row` is the token's packed codes. 1- and 2-bit keys never come here (masks,
// key_masks1, and the top form, key_codes_top): B = 4 has a fast path, other widths the generic one.
template <int B>
__device__ __forceinline__ void key_codes(const uint8_t* row, int kb, int q, int bits, uint32_t& b0,
                                          uint32_t& b1) {
    static_assert(B != 1 && B != 2, "1-bit keys are masks (key_masks1), 2-bit ones key_codes_top");
    if constexpr (B == 4) {
        const uint2 w = reinterpret_cast<const uint2*>(row)[kb];
        const uint32_t u = __byte_perm(w.x, w.y, 0x4400u + 0x1111u * q);
        b0 = unbias(mask_or(u, 0x000F000Fu, MAGIC));
        b1 = unbias(mask_or(u >> 4, 0x000F000Fu, MAGIC));
    } else {
        const int c = 16 * kb + 2 * q;
        b0 = halves(bits_at(row, c * bits, bits), bits_at(row, (c + 8) * bits, bits));
        b1 = halves(bits_at(row, (c + 1) * bits, bits), bits_at(row, (c + 9) * bits, bits));
    }
}

// Value codes of lane r for one token: its D/8 channels' codes as one word (B * D/8 <= 64 bits).
template <int B, int D>
__device__ __forceinline__ uint64_t val_word(const uint8_t* row, int r) {
    constexpr int W = B * D / 8;
    if constexpr (W == 8) return row[r];
    else if constexpr (W == 16) return reinterpret_cast<const uint16_t*>(row)[r];
    else if constexpr (W == 32) return reinterpret_cast<const uint32_t*>(row)[r];
    else return reinterpret_cast<const uint64_t*>(row)[r];
}

// {code of token a, code of token b} at lane-channel nb, as {1024 + a, 1024 + b} before unbias.
template <int B>
__device__ __forceinline__ uint32_t val_pair(uint64_t wa, uint64_t wb, int nb) {
    constexpr uint32_t M = (1u << B) - 1u;
    const int bit = nb * B, k = bit / 16, o = bit % 16;
    const uint32_t u = ((uint32_t)(wa >> (16 * k)) & 0xFFFFu) | ((uint32_t)(wb >> (16 * k)) << 16);
    return mask_or(u >> o, M | (M << 16), MAGIC);
}

// Top-of-mantissa code pairs, for readers that scale the codes anyway (KIVI/AsymKV, DecoQuant): a
// b-bit code c placed in the top b mantissa bits of 1.0 reads as the exact half h = 1 + c / 2^b, so
// s h - s = s c / 2^b is one HFMA2 (s and -s exact) with no unbias subtract, and an MMA over such codes
// gives sum x + 2^-b sum x c; the reader undoes 2^-b in f32. Zeros stay out of that FMA (z - s as
// its addend, rounded to f16, cost 2-3x the kernels' f16 error in H100 parity) and enter by their own MMA.

// key_codes's pairs in the top form (B = 2, 4; 1-bit codes are masks, key_masks1): the shift that
// brought codes to bits 0 / 16 brings them to bits 10 - B / 26 - B instead (a rotate where the
// distance's sign depends on the lane).
template <int B>
__device__ __forceinline__ void key_codes_top(const uint8_t* row, int kb, int q, uint32_t& b0, uint32_t& b1) {
    static_assert(B == 2 || B == 4, "top-form key codes for 2 and 4 bits");
    if constexpr (B == 2) {
        const uint32_t w = reinterpret_cast<const uint32_t*>(row)[kb];
        // bit 4q (+16) to bit 8 (+16), bit 4q + 2 likewise: rotate left by 8 - 4q and 6 - 4q (mod 32).
        b0 = mask_or(__funnelshift_l(w, w, (8 - 4 * q) & 31), 0x03000300u, ONE2);
        b1 = mask_or(__funnelshift_l(w, w, (6 - 4 * q) & 31), 0x03000300u, ONE2);
    } else {
        const uint2 w = reinterpret_cast<const uint2*>(row)[kb];
        const uint32_t u = __byte_perm(w.x, w.y, 0x4400u + 0x1111u * q);
        b0 = mask_or(u << 6, 0x03C003C0u, ONE2);
        b1 = mask_or(u << 2, 0x03C003C0u, ONE2);
    }
}

// val_pair in the top form: {1 + a / 2^B, 1 + b / 2^B} for tokens a, b at lane-channel nb.
template <int B>
__device__ __forceinline__ uint32_t val_pair_top(uint64_t wa, uint64_t wb, int nb) {
    constexpr uint32_t M = (1u << B) - 1u;
    const int bit = nb * B, k = bit / 16, o = bit % 16;
    const uint32_t u = ((uint32_t)(wa >> (16 * k)) & 0xFFFFu) | ((uint32_t)(wb >> (16 * k)) << 16);
    constexpr int TOP = 10 - B;  // the code's lowest bit in the half
    const uint32_t x = o <= TOP ? u << (TOP - o) : u >> (o - TOP);
    return mask_or(x, (M | (M << 16)) << TOP, ONE2);
}

// 1-bit codes as masks: with bit 7 of a byte set to a code, prmt's sign-replicate selector (nibble
// 8 + byte) widens it to 0xFF or 0x00, two bytes per half, so mask & {s_a, s_b} is {s_a c_a, s_b c_b}
// exactly, by one PRMT and one LOP3 a pair and no f16 arithmetic. (__byte_perm keeps only the low three
// bits of each selector nibble, hence the asm.)
__device__ __forceinline__ uint32_t sign_bytes(uint32_t x, uint32_t sel) {
    uint32_t d;
    asm("prmt.b32 %0, %1, 0, %2;" : "=r"(d) : "r"(x), "r"(sel));
    return d;
}

// key_codes for 1-bit codes as masks (b0 = {c(2q), c(2q+8)}, b1 = {c(2q+1), c(2q+9)}, each half 0xFFFF
// or 0): the 32-bit word holds k-steps 2u (bits 0..15) and 2u + 1 (16..31); one shift per pair brings
// channel 2q (+ 8, + 16, + 24) to the bytes' bit 7, the selector picks the k-step's two bytes.
__device__ __forceinline__ void key_masks1(const uint8_t* row, int kb, int q, uint32_t& b0, uint32_t& b1) {
    const uint32_t w = reinterpret_cast<const uint32_t*>(row)[kb >> 1];
    const uint32_t sel = (kb & 1) ? 0xBBAAu : 0x9988u;
    b0 = sign_bytes(w << (7 - 2 * q), sel);
    b1 = sign_bytes(w << (6 - 2 * q), sel);
}

// val_pair for 1-bit codes as masks: {c of token a, c of token b} at lane-channel nb (< 16), as 0xFFFF / 0
// halves; `u` = the two tokens' 16-bit code words, a's in the low half.
__device__ __forceinline__ uint32_t val_mask1(uint32_t u, int nb) {
    return sign_bytes(u << (7 - (nb & 7)), nb < 8 ? 0xAA88u : 0xBB99u);
}

}  // namespace kvq
