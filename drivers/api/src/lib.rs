//! The boundary every driver implements and every generated model calls.
//!
//! Generated model code (see `pie-codegen`) is a straight-line sequence of
//! calls on [`Driver`]. A driver owns weight memory and KV pages and runs one
//! [`ForwardBatch`] — several sequences with ragged token counts, each with
//! its own page table — per forward call.

mod batch;
pub mod experts;
pub mod loader;
mod mask;
pub mod math;
pub mod moe;
pub mod rope;
mod tensor;
pub mod unfused;

pub use batch::{ForwardBatch, KvDType, KvLayout, KvSlotShape, SeqChunk};
pub use mask::{mask_refusal, AttnMask};
pub use pie_archspec::ir;
pub use tensor::{DType, QuantKind, TensorView, WeightSource};

use ir::*;

/// What a driver call can fail with. Messages are for users: they name the
/// tensor, op or limit involved and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("op `{op}` is not supported by the `{driver}` driver yet")]
    Unsupported { op: OpKind, driver: &'static str },
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}`: dtype {found} is not supported by the `{driver}` driver (supported: {supported})")]
    DType {
        name: String,
        found: DType,
        driver: &'static str,
        supported: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = DriverError> = std::result::Result<T, E>;

/// A model's forward pass over a batch, as [`Driver::run_pass`] gets it.
pub type Pass<'p, D> =
    dyn FnMut(&mut <D as Driver>::Kv, &ForwardBatch) -> Result<<D as Driver>::Act> + 'p;

/// How a loaded weight is used, so a driver can pick its storage
/// (matrices stay in their file dtype; vectors are widened once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightRole {
    /// `[rows, cols]` used as `x · Wᵀ` or as an embedding table.
    Matrix,
    /// Per-feature parameters: norm weights, biases, sinks.
    Vector,
    /// The weights of every expert of a `moe` op: a view shaped
    /// `[count, ..one expert as stored]`, which the driver turns into
    /// `[out, in]` matrices (or vectors, for biases) per expert.
    Experts(ir::ExpertLayout),
}

/// One matrix of [`Driver::load_weights_together`].
pub struct WeightPart<'a> {
    pub name: &'a str,
    pub view: TensorView<'a>,
    /// The shape the spec requires (`[out, in]`).
    pub expected: &'a [usize],
}

/// `parts` loaded one by one with [`Driver::load_weight`]: the default of
/// [`Driver::load_weights_together`], and a driver's fallback for parts it
/// cannot store side by side.
pub fn load_each<D: Driver + ?Sized>(
    driver: &D,
    parts: &[WeightPart<'_>],
) -> Result<Vec<D::Weight>> {
    parts
        .iter()
        .map(|p| driver.load_weight(p.name, &p.view, p.expected, WeightRole::Matrix))
        .collect()
}

/// The op set generated code calls. One method per IR op; composite ops a
/// driver has not implemented yet default to [`DriverError::Unsupported`],
/// and the runtime checks [`Driver::supports`] at model load so users see
/// that error before any work is done.
pub trait Driver: Send + Sync {
    /// A weight tensor in driver memory.
    type Weight: Send + Sync;
    /// An activation tensor `[tokens, width]`.
    type Act: Send;
    /// KV cache pages for every attention op of a model.
    type Kv: Send;

    fn name(&self) -> &'static str;
    fn supports(&self, op: OpKind) -> bool;

    /// What runs the ops, for reports: `portable (2 threads)`, `cuda
    /// (NVIDIA H100 80GB HBM3)`.
    fn describe(&self) -> String {
        self.name().to_string()
    }

    /// The KV cache dtype to allocate when `requested` (usually `auto`)
    /// leaves the choice to the driver; `float_weights` says whether every
    /// weight matrix of the checkpoint is stored as f32. The default keeps
    /// `auto` (the driver's activation type).
    fn resolve_kv_dtype(&self, requested: KvDType, _float_weights: bool) -> KvDType {
        requested
    }

    /// Runs `f` (a whole forward pass) in the driver's execution context:
    /// the portable driver runs it on its own worker pool, so the ops'
    /// parallel loops start from a worker instead of waking one per op.
    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Runs one forward pass over `batch`; `pass` is the model's generated
    /// forward. Drivers that record a pass once and replay it (CUDA graphs
    /// for decode batches) override this; the others just call `pass`.
    fn run_pass(
        &self,
        kv: &mut Self::Kv,
        batch: &ForwardBatch,
        pass: &mut Pass<'_, Self>,
    ) -> Result<Self::Act> {
        pass(kv, batch)
    }

    /// Copies `view` into driver memory. `expected` is the shape the spec
    /// requires; a mismatch is a [`DriverError::Shape`].
    fn load_weight(
        &self,
        name: &str,
        view: &TensorView<'_>,
        expected: &[usize],
        role: WeightRole,
    ) -> Result<Self::Weight>;

    /// Loads matrices that one fused call reads together (q/k/v, gate/up:
    /// one input, the same width), each checked like [`Driver::load_weight`].
    /// A driver that can run such a call as one product stores them next
    /// to each other in this order; the default loads them one by one.
    fn load_weights_together(&self, parts: &[WeightPart<'_>]) -> Result<Vec<Self::Weight>> {
        load_each(self, parts)
    }

    fn new_kv(&self, layout: &KvLayout) -> Result<Self::Kv>;

    fn embedding(
        &self,
        table: &Self::Weight,
        batch: &ForwardBatch,
        a: &EmbeddingAttrs,
    ) -> Result<Self::Act>;
    fn linear(
        &self,
        x: &Self::Act,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        a: &LinearAttrs,
    ) -> Result<Self::Act>;
    fn rms_norm(
        &self,
        x: &Self::Act,
        w: Option<&Self::Weight>,
        a: &RmsNormAttrs,
    ) -> Result<Self::Act>;
    fn rope(&self, x: &Self::Act, batch: &ForwardBatch, a: &RopeAttrs) -> Result<Self::Act>;
    /// LayerNorm (mean-centred, optional affine weight and bias).
    fn layer_norm(
        &self,
        _x: &Self::Act,
        _w: Option<&Self::Weight>,
        _b: Option<&Self::Weight>,
        _a: &LayerNormAttrs,
    ) -> Result<Self::Act> {
        Err(DriverError::Unsupported {
            op: OpKind::LayerNorm,
            driver: self.name(),
        })
    }
    /// `k` and `v` are None when the op reads keys and values another
    /// layer cached (`a.kv_from`): nothing is written then.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Act,
        k: Option<&Self::Act>,
        v: Option<&Self::Act>,
        sinks: Option<&Self::Weight>,
        kv: &mut Self::Kv,
        batch: &ForwardBatch,
        a: &AttentionAttrs,
    ) -> Result<Self::Act>;
    fn add(&self, x: &Self::Act, y: &Self::Act, a: &ElementwiseAttrs) -> Result<Self::Act>;
    fn mul(&self, x: &Self::Act, y: &Self::Act, a: &ElementwiseAttrs) -> Result<Self::Act>;
    /// `x · factor`, times `w` per feature when given.
    fn scale(&self, x: &Self::Act, w: Option<&Self::Weight>, a: &ScaleAttrs) -> Result<Self::Act>;
    fn glu(&self, gate: &Self::Act, up: &Self::Act, a: &GluAttrs) -> Result<Self::Act>;
    fn activation(&self, x: &Self::Act, a: &ActivationAttrs) -> Result<Self::Act>;
    fn softcap(&self, x: &Self::Act, a: &SoftcapAttrs) -> Result<Self::Act>;
    fn split(&self, x: &Self::Act, a: &SplitAttrs) -> Result<Vec<Self::Act>>;
    /// Feature-wise concatenation, in order.
    fn concat(&self, _parts: &[&Self::Act], _a: &ConcatAttrs) -> Result<Self::Act> {
        Err(DriverError::Unsupported {
            op: OpKind::Concat,
            driver: self.name(),
        })
    }
    /// Per-token mixing of the parts of `x` by the numbers in `coefs`.
    fn mix(&self, _x: &Self::Act, _coefs: &Self::Act, _a: &MixAttrs) -> Result<Self::Act> {
        Err(DriverError::Unsupported {
            op: OpKind::Mix,
            driver: self.name(),
        })
    }
    /// Root mean square of each group of features.
    fn rms(&self, _x: &Self::Act, _a: &RmsAttrs) -> Result<Self::Act> {
        Err(DriverError::Unsupported {
            op: OpKind::Rms,
            driver: self.name(),
        })
    }
    /// Keeps what lies above a Gaussian quantile of each row.
    fn gaussian_topk(&self, _x: &Self::Act, _a: &GaussianTopkAttrs) -> Result<Self::Act> {
        Err(DriverError::Unsupported {
            op: OpKind::GaussianTopk,
            driver: self.name(),
        })
    }
    /// The given token rows of `x`, in order (before the epilogue, for
    /// [`ForwardBatch::outputs`]).
    fn select_rows(&self, x: &Self::Act, rows: &[usize]) -> Result<Self::Act>;

    // Fused ops. Codegen calls these where a spec's ops form the pattern
    // (`codegen/src/fusion.rs`); each default runs the ops one by one, so
    // a driver overrides only the fusions it has kernels for.

    /// Several `linear` ops reading the same input (q/k/v projections):
    /// one output per weight, in order.
    fn linear_many(
        &self,
        x: &Self::Act,
        weights: &[&Self::Weight],
        biases: &[Option<&Self::Weight>],
        attrs: &[&LinearAttrs],
    ) -> Result<Vec<Self::Act>> {
        weights
            .iter()
            .zip(biases)
            .zip(attrs)
            .map(|((w, b), a)| self.linear(x, w, *b, a))
            .collect()
    }

    /// `glu(linear(x, gate), linear(x, up))`: a gated MLP's first half.
    fn gated_linear(
        &self,
        x: &Self::Act,
        gate: (&Self::Weight, Option<&Self::Weight>, &LinearAttrs),
        up: (&Self::Weight, Option<&Self::Weight>, &LinearAttrs),
        a: &GluAttrs,
    ) -> Result<Self::Act> {
        let g = self.linear(x, gate.0, gate.1, gate.2)?;
        let u = self.linear(x, up.0, up.1, up.2)?;
        self.glu(&g, &u, a)
    }

    /// `linear_many(rms_norm(x))`: a layer's input norm and the products
    /// that alone read it (q/k/v). A driver may fold the norm into the
    /// products: its `1 / rms` is one factor of every output.
    fn norm_linear_many(
        &self,
        x: &Self::Act,
        norm: PreNorm<'_, Self>,
        weights: &[&Self::Weight],
        biases: &[Option<&Self::Weight>],
        attrs: &[&LinearAttrs],
    ) -> Result<Vec<Self::Act>> {
        unfused::norm_linear_many(self, x, norm, weights, biases, attrs)
    }

    /// [`Driver::add_rms_norm`] of `x + y` whose normed half only the
    /// [`Driver::gated_linear`] after it reads (residual add, post-attention
    /// norm, MLP gate/up). Returns `(x + y, glu output)`.
    #[allow(clippy::too_many_arguments)] // the ops' own operands, one each
    fn add_norm_gated_linear(
        &self,
        x: &Self::Act,
        y: &Self::Act,
        add: &ElementwiseAttrs,
        norm: PreNorm<'_, Self>,
        gate: (&Self::Weight, Option<&Self::Weight>, &LinearAttrs),
        up: (&Self::Weight, Option<&Self::Weight>, &LinearAttrs),
        a: &GluAttrs,
    ) -> Result<(Self::Act, Self::Act)> {
        unfused::add_norm_gated_linear(self, x, y, add, norm, gate, up, a)
    }

    /// A pre-norm block's MLP half in one call: `s = x + y`, then
    /// `s + down(glu(gate(n), up(n)))` with `n = rms_norm(s)`
    /// ([`Driver::add_norm_gated_linear`] then [`Driver::linear_add`]).
    /// `y` (the attention's projected output) is moved in, so a driver may
    /// accumulate the result into its memory.
    #[allow(clippy::too_many_arguments)] // the ops' own operands, one each
    fn add_norm_mlp(
        &self,
        x: &Self::Act,
        y: Self::Act,
        add: &ElementwiseAttrs,
        norm: PreNorm<'_, Self>,
        gate: (&Self::Weight, Option<&Self::Weight>, &LinearAttrs),
        up: (&Self::Weight, Option<&Self::Weight>, &LinearAttrs),
        glu: &GluAttrs,
        down: (&Self::Weight, Option<&Self::Weight>, &LinearAttrs),
        add_down: &ElementwiseAttrs,
    ) -> Result<Self::Act> {
        unfused::add_norm_mlp(self, x, y, add, norm, gate, up, glu, down, add_down)
    }

    /// `residual + linear(x)`: a projection added into the residual
    /// stream. The residual is moved in, so a driver may accumulate into
    /// its memory.
    fn linear_add(
        &self,
        x: &Self::Act,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        a: &LinearAttrs,
        residual: Self::Act,
        add: &ElementwiseAttrs,
    ) -> Result<Self::Act> {
        unfused::linear_add(self, x, w, bias, a, residual, add)
    }

    /// `s = x + y` and `rms_norm(s)`: a residual add and the norm after it.
    /// Returns `(s, normed)`.
    fn add_rms_norm(
        &self,
        x: &Self::Act,
        y: &Self::Act,
        add: &ElementwiseAttrs,
        w: Option<&Self::Weight>,
        norm: &RmsNormAttrs,
    ) -> Result<(Self::Act, Self::Act)> {
        unfused::add_rms_norm(self, x, y, add, w, norm)
    }

    /// Two independent [`Driver::rms_norm_rope`]s (queries and keys):
    /// each part is `(x, norm weight, norm, rope)`.
    fn rms_norm_rope2(
        &self,
        a: NormRopePart<'_, Self>,
        b: NormRopePart<'_, Self>,
        batch: &ForwardBatch,
    ) -> Result<(Self::Act, Self::Act)> {
        unfused::rms_norm_rope2(self, a, b, batch)
    }

    /// A layer's q/k norms and rope ([`Driver::rms_norm_rope2`]) and the
    /// attention that alone reads their results: a driver may apply the
    /// norms and rotation inside its attention kernel.
    #[allow(clippy::too_many_arguments)] // the ops' own operands, one each
    fn norm_rope_attention(
        &self,
        q: NormRopePart<'_, Self>,
        k: NormRopePart<'_, Self>,
        v: &Self::Act,
        sinks: Option<&Self::Weight>,
        kv: &mut Self::Kv,
        batch: &ForwardBatch,
        a: &AttentionAttrs,
    ) -> Result<Self::Act> {
        unfused::norm_rope_attention(self, q, k, v, sinks, kv, batch, a)
    }

    /// `rope(rms_norm(x))`: per-head q/k norms followed by the rotation.
    fn rms_norm_rope(
        &self,
        x: &Self::Act,
        w: Option<&Self::Weight>,
        norm: &RmsNormAttrs,
        batch: &ForwardBatch,
        rope: &RopeAttrs,
    ) -> Result<Self::Act> {
        unfused::rms_norm_rope(self, x, w, norm, batch, rope)
    }

    /// Composite ops: attributes and weights as the spec named them.
    fn composite(
        &self,
        op: OpKind,
        _inputs: &[&Self::Act],
        _weights: &[Option<&Self::Weight>],
        _a: &CompositeAttrs,
        _kv: &mut Self::Kv,
        _batch: &ForwardBatch,
    ) -> Result<Self::Act> {
        Err(DriverError::Unsupported {
            op,
            driver: self.name(),
        })
    }

    /// Copies every recurrent state (conv + SSM/delta-rule) of sequence row
    /// `from` to row `to`: forking a context of a model with recurrent
    /// layers. Drivers without recurrent ops need not implement it.
    fn copy_state(&self, _kv: &mut Self::Kv, from: u32, to: u32) -> Result<()> {
        Err(DriverError::Invalid(format!(
            "the `{}` driver cannot copy recurrent state (rows {from} -> {to})",
            self.name()
        )))
    }

    /// `(free, total)` bytes of the memory the KV cache lives in, for
    /// drivers with a fixed device memory (sizing the KV pool by
    /// `gpu_mem_utilization`); None where the host's memory is used.
    fn memory_info(&self) -> Option<(usize, usize)> {
        None
    }

    /// Copies the keys and values of every attention op from page `from`
    /// into page `to` (copy on write of a page two contexts share).
    fn copy_page(&self, _kv: &mut Self::Kv, from: u32, to: u32) -> Result<()> {
        Err(DriverError::Invalid(format!(
            "the `{}` driver cannot copy KV pages ({from} -> {to})",
            self.name()
        )))
    }

    /// Copies the given token rows of `x` (a `[tokens, vocab]` logits
    /// activation) to host memory, row after row.
    fn read_rows(&self, x: &Self::Act, rows: &[usize]) -> Result<Vec<f32>>;

    /// The index of the largest value of each given row (greedy sampling;
    /// the first index wins ties). Drivers with device memory override it
    /// so only the ids cross to the host.
    fn argmax_rows(&self, x: &Self::Act, rows: &[usize]) -> Result<Vec<u32>> {
        let flat = self.read_rows(x, rows)?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let width = flat.len() / rows.len();
        Ok(flat.chunks_exact(width.max(1)).map(argmax).collect())
    }

    /// [`Driver::argmax_rows`] without waiting for the ids: they come from
    /// [`PendingIds::wait`]. A driver that [`Driver::feeds_tokens`] also
    /// keeps them on the device for the next pass to read as its tokens.
    fn argmax_start(&self, x: &Self::Act, rows: &[usize]) -> Result<PendingIds> {
        self.argmax_rows(x, rows).map(PendingIds::ready)
    }

    /// Whether a batch with [`ForwardBatch::fed_tokens`] runs on the ids of
    /// the last [`Driver::argmax_start`] (so the engine can queue decode
    /// step n + 1 before it reads step n's tokens).
    fn feeds_tokens(&self) -> bool {
        false
    }

    /// Greedy sampling with its log-probability for each given row:
    /// `(argmax, logit[argmax] − log Σ exp(logits))`. Drivers with device
    /// memory override it so a vocabulary row never crosses to the host.
    fn greedy_rows(&self, x: &Self::Act, rows: &[usize]) -> Result<Vec<(u32, f32)>> {
        let flat = self.read_rows(x, rows)?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let width = (flat.len() / rows.len()).max(1);
        Ok(flat
            .chunks_exact(width)
            .map(|row| {
                let token = argmax(row);
                (token, row[token as usize] - math::log_sum_exp(row))
            })
            .collect())
    }
}

/// Greedy token ids on their way from the device ([`Driver::argmax_start`]).
pub struct PendingIds(Pending);

enum Pending {
    Ready(Vec<u32>),
    Later(Box<dyn FnOnce() -> Result<Vec<u32>> + Send>),
}

impl PendingIds {
    /// Ids the host has already.
    pub fn ready(ids: Vec<u32>) -> Self {
        PendingIds(Pending::Ready(ids))
    }

    /// Ids that `wait` waits for.
    pub fn later(wait: impl FnOnce() -> Result<Vec<u32>> + Send + 'static) -> Self {
        PendingIds(Pending::Later(Box::new(wait)))
    }

    /// The ids, one per requested row, once they are on the host.
    pub fn wait(self) -> Result<Vec<u32>> {
        match self.0 {
            Pending::Ready(ids) => Ok(ids),
            Pending::Later(wait) => wait(),
        }
    }
}

/// An RMS norm a fused call applies to its input first: the norm's
/// weight (if any) and attributes.
pub type PreNorm<'a, D> = (Option<&'a <D as Driver>::Weight>, &'a RmsNormAttrs);

/// One input of [`Driver::rms_norm_rope2`]: the activation, the norm's
/// weight and attributes, the rope's attributes.
pub type NormRopePart<'a, D> = (
    &'a <D as Driver>::Act,
    Option<&'a <D as Driver>::Weight>,
    &'a RmsNormAttrs,
    &'a RopeAttrs,
);

/// Index of the largest value; the first one on ties.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// A loaded model of any architecture, as the runtime drives it.
pub trait ModelForward<D: Driver>: Send + Sync {
    /// Logits (`[tokens, vocab]`) for every token of `batch`.
    fn forward(&self, d: &D, kv: &mut D::Kv, batch: &ForwardBatch) -> Result<D::Act>;
}
