//! Expert tensors of a `moe` op as the drivers compute with them: one
//! `[out, in]` matrix (or bias vector) per expert, gate rows before up
//! rows — from a stacked `[count, ..]` view in any supported layout
//! (GPT-OSS stores `[in, out]` with gate and up interleaved).

use crate::ir::ExpertLayout;
use crate::{DType, DriverError, Result, TensorView};

/// One expert's tensor, owned.
pub struct ExpertTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl ExpertTensor {
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            dtype: self.dtype,
            shape: &self.shape,
            data: &self.data,
        }
    }
}

/// Splits a stacked expert view into per-expert tensors in the canonical
/// layout.
pub fn split(name: &str, view: &TensorView<'_>, layout: ExpertLayout) -> Result<Vec<ExpertTensor>> {
    let one = &view.shape[1..];
    let count = layout.count.max(1);
    if !view.data.len().is_multiple_of(count) {
        return Err(DriverError::Invalid(format!(
            "tensor `{name}`: {} bytes do not split into {count} experts",
            view.data.len()
        )));
    }
    let elem = view.dtype.size();
    let needs_reorder = layout.transposed && one.len() == 2 || layout.interleaved;
    if needs_reorder && (elem.is_none() || matches!(view.dtype, DType::Quant(_))) {
        return Err(DriverError::Invalid(format!(
            "tensor `{name}`: {} expert weights cannot be transposed or de-interleaved; \
             store them as [out, in] with gate rows before up rows",
            view.dtype
        )));
    }
    let mut shape = one.to_vec();
    if layout.transposed && shape.len() == 2 {
        shape.swap(0, 1);
    }
    Ok(view
        .data
        .chunks_exact(view.data.len() / count)
        .map(|bytes| {
            let mut data = bytes.to_vec();
            if let Some(size) = elem {
                if layout.transposed && one.len() == 2 {
                    data = transpose(&data, one[0], one[1], size);
                }
                if layout.interleaved {
                    let cols = if shape.len() == 2 { shape[1] } else { 1 };
                    data = deinterleave_rows(&data, shape[0], cols * size);
                }
            }
            ExpertTensor {
                dtype: view.dtype,
                shape: shape.clone(),
                data,
            }
        })
        .collect())
}

/// `[rows, cols]` elements of `size` bytes → `[cols, rows]`.
fn transpose(data: &[u8], rows: usize, cols: usize, size: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            let src = (r * cols + c) * size;
            let dst = (c * rows + r) * size;
            out[dst..dst + size].copy_from_slice(&data[src..src + size]);
        }
    }
    out
}

/// Rows alternating gate, up → all gate rows, then all up rows.
fn deinterleave_rows(data: &[u8], rows: usize, row_bytes: usize) -> Vec<u8> {
    let half = rows / 2;
    let mut out = vec![0u8; data.len()];
    for r in 0..rows {
        let dst = if r % 2 == 0 { r / 2 } else { half + r / 2 };
        out[dst * row_bytes..(dst + 1) * row_bytes]
            .copy_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    out
}
