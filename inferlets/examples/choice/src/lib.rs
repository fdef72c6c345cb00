//! Constrained choice decoding: the answer must be one of the given
//! choices. Each step reads the raw logits and takes the most likely token
//! that keeps the answer a prefix of some choice, so the model never
//! leaves the allowed set.
//!
//! Arguments: `--prompt TEXT --choices A|B|C`. Sends the chosen choice.

use inferlet::{arg_value, Context, Model, Output, OutputKind};

/// The most likely allowed next token, and whether some choice is now
/// complete and none continues it.
fn best_allowed(logits: &[f32], choices: &[Vec<u32>], prefix: &[u32]) -> Option<u32> {
    choices
        .iter()
        .filter(|c| c.len() > prefix.len() && c.starts_with(prefix))
        .map(|c| c[prefix.len()])
        .max_by(|&a, &b| logits[a as usize].total_cmp(&logits[b as usize]))
}

async fn main() -> Result<(), String> {
    let args = inferlet::args();
    let prompt = arg_value(&args, "--prompt").ok_or("missing --prompt TEXT")?;
    let choices = arg_value(&args, "--choices").ok_or("missing --choices A|B|C")?;
    let model = Model::get();
    let names: Vec<&str> = choices.split('|').filter(|c| !c.is_empty()).collect();
    let tokenized = names
        .iter()
        .map(|c| model.tokenize(c))
        .collect::<Result<Vec<_>, _>>()?;
    if tokenized.iter().any(|t| t.is_empty()) || names.is_empty() {
        return Err("every choice needs at least one token".into());
    }

    let mut ctx = Context::new(&model);
    ctx.user(&prompt);
    ctx.sync_chat()?;
    let mut answer: Vec<u32> = Vec::new();
    loop {
        // Done when the answer is a whole choice that no other choice extends.
        if tokenized.iter().any(|c| *c == answer)
            && !tokenized
                .iter()
                .any(|c| c.len() > answer.len() && c.starts_with(&answer))
        {
            break;
        }
        let last = ctx.pending().len().max(1) - 1;
        let outs = ctx.forward(&[], &[(last, OutputKind::Logits)]).await?;
        let Some(Output::Logits(logits)) = outs.into_iter().next() else {
            return Err("no logits returned".into());
        };
        let token =
            best_allowed(&logits, &tokenized, &answer).ok_or("no choice continues the answer")?;
        answer.push(token);
        ctx.fill(&[token]);
    }
    let chosen = tokenized
        .iter()
        .position(|c| *c == answer)
        .expect("loop ends on a choice");
    inferlet::send(names[chosen]);
    Ok(())
}

inferlet::main!(main);
