//! GGUF tensor names and layouts → Hugging Face ones, as a [`WeightSource`].
//!
//! Two layout differences are undone at load: llama.cpp's converter permutes
//! the rows of llama Q/K projections for its adjacent-pair RoPE, and it
//! stores Gemma norm weights with the `+1` already added.

use std::collections::HashMap;

use pie_driver::{DType, TensorView, WeightSource};

use super::file::{GgufFile, TensorInfo};
use crate::LoadError;

/// GGUF name part → HF name part, within a block (`blk.N.`) or at the top.
fn hf_name(arch: &str, gguf: &str) -> Option<String> {
    if let Some(rest) = gguf.strip_prefix("blk.") {
        let (layer, tail) = rest.split_once('.')?;
        let (part, suffix) = tail.rsplit_once('.')?;
        let hf = match (part, arch) {
            ("attn_norm", _) => "input_layernorm",
            ("attn_q", _) => "self_attn.q_proj",
            ("attn_k", _) => "self_attn.k_proj",
            ("attn_v", _) => "self_attn.v_proj",
            ("attn_output", _) => "self_attn.o_proj",
            ("attn_q_norm", _) => "self_attn.q_norm",
            ("attn_k_norm", _) => "self_attn.k_norm",
            ("post_attention_norm", _) => "post_attention_layernorm",
            ("ffn_norm", "gemma3") => "pre_feedforward_layernorm",
            ("ffn_norm", _) => "post_attention_layernorm",
            ("post_ffw_norm", _) => "post_feedforward_layernorm",
            ("ffn_gate", _) => "mlp.gate_proj",
            ("ffn_up", _) => "mlp.up_proj",
            ("ffn_down", _) => "mlp.down_proj",
            _ => return None,
        };
        return Some(format!("model.layers.{layer}.{hf}.{suffix}"));
    }
    Some(
        match gguf {
            "token_embd.weight" => "model.embed_tokens.weight",
            "output_norm.weight" => "model.norm.weight",
            "output.weight" => "lm_head.weight",
            _ => return None,
        }
        .to_string(),
    )
}

/// An owned copy of a tensor whose layout had to change.
struct Rewritten {
    shape: Vec<usize>,
    dtype: DType,
    data: Vec<u8>,
}

pub struct GgufSource {
    file: GgufFile,
    by_hf_name: HashMap<String, usize>,
    rewritten: HashMap<String, Rewritten>,
}

impl GgufSource {
    pub fn new(
        file: GgufFile,
        arch: &str,
        heads: usize,
        kv_heads: usize,
    ) -> Result<Self, LoadError> {
        let mut by_hf_name = HashMap::new();
        let mut rewritten = HashMap::new();
        for (i, t) in file.tensors.iter().enumerate() {
            let Some(name) = hf_name(arch, &t.name) else {
                continue; // tensors no spec reads (e.g. rope_freqs) are ignored
            };
            if arch == "llama"
                && (name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight"))
            {
                let n_head = if name.ends_with("q_proj.weight") {
                    heads
                } else {
                    kv_heads
                };
                rewritten.insert(name.clone(), unpermute_rows(&file, t, n_head)?);
            } else if arch == "gemma3" && name.ends_with("norm.weight") && t.dtype == DType::F32 {
                rewritten.insert(name.clone(), minus_one(&file, t));
            }
            by_hf_name.insert(name, i);
        }
        Ok(GgufSource {
            file,
            by_hf_name,
            rewritten,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

/// Undoes llama.cpp's Q/K row permutation: within each head, GGUF row
/// `2j + t` is Hugging Face row `t·(head_dim/2) + j`. Whole rows move, so
/// quantized rows are copied block for block.
fn unpermute_rows(file: &GgufFile, t: &TensorInfo, n_head: usize) -> Result<Rewritten, LoadError> {
    let rows = t.shape[0];
    let data = file.tensor_data(t);
    if n_head == 0
        || !rows.is_multiple_of(n_head)
        || !(rows / n_head).is_multiple_of(2)
        || !data.len().is_multiple_of(rows)
    {
        return Err(LoadError::file(
            &file.path,
            format!(
                "tensor `{}` with shape {:?} cannot be split into {n_head} heads",
                t.name, t.shape
            ),
        ));
    }
    let row_bytes = data.len() / rows;
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_head {
        for t_ in 0..2 {
            for j in 0..half {
                let hf = h * head_dim + t_ * half + j;
                let gg = h * head_dim + 2 * j + t_;
                out[hf * row_bytes..(hf + 1) * row_bytes]
                    .copy_from_slice(&data[gg * row_bytes..(gg + 1) * row_bytes]);
            }
        }
    }
    Ok(Rewritten {
        shape: t.shape.clone(),
        dtype: t.dtype,
        data: out,
    })
}

/// Gemma norm weights as Hugging Face stores them (`w`, used as `1 + w`).
fn minus_one(file: &GgufFile, t: &TensorInfo) -> Rewritten {
    let data = file
        .tensor_data(t)
        .chunks_exact(4)
        .flat_map(|c| (f32::from_le_bytes(c.try_into().expect("4 bytes")) - 1.0).to_le_bytes())
        .collect();
    Rewritten {
        shape: t.shape.clone(),
        dtype: t.dtype,
        data,
    }
}

impl WeightSource for GgufSource {
    fn tensor(&self, name: &str) -> Result<TensorView<'_>, String> {
        if let Some(r) = self.rewritten.get(name) {
            return Ok(TensorView {
                dtype: r.dtype,
                shape: &r.shape,
                data: &r.data,
            });
        }
        match self.by_hf_name.get(name) {
            Some(&i) => {
                let t = &self.file.tensors[i];
                Ok(TensorView {
                    dtype: t.dtype,
                    shape: &t.shape,
                    data: self.file.tensor_data(t),
                })
            }
            None => Err(format!(
                "tensor `{name}` not found in {} ({} tensors){}",
                self.file.path.display(),
                self.file.tensors.len(),
                pie_archspec::expr::did_you_mean(name, self.by_hf_name.keys().map(String::as_str))
            )),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.by_hf_name.contains_key(name)
    }

    fn release(&self, name: &str) {
        if let Some(&i) = self.by_hf_name.get(name) {
            self.file.release(&self.file.tensors[i]);
        }
    }
}
