//! Writes GGUF v3 images in tests, the way llama.cpp's converter lays them
//! out (metadata, tensor table, 32-byte aligned data), from f32 tensors
//! kept as f32 or quantized to Q8_0 blocks.

// Each test crate uses a different subset of these.
#![allow(dead_code)]

pub enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
}

/// How a tensor's values are stored in the file.
#[derive(Clone, Copy, PartialEq)]
pub enum Encoding {
    F32,
    /// ggml's `block_q8_0`: per 32 values an f16 scale `max|x| / 127` and 32
    /// signed bytes `round(x / scale)`.
    Q8_0,
}

pub struct Tensor {
    pub name: String,
    /// Row-major shape (outermost first).
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    pub encoding: Encoding,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// ggml type id and data bytes of a tensor.
fn encode(t: &Tensor) -> (u32, Vec<u8>) {
    match t.encoding {
        Encoding::F32 => (0, t.data.iter().flat_map(|x| x.to_le_bytes()).collect()),
        Encoding::Q8_0 => (8, q8_0(&t.data)),
    }
}

fn q8_0(data: &[f32]) -> Vec<u8> {
    assert!(data.len().is_multiple_of(32), "Q8_0 needs whole blocks");
    let mut out = Vec::with_capacity(data.len() / 32 * 34);
    for block in data.chunks_exact(32) {
        let max = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = half::f16::from_f32(max / 127.0);
        let inv = if d.to_f32() > 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        out.extend(d.to_le_bytes());
        out.extend(block.iter().map(|x| (x * inv).round() as i8 as u8));
    }
    out
}

/// The values a Q8_0 tensor of `data` decodes to.
pub fn q8_0_round_trip(data: &[f32]) -> Vec<f32> {
    q8_0(data)
        .chunks_exact(34)
        .flat_map(|b| {
            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            b[2..].iter().map(move |&q| q as i8 as f32 * d)
        })
        .collect()
}

/// A GGUF v3 image.
pub fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[Tensor]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
        }
    }
    let encoded: Vec<(u32, Vec<u8>)> = tensors.iter().map(encode).collect();
    let mut offset = 0u64;
    for (t, (kind, bytes)) in tensors.iter().zip(&encoded) {
        put_str(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(kind.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (bytes.len() as u64).div_ceil(32) * 32;
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    for (_, bytes) in &encoded {
        let start = out.len();
        out.extend(bytes);
        while !(out.len() - start).is_multiple_of(32) {
            out.push(0);
        }
    }
    out
}

/// Hugging Face tensor name → GGUF name (llama-family blocks).
pub fn gguf_name(hf: &str) -> String {
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        let (layer, tail) = rest.split_once('.').unwrap();
        let (part, suffix) = tail.rsplit_once('.').unwrap();
        let part = match part {
            "input_layernorm" => "attn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "post_attention_layernorm" => "ffn_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            other => panic!("unexpected tensor {other}"),
        };
        return format!("blk.{layer}.{part}.{suffix}");
    }
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight",
        "model.norm.weight" => "output_norm.weight",
        "lm_head.weight" => "output.weight",
        other => panic!("unexpected tensor {other}"),
    }
    .to_string()
}
