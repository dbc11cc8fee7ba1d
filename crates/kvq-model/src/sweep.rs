//! The quality sweep of issue 12: many KV plans over one text, each as a perplexity ratio to the fp16
//! cache at its bits/elem, merged with a peer's column (llama.cpp's KV types, each as a ratio to its
//! own f16 run), the Pareto front (fewest bits for a given ratio) and the Markdown table.
//! The CLI runs the plans and draws the plot; this module holds what tests can check without a model.

use crate::eval::{PplOpts, PplResult};
use serde::{Deserialize, Serialize};

/// Everything one sweep measured; written as JSON after every plan, so a sweep can be resumed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SweepDoc {
    /// Model file or directory.
    #[serde(default)]
    pub model: String,
    /// Evaluation text.
    #[serde(default)]
    pub text: String,
    /// Tokens of the text.
    #[serde(default)]
    pub text_tokens: usize,
    /// Window options.
    #[serde(default)]
    pub opts: Option<PplOpts>,
    /// Seed of the window sample (absent: the first windows of the text).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Window start positions (text tokens).
    #[serde(default)]
    pub window_starts: Vec<usize>,
    /// One result per KV plan, in run order.
    #[serde(default)]
    pub results: Vec<PplResult>,
    /// The peer's column, if merged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerDoc>,
}

/// A peer's perplexity runs, as `scripts/peer-ppl.sh` writes them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerDoc {
    /// Which program measured them.
    #[serde(default)]
    pub peer: String,
    /// Window length.
    #[serde(default)]
    pub ctx: usize,
    /// Windows (llama-perplexity's chunks).
    #[serde(default)]
    pub chunks: usize,
    /// Tokens scored.
    #[serde(default)]
    pub scored_tokens: usize,
    /// One row per KV type pair.
    pub results: Vec<PeerRow>,
}

/// One peer run: a KV type pair at its bits/elem, its perplexity and ratio to the peer's own f16.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerRow {
    /// Label, e.g. `llama.cpp -ctk q4_0 -ctv f16`.
    pub kv: String,
    /// Bits per element, K and V averaged.
    pub bits_per_elem: f64,
    /// Perplexity.
    pub ppl: f64,
    /// Perplexity over the peer's own f16 perplexity.
    pub ratio: f64,
}

/// One point of the quality/bits plane.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Plan or peer label.
    pub label: String,
    /// Bits per element.
    pub bits: f64,
    /// Perplexity over the same program's fp16 perplexity.
    pub ratio: f64,
}

/// The quality targets of issue 12: (bits/elem at most, ppl ratio at most).
pub const TARGETS: [(f64, f64); 3] = [(4.5, 1.01), (3.0, 1.03), (2.2, 1.15)];

impl SweepDoc {
    /// The fp16 perplexity the ratios are taken against.
    pub fn reference(&self) -> Option<f64> {
        self.results.iter().find(|r| r.kv == "fp16").map(|r| r.ppl)
    }

    /// kvq's points (fp16 included), in run order; empty without an fp16 row.
    pub fn points(&self) -> Vec<Point> {
        let Some(base) = self.reference() else {
            return Vec::new();
        };
        self.results
            .iter()
            .map(|r| Point {
                label: r.kv.clone(),
                bits: r.bits_per_elem,
                ratio: r.ppl / base,
            })
            .collect()
    }

    /// The peer's points.
    pub fn peer_points(&self) -> Vec<Point> {
        self.peer
            .iter()
            .flat_map(|p| &p.results)
            .map(|r| Point {
                label: r.kv.clone(),
                bits: r.bits_per_elem,
                ratio: r.ratio,
            })
            .collect()
    }

    /// The Markdown table: kvq's rows, then the peer's, the Pareto front marked, then the targets.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let pts = self.points();
        let front = pareto_front(&pts);
        s.push_str("| source | KV plan | bits/elem | bits/elem (scored mean) | ppl | ratio to fp16 | Pareto | scored tokens |\n");
        s.push_str("|---|---|---|---|---|---|---|---|\n");
        for (i, r) in self.results.iter().enumerate() {
            let ratio = pts
                .get(i)
                .map(|p| format!("{:.4}", p.ratio))
                .unwrap_or_else(|| "-".into());
            // Results from before the scored mean was recorded carry 0: shown as "-".
            let mean = if r.bits_per_elem_scored > 0.0 {
                format!("{:.3}", r.bits_per_elem_scored)
            } else {
                "-".into()
            };
            s.push_str(&format!(
                "| kvq | `{}` | {:.3} | {} | {:.4} | {} | {} | {} |\n",
                r.kv,
                r.bits_per_elem,
                mean,
                r.ppl,
                ratio,
                if front.contains(&i) { "yes" } else { "" },
                r.scored
            ));
        }
        let peer = self.peer_points();
        let pfront = pareto_front(&peer);
        if let Some(p) = &self.peer {
            for (i, r) in p.results.iter().enumerate() {
                s.push_str(&format!(
                    "| llama.cpp | `{}` | {:.3} | {:.3} | {:.4} | {:.4} | {} | {} |\n",
                    r.kv.trim_start_matches("llama.cpp "),
                    r.bits_per_elem,
                    r.bits_per_elem,
                    r.ppl,
                    r.ratio,
                    if pfront.contains(&i) { "yes" } else { "" },
                    p.scored_tokens
                ));
            }
        }
        s.push('\n');
        s.push_str(
            "| target | best kvq plan within the bits | its ratio | met |\n|---|---|---|---|\n",
        );
        for (bits, ratio) in TARGETS {
            match best_within(&pts, bits) {
                Some(p) => s.push_str(&format!(
                    "| ratio <= {ratio} at <= {bits} bits/elem | `{}` ({:.3} bits) | {:.4} | {} |\n",
                    p.label,
                    p.bits,
                    p.ratio,
                    if p.ratio <= ratio { "yes" } else { "no" }
                )),
                None => s.push_str(&format!(
                    "| ratio <= {ratio} at <= {bits} bits/elem | none measured | - | no |\n"
                )),
            }
        }
        s
    }
}

/// Indices of the Pareto front of `pts` (no other point has fewer or equal bits and a lower ratio),
/// ordered by bits; non-finite points are never on it. Ties in bits keep the lower ratio.
pub fn pareto_front(pts: &[Point]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..pts.len())
        .filter(|&i| pts[i].bits.is_finite() && pts[i].ratio.is_finite())
        .collect();
    idx.sort_by(|&a, &b| {
        pts[a]
            .bits
            .total_cmp(&pts[b].bits)
            .then(pts[a].ratio.total_cmp(&pts[b].ratio))
    });
    let mut front = Vec::new();
    let mut best = f64::INFINITY;
    for i in idx {
        if pts[i].ratio < best {
            best = pts[i].ratio;
            front.push(i);
        }
    }
    front
}

/// The point with the lowest ratio among those with at most `bits` bits/elem.
pub fn best_within(pts: &[Point], bits: f64) -> Option<&Point> {
    pts.iter()
        .filter(|p| p.bits <= bits + 1e-9 && p.ratio.is_finite())
        .min_by(|a, b| a.ratio.total_cmp(&b.ratio))
}

/// Reads a plans file: one KV plan per line; blank lines and lines starting with `#` are skipped.
pub fn parse_plans_file(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// A short label for a plot: the plan without its codebook path and default-like noise.
pub fn short_label(kv: &str) -> String {
    if kv.starts_with("llama.cpp") {
        let t: Vec<&str> = kv.split_whitespace().collect();
        // `llama.cpp -ctk A -ctv B`
        return match (t.get(2), t.get(4)) {
            (Some(a), Some(b)) if a == b => a.to_string(),
            (Some(a), Some(b)) => format!("K {a} V {b}"),
            _ => kv.to_string(),
        };
    }
    let segs: Vec<String> = kv
        .split(';')
        .map(|seg| {
            let (head, params) = seg.split_once(':').unwrap_or((seg, ""));
            let kept: Vec<&str> = params
                .split(',')
                .filter(|p| {
                    !p.is_empty()
                        && !p.starts_with("codebooks=")
                        && !p.starts_with("sub=")
                        && !p.starts_with("seed=")
                        && !p.starts_with("svd=on")
                        && !p.starts_with("m0=")
                        && !p.starts_with("l0=")
                        && !p.starts_with("codes=")
                })
                .collect();
            if kept.is_empty() {
                head.to_string()
            } else {
                format!("{head}:{}", kept.join(","))
            }
        })
        .collect();
    let s = segs.join(";");
    if segs.len() > 2 {
        format!("mixed ({} segments)", segs.len())
    } else {
        s.replace("bits=", "b")
            .replace("group=", "g")
            .replace("window=", "w")
            .replace("buffer=", "buf")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(bits: f64, ratio: f64) -> Point {
        Point {
            label: format!("{bits}/{ratio}"),
            bits,
            ratio,
        }
    }

    #[test]
    fn front_keeps_only_undominated_points() {
        let pts = vec![
            p(16.0, 1.0),
            p(5.0, 1.02),
            p(4.5, 1.05),
            p(4.5, 1.03), // same bits, lower ratio: it dominates the one above
            p(6.0, 1.10), // dominated by 5.0/1.02
            p(2.25, 1.3),
            p(3.0, f64::NAN),
            p(8.5, 1.0), // equal ratio to fp16 at fewer bits: fp16 leaves the front
        ];
        let f = pareto_front(&pts);
        assert_eq!(f, vec![5, 3, 1, 7]);
        let best = best_within(&pts, 4.5).unwrap();
        assert_eq!(best.ratio, 1.03);
        assert!(best_within(&pts, 2.0).is_none());
    }

    #[test]
    fn plans_file_and_labels() {
        let plans = parse_plans_file("# comment\nfp16\n\n  kivi:bits=2 \n");
        assert_eq!(plans, vec!["fp16", "kivi:bits=2"]);
        assert_eq!(
            short_label("rvq:group=32,codes=256,depth=8,groups=strided,window=0,codebooks=a/b.st"),
            "rvq:g32,depth=8,groups=strided,w0"
        );
        assert_eq!(short_label("llama.cpp -ctk q4_0 -ctv q4_0"), "q4_0");
        assert_eq!(short_label("llama.cpp -ctk q4_0 -ctv f16"), "K q4_0 V f16");
    }

    #[test]
    fn markdown_marks_front_and_targets() {
        let r = |kv: &str, bits: f64, ppl: f64| PplResult {
            kv: kv.into(),
            ppl,
            nll: ppl.ln(),
            scored: 8192,
            windows: 16,
            bits_per_elem: bits,
            bits_per_elem_scored: bits,
            kv_bytes: Default::default(),
            seconds: 1.0,
        };
        let doc = SweepDoc {
            results: vec![r("fp16", 16.0, 20.0), r("a", 4.5, 20.1), r("b", 2.0, 30.0)],
            peer: Some(PeerDoc {
                results: vec![PeerRow {
                    kv: "llama.cpp -ctk q4_0 -ctv q4_0".into(),
                    bits_per_elem: 4.5,
                    ppl: 10.5,
                    ratio: 1.05,
                }],
                scored_tokens: 8192,
                ..Default::default()
            }),
            ..Default::default()
        };
        let md = doc.markdown();
        assert!(
            md.contains("| kvq | `a` | 4.500 | 4.500 | 20.1000 | 1.0050 | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| llama.cpp | `-ctk q4_0 -ctv q4_0` | 4.500"),
            "{md}"
        );
        assert!(
            md.contains("| ratio <= 1.01 at <= 4.5 bits/elem | `a` (4.500 bits) | 1.0050 | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| ratio <= 1.15 at <= 2.2 bits/elem | `b` (2.000 bits) | 1.5000 | no |"),
            "{md}"
        );
    }
}
