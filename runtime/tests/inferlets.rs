//! End to end with the real example inferlets, compiled to components by
//! `inferlets/build.sh` (CI runs it before the tests), on the tiny llama
//! fixture: the chat example must produce `Engine::generate`'s greedy text,
//! best-of-n runs on forks, and misbehaving inferlets end with their error
//! while a well-behaved one beside them completes correctly.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pie_runtime::inferlet::{Event, InferletRuntime, Limits};
use pie_runtime::scheduler::{Scheduler, SchedulerConfig};
use wasmtime::component::Component;

mod common;

use common::*;

fn runtime(kv_pages: usize) -> InferletRuntime {
    let cfg = SchedulerConfig {
        kv_pages,
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::start("llama", || Ok(engine()), cfg).unwrap();
    InferletRuntime::new(sched).unwrap()
}

fn load(rt: &InferletRuntime, name: &str) -> Component {
    rt.compile(&std::fs::read(component_path(name)).unwrap())
        .unwrap()
}

fn chat_args(prompt: &str) -> Vec<String> {
    ["--prompt", prompt, "--max-tokens", &MAX_TOKENS.to_string()]
        .map(String::from)
        .to_vec()
}

#[test]
fn chat_example_matches_engine_greedy() {
    let expected = expected_reply(PROMPT);
    let rt = runtime(256);
    let chat = load(&rt, "chat");
    let (events, status) = tokio().block_on(async {
        rt.launch(&chat, chat_args(PROMPT), Limits::default())
            .wait()
            .await
    });
    status.unwrap();
    assert_eq!(messages(&events), vec![expected]);
    let kv = rt.scheduler().kv();
    assert_eq!(kv.free_pages(), kv.total_pages(), "pages freed at exit");
}

#[test]
fn best_of_n_forks_and_batches_the_branches() {
    let rt = runtime(256);
    let best = load(&rt, "best_of_n");
    let args = ["--prompt", PROMPT, "--n", "4", "--max-tokens", "8"].map(String::from);
    let (events, status) = tokio().block_on(async {
        rt.launch(&best, args.to_vec(), Limits::default())
            .wait()
            .await
    });
    status.unwrap();
    let msgs = messages(&events);
    assert_eq!(msgs.len(), 5, "{msgs:?}");
    let best = msgs[4]
        .strip_prefix("best: ")
        .expect("last message names the best");
    assert!(
        msgs[..4].iter().any(|m| m.ends_with(&format!("): {best}"))),
        "{msgs:?}"
    );
    // The prompt, then 4 branches of up to 8 tokens: branches share batches
    // (one batch per pass without sharing). Not every step of every branch:
    // the scheduler waits at most 2 ms for answered passes to come back,
    // and on a loaded 2-core machine a branch's next pass can take longer
    // (17 batches for 33 passes seen there), so 1.5 passes a batch is asked.
    let stats = rt.scheduler().stats();
    let (passes, batches) = (
        stats.passes.load(Ordering::Relaxed),
        stats.batches.load(Ordering::Relaxed),
    );
    assert!(
        passes >= 5 && batches * 3 < passes * 2,
        "{batches} batches for {passes} passes"
    );
    let kv = rt.scheduler().kv();
    assert_eq!(kv.free_pages(), kv.total_pages());
}

#[test]
fn choice_example_picks_the_engines_best_choice() {
    let choices = ["Paris", "London", "Berlin"];
    let mut e = engine();
    let prompt = chat_prompt_ids(&e, PROMPT);
    let tok = e.tokenizer.take().unwrap();
    let tokenized: Vec<Vec<u32>> = choices
        .iter()
        .map(|c| tok.encode(c, false).unwrap())
        .collect();
    // The same constrained greedy walk, with the engine's logits.
    let mut answer: Vec<u32> = Vec::new();
    while !tokenized.contains(&answer)
        || tokenized
            .iter()
            .any(|c| c.len() > answer.len() && c.starts_with(&answer))
    {
        let mut ids = prompt.clone();
        ids.extend(&answer);
        let logits = e.prompt_logits(&[ids]).unwrap()[0].last().unwrap().clone();
        let next = tokenized
            .iter()
            .filter(|c| c.len() > answer.len() && c.starts_with(&answer))
            .map(|c| c[answer.len()])
            .max_by(|&a, &b| logits[a as usize].total_cmp(&logits[b as usize]))
            .unwrap();
        answer.push(next);
    }
    let expected = choices[tokenized.iter().position(|c| *c == answer).unwrap()];

    let rt = runtime(256);
    let choice = load(&rt, "choice");
    let args = ["--prompt", PROMPT, "--choices", &choices.join("|")].map(String::from);
    let (events, status) = tokio().block_on(async {
        rt.launch(&choice, args.to_vec(), Limits::default())
            .wait()
            .await
    });
    status.unwrap();
    assert_eq!(messages(&events), vec![expected.to_string()]);
}

#[test]
fn faulty_inferlets_fail_alone() {
    let expected = expected_reply(PROMPT);
    let rt = runtime(256);
    let (chat, faulty) = (load(&rt, "chat"), load(&rt, "faulty"));
    let strict = Limits {
        time: Duration::from_secs(2),
        memory: 32 << 20,
    };
    let results = tokio().block_on(async {
        let bad: Vec<_> = ["trap", "loop", "alloc"]
            .iter()
            .map(|m| rt.launch(&faulty, vec![m.to_string()], strict.clone()))
            .collect();
        let good = rt.launch(&chat, chat_args(PROMPT), Limits::default());
        let mut out = vec![good.wait().await];
        for b in bad {
            out.push(b.wait().await);
        }
        out
    });
    let (events, status) = &results[0];
    assert_eq!(status, &Ok(()));
    assert_eq!(messages(events), vec![expected]);

    let (trap_events, trap) = &results[1];
    let trap = trap.as_ref().unwrap_err();
    assert!(
        trap.contains("trapped") && trap.contains("unreachable"),
        "{trap}"
    );
    assert!(
        trap_events.iter().any(|e| matches!(e, Event::Log { level: "error", text } if text.contains("trapping on purpose"))),
        "the panic message reaches the client: {trap_events:?}"
    );
    let looped = results[2].1.as_ref().unwrap_err();
    assert!(looped.contains("time limit exceeded"), "{looped}");
    let hog = results[3].1.as_ref().unwrap_err();
    assert!(hog.contains("memory limit exceeded"), "{hog}");
    let kv = rt.scheduler().kv();
    assert_eq!(kv.free_pages(), kv.total_pages(), "no pages leaked");
}

/// A raw pass with a tree mask through the Rust SDK (`testing/tree_mask`):
/// a mask of the wrong shape is refused with its reason, then two siblings
/// hidden from each other in one pass give the logits of each branch run
/// alone on a fork, in the same batch.
#[test]
fn tree_masked_pass_matches_each_branch_alone() {
    let rt = runtime(256);
    let tree = load(&rt, "tree_mask");
    let (events, status) = tokio().block_on(async {
        rt.launch(
            &tree,
            vec!["--prompt".into(), PROMPT.into()],
            Limits::default(),
        )
        .wait()
        .await
    });
    status.unwrap();
    let msgs = messages(&events);
    eprintln!("{msgs:?}");
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(
        msgs[0].starts_with("refused: ") && msgs[0].contains("row 0 has 1 entries"),
        "{msgs:?}"
    );
    assert!(msgs[1].starts_with("tree ok "), "{msgs:?}");
    let kv = rt.scheduler().kv();
    assert_eq!(kv.free_pages(), kv.total_pages(), "pages freed at exit");
}
