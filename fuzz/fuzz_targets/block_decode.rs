//! Arbitrary bytes as one packed block of each format's key and value codec: `validate`, `decode`,
//! `key_scores` and `accumulate_values` return an error (or NaN scores, the documented signal of an
//! unreadable block) or finite output, and never panic.
#![no_main]
use kvq_formats::{KvPlan, LayerCache, Rope, RopeStyle};
use libfuzzer_sys::fuzz_target;

/// Formats that build without external files (RVQ needs a codebook file and is skipped).
const FORMATS: &[&str] = &["fp16", "kivi:bits=2", "qjl", "decoquant:bits=4,chunk=64"];
const D: usize = 64;

struct Setup {
    rope: Rope,
    caches: Vec<LayerCache>,
}

thread_local! {
    static SETUP: Setup = {
        let rope = Rope::new(D, 10000.0, RopeStyle::Interleaved);
        let caches = FORMATS
            .iter()
            .map(|f| {
                KvPlan::parse(f, 1)
                    .and_then(|p| p.build_caches(1, &rope))
                    .unwrap_or_else(|e| panic!("{f}: {e}"))
                    .remove(0)
            })
            .collect();
        Setup { rope, caches }
    };
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (sel, bytes) = data.split_at(2);
    SETUP.with(|s| {
        let fmt = sel[0] as usize % FORMATS.len();
        let cache = &s.caches[fmt];
        let codec = if sel[1] & 1 == 0 {
            cache.keys().codec()
        } else {
            cache.values().codec()
        };
        let (g, n) = (codec.block_tokens(), codec.block_bytes());
        // Exactly one block: the input repeated (or cut) to block_bytes; a too-short input is also
        // tried as is, to exercise the length checks.
        if sel[1] & 2 != 0 {
            let short = &bytes[..bytes.len().min(n.saturating_sub(1))];
            assert!(
                codec.validate(short).is_err(),
                "{}: short block accepted",
                FORMATS[fmt]
            );
            let mut out = vec![0f32; g * D];
            assert!(codec.decode(short, &mut out).is_err());
        }
        let block: Vec<u8> = if bytes.is_empty() {
            vec![0; n]
        } else {
            bytes.iter().copied().cycle().take(n).collect()
        };
        let valid = codec.validate(&block).is_ok();
        let mut out = vec![0f32; g * D];
        match codec.decode(&block, &mut out) {
            Ok(()) => {
                assert!(
                    valid,
                    "{}: decode accepted a block validate rejects",
                    FORMATS[fmt]
                );
                if let Some(i) = out.iter().position(|v| !v.is_finite()) {
                    panic!("{}: decode gave {} at {i}", FORMATS[fmt], out[i]);
                }
            }
            Err(e) => {
                assert!(
                    !valid,
                    "{}: validate accepted a block decode rejects: {e}",
                    FORMATS[fmt]
                );
                return;
            }
        }
        // A deterministic query and attention weights from the block itself.
        let q: Vec<f32> = (0..D)
            .map(|i| ((block[i % n] as f32) - 128.0) / 64.0)
            .collect();
        let prep = codec.prep_query(&q);
        let mut scores = vec![0f32; g];
        codec.key_scores(&q, &prep, &block, 7, &s.rope, &mut scores);
        if let Some(i) = scores.iter().position(|v| !v.is_finite()) {
            panic!("{}: key_scores gave {} at {i}", FORMATS[fmt], scores[i]);
        }
        let p: Vec<f32> = (0..g).map(|t| 1.0 / (1 + t) as f32).collect();
        let mut acc = vec![0f32; D];
        codec.accumulate_values(&block, &p, &mut acc);
        if let Some(i) = acc.iter().position(|v| !v.is_finite()) {
            panic!("{}: accumulate_values gave {} at {i}", FORMATS[fmt], acc[i]);
        }
    });
});
