//! What the CUDA composite ops share: attribute and weight access with
//! errors naming the op, the per-sequence tables of the recurrent ops, and
//! the causal convolution with carried state.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use pie_driver::ir::CompositeAttrs;
use pie_driver::{DriverError, ForwardBatch, Result};

use crate::{cuda_err, CudaAct, CudaDriver, CudaWeight};

/// A composite op's attributes and schema-ordered weights.
pub(crate) struct OpArgs<'a, 'w> {
    pub op: &'static str,
    pub attrs: &'a CompositeAttrs,
    pub weights: &'a [Option<&'w CudaWeight>],
}

impl<'a, 'w> OpArgs<'a, 'w> {
    pub fn invalid(&self, m: impl std::fmt::Display) -> DriverError {
        DriverError::Invalid(format!("{}: {m}", self.op))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.attrs
            .usize(key)
            .map_err(|m| self.invalid(m))?
            .ok_or_else(|| self.invalid(format!("attribute `{key}` is missing")))
    }

    /// A number attribute, or `default` when absent (None: required).
    pub fn f32(&self, key: &str, default: Option<f64>) -> Result<f32> {
        let v = self
            .attrs
            .float(key)
            .map_err(|m| self.invalid(m))?
            .or(default);
        v.map(|v| v as f32)
            .ok_or_else(|| self.invalid(format!("attribute `{key}` is missing")))
    }

    pub fn optional(&self, slot: usize) -> Option<&'w CudaWeight> {
        self.weights.get(slot).copied().flatten()
    }

    pub fn weight(&self, slot: usize, key: &str) -> Result<&'w CudaWeight> {
        self.optional(slot)
            .ok_or_else(|| self.invalid(format!("weight `{key}` is missing")))
    }

    /// A weight read element-wise by a kernel (stored f32 at load).
    pub fn vector(&self, slot: usize, key: &str) -> Result<&'w CudaSlice<f32>> {
        self.weight(slot, key)?
            .f32()
            .ok_or_else(|| self.invalid(format!("`{key}` must be a float vector")))
    }
}

/// Per sequence of a batch: first token row, token count, recurrent state
/// row, and whether the chunk starts the sequence (state from zero).
pub(crate) struct SeqTables {
    pub starts: CudaSlice<i32>,
    pub lens: CudaSlice<i32>,
    pub rows: CudaSlice<i32>,
    pub fresh: CudaSlice<i32>,
    pub count: u32,
}

impl CudaDriver {
    pub(crate) fn seq_tables(&self, batch: &ForwardBatch) -> Result<SeqTables> {
        let column = |f: &dyn Fn(&pie_driver::SeqChunk) -> i32| -> Result<CudaSlice<i32>> {
            self.upload(&batch.seqs.iter().map(f).collect::<Vec<_>>())
        };
        Ok(SeqTables {
            starts: column(&|s| s.start as i32)?,
            lens: column(&|s| s.len as i32)?,
            rows: column(&|s| s.state as i32)?,
            fresh: column(&|s| i32::from(s.first_pos == 0))?,
            count: batch.seqs.len().max(1) as u32,
        })
    }

    /// The depthwise causal convolution (then SiLU) of `x`, `[rows,
    /// channels]`, continuing each sequence's last `kernel - 1` inputs from
    /// the start of its state row (`stride` floats a row).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn causal_conv(
        &self,
        x: &CudaAct,
        weight: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        kernel: usize,
        state: &mut CudaSlice<f32>,
        stride: i64,
        seqs: &SeqTables,
    ) -> Result<CudaAct> {
        let channels = x.width;
        let mut out = self.act(x.rows, channels)?;
        let (ch, k, has_bias, offset) = (
            channels as i32,
            kernel as i32,
            i32::from(bias.is_some()),
            0i64,
        );
        let mut launch = self
            .stream
            .launch_builder(self.kernels.get("pie_causal_conv"));
        launch
            .arg(&mut out.data)
            .arg(&x.data)
            .arg(state)
            .arg(weight)
            .arg(bias.unwrap_or(weight))
            .arg(&has_bias)
            .arg(&seqs.starts)
            .arg(&seqs.lens)
            .arg(&seqs.rows)
            .arg(&seqs.fresh)
            .arg(&ch)
            .arg(&k)
            .arg(&stride)
            .arg(&offset);
        let cfg = LaunchConfig {
            grid_dim: (channels.div_ceil(128) as u32, seqs.count, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(cfg) }.map_err(cuda_err("pie_causal_conv"))?;
        Ok(out)
    }
}
