//! Weight and activation storage.

use half::{bf16, f16};
use pie_driver::{DType, DriverError, Result, TensorView, WeightRole};
use pie_kernels::WeightMatrix;

/// A weight in driver memory. Matrices keep their file dtype (the matmul
/// widens on the fly, so bf16 models read half the bytes); vectors are
/// widened to f32 once.
#[derive(Debug)]
pub enum Weight {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
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
        let elems = expected
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                DriverError::Invalid(format!("tensor `{name}`: shape {expected:?} overflows"))
            })?;
        let size = view.dtype.size().unwrap_or(0);
        if !matches!(view.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(DriverError::DType {
                name: name.to_string(),
                found: view.dtype,
                driver: "portable",
                supported: "f32, bf16, f16",
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
            WeightRole::Vector => Weight::F32(weight.to_f32()),
            WeightRole::Matrix => weight,
        })
    }

    pub fn matrix(&self) -> WeightMatrix<'_> {
        match self {
            Weight::F32(v) => WeightMatrix::F32(v),
            Weight::Bf16(v) => WeightMatrix::Bf16(v),
            Weight::F16(v) => WeightMatrix::F16(v),
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
        }
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
