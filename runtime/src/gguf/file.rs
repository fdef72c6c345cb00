//! The GGUF container (versions 2 and 3): header, metadata, tensor table.
//!
//! Model files come from strangers, so every count, length, product and
//! offset is checked against the file size with checked arithmetic before
//! anything is allocated or sliced, and errors name the byte offset and the
//! key or tensor being read.

use std::path::{Path, PathBuf};

use memmap2::Mmap;
use pie_driver::{DType, QuantKind};

use crate::LoadError;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Sanity bound on dimensions per tensor (ggml's GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            MetaValue::UInt(v) => Some(*v),
            MetaValue::Int(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Float(v) => Some(*v),
            MetaValue::Int(v) => Some(*v as f64),
            MetaValue::UInt(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape, outermost first (GGUF stores innermost first).
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// Byte range in the file.
    pub range: std::ops::Range<usize>,
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    mmap: Mmap,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = std::fs::File::open(path)
            .map_err(|e| LoadError::file(path, format!("cannot open: {e}")))?;
        // SAFETY: read-only map of a model file, as with safetensors.
        let mmap = unsafe { Mmap::map(&file) }
            .map_err(|e| LoadError::file(path, format!("cannot map: {e}")))?;
        let parsed = parse(&mmap).map_err(|e| LoadError::file(path, e))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: parsed.0,
            metadata: parsed.1,
            tensors: parsed.2,
            mmap,
        })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.range.clone()]
    }

    /// Drops the resident pages of a tensor's bytes (they are read again
    /// from the file if touched later).
    pub fn release(&self, t: &TensorInfo) {
        // madvise needs a page-aligned start; only whole pages inside the
        // tensor are dropped, so a neighbour's bytes stay untouched.
        const PAGE: usize = 4096;
        let start = t.range.start.div_ceil(PAGE) * PAGE;
        let end = t.range.end / PAGE * PAGE;
        if end > start {
            // SAFETY: the map is read-only and file-backed, so dropping pages
            // loses nothing: later reads fault them back in from the file.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }
}

type Parsed = (u32, Vec<(String, MetaValue)>, Vec<TensorInfo>);

/// Parses a GGUF image; errors are `offset N: ...` messages.
pub fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.take(4, "magic")?;
    if magic != MAGIC {
        return Err(format!(
            "offset 0: not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
        ));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "offset 4: GGUF version {version} is not supported (supported: 2, 3)"
        ));
    }
    let n_tensors = r.u64("tensor_count")?;
    let n_kv = r.u64("metadata_kv_count")?;
    // Each entry needs at least a few bytes: bound counts by what is left.
    r.bound_count(n_kv, 12, "metadata_kv_count")?;
    r.bound_count(n_tensors, 24, "tensor_count")?;
    let mut metadata = Vec::with_capacity(n_kv as usize);
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let vtype = r.u32(&key)?;
        let value = r.value(vtype, &key, 0)?;
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        Some((_, v)) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(format!("general.alignment = {v:?} must be a power of two")),
        },
        None => DEFAULT_ALIGNMENT,
    };
    let mut infos = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let at = r.pos;
        let name = r.string("tensor name")?;
        let n_dims = r.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "offset {at}: tensor `{name}` has {n_dims} dimensions (1..={MAX_DIMS} allowed)"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&name)?);
        }
        let type_id = r.u32(&name)?;
        let offset = r.u64(&name)?;
        infos.push((at, name, dims, type_id, offset));
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(infos.len());
    for (at, name, dims, type_id, offset) in infos {
        let dtype = dtype_of(type_id).ok_or_else(|| {
            format!("offset {at}: tensor `{name}` has unsupported type {type_id} (supported: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k)")
        })?;
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("offset {at}: tensor `{name}` dimensions {dims:?} overflow"))?;
        let size = byte_size(dtype, dims[0], elems).ok_or_else(|| {
            format!(
                "offset {at}: tensor `{name}`: {} rows of {} weights are not whole {} blocks",
                elems / dims[0].max(1),
                dims[0],
                dtype
            )
        })?;
        if !offset.is_multiple_of(alignment) {
            return Err(format!(
                "offset {at}: tensor `{name}` data offset {offset} is not aligned to {alignment}"
            ));
        }
        let start = data_start.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(s), Some(e)) if e <= bytes.len() as u64 => tensors.push(TensorInfo {
                name,
                shape: dims.iter().rev().map(|&d| d as usize).collect(),
                dtype,
                range: s as usize..e as usize,
            }),
            _ => {
                return Err(format!(
                    "offset {at}: tensor `{name}` data ({size} bytes at {}) lies outside the file ({} bytes); the file is truncated or corrupt",
                    data_start.saturating_add(offset),
                    bytes.len()
                ))
            }
        }
    }
    Ok((version, metadata, tensors))
}

fn dtype_of(type_id: u32) -> Option<DType> {
    Some(match type_id {
        0 => DType::F32,
        1 => DType::F16,
        30 => DType::BF16,
        2 => DType::Quant(QuantKind::Q4_0),
        3 => DType::Quant(QuantKind::Q4_1),
        6 => DType::Quant(QuantKind::Q5_0),
        7 => DType::Quant(QuantKind::Q5_1),
        8 => DType::Quant(QuantKind::Q8_0),
        12 => DType::Quant(QuantKind::Q4K),
        13 => DType::Quant(QuantKind::Q5K),
        14 => DType::Quant(QuantKind::Q6K),
        _ => return None,
    })
}

/// Bytes of a tensor with rows of `row` weights and `elems` weights in all.
fn byte_size(dtype: DType, row: u64, elems: u64) -> Option<u64> {
    match dtype {
        DType::Quant(q) => {
            let be = q.block_elems() as u64;
            row.is_multiple_of(be)
                .then(|| (elems / be).checked_mul(q.block_bytes() as u64))?
        }
        other => elems.checked_mul(other.size()? as u64),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "offset {}: truncated while reading {what} ({n} bytes needed, {left} left)",
                self.pos
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn bound_count(&self, count: u64, min_size: u64, what: &str) -> Result<(), String> {
        let left = (self.bytes.len() - self.pos) as u64;
        if count.checked_mul(min_size).is_none_or(|need| need > left) {
            return Err(format!(
                "offset {}: {what} = {count} cannot fit in the {left} bytes left",
                self.pos
            ));
        }
        Ok(())
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let at = self.pos;
        let len = self.u64(what)?;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| format!("offset {at}: {what} is not valid UTF-8"))
    }

    fn value(&mut self, vtype: u32, key: &str, depth: u32) -> Result<MetaValue, String> {
        let at = self.pos;
        Ok(match vtype {
            0 => MetaValue::UInt(self.take(1, key)?[0] as u64),
            1 => MetaValue::Int(self.take(1, key)?[0] as i8 as i64),
            2 => MetaValue::UInt(
                u16::from_le_bytes(self.take(2, key)?.try_into().expect("2")) as u64,
            ),
            3 => {
                MetaValue::Int(i16::from_le_bytes(self.take(2, key)?.try_into().expect("2")) as i64)
            }
            4 => MetaValue::UInt(self.u32(key)? as u64),
            5 => MetaValue::Int(self.u32(key)? as i32 as i64),
            6 => MetaValue::Float(f32::from_bits(self.u32(key)?) as f64),
            7 => MetaValue::Bool(self.take(1, key)?[0] != 0),
            8 => MetaValue::Str(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(format!(
                        "offset {at}: `{key}`: nested arrays are not supported"
                    ));
                }
                let elem_type = self.u32(key)?;
                let count = self.u64(key)?;
                self.bound_count(count, 1, &format!("`{key}` array length"))?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_type, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::UInt(self.u64(key)?),
            11 => MetaValue::Int(self.u64(key)? as i64),
            12 => MetaValue::Float(f64::from_bits(self.u64(key)?)),
            other => {
                return Err(format!(
                    "offset {at}: `{key}` has unknown value type {other}"
                ))
            }
        })
    }
}
