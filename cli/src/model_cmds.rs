//! `pie logits`, `pie generate`, `pie tokenize`: load a model and run it on
//! the chosen driver (portable CPU by default, or CUDA).

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pie_driver::{Driver, KvDType};
#[cfg(feature = "cuda")]
use pie_driver_cuda::CudaDriver;
use pie_driver_portable::{PortableDriver, RuntimeQuant};
use pie_runtime::catalog;
use pie_runtime::chat_template::ChatMessage;
use pie_runtime::sampling::Sampler;
use pie_runtime::scheduler::{Scheduler, SchedulerConfig};
use pie_runtime::{Engine, LoadOptions, PieError};

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model directory (config.json + safetensors), a GGUF
    /// file, or a known model name (`pie model list`), e.g. `smollm2`.
    #[arg(long, required_unless_present = "config")]
    pub model: Option<PathBuf>,
    /// Instead of --model: a config.json whose architecture and shapes are
    /// run with random bf16 weights (benchmarks).
    #[arg(long, conflicts_with = "model")]
    pub config: Option<PathBuf>,
    /// Where the model runs: `portable` (CPU) or `cuda` (NVIDIA GPU).
    #[arg(long, default_value = "portable", value_parser = ["portable", "cuda"])]
    pub driver: String,
    /// Tokens per KV cache page.
    #[arg(long, default_value_t = 32)]
    pub kv_page_size: usize,
    /// KV cache storage: auto (portable: f16 for quantized/16-bit checkpoints,
    /// f32 for f32 ones), f32, bf16, f16, int8_per_token_head, fp8_e4m3.
    #[arg(long, default_value = "auto", value_parser = parse_kv_dtype)]
    pub kv_cache_dtype: KvDType,
    /// Quantize float weight matrices at load: `int8` (Q8_0 blocks).
    #[arg(long, value_parser = ["int8"])]
    pub runtime_quant: Option<String>,
}

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Print `{"ids": [...], "logits": [[...], ...]}`.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated prompt token ids.
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "prompt",
        required_unless_present = "prompt"
    )]
    ids: Option<Vec<u32>>,
    /// Prompt text (needs tokenizer.json in the model directory).
    #[arg(long)]
    prompt: Option<String>,
    /// Wrap the prompt as a user message with the model's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print `{"ids": [generated ids], "text": "..."}`.
    #[arg(long)]
    json: bool,
}

/// Work to do with a loaded engine, whatever its driver.
pub trait EngineJob {
    fn run<D: Driver + 'static>(self, engine: Engine<D>, args: &ModelArgs) -> Result<(), String>;
}

/// Loads the model on the driver `--driver` names and runs `job` on it.
pub fn run_job(args: &ModelArgs, job: impl EngineJob) -> Result<(), String> {
    match args.driver.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => {
            if args.runtime_quant.is_some() {
                return Err("--runtime-quant is implemented by the portable driver only".into());
            }
            let driver = CudaDriver::new().map_err(|e| e.to_string())?;
            job.run(load(args, driver)?, args)
        }
        #[cfg(not(feature = "cuda"))]
        "cuda" => Err(NO_CUDA.into()),
        _ => {
            let quant = args.runtime_quant.as_deref().map(|_| RuntimeQuant::Int8);
            let driver = PortableDriver::new().with_runtime_quant(quant);
            job.run(load(args, driver)?, args)
        }
    }
}

#[cfg(not(feature = "cuda"))]
const NO_CUDA: &str = "this pie binary was built without the CUDA driver (flavor portable); \
    build one with `pie build --arch ARCH --flavor cuda12.8`";

/// Starts a scheduler thread that loads the model on the driver `--driver`
/// names (the engine is built on that thread and never leaves it).
pub fn start_scheduler(args: &ModelArgs, cfg: SchedulerConfig) -> Result<Scheduler, String> {
    let name = args.label().display().to_string();
    let model = args.clone();
    let started = match args.driver.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => {
            if args.runtime_quant.is_some() {
                return Err("--runtime-quant is implemented by the portable driver only".into());
            }
            Scheduler::start(
                &name,
                move || {
                    let driver = CudaDriver::new().map_err(|e| PieError::Input(e.to_string()))?;
                    load(&model, driver).map_err(PieError::Input)
                },
                cfg,
            )
        }
        #[cfg(not(feature = "cuda"))]
        "cuda" => return Err(NO_CUDA.into()),
        _ => {
            let quant = args.runtime_quant.as_deref().map(|_| RuntimeQuant::Int8);
            Scheduler::start(
                &name,
                move || {
                    let driver = PortableDriver::new().with_runtime_quant(quant);
                    load(&model, driver).map_err(PieError::Input)
                },
                cfg,
            )
        }
    };
    started.map_err(|e| e.to_string())
}

impl ModelArgs {
    /// The model path or config, for messages.
    pub fn label(&self) -> PathBuf {
        self.model
            .clone()
            .or_else(|| self.config.clone())
            .unwrap_or_default()
    }
}

fn parse_kv_dtype(name: &str) -> Result<KvDType, String> {
    KvDType::from_name(name).ok_or_else(|| {
        format!(
            "unknown KV cache dtype `{name}` (known: {})",
            KvDType::NAMES.join(", ")
        )
    })
}

pub fn load<D: Driver + 'static>(args: &ModelArgs, driver: D) -> Result<Engine<D>, String> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("loading {bar:30} {pos}/{len} tensors {msg}")
            .expect("valid template"),
    );
    let progress = |done: usize, total: usize, name: &str| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(name.to_string());
    };
    let opts = LoadOptions {
        page_size: args.kv_page_size,
        kv_cache_dtype: args.kv_cache_dtype,
    };
    let engine = match (&args.model, &args.config) {
        (_, Some(config)) => Engine::load_random(config, driver, &opts, Some(&progress)),
        (Some(model), None) => {
            let path = resolve_model(model)?;
            Engine::load(&path, driver, &opts, Some(&progress))
        }
        (None, None) => return Err("give --model or --config".into()),
    };
    bar.finish_and_clear();
    engine.map_err(|e| e.to_string())
}

/// A path as given, or a known model's cached file (fetched on first use).
fn resolve_model(model: &std::path::Path) -> Result<PathBuf, String> {
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    match model.to_str().and_then(catalog::find) {
        Some(known) => known
            .fetch(&|msg| eprintln!("{msg}"))
            .map_err(|e| e.to_string()),
        None => Err(format!(
            "{}: no such file or directory, and not a known model (known: {})",
            model.display(),
            catalog::MODELS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

pub fn logits(args: LogitsArgs) -> Result<(), String> {
    run_job(&args.model, LogitsJob(&args))
}

struct LogitsJob<'a>(&'a LogitsArgs);

impl EngineJob for LogitsJob<'_> {
    fn run<D: Driver + 'static>(self, engine: Engine<D>, _: &ModelArgs) -> Result<(), String> {
        print_logits(engine, self.0)
    }
}

fn print_logits<D: Driver + 'static>(
    mut engine: Engine<D>,
    args: &LogitsArgs,
) -> Result<(), String> {
    let rows = engine
        .prompt_logits(std::slice::from_ref(&args.ids))
        .map_err(|e| e.to_string())?
        .remove(0);
    if args.json {
        let out = serde_json::json!({ "ids": args.ids, "logits": rows });
        println!("{out}");
    } else {
        for (pos, (id, row)) in args.ids.iter().zip(&rows).enumerate() {
            let best = pie_runtime::sampling::argmax(row);
            println!(
                "position {pos}: input {id} -> argmax {best} (logit {:.4})",
                row[best as usize]
            );
        }
    }
    Ok(())
}

pub fn generate(args: GenerateArgs) -> Result<(), String> {
    run_job(&args.model, GenerateJob(&args))
}

struct GenerateJob<'a>(&'a GenerateArgs);

impl EngineJob for GenerateJob<'_> {
    fn run<D: Driver + 'static>(self, engine: Engine<D>, _: &ModelArgs) -> Result<(), String> {
        run_generate(engine, self.0)
    }
}

fn run_generate<D: Driver + 'static>(
    mut engine: Engine<D>,
    args: &GenerateArgs,
) -> Result<(), String> {
    let prompt_ids = prompt_ids(
        &engine,
        &args.model.label(),
        args.ids.as_deref(),
        args.prompt.as_deref(),
        args.chat,
    )?;
    let sampler = Sampler {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: 0.0,
        seed: args.seed,
    };
    let ids = engine
        .generate(&[prompt_ids], args.max_tokens, &sampler)
        .map_err(|e| e.to_string())?
        .remove(0);
    let text = match &engine.tokenizer {
        Some(t) => Some(t.decode(&ids, true).map_err(|e| e.to_string())?),
        None => None,
    };
    if args.json {
        let mut out = serde_json::json!({ "ids": ids });
        if let Some(text) = text {
            out["text"] = serde_json::Value::String(text);
        }
        println!("{out}");
    } else {
        match text {
            Some(text) => println!("{text}"),
            None => println!(
                "{}",
                ids.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
    Ok(())
}

/// Token ids of a prompt: given directly, or encoded (as a chat user
/// message when `chat`).
fn prompt_ids<D: Driver + 'static>(
    engine: &Engine<D>,
    model: &std::path::Path,
    ids: Option<&[u32]>,
    prompt: Option<&str>,
    chat: bool,
) -> Result<Vec<u32>, String> {
    if let Some(ids) = ids {
        return Ok(ids.to_vec());
    }
    let text = prompt.ok_or("give --ids or --prompt")?;
    let tokenizer = engine.tokenizer.as_ref().ok_or_else(|| {
        format!(
            "{}: no tokenizer.json; pass --ids instead of --prompt",
            model.display()
        )
    })?;
    if chat {
        let template = engine.chat_template.as_ref().ok_or_else(|| {
            format!(
                "{}: no chat template in tokenizer_config.json or chat_template.jinja",
                model.display()
            )
        })?;
        let rendered = template
            .render(
                &[ChatMessage {
                    role: "user".into(),
                    content: text.to_string(),
                }],
                true,
            )
            .map_err(|e| e.to_string())?;
        tokenizer
            .encode(&rendered, false)
            .map_err(|e| e.to_string())
    } else {
        tokenizer.encode(text, true).map_err(|e| e.to_string())
    }
}

#[derive(Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// Render the prompt as a chat user message first.
    #[arg(long)]
    chat: bool,
}

/// Prints the prompt's token ids as a JSON list.
pub fn tokenize(args: TokenizeArgs) -> Result<(), String> {
    run_job(&args.model, TokenizeJob(&args))
}

struct TokenizeJob<'a>(&'a TokenizeArgs);

impl EngineJob for TokenizeJob<'_> {
    fn run<D: Driver + 'static>(self, engine: Engine<D>, _: &ModelArgs) -> Result<(), String> {
        let args = self.0;
        let ids = prompt_ids(
            &engine,
            &args.model.label(),
            None,
            Some(&args.prompt),
            args.chat,
        )?;
        println!("{}", serde_json::json!(ids));
        Ok(())
    }
}
