//! The chunk attention of the CPU forward (matrix products over the cache's decoded mirror) equals
//! the cache's own per-query `attend` on the same cache, for every format that needs no file; and a
//! chunked forward equals a token-by-token forward with the fp16 cache.
use kvq_formats::{KvPlan, Rope, RopeStyle};
use kvq_model::model::attend_chunk;
use kvq_model::testutil::{temp_dir, write_random_llama, TinySpec};
use kvq_model::Model;

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let n: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let d: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (n / d).sqrt()
}

#[test]
fn chunk_attention_matches_cache_attend() {
    let (hq, hkv, d, t, n) = (6usize, 2usize, 64usize, 300usize, 45usize);
    let rope = Rope::new(d, 10000.0, RopeStyle::Interleaved);
    let mut s = 7u64;
    let mut rnd = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 2.0
            })
            .collect()
    };
    let (k, v, q) = (rnd(t * hkv * d), rnd(t * hkv * d), rnd(n * hq * d));
    for fmt in [
        "fp16",
        "kivi:bits=2",
        "kivi:bits=4",
        "asymkv",
        "qjl",
        "decoquant:bits=4,chunk=256",
    ] {
        let plan = KvPlan::parse(fmt, 1).unwrap();
        let mut cache = plan.build_caches(hkv, &rope).unwrap().remove(0);
        cache.append(&k, &v, t).unwrap();
        // The chunk's queries sit at positions t-n..t.
        let pos0 = t - n;
        let ours = attend_chunk(&cache, &q, pos0, n, (hq, hkv, d)).unwrap();
        let mut theirs = vec![0f32; n * hq * d];
        for i in 0..n {
            let r = i * hq * d..(i + 1) * hq * d;
            cache
                .attend(&q[r.clone()], pos0 + i + 1, &mut theirs[r])
                .unwrap();
        }
        let e = rel(&ours, &theirs);
        println!("{fmt}: chunk attention vs attend: relative error {e:.2e}");
        // Same decoded values, f32 sums in another order: tolerance 1e-5 (seen ~1e-7).
        assert!(e < 1e-5, "{fmt}: {e}");
    }
}

#[test]
fn chunked_forward_matches_token_by_token() {
    let dir = temp_dir("attn-chunks").unwrap();
    write_random_llama(&dir, &TinySpec::default()).unwrap();
    let m = Model::load(dir.to_str().unwrap()).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| (i * 11 + 7) % 96).collect();
    let plan = KvPlan::parse("fp16", m.config.n_layers).unwrap();
    let mut a = m.new_sequence(&plan, 64).unwrap();
    let mut chunked = Vec::new();
    for ch in ids.chunks(16) {
        chunked.extend(
            m.forward(&mut a, ch, None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    let mut b = m.new_sequence(&plan, 64).unwrap();
    let mut single = Vec::new();
    for &t in &ids {
        single.extend(
            m.forward(&mut b, &[t], None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    let e = rel(&chunked, &single);
    println!("chunks of 16 vs token by token: relative logits error {e:.2e}");
    // Same f16 cache contents; only f32 summation order differs: tolerance 1e-5.
    assert!(e < 1e-5, "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
