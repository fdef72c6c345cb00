//! The scheduler against the engine run directly: chunked prefill, forks
//! with copy on write of a shared partial page, and KV exhaustion must give
//! the logits `Engine::prompt_logits` gives for the same tokens.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use pie_driver_portable::PortableDriver;
use pie_runtime::scheduler::{
    ContextId, OutputKind, PassOutput, PassRequest, PassResult, Scheduler, SchedulerConfig,
};
use pie_runtime::{Engine, LoadOptions};

fn llama() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama")
}

/// Small pages and batches, so prefill splits and forks share a partial page.
fn opts() -> LoadOptions {
    LoadOptions {
        page_size: 4,
        ..LoadOptions::default()
    }
}

fn start(kv_pages: usize, max_forward_tokens: usize) -> Scheduler {
    let cfg = SchedulerConfig {
        max_forward_tokens,
        kv_pages,
        ..SchedulerConfig::default()
    };
    Scheduler::start(
        "llama",
        || Engine::load(&llama(), PortableDriver::new(), &opts(), None),
        cfg,
    )
    .unwrap()
}

/// Runs a pass and waits for it; asks for the logits of its last token.
fn pass(s: &Scheduler, ctx: ContextId, tokens: &[u32]) -> PassResult {
    let (tx, rx) = mpsc::channel();
    let req = PassRequest {
        ctx,
        tokens: tokens.to_vec(),
        outputs: vec![(tokens.len() as u32 - 1, OutputKind::Logits)],
        ..PassRequest::default()
    };
    s.submit(req, Box::new(move |r| tx.send(r).unwrap()))?;
    rx.recv().unwrap()
}

fn logits(r: PassResult) -> Vec<f32> {
    match r.unwrap().remove(0) {
        PassOutput::Logits(l) => l,
        other => panic!("expected logits, got {other:?}"),
    }
}

fn reference(tokens: &[u32]) -> Vec<f32> {
    let mut e = Engine::load(&llama(), PortableDriver::new(), &opts(), None).unwrap();
    e.prompt_logits(&[tokens.to_vec()]).unwrap()[0]
        .last()
        .unwrap()
        .clone()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "{what}: max diff {diff} (scale {scale})"
    );
}

#[test]
fn chunked_prefill_and_forks_match_the_engine() {
    let s = start(64, 7);
    let prompt: Vec<u32> = (0..18).map(|i| (i * 7 + 3) % 100 + 5).collect();
    let a = s.kv().create();
    // 18 tokens in batches of at most 7 tokens: three steps.
    let got = logits(pass(&s, a, &prompt));
    assert_close(&got, &reference(&prompt), "chunked prefill");
    assert!(s.stats().batches.load(Ordering::Relaxed) >= 3);

    // 18 = 4 pages of 4 + 2: the fork shares a partial page.
    let b = s.kv().fork(a).unwrap();
    let free = s.kv().free_pages();
    let got_b = logits(pass(&s, b, &[42]));
    assert_eq!(
        s.kv().free_pages(),
        free - 1,
        "one page copied for the fork"
    );
    let got_a = logits(pass(&s, a, &[43, 44]));
    let mut pa = prompt.clone();
    pa.extend([43, 44]);
    let mut pb = prompt.clone();
    pb.push(42);
    assert_close(&got_b, &reference(&pb), "fork");
    assert_close(&got_a, &reference(&pa), "parent after fork");
    assert_eq!(s.kv().tokens(b).unwrap(), pb.as_slice());

    s.kv().release(a);
    s.kv().release(b);
    assert_eq!(s.kv().free_pages(), 64);
}

#[test]
fn exhaustion_fails_the_pass_and_keeps_the_context() {
    let s = start(4, 10240);
    let a = s.kv().create();
    let prompt: Vec<u32> = (5..15).collect();
    logits(pass(&s, a, &prompt));
    let err = pass(&s, a, &[7; 12]).unwrap_err();
    assert!(err.contains("KV cache exhausted"), "{err}");
    assert_eq!(
        s.kv().tokens(a).unwrap(),
        prompt.as_slice(),
        "context unchanged"
    );
    // Still usable.
    let mut more = prompt.clone();
    more.push(9);
    assert_close(
        &logits(pass(&s, a, &[9])),
        &reference(&more),
        "after exhaustion",
    );
}

#[test]
fn bad_passes_are_refused_with_a_reason() {
    let s = start(8, 10240);
    let a = s.kv().create();
    let err = pass(&s, a, &[1_000_000]).unwrap_err();
    assert!(err.contains("out of range"), "{err}");
    let err = s
        .submit(
            PassRequest {
                ctx: a,
                tokens: vec![1, 2],
                positions: Some(vec![5, 6, 7]),
                ..PassRequest::default()
            },
            Box::new(|_| {}),
        )
        .unwrap_err();
    assert!(
        err.contains("3 positions given for 2 input tokens"),
        "{err}"
    );
    // Masks of the wrong shape, or hiding every key from a token.
    let masked = |mask: Vec<Vec<bool>>| {
        let req = PassRequest {
            ctx: a,
            tokens: vec![1, 2],
            mask: Some(mask),
            ..PassRequest::default()
        };
        s.submit(req, Box::new(|_| {})).unwrap_err()
    };
    let err = masked(vec![vec![true, true]]);
    assert!(err.contains("1 rows for 2 input tokens"), "{err}");
    let err = masked(vec![vec![true], vec![false, true]]);
    assert!(
        err.contains("row 0 has 1 entries; each row needs 2"),
        "{err}"
    );
    let err = masked(vec![vec![false, false], vec![false, true]]);
    assert!(err.contains("row 0 attends to no position"), "{err}");
    assert!(pass(&s, 999, &[1]).unwrap_err().contains("no context 999"));
    assert!(s.kv().tokens(a).unwrap().is_empty());
    // The scheduler keeps serving the context after the refusals.
    assert_close(
        &logits(pass(&s, a, &[1, 2])),
        &reference(&[1, 2]),
        "after refusals",
    );
}

/// Rows over `ctx_len + n` keys: the context's tokens, then each token's
/// own ancestors in the pass (`parents[i]`: index of token i's parent in
/// the pass, None for a root under the context) and itself.
fn tree_mask(ctx_len: usize, parents: &[Option<usize>]) -> Vec<Vec<bool>> {
    let n = parents.len();
    (0..n)
        .map(|i| {
            let mut row = vec![false; ctx_len + n];
            row[..ctx_len].fill(true);
            let mut at = Some(i);
            while let Some(t) = at {
                row[ctx_len + t] = true;
                at = parents[t];
            }
            row
        })
        .collect()
}

/// A tree of drafts in one pass (a root, two siblings under it that must
/// not see each other, a grandchild under the first) gives each token the
/// logits of its branch run alone; a later pass that hides the rejected
/// sibling continues the accepted branch. The pass is queued behind a
/// long prompt that fills the batches, so it also waits to run whole.
#[test]
fn tree_masks_match_each_branch_run_alone() {
    let s = start(64, 5);
    let prompt: Vec<u32> = (0..9).map(|i| (i * 7 + 3) % 200 + 3).collect();
    let a = s.kv().create();
    logits(pass(&s, a, &prompt));
    let (root, b1, b2, c1) = (31u32, 32, 33, 34);
    let l = prompt.len() as u32;
    let tree = PassRequest {
        ctx: a,
        tokens: vec![root, b1, b2, c1],
        positions: Some(vec![l, l + 1, l + 1, l + 2]),
        mask: Some(tree_mask(9, &[None, Some(0), Some(0), Some(1)])),
        outputs: (0..4).map(|i| (i, OutputKind::Logits)).collect(),
    };
    let long = s.kv().create();
    let (tx, rx) = mpsc::channel();
    let (tx2, rx2) = mpsc::channel();
    let first = s
        .prepare(
            PassRequest {
                ctx: long,
                tokens: (0..12).map(|i| i + 40).collect(),
                outputs: vec![(11, OutputKind::Logits)],
                ..PassRequest::default()
            },
            Box::new(move |r| tx2.send(r).unwrap()),
        )
        .unwrap();
    let second = s
        .prepare(tree, Box::new(move |r| tx.send(r).unwrap()))
        .unwrap();
    s.send(vec![first, second]).unwrap();
    let outs: Vec<Vec<f32>> = rx
        .recv()
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|o| match o {
            PassOutput::Logits(l) => l,
            other => panic!("{other:?}"),
        })
        .collect();
    rx2.recv().unwrap().unwrap();

    let mut e = Engine::load(&llama(), PortableDriver::new(), &opts(), None).unwrap();
    let branch1 = [prompt.clone(), vec![root, b1, c1]].concat();
    let branch2 = [prompt.clone(), vec![root, b2]].concat();
    let refs = e.prompt_logits(&[branch1.clone(), branch2]).unwrap();
    assert_close(&outs[0], &refs[0][9], "root");
    assert_close(&outs[1], &refs[0][10], "first sibling");
    assert_close(&outs[2], &refs[1][10], "second sibling");
    assert_close(&outs[3], &refs[0][11], "grandchild");

    // Accept root, b1, c1: the next token hides b2 (cache position 11).
    let mut row = vec![true; 14];
    row[11] = false;
    let (tx, rx) = mpsc::channel();
    let next = PassRequest {
        ctx: a,
        tokens: vec![35],
        positions: Some(vec![l + 3]),
        mask: Some(vec![row]),
        outputs: vec![(0, OutputKind::Logits)],
    };
    s.submit(next, Box::new(move |r| tx.send(r).unwrap()))
        .unwrap();
    let got = logits(rx.recv().unwrap());
    assert_close(
        &got,
        &reference(&[branch1, vec![35]].concat()),
        "accepted branch",
    );
}

/// Models whose layers cannot apply a mask (here Gated DeltaNet) refuse a
/// custom one up front, naming the layer, and keep serving; the causal
/// mask written out is still accepted.
#[test]
fn recurrent_models_refuse_custom_masks() {
    let s = Scheduler::start(
        "qwen3_5",
        || Engine::load(&qwen3_5(), PortableDriver::new(), &opts(), None),
        SchedulerConfig {
            kv_pages: 16,
            ..SchedulerConfig::default()
        },
    )
    .unwrap();
    let a = s.kv().create();
    let req = |mask| PassRequest {
        ctx: a,
        tokens: vec![5, 6],
        mask: Some(mask),
        outputs: vec![(1, OutputKind::Logits)],
        ..PassRequest::default()
    };
    let err = s
        .submit(req(tree_mask(0, &[None, None])), Box::new(|_| {}))
        .unwrap_err();
    assert!(
        err.contains("cannot take a custom attention mask: its `gated_delta_net` layers"),
        "{err}"
    );
    let (tx, rx) = mpsc::channel();
    let causal = vec![vec![true, false], vec![true, true]];
    s.submit(req(causal), Box::new(move |r| tx.send(r).unwrap()))
        .unwrap();
    assert_close(
        &logits(rx.recv().unwrap()),
        &reference_qwen3_5(&[5, 6]),
        "causal",
    );
}

fn qwen3_5() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3_5")
}

fn reference_qwen3_5(tokens: &[u32]) -> Vec<f32> {
    let mut e = Engine::load(&qwen3_5(), PortableDriver::new(), &opts(), None).unwrap();
    e.prompt_logits(&[tokens.to_vec()]).unwrap()[0]
        .last()
        .unwrap()
        .clone()
}

/// Gated DeltaNet layers keep a recurrent state per context: chunked
/// prefill continues it, a fork copies it, trimming is refused, and each
/// context's logits equal a fresh run of its whole token sequence.
#[test]
fn recurrent_contexts_keep_their_own_state() {
    let cfg = SchedulerConfig {
        max_forward_tokens: 5,
        kv_pages: 32,
        max_recurrent_contexts: 3,
        ..SchedulerConfig::default()
    };
    let s = Scheduler::start(
        "qwen3_5",
        || Engine::load(&qwen3_5(), PortableDriver::new(), &opts(), None),
        cfg,
    )
    .unwrap();
    let prompt: Vec<u32> = (0..13).map(|i| (i * 11 + 2) % 200 + 3).collect();
    let a = s.kv().create();
    let got = logits(pass(&s, a, &prompt));
    assert_close(&got, &reference_qwen3_5(&prompt), "chunked prefill");

    let b = s.kv().fork(a).unwrap();
    let c = s.kv().fork(a).unwrap();
    // Both branches and the parent advance in one batch.
    let (tx, rx) = mpsc::channel();
    for (ctx, tok) in [(a, 40u32), (b, 41), (c, 42)] {
        let tx = tx.clone();
        let req = PassRequest {
            ctx,
            tokens: vec![tok],
            outputs: vec![(0, OutputKind::Logits)],
            ..PassRequest::default()
        };
        s.submit(req, Box::new(move |r| tx.send((tok, r)).unwrap()))
            .unwrap();
    }
    for _ in 0..3 {
        let (tok, r) = rx.recv().unwrap();
        let mut whole = prompt.clone();
        whole.push(tok);
        assert_close(&logits(r), &reference_qwen3_5(&whole), "branch");
    }
    // Every state row is held: a fourth context waits, then fails clearly.
    let d = s.kv().create();
    let err = pass(&s, d, &[5]).unwrap_err();
    assert!(err.contains("recurrent state exhausted"), "{err}");
    let err = s.kv().trim(b, 3).unwrap_err().to_string();
    assert!(err.contains("recurrent layers"), "{err}");
    s.kv().release(c);
    let got = logits(pass(&s, d, &[5, 6]));
    assert_close(&got, &reference_qwen3_5(&[5, 6]), "state row reused");
}

/// A pass that finds the cache full waits for pages rather than failing at
/// once: a context released meanwhile lets it run.
#[test]
fn exhaustion_waits_for_a_release() {
    let s = start(4, 10240);
    let a = s.kv().create();
    logits(pass(&s, a, &(5..19).collect::<Vec<u32>>())); // 14 tokens: 4 pages
    assert_eq!(s.kv().free_pages(), 0);
    let b = s.kv().create();
    let (tx, rx) = mpsc::channel();
    let req = PassRequest {
        ctx: b,
        tokens: vec![3, 4, 5],
        outputs: vec![(2, OutputKind::Logits)],
        ..PassRequest::default()
    };
    s.submit(req, Box::new(move |r| tx.send(r).unwrap()))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        rx.try_recv().is_err(),
        "the pass waits while the cache is full"
    );
    s.kv().release(a);
    let got = logits(rx.recv().unwrap());
    assert_close(&got, &reference(&[3, 4, 5]), "after the release");
}

/// Positions given with a pass set the tokens' rotation: shifting a whole
/// sequence's positions leaves the logits of a rotary model unchanged
/// (attention sees only relative positions), while collapsing them changes
/// the logits.
#[test]
fn given_positions_rotate_the_tokens() {
    let s = start(32, 10240);
    let prompt: Vec<u32> = (0..9).map(|i| (i * 5 + 7) % 100 + 5).collect();
    let with_positions = |positions: Option<Vec<u32>>| {
        let ctx = s.kv().create();
        let (tx, rx) = mpsc::channel();
        let req = PassRequest {
            ctx,
            tokens: prompt.clone(),
            positions,
            outputs: vec![(prompt.len() as u32 - 1, OutputKind::Logits)],
            ..PassRequest::default()
        };
        s.submit(req, Box::new(move |r| tx.send(r).unwrap()))
            .unwrap();
        let got = logits(rx.recv().unwrap());
        s.kv().release(ctx);
        got
    };
    let plain = with_positions(None);
    assert_close(&plain, &reference(&prompt), "default positions");
    let shifted = with_positions(Some((100..109).collect()));
    assert_close(&shifted, &plain, "positions shifted by 100");
    let collapsed = with_positions(Some(vec![0; 9]));
    let diff = collapsed
        .iter()
        .zip(&plain)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff > 1e-3, "collapsed positions changed nothing ({diff})");
}
