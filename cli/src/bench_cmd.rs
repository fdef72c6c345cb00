//! `pie bench`: prefill and decode throughput of a model on this machine,
//! for one or several batch sizes.
//!
//! Prefill is timed as one forward over every prompt producing the next
//! token (logits of the last rows only, as a server does); decode as the
//! remaining time of a greedy generation of `--gen` tokens after the same
//! prefill, divided by the decode steps after the first token. An untimed
//! run of each batch size comes first (warm-up: kernel loading, KV cache,
//! CUDA-graph recording). Prompt ids are fixed pseudo-random sequences, so
//! runs are comparable. With
//! `--config`, the weights are random bf16 of that config's shapes.

use std::time::Instant;

use clap::Args;
use pie_driver::Driver;
use pie_runtime::sampling::Sampler;
use pie_runtime::Engine;

use crate::model_cmds::{run_job, EngineJob, ModelArgs};

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
    /// Batch sizes (sequences decoded together), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Repetitions per batch size; the best run is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object per batch size.
    #[arg(long)]
    json: bool,
}

pub fn bench(args: BenchArgs) -> Result<(), String> {
    run_job(&args.model, BenchJob(&args))
}

struct BenchJob<'a>(&'a BenchArgs);

impl EngineJob for BenchJob<'_> {
    fn run<D: Driver + 'static>(self, mut engine: Engine<D>, _: &ModelArgs) -> Result<(), String> {
        let args = self.0;
        engine.stop_ids.clear(); // always decode exactly --gen tokens
        for &batch in &args.batch {
            let row = measure(&mut engine, args, batch.max(1))?;
            report(&engine, args, &row);
        }
        Ok(())
    }
}

struct Row {
    batch: usize,
    prefill_s: f64,
    decode_s: f64,
}

fn prompts(vocab: u64, batch: usize, len: usize) -> Vec<Vec<u32>> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..batch)
        .map(|_| {
            (0..len.max(1))
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s % vocab.min(32_000)) as u32
                })
                .collect()
        })
        .collect()
}

fn measure<D: Driver + 'static>(
    engine: &mut Engine<D>,
    args: &BenchArgs,
    batch: usize,
) -> Result<Row, String> {
    let prompts = prompts(engine.ir.vocab as u64, batch, args.prompt);
    let gen = args.gen.max(2);
    let generate = |engine: &mut Engine<D>, tokens: usize| {
        let t = Instant::now();
        engine
            .generate(&prompts, tokens, &Sampler::greedy())
            .map_err(|e| e.to_string())?;
        Ok::<f64, String>(t.elapsed().as_secs_f64())
    };
    // One untimed run first: the first pass of a batch shape loads
    // kernels, sizes the KV cache and records the decode graphs, which
    // would otherwise land in one repetition's prefill or decode time.
    generate(engine, gen)?;
    // Best prefill and best whole generation, each over the repetitions:
    // the decode time is their difference (a minimum of per-repetition
    // differences would reward a repetition whose prefill was slowed).
    let (mut prefill_s, mut total_s) = (f64::MAX, f64::MAX);
    for _ in 0..args.reps.max(1) {
        prefill_s = prefill_s.min(generate(engine, 1)?);
        total_s = total_s.min(generate(engine, gen)?);
    }
    let decode_s = (total_s - prefill_s).max(1e-9);
    Ok(Row {
        batch,
        prefill_s,
        decode_s,
    })
}

fn report<D: Driver + 'static>(engine: &Engine<D>, args: &BenchArgs, row: &Row) {
    let steps = (args.gen.max(2) - 1) as f64;
    let prefill_tok_s = (row.batch * args.prompt) as f64 / row.prefill_s;
    let decode_tok_s = row.batch as f64 * steps / row.decode_s;
    let ms_per_step = row.decode_s / steps * 1e3;
    let rss_mb = peak_rss_mb();
    let round = |v: f64, digits: i32| (v * 10f64.powi(digits)).round() / 10f64.powi(digits);
    if args.json {
        let out = serde_json::json!({
            "engine": format!("pie {}", engine.driver.name()),
            "driver": engine.driver.describe(),
            "arch": engine.arch,
            "weight_params": weight_params(&engine.ir),
            "batch": row.batch,
            "prompt": args.prompt,
            "gen": args.gen,
            "prefill_tok_s": round(prefill_tok_s, 1),
            "decode_tok_s": round(decode_tok_s, 1),
            "decode_ms_per_step": round(ms_per_step, 3),
            "peak_rss_mb": rss_mb,
            "kv_cache_dtype": engine.kv_cache_dtype().name(),
        });
        println!("{out}");
    } else {
        println!(
            "{} on {}, batch {}: prefill {prefill_tok_s:.1} tok/s, decode {ms_per_step:.3} ms/step = {decode_tok_s:.1} tok/s, peak RSS {} MB",
            engine.arch,
            engine.driver.describe(),
            row.batch,
            rss_mb.map(|m| m.to_string()).unwrap_or("?".into())
        );
    }
}

/// Parameters of every distinct weight the model reads.
fn weight_params(ir: &pie_driver::ir::Model) -> u64 {
    let mut seen = std::collections::HashSet::new();
    ir.nodes()
        .flat_map(|n| &n.weights)
        .filter_map(|w| Some((w.name.as_ref()?, w.shape.as_ref()?, w.experts)))
        .filter(|(name, _, _)| seen.insert(name.to_string()))
        .map(|(_, shape, experts)| {
            let one = shape.iter().product::<usize>() as u64;
            one * experts.map_or(1, |e| e.count as u64)
        })
        .sum()
}

/// Peak resident set size (Linux `VmHWM`).
fn peak_rss_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}
