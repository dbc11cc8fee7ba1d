//! The safetensors and GGUF loaders agree on the same model: the random HF model converted to GGUF
//! (Wq/Wk permuted for interleaved RoPE, as llama.cpp converts) gives the same logits, and a
//! quantized GGUF written back as HF by `convert::write_hf` gives the same logits as the GGUF.
use candle_core::quantized::GgmlDType;
use kvq_formats::KvPlan;
use kvq_model::testutil::{hf_to_gguf, temp_dir, write_random_llama, TinySpec};
use kvq_model::Model;

fn logits(m: &Model, ids: &[u32]) -> Vec<f32> {
    let plan = KvPlan::parse("fp16", m.config.n_layers).unwrap();
    let mut seq = m.new_sequence(&plan, 64).unwrap();
    let mut all = Vec::new();
    for ch in ids.chunks(5) {
        all.extend(
            m.forward(&mut seq, ch, None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    all
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let n: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let d: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (n / d).sqrt()
}

#[test]
fn safetensors_and_gguf_agree() {
    let ids: Vec<u32> = (0..23).map(|i| (i * 13 + 3) % 96).collect();
    for tied in [false, true] {
        let spec = TinySpec {
            tied,
            seed: 3,
            ..TinySpec::default()
        };
        let dir = temp_dir(&format!("loaders-{tied}")).unwrap();
        write_random_llama(&dir, &spec).unwrap();
        let hf = Model::load(dir.to_str().unwrap()).unwrap();
        let g = dir.join("model-f32.gguf");
        hf_to_gguf(&dir, &g, &spec, GgmlDType::F32).unwrap();
        let gg = Model::load(g.to_str().unwrap()).unwrap();
        assert_eq!(gg.config.rope_style, kvq_formats::RopeStyle::Interleaved);
        assert_eq!(hf.config.rope_style, kvq_formats::RopeStyle::Half);
        assert_eq!(gg.weights.tied, tied);
        // Same arithmetic in a different channel order: only summation order differs (f32), and the
        // fp16 cache rounds the same values. Tolerance 1e-5 relative (seen ~1e-7).
        let e = rel(&logits(&gg, &ids), &logits(&hf, &ids));
        println!("tied={tied}: HF safetensors vs GGUF f32: relative logits error {e:.2e}");
        assert!(e < 1e-5, "tied={tied}: {e}");

        // Quantized GGUF (Q8_0 and Q4_1 weights, dequantized on load) written back as HF.
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let q = dir.join("model-q.gguf");
            hf_to_gguf(&dir, &q, &spec, dtype).unwrap();
            let qm = Model::load(q.to_str().unwrap()).unwrap();
            let back = dir.join("back");
            kvq_model::convert::write_hf(&qm, &back).unwrap();
            let bm = Model::load(back.to_str().unwrap()).unwrap();
            assert_eq!(bm.weights.tied, tied);
            let e = rel(&logits(&qm, &ids), &logits(&bm, &ids));
            println!(
                "tied={tied}: {dtype:?} GGUF vs its HF conversion: relative logits error {e:.2e}"
            );
            assert!(e < 1e-5, "{dtype:?}: {e}");
            // The quantization itself changes the logits (so it did happen), within what its step
            // allows on uniform random weights: Q8_0 < 5% (seen ~1.5%), Q4_1 < 50% (seen ~22%).
            let eq = rel(&logits(&qm, &ids), &logits(&hf, &ids));
            println!("tied={tied}: {dtype:?} vs f32 weights: relative logits difference {eq:.2e}");
            let bound = if dtype == GgmlDType::Q8_0 { 0.05 } else { 0.5 };
            assert!(eq > 1e-4 && eq < bound, "{dtype:?} vs f32: {eq}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn sharded_safetensors_load_like_one_file() {
    let spec = TinySpec {
        seed: 4,
        ..TinySpec::default()
    };
    let dir = temp_dir("loaders-sharded").unwrap();
    write_random_llama(&dir, &spec).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 17 + 1) % 96).collect();
    let one = logits(&Model::load(dir.to_str().unwrap()).unwrap(), &ids);
    // Split the tensors over two shards with an index, as transformers saves large models.
    let all =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (s, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", s + 1);
        let shard: std::collections::HashMap<String, candle_core::Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.join(&file)).unwrap();
        for n in part {
            map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let sharded = logits(&Model::load(dir.to_str().unwrap()).unwrap(), &ids);
    assert_eq!(
        one, sharded,
        "the same tensors must give bit-identical logits"
    );
    // A shard named by the index but missing is an error naming it.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = Model::load(dir.to_str().unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// F16 GGUF weights take the loader's direct path (file bytes to the transposed f32 matrix on all
/// cores): each matrix must equal the HF model's, rounded to f16, exactly, for shapes off the
/// 32-element tiles and for a separate output head.
#[test]
fn f16_gguf_weights_are_the_hf_weights_rounded_to_f16() {
    // Every dimension off the 32-element tiles: vocab 100, hidden 72 (4 heads of 18), KV 36, FFN 100.
    let spec = TinySpec {
        vocab: 100,
        hidden: 72,
        intermediate: 100,
        tied: false,
        seed: 5,
        ..TinySpec::default()
    };
    let dir = temp_dir("loaders-f16").unwrap();
    write_random_llama(&dir, &spec).unwrap();
    let hf = Model::load(dir.to_str().unwrap()).unwrap();
    let g = dir.join("model-f16.gguf");
    hf_to_gguf(&dir, &g, &spec, GgmlDType::F16).unwrap();
    let gg = Model::load(g.to_str().unwrap()).unwrap();
    let f16_round = |t: &candle_core::Tensor| -> Vec<f32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect()
    };
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (a, b) = (&gg.weights, &hf.weights);
    // Wq/Wk rows are permuted in the GGUF (interleaved RoPE); the others are stored as HF has them.
    let pairs = [
        ("wv", &a.layers[0].wv, &b.layers[0].wv),
        ("wo", &a.layers[0].wo, &b.layers[0].wo),
        ("w_gate", &a.layers[1].w_gate, &b.layers[1].w_gate),
        ("w_up", &a.layers[1].w_up, &b.layers[1].w_up),
        ("w_down", &a.layers[1].w_down, &b.layers[1].w_down),
        ("lm_head", &a.lm_head, &b.lm_head),
    ];
    for (name, x, y) in pairs {
        assert_eq!(x.dims(), y.dims(), "{name}");
        assert_eq!(flat(x), f16_round(y), "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
