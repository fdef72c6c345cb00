//! Row ops Gemma 3n brought to the spec language: feature-wise `concat`,
//! per-token stream mixing (`mix`), per-group root mean square (`rms`),
//! Gaussian top-k sparsity and a per-feature `scale`.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use pie_driver::ir::{ConcatAttrs, GaussianTopkAttrs, MixAttrs, RmsAttrs};
use pie_driver::{DriverError, Result};

use crate::{blocks, cuda_err, int, CudaAct, CudaDriver, CudaWeight};

/// Threads of a block that reduces over `n` features (a power of two,
/// 32..=256).
fn reduce_threads(n: usize) -> u32 {
    n.next_power_of_two().clamp(32, 256) as u32
}

impl CudaDriver {
    pub(crate) fn concat_rows(&self, parts: &[&CudaAct], a: &ConcatAttrs) -> Result<CudaAct> {
        let widths: Vec<usize> = parts.iter().map(|p| p.width).collect();
        let rows = parts.first().map_or(0, |p| p.rows);
        if widths != a.widths || parts.iter().any(|p| p.rows != rows) {
            return Err(DriverError::Invalid(format!(
                "concat of widths {widths:?} (expected {:?})",
                a.widths
            )));
        }
        let total: usize = widths.iter().sum();
        let mut out = self.act(rows, total)?;
        let (ri, oi) = (int(rows, "rows")?, int(total, "width")?);
        let mut offset = 0;
        for p in parts {
            let (wi, off) = (int(p.width, "width")?, int(offset, "offset")?);
            let mut b = self
                .stream
                .launch_builder(self.kernels.get("pie_concat_part"));
            b.arg(&mut out.data)
                .arg(&p.data)
                .arg(&ri)
                .arg(&wi)
                .arg(&oi)
                .arg(&off);
            unsafe { b.launch(blocks(rows * p.width)) }.map_err(cuda_err("pie_concat_part"))?;
            offset += p.width;
        }
        Ok(out)
    }

    pub(crate) fn mix_streams(
        &self,
        x: &CudaAct,
        coefs: &CudaAct,
        a: &MixAttrs,
    ) -> Result<CudaAct> {
        let (n, m, d) = (a.streams, a.out_streams, a.width);
        if x.width != n * d || coefs.width != m * n || x.rows != coefs.rows {
            return Err(DriverError::Invalid(format!(
                "mix of [{}, {}] by coefficients [{}, {}] (expected widths {} and {})",
                x.rows,
                x.width,
                coefs.rows,
                coefs.width,
                n * d,
                m * n
            )));
        }
        let mut out = self.act(x.rows, m * d)?;
        let (ri, ni, mi, di) = (
            int(x.rows, "rows")?,
            int(n, "streams")?,
            int(m, "streams")?,
            int(d, "width")?,
        );
        let mut b = self.stream.launch_builder(self.kernels.get("pie_mix"));
        b.arg(&mut out.data)
            .arg(&x.data)
            .arg(&coefs.data)
            .arg(&ri)
            .arg(&ni)
            .arg(&mi)
            .arg(&di)
            .arg(&a.offset);
        unsafe { b.launch(blocks(x.rows * m * d)) }.map_err(cuda_err("pie_mix"))?;
        Ok(out)
    }

    pub(crate) fn rms_of_groups(&self, x: &CudaAct, a: &RmsAttrs) -> Result<CudaAct> {
        if x.width != a.width || a.group == 0 || !a.width.is_multiple_of(a.group) {
            return Err(DriverError::Invalid(format!(
                "`rms` expected width {} in groups of {}, got {}",
                a.width, a.group, x.width
            )));
        }
        let groups = x.rows * (x.width / a.group);
        let mut out = self.act(x.rows, x.width / a.group)?;
        let g = int(a.group, "group")?;
        let cfg = LaunchConfig {
            grid_dim: (groups.max(1) as u32, 1, 1),
            block_dim: (reduce_threads(a.group), 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.kernels.get("pie_rms"));
        b.arg(&mut out.data).arg(&x.data).arg(&g);
        unsafe { b.launch(cfg) }.map_err(cuda_err("pie_rms"))?;
        Ok(out)
    }

    pub(crate) fn gaussian_topk_rows(&self, x: &CudaAct, a: &GaussianTopkAttrs) -> Result<CudaAct> {
        if x.width != a.width {
            return Err(DriverError::Invalid(format!(
                "`gaussian_topk` expected width {}, got {}",
                a.width, x.width
            )));
        }
        let mut out = self.act(x.rows, x.width)?;
        let w = int(x.width, "width")?;
        let cfg = LaunchConfig {
            grid_dim: (x.rows.max(1) as u32, 1, 1),
            block_dim: (reduce_threads(x.width), 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_gaussian_topk"));
        b.arg(&mut out.data)
            .arg(&x.data)
            .arg(&w)
            .arg(&a.std_multiplier);
        unsafe { b.launch(cfg) }.map_err(cuda_err("pie_gaussian_topk"))?;
        Ok(out)
    }

    /// `x · factor · w` per feature.
    pub(crate) fn scale_by_weight(
        &self,
        x: &CudaAct,
        w: &CudaWeight,
        factor: f32,
    ) -> Result<CudaAct> {
        let Some(w) = w.f32().filter(|w| w.len() == x.width) else {
            return Err(DriverError::Invalid(format!(
                "`scale` weight must be an f32 vector of the activation's width {}",
                x.width
            )));
        };
        let mut out = self.act(x.rows, x.width)?;
        let (ri, wi) = (int(x.rows, "rows")?, int(x.width, "width")?);
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_scale_weighted"));
        b.arg(&mut out.data)
            .arg(&x.data)
            .arg(w)
            .arg(&factor)
            .arg(&ri)
            .arg(&wi);
        unsafe { b.launch(blocks(x.rows * x.width)) }.map_err(cuda_err("pie_scale_weighted"))?;
        Ok(out)
    }
}
