"""Writes small valid GGUF images into corpus/gguf_header as fuzzing seeds."""
import os
import struct

OUT = os.path.join(os.path.dirname(__file__), "corpus", "gguf_header")


def s(text):
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload):
    return s(key) + struct.pack("<I", vtype) + payload


def image(tensors):
    meta = [
        kv("general.architecture", 8, s("llama")),
        kv("llama.block_count", 4, struct.pack("<I", 1)),
        kv("llama.embedding_length", 10, struct.pack("<Q", 8)),
        kv("llama.rope.freq_base", 6, struct.pack("<f", 10000.0)),
        kv("general.flag", 7, b"\x01"),
        kv("general.i8", 1, b"\xff"),
        kv("general.f64", 12, struct.pack("<d", 0.5)),
        kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + s("a") + s("b")),
    ]
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)) + b"".join(meta)
    offset = 0
    data = b""
    for name, dims, ttype, raw in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, offset)
        padded = raw + b"\0" * (-len(raw) % 32)
        data += padded
        offset += len(padded)
    out += b"\0" * (-len(out) % 32)
    return out + data


os.makedirs(OUT, exist_ok=True)
f32 = struct.pack("<8f", *range(8))
q8 = struct.pack("<e", 0.5) + bytes(range(32))
with open(os.path.join(OUT, "seed_f32"), "wb") as f:
    f.write(image([("token_embd.weight", [8, 1], 0, f32)]))
with open(os.path.join(OUT, "seed_q8_0"), "wb") as f:
    f.write(image([("blk.0.attn_q.weight", [32, 1], 8, q8), ("output_norm.weight", [8], 0, f32)]))
with open(os.path.join(OUT, "seed_empty"), "wb") as f:
    f.write(image([]))
