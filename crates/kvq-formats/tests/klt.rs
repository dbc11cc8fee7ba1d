//! KLT: transforms fitted per head reduce held-out error monotonically with bits, each head is coded
//! with its own transform through the cache, bits/elem is exactly the rate asked for, and bad
//! configs, files and blocks are errors that say what is wrong.
use kvq_formats::testutil::{attention_check, rel_err};
use kvq_formats::transform::{fit_head, KltBooks};
use kvq_formats::{parse_format, KvPlan, Rope, RopeStyle, Stream, StreamCtx};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

const D: usize = 64;
const HEADS: usize = 2;

fn ctx(stream: Stream) -> StreamCtx {
    StreamCtx {
        layer: 0,
        n_layers: 1,
        stream,
        head_dim: D,
        n_kv_heads: HEADS,
        rope: Rope::new(D, 1e4, RopeStyle::Interleaved),
    }
}

/// `n` tokens of head `h`: a head-specific mix of latents whose scales fall geometrically (a steep
/// spectrum, as real K/V have), plus a head-specific offset; heads differ by 20x in scale.
fn head_data(n: usize, h: usize, seed: u64) -> Vec<f32> {
    let mut mr = rand_chacha::ChaCha8Rng::seed_from_u64(100 + h as u64);
    let mix: Vec<f32> = (0..D * D).map(|_| mr.random_range(-1.0..1.0)).collect();
    let off: Vec<f32> = (0..D).map(|_| mr.random_range(-3.0..3.0)).collect();
    let scale = if h == 0 { 1.0 } else { 20.0 };
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut x = vec![0f32; n * D];
    for t in 0..n {
        let l: Vec<f32> = (0..D)
            .map(|i| r.random_range(-1.0f32..1.0) * 0.85f32.powi(i as i32))
            .collect();
        for j in 0..D {
            x[t * D + j] =
                scale * (off[j] + (0..D).map(|i| mix[j * D + i] * l[i]).sum::<f32>() / 4.0);
        }
    }
    x
}

/// Fits both heads' K and V on 3000 tokens each (values with the per-token gain) into a temp file.
fn klt_file(name: &str) -> String {
    let mut layers = BTreeMap::new();
    let eye: Vec<f64> = (0..D * D)
        .map(|i| (i % (D + 1) == 0) as u8 as f64)
        .collect();
    for key in [true, false] {
        let heads = (0..HEADS)
            .map(|h| fit_head(&head_data(3000, h, 7), D, &eye, 6, !key).unwrap())
            .collect();
        layers.insert((0, key), heads);
    }
    let books = KltBooks {
        head_dim: D,
        heads: HEADS,
        bmax: 6,
        key_pre_rope: true,
        weight: "none".into(),
        scaled: [false, true],
        layers,
    };
    let path = std::env::temp_dir().join(format!(
        "kvq-klt-test-{name}-{}.safetensors",
        std::process::id()
    ));
    let p = path.to_string_lossy().into_owned();
    books.save(&p).unwrap();
    assert_eq!(KltBooks::load(&p).unwrap(), books);
    p
}

#[test]
fn bits_per_head_codecs_and_errors() {
    let f = klt_file("main");
    // Held-out error per head falls with the rate, and each head is coded with its own transform.
    for stream in [Stream::Key, Stream::Value] {
        let mut last = [f64::INFINITY; HEADS];
        for bits in [1.5, 2.0, 3.0, 4.0] {
            let c = parse_format(&format!("klt:bits={bits},file={f}"))
                .unwrap()
                .build(&ctx(stream))
                .unwrap();
            // Bytes: exactly bits x d per token (+ the 16-bit gain inside the budget for values).
            assert_eq!(
                c.block_bytes(),
                32 * (bits * D as f64) as usize / 8,
                "{bits}"
            );
            for (h, last) in last.iter_mut().enumerate() {
                let x = head_data(32, h, 99);
                let hc = kvq_formats::codec::of_head(c.as_ref(), h);
                let mut b = vec![0u8; hc.block_bytes()];
                hc.encode(&x, &mut b);
                let mut y = vec![0f32; x.len()];
                hc.decode(&b, &mut y).unwrap();
                let e = rel_err(&y, &x);
                assert!(
                    e < *last,
                    "{stream:?} head {h} bits {bits}: {e} after {last}"
                );
                *last = e;
                if bits == 4.0 {
                    // Offsets dominate the energy; the fitted mean and 4 bits leave little.
                    assert!(e < 0.02, "{stream:?} head {h}: {e}");
                    // Head 1 through head 0's transform is far worse: the per-head codec matters.
                    if h == 1 {
                        let c0 = kvq_formats::codec::of_head(c.as_ref(), 0);
                        c0.encode(&x, &mut b);
                        c0.decode(&b, &mut y).unwrap();
                        assert!(rel_err(&y, &x) > 10.0 * e, "{}", rel_err(&y, &x));
                    }
                }
            }
        }
    }
    // Through the cache: both heads decode with their own transform (keys pre-RoPE, rotated by the
    // cache), and the fused reader equals the mirror.
    let plan = KvPlan::parse(&format!("klt:bits=4,file={f}"), 1).unwrap();
    let rope = Rope::new(D, 1e4, RopeStyle::Interleaved);
    let mut cache = plan.build_caches(HEADS, &rope).unwrap().remove(0);
    let n = 70;
    let (kh, vh): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (0..HEADS)
        .map(|h| {
            (
                head_data(n, h, 5 + h as u64),
                head_data(n, h, 50 + h as u64),
            )
        })
        .unzip();
    let mut k = vec![0f32; n * HEADS * D];
    let mut v = vec![0f32; n * HEADS * D];
    for t in 0..n {
        for h in 0..HEADS {
            let (dst, src) = ((t * HEADS + h) * D, t * D);
            k[dst..dst + D].copy_from_slice(&kh[h][src..src + D]);
            v[dst..dst + D].copy_from_slice(&vh[h][src..src + D]);
        }
    }
    cache.append(&k, &v, n).unwrap();
    for (h, vals) in vh.iter().enumerate() {
        let mut want = vals.clone();
        want.iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32());
        let got = cache.decoded(Stream::Value, h);
        assert!(rel_err(&got[..64 * D], &want[..64 * D]) < 0.02, "head {h}");
    }
    let q: Vec<f32> = (0..2 * HEADS * D)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) / 50.0)
        .collect();
    let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
    cache.attend(&q, n, &mut a).unwrap();
    cache.attend_fused(&q, n, &mut b).unwrap();
    assert!(rel_err(&b, &a) < 1e-4, "{}", rel_err(&b, &a));
    // bits/elem of a whole block: exactly the rate.
    let chk = attention_check(&format!("klt:bits=3,file={f}"), 64, D, HEADS, 4, 64, 3).unwrap();
    assert!((chk.bits_per_elem - 3.0).abs() < 1e-9, "{chk:?}");
    assert!(chk.fused_vs_mirror < 1e-4, "{chk:?}");
    std::fs::remove_file(&f).ok();
}

#[test]
fn bad_configs_files_and_blocks() {
    let f = klt_file("bad");
    for (cfg, want) in [
        ("klt:bits=3".to_string(), "kvq calibrate --method klt"),
        (format!("klt:bits=0,file={f}"), "bits=0"),
        (format!("klt:bits=x,file={f}"), "bits=x"),
        (format!("klt:bits=7,file={f}"), "up to 6 bits"),
        (format!("klt:bits=3,nope=1,file={f}"), "nope"),
        (
            "klt:file=/nonexistent/k.safetensors".to_string(),
            "/nonexistent/k.safetensors",
        ),
    ] {
        let e = parse_format(&cfg).unwrap_err().to_string();
        assert!(e.contains(want), "{cfg}: {e}");
    }
    let fmt = parse_format(&format!("klt:bits=3,file={f}")).unwrap();
    let mut c32 = ctx(Stream::Key);
    c32.head_dim = 32;
    assert!(fmt
        .build(&c32)
        .err()
        .unwrap()
        .to_string()
        .contains("head_dim 32"));
    let mut c3 = ctx(Stream::Key);
    c3.n_kv_heads = 3;
    assert!(fmt
        .build(&c3)
        .err()
        .unwrap()
        .to_string()
        .contains("2 KV heads fitted"));
    let mut l1 = ctx(Stream::Key);
    l1.layer = 1;
    assert!(fmt
        .build(&l1)
        .err()
        .unwrap()
        .to_string()
        .contains("layer 1"));
    // 0.25 bits a value element is all gain, no codes.
    let e = parse_format(&format!("klt:bits=0.25,file={f}"))
        .unwrap()
        .build(&ctx(Stream::Value))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no code bits"), "{e}");
    // Blocks: wrong length and non-finite gains are errors; any other bytes decode to finite values.
    let c = fmt.build(&ctx(Stream::Value)).unwrap();
    let mut y = vec![0f32; 32 * D];
    let mut blk = vec![0xffu8; c.block_bytes()];
    assert!(c.decode(&blk, &mut y).is_err(), "NaN gains");
    assert!(c.decode(&blk[1..], &mut y).is_err());
    blk[..64].iter_mut().for_each(|b| *b = 0);
    c.decode(&blk, &mut y).unwrap();
    assert!(y.iter().all(|v| v.is_finite()));
    // A file that is not a KLT calibration says so.
    std::fs::write(&f, b"garbage").unwrap();
    let e = parse_format(&format!("klt:file={f}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&f), "{e}");
    std::fs::remove_file(&f).ok();
}

/// The block's entropy-coded header word (after the values' gains): step, mode, code words.
/// Relative error of head `h`'s blocks of `x` through `c` (encoded, validated, decoded).
fn held_out_err(c: &dyn kvq_formats::Codec, h: usize, x: &[f32]) -> f64 {
    let hc = kvq_formats::codec::of_head(c, h);
    let mut b = vec![0u8; hc.block_bytes()];
    let mut y = vec![0f32; x.len()];
    for (xb, yb) in x.chunks_exact(32 * D).zip(y.chunks_exact_mut(32 * D)) {
        hc.encode(xb, &mut b);
        hc.validate(&b).unwrap();
        hc.decode(&b, yb).unwrap();
        assert!(yb.iter().all(|v| v.is_finite()));
    }
    rel_err(&y, x)
}

/// Through the cache `code` keeps bits/elem exactly the rate and the fused reader equal to the
/// mirror, and the canonical form names it.
fn cache_checks(f: &str, code: &str) {
    let chk = attention_check(
        &format!("klt:bits=3,code={code},file={f}"),
        64,
        D,
        HEADS,
        4,
        64,
        3,
    )
    .unwrap();
    assert!((chk.bits_per_elem - 3.0).abs() < 1e-9, "{chk:?}");
    assert!(chk.fused_vs_mirror < 1e-4, "{chk:?}");
    let fmt = parse_format(&format!("klt:bits=2,code={code},file={f}")).unwrap();
    let want = format!("code={code}");
    assert!(fmt.canonical().contains(&want), "{}", fmt.canonical());
}

fn ec_header(block: &[u8], gains: bool) -> (u8, u8, u16) {
    let off = if gains { 64 } else { 0 };
    (
        block[off],
        block[off + 1],
        u16::from_le_bytes([block[off + 2], block[off + 3]]),
    )
}

#[test]
fn entropy_coded_components_beat_fixed_codes_at_the_same_size() {
    let f = klt_file("ec");
    for stream in [Stream::Key, Stream::Value] {
        let gains = stream == Stream::Value;
        let mut last = [f64::INFINITY; HEADS];
        for bits in [1.5, 2.0, 3.0, 4.0] {
            let build = |cfg: String| parse_format(&cfg).unwrap().build(&ctx(stream)).unwrap();
            let fixed = build(format!("klt:bits={bits},file={f}"));
            let ec = build(format!("klt:bits={bits},code=ec,file={f}"));
            // Same block size: the rate is exact either way.
            assert_eq!(ec.block_bytes(), fixed.block_bytes(), "{bits}");
            for (h, last) in last.iter_mut().enumerate() {
                // Eight held-out blocks: one block's error moves by a few percent between draws.
                let x = head_data(256, h, 99);
                let (e_fixed, e_ec) = (
                    held_out_err(fixed.as_ref(), h, &x),
                    held_out_err(ec.as_ref(), h, &x),
                );
                assert!(
                    e_ec < e_fixed,
                    "{stream:?} head {h} bits {bits}: ec {e_ec} vs fixed {e_fixed}"
                );
                assert!(
                    e_ec < *last,
                    "{stream:?} head {h} bits {bits}: {e_ec} after {last}"
                );
                *last = e_ec;
                // Held-out data of the calibrated kind is entropy-coded, not sent to the fallback.
                let hc = kvq_formats::codec::of_head(ec.as_ref(), h);
                let mut b = vec![0u8; hc.block_bytes()];
                hc.encode(&x[..32 * D], &mut b);
                let (_, mode, words) = ec_header(&b, gains);
                assert_eq!(mode, 0, "{stream:?} head {h} bits {bits}");
                assert!(4 * (words as usize + 1) <= hc.block_bytes() - 64 * gains as usize);
            }
        }
    }
    cache_checks(&f, "ec");
    std::fs::remove_file(&f).ok();
}

#[test]
fn entropy_coded_hostile_inputs_corrupt_blocks_and_old_files() {
    let f = klt_file("ec-bad");
    let e = parse_format(&format!("klt:code=huffman,file={f}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("code=huffman") && e.contains("ec"), "{e}");
    for stream in [Stream::Key, Stream::Value] {
        let gains = stream == Stream::Value;
        let c = parse_format(&format!("klt:bits=2,code=ec,file={f}"))
            .unwrap()
            .build(&ctx(stream))
            .unwrap();
        let mut y = vec![0f32; 32 * D];
        // Values far outside the calibration (and NaN) cannot be coded in the block: the fixed
        // fallback takes them, and they read back finite.
        let mut x = head_data(32, 0, 3);
        x.iter_mut().step_by(3).for_each(|v| *v *= 1e6);
        x[5] = f32::NAN;
        let mut b = vec![0u8; c.block_bytes()];
        c.encode(&x, &mut b);
        assert_eq!(ec_header(&b, gains).1, 1, "{stream:?}: fallback mode");
        c.decode(&b, &mut y).unwrap();
        assert!(y.iter().all(|v| v.is_finite()), "{stream:?}");
        // A good block, then its header and words broken: errors that say what, or finite values.
        let x = head_data(32, 0, 4);
        c.encode(&x, &mut b);
        let off = 64 * gains as usize;
        let mut bad = b.clone();
        bad[off + 1] = 7;
        let e = c.decode(&bad, &mut y).unwrap_err().to_string();
        assert!(e.contains("mode 7"), "{e}");
        let mut bad = b.clone();
        bad[off + 2..off + 4].copy_from_slice(&u16::MAX.to_le_bytes());
        let e = c.decode(&bad, &mut y).unwrap_err().to_string();
        assert!(e.contains("code words"), "{e}");
        for i in (off + 4..b.len()).step_by(7) {
            let mut bad = b.clone();
            bad[i] ^= 0x5a;
            if c.decode(&bad, &mut y).is_ok() {
                assert!(y.iter().all(|v| v.is_finite()), "byte {i}");
            }
        }
        assert!(c.decode(&b[1..], &mut y).is_err());
    }
    // A file written before quantiles existed cannot serve code=ec, and says how to get one that can.
    let mut books = KltBooks::load(&f).unwrap();
    books
        .layers
        .values_mut()
        .flatten()
        .for_each(|h| h.quant.clear());
    books.save(&f).unwrap();
    assert!(parse_format(&format!("klt:bits=2,file={f}")).is_ok());
    for code in ["ec", "tcq"] {
        let e = parse_format(&format!("klt:bits=2,code={code},file={f}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("quantiles") && e.contains("kvq calibrate") && e.contains(code),
            "{e}"
        );
    }
    std::fs::remove_file(&f).ok();
}

#[test]
fn trellis_codes_beat_fixed_codes_at_the_same_size() {
    let f = klt_file("tcq");
    for stream in [Stream::Key, Stream::Value] {
        for bits in [1.5, 2.0, 3.0] {
            let build = |cfg: String| parse_format(&cfg).unwrap().build(&ctx(stream)).unwrap();
            let fixed = build(format!("klt:bits={bits},file={f}"));
            let tcq = build(format!("klt:bits={bits},code=tcq,file={f}"));
            // Same widths, same block: the rate is exact either way.
            assert_eq!(tcq.block_bytes(), fixed.block_bytes(), "{bits}");
            for h in 0..HEADS {
                // Eight held-out blocks.
                let x = head_data(256, h, 99);
                let (e_fixed, e_tcq) = (
                    held_out_err(fixed.as_ref(), h, &x),
                    held_out_err(tcq.as_ref(), h, &x),
                );
                assert!(
                    e_tcq < e_fixed,
                    "{stream:?} head {h} bits {bits}: trellis {e_tcq} vs fixed {e_fixed}"
                );
            }
        }
    }
    cache_checks(&f, "tcq");
    // Inputs far outside the calibration (1e6x) and non-finite ones still read back finite.
    let c = parse_format(&format!("klt:bits=2,code=tcq,file={f}"))
        .unwrap()
        .build(&ctx(Stream::Key))
        .unwrap();
    let mut x: Vec<f32> = head_data(32, 0, 5).iter().map(|v| v * 1e6).collect();
    x[3] = f32::NAN;
    x[70] = f32::INFINITY;
    let mut b = vec![0u8; c.block_bytes()];
    let mut y = vec![0f32; x.len()];
    c.encode(&x, &mut b);
    c.decode(&b, &mut y).unwrap();
    assert!(y.iter().all(|v| v.is_finite()));
    let e = parse_format(&format!("klt:bits=2,code=trellis,file={f}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("tcq"), "{e}");
    std::fs::remove_file(&f).ok();
}
