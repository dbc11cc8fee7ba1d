// Parameter structs shared with Rust (src/params.rs mirrors them #[repr(C)]; sizes asserted on both sides).
#pragma once
#include <cuda_fp16.h>
#include <stddef.h>
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
// in an f16 window ring [B][Hkv][win_cap][D] (keys already rotated): token t (absolute index in its
// sequence) in row t % win_cap.
struct KvqDecodeParams {
    const uint8_t* k_pages;     // K page pool
    const uint8_t* v_pages;     // V page pool
    const int32_t* page_table;  // [slots][max_pages] page ids
    const uint16_t* k_win;      // f16 window ring, keys   [slots][Hkv][win_cap][D]
    const uint16_t* v_win;      // f16 window ring, values [slots][Hkv][win_cap][D]
    const int32_t* n_sealed;    // [slots] tokens in sealed blocks (a multiple of the block's tokens)
    const int32_t* n_win;       // [slots] tokens in the window
    const int32_t* seq_slot;    // [B] cache slot of batch row b (page table row, lengths, window ring)
    const int32_t* row_len;     // [B] tokens row b sees (a prefix of its slot's tokens: causal prefill)
    const float* q;             // [B][Hq][D] rotated queries
    float* part_acc;            // [B][Hq][n_splits+1][D] unnormalized partial outputs
    float* part_ml;             // [B][Hq][n_splits+1][2] partial (max, sum), max in log2 units
    float* out;                 // [B][Hq][D]
    __half* out16;              // [B][Hq][D] the output again as f16 (the next GEMM's input), or null
    int32_t* counters;          // [B][Hkv] zeros: split CTAs done per (row, KV head); the last one merges
                                // and zeroes it again. Null: the separate merge kernel runs instead
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
    int32_t unit_tokens;        // tokens per split unit: a page, or a tiled format's (DecoQuant) work unit,
                                // which the host shrinks at short contexts so every warp gets one
    KvqFmtArgs fmt;
};

// Appending tokens to the window rings and sealing blocks (kernels/include/kvq_encode.cuh).
struct KvqEncodeParams {
    uint8_t* k_pages;           // K page pool (layout as in KvqDecodeParams)
    uint8_t* v_pages;           // V page pool
    uint16_t* k_win;            // window rings [slots][Hkv][win_cap][D]
    uint16_t* v_win;
    uint16_t* k_pre;            // pre-RoPE key codecs: a third ring of the keys before RoPE (what the
                                // encoder reads; k_win holds them rotated for attention), else null
    const float* k_new;         // appended tokens [rows][Hkv][D] (keys rotated, unless k_pre is set)
    const float* v_new;
    const int32_t* row_slot;    // [rows] cache slot of each appended token
    const int32_t* row_tok;     // [rows] its absolute index in the sequence
    const int32_t* job_slot;    // [jobs] blocks to seal: slot,
    const int32_t* job_tok;     //        first token (a multiple of the block's tokens),
    const int32_t* job_page;    //        page id,
    const int32_t* job_blk;     //        block within the page
    int64_t k_block_bytes;
    int64_t v_block_bytes;
    int32_t rows;
    int32_t jobs;
    int32_t hkv;
    int32_t win_cap;
    int32_t page_blocks;
    int32_t block_tokens;
    KvqFmtArgs fmt;
};

#ifdef __cplusplus
static_assert(sizeof(KvqFmtArgs) == 64, "KvqFmtArgs layout");
static_assert(sizeof(KvqDecodeParams) == 248, "KvqDecodeParams layout");
static_assert(offsetof(KvqDecodeParams, unit_tokens) == 176, "KvqDecodeParams layout");
static_assert(sizeof(KvqEncodeParams) == 208, "KvqEncodeParams layout");
#endif
