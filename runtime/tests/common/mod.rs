//! Helpers shared by the runtime's tests: the fixtures' reference prompts
//! (parity, greedy decoding), and for the end-to-end tests (inferlets,
//! Python inferlets, server) the tiny llama fixture, the compiled example
//! components, and the greedy reply the chat inferlets and endpoints must
//! reproduce.

// Each test crate uses a different subset of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use pie_driver_portable::PortableDriver;
use pie_runtime::chat_template::ChatMessage;
use pie_runtime::inferlet::Event;
use pie_runtime::sampling::Sampler;
use pie_runtime::{Engine, LoadOptions};

pub const PROMPT: &str = "What is the capital of France?";
pub const MAX_TOKENS: usize = 24;

/// One prompt of a fixture's `reference.json` (`tests/fixtures/make_fixtures.py`).
pub struct Prompt {
    pub ids: Vec<u32>,
    /// transformers' logits at every position.
    pub logits: Vec<Vec<f32>>,
    /// transformers' greedy tokens after the prompt.
    pub greedy: Vec<u32>,
    /// transformers' `generate` (KV cache) agreed with repeated full
    /// forwards. Phi-3 LongRoPE is the exception: crossing the original
    /// context there changes the rope of every cached key.
    pub cache_consistent: bool,
}

/// Fixture `name`'s directory (`tests/fixtures/<name>`).
pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Fixture `name`'s directory and reference prompts.
pub fn fixture(name: &str) -> (PathBuf, Vec<Prompt>) {
    let dir = fixture_dir(name);
    let text = std::fs::read_to_string(dir.join("reference.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prompts = v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Prompt {
            ids: serde_json::from_value(p["ids"].clone()).unwrap(),
            logits: serde_json::from_value(p["logits"].clone()).unwrap(),
            greedy: serde_json::from_value(p["greedy"].clone()).unwrap(),
            cache_consistent: p["cache_consistent"].as_bool().unwrap_or(true),
        })
        .collect();
    (dir, prompts)
}

pub fn llama() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama")
}

pub fn engine() -> Engine<PortableDriver> {
    Engine::load(
        &llama(),
        PortableDriver::new(),
        &LoadOptions::default(),
        None,
    )
    .unwrap()
}

/// A compiled example component (`inferlets/build.sh` builds them).
pub fn component_path(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../inferlets/target/components")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the inferlets first with inferlets/build.sh",
        path.display()
    );
    path
}

/// The prompt ids the chat inferlets and the chat endpoint build: the chat
/// template, then the tokenizer without special tokens added.
pub fn chat_prompt_ids(e: &Engine<PortableDriver>, prompt: &str) -> Vec<u32> {
    let messages = [ChatMessage {
        role: "user".into(),
        content: prompt.into(),
    }];
    let text = e
        .chat_template
        .as_ref()
        .unwrap()
        .render(&messages, true)
        .unwrap();
    e.tokenizer.as_ref().unwrap().encode(&text, false).unwrap()
}

/// `Engine::generate`'s greedy reply to a chat prompt as text, `MAX_TOKENS`
/// at most (stop token left out).
pub fn expected_reply(prompt: &str) -> String {
    let mut e = engine();
    let ids = chat_prompt_ids(&e, prompt);
    let mut out = e
        .generate(&[ids], MAX_TOKENS, &Sampler::greedy())
        .unwrap()
        .remove(0);
    if out.last().is_some_and(|t| e.stop_ids.contains(t)) {
        out.pop();
    }
    assert!(!out.is_empty(), "the reference generated nothing");
    e.tokenizer.as_ref().unwrap().decode(&out, true).unwrap()
}

/// The messages an inferlet sent, in order.
pub fn messages(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

pub fn tokio() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
