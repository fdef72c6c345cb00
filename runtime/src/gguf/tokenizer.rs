//! The tokenizer stored in GGUF metadata, rebuilt as a `tokenizers`
//! tokenizer. Byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`)
//! are supported, with the pre-tokenizers of the `tokenizer.ggml.pre` values
//! listed in [`pre_tokenizer`]; SentencePiece BPE vocabularies
//! (`tokenizer.ggml.model = llama`: Llama 2, Gemma, Mistral) through merges
//! derived from the piece scores, byte fallback and `▁` for spaces.

use serde_json::{json, Value};

use super::file::{GgufFile, MetaValue};
use crate::LoadError;

/// llama.cpp's token type for control tokens (BOS, EOS, chat markers).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

pub fn build(file: &GgufFile) -> Result<Option<tokenizers::Tokenizer>, LoadError> {
    let err = |m: String| LoadError::file(&file.path, m);
    let Some(model) = file.get("tokenizer.ggml.model").and_then(MetaValue::as_str) else {
        return Ok(None);
    };
    if model != "gpt2" && model != "llama" {
        return Err(err(format!(
            "tokenizer.ggml.model `{model}` is not supported yet (supported: gpt2 byte-level BPE, llama SentencePiece BPE); pass --ids instead of --prompt"
        )));
    }
    let strings = |key: &str| -> Result<Vec<&str>, LoadError> {
        file.get(key)
            .and_then(MetaValue::as_array)
            .and_then(|a| a.iter().map(MetaValue::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| err(format!("metadata key `{key}` must be a list of strings")))
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<u64> = file
        .get("tokenizer.ggml.token_type")
        .and_then(MetaValue::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let (normalizer, pre_tokenizer, decoder, model_json) = if model == "llama" {
        sentencepiece_parts(file, &tokens, &types)?
    } else {
        byte_level_parts(file, &tokens)?
    };

    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
        .filter_map(|(i, &ty)| {
            tokens.get(i).map(|t| {
                json!({ "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                        "normalized": false, "special": ty == TOKEN_TYPE_CONTROL })
            })
        })
        .collect();
    let add_bos = matches!(
        file.get("tokenizer.ggml.add_bos_token"),
        Some(MetaValue::Bool(true))
    );
    let post_processor = match (
        add_bos,
        file.get("tokenizer.ggml.bos_token_id")
            .and_then(MetaValue::as_u64),
    ) {
        (true, Some(bos)) => {
            let bos_text = tokens.get(bos as usize).copied().unwrap_or_default();
            json!({ "type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": { bos_text: { "id": bos_text, "ids": [bos], "tokens": [bos_text] } } })
        }
        _ => Value::Null,
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model_json,
    });
    let tokenizer: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| {
        err(format!(
            "cannot build the tokenizer from GGUF metadata: {e}"
        ))
    })?;
    Ok(Some(tokenizer))
}

type Parts = (Value, Value, Value, Value);

fn vocab_map(tokens: &[&str]) -> serde_json::Map<String, Value> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect()
}

/// Normalizer, pre-tokenizer, decoder and model of a byte-level BPE.
fn byte_level_parts(file: &GgufFile, tokens: &[&str]) -> Result<Parts, LoadError> {
    let err = |m: String| LoadError::file(&file.path, m);
    let merges: Vec<&str> = file
        .get("tokenizer.ggml.merges")
        .and_then(MetaValue::as_array)
        .and_then(|a| a.iter().map(MetaValue::as_str).collect::<Option<Vec<_>>>())
        .ok_or_else(|| {
            err("metadata key `tokenizer.ggml.merges` must be a list of strings".into())
        })?;
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let pre_tokenizer = pre_tokenizer(pre).ok_or_else(|| {
        err(format!("tokenizer.ggml.pre `{pre}` is not supported (supported: default, gpt2, smollm, llama-bpe, qwen2)"))
    })?;
    Ok((
        Value::Null,
        pre_tokenizer,
        json!({ "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true }),
        json!({ "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab_map(tokens), "merges": merges }),
    ))
}

/// SentencePiece BPE: spaces become `▁` (with a leading one when
/// `add_space_prefix`), pieces merge by score — the merge list is derived
/// from the scores the way Hugging Face converts SentencePiece models:
/// every split of a normal piece into two pieces of the vocabulary is a
/// merge, ranked by the merged piece's score — and characters outside the
/// vocabulary fall back to `<0xXX>` byte tokens.
fn sentencepiece_parts(
    file: &GgufFile,
    tokens: &[&str],
    types: &[u64],
) -> Result<Parts, LoadError> {
    const NORMAL: u64 = 1;
    let err = |m: String| LoadError::file(&file.path, m);
    let scores: Vec<f32> = file
        .get("tokenizer.ggml.scores")
        .and_then(MetaValue::as_array)
        .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect())
        .ok_or_else(|| {
            err("metadata key `tokenizer.ggml.scores` must be a list of numbers".into())
        })?;
    if scores.len() != tokens.len() {
        return Err(err(format!(
            "tokenizer.ggml.scores has {} entries for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let ids: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f32, usize, usize, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(NORMAL) != NORMAL {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                merges.push((scores[id], li, ri, l, r));
            }
        }
    }
    // Highest score first; ties in vocabulary order of the parts.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<Value> = merges
        .into_iter()
        .map(|(_, _, _, l, r)| json!([l, r]))
        .collect();
    let space_prefix = matches!(
        file.get("tokenizer.ggml.add_space_prefix"),
        Some(MetaValue::Bool(true))
    );
    let replace = json!({ "type": "Replace", "pattern": { "String": " " }, "content": "\u{2581}" });
    let normalizer = if space_prefix {
        json!({ "type": "Sequence", "normalizers": [ { "type": "Prepend", "prepend": "\u{2581}" }, replace ] })
    } else {
        replace
    };
    let mut decoders = vec![
        json!({ "type": "Replace", "pattern": { "String": "\u{2581}" }, "content": " " }),
        json!({ "type": "ByteFallback" }),
        json!({ "type": "Fuse" }),
    ];
    if space_prefix {
        decoders.push(json!({ "type": "Strip", "content": " ", "start": 1, "stop": 0 }));
    }
    let unk = file
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(MetaValue::as_u64)
        .and_then(|i| tokens.get(i as usize))
        .map(|t| json!(t))
        .unwrap_or(Value::Null);
    Ok((
        normalizer,
        Value::Null,
        json!({ "type": "Sequence", "decoders": decoders }),
        json!({ "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab_map(tokens), "merges": merges }),
    ))
}

/// The Hugging Face pre-tokenizer matching a llama.cpp `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Option<Value> {
    let byte_level = |use_regex: bool| json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex });
    let split = |regex: &str| json!({ "type": "Split", "pattern": { "Regex": regex }, "behavior": "Isolated", "invert": false });
    Some(match pre {
        "default" | "gpt2" => byte_level(true),
        // SmolLM: every digit its own token, then GPT-2's byte-level split.
        "smollm" => json!({ "type": "Sequence", "pretokenizers": [
            { "type": "Digits", "individual_digits": true }, byte_level(true) ] }),
        "llama-bpe" | "llama3" => json!({ "type": "Sequence", "pretokenizers": [
            split("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"),
            byte_level(false) ] }),
        "qwen2" => json!({ "type": "Sequence", "pretokenizers": [
            split("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"),
            byte_level(false) ] }),
        _ => return None,
    })
}
