//! The kvq CPU forward with the fp16 cache against candle-transformers' own llama on the same random
//! safetensors model: logits of a chunked prompt and of incremental decode steps.
mod common;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama as cl;
use kvq_formats::KvPlan;
use kvq_model::Model;

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let n: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let d: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (n / d).sqrt()
}

#[test]
fn fp16_cache_matches_candle_llama() {
    let dir = common::write_random_llama("parity");
    let model = Model::load(dir.to_str().unwrap()).unwrap();
    let cfg_text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg: cl::LlamaConfig = serde_json::from_str(&cfg_text).unwrap();
    let cfg = cfg.into_config(false);
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let reference = cl::Llama::load(vb, &cfg).unwrap();
    let mut cache = cl::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();

    let ids: Vec<u32> = vec![1, 5, 9, 33, 2, 70, 11, 4, 90, 17];
    let plan = KvPlan::parse("fp16", model.config.n_layers).unwrap();
    let mut seq = model.new_sequence(&plan, 64).unwrap();
    // Prompt of 6 tokens in chunks of 4 and 2, then 4 single-token steps.
    let mut ours = Vec::new();
    let a = model.forward(&mut seq, &ids[..4], None).unwrap();
    let _ = a;
    let b = model.forward(&mut seq, &ids[4..6], None).unwrap();
    ours.push(b.to_vec2::<f32>().unwrap().pop().unwrap());
    for &t in &ids[6..] {
        ours.push(
            model
                .forward(&mut seq, &[t], None)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .pop()
                .unwrap(),
        );
    }
    let mut theirs = Vec::new();
    let x = Tensor::new(&ids[..6], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    theirs.push(
        reference
            .forward(&x, 0, &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
    );
    for (i, &t) in ids[6..].iter().enumerate() {
        let x = Tensor::new(&[t], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        theirs.push(
            reference
                .forward(&x, 6 + i, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    for (step, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        let e = rel(o, t);
        // kvq stores K/V as f16 (the fp16 cache); candle keeps f32: agreement to f16 rounding.
        assert!(e < 2e-3, "step {step}: relative logits error {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
