//! Parity with Hugging Face transformers. Each fixture in `tests/fixtures/`
//! is a tiny random-weight float32 model saved by transformers, with the
//! reference logits of every prompt position and 10 greedy tokens
//! (`tests/fixtures/make_fixtures.py`, pinned versions). No Python needed here.

mod common;

use pie_driver_portable::{ChunkedScan, PortableDriver};
use pie_runtime::sampling::Sampler;
use pie_runtime::{Engine, LoadOptions};

use common::{fixture, Prompt};

/// Relative tolerance on logits for float32 models: max|diff| ≤ 1e-3 · max|ref|.
const REL_TOL: f32 = 1e-3;

/// The largest |ours - ref| over all positions, and max |ref|.
fn max_error(ours: &[Vec<f32>], reference: &[Vec<f32>]) -> (f32, f32) {
    assert_eq!(ours.len(), reference.len(), "positions");
    let mut diff = 0f32;
    let mut scale = 0f32;
    for (a, b) in ours.iter().zip(reference) {
        assert_eq!(a.len(), b.len(), "vocab");
        for (x, y) in a.iter().zip(b) {
            diff = diff.max((x - y).abs());
            scale = scale.max(y.abs());
        }
    }
    (diff, scale)
}

fn check(name: &str, page_size: usize) {
    check_with(name, page_size, PortableDriver::new());
}

fn check_with(name: &str, page_size: usize, driver: PortableDriver) {
    let (dir, prompts) = fixture(name);
    let opts = LoadOptions {
        page_size,
        ..LoadOptions::default()
    };
    let mut engine =
        Engine::load(&dir, driver, &opts, None).unwrap_or_else(|e| panic!("{name}: {e}"));
    // The reference generated exactly 10 tokens, EOS or not.
    engine.stop_ids.clear();

    // All prompts in one ragged batch, each with its own page table.
    let inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let logits = engine.prompt_logits(&inputs).unwrap();
    for (i, (ours, p)) in logits.iter().zip(&prompts).enumerate() {
        let (diff, scale) = max_error(ours, &p.logits);
        eprintln!(
            "{name} prompt {i}: max|diff| = {diff:.3e}, max|ref| = {scale:.3}, ratio {:.3e}",
            diff / scale
        );
        assert!(
            diff <= REL_TOL * scale,
            "{name} prompt {i}: max|diff| {diff} > {REL_TOL} × {scale}"
        );
    }

    // Chunked prefill (3 tokens a call) continues KV pages and recurrent
    // state across calls. (LongRoPE picks its factors per forward pass, so
    // chunks of a long prompt legitimately differ from one whole pass.)
    if name == "phi3_longrope" {
        return finish_greedy(name, &mut engine, &prompts, &inputs);
    }
    let chunked = engine.prompt_logits_chunked(&prompts[0].ids, 3).unwrap();
    let (diff, scale) = max_error(&chunked, &prompts[0].logits);
    assert!(
        diff <= REL_TOL * scale,
        "{name} chunked prefill: max|diff| {diff} > {REL_TOL} × {scale}"
    );

    finish_greedy(name, &mut engine, &prompts, &inputs);
}

/// Greedy decoding of all prompts together, then of each alone.
fn finish_greedy(
    name: &str,
    engine: &mut Engine<PortableDriver>,
    prompts: &[Prompt],
    inputs: &[Vec<u32>],
) {
    let greedy = engine.generate(inputs, 10, &Sampler::greedy()).unwrap();
    for (i, (ours, p)) in greedy.iter().zip(prompts).enumerate() {
        if !p.cache_consistent {
            eprintln!("{name} prompt {i}: reference generate() is not cache-consistent; greedy not compared");
            continue;
        }
        assert_eq!(ours, &p.greedy, "{name} prompt {i}: batched greedy tokens");
        let alone = engine
            .generate(std::slice::from_ref(&p.ids), 10, &Sampler::greedy())
            .unwrap();
        assert_eq!(alone[0], p.greedy, "{name} prompt {i}: greedy tokens alone");
    }
}

macro_rules! parity {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                check($name, 32);
                // Pages smaller than the prompts: tokens span several pages.
                check($name, 4);
            }
        )*
    };
}

parity! {
    parity_llama => "llama",
    parity_llama3_rope => "llama3_rope",
    parity_mistral_sliding_window => "mistral",
    parity_qwen2 => "qwen2",
    parity_qwen3_tied_sharded => "qwen3",
    parity_gemma3_sliding_global => "gemma3_text",
    parity_gemma2_softcap_sliding => "gemma2",
    parity_olmo2_post_norms => "olmo2",
    parity_phi3_fused_projections => "phi3",
    parity_mixtral_moe => "mixtral",
    parity_qwen3_moe => "qwen3_moe",
    parity_gpt_oss_sinks_yarn_moe => "gpt_oss",
    parity_qwen3_5_gated_delta_net => "qwen3_5",
    parity_deepseek_v3_mla_moe => "deepseek_v3",
    parity_nemotron_h_mamba2 => "nemotron_h",
    parity_olmo3_sliding => "olmo3",
    parity_mistral3_text => "mistral3",
    parity_deepseek_v2_mla_group_greedy => "deepseek_v2",
    parity_phi3_longrope => "phi3_longrope",
    parity_qwen3_next_fused_gdn_moe => "qwen3_next",
    parity_qwen3_5_moe_shared_expert => "qwen3_5_moe",
    parity_glm_moe_dsa_within_index_topk => "glm_moe_dsa",
    parity_glm_moe_dsa_sparse_indexer_shared_layer => "glm_moe_dsa_sparse",
    parity_phimoe_layer_norm_sparsemixer => "phimoe",
    parity_kimi_k2_single_group_mla_moe => "kimi_k2",
    parity_gemma3n_altup_laurel_kv_sharing => "gemma3n",
}

/// The recurrent fixtures with the chunked scans (Gated DeltaNet, Mamba2
/// SSD) forced on: the prompts (7 and 12 tokens) are shorter than the
/// default threshold. Chunks of 4 from 2 tokens up, so a prompt spans 2–3
/// chunks with a partial last one, the 3-token chunked prefill continues
/// the state in the chunked form, and decode steps stay recurrent.
macro_rules! parity_chunked_scan {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                let scan = ChunkedScan { min_tokens: 2, chunk: 4 };
                check_with($name, 32, PortableDriver::new().with_chunked_scan(scan));
            }
        )*
    };
}

parity_chunked_scan! {
    parity_chunked_qwen3_5_gated_delta_net => "qwen3_5",
    parity_chunked_qwen3_5_moe => "qwen3_5_moe",
    parity_chunked_qwen3_next => "qwen3_next",
    parity_chunked_nemotron_h_mamba2 => "nemotron_h",
}

/// The fixture's tokenizer and chat template give what transformers gave.
#[test]
fn tokenizer_and_chat_template_match_transformers() {
    use pie_runtime::chat_template::{ChatMessage, ChatTemplate};
    use pie_runtime::tokenizer::Tokenizer;

    let (dir, _) = fixture("llama");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let check = &reference["tokenizer_check"];
    assert_eq!(
        check["transformers_agrees"], true,
        "the fixture was cross-checked with transformers"
    );
    let tokenizer = Tokenizer::load(&dir)
        .unwrap()
        .expect("fixture has tokenizer.json");
    let ids: Vec<u32> = serde_json::from_value(check["ids"].clone()).unwrap();
    assert_eq!(
        tokenizer
            .encode(check["text"].as_str().unwrap(), true)
            .unwrap(),
        ids
    );
    assert_eq!(
        tokenizer.decode(&ids, true).unwrap(),
        check["decoded"].as_str().unwrap()
    );

    let template = ChatTemplate::load(&dir)
        .unwrap()
        .expect("fixture has a chat template");
    let messages: Vec<ChatMessage> = check["chat_messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect();
    let rendered = template.render(&messages, true).unwrap();
    assert_eq!(rendered, check["chat_rendered"].as_str().unwrap());
    let chat_ids: Vec<u32> = serde_json::from_value(check["chat_ids"].clone()).unwrap();
    assert_eq!(tokenizer.encode(&rendered, false).unwrap(), chat_ids);
}

/// The same model stored as bf16 and as f16 (the portable driver keeps the
/// weights in that dtype and widens inside the matmul) stays within the
/// rounding error of those formats of the float32 reference: measured
/// 1.2e-2 × max|ref| for bf16 and 2.3e-3 for f16.
#[test]
fn half_precision_weights() {
    use safetensors::tensor::{Dtype, TensorView};

    let (dir, prompts) = fixture("llama");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (dtype, tol) in [(Dtype::BF16, 3e-2f32), (Dtype::F16, 3e-3)] {
        let out = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(dir.join(f), out.path().join(f)).unwrap();
        }
        let converted: Vec<(String, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let data: Vec<u8> = view
                    .data()
                    .chunks_exact(4)
                    .flat_map(|c| {
                        let x = f32::from_le_bytes(c.try_into().unwrap());
                        match dtype {
                            Dtype::BF16 => half::bf16::from_f32(x).to_le_bytes(),
                            _ => half::f16::from_f32(x).to_le_bytes(),
                        }
                    })
                    .collect();
                (name, view.shape().to_vec(), data)
            })
            .collect();
        let views: Vec<(&str, TensorView)> = converted
            .iter()
            .map(|(n, s, d)| (n.as_str(), TensorView::new(dtype, s.clone(), d).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, &None, &out.path().join("model.safetensors"))
            .unwrap();

        // An f32 cache: this test measures the weight format alone (under
        // `auto` a half-precision checkpoint also gets an f16 cache, whose
        // cost `kv_cache_dtypes_quality` measures).
        let opts = LoadOptions {
            kv_cache_dtype: pie_driver::KvDType::F32,
            ..LoadOptions::default()
        };
        let mut engine = Engine::load(out.path(), PortableDriver::new(), &opts, None).unwrap();
        let logits = engine
            .prompt_logits(std::slice::from_ref(&prompts[0].ids))
            .unwrap();
        let (diff, scale) = max_error(&logits[0], &prompts[0].logits);
        eprintln!("{dtype:?} weights: max|diff| = {diff:.3e} (max|ref| {scale:.3})");
        assert!(diff <= tol * scale, "{dtype:?}: {diff} > {tol} × {scale}");
    }
}

/// Gemma 3n ships as `Gemma3nForConditionalGeneration`: the same decoder
/// with its config under `text_config` and its weights under
/// `model.language_model.`. The fixture rewritten that way gives the same
/// logits and greedy tokens.
#[test]
fn gemma3n_multimodal_checkpoint_layout() {
    use safetensors::tensor::TensorView;

    let (dir, prompts) = fixture("gemma3n");
    let out = tempfile::tempdir().unwrap();
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let config = serde_json::json!({
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "text_config": text,
    });
    std::fs::write(out.path().join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name.replacen("model.", "model.language_model.", 1), view))
        .collect();
    safetensors::serialize_to_file(renamed, &None, &out.path().join("model.safetensors")).unwrap();

    let mut engine = Engine::load(
        out.path(),
        PortableDriver::new(),
        &LoadOptions::default(),
        None,
    )
    .unwrap();
    engine.stop_ids.clear();
    let inputs: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let logits = engine.prompt_logits(&inputs).unwrap();
    let greedy = engine.generate(&inputs, 10, &Sampler::greedy()).unwrap();
    for ((ours, tokens), p) in logits.iter().zip(&greedy).zip(&prompts) {
        let (diff, scale) = max_error(ours, &p.logits);
        assert!(diff <= REL_TOL * scale, "{diff} > {REL_TOL} × {scale}");
        assert_eq!(tokens, &p.greedy);
    }
}

/// The worst prompt-logit error (relative to max|ref|) over the fixture's
/// prompts, and how many of the reference greedy tokens come out before
/// the first divergence, summed over prompts.
fn quality(engine: &mut Engine<PortableDriver>, prompts: &[Prompt]) -> (f32, usize) {
    engine.stop_ids.clear();
    let mut worst = 0f32;
    let mut agree = 0;
    for p in prompts {
        let logits = engine
            .prompt_logits(std::slice::from_ref(&p.ids))
            .unwrap()
            .remove(0);
        let (diff, scale) = max_error(&logits, &p.logits);
        worst = worst.max(diff / scale);
        let greedy = engine
            .generate(std::slice::from_ref(&p.ids), 10, &Sampler::greedy())
            .unwrap()
            .remove(0);
        agree += greedy
            .iter()
            .zip(&p.greedy)
            .take_while(|(a, b)| a == b)
            .count();
    }
    (worst, agree)
}

/// Each KV cache dtype against the float32 reference: how far the logits
/// move and whether greedy decoding still agrees (numbers in the note and
/// `docs/QUANTIZATION.md`). The bounds are a few times the measured error.
#[test]
fn kv_cache_dtypes_quality() {
    use pie_driver::KvDType;
    let (dir, prompts) = fixture("llama");
    let bounds = [
        (KvDType::Auto, 1e-3f32),
        (KvDType::F32, 1e-3),
        (KvDType::Bf16, 2e-2),
        (KvDType::F16, 3e-3),
        (KvDType::Int8PerTokenHead, 3e-2),
        (KvDType::Fp8E4m3, 1e-1),
    ];
    for (dtype, bound) in bounds {
        let opts = LoadOptions {
            kv_cache_dtype: dtype,
            ..LoadOptions::default()
        };
        let mut engine = Engine::load(&dir, PortableDriver::new(), &opts, None).unwrap();
        let (worst, agree) = quality(&mut engine, &prompts);
        eprintln!(
            "kv {dtype:?}: max|diff|/max|ref| = {worst:.2e}, greedy agreement {agree}/{}",
            10 * prompts.len()
        );
        assert!(worst <= bound, "kv {dtype:?}: {worst} > {bound}");
    }
}

/// `runtime_quant = "int8"`: float matrices become Q8_0 blocks at load. The
/// cost against the float32 reference (numbers in docs/QUANTIZATION.md).
#[test]
fn runtime_int8_weights_quality() {
    use pie_driver_portable::RuntimeQuant;
    let (dir, prompts) = fixture("llama");
    let driver = PortableDriver::new().with_runtime_quant(Some(RuntimeQuant::Int8));
    let mut engine = Engine::load(&dir, driver, &LoadOptions::default(), None).unwrap();
    let (worst, agree) = quality(&mut engine, &prompts);
    eprintln!(
        "runtime int8 weights: max|diff|/max|ref| = {worst:.2e}, greedy agreement {agree}/{}",
        10 * prompts.len()
    );
    assert!(worst > 1e-5, "weights were not quantized");
    assert!(worst <= 6e-2, "{worst}");
}
