//! The bits/elem the sweep plots, checked against the byte layouts counted by hand (FORMATS.md):
//! every scale, zero, norm, index, sign and code of a sealed block, plus every token still in f16
//! (the full-precision window and an unfinished block), for K and V of a 2-layer plan.
use kvq_formats::testutil::gaussian_with_outliers;
use kvq_formats::{KvPlan, Rope, RopeStyle};

/// Bytes held after `n` tokens by a stream whose blocks are `bt` tokens of `block` bytes with a
/// `window`-token f16 window: blocks seal while more than window + one block wait.
fn by_hand(n: usize, bt: usize, block: usize, window: usize, d: usize) -> usize {
    let sealed = if n >= window + bt {
        (n - window) / bt * bt
    } else {
        0
    };
    sealed / bt * block + (n - sealed) * d * 2
}

#[test]
fn cache_bytes_count_metadata_and_the_f16_tokens() {
    let (d, heads, n) = (64usize, 3usize, 300usize);
    let rope = Rope::new(d, 10000.0, RopeStyle::Half);
    let k = gaussian_with_outliers(n * heads, d, 4, 1);
    let v = gaussian_with_outliers(n * heads, d, 0, 2);
    // (plan, per layer: (K block tokens, K block bytes, K window), (V ...)).
    type Stream = (usize, usize, usize);
    let cases: Vec<(&str, [(Stream, Stream); 2])> = vec![
        ("fp16", [((1, 2 * d, 0), (1, 2 * d, 0)); 2]),
        // KIVI-2, groups of 32: K = f16 scale + zero per channel + 32 x 64 x 2 bits; V = f16 scale +
        // zero per 32 channels per token + the same codes; 128 tokens in f16.
        (
            "kivi:bits=2",
            [(
                (32, 4 * d + 32 * d * 2 / 8, 128),
                (32, 32 * 2 * 2 * 2 + 32 * d * 2 / 8, 128),
            ); 2],
        ),
        // KIVI-4 in groups of 64 (llama.cpp q4_0's 4.5 bits/elem).
        (
            "kivi:bits=4,group=64,window=0",
            [(
                (64, 4 * d + 64 * d * 4 / 8, 0),
                (64, 64 * 2 * 2 + 64 * d * 4 / 8, 0),
            ); 2],
        ),
        // AsymKV lk=1, lv=0: layer 0 keys 2-bit, layer 1 keys 1-bit, values 1-bit everywhere.
        (
            "asymkv:lk=1,lv=0,window=16",
            [
                (
                    (32, 4 * d + 32 * d * 2 / 8, 16),
                    (32, 32 * 2 * 2 * 2 + 32 * d / 8, 16),
                ),
                (
                    (32, 4 * d + 32 * d / 8, 16),
                    (32, 32 * 2 * 2 * 2 + 32 * d / 8, 16),
                ),
            ],
        ),
        // QJL, layer 0 < l0 uses m0 = 512 rows: 8 outlier indices (padded to 4), two f16 norms per
        // token, m/8 sign bytes and mo/8 outlier sign bytes per token; values KIVI-2, buffer 128.
        (
            "qjl:l0=1",
            [
                (
                    (32, 8 + 32 * 4 + 32 * 512 / 8 + 32 * 64 / 8, 128),
                    (32, 768, 128),
                ),
                (
                    (32, 8 + 32 * 4 + 32 * 256 / 8 + 32 * 64 / 8, 128),
                    (32, 768, 128),
                ),
            ],
        ),
        // DecoQuant-4, chunk 256: f16 16x16 T_S, one f16 scale per token, 4-bit codes.
        (
            "decoquant:bits=4,chunk=256",
            [(
                (256, 16 * 16 * 2 + 256 * 2 + 256 * d * 4 / 8, 0),
                (256, 16 * 16 * 2 + 256 * 2 + 256 * d * 4 / 8, 0),
            ); 2],
        ),
    ];
    for (plan, layers) in cases {
        let p = KvPlan::parse(plan, 2).unwrap();
        let mut caches = p.build_caches(heads, &rope).unwrap();
        let (mut want, mut got) = (0usize, 0usize);
        for (l, c) in caches.iter_mut().enumerate() {
            c.append(&k, &v, n).unwrap();
            let b = c.bytes();
            let ((kbt, kb, kw), (vbt, vb, vw)) = layers[l];
            let w = heads * (by_hand(n, kbt, kb, kw, d) + by_hand(n, vbt, vb, vw, d));
            assert_eq!(b.packed + b.window, w, "{plan} layer {l}");
            assert_eq!(b.elems, 2 * n * heads * d, "{plan}");
            want += w;
            got += b.packed + b.window;
        }
        let total = kvq_formats::plan::total_bytes(&caches);
        assert_eq!(total.packed + total.window, got);
        let bits = total.bits_per_elem();
        assert!(
            (bits - want as f64 * 8.0 / (2.0 * 2.0 * (n * heads * d) as f64)).abs() < 1e-12,
            "{plan}: {bits}"
        );
    }
}
