//! Block decoders agree with gguf-py's `dequantize` (the reference Python
//! implementation shipped with ggml) on random blocks. The vectors were made
//! by `gguf.quants.dequantize` (gguf 0.19.0) from random bytes with finite f16
//! scales; see `data/quant_vectors.json`.

use pie_kernels::quant::QuantKind;

#[test]
fn decoders_match_gguf_py() {
    let text = include_str!("data/quant_vectors.json");
    let vectors: serde_json::Value = serde_json::from_str(text).unwrap();
    let kinds = [
        ("Q4_0", QuantKind::Q4_0),
        ("Q4_1", QuantKind::Q4_1),
        ("Q5_0", QuantKind::Q5_0),
        ("Q5_1", QuantKind::Q5_1),
        ("Q8_0", QuantKind::Q8_0),
        ("Q4_K", QuantKind::Q4K),
        ("Q5_K", QuantKind::Q5K),
        ("Q6_K", QuantKind::Q6K),
    ];
    for (name, kind) in kinds {
        let v = &vectors[name];
        let hex = v["bytes"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let want: Vec<f32> = serde_json::from_value(v["values"].clone()).unwrap();
        assert_eq!(
            kind.row_bytes(want.len()),
            Some(bytes.len()),
            "{name} block size"
        );
        let mut got = vec![0f32; want.len()];
        kind.dequantize_row(&bytes, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{name}[{i}]: {g} vs {w}"
            );
        }
    }
}
