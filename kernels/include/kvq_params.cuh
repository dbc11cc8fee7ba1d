// Parameter structs shared with Rust (src/params.rs mirrors them #[repr(C)]; sizes asserted on both sides).
#pragma once
#include <stdint.h>

// Kernel names are derived, never typed: kvq_{fmt}_{op}_{dtype}_hd{D}.
#define KVQ_NAME(fmt, op, dtype, D) kvq_##fmt##_##op##_##dtype##_hd##D

// Format-specific integers and pointers, interpreted by the format's policy (documented there).
struct KvqFmtArgs {
    int32_t i[8];
    const void* p[4];
};

// One decode-attention launch: B sequences, Hkv KV heads, Hq = Hkv * G query heads, one query token each.
// Sealed tokens live in pages: page p holds, for each KV head h, `page_blocks` consecutive format blocks
// of that head, contiguous ((p * Hkv + h) * page_blocks * block_bytes). The newest unsealed tokens sit
// in an f16 window buffer [B][Hkv][win_cap][D] (keys already rotated).
struct KvqDecodeParams {
    const uint8_t* k_pages;     // K page pool
    const uint8_t* v_pages;     // V page pool
    const int32_t* page_table;  // [B][max_pages] page ids
    const uint16_t* k_win;      // f16 window keys   [B][Hkv][win_cap][D]
    const uint16_t* v_win;      // f16 window values [B][Hkv][win_cap][D]
    const int32_t* n_sealed;    // [B] tokens in sealed blocks (a multiple of the block's tokens)
    const int32_t* n_win;       // [B] tokens in the window
    const float* q;             // [B][Hq][D] rotated queries
    float* part_acc;            // [B][Hq][n_splits+1][D] unnormalized partial outputs
    float* part_ml;             // [B][Hq][n_splits+1][2] partial (max, sum), max in log2 units
    float* out;                 // [B][Hq][D]
    int64_t k_block_bytes;      // bytes of one head's K block
    int64_t v_block_bytes;      // bytes of one head's V block
    int32_t batch;
    int32_t hkv;
    int32_t group;              // query heads per KV head (<= 8)
    int32_t max_pages;          // page table row length
    int32_t pages_per_split;    // pages handled by one CTA
    int32_t n_splits;           // CTAs over sealed pages (one more CTA reads the window)
    int32_t win_cap;
    float scale;                // softmax scale (1/sqrt(D))
    int32_t page_blocks;        // format blocks per page (checked against the kernel's own constant)
    int32_t stages;             // pipeline stages per warp (checked likewise)
    KvqFmtArgs fmt;
};

#ifdef __cplusplus
static_assert(sizeof(KvqFmtArgs) == 64, "KvqFmtArgs layout");
static_assert(sizeof(KvqDecodeParams) == 208, "KvqDecodeParams layout");
#endif
