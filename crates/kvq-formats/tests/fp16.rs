//! fp16 baseline: both readers agree with exact attention to f16 rounding.
use kvq_formats::testutil::attention_check;

#[test]
fn fp16_matches_exact_attention() {
    for (t, qh, kvh) in [(1, 1, 1), (37, 4, 1), (300, 8, 2)] {
        let c = attention_check("fp16", t, 64, kvh, qh, 16, 7).unwrap();
        // Keys are rounded to f16 after RoPE (as stored); the reference rotates unrounded-by-then keys.
        assert!(c.vs_exact < 2e-3, "{c:?}");
        assert!(c.fused_vs_mirror < 1e-6, "{c:?}");
        assert!(c.key_err < 1e-3, "{c:?}");
        assert_eq!(c.value_err, 0.0);
        assert_eq!(c.bits_per_elem, 16.0);
    }
}
