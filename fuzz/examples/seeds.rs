//! Writes the tracked seed inputs under fuzz/corpus/<target>/seed-*: valid plans, one block of each
//! format encoded from real data, and a tiny model as GGUF and as an HF directory (packed the way
//! hf_load splits its input). Run from fuzz/: `cargo run --example seeds`.
use candle_core::quantized::GgmlDType;
use kvq_formats::{KvPlan, Rope, RopeStyle};
use kvq_model::testutil::{hf_to_gguf, temp_dir, write_random_llama, TinySpec};
use std::path::Path;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let d = Path::new("corpus").join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(format!("seed-{name}")), bytes).unwrap();
}

fn main() {
    // plan_parse: first byte picks the layer count (b % 9), so these are 4-layer plans ('4' = 52).
    put("plan_parse", "string", b"4kivi:bits=2;k@0-1=fp16;v@3=qjl");
    put(
        "plan_parse",
        "mixed",
        b"4decoquant:bits=4,chunk=64;kv@2=asymkv:lk=1,lv=0",
    );
    put(
        "plan_parse",
        "json",
        br#"{"default":"kivi:bits=2","layers":{"0":{"k":"fp16"},"3":{"v":"qjl"}}}"#,
    );

    // block_decode: [format index, stream bit] then one encoded block.
    let formats = ["fp16", "kivi:bits=2", "qjl", "decoquant:bits=4,chunk=64"];
    let d = 64;
    let rope = Rope::new(d, 10000.0, RopeStyle::Interleaved);
    for (i, f) in formats.iter().enumerate() {
        let c = KvPlan::parse(f, 1)
            .unwrap()
            .build_caches(1, &rope)
            .unwrap()
            .remove(0);
        for (s, codec) in [c.keys().codec(), c.values().codec()]
            .into_iter()
            .enumerate()
        {
            let x = kvq_formats::testutil::gaussian_with_outliers(codec.block_tokens(), d, 2, 7);
            let mut block = vec![0u8; codec.block_bytes()];
            codec.encode(&x, &mut block);
            let mut input = vec![i as u8, s as u8];
            input.extend_from_slice(&block);
            put("block_decode", &format!("{i}-{s}"), &input);
        }
    }

    // A tiny model: 8 tokens, hidden 8, one layer.
    let spec = TinySpec {
        vocab: 8,
        hidden: 8,
        intermediate: 16,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        max_pos: 32,
        ..TinySpec::default()
    };
    let dir = temp_dir("fuzz-seeds").unwrap();
    let hf = dir.join("hf");
    write_random_llama(&hf, &spec).unwrap();
    let g = dir.join("tiny.gguf");
    hf_to_gguf(&hf, &g, &spec, GgmlDType::F32).unwrap();
    kvq_model::load::load(g.to_str().unwrap()).expect("seed GGUF loads");
    put("gguf_load", "tiny-f32", &std::fs::read(&g).unwrap());

    kvq_model::load::load(hf.to_str().unwrap()).expect("seed HF dir loads");
    let cfg = std::fs::read(hf.join("config.json")).unwrap();
    let st = std::fs::read(hf.join("model.safetensors")).unwrap();
    let mut input = (cfg.len() as u16).to_le_bytes().to_vec();
    input.extend_from_slice(&cfg);
    input.extend_from_slice(&st);
    put("hf_load", "tiny-f32", &input);
    let _ = std::fs::remove_dir_all(&dir);
}
