//! Weight and activation storage.

use half::{bf16, f16};
use pie_driver::{DType, DriverError, QuantKind, Result, TensorView, WeightRole};
use pie_kernels::packed::PackedRows;
use pie_kernels::quant::{gather_rows_quant, matmul_quant};
use pie_kernels::WeightMatrix;

/// A weight in driver memory. Matrices keep their file dtype (the matmul
/// widens on the fly, so bf16 models read half the bytes); vectors are
/// widened to f32 once.
#[derive(Debug)]
pub enum Weight {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    /// GGUF blocks, decoded a row at a time inside the matmul.
    Quant(QuantKind, Vec<u8>),
    /// Q4_0/Q4_1/Q8_0 repacked for the decode kernel.
    Packed(PackedRows),
    /// One matrix (or bias vector) per expert of a `moe` op, `[out, in]`.
    Experts(Vec<Weight>),
}

impl Weight {
    pub fn from_view(
        name: &str,
        view: &TensorView<'_>,
        expected: &[usize],
        role: WeightRole,
    ) -> Result<Self> {
        if view.shape != expected {
            return Err(DriverError::Shape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: view.shape.to_vec(),
            });
        }
        if let WeightRole::Experts(layout) = role {
            return experts::split(name, view, layout);
        }
        let elems = expected
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                DriverError::Invalid(format!("tensor `{name}`: shape {expected:?} overflows"))
            })?;
        if let DType::Quant(kind) = view.dtype {
            return Self::from_blocks(name, kind, view.data, expected, role);
        }
        let size = view.dtype.size().unwrap_or(0);
        if !matches!(view.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(DriverError::DType {
                name: name.to_string(),
                found: view.dtype,
                driver: "portable",
                supported: "f32, bf16, f16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k",
            });
        }
        if elems.checked_mul(size) != Some(view.data.len()) {
            return Err(DriverError::Invalid(format!(
                "tensor `{name}`: {} bytes of data for shape {expected:?} in {}",
                view.data.len(),
                view.dtype
            )));
        }
        let bytes = view.data;
        let weight = match view.dtype {
            DType::F32 => Weight::F32(read_le(bytes, f32::from_le_bytes)),
            DType::BF16 => Weight::Bf16(read_le(bytes, |b| bf16::from_bits(u16::from_le_bytes(b)))),
            _ => Weight::F16(read_le(bytes, |b| f16::from_bits(u16::from_le_bytes(b)))),
        };
        Ok(match role {
            // Matrices stay in their file dtype for the matmul; vectors and
            // other shapes (conv kernels `[channels, 1, k]`) are read
            // element-wise by the ops, as f32.
            WeightRole::Matrix | WeightRole::Experts(_) if expected.len() == 2 => weight,
            _ => Weight::F32(weight.to_f32()),
        })
    }

    /// A float matrix `[rows, k]` as Q8_0 blocks (runtime int8
    /// quantization; for expert weights, `shape` is one expert's `[out,
    /// in]`); quantized weights and rows that are not whole blocks
    /// stay as they are.
    pub fn quantized_int8(self, shape: &[usize]) -> Self {
        if let Weight::Experts(experts) = self {
            // `shape` is one expert's `[out, in]`; biases stay f32.
            if shape.len() != 2 {
                return Weight::Experts(experts);
            }
            return Weight::Experts(
                experts
                    .into_iter()
                    .map(|w| w.quantized_int8(shape))
                    .collect(),
            );
        }
        if !matches!(self, Weight::F32(_) | Weight::Bf16(_) | Weight::F16(_)) {
            return self;
        }
        let k = *shape.last().unwrap_or(&0);
        let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
        match PackedRows::quantize_q8_0(&self.to_f32(), rows, k) {
            Some(packed) => Weight::Packed(packed),
            None => self,
        }
    }

    fn from_blocks(
        name: &str,
        kind: QuantKind,
        data: &[u8],
        shape: &[usize],
        role: WeightRole,
    ) -> Result<Self> {
        let cols = *shape.last().unwrap_or(&0);
        let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
        let row_bytes = kind.row_bytes(cols).ok_or_else(|| {
            DriverError::Invalid(format!(
                "tensor `{name}`: rows of {cols} weights are not whole {} blocks",
                kind.name()
            ))
        })?;
        if rows.checked_mul(row_bytes) != Some(data.len()) {
            return Err(DriverError::Invalid(format!(
                "tensor `{name}`: {} bytes of {} data for shape {shape:?}",
                data.len(),
                kind.name()
            )));
        }
        Ok(match role {
            WeightRole::Matrix | WeightRole::Experts(_) => {
                match PackedRows::from_blocks(kind, data, rows, cols) {
                    Some(packed) => Weight::Packed(packed),
                    None => Weight::Quant(kind, data.to_vec()),
                }
            }
            WeightRole::Vector => {
                let mut out = vec![0f32; rows * cols];
                for (src, dst) in data.chunks_exact(row_bytes).zip(out.chunks_exact_mut(cols)) {
                    kind.dequantize_row(src, dst);
                }
                Weight::F32(out)
            }
        })
    }

    fn matrix(&self) -> Option<WeightMatrix<'_>> {
        match self {
            Weight::F32(v) => Some(WeightMatrix::F32(v)),
            Weight::Bf16(v) => Some(WeightMatrix::Bf16(v)),
            Weight::F16(v) => Some(WeightMatrix::F16(v)),
            Weight::Quant(..) | Weight::Packed(_) | Weight::Experts(_) => None,
        }
    }

    /// `out = x · selfᵀ` for `x` of `m` rows of `k`, self `[n, k]`.
    pub fn matmul(&self, x: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
        match (self, self.matrix()) {
            (Weight::Quant(kind, data), _) => matmul_quant(x, m, k, *kind, data, n, out),
            (Weight::Packed(p), _) => p.matmul(x, m, out),
            (Weight::Experts(_), _) => panic!("expert weights are used one expert at a time"),
            (_, Some(w)) => pie_kernels::matmul(x, m, k, w, n, out),
            (_, None) => unreachable!("every non-quantized weight is a matrix"),
        }
    }

    /// Rows `ids` of an embedding table `[vocab, k]`, as f32.
    pub fn gather(&self, k: usize, ids: &[u32], out: &mut [f32]) {
        match (self, self.matrix()) {
            (Weight::Quant(kind, data), _) => gather_rows_quant(*kind, data, k, ids, out),
            (Weight::Packed(p), _) => p.gather(ids, out),
            (Weight::Experts(_), _) => panic!("expert weights are not embedding tables"),
            (_, Some(w)) => pie_kernels::gather_rows(w, k, ids, out),
            (_, None) => unreachable!("every non-quantized weight is a matrix"),
        }
    }

    /// The whole `[rows, cols]` matrix as f32 (for ops that read weights
    /// element-wise, such as MLA's absorbed up-projections).
    pub fn dense_f32(&self, rows: usize, cols: usize) -> Vec<f32> {
        match self {
            Weight::F32(v) => v.clone(),
            Weight::Bf16(_) | Weight::F16(_) => self.to_f32(),
            _ => {
                let ids: Vec<u32> = (0..rows as u32).collect();
                let mut out = vec![0f32; rows * cols];
                self.gather(cols, &ids, &mut out);
                out
            }
        }
    }

    /// Expert `e` of a `moe` weight.
    pub fn expert(&self, e: usize) -> &Weight {
        match self {
            Weight::Experts(experts) => &experts[e],
            _ => panic!("not an expert weight"),
        }
    }

    /// The weight as f32; vectors are stored that way at load.
    pub fn vector(&self) -> &[f32] {
        match self {
            Weight::F32(v) => v,
            _ => panic!("vector weights are widened to f32 at load"),
        }
    }

    fn to_f32(&self) -> Vec<f32> {
        match self {
            Weight::F32(v) => v.clone(),
            Weight::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Weight::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Weight::Quant(..) | Weight::Packed(_) | Weight::Experts(_) => {
                unreachable!("quantized vectors are decoded in from_blocks")
            }
        }
    }
}

mod experts {
    //! One weight per expert from a stacked `[count, ..]` expert view.

    use super::Weight;
    use pie_driver::ir::ExpertLayout;
    use pie_driver::{Result, TensorView, WeightRole};

    pub fn split(name: &str, view: &TensorView<'_>, layout: ExpertLayout) -> Result<Weight> {
        pie_driver::experts::split(name, view, layout)?
            .iter()
            .enumerate()
            .map(|(e, expert)| {
                let role = if expert.shape.len() == 1 {
                    WeightRole::Vector
                } else {
                    WeightRole::Matrix
                };
                Weight::from_view(
                    &format!("{name} (expert {e})"),
                    &expert.view(),
                    &expert.shape,
                    role,
                )
            })
            .collect::<Result<Vec<_>>>()
            .map(Weight::Experts)
    }
}

/// Decodes little-endian elements; file data need not be aligned.
fn read_le<T, const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
        .collect()
}

/// An activation: `rows` tokens × `width` features, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Act {
    pub data: Vec<f32>,
    pub rows: usize,
    pub width: usize,
}

impl Act {
    pub fn zeros(rows: usize, width: usize) -> Self {
        Act {
            data: vec![0.0; rows * width],
            rows,
            width,
        }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.width..(r + 1) * self.width]
    }

    pub fn expect_width(&self, width: usize, op: &str) -> Result<()> {
        if self.width == width {
            Ok(())
        } else {
            Err(DriverError::Invalid(format!(
                "`{op}` expected an input of width {width}, got {}",
                self.width
            )))
        }
    }
}
