//! Borrowed views of weight tensors as they sit in a checkpoint file.

use std::fmt;

pub use pie_kernels::quant::QuantKind;

/// Element types a checkpoint tensor may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    /// GGUF block-quantized data; shape is in weights, bytes are blocks.
    Quant(QuantKind),
    Other(&'static str),
}

impl DType {
    /// Bytes per element, for the plain (non block-quantized) types.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::Quant(_) | DType::Other(_) => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
            DType::Quant(q) => q.name(),
            DType::Other(s) => s,
        };
        f.write_str(s)
    }
}

/// A tensor's raw little-endian bytes with its dtype and shape.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// Where weights come from (safetensors files, a GGUF file, random init).
pub trait WeightSource {
    /// The tensor called `name`, or a user-facing error that names it and the
    /// file(s) searched.
    fn tensor(&self, name: &str) -> Result<TensorView<'_>, String>;
    fn contains(&self, name: &str) -> bool;

    /// The driver has copied `name`; a memory-mapped source may drop its
    /// pages so the file and the copy are not both resident.
    fn release(&self, _name: &str) {}
}
