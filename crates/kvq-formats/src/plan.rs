//! A KV plan: which format stores the keys and which the values of each layer.
//!
//! Grammar (segments separated by `;`, later segments override earlier ones):
//! `FORMAT` (K and V of every layer), or `SEL=FORMAT` with `SEL` = `k`, `v` or `kv`, optionally
//! followed by `@A-B` or `@A` (layers, inclusive). Example: `kivi:bits=2;k@0-3=fp16`.
//! A path ending in `.json` is a plan file: `{"default": "...", "layers": {"0": {"k": "...", "v": "..."}}}`.

use crate::cache::{CacheBytes, LayerCache};
use crate::codec::{FormatRef, Stream, StreamCtx};
use crate::error::{parse_err, FormatError, Result};
use crate::formats::parse_format;
use crate::rope::Rope;
use std::collections::BTreeMap;

/// Per-layer K and V formats of a model.
#[derive(Debug, Clone)]
pub struct KvPlan {
    layers: Vec<(FormatRef, FormatRef)>,
}

/// The JSON form of a plan file, as `kvq tune` writes it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PlanFile {
    /// Format of every layer not listed.
    pub default: String,
    /// Per-layer overrides, keyed by layer index.
    #[serde(default)]
    pub layers: BTreeMap<usize, LayerSpec>,
}

/// One layer's override in a plan file.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LayerSpec {
    /// Key format (absent: the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<String>,
    /// Value format (absent: the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<String>,
}

impl KvPlan {
    /// Parses a plan string or loads a `.json` plan file, for a model of `n_layers` layers.
    pub fn parse(s: &str, n_layers: usize) -> Result<Self> {
        if s.trim().ends_with(".json") {
            return Self::load(s.trim(), n_layers);
        }
        let mut layers: Vec<Option<(FormatRef, FormatRef)>> = vec![None; n_layers];
        let mut first = true;
        for seg in s.split(';').map(str::trim).filter(|x| !x.is_empty()) {
            let (sel, range, fmt) = split_selector(seg, n_layers)?;
            let f = parse_format(fmt)?;
            let (lo, hi) = range.unwrap_or((0, n_layers.saturating_sub(1)));
            for slot in layers.iter_mut().take(hi + 1).skip(lo) {
                let cur = slot.clone().unwrap_or_else(|| (f.clone(), f.clone()));
                *slot = Some(match sel {
                    "k" => (f.clone(), cur.1),
                    "v" => (cur.0, f.clone()),
                    _ => (f.clone(), f.clone()),
                });
            }
            first = false;
        }
        if first {
            return Err(parse_err(s, "empty KV plan"));
        }
        let layers = layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| l.ok_or_else(|| parse_err(s, format!("layer {i} has no format"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Loads a JSON plan file.
    pub fn load(path: &str, n_layers: usize) -> Result<Self> {
        let file_err = |reason: String| FormatError::File {
            path: path.to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let pf: PlanFile = serde_json::from_str(&text)
            .map_err(|e| file_err(format!("not a KV plan file: {e}")))?;
        let fmt =
            |what: String, s: &str| parse_format(s).map_err(|e| file_err(format!("{what}: {e}")));
        let def = fmt("default".into(), &pf.default)?;
        let mut layers = vec![(def.clone(), def); n_layers];
        for (&l, spec) in &pf.layers {
            if l >= n_layers {
                return Err(file_err(format!(
                    "layer {l} out of range: model has {n_layers}"
                )));
            }
            if let Some(k) = &spec.k {
                layers[l].0 = fmt(format!("layer {l} keys"), k)?;
            }
            if let Some(v) = &spec.v {
                layers[l].1 = fmt(format!("layer {l} values"), v)?;
            }
        }
        Ok(Self { layers })
    }

    /// The plan as a plan file (what `kvq tune` saves).
    pub fn to_file(&self) -> PlanFile {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (k, v) in &self.layers {
            *counts.entry(k.canonical()).or_default() += 1;
            *counts.entry(v.canonical()).or_default() += 1;
        }
        let default = counts
            .iter()
            .max_by_key(|(_, c)| **c)
            .map(|(s, _)| s.clone())
            .unwrap_or_default();
        let mut layers = BTreeMap::new();
        for (i, (k, v)) in self.layers.iter().enumerate() {
            let (kc, vc) = (k.canonical(), v.canonical());
            if kc != default || vc != default {
                let spec = LayerSpec {
                    k: (kc != default).then_some(kc),
                    v: (vc != default).then_some(vc),
                };
                layers.insert(i, spec);
            }
        }
        PlanFile { default, layers }
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The K and V formats of layer `l`.
    pub fn layer(&self, l: usize) -> (&FormatRef, &FormatRef) {
        (&self.layers[l].0, &self.layers[l].1)
    }

    /// Sets layer `l`'s format for one stream (`kvq tune` edits plans this way).
    pub fn set(&mut self, l: usize, stream: Stream, f: FormatRef) {
        match stream {
            Stream::Key => self.layers[l].0 = f,
            Stream::Value => self.layers[l].1 = f,
        }
    }

    /// A canonical description that parses back to the same plan: the single format if uniform,
    /// `k=A;v=B` if each stream is uniform, else the commonest format with per-layer overrides.
    pub fn describe(&self) -> String {
        let f = self.to_file();
        let uniform = |i: usize| {
            let pick = |l: &(FormatRef, FormatRef)| {
                if i == 0 {
                    l.0.canonical()
                } else {
                    l.1.canonical()
                }
            };
            let first = self.layers.first().map(pick);
            first.filter(|c| self.layers.iter().all(|l| pick(l) == *c))
        };
        if f.layers.is_empty() {
            f.default
        } else if let (Some(k), Some(v)) = (uniform(0), uniform(1)) {
            format!("k={k};v={v}")
        } else {
            let mut s = f.default.to_string();
            for (l, spec) in &f.layers {
                if let Some(k) = &spec.k {
                    s.push_str(&format!(";k@{l}={k}"));
                }
                if let Some(v) = &spec.v {
                    s.push_str(&format!(";v@{l}={v}"));
                }
            }
            s
        }
    }

    /// Checks every format against the head size before anything is allocated.
    pub fn supports(&self, head_dim: usize) -> Result<()> {
        for (k, v) in &self.layers {
            k.supports_stream(head_dim, crate::Stream::Key)?;
            v.supports_stream(head_dim, crate::Stream::Value)?;
        }
        Ok(())
    }

    /// Builds the empty per-layer caches of one sequence.
    pub fn build_caches(&self, n_kv_heads: usize, rope: &Rope) -> Result<Vec<LayerCache>> {
        let head_dim = rope.head_dim();
        self.supports(head_dim)?;
        let n_layers = self.layers.len();
        self.layers
            .iter()
            .enumerate()
            .map(|(layer, (kf, vf))| {
                let ctx = |stream| StreamCtx {
                    layer,
                    n_layers,
                    stream,
                    head_dim,
                    n_kv_heads,
                    rope: rope.clone(),
                };
                let k = kf.build(&ctx(Stream::Key))?;
                let v = vf.build(&ctx(Stream::Value))?;
                Ok(LayerCache::new(k, v, n_kv_heads, rope.clone()))
            })
            .collect()
    }
}

/// Sums the memory of a sequence's layer caches.
pub fn total_bytes(caches: &[LayerCache]) -> CacheBytes {
    let mut b = CacheBytes::default();
    for c in caches {
        b.add(&c.bytes());
    }
    b
}

/// Splits `k@0-3=FORMAT` into ("k", Some((0,3)), "FORMAT"); a bare format gives ("kv", None, s).
/// A plan segment split into (stream selector, layer range, format string).
type Selector<'a> = (&'a str, Option<(usize, usize)>, &'a str);

fn split_selector(seg: &str, n_layers: usize) -> Result<Selector<'_>> {
    let Some((head, rest)) = seg.split_once('=') else {
        return Ok(("kv", None, seg));
    };
    let (sel, range) = match head.split_once('@') {
        Some((s, r)) => (s.trim(), Some(r.trim())),
        None => (head.trim(), None),
    };
    if !matches!(sel, "k" | "v" | "kv") {
        return Ok(("kv", None, seg));
    }
    let range = match range {
        None => None,
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let num = |x: &str| {
                x.trim()
                    .parse::<usize>()
                    .map_err(|_| parse_err(seg, format!("'{r}' is not a layer or layer range A-B")))
            };
            let (a, b) = (num(a)?, num(b)?);
            if a > b || b >= n_layers {
                return Err(parse_err(
                    seg,
                    format!("layers {a}-{b} outside 0-{}", n_layers.saturating_sub(1)),
                ));
            }
            Some((a, b))
        }
    };
    Ok((sel, range, rest.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_strings() {
        let p = KvPlan::parse("fp16", 4).unwrap();
        assert_eq!(p.describe(), "fp16");
        assert!(KvPlan::parse("", 4).is_err());
        assert!(KvPlan::parse("nope", 4).is_err());
        assert!(KvPlan::parse("k@0-9=fp16", 4).is_err());
        assert!(
            KvPlan::parse("k@1=fp16", 4).is_err(),
            "layers without a format must be an error"
        );
        let p = KvPlan::parse("fp16;k@1-2=fp16", 4).unwrap();
        assert_eq!(p.n_layers(), 4);
        let f = p.to_file();
        let back = serde_json::to_string(&f).unwrap();
        assert!(back.contains("fp16"));
        // Each stream uniform: described as k=...;v=..., which parses back to the same plan.
        let p = KvPlan::parse("k=kivi:bits=4;v=kivi:bits=2", 4).unwrap();
        let d = p.describe();
        assert_eq!(
            d,
            "k=kivi:bits=4,group=32,window=128;v=kivi:bits=2,group=32,window=128"
        );
        assert_eq!(KvPlan::parse(&d, 4).unwrap().describe(), d);
        let p = KvPlan::parse("kivi:bits=4;k@1=fp16", 4).unwrap();
        assert_eq!(p.describe(), "kivi:bits=4,group=32,window=128;k@1=fp16");
    }
}
