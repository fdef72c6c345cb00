//! The portable CPU driver: the correctness reference and the embedded
//! default. Activations are f32; weights stay in their file dtype (f32,
//! bf16, f16) and are widened inside the matmul kernels.

mod attention;
pub mod delta_rule;
mod dense;
mod elementwise;
mod gdn;
mod indexer;
mod kv;
mod mamba2;
mod mix;
mod mla;
mod moe;
mod recurrent;
mod rope;
pub mod ssd;
mod tensor;
#[cfg(test)]
mod test_rng;

use pie_driver::ir::*;
use pie_driver::{
    Driver, DriverError, ForwardBatch, KvDType, KvLayout, Result, TensorView, WeightRole,
};

pub use kv::KvCache;
pub use recurrent::ChunkedScan;
pub use tensor::{Act, Weight};

/// The portable driver: a worker pool; weights and KV pages live in the
/// values it hands out.
#[derive(Clone)]
pub struct PortableDriver {
    pool: std::sync::Arc<rayon::ThreadPool>,
    runtime_quant: Option<RuntimeQuant>,
    /// When Gated DeltaNet and Mamba2 take their chunked forms.
    delta_rule_scan: ChunkedScan,
    ssd_scan: ChunkedScan,
    /// The ids of the last `argmax_start`: the tokens of a batch with
    /// `fed_tokens`. Nothing is in flight on the CPU, but feeding runs the
    /// engine's queued-step decoding (and its tests) here too.
    fed: FedTokens,
}

/// A driver's last greedy ids; a clone of the driver starts without any.
#[derive(Default)]
struct FedTokens(std::sync::Mutex<Option<Vec<u32>>>);

impl Clone for FedTokens {
    fn clone(&self) -> Self {
        FedTokens::default()
    }
}

/// Quantization applied at load to float (f32/bf16/f16) weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeQuant {
    /// Q8_0 blocks: int8 with one f16 scale per 32 weights.
    Int8,
}

impl PortableDriver {
    /// A driver with one worker per core (`RAYON_NUM_THREADS` overrides).
    pub fn new() -> Self {
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        Self::with_threads(threads)
    }

    pub fn with_threads(threads: usize) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("pie-portable-{i}"))
            .build()
            .expect("the worker pool starts");
        PortableDriver {
            pool: std::sync::Arc::new(pool),
            runtime_quant: None,
            delta_rule_scan: ChunkedScan::DELTA_RULE,
            ssd_scan: ChunkedScan::SSD,
            fed: FedTokens::default(),
        }
    }

    /// Quantizes float weight matrices at load (`runtime_quant = "int8"`).
    pub fn with_runtime_quant(mut self, quant: Option<RuntimeQuant>) -> Self {
        self.runtime_quant = quant;
        self
    }

    /// When both Gated DeltaNet and Mamba2 take their chunked forms (tests
    /// force them on short prompts, or keep the token-by-token reference).
    pub fn with_chunked_scan(mut self, scan: ChunkedScan) -> Self {
        (self.delta_rule_scan, self.ssd_scan) = (scan, scan);
        self
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

impl Default for PortableDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl Driver for PortableDriver {
    type Weight = Weight;
    type Act = Act;
    type Kv = KvCache;

    fn name(&self) -> &'static str {
        "portable"
    }

    fn supports(&self, op: OpKind) -> bool {
        // Every op of the spec language, composite ones included.
        OpKind::ALL.contains(&op)
    }

    fn describe(&self) -> String {
        format!("portable ({} threads)", self.threads())
    }

    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    fn run_pass(
        &self,
        kv: &mut KvCache,
        batch: &ForwardBatch,
        pass: &mut pie_driver::Pass<'_, Self>,
    ) -> Result<Act> {
        if !batch.fed_tokens {
            return pass(kv, batch);
        }
        let fed = self.fed.0.lock().expect("fed tokens lock").clone();
        batch.check_fed(fed.as_ref().map(Vec::len))?;
        pass(kv, &batch.with_tokens_fed(fed.unwrap_or_default()))
    }

    fn argmax_start(&self, x: &Act, rows: &[usize]) -> Result<pie_driver::PendingIds> {
        let ids = self.argmax_rows(x, rows)?;
        *self.fed.0.lock().expect("fed tokens lock") = Some(ids.clone());
        Ok(pie_driver::PendingIds::ready(ids))
    }

    fn feeds_tokens(&self) -> bool {
        true
    }

    /// `auto` caches f16 for checkpoints stored narrower than f32 (GGUF
    /// blocks, f16, bf16), as llama.cpp does: half the bytes attention
    /// streams per step, at a cost measured in docs/QUANTIZATION.md. f32
    /// checkpoints keep an f32 cache, so their parity stays exact.
    fn resolve_kv_dtype(&self, requested: KvDType, float_weights: bool) -> KvDType {
        match requested {
            KvDType::Auto if float_weights => KvDType::F32,
            KvDType::Auto => KvDType::F16,
            other => other,
        }
    }

    fn load_weight(
        &self,
        name: &str,
        view: &TensorView<'_>,
        expected: &[usize],
        role: WeightRole,
    ) -> Result<Weight> {
        let weight = Weight::from_view(name, view, expected, role)?;
        Ok(match self.runtime_quant {
            Some(RuntimeQuant::Int8) if role == WeightRole::Matrix => {
                weight.quantized_int8(expected)
            }
            Some(RuntimeQuant::Int8) => match role {
                WeightRole::Experts(layout) => {
                    let mut one = expected[1..].to_vec();
                    if layout.transposed && one.len() == 2 {
                        one.swap(0, 1);
                    }
                    weight.quantized_int8(&one)
                }
                _ => weight,
            },
            _ => weight,
        })
    }

    fn new_kv(&self, layout: &KvLayout) -> Result<KvCache> {
        KvCache::new(layout)
    }

    fn embedding(&self, table: &Weight, batch: &ForwardBatch, a: &EmbeddingAttrs) -> Result<Act> {
        if let Some(&bad) = batch.tokens.iter().find(|&&t| t as usize >= a.vocab) {
            return Err(DriverError::Invalid(format!(
                "token id {bad} is out of range: the model's vocabulary has {} tokens (ids 0..={})",
                a.vocab,
                a.vocab - 1
            )));
        }
        let mut out = Act::zeros(batch.tokens.len(), a.hidden);
        table.gather(a.hidden, &batch.tokens, &mut out.data);
        Ok(out)
    }

    fn linear(&self, x: &Act, w: &Weight, bias: Option<&Weight>, a: &LinearAttrs) -> Result<Act> {
        x.expect_width(a.in_features, "linear")?;
        let mut out = Act::zeros(x.rows, a.out_features);
        w.matmul(
            &x.data,
            x.rows,
            a.in_features,
            a.out_features,
            &mut out.data,
        );
        if let Some(b) = bias {
            elementwise::add_bias(&mut out, b.vector());
        }
        Ok(out)
    }

    fn rms_norm(&self, x: &Act, w: Option<&Weight>, a: &RmsNormAttrs) -> Result<Act> {
        x.expect_width(a.width, "rms_norm")?;
        Ok(elementwise::rms_norm(x, w.map(Weight::vector), a))
    }

    fn layer_norm(
        &self,
        x: &Act,
        w: Option<&Weight>,
        b: Option<&Weight>,
        a: &LayerNormAttrs,
    ) -> Result<Act> {
        x.expect_width(a.width, "layer_norm")?;
        Ok(elementwise::layer_norm(
            x,
            w.map(Weight::vector),
            b.map(Weight::vector),
            a.eps,
        ))
    }

    fn rope(&self, x: &Act, batch: &ForwardBatch, a: &RopeAttrs) -> Result<Act> {
        x.expect_width(a.heads * a.head_dim, "rope")?;
        rope::apply_in_batch(x, batch, a)
    }

    fn attention(
        &self,
        q: &Act,
        k: Option<&Act>,
        v: Option<&Act>,
        sinks: Option<&Weight>,
        kv: &mut KvCache,
        batch: &ForwardBatch,
        a: &AttentionAttrs,
    ) -> Result<Act> {
        attention::paged_attention(q, k, v, sinks.map(Weight::vector), kv, batch, a)
    }

    fn add(&self, x: &Act, y: &Act, a: &ElementwiseAttrs) -> Result<Act> {
        elementwise::zip(x, y, a.width, |p, q| p + q)
    }

    fn mul(&self, x: &Act, y: &Act, a: &ElementwiseAttrs) -> Result<Act> {
        elementwise::zip(x, y, a.width, |p, q| p * q)
    }

    fn scale(&self, x: &Act, w: Option<&Weight>, a: &ScaleAttrs) -> Result<Act> {
        let Some(w) = w else {
            return Ok(elementwise::map(x, |v| v * a.factor));
        };
        let w = w.vector();
        x.expect_width(w.len(), "scale")?;
        let mut out = x.clone();
        for row in out.data.chunks_mut(x.width) {
            row.iter_mut()
                .zip(w)
                .for_each(|(v, wi)| *v *= a.factor * wi);
        }
        Ok(out)
    }

    fn glu(&self, gate: &Act, up: &Act, a: &GluAttrs) -> Result<Act> {
        if let Some(limit) = a.limit {
            return elementwise::zip(gate, up, a.width, |g, u| {
                elementwise::clamped_swiglu(g, u, limit)
            });
        }
        let f = elementwise::activation_fn(a.func);
        elementwise::zip(gate, up, a.width, |g, u| f(g) * u)
    }

    fn activation(&self, x: &Act, a: &ActivationAttrs) -> Result<Act> {
        let f = elementwise::activation_fn(a.func);
        Ok(elementwise::map(x, f))
    }

    fn softcap(&self, x: &Act, a: &SoftcapAttrs) -> Result<Act> {
        let cap = a.cap;
        Ok(elementwise::map(x, |v| (v / cap).tanh() * cap))
    }

    fn split(&self, x: &Act, a: &SplitAttrs) -> Result<Vec<Act>> {
        if a.group == 0
            || !x.width.is_multiple_of(a.group)
            || a.sizes.iter().sum::<usize>() != a.group
        {
            return Err(DriverError::Invalid(format!(
                "split of width {} by {:?} per {}",
                x.width, a.sizes, a.group
            )));
        }
        Ok(elementwise::split(x, &a.sizes, a.group))
    }

    fn concat(&self, parts: &[&Act], a: &ConcatAttrs) -> Result<Act> {
        let widths: Vec<usize> = parts.iter().map(|p| p.width).collect();
        if widths != a.widths || parts.iter().any(|p| p.rows != parts[0].rows) {
            return Err(DriverError::Invalid(format!(
                "concat of widths {widths:?} (expected {:?})",
                a.widths
            )));
        }
        Ok(elementwise::concat(parts))
    }

    fn mix(&self, x: &Act, coefs: &Act, a: &MixAttrs) -> Result<Act> {
        mix::mix(x, coefs, a)
    }

    fn rms(&self, x: &Act, a: &RmsAttrs) -> Result<Act> {
        x.expect_width(a.width, "rms")?;
        Ok(elementwise::rms(x, a.group))
    }

    fn gaussian_topk(&self, x: &Act, a: &GaussianTopkAttrs) -> Result<Act> {
        x.expect_width(a.width, "gaussian_topk")?;
        Ok(elementwise::gaussian_topk(x, a))
    }

    fn composite(
        &self,
        op: OpKind,
        inputs: &[&Act],
        weights: &[Option<&Weight>],
        a: &CompositeAttrs,
        kv: &mut KvCache,
        batch: &ForwardBatch,
    ) -> Result<Act> {
        batch.refuse_masks(op)?;
        match (op, inputs) {
            (OpKind::Moe, [x]) => moe::moe(x, weights, a),
            (OpKind::GatedDeltaNet, [x]) => {
                gdn::gated_delta_net(x, weights, a, kv, batch, self.delta_rule_scan)
            }
            (OpKind::Mamba2, [x]) => mamba2::mamba2(x, weights, a, kv, batch, self.ssd_scan),
            (OpKind::MlaAttention, [x]) => mla::mla_attention(x, weights, a, kv, batch),
            _ => Err(DriverError::Unsupported {
                op,
                driver: self.name(),
            }),
        }
    }

    fn copy_page(&self, kv: &mut KvCache, from: u32, to: u32) -> Result<()> {
        kv.copy_page(from as usize, to as usize)
    }

    fn copy_state(&self, kv: &mut KvCache, from: u32, to: u32) -> Result<()> {
        kv.copy_state(from as usize, to as usize)
    }

    fn select_rows(&self, x: &Act, rows: &[usize]) -> Result<Act> {
        let data = self.read_rows(x, rows)?;
        Ok(Act {
            data,
            rows: rows.len(),
            width: x.width,
        })
    }

    fn read_rows(&self, x: &Act, rows: &[usize]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(rows.len() * x.width);
        for &r in rows {
            if r >= x.rows {
                return Err(DriverError::Invalid(format!(
                    "row {r} requested from an activation of {} rows",
                    x.rows
                )));
            }
            out.extend_from_slice(x.row(r));
        }
        Ok(out)
    }
}
