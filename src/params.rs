//! `#[repr(C)]` mirrors of kernels/include/kvq_params.cuh; sizes are asserted here and in the header.

/// Format-specific integers and pointers (meaning documented in each `kernels/formats/<fmt>.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct KvqFmtArgs {
    /// Integer parameters (bit widths, group sizes).
    pub i: [i32; 8],
    /// Device pointers to per-layer tables (sketch matrices, codebooks); 0 when unused.
    pub p: [u64; 4],
}

/// One decode-attention launch (see the header for each field's layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct KvqDecodeParams {
    pub k_pages: u64,
    pub v_pages: u64,
    pub page_table: u64,
    pub k_win: u64,
    pub v_win: u64,
    pub n_sealed: u64,
    pub n_win: u64,
    pub seq_slot: u64,
    pub row_len: u64,
    pub q: u64,
    pub part_acc: u64,
    pub part_ml: u64,
    pub out: u64,
    pub out16: u64,
    pub counters: u64,
    pub k_block_bytes: i64,
    pub v_block_bytes: i64,
    pub batch: i32,
    pub hkv: i32,
    pub group: i32,
    pub max_pages: i32,
    pub pages_per_split: i32,
    pub n_splits: i32,
    pub win_cap: i32,
    pub scale: f32,
    pub page_blocks: i32,
    pub stages: i32,
    pub unit_tokens: i32,
    pub fmt: KvqFmtArgs,
}

const _: () = assert!(std::mem::size_of::<KvqFmtArgs>() == 64);
const _: () = assert!(std::mem::offset_of!(KvqDecodeParams, unit_tokens) == 176);
const _: () = assert!(std::mem::size_of::<KvqDecodeParams>() == 248);
const _: () = assert!(std::mem::offset_of!(KvqDecodeParams, fmt) == 184);

/// Appending tokens to the window rings and sealing blocks (see the header for each field).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct KvqEncodeParams {
    pub k_pages: u64,
    pub v_pages: u64,
    pub k_win: u64,
    pub v_win: u64,
    pub k_pre: u64,
    pub k_new: u64,
    pub v_new: u64,
    pub row_slot: u64,
    pub row_tok: u64,
    pub job_slot: u64,
    pub job_tok: u64,
    pub job_page: u64,
    pub job_blk: u64,
    pub k_block_bytes: i64,
    pub v_block_bytes: i64,
    pub rows: i32,
    pub jobs: i32,
    pub hkv: i32,
    pub win_cap: i32,
    pub page_blocks: i32,
    pub block_tokens: i32,
    pub fmt: KvqFmtArgs,
}

const _: () = assert!(std::mem::size_of::<KvqEncodeParams>() == 208);
const _: () = assert!(std::mem::offset_of!(KvqEncodeParams, fmt) == 144);

// SAFETY: as for KvqDecodeParams: plain-old-data with the asserted C layout.
unsafe impl cudarc::driver::DeviceRepr for KvqEncodeParams {}

// SAFETY: plain-old-data, #[repr(C)], layout asserted equal to the CUDA struct above and in the header.
unsafe impl cudarc::driver::DeviceRepr for KvqDecodeParams {}
