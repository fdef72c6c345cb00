//! GGUF metadata → a Hugging Face style `config.json`, so GGUF models run
//! through the same specs as safetensors checkpoints.

use serde_json::{json, Map, Value};

use super::file::{GgufFile, MetaValue};
use crate::LoadError;

/// GGUF `general.architecture` → (HF `model_type`).
const ARCHS: &[(&str, &str)] = &[
    ("llama", "llama"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("gemma3", "gemma3_text"),
];

pub fn architecture(file: &GgufFile) -> Result<&str, LoadError> {
    let arch = file
        .get("general.architecture")
        .and_then(MetaValue::as_str)
        .ok_or_else(|| {
            LoadError::file(&file.path, "missing metadata key `general.architecture`")
        })?;
    if ARCHS.iter().any(|(a, _)| *a == arch) {
        Ok(arch)
    } else {
        let known: Vec<&str> = ARCHS.iter().map(|(a, _)| *a).collect();
        Err(LoadError::file(
            &file.path,
            format!(
                "general.architecture `{arch}` is not supported (supported: {})",
                known.join(", ")
            ),
        ))
    }
}

pub fn to_hf_config(file: &GgufFile) -> Result<Value, LoadError> {
    let arch = architecture(file)?;
    let model_type = ARCHS
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, m)| *m)
        .expect("checked");
    let key = |k: &str| format!("{arch}.{k}");
    let uint = |k: &str| -> Result<u64, LoadError> {
        let full = key(k);
        file.get(&full).and_then(MetaValue::as_u64).ok_or_else(|| {
            LoadError::file(
                &file.path,
                format!("missing or non-integer metadata key `{full}`"),
            )
        })
    };
    let opt_uint = |k: &str| file.get(&key(k)).and_then(MetaValue::as_u64);
    let opt_float = |k: &str| file.get(&key(k)).and_then(MetaValue::as_f64);

    let heads = uint("attention.head_count")?;
    let vocab = match opt_uint("vocab_size") {
        Some(v) => v,
        None => file
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array)
            .map(|t| t.len() as u64)
            .ok_or_else(|| {
                LoadError::file(
                    &file.path,
                    format!(
                        "missing metadata key `{}` (and no tokenizer.ggml.tokens)",
                        key("vocab_size")
                    ),
                )
            })?,
    };
    let mut c = Map::new();
    c.insert("model_type".into(), json!(model_type));
    c.insert("hidden_size".into(), json!(uint("embedding_length")?));
    c.insert("num_hidden_layers".into(), json!(uint("block_count")?));
    c.insert(
        "intermediate_size".into(),
        json!(uint("feed_forward_length")?),
    );
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert(
        "num_key_value_heads".into(),
        json!(opt_uint("attention.head_count_kv").unwrap_or(heads)),
    );
    c.insert("vocab_size".into(), json!(vocab));
    if let Some(hd) = opt_uint("attention.key_length") {
        c.insert("head_dim".into(), json!(hd));
    }
    if let Some(theta) = opt_float("rope.freq_base") {
        c.insert("rope_theta".into(), json!(theta));
    }
    if let Some(eps) = opt_float("attention.layer_norm_rms_epsilon") {
        c.insert("rms_norm_eps".into(), json!(eps));
    }
    if let Some(w) = opt_uint("attention.sliding_window") {
        c.insert("sliding_window".into(), json!(w));
    }
    if let Some(kind) = file
        .get(&key("rope.scaling.type"))
        .and_then(MetaValue::as_str)
    {
        if kind != "none" {
            let factor = opt_float("rope.scaling.factor").unwrap_or(1.0);
            let mut s = json!({ "rope_type": kind, "factor": factor });
            if let Some(orig) = opt_uint("rope.scaling.original_context_length") {
                s["original_max_position_embeddings"] = json!(orig);
            }
            c.insert("rope_scaling".into(), s);
        }
    }
    if arch == "gemma3" {
        // llama.cpp's Gemma 3 uses these fixed values; GGUF does not store them.
        c.insert("rope_local_base_freq".into(), json!(10000.0));
        c.insert("sliding_window_pattern".into(), json!(6));
        let hd = opt_uint("attention.key_length").unwrap_or(256);
        c.insert("query_pre_attn_scalar".into(), json!(hd));
    }
    let tied = !file.tensors.iter().any(|t| t.name == "output.weight");
    c.insert("tie_word_embeddings".into(), json!(tied));
    for (gguf_key, hf_key) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
    ] {
        if let Some(id) = file.get(gguf_key).and_then(MetaValue::as_u64) {
            c.insert(hf_key.into(), json!(id));
        }
    }
    Ok(Value::Object(c))
}
