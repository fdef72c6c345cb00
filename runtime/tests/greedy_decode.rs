//! Greedy generation queues each decode step before it reads the tokens of
//! the step before (`Engine::generate`, the driver feeding the ids it
//! chose): a sequence that stops while a step is queued must end exactly
//! where it would have without the queued step, and the others go on.

mod common;

use pie_driver::Driver;
use pie_driver_portable::PortableDriver;
use pie_runtime::sampling::Sampler;
use pie_runtime::{Engine, LoadOptions};

const MAX_TOKENS: usize = 10;

fn engine() -> (Engine<PortableDriver>, Vec<Vec<u32>>) {
    let (dir, prompts) = common::fixture("qwen3");
    let engine = Engine::load(&dir, PortableDriver::new(), &LoadOptions::default(), None).unwrap();
    (engine, prompts.into_iter().map(|p| p.ids).collect())
}

/// `tokens` up to and including the first `stop`.
fn until_stop(tokens: &[u32], stop: u32) -> Vec<u32> {
    match tokens.iter().position(|&t| t == stop) {
        Some(i) => tokens[..=i].to_vec(),
        None => tokens.to_vec(),
    }
}

#[test]
fn a_sequence_stopping_mid_batch_ends_at_its_stop_token_and_the_others_go_on() {
    let (mut engine, prompts) = engine();
    assert!(
        engine.driver.feeds_tokens(),
        "the loop under test queues steps"
    );
    engine.stop_ids.clear();
    let full = engine
        .generate(&prompts, MAX_TOKENS, &Sampler::greedy())
        .unwrap();
    // A stop token that ends one sequence after a few tokens while another
    // runs to the limit.
    let stop = full
        .iter()
        .flat_map(|seq| seq[2..MAX_TOKENS - 2].iter().copied())
        .find(|&t| {
            let ends: Vec<usize> = full.iter().map(|s| until_stop(s, t).len()).collect();
            ends.contains(&MAX_TOKENS) && ends.iter().any(|&e| (3..MAX_TOKENS - 1).contains(&e))
        })
        .expect("the fixture's greedy tokens offer a stop token ending one sequence early");

    engine.stop_ids = vec![stop];
    let stopped = engine
        .generate(&prompts, MAX_TOKENS, &Sampler::greedy())
        .unwrap();
    for (i, (got, all)) in stopped.iter().zip(&full).enumerate() {
        assert_eq!(got, &until_stop(all, stop), "sequence {i} with stop {stop}");
        let alone = engine
            .generate(
                std::slice::from_ref(&prompts[i]),
                MAX_TOKENS,
                &Sampler::greedy(),
            )
            .unwrap();
        assert_eq!(&alone[0], got, "sequence {i} alone");
    }
}

#[test]
fn zero_token_one_token_and_empty_requests_stop_without_a_queued_step() {
    let (mut engine, prompts) = engine();
    engine.stop_ids.clear();
    let none = engine.generate(&prompts, 0, &Sampler::greedy()).unwrap();
    assert!(none.iter().all(|s| s.is_empty()));
    assert!(engine
        .generate(&[], 5, &Sampler::greedy())
        .unwrap()
        .is_empty());
    let one = engine.generate(&prompts, 1, &Sampler::greedy()).unwrap();
    let full = engine
        .generate(&prompts, MAX_TOKENS, &Sampler::greedy())
        .unwrap();
    for (o, f) in one.iter().zip(&full) {
        assert_eq!(o.as_slice(), &f[..1]);
    }
}
