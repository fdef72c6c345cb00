//! Chat completion: one user turn (and an optional system turn), answered
//! with the model's chat template and a sampler; sends the reply text.
//!
//! Arguments: `--prompt TEXT [--system TEXT] [--max-tokens N]
//! [--temperature T] [--seed S]`.

use inferlet::{arg_value, Context, Model, Sampler};

fn parse<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, String> {
    match arg_value(args, name) {
        Some(v) => v.parse().map_err(|_| format!("{name}: cannot parse `{v}`")),
        None => Ok(default),
    }
}

async fn main() -> Result<(), String> {
    let args = inferlet::args();
    let prompt = arg_value(&args, "--prompt").ok_or("missing --prompt TEXT")?;
    let max_tokens = parse(&args, "--max-tokens", 128usize)?;
    let sampler = Sampler::temperature(parse(&args, "--temperature", 0.0f32)?)
        .seed(parse(&args, "--seed", 0u64)?);

    let model = Model::get();
    let mut ctx = Context::new(&model);
    if let Some(system) = arg_value(&args, "--system") {
        ctx.system(&system);
    }
    ctx.user(&prompt);
    let text = ctx
        .generate(sampler)
        .max_tokens(max_tokens)
        .collect_text()
        .await?;
    inferlet::send(&text);
    Ok(())
}

inferlet::main!(main);
