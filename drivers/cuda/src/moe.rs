//! Mixture of experts on the GPU: router logits by GEMM, routing on the
//! host (a few floats per token, shared with the portable driver through
//! `pie_driver::moe`), then per expert one gather of its tokens, its
//! projections as cuBLAS GEMMs over all of them, and a weighted
//! scatter-add into the output. Shared experts run densely.

use pie_driver::ir::{CompositeAttrs, GluAttrs};
use pie_driver::moe::{self, MoeParams};
use pie_driver::{DriverError, Result};

use crate::{CudaAct, CudaDriver, CudaWeight};

// Weight slots, in the op schema's order.
const ROUTER: usize = 0;
const ROUTER_BIAS: usize = 1;
const GATE: usize = 2;
const UP: usize = 3;
const GATE_UP: usize = 4;
const DOWN: usize = 5;
const GATE_BIAS: usize = 6;
const UP_BIAS: usize = 7;
const GATE_UP_BIAS: usize = 8;
const DOWN_BIAS: usize = 9;
const SHARED_GATE: usize = 10;
const SHARED_UP: usize = 11;
const SHARED_DOWN: usize = 12;
const SHARED_ROUTER: usize = 13;

fn slot<'w>(w: &[Option<&'w CudaWeight>], i: usize) -> Option<&'w CudaWeight> {
    w.get(i).copied().flatten()
}

fn missing(key: &str) -> DriverError {
    DriverError::Invalid(format!("moe: weight `{key}` is missing"))
}

impl CudaDriver {
    pub(crate) fn moe(
        &self,
        x: &CudaAct,
        w: &[Option<&CudaWeight>],
        attrs: &CompositeAttrs,
    ) -> Result<CudaAct> {
        let p = MoeParams::from_attrs(attrs)?;
        if x.width != p.hidden {
            return Err(DriverError::Invalid(format!(
                "moe: input width {} != hidden {}",
                x.width, p.hidden
            )));
        }
        let router = slot(w, ROUTER).ok_or_else(|| missing("router"))?;
        let logits = self.host(&self.gemm(x, router, p.experts)?)?;
        let bias = match slot(w, ROUTER_BIAS).and_then(CudaWeight::f32) {
            Some(b) => Some(
                self.stream
                    .clone_dtoh(b)
                    .map_err(|e| DriverError::Invalid(format!("CUDA: {e}")))?,
            ),
            None => None,
        };
        let choices = moe::route(&logits, &p, bias.as_deref());
        let mut out = self.act_zeros(x.rows, p.hidden)?;
        for (e, (rows, scales)) in moe::tokens_per_expert(&choices, p.experts)
            .into_iter()
            .enumerate()
        {
            if rows.is_empty() {
                continue;
            }
            let xs = self.gather(x, &rows)?;
            let y = self.expert_mlp(&xs, w, &p, e)?;
            self.scatter_add(&mut out, &y, &rows, &scales)?;
        }
        if let (Some(up), Some(down)) = (slot(w, SHARED_UP), slot(w, SHARED_DOWN)) {
            let hidden = self.mlp_hidden(
                x,
                slot(w, SHARED_GATE),
                None,
                up,
                None,
                &p,
                p.shared_intermediate,
            )?;
            let y = self.gemm(&hidden, down, p.hidden)?;
            let scales: Vec<f32> = match slot(w, SHARED_ROUTER) {
                Some(r) => self
                    .host(&self.gemm(x, r, 1)?)?
                    .into_iter()
                    .map(|g| 1.0 / (1.0 + (-g).exp()))
                    .collect(),
                None => vec![1.0; x.rows],
            };
            let all: Vec<usize> = (0..x.rows).collect();
            self.scatter_add(&mut out, &y, &all, &scales)?;
        }
        Ok(out)
    }

    /// Expert `e` over its tokens: `down(act(gate) · up)` (or
    /// `down(act(up))` without a gate), biases included.
    fn expert_mlp(
        &self,
        xs: &CudaAct,
        w: &[Option<&CudaWeight>],
        p: &MoeParams,
        e: usize,
    ) -> Result<CudaAct> {
        let expert = |i: usize, key: &str| -> Result<Option<&CudaWeight>> {
            match slot(w, i) {
                None => Ok(None),
                Some(all) => all
                    .expert(e)
                    .map(Some)
                    .ok_or_else(|| DriverError::Invalid(format!("moe: `{key}` has no expert {e}"))),
            }
        };
        let hidden = match expert(GATE_UP, "gate_up")? {
            Some(gu) => {
                let i = p.intermediate;
                let mut both = self.gemm(xs, gu, 2 * i)?;
                self.add_bias_to(&mut both, expert(GATE_UP_BIAS, "gate_up_bias")?)?;
                let mut parts = self.split_act(&both, &[i, i], 2 * i)?.into_iter();
                let (g, u) = (
                    parts.next().expect("two parts"),
                    parts.next().expect("two parts"),
                );
                self.glu_act(&g, &u, p)?
            }
            None => {
                let up = expert(UP, "up")?.ok_or_else(|| missing("up"))?;
                self.mlp_hidden(
                    xs,
                    expert(GATE, "gate")?,
                    expert(GATE_BIAS, "gate_bias")?,
                    up,
                    expert(UP_BIAS, "up_bias")?,
                    p,
                    p.intermediate,
                )?
            }
        };
        let down = expert(DOWN, "down")?.ok_or_else(|| missing("down"))?;
        let mut y = self.gemm(&hidden, down, p.hidden)?;
        self.add_bias_to(&mut y, expert(DOWN_BIAS, "down_bias")?)?;
        Ok(y)
    }

    /// `act(gate(x)) · up(x)`, or `act(up(x))` without a gate.
    #[allow(clippy::too_many_arguments)]
    fn mlp_hidden(
        &self,
        x: &CudaAct,
        gate: Option<&CudaWeight>,
        gate_bias: Option<&CudaWeight>,
        up: &CudaWeight,
        up_bias: Option<&CudaWeight>,
        p: &MoeParams,
        width: usize,
    ) -> Result<CudaAct> {
        let mut u = self.gemm(x, up, width)?;
        self.add_bias_to(&mut u, up_bias)?;
        match gate {
            Some(gate) => {
                let mut g = self.gemm(x, gate, width)?;
                self.add_bias_to(&mut g, gate_bias)?;
                self.glu_act(&g, &u, p)
            }
            None => self.map(&u, "pie_activation", crate::activation_code(p.act)),
        }
    }

    fn glu_act(&self, g: &CudaAct, u: &CudaAct, p: &MoeParams) -> Result<CudaAct> {
        use pie_driver::Driver;
        self.glu(
            g,
            u,
            &GluAttrs {
                func: p.act,
                width: g.width,
                limit: p.limit,
            },
        )
    }

    fn host(&self, x: &CudaAct) -> Result<Vec<f32>> {
        let mut v = self
            .stream
            .clone_dtoh(&x.data)
            .map_err(|e| DriverError::Invalid(format!("CUDA: copying to the host: {e}")))?;
        v.truncate(x.rows * x.width);
        Ok(v)
    }
}
