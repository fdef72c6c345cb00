//! `pie run INFERLET.wasm --model DIR -- ARGS`: runs one inferlet locally
//! on the portable driver, prints its messages on stdout (logs on stderr)
//! and passes stdin lines to it as client messages.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use pie_runtime::inferlet::{Event, InferletRuntime, Limits};
use pie_runtime::scheduler::SchedulerConfig;

use crate::model_cmds::{self, ModelArgs};

#[derive(Args)]
pub struct RunArgs {
    /// The inferlet: a WebAssembly component (see inferlets/build.sh).
    inferlet: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Seconds the inferlet may run, waiting included.
    #[arg(long, default_value_t = 600.0)]
    time_limit: f64,
    /// MiB of linear memory the inferlet may use.
    #[arg(long, default_value_t = 512)]
    memory_limit_mib: usize,
    /// Pages in the KV cache (each `--kv-page-size` tokens); 0 = sized by
    /// `--gpu-mem-utilization` on a GPU, 1024 on the CPU.
    #[arg(long, default_value_t = 0)]
    kv_pages: usize,
    /// Fraction of GPU memory for weights, activations and the KV cache.
    #[arg(long, default_value_t = 0.90)]
    gpu_mem_utilization: f64,
    /// Most tokens in one driver batch.
    #[arg(long, default_value_t = 10240)]
    max_forward_tokens: usize,
    /// Most passes in one driver batch.
    #[arg(long, default_value_t = 512)]
    max_forward_requests: usize,
    /// Batches planned ahead while one runs.
    #[arg(long, default_value_t = 1)]
    speculation_depth: usize,
    /// Arguments for the inferlet, after `--`.
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn run(args: RunArgs) -> Result<(), String> {
    let wasm =
        std::fs::read(&args.inferlet).map_err(|e| format!("{}: {e}", args.inferlet.display()))?;
    if !(args.time_limit > 0.0 && args.time_limit.is_finite()) {
        return Err(format!(
            "--time-limit {}: give a positive number of seconds",
            args.time_limit
        ));
    }
    let cfg = SchedulerConfig {
        max_forward_tokens: args.max_forward_tokens,
        max_forward_requests: args.max_forward_requests,
        kv_pages: args.kv_pages,
        gpu_mem_utilization: args.gpu_mem_utilization,
        speculation_depth: args.speculation_depth,
        ..SchedulerConfig::default()
    };
    let sched = model_cmds::start_scheduler(&args.model, cfg)?;
    let runtime = InferletRuntime::new(sched)?;
    let component = runtime
        .compile(&wasm)
        .map_err(|e| format!("{}: {e}", args.inferlet.display()))?;
    let limits = Limits {
        time: Duration::from_secs_f64(args.time_limit),
        memory: args.memory_limit_mib << 20,
    };
    let tokio = tokio::runtime::Runtime::new().map_err(|e| format!("tokio: {e}"))?;
    tokio.block_on(async {
        let mut instance = runtime.launch(&component, args.args, limits);
        forward_stdin(instance.input.clone());
        drop(instance.input);
        while let Some(event) = instance.events.recv().await {
            match event {
                Event::Message(m) => println!("{m}"),
                Event::Log { level, text } => eprintln!("[{level}] {text}"),
                Event::Exit(status) => return status,
            }
        }
        Err("the inferlet ended without a status".into())
    })
}

/// Sends each stdin line to the inferlet; at end of input its `receive`
/// returns none.
fn forward_stdin(input: tokio::sync::mpsc::UnboundedSender<String>) {
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if input.send(line).is_err() {
                return;
            }
        }
    });
}
