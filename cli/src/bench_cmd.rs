//! `pie bench`: prefill and decode throughput of a model on this machine.
//!
//! Prefill is timed as one forward over the whole prompt producing the next
//! token (logits of the last row only, as a server does); decode as the
//! remaining time of a greedy generation of `--gen` tokens after the same
//! prefill, divided by the tokens decoded after the first. Prompt ids are a
//! fixed pseudo-random sequence, so runs are comparable.

use std::time::Instant;

use clap::Args;
use pie_runtime::sampling::Sampler;

use crate::model_cmds::{load, ModelArgs};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Repetitions; the best run is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn bench(args: BenchArgs) -> Result<(), String> {
    let mut engine = load(&args.model)?;
    engine.stop_ids.clear(); // always decode exactly --gen tokens
    let vocab = engine.ir.vocab as u64;
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let prompt: Vec<u32> = (0..args.prompt.max(1))
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab.min(32_000)) as u32
        })
        .collect();
    let prompts = vec![prompt];
    let (mut best_prefill, mut best_decode) = (f64::MAX, f64::MAX);
    for _ in 0..args.reps.max(1) {
        let t = Instant::now();
        engine
            .generate(&prompts, 1, &Sampler::greedy())
            .map_err(|e| e.to_string())?;
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        engine
            .generate(&prompts, args.gen.max(2), &Sampler::greedy())
            .map_err(|e| e.to_string())?;
        let total = t.elapsed().as_secs_f64();
        best_prefill = best_prefill.min(prefill);
        best_decode = best_decode.min((total - prefill).max(1e-9));
    }
    let prefill_tok_s = args.prompt as f64 / best_prefill;
    let decode_tok_s = (args.gen.max(2) - 1) as f64 / best_decode;
    let threads = engine.driver.threads();
    let rss_mb = peak_rss_mb();
    if args.json {
        let out = serde_json::json!({
            "engine": "pie portable",
            "arch": engine.arch,
            "threads": threads,
            "prompt": args.prompt,
            "gen": args.gen,
            "prefill_tok_s": (prefill_tok_s * 10.0).round() / 10.0,
            "decode_tok_s": (decode_tok_s * 10.0).round() / 10.0,
            "peak_rss_mb": rss_mb,
        });
        println!("{out}");
    } else {
        println!(
            "{} ({} threads): prefill {prefill_tok_s:.1} tok/s, decode {decode_tok_s:.1} tok/s, peak RSS {} MB",
            engine.arch,
            threads,
            rss_mb.map(|m| m.to_string()).unwrap_or("?".into())
        );
    }
    Ok(())
}

/// Peak resident set size (Linux `VmHWM`).
fn peak_rss_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}
