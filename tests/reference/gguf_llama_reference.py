"""Independent reference for Pie's GGUF path: a float32 numpy forward of a
llama-architecture GGUF, with weights decoded by gguf-py (ggml's own Python
package) and RoPE applied to adjacent pairs on the Q/K rows exactly as the
file stores them (Pie instead un-permutes the rows and rotates halves, so the
two paths share no code).

Usage: python3 gguf_llama_reference.py MODEL.gguf N_TOKENS IDS [IDS ...]
  IDS: comma-separated prompt token ids. Prints one JSON line per prompt:
  {"prompt": [...], "greedy": [...]}  (greedy without a KV cache).
Requires: pip install gguf==0.19.0 numpy
"""

import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def load(path):
    r = GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
    w = {}
    for t in r.tensors:
        arr = dequantize(t.data, t.tensor_type).astype(np.float32)
        w[t.name] = arr.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
    return meta, w


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_adjacent(x, heads, head_dim, theta):
    # x: [T, heads*head_dim]; rotate pairs (2j, 2j+1) by pos * theta^(-2j/head_dim).
    t = x.shape[0]
    x = x.reshape(t, heads, head_dim // 2, 2)
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.arange(t, dtype=np.float64)[:, None] * freqs[None, :]
    cos, sin = np.cos(ang)[:, None, :].astype(np.float32), np.sin(ang)[:, None, :].astype(np.float32)
    a, b = x[..., 0], x[..., 1]
    out = np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out.reshape(t, heads * head_dim)


def forward(meta, w, ids):
    a = "llama"
    hidden = meta[f"{a}.embedding_length"]
    heads = meta[f"{a}.attention.head_count"]
    kv_heads = meta[f"{a}.attention.head_count_kv"]
    layers = meta[f"{a}.block_count"]
    eps = meta[f"{a}.attention.layer_norm_rms_epsilon"]
    theta = meta[f"{a}.rope.freq_base"]
    hd = hidden // heads
    x = w["token_embd.weight"][ids]
    t = len(ids)
    mask = np.triu(np.full((t, t), -np.inf, dtype=np.float32), 1)
    for i in range(layers):
        p = f"blk.{i}."
        h = rms_norm(x, w[p + "attn_norm.weight"], eps)
        q = rope_adjacent(h @ w[p + "attn_q.weight"].T, heads, hd, theta)
        k = rope_adjacent(h @ w[p + "attn_k.weight"].T, kv_heads, hd, theta)
        v = h @ w[p + "attn_v.weight"].T
        q = q.reshape(t, heads, hd).transpose(1, 0, 2)
        k = np.repeat(k.reshape(t, kv_heads, hd).transpose(1, 0, 2), heads // kv_heads, axis=0)
        v = np.repeat(v.reshape(t, kv_heads, hd).transpose(1, 0, 2), heads // kv_heads, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(t, hidden)
        x = x + o @ w[p + "attn_output.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"], eps)
        g = h @ w[p + "ffn_gate.weight"].T
        u = h @ w[p + "ffn_up.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "ffn_down.weight"].T
    x = rms_norm(x, w["output_norm.weight"], eps)
    out = w.get("output.weight", w["token_embd.weight"])
    return x[-1] @ out.T


def main():
    path, n = sys.argv[1], int(sys.argv[2])
    meta, w = load(path)
    for arg in sys.argv[3:]:
        ids = [int(s) for s in arg.split(",")]
        seq = list(ids)
        for _ in range(n):
            seq.append(int(np.argmax(forward(meta, w, seq))))
        print(json.dumps({"prompt": ids, "greedy": seq[len(ids):]}), flush=True)


if __name__ == "__main__":
    main()
