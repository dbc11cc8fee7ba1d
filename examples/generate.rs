//! The embeddable API end to end: load a model onto the GPU with a KV plan and the GPU-resident
//! compressed cache (fused CUDA kernels), prefill a prompt, decode greedily token by token, print the
//! text, free the sequence.
//!
//! cargo run --release --example generate -- MODEL_PATH "The capital of France is" [KV_PLAN] [TOKENS]

use kvq::engine::{argmax, Engine, ResidentLimits};

/// Tokens the example's one sequence may hold (prompt and generated); the GPU cache is sized for it.
const CONTEXT: usize = 4096;

fn main() {
    if let Err(e) = run() {
        eprintln!("generate: {e}");
        std::process::exit(1);
    }
}

fn run() -> kvq::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(path), Some(prompt)) = (args.first(), args.get(1)) else {
        return Err(kvq::GpuError::Input(
            "usage: generate MODEL_PATH PROMPT [KV_PLAN (fp16)] [TOKENS (32)]".into(),
        ));
    };
    let kv = args.get(2).map(String::as_str).unwrap_or("fp16");
    let n: usize = match args.get(3) {
        None => 32,
        Some(s) => s
            .parse()
            .map_err(|_| kvq::GpuError::Input(format!("TOKENS '{s}': expected a number")))?,
    };
    let limits = ResidentLimits {
        slots: 1,
        max_tokens: CONTEXT,
        max_chunk: 256,
    };
    let mut engine = Engine::load_resident(path, kv, limits)?;
    eprintln!("{}", engine.describe());
    let ids = engine.tokenizer()?.encode_prompt(prompt)?;
    let cap = (ids.len() + n).min(engine.config().max_ctx);
    if cap > CONTEXT {
        return Err(kvq::GpuError::Input(format!(
            "PROMPT of {} tokens + TOKENS {n}: more than the example's {CONTEXT}-token cache",
            ids.len()
        )));
    }
    let seq = engine.new_sequence(cap)?;
    let mut next = argmax(&engine.prefill(seq, &ids, 256)?);
    let mut out = vec![next];
    let eos = engine.config().eos.clone();
    while out.len() < n && !eos.contains(&next) && engine.len(seq)? < cap {
        next = engine.step_greedy(&[(seq, next)])?[0];
        out.push(next);
    }
    println!("{prompt}{}", engine.tokenizer()?.decode(&out)?);
    eprintln!("KV cache: {} bytes", {
        let b = engine.kv_bytes(seq)?;
        b.packed + b.window
    });
    engine.free(seq);
    Ok(())
}
