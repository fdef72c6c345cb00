//! Best-of-n: the prompt runs once, then `n` forked contexts share its KV
//! pages and sample answers together (their passes share batches); the
//! answer with the highest mean log-probability wins.
//!
//! Arguments: `--prompt TEXT [--n N] [--max-tokens N] [--temperature T]`.
//! Sends one line per candidate (`candidate I (mean logprob L): TEXT`),
//! then `best: TEXT`.

use inferlet::{arg_value, join_all, Context, Generated, Model, Sampler};

async fn main() -> Result<(), String> {
    let args = inferlet::args();
    let prompt = arg_value(&args, "--prompt").ok_or("missing --prompt TEXT")?;
    let num = |name: &str, default: f32| -> Result<f32, String> {
        arg_value(&args, name).map_or(Ok(default), |v| {
            v.parse().map_err(|_| format!("{name}: not a number: {v}"))
        })
    };
    let n = num("--n", 4.0)? as usize;
    let max_tokens = num("--max-tokens", 32.0)? as usize;
    let temperature = num("--temperature", 0.8)?;
    if n == 0 {
        return Err("--n must be at least 1".into());
    }

    let model = Model::get();
    let mut ctx = Context::new(&model);
    ctx.user(&prompt);
    // Run the prompt once; the branches share its pages.
    ctx.flush().await?;
    let mut branches = (0..n).map(|_| ctx.fork()).collect::<Result<Vec<_>, _>>()?;
    let runs = branches.iter_mut().enumerate().map(|(i, b)| {
        b.generate(Sampler::temperature(temperature).seed(i as u64 + 1))
            .max_tokens(max_tokens)
            .collect()
    });
    let results: Vec<Generated> = join_all(runs.collect())
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;

    let mean = |g: &Generated| g.logprob / g.tokens.len().max(1) as f32;
    for (i, g) in results.iter().enumerate() {
        inferlet::send(&format!(
            "candidate {i} (mean logprob {:.4}): {}",
            mean(g),
            g.text
        ));
    }
    let best = results
        .iter()
        .max_by(|a, b| mean(a).total_cmp(&mean(b)))
        .expect("n >= 1");
    inferlet::send(&format!("best: {}", best.text));
    Ok(())
}

inferlet::main!(main);
