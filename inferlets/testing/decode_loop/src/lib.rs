//! Prefills a short prompt, then runs `--steps N` single-token greedy
//! passes, each feeding back the token the last one sampled, ignoring stop
//! tokens; sends `done N` at the end. The load of the scheduler overhead
//! benchmark (`runtime/benches/scheduler_overhead.rs`): one pass in flight
//! per inferlet at every moment, as in plain decoding.
//!
//! Arguments: `[--prompt TEXT] [--steps N]`.

use inferlet::{arg_value, Context, Model, Output, OutputKind, Sampler};

async fn main() -> Result<(), String> {
    let args = inferlet::args();
    let prompt = arg_value(&args, "--prompt").unwrap_or_else(|| "Hello there".into());
    let steps: usize = match arg_value(&args, "--steps") {
        Some(v) => v.parse().map_err(|_| format!("--steps: cannot parse `{v}`"))?,
        None => 64,
    };
    let greedy = OutputKind::Sample(Sampler::greedy());
    let model = Model::get();
    let mut ctx = Context::new(&model);
    ctx.fill_text(&prompt)?;
    let n = ctx.pending().len();
    if n == 0 {
        return Err("the prompt has no tokens".into());
    }
    let mut token = sampled(ctx.forward(&[], &[(n - 1, greedy)]).await?)?;
    for _ in 0..steps {
        token = sampled(ctx.forward(&[token], &[(0, greedy)]).await?)?;
    }
    inferlet::send(&format!("done {steps}"));
    Ok(())
}

fn sampled(outputs: Vec<Output>) -> Result<u32, String> {
    match outputs.into_iter().next() {
        Some(Output::Token(t)) => Ok(t.token),
        other => Err(format!("expected a sampled token, got {other:?}")),
    }
}

inferlet::main!(main);
