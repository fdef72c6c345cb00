//! Mixture of experts on the GPU: router logits by GEMM, routing on the
//! host (a few floats per token, shared with the portable driver through
//! `pie_driver::moe`), then either
//! - grouped (small batches, SiLU-gated experts without biases): three
//!   launches for all experts together (`kernels/cuda/moe.cu`: gate/up with
//!   the activation, down, and a weighted combine in choice order), or
//! - per expert: one gather of its tokens, its projections as cuBLAS GEMMs
//!   over all of them, and a weighted scatter-add (large batches, where a
//!   GEMM per expert is efficient, and every other expert form).
//!
//! Shared experts run densely.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, DevicePtr};
use pie_driver::ir::{ActivationFn, CompositeAttrs, GluAttrs};
use pie_driver::moe::{self, MoeParams};
use pie_driver::{DriverError, Result};

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::{blocks, cuda_err, int, CudaAct, CudaDriver, CudaWeight};

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

/// The grouped kernels read at most this many tokens per expert well
/// (each weight row is re-read per 8 tokens); above, GEMMs per expert win.
const GROUPED_MAX_TOKENS_PER_EXPERT: usize = 32;

/// A device table of expert weight addresses and the experts' element size
/// (4: f32, 2: bf16).
type ExpertTable = (Arc<CudaSlice<u64>>, usize);

/// Expert tables by (first expert's address, offset), None where the
/// grouped kernels cannot read the weight; see `CudaDriver::expert_table`.
pub(crate) type ExpertTables = Mutex<HashMap<(u64, usize), Option<ExpertTable>>>;

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
        let per_expert = moe::tokens_per_expert(&choices, p.experts);
        let mut out = match self.grouped_weights(w, &p, &per_expert)? {
            Some(g) => self.moe_grouped(x, &p, &choices, &per_expert, &g)?,
            None => {
                let mut out = self.act_zeros(x.rows, p.hidden)?;
                for (e, (rows, scales)) in per_expert.into_iter().enumerate() {
                    if rows.is_empty() {
                        continue;
                    }
                    let xs = self.gather(x, &rows)?;
                    let y = self.expert_mlp(&xs, w, &p, e)?;
                    self.scatter_add(&mut out, &y, &rows, &scales)?;
                }
                out
            }
        };
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
            None => self.map(&u, "pie_activation", p.act.kernel_code()),
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

    /// The grouped kernels' inputs, when they apply: SiLU-gated experts
    /// without biases or clamping, f32 or bf16, widths multiples of 8, and
    /// few tokens per expert.
    fn grouped_weights(
        &self,
        w: &[Option<&CudaWeight>],
        p: &MoeParams,
        per_expert: &[(Vec<usize>, Vec<f32>)],
    ) -> Result<Option<GroupedWeights>> {
        let most = per_expert.iter().map(|(r, _)| r.len()).max().unwrap_or(0);
        let biased = [GATE_BIAS, UP_BIAS, GATE_UP_BIAS, DOWN_BIAS]
            .iter()
            .any(|&i| slot(w, i).is_some());
        if most > GROUPED_MAX_TOKENS_PER_EXPERT
            || biased
            || p.act != ActivationFn::Silu
            || p.limit.is_some()
            || !p.hidden.is_multiple_of(8)
            || !p.intermediate.is_multiple_of(8)
        {
            return Ok(None);
        }
        let (h, i) = (p.hidden, p.intermediate);
        let (gate, up) = match (slot(w, GATE_UP), slot(w, GATE), slot(w, UP)) {
            (Some(gu), _, _) => (self.expert_table(gu, 0)?, self.expert_table(gu, i * h)?),
            (None, Some(g), Some(u)) => (self.expert_table(g, 0)?, self.expert_table(u, 0)?),
            _ => return Ok(None),
        };
        let down = slot(w, DOWN).ok_or_else(|| missing("down"))?;
        let (Some((gate, gs)), Some((up, us)), Some((down, ds))) =
            (gate, up, self.expert_table(down, 0)?)
        else {
            return Ok(None);
        };
        // One kernel reads all three: they must share a dtype.
        if gs != ds || us != ds {
            return Ok(None);
        }
        Ok(Some(GroupedWeights {
            gate,
            up,
            down,
            bf16: ds == 2,
        }))
    }

    /// The device addresses of every expert of `weight`, each advanced by
    /// `offset` elements, and the experts' element size, built once per
    /// weight (MoE layers run every step: a hit costs one lookup). None
    /// unless every expert is a plain f32 or bf16 matrix of one dtype.
    fn expert_table(&self, weight: &CudaWeight, offset: usize) -> Result<Option<ExpertTable>> {
        let CudaWeight::Experts(list) = weight else {
            return Ok(None);
        };
        let address = |e: &CudaWeight| match e {
            CudaWeight::F32(v) => Some((v.device_ptr(&self.stream).0, 4)),
            CudaWeight::Bf16(v) => Some((v.ptr, 2)),
            CudaWeight::Experts(_) => None,
        };
        let Some((first, _)) = list.first().and_then(address) else {
            return Ok(None);
        };
        let mut tables = self.expert_tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tables.get(&(first, offset)) {
            return Ok(t.clone());
        }
        let experts: Option<Vec<(u64, usize)>> = list.iter().map(address).collect();
        let table = match experts {
            Some(e) if e.iter().all(|&(_, size)| size == e[0].1) => {
                let addrs: Vec<u64> = e
                    .iter()
                    .map(|&(p, size)| p + (offset * size) as u64)
                    .collect();
                Some((Arc::new(self.upload(&addrs)?), e[0].1))
            }
            _ => None,
        };
        tables.insert((first, offset), table.clone());
        Ok(table)
    }

    /// Every expert's MLP over its tokens in three launches (see moe.cu).
    fn moe_grouped(
        &self,
        x: &CudaAct,
        p: &MoeParams,
        choices: &[Vec<(usize, f32)>],
        per_expert: &[(Vec<usize>, Vec<f32>)],
        g: &GroupedWeights,
    ) -> Result<CudaAct> {
        // Assignments sorted by expert; each token's choices, in order,
        // name their assignment for the combine.
        let k = choices.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut perm = Vec::new();
        let mut offsets = vec![0i32];
        let mut assignment = vec![-1i32; x.rows * k];
        let mut scales = vec![0f32; x.rows * k];
        for (rows, _) in per_expert {
            for &t in rows {
                perm.push(t as i32);
            }
            offsets.push(perm.len() as i32);
        }
        for (e, (rows, sc)) in per_expert.iter().enumerate() {
            let base = offsets[e] as usize;
            for (j, (&t, &s)) in rows.iter().zip(sc).enumerate() {
                // Top-k picks distinct experts: e is one of t's choices.
                let c = choices[t]
                    .iter()
                    .position(|&(ce, _)| ce == e)
                    .expect("expert chosen by the token");
                assignment[t * k + c] = (base + j) as i32;
                scales[t * k + c] = s;
            }
        }
        let assigned = perm.len();
        if assigned == 0 {
            return self.act_zeros(x.rows, p.hidden);
        }
        let (perm, offsets) = (self.upload(&perm)?, self.upload(&offsets)?);
        let (assignment, scales) = (self.upload(&assignment)?, self.upload(&scales)?);
        let (hidden, inter) = (
            int(p.hidden, "hidden")?,
            int(p.intermediate, "intermediate")?,
        );
        let experts = u32::try_from(p.experts).map_err(|_| missing("experts"))?;
        let warps = 4u32;
        let grid = |rows: usize| LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(warps), experts, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: 0,
        };
        let suffix = if g.bf16 { "bf16" } else { "f32" };
        let mut h = self.act(assigned, p.intermediate)?;
        let name = format!("pie_moe_gate_up_{suffix}");
        let mut b = self.stream.launch_builder(self.kernels.get(&name));
        b.arg(&x.data)
            .arg(&perm)
            .arg(&offsets)
            .arg(g.gate.as_ref())
            .arg(g.up.as_ref())
            .arg(&mut h.data)
            .arg(&hidden)
            .arg(&inter);
        unsafe { b.launch(grid(p.intermediate)) }.map_err(cuda_err("pie_moe_gate_up"))?;
        let mut y = self.act(assigned, p.hidden)?;
        let name = format!("pie_moe_down_{suffix}");
        let mut b = self.stream.launch_builder(self.kernels.get(&name));
        b.arg(&h.data)
            .arg(&offsets)
            .arg(g.down.as_ref())
            .arg(&mut y.data)
            .arg(&inter)
            .arg(&hidden);
        unsafe { b.launch(grid(p.hidden)) }.map_err(cuda_err("pie_moe_down"))?;
        let mut out = self.act(x.rows, p.hidden)?;
        let (tokens, kk) = (int(x.rows, "tokens")?, int(k, "top_k")?);
        let mut b = self
            .stream
            .launch_builder(self.kernels.get("pie_moe_combine"));
        b.arg(&y.data)
            .arg(&assignment)
            .arg(&scales)
            .arg(&mut out.data)
            .arg(&tokens)
            .arg(&kk)
            .arg(&hidden);
        unsafe { b.launch(blocks(x.rows * p.hidden)) }.map_err(cuda_err("pie_moe_combine"))?;
        Ok(out)
    }
}

/// Address tables of the experts' gate, up and down matrices.
struct GroupedWeights {
    gate: Arc<CudaSlice<u64>>,
    up: Arc<CudaSlice<u64>>,
    down: Arc<CudaSlice<u64>>,
    bf16: bool,
}
