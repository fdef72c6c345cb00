//! `pie`: spec tools (`pie spec check|show|codegen`) and running models
//! (`pie logits`, `pie generate`, `pie run` for inferlets, `pie serve`).

mod bench_cmd;
mod build_cmd;
mod catalog_cmds;
mod model_cmds;
mod run_cmd;
mod serve_cmd;
mod spec_cmds;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pie",
    version,
    about = "Specialized LLM inference engines from declarative architecture specs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check, inspect and compile architecture specs.
    #[command(subcommand)]
    Spec(spec_cmds::SpecCommand),
    /// Print the logits of every position of a token sequence.
    Logits(model_cmds::LogitsArgs),
    /// Generate text or token ids from a prompt.
    Generate(model_cmds::GenerateArgs),
    /// Measure prefill and decode throughput (prompt and generation length).
    Bench(bench_cmd::BenchArgs),
    /// Run an inferlet (a WebAssembly component) on a model and print its
    /// messages.
    Run(run_cmd::RunArgs),
    /// Serve a model over HTTP: OpenAI-compatible completions, an inferlet
    /// WebSocket, /metrics.
    Serve(serve_cmd::ServeArgs),
    /// Print the token ids of a prompt.
    Tokenize(model_cmds::TokenizeArgs),
    /// Build a serving binary for one architecture and flavor
    /// (`portable`, `cuda12.8`, `cuda13.0`) into dist/.
    Build(build_cmd::BuildArgs),
    /// Known models: list them, fetch them into the cache.
    #[command(subcommand)]
    Model(catalog_cmds::ModelCommand),
}

fn main() -> ExitCode {
    pie_runtime::heap::use_one_arena();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Spec(cmd) => spec_cmds::run(cmd),
        Command::Logits(args) => model_cmds::logits(args),
        Command::Generate(args) => model_cmds::generate(args),
        Command::Model(cmd) => catalog_cmds::run(cmd),
        Command::Tokenize(args) => model_cmds::tokenize(args),
        Command::Bench(args) => bench_cmd::bench(args),
        Command::Build(args) => build_cmd::build(args),
        Command::Run(args) => run_cmd::run(args),
        Command::Serve(args) => serve_cmd::serve(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
