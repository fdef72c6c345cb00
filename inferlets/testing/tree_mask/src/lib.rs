//! Tree attention through the SDK's raw pass: after a prompt, one pass on
//! context `a` runs a root token and two siblings under it that must not
//! see each other (a tree mask, siblings at the same rotary position),
//! beside forks `b` and `c` running each branch alone, all three in one
//! batch. Sends `refused: …` for a mask of the wrong shape, then
//! `tree ok <max |diff|>` when every branch token's logits match its fork
//! within 1e-3 of their scale, else fails with the difference.
//!
//! Arguments: `[--prompt TEXT]`.

use std::future::Future;
use std::pin::Pin;

use inferlet::{arg_value, join_all, tree_mask, Context, Model, Output, OutputKind, Pass};

type Passes<'a> = Pin<Box<dyn Future<Output = Result<Vec<Output>, String>> + 'a>>;

const ROOT: u32 = 5;
const SIBLINGS: [u32; 2] = [6, 7];

async fn main() -> Result<(), String> {
    let args = inferlet::args();
    let prompt = arg_value(&args, "--prompt").unwrap_or_else(|| "Hello there".into());
    let model = Model::get();
    let mut a = Context::new(&model);
    a.fill_text(&prompt)?;
    let n = a.pending().len();
    if n == 0 {
        return Err("the prompt has no tokens".into());
    }
    a.forward(&[], &[(n - 1, OutputKind::Logits)]).await?;
    let (mut b, mut c) = (a.fork()?, a.fork()?);

    let bad = Pass {
        tokens: vec![ROOT],
        mask: Some(vec![vec![true]]),
        ..Pass::default()
    };
    match a.pass(bad).await {
        Err(e) => inferlet::send(&format!("refused: {e}")),
        Ok(_) => return Err("a mask of the wrong shape was accepted".into()),
    }

    let pos = a.run_len() as u32;
    let tree = Pass {
        tokens: vec![ROOT, SIBLINGS[0], SIBLINGS[1]],
        positions: Some(vec![pos, pos + 1, pos + 1]),
        mask: Some(tree_mask(a.run_len(), &[None, Some(0), Some(0)])),
        outputs: vec![(1, OutputKind::Logits), (2, OutputKind::Logits)],
    };
    let last = [(1, OutputKind::Logits)];
    let passes: Vec<Passes> = vec![
        Box::pin(a.pass(tree)),
        Box::pin(b.forward(&[ROOT, SIBLINGS[0]], &last)),
        Box::pin(c.forward(&[ROOT, SIBLINGS[1]], &last)),
    ];
    let mut results = join_all(passes).await.into_iter();
    let tree = logits(results.next().expect("three results")?)?;
    let alone: Vec<Vec<f32>> = results
        .map(|r| logits(r?).map(|mut l| l.remove(0)))
        .collect::<Result<_, _>>()?;
    let mut worst = 0f32;
    for (i, (x, y)) in tree.iter().zip(&alone).enumerate() {
        let scale = y.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        if diff > 1e-3 * scale {
            return Err(format!(
                "sibling {i}: logits differ from its branch alone by {diff}"
            ));
        }
        worst = worst.max(diff);
    }
    inferlet::send(&format!("tree ok {worst:e}"));
    Ok(())
}

fn logits(outputs: Vec<Output>) -> Result<Vec<Vec<f32>>, String> {
    outputs
        .into_iter()
        .map(|o| match o {
            Output::Logits(l) => Ok(l),
            other => Err(format!("expected logits, got {other:?}")),
        })
        .collect()
}

inferlet::main!(main);
