//! Rotary position embeddings with the Hugging Face frequency schemes.

use pie_driver::ir::{RopeAttrs, RopeStyle};
use pie_driver::rope::frequencies;
use pie_driver::{DriverError, ForwardBatch, Result};

use crate::tensor::Act;

/// Rotates every token of a batch; each sequence chunk's length picks
/// LongRoPE's factors.
pub fn apply_in_batch(x: &Act, batch: &ForwardBatch, a: &RopeAttrs) -> Result<Act> {
    let mut seq_lens = vec![0u32; x.rows];
    for seq in &batch.seqs {
        let end = (seq.start + seq.len).min(x.rows);
        seq_lens[seq.start.min(end)..end].fill(seq.kv_len() as u32);
    }
    apply_with_lens(x, &batch.positions, &seq_lens, a)
}

/// Rotates tokens at `positions`, each as if its sequence ended there.
pub fn apply(x: &Act, positions: &[u32], a: &RopeAttrs) -> Result<Act> {
    let lens: Vec<u32> = positions.iter().map(|p| p + 1).collect();
    apply_with_lens(x, positions, &lens, a)
}

fn apply_with_lens(x: &Act, positions: &[u32], seq_lens: &[u32], a: &RopeAttrs) -> Result<Act> {
    if positions.len() != x.rows {
        return Err(DriverError::Invalid(format!(
            "rope: {} positions for {} tokens",
            positions.len(),
            x.rows
        )));
    }
    let freqs = frequencies(a)?;
    let half = a.rotary_dim / 2;
    let mut out = x.clone();
    let mut cos = vec![0f32; half];
    let mut sin = vec![0f32; half];
    for ((row, &pos), &len) in out.data.chunks_mut(x.width).zip(positions).zip(seq_lens) {
        for (j, f) in freqs.at(len).iter().enumerate() {
            let angle = pos as f64 * f;
            cos[j] = (angle.cos() * freqs.scale) as f32;
            sin[j] = (angle.sin() * freqs.scale) as f32;
        }
        for head in row.chunks_mut(a.head_dim) {
            rotate(head, &cos, &sin, a.style);
        }
    }
    Ok(out)
}

fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = cos.len();
    for j in 0..half {
        let (i0, i1) = match style {
            RopeStyle::Half => (j, j + half),
            RopeStyle::Interleaved => (2 * j, 2 * j + 1),
        };
        let (x0, x1) = (head[i0], head[i1]);
        head[i0] = x0 * cos[j] - x1 * sin[j];
        head[i1] = x1 * cos[j] + x0 * sin[j];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pie_driver::ir::RopeScaling;

    fn attrs(scaling: RopeScaling) -> RopeAttrs {
        RopeAttrs {
            heads: 1,
            head_dim: 4,
            rotary_dim: 4,
            theta: 10000.0,
            scaling,
            style: RopeStyle::Half,
        }
    }

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        let x = Act {
            data: vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0],
            rows: 2,
            width: 4,
        };
        let out = apply(&x, &[0, 7], &attrs(RopeScaling::None)).unwrap();
        assert_eq!(&out.data[..4], &x.data[..4]);
        let n0: f32 = x.data[4..].iter().map(|v| v * v).sum();
        let n1: f32 = out.data[4..].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }

    #[test]
    fn llama3_keeps_high_and_slows_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 32.0,
        };
        let base = frequencies(&attrs(RopeScaling::None)).unwrap().inv_freqs;
        let scaled = frequencies(&attrs(s)).unwrap().inv_freqs;
        assert_eq!(scaled[0], base[0]); // wavelength 2π < 8: kept
        assert!((scaled[1] - base[1] / 8.0).abs() < 1e-12); // wavelength 628 > 32: slowed
    }

    #[test]
    fn longrope_switches_factors_past_the_original_context() {
        let s = RopeScaling::LongRope {
            short_factor: vec![1.0, 2.0],
            long_factor: vec![4.0, 8.0],
            original_max_position: 16.0,
            max_position: 64.0,
            attention_factor: None,
        };
        let base = frequencies(&attrs(RopeScaling::None)).unwrap().inv_freqs;
        let f = frequencies(&attrs(s)).unwrap();
        assert_eq!(f.at(16), &[base[0], base[1] / 2.0]);
        assert_eq!(f.at(17), &[base[0] / 4.0, base[1] / 8.0]);
        let expected = (1.0 + 4f64.ln() / 16f64.ln()).sqrt();
        assert!((f.scale - expected).abs() < 1e-12);
    }
}
