//! Helpers shared by the end-to-end tests (inferlets, Python inferlets,
//! server): the tiny llama fixture, the compiled example components, and
//! the greedy reply the chat inferlets and endpoints must reproduce.

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
