//! Property tests over every format: hostile values never panic and give finite, defined results;
//! arbitrary bytes never panic a decoder; bad config strings are errors naming the input.
use kvq_formats::testutil::gaussian_with_outliers;
use kvq_formats::{parse_format, KvPlan, Rope, RopeStyle};
use proptest::prelude::*;

/// Formats that need no external file (RVQ needs codebooks; its decoder is fuzzed in tests/rvq.rs).
const FORMATS: &[&str] = &[
    "fp16",
    "kivi:bits=2,window=0",
    "kivi:bits=4,window=8",
    "asymkv:lk=1,lv=0,window=0",
    "qjl:m=64,mo=16,buffer=0",
    "decoquant:bits=4,chunk=16",
    "decoquant:bits=2,chunk=32,svd=off",
];

fn hostile() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(0.0f32),
        Just(65504.0f32),
        Just(-1e30f32),
        -1e4f32..1e4f32,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// NaN -> 0, Inf -> +-65504 at the cache's door: every format then gives finite attention.
    #[test]
    fn hostile_values_give_finite_attention(vals in proptest::collection::vec(hostile(), 64 * 40), fmt in 0..FORMATS.len()) {
        let d = 64;
        let rope = Rope::new(d, 1e4, RopeStyle::Half);
        let mut c = KvPlan::parse(FORMATS[fmt], 1).unwrap().build_caches(1, &rope).unwrap().remove(0);
        c.append(&vals[..64 * 20], &vals[64 * 20..], 20).unwrap();
        let q = gaussian_with_outliers(2, d, 0, 1);
        let mut out = vec![0f32; 2 * d];
        c.attend(&q, 20, &mut out).unwrap();
        prop_assert!(out.iter().all(|v| v.is_finite()), "{} gave {:?}", FORMATS[fmt], &out[..4]);
        c.attend_fused(&q, 20, &mut out).unwrap();
        prop_assert!(out.iter().all(|v| v.is_finite()));
    }

    /// Constant rows (zero range) encode exactly enough: relative error under 1e-2.
    #[test]
    fn constant_data_round_trips(v in -100f32..100f32, fmt in 0..FORMATS.len()) {
        let d = 64;
        let rope = Rope::new(d, 1e4, RopeStyle::Half);
        let mut c = KvPlan::parse(FORMATS[fmt], 1).unwrap().build_caches(1, &rope).unwrap().remove(0);
        let x = vec![v; 64 * 40];
        c.append(&x, &x, 40).unwrap();
        let got = c.decoded(kvq_formats::Stream::Value, 0);
        let err = got.iter().map(|g| (g - half::f16::from_f32(v).to_f32()).abs()).fold(0f32, f32::max);
        // QJL's values are KIVI; fp16/KIVI/DecoQuant store constants to f16 precision.
        prop_assert!(err <= 1e-2 * v.abs().max(1.0), "{}: {err}", FORMATS[fmt]);
    }

    /// Arbitrary bytes: decode returns Ok or Err, never panics or reads out of bounds.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..3000), fmt in 0..FORMATS.len()) {
        let rope = Rope::new(64, 1e4, RopeStyle::Half);
        let caches = KvPlan::parse(FORMATS[fmt], 1).unwrap().build_caches(1, &rope).unwrap();
        for codec in [caches[0].keys().codec(), caches[0].values().codec()] {
            let mut out = vec![0f32; codec.block_tokens() * 64];
            let n = codec.block_bytes().min(bytes.len());
            let _ = codec.decode(&bytes[..n], &mut out);
            let _ = codec.validate(&bytes);
        }
    }

    /// Any string: parse_format returns Ok or an error that quotes the input.
    #[test]
    fn config_strings_never_panic(s in "[a-z0-9:=,;@-]{0,40}") {
        if let Err(e) = parse_format(&s) {
            prop_assert!(!e.to_string().is_empty());
        }
        let _ = KvPlan::parse(&s, 4);
    }
}

/// A plan file that is not a plan: not JSON, wrong shape, a bad format inside, a layer the model lacks.
/// Each is an error naming the file (and the layer/format at fault), never a panic.
#[test]
fn malformed_plan_files_are_errors() {
    let dir = std::env::temp_dir().join(format!("kvq-plan-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: &[(&str, &str)] = &[
        ("", "not a KV plan file"),
        ("{\"default\": \"fp16\"", "not a KV plan file"),
        ("[1, 2]", "not a KV plan file"),
        ("{\"layers\": {}}", "not a KV plan file"),
        ("{\"default\": 16}", "not a KV plan file"),
        ("{\"default\": \"kivi:bits=7\"}", "default"),
        (
            "{\"default\": \"fp16\", \"layers\": {\"1\": {\"v\": \"nonsense\"}}}",
            "layer 1 values",
        ),
        (
            "{\"default\": \"fp16\", \"layers\": {\"9\": {\"k\": \"fp16\"}}}",
            "layer 9 out of range",
        ),
        (
            "{\"default\": \"fp16\", \"layers\": {\"-1\": {\"k\": \"fp16\"}}}",
            "not a KV plan file",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let p = dir.join(format!("plan-{i}.json"));
        std::fs::write(&p, text).unwrap();
        let path = p.to_str().unwrap();
        let e = KvPlan::parse(path, 4).expect_err(text).to_string();
        assert!(e.contains(path) && e.contains(want), "{text:?}: {e}");
    }
    let e = KvPlan::parse("/nonexistent/plan.json", 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/plan.json"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
