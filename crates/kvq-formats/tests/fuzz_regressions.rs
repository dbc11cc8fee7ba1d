//! Inputs the cargo-fuzz targets (fuzz/) found, replayed: each must now be an error, not a panic or
//! non-finite output. Files in tests/fuzz_regressions/ are the crashing inputs as libFuzzer wrote them.
use kvq_formats::{KvPlan, Rope, RopeStyle};

/// block_decode input: [format index, stream bits] then the block bytes (repeated to block_bytes).
fn block_decode_replay(input: &[u8], formats: &[&str]) -> kvq_formats::Result<()> {
    let d = 64;
    let rope = Rope::new(d, 10000.0, RopeStyle::Interleaved);
    let fmt = formats[input[0] as usize % formats.len()];
    let c = KvPlan::parse(fmt, 1)?.build_caches(1, &rope)?.remove(0);
    let codec = if input[1] & 1 == 0 {
        c.keys().codec()
    } else {
        c.values().codec()
    };
    let block: Vec<u8> = input[2..]
        .iter()
        .copied()
        .cycle()
        .take(codec.block_bytes())
        .collect();
    codec.validate(&block)?;
    let mut out = vec![0f32; codec.block_tokens() * d];
    codec.decode(&block, &mut out)?;
    assert!(
        out.iter().all(|v| v.is_finite()),
        "{fmt}: decode Ok but not finite"
    );
    Ok(())
}

const FUZZ_FORMATS: &[&str] = &["fp16", "kivi:bits=2", "qjl", "decoquant:bits=4,chunk=64"];

/// fp16 blocks holding an Inf/NaN bit pattern decoded to NaN; now validate rejects them.
#[test]
fn fp16_block_with_nan_is_rejected() {
    let input = include_bytes!("fuzz_regressions/block_decode-fp16-nan");
    let e = block_decode_replay(input, FUZZ_FORMATS).unwrap_err();
    assert!(e.to_string().contains("expected a finite f16"), "{e}");
}
