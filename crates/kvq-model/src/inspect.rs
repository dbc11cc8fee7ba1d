//! Format error on real keys and values: the model's K/V over a text are captured once, then stored in
//! each format's cache (every layer with its own codec) and read back; reports bits/elem and the
//! relative L2 error of keys (after RoPE, as attention sees them) and values.

use crate::error::Result;
use crate::model::Model;
use kvq_formats::{KvPlan, Stream};

/// One row of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KvErrorRow {
    /// KV plan.
    pub kv: String,
    /// Bits per element held (window counted).
    pub bits_per_elem: f64,
    /// ||K_hat - K|| / ||K|| over all layers and heads.
    pub key_err: f64,
    /// ||V_hat - V|| / ||V||.
    pub value_err: f64,
}

/// Captures the K/V of `ids` (one window) and measures each format in `plans` on them.
pub fn kv_errors(model: &Model, ids: &[u32], plans: &[String]) -> Result<Vec<KvErrorRow>> {
    let c = &model.config;
    let (d, h, n) = (c.head_dim, c.n_kv_heads, ids.len());
    let mut ks: Vec<Vec<f32>> = vec![Vec::new(); c.n_layers];
    let mut vs: Vec<Vec<f32>> = vec![Vec::new(); c.n_layers];
    model.capture(ids, n, &mut |l, _, _q, k, v| {
        ks[l].extend_from_slice(k);
        vs[l].extend_from_slice(v);
    })?;
    let mut rows = Vec::new();
    for p in plans {
        let plan = KvPlan::parse(p, c.n_layers)?;
        let caches = plan.build_caches(h, &model.rope)?;
        let (mut kn, mut kd, mut vn, mut vd) = (0f64, 0f64, 0f64, 0f64);
        let mut bytes = kvq_formats::CacheBytes::default();
        for (l, mut cache) in caches.into_iter().enumerate() {
            cache.append(&ks[l], &vs[l], n)?;
            for hh in 0..h {
                let (kh, vh) = (
                    cache.decoded(Stream::Key, hh),
                    cache.decoded(Stream::Value, hh),
                );
                for t in 0..n {
                    let mut k: Vec<f32> = ks[l][(t * h + hh) * d..(t * h + hh + 1) * d].to_vec();
                    model.rope.rotate(&mut k, t, 1.0);
                    let v = &vs[l][(t * h + hh) * d..(t * h + hh + 1) * d];
                    for i in 0..d {
                        kn += ((kh[t * d + i] - k[i]) as f64).powi(2);
                        kd += (k[i] as f64).powi(2);
                        vn += ((vh[t * d + i] - v[i]) as f64).powi(2);
                        vd += (v[i] as f64).powi(2);
                    }
                }
            }
            bytes.add(&cache.bytes());
        }
        rows.push(KvErrorRow {
            kv: plan.describe(),
            bits_per_elem: bytes.bits_per_elem(),
            key_err: (kn / kd).sqrt(),
            value_err: (vn / vd).sqrt(),
        });
    }
    Ok(rows)
}
