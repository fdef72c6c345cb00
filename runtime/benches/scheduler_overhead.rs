//! Scheduler overhead: the runtime's time per scheduling step outside the
//! driver, with 1, 64 and 256 concurrent inferlets decoding one token per
//! pass. The driver is a no-op stub (defined here only): every op returns
//! an activation of the right shape without computing anything, and the
//! logits read back make greedy pick the same non-stop token, so the
//! inferlets (`inferlets/testing/decode_loop`, real wasm components) keep
//! decoding. What is left is the scheduler (planning a batch, answering
//! passes), the inferlet host (wasm, host calls, tokio wake-ups) and the
//! generated model code walking the ops.
//!
//! Per step it reports the mean wall time, the stub driver's time (the
//! engine's forward with no-op kernels), the scheduler's time outside the
//! driver (plan + answer: `Stats::total_step_ns - total_driver_ns`), the
//! gap in which the scheduler waits for inferlets to resubmit (the wall
//! time less plan, answer and driver; negative when the planner works
//! while the executor runs the driver, as the pipelined scheduler does),
//! and the driver's idle time per step (the wall time less the driver's:
//! what an accelerator would wait).
//! It also reads the planner thread's on-CPU and run-queue times from
//! `/proc` (on 2 cores it competes with the inferlets' tokio workers and
//! the executor), and times the parts of the per-pass work on their own.
//!
//! `cargo bench -p pie-runtime --bench scheduler_overhead`; set
//! `PIE_BENCH_JSON=PATH` to write the results as JSON, `PIE_BENCH_STEPS=N`
//! for the decode steps per inferlet (default 300), `PIE_BENCH_LEVELS=1,64`
//! for other concurrency levels.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use pie_driver::ir::*;
use pie_driver::{Driver, DriverError, ForwardBatch, KvLayout, Result, TensorView, WeightRole};
use pie_runtime::inferlet::{InferletRuntime, Limits};
use pie_runtime::sampling::Sampler;
use pie_runtime::scheduler::{outputs, OutputKind, PageManager, Scheduler, SchedulerConfig, Stats};
use pie_runtime::{Engine, LoadOptions};

/// The token every logits row points greedy sampling at (not a stop token
/// of the tiny llama, whose end-of-sequence id is 4).
const PICK: usize = 100;

/// An activation's shape: all the stub keeps.
#[derive(Clone, Copy)]
struct Shape {
    #[allow(dead_code)] // kept for the shape's sake; no op needs it
    rows: usize,
    width: usize,
}

/// A driver that computes nothing (see the module doc). With `sleep`, each
/// forward's logits read-back sleeps that long, standing in for a GPU step
/// during which the CPU waits (and the inferlets resubmit, so batches fill).
struct NoopDriver {
    sleep: std::time::Duration,
}

impl Driver for NoopDriver {
    type Weight = ();
    type Act = Shape;
    type Kv = ();

    fn name(&self) -> &'static str {
        "noop"
    }
    fn supports(&self, _: OpKind) -> bool {
        true
    }
    fn load_weight(&self, _: &str, _: &TensorView<'_>, _: &[usize], _: WeightRole) -> Result<()> {
        Ok(())
    }
    fn new_kv(&self, _: &KvLayout) -> Result<()> {
        Ok(())
    }
    fn embedding(&self, _: &(), b: &ForwardBatch, a: &EmbeddingAttrs) -> Result<Shape> {
        Ok(Shape {
            rows: b.tokens.len(),
            width: a.hidden,
        })
    }
    fn linear(&self, x: &Shape, _: &(), _: Option<&()>, a: &LinearAttrs) -> Result<Shape> {
        Ok(Shape {
            width: a.out_features,
            ..*x
        })
    }
    fn rms_norm(&self, x: &Shape, _: Option<&()>, _: &RmsNormAttrs) -> Result<Shape> {
        Ok(*x)
    }
    fn rope(&self, x: &Shape, _: &ForwardBatch, _: &RopeAttrs) -> Result<Shape> {
        Ok(*x)
    }
    fn attention(
        &self,
        q: &Shape,
        _: Option<&Shape>,
        _: Option<&Shape>,
        _: Option<&()>,
        _: &mut (),
        _: &ForwardBatch,
        a: &AttentionAttrs,
    ) -> Result<Shape> {
        Ok(Shape {
            width: a.heads * a.v_head_dim,
            ..*q
        })
    }
    fn add(&self, x: &Shape, _: &Shape, _: &ElementwiseAttrs) -> Result<Shape> {
        Ok(*x)
    }
    fn mul(&self, x: &Shape, _: &Shape, _: &ElementwiseAttrs) -> Result<Shape> {
        Ok(*x)
    }
    fn scale(&self, x: &Shape, _: Option<&()>, _: &ScaleAttrs) -> Result<Shape> {
        Ok(*x)
    }
    fn glu(&self, gate: &Shape, _: &Shape, _: &GluAttrs) -> Result<Shape> {
        Ok(*gate)
    }
    fn activation(&self, x: &Shape, _: &ActivationAttrs) -> Result<Shape> {
        Ok(*x)
    }
    fn softcap(&self, x: &Shape, _: &SoftcapAttrs) -> Result<Shape> {
        Ok(*x)
    }
    fn split(&self, x: &Shape, a: &SplitAttrs) -> Result<Vec<Shape>> {
        if a.group == 0 {
            return Err(DriverError::Invalid("split by group 0".into()));
        }
        let per = x.width / a.group;
        Ok(a.sizes
            .iter()
            .map(|s| Shape {
                width: per * s,
                ..*x
            })
            .collect())
    }
    fn select_rows(&self, x: &Shape, rows: &[usize]) -> Result<Shape> {
        Ok(Shape {
            rows: rows.len(),
            ..*x
        })
    }
    fn copy_page(&self, _: &mut (), _: u32, _: u32) -> Result<()> {
        Ok(())
    }
    fn read_rows(&self, x: &Shape, rows: &[usize]) -> Result<Vec<f32>> {
        if !self.sleep.is_zero() {
            std::thread::sleep(self.sleep);
        }
        let mut out = vec![0.0f32; rows.len() * x.width];
        for row in out.chunks_exact_mut(x.width.max(1)) {
            row[PICK.min(x.width - 1)] = 1.0;
        }
        Ok(out)
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `(on-CPU ns, ns waiting in the run queue)` of the scheduler's planner
/// thread,
/// from `/proc/self/task/*/schedstat` (Linux; zeros elsewhere).
fn scheduler_thread_times() -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (0, 0);
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        // The planner plans batches and answers passes; the driver runs
        // on the executor thread.
        if !matches!(comm.trim(), "pie-planner" | "pie-scheduler") {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        let mut f = stat
            .split_whitespace()
            .map(|x| x.parse::<u64>().unwrap_or(0));
        return (f.next().unwrap_or(0), f.next().unwrap_or(0));
    }
    (0, 0)
}

/// Counters before and after a run.
struct Snap {
    cpu_ns: u64,
    runqueue_ns: u64,
    batches: u64,
    passes: u64,
    tokens: u64,
    step_ns: u64,
    driver_ns: u64,
}

fn snap(s: &Stats) -> Snap {
    let (cpu_ns, runqueue_ns) = scheduler_thread_times();
    Snap {
        cpu_ns,
        runqueue_ns,
        batches: s.batches.load(Ordering::Relaxed),
        passes: s.passes.load(Ordering::Relaxed),
        tokens: s.tokens.load(Ordering::Relaxed),
        step_ns: s.total_step_ns.load(Ordering::Relaxed),
        driver_ns: s.total_driver_ns.load(Ordering::Relaxed),
    }
}

/// Launches `n` decode loops of `steps` passes each and waits for all.
fn run_round(
    tokio: &tokio::runtime::Runtime,
    rt: &InferletRuntime,
    component: &wasmtime::component::Component,
    n: usize,
    steps: usize,
) {
    let args: Vec<String> = ["--steps".to_string(), steps.to_string()].to_vec();
    tokio.block_on(async {
        let instances: Vec<_> = (0..n)
            .map(|_| rt.launch(component, args.clone(), Limits::default()))
            .collect();
        for i in instances {
            let (_, status) = i.wait().await;
            status.expect("decode loop failed");
        }
    });
}

fn level(n: usize, steps: usize, workers: usize, driver_us: u64, wasm: &[u8]) -> serde_json::Value {
    let llama = repo().join("tests/fixtures/llama");
    let cfg = SchedulerConfig {
        // Room for every context: prompt + steps tokens, pages of 16 (or
        // whatever the engine uses) with slack.
        kv_pages: n * (steps / 8 + 4),
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::start(
        "llama",
        move || {
            let driver = NoopDriver {
                sleep: std::time::Duration::from_micros(driver_us),
            };
            Engine::load(&llama, driver, &LoadOptions::default(), None)
        },
        cfg,
    )
    .expect("scheduler with the no-op driver");
    let rt = InferletRuntime::new(sched).unwrap();
    let component = rt.compile(wasm).unwrap();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    // Warm-up: threads, allocator, page manager.
    run_round(&tokio, &rt, &component, n, 8);

    let stats = rt.scheduler().stats();
    let before = snap(stats);
    let started = Instant::now();
    run_round(&tokio, &rt, &component, n, steps);
    let wall_ns = started.elapsed().as_nanos() as f64;
    let after = snap(stats);

    let batches = (after.batches - before.batches) as f64;
    let passes = (after.passes - before.passes) as f64;
    let tokens = (after.tokens - before.tokens) as f64;
    let step_ns = (after.step_ns - before.step_ns) as f64;
    let driver_ns = (after.driver_ns - before.driver_ns) as f64;
    let us = |ns: f64| (ns / batches / 1e3 * 100.0).round() / 100.0;
    let sched_us = us(step_ns - driver_ns);
    // The scheduler thread's own CPU time (it also runs the driver stub
    // and blocks on its queue between steps), and how long it sat ready
    // but descheduled: on 2 cores it shares them with the inferlets.
    let cpu_us = us((after.cpu_ns - before.cpu_ns) as f64);
    let runqueue_us = us((after.runqueue_ns - before.runqueue_ns) as f64);
    let row = serde_json::json!({
        "concurrent_inferlets": n,
        "driver_sleep_us": driver_us,
        "decode_steps_each": steps,
        "steps": batches as u64,
        "passes": passes as u64,
        "tokens": tokens as u64,
        "mean_passes_per_step": (passes / batches * 100.0).round() / 100.0,
        "wall_per_step_us": us(wall_ns),
        "driver_stub_per_step_us": us(driver_ns),
        "scheduler_outside_driver_per_step_us": sched_us,
        "gap_waiting_for_inferlets_per_step_us": us(wall_ns - step_ns),
        "driver_idle_per_step_us": us(wall_ns - driver_ns),
        "scheduler_outside_driver_per_pass_us":
            ((step_ns - driver_ns) / passes / 1e3 * 100.0).round() / 100.0,
        "wall_per_pass_us": (wall_ns / passes / 1e3 * 100.0).round() / 100.0,
        "scheduler_thread_cpu_per_step_us": cpu_us,
        "scheduler_thread_runqueue_wait_per_step_us": runqueue_us,
        "tokio_worker_threads": workers,
        "within_20us_goal": sched_us <= 20.0,
    });
    println!(
        "{n:>4} inferlets, driver sleep {driver_us:>4} us: {:>7} steps, {:>6.1} passes/step | per step: wall {:>8.2} us, driver stub {:>7.2} us, scheduler (plan+answer) {:>7.2} us, gap {:>8.2} us | scheduler thread: cpu {:>7.2} us, run-queue wait {:>7.2} us",
        batches as u64,
        passes / batches,
        us(wall_ns),
        us(driver_ns),
        sched_us,
        us(wall_ns - step_ns),
        cpu_us,
        runqueue_us,
    );
    row
}

/// Nanoseconds per call of `f`, over `n` calls.
fn per_call(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// Timers on the pieces of a step's per-pass work, outside the scheduler
/// loop (whose code this bench does not change): what one decode pass
/// costs the scheduler thread in each part.
fn breakdown() -> serde_json::Value {
    let contexts = 256;
    // Page bookkeeping of a decode step: plan the write, commit the token.
    let mut kv = PageManager::new(contexts * 64, 16);
    let ids: Vec<_> = (0..contexts).map(|_| kv.create()).collect();
    for &id in &ids {
        let _ = kv.prepare_write(id, 20).unwrap();
        kv.commit(id, &[1; 20]);
    }
    let pages_ns = per_call(contexts * 40, |i| {
        let id = ids[i % contexts];
        let plan = kv.prepare_write(id, 1).unwrap();
        std::hint::black_box(&plan);
        kv.commit(id, &[PICK as u32]);
    });
    // The batch handed to the driver: 64 one-token sequences.
    let seqs: Vec<(Vec<u32>, usize, Vec<u32>)> =
        (0..64).map(|i| (vec![1], 20 + i, vec![0, 1, 2])).collect();
    let batch_ns = per_call(2000, |_| {
        std::hint::black_box(ForwardBatch::new(seqs.clone()));
    }) / 64.0;
    // Greedy sampling + log-probability of one 320-wide logits row.
    let mut row = vec![0.0f32; 320];
    row[PICK] = 1.0;
    let greedy = OutputKind::Sample(Sampler::greedy());
    let sample_ns = per_call(20000, |i| {
        std::hint::black_box(outputs::compute(&row, &greedy, i));
    });
    // The same at a real vocabulary (Qwen3's 151,936): the log-softmax
    // behind `logprob` is O(vocab) per sampled token.
    let mut big = vec![0.0f32; 151_936];
    big[PICK] = 1.0;
    let sample_big_ns = per_call(200, |i| {
        std::hint::black_box(outputs::compute(&big, &greedy, i));
    });
    // Answering a pass the direct way: fill the slot and wake the
    // inferlet's tokio task parked in `wait-any` from a plain thread, 64
    // tasks at a time. (The host's replies now only record whom to wake and
    // a dispatcher task wakes them once per step, `inferlet/wakes.rs`; this
    // is the per-pass cost that moved off the planner.)
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rounds = 200;
    let mut wake_ns = 0.0;
    for _ in 0..rounds {
        let notifies: Vec<_> = (0..64)
            .map(|_| std::sync::Arc::new(tokio::sync::Notify::new()))
            .collect();
        let tasks: Vec<_> = notifies
            .iter()
            .map(|n| {
                let n = n.clone();
                tokio.spawn(async move { n.notified().await })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_micros(200));
        let slots: Vec<_> = (0..64)
            .map(|_| std::sync::Arc::new(std::sync::Mutex::new(None::<u32>)))
            .collect();
        let t = Instant::now();
        for (n, s) in notifies.iter().zip(&slots) {
            *s.lock().unwrap() = Some(1);
            n.notify_one();
        }
        wake_ns += t.elapsed().as_nanos() as f64 / 64.0;
        tokio.block_on(async {
            for t in tasks {
                t.await.unwrap();
            }
        });
    }
    wake_ns /= rounds as f64;
    let r = |ns: f64| (ns / 10.0).round() / 100.0;
    println!(
        "per pass (timers on the parts): pages prepare+commit {:.2} us, batch building {:.2} us, greedy sample+logprob (vocab 320) {:.2} us (vocab 151936: {:.2} us), reply (slot + wake a parked task) {:.2} us",
        r(pages_ns),
        r(batch_ns),
        r(sample_ns),
        r(sample_big_ns),
        r(wake_ns)
    );
    serde_json::json!({
        "pages_prepare_write_commit_us": r(pages_ns),
        "forward_batch_build_per_seq_us": r(batch_ns),
        "greedy_sample_logprob_vocab320_us": r(sample_ns),
        "greedy_sample_logprob_vocab151936_us": r(sample_big_ns),
        "reply_fill_slot_and_wake_task_us": r(wake_ns),
    })
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this
    // once with no such flag: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let steps: usize = std::env::var("PIE_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 4 } else { 300 });
    let levels: Vec<usize> = std::env::var("PIE_BENCH_LEVELS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 64, 256]);
    let path = repo().join("inferlets/target/components/decode_loop.wasm");
    let Ok(wasm) = std::fs::read(&path) else {
        eprintln!(
            "{} is missing: build the inferlets first with inferlets/build.sh",
            path.display()
        );
        std::process::exit(1);
    };
    let workers: usize = std::env::var("PIE_BENCH_WORKERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "scheduler overhead: {} ({cores} cores), tiny llama with a no-op driver, {steps} decode steps per inferlet",
        cpu_model()
    );
    // Batch sizes depend on how the inferlets' resubmissions interleave
    // with the steps, which varies from run to run: each level runs
    // `reps` times (a fresh scheduler each), all kept in the JSON.
    let reps: usize = std::env::var("PIE_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    // 0: the bare no-op driver (batches are whatever has arrived); 1000: a
    // 1 ms step, as a GPU's, during which every inferlet resubmits.
    let sleeps: Vec<u64> = std::env::var("PIE_BENCH_DRIVER_US")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![0, 1000]);
    let mut rows = Vec::new();
    for &sleep in &sleeps {
        for &n in &levels {
            let runs: Vec<_> = (0..reps)
                .map(|_| level(n, steps, workers, sleep, &wasm))
                .collect();
            rows.push(serde_json::json!({
                "concurrent_inferlets": n,
                "driver_sleep_us": sleep,
                "runs": runs,
            }));
        }
    }
    let parts = breakdown();
    if let Ok(out) = std::env::var("PIE_BENCH_JSON") {
        let json = serde_json::json!({
            "benchmark": "scheduler overhead per step (runtime/benches/scheduler_overhead.rs)",
            "command": "PIE_BENCH_JSON=PATH cargo bench -p pie-runtime --bench scheduler_overhead",
            "machine": {"cpu": cpu_model(), "cores": cores},
            "model": "tests/fixtures/llama (tiny random llama: 2 layers, hidden 64, vocab 320)",
            "driver": "no-op stub defined in the bench: shape-only activations, fixed logits row; with driver_sleep_us > 0 the logits read-back sleeps that long (a GPU step stand-in, so batches fill)",
            "inferlet": "inferlets/testing/decode_loop (Rust component): prefill, then one greedy token per pass",
            "goal_scheduler_outside_driver_per_step_us": 20,
            "levels": rows,
            "per_pass_parts": parts,
        });
        std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap() + "\n").unwrap();
        println!("wrote {out}");
    }
}
